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
import functools
import html
import importlib.metadata
import json
import math
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import yaml
from matplotlib.figure import Figure
from scipy import stats

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
# Label columns stay text: a budget named ``1`` or a single flagged layer ``7`` is a name, not a number.
LABELS = ("arch", "version", "budget", "mode", "options", "network", "policy", "split", "scan", "precision",
          "corruption", "setting", "scale_rule", "flagged_layers")
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
    df = pd.read_csv(path, dtype=dict.fromkeys(LABELS, str))
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
    return [f"{v}-{b}" for v in map(str, cfg["pairs"]["versions"]) for b in map(str, cfg["pairs"]["budgets"])]


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


def caption_files(cfg: Mapping, directory) -> dict[str, Path]:
    """Write each figure's caption as ``<directory>/<stem>.rst`` (for Snakemake's ``report(caption=...)``).

    reStructuredText markup characters are backslash-escaped: ``|FP_R − FP_D|`` would otherwise
    read as a substitution reference.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in figure_names(cfg):
        paths[name] = directory / f"{name}.rst"
        paths[name].write_text(re.sub(r"([\\|*`_])", r"\\\1", caption(name)) + "\n", encoding="utf-8")
    return paths


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


def _grid(nrows: int, ncols: int, panel: tuple[float, float], gap: tuple[float, float] = (0.3, 0.45),
          left: float = 0.8, right: float = 0.15, top: float = 1.05, bottom: float = 0.55) -> tuple[Figure, np.ndarray]:
    """``nrows`` × ``ncols`` panels of ``panel`` inches; gaps and margins in inches.

    A fixed layout without shared axes: with tens of panels, constrained layout and shared
    limits (quadratic in the number of panels) cost seconds per save. The top margin holds the
    title, the legend and the first row's panel titles.
    """
    width = left + right + ncols * panel[0] + (ncols - 1) * gap[0]
    height = top + bottom + nrows * panel[1] + (nrows - 1) * gap[1]
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
        wspace=gap[0] / panel[0], hspace=gap[1] / panel[1]))
    return fig, axes


def _header(fig: Figure, axes: np.ndarray, title: str) -> None:
    """The figure title and, below it, one legend collected from every panel (panel legends removed)."""
    height = fig.get_figheight()
    fig.suptitle(title, y=1 - 0.06 / height, va="top", fontsize=11)
    handles = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.32 / height),
                   ncols=min(len(handles), 6), frameon=False)


def _save(fig: Figure, figures_dir: Path, stem: str) -> list[Path]:
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        # No creation date in the PDF: the same inputs give the same bytes (DVC caching).
        fig.savefig(path, dpi=PNG_DPI, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths


def fig_table1(t1: pd.DataFrame, cfg: Mapping) -> Figure:
    """Rows: FP accuracy, Δ; columns: arch; x: (version, budget) cell; R vs D side by side."""
    archs = _ordered(t1["arch"].unique(), _archs(cfg))
    cells = _ordered(t1["cell"].unique(), _cells(cfg))
    data = t1.assign(network=_labelled(t1, "mode", NETWORKS))
    palette = _palette(t1["mode"].unique())
    fig, axes = _grid(2, len(archs), panel=(4.0, 2.5), gap=(0.55, 0.25), left=0.7, top=1.1)
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
            ax.set_xlim(-0.5, len(cells) - 0.5)
            for cell in hl:
                ax.axvspan(cells.index(cell) - 0.5, cells.index(cell) + 0.5, color="gold", alpha=0.3, lw=0, zorder=0)
        top.set_title(f"{arch}" + (f" (highlighted: {', '.join(hl)})" if len(hl) else " (no cell highlighted)"))
        top.tick_params(labelbottom=False)
        top.set(xlabel="", ylabel="FP accuracy (%)" if j == 0 else "")
        bottom.set(xlabel="cell (version-budget)", ylabel="Δ = Q − FP (points)" if j == 0 else "")
    _header(fig, axes, "Table 1: full-precision accuracy and accuracy change after quantization (shaded: highlighted pair)")
    return fig


def fig_layer_scan(scan: pd.DataFrame, cfg: Mapping) -> Figure:
    """Rows: (arch, split); columns: before/after/single; lines: R vs D against l/N."""
    archs = _ordered(scan["arch"].unique(), _archs(cfg))
    splits = _ordered(scan["split"].unique(), cfg["analysis"]["layer_scan"]["splits"])
    scans = _ordered(scan["scan"].unique(), SCANS)
    data = scan.assign(network=_labelled(scan, "network", NETWORKS))
    palette = _palette(scan["network"].unique())
    rows = [(a, s) for a in archs for s in splits]
    fig, axes = _grid(len(rows), len(scans), panel=(3.6, 1.9), gap=(0.2, 0.2), left=1.0)
    for i, (arch, split) in enumerate(rows):
        for j, kind in enumerate(scans):
            ax = axes[i, j]
            sub = data[(data["arch"] == arch) & (data["split"] == split) & (data["scan"] == kind)]
            sns.lineplot(sub, x="relative_depth", y="acc", hue="network", palette=palette, marker="o",
                         markersize=3, errorbar=None, ax=ax)
            ax.set_title(SCANS.get(kind, kind) if i == 0 else "")
            ax.set(xlim=(0, 1.02), xticks=[0, 0.25, 0.5, 0.75, 1], ylim=(0, 101), xlabel="relative depth l/N",
                   ylabel=f"{arch}\n{split} {ACC_LABEL}")
            ax.label_outer()
    _header(fig, axes, "Layer scan: accuracy when only some layers are quantized (highlighted pairs, own policy)")
    return fig


def _pick_layers(layers: Sequence[int], k: int = MAX_HISTOGRAM_LAYERS) -> list[int]:
    """All layers if at most ``k``, else ``k`` evenly spaced ones, first and last included."""
    layers = sorted(layers)
    if len(layers) <= k:
        return layers
    return [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, k).round().astype(int))]


def fig_histograms(hist: pd.DataFrame, arch: str) -> Figure:
    """For each network a block of panels, one per layer: FP (grey, filled) vs Q (colour, line)."""
    networks = _ordered(hist["network"].unique(), NETWORKS)
    layers = _pick_layers(hist["layer"].unique().tolist())
    ncols = min(HISTOGRAM_COLUMNS, len(layers))
    block = math.ceil(len(layers) / ncols)
    fig, axes = _grid(block * len(networks), ncols, panel=(1.75, 1.2), gap=(0.2, 0.42), left=0.45, top=1.0, bottom=0.45)
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
                # Step curves through the bin edges (ax.stairs is ten times slower for 80 curves).
                edges = np.append(g["bin_left"].to_numpy(), g["bin_right"].iloc[-1])
                density = np.append(g["density"].to_numpy(), g["density"].iloc[-1])
                sparsity[precision] = g["sparsity"].iloc[0]  # already in % (analysis.histograms)
                if precision == "fp":
                    ax.fill_between(edges, density, step="post", color="0.75", lw=0, label="FP (full precision)")
                else:
                    ax.plot(edges, density, drawstyle="steps-post", color=COLORS.get(network, "C4"), lw=1.1,
                            label=f"Q, {NETWORKS.get(network, network)}")
            ax.set_title(f"{network[0].upper()} L{layer}  sp " + " / ".join(
                f"{PRECISIONS[p]} {s:.0f}%" for p, s in sparsity.items()), fontsize=7.5)
            ax.set(xlim=(0, hi), xticks=[0, hi / 2, hi], ylim=(0, None), yticks=[])
            ax.tick_params(labelsize=6.5, pad=1)
        for k in range(len(layers), block * ncols):  # unused slots of the last row
            axes[n * block + k // ncols, k % ncols].set_axis_off()
        axes[n * block, 0].set_ylabel(f"{NETWORKS.get(network, network)}\ndensity", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("activation value", fontsize=7.5)
    n_all = hist["layer"].nunique()
    shown = f"{len(layers)} of {n_all} layers, evenly spaced" if len(layers) < n_all else f"all {n_all} layers"
    _header(fig, axes, f"{arch}: activation histograms, zero bin removed ({shown}; sp = sparsity, share of zeros)")
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
    fig, axes = _grid(math.ceil(len(names) / ncols), ncols, panel=(3.3, 2.1), gap=(0.2, 0.45), left=0.65)
    degrees = sorted(corr["degree"].unique())
    for k, name in enumerate(names):
        ax = axes[k // ncols, k % ncols]
        sns.lineplot(data[data["corruption"] == name], x="degree", y="acc", hue="network", style="precision",
                     style_order=styles, dashes={"FP": "", "Q": (4, 2)}, palette=palette, marker="o",
                     markersize=4, errorbar=t_interval, ax=ax)
        ax.set_title(name.replace("_", " "))
        ax.set(xticks=degrees, xlim=(min(degrees) - 0.2, max(degrees) + 0.2), xlabel="degree (severity)",
               ylabel=ACC_LABEL)
        ax.label_outer()
    # One y range for all panels, fitted to the data: R and D often differ by a few points only.
    used = axes.flat[:len(names)]
    lo, hi = min(ax.get_ylim()[0] for ax in used), max(ax.get_ylim()[1] for ax in used)
    for ax in used:
        ax.set_ylim(max(lo, 0), min(hi, 101))
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    _header(fig, axes, f"{arch}: accuracy under input corruptions (FP solid, Q dashed; 95 % t-CI over seeds)")
    return fig


def figures(cfg: Mapping, tables_dir, analysis_dir, figures_dir) -> list[Path]:
    """Draw every figure of :func:`figure_names` as PNG and PDF; returns the written paths.

    Reads every input first, so that a missing one fails with its name before any figure is drawn.
    """
    analysis_dir, archs = Path(analysis_dir), _archs(cfg)
    t1, scan = _table1(tables_dir), _analysis(analysis_dir, archs, "layer_scan")
    hist = {a: _analysis(analysis_dir, [a], "histograms") for a in _histogram_archs(cfg)}
    corr = {a: _analysis(analysis_dir, [a], "corruptions") for a in archs}
    drawers = {"fig1_table1": functools.partial(fig_table1, t1, cfg),
               "fig2_layer_scan": functools.partial(fig_layer_scan, scan, cfg),
               **{f"fig3_histograms_{a}": functools.partial(fig_histograms, h, a) for a, h in hist.items()},
               **{f"fig4_corruptions_{a}": functools.partial(fig_corruptions, c, a, cfg) for a, c in corr.items()}}
    paths = []
    for name in figure_names(cfg):
        with _style():
            paths += _save(drawers[name](), Path(figures_dir), name)
    return paths


# ---------------------------------------------------------------- HTML pieces

def _fmt(value, signed: bool = False) -> str:
    """Numbers with two decimals (Δ with its sign), missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "–"
    return True


def _cell(value, cls: str = "", tag: str = "td", span: int = 1) -> str:
    """One cell; numbers (class ``n``) align right, text left."""
    value = str(value)
    cls = " ".join(c for c in (cls, "n" if tag == "td" and _numeric(value) else "") if c)
    attrs = (f' class="{cls}"' if cls else "") + (f' colspan="{span}"' if span > 1 else "")
    return f"<{tag}{attrs}>{html.escape(value)}</{tag}>"


def _table(table_id: str, header: Sequence[Sequence], body: Sequence[Sequence], row_classes=None) -> str:
    """An HTML table. ``header``: rows of labels or (label, colspan); ``body``: rows of text or (text, class)."""
    head = "".join("<tr>" + "".join(_cell(h[0], tag="th", span=h[1]) if isinstance(h, tuple) else _cell(h, tag="th")
                                    for h in row) + "</tr>" for row in header)
    rows = []
    for i, row in enumerate(body):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        rows.append(f"<tr{cls}>" + "".join(_cell(*c) if isinstance(c, tuple) else _cell(c) for c in row) + "</tr>")
    return f'<table id="{table_id}"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _frame_table(table_id: str, df: pd.DataFrame, signed: Sequence[str] = (), row_classes=None) -> str:
    body = [[_fmt(v, c in signed) for c, v in row.items()] for _, row in df.iterrows()]
    return _table(table_id, [list(df.columns)], body, row_classes)


def _table1_html(t1: pd.DataFrame, cfg: Mapping) -> str:
    """The paper's layout: a row per (arch, version), per budget R FP, R Δ, D FP, D Δ; highlighted cells shaded."""
    budgets = _ordered(t1["budget"].unique(), map(str, cfg["pairs"]["budgets"]))
    modes = _ordered(t1["mode"].unique(), NETWORKS)
    by_key = {(r.arch, r.version, r.budget, r.mode): r for r in t1.itertuples()}
    header = [["arch", "W acc", "V", "options"] + [(f"budget {b}", 2 * len(modes)) for b in budgets],
              ["", "", "", ""] + [f"{m[0].upper()} {q}" for _ in budgets for m in modes for q in ("FP", "Δ")]]
    body = []
    for arch in _ordered(t1["arch"].unique(), _archs(cfg)):
        sub = t1[t1["arch"] == arch]
        for version in _ordered(sub["version"].unique(), map(str, cfg["pairs"]["versions"])):
            first = sub[sub["version"] == version].iloc[0]
            row = [arch, _fmt(first["white_box_acc"]), version, first["options"]]
            for b in budgets:
                for m in modes:
                    r = by_key.get((arch, version, b, m))
                    hl = "hl" if r is not None and r.highlighted else ""
                    row += [(_fmt(r.fp_acc if r is not None else None), hl),
                            (_fmt(r.delta if r is not None else None, True), hl)]
            body.append(row)
    return _table("table1", header, body)


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
        body.append([arch, "FP (no quantization)"] + [_fmt(fp.get(n)) for n in networks])
    return _table("table3", [["arch", "setting"] + [NETWORKS.get(n, n) for n in networks]], body)


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


def _reference_pairs(arch: str, ours: Mapping, q3: pd.Series) -> dict[str, tuple]:
    """Quantity -> (paper, this run) for one arch; the paper's is None where it has no number."""
    ref = PAPER_REFERENCE
    hl = ref["highlighted"].get(arch, {})
    pairs = {"white-box accuracy W (%)": (ref["white_box_acc"].get(arch), ours.get("white_box_acc")),
             "highlighted cell (version-budget)": (hl.get("cell"), ours.get("highlighted"))}
    for mode in ("robust", "detrimental"):
        tag = mode[0].upper()
        pairs[f"{tag} FP accuracy (%), highlighted cell"] = (hl.get(mode, {}).get("fp_acc"), ours.get(f"{mode}_fp_acc"))
        pairs[f"{tag} Δ = Q − FP (points), highlighted cell"] = (hl.get(mode, {}).get("delta"), ours.get(f"{mode}_delta"))
    pairs["transitory points (% of the test set)"] = (ref["transitory_pct"].get(arch), ours.get("transitory_pct"))
    paper3 = ref["table3"].get(arch, {})
    for policy, pol in POLICIES.items():
        for network, net in NETWORKS.items():
            pairs[f"Table 3: {net} quantized with {pol} (%)"] = (paper3.get(policy, {}).get(network),
                                                                   q3.get((arch, policy, network)))
    return pairs


def _reference_html(metrics: Mapping, t3: pd.DataFrame) -> str:
    """The paper's numbers (SPEC §5) beside this run's: a row per quantity, two columns per arch."""
    archs = list(metrics) + [a for a in PAPER_REFERENCE["white_box_acc"] if a not in metrics]
    q3 = t3.set_index(["arch", "policy", "network"])["q_acc"]
    per_arch = {a: _reference_pairs(a, metrics.get(a, {}), q3) for a in archs}
    header = [["quantity"] + [(a, 2) for a in archs], [""] + ["paper", "this run"] * len(archs)]
    body = [[what] + [_fmt(v, "Δ" in what) for a in archs for v in per_arch[a][what]] for what in per_arch[archs[0]]]
    return _table("reference", header, body)


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
        parts = path.relative_to(root).parts
        rule = parts[0] if len(parts) > 1 else path.stem  # benchmarks/{rule}/... or benchmarks/{rule}.tsv
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
            f"<figcaption><b>{html.escape(name)}</b> ({html.escape(name)}.png, .pdf). "
            f"{html.escape(caption(name))}</figcaption></figure>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f2f2f2;text-align:center}
td.n{text-align:right}
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
    return f'<section id="s-{sid}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _page(sections: Sequence[tuple[str, str, Sequence[str]]]) -> str:
    """The whole page: title, a link per section, the sections, the image-counting script."""
    nav = "".join(f'<a href="#s-{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(_section(sid, title, *parts) for sid, title, parts in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>dptq report</title><style>{CSS}</style></head><body>"
            f"<h1>Catastrophic failure under dynamic post-training quantization: reproduction report</h1>"
            f"<nav>{nav}</nav>{body}<script>{SCRIPT}</script></body></html>")


def build(cfg: Mapping, tables_dir, analysis_dir, figures_dir, benchmarks_dir, html_path, metrics_path) -> None:
    """Write the self-contained report page and the headline metrics JSON.

    Reads every input before writing anything, so a missing one fails with its name and leaves
    no half-written report.
    """
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    archs = _archs(cfg)
    t1 = _table1(tables_dir)
    t2 = _read(tables_dir / "table2.csv", "table2")
    t3 = _read(tables_dir / "table3.csv", "table3")
    remedy = _analysis(Path(analysis_dir), archs, "remedy")
    images = {name: _image(figures_dir / f"{name}.png", name) for name in figure_names(cfg)}
    times = runtimes(benchmarks_dir)
    metrics = headline(t1, t2, cfg)

    tidy = t1[COLUMNS["table1"]].assign(highlighted=t1["highlighted"].map({True: "★", False: ""}))
    no_hist = [a for a in archs if a not in _histogram_archs(cfg)]
    page = _page([
        ("reference", "Paper vs this run", [
            _note(f"The paper trains on {PAPER_REFERENCE['dataset']}; this run on dataset.name = {cfg['dataset']['name']} "
                  f"at {cfg['dataset']['image_size']} px, so the numbers differ; the pattern (R keeps its accuracy "
                  "when quantized, D loses much of it, both alike at full precision) is what should match. "
                  "A dash: no number (the paper reports Table 3 for ResNet18 only)."),
            _reference_html(metrics, t3)]),
        ("table1", "Table 1: network-policy pairs", [
            _note("FP: full-precision test accuracy (%); Δ = Q − FP in points, Q quantized with the network's own "
                  "policy at the cell's budget; W acc: the white-box network both start from. Shaded: the "
                  "highlighted pair, the cell with the largest Δ_R − Δ_D among those with |FP_R − FP_D| ≤ "
                  f"{cfg['evaluate']['highlight_max_fp_gap']} (evaluate.highlight_max_fp_gap)."),
            _table1_html(t1, cfg), images["fig1_table1"],
            "<details><summary>Table 1, one row per pair (table1.csv)</summary>",
            _frame_table("table1-tidy", tidy, signed=["delta"], row_classes=["hl" if h else "" for h in t1["highlighted"]]),
            "</details>"]),
        ("table2", "Table 2: transitory points", [
            _note("Test examples that R and D both classify correctly at full precision but D quantized with "
                  "its own policy misclassifies, in % of the test set (highlighted cell)."),
            _frame_table("table2", t2)]),
        ("table3", "Table 3: cross-policy", [
            _note("Test accuracy (%) of each network quantized with each policy at its arch's highlighted "
                  "budget (random: a seeded random allocation that meets the same budget), and at full precision."),
            _table3_html(t3, cfg)]),
        ("figures", "Figures", [images[n] for n in images if n != "fig1_table1"] + [
            _note(f"No activation histograms for {', '.join(no_hist)}: not in analysis.histogram.archs.") if no_hist else ""]),
        ("remedy", "Remedy: percentile scale, flagged layers at full precision", [
            _note("Test accuracy (%) of the highlighted networks under each remedy setting; a layer is flagged "
                  f"when quantizing it alone costs more than {cfg['analysis']['remedy']['flag_drop']} points "
                  "(analysis.remedy.flag_drop)."),
            _frame_table("remedy", remedy.assign(delta=remedy["q_acc"] - remedy["fp_acc"]), signed=["delta"])]),
        ("runtimes", "Run times per pipeline stage", [
            _note("From the Snakemake benchmark files (benchmarks/<rule>/...): wall-clock seconds summed and "
                  "maximal over a rule's jobs, peak resident memory in MB."),
            _frame_table("runtimes", times) if len(times)
            else _note(f"No benchmark files under {benchmarks_dir}.")]),
        ("environment", "Environment", [_table("versions", [["package", "version"]], list(versions().items()))]),
        ("config", "Configuration", ["<pre>" + html.escape(yaml.safe_dump(dict(cfg), sort_keys=False)) + "</pre>"]),
    ])
    for path, text in ((Path(html_path), page), (Path(metrics_path), json.dumps(metrics, indent=2) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
