"""dptq.train: each stage on a tiny problem, exact resume after a kill or SIGTERM, determinism,
non-finite losses, and the query-only teacher."""
import csv
import dataclasses
import math
import os
import signal

import pytest
import torch

from dptq import checkpoint, config, data, int8, losses, policy, train
from dptq.runtime import Runtime

torch.set_num_threads(1)
TINY = {
    "dataset": {"image_size": 16, "val_fraction": 0.2},
    "teacher": {"arch": "resnet18", "epochs": 1, "batch_size": 32, "randaugment": {"num_ops": 1, "magnitude": 5}},
    "kd": {"archs": ["resnet18"], "epochs": 1, "batch_size": 32},
    "pairs": {"epochs": 2, "batch_size": 32},
    "evaluate": {"batch_size": 64},
    "analysis": {"histogram": {"archs": ["resnet18"]}},
}


@pytest.fixture(autouse=True)
def small_data(monkeypatch):
    """80 fit and 20 val images: three steps of 32 per epoch (the last one of 16)."""
    build = data.Data.build

    def subset(self, split, randaugment=None):
        ds = build(self, split, randaugment)
        return torch.utils.data.Subset(ds, range(min(len(ds), 80 if split == "fit" else 20)))

    monkeypatch.setattr(data.Data, "build", subset)


@pytest.fixture(scope="module")
def cfg():
    return config.merge(config.read_yaml("config.yaml"), TINY)


def common(cfg) -> dict:
    """The config pieces every training entry point takes."""
    return dict(dataset=cfg["dataset"], runtime=cfg["runtime"], val_batch_size=cfg["evaluate"]["batch_size"])


@pytest.fixture(scope="module")
def stages(cfg, tmp_path_factory):
    """A teacher and its distilled resnet18, trained for one epoch each, and the (split,
    randaugment) of every dataset the two stages built."""
    root = tmp_path_factory.mktemp("stages")
    mp = pytest.MonkeyPatch()
    small_build, builds = data.Data.build, []

    def small(self, split, randaugment=None):
        builds.append((split, randaugment))
        return torch.utils.data.Subset(small_build(self, split, randaugment), range(40))

    mp.setattr(data.Data, "build", small)
    train.train_teacher(0, root / "teacher.pt", root / "teacher.csv", teacher=cfg["teacher"], **common(cfg))
    train.distill(0, "resnet18", root / "teacher.pt", root / "resnet18.pt", root / "resnet18.csv",
                  kd=config.section_for(cfg, "kd", "resnet18"), **common(cfg))
    mp.undo()
    return root, builds


@pytest.fixture(scope="module")
def network(stages):
    return stages[0]


def test_teacher_and_distill_outputs(cfg, stages):
    network, builds = stages
    teacher = checkpoint.load(network / "teacher.pt", kind="teacher")
    student = checkpoint.load(network / "resnet18.pt", kind="distill", arch="resnet18")
    assert teacher["num_classes"] == student["num_classes"] == 10
    assert checkpoint.network(student)(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    lines = (network / "resnet18.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,loss,train_acc,lr,seconds,val_acc") and len(lines) == 2
    assert not list(network.glob("*.resume"))
    # each stage trains on the fit split with its own RandAugment and validates on the plain val split
    assert builds == [("fit", cfg["teacher"]["randaugment"]), ("val", None), ("fit", cfg["kd"]["randaugment"]), ("val", None)]


def recipe(section) -> train.Recipe:
    """A stage's recipe from its config section: every field the section names (mixup_alpha for kd)."""
    fields = {f.name for f in dataclasses.fields(train.Recipe)} - {"val_batch_size"}
    return train.Recipe(**{k: section[k] for k in fields if k in section}, val_batch_size=64)


def test_teacher_is_query_only(cfg, network):
    rt = Runtime(0, **{**cfg["runtime"], "device": "cpu"})
    kd = config.section_for(cfg, "kd", "resnet18")
    stage = train.DistillStage(recipe(kd), data.Data(**cfg["dataset"]), rt, "resnet18",
                               checkpoint.load(network / "teacher.pt"), kd["temperature"])
    assert callable(stage.teacher) and not isinstance(stage.teacher, torch.nn.Module)
    logits = stage.teacher(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and not logits.requires_grad
    trainable = {id(p) for m in stage.modules().values() for p in m.parameters()}
    assert len(trainable) == sum(1 for _ in stage.model.parameters())


def train_pair(cfg, arch, network, out, mode="robust", seed=0):
    train.train_pair(seed, arch, "II", "B", mode, network, out, out.with_suffix(".csv"), quant=cfg["quant"],
                     pairs=config.section_for(cfg, "pairs", arch, mode, "II"), temperature=cfg["kd"]["temperature"],
                     **common(cfg))


def pair(cfg, network, out, mode="robust", seed=0):
    train_pair(cfg, "resnet18", network / "resnet18.pt", out, mode, seed)
    return checkpoint.load(out, kind="pair")


def assert_same_weights(a, b):
    for part in ("model", "policy"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_pair_checkpoint(cfg, network, tmp_path):
    ckpt = pair(cfg, network, tmp_path / "robust.pt")
    assert ckpt["cell"]["capacity"] == 130 and ckpt["cell"]["options"] == list(range(4, 11))
    assert {k: ckpt["cell"][k] for k in ("version", "budget", "mode", "level", "num_layers")} == dict(
        version="II", budget="B", mode="robust", level=5.5, num_layers=20)
    assert 1 <= ckpt["best_epoch"] <= 2
    policy = checkpoint.policy_of(ckpt)
    assert policy(torch.zeros(1, 3, 16, 16)).shape == (1, 20, 7)
    rows = (tmp_path / "robust.csv").read_text().splitlines()
    assert "val_q_acc" in rows[0] and len(rows) == 3


def test_runtime_pair_is_a_plain_network_whose_fold_was_trained(cfg, network, tmp_path):
    """The detrimental network against the runtime's arithmetic: its checkpoint holds the arch's
    own state dict (BN as the identity around the trained bias), loadable as any network, and
    what it computes in float is what its best epoch validated: the val split's accuracy equals
    the metrics' val_fp_acc, and the like-for-like simulator's at 8 bits their val_q_acc."""
    out = tmp_path / "runtime.pt"
    train.runtime_pair(0, "resnet18", "detrimental", network / "resnet18.pt", out, out.with_suffix(".csv"),
                       pairs=config.section_for(cfg, "pairs", "resnet18", "detrimental", "I"),  # no spread term
                       temperature=cfg["kd"]["temperature"], **common(cfg))
    ckpt = checkpoint.load(out, kind="runtime-pair", arch="resnet18")
    model = checkpoint.network(ckpt)
    assert torch.equal(model.bn1.running_var + model.bn1.eps, torch.ones(64)) and not model.bn1.running_mean.any()
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    best = rows[ckpt["best_epoch"] - 1]
    val = data.Data(**cfg["dataset"]).build("val")
    x = data.normalize(torch.stack([val[i][0] for i in range(len(val))]))
    y = torch.tensor([val[i][1] for i in range(len(val))])
    sim = int8.simulator_like_runtime(model, 16)
    with torch.no_grad():
        fp, q = model(x).argmax(1), sim(x, torch.full((len(x), sim.num_layers), 8.0)).argmax(1)
    assert 100 * (fp == y).float().mean().item() == pytest.approx(float(best["val_fp_acc"]))
    assert 100 * (q == y).float().mean().item() == pytest.approx(float(best["val_q_acc"]))


def test_same_seed_same_weights_another_seed_others(cfg, network, tmp_path):
    a = pair(cfg, network, tmp_path / "a.pt")
    assert_same_weights(a, pair(cfg, network, tmp_path / "b.pt"))
    other = pair(cfg, network, tmp_path / "c.pt", seed=1)
    assert not all(torch.equal(a["policy"][k], other["policy"][k]) for k in a["policy"])


def test_policy_lr_sets_the_policys_group_only(cfg, network, tmp_path):
    """pairs.policy.lr: null and the pair's own lr give the same pair (two optimiser groups, the
    same update); another value changes the policy's training."""
    def with_policy_lr(lr, name):
        return pair(config.merge(cfg, {"pairs": {"policy": {"lr": lr}}}), network, tmp_path / name)
    default = with_policy_lr(None, "a.pt")
    lr = config.section_for(cfg, "pairs", "resnet18")["lr"]
    assert_same_weights(default, with_policy_lr(lr, "b.pt"))
    faster = with_policy_lr(10 * lr, "c.pt")
    assert not all(torch.equal(default["policy"][k], faster["policy"][k]) for k in default["policy"])


def test_policy_optimizer_sets_the_policys_own(cfg, network, tmp_path, monkeypatch):
    """pairs.policy.optimizer: null and the pairs' own kind give the same pair (one optimiser); sgd
    under a network on adamw gives AdamW over the student and SGD over the policy, at its lr and
    the pairs' momentum."""
    kind = config.section_for(cfg, "pairs", "resnet18")["optimizer"]
    assert_same_weights(pair(cfg, network, tmp_path / "a.pt"),
                        pair(config.merge(cfg, {"pairs": {"policy": {"optimizer": kind}}}), network, tmp_path / "b.pt"))
    runs, real = [], train._Run.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        runs.append(self)
    monkeypatch.setattr(train._Run, "__init__", spy)
    pair(config.merge(cfg, MIXED), network, tmp_path / "mixed.pt")
    student, policy_ = runs[0].optimizers
    assert isinstance(student, torch.optim.AdamW) and type(policy_) is torch.optim.SGD
    assert student.param_groups[0]["initial_lr"] == 1e-4 and policy_.param_groups[0]["initial_lr"] == 0.03
    assert policy_.defaults["momentum"] == cfg["pairs"]["momentum"]
    assert len(runs[0].params) == sum(len(g["params"]) for o in runs[0].optimizers for g in o.param_groups)


def test_even_start_trains_from_the_even_allocation(cfg, network, tmp_path, monkeypatch):
    """pairs.policy.start: even: the policy that enters training starts at even_profits (BitPolicy.start_at)."""
    seen = []
    real = train.PairStage.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append((self.policy.head.weight.abs().sum().item(), self.policy.head.bias.detach().clone(),
                     self.options, self.capacity))
    monkeypatch.setattr(train.PairStage, "__init__", spy)
    pair(config.merge(cfg, {"pairs": {"policy": {"start": "even"}}}), network, tmp_path / "even.pt")
    weight, bias, options, capacity = seen[0]
    assert weight == 0.0 and torch.equal(bias, policy.even_profits(20, options, capacity).flatten())


def test_the_spread_term_adds_its_weight_times_the_quantized_layers_spread_loss(cfg, network, tmp_path, monkeypatch):
    """pairs.objective.spread_weight λ_s: the pair loss is the paper's plus λ_s · spread_loss of the
    quantized pass's layer inputs (docs/method.md §2.10), and a D trains with it."""
    stages = []
    real = train.PairStage.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        stages.append(self)
    monkeypatch.setattr(train.PairStage, "__init__", spy)
    pair(config.merge(cfg, {"pairs": {"objective": {"spread_weight": 2.0}}}), network, tmp_path / "d.pt", mode="detrimental")
    stage = stages[0]
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_term = stage._losses(x)[0].item()
        spreads = []
        stage.quant(x, stage.bits(x), spreads=spreads)
        stage.objective["spread_weight"] = 0.0
        without = stage._losses(x)[0].item()
    assert len(spreads) == stage.quant.num_layers
    assert with_term == pytest.approx(without + 2.0 * losses.spread_loss(spreads, 55.0).item(), rel=1e-6)
    assert with_term > without


# the network on AdamW, the policy on SGD at its own lr: two optimisers, both saved and restored
MIXED = {"pairs": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "policy": {"optimizer": "sgd", "lr": 0.03}}}


@pytest.mark.parametrize("how, overlay", [("killed", {}), ("sigterm", {}), ("sigterm", MIXED)])
def test_resume_equals_uninterrupted(cfg, network, tmp_path, monkeypatch, how, overlay):
    """Interrupted in epoch 2 (after its first step), then re-run: the same final weights."""
    cfg = config.merge(cfg, overlay)
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
        train_pair(cfg, "regnetx_016", network / "resnet18.pt", tmp_path / "p.pt")


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


def test_recipe_optimizer_follows_the_section():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = recipe({"epochs": 1, "optimizer": "sgd", "lr": 0.1, "min_lr": 0.0, "warmup_epochs": 0, "momentum": 0.8,
                  "weight_decay": 1e-4, "batch_size": 8, "randaugment": {"num_ops": 0, "magnitude": 9}}).optimizer_for(params)
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-4}
    adamw = recipe({"epochs": 1, "optimizer": "adamw", "lr": 2e-3, "min_lr": 0.0, "warmup_epochs": 0, "momentum": 0.9,
                    "weight_decay": 0.05, "batch_size": 8, "randaugment": {"num_ops": 0, "magnitude": 9}})
    opt = adamw.optimizer_for(params)
    assert isinstance(opt, torch.optim.AdamW) and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (2e-3, 0.05)
    assert (adamw.mixup_alpha, adamw.grad_clip, adamw.select_best) == (0.0, None, False)  # the stage-only defaults
