"""The audit's four bit controllers on briefly trained timm networks (issue 31): is the learned
worst case at or below both heuristics (random and greedy)?

    python bench/controllers.py [--archs resnet18 ...] [--steps 150] [--seed 0] [--cache DIR]
                                [--cells I-A] [--set audit.policy.start=greedy ...]

Each network is trained as bench/runtime_agreement.py trains it (``--steps`` Adam steps on the
embedded digits at 32 px, training seed ``--seed``) or read from ``--cache``/{arch}_s{seed}_{steps}.pt,
then audited by the package's own simulated part (:func:`dptq.audit.simulate`: sensitivity scan,
uniform / random / greedy / learned controllers, worst case on the test split) with the repository's
config.yaml; the runtime and coupling parts are skipped, and so are the float layers
(``max_float_layers: 0``), which do not change the four controllers' accuracies.
"""
import argparse
import functools
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dptq import analysis, audit, checkpoint, config, data, evaluate
from dptq.data import Data
from dptq.runtime import Runtime

from runtime_agreement import ARCHS, briefly_trained

ROOT = Path(__file__).resolve().parents[1]


def weights(arch: str, steps: int, seed: int, cache: Path) -> Path:
    """The state dict file of ``arch`` briefly trained (made once per arch, steps and seed)."""
    path = cache / f"{arch}_s{seed}_{steps}.pt"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(briefly_trained(arch, 32, steps, seed).state_dict(), path)
    return path


def overrides(cells: list[str], settings: list[str]) -> dict:
    """The config overrides: the cells, no float layers, and each ``key.path=value`` of ``--set``."""
    merged = {"audit": {"cells": cells, "max_float_layers": 0}}
    for setting in settings:
        key, value = setting.split("=", 1)
        nested = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        merged = config.merge(merged, nested)
    return merged


def controllers(arch: str, path: Path, cfg: dict, out_dir: Path) -> tuple[float, list, dict]:
    """(FP test accuracy, the cells' results, the audit's seconds) of the simulated audit of ``arch``."""
    spec = {"arch": arch, "weights": str(path), "image_size": 32}
    data_ = Data(**{**cfg["dataset"], "image_size": 32})
    seed = cfg["dataset"]["split_seed"]
    job = analysis.Job(seed, Runtime(seed, **cfg["runtime"]), data_, dict(cfg["quant"]), cfg["pairs"]["policy"]["profits"],
                       cfg["evaluate"]["batch_size"])
    ctx = audit.Context(job, functools.partial(data.normalize, mean=data.MEAN, std=data.STD), out_dir, seed)
    test_set = data_.build("test")
    model = audit.subject(spec, test_set.classes, where=f"bench {arch}", image_size=32)
    simulated = checkpoint.quantizer(model, ctx.rt, 32, **cfg["quant"])
    test = data_.loader(test_set, cfg["evaluate"]["batch_size"], ctx.rt)
    fp_preds, labels = evaluate.predict(simulated, test, ctx.rt, normalize=ctx.normalize)
    fp_acc = evaluate.accuracy(fp_preds, labels)
    subset = analysis.subset_loader(job, "test", cfg["analysis"]["max_examples"])
    cells = audit.grid_cells(cfg["pairs"], cfg["audit"]["cells"], simulated.num_layers, arch)
    seconds: dict = {}
    found = audit.simulate(ctx, model, simulated, arch, cells, test, subset, labels, fp_acc, pairs=cfg["pairs"],
                           audit={k: cfg["audit"][k] for k in audit.AUDIT_KEYS}, quant=cfg["quant"],
                           random_policy_seed=cfg["evaluate"]["random_policy_seed"], seconds=seconds)
    return fp_acc, found.cells, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="the networks' training seed")
    parser.add_argument("--cache", type=Path, help="folder of the trained state dicts (default: a temporary one)")
    parser.add_argument("--cells", nargs="+", default=["I-A"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. audit.policy.start=greedy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.load([ROOT / "config.yaml"], overrides(args.cells, args.set))
    print(f"audit.policy: {cfg['audit']['policy']}")
    print("| network | cell | fp acc | uniform | random | greedy | learned | learned <= min(random, greedy) | policy s | all s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    beats = total = 0
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or Path(scratch) / "weights"
        for arch in args.archs:
            start = time.perf_counter()
            path = weights(arch, args.steps, args.seed, cache)
            fp_acc, cells, seconds = controllers(arch, path, cfg, Path(scratch) / arch)
            for cell in cells:
                acc = cell.acc
                beats, total = beats + cell.learned_beats_heuristics, total + 1
                print(f"| {arch} | {cell.cell} | {fp_acc:.1f} | {acc['uniform']:.1f} | {acc['random']:.1f} | "
                      f"{acc['greedy']:.1f} | {acc['learned']:.1f} | {'yes' if cell.learned_beats_heuristics else 'no'} | "
                      f"{seconds['policies']:.0f} | {time.perf_counter() - start:.0f} |", flush=True)
    print(f"learned at or below both heuristics: {beats}/{total}")


if __name__ == "__main__":
    main()
