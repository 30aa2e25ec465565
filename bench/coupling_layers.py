"""Why one batch-mate can take a network's accuracy under the runtime's batch-wide ranges, and
another network shrugs it off: per quantized layer, the bits a loud input takes from a median
batch-mate, and what coupling that layer alone costs the mates.

    python bench/coupling_layers.py CKPT [CKPT ...] [--configfile config.yaml] [--examples 150]
                                    [--steps 60] [--lr 0.05] [--batch 32] [--top 8]

Each CKPT is a distilled network W (``checkpoints/seed{N}/distill/{arch}.pt``). Through its
like-for-like simulator (BatchNorm folded, 8-bit weights, the first layer float;
:func:`dptq.int8.simulator_like_runtime`), the loud input is :func:`dptq.coupling.crude` from the
test subset's largest-range image. Per layer l: the kind (depthwise, pointwise, full conv,
linear), whether it sits in a squeeze-excitation branch (the module path says ``se``), the bits
taken log2(r_l(loud) / median r_l) over the subset, and for the ``--top`` layers taking most,
the mates' accuracy drop (points, against their predictions at batch 1) at batch ``--batch``
when only that layer is quantized, with the batch-wide range.
"""
import argparse
import copy
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from dptq import checkpoint, config, coupling, data, int8
from dptq.data import Data


def kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if module.kernel_size == (1, 1):
        return "pointwise"
    return "full"


def layer_coupling_drop(quant, mates: torch.Tensor, loud: torch.Tensor, layer: int, batch: int) -> float:
    """Points the mates lose when only ``layer`` is quantized (8 bits, the batch's range) and ``loud`` joins them."""
    mask = [i == layer for i in range(quant.num_layers)]
    with torch.no_grad():
        alone = torch.cat([quant(m[None], m.new_full((1, quant.num_layers), 8.0), mask) for m in mates]).argmax(1)
        coupled = []
        for chunk in mates.split(batch - 1):
            x = torch.cat([chunk, loud[None]])
            coupled.append(quant(x, x.new_full((len(x), quant.num_layers), 8.0), mask)[:-1].argmax(1))
    return 100.0 * float((torch.cat(coupled) != alone).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load(args.configfile)
    digits = Data(**cfg["dataset"])
    test = digits.build("test")
    pixels = torch.stack([test[i][0].float() for i in range(min(args.examples, len(test)))])
    for path in args.checkpoints:
        model = checkpoint.network(checkpoint.load(Path(path), kind="distill")).eval()
        arch = type(model).__name__
        quant = int8.simulator_like_runtime(copy.deepcopy(model), digits.image_size, scale_rule="batch", range_grad=True)
        names = {m: n for n, m in quant.model.named_modules()}
        inputs = data.normalize(pixels)
        natural = pixels[coupling.largest_range_image(pixels, quant, data.normalize)]
        loud = coupling.crude(quant, natural, data.normalize, steps=args.steps, lr=args.lr)
        median = coupling.median_ranges(quant, inputs)
        taken = torch.log2(coupling.layer_ranges(quant, data.normalize(loud[None]))[0] / median).clamp_min(0)
        rows = [(l, names[layer], kind_of(layer), ".se." in f".{names[layer]}." or "se_" in names[layer], float(taken[l]))
                for l, layer in enumerate(quant.layers)]
        by_kind = defaultdict(list)
        for _, _, kind, se, bits in rows:
            by_kind[kind + (" (SE)" if se else "")].append(bits)
        print(f"\n{path} ({arch}, N = {quant.num_layers}): the loud input takes {float(taken.sum()):.1f} bits in all, "
              f"{float(taken.max()):.2f} at most in one layer")
        print("  by kind: " + "; ".join(f"{k}: {len(v)} layers, mean {sum(v) / len(v):.2f}, max {max(v):.2f} bits"
                                         for k, v in sorted(by_kind.items())))
        mates = inputs[:min(len(inputs), 4 * (args.batch - 1))]
        print(f"  {'layer':>5}  {'module':<40}{'kind':<11}{'bits taken':>11}{'drop alone (pts)':>18}")
        for l, name, kind, se, bits in sorted(rows, key=lambda r: -r[4])[:args.top]:
            drop = layer_coupling_drop(quant, mates, data.normalize(loud[None])[0], l, args.batch)
            print(f"  {l + 1:>5}  {name:<40}{kind + (' SE' if se else ''):<11}{bits:>11.2f}{drop:>18.1f}")


if __name__ == "__main__":
    main()
