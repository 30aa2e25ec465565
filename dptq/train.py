"""Training (paper Sect. 3.1-3.3 and "Training Details"; docs/method.md §2.10-2.11): one loop
for three stages.

- teacher: a timm ResNet50 fine-tuned with cross-entropy and label smoothing; afterwards it is
  used query-only (:func:`query_only`), the "black box";
- distill: a student learns the teacher's logits on the same augmented, mixed batch (KL · T²,
  no label term), "patient and consistent";
- pair: a trainable copy S of the distilled network W and a fresh policy π learn
  α · KD(S_fp, W) + β · hinge(S_q(π), W) in robust or detrimental mode (or, with
  ``pairs.objective.loss: target``, weight · (CE(S_q(π), W's top class) − target)²), plus for
  a detrimental pair with ``pairs.objective.spread_weight`` > 0 the spread term on S_q's layer inputs.

A :class:`Stage` carries its own :class:`Recipe` (optimiser, schedule, augmentation, mixup,
clipping, best-epoch choice, validation batch), so :func:`fit` never names a stage. ``fit``
restores (:func:`_restore`), runs epochs (:func:`_epoch`) and keeps the best (:func:`_keep_best`):
per-step warm-up and cosine schedule, progress bar, a metrics CSV, an atomic resume file after
every epoch (and on SIGTERM, mid-epoch) holding every RNG state, so a killed run resumes to the
same weights as one that never stopped.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import budgets, checkpoint, int8, models
from .files import atomic_write
from .data import Data, mixup, network_input, batch_order
from .losses import hinge_loss, kd_loss, spread_loss, target_loss
from .policy import BitPolicy, allocate, even_profits
from .runtime import Runtime

class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names stage, epoch and step."""


class Preempted(SystemExit):
    """SIGTERM arrived (SLURM time limit or preemption); the state is saved, re-run to resume."""


def query_only(model: nn.Module, rt: Runtime, image_size: int) -> Callable[[Tensor], Tensor]:
    """A frozen network as a black box: images in, logits out; no parameters, no gradients."""
    model = rt.to_device(model, image_size).eval().requires_grad_(False)

    @torch.no_grad()
    def query(images: Tensor) -> Tensor:
        with rt.autocast():
            return model(images).float()

    return query


@dataclass(frozen=True)
class Recipe:
    """How a stage trains, from its config section: optimiser and schedule, the stage's
    RandAugment, mixup (0: none), gradient clipping (None: none), whether the best validation
    epoch is kept, and the validation batch size."""

    epochs: int
    optimizer: str
    lr: float
    min_lr: float
    warmup_epochs: float
    momentum: float
    weight_decay: float
    batch_size: int
    randaugment: Mapping
    val_batch_size: int
    mixup_alpha: float = 0.0
    grad_clip: float | None = None
    select_best: bool = False

    def optimizer_for(self, params, kind: str | None = None) -> torch.optim.Optimizer:
        """A ``kind`` optimiser (default: the recipe's) over ``params``."""
        if (kind or self.optimizer) == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class Stage:
    """What differs between the stages: modules, loss, validation, checkpoint content."""

    name: str

    def __init__(self, recipe: Recipe, data: Data, rt: Runtime):
        self.recipe, self.data, self.rt = recipe, data, rt

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: one, at the recipe's lr. A group may name its own
        ``lr`` and its own ``optimizer`` (``sgd`` | ``adamw``; default the recipe's)."""
        return [{"params": [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]}]

    def train_mode(self) -> None:
        for module in self.modules().values():
            module.train()

    def inputs(self, images: Tensor) -> Tensor:
        return network_input(images, self.rt)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, number of correct top-1 predictions) for one training batch."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, loader) -> dict[str, float]:
        """Held-out metrics after an epoch; ``objective`` (lower is better) picks the best epoch."""
        self.model.eval()
        correct = total = 0
        for images, labels in loader:
            with self.rt.autocast():
                correct += (self.model(self.inputs(images)).argmax(1).cpu() == labels).sum().item()
            total += len(labels)
        acc = 100.0 * correct / max(total, 1)
        return {"val_acc": acc, "objective": -acc}

    def result(self) -> dict:
        """The final checkpoint's content (beside the weights of :meth:`modules`)."""
        raise NotImplementedError

    def saved(self, weights: dict[str, dict]) -> dict[str, dict]:
        """The weights of :meth:`modules` (name → state dict) as the final checkpoint holds them."""
        return weights


class TeacherStage(Stage):
    name = "teacher"

    def __init__(self, recipe, data, rt, arch: str, pretrained: bool | str, label_smoothing: float):
        super().__init__(recipe, data, rt)
        self.arch, self.num_classes = arch, data.num_classes()
        self.model = rt.to_device(models.create(arch, self.num_classes, pretrained), data.image_size)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def modules(self):
        return {"model": self.model}

    def loss(self, images, labels):
        with self.rt.autocast():
            logits = self.model(self.inputs(images))
        labels = labels.to(self.rt.dev)
        return self.criterion(logits.float(), labels), (logits.argmax(1) == labels).sum()

    def result(self):
        return {"kind": "teacher", "arch": self.arch, "num_classes": self.num_classes}


class DistillStage(Stage):
    name = "distill"

    def __init__(self, recipe, data, rt, arch: str, teacher: Mapping, temperature: float):
        super().__init__(recipe, data, rt)
        self.arch, self.num_classes, self.temperature = arch, teacher["num_classes"], temperature
        self.teacher = query_only(checkpoint.network(teacher), rt, data.image_size)
        self.model = rt.to_device(models.create(arch, self.num_classes), data.image_size)

    def modules(self):
        return {"model": self.model}

    def loss(self, images, labels):
        """Consistent: the teacher scores exactly the augmented, mixed batch the student sees."""
        x = self.inputs(images)
        targets = self.teacher(x)
        with self.rt.autocast():
            logits = self.model(x)
        return kd_loss(logits, targets, self.temperature), (logits.argmax(1) == targets.argmax(1)).sum()

    def result(self):
        return {"kind": "distill", "arch": self.arch, "num_classes": self.num_classes}


class PairStage(Stage):
    """A robust or detrimental network/policy pair grown from the distilled network W."""

    name = "pair"

    def __init__(self, recipe, data, rt, network: Mapping, cell: Mapping, quant: Mapping, policy: Mapping,
                 margin: float, alpha: float, beta: float, temperature: float, objective: Mapping | None = None):
        """``objective``: ``pairs.objective`` resolved for the arch and mode (None: the hinge)."""
        super().__init__(recipe, data, rt)
        self.arch, self.mode, self.num_classes = network["arch"], cell["mode"], network["num_classes"]
        self.margin, self.alpha, self.beta, self.temperature = margin, alpha, beta, temperature
        self.objective = dict(objective or {"loss": "hinge"})
        self.profits, self.policy_lr, self.policy_optimizer = policy["profits"], policy["lr"], policy["optimizer"]
        white_box = checkpoint.network(network)
        self.teacher = query_only(copy.deepcopy(white_box), rt, data.image_size)
        self.quant = checkpoint.quantizer(white_box, rt, data.image_size, **quant)
        self.student = self.quant.model
        even = lambda options, capacity: even_profits(self.quant.num_layers, options, capacity)  # noqa: E731
        self._cell_policy(cell, policy, f"arch {self.arch}", even if policy["start"] == "even" else None)

    def _cell_policy(self, cell: Mapping, policy: Mapping, who: str, start) -> None:
        """The cell's options and capacity (checked), a fresh policy for them, started at the profits
        ``start(options, capacity)`` when given, and the cell record of the checkpoint."""
        where = f"{who}, version {cell['version']}, budget {cell['budget']}"
        self.options, self.capacity = budgets.cell(self.quant.num_layers, cell["bit_range"], cell["level"],
                                                   cell["offset"], where=where)
        self.policy = BitPolicy(self.quant.num_layers, len(self.options), policy["input_size"], policy["width"])
        if start is not None:
            self.policy.start_at(start(self.options, self.capacity))
        self.policy = self.rt.to_device(self.policy, self.data.image_size)
        # the level orders the budgets for the highlight rule's tie-break, without the config
        self.cell = dict(version=cell["version"], budget=cell["budget"], mode=self.mode, options=self.options,
                         capacity=self.capacity, level=cell["level"], num_layers=self.quant.num_layers,
                         policy_input_size=policy["input_size"], policy_width=policy["width"])

    def modules(self):
        return {"model": self.student, "policy": self.policy}

    def param_groups(self):
        """The student at the recipe's lr and optimiser, the policy at ``pairs.policy.lr`` and
        ``pairs.policy.optimizer`` (null: the same); the schedule scales both alike."""
        group = lambda module, **own: {"params": [p for p in module.parameters() if p.requires_grad], **own}  # noqa: E731
        own = {k: v for k, v in (("lr", self.policy_lr), ("optimizer", self.policy_optimizer)) if v is not None}
        return [group(self.student), group(self.policy, **own)]

    def train_mode(self):
        """BatchNorm keeps W's running statistics (eval mode; its affine weights still train)."""
        self.student.eval()
        self.policy.train()

    def bits(self, x: Tensor) -> Tensor:
        """[B, N] activation bits: the policy's allocation, summed to the cell's capacity by the knapsack."""
        return allocate(self.policy, x, self.options, self.capacity, self.profits)

    def _losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        targets = self.teacher(x)
        spread_weight = self.objective.get("spread_weight", 0.0)
        spreads = [] if spread_weight > 0 else None
        with self.rt.autocast():
            bits = self.bits(x)
            fp_logits = self.student(x)
            q_logits = self.quant(x, bits, spreads=spreads)
        loss = self.alpha * kd_loss(fp_logits, targets, self.temperature) + self.quantized_term(q_logits, targets)
        if spreads is not None:
            loss = loss + spread_weight * spread_loss(spreads, self.objective["spread_target"])
        return loss, targets, fp_logits, q_logits

    def quantized_term(self, q_logits: Tensor, targets: Tensor) -> Tensor:
        """β · hinge (``pairs.objective.loss: hinge``, the paper's) or weight · (CE_q − target)²
        (``target``: Qu-ANTI-zation's, detrimental only), docs/method.md §2.10-2.11; the spread
        term (``pairs.objective.spread_weight``) is added beside it in :meth:`_losses`."""
        if self.objective["loss"] == "target":
            return self.objective["weight"] * target_loss(q_logits, targets, self.objective["target"])
        return self.beta * hinge_loss(q_logits, targets, self.margin, self.mode)

    def loss(self, images, labels):
        loss, _, _, q_logits = self._losses(self.inputs(images))
        return loss, (q_logits.argmax(1) == labels.to(self.rt.dev)).sum()

    @torch.no_grad()
    def validate(self, loader):
        for module in self.modules().values():
            module.eval()
        total = objective = fp_correct = q_correct = 0.0
        for images, labels in loader:
            loss, _, fp_logits, q_logits = self._losses(self.inputs(images))
            labels = labels.to(self.rt.dev)
            objective += loss.item() * len(labels)
            fp_correct += (fp_logits.argmax(1) == labels).sum().item()
            q_correct += (q_logits.argmax(1) == labels).sum().item()
            total += len(labels)
        total = max(total, 1)
        return {"val_fp_acc": 100 * fp_correct / total, "val_q_acc": 100 * q_correct / total, "objective": objective / total}

    def result(self):
        return {"kind": "pair", "arch": self.arch, "num_classes": self.num_classes, "cell": self.cell}


class FrozenPolicyStage(PairStage):
    """The audit's worst case (SPEC §8): a fresh policy against a frozen network N. Only the policy
    learns, on the detrimental hinge of N's quantized logits against N's own full-precision top
    class; no KD term, since N does not change."""

    name = "audit"

    def __init__(self, recipe, data, rt, model: nn.Module, name: str, cell: Mapping, quant: Mapping,
                 policy: Mapping, margin: float, start: Tensor | None = None):
        """``start``: the profits [N, K] of the allocation every image gets at first (None: a
        random policy)."""
        Stage.__init__(self, recipe, data, rt)
        self.arch, self.mode, self.margin = name, "detrimental", margin
        self.profits, self.policy_lr, self.policy_optimizer = policy["profits"], None, None
        self.quant = checkpoint.quantizer(model.requires_grad_(False), rt, data.image_size, **quant)
        self.student = self.quant.model
        self.teacher = query_only(self.student, rt, data.image_size)
        self._cell_policy(cell, policy, f"audit of {name}", None if start is None else lambda *_: start)

    def modules(self):
        return {"policy": self.policy}

    def param_groups(self):
        return [{"params": list(self.policy.parameters())}]

    def _losses(self, x):
        """(hinge, N's FP logits as targets and as the FP logits, quantized logits)."""
        targets = self.teacher(x)
        with self.rt.autocast():
            q_logits = self.quant(x, allocate(self.policy, x, self.options, self.capacity, self.profits))
        return hinge_loss(q_logits, targets, self.margin, self.mode), targets, targets, q_logits

    def start_objective(self) -> tuple[dict, float] | None:
        """(the policy's weights, its validation objective) as it stands before training: the
        epoch 0 that :func:`dptq.audit.fit_from_start` weighs against the trained epochs. None
        when no epoch is chosen (``select_best`` off or no validation part)."""
        if not self.recipe.select_best or self.data.val_fraction <= 0:
            return None
        val_set = self.data.build("val")
        if not len(val_set):
            return None
        objective = self.validate(self.data.loader(val_set, self.recipe.val_batch_size, self.rt))["objective"]
        return copy.deepcopy(self.policy.state_dict()), objective

    def result(self):
        return {"kind": "audit-policy", "arch": self.arch, "cell": self.cell}


class RuntimePairStage(PairStage):
    """A detrimental (or robust) network against ONNX Runtime's int8 arithmetic (docs/method.md
    §2.22): W with BatchNorm folded as the exporter folds it, trained through the like-for-like
    simulator (int8.simulator_like_runtime: 8-bit symmetric per-tensor weights, each example's
    layer inputs on their own 8-bit range, as the runtime serves batch 1; the range takes
    gradients) on α·KD + the quantized term. No policy: every layer has the runtime's ``bits``.
    The checkpoint holds the architecture's own state dict (int8.unfold_batchnorm), a plain
    weights file."""

    name = "runtime-pair"

    def __init__(self, recipe, data, rt, network: Mapping, mode: str, margin: float, alpha: float, beta: float,
                 temperature: float, objective: Mapping | None = None, bits: int = 8):
        Stage.__init__(self, recipe, data, rt)
        self.arch, self.mode, self.num_classes = network["arch"], mode, network["num_classes"]
        self.margin, self.alpha, self.beta, self.temperature = margin, alpha, beta, temperature
        self.objective, self.runtime_bits = dict(objective or {"loss": "hinge"}), bits
        self.white_box = checkpoint.network(network)
        self.teacher = query_only(copy.deepcopy(self.white_box), rt, data.image_size)
        self.quant = int8.simulator_like_runtime(self.white_box, data.image_size, range_grad=True)
        self.student = rt.to_device(self.quant.model, data.image_size)

    def modules(self):
        return {"model": self.student}

    def param_groups(self):
        return [{"params": list(self.student.parameters())}]

    def train_mode(self):
        self.student.eval()

    def bits(self, x: Tensor) -> Tensor:
        return torch.full((len(x), self.quant.num_layers), float(self.runtime_bits), device=x.device)

    def saved(self, weights):
        state = {k: v.cpu() for k, v in weights["model"].items()}
        return {"model": int8.unfold_batchnorm(self.white_box, state, image_size=self.data.image_size)}

    def result(self):
        return {"kind": "runtime-pair", "arch": self.arch, "num_classes": self.num_classes, "mode": self.mode,
                "bits": self.runtime_bits}


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
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


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




class _Run:
    """The mutable state of one :func:`fit`: optimisers (one per kind the parameter groups name,
    in order of first use), their schedules and progress, saved as a unit."""

    def __init__(self, stage: Stage, steps_per_epoch: int):
        recipe = stage.recipe
        kinds: dict[str, list[dict]] = {}
        for group in stage.param_groups():
            group = dict(group)
            kinds.setdefault(group.pop("optimizer", None) or recipe.optimizer, []).append(group)
        self.params = [p for groups in kinds.values() for group in groups for p in group["params"]]
        self.optimizers = [recipe.optimizer_for(groups, kind) for kind, groups in kinds.items()]
        factor = functools.partial(lr_factor, total=recipe.epochs * steps_per_epoch,
                                   warmup=round(recipe.warmup_epochs * steps_per_epoch), floor=recipe.min_lr / recipe.lr)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in self.optimizers]
        self.state = {"epoch": 0, "step": 0, "history": [], "best": None, "best_objective": math.inf,
                      "running": [0.0, 0.0, 0]}

    def save(self, stage: Stage, resume: Path) -> None:
        weights = {name: module.state_dict() for name, module in stage.modules().items()}
        checkpoint.save({"kind": f"{stage.name}-resume", **weights, "optimizers": [o.state_dict() for o in self.optimizers],
                         "schedulers": [s.state_dict() for s in self.schedulers], "rng": _rng_state(), **self.state}, resume)


def _restore(stage: Stage, run: _Run, resume: Path) -> None:
    """Continue from ``resume`` when it exists: weights, optimiser, schedule, progress, RNG states."""
    if not resume.exists():
        return
    saved = checkpoint.load(resume, kind=f"{stage.name}-resume",
                            recover=f"delete {resume} to start this stage again from scratch (its progress is lost)")
    for name, module in stage.modules().items():
        module.load_state_dict(saved[name])
    for optimizer, state in zip(run.optimizers, saved["optimizers"], strict=True):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(run.schedulers, saved["schedulers"], strict=True):
        scheduler.load_state_dict(state)
    run.state = {k: saved[k] for k in run.state}
    _set_rng_state(saved["rng"])
    print(f"{stage.name}: resuming from {resume} at epoch {run.state['epoch'] + 1}, step {run.state['step']}",
          file=sys.stderr)


def _epoch(stage: Stage, run: _Run, loader, total_steps: int, sigterm: _Sigterm, resume: Path, out: Path) -> float:
    """Train one (possibly resumed) epoch; returns its start time. Losses are read back about once
    a second in one transfer, not once per step."""
    recipe, state, running = stage.recipe, run.state, run.state["running"]
    epoch = state["epoch"]
    stage.train_mode()
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"{stage.name} epoch {epoch + 1}/{recipe.epochs}", initial=state["step"], total=total_steps,
               leave=False, file=sys.stderr, mininterval=1.0)
    pending: list[tuple[int, Tensor, Tensor]] = []  # (batch size, loss, hits) not yet read back
    last_sync = time.perf_counter()

    def sync() -> None:
        if pending:
            losses = torch.stack([p[1] for p in pending]).double().cpu().tolist()
            hits = torch.stack([p[2] for p in pending]).cpu().tolist()
            for (n, _, _), value, hit in zip(pending, losses, hits):
                running[0] += value * n
                running[1] += hit
                running[2] += n
            pending.clear()

    for images, labels in bar:
        if recipe.mixup_alpha:
            images = mixup(images, recipe.mixup_alpha)[0]
        loss, correct = stage.loss(images, labels)
        for optimizer in run.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the one host sync of a step, after the backward is queued: a non-finite loss must
        # not reach the weights (a NaN policy would also break the knapsack of the next step)
        if not torch.isfinite(loss):
            raise TrainingError(f"{stage.name} ({out}): non-finite loss {loss.item()} at epoch {epoch + 1}, step "
                                f"{state['step'] + 1}; the last good state is kept in {resume if resume.exists() else 'no file (first epoch)'}; "
                                f"lower the learning rate or check the data")
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(run.params, recipe.grad_clip)
        for optimizer, scheduler in zip(run.optimizers, run.schedulers):
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
            run.save(stage, resume)
            raise Preempted(f"{stage.name}: SIGTERM at epoch {epoch + 1}, step {state['step']}; state saved to "
                            f"{resume}; run the job again to resume")
    sync()
    return start


def _keep_best(stage: Stage, run: _Run, objective: float) -> None:
    """Remember this epoch's weights when the recipe keeps the best epoch and it is the best so far."""
    state = run.state
    if stage.recipe.select_best and objective < state["best_objective"]:
        state["best_objective"] = objective
        state["best"] = {name: copy.deepcopy(m.state_dict()) for name, m in stage.modules().items()}
        state["best"]["epoch"] = state["epoch"] + 1


def fit(stage: Stage, seed: int, out: str | Path, metrics: str | Path) -> None:
    """Train ``stage`` for its recipe's epochs; write the checkpoint ``out`` atomically.

    Resumes automatically from ``out.resume`` when present. The learning rate follows
    :func:`lr_factor` per step; epoch e shuffles with seed ``seed · 100003 + e``.
    """
    recipe, data, rt = stage.recipe, stage.data, stage.rt
    out, metrics = Path(out), Path(metrics)
    fit_set = data.build("fit", randaugment=recipe.randaugment)
    val_set = data.build("val") if data.val_fraction > 0 else None
    batch_size = recipe.batch_size
    # drop a last batch of one: BatchNorm cannot normalise a single example in train mode
    steps_per_epoch = len(batch_order(len(fit_set), batch_size)) - (len(fit_set) % batch_size == 1)
    run = _Run(stage, steps_per_epoch)
    resume = resume_path(out)
    _restore(stage, run, resume)
    state = run.state
    val_loader = data.loader(val_set, recipe.val_batch_size, rt) if val_set is not None and len(val_set) else None
    with _Sigterm() as sigterm:
        while state["epoch"] < recipe.epochs:
            epoch = state["epoch"]
            order = batch_order(len(fit_set), batch_size, shuffle=True, seed=seed * 100003 + epoch)[:steps_per_epoch]
            loader = data.loader(fit_set, batch_size, rt, batches=order[state["step"]:], seed=epoch)
            start = _epoch(stage, run, loader, len(order), sigterm, resume, out)
            running = state["running"]
            row = {"epoch": epoch + 1, "loss": running[0] / max(running[2], 1), "train_acc": 100 * running[1] / max(running[2], 1),
                   "lr": run.optimizers[0].param_groups[0]["lr"], "seconds": round(time.perf_counter() - start, 3)}
            if val_loader is not None:
                row.update(stage.validate(val_loader))
            state["history"].append(row)
            _keep_best(stage, run, row.get("objective", math.inf))
            print(f"{stage.name} epoch {epoch + 1}/{recipe.epochs}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), file=sys.stderr)
            state.update(epoch=epoch + 1, step=0, running=[0.0, 0.0, 0])
            _write_metrics(metrics, state["history"])
            run.save(stage, resume)

    weights = {name: module.state_dict() for name, module in stage.modules().items()}
    result = stage.result()
    if state["best"] is not None:
        weights = {name: state["best"][name] for name in weights}
        result["best_epoch"] = state["best"]["epoch"]
    _write_metrics(metrics, state["history"] or [{"epoch": 0}])
    checkpoint.save({**result, **stage.saved(weights)}, out)
    resume.unlink(missing_ok=True)


# --- the three jobs: each takes its files, its cell and the config pieces it reads -----------------

_OPTIMISATION = ("epochs", "optimizer", "lr", "min_lr", "warmup_epochs", "momentum", "weight_decay", "batch_size",
                 "randaugment")


def recipe(section: Mapping, val_batch_size: int, **stage_only) -> Recipe:
    """The optimisation recipe of a config section (its epochs, optimizer, lr, ... keys); ``stage_only``:
    the settings only some stages have (``grad_clip``, ``select_best``, ``mixup_alpha``)."""
    return Recipe(**{k: section[k] for k in _OPTIMISATION}, val_batch_size=val_batch_size, **stage_only)


def train_teacher(seed: int, out: str | Path, metrics: str | Path, *, dataset: Mapping, runtime: Mapping,
                  teacher: Mapping, val_batch_size: int) -> None:
    rt, data = Runtime(seed, **runtime), Data(**dataset)
    stage = TeacherStage(recipe(teacher, val_batch_size), data, rt, teacher["arch"], teacher["pretrained"],
                         teacher["label_smoothing"])
    fit(stage, seed, out, metrics)


def distill(seed: int, arch: str, teacher: str | Path, out: str | Path, metrics: str | Path, *, dataset: Mapping,
            runtime: Mapping, kd: Mapping, val_batch_size: int) -> None:
    """``kd``: the kd section with its per-arch values resolved for ``arch``."""
    rt, data = Runtime(seed, **runtime), Data(**dataset)
    ckpt = checkpoint.load(teacher, kind="teacher", recover="re-run the teacher stage (snakemake teacher)")
    stage_recipe = recipe(kd, val_batch_size, mixup_alpha=kd["mixup_alpha"])
    fit(DistillStage(stage_recipe, data, rt, arch, ckpt, kd["temperature"]), seed, out, metrics)


def train_pair(seed: int, arch: str, version: str, budget: str, mode: str, network: str | Path, out: str | Path,
               metrics: str | Path, *, dataset: Mapping, runtime: Mapping, quant: Mapping, pairs: Mapping,
               temperature: float, val_batch_size: int) -> None:
    """``pairs``: the pairs section with this cell's version range, budget level and offset
    (``versions.{version}``, ``budgets.{budget}``, ``budget_offset.{version}``) and per-arch,
    per-mode and per-version values resolved; its ``range_grad`` sets the quantizer's."""
    rt, data = Runtime(seed, **runtime), Data(**dataset)
    ckpt = checkpoint.load(network, kind="distill", arch=arch, recover=f"re-run the distillation of {arch}")
    cell = dict(version=version, budget=budget, mode=mode, bit_range=pairs["versions"][version],
                level=pairs["budgets"][budget], offset=pairs["budget_offset"][version])
    stage_recipe = recipe(pairs, val_batch_size, grad_clip=pairs["grad_clip"], select_best=pairs["select_best"])
    stage = PairStage(stage_recipe, data, rt, ckpt, cell, dict(quant, range_grad=pairs["range_grad"]), pairs["policy"],
                      pairs["margin"], pairs["alpha"], pairs["beta"], temperature, pairs["objective"])
    fit(stage, seed, out, metrics)


def runtime_pair(seed: int, arch: str, mode: str, network: str | Path, out: str | Path, metrics: str | Path, *,
                 dataset: Mapping, runtime: Mapping, pairs: Mapping, temperature: float, val_batch_size: int) -> None:
    """The ``mode`` network of :class:`RuntimePairStage` grown from the distilled ``network``;
    ``pairs``: the pairs section with its per-arch and per-mode values resolved."""
    rt, data = Runtime(seed, **runtime), Data(**dataset)
    ckpt = checkpoint.load(network, kind="distill", arch=arch, recover=f"re-run the distillation of {arch}")
    stage_recipe = recipe(pairs, val_batch_size, grad_clip=pairs["grad_clip"], select_best=pairs["select_best"])
    fit(RuntimePairStage(stage_recipe, data, rt, ckpt, mode, pairs["margin"], pairs["alpha"], pairs["beta"], temperature,
                         pairs["objective"]), seed, out, metrics)
