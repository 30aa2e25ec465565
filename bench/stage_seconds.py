"""Job-seconds and peak memory per stage, from a run's Snakemake ``benchmark:`` files.

    python bench/stage_seconds.py [--root .]     # after a run; reads ROOT/benchmarks/**/*.tsv

One row per stage (the first folder under ``benchmarks/``, or the file's name for the one-job
stages): jobs, job-seconds, their share of all job-seconds, and the largest ``max_rss`` (MB).
Then the share of the inference-only analyses (evaluate, layer scan, histograms, corruptions,
remedy), whose goal is at most 10 %.
"""
import argparse
from pathlib import Path

import pandas as pd

ANALYSES = ("evaluate", "layer_scan", "histograms", "corruptions", "remedy")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--root", type=Path, default=Path("."))
root = parser.parse_args().root
rows = []
for path in sorted((root / "benchmarks").rglob("*.tsv")):
    parts = path.relative_to(root / "benchmarks").parts
    job = pd.read_csv(path, sep="\t").iloc[-1]
    rows.append({"stage": parts[0] if len(parts) > 1 else path.stem, "s": job["s"], "max_rss": job["max_rss"]})
if not rows:
    raise SystemExit(f"no benchmark files under {root / 'benchmarks'}; run the workflow first")
jobs = pd.DataFrame(rows)
table = jobs.groupby("stage").agg(jobs=("s", "size"), job_s=("s", "sum"), max_rss_MB=("max_rss", "max"))
table["share_pct"] = 100 * table["job_s"] / table["job_s"].sum()
print(table.sort_values("job_s", ascending=False).round(1).to_string())
analyses = table.loc[table.index.isin(ANALYSES), "job_s"].sum()
print(f"\nall: {len(jobs)} jobs, {table['job_s'].sum():.0f} job-seconds, largest job {jobs['max_rss'].max():.0f} MB")
print(f"analyses ({', '.join(ANALYSES)}): {analyses:.0f} job-seconds, {100 * analyses / table['job_s'].sum():.1f} % (goal <= 10 %)")
