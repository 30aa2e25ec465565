"""dptq.deploy, the ONNX Runtime adapter: export against torch, ConvInteger against hand-computed
integers, node names and exclusion, and its errors."""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from dptq import deploy
from small_nets import images

torch.set_num_threads(1)
SIZE = 16


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


