"""Checkpoints: written atomically, read with ``weights_only=True``, refused with a clear message.

A checkpoint is a plain dict of tensors and primitives:
``kind`` (teacher | distill | pair), ``arch``, ``num_classes``, ``model`` (state dict), and for
pairs ``policy`` (state dict) plus ``cell`` (version, budget, mode, options, capacity,
num_layers). Resume files add ``optimizer``, ``scheduler``, ``epoch``, ``step`` and ``rng``.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from . import models
from .policy import BitPolicy


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and how to recover."""


def save(obj: Mapping, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(obj), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, kind: str | None = None, arch: str | None = None, recover: str = "") -> dict:
    """Read a checkpoint safely (``weights_only=True``) and check its kind and arch.

    ``recover`` is appended to every error: what the user should do (e.g. which job to re-run).
    """
    path = Path(path)
    hint = f"; {recover}" if recover else f"; delete {path} and re-run the job that writes it"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint (not a torch.save archive){hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "a Python object")
        raise CheckpointError(f"{path}: refused to load: it holds Python objects that could run code when "
                              f"unpickled ({culprit}); only tensors and plain data are accepted{hint}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({str(err).splitlines()[0]}){hint}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise CheckpointError(f"{path}: not a dptq checkpoint (no 'kind'/'model' entries){hint}")
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


def policy(ckpt: Mapping) -> BitPolicy:
    """The bit-width policy of a pair checkpoint, in eval mode."""
    cell = ckpt["cell"]
    net = BitPolicy(cell["num_layers"], len(cell["options"]), cell["policy_input_size"], cell["policy_width"])
    net.load_state_dict(ckpt["policy"])
    return net.eval()
