"""Tables 1-3 of one seed and arch (docs/method.md §2.12-2.15)."""

from _entry import job
from dptq import evaluate

args, cfg = job(__doc__, cell=["seed", "arch"], files=["network", "table1", "table2", "table3"], lists=["pairs"])
evaluate.evaluate_arch(args.seed, args.arch, args.network, args.pairs, vars(args), dataset=cfg["dataset"], runtime=cfg["runtime"],
                       quant=cfg["quant"], profits=cfg["pairs"]["policy"]["profits"], **cfg["evaluate"])
