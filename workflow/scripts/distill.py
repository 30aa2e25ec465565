"""Distill the teacher into one white-box network ``arch`` (SPEC §1, §3)."""

from _entry import arguments
from dptq import train

args = arguments(__doc__, ["arch", "teacher", "ckpt", "metrics"])
train.distill(args.config, args.arch, teacher=args.teacher, out=args.ckpt, metrics=args.metrics)
