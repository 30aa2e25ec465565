"""The report's figures (docs/method.md §7), drawn from the tidy CSVs as PNG and PDF.

:func:`draw` writes ``<stem>.png`` and ``<stem>.pdf`` for every stem of :func:`figure_names`:

- ``fig1_table1``: Table 1 at a glance, the seed means of ``table1_summary.csv``;
- ``fig2_layer_scan``: the layer scan of the highlighted pairs (paper Fig. 2);
- ``fig3_histograms_{arch}``: activation histograms, FP vs quantized (paper Fig. 3);
- ``fig4_corruptions_{arch}``: accuracy under input corruptions (paper Fig. 4);
- ``fig5_bit_floor``: D's and R's Δ against the one bit-width of every layer (docs/method.md
  §2.23), only where the config has versions with a single option.

No config is needed: archs, cells, splits, scans and corruptions are drawn in the order they
first appear in the data, which is the config's order. :func:`read` reads every tidy CSV of
the report (:mod:`dptq.report` uses it too) and concatenates a list of per-(seed, arch) files.

With several training seeds a point is the mean over the seeds, and its interval is the 95 %
Student-t interval of that mean (:func:`t_interval`): for n values with mean m and sample
standard deviation s,

    m ± t_{(1+level)/2, n-1} · s / √n,

and none for n = 1. The summary's ``*_ci95`` columns are that half-width.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered by Agg (PNG) and the PDF
backend, with no pyplot and no global style change: seaborn's theme applies inside a
``rc_context`` only while a figure is drawn.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .claims import EFFECT_COLUMNS
from .config import cell_name
from .tables import SUMMARY_COLUMNS, TABLE1_COLUMNS, TABLE2_COLUMNS, TABLE3_COLUMNS, bit_floor, ci95, read_table

# Figure kinds in report order; those of PER_ARCH have one figure per arch, stem "<kind>_<arch>".
KINDS = ("fig1_table1", "fig2_layer_scan", "fig3_histograms", "fig4_corruptions", "fig5_bit_floor")
PER_ARCH = ("fig3_histograms", "fig4_corruptions")
FORMATS = ("png", "pdf")
MAX_HISTOGRAM_LAYERS = 20  # the paper's Fig. 3 shows ResNet18's 20 layers; deeper nets are subsampled
HISTOGRAM_COLUMNS = 10
PNG_DPI = 110
TITLE_CHAR_EM = 0.6  # mean width of a title character in em (DejaVu Sans, mixed case)

# The columns each tidy CSV must have (more are allowed). The analysis CSVs and the per-seed
# tables start with the training seed; corruptions.csv also has the corruption draw
# (corruption_seed), which nothing here needs by name: Fig. 4 averages over whatever it is.
COLUMNS = {
    "table1": TABLE1_COLUMNS,
    "summary": SUMMARY_COLUMNS,
    "table2": TABLE2_COLUMNS,
    "table3": TABLE3_COLUMNS,
    "effect": EFFECT_COLUMNS,
    "layer_scan": ["seed", "arch", "network", "split", "scan", "layer", "relative_depth", "acc"],
    "histograms": ["seed", "arch", "network", "precision", "layer", "bin_left", "bin_right", "density", "sparsity"],
    "corruptions": ["seed", "arch", "network", "precision", "corruption", "degree", "acc"],
    "remedy": ["seed", "arch", "network", "setting", "flagged_layers", "q_acc", "fp_acc"],
}
NETWORKS = {"white_box": "W (white box)", "robust": "R (robust)", "detrimental": "D (detrimental)"}
PRECISIONS = {"fp": "FP", "q": "Q"}
COLORS = {"white_box": "#7f7f7f", "robust": "#1f77b4", "detrimental": "#d62728"}
SCANS = {"before": "before: layers 1..l quantized", "after": "after: layers l..N quantized",
         "single": "single: only layer l quantized"}
ACC_LABEL = "accuracy (%)"


# ---------------------------------------------------------------- inputs

def _read_one(path: Path, kind: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the report needs this {kind} table "
                                f"(run the pipeline step that writes it first)")
    df = read_table(path)
    missing = [c for c in COLUMNS[kind] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a {kind} table has {COLUMNS[kind]}")
    if df.empty:
        raise ValueError(f"{path}: has a header but no rows")
    return df


def read(paths, kind: str) -> pd.DataFrame:
    """The tidy CSV ``paths`` (one path or a list, concatenated in order) of a ``kind`` of :data:`COLUMNS`.

    A missing file, column or row fails with the file's name. Tables with a ``highlighted``
    column get it (and ``paper_cell``, where there is one) as bool and a ``cell`` column,
    ``"<version>-<budget>"``.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"no {kind} files given")
    df = pd.concat([_read_one(p, kind) for p in paths], ignore_index=True)
    if "highlighted" in df.columns:
        # CSV booleans (True/true/1) whatever pandas inferred.
        for flag in [c for c in ("highlighted", "paper_cell") if c in df.columns]:
            df[flag] = df[flag].astype(str).str.strip().str.lower().isin(["true", "1", "yes"])
        df["cell"] = [cell_name(v, b) for v, b in zip(df["version"], df["budget"])]
    return df


def _by_arch(df: pd.DataFrame, archs: Iterable[str], kind: str, required: bool = True) -> dict[str, pd.DataFrame]:
    """``df`` split by arch, for each of ``archs`` (``required``: an arch without rows is an error)."""
    groups = dict(tuple(df.groupby("arch", sort=False)))
    missing = [a for a in archs if a not in groups]
    if missing and required:
        raise ValueError(f"{kind}: no rows for arch(s) {missing}; pass that arch's {kind}.csv files")
    return {a: groups[a] for a in archs if a in groups}


def t_interval(values: pd.Series) -> tuple[float, float]:
    """The 95 % Student-t interval of the mean (:func:`dptq.tables.ci95`) as seaborn's errorbar
    wants it; (m, m) for one value."""
    m, half = float(values.mean()), ci95(values)
    return (m, m) if math.isnan(half) else (m - half, m + half)


# ---------------------------------------------------------------- names

def figure_names(archs: Sequence[str], histogram_archs: Iterable[str], floor: bool = False) -> list[str]:
    """The figure stems, in report order, for ``archs`` (fig3 only for those in ``histogram_archs``,
    fig5 only with a ``floor``: versions of one option)."""
    with_histograms = set(histogram_archs)
    return ["fig1_table1", "fig2_layer_scan", *(f"fig3_histograms_{a}" for a in archs if a in with_histograms),
            *(f"fig4_corruptions_{a}" for a in archs), *(["fig5_bit_floor"] if floor else [])]


def figure_kind(name: str) -> tuple[str, str | None]:
    """``(kind, arch)`` of a figure stem: ``fig3_histograms_resnet18`` -> ``("fig3_histograms", "resnet18")``."""
    for kind in KINDS:
        if name == kind and kind not in PER_ARCH:
            return kind, None
        if kind in PER_ARCH and name.startswith(f"{kind}_") and len(name) > len(kind) + 1:
            return kind, name[len(kind) + 1:]
    raise KeyError(f"{name!r} is not a figure stem; the kinds are {list(KINDS)} ({', '.join(PER_ARCH)} + '_<arch>')")


# ---------------------------------------------------------------- drawing helpers

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


def _seeds_note(n: int, what: str) -> str:
    """The title's word on seeds: nothing for one seed."""
    return f"; mean of {n} seeds, {what}: 95 % t-interval" if n > 1 else ""


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
    """The figure title and, below it, one legend collected from every panel (panel legends removed).

    The title shrinks (down to 7 pt) to fit a narrow figure: the top margin has room for one line.
    """
    height = fig.get_figheight()
    fits = (fig.get_figwidth() - 0.2) / (TITLE_CHAR_EM * len(title) / 72)  # title width at 1 pt, in inches
    fig.suptitle(title, y=1 - 0.06 / height, va="top", fontsize=max(7.0, min(11.0, fits)))
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


# ---------------------------------------------------------------- figures

def _yerr(df: pd.DataFrame, column: str) -> np.ndarray | None:
    """Error-bar half-widths, or None where there is no interval (one seed: NaN)."""
    return None if df[column].isna().all() else df[column].fillna(0).to_numpy()


def fig_table1(t1: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Rows: FP accuracy, Δ; columns: arch; x: (version, budget) cell; R vs D side by side.

    Marks and bars are the summary's seed means with its 95 % half-widths as error bars; with
    several seeds, small dots show each seed's value (``t1``). Shaded: the summary's highlighted cell.
    """
    archs, cells, modes = (list(pd.unique(summary[c])) for c in ("arch", "cell", "mode"))
    n_seeds = int(summary["n_seeds"].max())
    palette = _palette(modes)
    width = 0.8 / len(modes)
    offset = {m: (i - (len(modes) - 1) / 2) * width for i, m in enumerate(modes)}
    fig, axes = _grid(2, len(archs), panel=(4.0, 2.5), gap=(0.55, 0.25), left=0.7, top=1.1)
    for j, arch in enumerate(archs):
        sub, seeds = summary[summary["arch"] == arch], t1[t1["arch"] == arch]
        top, bottom = axes[0, j], axes[1, j]
        for mode in modes:
            color, label = palette[NETWORKS.get(mode, mode)], NETWORKS.get(mode, mode)
            m = sub[sub["mode"] == mode]
            x = m["cell"].map(cells.index).to_numpy() + offset[mode]
            top.errorbar(x, m["fp_acc_mean"], yerr=_yerr(m, "fp_acc_ci95"), fmt="o", color=color, capsize=2,
                         label=label)
            bottom.bar(x, m["delta_mean"], width=width, yerr=_yerr(m, "delta_ci95"), color=color, capsize=2,
                       label=label)
            if n_seeds > 1:
                s = seeds[seeds["mode"] == mode]
                sx = s["cell"].map(cells.index).to_numpy() + offset[mode]
                top.scatter(sx, s["fp_acc"], s=7, color=color, alpha=0.45, lw=0, zorder=3)
                bottom.scatter(sx, s["delta"], s=7, color="black", alpha=0.45, lw=0, zorder=3)
        top.axhline(sub["white_box_acc_mean"].iloc[0], ls="--", color=COLORS["white_box"], lw=1,
                    label=NETWORKS["white_box"])
        bottom.axhline(0, color="black", lw=0.8)
        hl = sub.loc[sub["highlighted"], "cell"].unique()
        for ax in (top, bottom):
            ax.set_xticks(range(len(cells)), cells)
            ax.set_xlim(-0.5, len(cells) - 0.5)
            for cell in hl:
                ax.axvspan(cells.index(cell) - 0.5, cells.index(cell) + 0.5, color="gold", alpha=0.3, lw=0, zorder=0)
        top.set_title(f"{arch}" + (f" (highlighted: {', '.join(hl)})" if len(hl) else " (no cell highlighted)"))
        top.tick_params(labelbottom=False)
        top.set(xlabel="", ylabel="FP accuracy (%)" if j == 0 else "")
        bottom.set(xlabel="cell (version-budget)", ylabel="Δ = Q − FP (points)" if j == 0 else "")
    _header(fig, axes, "Table 1: full-precision accuracy and Δ after quantization "
                       f"(shaded: highlighted pair{_seeds_note(n_seeds, 'bars')})")
    return fig


def fig_layer_scan(scan: pd.DataFrame) -> Figure:
    """Rows: (arch, split); columns: before/after/single; lines: R vs D against l/N, mean over seeds."""
    archs, splits, scans = (list(pd.unique(scan[c])) for c in ("arch", "split", "scan"))
    n_seeds = scan["seed"].nunique()
    data = scan.assign(network=_labelled(scan, "network", NETWORKS))
    palette = _palette(pd.unique(scan["network"]))
    rows = [(a, s) for a in archs for s in splits]
    fig, axes = _grid(len(rows), len(scans), panel=(3.6, 1.9), gap=(0.2, 0.2), left=1.0)
    for i, (arch, split) in enumerate(rows):
        for j, kind in enumerate(scans):
            ax = axes[i, j]
            sub = data[(data["arch"] == arch) & (data["split"] == split) & (data["scan"] == kind)]
            sns.lineplot(sub, x="relative_depth", y="acc", hue="network", palette=palette, marker="o",
                         markersize=3, errorbar=t_interval if n_seeds > 1 else None, ax=ax)
            ax.set_title(SCANS.get(kind, kind) if i == 0 else "")
            ax.set(xlim=(0, 1.02), xticks=[0, 0.25, 0.5, 0.75, 1], ylim=(0, 101), xlabel="relative depth l/N",
                   ylabel=f"{arch}\n{split} {ACC_LABEL}")
            ax.label_outer()
    _header(fig, axes, "Layer scan: accuracy when only some layers are quantized "
                       f"(highlighted pairs, own policy{_seeds_note(n_seeds, 'bands')})")
    return fig


def _pick_layers(layers: Sequence[int], k: int = MAX_HISTOGRAM_LAYERS) -> list[int]:
    """All layers if at most ``k``, else ``k`` evenly spaced ones, first and last included."""
    layers = sorted(layers)
    if len(layers) <= k:
        return layers
    return [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, k).round().astype(int))]


def fig_histograms(hist: pd.DataFrame, arch: str) -> Figure:
    """For each network a block of panels, one per layer: FP (grey, filled) vs Q (colour, line).

    One seed's networks, the first in the data: a histogram averaged over different networks
    would describe none of them.
    """
    seed, several = hist["seed"].iloc[0], hist["seed"].nunique() > 1
    hist = hist[hist["seed"] == seed]
    networks = list(pd.unique(hist["network"]))
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
    _header(fig, axes, f"{arch}{f' (seed {seed})' if several else ''}: activation histograms, zero bin removed "
                       f"({shown}; sp = sparsity, share of zeros)")
    return fig


def fig_corruptions(corr: pd.DataFrame, arch: str) -> Figure:
    """One panel per corruption: accuracy vs degree, R vs D (colour), FP solid / Q dashed, 95 % t-CI.

    With several training seeds each seed's accuracy is first averaged over the corruption
    draws, so the interval is over the seeds (the networks), not over draws of one network; with
    one seed it is over the corruption draws.
    """
    names = list(pd.unique(corr["corruption"]))
    n_seeds = corr["seed"].nunique()
    if n_seeds > 1:
        corr = corr.groupby(["seed", "network", "precision", "corruption", "degree"], sort=False,
                            as_index=False)["acc"].mean()
    data = corr.assign(network=_labelled(corr, "network", NETWORKS),
                       precision=_labelled(corr, "precision", PRECISIONS))
    palette = _palette(pd.unique(corr["network"]))
    styles = list(pd.unique(data["precision"]))
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
    over = f"{n_seeds} seeds" if n_seeds > 1 else "corruption seeds"
    _header(fig, axes, f"{arch}: accuracy under input corruptions (FP solid, Q dashed; 95 % t-CI over {over})")
    return fig


def draw(table1, summary, layer_scan, histograms, corruptions, figures_dir) -> list[Path]:
    """Draw every figure of :func:`figure_names` as ``<stem>.png`` and ``.pdf``; returns the written paths.

    ``table1``, ``summary``: the per-seed and summary Table 1 CSVs; ``layer_scan``,
    ``histograms``, ``corruptions``: lists of per-(seed, arch) CSVs (``histograms`` may be empty:
    no Fig. 3). The archs are the summary's. Reads every input first, so that a missing one
    fails with its name before any figure is drawn.
    """
    t1, means = read(table1, "table1"), read(summary, "summary")
    archs = list(pd.unique(means["arch"]))
    scan = read(layer_scan, "layer_scan")
    _by_arch(scan, archs, "layer_scan")  # Fig. 2 draws every arch in one figure: only check that each has rows
    corr = _by_arch(read(corruptions, "corruptions"), archs, "corruptions")
    hist = _by_arch(read(histograms, "histograms"), archs, "histograms", required=False) if histograms else {}
    floor = bit_floor(means)
    drawers = {"fig5_bit_floor": functools.partial(fig_bit_floor, floor),"fig1_table1": functools.partial(fig_table1, t1, means),
               "fig2_layer_scan": functools.partial(fig_layer_scan, scan),
               **{f"fig3_histograms_{a}": functools.partial(fig_histograms, h, a) for a, h in hist.items()},
               **{f"fig4_corruptions_{a}": functools.partial(fig_corruptions, c, a) for a, c in corr.items()}}
    paths = []
    for name in figure_names(archs, hist, not floor.empty):
        with _style():
            paths += _save(drawers[name](), Path(figures_dir), name)
    return paths


def fig_bit_floor(floor: pd.DataFrame) -> Figure:
    """Where the failure stops: Δ (left) and FP − W (right) against the one bit-width b every layer
    has, a colour per network, D solid and R dashed; bars: the 95 % t-interval over the seeds."""
    archs, modes = list(pd.unique(floor["arch"])), list(pd.unique(floor["mode"]))
    colors = dict(zip(archs, sns.color_palette("tab10", len(archs))))
    styles = {"detrimental": "-", "robust": "--"}
    n_seeds = int(floor["n_seeds"].max())
    fig, axes = _grid(1, 2, panel=(4.2, 3.0), gap=(0.8, 0.3), left=0.8, top=1.3)
    for arch in archs:
        for mode in modes:
            rows = floor[(floor["arch"] == arch) & (floor["mode"] == mode)].sort_values("bits")
            label = f"{arch}, {NETWORKS.get(mode, mode).split(' ')[0]}"
            kw = dict(color=colors[arch], ls=styles.get(mode, ":"), marker="o", capsize=2, label=label)
            axes[0, 0].errorbar(rows["bits"], rows["delta_mean"], yerr=_yerr(rows, "delta_ci95"), **kw)
            axes[0, 1].errorbar(rows["bits"], rows["fp_acc_mean"] - rows["white_box_acc_mean"],
                                yerr=_yerr(rows, "fp_acc_ci95"), **kw)
    bits = sorted(pd.unique(floor["bits"]))
    for ax, ylabel in zip(axes[0], ("Δ = Q − FP (points)", "FP − W (points)")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xticks=bits, xlabel="bits of every layer (b)", ylabel=ylabel)
    _header(fig, axes, f"The bit floor: every layer at b bits{_seeds_note(n_seeds, 'bars')}")
    return fig


def fig_audit(sensitivity: pd.DataFrame, coupling: pd.DataFrame, model: str) -> Figure:
    """The audit of one network: each layer's drop when it alone is quantized at the lowest option
    (the recommended float layers marked), and the batch-mates' mean drop per batch size for each
    attacker kind in the runtime (95 % t-interval over batches)."""
    fig, axes = _grid(1, 2, panel=(4.6, 2.6), gap=(0.9, 0.4), left=0.75)
    ax = axes[0, 0]
    colors = np.where(sensitivity["keep_float"].astype(bool), COLORS["detrimental"], COLORS["white_box"])
    ax.bar(sensitivity["layer"], sensitivity["drop"], color=colors, width=0.8)
    bits = int(sensitivity["bits"].iloc[0])
    ax.set(xlabel="layer (red: kept in float)", ylabel="accuracy drop (points)", title=f"one layer at {bits} bits")
    ax = axes[0, 1]
    served = coupling[coupling["runner"] == "runtime"]
    drops = served.assign(drop=served["clean_acc"] - served["mates_acc"])
    sns.lineplot(drops, x="batch_size", y="drop", hue="kind", marker="o", markersize=4, errorbar=t_interval, ax=ax)
    ax.set_xscale("log", base=2)
    sizes = sorted(drops["batch_size"].unique())
    ax.set(xticks=sizes, xticklabels=[str(s) for s in sizes], xlabel="batch size n",
           ylabel="batch-mates' drop (points)", title="one batch-mate, ONNX Runtime int8")
    _header(fig, axes, f"{model}: deployment audit")
    return fig


def audit_figure(sensitivity: pd.DataFrame, coupling: pd.DataFrame, model: str, path: str | Path) -> Path:
    """:func:`fig_audit` written to ``path`` (a PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _style():
        fig_audit(sensitivity, coupling, model).savefig(path, dpi=PNG_DPI)
    return path
