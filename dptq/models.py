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
        path = _weights_file(pretrained, arch, "teacher.pretrained", ", or set it to false")
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay=dict(file=str(path.resolve())))
        except _LOAD_ERRORS as err:
            raise _misfit("teacher.pretrained", path, arch, err, ", or set teacher.pretrained to false") from None
    return timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes)


def trained(arch: str, num_classes: int, weights: str | Path, key: str = "weights"):
    """A trained timm classifier of ``num_classes`` outputs from a local file, its head kept: a
    state dict, a timm checkpoint (``state_dict`` / ``model`` / EMA entries) or safetensors, read by
    timm's own loader; in eval mode. ``key`` names the setting in the errors."""
    import timm
    from timm.models import load_checkpoint

    path = _weights_file(weights, arch, key, f", trained for {num_classes} classes")
    model = timm.create_model(arch, num_classes=num_classes)
    try:
        load_checkpoint(model, str(path), strict=True)
    except _LOAD_ERRORS as err:
        raise _misfit(key, path, arch, err, f" with {num_classes} classes (or set the model's num_classes)") from None
    return model.eval()


# what torch / timm raise for a file that is not a fitting state dict
_LOAD_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, AttributeError, EOFError, pickle.UnpicklingError)


def _weights_file(weights: str | Path, arch: str, key: str, fix: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: weights file {path} not found; point it at a timm state dict for {arch} "
                                f"(e.g. the hub's model.safetensors or pytorch_model.bin){fix}")
    return path


def _misfit(key: str, path: Path, arch: str, err: Exception, fix: str) -> WeightsError:
    """One line: the file, why it does not fit and the fix. torch lists every mismatched tensor
    under a heading; the heading and the first of them say which kind."""
    if "state_dict" in str(err):
        first = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:300]
    else:  # the unpickler's own errors (a KeyError of a memo index) say nothing to a user
        first = f"not a state dict: {type(err).__name__} while reading it"
    return WeightsError(f"{key}: {path} does not fit {arch} ({first}); give the weights of a {arch} "
                        f"(a state dict or a timm checkpoint){fix}")


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
