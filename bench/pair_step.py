"""Every training and evaluation step of the study, timed in one run, as ratios to the plain step.

    python bench/pair_step.py [--archs resnet18 ...] [--size 32] [--batch 64] [--threads 1]
                              [--device cpu|cuda] [--repeats 5] [--no-channels-last] [--teacher resnet50]
                              [--profile STEPS]

Per arch, at one batch size (on CUDA under bf16 autocast, as the training runs):

- ``plain``: the student's forward + backward alone;
- ``quant``: the quantized forward + backward (every layer's input fake-quantized per example);
- ``alloc``: the policy forward and the batched MCKP;
- ``pair``: the whole pair step (policy, MCKP, W's forward, the student's full-precision and
  quantized forwards, one backward); ``pair eval``: the same without gradients (validation);
- ``unfolded``: the pair step with every convolution as timm builds it (the training's
  ``Runtime.to_device`` computes one-pixel convolutions on their window and, on the CPU, those and
  the 1x1 ones as matrix products and the depthwise ones on maps no larger than their kernel with
  their weight gradient as sums; at 224 px only the 1x1 ones fold);
- ``teacher fwd``: the teacher's forward (``--teacher``); ``distill``: teacher forward + the student's
  step on the KD loss; its efficiency is (plain + teacher fwd) / distill;
- ``infer fp`` and ``infer q``: evaluation forwards (the quantized one with its allocation).

``ops``: the aten operations one plain step and one pair step dispatch (a ``TorchDispatchMode``
counter; on the CPU, where the step's extra time is per-operation overhead, the count is what
fusing would remove).

``--profile STEPS`` then runs STEPS pair steps under ``torch.profiler`` and prints the operators
that take the most self time, where a pair step's time beyond the plain step's goes; on CUDA also
the kernel share: the GPU kernels' summed time per pair step (profiled) over the pair step's wall
time (the same STEPS timed without the profiler); below 100 % the GPU waits for the host.
"""
import argparse
import collections
import copy
import time

import timm
import torch

from _timing import bench_runtime, median_ms
from dptq import budgets, losses, runtime
from dptq.policy import BitPolicy, allocate
from dptq.quant import DynamicQuant
from torch.utils._python_dispatch import TorchDispatchMode


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> collections.Counter:
    """The aten operations one call of ``fn`` dispatches (after one warm-up call)."""
    fn()
    with _OpCounter() as counter:
        fn()
    return counter.counts

def step_times(arch: str, size: int, batch: int, device: torch.device, repeats: int = 5, channels_last: bool = True,
               only: set[str] | None = None, teacher_arch: str = "resnet50",
               profile_steps: int = 0) -> tuple[int, dict[str, float]]:
    """(N, {step: median ms}) for one arch at ``size`` px and ``batch`` images per step
    (every step of the module docstring, or the ``only`` ones); with ``profile_steps``, also
    print the pair step's operator profile over that many steps."""
    rt = bench_runtime(device, channels_last)
    fmt = rt.memory_format
    plain_student = timm.create_model(arch, num_classes=10).to(device, memory_format=fmt).eval()
    student = rt.to_device(copy.deepcopy(plain_student), size)
    teacher = rt.to_device(timm.create_model(teacher_arch, num_classes=10), size).eval().requires_grad_(False)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    amp = rt.autocast()
    quant = DynamicQuant(student, image_size=size)
    options = budgets.options(4, 10)
    capacity = budgets.capacity(quant.num_layers, 5.5, 1)
    policy = BitPolicy(quant.num_layers, len(options), 64, 32).to(device)
    bits = torch.full((batch, quant.num_layers), 6.0, device=device)

    def backward(out):
        out.float().square().mean().backward()

    def plain():
        with amp:
            out = student(x)
        backward(out)

    def quantized():
        with amp:
            out = quant(x, bits)
        backward(out)

    def allocation():
        with torch.no_grad(), amp:
            allocate(policy, x, options, capacity)

    def pair_loss(w, net, q):
        with torch.no_grad(), amp:
            targets = w(x).float()
        with amp:
            b = allocate(policy, x, options, capacity)
            fp, qo = net(x), q(x, b)
        return losses.kd_loss(fp, targets, 5.0) + losses.hinge_loss(qo, targets, 0.1, "robust")

    w = copy.deepcopy(student).requires_grad_(False)
    w_unfolded, unfolded_quant = copy.deepcopy(plain_student).requires_grad_(False), DynamicQuant(plain_student, image_size=size)

    def pair():
        pair_loss(w, student, quant).backward()

    def pair_unfolded():
        pair_loss(w_unfolded, plain_student, unfolded_quant).backward()

    def pair_eval():
        with torch.no_grad():
            pair_loss(w, student, quant)

    def teacher_forward():
        with torch.no_grad(), amp:
            teacher(x)

    def distill():
        with torch.no_grad(), amp:
            targets = teacher(x).float()
        with amp:
            out = student(x)
        losses.kd_loss(out, targets, 5.0).backward()

    def infer_fp():
        with torch.no_grad(), amp:
            student(x)

    def infer_q():
        with torch.no_grad(), amp:
            quant(x, allocate(policy, x, options, capacity))

    steps = [("plain", plain), ("quant", quantized), ("alloc", allocation), ("pair", pair), ("pair eval", pair_eval),
             ("teacher fwd", teacher_forward), ("distill", distill), ("infer fp", infer_fp), ("infer q", infer_q)]
    rewrites = (runtime.OnePixelConv2d, runtime.PointwiseConv2d, runtime.SmallMapDepthwiseConv2d)
    if any(isinstance(m, rewrites) for m in student.modules()):
        steps.append(("unfolded", pair_unfolded))
    times = {name: median_ms(fn, device, repeats) for name, fn in steps if only is None or name in only}
    if only is None:
        times["plain ops"], times["pair ops"] = (sum(dispatched_ops(fn).values()) for fn in (plain, pair))
    if profile_steps:
        print(f"{arch}: the pair step's operators over {profile_steps} steps, by self time", flush=True)
        table, share = operator_profile(pair, profile_steps, device)
        print(f"{table}\n{arch}: {share}", flush=True)
    return quant.num_layers, times


def operator_profile(fn, steps: int, device: torch.device, rows: int = 20) -> tuple[str, str]:
    """``torch.profiler``'s operator table of ``steps`` calls of ``fn`` (after one warm-up), and the
    kernel share line (:func:`kernel_share`)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows), kernel_share(fn, steps, device, prof)


def kernel_share(fn, steps: int, device: torch.device, prof) -> str:
    """One line: the GPU kernels' summed time per call of ``fn`` in ``prof`` (``steps`` calls) over
    the wall time per call of ``steps`` unprofiled calls (memory copies and sets not counted)."""
    if device.type != "cuda":
        return f"kernel share: n/a on {device.type}"
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                    and not e.name.startswith(("Memcpy", "Memset")))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall_ms, kernel_ms = 1000 * (time.perf_counter() - start) / steps, kernel_us / 1000 / steps
    return f"kernel share: {kernel_ms:.2f} ms of GPU kernels / {wall_ms:.2f} ms wall per step = {100 * kernel_ms / wall_ms:.1f} %"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="profile this many pair steps per arch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} size={args.size} batch={args.batch} threads={args.threads} channels_last={args.channels_last}")
    print(f"{'arch':<24}{'N':>4}{'plain':>8}{'quant':>8}{'alloc':>8}{'pair':>8}{'quant/':>8}{'pair/':>7}{'unfolded/':>11}"
          f"{'teacher':>9}{'distill':>9}{'(plain+teacher)/':>18}{'plain':>7}{'pair':>7}{'ops':>6}")
    print(f"{'':<24}{'':>4}{'ms':>8}{'ms':>8}{'ms':>8}{'ms':>8}{'plain':>8}{'plain':>7}{'pair':>11}{'fwd ms':>9}{'ms':>9}{'distill':>18}{'ops':>7}{'ops':>7}{'ratio':>6}")
    for arch in args.archs:
        n, t = step_times(arch, args.size, args.batch, device, args.repeats, args.channels_last, teacher_arch=args.teacher,
                          profile_steps=args.profile)
        unfolded = f"{t['unfolded'] / t['pair']:.2f}" if "unfolded" in t else "-"
        print(f"{arch:<24}{n:>4}{t['plain']:>8.1f}{t['quant']:>8.1f}{t['alloc']:>8.1f}{t['pair']:>8.1f}"
              f"{t['quant'] / t['plain']:>8.2f}{t['pair'] / t['plain']:>7.2f}{unfolded:>11}"
              f"{t['teacher fwd']:>9.1f}{t['distill']:>9.1f}{(t['plain'] + t['teacher fwd']) / t['distill']:>18.2f}"
              f"{t['plain ops']:>7.0f}{t['pair ops']:>7.0f}{t['pair ops'] / t['plain ops']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
