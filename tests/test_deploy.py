"""dptq.deploy against torch, an integer emulation of ConvInteger, and the like-for-like simulator."""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn import functional as F

from dptq import deploy, models
from dptq.data import normalize

torch.set_num_threads(1)
SIZE = 16


class Tiny(nn.Module):
    """Conv-BN-ReLU, Conv-BatchNormAct2d (stride 2), a residual Conv-BN-ReLU, a BN no conv feeds, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), BatchNormAct2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.bn4 = nn.BatchNorm2d(16)  # reads a sum: nothing to fold into
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = self.bn4(F.relu(self.bn3(self.conv3(y))) + y)
        return self.fc(y.mean((2, 3)))


def with_running_stats(model: nn.Module, size: int) -> nn.Module:
    """Non-trivial BN running statistics from a few train-mode passes, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size) * 1.5 + 0.3)
    return model.eval()


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return normalize(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return with_running_stats(Tiny(), SIZE)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """timm's resnet18 at 32 px and its export (its zero-initialised last BNs make equal folded weights)."""
    torch.manual_seed(0)
    model = with_running_stats(models.create("resnet18", 10), 32)
    return model, deploy.export(model, 32, tmp_path_factory.mktemp("r18") / "fp32.onnx")


def test_export_equals_torch(tiny, resnet, tmp_path):
    tiny.train()
    path = deploy.export(tiny, SIZE, tmp_path / "a" / "tiny.onnx")
    assert tiny.training  # mode restored
    tiny.eval()
    for model, file, size in ((tiny, path, SIZE), resnet + (32,)):
        ops = Counter(n.op_type for n in onnx.load(file).graph.node)
        assert ops["BatchNormalization"] == (model is tiny)  # every BN folded, but tiny's bn4
        session = deploy.Session(file)
        for batch in (1, 5):
            x = images(batch, size)
            with torch.no_grad():
                expected = model(x)
            assert (session(x, batch) - expected).abs().max() <= 1e-4


def test_fold_batchnorm_equals_model(tiny, resnet):
    class Shared(nn.Module):  # the conv output also feeds the sum: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    shared = with_running_stats(Shared(), 8)
    for model, size in ((tiny, SIZE), (resnet[0], 32), (shared, 8)):
        folded = deploy.fold_batchnorm(model, image_size=size)
        assert not folded.training and model is not folded
        x = images(32, size)
        with torch.no_grad():
            assert (folded(x) - model(x)).abs().max() <= 1e-5
    kinds = [type(m).__name__ for m in deploy.fold_batchnorm(tiny, image_size=SIZE).modules()]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("_DropAct") == 1  # bn4 stays, bn2's act kept
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deploy.fold_batchnorm(resnet[0], image_size=32).modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deploy.fold_batchnorm(shared, image_size=8).modules()) == 1


def test_fold_is_the_exporters_fold_bit_for_bit(resnet):
    model, path = resnet
    folded = dict(deploy.fold_batchnorm(model, image_size=32).named_modules())
    graph = onnx.load(path).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for name, node in deploy.node_names(model, path, 32).items():
        if nodes[node].op_type == "Conv":
            assert torch.equal(inits[nodes[node].input[1]], folded[name].weight.detach()), name
            assert torch.equal(inits[nodes[node].input[2]], folded[name].bias.detach()), name


def test_conv_integer_equals_integer_emulation(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    fp32 = deploy.export(conv, 8, tmp_path / "conv.onnx")
    qpath = deploy.quantize(fp32, tmp_path / "conv.q.onnx")
    graph = onnx.load(qpath).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (node,) = [n for n in graph.node if n.op_type == "ConvInteger"]
    qw, w_zp = inits[node.input[1]], inits[node.input[3]]
    sw = inits[node.input[1].removesuffix("_quantized") + "_scale"]
    # the weights as documented: symmetric per tensor, s = max|w| / 127, round half to even, zp 0
    w = conv.weight.detach().numpy()
    assert qw.dtype == np.int8 and w_zp == 0 and sw == np.float32(np.abs(w).max() / 127)
    np.testing.assert_array_equal(qw, np.clip(np.rint(w / sw), -127, 127))

    x = (torch.randn(2, 3, 8, 8) * 1.5 + 0.3).numpy()
    # DynamicQuantizeLinear by the ONNX spec, in float32, over the whole tensor
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    sx = (hi - lo) / np.float32(255)
    zx = np.clip(np.rint(-lo / sx), 0, 255)
    qx = np.clip(np.rint(x / sx) + zx, 0, 255)
    # exact integer convolution (float64 holds these sums exactly), zero padding of q - z
    acc = F.conv2d(torch.from_numpy(qx - zx).double(), torch.from_numpy(qw.astype(np.float64)), padding=1).numpy()
    assert np.abs(acc).max() < 2 ** 31 and np.array_equal(acc, np.round(acc))
    expected = acc.astype(np.int32).astype(np.float32) * (sx * sw) + conv.bias.detach().numpy().reshape(1, -1, 1, 1)
    got = deploy.Session(qpath)(torch.from_numpy(x), 2).numpy()
    np.testing.assert_array_equal(got, expected)  # bit for bit: the graph's Cast, Mul(s_x·s_w), Add(bias)


def test_simulator_agrees_with_runtime_at_batch_1(tiny, tmp_path):
    fp32 = deploy.export(tiny, SIZE, tmp_path / "tiny.onnx")
    first = deploy.node_names(tiny, fp32, SIZE)["conv1"]
    qpath = deploy.quantize(fp32, tmp_path / "tiny.q.onnx", exclude=[first])
    x = images(64, SIZE, seed=2)
    runtime = deploy.Session(qpath)(x, 1)
    sim = deploy.simulator_like_runtime(tiny, SIZE)
    with torch.no_grad():
        simulated = sim(x, torch.full((len(x), sim.num_layers), 8))
    stats = deploy.agreement(simulated, runtime)
    print(f"simulator vs ORT at batch 1: {stats}")
    assert stats["top1_agreement"] >= 99 and stats["median_abs_dlogit"] <= 1e-5
    # a served batch shares one range per layer: the same examples at batch 16 come out otherwise
    assert deploy.agreement(deploy.Session(qpath)(x, 16), runtime)["max_abs_dlogit"] > 1e-6


def test_node_names_drive_nodes_to_exclude(resnet, tiny, tmp_path):
    model, path = resnet
    names = deploy.node_names(model, path, 32)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(names) == sorted(layers) and list(names.values()) == deploy.quantizable_nodes(path)
    assert len(names) == 21

    def ops(file):
        graph = onnx.load(file).graph
        return Counter(n.op_type for n in graph.node), {n.name for n in graph.node if n.op_type == "Conv"}

    counts, float_convs = ops(deploy.quantize(path, tmp_path / "all.onnx"))
    assert (counts["ConvInteger"], counts["MatMulInteger"], counts["Conv"]) == (20, 1, 0)  # the Gemm too
    exclude = [names["conv1"], names["layer2.0.downsample.0"], names["fc"]]
    counts, float_convs = ops(deploy.quantize(path, tmp_path / "some.onnx", exclude=exclude))
    assert (counts["ConvInteger"], counts["MatMulInteger"], counts["MatMul"]) == (18, 0, 1)
    assert float_convs == set(exclude[:2])
    with pytest.raises(ValueError, match="not nodes of"):
        deploy.quantize(path, tmp_path / "bad.onnx", exclude=["/no/such/Conv"])
    with pytest.raises(ValueError, match="Conv2d/Linear"):
        deploy.node_names(tiny, path, 32)


def test_export_error_names_the_model(tmp_path):
    class Bessel(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)  # no ONNX op at opset 17

    with pytest.raises(deploy.ExportError) as info:
        deploy.export(Bessel(), 8, tmp_path / "b.onnx")
    message = str(info.value)
    assert "Bessel" in message and "\n" not in message and info.value.__cause__ is not None
    assert not list(tmp_path.iterdir())  # no partial file left


def test_cpu_features_are_flat():
    features = deploy.cpu_features()
    assert isinstance(features["cpu_model"], str) and isinstance(features["onnxruntime"], str)
    flags = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx", "u8s8_may_saturate")
    assert all(isinstance(features[f], bool) for f in flags)
    assert not (features["u8s8_may_saturate"] and (features["avx512_vnni"] or features["avx_vnni"]))


def test_integer_emulation_computes_what_the_runtime_computes(tmp_path):
    """The runtime's own arithmetic (integer sums, then one float32 multiply and the bias) in
    torch: at batch 1 it matches ORT to float32 rounding on a small network, closer than the
    float32 simulator; a conv with its own forward is refused by name."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16))
    net.eval()
    fp32 = deploy.export(net, 16, tmp_path / "net.onnx")
    first = next(iter(deploy.node_names(net, fp32, 16).values()))
    session = deploy.Session(deploy.quantize(fp32, tmp_path / "net.int8.onnx", exclude=[first]))
    x = torch.randn(24, 3, 16, 16)
    with torch.no_grad():
        emulated = deploy.integer_emulation(net, 16)(x)
    found = deploy.agreement(emulated, session(x, 1))
    print(found)
    assert found["top1_agreement"] == 100.0 and found["max_abs_dlogit"] <= 1e-5

    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    odd = nn.Sequential(nn.Conv2d(3, 8, 3), PaddedConv(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    odd(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1 \(PaddedConv\) has its own forward"):
        deploy.integer_emulation(odd, 16)
