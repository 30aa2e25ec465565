"""Figure 4's data: accuracy under nine corruptions at increasing degree, for the highlighted
robust and detrimental networks of one arch (SPEC §2)."""

from _entry import arguments
from dptq import analysis

args = arguments(__doc__, ["arch", "table1", "pair_template", "csv"])
analysis.corruptions(args.config, args.arch, table1=args.table1, pairs=args.pair_template, out=args.csv)
