"""Why does a pair fail? The network's own tolerance to low activation bits, next to what a
policy does with it (the science issue's diagnosis: network vs policy vs optimisation).

    python bench/diagnose.py --network checkpoints/seed0/distill/ARCH.pt --version I --budget A
                             [--pairs R.pt D.pt ...] [--split test|fit] [--max-examples 400]
                             [--configfile config.yaml [profile.yaml]]

For the white-box network W (and each pair's network), on one split:

- FP, and every layer at one option (uniform allocations: the lowest option to the highest);
- the random policy at the cell (the budget met exactly);
- per-layer sensitivity: that layer alone at the lowest option, the rest at full precision;
- a static greedy allocation that meets the budget exactly: the most sensitive layers first
  get as many bits as the budget leaves (an oracle no policy sees, to bound what any
  allocation can recover);
- for a pair: its own policy's accuracy, mean bits per layer, and the rank correlation between
  those bits and W's sensitivity (does the policy protect the fragile layers?).
"""
import argparse

import torch

from dptq import budgets, checkpoint, config
from dptq.analysis import subset_loader, Job
from dptq.audit import sensitivity
from dptq.data import network_input
from dptq.evaluate import random_policy
from dptq.policy import allocate


def _accuracy(quant, loader, job, bits_of=None, mask=None):
    """Top-1 (percent) of ``quant`` over ``loader``; ``bits_of(x)`` gives [B, N] bits (None: FP)."""
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            x = network_input(images, job.rt)
            logits = quant.model(x) if bits_of is None else quant(x, bits_of(x), mask)
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            total += len(labels)
    return 100.0 * correct / total


def _constant(n, value):
    return lambda x: torch.full((x.shape[0], n), float(value), device=x.device)


def greedy_bits(order: list[int], options: list[int], capacity: int) -> list[int]:
    """One option per layer summing to ``capacity`` exactly: all at the lowest, then the layers of
    ``order`` (most fragile first) raised as far as the remaining budget allows."""
    bits = [options[0]] * len(order)
    left = capacity - sum(bits)
    for layer in order:
        raise_by = min(options[-1] - options[0], left)
        bits[layer] += raise_by
        left -= raise_by
    assert left == 0 and sum(bits) == capacity
    return bits


def _rank(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return torch.tensor(ranks)


def spearman(a, b) -> float:
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm() + 1e-12))


def report(name, quant, loader, job, options, capacity, order, policy=None):
    n = quant.num_layers
    static = torch.tensor(greedy_bits(order, options, capacity), dtype=torch.float32)
    line = {"fp": _accuracy(quant, loader, job)}
    for o in options[:3]:
        line[f"all{o}"] = _accuracy(quant, loader, job, _constant(n, o))
    rand = random_policy(n, len(options), 0)
    line["random"] = _accuracy(quant, loader, job, lambda x: allocate(rand, x, options, capacity, job.profits))
    line["greedy"] = _accuracy(quant, loader, job, lambda x: static.to(x.device).expand(x.shape[0], n))
    if policy is not None:
        line["own"] = _accuracy(quant, loader, job, lambda x: allocate(policy, x, options, capacity, job.profits))
    print(f"{name:>12}: " + "  ".join(f"{k} {v:5.1f}" for k, v in line.items()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", required=True)
    parser.add_argument("--pairs", nargs="*", default=[])
    parser.add_argument("--version", default="I")
    parser.add_argument("--budget", default="A")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int, default=400)
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    args = parser.parse_args()
    cfg = config.load(args.configfile)
    job = Job.from_config(0, cfg)
    loader = subset_loader(job, args.split, args.max_examples)
    white = checkpoint.white_box(args.network, job.rt, job.data.image_size, job.quant)
    pairs = cfg["pairs"]
    options, capacity = budgets.cell(white.num_layers, pairs["versions"][args.version], pairs["budgets"][args.budget],
                                     pairs["budget_offset"][args.version])
    print(f"{args.network}: N = {white.num_layers}, options {options}, C = {capacity}, split {args.split}")
    fp = _accuracy(white, loader, job)
    sens = sensitivity(job, white, loader, options[0])
    drops = [fp - s for s in sens]
    order = sorted(range(len(drops)), key=lambda layer: -drops[layer])
    names = {id(m): n for n, m in white.model.named_modules()}
    print("most fragile layers alone at", options[0], "bits (drop in points):")
    for layer in order[:12]:
        print(f"  layer {layer + 1:3d} {names[id(white.layers[layer])]:<40} {drops[layer]:6.1f}")
    print(f"  layers with a drop > 1 point: {sum(d > 1 for d in drops)}; > 5 points: {sum(d > 5 for d in drops)}")
    report("W", white, loader, job, options, capacity, order)
    for path in args.pairs:
        pair = checkpoint.pair(path, job.rt, job.data.image_size, job.quant)
        report(path.split("/")[-1].removesuffix(".pt"), pair.quant, loader, job, pair.options, pair.capacity, order,
               pair.policy)
        with torch.no_grad():
            mean_bits = torch.zeros(white.num_layers)
            count = 0
            for images, _ in loader:
                x = network_input(images, job.rt)
                b = allocate(pair.policy, x, pair.options, pair.capacity, job.profits)
                mean_bits += b.sum(0).cpu()
                count += len(b)
            mean_bits /= count
        print(f"{'':>14}mean bits on W's 8 most fragile layers: "
              + " ".join(f"{mean_bits[layer]:.1f}" for layer in order[:8])
              + f"; spearman(bits, drop) = {spearman(mean_bits.tolist(), drops):+.2f}")


if __name__ == "__main__":
    main()
