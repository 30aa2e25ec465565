"""Exact multiple-choice knapsack with an equality budget, batched over examples (docs/method.md §2.8).

For every example: choose one option k_n per layer n to maximise Σ_n P[n, k_n] subject to
Σ_n options[k_n] = C. With w_k = options[k] - min(options) and C' = C - N·min(options), the
dynamic program over totals c = 0..C' is

    V_0(0) = 0,  V_0(c > 0) = -inf,  V_n(c) = max_k V_{n-1}(c - w_k) + P[n, k],

run for the whole batch at once, then backtracked from V_N(C'). At equal value a layer keeps the
larger option (the first maximum of its window), so the answer is deterministic. The result M is one-hot in the forward pass and straight-through in
the backward pass: ``M + (P - P.detach())``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .budgets import check_feasible


def solve(profits: Tensor, options: Sequence[int], capacity: int) -> Tensor:
    """One-hot allocation ``[B, N, K]`` maximising total profit with Σ bits = ``capacity``.

    ``profits`` is ``[B, N, K]`` (column k is option ``options[k]``). Raises ``ValueError``
    naming N, the options and the capacity when no allocation sums to it.

    Layer n only visits the totals that can still reach C' (the band
    max(0, C' - (N-n-1)·w_max) .. min((n+1)·w_max, C')), and reads V(c - w) for every weight w at
    once through a sliding window over V, so each layer is one add and one max over [B, band, span].
    """
    if profits.dim() != 3 or profits.shape[2] != len(options):
        raise ValueError(f"profits must be [B, N, K={len(options)}], got {tuple(profits.shape)}")
    if len(set(options)) != len(options):
        raise ValueError(f"options must be distinct, got {list(options)}")
    batch, num_layers, num_options = profits.shape
    check_feasible(num_layers, options, int(capacity))
    device = profits.device
    opts = torch.as_tensor(list(options), device=device, dtype=torch.long)
    weights = opts - opts.min()
    w_max = int(weights.max())
    span, target = w_max + 1, int(capacity) - num_layers * int(opts.min())
    dtype = torch.float64 if profits.dtype == torch.float64 else torch.float32

    # gains[b, n, j] = profit of the option of weight w = span - 1 - j (-inf where no option has it)
    gains = torch.full((batch, num_layers, span), float("-inf"), device=device, dtype=dtype)
    gains[:, :, span - 1 - weights] = profits.detach().to(dtype)
    option_of_weight = torch.zeros(span, dtype=torch.long, device=device)
    option_of_weight[weights] = torch.arange(num_options, device=device)

    # values[:, w_max + c] = V(c); the first w_max columns are the -inf pad for c - w < 0
    values = torch.full((batch, w_max + target + 1), float("-inf"), device=device, dtype=dtype)
    values[:, w_max] = 0.0
    choices = torch.zeros(batch, num_layers, target + 1, dtype=torch.uint8, device=device)
    for n in range(num_layers):
        lo, hi = max(0, target - (num_layers - 1 - n) * w_max), min((n + 1) * w_max, target)
        window = values.unfold(1, span, 1)[:, lo:hi + 1]  # [B, band, span]: V(c - (span-1-j))
        best, choices[:, n, lo:hi + 1] = (window + gains[:, n, None, :]).max(dim=-1)
        values = torch.full_like(values, float("-inf"))
        values[:, w_max + lo:w_max + hi + 1] = best

    picks = torch.empty(batch, num_layers, dtype=torch.long, device=device)
    total = torch.full((batch, 1), target, dtype=torch.long, device=device)
    for n in reversed(range(num_layers)):
        weight = span - 1 - choices[:, n].gather(1, total).long()
        picks[:, n] = option_of_weight[weight.squeeze(1)]
        total = total - weight
    onehot = torch.nn.functional.one_hot(picks, num_options).to(profits.dtype)
    return onehot + (profits - profits.detach())


def bits_of(allocation: Tensor, options: Sequence[int]) -> Tensor:
    """Bit-widths ``[B, N]`` = M · options (differentiable in M)."""
    return allocation @ torch.as_tensor(list(options), dtype=allocation.dtype, device=allocation.device)
