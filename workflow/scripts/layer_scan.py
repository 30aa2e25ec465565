"""Figure 2's data: accuracy with layers 1..l, l..N or only l quantized, for the highlighted
robust and detrimental networks of one arch (SPEC §2)."""

from _entry import arguments
from dptq import analysis

args = arguments(__doc__, ["arch", "table1", "pair_template", "csv"])
analysis.layer_scan(args.config, args.arch, table1=args.table1, pairs=args.pair_template, out=args.csv)
