"""Fig. 3's data: activation histograms of one seed's and arch's highlighted pairs (docs/method.md §2.17)."""

from _entry import job
from dptq import analysis

args, cfg = job(__doc__, cell=["seed", "arch"], files=["table1", "csv"], lists=["pairs"])
run = analysis.Job.from_config(args.seed, cfg)
analysis.histograms(run, args.table1, args.pairs, args.csv, **cfg["analysis"]["histogram"])
