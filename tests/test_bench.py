"""bench/: the projection's stage counts against hand-computed values, the start-up bench's output redirection, and
every script runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dptq import config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import projection  # noqa: E402
import startup  # noqa: E402

ZERO = {"distill": 0.0, "infer fp": 0.0, "infer q": 0.0, "pair": 0.0, "pair eval": 0.0}


def seconds_with(cfg, arch_ms=None, teacher_ms=None, n_train=898, n_test=899):
    arch_times = {"resnet18": {**ZERO, **(arch_ms or {})}}
    teacher_times = {"plain": 0.0, "infer fp": 0.0, **(teacher_ms or {})}
    return projection.project(cfg, arch_times, teacher_times, {"resnet18": 20}, n_train, n_test)


@pytest.fixture
def cfg():
    return config.load([ROOT / "config.yaml"], overrides={"kd": {"archs": ["resnet18"], "batch_size": 64},
                                                          "pairs": {"batch_size": 16, "epochs": 2},
                                                          "analysis": {"histogram": {"archs": ["resnet18"]}}})


def test_pair_stage_counts(cfg):
    # n_val = round(0.1 * 898) = 90, n_fit = 808: 51 steps of 16 (the last one padded to a full
    # step) = 816 images per epoch, 2 epochs, 3 versions x 3 budgets x 2 modes = 18 pairs
    assert seconds_with(cfg, {"pair": 1.0})[("pairs", "resnet18")] == pytest.approx(18 * 2 * 816 / 1000)
    # validation: 18 pairs x 2 epochs x 90 images
    assert seconds_with(cfg, {"pair eval": 1.0})[("pairs", "resnet18")] == pytest.approx(18 * 2 * 90 / 1000)


def test_teacher_and_distill_counts(cfg):
    s = seconds_with(cfg, teacher_ms={"plain": 1.0})
    assert s[("teacher", "resnet50")] == pytest.approx(10 * 13 * 64 / 1000)  # 10 epochs of 13 x 64 >= 808
    s = seconds_with(cfg, {"distill": 1.0})
    assert s[("distill", "resnet18")] == pytest.approx(20 * 13 * 64 / 1000)


def test_analysis_counts(cfg):
    # layer scan: 2 networks x 3 x 20 masks x (150 train + 150 test); corruptions 2 x (1 clean +
    # 2 seedless x 5 degrees + 7 seeded x 5 degrees x 3 seeds) x 150; histograms 2 x 899;
    # remedy 16 quantized settings x 899
    q = 2 * 3 * 20 * 300 + 2 * (1 + 2 * 5 + 7 * 5 * 3) * 150 + 2 * 899 + 16 * 899
    assert seconds_with(cfg, {"infer q": 1.0})[("analyses", "resnet18")] == pytest.approx(q / 1000)
    # evaluate: 18 pairs at FP and quantized, Table 3's white box at FP and 9 quantized runs
    assert seconds_with(cfg, {"infer q": 1.0})[("evaluate", "resnet18")] == pytest.approx(899 * (18 + 9) / 1000)


def test_every_training_seed_runs_the_whole_study(cfg):
    ms = {"distill": 1.0, "infer fp": 1.0, "infer q": 1.0, "pair": 1.0, "pair eval": 1.0}
    one = seconds_with(cfg, ms, {"plain": 1.0, "infer fp": 1.0})
    three = seconds_with(config.merge(cfg, {"seed": [0, 1, 2]}), ms, {"plain": 1.0, "infer fp": 1.0})
    assert three.keys() == one.keys() and all(three[k] == pytest.approx(3 * one[k]) for k in one)


def test_startup_moves_only_the_job_outputs(tmp_path):
    command = ["--seed", "0", "--network", "checkpoints/seed0/distill/resnet18.pt", "--ckpt", "checkpoints/seed0/pair/x.pt",
               "--metrics", "checkpoints/seed0/pair/x.csv", "--config", "config.yaml", "--log", "logs/pair/x.log"]
    moved = startup.redirected(command, tmp_path)
    assert moved == ["--seed", "0", "--network", "checkpoints/seed0/distill/resnet18.pt", "--ckpt", str(tmp_path / "x.pt"),
                     "--metrics", str(tmp_path / "x.csv"), "--config", "config.yaml", "--log", str(tmp_path / "x.log")]


def run(script, *args, path: str = ""):
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT / "bench", capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": path})
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.slow
def test_scripts_run():
    """Each bench script on a tiny setting: it runs and prints its table (numbers not checked)."""
    assert "resnet18" in run("pair_step.py", "--archs", "resnet18", "--size", "16", "--batch", "2", "--repeats", "1")
    assert "total" in run("projection.py", "--config", "../config.yaml", "../config/smoke.yaml", "--max-batch", "2", "--repeats", "1")
    assert "images/s" in run("input_pipeline.py", "--images", "40", "--workers", "0", "--config", "../config.yaml", "../config/paper.yaml")
    assert "same bits" in run("pair_equivalence.py", "--archs", "resnet18", "--size", "16", "--batch", "2")
    assert "77" in run("mckp.py", "--repeats", "1")
    assert "ms/step" in run("calibrate.py", "--steps", "1", "--batch", "2")
    assert "pair this/base" in run("step_ab.py", "--base", "HEAD", "--archs", "resnet18", "--size", "16", "--batch", "2",
                                   "--rounds", "1", path=os.environ["PATH"])  # it reads the base revision with git
    assert "learned at or below" in run("controllers.py", "--archs", "resnet18", "--steps", "1", "--set", "audit.policy.epochs=1",
                                        "analysis.max_examples=20")


@pytest.mark.slow
def test_gpu_sh_on_the_cpu(tmp_path):
    """bench/gpu.sh end to end on tiny sizes (56-75 s here): every step succeeds, summary.md holds every
    number, the CUDA-only kernel share says n/a, and $OUT holds no more than the device tool brings back (8 files)."""
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = (tmp_path / "summary.md").read_text()
    steps = ("versions", "pair_b256", "pair_b64", "mckp", "projection", "train", "equivalence")
    for step in steps:
        assert f" {step} ok (" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| number")]
    expected = {"pair / plain": 5, "quant / plain": 5, "distillation's efficiency": 3, "kernel share": 3, "MCKP": 1,
                "projected": 1, "smoke W": 1, "pair-step equivalence": 3}
    assert {k: sum(r.startswith(f"| {k}") for r in rows) for k in expected} == expected and len(rows) == 22
    assert not any("— (" in r for r in rows), summary  # every number is there
    assert sum("| n/a on cpu |" in r for r in rows) == 3
    assert "the program's allocation: True" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["summary.md", *(f"{step}.txt" for step in steps)])
