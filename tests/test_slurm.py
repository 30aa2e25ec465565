"""The pipeline on a real one-node SLURM through profiles/slurm (tests/slurm_cluster.py).

The test node has less memory than the profile asks of a cluster node, so every run here uses
:func:`fitted_profile`, the shipped profile with memory capped at the node's share per CPU.
(GPUs come from the config's runtime.device, which is not cuda here.) Each run happens in a
temporary copy of the project so that its results/ and checkpoints/ stay untouched.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import slurm_cluster
from conftest import BIN, ROOT, run

TRIVIAL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster.cluster() as node:
        yield node


def fitted_profile(dst: Path, node: slurm_cluster.Cluster) -> Path:
    """profiles/slurm with every mem_mb capped at ``node``'s memory per CPU, written to ``dst``.

    The cap lets the node run one job per CPU, as the local run does with ``--cores`` CPUs;
    the uncapped profile would have SLURM run the smoke DAG's jobs one at a time.
    """
    cap = node.mem_mb // node.cpus

    def fit(resources: dict) -> dict:
        return {k: min(v, cap) if k == "mem_mb" else v for k, v in resources.items()}

    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = fit(profile["default-resources"])
    profile["set-resources"] = {rule: fit(res) for rule, res in profile["set-resources"].items()}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst


def produced(workdir: Path) -> list[str]:
    """Every file that a run left in checkpoints/ and results/."""
    return sorted(str(p.relative_to(workdir)) for top in ("checkpoints", "results")
                  for p in (workdir / top).rglob("*") if p.is_file())


def test_trivial_job_runs_through_the_executor(slurm, tmp_path):
    # The rule is named after one of the profile's rules so that its per-rule resources are
    # submitted too.
    (tmp_path / "Snakefile").write_text(
        'rule teacher:\n    output: "job.txt"\n    shell: "echo $SLURM_JOB_ID $SLURM_JOB_PARTITION > {output}"\n')
    profile = fitted_profile(tmp_path / "profile", slurm)
    log = run([str(BIN / "snakemake"), "--workflow-profile", str(profile)], tmp_path, TRIVIAL_TIMEOUT_S).stdout
    job_id, partition = (tmp_path / "job.txt").read_text().split()
    assert job_id.isdigit() and partition == slurm.partition, log
    assert list((tmp_path / "logs" / "slurm").rglob(f"{job_id}.log")), "the job's SLURM log was not kept"


@pytest.mark.slow
def test_smoke_dag_on_slurm_matches_local_run(slurm, smoke_run, tmp_path):
    """The smoke DAG through SLURM leaves the same files as the local run, and the same Table 1."""
    # A clone of the local run's committed tree, not a fresh copy: the same code and config
    # even if the checkout changed since the local run.
    workdir = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(smoke_run), str(workdir)], check=True, capture_output=True)
    profile = fitted_profile(tmp_path / "profile", slurm)
    run([str(BIN / "snakemake"), "--workflow-profile", str(profile), "--configfile", "config/smoke.yaml"], workdir)

    assert produced(workdir) == produced(smoke_run) != []
    dry = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", "config/smoke.yaml"], workdir, 300)
    assert "Nothing to be done" in dry.stdout, dry.stdout[-3000:]
    assert list((workdir / "logs" / "slurm").rglob("*.log")), "no SLURM job log was kept"
    table1 = "results/tables/table1.csv"
    assert (workdir / table1).read_text() == (smoke_run / table1).read_text()
