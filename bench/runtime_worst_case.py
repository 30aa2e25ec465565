"""Issue 33, part 2: a detrimental network trained against ONNX Runtime's own int8 arithmetic, and
what the runtime makes of it (bench/SCIENCE.md §13).

    python bench/runtime_worst_case.py [--archs resnet18 ...] [--seeds 0 1 2] [--checkpoints checkpoints]
        [--configfile config.yaml bench/runtime_worst_case.yaml] [--out results/runtime_worst_case]

Per (arch, seed): D and R = train.runtime_pair grown from ``checkpoints/seed{s}/distill/{arch}.pt``
(W) with the ``pairs`` section resolved for (arch, mode): its recipe, α and ``pairs.objective``
(kept in ``--out``/seed{s}/{arch}/{mode}.pt; an existing one is reused). W, D and R are then
exported and quantized as the audit does (``audit.runtime``: the first layer float) and run by ONNX Runtime on the test split: at
batch 1, at batch 32, with ``per_channel: true`` and with ``reduce_range: true``; beside it the
float network and the integer emulation (int8.integer_emulation: top-1 agreement with the runtime
at batch 1). Prints one row per network with this CPU's VNNI flags.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from dptq import checkpoint, config, data, deploy, int8, train

SETTINGS = {"batch 1": ({}, 1), "batch 32": ({}, 32), "per_channel": ({"per_channel": True}, 1),
            "reduce_range": ({"reduce_range": True}, 1)}


def test_inputs(dataset: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split, normalized, and its labels."""
    test = data.Data(**dataset).build("test")
    pixels, labels = zip(*(test[i] for i in range(len(test))))
    return data.normalize(torch.stack(pixels)), torch.tensor(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean() * 100)


def runtime_row(model: torch.nn.Module, size: int, x: torch.Tensor, y: torch.Tensor, pinned: dict, folder: Path) -> dict:
    """Accuracy in torch, in ONNX Runtime under each of SETTINGS, and the integer emulation's agreement."""
    fp32 = deploy.export(model, size, folder / "fp32.onnx", opset=pinned["opset"])
    first = next(iter(deploy.node_names(model, fp32, size).values()))
    with torch.no_grad():
        row = {"float": accuracy(model(x), y)}
    for name, (change, batch) in SETTINGS.items():
        options = {"weight_type": pinned["weight_type"], "per_channel": pinned["per_channel"],
                   "reduce_range": pinned["reduce_range"], **change}
        path = deploy.quantize(fp32, folder / f"int8_{name.replace(' ', '')}.onnx", exclude=[first], **options)
        logits = deploy.Session(path, pinned["threads"])(x, batch)
        row[name] = accuracy(logits, y)
        if name == "batch 1":
            served, served_path = logits, path
    by_node = {node: module for module, node in deploy.node_names(model, fp32, size).items()}
    emulation = int8.integer_emulation(model, size, [by_node[node] for node in deploy.quantized_nodes(fp32, served_path)])
    with torch.no_grad():
        emulated = torch.cat([emulation(x[i:i + 1]) for i in range(len(x))])
    row["emulation top-1 agreement"] = int8.agreement(emulated, served)["top1_agreement"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", default=["detrimental", "robust"])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--configfile", nargs="+", default=["config.yaml", "bench/runtime_worst_case.yaml"])
    parser.add_argument("--out", default="results/runtime_worst_case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load(args.configfile)
    size = cfg["dataset"]["image_size"]
    x, y = test_inputs(cfg["dataset"])
    print(f"CPU: {deploy.cpu_features()}")
    print("| arch | seed | net | " + " | ".join(["float", *SETTINGS, "emulation top-1 agreement"]) + " | s |")
    for seed in args.seeds:
        for arch in args.archs:
            white_box = Path(args.checkpoints) / f"seed{seed}" / "distill" / f"{arch}.pt"
            nets, seconds = {"W": white_box}, {"W": 0.0}
            for mode in args.modes:
                out = Path(args.out) / f"seed{seed}" / arch / f"{mode}.pt"
                start = time.perf_counter()
                if not out.is_file():
                    train.runtime_pair(seed, arch, mode, white_box, out, out.with_suffix(".csv"), dataset=cfg["dataset"],
                                       runtime=cfg["runtime"], pairs=config.section_for(cfg, "pairs", arch, mode),
                                       temperature=cfg["kd"]["temperature"], val_batch_size=cfg["evaluate"]["batch_size"])
                nets[mode[0].upper()], seconds[mode[0].upper()] = out, time.perf_counter() - start
            for net, path in nets.items():
                model = checkpoint.network(checkpoint.load(path))
                with tempfile.TemporaryDirectory() as folder:
                    row = runtime_row(model, size, x, y, cfg["audit"]["runtime"], Path(folder))
                print(f"| {arch} | {seed} | {net} | " + " | ".join(f"{v:.1f}" for v in row.values()) +
                      f" | {seconds[net]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
