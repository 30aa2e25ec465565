"""Write results/report.html (every table and figure, the config, run times) and the headline
numbers in results/metrics.json (docs/method.md §7)."""

from pathlib import Path

from _entry import job
from dptq import report

args, cfg = job(__doc__, files=[*report.TABLES, "html", "metrics"],
                lists=["remedy", "layer_scan", "figures", "captions", "audits", "audit_cells", "audit_coupling", "audit_figures"])
tables = {name: getattr(args, name) for name in report.TABLES}
report.build(tables, args.remedy, args.layer_scan, figures_dir=Path(args.figures[0]).parent, captions_dir=Path(args.captions[0]).parent,
             benchmarks_dir="benchmarks", config=cfg.plain(), html_path=args.html, metrics_path=args.metrics, audits=args.audits,
             audit_cells=args.audit_cells, audit_coupling=args.audit_coupling)
