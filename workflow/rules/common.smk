"""Shared by the stage files: the config's lists, the wildcard constraints they imply, and the
helpers that the stages' params use."""

import re
from pathlib import Path

ARCHS = config["kd"]["archs"]
VERSIONS = list(config["pairs"]["versions"])
BUDGETS = list(config["pairs"]["budgets"])
MODES = config["pairs"]["modes"]
HISTOGRAM_ARCHS = [a for a in ARCHS if a in config["analysis"]["histogram"]["archs"]]

# A job's CPUs: torch's threads plus the data loader's worker processes.
CPUS = config["runtime"]["threads"] + config["dataset"]["num_workers"]
# Ask a scheduler (SLURM) for a GPU only when the config says the jobs run on one; a local
# run never waits on it (no `--resources gpu=` limit is set).
GPUS = int(config["runtime"]["device"] == "cuda")
ENV = "../../envs/dptq.yaml"


report: "../report/workflow.rst"


def one_of(names):
    """A regex that matches exactly one of ``names`` (and nothing when there are none)."""
    return "|".join(map(re.escape, names)) or "(?!)"


wildcard_constraints:
    arch=one_of(ARCHS),
    version=one_of(VERSIONS),
    budget=one_of(BUDGETS),
    mode=one_of(MODES),


def config_keys(*keys):
    """The config values a job depends on, ``{key: value}``, as a ``params`` entry.

    Snakemake re-runs a job when one of its params changes, as ``dvc repro`` does for the
    same keys listed under the stage's ``params`` in dvc.yaml (a test keeps the two lists
    equal). Keys are dotted paths and may name wildcards, e.g. ``pairs.versions.{version}``.
    """

    def values(wildcards):
        paths = [key.format(**wildcards) for key in keys]
        return {p: lookup(dpath=p.replace(".", "/"), within=config) for p in paths}

    return values


def pair_checkpoints(wildcards):
    """Every (version, budget, mode) pair checkpoint of the job's arch."""
    return expand(
        rules.pair.output.ckpt,
        arch=wildcards.arch,
        version=VERSIONS,
        budget=BUDGETS,
        mode=MODES,
    )


def pair_template(wildcards):
    """The job's arch's pair checkpoint path, ``{version}``, ``{budget}`` and ``{mode}`` left
    to fill: how the evaluation and analysis functions find the highlighted pair."""
    return expand(rules.pair.output.ckpt, arch=wildcards.arch, allow_missing=True)[0]


def folder(of, up=1):
    """A ``params`` function: the folder ``up`` levels above the job's first file of ``of``
    (``"input.NAME"`` or ``"output.NAME"``), for the functions that take folders."""
    kind, name = of.split(".")

    def path(wildcards, input, output):
        files = {"input": input, "output": output}[kind][name]
        first = files if isinstance(files, str) else files[0]
        return str(Path(first).parents[up - 1])

    return path
