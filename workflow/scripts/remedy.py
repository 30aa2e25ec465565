"""The paper's remedy, measured: the highlighted pairs of one arch with the percentile scale and
with the layers that the layer scan flags kept at full precision (SPEC §2)."""

from _entry import arguments
from dptq import analysis

args = arguments(__doc__, ["arch", "table1", "pair_template", "layer_scan", "csv"])
analysis.remedy(args.config, args.arch, table1=args.table1, pairs=args.pair_template,
                layer_scan=args.layer_scan, out=args.csv)
