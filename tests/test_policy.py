"""dptq.policy: shapes, budget met exactly, seeded random policy, gradient into the policy."""
import torch

from dptq import mckp
from dptq.policy import BitPolicy, RandomPolicy, allocate, profits_of

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
