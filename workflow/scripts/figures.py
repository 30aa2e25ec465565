"""Draw every figure (PNG and PDF) from the tables and the analysis CSVs (SPEC §7)."""

from _entry import arguments
from dptq import report

args = arguments(__doc__, ["tables_dir", "analysis_dir", "figures"])
report.figures(args.config, tables_dir=args.tables_dir, analysis_dir=args.analysis_dir,
               figures_dir=args.figures)
