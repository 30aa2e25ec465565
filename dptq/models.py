"""timm networks: creation (from scratch, the hub, or a local weights file) and layer counts.

timm and torch are imported where a network is built, not at import time: the config check
(every ``snakemake -n``, every job) only needs names and layer counts, which
``layer_counts.yaml`` holds for the usual archs (a test keeps it equal to timm's).
"""
from __future__ import annotations

import functools
import pickle
import re
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


def size_kwargs(arch: str, image_size: int | None) -> dict:
    """timm's ``img_size`` for an arch built for one input size (its pretrained config's
    ``fixed_input_size``: ViT, Swin, ...), so that it runs at the dataset's ``image_size``; nothing
    for a network that takes any size (or where ``image_size`` is None)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=True)
    return {"img_size": image_size} if image_size is not None and cfg is not None and cfg.fixed_input_size else {}


def create(arch: str, num_classes: int, pretrained: bool | str = False, image_size: int | None = None):
    """A timm model with a fresh ``num_classes`` head, built for ``image_size`` where the arch fixes
    its input size (:func:`size_kwargs`; timm resamples hub position embeddings to it).

    ``pretrained`` is ``False`` (from scratch), ``True`` (timm's hub) or the path of a local
    weights file, loaded through timm's pretrained-config overlay so that the head is replaced
    exactly as for hub weights (the air-gapped cluster case).
    """
    import timm

    sized = size_kwargs(arch, image_size)
    if isinstance(pretrained, str):
        fix = ", or set teacher.pretrained to false"
        path = _weights_file(pretrained, arch, "teacher.pretrained", ", or set it to false")
        state = _read(path, "teacher.pretrained", arch, fix)  # a file that is no weights at all: one line, before timm
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay=dict(file=str(path.resolve())), **sized)
        except _LOAD_ERRORS:
            raise _misfit("teacher.pretrained", path, arch, timm.create_model(arch, num_classes=num_classes, **sized),
                          state, fix) from None
    return timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes, **sized)


def trained(arch: str, num_classes: int, weights: str | Path, key: str = "weights", image_size: int | None = None):
    """A trained timm classifier of ``num_classes`` outputs from a local file, its head kept: a
    state dict, a timm checkpoint (``state_dict`` / ``model`` / EMA entries) or safetensors, read by
    timm's own reader; in eval mode, built for ``image_size`` where the arch fixes its input size
    (:func:`size_kwargs`). ``key`` names the setting in the errors."""
    import timm

    fix = f", trained for {num_classes} classes"
    path = _weights_file(weights, arch, key, fix)
    state = _read(path, key, arch, fix)
    model = timm.create_model(arch, num_classes=num_classes, **size_kwargs(arch, image_size))
    try:
        model.load_state_dict(state, strict=True)
    except _LOAD_ERRORS:
        raise _misfit(key, path, arch, model, state, f", trained for {num_classes} classes (or set the model's "
                                                      f"num_classes)") from None
    return model.eval()


# what torch / timm raise for a file that is not a fitting state dict
_LOAD_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, AttributeError, EOFError, IndexError, pickle.UnpicklingError)
_ZIP, _PICKLE = b"PK\x03\x04", 0x80  # torch.save's zip archive; the legacy format and plain pickles


def _weights_file(weights: str | Path, arch: str, key: str, fix: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: weights file {path} not found; point it at a timm state dict for {arch} "
                                f"(e.g. the hub's model.safetensors or pytorch_model.bin){fix}")
    return path


def _read(path: Path, key: str, arch: str, fix: str) -> dict:
    """The state dict of a weights file (timm's reader: torch.save files with ``weights_only``,
    timm checkpoints, safetensors), or one line saying why there is none: not a PyTorch or
    safetensors file, truncated or damaged, or refused because unpickling it would run code."""
    import zipfile

    from timm.models import load_state_dict

    with path.open("rb") as handle:
        head = handle.read(9)
    size = path.stat().st_size
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    safetensors = 0 < header <= size - 8 and head[8:9] == b"{"
    what = f"{key}: {path}"
    if head.startswith(_ZIP):
        damaged = not zipfile.is_zipfile(path)
        if not damaged:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip() is not None
        if damaged:
            raise WeightsError(f"{what} is truncated or damaged (an incomplete zip archive of {size} bytes); "
                               f"copy or download it again")
    elif not (head[:1] == bytes([_PICKLE]) or safetensors):
        kind = "an empty file" if not size else f"it starts with {head[:8]!r}"
        raise WeightsError(f"{what} is not a PyTorch or safetensors weights file ({kind}); give the weights of a "
                           f"{arch} (a state dict, a timm checkpoint or .safetensors){fix}")
    try:
        return load_state_dict(str(path), weights_only=True)
    except _LOAD_ERRORS as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:  # torch's refusal, as timm passes it on
            found = re.search(r"Unsupported globals?:? *(\w+(?:\.\w+)*)", text)
            culprit = found.group(1) if found else "a Python object"
            raise WeightsError(
                f"{what} was refused: unpickling it would run code (it holds {culprit}), and nothing was run; if you "
                f"trust its source, load it with torch.load(path, weights_only=False), save the model's state_dict() "
                f"with torch.save and give that file") from None
        first = (text.strip().splitlines() or [type(err).__name__])[0][:200]
        raise WeightsError(f"{what} is truncated or damaged ({type(err).__name__}: {first}); copy or download it "
                           f"again") from None


def _misfit(key: str, path: Path, arch: str, model, state: dict, fix: str) -> WeightsError:
    """One line: the file, how its tensors differ from ``model``'s (a few missing and unexpected
    keys, a few shapes), both class counts where the heads differ, and the fix."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = [f"{len(missing)} missing, e.g. {', '.join(missing[:3])}"] if missing else []
    parts += [f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}"] if unexpected else []
    parts += [f"{len(shapes)} of another shape, e.g. " + ", ".join(
        f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the model" for k in shapes[:2])] if shapes else []
    head = model.pretrained_cfg.get("classifier")
    theirs = state.get(f"{head}.weight") if isinstance(head, str) else None
    if theirs is not None and f"{head}.weight" in own and theirs.shape[:1] != own[f"{head}.weight"].shape[:1]:
        parts.append(f"the file's head has {theirs.shape[0]} classes, the model's {own[f'{head}.weight'].shape[0]}")
    return WeightsError(f"{key}: {path} does not fit {arch} (tensors: {'; '.join(parts) or 'none differ'}); give the "
                        f"weights of a {arch} (a state dict or a timm checkpoint){fix}")


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
