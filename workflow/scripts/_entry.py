"""One entry for every workflow script, under Snakemake's ``script:`` and from DVC's ``cmd``.

Under Snakemake the script finds a ``snakemake`` object among its globals: the config is
``snakemake.config`` (already checked by the Snakefile), each name is a wildcard, a named
input, output or param of the rule, and stdout and stderr go to the rule's log file.
From the command line (``python workflow/scripts/pair.py --arch resnet18 ...``, as dvc.yaml
runs them) each name is an option (``pair_template`` is ``--pair-template``) and
``--config`` lists the config files, later ones overlaying earlier ones (SPEC §6).
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

# Jobs run the dptq of this checkout whether or not it is pip-installed (a --use-conda
# environment holds only the third-party pins): the project root is two folders up.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dptq import config as dptq_config  # noqa: E402


def arguments(description: str | None, names: list[str]) -> SimpleNamespace:
    """``names`` and ``config`` (the checked config dict) of this job, from either orchestrator."""
    sys.excepthook = _report
    smk = getattr(sys.modules["__main__"], "snakemake", None)
    args = _from_snakemake(smk, names) if smk is not None else _from_command_line(description, names)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return args


def _report(kind, err, tb) -> None:
    """A fixable fault (dptq's own errors: config, checkpoint, diverged training; a missing or
    unreadable file) is reported as its message alone, which names the file or key and the fix;
    anything else is a bug and keeps its traceback."""
    if kind.__module__.partition(".")[0] == "dptq" or issubclass(kind, OSError):
        print(f"error: {err}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, err, tb)


def _from_snakemake(smk, names: list[str]) -> SimpleNamespace:
    if smk.log:
        _redirect_output(smk.log[0])
    sources = {"wildcards": smk.wildcards, "input": smk.input, "output": smk.output, "params": smk.params}
    values = {}
    for name in names:
        found = [kind for kind, items in sources.items() if name in items.keys()]
        if len(found) != 1:
            raise KeyError(f"rule {smk.rule}: {name!r} must be exactly one of its named wildcards, inputs, "
                           f"outputs or params; found in {found or 'none'}")
        values[name] = getattr(sources[found[0]], name)
    return SimpleNamespace(config=dict(smk.config), **values)


def _redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (Python's and any library's) to the log file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _from_command_line(description: str | None, names: list[str]) -> SimpleNamespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", nargs="+", default=["config.yaml"], metavar="YAML",
                        help="config files, later ones overlay earlier ones (default: config.yaml)")
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, required=True)
    args = parser.parse_args()
    try:
        args.config = dptq_config.load(args.config)
    except dptq_config.ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return SimpleNamespace(**vars(args))
