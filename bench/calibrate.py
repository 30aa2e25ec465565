"""A fixed workload that says how fast this machine is today: plain timm ResNet18 training steps
on random 32 px images, untouched by the project's rewrites (no one-pixel fold, no quantization).
Quote its time beside any wall time measured in the same session: machines here vary 2-2.5x.

    python bench/calibrate.py [--steps 30] [--batch 32] [--threads 1]
"""
import argparse
import time

import timm
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = 1000 * (time.perf_counter() - start) / args.steps
    print(f"calibration: timm resnet18, 32 px, batch {args.batch}, {args.threads} thread(s): {ms:.1f} ms/step "
          f"over {args.steps} steps (torch {torch.__version__})")


if __name__ == "__main__":
    main()
