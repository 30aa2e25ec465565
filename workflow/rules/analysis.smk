# Every analysis job reads its arch's Table 1 to find the highlighted cell, then loads that
# cell's robust and detrimental pairs through `pair_template`.

ANALYSIS_KEYS = ("seed", "dataset", "quant", "pairs.policy", "evaluate.batch_size")


rule layer_scan:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/{arch}/layer_scan.csv",
    log:
        "logs/layer_scan/{arch}.log",
    benchmark:
        "benchmarks/layer_scan/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    params:
        pair_template=pair_template,
        config_keys=config_keys(
            *ANALYSIS_KEYS, "analysis.max_examples", "analysis.layer_scan"
        ),
    script:
        "../scripts/layer_scan.py"


rule histograms:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/{arch}/histograms.csv",
    log:
        "logs/histograms/{arch}.log",
    benchmark:
        "benchmarks/histograms/{arch}.tsv"
    wildcard_constraints:
        arch=one_of(HISTOGRAM_ARCHS),
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    params:
        pair_template=pair_template,
        config_keys=config_keys(
            *ANALYSIS_KEYS, "analysis.histogram.range", "analysis.histogram.bin_width"
        ),
    script:
        "../scripts/histograms.py"


rule corruptions:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/{arch}/corruptions.csv",
    log:
        "logs/corruptions/{arch}.log",
    benchmark:
        "benchmarks/corruptions/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    params:
        pair_template=pair_template,
        config_keys=config_keys(
            *ANALYSIS_KEYS, "analysis.max_examples", "analysis.corruptions"
        ),
    script:
        "../scripts/corruptions.py"


rule remedy:
    input:
        table1=rules.evaluate.output.table1,
        layer_scan=rules.layer_scan.output.csv,
        network=rules.distill.output.ckpt,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/{arch}/remedy.csv",
    log:
        "logs/remedy/{arch}.log",
    benchmark:
        "benchmarks/remedy/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    params:
        pair_template=pair_template,
        config_keys=config_keys(*ANALYSIS_KEYS, "analysis.remedy"),
    script:
        "../scripts/remedy.py"
