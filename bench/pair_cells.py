"""The reduced protocol for tuning the pair recipe: a few cells of one arch, a few seeds, minutes
per try instead of the whole DAG.

    python bench/pair_cells.py --arch mobilenetv4_conv_medium --cells I-A II-A --seeds 0 1 2 \\
        --configfile config.yaml [overlay.yaml] --out /tmp/tune/NAME [--jobs 2]

Each seed's distilled network is read from ``checkpoints/seed{N}/distill/{arch}.pt`` (run the
pipeline's distill target first). Every (seed, cell, mode) pair is trained exactly as the
``pair`` job trains it (``dptq.train.train_pair`` with the config's sections), into ``--out``;
pairs already there are reused. Then one row per (seed, cell) with the test accuracies and
whether the cell meets the effect (docs/method.md §2.12; the bar of the science issue):
D's Δ ≤ −20, R's Δ ≥ −3, |FP_R − FP_D| ≤ 2, both FP within 3 of W, W ≥ 90.
"""
import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from dptq import checkpoint, config, evaluate, train
from dptq.data import Data
from dptq.runtime import Runtime


def _train(job):
    seed, arch, version, budget, mode, network, out, cfg = job
    torch.set_num_threads(cfg["runtime"]["threads"])
    train.train_pair(seed, arch, version, budget, mode, network, out, out.with_suffix(".csv"),
                     dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"],
                     pairs=config.section_for(cfg, "pairs", arch, mode, version), temperature=cfg["kd"]["temperature"],
                     val_batch_size=cfg["evaluate"]["batch_size"])
    return out


def meets(row: dict) -> bool:
    return (row["D_delta"] <= -20 and row["R_delta"] >= -3 and abs(row["R_fp"] - row["D_fp"]) <= 2
            and abs(row["R_fp"] - row["W"]) <= 3 and abs(row["D_fp"] - row["W"]) <= 3 and row["W"] >= 90)


def evaluate_cell(cfg, network: Path, pairs: dict[str, Path]) -> dict:
    rt, data = Runtime(0, **cfg["runtime"]), Data(**cfg["dataset"])
    loader = data.loader(data.build("test"), cfg["evaluate"]["batch_size"], rt)
    profits = cfg["pairs"]["policy"]["profits"]
    white = checkpoint.white_box(network, rt, data.image_size, cfg["quant"])
    row = {"W": evaluate.accuracy(*evaluate.predict(white, loader, rt))}
    for mode, path in pairs.items():
        pair = checkpoint.pair(path, rt, data.image_size, cfg["quant"])
        fp = evaluate.accuracy(*evaluate.predict(pair.quant, loader, rt))
        q = evaluate.accuracy(*evaluate.predict(pair.quant, loader, rt, profits, policy=pair.policy,
                                                options=pair.options, capacity=pair.capacity))
        key = mode[0].upper()
        row[f"{key}_fp"], row[f"{key}_delta"] = fp, q - fp
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--cells", nargs="+", default=["I-A"], help="VERSION-BUDGET, e.g. I-A")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", default=["robust", "detrimental"])
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    cfg = config.check(config.load(args.configfile), " + ".join(args.configfile))
    out = Path(args.out)
    jobs, cells = [], {}
    for seed in args.seeds:
        network = Path(args.checkpoints) / f"seed{seed}" / "distill" / f"{args.arch}.pt"
        for cell in args.cells:
            version, budget = cell.split("-")
            for mode in args.modes:
                path = out / f"seed{seed}" / args.arch / version / budget / f"{mode}.pt"
                cells.setdefault((seed, cell, network), {})[mode] = path
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    jobs.append((seed, args.arch, version, budget, mode, network, path, cfg))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_train, jobs):
            print("trained", done, flush=True)
    torch.set_num_threads(cfg["runtime"]["threads"])
    print(f"{'seed':>4} {'cell':>5} {'W':>6} {'R_fp':>6} {'R_delta':>8} {'D_fp':>6} {'D_delta':>8}  meets")
    met = {}
    for (seed, cell, network), pairs in cells.items():
        row = evaluate_cell(cfg, network, pairs)
        ok = meets(row) if len(pairs) == 2 else None
        met.setdefault(cell, []).append(ok)
        print(f"{seed:>4} {cell:>5} {row['W']:6.1f} {row.get('R_fp', float('nan')):6.1f} "
              f"{row.get('R_delta', float('nan')):8.1f} {row.get('D_fp', float('nan')):6.1f} "
              f"{row.get('D_delta', float('nan')):8.1f}  {ok}", flush=True)
    for cell, oks in met.items():
        print(f"{cell}: meets the effect on {sum(bool(o) for o in oks)} of {len(oks)} seeds")


if __name__ == "__main__":
    main()
