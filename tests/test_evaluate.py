"""dptq.evaluate: the seeded random policy and transitory points by hand (the end-to-end run of
evaluate_arch is in test_analysis.py; the tables' rules are in test_tables.py)."""
import pytest
import torch

from dptq import evaluate

torch.set_num_threads(1)


def test_random_policy_is_seeded_afresh():
    images = torch.zeros(4, 3, 8, 8)
    first = evaluate.random_policy(5, 3, seed=2)(images)
    assert first.shape == (4, 5, 3) and ((first >= 0) & (first < 1)).all()
    torch.manual_seed(123)  # whatever ran before
    assert torch.equal(evaluate.random_policy(5, 3, seed=2)(images), first)
    assert not torch.equal(evaluate.random_policy(5, 3, seed=3)(images), first)


def test_transitory_points_by_hand():
    fp_r = [1, 1, 1, 0, 1, 1, 0, 1]
    fp_d = [1, 1, 0, 1, 1, 1, 0, 1]
    q_d = [0, 1, 0, 0, 0, 1, 0, 1]
    # both FP right and Q_D wrong: examples 0 and 4 -> 2 of 8
    assert evaluate.transitory_pct(torch.tensor(fp_r).bool(), torch.tensor(fp_d).bool(), torch.tensor(q_d).bool()) == 25.0
    assert evaluate.transitory_pct([True] * 4, [True] * 4, [True] * 4) == 0.0
    with pytest.raises(ValueError, match="one length"):
        evaluate.transitory_pct([True], [True, False], [True])
