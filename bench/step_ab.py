"""The pair step with the quantizer and knapsack of another revision against this one's, in one
process, steps interleaved: a before/after ratio that a loaded or throttled machine moves alike.

    python bench/step_ab.py --base REV [--archs resnet18 ...] [--size 32] [--batch 16] [--rounds 9]

``dptq/quant.py`` and ``dptq/mckp.py`` of ``REV`` (``git show``) are loaded beside this tree's as
``dptq.base_quant`` and ``dptq.base_mckp`` (the rest of the package is this tree's). Per arch:
the median ms of the plain step, the base pair step and this pair step over ``--rounds`` rounds
(one of each per round), the ratios, and whether the two pair steps gave bitwise the same loss
and gradients.
"""
import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

from _timing import bench_runtime
from dptq import budgets, losses, mckp, quant
from dptq.policy import BitPolicy

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, name: str):
    """``dptq/{name}.py`` as it is at ``rev``, imported as ``dptq.base_{name}``."""
    source = subprocess.run(["git", "show", f"{rev}:dptq/{name}.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"dptq.base_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "dptq"
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev}:dptq/{name}.py", "exec"), module.__dict__)
    return module


def pair_step(w, student, quantizer, solver, policy, x, options, capacity):
    """The training's pair step (policy, exact MCKP, W's targets, FP and quantized forwards, one
    backward) with the given quantizer and knapsack module; returns the loss and every gradient."""
    student.zero_grad(set_to_none=True)
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        targets = w(x)
    bits = solver.bits_of(solver.solve(policy(x).float(), options, capacity), options)
    loss = losses.kd_loss(student(x), targets, 5.0) + losses.hinge_loss(quantizer(x, bits), targets, 0.1, "detrimental")
    loss.backward()
    return [loss.detach()] + [p.grad for p in [*student.parameters(), *policy.parameters()]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base_quant, base_mckp = module_at(args.base, "quant"), module_at(args.base, "mckp")
    print(f"base={args.base} size={args.size} batch={args.batch} threads=1 rounds={args.rounds}")
    print(f"{'arch':<24}{'plain ms':>9}{'base ms':>9}{'this ms':>9}{'base/plain':>11}{'this/plain':>11}{'this/base':>10}  same numbers")
    for arch in args.archs:
        rt = bench_runtime(torch.device("cpu"))
        student = rt.to_device(timm.create_model(arch, num_classes=10), args.size).eval()
        w = copy.deepcopy(student).requires_grad_(False)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=rt.memory_format)
        layers = quant.quantizable_layers(student, args.size)
        options = budgets.options(4, 10)
        capacity = budgets.capacity(len(layers), 5.5, 1)
        policy = BitPolicy(len(layers), len(options), 64, 32)
        steps = {"plain": lambda: student(x).square().mean().backward(),
                 "base": lambda: pair_step(w, student, base_quant.DynamicQuant(student, layers, image_size=args.size),
                                           base_mckp, policy, x, options, capacity),
                 "this": lambda: pair_step(w, student, quant.DynamicQuant(student, layers, image_size=args.size),
                                           mckp, policy, x, options, capacity)}
        same = all(torch.equal(a, b) for a, b in zip(steps["base"](), steps["this"]()))
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(1000 * (time.perf_counter() - start))
        ms = {name: statistics.median(t) for name, t in times.items()}
        print(f"{arch:<24}{ms['plain']:>9.1f}{ms['base']:>9.1f}{ms['this']:>9.1f}{ms['base'] / ms['plain']:>11.2f}"
              f"{ms['this'] / ms['plain']:>11.2f}{ms['this'] / ms['base']:>10.3f}  {same}", flush=True)


if __name__ == "__main__":
    main()
