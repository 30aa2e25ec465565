"""Where and how tensors run: device choice, bf16 autocast on CUDA, channels_last, threads, seeds,
and the rewrites of convolutions that see a single pixel (:class:`OnePixelConv2d`), of the 1x1
ones (:class:`PointwiseConv2d`) and of the depthwise ones on maps no larger than their kernel
(:class:`SmallMapDepthwiseConv2d`): exact in real arithmetic; in float32 the products sum in
another order than oneDNN's convolutions, so their last bits differ."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import graph


class Runtime:
    """The config's ``runtime`` section, started for one job (``Runtime(seed, **runtime)``).

    Starting seeds every RNG with the job's training seed and fixes torch's CPU threads;
    ``device: auto`` takes CUDA when present, else the CPU.
    """

    def __init__(self, seed: int, *, device: str, bf16: bool, channels_last: bool, threads: int):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device: 'cuda' was asked for but no CUDA device is visible; set it to 'auto' or 'cpu'")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dev, self.bf16, self.seed = torch.device(device), bf16, seed
        # oneDNN's CPU convolutions gain from channels_last too (inference 1.05-3.5x faster at
        # 32 px, bench/NOTES.md), as cuDNN's do under bf16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.set_num_threads(threads)
        keep_freed_memory()
        self.reseed()
        if self.dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def reseed(self) -> None:
        """Seed Python's, NumPy's and torch's generators with the job's seed: what follows draws the
        same numbers whatever ran before it."""
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def autocast(self):
        """bf16 autocast on CUDA when ``runtime.bf16``; a no-op on the CPU (keeps CPU runs exact)."""
        if self.dev.type == "cuda" and self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, module: nn.Module, image_size: int) -> nn.Module:
        """``module`` on the device in the configured memory format, its one-pixel convolutions
        rewritten for ``image_size`` inputs (:func:`fold_one_pixel_convs`). On the CPU in
        channels_last, these and the 1x1 convolutions (:func:`fold_pointwise_convs`) are computed
        as the matrix products they are, and the depthwise ones on small maps take their weight
        gradient as sums (:func:`fold_small_map_depthwise_convs`): oneDNN's backward of each is slow
        at small maps, and only channels_last holds their rows as one matrix (cuDNN's are not
        measured slow, and a product is more launches than one convolution)."""
        module = module.to(device=self.dev, memory_format=self.memory_format)
        as_products = self.dev.type == "cpu" and self.memory_format == torch.channels_last
        fold_one_pixel_convs(module, image_size, as_products)
        if as_products:
            fold_pointwise_convs(module)
            fold_small_map_depthwise_convs(module, image_size)
        return module


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next step instead of returning it to the kernel.

    A training step frees and allocates the same large blocks again (ResNet18's last-stage
    weight gradients and quantized weights are 9.4 MB each). By default glibc maps such a block
    freshly or trims it off the heap, so every step page-faults it in again (bench/NOTES.md §10,
    §12). Thresholds: blocks below 32 MB (glibc's largest mmap threshold) come from the heap, and
    up to 1 GB of free heap is kept. This changes no number. It returns False where the C
    library has no ``mallopt`` (not glibc), and then the defaults stand.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


class _RewrittenConv2d(nn.Conv2d):
    """A rewrite of the convolution ``conv``: its geometry, and its parameters shared, not copied
    (the state dict is unchanged)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.train(conv.training)


class OnePixelConv2d(_RewrittenConv2d):
    """A convolution whose window, at its one output position, covers its whole H x W input.

    Zero padding contributes nothing, so with padding (p_h, p_w) the output is exactly
    y[o] = b[o] + Σ_{c,i,j} w[o, c, p_h + i, p_w + j] · x[c, i, j], i < H, j < W: a convolution
    with the kernel slice w[:, :, p_h:p_h+H, p_w:p_w+W] and no padding, and the gradient of every
    other tap is exactly zero. Why bother: oneDNN's CPU backward of the padded form is
    pathological (ResNet18's 3x3 convolutions on the 1x1 maps of its last stage at 32 px: 53 ms
    per backward against 3 ms per forward, bench/NOTES.md). Any other input size takes the
    ordinary path. Inside :func:`windows_quantized_by` only the window is ever rounded.
    With ``as_product`` the one-pixel case is one matrix product over the example's H·W·C inputs
    (one group), as :class:`PointwiseConv2d` computes a 1x1 convolution, or for a depthwise
    convolution y[b, c] = b[c] + Σ_{i,j} w[c, 0, p_h + i, p_w + j] · x[b, c, i, j], a product and a
    sum per channel; other grouped convolutions stay convolutions.
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int], as_product: bool = False):
        """The convolution ``conv`` (its parameters shared, not copied) for ``input_hw`` inputs."""
        super().__init__(conv)
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.input_hw, self.as_product = input_hw, as_product and (conv.groups == 1 or self.depthwise)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        (h, w), (ph, pw) = self.input_hw, self.padding
        one_pixel = tuple(x.shape[-2:]) == self.input_hw
        part = _KernelWindow.apply(weight, ph, pw, h, w) if one_pixel else weight
        quantize = _WINDOW_QUANT.get()
        if quantize is not None:
            part = quantize(self, weight, part)
        if not one_pixel:
            return super()._conv_forward(x, part, bias)
        if not self.as_product:
            return F.conv2d(x, part, bias, groups=self.groups)
        if self.depthwise:
            y = (x * part.transpose(0, 1)).sum((2, 3), keepdim=True)
            return y if bias is None else y + bias.view(1, -1, 1, 1)
        # y[b, o] = Σ over (i, j, c) of w[o, c, i, j] x[b, c, i, j]: one row of H·W·C per example
        rows = x.permute(0, 2, 3, 1).reshape(x.shape[0], 1, 1, -1)
        return _rows_times(rows, part.permute(0, 2, 3, 1).reshape(part.shape[0], -1), bias)


class PointwiseConv2d(_RewrittenConv2d):
    """A 1x1 convolution (stride 1, no padding, one group) computed as the matrix product it is:
    y[b, :, i, j] = W x[b, :, i, j] + b, with W = w[:, :, 0, 0], one product over the rows
    (B·H·W, C) that channels_last memory already holds. Why: oneDNN's CPU backward of a 1x1
    convolution on the small maps of a 32 px input takes up to 5x the product's time
    (MobileNetV4's 1x1 convolutions on 1x1 maps: 37.6 ms against 14.3 ms per step, bench/NOTES.md
    §19). The same sums in another order: equal up to float rounding, not bit for bit.
    """

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _rows_times(x.permute(0, 2, 3, 1), weight.flatten(1), bias)


def _rows_times(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows [B, H, W, K] · weightᵀ [K, O] + bias, returned as the [B, O, H, W] map (channels_last)."""
    return F.linear(rows, weight, bias).permute(0, 3, 1, 2)


class SmallMapDepthwiseConv2d(_RewrittenConv2d):
    """A depthwise convolution (one input and one output channel per group) whose H x W input is
    no larger than its kernel (H·W <= k_h·k_w), with its weight gradient taken as the sums it is.

    The forward and the input gradient are the convolution's own. Tap t of the kernel joins
    output position q to input position p where t = (p_h - q_h·s_h + pad_h, p_w - q_w·s_w + pad_w)
    lies inside the kernel, so with the output gradient g

        ∂L/∂w[c, t] = Σ_{(q, p) joined by t} Σ_b g[b, c, q] · x[b, c, p],

    one product per (q, p) pair and channel, summed over the batch, then over the pairs of each tap.
    Why: oneDNN's CPU weight gradient of a depthwise convolution whose taps mostly fall on padding
    runs at a fraction of its forward's speed (MobileNetV4's 5x5 on 2x2 maps at 32 px: 2.4 ms
    against 0.05, bench/NOTES.md §21). The same sums in another order: the weight gradient equals
    oneDNN's up to float rounding. Any other input size takes the ordinary path.
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int]):
        """The convolution ``conv`` (its parameters shared, not copied) for ``input_hw`` inputs."""
        super().__init__(conv)
        self.input_hw = input_hw
        # a buffer moves with the module and stays out of its state dict
        self.register_buffer("taps", _taps(input_hw, self.kernel_size, self.stride, self.padding, conv.weight.device),
                             persistent=False)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_hw:
            return super()._conv_forward(x, weight, bias)
        return _DepthwiseWeightGradAsSums.apply(x, weight, bias, self.stride, self.padding, self.taps)


def _taps(input_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
          device: torch.device) -> Tensor:
    """For every (output q, input p) pair of positions, q-major, the kernel tap t = t_h·k_w + t_w
    that joins them, or k_h·k_w where none does [Q·P]."""
    def along(size, k, s, pad):  # tap index [out, in] along one axis, -1 outside the kernel
        out = (size + 2 * pad - k) // s + 1
        tap = torch.arange(size, device=device)[None, :] - s * torch.arange(out, device=device)[:, None] + pad
        return torch.where((tap >= 0) & (tap < k), tap, -1)

    th, tw = along(input_hw[0], kernel[0], stride[0], padding[0]), along(input_hw[1], kernel[1], stride[1], padding[1])
    inside = (th[:, None, :, None] >= 0) & (tw[None, :, None, :] >= 0)  # [out_h, out_w, in_h, in_w]
    tap = th[:, None, :, None] * kernel[1] + tw[None, :, None, :]
    return torch.where(inside, tap, kernel[0] * kernel[1]).flatten()


class _DepthwiseWeightGradAsSums(torch.autograd.Function):
    """The depthwise convolution of :class:`SmallMapDepthwiseConv2d`: forward, input and bias
    gradients by torch's convolution, the weight gradient as that class's sums."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], taps: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, taps)
        ctx.geometry = (stride, padding, None if bias is None else list(bias.shape))
        return F.conv2d(x, weight, bias, stride, padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, taps = ctx.saved_tensors
        (stride, padding, bias_sizes), (need_x, need_w, need_b) = ctx.geometry, ctx.needs_input_grad[:3]
        grad_x = grad_b = grad_w = None
        if need_x or need_b:
            grad_x, _, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, stride, padding, (1, 1), False, (0, 0), weight.shape[0],
                [need_x, False, need_b])
        if need_w:
            b, c, k = x.shape[0], x.shape[1], weight[0].numel()
            per_pair = (grad.permute(0, 2, 3, 1).reshape(b, -1, 1, c)       # [B, Q, 1, C]
                        * x.permute(0, 2, 3, 1).reshape(b, 1, -1, c)).sum(0)  # [B, 1, P, C] -> [Q, P, C]
            per_tap = per_pair.new_zeros(k + 1, c).index_add_(0, taps, per_pair.view(-1, c))
            grad_w = per_tap[:k].t().reshape(weight.shape)
        return grad_x, grad_w, grad_b, None, None, None


# set by windows_quantized_by for one quantized pass: quantize(module, weight, part)
_WINDOW_QUANT: contextvars.ContextVar[Callable[[nn.Module, Tensor, Tensor], Tensor] | None] = \
    contextvars.ContextVar("window_quant", default=None)


@contextlib.contextmanager
def windows_quantized_by(quantize: Callable[[nn.Module, Tensor, Tensor], Tensor]):
    """Within the block, every :class:`OnePixelConv2d` convolves with ``quantize(module, weight,
    part)`` in place of ``part`` (its kernel window, or the whole weight off its input size):
    ``dptq.quant.DynamicQuant`` rounds only the window, with the whole weight's scale."""
    token = _WINDOW_QUANT.set(quantize)
    try:
        yield
    finally:
        _WINDOW_QUANT.reset(token)


class _KernelWindow(torch.autograd.Function):
    """w[:, :, p_h:p_h+H, p_w:p_w+W] (a view), whose gradient is laid out like w.

    Slicing's own backward builds a contiguous zero gradient, which the accumulation into a
    channels_last weight's ``.grad`` then copies once more: ResNet18's last stage at 32 px moved
    3 x 9.4 MB a step for nothing (bench/NOTES.md §11).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, ph: int, pw: int, h: int, w: int) -> Tensor:
        ctx.layout = (weight.shape, weight.stride(), weight.dtype, weight.device, ph, pw, h, w)
        return weight[:, :, ph:ph + h, pw:pw + w]

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, stride, dtype, device, ph, pw, h, w = ctx.layout
        full = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
        full[:, :, ph:ph + h, pw:pw + w] = grad
        return full, None, None, None, None


def fold_pointwise_convs(model: nn.Module) -> int:
    """Replace every plain 1x1 ``nn.Conv2d`` of ``model`` (stride 1, no padding, one group) by a
    :class:`PointwiseConv2d` (parameters shared, state dict unchanged). Returns how many."""
    chosen = [name for name, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)
              and m.stride == (1, 1) and m.padding in ((0, 0), "valid") and m.groups == 1]
    for name in chosen:
        graph.replace(model, name, PointwiseConv2d(model.get_submodule(name)))
    return len(chosen)


def fold_one_pixel_convs(model: nn.Module, image_size: int, as_products: bool = False) -> int:
    """Replace every plain ``nn.Conv2d`` of ``model`` that :class:`OnePixelConv2d` covers, at
    ``image_size`` inputs, by one (parameters shared, state dict unchanged), computed as a matrix
    product where ``as_products``. Returns how many were replaced."""
    folded = 0
    for name, (h, w, out_h, out_w) in _plain_conv_maps(model, image_size).items():
        m = model.get_submodule(name)
        (kh, kw), (ph, pw) = m.kernel_size, m.padding
        if (out_h, out_w) == (1, 1) and (kh, kw) != (h, w) and ph + h <= kh and pw + w <= kw:
            graph.replace(model, name, OnePixelConv2d(m, (h, w), as_products))
            folded += 1
    return folded


def fold_small_map_depthwise_convs(model: nn.Module, image_size: int) -> int:
    """Replace every plain depthwise ``nn.Conv2d`` of ``model`` (as many groups as input and output
    channels) whose input map at ``image_size`` is no larger than its kernel by a
    :class:`SmallMapDepthwiseConv2d` (parameters shared, state dict unchanged). Returns how many."""
    folded = 0
    for name, (h, w, _, _) in _plain_conv_maps(model, image_size).items():
        m = model.get_submodule(name)
        if m.groups == m.in_channels == m.out_channels and h * w <= m.kernel_size[0] * m.kernel_size[1]:
            graph.replace(model, name, SmallMapDepthwiseConv2d(m, (h, w)))
            folded += 1
    return folded


def _plain_conv_maps(model: nn.Module, image_size: int) -> dict[str, tuple[int, int, int, int]]:
    """(input H, W, output H, W) at ``image_size`` of every plain ``nn.Conv2d`` of ``model`` with
    zero padding given as numbers and no dilation, by name (one dry run)."""
    names = {m: name for name, m in model.named_modules() if type(m) is nn.Conv2d and m.padding_mode == "zeros"
             and m.dilation == (1, 1) and not isinstance(m.padding, str)}
    if not names:
        return {}
    seen: dict[str, tuple[int, int, int, int]] = {}

    def record(module, args, out):
        seen.setdefault(names[module], (*args[0].shape[-2:], *out.shape[-2:]))

    with torch.no_grad():
        graph.dry_run(model, image_size, post=dict.fromkeys(names, record))
    return seen
