"""Merge every seed's and arch's Tables 1-3 and hinge-alone pairs, summarise Table 1 over the seeds
and take its bit floor (docs/method.md §7, §8, §2.23)."""

from _entry import job
from dptq import tables

args, cfg = job(__doc__, files=["table1", "summary", "table2", "table3", "hinge", "effect", "bit_floor"],
                lists=["arch_table1", "arch_table2", "arch_table3", "arch_hinge"])
tables.merge_tables(args.arch_table1, args.arch_table2, args.arch_table3, args.arch_hinge, vars(args),
                    highlight_max_fp_gap=cfg["evaluate"]["highlight_max_fp_gap"], budget_levels=cfg["pairs"]["budgets"],
                    effect=cfg["evaluate"]["effect"])
