"""The one entry of every workflow job, the same command under Snakemake and DVC:

    python workflow/scripts/<job>.py --seed 0 --arch resnet18 ... --network FILE ... \\
        --config config.yaml [PROFILE ...] --keys KEY ... --log FILE

Options name the job's cell (wildcards) and files; ``--config`` lists the config files (later
ones overlay earlier ones, docs/method.md §6); ``--keys`` the dotted config keys its rule
declares, and the job is handed those keys only (:class:`dptq.config.Settings`): reading any
other is an error. Output goes to the log file; a fixable fault is also printed to the terminal.
With ``DPTQ_KEY_AUDIT`` set to a folder, each job writes there the declared keys it never read.
"""

import argparse
import atexit
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

# Jobs run the dptq of this checkout whether or not it is pip-installed (a --use-conda
# environment holds only the third-party pins): the project root is two folders up.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dptq import config as dptq_config  # noqa: E402


def job(description: str | None, cell: list[str] = (), files: list[str] = (), lists: list[str] = (),
        flags: list[str] = ()):
    """``(args, settings)`` of this job: ``cell`` and ``files`` are one value each, ``lists`` any number,
    ``flags`` on when given."""
    parser = argparse.ArgumentParser(description=description)
    for name in cell:
        parser.add_argument(f"--{name}", required=True, type=int if name == "seed" else str)
    for name in files:
        parser.add_argument(f"--{name}", required=True)
    for name in lists:
        parser.add_argument(f"--{name}", nargs="*", default=[])
    for name in flags:
        parser.add_argument(f"--{name}", action="store_true")
    parser.add_argument("--config", nargs="+", required=True, metavar="YAML", help="config files, in overlay order")
    parser.add_argument("--keys", nargs="*", default=[], metavar="KEY", help="the config keys this job reads")
    parser.add_argument("--log", required=True, help="the job's log file")
    args = parser.parse_args()
    name = Path(sys.argv[0]).stem
    terminal = os.fdopen(os.dup(2), "w")
    sys.excepthook = lambda kind, err, tb: _report(kind, err, tb, terminal, args.log)
    _redirect_output(args.log)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    settings = dptq_config.Settings(dptq_config.declared(dptq_config.load(args.config), args.keys), job=name)
    audit = os.environ.get("DPTQ_KEY_AUDIT")
    if audit:
        record = Path(audit) / (args.log.replace("/", "__") + ".json")
        atexit.register(lambda: _write_audit(record, name, args.keys, settings))
    return SimpleNamespace(**{k: v for k, v in vars(args).items() if k not in ("config", "keys")}), settings


def _write_audit(path: Path, name: str, keys: list[str], settings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job": name, "keys": keys, "unread": settings.unread()}))


def _report(kind, err, tb, terminal, log: str) -> None:
    """A fixable fault (dptq's own errors: config, checkpoint, diverged training; a missing or
    unreadable file) is reported as its message alone, which names the file or key and the fix;
    anything else is a bug and keeps its traceback."""
    if kind.__module__.partition(".")[0] == "dptq" or issubclass(kind, OSError):
        message = f"error: {err}"
        print(message, file=sys.stderr)
        print(f"{message} (log: {log})", file=terminal, flush=True)
    else:
        sys.__excepthook__(kind, err, tb)
        print(f"error: {kind.__name__}: {err} (traceback in {log})", file=terminal, flush=True)


def _redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (Python's and any library's) to the log file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
