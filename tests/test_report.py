"""dptq.report on synthetic tidy CSVs (3 seeds, and 1 seed): the self-contained HTML, metrics, captions.

The synthetic inputs (``write_inputs``) have the shapes the pipeline writes: per-seed tables,
the summary over seeds, and one analysis CSV per (seed, arch). test_figures and
test_report_browser use them too.
"""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dptq import claims, config, figures, report, tables

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "workflow" / "report"
LAYERS = {"resnet18": 20, "mobilenetv4_conv_medium": 77}  # 77: the histogram grid must subsample
HISTOGRAM_ARCHS = ["mobilenetv4_conv_medium"]  # resnet18 has none: the optional input is absent
VERSIONS = {"I": [3, 10], "II": [4, 10], "III": [5, 10]}
BUDGETS = ["A", "B", "C"]
NETWORKS = ["white_box", "robust", "detrimental"]
CORRUPTIONS = ["jpeg", "gaussian_blur", "brightness", "contrast", "random_erasing", "gaussian_noise",
               "rotation", "skew", "distribution_shift"]
REMEDY_SETTINGS = [("minmax", False), ("minmax", True), ("percentile", False), ("percentile", True)]
BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
BENCHMARKS = {"train_pair/seed0/resnet18/I/A/robust.tsv": (12.5, 300.0),
              "train_pair/seed1/resnet18/I/A/robust.tsv": (20.0, 310.0),
              "distill/resnet18.tsv": (40.0, 500.0), "teacher.tsv": (100.0, 800.0)}
SUMMARY_CELL = ("II", "B")  # highlighted on the means


def make_config(layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS):
    """The embedded default for these archs (no schema check: that needs timm and is tested elsewhere)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    return config.merge(cfg, {"kd": {"archs": list(layers)}, "analysis": {"histogram": {"archs": list(histogram_archs)}}})


def seed_cell(seed):
    """Each seed's own highlighted cell: seed 1 picks another one than the means."""
    return ("III", "A") if seed == 1 else SUMMARY_CELL


def paper_cell(arch):
    """The paper's highlighted cell of ``arch`` as (version, budget)."""
    return tuple(tables.paper_cell(arch).split("-"))


def at_cell(seed, arch, cell):
    """The leading columns of a Table 2 or 3 row at ``cell``."""
    return dict(seed=seed, arch=arch, version=cell[0], budget=cell[1], highlighted=cell == seed_cell(seed),
                paper_cell=cell == paper_cell(arch))


def _table1(layers, seeds, rng):
    rows = []
    for seed in seeds:
        for arch, n in layers.items():
            for version, (lo, hi) in VERSIONS.items():
                for level, budget in zip((4.0, 5.5, 7.0), BUDGETS):
                    for mode in ("robust", "detrimental"):
                        fp = 95 + rng.normal()
                        delta = -abs(rng.normal()) if mode == "robust" else -30 * rng.random()
                        rows.append(dict(seed=seed, arch=arch, version=version, budget=budget, mode=mode,
                                         options=f"{lo}-{hi}", capacity=round((level + (version != "I")) * n),
                                         fp_acc=fp, q_acc=fp + delta, delta=delta,
                                         highlighted=(version, budget) == seed_cell(seed),
                                         white_box_acc=96.5 + seed / 10))
    return pd.DataFrame(rows)


def half_width(values):
    lo, hi = figures.t_interval(values)
    return (hi - lo) / 2 if len(values) > 1 else np.nan


def summarise(t1):
    """table1_summary.csv from table1.csv (means and 95 % t half-widths), with SUMMARY_CELL highlighted."""
    stats = {f"{c}_{name}": (c, f) for c in ("fp_acc", "q_acc", "delta", "white_box_acc")
             for name, f in (("mean", "mean"), ("ci95", half_width))}
    out = t1.groupby(["arch", "version", "budget", "mode", "options", "capacity"], sort=False).agg(
        n_seeds=("seed", "size"), **stats).reset_index()
    return out.assign(seeds_meeting_effect=1,
                      highlighted=[(v, b) == SUMMARY_CELL for v, b in zip(out["version"], out["budget"])])


def effect_table(t1, cfg):
    """effect.csv from table1.csv, SUMMARY_CELL highlighted."""
    out = claims.effect(t1, claims.Bar(**cfg["evaluate"]["effect"]))
    return out.assign(highlighted=[(v, b) == SUMMARY_CELL for v, b in zip(out["version"], out["budget"])])


def hinge_table(t1, cfg):
    """The hinge-alone pairs the pipeline would train (at the paper's cell where the config's D is off
    the hinge): each the same D 2 points higher at full precision, Δ −1."""
    beside = {(arch, *cell) for arch in pd.unique(t1["arch"])
              for cell in config.hinge_beside(cfg, arch, tables.paper_cell(arch))}
    at = np.array([key in beside for key in zip(t1["arch"], t1["version"], t1["budget"])], dtype=bool)
    rows = t1[at & (t1["mode"] == "detrimental").to_numpy()]
    return rows.assign(fp_acc=rows["fp_acc"] + 2, q_acc=rows["fp_acc"] + 1, delta=-1.0)[tables.HINGE_COLUMNS]


def _layer_scan(seed, arch, n):
    depth = np.arange(1, n + 1) / n
    rows = []
    for network in ("robust", "detrimental"):
        drop = 0 if network == "robust" else 60 - 5 * seed
        for split in ("train", "test"):
            for scan, curve in (("before", depth), ("after", 1 - depth), ("single", depth * (1 - depth))):
                for layer, acc in enumerate(95 - drop * curve, 1):
                    rows.append(dict(seed=seed, arch=arch, network=network, split=split, scan=scan, layer=layer,
                                     relative_depth=layer / n, acc=acc))
    return pd.DataFrame(rows)


def _histograms(seed, arch, n, rng):
    edges = np.arange(1, 101) * 0.02  # the zero bin [0, 0.02) is removed
    rows = []
    for network in ("robust", "detrimental"):
        for precision in ("fp", "q"):
            for layer in range(1, n + 1):
                density = np.exp(-edges[:-1] * rng.uniform(1, 5))
                density /= (density * 0.02).sum()
                sparsity = rng.uniform(30, 90)  # % of values in the zero bin
                rows += [dict(seed=seed, arch=arch, network=network, precision=precision, layer=layer, bin_left=lo,
                              bin_right=hi, density=d, sparsity=sparsity)
                         for lo, hi, d in zip(edges[:-1], edges[1:], density)]
    return pd.DataFrame(rows)


def _corruptions(seed, arch, rng):
    return pd.DataFrame([dict(seed=seed, arch=arch, network=network, precision=precision, corruption=c, degree=degree,
                              corruption_seed=draw, acc=95 - 8 * degree - 5 * (network == "detrimental") + rng.normal())
                         for network in ("robust", "detrimental") for precision in ("fp", "q")
                         for c in CORRUPTIONS for degree in range(1, 6) for draw in range(3)])


def _remedy(seed, arch, rng):
    return pd.DataFrame([dict(seed=seed, arch=arch, network=network, policy=network,
                              setting=f"{rule}_keep_flagged" if keep else rule, scale_rule=rule, keep_flagged=keep,
                              flagged_layers="7" if keep else "none", q_acc=80 + 10 * rng.random(), fp_acc=95.0)
                         for network in ("robust", "detrimental") for rule, keep in REMEDY_SETTINGS])


def transitory(arch, seed):
    return 23.6 + len(arch) + seed


def write_inputs(root: Path, layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS, seeds=(0, 1, 2)) -> dict:
    """Every input of the figures and the report under ``root``; returns their paths.

    ``tables``: table1, summary, table2, table3; ``layer_scan``, ``histograms``, ``corruptions``,
    ``remedy``: lists of per-(seed, arch) files; ``figures``, ``benchmarks``: folders.
    """
    rng = np.random.default_rng(0)
    tables_dir = root / "results/tables"
    tables_dir.mkdir(parents=True)
    paths = {"tables": {k: tables_dir / f"{n}.csv" for k, n in
                        (("table1", "table1"), ("summary", "table1_summary"), ("table2", "table2"), ("table3", "table3"),
                         ("effect", "effect"), ("hinge", "hinge"))},
             "layer_scan": [], "histograms": [], "corruptions": [], "remedy": [],
             "figures": root / "results/figures", "benchmarks": root / "benchmarks"}
    t1 = _table1(layers, seeds, rng)
    t1.to_csv(paths["tables"]["table1"], index=False)
    summarise(t1).to_csv(paths["tables"]["summary"], index=False)
    effect_table(t1, make_config(layers, histogram_archs)).to_csv(paths["tables"]["effect"], index=False)
    hinge_table(t1, make_config(layers, histogram_archs)).to_csv(paths["tables"]["hinge"], index=False)
    at = [at_cell(s, a, cell) for s in seeds for a in layers for cell in dict.fromkeys([seed_cell(s), paper_cell(a)])]
    pd.DataFrame([dict(c, transitory_pct=transitory(c["arch"], c["seed"]) + (not c["highlighted"])) for c in at]
                 ).to_csv(paths["tables"]["table2"], index=False)
    pd.DataFrame([dict(c, network=net, policy=pol, q_acc=90 + rng.random(), fp_acc=95.0 - c["seed"])
                  for c in at for net in NETWORKS for pol in ("robust", "detrimental", "random")]
                 ).to_csv(paths["tables"]["table3"], index=False)
    for seed in seeds:
        for arch, n in layers.items():
            out = root / f"results/analysis/seed{seed}/{arch}"
            out.mkdir(parents=True)
            frames = {"layer_scan": _layer_scan(seed, arch, n), "corruptions": _corruptions(seed, arch, rng),
                      "remedy": _remedy(seed, arch, rng)}
            if arch in histogram_archs:
                frames["histograms"] = _histograms(seed, arch, n, rng)
            for kind, frame in frames.items():
                frame.to_csv(out / f"{kind}.csv", index=False)
                paths[kind].append(out / f"{kind}.csv")
    for rel, (seconds, rss) in BENCHMARKS.items():
        path = paths["benchmarks"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{BENCHMARK_HEADER}\n{seconds}\t0:00:{seconds:.0f}\t{rss}\t1\t1\t1\t0\t0\t50\t{seconds}\n")
    return paths


def draw(paths: dict) -> list[Path]:
    return figures.draw(paths["tables"]["table1"], paths["tables"]["summary"], paths["layer_scan"],
                        paths["histograms"], paths["corruptions"], paths["figures"])


def build(paths: dict, cfg: dict, root: Path) -> None:
    paths["html"], paths["metrics"] = root / "results/report.html", root / "results/metrics.json"
    report.build(paths["tables"], paths["remedy"], paths["layer_scan"], paths["figures"], CAPTIONS, paths["benchmarks"], cfg,
                 paths["html"], paths["metrics"])


def build_report(root: Path, layers=LAYERS, histogram_archs=HISTOGRAM_ARCHS, seeds=(0, 1, 2)) -> dict:
    """Inputs, figures and report under ``root``; returns the input paths plus html, metrics, figure paths."""
    paths = write_inputs(root, layers, histogram_archs, seeds)
    paths["paths"] = draw(paths)
    build(paths, make_config(layers, histogram_archs), root)
    return paths


class Page(HTMLParser):
    """Tables (id -> body rows, highlighted rows and cells, and ``text``: each body row's cell texts,
    header cells included), image sources and element ids of a page.

    A highlighted row is one whose every data cell has the class ``hl``.
    """

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.ids, self._table, self._in_body, self._row = {}, [], [], None, False, None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), {"rows": 0, "hl_rows": 0, "hl_cells": 0, "text": []})
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._table["rows"] += 1
            self._table["text"].append([])
            self._row = []
        elif tag in ("td", "th") and self._in_body:
            self._cell = []
            if tag == "td":
                self._row.append("hl" in (attrs.get("class") or "").split())
                self._table["hl_cells"] += self._row[-1]
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "tr" and self._in_body:
            self._table["hl_rows"] += bool(self._row) and all(self._row)
        elif tag in ("td", "th") and self._cell is not None:
            self._table["text"][-1].append("".join(self._cell).strip())
            self._cell = None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three seeds, two archs, Fig. 3 for one of them."""
    return build_report(tmp_path_factory.mktemp("report3"))


@pytest.fixture(scope="module")
def built1(tmp_path_factory):
    """One seed, one small arch with histograms: no intervals anywhere."""
    return build_report(tmp_path_factory.mktemp("report1"), layers={"resnet18": 8}, histogram_archs=["resnet18"],
                        seeds=(0,))


def test_html_has_every_table_and_figure(built):
    text = built["html"].read_text()
    page = Page(text)
    n_arch, n_cells, n_seeds = len(LAYERS), len(VERSIONS) * len(BUDGETS), 3
    assert page.tables["table1"]["rows"] == n_arch * len(VERSIONS)
    assert page.tables["table1"]["hl_cells"] == n_arch * 4  # R FP, R Δ, D FP, D Δ of the summary's cell
    assert page.tables["table1-summary"]["rows"] == n_arch * n_cells * 2
    assert page.tables["table1-summary"]["hl_rows"] == n_arch * 2
    assert page.tables["table1-tidy"]["rows"] == n_seeds * n_arch * n_cells * 2
    assert page.tables["table1-tidy"]["hl_rows"] == n_seeds * n_arch * 2  # each seed's own cell
    # each arch at its seeds' own cells, then at the paper's (seed 1 highlights III-A, the others II-B)
    assert page.tables["table2"]["rows"] == n_arch * 2
    assert page.tables["table3"]["rows"] == n_arch * 2 * (3 + 1)  # three policies and the FP row
    assert [row[:2] for row in page.tables["table2"]["text"]] == [
        ["resnet18", "each seed's highlighted cell (II-B, III-A)"], ["resnet18", "the paper's cell (II-B)"],
        ["mobilenetv4_conv_medium", "each seed's highlighted cell (II-B, III-A)"],
        ["mobilenetv4_conv_medium", "the paper's cell (III-A)"]]
    assert page.tables["remedy"]["rows"] == n_seeds * n_arch * 2 * len(REMEDY_SETTINGS)
    assert page.tables["runtimes"]["rows"] == 3  # train_pair, distill, teacher
    assert page.tables["versions"]["rows"] >= 8
    # 7 headline quantities, 4 + transitory points at the paper's cell, Table 3 there
    assert page.tables["reference"]["rows"] == 7 + 5 + 9
    names = figures.figure_names(list(LAYERS), HISTOGRAM_ARCHS)
    assert len(page.images) == len(names)
    assert all(src.startswith("data:image/png;base64,") and len(src) > 10_000 for src in page.images)
    plain = text.replace("&#39;", "'").replace("&#34;", '"')
    for name in names:
        assert f'id="{name}"' in text and report.figure_caption(CAPTIONS, name) in plain
    for name in ("table1", "table1_summary", "table2", "table3"):
        assert report.caption(CAPTIONS, name) in plain
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script src" not in text
    assert len(page.ids) == len(set(page.ids))
    assert {"s-reference", "s-table1", "s-table2", "s-table3", "s-figures", "s-remedy", "s-runtimes",
            "s-environment", "s-config"} <= set(page.ids)
    assert "-24.39" in text and "88.03" in text  # the paper's numbers
    assert "bin_width: 0.02" in text  # the config that made them
    assert "No activation histograms for resnet18" in text
    assert " ±\u00a0" in text and "mean over 3 seeds" in text


def test_table_cells_show_mean_and_half_width(built):
    text = built["html"].read_text()
    summary = pd.read_csv(built["tables"]["summary"], dtype={"version": str, "budget": str})
    row = summary[(summary.arch == "resnet18") & (summary.version == "II") & (summary.budget == "B")
                  & (summary["mode"] == "detrimental")].iloc[0]
    assert f"{row.delta_mean:+.2f} ±\u00a0{row.delta_ci95:.2f}" in text  # Table 1, paper layout
    t2 = pd.read_csv(built["tables"]["table2"])
    for at in ("highlighted", "paper_cell"):
        values = t2[(t2.arch == "resnet18") & t2[at]]["transitory_pct"]
        assert f"{values.mean():.2f} ±\u00a0{half_width(values):.2f}" in text  # Table 2
    t3 = pd.read_csv(built["tables"]["table3"])
    q = t3[(t3.arch == "resnet18") & (t3.policy == "random") & (t3.network == "robust") & t3.highlighted]["q_acc"]
    assert f"{q.mean():.2f} ±\u00a0{half_width(q):.2f}" in text  # Table 3


def test_one_seed_has_no_intervals(built1):
    text = built1["html"].read_text()
    page = Page(text)
    assert page.tables["table1-tidy"]["rows"] == page.tables["table1-summary"]["rows"] == len(VERSIONS) * len(BUDGETS) * 2
    assert page.tables["table1"]["hl_cells"] == 4
    assert page.tables["table2"]["rows"] == 1 and page.tables["remedy"]["rows"] == 2 * len(REMEDY_SETTINGS)
    # seed 0 highlights II-B, the paper's cell: one group, named as both
    assert page.tables["table2"]["text"][0][:2] == ["resnet18", "each seed's highlighted cell, the paper's (II-B)"]
    assert " ±\u00a0" not in text and "one seed" in text
    assert len(page.images) == len(figures.figure_names(["resnet18"], ["resnet18"])) == 4
    assert "No activation histograms" not in text
    metrics = json.loads(built1["metrics"].read_text())
    assert metrics["resnet18"]["n_seeds"] == 1
    assert metrics["resnet18"]["transitory_pct"] == pytest.approx(transitory("resnet18", 0))


def test_metrics_json(built):
    metrics = json.loads(built["metrics"].read_text())
    assert list(metrics) == list(LAYERS)
    summary = pd.read_csv(built["tables"]["summary"])
    for arch, m in metrics.items():
        assert m["highlighted"] == "-".join(SUMMARY_CELL) and m["n_seeds"] == 3
        assert m["white_box_acc"] == pytest.approx(96.6)  # mean of 96.5, 96.6, 96.7
        row = summary[(summary.arch == arch) & summary.highlighted & (summary["mode"] == "detrimental")].iloc[0]
        assert m["detrimental_fp_acc"] == pytest.approx(row.fp_acc_mean)
        assert m["detrimental_delta"] == pytest.approx(row.delta_mean)
        assert {"robust_fp_acc", "robust_q_acc", "robust_delta", "detrimental_q_acc"} <= set(m)
        assert all(isinstance(v, (int, float, str)) for v in m.values())  # flat for `dvc metrics show`
        assert m["transitory_pct"] == pytest.approx(np.mean([transitory(arch, s) for s in range(3)]))
        effect = pd.read_csv(built["tables"]["effect"])
        assert m["seeds_meeting_effect"] == effect[(effect.arch == arch) & effect.highlighted]["meets"].sum()


def test_claims_section_states_each_seed(built):
    """The claims section: per arch the highlighted cell and each seed's verdict, the cross-policy
    checks and D's most costly layers, with the numbers of the inputs."""
    html = built["html"].read_text()
    section = html[html.index('id="s-claims"'):html.index('id="s-table1"')]
    effect = pd.read_csv(built["tables"]["effect"])
    for arch in LAYERS:
        at = effect[(effect.arch == arch) & effect.highlighted]
        assert f"{int(at['meets'].sum())} of 3" in section
    for table_id in ("effect", "effect-rows", "cross-policy", "failure-depth"):
        assert f'id="{table_id}"' in section
    # the synthetic single-layer scan is lowest at mid-depth: resnet18's layer 10 of 20 comes first
    depth = section[section.index('id="failure-depth"'):]
    assert '<td class="data row0 col3 n" >10</td>' in depth and "collapse_needs_both" in section


def test_headline_without_a_highlighted_cell(built):
    summary = figures.read(built["tables"]["summary"], "summary").assign(highlighted=False)
    effect = figures.read(built["tables"]["effect"], "effect").assign(highlighted=False)
    entry = report.headline(summary, figures.read(built["tables"]["table2"], "table2"), effect)["resnet18"]
    assert entry["highlighted"] is None and entry["robust_delta"] is None and entry["white_box_acc"] == pytest.approx(96.6)


def test_runtimes_sum_and_max(built):
    times = report.runtimes(built["benchmarks"]).set_index("rule")
    assert times.loc["train_pair", "jobs"] == 2  # benchmarks/train_pair/seed{N}/...: the rule is the first folder
    assert times.loc["train_pair", "total_s"] == pytest.approx(32.5)
    assert times.loc["train_pair", "max_s"] == pytest.approx(20.0)
    assert times.loc["train_pair", "max_rss_mb"] == pytest.approx(310.0)
    assert times.loc["teacher", "total_s"] == pytest.approx(100.0)
    assert report.runtimes(built["benchmarks"] / "absent").empty


def test_missing_column_names_file_and_column(tmp_path):
    paths = write_inputs(tmp_path, layers={"resnet18": 8}, histogram_archs=[], seeds=(0,))
    path = paths["tables"]["table2"]
    pd.read_csv(path).drop(columns="transitory_pct").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"table2.csv: missing column\(s\) \['transitory_pct'\]"):
        build(paths, make_config({"resnet18": 8}, []), tmp_path)


def test_build_needs_the_figures_and_leaves_nothing(tmp_path):
    paths = write_inputs(tmp_path, layers={"resnet18": 8}, histogram_archs=[], seeds=(0,))
    with pytest.raises(FileNotFoundError, match="fig1_table1.png: figure not found"):
        build(paths, make_config({"resnet18": 8}, []), tmp_path)
    assert not (tmp_path / "results/report.html").exists() and not (tmp_path / "results/metrics.json").exists()


def test_build_names_a_missing_table(tmp_path):
    with pytest.raises(KeyError, match="summary"):
        report.build({"table1": "t1.csv", "table2": "t2.csv", "table3": "t3.csv"}, [], [], tmp_path, CAPTIONS, tmp_path,
                     make_config(), tmp_path / "r.html", tmp_path / "m.json")


def test_captions_fill_arch_and_layers():
    text = report.figure_caption(CAPTIONS, "fig3_histograms_regnetx_016")
    assert "regnetx_016" in text and str(figures.MAX_HISTOGRAM_LAYERS) in text and "{" not in text
    assert "|FP_R − FP_D|" in report.figure_caption(CAPTIONS, "fig1_table1")  # the RST escape undone
    with pytest.raises(KeyError, match="fig9"):
        report.figure_caption(CAPTIONS, "fig9_other")
    with pytest.raises(ValueError, match=r"\{arch\}"):
        report.caption(CAPTIONS, "fig4_corruptions")  # a placeholder left unfilled
    with pytest.raises(FileNotFoundError, match="table9.rst"):
        report.caption(CAPTIONS, "table9")


def test_caption_files_are_one_source_for_both_reports():
    """Each caption file is valid reStructuredText that Snakemake's Jinja pass leaves alone, and
    docutils renders it to the very text the page shows."""
    docutils = pytest.importorskip("docutils.core")
    names = [*figures.KINDS, "table1", "table1_summary", "table2", "table3", "bit_floor"]
    for name in names:
        raw = (CAPTIONS / f"{name}.rst").read_text()
        assert not re.search(r"\{[{%#]", raw), name  # no Jinja markup: snakemake --report shows it verbatim
        filled = raw.replace("{arch}", "resnet18").replace("{max_layers}", str(figures.MAX_HISTOGRAM_LAYERS))
        parts = docutils.publish_parts(filled, writer="html", settings_overrides={"report_level": 2, "halt_level": 5})
        assert "system-message" not in parts["body"], (name, parts["body"])
        rendered = " ".join(re.sub(r"<[^>]+>", "", parts["body"]).replace("&amp;", "&").split())
        kind_arch = {"arch": "resnet18"} if name in figures.PER_ARCH else {}
        page = report.caption(CAPTIONS, name, **kind_arch, max_layers=figures.MAX_HISTOGRAM_LAYERS)
        assert rendered == page, name


def test_paper_reference_matches_the_paper():
    ref = report.paper()
    assert ref["white_box_acc"] == {"resnet18": 88.03, "mobilenetv4_conv_medium": 88.01, "regnetx_016": 85.53}
    assert ref["transitory_pct"] == {"resnet18": 23.60, "mobilenetv4_conv_medium": 67.32, "regnetx_016": 27.09}
    assert ref["highlighted"]["mobilenetv4_conv_medium"]["detrimental"] == {"fp_acc": 84.30, "delta": -63.72}
    assert ref["highlighted"]["resnet18"]["cell"] == "II-B"
    assert ref["table3"]["resnet18"]["detrimental"]["detrimental"] == 63.70


def test_columns_match_the_writers():
    """The report reads what evaluate and analysis write (imports torch: a few seconds)."""
    from dptq import analysis

    written = {"table1": tables.TABLE1_COLUMNS, "table2": tables.TABLE2_COLUMNS, "table3": tables.TABLE3_COLUMNS,
               "layer_scan": analysis.LAYER_SCAN_COLUMNS, "histograms": analysis.HISTOGRAM_COLUMNS,
               "corruptions": analysis.CORRUPTION_COLUMNS, "remedy": analysis.REMEDY_COLUMNS}
    for kind, columns in written.items():
        assert set(figures.COLUMNS[kind]) <= set(columns), kind


def test_audit_section_states_the_verdicts_first_with_their_numbers(tmp_path):
    """One audit (its record as dptq.audit writes it, read back, with its cells.csv and coupling.csv
    rows) becomes the verdict table (first), the cells, the runtime check and the coupling table,
    each value from those files."""
    from dptq.audit_record import Agreement, AuditResult, CellResult, RuntimeResult, Verdict

    acc = {"uniform": 97.0, "random": 96.0, "greedy": 93.0, "learned": 90.0}
    result = AuditResult(
        model="mine", arch="resnet18", inputs={}, clean_acc=98.0, test_images=40, subset_images=40, tolerated_drop=1.0,
        cells=[CellResult("I-A", acc, 90.0, "learned", True, 97.2)], float_layers=["layer4.0.conv1"],
        nodes_to_exclude=["/layer4/layer4.0/conv1/Conv"], simulated=Verdict(90.0, 8.0, "fail"),
        runtime=RuntimeResult(Verdict(97.5, 0.5, "pass"), 97.9, 98.0, 97.5, Agreement(100.0, 3e-8, 2e-6),
                              Agreement(100.0, 0.0, 1e-7), None, {"per_channel": False},
                              [{"network": "D", "cell": "I-A", "fp_acc": 97.0, "runtime_acc": 95.0}]),
        coupling=[], cpu={"cpu_model": "x86", "avx512_vnni": False, "avx_vnni": False, "u8s8_may_saturate": True},
        coupling_verdict={"verdict": "fail", "runner": "runtime", "kind": "crude", "batch_size": 8, "batches": 2,
                          "drop": 4.25, "ci95": 9.53, "lower": -5.28, "largest_drop": 4.25},
        guard={"threshold_bits": 3.0, "quantile": 100.0, "factor": 1.5, "median_ranges": [1.0], "served_alone_clean_pct": 0.7,
               "served_alone_corrupted_pct": 4.2, "verdict": {"verdict": "pass", "runner": "runtime_guarded",
                                                              "kind": "none", "batch_size": 8, "batches": 2, "drop": 0.1,
                                                              "ci95": 0.3, "lower": -0.2, "largest_drop": 0.1}},
        seconds={})
    cells = pd.DataFrame([dict(model="mine", version="I", budget="A", policy=p, network="N", acc=a, fp_acc=98.0,
                               drop=98.0 - a) for p, a in {"fp": 98.0, **acc}.items()])
    points = pd.DataFrame([dict(model="mine", kind="crude", batch_size=8, batch_index=b, mates_acc=m, clean_acc=c,
                                runner=r) for r, rows in (("runtime", [(90.0, 95.0), (91.5, 95.0)]),
                                                          ("runtime_float_layers", [(94.5, 95.0), (94.5, 95.0)]))
                           for b, (m, c) in enumerate(rows)])
    html = report._audit_html([AuditResult.read(result.write(tmp_path / "audit.json"))], cells, points)
    assert list(html) == ["verdicts", "cells", "runtime", "coupling"]
    for fragment in ("mine", "fail", "pass", "90.00", "97.50", "layer4.0.conv1", "crude at n = 8", "0.7 / 4.2"):
        assert fragment in html["verdicts"], fragment
    assert "learned" in html["cells"] and "97.20" in html["cells"] and "I-A" in html["cells"]
    assert "3e-08" in html["runtime"] and "95.00" in html["runtime"]
    assert "+4.25 ±\xa09.53" in html["coupling"] and "+0.50" in html["coupling"] and "runtime_float_layers" in html["coupling"]
    assert report._audit_html([], cells, points) is None


def test_a_bit_floor_gets_its_table_and_figure(tmp_path):
    """Versions of one option (here b = 8 and b = 5 beside the grid) add fig5_bit_floor and the
    bit-floor section, their rows the summary's; without them neither appears (the other tests)."""
    paths = write_inputs(tmp_path, layers={"resnet18": 8}, histogram_archs=[], seeds=(0, 1))
    summary = pd.read_csv(paths["tables"]["summary"], dtype={"options": str})
    one = summary[(summary["version"] == summary["version"].iloc[0]) & (summary["budget"] == summary["budget"].iloc[0])]
    floor = pd.concat([summary, one.assign(version="b8", options="8-8"), one.assign(version="b5", options="5-5")])
    floor.to_csv(paths["tables"]["summary"], index=False)
    assert "fig5_bit_floor.png" in {p.name for p in draw(paths)}
    build(paths, make_config({"resnet18": 8}, []), tmp_path)
    html = paths["html"].read_text()
    assert "The bit floor: every layer at b bits" in html and 'id="fig5_bit_floor"' in html
    start = html.index('id="bit-floor"')
    rows = html[start:html.index("</table>", start)].count("<tr")
    assert rows == 1 + 4  # the header, then b8 and b5, robust and detrimental


def test_collapse_claim_is_not_applicable_where_the_cell_leaves_no_choice(built):
    """III-A (seed 1's own cell, and MobileNetV4's paper cell on every seed): options 5-10 and C = 5 N,
    so every layer takes 5 bits and all three policies give that one allocation. "The collapse needs
    π_D" reads "not applicable" there and only there; others_hold is still judged. N comes from
    dptq/layer_counts.yaml, the synthetic tables' N."""
    from dptq.models import num_quantizable_layers

    assert {arch: num_quantizable_layers(arch) for arch in LAYERS} == LAYERS
    html = built["html"].read_text()
    rows = [dict(zip(claims.CROSS_POLICY_COLUMNS, row)) for row in Page(html).tables["cross-policy"]["text"]]
    # one row per seed, arch and cell: the seed's own, and the paper's where it differs
    assert len(rows) == len({(s, a, c) for s in range(3) for a in LAYERS for c in (seed_cell(s), paper_cell(a))}) == 9
    for row in rows:
        no_choice = (row["version"], row["budget"]) == ("III", "A")
        assert row["paper_cell"] == ("yes" if (row["version"], row["budget"]) == paper_cell(row["arch"]) else "no")
        assert row["policy_has_choice"] == ("no" if no_choice else "yes")
        assert (row["collapse_needs_both"] == "not applicable") == no_choice
        assert row["others_hold"] in ("yes", "no")
    assert "collapse_needs_both is not applicable there" in html


def test_reference_shows_the_papers_cell_as_measured_here():
    """Arch a highlights I-B, the paper II-B: the paper's-cell rows hold this run's II-B means beside
    the paper's numbers. Arch b did not run the paper's III-A: "not run". Arch c is the paper's only,
    and metrics.json's audit entry is no arch."""
    summary = pd.DataFrame([dict(arch=arch, cell=cell, mode=mode, fp_acc_mean=fp, delta_mean=delta)
                            for arch, cell, mode, fp, delta in (
                                ("a", "I-B", "robust", 97.0, -1.0), ("a", "I-B", "detrimental", 96.0, -40.0),
                                ("a", "II-B", "robust", 97.5, -0.5), ("a", "II-B", "detrimental", 96.5, -12.25),
                                ("b", "I-A", "robust", 95.0, 0.0), ("b", "I-A", "detrimental", 94.0, -30.0))])
    ours = {"a": dict(white_box_acc=98.0, highlighted="I-B", robust_fp_acc=97.0, robust_delta=-1.0,
                      detrimental_fp_acc=96.0, detrimental_delta=-40.0),
            "b": dict(white_box_acc=96.0, highlighted="I-A", robust_fp_acc=95.0, robust_delta=0.0,
                      detrimental_fp_acc=94.0, detrimental_delta=-30.0),
            "audit": {"mine": {"simulated_verdict": "fail"}}}
    ref = {"white_box_acc": {"a": 88.0, "b": 85.0, "c": 80.0}, "transitory_pct": {}, "table3": {},
           "highlighted": {"a": {"cell": "II-B", "robust": {"fp_acc": 88.17, "delta": -0.22},
                                 "detrimental": {"fp_acc": 88.09, "delta": -24.39}},
                           "b": {"cell": "III-A", "robust": {"fp_acc": 86.95, "delta": -1.72},
                                 "detrimental": {"fp_acc": 84.30, "delta": -63.72}}}}
    t2 = pd.DataFrame([dict(arch="a", cell="I-B", highlighted=True, paper_cell=False, transitory_pct=40.0),
                       dict(arch="a", cell="II-B", highlighted=False, paper_cell=True, transitory_pct=12.5),
                       dict(arch="b", cell="I-A", highlighted=True, paper_cell=False, transitory_pct=30.0)])
    ours["a"]["transitory_pct"], ours["b"]["transitory_pct"] = 40.0, 30.0
    t3 = pd.DataFrame([dict(arch="a", policy="detrimental", network="robust", q_acc=q, paper_cell=at)
                       for q, at in ((91.0, False), (95.5, True))])
    rows = {row[0]: row[1:] for row in Page(report._reference_html(ours, summary, t2, t3, ref)).tables["reference"]["text"]}
    assert rows["transitory points (% of the test set), highlighted cell"] == ["–", "40.00", "–", "30.00", "–", "–"]
    assert rows["transitory points (% of the test set), the paper's cell"] == ["–", "12.50", "–", "not run", "–", "–"]
    assert rows["Table 3: R (robust) quantized with π_D (%), the paper's cell"] == [
        "–", "95.50", "–", "not run", "–", "–"]
    # columns: a paper, a this run, b paper, b this run, c paper, c this run
    assert rows["highlighted cell (version-budget)"] == ["II-B", "I-B", "III-A", "I-A", "–", "–"]
    assert rows["D Δ = Q − FP (points), highlighted cell"] == ["-24.39", "-40.00", "-63.72", "-30.00", "–", "–"]
    assert rows["R FP accuracy (%), the paper's cell"] == ["88.17", "97.50", "86.95", "not run", "–", "–"]
    assert rows["R Δ = Q − FP (points), the paper's cell"] == ["-0.22", "-0.50", "-1.72", "not run", "–", "–"]
    assert rows["D FP accuracy (%), the paper's cell"] == ["88.09", "96.50", "84.30", "not run", "–", "–"]
    assert rows["D Δ = Q − FP (points), the paper's cell"] == ["-24.39", "-12.25", "-63.72", "not run", "–", "–"]


def test_recipe_names_each_pairs_objective_and_epochs(built, tmp_path):
    """Per arch and mode, pairs.objective and pairs.epochs as the pair jobs resolve them; the page says
    plainly whether every pair has the paper's hinge, and where one does not, that the paper's hinge
    result is not in this run and where it is."""
    cfg = config.merge(make_config(), {"pairs": {
        "objective": {"loss": {"resnet18": {"robust": "hinge", "detrimental": "target"}, "mobilenetv4_conv_medium": "hinge"},
                      "weight": 0.05,
                      "spread_weight": {"resnet18": 0.0, "mobilenetv4_conv_medium": {"robust": 0.0, "detrimental": {"I": 0.0, "II": 0.0, "III": 10.0}}}},
        "epochs": {"resnet18": {"robust": 4, "detrimental": 16}},
        "range_grad": {"resnet18": False, "mobilenetv4_conv_medium": {"robust": False, "detrimental": {"I": False, "II": True, "III": True}}}}})
    t1, hinge = tables.read_table(built["tables"]["table1"]), tables.read_table(built["tables"]["hinge"])
    none = hinge.iloc[:0]
    recipe = report._recipe(cfg, t1, none)
    assert recipe["off_paper"] == ["resnet18 detrimental", "mobilenetv4_conv_medium detrimental"]
    assert recipe["beside"] is None
    assert Page(recipe["table"]).tables["recipe"]["text"] == [
        ["resnet18", "hinge (the paper's)", "4", "off", "target penalty 0.05 · (CE_q − 5.0)² (Qu-ANTI-zation's)", "16", "off"],
        ["mobilenetv4_conv_medium", "hinge (the paper's)", "8", "off",
         "I: hinge (the paper's); II: hinge (the paper's); III: hinge (the paper's) + spread term 10.0 · max(0, ln 55.0 − σ) "
         "(not the paper's)", "I: 8; II: 8; III: 12", "I: off; II: on; III: on"]]
    default = built["html"].read_text()  # the default gives ResNet18's and MobileNetV4's D the spread term at versions II and III
    assert "Objective: not the paper's hinge for resnet18 detrimental, mobilenetv4_conv_medium detrimental</b>" in default
    hinge_only = config.merge(make_config(), {"pairs": {"objective": {"spread_weight": 0.0}}})
    assert report._recipe(hinge_only, t1, none)["off_paper"] == []

    layers = {"resnet18": 8}
    paths = write_inputs(tmp_path, layers=layers, histogram_archs=[], seeds=(0,))
    none.to_csv(paths["tables"]["hinge"], index=False)  # no hinge-alone pair in this run
    draw(paths)
    build(paths, config.merge(make_config(layers, []), {"pairs": {"objective": cfg["pairs"]["objective"]}}), tmp_path)
    html = paths["html"].read_text()
    section = html[html.index('id="s-reference"'):html.index('id="s-claims"')]
    assert "Objective: not the paper's hinge for resnet18 detrimental" in section
    assert "The hinge alone was not trained beside them in this run (pairs.hinge_beside is off" in section
    assert 'id="hinge-beside"' not in section


def test_the_hinge_alone_beside_each_off_hinge_pair(built):
    """Where the default gives D another objective at the paper's cell (ResNet18 II-B, MobileNetV4
    III-A: the spread term), the reference section shows per seed that D beside the same D with the
    hinge alone."""
    html = built["html"].read_text()
    section = html[html.index('id="s-reference"'):html.index('id="s-claims"')]
    assert "this run also trained each such detrimental pair with the paper's hinge" in section
    t1 = tables.read_table(built["tables"]["table1"])
    rows = Page(section).tables["hinge-beside"]["text"]
    cells = [("resnet18", "II", "B"), ("mobilenetv4_conv_medium", "III", "A")]
    assert [r[:3] for r in rows] == [[arch, f"{v}-{b}", str(s)] for arch, v, b in cells for s in (0, 1, 2)]
    d = pd.concat([t1[(t1["arch"] == arch) & (t1["version"] == v) & (t1["budget"] == b) & (t1["mode"] == "detrimental")]
                   for arch, v, b in cells])
    assert [r[3:] for r in rows] == [[f"{fp:.2f}", f"{delta:+.2f}", f"{fp + 2:.2f}", "-1.00"]
                                     for fp, delta in zip(d["fp_acc"], d["delta"])]
    assert 'id="recipe"' in section
