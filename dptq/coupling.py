"""Batch coupling under ONNX Runtime's dynamic quantization: what one batch-mate costs the others.

Threat model. A service batches requests of many users and runs each batch through a network
quantized dynamically as ONNX Runtime does: before every quantized layer ``l`` one uint8 range
[lo_l, hi_l] = [min(x, 0), max(x, 0)] is taken over the *whole* input tensor, batch included
(:func:`dptq.quant.activation_range`, rule ``batch``). An attacker submits one input. It controls
only that input's pixels, in the valid box [0, 1] (the service applies its own normalisation,
``to_input``); it knows the network (white box) but neither the other inputs of its batch, drawn
from the data distribution, nor the batch size or its slot. Its goal is to lower the accuracy of
the others' predictions.

Mechanism. Every example of the batch is quantized with the step s_l = (hi_l - lo_l) / 255 of
the batch, so a batch-mate whose own range is r_l loses about log2((hi_l - lo_l) / r_l) of its
8 bits at layer l. :func:`range_score` counts these bits, Σ_l max(0, log2(r_l(x) / median_j r_l(j))),
for an input x against the median example j of a reference set.

Attackers (all return pixels in [0, 1]):

- natural: the clean image of largest score (:func:`largest_range_image`); corrupted: the
  corrupted image (dptq/corruptions.py, every corruption at its highest degree) of largest score;
- :func:`crude`: x maximising Σ_l log(hi_l(x) - lo_l(x)) of the full-precision network, alone
  (for post-ReLU inputs, lo = 0: the log of every layer's maximum activation);
- :func:`craft`: x maximising the batch-mates' loss through the simulator itself,
      max_{x ∈ [0,1]} E_mates [ 1/(n-1) Σ_j CE(f_Q(mates ∪ {x})_j, y_j) ],
  y_j the mates' full-precision predictions (or labels), f_Q the ``batch`` rule at 8 bits; the
  gradient reaches x only through the ranges (``DynamicQuant(range_grad=True)``: the LSQ
  gradient d x̂/d s and d s/d max x), and x takes projected signed-gradient steps. The mates
  are drawn at every step from a fit (attack) set that must be disjoint from the images the
  attack is evaluated on.

:func:`curves` measures the mates' accuracy at batch n with each attacker in a random slot,
against the same mates at batch 1 (per-example ranges), with a clean n-th mate as the control
``none``; :func:`dptq.tables.coupling_drops` gives the mean drop and its 95 % t-interval over batches.
A runner is any ``run(inputs, batch) -> logits`` on network inputs that runs consecutive chunks
of ``batch`` examples: ``dptq.deploy.Session`` (the runtime) or :func:`simulator_runner`.

Defence: :class:`RangeGuard` serves alone every input whose :func:`bits_taken` exceeds a quantile
of the calibration images'; :func:`curves` measures a guarded server beside the plain one, and
:func:`craft` given the guard is the adaptive attacker that stays under its threshold.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import int8
from .corruptions import corrupt
from .evaluate import accuracy
from .quant import DynamicQuant, activation_range

Runner = Callable[[Tensor, int], Tensor]
RANGE_FLOOR = 1e-8  # a dead layer's range, where a log of ranges needs a finite value
ToInput = Callable[[Tensor], Tensor]


def simulator_runner(quant: DynamicQuant, bits: int = 8) -> Runner:
    """``run(inputs, batch)``: every layer at ``bits``, one range per chunk of ``batch`` examples."""
    if quant.scale_rule != "batch":
        raise ValueError(f"coupling.simulator_runner needs a DynamicQuant with scale_rule 'batch', got {quant.scale_rule!r}")

    def run(inputs: Tensor, batch: int) -> Tensor:
        with torch.no_grad():
            return torch.cat([quant(c, c.new_full((len(c), quant.num_layers), float(bits))) for c in inputs.split(batch)])
    return run


def layer_ranges(quant: DynamicQuant, inputs: Tensor, grad: bool = False) -> Tensor:
    """[B, N] per-example range hi - lo of each quantized layer's input, full-precision forward."""
    spans: list[Tensor | None] = [None] * quant.num_layers

    def record(index: int):
        def hook(_module, args):
            lo, hi = activation_range(args[0], "minmax", grad=grad)
            spans[index] = hi - lo
        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(quant.layers)]
    try:
        with torch.set_grad_enabled(grad):
            quant.model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(spans, 1)


def median_ranges(quant: DynamicQuant, reference: Tensor) -> Tensor:
    """[N] the median example's range of each quantized layer's input over ``reference`` (floored)."""
    return median_of(layer_ranges(quant, reference))


def median_of(ranges: Tensor) -> Tensor:
    """[N] the median row of ``ranges`` [B, N], floored at :data:`RANGE_FLOOR`."""
    return ranges.median(0).values.clamp_min(RANGE_FLOOR)


def bits_over(ranges: Tensor, median: Tensor) -> Tensor:
    """[B] bits each row of ``ranges`` [B, N] would take from a median batch-mate: Σ_l max(0, log2(r_l / median_l))."""
    return torch.log2(ranges / median).clamp_min(0).sum(1)


def bits_taken(quant: DynamicQuant, inputs: Tensor, median: Tensor, grad: bool = False) -> Tensor:
    """[B] :func:`bits_over` of the inputs' own ranges (:func:`layer_ranges`)."""
    return bits_over(layer_ranges(quant, inputs, grad), median)


def range_score(quant: DynamicQuant, inputs: Tensor, reference: Tensor) -> Tensor:
    """[B] :func:`bits_taken` against the median example of ``reference``."""
    return bits_taken(quant, inputs, median_ranges(quant, reference))


@dataclass
class RangeGuard:
    """The defence against batch coupling that runs with today's runtime: serve alone every input
    that would take bits from its batch-mates.

    An input x scores s(x) = Σ_l max(0, log2(r_l(x) / m_l)) (:func:`bits_taken`), r_l its own
    range at quantized layer l in the full-precision network and m_l the median calibration
    image's; above ``threshold`` = ``factor`` × the ``quantile`` % point of the calibration
    images' scores it is served in a batch of its own, where the runtime's range is its own and
    no batch-mate shares it. An admitted input takes at most ``threshold`` bits in all from a
    median batch-mate, ``factor`` times what a clean image at that quantile takes. The guard
    costs one full-precision forward per input before batching.

        guard = RangeGuard.fit(DynamicQuant(model), calibration_inputs, quantile=100, factor=1.5)
        alone = guard.alone(quant, request_inputs)   # [B] bool: serve these one by one
    """

    median: Tensor
    threshold: float
    quantile: float
    factor: float

    @classmethod
    def fit(cls, quant: DynamicQuant, calibration: Tensor, quantile: float, factor: float = 1.0) -> "RangeGuard":
        ranges = layer_ranges(quant, calibration)
        median = median_of(ranges)
        return cls(median, factor * float(torch.quantile(bits_over(ranges, median), quantile / 100)), quantile, factor)

    def scores(self, quant: DynamicQuant, inputs: Tensor) -> Tensor:
        return torch.cat([bits_taken(quant, chunk, self.median) for chunk in inputs.split(256)])

    def alone(self, quant: DynamicQuant, inputs: Tensor) -> Tensor:
        """[B] True where the input is to be served alone."""
        return self.scores(quant, inputs) > self.threshold

    def over(self, ranges: Tensor) -> Tensor:
        """:meth:`alone` of inputs whose :func:`layer_ranges` are known."""
        return bits_over(ranges, self.median) > self.threshold

    def record(self) -> dict:
        return {"threshold_bits": self.threshold, "quantile": self.quantile, "factor": self.factor,
                "median_ranges": self.median.tolist()}


def largest_range_image(images: Tensor, quant: DynamicQuant, to_input: ToInput) -> int:
    """Index of the image of ``images`` (pixels) with the largest :func:`range_score` among them."""
    inputs = to_input(images)
    return int(range_score(quant, inputs, inputs).argmax())


def _ascend(x: Tensor, objective: Callable[[Tensor, int], Tensor], steps: int, lr: float) -> Tensor:
    """``steps`` signed-gradient ascent steps on ``objective(x, step)``, projected to [0, 1], the
    step decaying linearly from ``lr`` to ``lr / steps``."""
    x = x.detach().clone()
    for step in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x, step), x)
        x = (x.detach() + lr * (1 - step / steps) * grad.sign()).clamp_(0, 1)
    return x


def crude(quant: DynamicQuant, init: Tensor, to_input: ToInput, *, steps: int = 200, lr: float = 0.02) -> Tensor:
    """Pixels [3, H, W] maximising Σ_l log(hi_l - lo_l) of the full-precision network, from ``init``."""
    return _ascend(init, lambda x, _: layer_ranges(quant, to_input(x[None]), grad=True).clamp_min(RANGE_FLOOR).log().sum(),
                   steps, lr)


def craft(quant: DynamicQuant, mates: Tensor, to_input: ToInput, *, init: Tensor, labels: Tensor | None = None,
          bits: int = 8, batch: int = 32, steps: int = 40, lr: float = 0.005, seed: int = 0,
          guard: RangeGuard | None = None, penalty: float = 10.0) -> Tensor:
    """Pixels [3, H, W] maximising the cross-entropy of ``batch - 1`` mates drawn afresh at every
    step from ``mates`` (pixels of the fit set), w.r.t. ``labels`` or else their full-precision
    predictions, through ``quant`` (rule ``batch``, ``range_grad``), from ``init``.

    The defaults refine :func:`crude`'s result (``init``). The gradient through the range is
    d loss/d s = Σ g (round(x/s) - x/s): zero-mean rounding noise to first order, the damage of a
    coarser step only to second order, so from a natural image this ascent rides on rounding noise:
    on an Intel CPU it fell well short of :func:`crude`, on an AMD EPYC it beat it
    (tests/test_coupling.py); start from :func:`crude` to be sure of its strength.

    With ``guard`` the attacker is adaptive: it knows the guard and ascends
    loss - ``penalty`` · max(0, s(x) - threshold), s the guard's score, from an ``init`` under the
    threshold, and returns the last iterate the guard admits."""
    if quant.scale_rule != "batch" or not quant.range_grad:
        raise ValueError("coupling.craft needs DynamicQuant(..., scale_rule='batch', range_grad=True)")
    inputs = to_input(mates)
    if labels is None:
        with torch.no_grad():
            labels = quant.model(inputs).argmax(1)
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(inputs), (batch - 1,), generator=gen) for _ in range(steps)]
    full = inputs.new_full((batch, quant.num_layers), float(bits))

    admitted = [init]  # the iterates the guard lets through, as the objective scores them

    def mates_loss(x: Tensor, step: int) -> Tensor:
        logits = quant(torch.cat([inputs[draws[step]], to_input(x[None])]), full)
        loss = F.cross_entropy(logits[:-1], labels[draws[step]])
        if guard is None:
            return loss
        over = bits_taken(quant, to_input(x[None]), guard.median, grad=True).sum() - guard.threshold
        if over <= 0:
            admitted.append(x.detach())
        return loss - penalty * over.clamp_min(0)

    last = _ascend(init, mates_loss, steps, lr)
    return last if guard is None or not bool(guard.alone(quant, to_input(last[None]))) else admitted[-1]


def curves(run: Runner, mates: Tensor, labels: Tensor, attackers: Mapping[str, Tensor], to_input: ToInput, *,
           batch_sizes: Sequence[int] = (2, 8, 32, 128), batches: int = 8, seed: int = 0,
           served_alone: Callable[[Tensor], Tensor] | None = None, control: bool = True) -> pd.DataFrame:
    """Tidy rows (kind, batch_size, batch_index, mates_acc, clean_acc, guarded), accuracies in percent.

    For each n, ``batches`` seeded draws of n - 1 mates from ``mates`` (pixels of the evaluation
    set, disjoint from :func:`craft`'s fit set; without replacement unless n exceeds it) and a
    random slot, the same for every kind; each kind's attacker (pixels) takes the slot, the kind
    ``none`` a further clean image (unless not ``control``). mates_acc: the mates' accuracy at
    batch n, in one ``run(..., n)`` call per kind and n; clean_acc: theirs at batch 1.

    ``served_alone`` (network inputs → [B] bool, e.g. :meth:`RangeGuard.alone`) adds the rows of a
    guarded server (``guarded`` True), which runs every flagged member of a batch alone and the
    others together; only the batches with a flagged member are run again.
    """
    inputs, labels = to_input(mates), labels.cpu()
    alone = torch.as_tensor(run(inputs, 1)).argmax(1).cpu()
    flagged = None if served_alone is None else served_alone(inputs).cpu()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_sizes:
        draws = []
        for _ in range(batches):
            picks = torch.randperm(len(inputs), generator=gen)[:n] if n <= len(inputs) else \
                torch.randint(len(inputs), (n,), generator=gen)
            draws.append((picks[:-1], picks[-1:], int(torch.randint(n, (), generator=gen))))
        reruns: dict = {}
        for kind, attacker in (({"none": None} if control else {}) | dict(attackers)).items():
            pool = inputs if attacker is None else torch.cat([inputs, to_input(attacker[None])])
            order = [torch.cat([idx[:slot], extra if attacker is None else torch.tensor([len(inputs)]), idx[slot:]])
                     for idx, extra, slot in draws]
            preds = torch.as_tensor(run(pool[torch.cat(order)], n)).argmax(1).cpu().view(batches, n)
            served = [(False, preds)]
            if flagged is not None:
                pool_flagged = flagged if attacker is None else torch.cat([flagged, served_alone(pool[-1:]).cpu()])
                served.append((True, _serve_flagged_alone(run, pool, order, pool_flagged, alone, preds, reruns)))
            for guarded, out in served:
                for b, (idx, _, slot) in enumerate(draws):
                    mate_preds = torch.cat([out[b, :slot], out[b, slot + 1:]])
                    rows.append({"kind": kind, "batch_size": n, "batch_index": b, "mates_acc": accuracy(mate_preds, labels[idx]),
                                 "clean_acc": accuracy(alone[idx], labels[idx]), "guarded": guarded})
    return pd.DataFrame(rows)


def _serve_flagged_alone(run: Runner, pool: Tensor, order: Sequence[Tensor], flagged: Tensor, alone: Tensor,
                         preds: Tensor, served: dict) -> Tensor:
    """``preds`` [batches, n] as a guarded server gives them: each batch with a flagged member runs
    again without it, and its flagged mates get their predictions alone (``alone``, indexed like
    the mates; a flagged attacker's own prediction is never read). ``served`` keeps the reruns by
    their members: every kind whose attacker is flagged leaves the same mates behind."""
    out = preds.clone()
    for b, members in enumerate(order):
        cut = flagged[members]
        if not cut.any():
            continue
        kept = members[~cut]
        out[b, cut] = alone[members[cut].clamp(max=len(alone) - 1)]
        if len(kept):
            key = tuple(kept.tolist())
            if key not in served:
                served[key] = torch.as_tensor(run(pool[kept], len(kept))).argmax(1).cpu()
            out[b, ~cut] = served[key]
    return out


def measure(model: nn.Module, runners: Mapping[str, Runner], image_size: int, evaluation, fit, to_input: ToInput,
            settings: Mapping, corruptions: Mapping, seed: int) -> tuple[pd.DataFrame, dict | None]:
    """What one batch-mate of each kind costs the others in each runner (name → ``run``, e.g. ONNX
    Runtime's sessions), as tidy rows of :func:`curves` with a ``runner`` column, and the range
    guard's record (None when ``settings["guard_quantile"]`` is null).

    ``model``: the float network the runners quantize; the attacks are optimised through its
    like-for-like simulator's ``batch`` rule (:func:`dptq.int8.simulator_like_runtime`: it equals
    the runtime at batch n), ``settings`` (``steps``, ``lr``, ``batch_sizes``, ``batches``,
    ``guard_quantile``, ``guard_factor``) the audit's coupling section. ``evaluation`` and ``fit``: loaders of
    disjoint images, the mates and the attack's fit set (and the guard's calibration set);
    ``corruptions``: ``names`` and the ``degrees`` used for the corrupted candidates.

    The first runner meets every attacker and the control, the others only ``crafted``. With a
    guard (:class:`RangeGuard` fitted on the fit set), the first runner is also measured guarded
    (runner ``{name}_guarded``), with a further attacker ``adaptive`` (:func:`craft` knowing the
    guard); the record gives the threshold, the shares of clean and corrupted
    evaluation images served alone, and the guard's and the runner's milliseconds per image.
    """
    attack = int8.simulator_like_runtime(model, image_size, scale_rule="batch", range_grad=True)
    pixels, labels = (torch.cat(t) for t in zip(*[(images.float(), y) for images, y in evaluation]))
    fit_pixels = torch.cat([images.float() for images, _ in fit])
    candidates = torch.cat([corrupt(pixels, name, corruptions["degrees"], seed)[0] for name in corruptions["names"]
                            if name != "distribution_shift"])  # the service's normalisation is not the attacker's
    # every image's ranges once: the natural and corrupted attackers are the clean image and the
    # corruption (at the highest degree) that take the most bits from the median clean image
    start = time.perf_counter()
    clean_ranges = layer_ranges(attack, to_input(pixels))
    guard_ms = 1000 * (time.perf_counter() - start) / len(pixels)  # what the guard's forward costs an image
    candidate_ranges = layer_ranges(attack, to_input(candidates))
    median = median_of(clean_ranges)
    natural = pixels[int(bits_over(clean_ranges, median).argmax())]
    # crude is crafted's start and not measured itself: crafted ascends the mates' loss from it
    # (MobileNetV4, bench/SCIENCE.md §11: 72 against crude's 57 points at n = 128)
    rough = crude(attack, natural, to_input, steps=settings["steps"], lr=settings["lr"])
    attackers = {"natural": natural, "corrupted": candidates[int(bits_over(candidate_ranges, median).argmax())],
                 "crafted": craft(attack, fit_pixels, to_input, init=rough, steps=settings["steps"], lr=settings["lr"],
                                  seed=seed)}
    record, served_alone, adaptive = None, None, {}
    if settings["guard_quantile"] is not None:
        guard = RangeGuard.fit(attack, to_input(fit_pixels), settings["guard_quantile"], settings["guard_factor"])
        record = guard.record() | served_alone_shares(guard, next(iter(runners.values())), to_input(pixels), clean_ranges,
                                                      candidate_ranges, guard_ms)
        scores = bits_over(clean_ranges, guard.median)
        start = pixels[int(scores.masked_fill(scores > guard.threshold, float("-inf")).argmax())]
        adaptive = {"adaptive": craft(attack, fit_pixels, to_input, init=start, steps=settings["steps"], lr=settings["lr"],
                                      seed=seed, guard=guard)}
        served_alone = lambda inputs: guard.alone(attack, inputs)  # noqa: E731
    frames = []
    for i, (name, run) in enumerate(runners.items()):
        # the first runner (the runtime as served) meets every attacker and the control, also behind
        # the guard; the others (e.g. with the float layers kept) the strongest one, which is what they change
        kinds = {**attackers, **adaptive} if i == 0 else {"crafted": attackers["crafted"]}
        rows = curves(run, pixels, labels, kinds, to_input, batch_sizes=settings["batch_sizes"], batches=settings["batches"],
                      seed=seed, served_alone=served_alone if i == 0 else None, control=i == 0)
        frames.append(rows.assign(runner=[f"{name}_guarded" if g else name for g in rows.pop("guarded")]))
    return pd.concat(frames, ignore_index=True), record


def served_alone_shares(guard: RangeGuard, run: Runner, clean: Tensor, clean_ranges: Tensor, corrupted_ranges: Tensor,
                        guard_ms: float) -> dict:
    """The shares (%) of clean and corrupted inputs (given by their ranges) the guard serves alone,
    and its cost: ``guard_ms`` per image for its forward, against ``run``'s ms per image of ``clean``
    at batch 32."""
    start = time.perf_counter()
    run(clean, 32)
    runner_ms = 1000 * (time.perf_counter() - start) / len(clean)
    return {"served_alone_clean_pct": 100 * float(guard.over(clean_ranges).float().mean()),
            "served_alone_corrupted_pct": 100 * float(guard.over(corrupted_ranges).float().mean()),
            "clean_images": len(clean_ranges), "corrupted_images": len(corrupted_ranges),
            "guard_ms_per_image": guard_ms, "runner_ms_per_image_batch32": runner_ms}
