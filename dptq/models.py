"""timm networks: creation (from scratch, the hub, or a local weights file) and layer counts.

timm and torch are imported where a network is built, not at import time: the config check
(every ``snakemake -n``, every job) only needs names and layer counts, which
``layer_counts.yaml`` holds for the usual archs (a test keeps it equal to timm's).
"""
from __future__ import annotations

import functools
import pickle
from importlib import resources
from pathlib import Path

import yaml


@functools.cache
def _counted() -> dict[str, int]:
    """Layer counts measured once with the pinned timm (``dptq/layer_counts.yaml``)."""
    return yaml.safe_load(resources.files("dptq").joinpath("layer_counts.yaml").read_text())["layers"]


def exists(name: str) -> bool:
    if name in _counted():
        return True
    import timm

    return timm.is_model(name)


@functools.cache
def known_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


class WeightsError(ValueError):
    """A weights file that does not fit the network it is given for."""


def create(arch: str, num_classes: int, pretrained: bool | str = False):
    """A timm model with a fresh ``num_classes`` head.

    ``pretrained`` is ``False`` (from scratch), ``True`` (timm's hub) or the path of a local
    weights file, loaded through timm's pretrained-config overlay so that the head is replaced
    exactly as for hub weights (the air-gapped cluster case).
    """
    import timm

    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher.pretrained: weights file {path} not found; point it at a timm state dict "
                f"for {arch} (e.g. the hub's model.safetensors or pytorch_model.bin), or set it to false")
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay=dict(file=str(path.resolve())))
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
            # torch's load_state_dict lists every mismatched tensor; its first line says which kind
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError(
                f"teacher.pretrained: {path} does not fit {arch} ({first}); give the weights of a {arch} "
                f"(a state dict or a timm checkpoint), or set teacher.pretrained to false") from None
    return timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes)


def count_quantizable_layers(arch: str) -> int:
    """N for ``arch``, counted by a dry run on the meta device (no weights, no compute)."""
    import timm
    import torch

    from .quant import quantizable_layers

    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=10)
    return len(quantizable_layers(model, device="meta"))


@functools.cache
def num_quantizable_layers(arch: str) -> int:
    """N for ``arch``: from ``layer_counts.yaml`` when it lists the arch, else counted."""
    return _counted().get(arch) or count_quantizable_layers(arch)
