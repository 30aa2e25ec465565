"""A real one-node SLURM cluster (munge, slurmctld, slurmd) for the tests.

``with cluster() as c:`` writes a ``slurm.conf`` for this machine, puts it at
``/etc/slurm/slurm.conf`` (the executor's job step strips ``SLURM_*`` variables, so
``SLURM_CONF`` alone does not reach ``srun`` inside a job), starts the daemons, waits until the
node is idle, and afterwards stops them by PID and restores whatever ``/etc/slurm/slurm.conf``
was before. Debian's ``slurm-wlm slurmctld slurmd slurm-client munge`` and root are needed.

Only one such cluster fits on a machine (fixed ports, one ``/etc/slurm/slurm.conf``), so a
session holds a file lock in :data:`ROOT` while its cluster runs; a second session waits for it.
Whatever a killed session left behind (daemons whose PIDs it recorded, the symlink, a backup of
the original config) is cleaned up by the next session that takes the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(tempfile.gettempdir()) / "dptq-slurm"
ETC_CONF = Path("/etc/slurm/slurm.conf")
BACKUP = ETC_CONF.with_name("slurm.conf.dptq-backup")
MUNGE_RUN = Path("/run/munge")
PARTITION = "debug"
BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol")
LOCK_TIMEOUT_S = 900
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its config file, default partition and the node's CPUs and memory."""

    conf: Path
    partition: str
    cpus: int
    mem_mb: int


def _binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [b for b in BINARIES if _binary(b) is None]
    if missing:
        return (f"SLURM binaries not found: {', '.join(missing)}; install them with "
                "`apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge`")
    if os.geteuid() != 0:
        return "a one-node SLURM cluster needs root (it writes /etc/slurm/slurm.conf and runs munged as munge)"
    return None


def require() -> None:
    """Skip the calling test when no cluster can be started, or fail it on CI (env ``CI`` set)."""
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails rather than skips)")
    if reason:
        pytest.skip(reason)


def _node_line(mem_mb: int) -> str:
    """This machine's ``NodeName`` line as ``slurmd -C`` sees it, with ``RealMemory`` lowered.

    ``RealMemory`` must not exceed what slurmd measures, or the node is drained as invalid.
    """
    words = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.split()
    fields = [w for w in words if w.split("=")[0] in
              ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")]
    return " ".join([f"NodeName={socket.gethostname().split('.')[0]}", *fields, f"RealMemory={mem_mb}", "State=UNKNOWN"])


def _free_mem_mb() -> int:
    """80 % of the memory available now (``free -m``'s available column), in MB."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(int(meminfo["MemAvailable"].split()[0]) / 1024 * 0.8)


def write_conf(run: Path, mem_mb: int) -> Path:
    """A ``slurm.conf`` for one node with state, spool and logs under ``run``."""
    conf = run / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=dptq",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={run}/state",
        f"SlurmdSpoolDir={run}/spool",
        f"SlurmctldPidFile={run}/slurmctld.pid",
        f"SlurmdPidFile={run}/slurmd.pid",
        f"SlurmctldLogFile={run}/slurmctld.log",
        f"SlurmdLogFile={run}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # Without a default, a job that asks no memory gets the whole node's.
        "DefMemPerCPU=1000",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        # squeue (the status command without accounting) must still see a finished job when
        # Snakemake polls; the plugin's poll interval grows up to 180 s.
        "MinJobAge=300",
        "ReturnToService=2",
        _node_line(mem_mb),
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    (run / "state").mkdir()
    (run / "spool").mkdir()
    return conf


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    ROOT.mkdir(exist_ok=True)
    with open(ROOT / "lock", "w") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another session has held the one-node SLURM (lock {ROOT / 'lock'}) "
                                       f"for over {LOCK_TIMEOUT_S} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int, name: str) -> bool:
    """Whether ``pid`` runs and is ``name`` (so a recycled PID is never signalled)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _stop(pid: int, name: str) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; reap it when it is our child."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        if not _alive(pid, name):
            break
        os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _alive(pid, name):
                break
            time.sleep(0.1)
    (ROOT / f"{name}.pid").unlink(missing_ok=True)


def _clean_leftovers() -> None:
    """Undo what a killed session left: its daemons, its symlink, the moved-aside config."""
    for name in ("slurmd", "slurmctld", "munged"):
        pidfile = ROOT / f"{name}.pid"
        if pidfile.exists():
            _stop(int(pidfile.read_text()), name)
    if ETC_CONF.is_symlink() and str(os.readlink(ETC_CONF)).startswith(str(ROOT)):
        ETC_CONF.unlink()
    if BACKUP.exists() or BACKUP.is_symlink():
        BACKUP.rename(ETC_CONF)
    shutil.rmtree(ROOT / "run", ignore_errors=True)


def _start(name: str, argv: list[str], log: Path, **popen) -> int:
    """Start a daemon in the foreground of its own session and record its PID."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)
    (ROOT / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _munge_works() -> bool:
    encoded = subprocess.run([_binary("munge"), "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(
        [_binary("unmunge")], input=encoded.stdout, capture_output=True).returncode == 0


def _wait_idle(run: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run([_binary("sinfo"), "-h", "-o", "%t"], capture_output=True, text=True)
        state = (out.stdout + out.stderr).strip()
        if state == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted(run.glob("*.log")))
    raise RuntimeError(f"the one-node SLURM did not become idle in {START_TIMEOUT_S} s "
                       f"(sinfo says {state!r}); last log lines:\n{logs}")


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """Start munged (unless one already answers), slurmctld and slurmd; stop them afterwards."""
    require()
    with _lock():
        _clean_leftovers()
        run = ROOT / "run"
        run.mkdir()
        mem_mb = _free_mem_mb()
        node = Cluster(conf=write_conf(run, mem_mb), partition=PARTITION, cpus=os.cpu_count() or 1, mem_mb=mem_mb)
        started: list[tuple[int, str]] = []
        moved = ETC_CONF.exists() or ETC_CONF.is_symlink()
        try:
            ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
            if moved:
                ETC_CONF.rename(BACKUP)
            ETC_CONF.symlink_to(node.conf)
            if not _munge_works():  # a munged of the system (or of CI's setup) is reused as is
                MUNGE_RUN.mkdir(parents=True, exist_ok=True)
                shutil.chown(MUNGE_RUN, "munge", "munge")
                started.append((_start("munged", [_binary("munged"), "-F", "--force"], run / "munged.out",
                                       user="munge", group="munge", extra_groups=[]), "munged"))
                deadline = time.monotonic() + START_TIMEOUT_S
                while not _munge_works():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"munged did not answer in {START_TIMEOUT_S} s; see {run / 'munged.out'}")
                    time.sleep(0.2)
            for name in ("slurmctld", "slurmd"):
                started.append((_start(name, [_binary(name), "-D", "-f", str(node.conf)], run / f"{name}.out"), name))
            _wait_idle(run)
            yield node
        finally:
            for pid, name in reversed(started):  # slurmd, slurmctld, then munged
                _stop(pid, name)
            if ETC_CONF.is_symlink():
                ETC_CONF.unlink()
            if moved:
                BACKUP.rename(ETC_CONF)
