"""``dvc.yaml`` from the Snakemake DAG: one DVC stage per Snakemake job, running that job's own
command, with its files as ``deps``/``outs`` and its declared config keys as ``params``.

    python -m dptq.dvc                                   # the default config -> dvc.yaml
    python -m dptq.dvc --configfile config/smoke.yaml    # a profile's pipeline (then: dvc repro)

The Snakemake rules are the one description of the pipeline; this module only translates their
jobs. Each declared key becomes a ``params`` entry of every config file that sets it, so an edit
of that file (or ``dvc exp run -S FILE:KEY=V``) re-runs exactly the jobs that read the key.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from . import config as dptq_config

HEADER = """\
# Generated from the Snakemake rules by `python -m dptq.dvc{args}`: do not edit; change the
# rules (workflow/rules/) or the config and generate it again (tests/test_dvc.py checks that the
# committed file is current for the default config).
"""
METRICS = ("results/metrics.json",)


def jobs(configfiles: Sequence[str], workdir: Path) -> list:
    """Every job of the DAG (forced: the jobs of a complete run), in a stable order."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(ResourceSettings(), ConfigSettings(configfiles=[Path(f) for f in configfiles]),
                                    StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        workflow_api.dag(DAGSettings(forceall=True))
        # what `snakemake --dag` does before it prints the DAG (no public API lists the jobs)
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        levels = workflow.dag.toposorted()
        return [job for level in levels for job in sorted(level, key=lambda j: (j.rule.name, str(j.output)))
                if job.shellcmd]


def param_key(tree: Mapping, key: str) -> str | None:
    """The key under which the config file ``tree`` sets declared ``key``: the key itself, a
    shorter one where the file replaces a whole value on the way (``pairs.lr`` for
    ``pairs.lr.resnet18`` when the file gives one lr for all archs), or None if it sets neither."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            return ".".join(parts[:i])
        if part not in node:
            return None
        node = node[part]
    return key


def stage_name(job) -> str:
    values = [f"seed{v}" if k == "seed" else str(v) for k, v in job.wildcards.items()]
    return "-".join([job.rule.name, *values])


def stage(job, configfiles: Sequence[str], trees: Sequence[Mapping]) -> dict:
    outs = [str(f) for f in job.output]
    script = next(word for word in job.shellcmd.split() if word.startswith("workflow/scripts/"))
    entry = {"cmd": job.shellcmd.strip(), "deps": [script, *map(str, job.input)]}
    params = []
    for path, tree in zip(configfiles, trees):
        found = [param_key(tree, key) for key in job.params.config_keys]
        found = list(dict.fromkeys(k for k in found if k))
        if found:
            params.append({path: found})
    if params:
        entry["params"] = params
    entry["outs"] = [f for f in outs if f not in METRICS]
    metrics = [f for f in outs if f in METRICS]
    if metrics:
        entry["metrics"] = metrics
    if not entry["outs"]:
        del entry["outs"]
    return entry


def pipeline(configfiles: Sequence[str], workdir: Path = Path(".")) -> str:
    """The text of dvc.yaml for the config files ``configfiles`` (``config.yaml`` first)."""
    trees = [dptq_config.read_yaml(workdir / f) for f in configfiles]
    stages = {stage_name(job): stage(job, configfiles, trees) for job in jobs(configfiles[1:], workdir)}
    args = "".join(f" --configfile {f}" for f in configfiles[1:])
    return HEADER.format(args=args) + yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dptq.dvc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", nargs="*", default=[], help="profiles overlaid on config.yaml, in order")
    parser.add_argument("-o", "--output", default="dvc.yaml", help="where to write (default dvc.yaml; - for stdout)")
    args = parser.parse_args(argv)
    text = pipeline(["config.yaml", *args.configfile])
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
