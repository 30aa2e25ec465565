"""Fig. 4's data: one seed's and arch's highlighted pairs under input corruptions (docs/method.md §2.18)."""

from _entry import job
from dptq import analysis

args, cfg = job(__doc__, cell=["seed", "arch"], files=["table1", "csv"], lists=["pairs"])
run = analysis.Job.from_config(args.seed, cfg)
analysis.corruptions(run, args.table1, args.pairs, args.csv, max_examples=cfg["analysis"]["max_examples"],
                     **cfg["analysis"]["corruptions"])
