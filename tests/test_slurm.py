"""The pipeline on a real one-node SLURM through profiles/slurm (tests/slurm_cluster.py).

The test node may have less memory than the profile asks of a cluster node, so every run here
uses :func:`fitted_profile`, the shipped profile with memory capped at the node's. (GPUs come
from the config's runtime.device, which is not cuda here.) Each run happens in a temporary copy of
the project so that its results/ and checkpoints/ stay untouched.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TRIVIAL_TIMEOUT_S = 180
SMOKE_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster.cluster() as node:
        yield node


def fitted_profile(dst: Path, node: slurm_cluster.Cluster) -> Path:
    """profiles/slurm with every mem_mb capped at ``node``'s memory, written to ``dst``."""

    def fit(resources: dict) -> dict:
        return {k: min(v, node.mem_mb) if k == "mem_mb" else v for k, v in resources.items()}

    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = fit(profile["default-resources"])
    profile["set-resources"] = {rule: fit(res) for rule, res in profile["set-resources"].items()}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst


def copy_project(dst: Path) -> Path:
    """The project's tracked and not-ignored files (no venv, results, checkpoints) under ``dst``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.exists() or src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    return dst


def snakemake(args: list[str], cwd: Path, timeout_s: int, env: dict | None = None) -> str:
    """Run snakemake under ``timeout -s KILL`` (a lost SLURM job makes it ignore SIGTERM)."""
    out = subprocess.run(["timeout", "-s", "KILL", str(timeout_s), SNAKEMAKE, *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert out.returncode == 0, f"snakemake {' '.join(args)} exited {out.returncode}:\n{out.stdout[-6000:]}"
    return out.stdout


def outputs(workdir: Path) -> set[str]:
    """Every output file of the DAG, as ``snakemake --summary`` lists it."""
    summary = snakemake(["--workflow-profile", "none", "--cores", "1", "--configfile", "config/smoke.yaml",
                         "--summary", "--quiet", "all"], workdir, 300)
    lines = [line.split("\t") for line in summary.splitlines() if "\t" in line]
    return {row[0] for row in lines[1:]} if lines and lines[0][0] == "output_file" else set()


def test_trivial_job_runs_through_the_executor(slurm, tmp_path):
    # The rule is named after one of the profile's rules so that its per-rule resources are
    # submitted too.
    (tmp_path / "Snakefile").write_text(
        'rule teacher:\n    output: "job.txt"\n    shell: "echo $SLURM_JOB_ID $SLURM_JOB_PARTITION > {output}"\n')
    profile = fitted_profile(tmp_path / "profile", slurm)
    log = snakemake(["--workflow-profile", str(profile)], tmp_path, TRIVIAL_TIMEOUT_S, env=slurm.env())
    job_id, partition = (tmp_path / "job.txt").read_text().split()
    assert job_id.isdigit() and partition == slurm.partition, log
    assert list((tmp_path / "logs" / "slurm").rglob(f"{job_id}.log")), "the job's SLURM log was not kept"


@pytest.fixture(scope="module")
def local_smoke(tmp_path_factory):
    """The smoke DAG run locally on two cores, the reference for the SLURM run."""
    workdir = copy_project(tmp_path_factory.mktemp("local"))
    snakemake(["--workflow-profile", "none", "--cores", "2", "--configfile", "config/smoke.yaml"],
              workdir, SMOKE_TIMEOUT_S)
    return workdir


@pytest.mark.slow
def test_smoke_dag_on_slurm_matches_local_run(slurm, local_smoke, tmp_path):
    missing = [p for p in ("Snakefile", "config/smoke.yaml") if not (ROOT / p).exists()]
    assert not missing, f"the workflow is incomplete: {missing} missing"
    workdir = copy_project(tmp_path / "project")
    profile = fitted_profile(tmp_path / "profile", slurm)
    snakemake(["--workflow-profile", str(profile), "--configfile", "config/smoke.yaml"],
              workdir, SMOKE_TIMEOUT_S, env=slurm.env())

    expected = outputs(local_smoke)
    assert expected and outputs(workdir) == expected
    missing = sorted(p for p in expected if not (workdir / p).exists())
    assert not missing, f"outputs missing after the SLURM run: {missing}"
    assert "Nothing to be done" in snakemake(
        ["--workflow-profile", "none", "--cores", "1", "--configfile", "config/smoke.yaml", "-n"], workdir, 300)
    assert list((workdir / "logs" / "slurm").rglob("*.log")), "no SLURM job log was kept"
    table1 = "results/tables/table1.csv"
    assert (workdir / table1).read_text() == (local_smoke / table1).read_text()
