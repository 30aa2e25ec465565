"""The whole pipeline on config/smoke.yaml, through Snakemake, through DVC and through both.

Slow: each scenario runs real jobs in subprocesses in a temporary copy of the project
(conftest.py). What is checked is the plumbing and the output contract of SPEC §7, not the
science (one epoch per stage at 16 px).
"""

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, copy_project, run
from dptq import checkpoint, config, report

pytestmark = pytest.mark.slow

SNAKEMAKE = str(BIN / "snakemake")
DVC = str(BIN / "dvc")
SMOKE = ["--configfile", "config/smoke.yaml"]
TABLE_COLUMNS = {
    "table1": ["arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
               "highlighted", "white_box_acc"],
    "table2": ["arch", "transitory_pct"],
    "table3": ["arch", "network", "policy", "q_acc", "fp_acc"],
}


def smoke_config(workdir: Path) -> dict:
    return config.load([workdir / "config.yaml", workdir / "config" / "smoke.yaml"])


def checkpoints(cfg: dict) -> dict[str, str]:
    """SPEC §7's checkpoint paths of ``cfg``, each with the kind of checkpoint it holds."""
    p = cfg["pairs"]
    paths = {"checkpoints/teacher.pt": "teacher"}
    paths.update({f"checkpoints/distill/{a}.pt": "distill" for a in cfg["kd"]["archs"]})
    paths.update({f"checkpoints/pair/{a}/{v}/{b}/{m}.pt": "pair" for a in cfg["kd"]["archs"]
                  for v in p["versions"] for b in p["budgets"] for m in p["modes"]})
    return paths


def analysis_csvs(cfg: dict) -> list[str]:
    archs, hist = cfg["kd"]["archs"], cfg["analysis"]["histogram"]["archs"]
    return [f"results/analysis/{a}/{kind}.csv" for a in archs for kind in ("layer_scan", "corruptions", "remedy")] + [
        f"results/analysis/{a}/histograms.csv" for a in archs if a in hist]


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
    t1 = tables["table1"]
    assert len(t1) == cells and (t1["delta"] - (t1["q_acc"] - t1["fp_acc"])).abs().max() < 1e-6
    assert (t1.groupby("arch")["highlighted"].sum() == 2).all(), "one highlighted cell (R and D) per arch"
    assert len(tables["table2"]) == len(cfg["kd"]["archs"])
    assert len(tables["table3"]) == 9 * len(cfg["kd"]["archs"])

    for path in analysis_csvs(cfg):
        assert not pd.read_csv(smoke_run / path).empty, path

    for name in report.figure_names(cfg):
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            assert (smoke_run / f"results/figures/{name}.{ext}").read_bytes().startswith(magic), f"{name}.{ext}"

    parser = _Tags()
    parser.feed((smoke_run / "results/report.html").read_text())
    assert {"html", "table", "img"} <= set(parser.tags)
    assert parser.tags.count("img") == len(report.figure_names(cfg))
    metrics = json.loads((smoke_run / "results/metrics.json").read_text())
    assert isinstance(metrics, dict) and metrics


def test_snakemake_second_run_has_nothing_to_do(smoke_run):
    out = run([SNAKEMAKE, "-n", *SMOKE], smoke_run, 600).stdout
    assert "Nothing to be done" in out, out[-3000:]


def test_mixed_flow_snakemake_then_dvc(smoke_run, tmp_path):
    """After snakemake, `dvc commit -f` adopts the outputs; after `dvc checkout`, `snakemake --touch`
    makes Snakemake agree; neither recomputes anything."""
    work = Path(shutil.copytree(smoke_run, tmp_path / "mixed", symlinks=True))
    cfg = smoke_config(work)
    before = digests(work, checkpoints(cfg))

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
    """A project copy (its config.yaml = the smoke profile) in which `dvc repro` has run once."""
    workdir = copy_project(tmp_path_factory.mktemp("dvc_run"), smoke=True)
    run([DVC, "repro"], workdir)
    return workdir


def test_dvc_repro_twice_runs_nothing_the_second_time(dvc_run):
    out = run([DVC, "repro"], dvc_run, 600).stdout
    assert "Running stage" not in out, out[-3000:]
    assert_dvc_clean(dvc_run)


def test_dvc_and_snakemake_give_the_same_results(dvc_run, smoke_run):
    for name in TABLE_COLUMNS:
        path = f"results/tables/{name}.csv"
        assert (dvc_run / path).read_text() == (smoke_run / path).read_text(), path


def test_changing_one_parameter_outdates_only_its_dependents(dvc_run, tmp_path):
    work = Path(shutil.copytree(dvc_run, tmp_path / "params", symlinks=True))
    cfg_path = work / "config.yaml"
    text = cfg_path.read_text()
    seeds = smoke_config(work)["analysis"]["corruptions"]["seeds"]
    cfg_path.write_text(text.replace(f"seeds: {seeds}\n", f"seeds: {seeds + 1}\n", 1))
    assert cfg_path.read_text() != text
    out = run([DVC, "status"], work).stdout
    changed = {line.rstrip(":") for line in out.splitlines() if line and not line[0].isspace()}
    archs = smoke_config(work)["kd"]["archs"]
    assert changed == {*(f"corruptions@{a}" for a in archs), "report"}, out


def test_dvc_exp_run_sets_a_key_and_reruns_only_its_dependents(dvc_run, tmp_path):
    work = Path(shutil.copytree(dvc_run, tmp_path / "exp", symlinks=True))
    out = run([DVC, "exp", "run", "-S", "config.yaml:analysis.histogram.bin_width=0.05"], work).stdout
    assert smoke_config(work)["analysis"]["histogram"]["bin_width"] == 0.05
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    archs = smoke_config(work)["analysis"]["histogram"]["archs"]
    assert ran == {*(f"histograms@{a}" for a in archs), "figures", "report"}, out[-3000:]


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
