"""Reading and rewriting a network's modules: one dry run with hooks, one way to swap a submodule.

Every question of the form "which layers run, in what order, on what shapes" is answered by
:func:`dry_run` (one zero image through the network in eval mode, hooks attached for that run
only), and every model rewrite (a one-pixel convolution, a folded BatchNorm, an integer layer)
goes through :func:`replace`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)


def dry_run(model: nn.Module, image_size: int, *, pre: Mapping[nn.Module, Callable] = {},
            post: Mapping[nn.Module, Callable] = {}, grad: bool = False, device=None):
    """``model``'s output for one zero image [1, 3, S, S] in eval mode, with forward pre-hooks
    ``pre`` and forward hooks ``post`` attached to their modules for this run only.

    The image has the model's device and dtype (``device`` overrides the device: ``"meta"``
    counts layers without weights); ``grad`` records autograd (the image requires grad), so
    hooks can follow the graph. The model's training mode is restored afterwards.
    """
    parameter = next(model.parameters())
    handles = [m.register_forward_pre_hook(hook) for m, hook in pre.items()]
    handles += [m.register_forward_hook(hook) for m, hook in post.items()]
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(1, 3, image_size, image_size, device=device or parameter.device, dtype=parameter.dtype,
                        requires_grad=grad)
        with torch.set_grad_enabled(grad):
            return model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def execution_order(model: nn.Module, image_size: int = 64, device=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d/Linear of ``model`` in first-execution order (one dry run)."""
    names = {m: name for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}
    order: dict[nn.Module, str] = {}

    def record(module, _args):
        order.setdefault(module, names[module])

    dry_run(model, image_size, pre=dict.fromkeys(names, record), device=device)
    return [(name, module) for module, name in order.items()]


def replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` is (dotted path); returns the old one."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old
