# The deployment audit (beyond the paper): every network of audit.models, and with
# audit.pipeline the first seed's W of every arch, under the worst-case policy and ONNX Runtime.


rule audit_model:
    input:
        unpack(audited),
    output:
        json="results/audit/{model}/audit.json",
        cells="results/audit/{model}/cells.csv",
        sensitivity="results/audit/{model}/sensitivity.csv",
        coupling="results/audit/{model}/coupling.csv",
        figure="results/figures/audit_{model}.png",
    log:
        "logs/audit/{model}.log",
    benchmark:
        "benchmarks/audit/{model}.tsv"
    wildcard_constraints:
        model=one_of(MODELS),
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=audit_keys,
        args=args,
    shell:
        job("audit")


rule audit:
    input:
        expand(rules.audit_model.output.json, model=MODELS),
