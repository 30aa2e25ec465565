"""The inference jobs of one seed (evaluate, then the four analyses), timed in one process.

    python bench/analysis_seconds.py --checkpoints CKPTS --out DIR [--seed 0] [--configfile config.yaml ...]

Reads ``CKPTS/seed{N}/distill/{arch}.pt`` and every pair under ``CKPTS/seed{N}/pair/{arch}``
(a run's ``checkpoints`` folder) and writes each job's CSVs under ``DIR/{arch}``, as the
pipeline's jobs do, without their start-up. Prints the seconds per job and per stage. Run it from
two checkouts at once (one core each) to compare code on the same machine and minute; ``cmp``
the two ``DIR`` trees for exactness.
"""
import argparse
import json
import time
from pathlib import Path

from dptq import analysis, config, evaluate

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoints", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
args = parser.parse_args()
cfg = config.load(args.configfile)
a, seed = cfg["analysis"], args.seed
start = dict(dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"], profits=cfg["pairs"]["policy"]["profits"])
seconds = {}
for arch in cfg["kd"]["archs"]:
    root, out = args.checkpoints / f"seed{seed}", args.out / arch
    pairs = [str(root / "pair" / arch / v / b / f"{m}.pt") for v in cfg["pairs"]["versions"]
             for b in cfg["pairs"]["budgets"] for m in cfg["pairs"]["modes"]]
    network, table1 = root / "distill" / f"{arch}.pt", out / "table1.csv"
    jobs = {
        "evaluate": lambda: evaluate.evaluate_arch(
            seed, arch, network, pairs, {t: out / f"{t}.csv" for t in ("table1", "table2", "table3")}, **start,
            **{k: v for k, v in cfg["evaluate"].items() if k != "effect"}),
        "layer_scan": lambda job: analysis.layer_scan(job, table1, pairs, out / "layer_scan.csv",
                                                      max_examples=a["max_examples"], **a["layer_scan"]),
        "histograms": lambda job: analysis.histograms(job, table1, pairs, out / "histograms.csv", range=a["histogram"]["range"],
                                                      bin_width=a["histogram"]["bin_width"]),
        "corruptions": lambda job: analysis.corruptions(job, table1, pairs, out / "corruptions.csv",
                                                        max_examples=a["max_examples"], **a["corruptions"]),
        "remedy": lambda job: analysis.remedy(job, table1, out / "layer_scan.csv", pairs, network, out / "remedy.csv", **a["remedy"]),
    }
    for name, run in jobs.items():
        t = time.perf_counter()
        run() if name == "evaluate" else run(analysis.Job.from_config(seed, cfg))
        seconds[f"{name}/{arch}"] = time.perf_counter() - t
        print(f"{name:12s} {arch:26s} {seconds[f'{name}/{arch}']:7.1f} s", flush=True)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "seconds.json").write_text(json.dumps(seconds, indent=1))
stages = {}
for key, s in seconds.items():
    stages[key.split("/")[0]] = stages.get(key.split("/")[0], 0.0) + s
print("\n" + "\n".join(f"{name:12s} {s:7.1f} s" for name, s in stages.items()) + f"\n{'all':12s} {sum(stages.values()):7.1f} s")
