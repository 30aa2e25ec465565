"""Merge every arch's Tables 1-3 (``by_arch/{arch}/table*.csv``) into ``out_dir`` (SPEC §7)."""

from pathlib import Path

from _entry import arguments
from dptq import evaluate

args = arguments(__doc__, ["by_arch", "out_dir"])
arch_dirs = [Path(args.by_arch) / arch for arch in args.config["kd"]["archs"]]
evaluate.merge_tables(arch_dirs, out_dir=args.out_dir)
