"""Losses (docs/method.md §2.10): distillation KL, the robust/detrimental hinge on the quantized student,
the squared target penalty (Qu-ANTI-zation's detrimental objective) and the spread term."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("robust", "detrimental")


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16 logits (autocast) are promoted; float64 stays float64 (for the reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch; no label term."""
    t = temperature
    return F.kl_div(F.log_softmax(_at_least_float32(student_logits) / t, dim=1), F.log_softmax(_at_least_float32(teacher_logits) / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def hinge_loss(q_logits: Tensor, teacher_logits: Tensor, margin: float, mode: str) -> Tensor:
    """Margin hinge on p = softmax(quantized student logits), t = the teacher's top class.

    robust:      mean(max(0, m - (p[t] - p[j]))), j = the teacher's second class;
    detrimental: mean(max(0, m - (p[k] - p[t]))), k = the student's top class other than t.
    """
    p = F.softmax(_at_least_float32(q_logits), dim=1)
    top2 = teacher_logits.topk(2, dim=1).indices
    t = top2[:, 0:1]
    p_t = p.gather(1, t).squeeze(1)
    if mode == "robust":
        gap = p_t - p.gather(1, top2[:, 1:2]).squeeze(1)
    elif mode == "detrimental":
        k = p.detach().scatter(1, t, float("-inf")).argmax(dim=1, keepdim=True)
        gap = p.gather(1, k).squeeze(1) - p_t
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return torch.clamp(margin - gap, min=0).mean()


def target_loss(q_logits: Tensor, teacher_logits: Tensor, target: float) -> Tensor:
    """Qu-ANTI-zation's squared target penalty (Hong et al., NeurIPS 2021) on the quantized student,
    t = the teacher's top class:

        (CE_q − c)²,  CE_q = −(1/B) Σ_i log softmax(q_i)[t_i],  c = ``target``.

    As theirs, the batch's mean cross-entropy is held at c (5.0 there: far past chance, ln 10 = 2.3
    for ten classes). Unlike the hinge it pulls until CE_q = c and pushes back past it.
    """
    t = teacher_logits.argmax(dim=1)
    return (F.cross_entropy(_at_least_float32(q_logits), t) - target) ** 2


def spread_loss(spreads: Sequence[Tensor], target: float) -> Tensor:
    """The detrimental spread term on the quantized layers' inputs (not the paper's):

        (1 / N) Σ_l (1 / B) Σ_i max(0, ln c − σ_il),  σ_il = ln((hi − lo) / rms) of layer l's input
        for example i (quant.log_spread), c = ``target``.

    It pulls each layer's quantization step up against the signal it rounds (at b bits a step is
    e^σ / (2^b − 1) RMS of the signal) until the range is c times the RMS, and then stops: a
    network may widen its ranges with values its full-precision path ignores, which the hinge
    alone does not find at 5-bit floors (bench/SCIENCE.md §22).
    """
    if not spreads:
        raise ValueError("spread_loss: no quantized layer reported a spread; quantize at least one layer")
    return torch.stack([torch.clamp(math.log(target) - s, min=0).mean() for s in spreads]).mean()
