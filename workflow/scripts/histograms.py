"""Figure 3's data: per-layer activation histograms, FP and quantized, with the sparsity
measure, for the highlighted robust and detrimental networks of one arch (SPEC §2)."""

from _entry import arguments
from dptq import analysis

args = arguments(__doc__, ["arch", "table1", "pair_template", "csv"])
analysis.histograms(args.config, args.arch, table1=args.table1, pairs=args.pair_template, out=args.csv)
