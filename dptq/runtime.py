"""Where and how tensors run: device choice, bf16 autocast on CUDA, channels_last, threads, seeds."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping

import numpy as np
import torch


def device(cfg: Mapping) -> torch.device:
    """``runtime.device``: ``auto`` takes CUDA when present, else the CPU."""
    choice = cfg["runtime"]["device"]
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device: 'cuda' was asked for but no CUDA device is visible; set it to 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def setup(cfg: Mapping, seed_offset: int = 0) -> torch.device:
    """Seed every RNG, fix CPU threads and deterministic kernels; return the device."""
    torch.set_num_threads(cfg["runtime"]["threads"])
    seed = cfg["seed"] + seed_offset
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    dev = device(cfg)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def autocast(cfg: Mapping, dev: torch.device):
    """bf16 autocast on CUDA when ``runtime.bf16``; a no-op on the CPU (keeps CPU runs exact)."""
    if dev.type == "cuda" and cfg["runtime"]["bf16"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(cfg: Mapping, dev: torch.device) -> torch.memory_format:
    """``runtime.channels_last`` on any device: oneDNN's CPU convolutions gain from it too
    (inference 1.05-3.5x faster at 32 px, bench/NOTES.md), as cuDNN's do under bf16."""
    if cfg["runtime"]["channels_last"]:
        return torch.channels_last
    return torch.contiguous_format


def to_device(module: torch.nn.Module, cfg: Mapping, dev: torch.device) -> torch.nn.Module:
    return module.to(device=dev, memory_format=memory_format(cfg, dev))
