rule evaluate:
    input:
        network=rules.distill.output.ckpt,
        pairs=pair_checkpoints,
    output:
        table1="results/tables/by_arch/{arch}/table1.csv",
        table2="results/tables/by_arch/{arch}/table2.csv",
        table3="results/tables/by_arch/{arch}/table3.csv",
    log:
        "logs/evaluate/{arch}.log",
    benchmark:
        "benchmarks/evaluate/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    params:
        pair_template=pair_template,
        out_dir=folder("output.table1"),
        config_keys=config_keys("seed", "dataset", "quant", "pairs.policy", "evaluate"),
    script:
        "../scripts/evaluate.py"


rule tables:
    input:
        per_arch=expand(rules.evaluate.output, arch=ARCHS),
    output:
        table1=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Tables",
        ),
        table2=report(
            "results/tables/table2.csv",
            caption="../report/table2.rst",
            category="Tables",
        ),
        table3=report(
            "results/tables/table3.csv",
            caption="../report/table3.rst",
            category="Tables",
        ),
    log:
        "logs/tables/tables.log",
    benchmark:
        "benchmarks/tables/tables.tsv"
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        by_arch=folder("input.per_arch", up=2),
        out_dir=folder("output.table1"),
    script:
        "../scripts/tables.py"
