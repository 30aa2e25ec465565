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
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from graphlib import TopologicalSorter
from itertools import takewhile
from pathlib import Path

import yaml

from . import config as dptq_config

HEADER = """\
# Generated from the Snakemake rules by `python -m dptq.dvc{args}`: do not edit; change the
# rules (workflow/rules/) or the config and generate it again (tests/test_workflow.py checks that the
# committed file is current for the default config).
"""
METRICS = ("results/metrics.json",)


@dataclass
class Job:
    """One job of the DAG, as Snakemake's dry run reports it."""

    rule: str
    wildcards: dict[str, str]
    input: list[str]
    output: list[str]
    shellcmd: str | None

    @property
    def config_keys(self) -> list[str]:
        """The config keys the job declares: the ``--keys`` part of its command
        (workflow/rules/common.smk: ``job()``)."""
        words = self.shellcmd.split()
        return list(takewhile(lambda word: not word.startswith("--"), words[words.index("--keys") + 1:]))


def jobs(configfiles: Sequence[str], workdir: Path) -> list[Job]:
    """Every job of the DAG that runs a command (forced: the jobs of a complete run), in a stable
    order: by level of the DAG, then by rule and outputs.

    Only Snakemake's public interfaces: a dry run (``snakemake.api``) logs each job's rule,
    wildcards, files and command as a ``LogEvent.JOB_INFO`` record, whose fields the logger plugin
    interface (snakemake-interface-logger-plugins) documents; a handler on the logger that the API
    manages collects them."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)
    from snakemake_interface_logger_plugins.common import LogEvent

    found: dict[int, Job] = {}

    class JobInfo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == LogEvent.JOB_INFO:
                found[record.jobid] = Job(record.rule_name, dict(record.wildcards or {}), list(record.input or []),
                                          list(record.output or []), record.shellcmd)

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL}, enable_file_logging=False)) as api:
        api.logger_manager.logger.addHandler(JobInfo())
        workflow_api = api.workflow(ResourceSettings(), ConfigSettings(configfiles=[Path(f) for f in configfiles]),
                                    StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        workflow_api.dag(DAGSettings(forceall=True)).execute_workflow(executor="dryrun")
    if not found:
        raise RuntimeError("Snakemake's dry run logged no JOB_INFO record: re-check dptq/dvc.py against "
                           "this Snakemake version (requirements.txt pins the tested one)")
    # the levels of Snakemake's own DAG (each job after the jobs that write its inputs), so the
    # stages keep their order
    writer = {path: jobid for jobid, job in found.items() for path in job.output}
    sorter = TopologicalSorter({jobid: {writer[path] for path in job.input if path in writer}
                                for jobid, job in found.items()})
    sorter.prepare()
    ordered = []
    while sorter.is_active():
        level = sorter.get_ready()
        sorter.done(*level)
        ordered += sorted((found[jobid] for jobid in level), key=lambda j: (j.rule, " ".join(j.output)))
    return [job for job in ordered if job.shellcmd]


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


def stage_name(job: Job) -> str:
    values = [f"seed{v}" if k == "seed" else str(v) for k, v in job.wildcards.items()]
    return "-".join([job.rule, *values])


def stage(job: Job, configfiles: Sequence[str], trees: Sequence[Mapping]) -> dict:
    outs = job.output
    script = next(word for word in job.shellcmd.split() if word.startswith("workflow/scripts/"))
    entry = {"cmd": job.shellcmd.strip(), "deps": [script, *job.input]}
    params = []
    for path, tree in zip(configfiles, trees):
        found = [param_key(tree, key) for key in job.config_keys]
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
