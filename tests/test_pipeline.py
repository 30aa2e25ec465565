"""The whole pipeline on config/smoke.yaml, through Snakemake, through DVC and through both.

Slow: each scenario runs real jobs in subprocesses in a temporary copy of the project
(conftest.py). What is checked is the plumbing and the output contract (README.md,
docs/method.md §7), not the science (one epoch per stage at 16 px): every job reads exactly the
config keys it declares, a changed key re-runs exactly the jobs that read it under both
orchestrators, and DVC runs a profile through its generated pipeline without touching config.yaml.
"""

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, KEY_AUDIT, copy_project, linked_copy, run
from dptq import checkpoint, config, figures

pytestmark = pytest.mark.slow

SNAKEMAKE = str(BIN / "snakemake")
DVC = str(BIN / "dvc")
SMOKE = ["--configfile", "config/smoke.yaml"]
TABLE_COLUMNS = {
    "table1": ["seed", "arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
               "highlighted", "white_box_acc"],
    "table2": ["seed", "arch", "version", "budget", "highlighted", "paper_cell", "transitory_pct"],
    "table3": ["seed", "arch", "version", "budget", "highlighted", "paper_cell", "network", "policy", "q_acc", "fp_acc"],
    "hinge": ["seed", "arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta"],
}
# A key of each section (none set by config/smoke.yaml) and the rules whose jobs read it.
INFERENCE = {"evaluate", "layer_scan", "histograms", "corruptions", "remedy", "audit_model"}
PAIRS = {"pair", "hinge_pair"}  # ResNet18's D at II-B is off the hinge: its hinge-alone pair runs beside it
READERS = {
    "kd.randaugment.num_ops": {"distill"},
    "teacher.label_smoothing": {"teacher"},
    "dataset.augment.crop_padding": {"teacher", "distill", *PAIRS, *INFERENCE},
    "runtime.channels_last": {"teacher", "distill", *PAIRS, *INFERENCE},
    "pairs.margin": PAIRS,
    "quant.percentile": {*PAIRS, *INFERENCE},
    "evaluate.random_policy_seed": {"evaluate", "audit_model"},
    "audit.tolerated_drop": {"audit_model"},
    "analysis.remedy.flag_drop": {"remedy"},
}


def smoke_config(workdir: Path) -> dict:
    return config.load([workdir / "config.yaml", workdir / "config" / "smoke.yaml"])


def checkpoints(cfg: dict) -> dict[str, str]:
    """The README's checkpoint paths of ``cfg``, each with the kind of checkpoint it holds."""
    p, paths = cfg["pairs"], {}
    for s in config.seeds(cfg):
        paths[f"checkpoints/seed{s}/teacher.pt"] = "teacher"
        paths.update({f"checkpoints/seed{s}/distill/{a}.pt": "distill" for a in cfg["kd"]["archs"]})
        paths.update({f"checkpoints/seed{s}/pair/{a}/{v}/{b}/{m}.pt": "pair" for a in cfg["kd"]["archs"]
                      for v in p["versions"] for b in p["budgets"] for m in p["modes"]})
    return paths


def analysis_csvs(cfg: dict) -> list[str]:
    archs, hist = cfg["kd"]["archs"], cfg["analysis"]["histogram"]["archs"]
    return [f"results/analysis/seed{s}/{a}/{kind}.csv" for s in config.seeds(cfg) for a in archs
            for kind in ("layer_scan", "corruptions", "remedy")] + [
        f"results/analysis/seed{s}/{a}/histograms.csv" for s in config.seeds(cfg) for a in archs if a in hist]


def figure_names(cfg: dict) -> list[str]:
    return figures.figure_names(cfg["kd"]["archs"], cfg["analysis"]["histogram"]["archs"])


def smoke_pipeline(workdir: Path) -> None:
    """The smoke profile's own DVC pipeline, generated from the rules (config.yaml stays as it is)."""
    run([str(BIN / "python"), "-m", "dptq.dvc", "--configfile", "config/smoke.yaml"], workdir, 600)


def set_key(path: Path, key: str, change) -> None:
    """Replace the value of dotted ``key`` in the YAML file ``path`` by ``change(value)``."""
    tree = node = yaml.safe_load(path.read_text())
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = change(node[parts[-1]])
    path.unlink()  # a linked copy: never write through to the original
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def flipped(value):
    """Another valid value: a flag negated, a count plus one, a real number 10 % lower."""
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else value * 0.9


def digests(root: Path, paths) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}


def assert_dvc_clean(workdir: Path) -> None:
    out = run([DVC, "status"], workdir).stdout
    assert "Data and pipelines are up to date" in out, out


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


# ------------------------------------------------------------------ snakemake

def test_snakemake_smoke_run_leaves_every_output(smoke_run):
    cfg = smoke_config(smoke_run)
    for path, kind in checkpoints(cfg).items():
        ckpt = checkpoint.load(smoke_run / path, kind=kind)
        assert ckpt["kind"] == kind and ckpt["num_classes"] > 1, path
        assert not pd.read_csv(smoke_run / Path(path).with_suffix(".csv")).empty, f"{path}: no metrics rows"

    p = cfg["pairs"]
    cells = len(cfg["kd"]["archs"]) * len(p["versions"]) * len(p["budgets"]) * len(p["modes"])
    tables = {name: pd.read_csv(smoke_run / f"results/tables/{name}.csv") for name in TABLE_COLUMNS}
    for name, columns in TABLE_COLUMNS.items():
        assert list(tables[name].columns) == columns, name
    beside = tables["hinge"][["arch", "version", "budget", "mode"]].to_records(index=False).tolist()
    assert beside == [("resnet18", "II", "B", "detrimental")], "ResNet18's D at its paper cell, off the hinge, has its hinge-alone pair"
    t1 = tables["table1"]
    assert len(t1) == cells and (t1["delta"] - (t1["q_acc"] - t1["fp_acc"])).abs().max() < 1e-6
    assert (t1.groupby("arch")["highlighted"].sum() == 2).all(), "one highlighted cell (R and D) per arch"
    # Tables 2 and 3 at the highlighted cell and at the paper's (II-B for ResNet18, in the smoke grid)
    t2 = tables["table2"]
    assert t2["highlighted"].sum() == t2["paper_cell"].sum() == len(cfg["kd"]["archs"])
    assert set(zip(t2.loc[t2["paper_cell"], "version"], t2.loc[t2["paper_cell"], "budget"])) == {("II", "B")}
    assert len(tables["table3"]) == 9 * len(t2)

    for path in analysis_csvs(cfg):
        assert not pd.read_csv(smoke_run / path).empty, path

    for name in figure_names(cfg):
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            assert (smoke_run / f"results/figures/{name}.{ext}").read_bytes().startswith(magic), f"{name}.{ext}"

    audited = cfg["kd"]["archs"]  # audit.pipeline: the first seed's W of every arch
    for model in audited:
        record = json.loads((smoke_run / f"results/audit/{model}/audit.json").read_text())
        assert record["simulated"]["verdict"] in ("pass", "fail") and record["runtime"]["verdict"]["verdict"] in ("pass", "fail")
        assert 0 <= record["runtime"]["verdict"]["acc"] <= 100 and record["runtime"]["simulator"]["top1_agreement"] >= 99, record
        assert len(record["nodes_to_exclude"]) == len(record["float_layers"]) <= cfg["audit"]["max_float_layers"]
        for name in ("cells", "sensitivity", "coupling"):
            assert not pd.read_csv(smoke_run / f"results/audit/{model}/{name}.csv").empty, (model, name)
        assert (smoke_run / f"results/figures/audit_{model}.png").read_bytes().startswith(b"\x89PNG")

    parser = _Tags()
    html = (smoke_run / "results/report.html").read_text()
    parser.feed(html)
    assert {"html", "table", "img"} <= set(parser.tags)
    assert parser.tags.count("img") == len(figure_names(cfg)) + len(audited)
    assert "Deployment audit" in html and "audit-verdicts" in html
    metrics = json.loads((smoke_run / "results/metrics.json").read_text())
    assert isinstance(metrics, dict) and metrics


def test_every_job_reads_exactly_the_config_keys_it_declares(smoke_run):
    """An undeclared read fails its job (the run above would not have passed); here: no job
    declares a key, or a part of a section, that it never reads."""
    records = [json.loads(p.read_text()) for p in sorted((smoke_run / KEY_AUDIT).glob("*.json"))]
    dry = run([SNAKEMAKE, "-n", "--forceall", *SMOKE], smoke_run, 600).stdout
    jobs = int(re.search(r"^total\s+(\d+)$", dry, re.MULTILINE)[1]) - 1  # less the `all` target
    assert len(records) == jobs
    assert {r["job"]: r["unread"] for r in records if r["unread"]} == {}


@pytest.mark.parametrize("key", READERS)
def test_changing_a_key_reruns_exactly_the_jobs_that_read_it(smoke_run, dvc_run, tmp_path, key):
    """DVC: the stages whose params changed are exactly the rules that read the key (the report
    shows the whole config, so it reads every key). Snakemake names a job's params as its reason
    only when no upstream job re-runs first, so there: some of those rules, and no other."""
    expected = READERS[key] | {"report"}
    work = linked_copy(smoke_run, tmp_path / "snakemake")
    set_key(work / "config.yaml", key, flipped)
    dry = run([SNAKEMAKE, "-n", *SMOKE], work, 600).stdout
    blocks = re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", dry, re.MULTILINE | re.DOTALL)
    changed = {rule for rule, body in blocks if "Params have changed" in body}
    assert changed and changed <= expected, dry[-3000:]

    work = linked_copy(dvc_run, tmp_path / "dvc")
    set_key(work / "config.yaml", key, flipped)
    out = run([DVC, "status"], work).stdout
    stages = {line.rstrip(":") for line in out.splitlines() if line and not line[0].isspace()}
    assert {s.split("-")[0] for s in stages} == expected, out


def test_snakemake_second_run_has_nothing_to_do(smoke_run):
    out = run([SNAKEMAKE, "-n", *SMOKE], smoke_run, 600).stdout
    assert "Nothing to be done" in out, out[-3000:]


def test_mixed_flow_snakemake_then_dvc(smoke_run, tmp_path):
    """After snakemake, `dvc commit -f` adopts the outputs; after `dvc checkout`, `snakemake --touch`
    makes Snakemake agree; neither recomputes anything."""
    work = Path(shutil.copytree(smoke_run, tmp_path / "mixed", symlinks=True))
    cfg = smoke_config(work)
    before = digests(work, checkpoints(cfg))
    smoke_pipeline(work)

    run([DVC, "commit", "-f"], work, 600)
    assert_dvc_clean(work)
    assert digests(work, checkpoints(cfg)) == before

    shutil.rmtree(work / "checkpoints")
    shutil.rmtree(work / "results")
    run([DVC, "checkout"], work, 600)
    assert digests(work, checkpoints(cfg)) == before
    assert_dvc_clean(work)

    run([SNAKEMAKE, "--touch", "--cores", "1", *SMOKE], work, 600)
    out = run([SNAKEMAKE, "-n", *SMOKE], work, 600).stdout
    assert "Nothing to be done" in out, out[-3000:]
    assert digests(work, checkpoints(cfg)) == before


# ------------------------------------------------------------------ dvc

@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory) -> Path:
    """A project copy in which `dvc repro` has run the smoke profile's generated pipeline once."""
    workdir = copy_project(tmp_path_factory.mktemp("dvc_run"))
    smoke_pipeline(workdir)
    run([DVC, "repro"], workdir)
    return workdir


def test_dvc_runs_a_profile_without_touching_config_yaml(dvc_run):
    assert run(["git", "status", "--porcelain", "config.yaml", "config"], dvc_run).stdout == ""


def test_dvc_repro_twice_runs_nothing_the_second_time(dvc_run):
    out = run([DVC, "repro"], dvc_run, 600).stdout
    assert "Running stage" not in out, out[-3000:]
    assert_dvc_clean(dvc_run)


def test_dvc_and_snakemake_give_the_same_results(dvc_run, smoke_run):
    for name in TABLE_COLUMNS:
        path = f"results/tables/{name}.csv"
        assert (dvc_run / path).read_text() == (smoke_run / path).read_text(), path


def test_changing_a_profile_key_outdates_only_its_dependents(dvc_run, tmp_path):
    work = linked_copy(dvc_run, tmp_path / "params")
    set_key(work / "config" / "smoke.yaml", "analysis.corruptions.seeds", flipped)
    out = run([DVC, "status"], work).stdout
    changed = {line.rstrip(":") for line in out.splitlines() if line and not line[0].isspace()}
    archs = smoke_config(work)["kd"]["archs"]
    assert changed == {*(f"corruptions-seed0-{a}" for a in archs), "report"}, out


def test_dvc_exp_run_sets_a_key_and_reruns_only_its_dependents(dvc_run, tmp_path):
    work = Path(shutil.copytree(dvc_run, tmp_path / "exp", symlinks=True))
    out = run([DVC, "exp", "run", "-S", "config.yaml:analysis.histogram.bin_width=0.05"], work).stdout
    assert smoke_config(work)["analysis"]["histogram"]["bin_width"] == 0.05
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    archs = smoke_config(work)["analysis"]["histogram"]["archs"]
    assert ran == {*(f"histograms-seed0-{a}" for a in archs), "figures", "report"}, out[-3000:]


def test_dvc_push_pull_round_trips_every_checkpoint(dvc_run, tmp_path):
    work = Path(shutil.copytree(dvc_run, tmp_path / "push", symlinks=True))
    paths = checkpoints(smoke_config(work))
    before = digests(work, paths)
    run([DVC, "remote", "add", "--local", "-d", "store", str(tmp_path / "remote")], work)
    run([DVC, "push"], work, 600)
    shutil.rmtree(work / "checkpoints")
    shutil.rmtree(work / ".dvc" / "cache")
    run([DVC, "pull"], work, 600)
    assert digests(work, paths) == before
    assert_dvc_clean(work)
