"""Where to put the range guard's threshold: the score distributions of clean, corrupted and
attacking inputs, and the shares each candidate threshold serves alone.

    python bench/coupling_guard.py CKPT [CKPT ...] [--configfile config.yaml] [--examples 150]
                                   [--steps 60] [--lr 0.05]

For each distilled network W: scores s(x) = bits taken from the calibration set's median image
(:func:`dptq.coupling.bits_taken`, the like-for-like simulator's full-precision network) of the
calibration images (the train subset, as the audit takes it), the clean test subset, its pixel
corruptions at the highest degree, and the crude and crafted attackers; then, for thresholds at
calibration quantiles and at the calibration maximum plus a margin, the shares of clean and
corrupted test images over it, and whether the attackers are.
"""
import argparse
import copy
from pathlib import Path

import torch

from dptq import checkpoint, config, coupling, data, int8
from dptq.corruptions import corrupt
from dptq.data import Data


def subset(split, n: int) -> torch.Tensor:
    return torch.stack([split[i][0].float() for i in range(min(n, len(split)))])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load(args.configfile)
    digits = Data(**cfg["dataset"])
    clean, calibration = subset(digits.build("test"), args.examples), subset(digits.build("train"), args.examples)
    names = [n for n in cfg["analysis"]["corruptions"]["names"] if n != "distribution_shift"]
    corrupted = torch.cat([corrupt(clean, n, cfg["analysis"]["corruptions"]["degrees"], 0)[0] for n in names])
    for path in args.checkpoints:
        model = checkpoint.network(checkpoint.load(Path(path), kind="distill")).eval()
        quant = int8.simulator_like_runtime(copy.deepcopy(model), digits.image_size, scale_rule="batch", range_grad=True)
        norm = data.normalize
        median = coupling.median_ranges(quant, norm(calibration))
        score = lambda pixels: torch.cat([coupling.bits_taken(quant, norm(c), median) for c in pixels.split(256)])  # noqa: E731
        natural = clean[coupling.largest_range_image(clean, quant, norm)]
        rough = coupling.crude(quant, natural, norm, steps=args.steps, lr=args.lr)
        crafted = coupling.craft(quant, calibration, norm, init=rough, steps=args.steps, lr=args.lr)
        s = {"calibration": score(calibration), "clean": score(clean), "corrupted": score(corrupted)}
        attackers = {"crude": float(score(rough[None])), "crafted": float(score(crafted[None]))}
        per_kind = {n: score(c) for n, c in zip(names, corrupted.split(len(clean)))}
        print(f"\n{path}: scores (bits taken from the median calibration image)")
        for k, v in s.items():
            q = torch.quantile(v, torch.tensor([0.5, 0.9, 0.99, 1.0]))
            print(f"  {k:<12} median {q[0]:6.2f}  90 % {q[1]:6.2f}  99 % {q[2]:6.2f}  max {q[3]:6.2f}")
        print("  corruptions, max: " + ", ".join(f"{n} {float(v.max()):.1f}" for n, v in per_kind.items()))
        print("  attackers: " + ", ".join(f"{k} {v:.1f}" for k, v in attackers.items()))
        top = float(s["calibration"].max())
        candidates = [(f"quantile {q}", float(torch.quantile(s["calibration"], q / 100))) for q in (99.0, 99.5, 100.0)]
        candidates += [(f"max + {m} bits", top + m) for m in (1, 2, 4, 8)] + [(f"max x {f}", top * f) for f in (1.5, 2, 3)]
        print(f"  {'threshold':<16}{'bits':>7}{'clean alone %':>15}{'corrupted alone %':>19}  attackers alone")
        for name, t in candidates:
            flagged = [k for k, v in attackers.items() if v > t]
            print(f"  {name:<16}{t:>7.2f}{100 * float((s['clean'] > t).float().mean()):>15.1f}"
                  f"{100 * float((s['corrupted'] > t).float().mean()):>19.1f}  {', '.join(flagged) or '-'}")


if __name__ == "__main__":
    main()
