"""dptq.train: each stage on a tiny problem, exact resume after a kill or SIGTERM, determinism,
non-finite losses, and the query-only teacher."""
import math
import os
import signal

import pytest
import torch

from dptq import checkpoint, config, data, train

torch.set_num_threads(1)
TINY = {
    "dataset": {"image_size": 16, "val_fraction": 0.2},
    "teacher": {"arch": "resnet18", "epochs": 1, "batch_size": 32},
    "kd": {"archs": ["resnet18"], "epochs": 1, "batch_size": 32},
    "pairs": {"epochs": 2, "batch_size": 32},
    "evaluate": {"batch_size": 64},
    "analysis": {"histogram": {"archs": ["resnet18"]}},
}


@pytest.fixture(autouse=True)
def small_data(monkeypatch):
    """96 training images: two steps of 32 per epoch after the validation share."""
    build = data.build

    def subset(cfg, split, augment=False):
        ds = build(cfg, split, augment)
        return torch.utils.data.Subset(ds, range(min(len(ds), 80 if split == "fit" else 20)))

    monkeypatch.setattr(data, "build", subset)


@pytest.fixture(scope="module")
def cfg():
    return config.merge(config.read_yaml("config.yaml"), TINY)


@pytest.fixture(scope="module")
def network(cfg, tmp_path_factory):
    """A teacher and its distilled resnet18, trained for one epoch each."""
    root = tmp_path_factory.mktemp("stages")
    mp = pytest.MonkeyPatch()
    small_build = data.build
    mp.setattr(data, "build", lambda c, s, augment=False: torch.utils.data.Subset(small_build(c, s, augment), range(40)))
    train.train_teacher(cfg, root / "teacher.pt", root / "teacher.csv")
    train.distill(cfg, "resnet18", root / "teacher.pt", root / "resnet18.pt", root / "resnet18.csv")
    mp.undo()
    return root


def test_teacher_and_distill_outputs(network):
    teacher = checkpoint.load(network / "teacher.pt", kind="teacher")
    student = checkpoint.load(network / "resnet18.pt", kind="distill", arch="resnet18")
    assert teacher["num_classes"] == student["num_classes"] == 10
    assert checkpoint.network(student)(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    lines = (network / "resnet18.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,loss,train_acc,lr,seconds,val_acc") and len(lines) == 2
    assert not list(network.glob("*.resume"))


def test_teacher_is_query_only(cfg, network):
    stage = train.DistillStage(cfg, torch.device("cpu"), "resnet18", checkpoint.load(network / "teacher.pt"))
    assert callable(stage.teacher) and not isinstance(stage.teacher, torch.nn.Module)
    logits = stage.teacher(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and not logits.requires_grad
    trainable = {id(p) for m in stage.modules().values() for p in m.parameters()}
    assert len(trainable) == sum(1 for _ in stage.model.parameters())


def pair(cfg, network, out, mode="robust"):
    train.train_pair(cfg, "resnet18", "II", "B", mode, network / "resnet18.pt", out, out.with_suffix(".csv"))
    return checkpoint.load(out, kind="pair")


def assert_same_weights(a, b):
    for part in ("model", "policy"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_pair_checkpoint(cfg, network, tmp_path):
    ckpt = pair(cfg, network, tmp_path / "robust.pt")
    assert ckpt["cell"]["capacity"] == 130 and ckpt["cell"]["options"] == list(range(4, 11))
    assert 1 <= ckpt["best_epoch"] <= 2
    policy = checkpoint.policy(ckpt)
    assert policy(torch.zeros(1, 3, 16, 16)).shape == (1, 20, 7)
    rows = (tmp_path / "robust.csv").read_text().splitlines()
    assert "val_q_acc" in rows[0] and len(rows) == 3


def test_same_seed_same_weights(cfg, network, tmp_path):
    assert_same_weights(pair(cfg, network, tmp_path / "a.pt"), pair(cfg, network, tmp_path / "b.pt"))


@pytest.mark.parametrize("how", ["killed", "sigterm"])
def test_resume_equals_uninterrupted(cfg, network, tmp_path, monkeypatch, how):
    """Interrupted in epoch 2 (after its first step), then re-run: the same final weights."""
    uninterrupted = pair(cfg, network, tmp_path / "full.pt")
    out = tmp_path / "cut.pt"
    real_loss = train.PairStage.loss
    calls = {"n": 0}

    def interrupting_loss(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, step 1 (3 steps per epoch)
            if how == "killed":
                raise KeyboardInterrupt  # like SIGKILL: nothing of this epoch is saved
            os.kill(os.getpid(), signal.SIGTERM)  # handled after this step: state saved mid-epoch
        return real_loss(self, images, labels)

    monkeypatch.setattr(train.PairStage, "loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt if how == "killed" else train.Preempted):
        pair(cfg, network, out)
    saved = checkpoint.load(train.resume_path(out), kind="pair-resume")
    assert (saved["epoch"], saved["step"]) == ((1, 0) if how == "killed" else (1, 1))
    monkeypatch.setattr(train.PairStage, "loss", real_loss)
    resumed = pair(cfg, network, out)
    assert_same_weights(uninterrupted, resumed)
    assert (tmp_path / "full.csv").read_text().split("\n")[0] == (tmp_path / "cut.csv").read_text().split("\n")[0]
    assert not train.resume_path(out).exists()


def test_non_finite_loss_names_stage_epoch_step(cfg, network, tmp_path, monkeypatch):
    real_loss = train.PairStage.loss
    calls = {"n": 0}

    def nan_loss(self, images, labels):
        calls["n"] += 1
        loss, correct = real_loss(self, images, labels)
        return (loss * float("nan") if calls["n"] == 4 else loss), correct

    monkeypatch.setattr(train.PairStage, "loss", nan_loss)
    with pytest.raises(train.TrainingError, match=r"pair .*non-finite loss nan at epoch 2, step 1.*last good state is kept in .*\.resume"):
        pair(cfg, network, tmp_path / "nan.pt")
    assert checkpoint.load(train.resume_path(tmp_path / "nan.pt"), kind="pair-resume")["epoch"] == 1


def test_corrupt_resume_file_is_refused_not_overwritten(cfg, network, tmp_path):
    out = tmp_path / "x.pt"
    train.resume_path(out).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"x\.pt\.resume: truncated or corrupted.*delete .* to start this stage again"):
        pair(cfg, network, out)
    assert train.resume_path(out).read_bytes() == b"not a checkpoint"


def test_wrong_arch_checkpoint_is_refused(cfg, network, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"holds arch 'resnet18', expected 'regnetx_016'"):
        train.train_pair(cfg, "regnetx_016", "II", "B", "robust", network / "resnet18.pt", tmp_path / "p.pt", tmp_path / "p.csv")


def test_lr_factor_warms_up_linearly_then_decays_on_the_cosine():
    # 10 steps, 4 of warm-up, min_lr / lr = 0.1: hand-computed
    assert [train.lr_factor(s, 10, 4, 0.1) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert math.isclose(train.lr_factor(7, 10, 4, 0.1), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert math.isclose(train.lr_factor(10, 10, 4, 0.1), 0.1)
    # without warm-up: torch's CosineAnnealingLR over the same steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.05)
    for step in range(13):
        assert math.isclose(opt.param_groups[0]["lr"], 0.5 * train.lr_factor(step, 12, 0, 0.1), rel_tol=1e-9), step
        opt.step()
        cosine.step()
