# The grid's own keys (versions, budgets, offsets) enter as this cell's entries only; which cells
# are trained (cells, modes, hinge_beside) is not a pair's setting.
PAIR_KEYS = section_keys(
    "pairs",
    grid=("versions", "budgets", "budget_offset", "cells", "modes", "hinge_beside"),
)
CELL_KEYS = (
    "dataset",
    "runtime",
    "quant",
    "pairs.versions.{version}",
    "pairs.budgets.{budget}",
    "pairs.budget_offset.{version}",
)
INHERITED_KEYS = ("kd.temperature", "evaluate.batch_size")


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
        config_keys=keys(*CELL_KEYS, *PAIR_KEYS, *INHERITED_KEYS),
        args=args,
    shell:
        job("pair")


# The same detrimental pair with the paper's hinge alone (pairs.hinge_beside), by the pair job: it
# reads D's keys but none of pairs.objective.
HINGE_KEYS = [
    k.replace("{mode}", "detrimental")
    for k in PAIR_KEYS
    if not k.startswith("pairs.objective.")
]


rule hinge_pair:
    input:
        network=rules.distill.output.ckpt,
    output:
        ckpt="checkpoints/seed{seed}/hinge/{arch}/{version}/{budget}/detrimental.pt",
        metrics="checkpoints/seed{seed}/hinge/{arch}/{version}/{budget}/detrimental.csv",
    log:
        "logs/hinge_pair/seed{seed}/{arch}/{version}/{budget}.log",
    benchmark:
        "benchmarks/hinge_pair/seed{seed}/{arch}/{version}/{budget}.tsv"
    conda:
        ENV
    threads: CPUS
    resources:
        gpu=GPUS,
    params:
        config_keys=keys(*CELL_KEYS, *HINGE_KEYS, *INHERITED_KEYS),
        args=args,
    shell:
        job("pair", "--mode detrimental", "--hinge_alone")
