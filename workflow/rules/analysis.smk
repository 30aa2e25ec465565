# Every analysis job reads its seed's and arch's Table 1 to find the highlighted cell, then
# takes that cell's robust and detrimental pairs from its arch's pair checkpoints.


rule layer_scan:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/seed{seed}/{arch}/layer_scan.csv",
    log:
        "logs/layer_scan/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/layer_scan/seed{seed}/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(*INFERENCE, "analysis.max_examples", "analysis.layer_scan"),
        args=args,
    shell:
        job("layer_scan")


rule histograms:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/seed{seed}/{arch}/histograms.csv",
    log:
        "logs/histograms/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/histograms/seed{seed}/{arch}.tsv"
    wildcard_constraints:
        arch=one_of(HISTOGRAM_ARCHS),
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(
            *INFERENCE, "analysis.histogram.range", "analysis.histogram.bin_width"
        ),
        args=args,
    shell:
        job("histograms")


rule corruptions:
    input:
        table1=rules.evaluate.output.table1,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/seed{seed}/{arch}/corruptions.csv",
    log:
        "logs/corruptions/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/corruptions/seed{seed}/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(*INFERENCE, "analysis.max_examples", "analysis.corruptions"),
        args=args,
    shell:
        job("corruptions")


rule remedy:
    input:
        table1=rules.evaluate.output.table1,
        layer_scan=rules.layer_scan.output.csv,
        network=rules.distill.output.ckpt,
        pairs=pair_checkpoints,
    output:
        csv="results/analysis/seed{seed}/{arch}/remedy.csv",
    log:
        "logs/remedy/seed{seed}/{arch}.log",
    benchmark:
        "benchmarks/remedy/seed{seed}/{arch}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(*INFERENCE, "analysis.remedy"),
        args=args,
    shell:
        job("remedy")
