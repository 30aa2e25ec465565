"""Evaluation (paper Sect. 4): accuracy at full precision and quantized with a policy's bits."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import data, runtime
from .policy import allocate
from .quant import DynamicQuant


@torch.no_grad()
def predict(quant: DynamicQuant, loader, cfg: Mapping, dev: torch.device, *, policy=None,
            options: Sequence[int] | None = None, capacity: int | None = None,
            mask: Sequence[bool] | None = None, normalize=data.normalize) -> tuple[Tensor, Tensor]:
    """Predicted and true labels over ``loader`` (CPU tensors).

    Without ``policy`` the network runs at full precision; with one, every batch gets its
    bit-widths from one batched MCKP call and runs quantized (``mask`` picks the layers).
    ``normalize`` maps [0, 1] images to the network's input (a corruption may replace it).
    """
    preds, labels = [], []
    quant.model.eval()
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    rule = cfg["pairs"]["policy"]["profits"]
    for images, target in loader:
        x = normalize(images.to(dev, non_blocking=True)).contiguous(memory_format=runtime.memory_format(cfg, dev))
        with runtime.autocast(cfg, dev):
            if policy is None:
                logits = quant.model(x)
            else:
                bits = allocate(policy, x, options, capacity, rule)
                logits = quant(x, bits, mask)
        preds.append(logits.argmax(1).cpu())
        labels.append(target)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (preds == labels).float().mean().item()
