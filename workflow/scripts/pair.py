"""Train one robust or detrimental network-policy pair from a distilled network (docs/method.md §2.11);
with ``--hinge_alone``, a detrimental pair on the paper's hinge alone, beside the off-hinge one at its
cell (pairs.hinge_beside, §2.10)."""

from _entry import job
from dptq import train
from dptq.config import hinge_alone, section_for

args, cfg = job(__doc__, cell=["seed", "arch", "version", "budget", "mode"], files=["network", "ckpt", "metrics"],
                flags=["hinge_alone"])
pairs = section_for(cfg, "pairs", args.arch, args.mode, args.version)
train.train_pair(args.seed, args.arch, args.version, args.budget, args.mode, args.network, args.ckpt, args.metrics,
                 dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"],
                 pairs=hinge_alone(pairs) if args.hinge_alone else pairs, temperature=cfg["kd"]["temperature"],
                 val_batch_size=cfg["evaluate"]["batch_size"])
