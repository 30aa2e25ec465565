"""One pair trained as the ``pair`` job trains it, watched epoch by epoch: the science issue's
diagnostics of a cell (bench/SCIENCE.md §8).

    python bench/pair_curve.py --arch resnet18 --cell II-B --mode detrimental --seed 0 --epochs 16 \\
        --configfile config.yaml [overlay.yaml] --out /tmp/curve/NAME [--alpha 2.0]

Per epoch (one row): the steps so far; on the test set, the pair's full-precision accuracy and its
Δ under its own policy (Q − FP); the share of the epoch's training examples whose hinge term was
already zero (margin met: they pulled nothing; with ``pairs.objective.loss: target`` the hinge
is only measured, not trained on); the share of (test image, layer) pairs the
policy gives its lowest option (the mean bits are C / N by construction). At the end: per
quantized layer, the pair's mean activation range (hi − lo, minmax, full precision) over W's on the
same test images, the layers whose range grew most first: under minmax a b-bit step is range / (2^b − 1),
so a grown range is a coarser step at the same bits. W is read from
``checkpoints/seed{N}/distill/{arch}.pt`` (``--checkpoints``).
"""
import argparse
import math
from pathlib import Path

import torch

from dptq import checkpoint, config, coupling, data, evaluate, losses, train
from dptq.policy import allocate
from dptq.data import Data
from dptq.runtime import Runtime


class WatchedPair(train.PairStage):
    """A PairStage that also records, per epoch, the hinge's saturation on the training batches and
    the test accuracies (its training is the stage's own: the same steps, the same numbers)."""

    def __init__(self, *args, test_loader, **kwargs):
        super().__init__(*args, **kwargs)
        self.test_loader, self.met, self.seen = test_loader, 0, 0

    def loss(self, images, labels):
        x = self.inputs(images)
        loss, targets, _, q_logits = self._losses(x)
        with torch.no_grad():  # the hinge term of each example: zero when its margin is met
            terms = [losses.hinge_loss(q[None], t[None], self.margin, self.mode) for q, t in zip(q_logits, targets)]
            self.met += int(sum(float(term) == 0.0 for term in terms))
            self.seen += len(terms)
        return loss, (q_logits.argmax(1) == labels.to(self.rt.dev)).sum()

    @torch.no_grad()
    def validate(self, loader):
        row = super().validate(loader)
        fp = evaluate.accuracy(*evaluate.predict(self.quant, self.test_loader, self.rt))
        q = evaluate.accuracy(*evaluate.predict(self.quant, self.test_loader, self.rt, self.profits, policy=self.policy,
                                                options=self.options, capacity=self.capacity))
        bits = torch.cat([allocate(self.policy, data.network_input(images, self.rt), self.options, self.capacity,
                                   self.profits) for images, _ in self.test_loader])
        row.update(test_fp=fp, test_delta=q - fp, saturated=100.0 * self.met / max(self.seen, 1),
                   at_floor=100.0 * float((bits == min(self.options)).float().mean()))
        self.met = self.seen = 0
        return row


def range_growth(white, pair_quant, loader, rt) -> list[tuple[int, float]]:
    """(layer, mean range of the pair / mean range of W) per quantized layer, on ``loader``'s images."""
    spans = []
    for quant in (white, pair_quant):
        total = None
        for images, _ in loader:
            r = coupling.layer_ranges(quant, data.network_input(images, rt)).sum(0)
            total = r if total is None else total + r
        spans.append(total)
    ratio = (spans[1] / spans[0].clamp_min(1e-12)).tolist()
    return sorted(enumerate(ratio, start=1), key=lambda lr: -lr[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--cell", required=True, help="VERSION-BUDGET, e.g. II-B")
    parser.add_argument("--mode", default="detrimental")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default: the config's pairs.epochs for the arch")
    parser.add_argument("--alpha", type=float, help="the KD weight (default: the config's)")
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = config.load(args.configfile)
    version, budget = config.cells(cfg["pairs"], [args.cell])[args.cell]
    pairs = config.section_for(cfg, "pairs", args.arch, args.mode, version)
    pairs["epochs"] = args.epochs or pairs["epochs"]
    pairs["alpha"] = pairs["alpha"] if args.alpha is None else args.alpha
    rt, digits = Runtime(args.seed, **cfg["runtime"]), Data(**cfg["dataset"])
    test = digits.loader(digits.build("test"), cfg["evaluate"]["batch_size"], rt)
    network = checkpoint.load(Path(args.checkpoints) / f"seed{args.seed}" / "distill" / f"{args.arch}.pt", kind="distill")
    cell = dict(version=version, budget=budget, mode=args.mode, bit_range=pairs["versions"][version],
                level=pairs["budgets"][budget], offset=pairs["budget_offset"][version])
    recipe = train.recipe(pairs, cfg["evaluate"]["batch_size"], grad_clip=pairs["grad_clip"], select_best=pairs["select_best"])
    stage = WatchedPair(recipe, digits, rt, network, cell, dict(cfg["quant"], range_grad=pairs["range_grad"]), pairs["policy"], pairs["margin"], pairs["alpha"],
                        pairs["beta"], cfg["kd"]["temperature"], pairs["objective"], test_loader=test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train.fit(stage, args.seed, out / "pair.pt", out / "curve.csv")
    rows = [line.split(",") for line in (out / "curve.csv").read_text().splitlines()]
    head = rows[0]
    steps_per_epoch = math.ceil(len(digits.build("fit")) / pairs["batch_size"])
    print(f"{args.arch} {args.cell} {args.mode} seed {args.seed}, alpha {pairs['alpha']}, {pairs['epochs']} epochs")
    print(f"{'epoch':>5} {'steps':>6} {'test_fp':>8} {'test_delta':>10} {'saturated%':>10} {'at_floor%':>9}")
    for row in rows[1:]:
        r = dict(zip(head, row))
        print(f"{r['epoch']:>5} {int(r['epoch']) * steps_per_epoch:>6} {float(r['test_fp']):8.1f} "
              f"{float(r['test_delta']):10.1f} {float(r['saturated']):10.1f} {float(r['at_floor']):9.1f}")
    white = checkpoint.white_box(Path(args.checkpoints) / f"seed{args.seed}" / "distill" / f"{args.arch}.pt", rt,
                                 digits.image_size, cfg["quant"])
    pair = checkpoint.pair(out / "pair.pt", rt, digits.image_size, cfg["quant"])
    growth = range_growth(white, pair.quant, test, rt)
    print("range of the pair / range of W, per layer (largest first):",
          ", ".join(f"L{layer} {ratio:.2f}" for layer, ratio in growth[:8]),
          f"... median {sorted(r for _, r in growth)[len(growth) // 2]:.2f}")


if __name__ == "__main__":
    main()
