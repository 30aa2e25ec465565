"""Tables 1-3 of one arch: every pair's FP and quantized accuracy, the highlighted cell,
transitory points and the cross-policy table (SPEC §2)."""

from _entry import arguments
from dptq import evaluate

args = arguments(__doc__, ["arch", "network", "pair_template", "out_dir"])
evaluate.evaluate_arch(args.config, args.arch, network=args.network, pairs=args.pair_template,
                       out_dir=args.out_dir)
