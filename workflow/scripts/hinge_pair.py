"""Train one detrimental pair with the paper's hinge alone, beside the off-hinge one at its cell
(pairs.hinge_beside; docs/method.md §2.10)."""

from _entry import job
from dptq import train
from dptq.config import hinge_alone, section_for

args, cfg = job(__doc__, cell=["seed", "arch", "version", "budget"], files=["network", "ckpt", "metrics"])
train.train_pair(args.seed, args.arch, args.version, args.budget, "detrimental", args.network, args.ckpt, args.metrics,
                 dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"],
                 pairs=hinge_alone(section_for(cfg, "pairs", args.arch, "detrimental", args.version)),
                 temperature=cfg["kd"]["temperature"], val_batch_size=cfg["evaluate"]["batch_size"])
