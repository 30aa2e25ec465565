"""dptq.policy: shapes, budget met exactly, seeded random policy, gradient into the policy, the
greedy heuristic against brute force."""
import itertools

import pytest
import torch

from dptq import mckp
from dptq.policy import BitPolicy, RandomPolicy, allocate, fragility_order, greedy_profits, profits_of

torch.set_num_threads(1)
OPTIONS = list(range(4, 11))


def test_policy_shapes_and_resize():
    policy = BitPolicy(num_layers=20, num_options=7, input_size=32, width=8)
    assert policy(torch.randn(3, 3, 48, 48)).shape == (3, 20, 7)
    assert policy(torch.randn(3, 3, 32, 32)).shape == (3, 20, 7)


def test_allocation_meets_budget_and_trains_the_policy():
    policy = BitPolicy(20, 7, input_size=16, width=8)
    bits = allocate(policy, torch.randn(5, 3, 16, 16), OPTIONS, 130)
    assert bits.shape == (5, 20)
    assert torch.all(bits.sum(1) == 130)
    assert torch.all((bits >= 4) & (bits <= 10))
    bits.pow(2).sum().backward()
    assert policy.head.weight.grad.abs().sum() > 0


def test_random_policy_is_seeded_and_meets_budget():
    images = torch.zeros(6, 3, 8, 8)
    a = allocate(RandomPolicy(20, 7, seed=3), images, OPTIONS, 130)
    b = allocate(RandomPolicy(20, 7, seed=3), images, OPTIONS, 130)
    c = allocate(RandomPolicy(20, 7, seed=4), images, OPTIONS, 130)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a.sum(1) == 130)
    assert len({tuple(row) for row in a.tolist()}) == 6  # per example, not one draw for the batch


def test_softmax_profits_pick_the_same_as_mckp_on_softmax():
    logits = torch.randn(4, 20, 7)
    chosen = mckp.solve(profits_of(logits, "softmax"), OPTIONS, 130)
    assert torch.equal(chosen, mckp.solve(logits.softmax(-1), OPTIONS, 130))


def test_even_start_gives_every_image_the_most_even_allocation():
    """Against brute force: every allocation of C bits over N layers, the smallest sum of squared
    deviations from C/N; the policy's first allocation has it, for every image."""
    import itertools

    from dptq.policy import even_profits
    for n, options, capacity in ((4, [3, 4, 5, 6], 17), (5, [3, 4, 5, 6, 7], 24), (3, [5, 6, 7], 15)):
        best = min(sum((o - capacity / n) ** 2 for o in a)
                   for a in itertools.product(options, repeat=n) if sum(a) == capacity)
        policy = BitPolicy(n, len(options), input_size=16, width=4)
        policy.start_at(even_profits(n, options, capacity))
        assert torch.equal(policy(torch.randn(3, 3, 16, 16)), even_profits(n, options, capacity).expand(3, -1, -1))
        bits = allocate(policy, torch.randn(6, 3, 16, 16), options, capacity)
        assert torch.all(bits.sum(1) == capacity) and len({tuple(row) for row in bits.tolist()}) == 1
        assert ((bits[0] - capacity / n) ** 2).sum().item() == pytest.approx(best)
    # the default start is not even: images get different allocations
    bits = allocate(BitPolicy(20, 7, input_size=16, width=8), torch.randn(6, 3, 16, 16), OPTIONS, 130)
    assert len({tuple(row) for row in bits.tolist()}) > 1


@pytest.mark.parametrize("drops, options, capacity", [
    ([0.0, 5.0, 1.0, 3.0], [3, 4, 5, 6], 17),
    ([2.0, 2.0, 0.0, 7.0, 1.0], [3, 4, 5, 6, 7], 24),   # a tie: the later layer counts as more fragile
    ([0.0, 0.0, 0.0], [5, 6, 7], 17),
    ([1.0, 9.0, 4.0, 4.0, 0.5, 2.0], [3, 5, 8], 31),  # options with gaps
])
def test_greedy_rule_gives_the_lowest_bits_to_the_most_fragile_layers(drops, options, capacity):
    """Brute force: of every allocation that meets the budget exactly, the one whose bits, read
    from the most fragile layer down, are lexicographically smallest."""
    order = fragility_order(drops)
    feasible = [a for a in itertools.product(options, repeat=len(drops)) if sum(a) == capacity]
    expected = min(feasible, key=lambda a: [a[l] for l in order])
    profits = greedy_profits(drops, options)[None]
    got = mckp.bits_of(mckp.solve(profits, options, capacity), options)[0].tolist()
    assert got == list(expected)
    assert profits.abs().max() <= 1


def test_fragility_order_breaks_ties_towards_the_later_layer():
    assert fragility_order([1.0, 3.0, 1.0, 0.0]) == [1, 2, 0, 3]
