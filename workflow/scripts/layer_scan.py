"""Fig. 2's data: the layer scan of one seed's and arch's highlighted pairs (docs/method.md §2.16)."""

from _entry import job
from dptq import analysis

args, cfg = job(__doc__, cell=["seed", "arch"], files=["table1", "csv"], lists=["pairs"])
run = analysis.Job.from_config(args.seed, cfg)
analysis.layer_scan(run, args.table1, args.pairs, args.csv, max_examples=cfg["analysis"]["max_examples"],
                    **cfg["analysis"]["layer_scan"])
