"""The report page ``results/report.html`` and the headline numbers ``results/metrics.json`` (docs/method.md §7).

:func:`build` reads the tables (Table 1 per seed and its summary over seeds, Tables 2 and 3),
the remedy CSVs, the figures that :func:`dptq.figures.draw` wrote, the caption files and the
Snakemake benchmark files, and renders ``templates/report.html.j2`` into one self-contained
page: images as base64 data URIs, inline CSS, one inline script, no external resource, so it
opens offline. Tables are :class:`pandas.io.formats.style.Styler` objects rendered through
``templates/table.html.j2`` (pandas' own table template under the page's table id); shaded
cells carry the class ``hl``.

Captions come from ``workflow/report/<name>.rst``, the files ``snakemake --report`` shows: one
text for both. A figure of a per-arch kind uses its kind's file with ``{arch}`` filled in.

Over seeds a cell shows m ± h: the mean m of the n seeds and the half-width of its 95 %
Student-t interval, h = t_{0.975, n-1} · s/√n (s: the sample standard deviation; m alone for
n = 1). Table 1's come from ``table1_summary.csv``, Tables 2 and 3 are summarised here with
:func:`dptq.tables.ci95`. The paper's numbers (``paper.yaml``) are compared with the means, at
each side's highlighted cell and at the paper's cell, beside the objective and epochs the pairs
were trained with (a number compares with the paper's only under the paper's hinge).
"""
from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import yaml
from pandas.io.formats.style import Styler

from . import claims
from .audit_record import AuditResult
from .config import cell_name, cells, section_for
from .figures import MAX_HISTOGRAM_LAYERS, NETWORKS, figure_kind, figure_names, read
from .models import num_quantizable_layers
from .tables import HINGE_COLUMNS, bit_floor, ci95, coupling_drops, paper, read_table

POLICIES = {"robust": "π_R", "detrimental": "π_D", "random": "random"}
# pairs.objective.loss -> how the report names it, filled from pairs.objective (docs/method.md §2.10).
OBJECTIVES = {"hinge": "hinge (the paper's)", "target": "target penalty {weight} · (CE_q − {target})² (Qu-ANTI-zation's)"}
# added where pairs.objective.spread_weight > 0 (docs/method.md §2.10)
SPREAD = " + spread term {spread_weight} · max(0, ln {spread_target} − σ) (not the paper's)"
MODES = ("robust", "detrimental")
TABLES = ("table1", "summary", "table2", "table3", "effect", "hinge")
VERSIONS = ["torch", "torchvision", "timm", "numpy", "pandas", "matplotlib", "seaborn", "jinja2", "snakemake", "dvc",
            "onnx", "onnxruntime"]
TEMPLATES = Path(__file__).with_name("templates")
# pandas' table template under the page's own table ids (Styler's are random "T_<uuid>").
_Table = Styler.from_custom_template(str(TEMPLATES), html_table="table.html.j2")
_PAGE = jinja2.Environment(loader=jinja2.PackageLoader("dptq"), autoescape=True, undefined=jinja2.StrictUndefined,
                           trim_blocks=True, lstrip_blocks=True)


# ---------------------------------------------------------------- inputs

def caption(captions_dir, name: str, **fields) -> str:
    """The text of ``<captions_dir>/<name>.rst`` with ``{field}`` placeholders filled, as one line.

    The files are reStructuredText for ``snakemake --report``; the page shows them as plain
    text, so backslash escapes (``\\|`` would otherwise start a substitution) are undone.
    """
    path = Path(captions_dir) / f"{name}.rst"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption file not found (captions live in workflow/report/)")
    text = path.read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace(f"{{{key}}}", str(value))
    left = re.findall(r"\{\w+\}", text)
    if left:
        raise ValueError(f"{path}: placeholder(s) {left} not filled (given: {sorted(fields)})")
    return " ".join(re.sub(r"\\(.)", r"\1", text).split())


def figure_caption(captions_dir, name: str) -> str:
    """The caption of figure stem ``name`` (e.g. ``fig3_histograms_resnet18``), from its kind's file."""
    kind, arch = figure_kind(name)
    return caption(captions_dir, kind, **({"arch": arch} if arch else {}), max_layers=MAX_HISTOGRAM_LAYERS)


def _image(figures_dir: Path, name: str, captions_dir, text: str | None = None) -> dict:
    """A figure as a data URI with its caption (``text``, or its kind's caption file)."""
    path = figures_dir / f"{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: figure not found; run dptq.figures.draw() before build()")
    return {"name": name, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"),
            "caption": text if text is not None else figure_caption(captions_dir, name)}


def runtimes(benchmarks_dir) -> pd.DataFrame:
    """Per rule (the first folder under ``benchmarks_dir``): jobs, total and max wall time, peak RSS.

    Files are ``benchmarks/{rule}/...tsv`` (any depth, e.g. ``{rule}/seed{N}/...``) or ``benchmarks/{rule}.tsv``.
    """
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
        rule = parts[0] if len(parts) > 1 else path.stem
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


# ---------------------------------------------------------------- numbers

def headline(summary_df: pd.DataFrame, table2_df: pd.DataFrame, effect_df: pd.DataFrame) -> dict:
    """metrics.json: per arch, the seed means at the summary's highlighted cell and the seed count.

    The frames as :func:`dptq.figures.read` returns them. Flat per arch (for ``dvc metrics
    show``): white-box accuracy, highlighted cell, R and D FP accuracy, quantized accuracy and Δ
    there, transitory points (mean over seeds), and the number of seeds on which the highlighted
    cell meets the effect (``effect_df``, :func:`dptq.claims.effect`).
    """
    at_own = table2_df[table2_df["highlighted"]]
    transitory = at_own.groupby("arch", sort=False)["transitory_pct"].mean()
    out = {}
    for arch, sub in summary_df.groupby("arch", sort=False):
        hl = sub[sub["highlighted"]].set_index("mode")
        entry = {"n_seeds": int(sub["n_seeds"].max()), "white_box_acc": float(sub["white_box_acc_mean"].iloc[0]),
                 "highlighted": f"{hl['version'].iloc[0]}-{hl['budget'].iloc[0]}" if len(hl) else None}
        for mode in MODES:
            for col in ("fp_acc", "q_acc", "delta"):
                entry[f"{mode}_{col}"] = float(hl.at[mode, f"{col}_mean"]) if mode in hl.index else None
        entry["transitory_pct"] = float(transitory[arch]) if arch in transitory.index else None
        met = effect_df[(effect_df["arch"] == arch) & effect_df["highlighted"]]["meets"]
        entry["seeds_meeting_effect"] = int(met.sum())
        out[arch] = entry
    return out


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


def _pm(mean, half, signed: bool = False) -> str:
    """m ± h, or m alone where there is no interval (one seed).

    A no-break space after ± : a narrow column wraps before "± h", not inside it.
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return _fmt(mean, signed) + ("" if half is None or math.isnan(half) else f" ±\u00a0{half:.2f}")


def _over_seeds(values: pd.Series) -> tuple[float, float]:
    """Mean and 95 % half-width over seeds (NaN for one seed)."""
    return float(values.mean()), ci95(values)


def _numeric(text: str) -> bool:
    try:
        float(text.split(" ±")[0])
    except ValueError:
        return text == "–"
    return True


# ---------------------------------------------------------------- tables

def _html(df: pd.DataFrame, table_id: str, signed=(), hl=None, index: bool = False) -> str:
    """``df`` as an HTML table with id ``table_id``.

    Values are shown by :func:`_fmt` (``signed`` columns with their sign); numeric cells get
    the class ``n`` (right-aligned), cells where ``hl`` is true the class ``hl`` (shaded); ``hl``
    is a boolean per row (a Series) or per cell (a frame like ``df``).
    """
    text = df.apply(lambda col: col.map(lambda v: _fmt(v, col.name in signed)))
    if hl is None:
        hl = np.zeros(df.shape, dtype=bool)
    elif isinstance(hl, pd.Series):
        hl = np.repeat(hl.to_numpy(dtype=bool)[:, None], df.shape[1], axis=1)
    shaded = np.asarray(hl, dtype=bool)
    classes = [[" ".join(c for c in ("n" if _numeric(t) else "", "hl" if h else "") if c) for t, h in zip(row, hrow)]
               for row, hrow in zip(text.to_numpy(), shaded)]
    styler = (_Table(text, uuid=table_id, cell_ids=False)
              .set_td_classes(pd.DataFrame(classes, index=df.index, columns=df.columns))
              .format(escape="html").format_index(escape="html", axis=0).format_index(escape="html", axis=1))
    if not index:
        styler = styler.hide(axis="index")
    return styler.to_html(table_id=table_id)


def _table1_html(summary: pd.DataFrame) -> str:
    """The paper's layout of the summary: a row per (arch, version), per budget R FP, R Δ, D FP, D Δ as m ± h."""
    budgets, modes = list(pd.unique(summary["budget"])), list(pd.unique(summary["mode"]))
    by_key = {(r.arch, r.version, r.budget, r.mode): r for r in summary.itertuples()}
    columns = pd.MultiIndex.from_tuples([(f"budget {b}", f"{m[0].upper()} {q}") for b in budgets for m in modes
                                         for q in ("FP", "Δ")])
    rows, shaded, index = [], [], []
    for (arch, version), sub in summary.groupby(["arch", "version"], sort=False):
        first = sub.iloc[0]
        index.append((arch, _pm(first.white_box_acc_mean, first.white_box_acc_ci95), version, first.options))
        row, hl = [], []
        for b in budgets:
            for m in modes:
                r = by_key.get((arch, version, b, m))
                row += [_pm(r.fp_acc_mean, r.fp_acc_ci95), _pm(r.delta_mean, r.delta_ci95, True)] if r else ["–", "–"]
                hl += [bool(r and r.highlighted)] * 2
        rows.append(row)
        shaded.append(hl)
    index = pd.MultiIndex.from_tuples(index, names=["arch", "W acc", "V", "options"])
    return _html(pd.DataFrame(rows, index=index, columns=columns), "table1", hl=np.array(shaded), index=True)


def _rows_html(t1: pd.DataFrame, table_id: str, delta: str) -> str:
    """A Table 1 CSV as it is, a row per row; the highlighted rows starred and shaded."""
    shown = t1.drop(columns="cell").assign(highlighted=t1["highlighted"].map({True: "★", False: ""}))
    return _html(shown, table_id, signed=[delta], hl=t1["highlighted"])


def _at_cells(table: pd.DataFrame):
    """A Table 2 or 3 frame of one arch as (label, rows): at each seed's own highlighted cell, then
    at the paper's cell (where this run trained it); once where every seed highlights the paper's."""
    own, paper = table[table["highlighted"]], table[table["paper_cell"]]
    named = lambda label, rows: (f"{label} ({', '.join(pd.unique(rows['cell']))})", rows)  # noqa: E731
    if own.index.equals(paper.index):
        yield named("each seed's highlighted cell, the paper's", own)
        return
    yield from (named(label, rows) for label, rows in (("each seed's highlighted cell", own), ("the paper's cell", paper))
                if len(rows))


def _table2_html(t2: pd.DataFrame) -> str:
    """A row per arch and cell (:func:`_at_cells`): each seed's transitory points and, over several seeds, m ± h."""
    seeds, rows = list(pd.unique(t2["seed"])), []
    for arch, sub in t2.groupby("arch", sort=False):
        for at, rows_at in _at_cells(sub):
            by_seed = rows_at.set_index("seed")["transitory_pct"]
            row = {"arch": arch, "at": at, **{f"seed {s}": by_seed.get(s) for s in seeds}}
            if len(seeds) > 1:
                row["mean ± 95 % half-width"] = _pm(*_over_seeds(by_seed))
            rows.append(row)
    return _html(pd.DataFrame(rows), "table2")


def _table3_html(t3: pd.DataFrame) -> str:
    """Rows: (arch, cell, policy) plus each network's FP; columns: networks W, R, D; m ± h over seeds."""
    networks = list(pd.unique(t3["network"]))
    rows = []
    for arch, by_arch in t3.groupby("arch", sort=False):
        for at, sub in _at_cells(by_arch):
            settings = [(f"Q with {POLICIES.get(p, p)}", sub[sub["policy"] == p], "q_acc")
                        for p in pd.unique(sub["policy"])]
            # FP accuracy does not depend on the policy: each seed's first row per network.
            fp = sub.drop_duplicates(["seed", "network"])
            for setting, rows_of, col in [*settings, ("FP (no quantization)", fp, "fp_acc")]:
                cells = {n: _pm(*_over_seeds(g[col])) for n, g in rows_of.groupby("network", sort=False)}
                rows.append([arch, at, setting] + [cells.get(n, "–") for n in networks])
    return _html(pd.DataFrame(rows, columns=["arch", "at", "setting"] + [NETWORKS.get(n, n) for n in networks]), "table3")


def _reference_html(metrics: Mapping, summary: pd.DataFrame, t2: pd.DataFrame, t3: pd.DataFrame, ref: Mapping) -> str:
    """The paper's numbers beside this run's means: a row per quantity, two columns per arch.

    R, D and the transitory points are shown twice: at each side's own highlighted cell, and at the
    paper's cell as this run measured it (``summary``'s means, Table 2's rows there), since the two
    highlight rules may pick different cells. Table 3 is compared at the paper's cell.
    """
    # the summary's archs, not metrics' keys: metrics.json also holds the audit's entry
    ran = list(pd.unique(summary["arch"]))
    archs = ran + [a for a in ref["white_box_acc"] if a not in ran]
    transitory = t2[t2["paper_cell"]].groupby("arch")["transitory_pct"].mean()
    q3 = t3[t3["paper_cell"]].groupby(["arch", "policy", "network"])["q_acc"].mean()
    means = {(r.arch, r.cell, r.mode): r for r in summary.itertuples()}
    columns, quantities = {}, None
    for arch in archs:
        ours, hl, paper3 = metrics.get(arch, {}), ref["highlighted"].get(arch, {}), ref["table3"].get(arch, {})
        pairs = {"white-box accuracy W (%)": (ref["white_box_acc"].get(arch), ours.get("white_box_acc")),
                 "highlighted cell (version-budget)": (hl.get("cell"), ours.get("highlighted"))}
        for mode in MODES:
            tag, theirs = mode[0].upper(), hl.get(mode, {})
            pairs[f"{tag} FP accuracy (%), highlighted cell"] = (theirs.get("fp_acc"), ours.get(f"{mode}_fp_acc"))
            pairs[f"{tag} Δ = Q − FP (points), highlighted cell"] = (theirs.get("delta"), ours.get(f"{mode}_delta"))
        for mode in MODES:
            tag, theirs = mode[0].upper(), hl.get(mode, {})
            for quantity, label in (("fp_acc", "FP accuracy (%)"), ("delta", "Δ = Q − FP (points)")):
                pairs[f"{tag} {label}, the paper's cell"] = (theirs.get(quantity),
                                                            _at_cell(means, arch, hl.get("cell"), mode, quantity))
        theirs = ref["transitory_pct"].get(arch)
        not_run = "not run" if hl.get("cell") else None  # no row at the paper's cell: this run did not train it
        pairs["transitory points (% of the test set), highlighted cell"] = (theirs, ours.get("transitory_pct"))
        pairs["transitory points (% of the test set), the paper's cell"] = (theirs, transitory.get(arch, not_run))
        for policy, pol in POLICIES.items():
            for network, net in NETWORKS.items():
                pairs[f"Table 3: {net} quantized with {pol} (%), the paper's cell"] = (
                    paper3.get(policy, {}).get(network), q3.get((arch, policy, network), not_run))
        quantities = list(pairs)
        columns[(arch, "paper")] = [_fmt(p, "Δ" in q) for q, (p, _) in pairs.items()]
        columns[(arch, "this run")] = [_fmt(o, "Δ" in q) for q, (_, o) in pairs.items()]
    return _html(pd.DataFrame(columns, index=quantities), "reference", index=True)


def _at_cell(means: Mapping, arch: str, cell: str | None, mode: str, quantity: str):
    """This run's seed mean of ``quantity`` (``fp_acc``, ``delta``) for ``arch``'s ``mode`` pair at
    ``cell``: "not run" where this run trained no such pair, None (a dash) where there is no cell."""
    if cell is None:
        return None
    row = means.get((arch, cell, mode))
    return "not run" if row is None else getattr(row, f"{quantity}_mean")


def _per_version(config: Mapping, arch: str, mode: str, show) -> str:
    """``show(pairs)`` for the pairs of ``arch`` and ``mode`` resolved at each version the grid
    trains: one text where every version gives the same, else ``version: text`` per version."""
    versions = dict.fromkeys(version for version, _ in cells(config["pairs"]).values())
    texts = {v: str(show(section_for(config, "pairs", arch, mode, v))) for v in versions}
    return next(iter(texts.values())) if len(set(texts.values())) == 1 else "; ".join(f"{v}: {t}" for v, t in texts.items())


def _objective(pairs: Mapping) -> str:
    """How the report names a pair's resolved ``pairs.objective``: its quantized term, and the spread term where on."""
    objective = pairs["objective"]
    text = OBJECTIVES[objective["loss"]].format(**objective)
    return text + SPREAD.format(**objective) if objective["spread_weight"] > 0 else text


def _hinge_beside(t1: pd.DataFrame, hinge: pd.DataFrame) -> str | None:
    """Per arch (Table 1's order) and seed, the detrimental pair with this run's objective beside the
    same pair with the hinge alone (``pairs.hinge_beside``): FP and Δ of each; None when no
    hinge-alone pair was trained."""
    if hinge.empty:
        return None
    cell = ["seed", "arch", "version", "budget"]
    recipe = t1[t1["mode"] == "detrimental"].set_index(cell)
    archs = {arch: i for i, arch in enumerate(pd.unique(t1["arch"]))}
    hinge = hinge.sort_values(["arch", "seed"], kind="stable",
                              key=lambda col: col.map(archs) if col.name == "arch" else col)
    rows = [{"arch": h.arch, "cell": cell_name(h.version, h.budget), "seed": h.seed,
             "D FP, this objective": recipe.at[(h.seed, h.arch, h.version, h.budget), "fp_acc"],
             "D Δ, this objective": recipe.at[(h.seed, h.arch, h.version, h.budget), "delta"],
             "D FP, the hinge alone": h.fp_acc, "D Δ, the hinge alone": h.delta} for h in hinge.itertuples()]
    return _html(pd.DataFrame(rows), "hinge-beside", signed=["D Δ, this objective", "D Δ, the hinge alone"])


def _recipe(config: Mapping, t1: pd.DataFrame, hinge: pd.DataFrame) -> dict:
    """Per arch and mode, the quantized objective, the epochs and the range gradient its pairs were
    trained with (``pairs.objective``, ``pairs.epochs``, ``pairs.range_grad``, resolved as the pair
    jobs resolve them, per version where they differ), the pairs not trained with the paper's
    hinge (a number beside the paper's compares like with like only under the paper's objective)
    and, where trained, those pairs with the hinge alone beside them (:func:`_hinge_beside`)."""
    rows, off_paper = [], []
    for arch in config["kd"]["archs"]:
        row = {"arch": arch}
        for mode in config["pairs"]["modes"]:
            objective = _per_version(config, arch, mode, _objective)
            row[f"{mode}: objective"] = objective
            row[f"{mode}: epochs"] = _per_version(config, arch, mode, lambda p: p["epochs"])
            row[f"{mode}: range gradient"] = _per_version(config, arch, mode, lambda p: "on" if p["range_grad"] else "off")
            if objective != OBJECTIVES["hinge"]:
                off_paper.append(f"{arch} {mode}")
        rows.append(row)
    return {"table": _html(pd.DataFrame(rows), "recipe"), "off_paper": off_paper, "beside": _hinge_beside(t1, hinge)}


def _effect_html(effect: pd.DataFrame) -> str:
    """Per arch: the cell highlighted on the means, whether it meets the effect on each seed, and
    per seed how many of the arch's cells meet it."""
    rows = []
    for arch, sub in effect.groupby("arch", sort=False):
        chosen = sub[sub["highlighted"]]
        row = {"arch": arch, "highlighted cell": chosen["cell"].iloc[0] if len(chosen) else "–"}
        for seed, of_seed in sub.groupby("seed", sort=False):
            at = chosen[chosen["seed"] == seed]
            row[f"seed {seed}: meets at the cell"] = bool(at["meets"].iloc[0]) if len(at) else None
            row[f"seed {seed}: cells meeting"] = f"{int(of_seed['meets'].sum())} of {len(of_seed)}"
        row["seeds meeting"] = f"{int(chosen['meets'].sum())} of {chosen['seed'].nunique()}"
        rows.append(row)
    return _html(pd.DataFrame(rows), "effect")


def _claims_html(effect: pd.DataFrame, t1: pd.DataFrame, t3: pd.DataFrame, scan: pd.DataFrame, thresholds: Mapping,
                 num_layers: Mapping[str, int]) -> dict[str, str]:
    """The three per-seed claim tables of the report's claims section; ``num_layers``: N per arch,
    which with Table 1's options and capacity says whether a seed's cell left the policy a choice."""
    at_cell = effect[effect["highlighted"]].drop(columns=["highlighted", "cell"])
    cross = claims.cross_policy(t3, claims.Bar(**thresholds), claims.choice_at_cells(t1, num_layers))
    # None: the claim does not apply (one allocation), which "–" would hide and "no" would misstate
    cross["collapse_needs_both"] = cross["collapse_needs_both"].map(lambda v: "not applicable" if v is None else v)
    return {"effect": _effect_html(effect),
            "effect_rows": _html(at_cell, "effect-rows", signed=["robust_delta", "detrimental_delta"]),
            "cross_policy": _html(cross, "cross-policy"),
            "depth": _html(claims.failure_depth(scan), "failure-depth")}


def _audit_html(results: Sequence[AuditResult], cells: pd.DataFrame, points: pd.DataFrame) -> dict[str, str] | None:
    """The audit section's tables: the verdicts first, then per model the simulated cells (cells.csv),
    the runtime check and the batch coupling in the runtime (coupling.csv: mean drop ± 95 % t half-width)."""
    if not results:
        return None
    verdicts = pd.DataFrame([{
        "model": r.model, "arch": r.arch, "clean acc": r.clean_acc, "tolerated drop": r.tolerated_drop,
        "simulated worst acc": r.simulated.acc, "simulated verdict": r.simulated.verdict,
        "runtime int8 acc": r.runtime.verdict.acc, "runtime verdict": r.runtime.verdict.verdict,
        "float layers": ", ".join(r.float_layers) or "none",
        "runtime acc, float layers": r.runtime.acc_float_layers,
        "batch coupling verdict": _coupling_cell(r.coupling_verdict),
        "with the range guard": _coupling_cell(r.guard and r.guard["verdict"]),
        "served alone by the guard, clean / corrupted (%)":
            f"{r.guard['served_alone_clean_pct']:.1f} / {r.guard['served_alone_corrupted_pct']:.1f}" if r.guard else "–"}
        for r in results])
    controllers = cells[cells["policy"] != "fp"]
    wide = controllers.pivot_table(index=["model", "version", "budget"], columns="policy", values="acc",
                                   aggfunc="first", sort=False)
    kept = {(r.model, c.cell): c.worst_acc_float_layers for r in results for c in r.cells}
    wide = wide.assign(**{"worst": wide.min(axis=1), "worst policy": wide.idxmin(axis=1)}).reset_index()
    wide.insert(1, "cell", [cell_name(v, b) for v, b in zip(wide["version"], wide["budget"])])
    wide["worst, float layers kept"] = [kept[(m, c)] for m, c in zip(wide["model"], wide["cell"])]
    runtime = pd.DataFrame([{"model": r.model, "top-1 agreement (%)": r.runtime.simulator.top1_agreement,
                             "median |Δlogit|": f"{r.runtime.simulator.median_abs_dlogit:.2g}",
                             "max |Δlogit|": f"{r.runtime.simulator.max_abs_dlogit:.2g}",
                             "integer emulation: median |Δlogit|": f"{r.runtime.emulation.median_abs_dlogit:.2g}"
                             if r.runtime.emulation else "–",
                             "CPU": r.cpu["cpu_model"], "VNNI": r.cpu["avx512_vnni"] or r.cpu["avx_vnni"],
                             "u8s8 may saturate": r.cpu["u8s8_may_saturate"],
                             **{f"{o['network']}_{o['cell']}": o["runtime_acc"] for o in r.runtime.others}}
                            for r in results])
    summary = coupling_drops(points, ("model", "runner", "kind", "batch_size"))
    summary["drop"] = [_pm(d, h, signed=True) for d, h in zip(summary["drop"], summary["ci95"])]
    table = summary.rename(columns={"kind": "attacker", "batch_size": "n"}).pivot_table(
        index=["model", "runner", "attacker"], columns="n", values="drop", aggfunc="first", sort=False).reset_index()
    return {"verdicts": _html(verdicts, "audit-verdicts"),
            "cells": _html(wide.drop(columns=["version", "budget"]), "audit-cells"),
            "runtime": _html(runtime, "audit-runtime"), "coupling": _html(table, "audit-coupling")}


def _coupling_cell(verdict: Mapping | None) -> str:
    """``fail: crafted at n = 8, 38.0 ± 13.9`` (the row with the largest lower end), or –."""
    if not verdict:
        return "–"
    return f"{verdict['verdict']}: {verdict['kind']} at n = {verdict['batch_size']}, {_pm(verdict['drop'], verdict['ci95'])}"


# ---------------------------------------------------------------- the page

def build(tables: Mapping, remedy, layer_scan, figures_dir, captions_dir, benchmarks_dir, config: Mapping, html_path,
          metrics_path, audits: Sequence[str | Path] = (), audit_cells: Sequence[str | Path] = (),
          audit_coupling: Sequence[str | Path] = ()) -> None:
    """Write the self-contained report page and the headline metrics JSON.

    ``tables``: paths under the keys ``table1``, ``summary``, ``table2``, ``table3``, ``effect``, ``hinge``;
    ``remedy`` and ``layer_scan``: the remedy.csv and layer_scan.csv paths (one per seed and arch);
    ``audits``, ``audit_cells``, ``audit_coupling``: the audit.json, cells.csv and coupling.csv of
    every audited model (their figures lie in ``figures_dir``);
    ``captions_dir``: the folder of the caption
    ``.rst`` files; ``config``: the merged config, shown whole (and the few values the text
    quotes). Reads every input before writing anything, so a missing one fails with its name
    and leaves no half-written report.
    """
    missing = [k for k in TABLES if k not in tables]
    if missing:
        raise KeyError(f"tables: no path for {missing}; give {', '.join(TABLES)}")
    t1, summary = read(tables["table1"], "table1"), read(tables["summary"], "summary")
    t2, t3 = read(tables["table2"], "table2"), read(tables["table3"], "table3")
    effect, scan, rem = read(tables["effect"], "effect"), read(layer_scan, "layer_scan"), read(remedy, "remedy")
    hinge = read_table(tables["hinge"])  # no rows where every pair is on the hinge
    if list(hinge.columns) != HINGE_COLUMNS:
        raise ValueError(f"{tables['hinge']}: columns {list(hinge.columns)}, expected {HINGE_COLUMNS}; re-run the tables job")
    archs, histogram_archs = list(config["kd"]["archs"]), list(config["analysis"]["histogram"]["archs"])
    floor = bit_floor(summary)
    names = figure_names(archs, histogram_archs, not floor.empty)
    images = {name: _image(Path(figures_dir), name, captions_dir) for name in names}
    captions = {name: caption(captions_dir, name) for name in ("table1", "table1_summary", "table2", "table3", "effect",
                                                               "bit_floor")}
    times = runtimes(benchmarks_dir)
    metrics = headline(summary, t2, effect)
    results = [AuditResult.read(p) for p in audits]
    if results:
        metrics["audit"] = {r.model: {"simulated_verdict": r.simulated.verdict, "runtime_verdict": r.runtime.verdict.verdict,
                                      "simulated_drop": r.simulated.drop, "runtime_drop": r.runtime.verdict.drop}
                            for r in results}
    audit_tables = _audit_html(results, pd.concat([pd.read_csv(p) for p in audit_cells]) if results else None,
                               pd.concat([pd.read_csv(p) for p in audit_coupling]) if results else None)
    audit_images = [_image(Path(figures_dir), f"audit_{r.model}", captions_dir,
                           caption(captions_dir, "audit", model=r.model)) for r in results]
    ref = paper()

    page = _PAGE.get_template("report.html.j2").render(
        config=config, config_yaml=yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True),
        paper_dataset=ref["dataset"], captions=captions, benchmarks_dir=str(benchmarks_dir),
        n_seeds=int(summary["n_seeds"].max()),
        fig1=images["fig1_table1"], figures=[images[n] for n in names if n != "fig1_table1"],
        no_histograms=[a for a in archs if a not in histogram_archs],
        reference=_reference_html(metrics, summary, t2, t3, ref), recipe=_recipe(config, t1, hinge),
        table1=_table1_html(summary),
        table1_summary=_rows_html(summary, "table1-summary", "delta_mean"),
        table1_tidy=_rows_html(t1, "table1-tidy", "delta"),
        table2=_table2_html(t2), table3=_table3_html(t3),
        bit_floor=None if floor.empty else _html(floor, "bit-floor", signed=["delta_mean"]),
        claims=_claims_html(effect, t1, t3, scan, config["evaluate"]["effect"],
                            {arch: num_quantizable_layers(arch) for arch in pd.unique(t1["arch"])}),
        audit=audit_tables, audit_images=audit_images,
        remedy=_html(rem.assign(delta=rem["q_acc"] - rem["fp_acc"]), "remedy", signed=["delta"]),
        runtimes=_html(times, "runtimes") if len(times) else None,
        versions=_html(pd.DataFrame(list(versions().items()), columns=["package", "version"]), "versions"))
    for path, text in ((Path(html_path), page), (Path(metrics_path), json.dumps(metrics, indent=2) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
