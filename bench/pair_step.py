"""Pair-training step against the plain training step of the same student, measured in one run.

    python bench/pair_step.py [--archs resnet18 ...] [--size 32] [--batch 64] [--threads 1]
                              [--device cpu|cuda] [--repeats 5] [--no-channels-last] [--no-fold]

Per arch: the plain step (forward + backward), the quantized forward + backward, the policy +
MCKP, and the whole pair step (policy → MCKP → teacher forward, student full-precision and
quantized forwards, one backward); ratios to the plain step. On CUDA it runs under bf16 autocast
with channels_last, as the training does. ``--no-fold`` keeps the one-pixel convolutions in their
padded form (``dptq.runtime.OnePixelConv2d``, which the training uses, is the default).
"""
import argparse
import copy

import timm
import torch

from _timing import median_ms
from dptq import budgets, losses, runtime
from dptq.policy import BitPolicy, allocate
from dptq.quant import DynamicQuant


def bench(arch, size, batch, device, repeats, channels_last, fold):
    cfg = {"runtime": {"bf16": True, "channels_last": channels_last}}
    student = timm.create_model(arch, num_classes=10).to(device, memory_format=runtime.memory_format(cfg, device)).eval()
    if fold:
        runtime.fold_one_pixel_convs(student, size)
    teacher = copy.deepcopy(student).requires_grad_(False)
    quant = DynamicQuant(student, image_size=size)
    options = budgets.options(4, 10)
    capacity = budgets.capacity(quant.num_layers, 5.5, 1)
    policy = BitPolicy(quant.num_layers, len(options), 64, 32).to(device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=runtime.memory_format(cfg, device))
    bits = torch.full((batch, quant.num_layers), 6.0, device=device)
    amp = runtime.autocast(cfg, device)

    def plain():
        with amp:
            out = student(x)
        out.float().square().mean().backward()

    def quantized():
        with amp:
            out = quant(x, bits)
        out.float().square().mean().backward()

    def allocation():
        with torch.no_grad(), amp:
            allocate(policy, x, options, capacity)

    def pair():
        with torch.no_grad(), amp:
            targets = teacher(x).float()
        with amp:
            b = allocate(policy, x, options, capacity)
            fp, q = student(x), quant(x, b)
        loss = losses.kd_loss(fp, targets, 5.0) + losses.hinge_loss(q, targets, 0.1, "robust")
        loss.backward()

    times = {name: median_ms(fn, device, repeats) for name, fn in
             [("plain", plain), ("quantized", quantized), ("policy+mckp", allocation), ("pair", pair)]}
    return quant.num_layers, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} size={args.size} batch={args.batch} threads={args.threads} channels_last={args.channels_last} fold={args.fold}")
    print(f"{'arch':<26}{'N':>4}{'plain ms':>10}{'quant ms':>10}{'alloc ms':>10}{'pair ms':>10}{'quant/plain':>13}{'pair/plain':>12}")
    for arch in args.archs:
        n, t = bench(arch, args.size, args.batch, device, args.repeats, args.channels_last, args.fold)
        print(f"{arch:<26}{n:>4}{t['plain']:>10.1f}{t['quantized']:>10.1f}{t['policy+mckp']:>10.1f}{t['pair']:>10.1f}"
              f"{t['quantized'] / t['plain']:>13.2f}{t['pair'] / t['plain']:>12.2f}")


if __name__ == "__main__":
    main()
