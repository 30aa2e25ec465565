"""MCKP solve time per batch next to the policy's forward time, measured in one run.

    python bench/mckp.py [--device cpu|cuda] [--threads 1] [--repeats 5]

For each network's N (20, 59, 77) at K = 8 (version I) and the budget B capacity, batches of 64
and 256: the median solve time (on a GPU with Triton: the one-kernel program, dptq.mckp_kernel),
the policy CNN's forward time at 64 px on the same batch, and the batched program's time
(mckp.dp_picks: the solve itself on the CPU); "same": both give the same allocation.
"""
import argparse

import torch

from _timing import median_ms
from dptq import budgets, mckp
from dptq.policy import BitPolicy

NETWORKS = {"resnet18": 20, "regnetx_016": 59, "mobilenetv4_conv_medium": 77}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = budgets.options(3, 10)
    print(f"device={device} threads={args.threads} K={len(options)}")
    print(f"{'network':<26}{'N':>4}{'C':>5}{'batch':>7}{'mckp ms':>10}{'policy ms':>11}{'ratio':>7}{'program ms':>12}  same")
    for name, n in NETWORKS.items():
        capacity = budgets.capacity(n, 5.5, 0)
        policy = BitPolicy(n, len(options), 64, 32).to(device).eval()
        for batch in (64, 256):
            images = torch.randn(batch, 3, 64, 64, device=device)
            profits = torch.randn(batch, n, len(options), device=device)
            solve = median_ms(lambda: mckp.solve(profits, options, capacity), device, args.repeats)
            program = median_ms(lambda: mckp.dp_picks(profits, options, capacity), device, args.repeats)
            same = torch.equal(mckp.solve(profits, options, capacity).argmax(-1), mckp.dp_picks(profits, options, capacity))
            with torch.no_grad():
                forward = median_ms(lambda: policy(images), device, args.repeats)
            print(f"{name:<26}{n:>4}{capacity:>5}{batch:>7}{solve:>10.2f}{forward:>11.2f}{solve / forward:>7.2f}"
                  f"{program:>12.2f}  {same}")


if __name__ == "__main__":
    main()
