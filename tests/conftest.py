"""Shared fixtures: a private copy of the project, the smoke DAG run once per session, and the
small int8 test networks (tests/small_nets.py).

Pipelines run in subprocesses with the venv's ``bin`` first on ``PATH`` (dvc.yaml calls
``python``) and one torch thread, each in a temporary copy of the project's tracked and
not-ignored files, so the checkout's own results/ and checkpoints/ stay untouched.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dptq import config

pytest_plugins = ["small_nets"]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE_TIMEOUT_S = 1800


def tool_env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path, timeout_s: int = SMOKE_TIMEOUT_S, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a tool of the venv (``snakemake``, ``dvc``, ``python`` ...) with stderr folded into stdout.

    ``timeout -s KILL``: a hung child must not hang the suite. ``check`` asserts exit 0 and
    shows the output's tail otherwise. ``env``: instead of :func:`tool_env`.
    """
    out = subprocess.run(["timeout", "-s", "KILL", str(timeout_s), *args], cwd=cwd, env=env or tool_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check:
        assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode} in {cwd}:\n{out.stdout[-8000:]}"
    return out


def copy_project(dst: Path, smoke: bool = False) -> Path:
    """The project's tracked and not-ignored files under ``dst``, as a fresh git repository.

    With ``smoke`` its config.yaml is config/smoke.yaml merged onto it, so that ``dvc repro``
    (which reads config.yaml) and ``snakemake --configfile config/smoke.yaml`` see one config.
    """
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.exists() or src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    if smoke:
        merged = config.load([dst / "config.yaml", dst / "config" / "smoke.yaml"])
        (dst / "config.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    git = ["git", "-c", "user.name=dptq tests", "-c", "user.email=tests@dptq.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "project copy"]):
        subprocess.run(git + args, cwd=dst, check=True, capture_output=True)
    return dst


KEY_AUDIT = "key_audit"  # under the smoke run's folder: per job, the declared keys it never read


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A project copy in which ``snakemake --cores 2 --configfile config/smoke.yaml`` has run the whole DAG,
    every job recording the config keys it declared but never read (``DPTQ_KEY_AUDIT``).

    Read-only for tests: copy it (``shutil.copytree``, which keeps mtimes; or :func:`linked_copy`) before
    changing anything.
    """
    workdir = copy_project(tmp_path_factory.mktemp("smoke_run"))
    run(["env", f"DPTQ_KEY_AUDIT={workdir / KEY_AUDIT}", str(BIN / "snakemake"), "--cores", "2",
         "--configfile", "config/smoke.yaml"], workdir)
    return workdir


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished run for read-only tools (``snakemake -n``, ``dvc status``): data files
    and DVC's content-addressed cache hard-linked (same mtimes, no bytes copied: a test's disk is a
    few MB, not the run's GB), the config files and the tools' own state copied, so that editing
    them leaves ``src`` untouched."""
    def copy(path, target):
        name = Path(path).relative_to(src).parts
        state = name[0] in (".dvc", ".snakemake", ".git") and name[:2] != (".dvc", "cache")
        if state or Path(path).suffix in (".yaml", ".lock"):
            return shutil.copy2(path, target)
        return os.link(path, target)

    return Path(shutil.copytree(src, dst, copy_function=copy, symlinks=True))
