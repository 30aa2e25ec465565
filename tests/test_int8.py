"""dptq.int8, ONNX Runtime's arithmetic in torch, against the runtime itself: the quantization
parameters (dptq.quant's one definition) against the DynamicQuantizeLinear kernel and
quantize_dynamic's weights, the BatchNorm fold against the exporter's, the like-for-like simulator
and the integer emulation against a session, an all-zero layer input through every one of them."""
import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp
from torch import nn

from dptq import coupling, deploy, int8, quant
from small_nets import SIZE, images, with_running_stats

torch.set_num_threads(1)


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """ONNX Runtime's own DynamicQuantizeLinear on ``x``: (q, scale, zero point)."""
    import onnxruntime as ort

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, list(x.shape)),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, s, z = session.run(None, {"x": x})
    return q, float(s), int(z)


@pytest.mark.parametrize("kind", ["zeros", "positive", "negative", "mixed", "constant", "tiny"])
def test_activation_qparams_are_the_runtimes(kind):
    gen = torch.Generator().manual_seed(3)
    x = {"zeros": torch.zeros(2, 3, 4, 4), "positive": torch.rand(2, 3, 4, 4, generator=gen) * 7,
         "negative": -torch.rand(2, 3, 4, 4, generator=gen), "mixed": torch.randn(2, 3, 4, 4, generator=gen) * 3,
         "constant": torch.full((2, 3, 4, 4), 0.7), "tiny": torch.randn(2, 3, 4, 4, generator=gen) * 1e-30}[kind]
    q_rt, s_rt, z_rt = dynamic_quantize_linear(x.numpy())
    lo, hi = quant.activation_range(x, "batch")
    levels = torch.tensor(255.0)
    scale, zero = quant.activation_qparams(lo[:1], hi[:1], levels)
    assert (float(scale), int(zero)) == (s_rt, z_rt)
    assert np.array_equal(quant.quantize_affine(x, scale, zero, levels).numpy(), q_rt.astype(np.float32))
    # the fake quant dequantizes those very integers
    expected = (torch.from_numpy(q_rt.astype(np.float32)) - zero) * scale
    assert torch.equal(quant.fake_quant_activation(x, torch.full((2,), 8.0), "batch", rounding="onnx"), expected)


@pytest.mark.parametrize("scale_of", [0.0, 1e-45, 1e-20, 0.37, 3e4])
def test_weight_scale_is_quantize_dynamics(scale_of):
    w = torch.randn(64, generator=torch.Generator().manual_seed(0)) * scale_of
    _, expected = compute_scale_zp(w.numpy().min(), w.numpy().max(), np.int8(-127), np.int8(127), symmetric=True)
    assert float(quant.weight_scale(w, 127)) == float(np.float32(expected))


class Dead(nn.Module):
    """Conv, ReLU, Conv, ReLU, pool, Linear; both biases so negative that an all-zero image leaves
    both quantized layers an all-zero input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)
        with torch.no_grad():
            self.conv1.bias.fill_(-1.0)
            self.conv2.bias.fill_(-0.5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_an_all_zero_layer_input_is_finite_and_equal_everywhere(tmp_path):
    """One example's all-zero input, and a whole batch of them, through the simulator, the integer
    emulation, the coupling runner and ONNX Runtime at batch 1 and batch n: finite, and the dead
    example's logits are the head's bias in every one."""
    torch.manual_seed(0)
    net = Dead().eval()
    fp32 = deploy.export(net, 8, tmp_path / "dead.onnx")
    session = deploy.Session(deploy.quantize(fp32, tmp_path / "dead.int8.onnx", exclude=[deploy.node_names(net, fp32, 8)["conv1"]]))
    sim, batch_sim = int8.simulator_like_runtime(net, 8), int8.simulator_like_runtime(net, 8, scale_rule="batch")
    emulation = int8.integer_emulation(net, 8).eval()
    bias = net.fc.bias.detach().expand(4, -1)
    mixed = torch.cat([torch.zeros(1, 3, 8, 8), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))])
    for x in (mixed, torch.zeros(4, 3, 8, 8)):
        dead = slice(0, 1) if x.abs().sum() else slice(None)
        with torch.no_grad():
            found = {"simulator": sim(x, torch.full((4, sim.num_layers), 8.0)), "emulation": emulation(x),
                     "runtime, batch 1": session(x, 1), "runtime, batch 4": session(x, 4),
                     "coupling runner, batch 4": coupling.simulator_runner(batch_sim)(x, 4)}
        for name, logits in found.items():
            assert torch.isfinite(logits).all(), name
            assert torch.equal(logits[dead], bias[dead]), name
        assert int8.agreement(found["emulation"], found["runtime, batch 1"])["max_abs_dlogit"] <= 1e-5
        assert int8.agreement(found["coupling runner, batch 4"], found["runtime, batch 4"])["max_abs_dlogit"] <= 1e-4


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
        folded = int8.fold_batchnorm(model, image_size=size)
        assert not folded.training and model is not folded
        x = images(32, size)
        with torch.no_grad():
            assert (folded(x) - model(x)).abs().max() <= 1e-5
    kinds = [type(m).__name__ for m in int8.fold_batchnorm(tiny, image_size=SIZE).modules()]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("_DropAct") == 1  # bn4 stays, bn2's act kept
    assert sum(isinstance(m, nn.BatchNorm2d) for m in int8.fold_batchnorm(resnet[0], image_size=32).modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in int8.fold_batchnorm(shared, image_size=8).modules()) == 1


def test_fold_is_the_exporters_fold_bit_for_bit(resnet):
    model, path = resnet
    folded = dict(int8.fold_batchnorm(model, image_size=32).named_modules())
    graph = onnx.load(path).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for name, node in deploy.node_names(model, path, 32).items():
        if nodes[node].op_type == "Conv":
            assert torch.equal(inits[nodes[node].input[1]], folded[name].weight.detach()), name
            assert torch.equal(inits[nodes[node].input[2]], folded[name].bias.detach()), name


def test_unfold_gives_back_the_trained_fold_bit_for_bit(tiny, tmp_path):
    """A folded network trained on (here: every tensor moved) and handed on as the architecture's
    state dict: folding it again, in torch and in the exporter, gives the trained tensors exactly."""
    folded = int8.fold_batchnorm(tiny, image_size=SIZE)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in folded.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    model = copy.deepcopy(tiny)
    model.load_state_dict(int8.unfold_batchnorm(tiny, folded.state_dict(), image_size=SIZE))
    again = int8.fold_batchnorm(model, image_size=SIZE)
    trained = folded.state_dict()
    assert again.state_dict().keys() == trained.keys()
    assert all(torch.equal(t, trained[name]) for name, t in again.state_dict().items())
    x = images(8, SIZE)
    with torch.no_grad():
        assert (model(x) - folded(x)).abs().max() <= 1e-5  # the conv adds its bias inside, BN after it
    path = deploy.export(model, SIZE, tmp_path / "unfolded.onnx")
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(path).graph.initializer}
    nodes = {n.name: n for n in onnx.load(path).graph.node}
    for name, node in deploy.node_names(model, path, SIZE).items():
        if nodes[node].op_type == "Conv":
            assert torch.equal(inits[nodes[node].input[1]], trained[f"{name}.weight"]), name
            assert torch.equal(inits[nodes[node].input[2]], trained[f"{name}.bias"]), name


def test_simulator_agrees_with_runtime_at_batch_1(tiny, tmp_path):
    fp32 = deploy.export(tiny, SIZE, tmp_path / "tiny.onnx")
    first = deploy.node_names(tiny, fp32, SIZE)["conv1"]
    qpath = deploy.quantize(fp32, tmp_path / "tiny.q.onnx", exclude=[first])
    x = images(64, SIZE, seed=2)
    runtime = deploy.Session(qpath)(x, 1)
    sim = int8.simulator_like_runtime(tiny, SIZE)
    with torch.no_grad():
        simulated = sim(x, torch.full((len(x), sim.num_layers), 8))
    stats = int8.agreement(simulated, runtime)
    print(f"simulator vs ORT at batch 1: {stats}")
    assert stats["top1_agreement"] >= 99 and stats["median_abs_dlogit"] <= 1e-5
    # a served batch shares one range per layer: the same examples at batch 16 come out otherwise
    assert int8.agreement(deploy.Session(qpath)(x, 16), runtime)["max_abs_dlogit"] > 1e-6


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
        emulated = int8.integer_emulation(net, 16)(x)
    found = int8.agreement(emulated, session(x, 1))
    print(found)
    # without VNNI, MLAS's AVX2 u8s8 kernel adds pairs of u8·s8 products in int16 with saturation
    # (deploy.cpu_features): the emulation clips the classifier's pairs as it does
    assert found["top1_agreement"] == 100.0 and found["median_abs_dlogit"] <= 1e-6
    assert found["max_abs_dlogit"] <= 1e-5

    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    odd = nn.Sequential(nn.Conv2d(3, 8, 3), PaddedConv(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    odd(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1 \(PaddedConv\) has its own forward"):
        int8.integer_emulation(odd, 16)
