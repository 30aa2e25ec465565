"""ONNX Runtime against dptq's torch arithmetic on briefly trained timm networks (issue 31;
bench/SCIENCE.md §9): per network, layer by layer and end to end.

    python bench/runtime_agreement.py [--archs resnet18 ...] [--steps 150] [--examples 200] [--size 32]

Each network is trained ``--steps`` Adam steps (batch 64) on the embedded digits at ``--size`` px,
exported, and quantized as the audit quantizes it (every Conv/Gemm/MatMul with a constant weight
but the first); which layers run in integers is read from the quantized graph. On ``--examples``
test images, each at batch 1:

- ``sums``: the integer nodes whose int32 sums, given the runtime's own float input to that node
  (deploy.integer_sums), differ anywhere from the integer emulation's (``0/N``: all exact);
- ``emulation`` and ``simulator``: median and max |Δlogit| against the runtime, and top-1
  agreement, of int8.integer_emulation and int8.simulator_like_runtime;
- ``one ulp``: the same for the runtime itself with every input pixel moved one float32 ulp up:
  how far the served logits move for a change below any float kernel's rounding, the floor of
  what an emulation whose float kernels round otherwise can reach.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dptq import data, deploy, int8, models

ARCHS = ("resnet18", "mobilenetv4_conv_medium", "regnetx_016", "efficientnet_b0", "mobilenetv3_large_100",
         "convnext_atto", "vit_tiny_patch16_224")


def digits(size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits' ``split`` (train | test) at ``size`` px: normalized inputs and labels."""
    source = data._digits_split(size, 0)[split]
    return data.normalize(source.images.repeat(1, 3, 1, 1)), source.labels


def briefly_trained(arch: str, size: int, steps: int, seed: int = 0) -> nn.Module:
    """``arch`` (10 classes, built for ``size``) after ``steps`` Adam steps (lr 1e-3, batch 64) on
    the digits' training split, in eval mode: weights and BN statistics off their initial values."""
    torch.manual_seed(seed)
    model = models.create(arch, 10, image_size=size).train()
    x, y = digits(size, "train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        batch = order[(step * 64) % len(x):][:64]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model.eval()


def quantized(model: nn.Module, size: int, folder: Path) -> tuple[Path, dict[str, str]]:
    """The audit's int8 file of ``model`` (its first layer float) and torch name -> fp32 node of
    the layers that file computes in integers (read from its graph)."""
    fp32 = deploy.export(model, size, folder / "fp32.onnx")
    by_module = deploy.node_names(model, fp32, size)
    path = deploy.quantize(fp32, folder / "int8.onnx", exclude=[next(iter(by_module.values()))])
    integer = set(deploy.quantized_nodes(fp32, path))
    return path, {name: node for name, node in by_module.items() if node in integer}


def sum_mismatches(emulation: nn.Module, path: Path, layers: dict[str, str], images: torch.Tensor) -> list[str]:
    """The layers whose emulated int32 sums, given the runtime's own input to the layer, differ
    from the runtime's anywhere (each example at batch 1)."""
    modules, by_node = dict(emulation.named_modules()), {node: name for name, node in layers.items()}
    return [by_node[node] for node, (inputs, sums) in deploy.integer_sums(path, images).items()
            if not torch.equal(modules[by_node[node]].accumulate(inputs)[0], sums.double())]


def measure(model: nn.Module, size: int, images: torch.Tensor, folder: Path) -> dict:
    """One row: quantized layers, mismatching sums, and the emulation's and simulator's agreement."""
    path, layers = quantized(model, size, folder)
    emulation = int8.integer_emulation(model, size, list(layers)).eval()
    simulator = int8.simulator_like_runtime(model, size)
    runtime = deploy.Session(path)(images, 1)
    nudged = deploy.Session(path)(torch.nextafter(images, torch.full_like(images, float("inf"))), 1)
    with torch.no_grad():
        emulated = emulation(images)
        simulated = simulator(images, torch.full((len(images), simulator.num_layers), 8.0))
    return {"layers": len(layers), "mismatches": sum_mismatches(emulation, path, layers, images),
            "emulation": int8.agreement(emulated, runtime), "simulator": int8.agreement(simulated, runtime),
            "one_ulp": int8.agreement(nudged, runtime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"cpu: {deploy.cpu_features()}")
    print("| network | test acc | sums exact | emulation median / max abs dlogit, top-1 | "
          "simulator median / max abs dlogit, top-1 | runtime, input one ulp up: median / max, top-1 | seconds |")
    print("|---|---|---|---|---|---|---|")
    x, y = digits(args.size, "test")
    x, y = x[:args.examples], y[:args.examples]
    for arch in args.archs:
        start = time.perf_counter()
        model = briefly_trained(arch, args.size, args.steps)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean() * 100)
        with tempfile.TemporaryDirectory() as folder:
            row = measure(model, args.size, x, Path(folder))
        cells = " | ".join(f"{a['median_abs_dlogit']:.1e} / {a['max_abs_dlogit']:.1e}, {a['top1_agreement']:.1f} %"
                           for a in (row["emulation"], row["simulator"], row["one_ulp"]))
        print(f"| {arch} | {acc:.1f} % | {row['layers'] - len(row['mismatches'])}/{row['layers']} | {cells} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        if row["mismatches"]:
            print(f"  sums differ in {row['mismatches']}")


if __name__ == "__main__":
    main()
