"""Draw every figure (PNG and PDF) from the tables and the analysis CSVs (docs/method.md §7)."""

from pathlib import Path

from _entry import job
from dptq import figures

args, _ = job(__doc__, files=["table1", "summary"], lists=["layer_scan", "histograms", "corruptions", "png", "pdf"])
figures.draw(args.table1, args.summary, args.layer_scan, args.histograms, args.corruptions,
             figures_dir=Path(args.png[0]).parent)
