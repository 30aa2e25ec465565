"""dptq: the paper's study as one DAG (README.md; the stages are in workflow/rules/)."""

import sys

from snakemake.utils import min_version, validate

import dptq.config

min_version("9.0")


configfile: "config.yaml"


# The loader's one-line message names the files, the key path, the bad value and what is
# allowed (a WorkflowError would wrap it in a traceback); the schema check that follows is the
# same schema, wired in the way Snakemake users expect.
try:
    dptq.config.check(
        config,
        source=" + ".join(["config.yaml", *map(str, workflow.overwrite_configfiles)]),
    )
except dptq.config.ConfigError as err:
    sys.exit(f"Config error: {err}")
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


# The default target: every output of SPEC §7. It lives here, not in an included file, because
# Snakemake only takes the default target from the main Snakefile.
rule all:
    input:
        rules.teacher.output,
        expand(rules.distill.output, arch=ARCHS),
        expand(
            rules.pair.output, arch=ARCHS, version=VERSIONS, budget=BUDGETS, mode=MODES
        ),
        rules.report.input,
        rules.report.output,
