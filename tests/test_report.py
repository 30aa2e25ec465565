"""dptq.report on synthetic tidy CSVs for two archs: figures, the self-contained HTML, metrics."""
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dptq import config, report

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"resnet18": 20, "mobilenetv4_conv_medium": 77}  # 77: the histogram grid must subsample
HISTOGRAM_ARCHS = ["mobilenetv4_conv_medium"]  # resnet18 has none: the optional input is absent
VERSIONS = {"I": [3, 10], "II": [4, 10], "III": [5, 10]}
BUDGETS = ["A", "B", "C"]
NETWORKS = ["white_box", "robust", "detrimental"]
CORRUPTIONS = ["jpeg", "gaussian_blur", "brightness", "contrast", "random_erasing", "gaussian_noise",
               "rotation", "skew", "distribution_shift"]
REMEDY_SETTINGS = [("minmax", False), ("minmax", True), ("percentile", False), ("percentile", True)]
BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"


def make_config(layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS):
    """The embedded default for these archs (no schema check: that needs timm and is tested elsewhere)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    return config.merge(cfg, {"kd": {"archs": list(layers)}, "analysis": {"histogram": {"archs": list(histogram_archs)}}})


def _table1(layers, rng):
    rows = []
    for arch, n in layers.items():
        for version, (lo, hi) in VERSIONS.items():
            for level, budget in zip((4.0, 5.5, 7.0), BUDGETS):
                for mode in ("robust", "detrimental"):
                    fp = 95 + rng.normal()
                    delta = -abs(rng.normal()) if mode == "robust" else -30 * rng.random()
                    rows.append(dict(arch=arch, version=version, budget=budget, mode=mode, options=f"{lo}-{hi}",
                                     capacity=round((level + (version != "I")) * n), fp_acc=fp, q_acc=fp + delta,
                                     delta=delta, highlighted=(version, budget) == ("II", "B"), white_box_acc=96.5))
    return pd.DataFrame(rows)


def _layer_scan(arch, n):
    depth = np.arange(1, n + 1) / n
    rows = []
    for network in ("robust", "detrimental"):
        drop = 0 if network == "robust" else 60
        for split in ("train", "test"):
            for scan, curve in (("before", depth), ("after", 1 - depth), ("single", depth * (1 - depth))):
                for layer, acc in enumerate(95 - drop * curve, 1):
                    rows.append(dict(arch=arch, network=network, split=split, scan=scan, layer=layer,
                                     relative_depth=layer / n, acc=acc))
    return pd.DataFrame(rows)


def _histograms(arch, n, rng):
    edges = np.arange(1, 101) * 0.02  # the zero bin [0, 0.02) is removed
    rows = []
    for network in ("robust", "detrimental"):
        for precision in ("fp", "q"):
            for layer in range(1, n + 1):
                density = np.exp(-edges[:-1] * rng.uniform(1, 5))
                density /= (density * 0.02).sum()
                sparsity = rng.uniform(30, 90)  # % of values in the zero bin
                rows += [dict(arch=arch, network=network, precision=precision, layer=layer, bin_left=lo,
                              bin_right=hi, density=d, sparsity=sparsity)
                         for lo, hi, d in zip(edges[:-1], edges[1:], density)]
    return pd.DataFrame(rows)


def _corruptions(arch, rng):
    return pd.DataFrame([dict(arch=arch, network=network, precision=precision, corruption=c, degree=degree,
                              seed=seed, acc=95 - 8 * degree - 5 * (network == "detrimental") + rng.normal())
                         for network in ("robust", "detrimental") for precision in ("fp", "q")
                         for c in CORRUPTIONS for degree in range(1, 6) for seed in range(3)])


def _remedy(arch, rng):
    return pd.DataFrame([dict(arch=arch, network=network, policy=network, setting=f"{rule}_keep_flagged" if keep else rule,
                              scale_rule=rule, keep_flagged=keep, flagged_layers="7" if keep else "none",
                              q_acc=80 + 10 * rng.random(), fp_acc=95.0)
                         for network in ("robust", "detrimental") for rule, keep in REMEDY_SETTINGS])


BENCHMARKS = {"train_pair/resnet18/I/A/robust.tsv": (12.5, 300.0), "train_pair/resnet18/I/A/detrimental.tsv": (20.0, 310.0),
              "distill/resnet18.tsv": (40.0, 500.0), "teacher.tsv": (100.0, 800.0)}


def transitory(arch):
    return 23.6 + len(arch)


def write_inputs(root: Path, layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS) -> dict:
    """Every input of the report under ``root`` (results/..., benchmarks/); returns the directories."""
    rng = np.random.default_rng(0)
    dirs = {"tables": root / "results/tables", "analysis": root / "results/analysis",
            "figures": root / "results/figures", "benchmarks": root / "benchmarks"}
    dirs["tables"].mkdir(parents=True)
    _table1(layers, rng).to_csv(dirs["tables"] / "table1.csv", index=False)
    pd.DataFrame({"arch": list(layers), "transitory_pct": [transitory(a) for a in layers]}
                 ).to_csv(dirs["tables"] / "table2.csv", index=False)
    pd.DataFrame([dict(arch=a, network=net, policy=pol, q_acc=90 + rng.random(), fp_acc=95.0)
                  for a in layers for net in NETWORKS for pol in ("robust", "detrimental", "random")]
                 ).to_csv(dirs["tables"] / "table3.csv", index=False)
    for arch, n in layers.items():
        out = dirs["analysis"] / arch
        out.mkdir(parents=True)
        _layer_scan(arch, n).to_csv(out / "layer_scan.csv", index=False)
        _corruptions(arch, rng).to_csv(out / "corruptions.csv", index=False)
        _remedy(arch, rng).to_csv(out / "remedy.csv", index=False)
        if arch in histogram_archs:
            _histograms(arch, n, rng).to_csv(out / "histograms.csv", index=False)
    for rel, (seconds, rss) in BENCHMARKS.items():
        path = dirs["benchmarks"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{BENCHMARK_HEADER}\n{seconds}\t0:00:{seconds:.0f}\t{rss}\t1\t1\t1\t0\t0\t50\t{seconds}\n")
    return dirs


def build_report(root: Path, layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS) -> dict:
    """Inputs, figures and report under ``root``; returns the directories plus html, metrics, figure paths."""
    cfg = make_config(layers, histogram_archs)
    dirs = write_inputs(root, layers, histogram_archs)
    dirs["paths"] = report.figures(cfg, dirs["tables"], dirs["analysis"], dirs["figures"])
    dirs["html"], dirs["metrics"] = root / "results/report.html", root / "results/metrics.json"
    report.build(cfg, dirs["tables"], dirs["analysis"], dirs["figures"], dirs["benchmarks"], dirs["html"], dirs["metrics"])
    return dirs


class Page(HTMLParser):
    """Tables (id -> body rows, highlighted rows and cells), image sources and element ids of a page."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.ids, self._table, self._in_body = {}, [], [], None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), {"rows": 0, "hl_rows": 0, "hl_cells": 0})
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._table["rows"] += 1
            self._table["hl_rows"] += attrs.get("class") == "hl"
        elif tag == "td" and "hl" in (attrs.get("class") or "").split():
            self._table["hl_cells"] += 1
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_report(tmp_path_factory.mktemp("report"))


def test_figures_png_and_pdf(built):
    cfg = make_config()
    names = report.figure_names(cfg)
    assert names == ["fig1_table1", "fig2_layer_scan", "fig3_histograms_mobilenetv4_conv_medium",
                     "fig4_corruptions_resnet18", "fig4_corruptions_mobilenetv4_conv_medium"]
    assert sorted(built["paths"]) == sorted(built["figures"] / f"{n}.{f}" for n in names for f in report.FORMATS)
    for path in built["paths"]:
        assert path.stat().st_size > (10_000 if path.suffix == ".png" else 5_000), path
        assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF")


def test_html_has_every_table_and_figure(built):
    text = built["html"].read_text()
    page = Page(text)
    n_arch, n_cells = len(LAYERS), len(VERSIONS) * len(BUDGETS)
    assert page.tables["table1"]["rows"] == n_arch * len(VERSIONS)
    assert page.tables["table1"]["hl_cells"] == n_arch * 4  # R FP, R Δ, D FP, D Δ of the highlighted cell
    assert page.tables["table1-tidy"]["rows"] == n_arch * n_cells * 2
    assert page.tables["table1-tidy"]["hl_rows"] == n_arch * 2
    assert page.tables["table2"]["rows"] == n_arch
    assert page.tables["table3"]["rows"] == n_arch * (3 + 1)  # three policies and the FP row
    assert page.tables["remedy"]["rows"] == n_arch * 2 * len(REMEDY_SETTINGS)
    assert page.tables["runtimes"]["rows"] == 3  # train_pair, distill, teacher
    assert page.tables["versions"]["rows"] >= 8
    assert page.tables["reference"]["rows"] == 7 + 9  # 7 headline quantities + Table 3
    assert len(page.images) == len(report.figure_names(make_config()))
    assert all(src.startswith("data:image/png;base64,") and len(src) > 10_000 for src in page.images)
    for name in report.figure_names(make_config()):
        assert f'id="{name}"' in text and report.caption(name)[:40] in text.replace("&#x27;", "'")
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script src" not in text
    assert len(page.ids) == len(set(page.ids))
    assert "-24.39" in text and "88.03" in text  # the paper's numbers
    assert "bin_width: 0.02" in text  # the config that made them
    assert "No activation histograms for resnet18" in text


def test_metrics_json(built):
    metrics = json.loads(built["metrics"].read_text())
    assert list(metrics) == list(LAYERS)
    t1 = pd.read_csv(built["tables"] / "table1.csv")
    for arch, m in metrics.items():
        assert m["highlighted"] == "II-B" and m["white_box_acc"] == 96.5
        row = t1[(t1.arch == arch) & t1.highlighted & (t1["mode"] == "detrimental")].iloc[0]
        assert m["detrimental_fp_acc"] == pytest.approx(row.fp_acc)
        assert m["detrimental_delta"] == pytest.approx(row.delta)
        assert {"robust_fp_acc", "robust_delta", "transitory_pct"} <= set(m)
        assert all(isinstance(v, (int, float, str)) for v in m.values())  # flat for `dvc metrics show`
        assert m["transitory_pct"] == pytest.approx(transitory(arch))


def test_runtimes_sum_and_max(built):
    times = report.runtimes(built["benchmarks"]).set_index("rule")
    assert times.loc["train_pair", "jobs"] == 2
    assert times.loc["train_pair", "total_s"] == pytest.approx(32.5)
    assert times.loc["train_pair", "max_s"] == pytest.approx(20.0)
    assert times.loc["train_pair", "max_rss_mb"] == pytest.approx(310.0)
    assert times.loc["teacher", "total_s"] == pytest.approx(100.0)
    assert report.runtimes(built["benchmarks"] / "absent").empty


def test_missing_required_input_names_the_file(tmp_path):
    dirs = write_inputs(tmp_path)
    missing = dirs["analysis"] / "resnet18" / "corruptions.csv"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        report.figures(make_config(), dirs["tables"], dirs["analysis"], dirs["figures"])


def test_configured_histograms_are_required(tmp_path):
    dirs = write_inputs(tmp_path)
    cfg = config.merge(make_config(), {"analysis": {"histogram": {"archs": list(LAYERS)}}})
    with pytest.raises(FileNotFoundError, match="resnet18/histograms.csv"):
        report.figures(cfg, dirs["tables"], dirs["analysis"], dirs["figures"])


def test_missing_column_names_file_and_column(tmp_path):
    dirs = write_inputs(tmp_path)
    path = dirs["tables"] / "table2.csv"
    pd.read_csv(path).drop(columns="transitory_pct").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"table2.csv: missing column\(s\) \['transitory_pct'\]"):
        report.build(make_config(), dirs["tables"], dirs["analysis"], dirs["figures"], dirs["benchmarks"],
                     tmp_path / "r.html", tmp_path / "m.json")


def test_build_needs_the_figures(tmp_path):
    dirs = write_inputs(tmp_path)
    with pytest.raises(FileNotFoundError, match="fig1_table1.png: figure not found"):
        report.build(make_config(), dirs["tables"], dirs["analysis"], dirs["figures"], dirs["benchmarks"],
                     tmp_path / "r.html", tmp_path / "m.json")


def test_captions():
    assert set(report.CAPTIONS) == set(report.FIGURES)
    assert "regnetx_016" in report.caption("fig4_corruptions_regnetx_016")
    assert str(report.MAX_HISTOGRAM_LAYERS) in report.caption("fig3_histograms_resnet18")
    with pytest.raises(KeyError, match="fig9"):
        report.caption("fig9_other")


def test_pick_layers():
    assert report._pick_layers(list(range(1, 21))) == list(range(1, 21))
    picked = report._pick_layers(list(range(1, 78)))
    assert len(picked) == report.MAX_HISTOGRAM_LAYERS and picked[0] == 1 and picked[-1] == 77
    assert picked == sorted(set(picked))


def test_paper_reference_matches_spec():
    ref = report.PAPER_REFERENCE
    assert ref["white_box_acc"] == {"resnet18": 88.03, "mobilenetv4_conv_medium": 88.01, "regnetx_016": 85.53}
    assert ref["transitory_pct"] == {"resnet18": 23.60, "mobilenetv4_conv_medium": 67.32, "regnetx_016": 27.09}
    assert ref["highlighted"]["mobilenetv4_conv_medium"]["detrimental"] == {"fp_acc": 84.30, "delta": -63.72}
    assert ref["table3"]["resnet18"]["detrimental"]["detrimental"] == 63.70


def test_caption_files_are_valid_rst(tmp_path):
    docutils = pytest.importorskip("docutils.core")
    paths = report.caption_files(make_config(), tmp_path)
    assert list(paths) == report.figure_names(make_config())
    for name, path in paths.items():
        body = docutils.publish_parts(path.read_text(), writer="html",
                                      settings_overrides={"report_level": 2, "halt_level": 5})["body"]
        assert "system-message" not in body, (name, body)
        assert "|FP_R − FP_D|" in body or name != "fig1_table1"  # escaped markup renders literally


def test_columns_match_the_writers():
    """The report reads what evaluate and analysis write (imports torch: a few seconds)."""
    from dptq import analysis, evaluate

    written = {"table1": evaluate.TABLE1_COLUMNS, "table2": evaluate.TABLE2_COLUMNS, "table3": evaluate.TABLE3_COLUMNS,
               "layer_scan": analysis.LAYER_SCAN_COLUMNS, "histograms": analysis.HISTOGRAM_COLUMNS,
               "corruptions": analysis.CORRUPTION_COLUMNS, "remedy": analysis.REMEDY_COLUMNS}
    for kind, columns in report.COLUMNS.items():
        assert set(columns) <= set(written[kind]), kind
