"""Where the audit jobs' time goes: per model, the job's wall seconds and peak memory from its
Snakemake benchmark file, and the seconds of each part from its audit.json (``seconds``).

    python bench/audit_seconds.py            # after `snakemake audit`
"""
import json
from pathlib import Path

import pandas as pd

rows = []
for record_path in sorted(Path("results/audit").glob("*/audit.json")):
    record = json.loads(record_path.read_text())
    bench = Path("benchmarks/audit") / f"{record['model']}.tsv"
    job = pd.read_csv(bench, sep="\t").iloc[-1] if bench.is_file() else {}
    rows.append({"model": record["model"], "job_s": job.get("s"), "max_rss_MB": job.get("max_rss"),
                 **record["seconds"]})
table = pd.DataFrame(rows)
if len(table):
    total = table.sum(numeric_only=True)
    total["max_rss_MB"] = table["max_rss_MB"].max()  # the largest job, not a sum
    table.loc["total"] = {**total, "model": "all (max RSS: the largest job)"}
print(table.to_string(index=False))
