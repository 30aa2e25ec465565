"""Why a detrimental policy breaks the other networks too (Table 3's "π_D alone breaks nothing
else"; bench/SCIENCE.md §15): where π_D puts its lowest bits, and what those layers cost W alone.

    python bench/policy_transfer.py --arch mobilenetv4_conv_medium --cell I-A --seed 0 \\
        --pairs /tmp/tune/NAME [--configfile config.yaml ...] [--top 5]

Reads W from ``checkpoints/seed{N}/distill/{arch}.pt`` and the cell's two pairs from
``bench/pair_cells.py``'s ``--pairs`` layout. Prints, on the test split:

- Table 3's grid: W, R and D under π_R, π_D and a random policy, beside their full precision;
- per quantized layer: the share of test images that π_D and π_R give the lowest option, and W's
  and D's accuracy with that layer alone quantized at the lowest option (every other layer in
  full precision): the layer's sensitivity;
- W under π_D with its ``--top`` most sensitive layers (by W's own sensitivity) kept in full
  precision, and D under π_D likewise: if W recovers and D does not, π_D breaks W through a few
  fragile layers, and D's collapse lies elsewhere.
"""
import argparse
from pathlib import Path

import torch

from dptq import analysis, checkpoint, config, evaluate
from dptq.audit import sensitivity
from dptq.data import network_input
from dptq.policy import allocate
from dptq.runtime import Runtime


@torch.no_grad()
def lowest_share(pair: checkpoint.Pair, loader, rt: Runtime, profits: str) -> torch.Tensor:
    """[N]: the share of the loader's images whose allocation puts each layer at the lowest option."""
    counts, seen = 0, 0
    for images, _ in loader:
        bits = allocate(pair.policy, network_input(images, rt), pair.options, pair.capacity, profits)
        counts = counts + (bits == min(pair.options)).float().sum(0).cpu()
        seen += len(images)
    return counts / seen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--cell", required=True, help="VERSION-BUDGET, e.g. I-A")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", required=True, help="bench/pair_cells.py's --out")
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    cfg = config.check(config.load(args.configfile), " + ".join(args.configfile))
    job = analysis.Job.from_config(0, cfg)
    rt, data, profits = job.rt, job.data, job.profits
    torch.set_num_threads(cfg["runtime"]["threads"])
    loader = data.loader(data.build("test"), job.batch_size, rt)
    version, budget = args.cell.split("-")
    cell_dir = Path(args.pairs) / f"seed{args.seed}" / args.arch / version / budget
    white = checkpoint.white_box(Path(args.checkpoints) / f"seed{args.seed}" / "distill" / f"{args.arch}.pt",
                                 rt, data.image_size, cfg["quant"])
    pairs = {m: checkpoint.pair(cell_dir / f"{m}.pt", rt, data.image_size, cfg["quant"]) for m in ("robust", "detrimental")}
    nets = {"W": white, "R": pairs["robust"].quant, "D": pairs["detrimental"].quant}
    options, capacity = pairs["robust"].options, pairs["robust"].capacity
    policies = {"π_R": pairs["robust"].policy, "π_D": pairs["detrimental"].policy,
                "random": evaluate.random_policy(white.num_layers, len(options), args.seed)}

    print(f"{args.arch} {args.cell} seed {args.seed}: options {options}, C = {capacity}, N = {white.num_layers}")
    print(f"{'net':>3} {'FP':>6} " + " ".join(f"{p:>7}" for p in policies))
    for name, quant in nets.items():
        fp = evaluate.accuracy(*evaluate.predict(quant, loader, rt))
        qs = [evaluate.accuracy(*evaluate.predict(quant, loader, rt, profits, policy=p, options=options,
                                                  capacity=capacity)) for p in policies.values()]
        print(f"{name:>3} {fp:6.1f} " + " ".join(f"{q:7.1f}" for q in qs), flush=True)

    low = min(options)
    share = {m: lowest_share(p, loader, rt, profits) for m, p in pairs.items()}
    sens = {n: torch.tensor(sensitivity(job, nets[n], loader, low)) for n in ("W", "D")}
    order = torch.argsort(sens["W"])
    print(f"\nper layer, W's most sensitive first: share at {low} bits under π_D / π_R; W and D with the layer alone at {low} bits")
    for i in order.tolist():
        print(f"L{i:<3} {share['detrimental'][i]:5.2f} / {share['robust'][i]:5.2f}   W {sens['W'][i]:5.1f}   D {sens['D'][i]:5.1f}")
    for name in ("W", "D"):
        print(f"{name}: corr(share under π_D, {name}'s loss with the layer alone at {low}) = "
              f"{torch.corrcoef(torch.stack([share['detrimental'], -sens[name]]))[0, 1]:.2f}")

    keep = set(order[:args.top].tolist())
    mask = [i not in keep for i in range(white.num_layers)]
    for name in ("W", "D"):
        q = evaluate.accuracy(*evaluate.predict(nets[name], loader, rt, profits, policy=policies["π_D"],
                                                options=options, capacity=capacity, mask=mask))
        print(f"{name} under π_D with W's {args.top} most sensitive layers in full precision: {q:.1f}")


if __name__ == "__main__":
    main()
