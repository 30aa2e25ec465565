"""dptq: the paper's study as one DAG (README.md; docs/method.md §1; the stages are in workflow/rules/)."""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/report.smk"


# The default target: every output of the README's table. It lives here, not in an included
# file, because Snakemake only takes the default target from the main Snakefile.
rule all:
    input:
        rules.report.input,
        rules.report.output,
