"""The pipeline's two descriptions (Snakefile, dvc.yaml) on the default config: the paper's DAG,
lint-clean, and equal job for job, so that they cannot drift apart."""

import ast
import json
import re
import shlex
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, run

# Jobs per rule on the default config (SPEC §1): 3 archs, 3 versions x 3 budgets x 2 modes.
EXPECTED_JOBS = {"teacher": 1, "distill": 3, "pair": 54, "evaluate": 3, "tables": 1, "layer_scan": 3,
                 "histograms": 3, "corruptions": 3, "remedy": 3, "figures": 1, "report": 1, "all": 1}

# Every job of the DAG as Snakemake builds it: rule, named wildcards/inputs/outputs/params,
# all input and output files, and the script. Snakemake's public API stops short of the jobs,
# hence the private `_workflow`; snakemake is pinned in requirements.txt.
SNAKEMAKE_JOBS = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                      StorageSettings)

root = Path(sys.argv[1])
with SnakemakeApi(OutputSettings()) as api:
    workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                                storage_settings=StorageSettings(), snakefile=root / "Snakefile", workdir=root)
    workflow = workflow_api.dag(DAGSettings(forceall=True)).workflow_api._workflow
    workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
    workflow._build_dag()
    jobs = [dict(rule=job.rule.name, input=list(map(str, job.input)), output=list(map(str, job.output)),
                 script=Path(job.rule.script).name if job.rule.script else None,
                 named={kind: {k: (v if isinstance(v, (str, dict)) else list(map(str, v)))
                               for k, v in getattr(job, kind).items()}
                        for kind in ("wildcards", "input", "output", "params")})
            for job in workflow.dag.jobs]
print("JOBS " + json.dumps(jobs, default=str))
"""


@pytest.fixture(scope="module")
def snakemake_jobs() -> list[dict]:
    out = run([str(BIN / "python"), "-c", SNAKEMAKE_JOBS, str(ROOT)], ROOT, 600).stdout
    return json.loads(out.split("JOBS ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def dvc_stages() -> list[dict]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = []
        for stage in repo.index.stages:
            params = [d for d in stage.deps if isinstance(d, ParamsDependency)]
            stages.append(dict(name=stage.name, cmd=stage.cmd, outs={o.def_path for o in stage.outs},
                               deps={d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)},
                               params={p.def_path: list(p.params) for p in params}))
    return stages


def script_names(script: Path) -> list[str]:
    """The names a workflow script asks for: the list literal in its ``arguments(__doc__, [...])`` call."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "arguments":
            return [ast.literal_eval(e) for e in node.args[1].elts]
    raise AssertionError(f"{script}: no arguments(__doc__, [...]) call")


def covers(dep: str, path: str) -> bool:
    """A DVC dependency ``dep`` (a file or a folder) holds ``path``."""
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def test_dry_run_shows_the_papers_dag():
    out = run([str(BIN / "snakemake"), "-n", "--forceall", "--cores", "1"], ROOT, 600).stdout
    stats = out[out.index("Job stats:"):]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)}
    assert {k: v for k, v in counts.items() if k != "total"} == EXPECTED_JOBS


def test_lint_clean():
    out = run([str(BIN / "snakemake"), "--lint"], ROOT, 600).stdout
    assert "Lints for" not in out, out


def test_snakefmt_clean():
    run([str(BIN / "snakefmt"), "--check", "."], ROOT, 300)


def test_bad_config_fails_dry_run_naming_the_key(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("pairs:\n  margin: 7\n")
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", str(overlay)], ROOT, 600, check=False)
    assert out.returncode != 0
    error = [line for line in out.stdout.splitlines() if line.startswith("Config error:")]
    assert len(error) == 1 and "pairs.margin" in error[0] and "7" in error[0], out.stdout[-3000:]
    assert "Traceback" not in out.stdout


def test_bad_config_fails_a_dvc_stage_command_naming_the_key(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("kd:\n  archs: [resnet18, not_a_net]\n")
    out = run([str(BIN / "python"), "workflow/scripts/teacher.py", "--config", "config.yaml", str(overlay),
               "--ckpt", str(tmp_path / "t.pt"), "--metrics", str(tmp_path / "t.csv")], ROOT, 300, check=False)
    assert out.returncode == 2 and "kd.archs" in out.stdout and "not_a_net" in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stdout


def test_dvc_has_one_stage_per_snakemake_job(snakemake_jobs, dvc_stages):
    smk = Counter((j["rule"], frozenset(j["output"])) for j in snakemake_jobs if j["rule"] != "all")
    dvc = Counter((s["name"].split("@")[0], frozenset(s["outs"])) for s in dvc_stages)
    assert smk == dvc and max(smk.values()) == 1


def test_same_inputs_and_upstream_jobs(snakemake_jobs, dvc_stages):
    producer = {path: (j["rule"], tuple(j["output"])) for j in snakemake_jobs for path in j["output"]}
    stage_of = {frozenset(s["outs"]): s for s in dvc_stages}
    for job in (j for j in snakemake_jobs if j["rule"] != "all"):
        stage = stage_of[frozenset(job["output"])]
        deps = {d for d in stage["deps"] if not d.startswith("workflow/scripts/")}
        uncovered = [p for p in job["input"] if not any(covers(d, p) for d in deps)]
        unused = [d for d in deps if not any(covers(d, p) for p in job["input"])]
        assert not uncovered and not unused, f"{stage['name']}: inputs {uncovered} not in dvc deps; deps {unused} not inputs"
        smk_upstream = {producer[p] for p in job["input"]}
        dvc_upstream = {(s["name"].split("@")[0], tuple(sorted(s["outs"]))) for s in dvc_stages
                        if any(covers(d, o) or covers(o, d) for d in deps for o in s["outs"])}
        assert {(r, tuple(sorted(o))) for r, o in smk_upstream} == dvc_upstream, stage["name"]


def test_same_config_keys(snakemake_jobs, dvc_stages):
    stage_of = {frozenset(s["outs"]): s for s in dvc_stages}
    for job in (j for j in snakemake_jobs if j["rule"] != "all"):
        stage = stage_of[frozenset(job["output"])]
        smk_keys = set(job["named"]["params"].get("config_keys", {}))
        dvc_keys = set(stage["params"].get("config.yaml", []))
        assert smk_keys == dvc_keys, f"{stage['name']}: snakemake {sorted(smk_keys)} vs dvc {sorted(dvc_keys)}"
        assert set(stage["params"]) <= {"config.yaml"}, stage["name"]


def test_same_script_and_arguments(snakemake_jobs, dvc_stages):
    stage_of = {frozenset(s["outs"]): s for s in dvc_stages}
    for job in (j for j in snakemake_jobs if j["rule"] != "all"):
        stage = stage_of[frozenset(job["output"])]
        python, script, *rest = shlex.split(stage["cmd"])
        assert python == "python" and script == f"workflow/scripts/{job['script']}", stage["cmd"]
        assert script in stage["deps"], f"{stage['name']}: its script is not a dependency"
        assert len(rest) % 2 == 0 and all(flag.startswith("--") for flag in rest[::2]), stage["cmd"]
        dvc_args = {flag[2:].replace("-", "_"): value for flag, value in zip(rest[::2], rest[1::2])}
        names = script_names(ROOT / script)
        smk_args = {}
        for name in names:
            found = [kind[name] for kind in job["named"].values() if name in kind]
            assert len(found) == 1, f"rule {job['rule']}: {name!r} is not exactly one named wildcard/input/output/param"
            smk_args[name] = found[0]
        assert dvc_args == smk_args, f"{stage['name']}: dvc cmd {dvc_args} vs snakemake {smk_args}"


def test_every_output_is_cached_and_metrics_plots_declared():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    body = lambda s: s.get("do", s)  # noqa: E731  (foreach stages keep their body under `do`)
    assert body(stages["report"])["metrics"] == ["results/metrics.json"]
    for name in ("layer_scan", "histograms", "corruptions", "remedy"):
        assert body(stages[name])["plots"] == [f"results/analysis/${{item}}/{name}.csv"]
    for stage in stages.values():
        for out in (o for key in ("outs", "metrics", "plots") for o in body(stage).get(key, [])):
            assert isinstance(out, str), f"{out}: outputs stay cached (no cache: false)"


def pins(text: str) -> dict[str, str]:
    found = re.findall(r"^\s*(?:-\s*)?([A-Za-z0-9_.\-]+)==([^\s#]+)", text, re.MULTILINE)
    return {name.lower(): version for name, version in found}


def test_conda_env_and_installed_versions_match_requirements():
    required = pins((ROOT / "requirements.txt").read_text())
    conda = pins((ROOT / "envs" / "dptq.yaml").read_text())
    assert conda and all(required.get(name) == version for name, version in conda.items()), (conda, required)
    installed = {name: metadata.version(name) for name in required}
    assert installed == required
