"""The knapsack's dynamic program of :mod:`dptq.mckp` as one Triton kernel: one program per example.

Program b keeps V(c), c = 0..C', in one block and runs the layers in order,

    V_n(c) = max_k V_{n-1}(c - w_k) + P[b, n, k],

reading V_{n-1} from its own row of a scratch buffer (a barrier between the reads and the write),
and records each layer's argmax; then it backtracks from V_N(C') on its own. The options are
visited largest first and a later option wins only when strictly greater, so at equal value the
larger option is kept: the tie rule of :func:`dptq.mckp.solve`. Each V_n(c) is the same float32
sum as the batched program's, so both give the same allocation. On a GPU the whole solve is one
launch instead of a few small operations per layer; on the CPU it runs under ``TRITON_INTERPRET=1``
for checking only.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


# not specialised on C': at C' = 1 it would become a constant, and the backtrack's total would change type
@triton.jit(do_not_specialize=["target"])
def _knapsack(profits, weights, values, choices, picks, num_layers, num_options, target, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    total = tl.arange(0, BLOCK)
    row = values + b * BLOCK
    tl.store(row + total, tl.where(total == 0, 0.0, float("-inf")))
    tl.debug_barrier()
    for n in range(num_layers):
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        choice = tl.full((BLOCK,), 0, tl.int8)
        for k in range(num_options):
            w = tl.load(weights + k)
            before = tl.load(row + total - w, mask=(total >= w) & (total <= target), other=float("-inf"))
            candidate = before + tl.load(profits + (b * num_layers + n) * num_options + k)
            better = candidate > best
            best = tl.where(better, candidate, best)
            choice = tl.where(better, k, choice).to(tl.int8)
        tl.debug_barrier()  # every read of V_{n-1} is done before V_n overwrites it
        tl.store(row + total, best)
        tl.store(choices + (b * num_layers + n) * BLOCK + total, choice)
        tl.debug_barrier()
    left = target
    for i in range(num_layers):
        n = num_layers - 1 - i
        k = tl.load(choices + (b * num_layers + n) * BLOCK + left).to(tl.int32)
        tl.store(picks + b * num_layers + n, k)
        left = left - tl.load(weights + k)


@functools.lru_cache
def _layout(options: tuple[int, ...], device: torch.device) -> tuple[list[int], Tensor, Tensor]:
    """The options largest first (the tie rule), their positions and weights o_k − min(o) on
    ``device``: made once per cell, not copied to the device on every solve."""
    order = sorted(range(len(options)), key=lambda k: -options[k])
    weights = torch.tensor([options[k] - min(options) for k in order], dtype=torch.int32, device=device)
    return order, torch.tensor(order, device=device), weights


def picks(profits: Tensor, options: Sequence[int], capacity: int) -> Tensor:
    """Option index ``[B, N]`` of the exact allocation (float32 ``profits`` ``[B, N, K]``, a
    feasible ``capacity``: :func:`dptq.mckp.solve` checks both)."""
    batch, num_layers, num_options = profits.shape
    device = profits.device
    order, position, weights = _layout(tuple(options), device)
    target = int(capacity) - num_layers * min(options)
    block = triton.next_power_of_2(target + 1)
    values = torch.empty(batch, block, device=device)
    choices = torch.empty(batch, num_layers, block, dtype=torch.int8, device=device)  # K ≤ 32: distinct bit-widths
    chosen = torch.empty(batch, num_layers, dtype=torch.int32, device=device)
    _knapsack[(batch,)](profits.detach().float()[:, :, order].contiguous(), weights, values, choices, chosen,
                        num_layers, num_options, target, BLOCK=block)
    return position[chosen.long()]
