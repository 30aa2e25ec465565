"""ONNX Runtime's float32 activations on the CPU in torch, bit for bit, for the integer emulation.

Between two integer layers the runtime computes in float32 as torch does, except where its
kernels round otherwise; one ulp there moves a value across a rounding boundary of the next
DynamicQuantizeLinear now and then, and a deep network carries that step to its logits
(bench/SCIENCE.md §9). Measured against the runtime's own nodes (tests/test_int8_networks.py),
torch's sigmoid differs in 64 % of the values, hardsigmoid 24 %, hardswish 31 %; these do not:

    Sigmoid      MLAS's rational approximation (logistic.cpp, the FMA3 kernel on AVX2 CPUs):
                 v = clamp(x, −18, 18), p = v·P(v²), q = Q(v²) by Horner's rule in fused
                 multiply-adds, σ = clamp(p / q + ½, 0, 1)
    SiLU         x · σ(x) (exported as Sigmoid, Mul)
    HardSigmoid  clamp(x · α + β, 0, 1), α = 1/6 and β = ½ rounded to float32, no fused multiply-add
    HardSwish    x · HardSigmoid(x)

A fused multiply-add a·b + c (one rounding) is computed in float64 (a·b is exact there) and
rounded once more to float32; the double rounding differs from one rounding only on ties,
which did not occur in 10⁶ draws.

ReduceMean over H·W (a squeeze-excitation's ``x.mean((2, 3))``) sums as Eigen does with SSE
packets of four (the runtime's generic code is built for SSE2): each channel's row of N = H·W
values, at float offset c·N of a 16-byte aligned buffer (batch 1), sums its aligned part in two
packet accumulators, adds them, reduces the packet as (p0 + p2) + (p1 + p3), then adds the
unaligned head and tail in order, and divides by N. torch's mean differs in 19–55 % of channels.

A float Conv with one group and fewer input channels than MLAS's NCHWc block (8 floats on AVX2, 16
on AVX-512: a stem on RGB, the layer the audit leaves float) runs NCHWc's NCHW-input kernel, one
call per input channel: each sums its taps in row order in fused multiply-adds from 0, adds the
output so far, and the last call adds the bias. torch's convolution differs in 29–47 % of outputs;
this order equals the runtime's on every shape tried (tests/test_int8_networks.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import graph

# MlasLogisticConstants: the range, then P's coefficients α9…α1 and Q's β10…β0 (from Eigen)
RANGE = 18.0
ALPHA = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
         2.48287947061529e-01)
BETA = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
        1.16817656904453e-01, 9.93151921023180e-01)


def _fma(a: Tensor, b: Tensor | float, c: float) -> Tensor:
    """a·b + c in float32 with one rounding (float64, then float32), ``b`` and ``c`` float32 values."""
    return (a.double() * _f32(b) + _f32(c)).float()


def _f32(v: Tensor | float) -> Tensor | float:
    return v.double() if isinstance(v, Tensor) else float(torch.tensor(v, dtype=torch.float32))


def _horner(v2: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """c0·v2^(n−1) + … + c_(n−1), as MLAS: fma(v2, c0, c1), then fma(acc, v2, c_k)."""
    acc = _fma(v2, coefficients[0], coefficients[1])
    for c in coefficients[2:]:
        acc = _fma(acc, v2, c)
    return acc


def logistic(x: Tensor) -> Tensor:
    """The runtime's Sigmoid: σ(x) = clamp(v·P(v²) / Q(v²) + ½, 0, 1), v = clamp(x, −18, 18)."""
    v = x.float().clamp(-RANGE, RANGE)
    v2 = v * v
    return (_horner(v2, ALPHA) * v / _horner(v2, BETA) + 0.5).clamp(0, 1).to(x.dtype)


def hard_sigmoid(x: Tensor) -> Tensor:
    """The runtime's HardSigmoid(α = 1/6, β = ½): clamp(x·α + β, 0, 1), two roundings."""
    return (x * _f32(1 / 6) + 0.5).clamp(0, 1)


class _Runtime(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _silu(x: Tensor) -> Tensor:
    return x * logistic(x)


def _hard_swish(x: Tensor) -> Tensor:
    return x * hard_sigmoid(x)


def nchw_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The runtime's float Conv of an NCHW input with one group: per input channel c,
    a_c = Σ_(kh, kw) x·w in fused multiply-adds from 0 (taps in row order, padding adds nothing),
    y = ((a_0 + a_1) + a_2 + …) + b."""
    patches = nn.functional.unfold(x.float(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    batch, out_channels = x.shape[0], conv.out_channels
    patches = patches.unflatten(1, (conv.in_channels, -1))  # [B, C, KH·KW, L]
    weight = conv.weight.detach().flatten(2)  # [O, C, KH·KW]
    out = None
    for c in range(conv.in_channels):
        acc = torch.zeros(batch, out_channels, patches.shape[-1], dtype=torch.float32, device=x.device)
        for tap in range(weight.shape[-1]):
            acc = _fma(patches[:, c, tap, None, :], weight[None, :, c, tap, None], acc)
        out = acc if out is None else acc + out
    if conv.bias is not None:
        out = out + conv.bias.detach()[None, :, None]
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return out.unflatten(-1, size)


NCHWC_BLOCK = 8  # MLAS's smallest NCHWc block (AVX2); a layer with fewer input channels reads NCHW


def runs_nchw(module: nn.Module) -> bool:
    """Whether the runtime computes this layer, left float, with :func:`nchw_conv2d`."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.in_channels < NCHWC_BLOCK
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


class RuntimeConv(nn.Module):
    """A float Conv2d computed as the runtime's NCHW-input kernel (:func:`nchw_conv2d`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return nchw_conv2d(x, self.conv)


KERNELS = {nn.Sigmoid: logistic, nn.SiLU: _silu, nn.Hardsigmoid: hard_sigmoid, nn.Hardswish: _hard_swish}


PACKET = 4  # floats in an SSE packet


def spatial_mean(x: Tensor) -> Tensor:
    """The runtime's ReduceMean of [B, C, H, W] over (H, W), keepdim, each example as at batch 1."""
    rows = x.flatten(2)  # [B, C, N]
    n = rows.shape[-1]
    out = torch.empty(rows.shape[:2], dtype=x.dtype, device=x.device)
    starts = torch.tensor([min((-c * n) % PACKET, n) for c in range(rows.shape[1])])  # first aligned index
    for start in starts.unique().tolist():
        channels = (starts == start).nonzero().flatten().to(x.device)
        out[:, channels] = _eigen_sum(rows[:, channels], start) / n
    return out[..., None, None]


def _eigen_sum(v: Tensor, start: int) -> Tensor:
    """Σ over the last dim as Eigen's vectorised redux, the aligned part beginning at ``start``."""
    n = v.shape[-1]
    body = (n - start) // PACKET * PACKET
    if body == 0:
        total = v[..., 0]
        for i in range(1, n):
            total = total + v[..., i]
        return total
    packet = v[..., start:start + PACKET]
    if body > PACKET:
        pairs = (n - start) // (2 * PACKET) * 2 * PACKET
        second = v[..., start + PACKET:start + 2 * PACKET]
        for i in range(start + 2 * PACKET, start + pairs, 2 * PACKET):
            packet, second = packet + v[..., i:i + PACKET], second + v[..., i + PACKET:i + 2 * PACKET]
        packet = packet + second
        if body > pairs:
            packet = packet + v[..., start + pairs:start + pairs + PACKET]
    total = (packet[..., 0] + packet[..., 2]) + (packet[..., 1] + packet[..., 3])
    for i in [*range(start), *range(start + body, n)]:
        total = total + v[..., i]
    return total


class _RuntimeMeans(TorchFunctionMode):
    """Runs ``x.mean((2, 3), keepdim=True)`` of a float32 [B, C, H, W] as :func:`spatial_mean`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.mean, torch.mean) and _is_spatial_mean(args, kwargs):
            return spatial_mean(args[0])  # the mode is off inside its own handler
        return func(*args, **kwargs)


def _is_spatial_mean(args, kwargs) -> bool:
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) else dims
    return (isinstance(x, Tensor) and x.dim() == 4 and x.dtype == torch.float32 and bool(keep)
            and dims is not None and sorted(d % 4 for d in dims) == [2, 3])


def as_runtime_computes(model: nn.Module) -> nn.Module:
    """``model`` (in place) with every nn.Sigmoid, SiLU, Hardsigmoid and Hardswish module computing
    as the runtime's kernel (:data:`KERNELS`), and its spatial means (``x.mean((2, 3),
    keepdim=True)``) as the runtime's ReduceMean; other modules and functional calls are left as they are."""
    for name, module in list(model.named_modules()):
        kernel = KERNELS.get(type(module))
        if kernel is not None:
            graph.replace(model, name, _Runtime(kernel))
    means = _RuntimeMeans()  # on for each call of the model, off after it (an exception included)

    def enter(_module, _args) -> None:
        means.__enter__()

    def leave(_module, _args, _out) -> None:
        means.__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model
