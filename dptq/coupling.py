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

- natural: :func:`largest_range_image`, the clean image of largest score; :func:`worst_corrupted`,
  the corrupted image (dptq/corruptions.py) of largest score;
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
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


def range_score(quant: DynamicQuant, inputs: Tensor, reference: Tensor) -> Tensor:
    """[B] bits an input takes from the median reference example: Σ_l max(0, log2(r_l / median r_l))."""
    median = layer_ranges(quant, reference).median(0).values.clamp_min(RANGE_FLOOR)
    return torch.log2(layer_ranges(quant, inputs) / median).clamp_min(0).sum(1)


def largest_range_image(images: Tensor, quant: DynamicQuant, to_input: ToInput) -> int:
    """Index of the image of ``images`` (pixels) with the largest :func:`range_score` among them."""
    inputs = to_input(images)
    return int(range_score(quant, inputs, inputs).argmax())


def worst_corrupted(images: Tensor, quant: DynamicQuant, candidates: Tensor, to_input: ToInput) -> Tensor:
    """The candidate (pixels, e.g. every corruption at its highest degree) of largest
    :func:`range_score` against the clean ``images``. Only pixel corruptions apply: the service's
    normalisation is fixed, so ``distribution_shift`` is no input an attacker can send."""
    return candidates[range_score(quant, to_input(candidates), to_input(images)).argmax()]


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
          bits: int = 8, batch: int = 32, steps: int = 40, lr: float = 0.005, seed: int = 0) -> Tensor:
    """Pixels [3, H, W] maximising the cross-entropy of ``batch - 1`` mates drawn afresh at every
    step from ``mates`` (pixels of the fit set), w.r.t. ``labels`` or else their full-precision
    predictions, through ``quant`` (rule ``batch``, ``range_grad``), from ``init``.

    The defaults refine :func:`crude`'s result (``init``). The gradient through the range is
    d loss/d s = Σ g (round(x/s) - x/s): zero-mean rounding noise to first order, the damage of a
    coarser step only to second order, so from a natural image this ascent rides on rounding noise:
    on an Intel CPU it fell well short of :func:`crude`, on an AMD EPYC it beat it
    (tests/test_coupling.py); start from :func:`crude` to be sure of its strength."""
    if quant.scale_rule != "batch" or not quant.range_grad:
        raise ValueError("coupling.craft needs DynamicQuant(..., scale_rule='batch', range_grad=True)")
    inputs = to_input(mates)
    if labels is None:
        with torch.no_grad():
            labels = quant.model(inputs).argmax(1)
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(inputs), (batch - 1,), generator=gen) for _ in range(steps)]
    full = inputs.new_full((batch, quant.num_layers), float(bits))

    def mates_loss(x: Tensor, step: int) -> Tensor:
        logits = quant(torch.cat([inputs[draws[step]], to_input(x[None])]), full)
        return F.cross_entropy(logits[:-1], labels[draws[step]])
    return _ascend(init, mates_loss, steps, lr)


def curves(run: Runner, mates: Tensor, labels: Tensor, attackers: Mapping[str, Tensor], to_input: ToInput, *,
           batch_sizes: Sequence[int] = (2, 8, 32, 128), batches: int = 8, seed: int = 0) -> pd.DataFrame:
    """Tidy rows (kind, batch_size, batch_index, mates_acc, clean_acc), accuracies in percent.

    For each n, ``batches`` seeded draws of n - 1 mates from ``mates`` (pixels of the evaluation
    set, disjoint from :func:`craft`'s fit set; without replacement unless n exceeds it) and a
    random slot, the same for every kind; each kind's attacker (pixels) takes the slot, the kind
    ``none`` a further clean image. mates_acc: the mates' accuracy at batch n, in one
    ``run(..., n)`` call per kind and n; clean_acc: theirs at batch 1.
    """
    inputs, labels = to_input(mates), labels.cpu()
    alone = torch.as_tensor(run(inputs, 1)).argmax(1).cpu()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_sizes:
        draws = []
        for _ in range(batches):
            picks = torch.randperm(len(inputs), generator=gen)[:n] if n <= len(inputs) else \
                torch.randint(len(inputs), (n,), generator=gen)
            draws.append((picks[:-1], picks[-1:], int(torch.randint(n, (), generator=gen))))
        for kind, attacker in {"none": None, **attackers}.items():
            pool = inputs if attacker is None else torch.cat([inputs, to_input(attacker[None])])
            order = [torch.cat([idx[:slot], extra if attacker is None else torch.tensor([len(inputs)]), idx[slot:]])
                     for idx, extra, slot in draws]
            preds = torch.as_tensor(run(pool[torch.cat(order)], n)).argmax(1).cpu().view(batches, n)
            for b, (idx, _, slot) in enumerate(draws):
                mate_preds = torch.cat([preds[b, :slot], preds[b, slot + 1:]])
                rows.append({"kind": kind, "batch_size": n, "batch_index": b, "mates_acc": accuracy(mate_preds, labels[idx]),
                             "clean_acc": accuracy(alone[idx], labels[idx])})
    return pd.DataFrame(rows)


def measure(model: nn.Module, runners: Mapping[str, Runner], image_size: int, evaluation, fit, to_input: ToInput,
            settings: Mapping, corruptions: Mapping, seed: int) -> pd.DataFrame:
    """What one batch-mate of each kind costs the others in each runner (name → ``run``, e.g. ONNX
    Runtime's sessions), as tidy rows of :func:`curves` with a ``runner`` column.

    ``model``: the float network the runners quantize; the attacks are optimised through its
    like-for-like simulator's ``batch`` rule (:func:`dptq.int8.simulator_like_runtime`: it equals
    the runtime at batch n), ``settings`` (``steps``, ``lr``, ``batch_sizes``, ``batches``) the
    audit's coupling section. ``evaluation`` and ``fit``: loaders of disjoint images, the mates and
    the attack's fit set; ``corruptions``: ``names`` and the ``degrees`` used for the corrupted
    candidates."""
    attack = int8.simulator_like_runtime(model, image_size, scale_rule="batch", range_grad=True)
    pixels, labels = (torch.cat(t) for t in zip(*[(images.float(), y) for images, y in evaluation]))
    fit_pixels = torch.cat([images.float() for images, _ in fit])
    natural = pixels[largest_range_image(pixels, attack, to_input)]
    candidates = torch.cat([corrupt(pixels, name, corruptions["degrees"], seed)[0] for name in corruptions["names"]
                            if name != "distribution_shift"])  # the service's normalisation is not the attacker's
    rough = crude(attack, natural, to_input, steps=settings["steps"], lr=settings["lr"])
    attackers = {"natural": natural, "corrupted": worst_corrupted(pixels, attack, candidates, to_input), "crude": rough,
                 "crafted": craft(attack, fit_pixels, to_input, init=rough, steps=settings["steps"], lr=settings["lr"],
                                  seed=seed)}
    frames = [curves(run, pixels, labels, attackers, to_input, batch_sizes=settings["batch_sizes"],
                     batches=settings["batches"], seed=seed).assign(runner=name) for name, run in runners.items()]
    return pd.concat(frames, ignore_index=True)
