"""The report (SPEC §7): seaborn figures, ``results/report.html`` and ``results/metrics.json``.

Everything here reads the tidy CSVs that the evaluation and analysis steps write; nothing needs
a model. :func:`figures` draws each figure as PNG and PDF under fixed names (:data:`FIGURES`,
``{arch}`` filled from the config); :func:`build` writes one self-contained HTML page (images
as base64 data URIs, inline CSS, one inline script, no external resource: it opens offline)
and the headline numbers as JSON for ``dvc metrics show``.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered by Agg (PNG) and the PDF
backend, with no pyplot and no global style change: seaborn's theme applies inside a
``rc_context`` only while a figure is drawn.
"""
from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import math
import platform
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import yaml
from scipy import stats
from matplotlib.figure import Figure

# Figure stems (results/figures/<stem>.png and .pdf) and the caption of each: the HTML report
# shows it under the figure; a Snakemake `report()` caption file can hold the same text.
CAPTIONS: dict[str, str] = {
    "fig1_table1": (
        "Table 1 at a glance. Top row: full-precision accuracy (%) of the robust (R) and "
        "detrimental (D) network of every (version, budget) cell; the dashed line is the white-box "
        "network W they started from. Bottom row: Δ = Q − FP in accuracy points after dynamic "
        "quantization with the network's own policy. The shaded cell is the highlighted pair "
        "(largest Δ_R − Δ_D with |FP_R − FP_D| within evaluate.highlight_max_fp_gap)."),
    "fig2_layer_scan": (
        "Layer scan (paper Fig. 2) for the highlighted R and D networks with their own policy's "
        "bits. before: layers 1..l quantized; after: layers l..N quantized; single: only layer l "
        "quantized; every other layer at full precision. x: relative depth l/N from the first "
        "quantizable layer to the classifier; y: top-1 accuracy (%). One row per architecture "
        "and data split."),
    "fig3_histograms_{arch}": (
        "Activation histograms of {arch} (paper Fig. 3): per quantizable layer, the distribution "
        "of its input activations over the test set at full precision (FP, grey) and quantized "
        "(Q, colour), for the highlighted R and D networks. The bin holding 0 is removed and the "
        "rest renormalised; each panel title gives that removed share (the sparsity measure, %) "
        "for FP and Q. With more than {max_layers} layers, {max_layers} evenly spaced layers are "
        "shown (first and last included); histograms.csv holds every layer."),
    "fig4_corruptions_{arch}": (
        "Robustness of the highlighted {arch} networks to input corruptions (paper Fig. 4): "
        "top-1 accuracy (%) against the corruption degree (1 = mild, higher = more severe), R vs "
        "D, full precision solid and quantized dashed; bands are 95 % Student-t confidence "
        "intervals of the mean over the corruption seeds (analysis.corruptions.seeds)."),
}
FIGURES: tuple[str, ...] = tuple(CAPTIONS)
FORMATS = ("png", "pdf")
MAX_HISTOGRAM_LAYERS = 20  # the paper's Fig. 3 shows ResNet18's 20 layers; deeper nets are subsampled
HISTOGRAM_COLUMNS = 10
PNG_DPI = 110

# SPEC §5: the paper's numbers (Oxford-IIIT Pets), keyed by timm name.
PAPER_REFERENCE: dict = {
    "dataset": "Oxford-IIIT Pets",
    "white_box_acc": {"resnet18": 88.03, "mobilenetv4_conv_medium": 88.01, "regnetx_016": 85.53},
    "highlighted": {
        "resnet18": {"cell": "II-B", "robust": {"fp_acc": 88.17, "delta": -0.22},
                     "detrimental": {"fp_acc": 88.09, "delta": -24.39}},
        "mobilenetv4_conv_medium": {"cell": "III-A", "robust": {"fp_acc": 86.95, "delta": -1.72},
                                    "detrimental": {"fp_acc": 84.30, "delta": -63.72}},
        "regnetx_016": {"cell": "III-B", "robust": {"fp_acc": 86.37, "delta": 0.06},
                        "detrimental": {"fp_acc": 85.64, "delta": -25.02}},
    },
    "transitory_pct": {"resnet18": 23.60, "mobilenetv4_conv_medium": 67.32, "regnetx_016": 27.09},
    # Table 3: policy -> network -> quantized accuracy (%), ResNet18 at its highlighted cell.
    "table3": {"resnet18": {
        "robust": {"white_box": 87.92, "robust": 87.95, "detrimental": 87.08},
        "detrimental": {"white_box": 87.68, "robust": 87.71, "detrimental": 63.70},
        "random": {"white_box": 87.79, "robust": 88.06, "detrimental": 82.50},
    }},
}

COLUMNS = {
    "table1": ["arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
               "highlighted", "white_box_acc"],
    "table2": ["arch", "transitory_pct"],
    "table3": ["arch", "network", "policy", "q_acc", "fp_acc"],
    "layer_scan": ["arch", "network", "split", "scan", "layer", "relative_depth", "acc"],
    "histograms": ["arch", "network", "precision", "layer", "bin_left", "bin_right", "density", "sparsity"],
    "corruptions": ["arch", "network", "precision", "corruption", "degree", "seed", "acc"],
    "remedy": ["arch", "network", "setting", "flagged_layers", "q_acc", "fp_acc"],
}
NETWORKS = {"white_box": "W (white box)", "robust": "R (robust)", "detrimental": "D (detrimental)"}
POLICIES = {"robust": "π_R", "detrimental": "π_D", "random": "random"}
PRECISIONS = {"fp": "FP", "q": "Q"}
COLORS = {"white_box": "#7f7f7f", "robust": "#1f77b4", "detrimental": "#d62728"}
SCANS = {"before": "before: layers 1..l quantized", "after": "after: layers l..N quantized",
         "single": "single: only layer l quantized"}
ACC_LABEL = "accuracy (%)"
VERSIONS = ["torch", "torchvision", "timm", "numpy", "pandas", "matplotlib", "seaborn", "snakemake", "dvc"]


# ---------------------------------------------------------------- inputs

def _read(path: Path, kind: str) -> pd.DataFrame:
    """A tidy CSV with the columns of ``COLUMNS[kind]``; a clear error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the report needs this {kind} table "
                                f"(run the pipeline step that writes it first)")
    df = pd.read_csv(path)
    missing = [c for c in COLUMNS[kind] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a {kind} table has {COLUMNS[kind]}")
    if df.empty:
        raise ValueError(f"{path}: has a header but no rows")
    return df


def _truthy(series: pd.Series) -> pd.Series:
    """CSV booleans (True/true/1) as bool, whatever pandas inferred."""
    return series.astype(str).str.strip().str.lower().isin(["true", "1", "yes"])


def _archs(cfg: Mapping) -> list[str]:
    return list(cfg["kd"]["archs"])


def _histogram_archs(cfg: Mapping) -> list[str]:
    """Archs with Fig. 3: those of ``analysis.histogram.archs`` that the run trains."""
    wanted = set(cfg["analysis"]["histogram"]["archs"])
    return [a for a in _archs(cfg) if a in wanted]


def _analysis(analysis_dir: Path, archs: Iterable[str], kind: str) -> pd.DataFrame:
    return pd.concat([_read(Path(analysis_dir) / a / f"{kind}.csv", kind) for a in archs], ignore_index=True)


def _table1(tables_dir: Path) -> pd.DataFrame:
    t1 = _read(Path(tables_dir) / "table1.csv", "table1")
    t1["highlighted"] = _truthy(t1["highlighted"])
    t1["cell"] = t1["version"].astype(str) + "-" + t1["budget"].astype(str)
    return t1


def _cells(cfg: Mapping) -> list[str]:
    """Every (version, budget) cell in config order: I-A, I-B, ..., III-C."""
    return [f"{v}-{b}" for v in cfg["pairs"]["versions"] for b in cfg["pairs"]["budgets"]]


# ---------------------------------------------------------------- figure names and captions

def figure_names(cfg: Mapping) -> list[str]:
    """The figure stems a run of ``cfg`` produces, in report order (for Snakemake outputs)."""
    names = []
    for stem in FIGURES:
        if "{arch}" not in stem:
            names.append(stem)
        else:
            archs = _histogram_archs(cfg) if stem.startswith("fig3") else _archs(cfg)
            names += [stem.format(arch=a) for a in archs]
    return names


def caption(name: str) -> str:
    """The caption of a figure stem, e.g. ``fig3_histograms_resnet18``."""
    for stem, text in CAPTIONS.items():
        prefix = stem.split("{arch}")[0]
        if name == stem or ("{arch}" in stem and name.startswith(prefix) and len(name) > len(prefix)):
            return text.format(arch=name[len(prefix):], max_layers=MAX_HISTOGRAM_LAYERS)
    raise KeyError(f"no caption for figure {name!r}; figures are {list(FIGURES)}")


# ---------------------------------------------------------------- figures

@contextmanager
def _style():
    """Seaborn's whitegrid theme for one figure, without touching the global rcParams."""
    with mpl.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.1)}):
        yield


def _labelled(df: pd.DataFrame, column: str, labels: Mapping[str, str]) -> pd.Series:
    return df[column].map(lambda v: labels.get(v, v))


def _palette(values: Iterable[str]) -> dict[str, str]:
    """Network label -> colour (W grey, R blue, D red; any other network gets a seaborn colour)."""
    extra = iter(sns.color_palette("tab10", 10)[4:])
    return {NETWORKS.get(v, v): COLORS.get(v) or next(extra) for v in values}


def _ordered(values: Iterable[str], order: Iterable[str]) -> list[str]:
    """``values`` (unique) in the order of ``order``, unknown ones after, alphabetically."""
    present = set(values)
    known = [v for v in order if v in present]
    return known + sorted(present - set(known))


def _legend_once(fig: Figure, axes: Sequence, loc: str = "outside upper center", **kwargs) -> None:
    """One figure-level legend above the panels, collected from every panel, panel legends removed."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(handles.values(), handles.keys(), loc=loc, ncols=min(len(handles), 6), frameon=False, **kwargs)


def _save(fig: Figure, figures_dir: Path, stem: str) -> list[Path]:
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        # No creation date in the PDF: the same inputs give the same bytes (DVC caching).
        fig.savefig(path, dpi=PNG_DPI, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
        fig.set_layout_engine("none")  # keep the first save's layout: solving it again costs seconds
    return paths


def fig_table1(t1: pd.DataFrame, cfg: Mapping) -> Figure:
    """Rows: FP accuracy, Δ; columns: arch; x: (version, budget) cell; R vs D side by side."""
    archs = _ordered(t1["arch"].unique(), _archs(cfg))
    cells = _ordered(t1["cell"].unique(), _cells(cfg))
    data = t1.assign(network=_labelled(t1, "mode", NETWORKS))
    palette = _palette(t1["mode"].unique())
    fig = Figure(figsize=(4.2 * len(archs) + 0.5, 6.2), layout="constrained")
    axes = fig.subplots(2, len(archs), squeeze=False, sharex=True)
    for j, arch in enumerate(archs):
        sub = data[data["arch"] == arch]
        top, bottom = axes[0, j], axes[1, j]
        sns.pointplot(sub, x="cell", y="fp_acc", hue="network", order=cells, palette=palette,
                      dodge=0.3, linestyle="none", markers="o", errorbar=None, ax=top)
        top.axhline(sub["white_box_acc"].iloc[0], ls="--", color=COLORS["white_box"], lw=1,
                    label=NETWORKS["white_box"])
        sns.barplot(sub, x="cell", y="delta", hue="network", order=cells, palette=palette, errorbar=None, ax=bottom)
        bottom.axhline(0, color="black", lw=0.8)
        hl = sub.loc[sub["highlighted"], "cell"].unique()
        for ax in (top, bottom):
            for cell in hl:
                ax.axvspan(cells.index(cell) - 0.5, cells.index(cell) + 0.5, color="gold", alpha=0.3, lw=0)
        top.set_title(f"{arch}" + (f" (highlighted: {', '.join(hl)})" if len(hl) else " (no cell highlighted)"))
        top.set(xlabel="", ylabel="full-precision accuracy (%)" if j == 0 else "")
        bottom.set(xlabel="cell (version-budget)", ylabel="Δ = Q − FP (accuracy points)" if j == 0 else "")
    _legend_once(fig, axes.ravel())
    return fig


def fig_layer_scan(scan: pd.DataFrame, cfg: Mapping) -> Figure:
    """Rows: (arch, split); columns: before/after/single; lines: R vs D against l/N."""
    archs = _ordered(scan["arch"].unique(), _archs(cfg))
    splits = _ordered(scan["split"].unique(), cfg["analysis"]["layer_scan"]["splits"])
    scans = _ordered(scan["scan"].unique(), SCANS)
    data = scan.assign(network=_labelled(scan, "network", NETWORKS))
    palette = _palette(scan["network"].unique())
    rows = [(a, s) for a in archs for s in splits]
    fig = Figure(figsize=(4.0 * len(scans), 2.6 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(scans), squeeze=False, sharex=True, sharey=True)
    for i, (arch, split) in enumerate(rows):
        for j, kind in enumerate(scans):
            ax = axes[i, j]
            sub = data[(data["arch"] == arch) & (data["split"] == split) & (data["scan"] == kind)]
            sns.lineplot(sub, x="relative_depth", y="acc", hue="network", palette=palette, marker="o",
                         markersize=3, errorbar=None, ax=ax)
            ax.set_title(SCANS.get(kind, kind) if i == 0 else "")
            ax.set(xlim=(0, 1.02), ylim=(0, 101), xlabel="relative depth l/N" if i == len(rows) - 1 else "",
                   ylabel=f"{arch}\n{split} {ACC_LABEL}" if j == 0 else "")
    _legend_once(fig, axes.ravel())
    return fig


def _pick_layers(layers: Sequence[int], k: int = MAX_HISTOGRAM_LAYERS) -> list[int]:
    """All layers if at most ``k``, else ``k`` evenly spaced ones, first and last included."""
    layers = sorted(layers)
    if len(layers) <= k:
        return layers
    return [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, k).round().astype(int))]


def fig_histograms(hist: pd.DataFrame, arch: str) -> Figure:
    """For each network a block of panels, one per layer: FP (grey, filled) vs Q (colour, line).

    Fixed layout in inches and no shared axes: with 40 panels, constrained layout and shared
    limits (quadratic in the number of panels) cost several seconds per save.
    """
    networks = _ordered(hist["network"].unique(), NETWORKS)
    layers = _pick_layers(hist["layer"].unique().tolist())
    ncols = min(HISTOGRAM_COLUMNS, len(layers))
    block = math.ceil(len(layers) / ncols)
    nrows = block * len(networks)
    panel, gap, margin = (1.75, 1.25), (0.2, 0.42), dict(left=0.45, right=0.1, top=1.0, bottom=0.45)
    width = margin["left"] + margin["right"] + ncols * panel[0] + (ncols - 1) * gap[0]
    height = margin["top"] + margin["bottom"] + nrows * panel[1] + (nrows - 1) * gap[1]
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
        left=margin["left"] / width, right=1 - margin["right"] / width, bottom=margin["bottom"] / height,
        top=1 - margin["top"] / height, wspace=gap[0] / panel[0], hspace=gap[1] / panel[1]))
    hi = float(hist["bin_right"].max())
    groups = {key: g.sort_values("bin_left") for key, g in hist.groupby(["network", "layer", "precision"])}
    for n, network in enumerate(networks):
        for k, layer in enumerate(layers):
            ax = axes[n * block + k // ncols, k % ncols]
            sparsity = {}
            for precision in ("fp", "q"):
                g = groups.get((network, layer, precision))
                if g is None:
                    continue
                edges = np.append(g["bin_left"].to_numpy(), g["bin_right"].iloc[-1])
                sparsity[precision] = 100 * g["sparsity"].iloc[0]
                if precision == "fp":
                    ax.stairs(g["density"], edges, fill=True, color="0.75", label="FP (full precision)")
                else:
                    ax.stairs(g["density"], edges, color=COLORS.get(network, "C4"), lw=1.1,
                              label=f"Q, {NETWORKS.get(network, network)}")
            ax.set_title(f"{network[0].upper()} L{layer}  sp " + " / ".join(
                f"{PRECISIONS[p]} {s:.0f}%" for p, s in sparsity.items()), fontsize=7.5)
            ax.set(xlim=(0, hi), xticks=[0, hi / 2, hi], yticks=[])
            ax.tick_params(labelsize=6.5, pad=1)
        for k in range(len(layers), block * ncols):  # unused slots of the last row
            axes[n * block + k // ncols, k % ncols].set_axis_off()
        axes[n * block, 0].set_ylabel(f"{NETWORKS.get(network, network)}\ndensity", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("activation value", fontsize=7.5)
    shown = f"{len(layers)} of {hist['layer'].nunique()} layers" if len(layers) < hist["layer"].nunique() else "all layers"
    fig.suptitle(f"{arch}: activation histograms, zero bin removed ({shown}; sp = sparsity, share of zeros)",
                 y=1 - 0.08 / height, va="top")
    _legend_once(fig, axes.ravel(), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / height))
    return fig


def t_interval(values: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean over seeds: m ± t_{(1+level)/2, n-1} · s/√n.

    With a handful of seeds a bootstrap interval is far too narrow (3 seeds give 10 resamples);
    one seed gives no interval.
    """
    n, m = len(values), float(values.mean())
    if n < 2:
        return m, m
    half = stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return m - half, m + half


def fig_corruptions(corr: pd.DataFrame, arch: str, cfg: Mapping) -> Figure:
    """One panel per corruption: accuracy vs degree, R vs D (colour), FP solid / Q dashed, 95 % CI over seeds."""
    names = _ordered(corr["corruption"].unique(), cfg["analysis"]["corruptions"]["names"])
    data = corr.assign(network=_labelled(corr, "network", NETWORKS),
                       precision=_labelled(corr, "precision", PRECISIONS))
    palette = _palette(corr["network"].unique())
    styles = _ordered(data["precision"].unique(), PRECISIONS.values())
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    degrees = sorted(corr["degree"].unique())
    for k, name in enumerate(names):
        ax = axes[k // ncols, k % ncols]
        sns.lineplot(data[data["corruption"] == name], x="degree", y="acc", hue="network", style="precision",
                     style_order=styles, dashes={"FP": "", "Q": (4, 2)}, palette=palette, marker="o",
                     markersize=4, errorbar=t_interval, ax=ax)
        ax.set_title(name.replace("_", " "))
        ax.set(xticks=degrees, ylim=(0, 101), xlabel="degree (severity)", ylabel=ACC_LABEL)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    fig.suptitle(f"{arch}: accuracy under input corruptions (FP solid, Q dashed; 95 % t-CI over seeds)")
    _legend_once(fig, axes.ravel())
    return fig


def figures(cfg: Mapping, tables_dir, analysis_dir, figures_dir) -> list[Path]:
    """Draw every figure of :func:`figure_names` as PNG and PDF; returns the written paths."""
    tables_dir, analysis_dir, figures_dir = Path(tables_dir), Path(analysis_dir), Path(figures_dir)
    archs = _archs(cfg)
    drawers = {"fig1_table1": lambda: fig_table1(_table1(tables_dir), cfg),
               "fig2_layer_scan": lambda: fig_layer_scan(_analysis(analysis_dir, archs, "layer_scan"), cfg)}
    for arch in _histogram_archs(cfg):
        drawers[f"fig3_histograms_{arch}"] = lambda a=arch: fig_histograms(_analysis(analysis_dir, [a], "histograms"), a)
    for arch in archs:
        drawers[f"fig4_corruptions_{arch}"] = lambda a=arch: fig_corruptions(
            _analysis(analysis_dir, [a], "corruptions"), a, cfg)
    paths = []
    for name in figure_names(cfg):
        with _style():
            paths += _save(drawers[name](), figures_dir, name)
    return paths


# ---------------------------------------------------------------- HTML pieces

def _fmt(value, signed: bool = False) -> str:
    """Numbers with two decimals (Δ with its sign), missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _cell(value, cls: str = "", tag: str = "td", span: int = 1) -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' colspan="{span}"' if span > 1 else "")
    return f"<{tag}{attrs}>{html.escape(str(value))}</{tag}>"


def _table(table_id: str, header: Sequence[Sequence], body: Sequence[Sequence], row_classes=None,
           caption: str = "") -> str:
    """An HTML table. ``header``: rows of labels or (label, colspan); ``body``: rows of text or (text, class)."""
    head = "".join("<tr>" + "".join(_cell(h[0], tag="th", span=h[1]) if isinstance(h, tuple) else _cell(h, tag="th")
                                    for h in row) + "</tr>" for row in header)
    rows = []
    for i, row in enumerate(body):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        rows.append(f"<tr{cls}>" + "".join(_cell(*c) if isinstance(c, tuple) else _cell(c) for c in row) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table id="{table_id}">{cap}<thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _frame_table(table_id: str, df: pd.DataFrame, signed: Sequence[str] = (), row_classes=None,
                 caption: str = "") -> str:
    body = [[_fmt(v, c in signed) for c, v in row.items()] for _, row in df.iterrows()]
    return _table(table_id, [list(df.columns)], body, row_classes, caption)


def _table1_html(t1: pd.DataFrame, cfg: Mapping) -> str:
    """The paper's layout: a row per (arch, version), per budget R FP, R Δ, D FP, D Δ; highlighted cells shaded."""
    budgets = _ordered(t1["budget"].unique(), cfg["pairs"]["budgets"])
    modes = _ordered(t1["mode"].unique(), NETWORKS)
    by_key = {(r.arch, r.version, r.budget, r.mode): r for r in t1.itertuples()}
    header = [["arch", "W acc", "V", "options"] + [(f"budget {b}", 2 * len(modes)) for b in budgets],
              ["", "", "", ""] + [f"{m[0].upper()} {q}" for _ in budgets for m in modes for q in ("FP", "Δ")]]
    body = []
    for arch in _ordered(t1["arch"].unique(), _archs(cfg)):
        sub = t1[t1["arch"] == arch]
        for version in _ordered(sub["version"].unique(), cfg["pairs"]["versions"]):
            first = sub[sub["version"] == version].iloc[0]
            row = [arch, _fmt(first["white_box_acc"]), version, first["options"]]
            for b in budgets:
                for m in modes:
                    r = by_key.get((arch, version, b, m))
                    hl = "hl" if r is not None and r.highlighted else ""
                    row += [(_fmt(r.fp_acc if r is not None else None), hl),
                            (_fmt(r.delta if r is not None else None, True), hl)]
            body.append(row)
    return _table("table1", header, body, caption=(
        "Table 1: full-precision accuracy (%) and Δ = Q − FP (points) of every pair; "
        "W acc = the white-box network's accuracy; shaded = highlighted pair."))


def _table3_html(t3: pd.DataFrame, cfg: Mapping) -> str:
    """Rows: (arch, policy) plus each network's FP; columns: networks W, R, D."""
    networks = _ordered(t3["network"].unique(), NETWORKS)
    body = []
    for arch in _ordered(t3["arch"].unique(), _archs(cfg)):
        sub = t3[t3["arch"] == arch]
        for policy in _ordered(sub["policy"].unique(), POLICIES):
            q = sub[sub["policy"] == policy].set_index("network")["q_acc"]
            body.append([arch, f"Q with {POLICIES.get(policy, policy)}"] + [_fmt(q.get(n)) for n in networks])
        fp = sub.groupby("network")["fp_acc"].first()
        body.append(([arch, "FP (no quantization)"] + [_fmt(fp.get(n)) for n in networks]))
    return _table("table3", [["arch", "setting"] + [NETWORKS.get(n, n) for n in networks]], body,
                  caption="Table 3: accuracy (%) of each network under each policy at its arch's highlighted budget.")


def headline(t1: pd.DataFrame, t2: pd.DataFrame, cfg: Mapping) -> dict:
    """Per arch: white-box accuracy, highlighted cell, R/D FP accuracy and Δ there, transitory points."""
    out = {}
    transitory = t2.groupby("arch")["transitory_pct"].first()
    for arch in _ordered(t1["arch"].unique(), _archs(cfg)):
        sub = t1[t1["arch"] == arch]
        hl = sub[sub["highlighted"]].set_index("mode")
        entry = {"white_box_acc": float(sub["white_box_acc"].iloc[0]),
                 "highlighted": hl["cell"].iloc[0] if len(hl) else None}
        for mode in ("robust", "detrimental"):
            for col in ("fp_acc", "q_acc", "delta"):
                entry[f"{mode}_{col}"] = float(hl.at[mode, col]) if mode in hl.index else None
        entry["transitory_pct"] = float(transitory[arch]) if arch in transitory.index else None
        out[arch] = entry
    return out


def _reference_html(metrics: Mapping, t3: pd.DataFrame, cfg: Mapping) -> str:
    """The paper's numbers (SPEC §5) beside this run's, one row per quantity and arch."""
    ref = PAPER_REFERENCE
    archs = list(metrics) + [a for a in ref["white_box_acc"] if a not in metrics]
    rows = []
    for arch in archs:
        ours, paper = metrics.get(arch, {}), ref["highlighted"].get(arch, {})
        rows += [("white-box accuracy W (%)", arch, ref["white_box_acc"].get(arch), ours.get("white_box_acc"), False),
                 ("highlighted cell", arch, paper.get("cell"), ours.get("highlighted"), False)]
        for mode in ("robust", "detrimental"):
            tag = mode[0].upper()
            rows += [(f"{tag} FP accuracy (%) at the highlighted cell", arch, paper.get(mode, {}).get("fp_acc"),
                      ours.get(f"{mode}_fp_acc"), False),
                     (f"{tag} Δ = Q − FP (points)", arch, paper.get(mode, {}).get("delta"), ours.get(f"{mode}_delta"), True)]
        rows.append(("transitory points (% of test set)", arch, ref["transitory_pct"].get(arch),
                     ours.get("transitory_pct"), False))
    q = t3.set_index(["arch", "policy", "network"])["q_acc"]
    for arch, table in ref["table3"].items():
        for policy, cols in table.items():
            for network, value in cols.items():
                rows.append((f"Table 3: {NETWORKS[network]} with {POLICIES[policy]} (%)", arch, value,
                             q.get((arch, policy, network)), False))
    body = [[what, arch, _fmt(p, signed), _fmt(o, signed)] for what, arch, p, o, signed in rows]
    return _table("reference", [["quantity", "arch", f"paper ({ref['dataset']})", "this run"]], body,
                  caption="The paper's reference numbers (SPEC §5) beside this run's.")


def runtimes(benchmarks_dir) -> pd.DataFrame:
    """Per rule (the first folder under ``benchmarks_dir``): jobs, total and max wall time, peak RSS."""
    root = Path(benchmarks_dir)
    files = sorted(root.glob("**/*.tsv")) if root.is_dir() else []
    if not files:
        return pd.DataFrame(columns=["rule", "jobs", "total_s", "max_s", "max_rss_mb"])
    frames = []
    for path in files:
        df = pd.read_csv(path, sep="\t")
        if "s" not in df.columns:
            raise ValueError(f"{path}: not a Snakemake benchmark file (no 's' column)")
        rule = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else path.stem
        frames.append(pd.DataFrame({"rule": rule, "s": pd.to_numeric(df["s"], errors="coerce"),
                                    "max_rss": pd.to_numeric(df.get("max_rss", np.nan), errors="coerce")}))
    runs = pd.concat(frames, ignore_index=True)
    table = runs.groupby("rule").agg(jobs=("s", "size"), total_s=("s", "sum"), max_s=("s", "max"),
                                     max_rss_mb=("max_rss", "max")).reset_index()
    return table.sort_values("total_s", ascending=False, ignore_index=True)


def versions() -> dict[str, str]:
    """Versions of python and the packages that shape the results (read from metadata, nothing imported)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _image(path: Path, name: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: figure not found; run dptq.report.figures() before build()")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="{name}"><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption><b>{html.escape(name)}</b> (results/figures/{html.escape(name)}.png, .pdf). "
            f"{html.escape(caption(name))}</figcaption></figure>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
tr.hl td,td.hl{background:#cfe2ff;font-weight:600}
figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;max-width:70em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.note{color:#555;font-size:.9em}
"""
# Counts the images that decoded, so a headless browser test can check them in the dumped DOM.
SCRIPT = """window.addEventListener("load", function () {
  var n = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) n++; }
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-rendered", String(n));
});"""


def _section(sid: str, title: str, *parts: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def build(cfg: Mapping, tables_dir, analysis_dir, figures_dir, benchmarks_dir, html_path, metrics_path) -> None:
    """Write the self-contained report page and the headline metrics JSON."""
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    archs = _archs(cfg)
    t1 = _table1(tables_dir)
    t2 = _read(tables_dir / "table2.csv", "table2")
    t3 = _read(tables_dir / "table3.csv", "table3")
    remedy = _analysis(Path(analysis_dir), archs, "remedy")
    metrics = headline(t1, t2, cfg)
    names = figure_names(cfg)

    tidy = t1[COLUMNS["table1"]].assign(highlighted=t1["highlighted"].map({True: "★", False: ""}))
    no_hist = [a for a in archs if a not in _histogram_archs(cfg)]
    remedy = remedy.assign(delta=remedy["q_acc"] - remedy["fp_acc"])
    times = runtimes(benchmarks_dir)
    sections = [
        _section("reference", "Headline numbers: paper vs this run",
                 _note(f"The paper trains on {PAPER_REFERENCE['dataset']}; this run on dataset.name = "
                       f"{cfg['dataset']['name']} at {cfg['dataset']['image_size']} px, so only the "
                       "pattern (R keeps its accuracy, D collapses) is expected to match."),
                 _reference_html(metrics, t3, cfg)),
        _section("table1", "Table 1: network-policy pairs", _table1_html(t1, cfg), _image(figures_dir / "fig1_table1.png", "fig1_table1"),
                 "<details><summary>Table 1, one row per pair (results/tables/table1.csv)</summary>",
                 _frame_table("table1-tidy", tidy, signed=["delta"],
                              row_classes=["hl" if h else "" for h in t1["highlighted"]]), "</details>"),
        _section("table2", "Table 2: transitory points",
                 _frame_table("table2", t2, caption="Test examples that R and D both classify correctly at "
                              "full precision but D quantized misclassifies, % of the test set.")),
        _section("table3", "Table 3: cross-policy", _table3_html(t3, cfg)),
        _section("figures", "Figures",
                 *[_image(figures_dir / f"{n}.png", n) for n in names if n != "fig1_table1"],
                 _note(f"No activation histograms for {', '.join(no_hist)} (not in analysis.histogram.archs).")
                 if no_hist else ""),
        _section("remedy", "Remedy: percentile scale and flagged layers at full precision",
                 _frame_table("remedy", remedy, signed=["delta"], caption=(
                     "Accuracy (%) of the highlighted networks under each remedy setting; flagged layers "
                     "are those whose quantization alone costs more than analysis.remedy.flag_drop points."))),
        _section("runtimes", "Run times per pipeline stage",
                 _frame_table("runtimes", times, caption="From the Snakemake benchmark files: wall-clock "
                              "seconds summed and maximal over a rule's jobs, peak resident memory (MB).")
                 if len(times) else _note(f"No benchmark files under {benchmarks_dir}.")),
        _section("environment", "Environment",
                 _table("versions", [["package", "version"]], [[k, v] for k, v in versions().items()])),
        _section("config", "Configuration", "<pre>" + html.escape(yaml.safe_dump(dict(cfg), sort_keys=False)) + "</pre>"),
    ]
    nav = "".join(f'<a href="#{sid}">{label}</a>' for sid, label in [
        ("reference", "paper vs ours"), ("table1", "Table 1"), ("table2", "Table 2"), ("table3", "Table 3"),
        ("figures", "figures"), ("remedy", "remedy"), ("runtimes", "run times"), ("environment", "environment"),
        ("config", "config")])
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>dptq report</title><style>{CSS}</style></head><body>"
            f"<h1>Catastrophic failure under dynamic post-training quantization: reproduction report</h1>"
            f"<nav>{nav}</nav>{''.join(sections)}<script>{SCRIPT}</script></body></html>")
    for path, text in ((Path(html_path), page), (Path(metrics_path), json.dumps(metrics, indent=2) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
