"""Faults as a user meets them through Snakemake: a run killed with SIGKILL mid-epoch resumes
from its last finished epoch to the weights of a run that never stopped, a second run in the
same folder is refused, and a damaged checkpoint or a missing dataset or weights file stops the
job with one message naming the file and the fix, not a traceback.

Each scenario runs the teacher (or the first distillation) of config/smoke.yaml in a temporary
copy of the project; the function-level faults (corrupt resume file, NaN loss, SIGTERM) are in
tests/test_train.py and tests/test_checkpoint.py.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BIN, copy_project, run, tool_env

pytestmark = pytest.mark.slow

TEACHER = "checkpoints/seed0/teacher.pt"
# Enough epochs that the kill lands while the run still has work left.
EPOCHS = 8


def project(dst: Path, **overlay) -> Path:
    """A smoke project copy whose config.yaml also carries ``overlay`` (section -> keys)."""
    workdir = copy_project(dst, smoke=True)
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    for section, values in {"teacher": {"epochs": EPOCHS}, **overlay}.items():
        cfg[section].update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return workdir


def snakemake(*args: str) -> list[str]:
    return [str(BIN / "snakemake"), "--cores", "1", *args]


def wait_for(condition, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigkill_then_rerun_incomplete_resumes_to_the_same_weights_and_a_second_run_is_locked_out(tmp_path):
    reference = project(tmp_path / "reference")
    run(snakemake(TEACHER), reference)

    workdir = project(tmp_path / "killed")
    first = subprocess.Popen(snakemake(TEACHER), cwd=workdir, env=tool_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any((workdir / ".snakemake" / "locks").glob("*")), "Snakemake's lock")
        # even a run told to redo the running (hence incomplete) job is refused: the lock
        second = run(snakemake("--rerun-incomplete", TEACHER), workdir, check=False)
        assert second.returncode != 0 and "cannot be locked" in second.stdout, second.stdout[-3000:]

        resume = workdir / f"{TEACHER}.resume"
        wait_for(resume.exists, "the first epoch's resume file")
        time.sleep(1.5)  # a few steps into epoch 2: the kill lands mid-epoch
    finally:
        # SIGKILL to the whole session, Snakemake and its job alike: what a node failure does
        subprocess.run(["pkill", "-KILL", "-s", str(first.pid)], check=False)
        first.wait()
    assert not (workdir / TEACHER).exists(), "the run finished before the kill; raise EPOCHS"
    assert torch.load(resume, weights_only=True)["epoch"] < EPOCHS

    # what a user does after a killed run: release the stale lock, re-run the incomplete job
    run(snakemake("--unlock", TEACHER), workdir)
    run(snakemake("--rerun-incomplete", TEACHER), workdir)
    log = (workdir / "logs" / "teacher" / "seed0.log").read_text()
    assert "resuming from checkpoints/seed0/teacher.pt.resume at epoch" in log, log[-3000:]
    assert not resume.exists()
    expected, got = weights(reference / TEACHER), weights(workdir / TEACHER)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def failed_job_log(workdir: Path, target: str, log: str) -> str:
    """Run ``target``, which must fail; its job's log, which must say why without a traceback."""
    out = run(snakemake(target), workdir, check=False)
    assert out.returncode != 0, out.stdout[-3000:]
    text = (workdir / log).read_text()
    assert "Traceback" not in text, text[-3000:]
    return text


def test_damaged_teacher_checkpoint_stops_distillation_naming_the_file(tmp_path):
    workdir = project(tmp_path / "damaged", teacher={"epochs": 1})
    run(snakemake(TEACHER), workdir)
    whole = (workdir / TEACHER).read_bytes()
    (workdir / TEACHER).write_bytes(whole[: len(whole) // 2])
    text = failed_job_log(workdir, "checkpoints/seed0/distill/resnet18.pt", "logs/distill/seed0/resnet18.log")
    assert f"error: {TEACHER}: truncated or corrupted checkpoint" in text and "re-run the teacher stage" in text, text
    assert (workdir / TEACHER).read_bytes() == whole[: len(whole) // 2], "the damaged file must be left for the user"


@pytest.mark.parametrize("overlay, fragments", [
    ({"dataset": {"name": "imagefolder", "root": "no/such/folder"}},
     ["error: dataset.root: no/such/folder/train", "is not a folder", "<class>/<image>"]),
    ({"teacher": {"pretrained": "weights/missing.pth"}},
     ["error: teacher.pretrained: weights file weights/missing.pth not found", "or set it to false"]),
], ids=["missing-dataset", "missing-weights"])
def test_missing_input_file_is_named_with_the_fix(tmp_path, overlay, fragments):
    workdir = project(tmp_path / "missing", **overlay)
    text = failed_job_log(workdir, TEACHER, "logs/teacher/seed0.log")
    assert all(f in text for f in fragments), text
