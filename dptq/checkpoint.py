"""Checkpoints: written atomically, read with ``weights_only=True``, refused with a clear message.

A checkpoint is a plain dict of tensors and primitives:
``kind`` (teacher | distill | pair), ``arch``, ``num_classes``, ``model`` (state dict), and for
pairs ``policy`` (state dict) plus ``cell`` (version, budget, mode, options, capacity,
num_layers). Resume files add ``optimizer``, ``scheduler``, ``epoch``, ``step`` and ``rng``.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models
from .files import atomic_write
from .policy import BitPolicy
from .quant import DynamicQuant


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and how to recover."""


def save(obj: Mapping, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically (:func:`dptq.files.atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(dict(obj), tmp))


def load(path: str | Path, kind: str | None = None, arch: str | None = None, recover: str = "",
         mmap: bool = False) -> dict:
    """Read a checkpoint safely (``weights_only=True``) and check its kind and arch.

    ``mmap`` maps the tensors instead of reading them (cheap when only the metadata is needed).

    ``recover`` is appended to every error: what the user should do (e.g. which job to re-run).
    """
    path = Path(path)
    hint = f"; {recover}" if recover else f"; delete {path} and re-run the job that writes it"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint (not a torch.save archive){hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        culprit = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "a Python object")
        raise CheckpointError(f"{path}: refused to load: it holds Python objects that could run code when "
                              f"unpickled ({culprit}); only tensors and plain data are accepted{hint}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({str(err).splitlines()[0]}){hint}") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or not {"model", "policy"} & ckpt.keys():
        raise CheckpointError(f"{path}: not a dptq checkpoint (no 'kind' entry, or neither 'model' nor 'policy' weights){hint}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: holds a {ckpt['kind']!r} checkpoint, expected {kind!r}{hint}")
    if arch is not None and ckpt.get("arch") != arch:
        raise CheckpointError(f"{path}: holds arch {ckpt.get('arch')!r}, expected {arch!r}{hint}")
    return ckpt


def network(ckpt: Mapping) -> torch.nn.Module:
    """The timm network of a checkpoint, weights loaded, in eval mode."""
    model = models.create(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def policy_of(ckpt: Mapping) -> BitPolicy:
    """The bit-width policy of a pair checkpoint, in eval mode."""
    cell = ckpt["cell"]
    net = BitPolicy(cell["num_layers"], len(cell["options"]), cell["policy_input_size"], cell["policy_width"])
    net.load_state_dict(ckpt["policy"])
    return net.eval()


def cell(path: str | Path) -> dict:
    """The cell (version, budget, mode, options, capacity, ...) a pair checkpoint was trained for."""
    return load(path, kind="pair", mmap=True, recover="re-run the pair job that writes it")["cell"]


@dataclass
class Pair:
    """A trained network-policy pair, ready to run: the network behind ``quant``, its policy and cell."""

    arch: str
    quant: DynamicQuant
    policy: torch.nn.Module
    options: list[int]
    capacity: int
    cell: dict


def quantizer(model: torch.nn.Module, rt, image_size: int, *, weight_bits: int, activation_scale: str,
              percentile: float, range_grad: bool = False) -> DynamicQuant:
    """``model`` on the job's device wrapped for quantized runs (the config's ``quant`` section);
    ``range_grad`` is a training choice (a pair's ``pairs.range_grad``): inference ignores it."""
    model = rt.to_device(model, image_size).eval()
    return DynamicQuant(model, weight_bits=weight_bits, scale_rule=activation_scale, percentile=percentile,
                        image_size=image_size, range_grad=range_grad)


def white_box(path: str | Path, rt, image_size: int, quant: Mapping, arch: str | None = None) -> DynamicQuant:
    """The distilled network W of ``path`` (checked to be ``arch``'s when given), ready for quantized runs."""
    ckpt = load(path, kind="distill", arch=arch, recover="re-run the distill job that writes it")
    return quantizer(network(ckpt), rt, image_size, **quant)


def pair(path: str | Path, rt, image_size: int, quant: Mapping, arch: str | None = None) -> Pair:
    """The network-policy pair of ``path`` (checked to be ``arch``'s when given), its cell read from
    the checkpoint itself."""
    ckpt = load(path, kind="pair", arch=arch, recover="re-run the pair job that writes it")
    cell = dict(ckpt["cell"])
    policy = rt.to_device(policy_of(ckpt), image_size).eval()
    return Pair(ckpt["arch"], quantizer(network(ckpt), rt, image_size, **quant), policy, list(cell["options"]),
                int(cell["capacity"]), cell)
