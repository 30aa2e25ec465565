"""The ONNX Runtime adapter: export, the nodes of a graph, dynamic int8 quantization, a session, the CPU.

Contract. ``export`` writes the fp32 network with BatchNorm folded into the convolutions
(w' = w·γ/√(var+ε), b' = (b−μ)·γ/√(var+ε)+β per output channel). ``quantize`` rewrites every
Conv to ConvInteger and every MatMul with a constant weight to MatMulInteger (ORT's dynamic
mode first turns Gemm into MatMul + Add, so the classifier is quantized too):

    weights   (QInt8, symmetric per tensor):  s_w = max|w| / 127,  q_w = clip(round(w / s_w), -127, 127)
    inputs    (DynamicQuantizeLinear, uint8): s_x = (max(x,0) − min(x,0)) / 255,  z_x = round(−min(x,0) / s_x),
                                              q_x = clip(round(x / s_x) + z_x, 0, 255)
    output:   float(Σ (q_x − z_x) · q_w) · (s_x · s_w) + b      (int32 accumulation)

min and max run over the whole input tensor of a node, batch included: a served batch shares one
range per layer, batch 1 gives every example its own; an all-zero input gets s_x = 1 (z_x = 0).
Without VNNI, MatMulInteger's u8s8 kernel clips pairs of products to int16 (:func:`cpu_features`).
Which nodes became integer ones is read from the quantized graph (:func:`quantized_nodes`), and
their inputs and int32 sums can be read out of the runtime (:func:`integer_sums`).
The same arithmetic in torch (the like-for-like simulator, the integer emulation) is
:mod:`dptq.int8`, on the quantization parameters of :mod:`dptq.quant`.
"""
from __future__ import annotations

import copy
import logging
import platform
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .files import atomic_write
from .graph import execution_order

ONNX_TYPES = {nn.Conv2d: ("Conv",), nn.Linear: ("Gemm", "MatMul")}
WEIGHT_TYPES = ("QInt8", "QUInt8")


class ExportError(ValueError):
    """torch.onnx.export could not convert a network."""


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
        return atomic_write(path, write)
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
        return atomic_write(out_path, lambda tmp: quantize_dynamic(
            Path(fp32_path), tmp, op_types_to_quantize=["Conv", "MatMul"], per_channel=per_channel,
            reduce_range=reduce_range, weight_type=QuantType[weight_type], nodes_to_exclude=excluded))
    finally:
        root.setLevel(level)


INTEGER_OPS = ("ConvInteger", "MatMulInteger")


def _integer_nodes(graph) -> dict[str, object]:
    """The integer nodes of a quantized graph by the fp32 node they replace: quantize_dynamic names
    the ConvInteger of Conv ``c`` ``c_quant``, the MatMulInteger of MatMul ``m`` ``m_quant`` and that
    of Gemm ``g`` (first split into MatMul + Add) ``g_MatMul_quant``."""
    out = {}
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            if not node.name.endswith("_quant"):
                raise ValueError(f"deploy: {node.op_type} node {node.name!r} is not named as quantize_dynamic names "
                                 f"its nodes (<node>_quant); quantize the fp32 file with deploy.quantize")
            base = node.name.removesuffix("_quant")
            gemm = node.op_type == "MatMulInteger" and base.endswith("_MatMul")
            out[base.removesuffix("_MatMul") if gemm else base] = node
    return out


def quantized_nodes(fp32_path, int8_path) -> list[str]:
    """The nodes of ``fp32_path`` (names of :func:`quantizable_nodes`) that ``int8_path`` computes as
    ConvInteger / MatMulInteger, read from the quantized graph, in graph order."""
    import onnx

    integer = _integer_nodes(onnx.load(str(int8_path), load_external_data=False).graph)
    names = quantizable_nodes(fp32_path)
    stray = sorted(set(integer) - set(names))
    if stray:
        raise ValueError(f"deploy.quantized_nodes: {int8_path} has integer nodes {stray[:3]} that {fp32_path} does "
                         f"not have; give the fp32 file it was quantized from")
    return [name for name in names if name in integer]


def integer_sums(int8_path, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """For each integer node of ``int8_path``, by the fp32 node it replaces (:func:`quantized_nodes`):
    its float input (what DynamicQuantizeLinear ranges) and its int32 sums Σ (q_x − z_x)·q_w, each
    example run at batch 1 and stacked: ([B, ...] float32, [B, ...] int32). The runtime's own
    intermediate values, exposed as extra graph outputs (so those nodes are not fused)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(int8_path))
    producer = {out: node for node in model.graph.node for out in node.output}
    wires = {}
    for name, node in _integer_nodes(model.graph).items():
        quantizer = producer[node.input[0]]
        if quantizer.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"deploy.integer_sums: {node.name} reads {quantizer.op_type}, not DynamicQuantizeLinear; "
                             f"{int8_path} is not from quantize_dynamic")
        wires[name] = (quantizer.input[0], node.output[0])
    kinds = {wire: kind for pair in wires.values() for wire, kind in zip(pair, (TensorProto.FLOAT, TensorProto.INT32))}
    shown = {o.name for o in model.graph.output}  # an input several nodes quantize (once) is shown once
    model.graph.output.extend(helper.make_tensor_value_info(w, kind, None) for w, kind in kinds.items() if w not in shown)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    x = images.detach().to("cpu", torch.float32).numpy()
    runs = [dict(zip(names, session.run(None, {session.get_inputs()[0].name: x[i:i + 1]}))) for i in range(len(x))]
    return {name: tuple(torch.from_numpy(np.concatenate([run[wire] for run in runs])) for wire in pair)
            for name, pair in wires.items()}


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
