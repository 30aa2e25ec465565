# One figure per table-figure of the paper, each with its caption file (workflow/report/).
FIGURES = {
    "fig1_table1": "fig1_table1",
    "fig2_layer_scan": "fig2_layer_scan",
    **{f"fig3_histograms_{a}": "fig3_histograms" for a in HISTOGRAM_ARCHS},
    **{f"fig4_corruptions_{a}": "fig4_corruptions" for a in ARCHS},
    **({"fig5_bit_floor": "fig5_bit_floor"} if BIT_FLOOR else {}),
}


rule figures:
    input:
        table1=rules.tables.output.table1,
        summary=rules.tables.output.summary,
        layer_scan=per_seed_and_arch(rules.layer_scan.output.csv),
        histograms=per_seed_and_arch(rules.histograms.output.csv, HISTOGRAM_ARCHS),
        corruptions=per_seed_and_arch(rules.corruptions.output.csv),
    output:
        png=[
            report(
                f"results/figures/{name}.png",
                caption=f"../report/{kind}.rst",
                category="Figures",
            )
            for name, kind in FIGURES.items()
        ],
        pdf=expand("results/figures/{name}.pdf", name=FIGURES),
    log:
        "logs/figures.log",
    benchmark:
        "benchmarks/figures.tsv"
    conda:
        ENV
    params:
        config_keys=keys(),
        args=args,
    shell:
        job("figures")


rule report:
    input:
        table1=rules.tables.output.table1,
        summary=rules.tables.output.summary,
        table2=rules.tables.output.table2,
        table3=rules.tables.output.table3,
        effect=rules.tables.output.effect,
        hinge=rules.tables.output.hinge,
        remedy=per_seed_and_arch(rules.remedy.output.csv),
        layer_scan=per_seed_and_arch(rules.layer_scan.output.csv),
        figures=rules.figures.output.png,
        audits=rules.audit.input,
        audit_cells=expand(rules.audit_model.output.cells, model=MODELS),
        audit_coupling=expand(rules.audit_model.output.coupling, model=MODELS),
        audit_figures=expand(rules.audit_model.output.figure, model=MODELS),
        captions=expand(
            "workflow/report/{kind}.rst",
            kind=sorted(
                {
                    *FIGURES.values(),
                    "table1",
                    "table1_summary",
                    "table2",
                    "table3",
                    "effect",
                    "hinge",
                    "bit_floor",
                    "audit",
                }
            ),
        ),
    output:
        html="results/report.html",
        metrics="results/metrics.json",
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        ENV
    params:
        # the page shows the whole config that made it
        config_keys=keys(
            "seed",
            "runtime",
            "dataset",
            "teacher",
            "kd",
            "pairs",
            "quant",
            "evaluate",
            "analysis",
            "audit",
        ),
        args=args,
    shell:
        job("report")
