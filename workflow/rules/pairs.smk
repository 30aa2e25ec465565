# The grid's own keys (versions, budgets, offsets) enter as this cell's entries only; which cells
# are trained (cells, modes) is not a pair's setting.
PAIR_KEYS = section_keys(
    "pairs", grid=("versions", "budgets", "budget_offset", "cells", "modes")
)


rule pair:
    input:
        network=rules.distill.output.ckpt,
    output:
        ckpt="checkpoints/seed{seed}/pair/{arch}/{version}/{budget}/{mode}.pt",
        metrics="checkpoints/seed{seed}/pair/{arch}/{version}/{budget}/{mode}.csv",
    log:
        "logs/pair/seed{seed}/{arch}/{version}/{budget}/{mode}.log",
    benchmark:
        "benchmarks/pair/seed{seed}/{arch}/{version}/{budget}/{mode}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(
            "dataset",
            "runtime",
            "quant",
            "pairs.versions.{version}",
            "pairs.budgets.{budget}",
            "pairs.budget_offset.{version}",
            *PAIR_KEYS,
            "kd.temperature",
            "evaluate.batch_size",
        ),
        args=args,
    shell:
        job("pair")
