"""dptq.int8's integer emulation against ONNX Runtime beyond the default networks (issue 31):
timm's EfficientNet-B0, MobileNetV3, ConvNeXt-Atto and ViT-Tiny, built at 32 px and briefly
trained on the digits. Layer by layer, given the runtime's own input to a layer, the emulated int32
sums equal the runtime's (deploy.integer_sums exposes them); end to end, the logits agree within
the issue's bars. Which layers run in integers is read from the quantized graph. The u8s8 pair
clipping of MatMulInteger on CPUs without VNNI is checked on its own, against the runtime too.
bench/runtime_agreement.py prints the same figures for all seven networks on more examples."""
import sys
from pathlib import Path

import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from dptq import deploy, graph, int8, mlas, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import runtime_agreement as bench  # noqa: E402

torch.set_num_threads(1)
SIZE, STEPS, EXAMPLES = 32, 20, 32
ARCHS = ("efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224")
CLIPS = deploy.cpu_features()["u8s8_may_saturate"]


@pytest.fixture(scope="module", params=ARCHS)
def network(request, tmp_path_factory):
    """(arch, briefly trained model, its int8 file, torch name -> node of its integer layers)."""
    model = bench.briefly_trained(request.param, SIZE, STEPS)
    path, layers = bench.quantized(model, SIZE, tmp_path_factory.mktemp(request.param))
    return request.param, model, path, layers


@pytest.fixture(scope="module")
def test_images():
    return bench.digits(SIZE, "test")[0][:EXAMPLES]


def test_the_integer_layers_are_read_from_the_quantized_graph(network):
    """Every Conv/Gemm/MatMul with a constant weight but the excluded first one; ViT's attention
    products (two activations) have no weight and stay float in the runtime and in the emulation."""
    arch, model, path, layers = network
    fp32 = path.with_name("fp32.onnx")
    assert list(layers.values()) == deploy.quantizable_nodes(fp32)[1:]
    assert list(layers) == [name for name, _ in graph.execution_order(model, SIZE)[1:]]
    if arch.startswith("vit"):
        import onnx

        float_matmuls = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"]
        assert len(float_matmuls) == 2 * len(model.blocks)  # q·kᵀ and attention·v per block


def test_integer_sums_equal_the_runtimes_layer_by_layer(network, test_images):
    _, model, path, layers = network
    emulation = int8.integer_emulation(model, SIZE, list(layers))
    assert bench.sum_mismatches(emulation, path, layers, test_images[:8]) == []


def test_logits_agree_end_to_end(network, test_images):
    """The issue's bars for the emulation; the float like-for-like simulator's figures beside (printed)."""
    arch, model, path, layers = network
    runtime = deploy.Session(path)(test_images, 1)
    with torch.no_grad():
        emulated = int8.integer_emulation(model, SIZE, list(layers)).eval()(test_images)
        simulator = int8.simulator_like_runtime(model, SIZE)
        simulated = simulator(test_images, torch.full((len(test_images), simulator.num_layers), 8.0))
    found, beside = int8.agreement(emulated, runtime), int8.agreement(simulated, runtime)
    print(f"{arch}: emulation {found}, simulator {beside}")
    assert found["median_abs_dlogit"] <= 1e-5 and found["max_abs_dlogit"] <= 0.5 and found["top1_agreement"] >= 99


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_only_matmul_integer_clips_pairs_to_int16(kind, tmp_path):
    """Inputs around zero (z ≈ 128) and weights near ±127 make pairs of u8·s8 products leave int16:
    the runtime's MatMulInteger sums are the clipped ones where this CPU's kernel clips (and then
    differ from exact sums), its ConvInteger sums are exact on the same values."""
    torch.manual_seed(0)
    if kind == "linear":
        net, x = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 16)), torch.randn(4, 48)
    else:
        net, x = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 16, 1)), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        net[1].weight.uniform_(-1, 1)
    net.eval()
    fp32 = deploy.export(net, 2, tmp_path / "net.onnx") if kind == "conv" else _export_linear(net, tmp_path / "net.onnx")
    path = deploy.quantize(fp32, tmp_path / "net.int8.onnx", exclude=deploy.quantizable_nodes(fp32)[:1])
    ((inputs, sums),) = deploy.integer_sums(path, x).values()
    clipped, exact = (int8._IntegerLayer(net[1], saturate).accumulate(inputs)[0] for saturate in (True, False))
    assert torch.equal(clipped if CLIPS and kind == "linear" else exact, sums.double())
    assert not torch.equal(clipped, exact) if kind == "linear" else torch.equal(clipped, exact)


def _export_linear(net: nn.Module, path: Path) -> Path:
    """``net`` on [b, 48] inputs as ONNX (deploy.export takes images)."""
    torch.onnx.export(net, (torch.zeros(1, 48),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return path


def test_a_fixed_size_arch_is_built_for_the_image_size():
    assert models.size_kwargs("vit_tiny_patch16_224", SIZE) == {"img_size": SIZE}
    assert models.size_kwargs("resnet18", SIZE) == {} and models.size_kwargs("vit_tiny_patch16_224", None) == {}
    with torch.device("meta"):
        vit = models.create("vit_tiny_patch16_224", 10, image_size=SIZE)
    assert vit.patch_embed.img_size == (SIZE, SIZE)


def runtime_node(op: str, x: torch.Tensor, out_shape: list[int] | None = None, **attributes) -> torch.Tensor:
    """ONNX Runtime's own ``op`` on ``x`` (one node, the served session's optimisation)."""
    import onnxruntime as ort

    node = helper.make_node(op, ["x"], ["y"], **attributes)
    graph_ = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or list(x.shape))])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def test_the_float_kernels_are_the_runtimes_bit_for_bit():
    """Sigmoid, HardSigmoid, HardSwish (dptq.mlas) on 10⁵ values spanning the clamps, and
    ReduceMean over H·W at every alignment of a channel's row, equal the runtime's nodes; torch's
    own differ (what the emulation replaces them for)."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 8
    kernels = {"Sigmoid": (mlas.logistic, torch.sigmoid, {}),
               "HardSigmoid": (mlas.hard_sigmoid, nn.functional.hardsigmoid, {"alpha": 1 / 6, "beta": 0.5}),
               "HardSwish": (mlas.KERNELS[nn.Hardswish], nn.functional.hardswish, {})}
    for op, (ours, torchs, attributes) in kernels.items():
        expected = runtime_node(op, x, **attributes)
        assert torch.equal(ours(x), expected), op
        assert not torch.equal(torchs(x), expected), op
    for side in (1, 2, 3, 5, 8, 16):
        maps = torch.rand(1, 40, side, side, generator=torch.Generator().manual_seed(side)) * 6 - 2
        expected = runtime_node("ReduceMean", maps, [1, 40, 1, 1], axes=[2, 3], keepdims=1)
        assert torch.equal(mlas.spatial_mean(maps), expected), side
        assert torch.equal(mlas.spatial_mean(maps.expand(3, -1, -1, -1))[1:2], expected)  # each example as at batch 1
        emulated = mlas.as_runtime_computes(_Squeeze())  # the model's own x.mean((2, 3), keepdim=True)
        assert torch.equal(emulated(maps), expected) and torch.equal(_Squeeze()(maps), maps.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, padding, dilation", [
    (3, 32, 3, 2, 1, 1), (3, 20, 7, 2, 3, 1), (1, 16, 3, 1, 1, 2), (3, 40, 4, 4, 0, 1)])
def test_a_float_stem_is_the_runtimes_bit_for_bit(in_channels, out_channels, kernel, stride, padding, dilation, tmp_path):
    """A float convolution with fewer input channels than MLAS's NCHWc block (the stem the audit
    leaves float) as the runtime computes it, at output widths that are no multiple of the block
    too: mlas.nchw_conv2d and the emulation's module equal the runtime's Conv; torch's differs."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation).eval(), torch.randn(3, in_channels, 17, 17)
    path = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (x[:1],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    expected = deploy.Session(path)(x, 1)
    with torch.no_grad():
        assert torch.equal(mlas.nchw_conv2d(x, conv), expected)
        assert mlas.runs_nchw(conv) and torch.equal(mlas.RuntimeConv(conv)(x), expected)
        assert in_channels == 1 or not torch.equal(conv(x), expected)  # one channel: one FMA chain, as torch sums


class _Squeeze(nn.Module):
    def forward(self, x):
        return x.mean((2, 3), keepdim=True)
