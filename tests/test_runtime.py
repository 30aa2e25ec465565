"""dptq.runtime: the one-pixel, the 1x1 and the small-map depthwise convolution rewrites against the
ordinary convolution in float64 (outputs and every gradient), where they apply and where they must not."""
import copy

import pytest
import timm
import torch
from torch import nn

from dptq import runtime
from dptq.quant import DynamicQuant


class Tail(nn.Module):
    """A stem that shrinks the image to ``side`` x ``side``, then the convolution under test."""

    def __init__(self, conv: nn.Conv2d, side: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, conv.in_channels, 3, padding=1), nn.AdaptiveAvgPool2d(side))
        self.conv = conv

    def forward(self, x):
        return self.conv(self.stem(x))


def grads_and_output(model: nn.Module, x: torch.Tensor, params: nn.Module | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model(x)`` and the gradients of ``params`` (default: the model's) of a fixed linear loss."""
    params = model if params is None else params
    params.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in params.parameters()]


def assert_same_outputs_and_grads(plain: nn.Module, folded: nn.Module, x: torch.Tensor, out_tol: float,
                                  grad_rtol: float, grad_atol: float) -> None:
    out, grads = grads_and_output(plain, x)
    out_f, grads_f = grads_and_output(folded, x)
    torch.testing.assert_close(out_f, out, rtol=out_tol, atol=out_tol)
    for g, g_f in zip(grads, grads_f):
        torch.testing.assert_close(g_f, g, rtol=grad_rtol, atol=grad_atol)


# (side of the conv's input, conv, whether the rewrite applies)
CASES = [
    (1, nn.Conv2d(8, 6, 3, padding=1), True),                       # the ResNet last stage at 32 px
    (1, nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), True),  # depthwise 5x5
    (1, nn.Conv2d(8, 6, 3, padding=1, groups=2), True),             # grouped
    (2, nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), True),   # depthwise, bias, 2x2 window
    (2, nn.Conv2d(8, 6, 3, stride=2, padding=1), True),             # stride 2 on a 2x2 map: 1x1 out
    (2, nn.Conv2d(8, 6, 5, stride=2, padding=2), True),
    (1, nn.Conv2d(8, 6, 1), False),                                 # already a matrix product
    (2, nn.Conv2d(8, 6, 2), False),                                 # kernel = input, no padding
    (2, nn.Conv2d(8, 6, 3, padding=1), False),                      # 2x2 out
    (3, nn.Conv2d(8, 6, 3, stride=2, padding=1), False),            # 2x2 out
    (2, nn.Conv2d(8, 6, 3, stride=2, padding=1, padding_mode="reflect"), False),
    (1, nn.Conv2d(8, 6, 3, padding=2, dilation=2), False),
]


@pytest.mark.parametrize("as_products", [False, True])
@pytest.mark.parametrize("side, conv, applies", CASES, ids=[f"side{s}-{c}" for s, c, _ in CASES])
def test_fold_is_exact_where_it_applies(side, conv, applies, as_products):
    torch.manual_seed(0)
    plain = Tail(conv, side).double().to(memory_format=torch.channels_last)
    folded = copy.deepcopy(plain)
    assert runtime.fold_one_pixel_convs(folded, 8, as_products) == int(applies)
    assert isinstance(folded.conv, runtime.OnePixelConv2d) == applies
    if applies:  # a grouped convolution stays a convolution, a depthwise one is a product and a sum
        assert folded.conv.as_product == (as_products and conv.groups in (1, conv.out_channels))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_same_outputs_and_grads(plain, folded, x, 1e-12, 1e-12, 1e-12)
    if applies:  # the taps that never meet a pixel get exactly no gradient
        (ph, pw), (h, w) = conv.padding, folded.conv.input_hw
        dead = torch.ones_like(folded.conv.weight.grad, dtype=torch.bool)
        dead[:, :, ph:ph + h, pw:pw + w] = False
        assert folded.conv.weight.grad[dead].abs().max() == 0


# (side of the conv's input, conv, whether the 1x1 rewrite applies)
POINTWISE_CASES = [
    (1, nn.Conv2d(8, 6, 1), True),                       # MobileNetV4's expansions on its 1x1 maps
    (4, nn.Conv2d(8, 6, 1, bias=False), True),
    (3, nn.Conv2d(8, 6, 1, padding="valid"), True),
    (4, nn.Conv2d(8, 6, 1, stride=2), False),            # a strided 1x1 reads every other pixel
    (4, nn.Conv2d(8, 6, 1, padding=1), False),
    (4, nn.Conv2d(8, 6, 1, groups=2), False),
    (4, nn.Conv2d(8, 6, 3, padding=1), False),
]


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("side, conv, applies", POINTWISE_CASES, ids=[f"side{s}-{c}" for s, c, _ in POINTWISE_CASES])
def test_pointwise_fold_is_exact_where_it_applies(side, conv, applies, memory_format):
    torch.manual_seed(0)
    plain = Tail(conv, side).double().to(memory_format=memory_format)
    folded = copy.deepcopy(plain)
    assert runtime.fold_pointwise_convs(folded) == int(applies)
    assert isinstance(folded.conv, runtime.PointwiseConv2d) == applies
    assert folded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=memory_format)
    assert_same_outputs_and_grads(plain, folded, x, 1e-12, 1e-12, 1e-12)
    if applies:  # the output is a channels_last map, as the next layer's input should be
        assert folded(x).is_contiguous(memory_format=torch.channels_last)


# (side of the conv's input, conv, whether the small-map depthwise rewrite applies)
DEPTHWISE_CASES = [
    (2, nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), True),            # MobileNetV4's 5x5 on 2x2 maps
    (2, nn.Conv2d(8, 8, 3, padding=1, groups=8), True),
    (4, nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False), True),  # 16 pixels, 25 taps
    (3, nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), True),              # 9 pixels, 9 taps
    (1, nn.Conv2d(8, 8, 1, groups=8), True),
    (2, nn.Conv2d(8, 8, (3, 5), stride=(2, 1), padding=(1, 2), groups=8), True),  # a 1x2 output
    (4, nn.Conv2d(8, 8, 3, padding=1, groups=8), False),                       # 16 pixels, 9 taps
    (2, nn.Conv2d(8, 16, 3, padding=1, groups=8), False),                      # two outputs per channel
    (2, nn.Conv2d(8, 8, 3, padding=1, groups=4), False),                       # grouped
    (2, nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), False),
    (2, nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), False),
]


@pytest.mark.parametrize("side, conv, applies", DEPTHWISE_CASES, ids=[f"side{s}-{c}" for s, c, _ in DEPTHWISE_CASES])
def test_small_map_depthwise_fold_is_exact_where_it_applies(side, conv, applies):
    """The output is the convolution's own (bit for bit); the weight gradient equals oneDNN's in float64."""
    torch.manual_seed(0)
    plain = Tail(conv, side).double().to(memory_format=torch.channels_last)
    folded = copy.deepcopy(plain)
    assert runtime.fold_small_map_depthwise_convs(folded, 8) == int(applies)
    assert isinstance(folded.conv, runtime.SmallMapDepthwiseConv2d) == applies
    assert folded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.equal(folded(x), plain(x))
    assert_same_outputs_and_grads(plain, folded, x, 0, 1e-12, 1e-12)


def test_small_map_depthwise_taps_join_each_output_to_its_window():
    """Hand-computed: a 3x3 kernel, stride 2, padding 1 on a 3x3 map gives a 2x2 output; output
    (0, 0) sees input rows and columns 0-1 through taps (1, 1) to (2, 2), output (1, 1) rows and
    columns 1-2 through taps (0, 0) to (1, 1); 9 marks no tap."""
    conv = runtime.SmallMapDepthwiseConv2d(nn.Conv2d(2, 2, 3, stride=2, padding=1, groups=2), (3, 3))
    taps = conv.taps.view(2, 2, 3, 3)  # [out_h, out_w, in_h, in_w]
    assert taps[0, 0].tolist() == [[4, 5, 9], [7, 8, 9], [9, 9, 9]]
    assert taps[1, 1].tolist() == [[9, 9, 9], [9, 0, 1], [9, 3, 4]]


@pytest.mark.parametrize("as_products", [False, True])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_folded_weight_gradient_arrives_laid_out_like_the_weight(memory_format, as_products):
    """A gradient in another layout than its weight's is copied once more when accumulated."""
    torch.manual_seed(0)
    folded = Tail(nn.Conv2d(8, 6, 3, padding=1), 1).to(memory_format=memory_format)
    runtime.fold_one_pixel_convs(folded, 8, as_products)
    arrived = []
    folded.conv.weight.register_hook(lambda grad: arrived.append(grad.stride()))
    folded(torch.randn(4, 3, 8, 8)).sum().backward()
    assert arrived == [folded.conv.weight.stride()]


@pytest.mark.parametrize("fold", [runtime.fold_one_pixel_convs, runtime.fold_small_map_depthwise_convs])
def test_other_input_sizes_take_the_ordinary_path(fold):
    torch.manual_seed(0)
    plain = Tail(nn.Conv2d(8, 8, 3, padding=1, groups=8), 1).double()
    folded = copy.deepcopy(plain)
    assert fold(folded, 8) == 1
    plain.stem[1].output_size = folded.stem[1].output_size = 3  # now a 3x3 map reaches the conv
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-12, atol=1e-12)
    assert folded(x).shape[-2:] == (3, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv4_conv_medium"])
def test_timm_network_folded_equals_plain_full_precision_and_quantized(arch):
    """At 32 px the last stages see 1x1 and 2x2 maps; with every rewrite, logits, quantized
    logits and gradients agree with the unfolded network in float64, the state dict is untouched."""
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=10).eval()
    folded = copy.deepcopy(plain)
    assert runtime.fold_one_pixel_convs(folded, 32, as_products=True) > 0
    assert runtime.fold_pointwise_convs(folded) == {"resnet18": 0, "mobilenetv4_conv_medium": 45}[arch]
    assert runtime.fold_small_map_depthwise_convs(folded, 32) == {"resnet18": 0, "mobilenetv4_conv_medium": 12}[arch]
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    q_plain, q_folded = DynamicQuant(plain, image_size=32), DynamicQuant(folded, image_size=32)  # probes in float32
    plain.double(), folded.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert_same_outputs_and_grads(plain, folded, x, 1e-10, 1e-9, 1e-10)
    # 16-bit activations: where the two sums' last bits put a value on either side of a rounding
    # boundary, one level moves the logits by about 1e-5 of their range, where at 3 bits a
    # random-init MobileNetV4 carries one such flip to logits 28 apart (seen on an Intel Xeon)
    bits = torch.full((3, q_plain.num_layers), 16.0, dtype=torch.float64)
    torch.testing.assert_close(q_folded(x, bits), q_plain(x, bits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "regnetx_016"])
def test_quantizing_only_the_kernel_window_changes_no_bit(arch, monkeypatch):
    """A quantized pass of a folded network rounds only each one-pixel convolution's window; the
    logits and every gradient are those of rounding the whole weight and then slicing it."""
    from dptq import quant

    torch.manual_seed(0)
    model = runtime.Runtime(0, device="cpu", bf16=True, channels_last=True, threads=1).to_device(
        timm.create_model(arch, num_classes=10), 32)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    q = DynamicQuant(model, image_size=32)
    bits = torch.randint(3, 9, (4, q.num_layers)).float()
    out, grads = grads_and_output(lambda inp: q(inp, bits), x, model)
    with torch.no_grad():  # twice: the inference cache keeps the window too
        inferred = [q(x, bits) for _ in range(2)]
    monkeypatch.setattr(quant, "OnePixelConv2d", type("NoConvIsWindowed", (), {}))
    whole = DynamicQuant(model, image_size=32)  # every weight rounded whole, then sliced by the convolution
    assert not whole._windowed and q._windowed
    out_whole, grads_whole = grads_and_output(lambda inp: whole(inp, bits), x, model)
    assert torch.equal(out, out_whole) and all(torch.equal(y, out_whole) for y in inferred)
    assert all(torch.equal(g, g_whole) for g, g_whole in zip(grads, grads_whole))


def cpu_runtime(seed: int = 0, channels_last: bool = True) -> runtime.Runtime:
    return runtime.Runtime(seed, device="cpu", bf16=True, channels_last=channels_last, threads=1)


def test_to_device_folds_for_the_given_image_size():
    rt = cpu_runtime()
    model = rt.to_device(timm.create_model("resnet18", num_classes=10), 32)
    assert any(isinstance(m, runtime.OnePixelConv2d) for m in model.modules())
    assert isinstance(copy.deepcopy(model).layer4[1].conv1, runtime.OnePixelConv2d)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model = rt.to_device(timm.create_model("resnet18", num_classes=10), 224)  # the last stage sees 7x7: nothing to fold
    assert not any(isinstance(m, runtime.OnePixelConv2d) for m in model.modules())


@pytest.mark.parametrize("channels_last", [True, False])
def test_to_device_computes_convolutions_as_products_only_in_channels_last(channels_last):
    """Only channels_last memory holds a 1x1 convolution's rows (B·H·W, C) as one matrix."""
    rt = cpu_runtime(channels_last=channels_last)
    model = rt.to_device(timm.create_model("resnet50", num_classes=10), 32)
    assert sum(isinstance(m, runtime.PointwiseConv2d) for m in model.modules()) == (33 if channels_last else 0)
    one_pixel = [m for m in model.modules() if isinstance(m, runtime.OnePixelConv2d)]
    assert len(one_pixel) == 3 and all(m.as_product == channels_last for m in one_pixel)
    model = rt.to_device(timm.create_model("mobilenetv4_conv_medium", num_classes=10), 32)
    assert sum(isinstance(m, runtime.SmallMapDepthwiseConv2d) for m in model.modules()) == (12 if channels_last else 0)


def test_runtime_device_memory_format_autocast_and_seed():
    assert cpu_runtime().memory_format == torch.channels_last
    rt = cpu_runtime(7, channels_last=False)
    assert rt.dev == torch.device("cpu") and rt.seed == 7 and torch.get_num_threads() == 1
    assert rt.memory_format == torch.contiguous_format
    with rt.autocast():  # bf16 is asked for, but CPU runs stay exact
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    first = torch.rand(3)  # starting a runtime seeds torch's RNG with the job's seed
    cpu_runtime(7)
    assert torch.equal(torch.rand(3), first) and not torch.equal(torch.rand(3), first)
    auto = runtime.Runtime(0, device="auto", bf16=False, channels_last=True, threads=1)
    assert auto.dev.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused():
    with pytest.raises(RuntimeError, match="runtime.device: 'cuda'.*no CUDA device"):
        runtime.Runtime(0, device="cuda", bf16=True, channels_last=True, threads=1)
