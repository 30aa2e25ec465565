"""Bit-width policies (docs/method.md §2.7, §2.9, §2.21): the small CNN that reads an image and scores
every (layer, option) pair, the seeded random policy, the static heuristics (the same profits for
every image: uniform, greedy by fragility), and the allocation through the MCKP."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import mckp


class BitPolicy(nn.Module):
    """Image → ``[B, N, K]`` logits: four stride-2 conv blocks, global average pool, linear.

    The image is resized to ``input_size`` first, so the policy's cost does not grow with the
    classifier's resolution.
    """

    def __init__(self, num_layers: int, num_options: int, input_size: int = 64, width: int = 32):
        super().__init__()
        self.num_layers, self.num_options, self.input_size = num_layers, num_options, input_size
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], num_layers * num_options)

    def start_at(self, profits: Tensor) -> None:
        """Start from one allocation for every image: a zero head whose bias is ``profits`` [N, K]
        (e.g. :func:`even_profits`), so learning moves away from there."""
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(profits.flatten())

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=False)
        return self.head(self.features(images)).view(-1, self.num_layers, self.num_options)


def even_profits(num_layers: int, options: Sequence[int], capacity: int) -> Tensor:
    """``[N, K]`` profits P[l, k] = −(o_k − C/N)²: the exact MCKP's answer is the allocation of C bits
    closest to uniform (the sum of squared deviations from C/N is smallest)."""
    o = torch.as_tensor(list(options), dtype=torch.float32)
    return (-(o - capacity / num_layers) ** 2).expand(num_layers, -1).clone()


class RandomPolicy:
    """i.i.d. uniform profits per example from a seeded generator; the MCKP makes them meet the budget."""

    def __init__(self, num_layers: int, num_options: int, seed: int = 0):
        self.num_layers, self.num_options = num_layers, num_options
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> Tensor:
        draws = torch.rand(images.shape[0], self.num_layers, self.num_options, generator=self.generator)
        return draws.to(images.device)


class StaticPolicy:
    """The same profits ``[N, K]`` for every image (the uniform and greedy allocations)."""

    def __init__(self, profits: Tensor):
        self.profits = profits

    def __call__(self, images: Tensor) -> Tensor:
        return self.profits.to(images.device).expand(images.shape[0], -1, -1)


def greedy_profits(drops: Sequence[float], options: Sequence[int]) -> Tensor:
    """P[l, k] = −(r_l / N) · (o_k / max o), r_l = 1 + the number of layers less fragile than l
    (ties: the later layer counts as more fragile, so the ranks are distinct and the answer
    unique). A positive scale leaves the MCKP's answer as it is; this one keeps |P| ≤ 1, so a
    policy that starts here (``audit.policy.start: greedy``) can learn away from it."""
    order = sorted(range(len(drops)), key=lambda l: (drops[l], l))
    rank = torch.empty(len(drops))
    rank[torch.tensor(order)] = torch.arange(1, len(drops) + 1, dtype=torch.float32) / len(drops)
    opts = torch.as_tensor(list(options), dtype=torch.float32)
    return -rank[:, None] * (opts / opts.max())[None, :]


def fragility_order(drops: Sequence[float]) -> list[int]:
    """Layers (0-based), most fragile first (ties: the later layer first, as in :func:`greedy_profits`)."""
    return sorted(range(len(drops)), key=lambda l: (-drops[l], -l))


def profits_of(logits: Tensor, rule: str = "logits") -> Tensor:
    """Knapsack profits: the logits themselves or their row-wise softmax (``pairs.policy.profits``)."""
    if rule == "logits":
        return logits
    if rule == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"pairs.policy.profits: unknown rule {rule!r}; use 'logits' or 'softmax'")


def allocate(policy, images: Tensor, options: Sequence[int], capacity: int, rule: str = "logits") -> Tensor:
    """Bit-widths ``[B, N]`` for ``images``: policy → profits → exact MCKP → M · options."""
    profits = profits_of(policy(images).float(), rule)
    return mckp.bits_of(mckp.solve(profits, options, capacity), options)
