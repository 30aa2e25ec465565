"""dptq.losses against float64 hand-written formulas and gradcheck."""
import math

import pytest
import torch

from dptq.losses import hinge_loss, kd_loss, spread_loss, target_loss

torch.set_num_threads(1)


def softmax_rows(logits, t=1.0):
    rows = []
    for row in logits.tolist():
        e = [math.exp(v / t - max(row) / t) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kd_loss_is_kl_times_t_squared(temperature):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen, dtype=torch.float64)
    ps, pt = softmax_rows(s, temperature), softmax_rows(t, temperature)
    expected = sum(sum(q * math.log(q / p) for p, q in zip(rs, rt)) for rs, rt in zip(ps, pt)) / 6 * temperature ** 2
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def hand_hinge(q_logits, teacher_logits, margin, mode):
    total = 0.0
    for p, tl in zip(softmax_rows(q_logits), teacher_logits.tolist()):
        order = sorted(range(len(tl)), key=lambda i: -tl[i])
        t = order[0]
        if mode == "robust":
            gap = p[t] - p[order[1]]
        else:
            k = max((i for i in range(len(p)) if i != t), key=lambda i: p[i])
            gap = p[k] - p[t]
        total += max(0.0, margin - gap)
    return total / len(q_logits)


@pytest.mark.parametrize("mode", ["robust", "detrimental"])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
def test_hinge_matches_hand_formula(mode, margin):
    gen = torch.Generator().manual_seed(1)
    q, t = torch.randn(16, 7, generator=gen, dtype=torch.float64) * 2, torch.randn(16, 7, generator=gen, dtype=torch.float64)
    assert hinge_loss(q, t, margin, mode).item() == pytest.approx(hand_hinge(q, t, margin, mode), abs=1e-7)


def test_hinge_directions():
    teacher = torch.tensor([[5.0, 1.0, 0.0]])
    confident_right = torch.tensor([[9.0, 0.0, 0.0]])
    confident_wrong = torch.tensor([[0.0, 9.0, 0.0]])
    assert hinge_loss(confident_right, teacher, 0.1, "robust") == 0
    assert hinge_loss(confident_wrong, teacher, 0.1, "robust") > 0.9
    assert hinge_loss(confident_wrong, teacher, 0.1, "detrimental") == 0
    assert hinge_loss(confident_right, teacher, 0.1, "detrimental") > 0.9


def hand_target(q_logits, teacher_logits, target):
    """(mean_i −log softmax(q_i)[τ_i] − target)², τ_i = the teacher's top class."""
    ce = 0.0
    for p, tl in zip(softmax_rows(q_logits), teacher_logits.tolist()):
        ce -= math.log(p[max(range(len(tl)), key=lambda i: tl[i])])
    return (ce / len(q_logits) - target) ** 2


@pytest.mark.parametrize("target", [0.0, 2.5, 5.0])
def test_target_loss_matches_hand_formula(target):
    gen = torch.Generator().manual_seed(3)
    q, t = torch.randn(16, 7, generator=gen, dtype=torch.float64) * 3, torch.randn(16, 7, generator=gen, dtype=torch.float64)
    assert target_loss(q, t, target).item() == pytest.approx(hand_target(q, t, target), rel=1e-10)


def test_target_loss_is_zero_at_the_target_and_pulls_both_ways():
    teacher = torch.tensor([[5.0, 1.0, 0.0]])
    # CE of class 0 for logits [0, a, a] is log(1 + 2 e^a): set a so that CE = 5 exactly
    a = math.log((math.exp(5.0) - 1) / 2)
    at_target = torch.tensor([[0.0, a, a]], dtype=torch.float64)
    assert target_loss(at_target, teacher, 5.0).item() == pytest.approx(0.0, abs=1e-12)
    right = torch.tensor([[9.0, 0.0, 0.0]])   # CE ≈ 2.5e-4: (0.00025 − 5)² ≈ 24.998
    assert target_loss(right, teacher, 5.0).item() == pytest.approx((math.log(1 + 2 * math.exp(-9.0)) - 5.0) ** 2)
    for logits, sign in ((right, 1.0), (torch.tensor([[-20.0, 0.0, 0.0]]), -1.0)):  # CE below 5: raise it; above: lower it
        x = logits.clone().requires_grad_(True)
        target_loss(x, teacher, 5.0).backward()
        assert sign * x.grad[0, 0].item() > 0  # descent moves the teacher's class logit down (up past the target)


def test_spread_loss_matches_hand_formula_and_stops_at_its_target():
    """mean over layers of mean over examples of max(0, ln c − σ): a layer past the target pulls no more."""
    spreads = [torch.tensor([1.0, 2.0, 5.0], requires_grad=True), torch.tensor([4.0, 3.0, 0.5], requires_grad=True)]
    c = math.exp(4.0)
    hand = ((3.0 + 2.0 + 0.0) / 3 + (0.0 + 1.0 + 3.5) / 3) / 2
    loss = spread_loss(spreads, c)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    loss.backward()
    assert spreads[0].grad.tolist() == pytest.approx([-1 / 6, -1 / 6, 0.0])  # past ln c = 4: no gradient
    assert spreads[1].grad.tolist() == pytest.approx([0.0, -1 / 6, -1 / 6])
    with pytest.raises(ValueError, match="no quantized layer"):
        spread_loss([], c)


def test_gradcheck():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 3.0), (s,))
    assert torch.autograd.gradcheck(lambda x: hinge_loss(x, t, 0.9, "robust"), (s,))
    assert torch.autograd.gradcheck(lambda x: hinge_loss(x, t, 0.9, "detrimental"), (s,))
    assert torch.autograd.gradcheck(lambda x: target_loss(x, t, 5.0), (s,))


def test_unknown_mode():
    with pytest.raises(ValueError, match="neutral"):
        hinge_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.1, "neutral")
