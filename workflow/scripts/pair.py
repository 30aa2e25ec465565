"""Train one robust or detrimental network-policy pair from a distilled network (docs/method.md §2.11)."""

from _entry import job
from dptq import train
from dptq.config import section_for

args, cfg = job(__doc__, cell=["seed", "arch", "version", "budget", "mode"], files=["network", "ckpt", "metrics"])
train.train_pair(args.seed, args.arch, args.version, args.budget, args.mode, args.network, args.ckpt, args.metrics,
                 dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"],
                 pairs=section_for(cfg, "pairs", args.arch, args.mode, args.version), temperature=cfg["kd"]["temperature"],
                 val_batch_size=cfg["evaluate"]["batch_size"])
