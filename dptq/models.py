"""timm networks: creation (from scratch, the hub, or a local weights file) and layer counts."""
from __future__ import annotations

import functools
from pathlib import Path

import timm
import torch
from torch import nn


def exists(name: str) -> bool:
    return timm.is_model(name)


@functools.cache
def known_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def create(arch: str, num_classes: int, pretrained: bool | str = False) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    ``pretrained`` is ``False`` (from scratch), ``True`` (timm's hub) or the path of a local
    weights file, loaded through timm's pretrained-config overlay so that the head is replaced
    exactly as for hub weights (the air-gapped cluster case).
    """
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher.pretrained: weights file {path} not found; point it at a timm state dict "
                f"for {arch} (e.g. the hub's model.safetensors or pytorch_model.bin), or set it to false")
        return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=dict(file=str(path.resolve())))
    return timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes)


@functools.cache
def num_quantizable_layers(arch: str) -> int:
    """N for ``arch``, counted by a dry run on the meta device (no weights, no compute)."""
    from .quant import quantizable_layers

    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=10)
    return len(quantizable_layers(model, device="meta"))
