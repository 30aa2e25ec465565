"""A real DPTQ runtime: ONNX export, ONNX Runtime dynamic int8 quantization, and the like-for-like simulator.

Contract. ``export`` writes the fp32 network with BatchNorm folded into the convolutions
(w' = w·γ/√(var+ε), b' = (b−μ)·γ/√(var+ε)+β per output channel). ``quantize`` rewrites every
Conv to ConvInteger and every MatMul with a constant weight to MatMulInteger (ORT's dynamic
mode first turns Gemm into MatMul + Add, so the classifier is quantized too):

    weights   (QInt8, symmetric per tensor):  s_w = max|w| / 127,  q_w = clip(round(w / s_w), -127, 127)
    inputs    (DynamicQuantizeLinear, uint8): s_x = (max(x,0) − min(x,0)) / 255,  z_x = round(−min(x,0) / s_x),
                                              q_x = clip(round(x / s_x) + z_x, 0, 255)
    output:   float(Σ (q_x − z_x) · q_w) · (s_x · s_w) + b      (int32 accumulation)

min and max run over the whole input tensor of a node, batch included: a served batch shares one
range per layer, batch 1 gives every example its own. ``simulator_like_runtime`` is
``quant.DynamicQuant`` set up to compute the same thing, so the two agree up to float rounding.
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .quant import SCALE_FLOOR, DynamicQuant, activation_range, execution_order

ONNX_TYPES = {nn.Conv2d: ("Conv",), nn.Linear: ("Gemm", "MatMul")}
WEIGHT_TYPES = ("QInt8", "QUInt8")


class ExportError(ValueError):
    """torch.onnx.export could not convert a network."""


def _atomic(path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` next to ``path``, then rename: a reader never sees a half-written model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def export(model: nn.Module, image_size: int, path, *, opset: int = 17) -> Path:
    """The fp32 network as ONNX (input ``x`` [b,3,H,W], output ``logits``, dynamic batch), BN folded."""
    param = next(model.parameters(), torch.zeros(()))
    if param.dtype != torch.float32:
        raise ValueError(f"deploy.export: {type(model).__name__} has {param.dtype} weights; export a float32 model")
    was_training = model.training
    dummy = torch.zeros(1, 3, image_size, image_size, device=param.device)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated; it is the one that folds BN into Conv (eval peephole)
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            try:
                torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=["x"],
                                  output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
                                  do_constant_folding=True)
            except Exception as err:  # RuntimeError, OnnxExporterError, TypeError... depending on what fails
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ExportError(
                    f"deploy.export: torch.onnx.export cannot convert {type(model).__name__} at opset {opset} "
                    f"({first}); replace that operation with an ONNX-exportable one or choose another arch") from err
        _own_initializers(tmp)

    try:
        model.eval()
        return _atomic(path, write)
    finally:
        model.train(was_training)


def _own_initializers(path: Path) -> None:
    """Give every tensor read through ``Identity(initializer)`` its own initializer, in place.

    The exporter shares equal constants (e.g. the all-zero folded weights of timm's zero-initialised
    last BN of a block) through Identity nodes; ORT's ConvInteger wants its weight as an initializer.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    shared = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    for node in shared:
        own = copy.deepcopy(inits[node.input[0]])
        own.name = node.output[0]
        graph.initializer.append(own)
        graph.node.remove(node)
    if shared:
        onnx.save(model, str(path))


def _weight_shapes(graph) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in graph.initializer}


def _quantizable(graph) -> list:
    shapes = _weight_shapes(graph)
    return [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in shapes]


def quantizable_nodes(onnx_path) -> list[str]:
    """Conv / Gemm / MatMul nodes whose weight is an initializer (what ORT can quantize), in graph order."""
    import onnx

    return [n.name for n in _quantizable(onnx.load(str(onnx_path), load_external_data=False).graph)]


def _onnx_weight_shape(node, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The ONNX weight's shape in torch's layout: Gemm with transB=0 and MatMul hold W as [in, out]."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return shape[::-1] if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b) else shape


def node_names(model: nn.Module, onnx_path, image_size: int) -> dict[str, str]:
    """torch module name -> ONNX node name for every executed Conv2d/Linear (order of execution, checked by shape)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes, shapes = _quantizable(graph), _weight_shapes(graph)
    layers = execution_order(model, image_size)
    if len(layers) != len(nodes):
        raise ValueError(f"deploy.node_names: {type(model).__name__} runs {len(layers)} Conv2d/Linear but "
                         f"{onnx_path} has {len(nodes)} Conv/Gemm/MatMul nodes; export this model again")
    for (name, module), node in zip(layers, nodes):
        found = _onnx_weight_shape(node, shapes[node.input[1]])
        kind = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        if node.op_type not in ONNX_TYPES[kind] or found != tuple(module.weight.shape):
            raise ValueError(f"deploy.node_names: {name} ({type(module).__name__}, weight "
                             f"{tuple(module.weight.shape)}) does not match ONNX node {node.name} ({node.op_type}, "
                             f"weight {found}); the ONNX file is not an export of this model")
    return {name: node.name for (name, _), node in zip(layers, nodes)}


def quantize(fp32_path, out_path, *, exclude: Sequence[str] = (), weight_type: str = "QInt8",
             per_channel: bool = False, reduce_range: bool = False) -> Path:
    """ORT dynamic quantization of Conv and constant-weight MatMul/Gemm, except the nodes in ``exclude``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"deploy.quantize: weight_type {weight_type!r} unknown; use one of {WEIGHT_TYPES}")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    unknown = [name for name in exclude if name not in ops]
    if unknown:
        raise ValueError(f"deploy.quantize: {unknown} not nodes of {fp32_path}; take the names from deploy.node_names")
    # ORT renames a Gemm to <name>_MatMul (+ <name>_Add) before it quantizes, and matches nodes_to_exclude
    # after that: an excluded Gemm must be named as the MatMul it becomes
    excluded = [f"{name}_MatMul" if ops[name] == "Gemm" else name for name in exclude]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor it leaves alone, and a hint, on the root logger
    try:
        return _atomic(out_path, lambda tmp: quantize_dynamic(
            Path(fp32_path), tmp, op_types_to_quantize=["Conv", "MatMul"], per_channel=per_channel,
            reduce_range=reduce_range, weight_type=QuantType[weight_type], nodes_to_exclude=excluded))
    finally:
        root.setLevel(level)


class Session:
    """An ONNX Runtime CPU session: ``threads`` intra- and inter-op threads, sequential execution.

    Graph optimisation is ORT_ENABLE_ALL, as served: it fuses DynamicQuantizeLinear + MatMulInteger
    + Cast + Mul + Add into DynamicQuantizeMatMul and float Conv + Relu into NCHWc kernels, which
    changes float rounding only, not the integer arithmetic.
    """

    def __init__(self, path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: Tensor, batch: int) -> Tensor:
        """float32 logits for normalized ``images`` [B,3,H,W], run in consecutive chunks of ``batch``."""
        if batch < 1:
            raise ValueError(f"deploy.Session: batch must be >= 1, got {batch}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = [self.session.run(None, {self.input: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
        return torch.cat([torch.from_numpy(o) for o in outs])


def cpu_features() -> dict:
    """The CPU and ORT version, for the audit record.

    The runtime's figures can depend on it: without AVX-VNNI / AVX512-VNNI, MLAS's AVX2 u8s8
    kernels add pairs of u8·s8 products in int16 with saturation (255·127·2 > 32767), so logits
    may differ from exact int32 arithmetic (``reduce_range=True`` avoids it, with 7-bit weights).
    With VNNI (or AMX) the accumulation is exact int32 and the figures do not depend on the CPU
    beyond float rounding. ``u8s8_may_saturate`` is judged for x86 only (False where flags are unknown).
    """
    import onnxruntime

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
    flags = set(flags.group(1).split()) if flags else set()
    out = {"cpu_model": model.group(1).strip() if model else platform.processor(),
           "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
           "avx_vnni": "avx_vnni" in flags, "amx": "amx_int8" in flags, "onnxruntime": onnxruntime.__version__}
    out["u8s8_may_saturate"] = out["avx2"] and not (out["avx512_vnni"] or out["avx_vnni"])
    return out


class _DropAct(nn.Module):
    """What is left of a BatchNorm+activation module (timm's BatchNormAct2d) once its BN is folded."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def _consumers(outputs) -> dict[int, int]:
    """How many autograd edges enter each graph node: a conv output with one edge feeds one op only."""
    count: dict[int, int] = {}
    stack = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    seen = {id(f) for f in stack}
    while stack:
        for fn, _ in stack.pop().next_functions:
            if fn is not None:
                count[id(fn)] = count.get(id(fn), 0) + 1
                if id(fn) not in seen:
                    seen.add(id(fn))
                    stack.append(fn)
    return count


def _conv_bn_pairs(model: nn.Module, image_size: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, str]]:
    """(conv, bn, bn's name) where bn's input is conv's output and nothing else reads it, by one dry run.

    The conv output is identified by its autograd node: an in-place edit in between changes the
    node, another reader adds an edge to it. Each module must run exactly once.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = {m: name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    produced: dict[int, nn.Conv2d] = {}  # id(grad_fn) of a conv output -> conv
    calls: dict[nn.Module, int] = {}
    fed: dict[nn.BatchNorm2d, object] = {}  # bn -> grad_fn of its input
    keep = []  # holds the grad_fns alive so that ids stay unique during the run

    def on_conv(m, _args, out):
        calls[m] = calls.get(m, 0) + 1
        produced[id(out.grad_fn)] = m
        keep.append(out.grad_fn)

    def on_bn(m, args):
        calls[m] = calls.get(m, 0) + 1
        fed[m] = args[0].grad_fn

    hooks = [m.register_forward_hook(on_conv) for m in convs] + [m.register_forward_pre_hook(on_bn) for m in bns]
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype, requires_grad=True)
    try:
        with torch.enable_grad():
            consumers = _consumers(torch.utils._pytree.tree_leaves(model(x)))
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for bn, fn in fed.items():
        conv = produced.get(id(fn))
        if conv is not None and calls[conv] == calls[bn] == 1 and consumers.get(id(fn)) == 1:
            pairs.append((conv, bn, bns[bn]))
    return pairs


def fold_batchnorm(model: nn.Module, *, image_size: int = 64) -> nn.Module:
    """A deep copy in eval mode with every BatchNorm2d that only a Conv2d feeds folded into that conv.

    The arithmetic is the ONNX exporter's (torch/csrc/jit/passes/onnx/eval_peephole.cpp), in the
    weights' dtype: s = γ / √(var + ε), w' = w·s, b' = (b − μ)·s + β. A BN subclass that also runs
    ``drop`` and ``act`` (timm's BatchNormAct2d) keeps them; any other BN (batch statistics, a
    subclass of unknown behaviour, a BN no lone conv feeds) stays as it is.
    """
    model = copy.deepcopy(model).eval()
    for conv, bn, name in _conv_bn_pairs(model, image_size):
        if bn.running_var is None:
            continue  # uses the batch's statistics: nothing to fold
        if type(bn) is nn.BatchNorm2d:
            rest = nn.Identity()
        elif {n for n, _ in bn.named_children()} == {"drop", "act"}:
            rest = _DropAct(bn.drop, bn.act)
        else:
            continue
        with torch.no_grad():
            s = bn.running_var.add(bn.eps).sqrt()
            s = (bn.weight / s) if bn.weight is not None else 1 / s
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = bias.sub(bn.running_mean).mul(s)
            conv.weight.mul_(s.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(bias.add(bn.bias) if bn.bias is not None else bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, rest)
    return model


def simulator_like_runtime(model: nn.Module, image_size: int, scale_rule: str = "minmax",
                           range_grad: bool = False) -> DynamicQuant:
    """``quant.DynamicQuant`` computing what the quantized ONNX model computes.

    BN folded as the exporter folds it, 8-bit symmetric per-tensor weights (quant.fake_quant_weight:
    s = max|w| / 127, round half to even, as ORT's quantize_data with symmetric=True, qmin = −127),
    min/max activation ranges per example (``scale_rule="batch"``: per tensor, as ORT at batch n;
    ``range_grad``: see quant.fake_quant_activation); run it with ``bits = torch.full((B, quant.num_layers), 8)``. The first
    layer stays float, weights included, as ORT leaves the excluded first node (quantize it with
    ``exclude=[node_names(...)[first layer]]``). Activations round as DynamicQuantizeLinear does,
    round(x / s) + z (``rounding="onnx"``; torch's x · (1/s) + z moves MobileNetV4's logits by a
    median 1.3e-4 against 1.3e-6). Differences left: with ``scale_rule="minmax"`` the range is per
    example and ORT's per tensor, so they agree at batch 1 only (``"batch"``: at batch n); the
    convolution sums run in float32 here and in int32 there.
    """
    folded = fold_batchnorm(model, image_size=image_size)
    order = execution_order(folded, image_size)
    quant = DynamicQuant(folded, layers=[m for _, m in order[1:]], weight_bits=8, scale_rule=scale_rule,
                         range_grad=range_grad, image_size=image_size, rounding="onnx")
    # DynamicQuant rounds every Conv2d/Linear weight; ORT leaves the excluded first layer float
    quant.weight_names = [f"{name}.weight" for name, _ in order[1:]]
    return quant


class _IntegerLayer(nn.Module):
    """A Conv2d or Linear computed as quantize_dynamic's graph does: DynamicQuantizeLinear on its
    input, ConvInteger / MatMulInteger summed exactly (integers in float64), Cast to float32, Mul by
    s_x · s_w, Add the bias."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach()
        self.w_scale = (w.abs().amax() / 127).clamp_min(SCALE_FLOOR)
        self.w_int = (w / self.w_scale).round().clamp(-127, 127).double()

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = activation_range(x, "minmax")  # each example's own range: the runtime at batch 1
        scale = ((hi - lo) / 255).reshape(shape)
        zero = torch.round(-lo.reshape(shape) / scale)
        centred = (torch.div(x, scale).round() + zero).clamp(0, 255).sub(zero).double()
        if isinstance(self.layer, nn.Conv2d):
            acc = nn.functional.conv2d(centred, self.w_int, None, self.layer.stride, self.layer.padding,
                                       self.layer.dilation, self.layer.groups)
        else:
            acc = nn.functional.linear(centred, self.w_int)
        out = acc.float() * (scale * self.w_scale)
        if self.layer.bias is not None:
            out = out + self.layer.bias.reshape(-1, *[1] * (out.dim() - 2))
        return out


def integer_emulation(model: nn.Module, image_size: int) -> nn.Module:
    """The quantized ONNX model's arithmetic in torch, as at batch 1: BN folded, every
    Conv2d/Linear but the first as :class:`_IntegerLayer`. It tells a real difference between
    simulator and runtime from float32 summation order (the simulator sums s_x·s_w·(q − z)·q_w in
    float32, the runtime integers in int32: one ulp apart in a layer's maximum gives another step
    s, which deep networks carry to the logits)."""
    folded = fold_batchnorm(model, image_size=image_size)
    for name, layer in execution_order(folded, image_size)[1:]:
        # a Linear subclass still computes x·Wᵀ + b (timm's only casts); a Conv2d one may pad its own way
        if isinstance(layer, nn.Conv2d) and (type(layer).forward is not nn.Conv2d.forward or layer.padding_mode != "zeros"):
            raise ValueError(f"deploy.integer_emulation: {name} ({type(layer).__name__}) has its own forward; "
                             "only Conv2d layers with the stock forward and zero padding can be emulated")
        parent, _, child = name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, child, _IntegerLayer(layer))
    return folded


def agreement(sim_logits: Tensor, runtime_logits: Tensor) -> dict:
    """Top-1 agreement (percent) and the median / max |Δlogit| over all logits."""
    if sim_logits.shape != runtime_logits.shape:
        raise ValueError(f"deploy.agreement: shapes differ, {tuple(sim_logits.shape)} vs {tuple(runtime_logits.shape)}")
    a, b = sim_logits.detach().float().cpu(), runtime_logits.detach().float().cpu()
    delta = (a - b).abs()
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean() * 100),
            "median_abs_dlogit": float(delta.median()), "max_abs_dlogit": float(delta.max())}
