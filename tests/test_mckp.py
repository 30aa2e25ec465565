"""dptq.mckp against brute force (small N) and an integer program (real sizes)."""
import importlib
import itertools
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from dptq import mckp

torch.set_num_threads(1)


def brute_force(profits, options, capacity):
    """Best total profit over every allocation that sums to ``capacity``."""
    n, k = profits.shape
    return max(sum(profits[i, c] for i, c in enumerate(choice))
               for choice in itertools.product(range(k), repeat=n)
               if sum(options[c] for c in choice) == capacity)


def integer_program(profits, options, capacity):
    """The same problem as a MILP: binary x[n, k], one option per layer, Σ bits = C."""
    n, k = profits.shape
    one_per_layer = np.kron(np.eye(n), np.ones(k))
    bits = np.tile(np.asarray(options, float), n)
    constraints = [LinearConstraint(one_per_layer, 1, 1), LinearConstraint(bits[None], capacity, capacity)]
    res = milp(-profits.reshape(-1), constraints=constraints, integrality=np.ones(n * k), bounds=Bounds(0, 1))
    assert res.status == 0, res.message
    return -res.fun


def check_allocation(onehot, options, capacity):
    assert torch.all((onehot == 0) | (onehot == 1))
    assert torch.all(onehot.sum(-1) == 1)
    bits = mckp.bits_of(onehot, options)
    assert torch.all(bits.sum(-1) == capacity)


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5, (), generator=gen))
    options = sorted(torch.randperm(8, generator=gen)[: int(torch.randint(1, 5, (), generator=gen))].add(2).tolist())
    totals = sorted({sum(c) for c in itertools.product(options, repeat=n)})
    capacity = totals[int(torch.randint(len(totals), (), generator=gen))]
    tied = seed % 2 == 0  # small integers: many equal optima
    profits = (torch.randint(-2, 3, (5, n, len(options)), generator=gen).double() if tied
               else torch.randn(5, n, len(options), generator=gen, dtype=torch.float64))
    onehot = mckp.solve(profits, options, capacity)
    check_allocation(onehot, options, capacity)
    for b in range(5):
        assert (onehot[b] * profits[b]).sum().item() == pytest.approx(brute_force(profits[b].numpy(), options, capacity), abs=1e-12)


@pytest.mark.parametrize("n,low,high,level", [(20, 3, 10, 5.5), (59, 4, 10, 6.5), (77, 5, 10, 6.0), (77, 3, 10, 4.0), (59, 3, 8, 7.0)])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_integer_program_at_real_sizes(n, low, high, level, tied):
    options = list(range(low, high + 1))
    capacity = int(round(level * n))
    gen = torch.Generator().manual_seed(n + low)
    profits = (torch.randint(0, 3, (3, n, len(options)), generator=gen).double() if tied
               else torch.randn(3, n, len(options), generator=gen, dtype=torch.float64))
    onehot = mckp.solve(profits, options, capacity)
    check_allocation(onehot, options, capacity)
    for b in range(3):
        ours = (onehot[b] * profits[b]).sum().item()
        assert ours == pytest.approx(integer_program(profits[b].numpy(), options, capacity), abs=1e-6)


def test_single_feasible_allocation():
    """ResNet18 III-A: C = 5N with options 5..10 admits only all-5."""
    onehot = mckp.solve(torch.randn(4, 20, 6), list(range(5, 11)), 100)
    assert torch.all(onehot[..., 0] == 1)


def test_gaps_in_options():
    onehot = mckp.solve(torch.randn(6, 5, 3, dtype=torch.float64), [2, 5, 9], 2 + 5 + 9 + 9 + 2)
    check_allocation(onehot, [2, 5, 9], 27)


def test_deterministic_and_batch_independent():
    profits = torch.randint(0, 2, (8, 20, 8)).float()  # heavily tied
    first = mckp.solve(profits, list(range(3, 11)), 110)
    assert torch.equal(first, mckp.solve(profits.clone(), list(range(3, 11)), 110))
    for b in range(8):  # an example's answer does not depend on its batch mates
        assert torch.equal(first[b:b + 1], mckp.solve(profits[b:b + 1], list(range(3, 11)), 110))


def test_straight_through_gradient():
    profits = torch.randn(2, 4, 3, requires_grad=True)
    onehot = mckp.solve(profits, [3, 4, 5], 16)
    weights = torch.randn(2, 4, 3)
    (onehot * weights).sum().backward()
    assert torch.equal(profits.grad, weights)
    bits = mckp.bits_of(mckp.solve(profits, [3, 4, 5], 16), [3, 4, 5])
    assert bits.requires_grad


@pytest.mark.parametrize("capacity", [11, 21, 100])
def test_infeasible_capacity_names_everything(capacity):
    with pytest.raises(ValueError, match=rf"N=4.*\[3, 4, 5\].*{capacity}"):
        mckp.solve(torch.randn(1, 4, 3), [3, 4, 5], capacity)


def test_unreachable_inside_range():
    with pytest.raises(ValueError, match="capacity 5"):
        mckp.solve(torch.randn(1, 2, 2), [2, 4], 5)  # 4..8 but only even totals


@pytest.fixture
def kernel(monkeypatch):
    """:mod:`dptq.mckp_kernel` under Triton's interpreter (the CPU runs the kernel's program as
    written), imported afresh so that the setting takes."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "dptq.mckp_kernel", raising=False)
    module = importlib.import_module("dptq.mckp_kernel")
    yield module
    sys.modules.pop("dptq.mckp_kernel", None)


@pytest.mark.parametrize("n,options,level,tied", [(4, [2, 5, 9], 5.0, True), (20, list(range(3, 11)), 5.5, True),
                                                  (77, list(range(3, 11)), 5.5, False), (59, [6, 4, 10, 8], 6.5, True)])
def test_kernel_gives_the_programs_allocation(kernel, n, options, level, tied):
    """The GPU kernel's allocation equals the batched program's, ties and unsorted options
    included, and its total profit the integer program's."""
    capacity = int(round(level * n))
    gen = torch.Generator().manual_seed(n)
    profits = (torch.randint(0, 3, (3, n, len(options)), generator=gen).float() if tied
               else torch.randn(3, n, len(options), generator=gen))
    chosen = kernel.picks(profits, options, capacity)
    assert torch.equal(chosen, mckp.dp_picks(profits, options, capacity))
    onehot = torch.nn.functional.one_hot(chosen, len(options)).float()
    check_allocation(onehot, options, capacity)
    ours = (onehot[0] * profits[0]).sum().item()
    assert ours == pytest.approx(integer_program(profits[0].double().numpy(), options, capacity), abs=1e-4)
