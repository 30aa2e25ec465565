"""ONNX Runtime's int8 arithmetic in torch: the BatchNorm fold, the like-for-like simulator, the
integer emulation, and how far two sets of logits agree.

The runtime (:mod:`dptq.deploy`) quantizes each Conv/MatMul input with DynamicQuantizeLinear and
its weight symmetric per tensor, both with the parameters of :func:`dptq.quant.weight_scale` and
:func:`dptq.quant.activation_qparams`. :func:`simulator_like_runtime` computes that as fake
quantization (float32 sums: differentiable, what attacks and training go through);
:func:`integer_emulation` computes it as the runtime does, exact integer sums scaled once.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import deploy, graph, mlas
from .graph import execution_order
from .quant import DynamicQuant, activation_qparams, activation_range, quantize_affine, weight_scale

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

    out = graph.dry_run(model, image_size, pre=dict.fromkeys(bns, on_bn), post=dict.fromkeys(convs, on_conv), grad=True)
    consumers = _consumers(torch.utils._pytree.tree_leaves(out))
    pairs = []
    for bn, fn in fed.items():
        conv = produced.get(id(fn))
        if conv is not None and calls[conv] == calls[bn] == 1 and consumers.get(id(fn)) == 1:
            pairs.append((conv, bn, bns[bn]))
    return pairs


def _foldable(model: nn.Module, image_size: int) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d, nn.Module]]:
    """(conv name, conv, BN name, BN, what replaces the BN) of every BN :func:`fold_batchnorm` folds."""
    names = {m: name for name, m in model.named_modules()}
    out = []
    for conv, bn, name in _conv_bn_pairs(model, image_size):
        if bn.running_var is None:
            continue  # uses the batch's statistics: nothing to fold
        if type(bn) is nn.BatchNorm2d:
            out.append((names[conv], conv, name, bn, nn.Identity()))
        elif {n for n, _ in bn.named_children()} == {"drop", "act"}:
            out.append((names[conv], conv, name, bn, _DropAct(bn.drop, bn.act)))
    return out


def fold_batchnorm(model: nn.Module, *, image_size: int = 64) -> nn.Module:
    """A deep copy in eval mode with every BatchNorm2d that only a Conv2d feeds folded into that conv.

    The arithmetic is the ONNX exporter's (torch/csrc/jit/passes/onnx/eval_peephole.cpp), in the
    weights' dtype: s = γ / √(var + ε), w' = w·s, b' = (b − μ)·s + β. A BN subclass that also runs
    ``drop`` and ``act`` (timm's BatchNormAct2d) keeps them; any other BN (batch statistics, a
    subclass of unknown behaviour, a BN no lone conv feeds) stays as it is.
    """
    model = copy.deepcopy(model).eval()
    for _, conv, name, bn, rest in _foldable(model, image_size):
        with torch.no_grad():
            s = bn.running_var.add(bn.eps).sqrt()
            s = (bn.weight / s) if bn.weight is not None else 1 / s
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = bias.sub(bn.running_mean).mul(s)
            conv.weight.mul_(s.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(bias.add(bn.bias) if bn.bias is not None else bias)
        graph.replace(model, name, rest)
    return model


def unfold_batchnorm(model: nn.Module, folded: Mapping[str, Tensor], *, image_size: int = 64) -> dict[str, Tensor]:
    """The state dict of ``model``'s architecture whose fold is ``folded`` bit for bit: a network
    trained folded (against the runtime's arithmetic) handed on as a plain weights file.

    ``folded`` is the state dict of ``fold_batchnorm(model)`` after training. Each folded BN gets γ = 1, μ = 0,
    var = 1 − ε (so √(var + ε) = 1 exactly and s = 1) and β = the folded conv's bias; the conv gets
    the folded weight and a zero bias of its own if it has one. Every other tensor is ``folded``'s.
    """
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trained = folded
    state.update({name: t.detach().clone() for name, t in trained.items() if name in state})
    for conv_name, conv, bn_name, bn, _ in _foldable(model, image_size):
        var = torch.ones_like(bn.running_var) - bn.eps
        if not torch.equal(var.add(bn.eps).sqrt(), torch.ones_like(var)):
            raise ValueError(f"int8.unfold_batchnorm: {bn_name}'s eps {bn.eps} leaves no variance v with √(v + eps) = 1")
        state[f"{conv_name}.weight"] = trained[f"{conv_name}.weight"].detach().clone()
        if conv.bias is not None:
            state[f"{conv_name}.bias"] = torch.zeros_like(conv.bias)
        state[f"{bn_name}.running_mean"], state[f"{bn_name}.running_var"] = torch.zeros_like(var), var
        if bn.weight is not None:
            state[f"{bn_name}.weight"] = torch.ones_like(bn.weight)
        if bn.bias is None:
            raise ValueError(f"int8.unfold_batchnorm: {bn_name} has no bias to hold the folded conv's")
        state[f"{bn_name}.bias"] = trained[f"{conv_name}.bias"].detach().clone()
    return state


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
    return DynamicQuant(folded, layers=[m for _, m in order[1:]], weight_bits=8, scale_rule=scale_rule,
                        range_grad=range_grad, image_size=image_size, rounding="onnx",
                        weights=[name for name, _ in order[1:]])  # ORT leaves the excluded first layer float


INT16 = (-32768, 32767)


class _IntegerLayer(nn.Module):
    """A Conv2d or Linear computed as quantize_dynamic's graph does: DynamicQuantizeLinear on its
    input, ConvInteger / MatMulInteger summed exactly (integers in float64), Cast to float32, Mul by
    s_x · s_w, Add the bias.

    ``saturate``: the MatMulInteger sums as MLAS's AVX2 u8s8 kernel forms them on a CPU without
    VNNI (``deploy.cpu_features()["u8s8_may_saturate"]``): it adds the raw products of adjacent
    inputs in pairs (vpmaddubsw) and clips each pair to int16 before the int32 sum,

        acc = Σ_j clip(q_x[2j]·q_w[2j] + q_x[2j+1]·q_w[2j+1], −2¹⁵, 2¹⁵−1) − z_x · Σ_k q_w[k],

    (an odd K pads one zero). Only weight pairs with |q_w[2j]| + |q_w[2j+1]| > 32767 / 255 can
    clip, so the exact sum is corrected on those alone. ConvInteger does not clip (measured:
    tests/test_int8_networks.py), so a Conv2d is always exact.
    """

    def __init__(self, layer: nn.Module, saturate: bool = False):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach()
        self.w_scale = weight_scale(w, 127)
        self.w_int = (w / self.w_scale).round().clamp(-127, 127).double()
        self.pairs = _clipping_pairs(self.w_int) if saturate and isinstance(layer, nn.Linear) else None

    def accumulate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the int32 sums of ConvInteger / MatMulInteger as float64, s_x), each example of ``x``
        ranged on its own (the runtime at batch 1)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = activation_range(x, "minmax")
        levels = torch.tensor(255.0, device=x.device)
        scale, zero = (t.reshape(shape) for t in activation_qparams(lo, hi, levels))
        q = quantize_affine(x, scale, zero, levels).double()
        centred = q - zero.double()
        if isinstance(self.layer, nn.Conv2d):
            return nn.functional.conv2d(centred, self.w_int, None, self.layer.stride, self.layer.padding,
                                        self.layer.dilation, self.layer.groups), scale
        acc = nn.functional.linear(centred, self.w_int)
        return (acc if self.pairs is None else acc + _clipped_excess(q, self.w_int, self.pairs)), scale

    def forward(self, x: Tensor) -> Tensor:
        acc, scale = self.accumulate(x)
        out = acc.float() * (scale * self.w_scale)
        if self.layer.bias is None:
            return out
        channel = 1 if isinstance(self.layer, nn.Conv2d) else out.dim() - 1  # a Linear's features: the last dim
        return out + self.layer.bias.reshape([-1 if d == channel else 1 for d in range(out.dim())])


def _clipping_pairs(w_int: Tensor) -> tuple[Tensor, Tensor]:
    """(output n, pair j) of the weight pairs (q_w[n, 2j], q_w[n, 2j+1]) whose products with
    inputs in [0, 255] can leave int16: |q_w[n, 2j]| + |q_w[n, 2j+1]| > 32767 / 255."""
    pairs = _paired(w_int.abs()).sum(-1)  # [N, K/2]
    return torch.nonzero(pairs * 255 > INT16[1], as_tuple=True)


def _paired(t: Tensor) -> Tensor:
    """``t`` [..., K] as [..., ⌈K/2⌉, 2], adjacent entries paired (an odd K padded with one 0)."""
    return nn.functional.pad(t, (0, t.shape[-1] % 2)).unflatten(-1, (-1, 2))


def _clipped_excess(q: Tensor, w_int: Tensor, pairs: tuple[Tensor, Tensor]) -> Tensor:
    """Σ_j clip(p_j) − p_j per output, with p_j = q[2j]·q_w[n, 2j] + q[2j+1]·q_w[n, 2j+1] on the
    ``pairs`` that can clip (:func:`_clipping_pairs`): what the clipping kernel loses, [..., N]."""
    n, j = pairs
    products = (_paired(q)[..., j, :] * _paired(w_int)[n, j]).sum(-1)  # [..., P]
    excess = products.clamp(*INT16) - products
    return torch.zeros(*q.shape[:-1], w_int.shape[0], dtype=q.dtype, device=q.device).index_add_(-1, n, excess)


def integer_emulation(model: nn.Module, image_size: int, layers: Sequence[str] | None = None, *,
                      u8s8_saturate: bool | None = None) -> nn.Module:
    """The quantized ONNX model's arithmetic in torch, as at batch 1: BN folded; the Conv2d/Linear
    modules named in ``layers`` as :class:`_IntegerLayer` (default: every one but the first, as
    :mod:`dptq.audit` quantizes; take a quantized file's from ``deploy.quantized_nodes``), the
    rest float; the activations, spatial means and float stems on few channels whose runtime
    kernels round otherwise than torch's computed as those do (:mod:`dptq.mlas`).
    ``u8s8_saturate``: MatMulInteger's int16 pair clipping (default: whether this CPU's kernel
    clips, ``deploy.cpu_features``).

    Given the runtime's own input to a layer, its int32 sums are the runtime's
    (tests/test_int8_networks.py). What it leaves is float kernels whose summation order it does
    not reproduce (a float Conv2d with 8 or more input channels, LayerNorm, Erf, softmax): one ulp
    moves a value across a rounding step of the next layer's quantizer now and then, and a deep
    network carries that step to its logits, as it does in the runtime itself for an input one ulp
    away."""
    if u8s8_saturate is None:
        u8s8_saturate = deploy.cpu_features()["u8s8_may_saturate"]
    folded = mlas.as_runtime_computes(fold_batchnorm(model, image_size=image_size))
    order = execution_order(folded, image_size)
    chosen = [name for name, _ in order[1:]] if layers is None else list(layers)
    modules = dict(order)
    unknown = [name for name in chosen if name not in modules]
    if unknown:
        raise ValueError(f"int8.integer_emulation: {unknown[:3]} are not Conv2d/Linear modules that "
                         f"{type(model).__name__} runs; name layers as deploy.node_names does")
    for name in chosen:
        layer = modules[name]
        # a Linear subclass still computes x·Wᵀ + b (timm's only casts); a Conv2d one may pad its own way
        if isinstance(layer, nn.Conv2d) and (type(layer).forward is not nn.Conv2d.forward or layer.padding_mode != "zeros"):
            raise ValueError(f"int8.integer_emulation: {name} ({type(layer).__name__}) has its own forward; "
                             "only Conv2d layers with the stock forward and zero padding can be emulated")
        graph.replace(folded, name, _IntegerLayer(layer, u8s8_saturate))
    for name, layer in order:
        if name not in chosen and mlas.runs_nchw(layer):
            graph.replace(folded, name, mlas.RuntimeConv(layer))
    return folded


def agreement(sim_logits: Tensor, runtime_logits: Tensor) -> dict:
    """Top-1 agreement (percent) and the median / max |Δlogit| over all logits."""
    if sim_logits.shape != runtime_logits.shape:
        raise ValueError(f"int8.agreement: shapes differ, {tuple(sim_logits.shape)} vs {tuple(runtime_logits.shape)}")
    a, b = sim_logits.detach().float().cpu(), runtime_logits.detach().float().cpu()
    delta = (a - b).abs()
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean() * 100),
            "median_abs_dlogit": float(delta.median()), "max_abs_dlogit": float(delta.max())}
