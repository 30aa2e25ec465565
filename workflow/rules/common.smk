"""Shared by the stage files: the config check, the grid, and how every job is called.

Every job runs one command, the same under Snakemake and DVC (dvc.yaml is generated from these
rules: ``python -m dptq.dvc``): its thin script in workflow/scripts/ with its cell, its files,
the config files and the config keys its rule declares. The job is handed those keys only.
"""

import os
import re
import sys

from snakemake.utils import validate

import dptq.config
import dptq.tables


# Jobs call `python`: let it be the one running Snakemake (`.venv/bin/snakemake` works without
# activating the venv); a --use-conda environment still comes first once activated.
envvars:
    "PATH",


os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ["PATH"]]
)

# The config files in overlay order; jobs read them, so the merged config must come from files.
CONFIGS = [
    os.path.relpath(f)
    for f in ["config.yaml", *map(str, workflow.overwrite_configfiles)]
]
try:
    if dptq.config.load(CONFIGS) != config:
        sys.exit(
            "Config error: --config overrides are not seen by the jobs, which read the config files; "
            "put the values in a profile file and pass it with --configfile"
        )
except dptq.config.ConfigError as err:
    sys.exit(f"Config error: {err}")
validate(config, "../schemas/config.schema.yaml")

SEEDS = dptq.config.seeds(config)
ARCHS = config["kd"]["archs"]
VERSIONS = list(config["pairs"]["versions"])
BUDGETS = list(config["pairs"]["budgets"])
# (version, budget) of every cell trained: pairs.cells, or every version x budget
GRID = list(dptq.config.cells(config["pairs"]).values())
MODES = config["pairs"]["modes"]
HISTOGRAM_ARCHS = [a for a in ARCHS if a in config["analysis"]["histogram"]["archs"]]
# versions of one option (every layer the same bits): the bit floor's figure (docs/method.md §2.23)
BIT_FLOOR = any(
    low == high for low, high in map(config["pairs"]["versions"].get, dict(GRID))
)

# A job's CPUs: torch's threads plus the data loader's worker processes. Memory and run time
# are the profiles' (profiles/*/config.yaml); a GPU is asked for exactly when the config says
# the jobs run on one, which no profile can know.
CPUS = config["runtime"]["threads"] + config["dataset"]["num_workers"]
GPUS = int(config["runtime"]["device"] == "cuda")
ENV = "../../envs/dptq.yaml"


report: "../report/workflow.rst"


def one_of(names):
    """A regex that matches exactly one of ``names`` (and nothing when there are none)."""
    return "|".join(map(re.escape, map(str, names))) or "(?!)"


wildcard_constraints:
    seed=one_of(SEEDS),
    arch=one_of(ARCHS),
    version=one_of(VERSIONS),
    budget=one_of(BUDGETS),
    mode=one_of(MODES),


class Keys(dict):
    """The config keys a job declares, ``{key: value}``: Snakemake re-runs the job when a value
    changes (a param); on the command line it is the key names."""

    def __str__(self):
        return " ".join(self)


def section_keys(section, grid=()):
    """Every key of ``config[section]`` but the ``grid`` ones, as dotted paths; a per-arch setting
    (``dptq.config.PER_ARCH``) as its ``{arch}`` entry, a per-mode one (``PER_MODE``) as its
    ``{arch}.{mode}`` entry, a per-version one (``PER_VERSION``) as ``{arch}.{mode}.{version}``:
    a job tracks its own value only. A key holding per-arch settings (``objective``:
    ``objective.loss``, ...) enters as each of its keys."""
    per_arch = dptq.config.PER_ARCH.get(section, ())
    per_mode = dptq.config.PER_MODE.get(section, ())
    per_version = dptq.config.PER_VERSION.get(section, ())
    nested = {k.partition(".")[0] for k in per_arch if "." in k}
    names = [
        name
        for k in config[section]
        if k not in grid
        for name in (
            [f"{k}.{sub}" for sub in config[section][k]] if k in nested else [k]
        )
    ]
    return [
        f"{section}.{k}"
        + (".{arch}" if k in per_arch else "")
        + (".{mode}" if k in per_mode else "")
        + (".{version}" if k in per_version else "")
        for k in names
    ]


def keys(*paths):
    """A ``params`` entry: the declared keys, dotted paths that may name wildcards
    (``pairs.lr.{arch}``: one entry of a per-arch map)."""

    def declared(wildcards):
        names = [p.format(**wildcards) for p in paths]
        return Keys({n: dptq.config.declared(config, [n]) for n in names})

    return declared


def job(script, *options):
    """The ``shell:`` line of a job: its thin script, cell and files, ``options`` beyond them, config
    files and keys, log."""
    return " ".join(
        (f"python workflow/scripts/{script}.py {{params.args}}", *options)
        + ("--keys {params.config_keys} --log {log}",)
    )


def args(wildcards, input, output):
    """A ``params`` entry: the job's cell (its wildcards), files and config files as options."""
    named = [*wildcards.items(), *input.items(), *output.items(), ("config", CONFIGS)]
    # an empty list (an arch without hinge-alone pairs) is left out: the option defaults to none
    return " ".join(
        f"--{name} {v if isinstance(v, str) else ' '.join(v)}"
        for name, v in named
        if isinstance(v, str) or len(v)
    )


def pair_checkpoints(wildcards):
    """Every (version, budget, mode) pair checkpoint of the job's seed and arch: the grid's cells."""
    return [
        rules.pair.output.ckpt.format(
            seed=wildcards.seed, arch=wildcards.arch, version=v, budget=b, mode=m
        )
        for v, b in GRID
        for m in MODES
    ]


def hinge_checkpoints(wildcards):
    """The job's seed and arch's detrimental pair with the hinge alone at the paper's cell, where
    pairs.hinge_beside trains one (``dptq.config.hinge_beside``); else none."""
    cell = dptq.tables.paper_cell(wildcards.arch)
    return [
        rules.hinge_pair.output.ckpt.format(
            seed=wildcards.seed, arch=wildcards.arch, version=v, budget=b
        )
        for v, b in dptq.config.hinge_beside(config, wildcards.arch, cell)
    ]


# What every inference job reads of the config.
INFERENCE = (
    "dataset",
    "runtime",
    "quant",
    "pairs.policy.profits",
    "evaluate.batch_size",
)


def per_seed_and_arch(files, archs=ARCHS):
    """``files`` (a rule's output pattern) of every seed and arch."""
    return expand(files, seed=SEEDS, arch=archs)


# The deployment audit's models (workflow/rules/audit.smk): every network of audit.models, and
# with audit.pipeline the first seed's W of every arch; its cells as (version, budget).
MODELS = [*(ARCHS if config["audit"]["pipeline"] else []), *config["audit"]["models"]]
AUDIT_CELLS = list(
    dptq.config.cells(config["pairs"], config["audit"]["cells"]).values()
)


def audit_keys(wildcards):
    """The audit's keys: of the grid, the audited cells' entries; of audit.models, the job's own."""
    own = wildcards.model in config["audit"]["models"]
    return keys(
        *INFERENCE,
        *dict.fromkeys(f"pairs.versions.{v}" for v, _ in AUDIT_CELLS),
        *dict.fromkeys(f"pairs.budgets.{b}" for _, b in AUDIT_CELLS),
        *dict.fromkeys(f"pairs.budget_offset.{v}" for v, _ in AUDIT_CELLS),
        "pairs.policy.input_size",
        "pairs.policy.width",
        "pairs.grad_clip",
        "pairs.select_best",
        "analysis.max_examples",
        "analysis.corruptions.names",
        "analysis.corruptions.degrees",
        "evaluate.random_policy_seed",
        *(["audit.models.{model}"] if own else []),
        *[f"audit.{k}" for k in config["audit"] if k not in ("models", "pipeline")],
    )(wildcards)


def audited(wildcards):
    """The audited network's file: the user's weights, or the pipeline's W and the R and D
    pairs of the audited cells (their runtime accuracy is reported too)."""
    spec = config["audit"]["models"].get(wildcards.model)
    if spec is not None:
        return {"weights": spec["weights"]}
    pair = rules.pair.output.ckpt
    return {
        "network": expand(
            rules.distill.output.ckpt, seed=SEEDS[0], arch=wildcards.model
        ),
        "pairs": [
            pair.format(
                seed=SEEDS[0], arch=wildcards.model, version=v, budget=b, mode=m
            )
            for v, b in AUDIT_CELLS
            for m in MODES
        ],
    }
