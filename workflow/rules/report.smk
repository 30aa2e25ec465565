rule figures:
    input:
        tables=rules.tables.output,
        # all four kinds: dvc.yaml's stage depends on the whole results/analysis folder
        analysis=[
            expand(rules.layer_scan.output.csv, arch=ARCHS),
            expand(rules.histograms.output.csv, arch=HISTOGRAM_ARCHS),
            expand(rules.corruptions.output.csv, arch=ARCHS),
            expand(rules.remedy.output.csv, arch=ARCHS),
        ],
    output:
        figures=report(
            directory("results/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
            labels={"figure": "{name}"},
        ),
    log:
        "logs/figures/figures.log",
    benchmark:
        "benchmarks/figures/figures.tsv"
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        tables_dir=folder("input.tables"),
        analysis_dir=folder("input.analysis", up=2),
    script:
        "../scripts/figures.py"


rule report:
    input:
        tables=rules.tables.output,
        figures=rules.figures.output.figures,
        analysis=rules.figures.input.analysis,
    output:
        html="results/report.html",
        metrics="results/metrics.json",
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        tables_dir=folder("input.tables"),
        analysis_dir=folder("input.analysis", up=2),
        benchmarks_dir="benchmarks",
        config_keys=config_keys(
            "seed",
            "runtime",
            "dataset",
            "teacher",
            "kd",
            "pairs",
            "quant",
            "evaluate",
            "analysis",
        ),
    script:
        "../scripts/report.py"
