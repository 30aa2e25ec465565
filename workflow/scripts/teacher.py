"""Fine-tune the black-box teacher (docs/method.md §1, §3)."""

from _entry import job
from dptq import train

args, cfg = job(__doc__, cell=["seed"], files=["ckpt", "metrics"])
train.train_teacher(args.seed, args.ckpt, args.metrics, dataset=cfg["dataset"], runtime=cfg["runtime"],
                    teacher=cfg["teacher"], val_batch_size=cfg["evaluate"]["batch_size"])
