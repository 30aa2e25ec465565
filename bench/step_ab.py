"""The plain and pair steps of another revision against this one's, in one process, steps
interleaved: a before/after ratio that a loaded or throttled machine moves alike.

    python bench/step_ab.py --base REV [--archs resnet18 ...] [--size 32] [--batch 16] [--rounds 9]

``dptq/runtime.py``, ``dptq/quant.py`` and ``dptq/mckp.py`` of ``REV`` (``git show``) are loaded
beside this tree's as ``dptq.base_runtime``, ``dptq.base_quant`` and ``dptq.base_mckp`` (the rest
of the package is this tree's). Per arch, one network is put on the CPU by each revision's
``Runtime.to_device``; then the median ms of each revision's plain and pair steps over
``--rounds`` rounds (one of each per round), the ratios, and how far the two pair steps' losses and
gradients are apart (0: bitwise the same).
"""
import argparse
import contextlib
import copy
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch

from dptq import budgets, losses, mckp, quant, runtime
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


@contextlib.contextmanager
def imported_as(name: str, module):
    """``import`` finds ``module`` under ``name`` inside the block (the base quantizer must see the
    base runtime's classes)."""
    kept = sys.modules[name]
    sys.modules[name] = module
    try:
        yield
    finally:
        sys.modules[name] = kept


def revision_at(rev: str) -> SimpleNamespace:
    base_runtime = module_at(rev, "runtime")
    with imported_as("dptq.runtime", base_runtime):
        base_quant = module_at(rev, "quant")
    return SimpleNamespace(runtime=base_runtime, quant=base_quant, mckp=module_at(rev, "mckp"))


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


def steps_of(side: SimpleNamespace, net: torch.nn.Module, size: int, x: torch.Tensor, policy, options, capacity) -> dict:
    """The plain and the pair step of one revision on its own copy of ``net`` (same weights)."""
    rt = side.runtime.Runtime(0, device="cpu", bf16=True, channels_last=True, threads=1)
    student = rt.to_device(copy.deepcopy(net), size).eval()
    w = copy.deepcopy(student).requires_grad_(False)
    quantizer = side.quant.DynamicQuant(student, image_size=size)
    return {"plain": lambda: student(x).square().mean().backward(),
            "pair": lambda: pair_step(w, student, quantizer, side.mckp, policy, x, options, capacity)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sides = {"base": revision_at(args.base), "this": SimpleNamespace(runtime=runtime, quant=quant, mckp=mckp)}
    print(f"base={args.base} size={args.size} batch={args.batch} threads=1 rounds={args.rounds}")
    print(f"{'arch':<24}{'base plain':>11}{'this plain':>11}{'base pair':>10}{'this pair':>10}{'base pair/plain':>16}"
          f"{'this pair/plain':>16}{'plain this/base':>16}{'pair this/base':>15}  max |Δ| loss, grads")
    for arch in args.archs:
        torch.manual_seed(0)
        net = timm.create_model(arch, num_classes=10)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        n = len(quant.quantizable_layers(net, args.size))
        options, capacity = budgets.options(4, 10), budgets.capacity(n, 5.5, 1)
        policy = BitPolicy(n, len(options), 64, 32)
        steps = {f"{side} {kind}": step for side, rev in sides.items()
                 for kind, step in steps_of(rev, net, args.size, x, policy, options, capacity).items()}
        apart = max((a - b).abs().max().item() for a, b in zip(steps["base pair"](), steps["this pair"]()))
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(1000 * (time.perf_counter() - start))
        ms = {name: statistics.median(t) for name, t in times.items()}
        print(f"{arch:<24}{ms['base plain']:>11.1f}{ms['this plain']:>11.1f}{ms['base pair']:>10.1f}{ms['this pair']:>10.1f}"
              f"{ms['base pair'] / ms['base plain']:>16.2f}{ms['this pair'] / ms['this plain']:>16.2f}"
              f"{ms['this plain'] / ms['base plain']:>16.3f}{ms['this pair'] / ms['base pair']:>15.3f}  {apart:.3g}", flush=True)


if __name__ == "__main__":
    main()
