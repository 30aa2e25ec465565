"""Training (paper Sect. 3.1-3.3 and "Training Details"): one loop for three stages.

- teacher: a timm ResNet50 fine-tuned with cross-entropy and label smoothing; afterwards it is
  used query-only (:func:`query_only`), the "black box";
- distill: a student learns the teacher's logits on the same augmented, mixed batch (KL · T²,
  no label term), "patient and consistent";
- pair: a trainable copy S of the distilled network W and a fresh policy π learn
  α · KD(S_fp, W) + β · hinge(S_q(π), W) in robust or detrimental mode.

:func:`fit` runs any :class:`Stage`: per-step warm-up and cosine schedule, progress bar, a metrics CSV, an
atomic resume file after every epoch (and on SIGTERM, mid-epoch) holding every RNG state, so a
killed run resumes to the same weights as one that never stopped.
"""
from __future__ import annotations

import copy
import csv
import functools
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import budgets, checkpoint, data, models, runtime
from .config import section_for
from .evaluate import network_input
from .losses import hinge_loss, kd_loss
from .policy import BitPolicy, allocate
from .quant import DynamicQuant


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names stage, epoch and step."""


class Preempted(SystemExit):
    """SIGTERM arrived (SLURM time limit or preemption); the state is saved, re-run to resume."""


def query_only(model: nn.Module, cfg: Mapping, dev: torch.device) -> Callable[[Tensor], Tensor]:
    """A frozen network as a black box: images in, logits out; no parameters, no gradients."""
    model = runtime.to_device(model, cfg, dev).eval().requires_grad_(False)

    @torch.no_grad()
    def query(images: Tensor) -> Tensor:
        with runtime.autocast(cfg, dev):
            return model(images).float()

    return query


def optimizer_for(section: Mapping, params) -> torch.optim.Optimizer:
    if section["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=section["lr"], momentum=section["momentum"], weight_decay=section["weight_decay"])
    return torch.optim.AdamW(params, lr=section["lr"], weight_decay=section["weight_decay"])


class Stage:
    """What differs between the stages: modules, loss, validation, checkpoint."""

    name: str
    section: str  # the config section with epochs, lr, ...
    mixup: bool = False
    arch: str | None = None  # resolves the section's per-arch settings

    def __init__(self, cfg: Mapping, dev: torch.device):
        self.cfg, self.dev = cfg, dev

    def settings(self) -> dict:
        """The config section (epochs, lr, batch size, ...) with per-arch values resolved."""
        return section_for(self.cfg, self.section, self.arch)

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def train_mode(self) -> None:
        for module in self.modules().values():
            module.train()

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, number of correct top-1 predictions) for one training batch."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, loader) -> dict[str, float]:
        """Held-out metrics after an epoch; ``objective`` (lower is better) picks the best epoch."""
        self.model.eval()
        acc = _accuracy_pass(self, loader, self.model)
        return {"val_acc": acc, "objective": -acc}

    def result(self) -> dict:
        """The final checkpoint's content (beside the weights of :meth:`modules`)."""
        raise NotImplementedError


def _inputs(images: Tensor, stage: Stage) -> Tensor:
    return network_input(images, stage.cfg, stage.dev)


def _accuracy_pass(stage: Stage, loader, forward: Callable[[Tensor], Tensor]) -> float:
    correct = total = 0
    for images, labels in loader:
        with runtime.autocast(stage.cfg, stage.dev):
            correct += (forward(_inputs(images, stage)).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


class TeacherStage(Stage):
    name, section = "teacher", "teacher"

    def __init__(self, cfg, dev, num_classes: int):
        super().__init__(cfg, dev)
        t = cfg["teacher"]
        self.model = runtime.to_device(models.create(t["arch"], num_classes, t["pretrained"]), cfg, dev)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t["label_smoothing"])
        self.num_classes = num_classes

    def modules(self):
        return {"model": self.model}

    def loss(self, images, labels):
        with runtime.autocast(self.cfg, self.dev):
            logits = self.model(_inputs(images, self))
        labels = labels.to(self.dev)
        return self.criterion(logits.float(), labels), (logits.argmax(1) == labels).sum()

    def result(self):
        return {"kind": "teacher", "arch": self.cfg["teacher"]["arch"], "num_classes": self.num_classes}


class DistillStage(Stage):
    name, section, mixup = "distill", "kd", True

    def __init__(self, cfg, dev, arch: str, teacher: Mapping):
        super().__init__(cfg, dev)
        self.arch, self.num_classes = arch, teacher["num_classes"]
        self.teacher = query_only(checkpoint.network(teacher), cfg, dev)
        self.model = runtime.to_device(models.create(arch, self.num_classes), cfg, dev)

    def modules(self):
        return {"model": self.model}

    def loss(self, images, labels):
        """Consistent: the teacher scores exactly the augmented, mixed batch the student sees."""
        x = _inputs(images, self)
        targets = self.teacher(x)
        with runtime.autocast(self.cfg, self.dev):
            logits = self.model(x)
        return kd_loss(logits, targets, self.cfg["kd"]["temperature"]), (logits.argmax(1) == targets.argmax(1)).sum()

    def result(self):
        return {"kind": "distill", "arch": self.arch, "num_classes": self.num_classes}


class PairStage(Stage):
    """A robust or detrimental network/policy pair grown from the distilled network W."""

    name, section = "pair", "pairs"

    def __init__(self, cfg, dev, arch: str, version: str, budget: str, mode: str, network: Mapping):
        super().__init__(cfg, dev)
        pairs, q = cfg["pairs"], cfg["quant"]
        self.arch, self.mode, self.num_classes = arch, mode, network["num_classes"]
        white_box = checkpoint.network(network)
        self.teacher = query_only(copy.deepcopy(white_box), cfg, dev)
        self.student = runtime.to_device(white_box, cfg, dev)
        self.quant = DynamicQuant(self.student, weight_bits=q["weight_bits"], scale_rule=q["activation_scale"],
                                  percentile=q["percentile"], image_size=cfg["dataset"]["image_size"])
        self.options, self.capacity = budgets.cell(cfg, arch, version, budget, self.quant.num_layers)
        self.policy = runtime.to_device(BitPolicy(self.quant.num_layers, len(self.options), pairs["policy"]["input_size"],
                                                  pairs["policy"]["width"]), cfg, dev)
        self.cell = dict(version=version, budget=budget, mode=mode, options=self.options, capacity=self.capacity,
                         num_layers=self.quant.num_layers, policy_input_size=pairs["policy"]["input_size"],
                         policy_width=pairs["policy"]["width"])

    def modules(self):
        return {"model": self.student, "policy": self.policy}

    def train_mode(self):
        """BatchNorm keeps W's running statistics (eval mode; its affine weights still train)."""
        self.student.eval()
        self.policy.train()

    def _losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = self.cfg["pairs"]
        targets = self.teacher(x)
        with runtime.autocast(self.cfg, self.dev):
            bits = allocate(self.policy, x, self.options, self.capacity, p["policy"]["profits"])
            fp_logits = self.student(x)
            q_logits = self.quant(x, bits)
        kd = kd_loss(fp_logits, targets, self.cfg["kd"]["temperature"])
        hinge = hinge_loss(q_logits, targets, p["margin"], self.mode)
        return p["alpha"] * kd + p["beta"] * hinge, targets, fp_logits, q_logits

    def loss(self, images, labels):
        loss, _, _, q_logits = self._losses(_inputs(images, self))
        return loss, (q_logits.argmax(1) == labels.to(self.dev)).sum()

    @torch.no_grad()
    def validate(self, loader):
        self.student.eval()
        self.policy.eval()
        total = objective = fp_correct = q_correct = 0.0
        for images, labels in loader:
            loss, _, fp_logits, q_logits = self._losses(_inputs(images, self))
            labels = labels.to(self.dev)
            objective += loss.item() * len(labels)
            fp_correct += (fp_logits.argmax(1) == labels).sum().item()
            q_correct += (q_logits.argmax(1) == labels).sum().item()
            total += len(labels)
        total = max(total, 1)
        return {"val_fp_acc": 100 * fp_correct / total, "val_q_acc": 100 * q_correct / total, "objective": objective / total}

    def result(self):
        return {"kind": "pair", "arch": self.arch, "num_classes": self.num_classes, "cell": self.cell}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """``random.setstate`` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resume_path(out: str | Path) -> Path:
    """Where the per-epoch state lives: beside the output, which only appears when training is done."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class _Sigterm:
    """Turns SIGTERM into a flag checked between steps (the state is then saved, then exit)."""

    def __init__(self):
        self.received = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.received = True

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self.previous)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """lr(step) / lr: linear warm-up (step + 1) / w for the first w steps, then a half-period cosine
    from 1 down to ``floor`` = min_lr / lr at the last step: f + (1 - f) (1 + cos(π (step - w) / (total - w))) / 2.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def fit(stage: Stage, out: str | Path, metrics: str | Path) -> None:
    """Train ``stage`` for ``cfg[section].epochs`` epochs; write the checkpoint ``out`` atomically.

    Resumes automatically from ``out.resume`` when present. The learning rate follows
    :func:`lr_factor` per step.
    """
    cfg, section = stage.cfg, stage.settings()
    out, metrics = Path(out), Path(metrics)
    fit_set, val_set = data.build(cfg, "fit", augment=True), data.build(cfg, "val") if cfg["dataset"]["val_fraction"] > 0 else None
    batch_size = section["batch_size"]
    # drop a last batch of one: BatchNorm cannot normalise a single example in train mode
    steps_per_epoch = len(data.batch_order(len(fit_set), batch_size)) - (len(fit_set) % batch_size == 1)
    epochs = section["epochs"]
    params = [p for m in stage.modules().values() for p in m.parameters() if p.requires_grad]
    optimizer = optimizer_for(section, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, total=epochs * steps_per_epoch, warmup=round(section["warmup_epochs"] * steps_per_epoch),
        floor=section["min_lr"] / section["lr"]))
    state = {"epoch": 0, "step": 0, "history": [], "best": None, "best_objective": math.inf, "running": [0.0, 0.0, 0]}
    resume = resume_path(out)
    if resume.exists():
        saved = checkpoint.load(resume, kind=f"{stage.name}-resume",
                                recover=f"delete {resume} to start this stage again from scratch (its progress is lost)")
        for name, module in stage.modules().items():
            module.load_state_dict(saved[name])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in state}
        _set_rng_state(saved["rng"])
        print(f"{stage.name}: resuming from {resume} at epoch {state['epoch'] + 1}, step {state['step']}", file=sys.stderr)

    def save_resume() -> None:
        weights = {name: module.state_dict() for name, module in stage.modules().items()}
        checkpoint.save({"kind": f"{stage.name}-resume", **weights, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": _rng_state(), **state}, resume)

    val_loader = data.loader(val_set, cfg["evaluate"]["batch_size"], cfg) if val_set is not None and len(val_set) else None
    with _Sigterm() as sigterm:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            order = data.batch_order(len(fit_set), batch_size, shuffle=True, seed=cfg["seed"] * 100003 + epoch)[:steps_per_epoch]
            loader = data.loader(fit_set, batch_size, cfg, batches=order[state["step"]:], seed=epoch)
            stage.train_mode()
            start = time.perf_counter()
            bar = tqdm(loader, desc=f"{stage.name} epoch {epoch + 1}/{epochs}", initial=state["step"], total=len(order),
                       leave=False, file=sys.stderr, mininterval=1.0)
            pending: list[tuple[int, Tensor, Tensor]] = []  # (batch size, loss, hits) not yet read back
            last_sync = time.perf_counter()

            def sync() -> None:
                """Read the pending steps' losses and hits back in one transfer, not one per step."""
                if pending:
                    losses = torch.stack([p[1] for p in pending]).double().cpu().tolist()
                    hits = torch.stack([p[2] for p in pending]).cpu().tolist()
                    for (n, _, _), value, hit in zip(pending, losses, hits):
                        running[0] += value * n
                        running[1] += hit
                        running[2] += n
                    pending.clear()

            running = state["running"]
            for images, labels in bar:
                if stage.mixup:
                    images = data.mixup(images, cfg["kd"]["mixup_alpha"])[0]
                loss, correct = stage.loss(images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # the one host sync of a step, after the backward is queued: a non-finite loss must
                # not reach the weights (a NaN policy would also break the knapsack of the next step)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{stage.name} ({out}): non-finite loss {loss.item()} at epoch {epoch + 1}, step "
                                        f"{state['step'] + 1}; the last good state is kept in {resume if resume.exists() else 'no file (first epoch)'}; "
                                        f"lower the learning rate or check the data")
                if stage.section == "pairs":
                    torch.nn.utils.clip_grad_norm_(params, cfg["pairs"]["grad_clip"])
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                pending.append((len(labels), loss.detach(), correct))
                if time.perf_counter() - last_sync >= 1.0 or sigterm.received:
                    sync()
                    last_sync = time.perf_counter()
                    bar.set_postfix(loss=f"{running[0] / running[2]:.4f}", acc=f"{100 * running[1] / running[2]:.1f}",
                                    img_s=f"{running[2] / (last_sync - start):.0f}", refresh=False)
                if sigterm.received:
                    save_resume()
                    raise Preempted(f"{stage.name}: SIGTERM at epoch {epoch + 1}, step {state['step']}; state saved to "
                                    f"{resume}; run the job again to resume")
            sync()
            row = {"epoch": epoch + 1, "loss": running[0] / max(running[2], 1), "train_acc": 100 * running[1] / max(running[2], 1),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - start, 3)}
            if val_loader is not None:
                row.update(stage.validate(val_loader))
            state["history"].append(row)
            objective = row.get("objective", math.inf)
            if cfg["pairs"]["select_best"] and stage.section == "pairs" and objective < state["best_objective"]:
                state["best_objective"] = objective
                state["best"] = {name: copy.deepcopy(m.state_dict()) for name, m in stage.modules().items()}
                state["best"]["epoch"] = epoch + 1
            print(f"{stage.name} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                          for k, v in row.items()), file=sys.stderr)
            state.update(epoch=epoch + 1, step=0, running=[0.0, 0.0, 0])
            _write_metrics(metrics, state["history"])
            save_resume()

    weights = {name: module.state_dict() for name, module in stage.modules().items()}
    result = stage.result()
    if state["best"] is not None:
        weights = {name: state["best"][name] for name in weights}
        result["best_epoch"] = state["best"]["epoch"]
    _write_metrics(metrics, state["history"] or [{"epoch": 0}])
    checkpoint.save({**result, **weights}, out)
    resume.unlink(missing_ok=True)


def train_teacher(cfg: Mapping, out: str | Path, metrics: str | Path) -> None:
    dev = runtime.setup(cfg)
    fit(TeacherStage(cfg, dev, data.num_classes(cfg)), out, metrics)


def distill(cfg: Mapping, arch: str, teacher: str | Path, out: str | Path, metrics: str | Path) -> None:
    dev = runtime.setup(cfg)
    ckpt = checkpoint.load(teacher, kind="teacher", recover="re-run the teacher stage (snakemake teacher)")
    fit(DistillStage(cfg, dev, arch, ckpt), out, metrics)


def train_pair(cfg: Mapping, arch: str, version: str, budget: str, mode: str, network: str | Path,
               out: str | Path, metrics: str | Path) -> None:
    dev = runtime.setup(cfg)
    ckpt = checkpoint.load(network, kind="distill", arch=arch, recover=f"re-run the distillation of {arch}")
    fit(PairStage(cfg, dev, arch, version, budget, mode, ckpt), out, metrics)
