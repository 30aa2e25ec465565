"""Fine-tune the black-box teacher (SPEC §1, §3)."""

from _entry import arguments
from dptq import train

args = arguments(__doc__, ["ckpt", "metrics"])
train.train_teacher(args.config, out=args.ckpt, metrics=args.metrics)
