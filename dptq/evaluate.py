"""Evaluation (paper Sect. 4): accuracy at full precision and quantized with a policy's bits.

Table 1 (every pair's FP accuracy and Δ = Q - FP, the highlighted cell), Table 2 (transitory
points) and Table 3 (cross-policy) per arch, then merged over archs (docs/method.md §2.12-2.15, §7).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint, data
from .checkpoint import Pair
from .data import Data
from .policy import RandomPolicy, allocate
from .quant import DynamicQuant
from .runtime import Runtime

TABLE1_COLUMNS = ["seed", "arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
                  "highlighted", "white_box_acc"]
TABLE2_COLUMNS = ["seed", "arch", "transitory_pct"]
TABLE3_COLUMNS = ["seed", "arch", "network", "policy", "q_acc", "fp_acc"]
SUMMARY_COLUMNS = ["arch", "version", "budget", "mode", "options", "capacity", "n_seeds",
                   *(f"{c}_{s}" for c in ("fp_acc", "q_acc", "delta", "white_box_acc") for s in ("mean", "ci95")),
                   "highlighted"]


@torch.no_grad()
def predict(quant: DynamicQuant, loader, rt: Runtime, profits: str = "logits", *, policy=None,
            options: Sequence[int] | None = None, capacity: int | None = None,
            mask: Sequence[bool] | None = None, normalize=data.normalize) -> tuple[Tensor, Tensor]:
    """Predicted and true labels over ``loader`` (CPU tensors).

    Without ``policy`` the network runs at full precision; with one, every batch gets its
    bit-widths from one batched MCKP call (``profits``: the policy's profit rule) and runs
    quantized (``mask`` picks the layers). ``normalize`` maps [0, 1] images to the network's
    input (a corruption may replace it).
    """
    preds, labels = [], []
    quant.model.eval()
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    for images, target in loader:
        x = data.network_input(images, rt, normalize)
        with rt.autocast():
            if policy is None:
                logits = quant.model(x)
            else:
                bits = allocate(policy, x, options, capacity, profits)
                logits = quant(x, bits, mask)
        preds.append(logits.argmax(1).cpu())
        labels.append(target)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (preds == labels).float().mean().item()


def budget_order(levels: Mapping[str, float]) -> list[str]:
    """Budget labels from the lowest level to the highest (given order among equal levels)."""
    return sorted(levels, key=lambda label: levels[label])


def random_policy(num_layers: int, num_options: int, seed: int) -> RandomPolicy:
    """A fresh seeded random policy: every evaluation draws the same profits, whatever ran before."""
    return RandomPolicy(num_layers, num_options, seed=seed)


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
    if keyed.duplicated(["version", "budget", "mode"]).any():
        raise ValueError("table 1 has more than one row for some (version, budget, mode)")
    wide = keyed.pivot(index=["version", "budget"], columns="mode", values=["fp_acc", "delta"]).dropna()
    if wide.empty:
        raise ValueError("table 1 has no (version, budget) cell with both a robust and a detrimental pair")
    cells = pd.DataFrame({
        "objective": wide[("delta", "robust")] - wide[("delta", "detrimental")],
        "fp_gap": (wide[("fp_acc", "robust")] - wide[("fp_acc", "detrimental")]).abs(),
    }).reset_index()
    # accuracies are multiples of 100/n computed along different float paths: compare rounded values
    cells["objective"], cells["fp_gap"] = cells["objective"].round(9), cells["fp_gap"].round(9)
    cells["within_gap"] = cells["fp_gap"] <= max_fp_gap
    return cells


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


# --- Table 2 and the per-arch evaluation ---------------------------------------------------------

def transitory_pct(fp_r_correct, fp_d_correct, q_d_correct) -> float:
    """Transitory points in percent of the test set: correct for R at FP and D at FP, wrong for D quantized.

        100 · mean(fp_R ∧ fp_D ∧ ¬q_D)
    """
    flags = [torch.as_tensor(f).bool().flatten() for f in (fp_r_correct, fp_d_correct, q_d_correct)]
    if len({f.numel() for f in flags}) != 1 or flags[0].numel() == 0:
        raise ValueError(f"transitory_pct needs three non-empty per-example flags of one length, got {[f.numel() for f in flags]}")
    return 100.0 * (flags[0] & flags[1] & ~flags[2]).float().mean().item()


def evaluate_arch(seed: int, network: str | Path, pairs: Sequence[str | Path], out: Mapping[str, str | Path], *,
                  dataset: Mapping, runtime: Mapping, quant: Mapping, profits: str, batch_size: int,
                  highlight_max_fp_gap: float, random_policy_seed: int) -> None:
    """Tables 1-3 of one arch and seed into ``out["table1"]``, ``out["table2"]``, ``out["table3"]``.

    ``network`` is the distilled white-box checkpoint, ``pairs`` every pair checkpoint of the arch
    (each knows its cell; Table 1 keeps their order). Every (network, policy) combination is one
    pass over the test set; each network's full-precision predictions are computed once and reused.
    """
    rt, test = Runtime(seed, **runtime), Data(**dataset)
    loader = test.loader(test.build("test"), batch_size, rt)
    white = checkpoint.white_box(network, rt, test.image_size, quant)
    white_fp, labels = predict(white, loader, rt)
    fp, q, loaded, rows, levels = {}, {}, {}, [], {}
    arch = None
    for path in tqdm(pairs, desc="table 1", leave=False):
        pair = checkpoint.pair(path, rt, test.image_size, quant)
        cell, arch = pair.cell, pair.arch
        key = (cell["version"], cell["budget"], cell["mode"])
        levels[cell["budget"]] = cell["level"]
        loaded[key] = pair
        fp[key] = predict(pair.quant, loader, rt)[0]
        q[key] = predict(pair.quant, loader, rt, profits, policy=pair.policy, options=pair.options,
                         capacity=pair.capacity)[0]
        fp_acc, q_acc = accuracy(fp[key], labels), accuracy(q[key], labels)
        rows.append(dict(seed=seed, arch=arch, version=key[0], budget=key[1], mode=key[2],
                         options=f"{min(pair.options)}-{max(pair.options)}", capacity=pair.capacity,
                         fp_acc=fp_acc, q_acc=q_acc, delta=q_acc - fp_acc))
    table1 = pd.DataFrame(rows)
    versions = list(dict.fromkeys(table1["version"]))
    version, budget = highlight(table1, highlight_max_fp_gap, budget_order(levels), versions)
    table1["highlighted"] = (table1["version"] == version) & (table1["budget"] == budget)
    table1["white_box_acc"] = accuracy(white_fp, labels)

    r, d = (version, budget, "robust"), (version, budget, "detrimental")
    table2 = pd.DataFrame([dict(seed=seed, arch=arch, transitory_pct=transitory_pct(fp[r] == labels, fp[d] == labels,
                                                                                     q[d] == labels))])
    random = functools.partial(random_policy, seed=random_policy_seed)
    table3 = cross_policy(loader, rt, profits, labels, white, white_fp, loaded[r], loaded[d], random,
                          known=(fp, q, r, d)).assign(arch=arch)
    table3.insert(0, "seed", seed)
    for name, table, columns in (("table1", table1, TABLE1_COLUMNS), ("table2", table2, TABLE2_COLUMNS),
                                 ("table3", table3, TABLE3_COLUMNS)):
        Path(out[name]).parent.mkdir(parents=True, exist_ok=True)
        table[columns].to_csv(out[name], index=False)


def cross_policy(loader, rt: Runtime, profits: str, labels: Tensor, white: DynamicQuant, white_fp: Tensor,
                 robust: Pair, detrimental: Pair, random_policy, known: tuple) -> pd.DataFrame:
    """Table 3: networks {W, R, D} × policies {π_R, π_D, random} at the highlighted cell's budget.

    ``known`` holds Table 1's (FP, own-policy) predictions and the two pairs' keys, so the
    R-with-π_R and D-with-π_D passes are not repeated; ``random_policy(N, K)`` makes a fresh
    seeded random policy.
    """
    fp, q, r, d = known
    options, capacity = robust.options, robust.capacity
    pairs = {"robust": (robust, r), "detrimental": (detrimental, d)}
    networks = {"white_box": (white, white_fp), **{m: (pair.quant, fp[key]) for m, (pair, key) in pairs.items()}}
    rows = []
    for name, (quant, fp_preds) in tqdm(networks.items(), desc="table 3", leave=False):
        for policy_name in ("robust", "detrimental", "random"):
            if policy_name == name:
                preds = q[pairs[name][1]]
            else:
                policy = (pairs[policy_name][0].policy if policy_name in pairs
                          else random_policy(quant.num_layers, len(options)))
                preds = predict(quant, loader, rt, profits, policy=policy, options=options, capacity=capacity)[0]
            rows.append(dict(network=name, policy=policy_name, q_acc=accuracy(preds, labels),
                             fp_acc=accuracy(fp_preds, labels)))
    return pd.DataFrame(rows)


def read_table(path: str | Path) -> pd.DataFrame:
    """A table CSV with its label columns kept as text (a budget named ``1`` stays ``"1"``)."""
    return pd.read_csv(path, dtype={"version": str, "budget": str, "options": str})


def ci95(values: pd.Series) -> float:
    """Half-width of the 95 % Student-t interval of the mean: t₀.₉₇₅,ₙ₋₁ · s / √n (s the sample
    standard deviation); NaN for n = 1, where no interval exists."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))


def summarize(table1: pd.DataFrame, max_fp_gap: float, budget_levels: Mapping[str, float]) -> pd.DataFrame:
    """Per (arch, version, budget, mode): ``n_seeds``, mean and :func:`ci95` of fp_acc, q_acc, delta
    and white_box_acc over the seeds, and the highlighted cell chosen on the means (§2.13)."""
    keys = ["arch", "version", "budget", "mode", "options", "capacity"]
    grouped = table1.groupby(keys, sort=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for column in ("fp_acc", "q_acc", "delta", "white_box_acc"):
        out[f"{column}_mean"] = grouped[column].mean().to_numpy()
        out[f"{column}_ci95"] = grouped[column].agg(ci95).to_numpy()
    out["highlighted"] = False
    order = budget_order(budget_levels)
    for arch, rows in out.groupby("arch", sort=False):
        means = rows.rename(columns={"fp_acc_mean": "fp_acc", "delta_mean": "delta"})
        version, budget = highlight(means, max_fp_gap, order, list(dict.fromkeys(rows["version"])))
        out.loc[rows.index, "highlighted"] = (rows["version"] == version) & (rows["budget"] == budget)
    return out[SUMMARY_COLUMNS]


def merge_tables(table1: Sequence, table2: Sequence, table3: Sequence, out: Mapping[str, str | Path], *,
                 highlight_max_fp_gap: float, budget_levels: Mapping[str, float]) -> None:
    """Concatenate the per-(seed, arch) tables into ``out["table1"]``, ``["table2"]``, ``["table3"]``,
    and write ``out["summary"]`` (:func:`summarize`)."""
    merged = {}
    for name, paths, columns in (("table1", table1, TABLE1_COLUMNS), ("table2", table2, TABLE2_COLUMNS),
                                 ("table3", table3, TABLE3_COLUMNS)):
        tables = [read_table(p) for p in paths]
        for path, table in zip(paths, tables):
            if list(table.columns) != columns:
                raise ValueError(f"{path}: columns {list(table.columns)}, expected {columns}; "
                                 "re-run the evaluate job that writes it")
        merged[name] = pd.concat(tables, ignore_index=True)
    merged["summary"] = summarize(merged["table1"], highlight_max_fp_gap, budget_levels)
    for name, table in merged.items():
        Path(out[name]).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out[name], index=False)
