"""The paper's remedy, measured: the highlighted pairs of one arch and its white-box network with
the percentile scale and with the layers that the layer scan flags kept at full precision
(SPEC §2)."""

from _entry import arguments
from dptq import analysis

args = arguments(__doc__, ["arch", "table1", "layer_scan", "pair_template", "network", "csv"])
analysis.remedy(args.config, args.arch, table1=args.table1, layer_scan=args.layer_scan, pairs=args.pair_template,
                network=args.network, out=args.csv)
