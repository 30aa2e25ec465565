"""Tables 1-3 as data (docs/method.md §2.13, §7, §8): their columns, the highlight rule, the merge
over seeds and archs, the summary over seeds with its Student-t interval, and the paper's own
numbers (``dptq/paper.yaml``).

Pure pandas (no torch), so that the merge job and the figures and report read and summarise
tables without loading a network library.
"""
from __future__ import annotations

import importlib.resources
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import yaml

from . import claims

TABLE1_COLUMNS = ["seed", "arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
                  "highlighted", "white_box_acc"]
# Tables 2 and 3 at each seed's own highlighted cell and at the paper's (docs/method.md §2.14-2.15)
AT_CELL = ["seed", "arch", "version", "budget", "highlighted", "paper_cell"]
TABLE2_COLUMNS = [*AT_CELL, "transitory_pct"]
TABLE3_COLUMNS = [*AT_CELL, "network", "policy", "q_acc", "fp_acc"]
# the detrimental pairs trained with the paper's hinge alone beside an off-hinge one (pairs.hinge_beside)
HINGE_COLUMNS = ["seed", "arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta"]
SUMMARY_COLUMNS = ["arch", "version", "budget", "mode", "options", "capacity", "n_seeds",
                   *(f"{c}_{s}" for c in ("fp_acc", "q_acc", "delta", "white_box_acc") for s in ("mean", "ci95")),
                   "seeds_meeting_effect", "highlighted"]

BIT_FLOOR_COLUMNS = ["arch", "bits", "version", "budget", "mode", "n_seeds", "fp_acc_mean", "fp_acc_ci95", "q_acc_mean",
                     "q_acc_ci95", "delta_mean", "delta_ci95", "white_box_acc_mean", "seeds_meeting_effect"]


# Label columns stay text: a budget named ``1`` or a single flagged layer ``7`` is a name, not a number.
LABELS = ("arch", "version", "budget", "mode", "options", "network", "policy", "split", "scan", "precision",
          "corruption", "setting", "scale_rule", "flagged_layers")


def read_table(path: str | Path) -> pd.DataFrame:
    """A tidy CSV with its label columns (:data:`LABELS`) kept as text."""
    return pd.read_csv(path, dtype=dict.fromkeys(LABELS, str))


def paper() -> dict:
    """The paper's reference numbers (``dptq/paper.yaml``)."""
    return yaml.safe_load(importlib.resources.files("dptq").joinpath("paper.yaml").read_text(encoding="utf-8"))


def paper_cell(arch: str) -> str | None:
    """The cell the paper highlights for ``arch`` (e.g. ``II-B``); None for an arch it did not train."""
    return paper()["highlighted"].get(arch, {}).get("cell")


def budget_order(levels: Mapping[str, float]) -> list[str]:
    """Budget labels from the lowest level to the highest (given order among equal levels)."""
    return sorted(levels, key=lambda label: levels[label])


# --- Table 1: the highlight rule -----------------------------------------------------------------

def _ranks(labels: Sequence, order: Sequence | None) -> dict[str, int]:
    """Rank of each label: its index in ``order`` (if given), else its place in sorted order."""
    labels = sorted({str(x) for x in labels})
    order = [str(x) for x in order] if order is not None else labels
    missing = sorted(set(labels) - set(order))
    if missing:
        raise ValueError(f"labels {missing} are missing from the given order {order}")
    return {label: order.index(label) for label in labels}


def cell_summary(table1: pd.DataFrame, max_fp_gap: float) -> pd.DataFrame:
    """One row per (version, budget) cell that has both a robust and a detrimental pair:

        objective = Δ_R - Δ_D,   fp_gap = |FP_R - FP_D|,   within_gap = fp_gap <= max_fp_gap.
    """
    if table1["arch"].nunique() > 1:
        raise ValueError(f"highlight works on one arch's rows; got archs {sorted(table1['arch'].unique())}")
    if not {"robust", "detrimental"} <= set(table1["mode"]):
        raise ValueError(f"table 1 needs robust and detrimental pairs to pick a cell; it has modes "
                         f"{sorted(table1['mode'].unique())} (pairs.modes must list both)")
    keyed = table1.assign(version=table1["version"].astype(str), budget=table1["budget"].astype(str))
    wide = claims.by_mode(keyed, ["version", "budget"])
    if wide.empty:
        raise ValueError("table 1 has no (version, budget) cell with both a robust and a detrimental pair")
    # accuracies are multiples of 100/n computed along different float paths: compare rounded values
    cells = wide[["version", "budget", "fp_gap"]].assign(
        objective=(wide["robust_delta"] - wide["detrimental_delta"]).round(9))
    cells["within_gap"] = cells["fp_gap"] <= max_fp_gap
    return cells[["version", "budget", "objective", "fp_gap", "within_gap"]]


def highlight(table1: pd.DataFrame, max_fp_gap: float, budget_order: Sequence | None = None,
              version_order: Sequence | None = None) -> tuple[str, str]:
    """The highlighted (version, budget) cell of one arch's Table 1.

    Among the cells with |FP_R - FP_D| <= ``max_fp_gap``: the largest Δ_R - Δ_D; ties go to the
    lower budget, then the earlier version (``budget_order`` / ``version_order``, by default the
    sorted labels). When no cell meets the gap, the cell with the smallest gap is taken instead
    (ties: larger Δ_R - Δ_D, lower budget, earlier version) and a ``UserWarning`` says so.
    """
    cells = cell_summary(table1, max_fp_gap)
    cells["budget_rank"] = cells["budget"].map(_ranks(cells["budget"], budget_order))
    cells["version_rank"] = cells["version"].map(_ranks(cells["version"], version_order))
    feasible = cells[cells["within_gap"]]
    if feasible.empty:
        best = cells.sort_values(["fp_gap", "objective", "budget_rank", "version_rank"],
                                 ascending=[True, False, True, True]).iloc[0]
        warnings.warn(f"{table1['arch'].iloc[0]}: no cell has |FP_R - FP_D| <= {max_fp_gap} "
                      f"(evaluate.highlight_max_fp_gap); highlighting the cell with the smallest gap instead: "
                      f"{best['version']}-{best['budget']} with a gap of {best['fp_gap']:.2f} points", stacklevel=2)
    else:
        best = feasible.sort_values(["objective", "budget_rank", "version_rank"], ascending=[False, True, True]).iloc[0]
    return str(best["version"]), str(best["budget"])


def ci95(values: pd.Series, level: float = 0.95) -> float:
    """Half-width of the Student-t interval of the mean: t_{(1+level)/2, n-1} · s / √n (s the sample
    standard deviation); NaN for n = 1, where no interval exists. With a handful of seeds a
    bootstrap interval would be far too narrow (3 seeds give 10 resamples)."""
    from scipy import stats  # 1 s of import that only the tables job, of all that import this module, needs

    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def coupling_drops(points: pd.DataFrame, by: Sequence[str] = ("kind", "batch_size")) -> pd.DataFrame:
    """Batch coupling's tidy rows (dptq.coupling.curves) per ``by``: batches, the mean drop =
    clean_acc - mates_acc (points) and ci95, its t half-width over the batches."""
    drops = points.assign(drop=points.clean_acc - points.mates_acc).groupby(list(by), sort=False)["drop"]
    return drops.agg(batches="size", drop="mean", ci95=ci95).reset_index()


def coupling_verdict(drops: Sequence[Mapping], runner: str, tolerated_drop: float) -> dict | None:
    """The batch-coupling verdict of ``runner`` from :func:`coupling_drops`' rows: fail when the lower
    end of some (kind, batch size)'s 95 % interval, drop - ci95, exceeds ``tolerated_drop``: the
    coupling is then shown, not merely possible. The row with the largest lower end is reported
    (``batches``: how many batches its interval rests on). The control rows (kind ``none``: a clean
    batch-mate) are no attack and not judged. None where ``runner`` has no attacker's rows."""
    rows = [r for r in drops if r["runner"] == runner and r["kind"] != "none"]
    if not rows:
        return None
    lower = lambda r: r["drop"] - (0.0 if math.isnan(r["ci95"]) else r["ci95"])  # noqa: E731
    worst = max(rows, key=lower)
    return {"verdict": "fail" if lower(worst) > tolerated_drop else "pass", "runner": runner, "kind": worst["kind"],
            "batch_size": int(worst["batch_size"]), "batches": int(worst["batches"]), "drop": float(worst["drop"]),
            "ci95": float(worst["ci95"]), "lower": float(lower(worst)), "largest_drop": max(float(r["drop"]) for r in rows)}


def summarize(table1: pd.DataFrame, max_fp_gap: float, budget_levels: Mapping[str, float],
              effect: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, version, budget, mode): ``n_seeds``, mean and :func:`ci95` of fp_acc, q_acc, delta
    and white_box_acc over the seeds, how many seeds' cells meet the effect (``effect``:
    :func:`dptq.claims.effect`), and the highlighted cell chosen on the means (§2.13)."""
    keys = ["arch", "version", "budget", "mode", "options", "capacity"]
    grouped = table1.groupby(keys, sort=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for column in ("fp_acc", "q_acc", "delta", "white_box_acc"):
        out[f"{column}_mean"] = grouped[column].mean().to_numpy()
        out[f"{column}_ci95"] = grouped[column].agg(ci95).to_numpy()
    meeting = effect.groupby(["arch", "version", "budget"])["meets"].sum()
    out["seeds_meeting_effect"] = [int(meeting.get((a, v, b), 0)) for a, v, b in
                                   zip(out["arch"], out["version"], out["budget"])]
    out["highlighted"] = False
    order = budget_order(budget_levels)
    for arch, rows in out.groupby("arch", sort=False):
        means = rows.rename(columns={"fp_acc_mean": "fp_acc", "delta_mean": "delta"})
        version, budget = highlight(means, max_fp_gap, order, list(dict.fromkeys(rows["version"])))
        out.loc[rows.index, "highlighted"] = (rows["version"] == version) & (rows["budget"] == budget)
    return out[SUMMARY_COLUMNS]


def bit_floor(summary: pd.DataFrame) -> pd.DataFrame:
    """The bit floor (docs/method.md §2.23): the summary's cells whose version has one option b, so
    every layer gets b bits and the policy has no choice; ``bits`` = b. Empty (columns only) for a
    config without such a version."""
    low_high = summary["options"].astype(str).str.split("-", expand=True)
    single = low_high[0] == low_high[low_high.columns[-1]]
    return summary[single].assign(bits=low_high.loc[single, 0].astype(int))[BIT_FLOOR_COLUMNS].reset_index(drop=True)


def merge_tables(table1: Sequence, table2: Sequence, table3: Sequence, hinge: Sequence, out: Mapping[str, str | Path], *,
                 highlight_max_fp_gap: float, budget_levels: Mapping[str, float], effect: Mapping) -> None:
    """Concatenate the per-(seed, arch) tables into ``out["table1"]``, ``["table2"]``, ``["table3"]``,
    ``["hinge"]`` (the hinge-alone pairs, ``pairs.hinge_beside``);
    write ``out["effect"]`` (:func:`dptq.claims.effect` with the thresholds ``effect``, the cell
    highlighted on the means marked), ``out["summary"]`` (:func:`summarize`) and
    ``out["bit_floor"]`` (:func:`bit_floor`)."""
    merged = {}
    for name, paths, columns in (("table1", table1, TABLE1_COLUMNS), ("table2", table2, TABLE2_COLUMNS),
                                 ("table3", table3, TABLE3_COLUMNS), ("hinge", hinge, HINGE_COLUMNS)):
        tables = [read_table(p) for p in paths]
        for path, table in zip(paths, tables):
            if list(table.columns) != columns:
                raise ValueError(f"{path}: columns {list(table.columns)}, expected {columns}; "
                                 "re-run the evaluate job that writes it")
        merged[name] = pd.concat(tables, ignore_index=True)
    cells = claims.effect(merged["table1"], claims.Bar(**effect))
    merged["summary"] = summarize(merged["table1"], highlight_max_fp_gap, budget_levels, cells)
    chosen = merged["summary"].loc[merged["summary"]["highlighted"], ["arch", "version", "budget"]].drop_duplicates()
    cells["highlighted"] = pd.MultiIndex.from_frame(cells[["arch", "version", "budget"]]).isin(
        pd.MultiIndex.from_frame(chosen))
    merged["effect"] = cells
    merged["bit_floor"] = bit_floor(merged["summary"])
    for name, table in merged.items():
        Path(out[name]).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out[name], index=False)
