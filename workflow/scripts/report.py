"""Write results/report.html (every table and figure, the config, run times) and the headline
numbers in results/metrics.json (SPEC §7)."""

from _entry import arguments
from dptq import report

args = arguments(__doc__, ["tables_dir", "analysis_dir", "figures", "benchmarks_dir", "html", "metrics"])
report.build(args.config, tables_dir=args.tables_dir, analysis_dir=args.analysis_dir, figures_dir=args.figures,
             benchmarks_dir=args.benchmarks_dir, html_path=args.html, metrics_path=args.metrics)
