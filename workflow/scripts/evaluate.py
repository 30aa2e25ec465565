"""Tables 1-3 of one seed and arch (docs/method.md §2.12-2.15); Tables 2 and 3 also at the paper's cell; the
hinge-alone pairs beside (pairs.hinge_beside)."""

from _entry import job
from dptq import evaluate, tables

args, cfg = job(__doc__, cell=["seed", "arch"], files=["network", "table1", "table2", "table3", "hinge"],
              lists=["pairs", "hinge_pairs"])
evaluate.evaluate_arch(args.seed, args.arch, args.network, args.pairs, vars(args), hinge_pairs=args.hinge_pairs, dataset=cfg["dataset"], runtime=cfg["runtime"],
                       quant=cfg["quant"], profits=cfg["pairs"]["policy"]["profits"],
                       paper_cell=tables.paper_cell(args.arch), **cfg["evaluate"])
