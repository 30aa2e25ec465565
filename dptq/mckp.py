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

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from .budgets import check_feasible


def solve(profits: Tensor, options: Sequence[int], capacity: int) -> Tensor:
    """One-hot allocation ``[B, N, K]`` maximising total profit with Σ bits = ``capacity``.

    ``profits`` is ``[B, N, K]`` (column k is option ``options[k]``). Raises ``ValueError``
    naming N, the options and the capacity when no allocation sums to it. On a GPU with Triton
    (float32 or narrower profits) the program runs as one kernel (:mod:`dptq.mckp_kernel`), else
    as :func:`dp_picks`; both give the same allocation.
    """
    if profits.dim() != 3 or profits.shape[2] != len(options):
        raise ValueError(f"profits must be [B, N, K={len(options)}], got {tuple(profits.shape)}")
    if len(set(options)) != len(options):
        raise ValueError(f"options must be distinct, got {list(options)}")
    check_feasible(profits.shape[1], options, int(capacity))
    if profits.is_cuda and profits.dtype != torch.float64 and importlib.util.find_spec("triton") is not None:
        from . import mckp_kernel
        chosen = mckp_kernel.picks(profits, options, capacity)
    else:
        chosen = dp_picks(profits, options, capacity)
    onehot = torch.nn.functional.one_hot(chosen, len(options)).to(profits.dtype)
    return onehot + (profits - profits.detach())


def dp_picks(profits: Tensor, options: Sequence[int], capacity: int) -> Tensor:
    """Option index ``[B, N]`` of the exact allocation, by the batched program (checked input).

    Layer n only visits the totals that can still reach C' (the band
    max(0, C' - (N-n-1)·w_max) .. min((n+1)·w_max, C')), and reads V(c - w) for every weight w at
    once through a sliding window over V, so each layer is one add and one max over [B, band, span];
    the backtrack is one gather per layer. Every per-layer step is a handful of tensor operations,
    whatever the batch: the solver's cost is dispatch, not arithmetic, at these sizes.
    """
    batch, num_layers, num_options = profits.shape
    device = profits.device
    weights = [o - min(options) for o in options]
    w_max = max(weights)
    span, target = w_max + 1, int(capacity) - num_layers * min(options)
    dtype = torch.float64 if profits.dtype == torch.float64 else torch.float32

    # gains[b, n, 0, j] = profit of the option of weight w = span - 1 - j (-inf where no option has it)
    gains = torch.full((batch, num_layers, 1, span), float("-inf"), device=device, dtype=dtype)
    gains[:, :, 0, [span - 1 - w for w in weights]] = profits.detach().to(dtype)
    option_at = torch.zeros(span, dtype=torch.long, device=device)  # window position j -> option index
    option_at[[span - 1 - w for w in weights]] = torch.arange(num_options, device=device)

    # values[:, w_max + c] = V(c); the first w_max columns are the -inf pad for c - w < 0
    values = torch.nn.functional.pad(torch.zeros(batch, 1, device=device, dtype=dtype), (w_max, target), value=float("-inf"))
    bands, choices = [], []
    for n, gain in enumerate(gains.unbind(1)):
        lo, hi = max(0, target - (num_layers - 1 - n) * w_max), min((n + 1) * w_max, target)
        window = values.unfold(1, span, 1).narrow(1, lo, hi - lo + 1)  # [B, band, span]: V(c - (span-1-j))
        best, choice = (window + gain).max(dim=-1)
        values = torch.nn.functional.pad(best, (w_max + lo, target - hi), value=float("-inf"))
        bands.append(lo)
        choices.append(choice)

    # back from C': layer n's window position j at total c leaves c - (span - 1 - j) for the layers before it
    picks, total = [], torch.full((batch, 1), target, dtype=torch.long, device=device)
    for lo, choice in zip(reversed(bands), reversed(choices)):
        column = total - lo
        pick = choice.gather(1, column)
        picks.append(pick)
        total = column.add_(pick).add_(lo - span + 1)
    return option_at[torch.cat(picks[::-1], 1)]


def bits_of(allocation: Tensor, options: Sequence[int]) -> Tensor:
    """Bit-widths ``[B, N]`` = M · options (differentiable in M)."""
    return allocation @ torch.as_tensor(list(options), dtype=allocation.dtype, device=allocation.device)
