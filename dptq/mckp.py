"""Exact multiple-choice knapsack with an equality budget, batched over examples (SPEC §2).

For every example: choose one option k_n per layer n to maximise Σ_n P[n, k_n] subject to
Σ_n options[k_n] = C. With w_k = options[k] - min(options) and C' = C - N·min(options), the
dynamic program over totals c = 0..C' is

    V_0(0) = 0,  V_0(c > 0) = -inf,  V_n(c) = max_k V_{n-1}(c - w_k) + P[n, k],

run for the whole batch at once (one gather per layer), then backtracked from V_N(C').
Ties go to the smaller option index at each layer (``argmax`` returns the first maximum), so the
answer is deterministic. The result M is one-hot in the forward pass and straight-through in
the backward pass: ``M + (P - P.detach())``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .budgets import check_feasible


def _shift_index(weights: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Index c - w_k into V padded with -inf at position 0: [K, width] (0 where c < w_k)."""
    c = torch.arange(width, device=weights.device)
    src = c[None, :] - weights[:, None]
    return (src + 1).clamp(min=0), src >= 0


def solve(profits: Tensor, options: Sequence[int], capacity: int) -> Tensor:
    """One-hot allocation ``[B, N, K]`` maximising total profit with Σ bits = ``capacity``.

    ``profits`` is ``[B, N, K]`` (column k is option ``options[k]``). Raises ``ValueError``
    naming N, the options and the capacity when no allocation sums to it.
    """
    if profits.dim() != 3 or profits.shape[2] != len(options):
        raise ValueError(f"profits must be [B, N, K={len(options)}], got {tuple(profits.shape)}")
    batch, num_layers, _ = profits.shape
    check_feasible(num_layers, options, int(capacity))
    device = profits.device
    opts = torch.as_tensor(list(options), device=device, dtype=torch.long)
    weights = opts - opts.min()
    target = int(capacity) - num_layers * int(opts.min())
    width = target + 1
    index, valid = _shift_index(weights, width)  # [K, width]

    values = torch.full((batch, width + 1), float("-inf"), device=device, dtype=torch.float64 if profits.dtype == torch.float64 else torch.float32)
    values[:, 1] = 0.0  # column 0 is the -inf pad, column c+1 holds total c
    gains = profits.detach().to(values.dtype)
    choices = torch.empty(batch, num_layers, width, dtype=torch.uint8, device=device)
    flat_index = index.reshape(1, -1).expand(batch, -1)
    for n in range(num_layers):
        shifted = values.gather(1, flat_index).view(batch, -1, width)  # [B, K, width] = V(c - w_k)
        candidates = shifted.masked_fill(~valid, float("-inf")) + gains[:, n, :, None]
        best, choices[:, n] = candidates.max(dim=1)
        values = torch.cat([values[:, :1], best], dim=1)

    picks = torch.empty(batch, num_layers, dtype=torch.long, device=device)
    total = torch.full((batch, 1), target, dtype=torch.long, device=device)
    for n in reversed(range(num_layers)):
        k = choices[:, n].gather(1, total).squeeze(1).long()
        picks[:, n] = k
        total = total - weights[k][:, None]
    onehot = torch.nn.functional.one_hot(picks, len(options)).to(profits.dtype)
    return onehot + (profits - profits.detach())


def bits_of(allocation: Tensor, options: Sequence[int]) -> Tensor:
    """Bit-widths ``[B, N]`` = M · options (differentiable in M)."""
    return allocation @ torch.as_tensor(list(options), dtype=allocation.dtype, device=allocation.device)
