"""The paper's remedy, measured on one seed's and arch's highlighted pairs and its white-box network
(docs/method.md §2.19)."""

from _entry import job
from dptq import analysis

args, cfg = job(__doc__, cell=["seed", "arch"], files=["table1", "layer_scan", "network", "csv"], lists=["pairs"])
run = analysis.Job.from_config(args.seed, cfg)
analysis.remedy(run, args.table1, args.layer_scan, args.pairs, args.network, args.csv, **cfg["analysis"]["remedy"])
