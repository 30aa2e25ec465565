rule evaluate:
    input:
        network=rules.distill.output.ckpt,
        pairs=pair_checkpoints,
    output:
        table1="results/tables/seed{seed}/{arch}/table1.csv",
        table2="results/tables/seed{seed}/{arch}/table2.csv",
        table3="results/tables/seed{seed}/{arch}/table3.csv",
    log:
        "logs/evaluate/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/evaluate/seed{seed}/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(
            *INFERENCE, "evaluate.highlight_max_fp_gap", "evaluate.random_policy_seed"
        ),
        args=args,
    shell:
        job("evaluate")


rule tables:
    input:
        arch_table1=per_seed_and_arch(rules.evaluate.output.table1),
        arch_table2=per_seed_and_arch(rules.evaluate.output.table2),
        arch_table3=per_seed_and_arch(rules.evaluate.output.table3),
    output:
        table1=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Tables",
        ),
        summary=report(
            "results/tables/table1_summary.csv",
            caption="../report/table1_summary.rst",
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
        effect=report(
            "results/tables/effect.csv",
            caption="../report/effect.rst",
            category="Tables",
        ),
        bit_floor=report(
            "results/tables/bit_floor.csv",
            caption="../report/bit_floor.rst",
            category="Tables",
        ),
    log:
        "logs/tables.log",
    benchmark:
        "benchmarks/tables.tsv"
    conda:
        ENV
    params:
        config_keys=keys(
            "evaluate.highlight_max_fp_gap", "evaluate.effect", "pairs.budgets"
        ),
        args=args,
    shell:
        job("tables")
