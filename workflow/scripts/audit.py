"""Audit one network (audit.models.{model}, or with audit.pipeline the first seed's W of arch {model}):
the simulated worst case, ONNX Runtime, batch coupling (docs/method.md §2.21)."""

from _entry import job
from dptq import audit

args, cfg = job(__doc__, cell=["model"], files=["json", "cells", "sensitivity", "coupling", "figure"],
                lists=["weights", "network", "pairs"])
audit.run_job(args.model, cfg, network=args.network, pairs=args.pairs, json_path=args.json, figure=args.figure)
