"""Distill the teacher into one white-box network W (docs/method.md §2.10)."""

from _entry import job
from dptq import train
from dptq.config import section_for

args, cfg = job(__doc__, cell=["seed", "arch"], files=["teacher", "ckpt", "metrics"])
train.distill(args.seed, args.arch, args.teacher, args.ckpt, args.metrics, dataset=cfg["dataset"],
              runtime=cfg["runtime"], kd=section_for(cfg, "kd", args.arch), val_batch_size=cfg["evaluate"]["batch_size"])
