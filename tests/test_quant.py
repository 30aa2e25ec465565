"""dptq.quant against torch's own fake quantizer, float64 hand formulas and the layer counts of docs/method.md §2.1."""
import gc
import math
import weakref

import timm
import torch
import pytest
from torch import nn

from dptq import quant

torch.set_num_threads(1)


@pytest.mark.parametrize("arch,expected", [("resnet18", 20), ("mobilenetv4_conv_medium", 77), ("regnetx_016", 59)])
def test_layer_counts_of_the_paper_networks(arch, expected):
    model = timm.create_model(arch, num_classes=10)
    layers = quant.quantizable_layers(model, image_size=32)
    assert len(layers) == expected
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first not in layers  # the stem sees the raw image
    assert layers[-1] is model.get_classifier()


@pytest.mark.parametrize("arch", ["efficientnet_b0", "convnext_atto"])
def test_any_timm_cnn_runs_quantized(arch):
    model = timm.create_model(arch, num_classes=5).eval()
    q = quant.DynamicQuant(model, image_size=32)
    assert q.num_layers > 10
    x = torch.randn(2, 3, 32, 32)
    out = q(x, torch.full((2, q.num_layers), 8.0))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_layer_order_is_execution_order():
    class Backwards(nn.Module):  # defined in one order, run in the other
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Conv2d(4, 4, 1)
            self.stem = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    model = Backwards()
    assert quant.quantizable_layers(model, image_size=4) == [model.body, model.head]


def test_weight_quant_matches_hand_formula():
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    for bits in (4, 8, 16):
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().max() / qmax
        expected = scale * torch.clamp(torch.round(w / scale), -qmax, qmax)
        assert torch.allclose(quant.fake_quant_weight(w, bits), expected, atol=1e-12, rtol=0)
    w.requires_grad_(True)
    quant.fake_quant_weight(w, 4).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))  # straight-through


def test_weight_quant_never_needs_its_clamp_where_it_is_skipped():
    """Weights at and next to ±max|w| over many magnitudes: the clamp-free float32 path gives
    the clamped formula's values exactly; bf16, where the clamp can act, keeps it."""
    gen = torch.Generator().manual_seed(1)
    for bits in (2, 8, 16):
        qmax = 2 ** (bits - 1) - 1
        for magnitude in (1e-6, 1e-3, 0.37, 1.0, 3e4):
            w = torch.randn(4096, generator=gen) * magnitude
            top = w.abs().max()
            w[:6] = torch.stack([top, -top, torch.nextafter(top, torch.tensor(0.0)), -torch.nextafter(top, torch.tensor(0.0)),
                                 top * (1 - 0.5 / qmax), -top * (1 - 0.5 / qmax)])
            scale = top / qmax
            assert torch.equal(quant.fake_quant_weight(w, bits), (w / scale).round().clamp(-qmax, qmax) * scale)
    w = torch.tensor([1.4140625, -1.4140625, 0.5], dtype=torch.bfloat16)  # w / s rounds to ±128 in bf16
    scale = w.abs().max() / 127
    assert (w / scale).round().abs().max() == 128
    assert torch.equal(quant.fake_quant_weight(w, 8), (w / scale).round().clamp(-127, 127) * scale)


def test_a_kernel_window_quantized_alone_equals_the_window_of_the_whole_weight():
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    whole = quant.fake_quant_weight(w, 8)[:, :, 1:2, 1:2]
    part = quant.fake_quant_weight(w[:, :, 1:2, 1:2], 8, scale_of=w)
    assert torch.equal(part, whole)
    grad = torch.randn_like(part)
    g_whole, = torch.autograd.grad(whole, w, grad)
    g_part, = torch.autograd.grad(part, w, grad)
    assert torch.equal(g_part, g_whole)


def activation_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 6, 6, generator=gen) * torch.tensor([0.1, 1, 3, 10, 1, 1, 1]).view(-1, 1, 1, 1)
    x[4] = x[4].relu()  # non-negative (post-ReLU), zero point 0
    x[5] = 0.0  # dead layer
    x[6] = 0.7  # constant
    return x


def test_activation_matches_torch_fake_quantize_per_example():
    x = activation_batch()
    bits = torch.tensor([3.0, 4, 5, 6, 8, 10, 2])
    y = quant.fake_quant_activation(x, bits)
    for i in range(len(x)):
        lo, hi = min(x[i].min(), 0), max(x[i].max(), 0)
        levels = 2 ** int(bits[i]) - 1
        scale = (hi - lo) / levels if hi > lo else torch.tensor(1.0)  # ONNX Runtime's empty range
        zero_point = int(torch.round(-lo / scale))
        expected = torch.fake_quantize_per_tensor_affine(x[i], float(scale), zero_point, 0, levels)
        assert torch.allclose(y[i], expected, atol=2e-6 * float(scale) + 1e-12, rtol=0), i


def test_activation_matches_float64_formula():
    x = activation_batch().double()
    bits = torch.tensor([3.0, 4, 5, 6, 8, 10, 2], dtype=torch.float64)
    y = quant.fake_quant_activation(x, bits).double()
    for i in range(len(x)):
        lo, hi = min(x[i].min().item(), 0.0), max(x[i].max().item(), 0.0)
        levels = 2 ** int(bits[i]) - 1
        s = (hi - lo) / levels if hi > lo else 1.0  # ONNX Runtime's empty range
        z = round(-lo / s)
        expected = s * (torch.clamp(torch.round(x[i] / s) + z, 0, levels) - z)
        assert torch.allclose(y[i], expected, atol=1e-9 * s, rtol=0), i


@pytest.mark.parametrize("rounding", quant.ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_gives_the_training_paths_values(rounding, dtype):
    """Without autograd the quantizer skips the masks a backward needs; the values must not move."""
    x = activation_batch().to(dtype)
    bits = torch.tensor([3.0, 4, 5, 6, 8, 10, 2])
    trained = quant.fake_quant_activation(x.clone().requires_grad_(True), bits, rounding=rounding)
    with torch.no_grad():
        inferred = quant.fake_quant_activation(x, bits, rounding=rounding)
    assert trained.requires_grad and not inferred.requires_grad
    assert trained.dtype == inferred.dtype == dtype
    assert torch.equal(trained.detach(), inferred)


def test_degenerate_examples_are_finite_and_zero_stays_zero():
    x = torch.zeros(3, 2, 4, 4)
    x[1] = 2.5
    x[2] = -1.0
    x.requires_grad_(True)
    bits = torch.tensor([4.0, 4.0, 4.0], requires_grad=True)
    y = quant.fake_quant_activation(x, bits)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.allclose(y[1], x[1].detach()) and torch.allclose(y[2], x[2].detach())
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bits.grad).all()


def test_gradient_reaches_bits_through_the_scale_lsq_form():
    """d x̂/d b = (round(x/s) - x/s) · ds/db inside the range, ds/db = -(hi-lo) 2^b ln2 / (2^b-1)^2."""
    x = torch.tensor([[0.0, 0.33, 0.71, 1.0, -0.4]], dtype=torch.float64)
    bits = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    quant.fake_quant_activation(x, bits).sum().backward()
    lo, hi, b = -0.4, 1.0, 3.0
    s = (hi - lo) / (2 ** b - 1)
    z = round(-lo / s)
    ds_db = -(hi - lo) * 2 ** b * torch.log(torch.tensor(2.0, dtype=torch.float64)) / (2 ** b - 1) ** 2
    v = x / s + z
    q = torch.clamp(torch.round(v), 0, 2 ** b - 1)
    dxhat_ds = torch.where((torch.round(v) >= 0) & (torch.round(v) <= 2 ** b - 1), (q - z) - x / s, q - z)
    assert torch.allclose(bits.grad, (dxhat_ds.sum() * ds_db).reshape(1), atol=1e-6)


def test_percentile_scale_clamps_outliers():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 10000, generator=gen, dtype=torch.float64)
    x[:, 0] = 100.0  # one outlier per example
    lo, hi = quant.activation_range(x, "percentile", 99.0)
    ref_hi = torch.quantile(x, 0.99, dim=1, interpolation="nearest")
    assert torch.allclose(hi, ref_hi, atol=2e-4)
    assert torch.all(lo == 0)
    y = quant.fake_quant_activation(x, torch.tensor([8.0, 8.0]), "percentile", 99.0)
    assert y.max() <= hi.max() + 1e-6  # the outlier is clamped to the range
    minmax = quant.fake_quant_activation(x, torch.tensor([8.0, 8.0]))
    inliers = x < 1
    assert (y - x)[inliers].abs().mean() < (minmax - x)[inliers].abs().mean() / 10


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def test_dynamic_quant_matches_a_hand_built_quantized_forward():
    net = tiny_net()
    q = quant.DynamicQuant(net, weight_bits=8, image_size=8)
    assert q.layers == [net[2], net[6]]
    x = torch.randn(5, 3, 8, 8)
    bits = torch.randint(2, 9, (5, 2)).float()
    wq = {i: quant.fake_quant_weight(net[i].weight, 8) for i in (0, 2, 6)}
    h = torch.relu(nn.functional.conv2d(x, wq[0], net[0].bias, padding=1))
    h = torch.relu(nn.functional.conv2d(quant.fake_quant_activation(h, bits[:, 0]), wq[2], net[2].bias, padding=1))
    h = h.mean((2, 3))
    expected = nn.functional.linear(quant.fake_quant_activation(h, bits[:, 1]), wq[6], net[6].bias)
    assert torch.allclose(q(x, bits), expected, atol=1e-6)
    # a layer mask quantizes only the chosen inputs; the model itself stays full precision
    h = torch.relu(nn.functional.conv2d(x, wq[0], net[0].bias, padding=1))
    h = torch.relu(nn.functional.conv2d(h, wq[2], net[2].bias, padding=1)).mean((2, 3))
    only_last = nn.functional.linear(quant.fake_quant_activation(h, bits[:, 1]), wq[6], net[6].bias)
    assert torch.allclose(q(x, bits, mask=[False, True]), only_last, atol=1e-6)
    assert torch.equal(q.model(x), net(x))
    assert torch.equal(net[0].weight, tiny_net()[0].weight)  # weights never overwritten


def test_log_spread_matches_float64_hand_values():
    """ln((max(x, 0) - min(x, 0)) / sqrt(mean x²)) per example; an all-zero example gives 0, not 0/0."""
    x = torch.tensor([[[1.0, -2.0], [0.5, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 4.0], [1.0, 1.0]]])
    spread = quant.log_spread(x)
    assert spread.dtype == torch.float32
    assert spread.tolist() == pytest.approx([math.log(5.0 / math.sqrt(14.25 / 4)), 0.0, math.log(4.0 / math.sqrt(22.0 / 4))],
                                            rel=1e-6)
    assert quant.log_spread(torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.float32  # bf16 in float32
    x64 = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(quant.log_spread, (x64,))


def test_dynamic_quant_reports_each_quantized_layers_spread_without_changing_the_logits():
    net = tiny_net()
    q = quant.DynamicQuant(net, weight_bits=8, image_size=8)
    x, bits = torch.randn(5, 3, 8, 8), torch.randint(2, 9, (5, 2)).float()
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]), prepend=True) for layer in q.layers]
    spreads = []
    assert torch.equal(q(x, bits, spreads=spreads), q(x, bits))
    assert len(spreads) == 2 and all(torch.equal(s, quant.log_spread(i)) for s, i in zip(spreads, inputs[:2]))
    masked = []
    q(x, bits, mask=[False, True], spreads=masked)
    assert len(masked) == 1 and torch.equal(masked[0], quant.log_spread(inputs[-1]))  # only quantized layers report
    for hook in hooks:
        hook.remove()


def test_examples_are_independent_in_a_batch():
    net = timm.create_model("resnet18", num_classes=4).eval()
    q = quant.DynamicQuant(net, image_size=16)
    x = torch.randn(3, 3, 16, 16)
    bits = torch.randint(3, 11, (3, q.num_layers)).float()
    batched = q(x, bits)
    for i in range(3):
        assert torch.allclose(batched[i], q(x[i:i + 1], bits[i:i + 1])[0], atol=1e-5)


def test_gradients_reach_bits_and_weights():
    net = tiny_net().train()
    q = quant.DynamicQuant(net, image_size=8)
    bits = torch.full((2, 2), 4.0, requires_grad=True)
    q(torch.randn(2, 3, 8, 8), bits).square().sum().backward()
    assert bits.grad is not None and bits.grad.abs().sum() > 0
    assert net[0].weight.grad is not None and net[6].weight.grad.abs().sum() > 0


def test_bad_bits_shape_is_refused():
    q = quant.DynamicQuant(tiny_net(), image_size=8)
    with pytest.raises(ValueError, match=r"N=2"):
        q(torch.randn(2, 3, 8, 8), torch.ones(2, 3))


def test_a_dropped_quantizer_frees_its_network_without_the_garbage_collector():
    """A job that evaluates one network after another must not keep them all (the evaluate job
    held every pair of its arch this way): no reference cycle through the hooks."""
    gc.disable()
    try:
        net = tiny_net()
        q = quant.DynamicQuant(net, image_size=8)
        with torch.no_grad():
            q(torch.randn(2, 3, 8, 8), torch.full((2, 2), 6.0))
        freed = weakref.ref(net)
        del net, q
        assert freed() is None
    finally:
        gc.enable()


def test_cached_weights_follow_updates():
    """Under no_grad the quantized weights are cached, and refreshed after an in-place update."""
    net = tiny_net()
    q = quant.DynamicQuant(net, weight_bits=4, image_size=8)
    x, bits = torch.randn(2, 3, 8, 8), torch.full((2, 2), 6.0)
    with torch.no_grad():
        first = q(x, bits)
        assert torch.equal(first, q(x, bits))
        net[0].weight.mul_(2.0)
        second = q(x, bits)
    with torch.enable_grad():
        assert torch.allclose(second, q(x, bits), atol=1e-6)
    assert not torch.allclose(first, second)
    net.load_state_dict(tiny_net().state_dict())
    with torch.no_grad():
        assert torch.allclose(q(x, bits), first, atol=1e-6)


def test_batch_rule_takes_one_range_over_the_whole_tensor():
    x = activation_batch().double()
    lo, hi = quant.activation_range(x, "batch")
    assert lo.shape == hi.shape == (len(x),)
    assert torch.all(lo == min(x.min().item(), 0.0)) and torch.all(hi == max(x.max().item(), 0.0))
    bits = torch.tensor([3.0, 4, 5, 6, 8, 10, 2], dtype=torch.float64)
    y = quant.fake_quant_activation(x, bits, "batch")
    for i in range(len(x)):
        levels = 2 ** int(bits[i]) - 1
        s = (hi[0].item() - lo[0].item()) / levels
        z = round(-lo[0].item() / s)
        expected = s * (torch.clamp(torch.round(x[i] / s) + z, 0, levels) - z)
        assert torch.allclose(y[i], expected, atol=1e-9 * s, rtol=0), i
    positive = x[4:5]  # post-ReLU alone: lo = 0, as the runtime's [min(x, 0), max(x, 0)]
    assert quant.activation_range(positive, "batch")[0].item() == 0.0


def test_batch_of_one_equals_minmax_and_one_example_sets_the_others_quantization():
    net = tiny_net()
    x = torch.randn(4, 3, 8, 8)
    bits = torch.full((4, 2), 4.0)
    minmax, batch = (quant.DynamicQuant(net, scale_rule=rule, image_size=8) for rule in ("minmax", "batch"))
    for i in range(len(x)):
        assert torch.equal(batch(x[i:i + 1], bits[:1]), minmax(x[i:i + 1], bits[:1]))
    loud = x.clone()
    loud[0] *= 20.0  # one batch-mate with a much larger range
    assert torch.equal(minmax(loud, bits)[1:], minmax(x, bits)[1:])
    assert not torch.allclose(batch(loud, bits)[1:], batch(x, bits)[1:])


def test_range_grad_carries_the_batch_mates_loss_to_the_input_that_sets_the_range():
    net = tiny_net()
    x = torch.randn(4, 3, 8, 8)
    x[0] *= 5.0  # example 0 sets the batch's ranges
    bits = torch.full((4, 2), 4.0)
    grads = []
    for range_grad in (False, True):
        q = quant.DynamicQuant(net, scale_rule="batch", image_size=8, range_grad=range_grad)
        xg = x.clone().requires_grad_(True)
        q(xg, bits)[1:].square().sum().backward()  # the loss of the others only
        grads.append(xg.grad[0])
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))
    assert grads[1].abs().sum() > 0
    with torch.no_grad():  # the forward is the same either way
        same = [quant.DynamicQuant(net, scale_rule="batch", image_size=8, range_grad=g)(x, bits) for g in (False, True)]
    assert torch.equal(*same)


def test_unknown_scale_rule_names_the_known_ones():
    with pytest.raises(ValueError, match="'minmax', 'percentile' or 'batch'"):
        quant.activation_range(torch.zeros(2, 3), "absmax")


def _textbook_fake_quant(x, bits, scale_rule, range_grad):
    """The quantizer composed from plain autograd ops: straight-through rounding, the clamp's mask,
    s = (hi - lo) / (2^b - 1) (1 on an empty range) and z = round(-lo / s) held constant."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    dims = tuple(range(1, x.dim()))
    if scale_rule == "batch":
        lo, hi = x.amin().expand(x.shape[0]), x.amax().expand(x.shape[0])
    else:
        lo, hi = x.amin(dims), x.amax(dims)
    if not range_grad:
        lo, hi = lo.detach(), hi.detach()
    levels = (torch.exp2(bits) - 1).reshape(shape)
    span = (hi.clamp(min=0) - lo.clamp(max=0)).reshape(shape)
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    zero = torch.round(-lo.clamp(max=0).reshape(shape) / scale).detach()
    exact = x / scale + zero
    q = exact + (torch.round(x / scale) + zero - exact).detach()
    inside = ((q >= 0) & (q <= levels)).detach()
    clamped = torch.where(inside, q, torch.minimum(q.clamp(min=0), levels).detach())
    return scale * (clamped - zero)


@pytest.mark.parametrize("scale_rule, range_grad", [("minmax", False), ("batch", True), ("batch", False)])
def test_fused_backward_equals_autograd_through_the_textbook_quantizer(scale_rule, range_grad):
    """The one-node backward (to x, to the bits and, with ``range_grad``, through the range) against
    autograd through the composition of plain ops, float64, with an all-zero example among them."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 0.0, 3.0, 0.2], dtype=torch.float64).view(-1, 1, 1, 1)
    bits = torch.tensor([3.0, 4.0, 5.0, 8.0], dtype=torch.float64)
    upstream = torch.randn_like(x)
    grads = []
    for fn in (lambda a, b: quant.fake_quant_activation(a, b, scale_rule, range_grad=range_grad, rounding="onnx"),
               lambda a, b: _textbook_fake_quant(a, b, scale_rule, range_grad)):
        xa, ba = x.clone().requires_grad_(True), bits.clone().requires_grad_(True)
        out = fn(xa, ba)
        out.backward(upstream)
        grads.append((out.detach(), xa.grad, ba.grad))
    (out, gx, gb), (ref_out, ref_gx, ref_gb) = grads
    assert torch.equal(out, ref_out)
    assert torch.allclose(gx, ref_gx, rtol=0, atol=1e-12)
    assert torch.allclose(gb, ref_gb, rtol=1e-12, atol=1e-12)
    assert gb[1] == 0 and (gb[[0, 2, 3]] != 0).all()  # the all-zero example's output moves with no scale
