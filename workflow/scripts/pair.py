"""Train one robust or detrimental network-policy pair from a distilled network (SPEC §2)."""

from _entry import arguments
from dptq import train

args = arguments(__doc__, ["arch", "version", "budget", "mode", "network", "ckpt", "metrics"])
train.train_pair(args.config, args.arch, args.version, args.budget, args.mode,
                 network=args.network, out=args.ckpt, metrics=args.metrics)
