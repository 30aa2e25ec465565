"""The paper's claims, checked on every seed (docs/method.md §2.20): the effect itself (Table 1),
that the collapse needs the detrimental network together with its own policy (Table 3), and where
in depth the failure sits (Fig. 2's single-layer scan).

Thresholds come from the config's ``evaluate.effect``; accuracies are in percent, Δ in points.
Pure pandas, like :mod:`dptq.tables`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

EFFECT_COLUMNS = ["seed", "arch", "version", "budget", "white_box_acc", "robust_fp_acc", "robust_delta",
                  "detrimental_fp_acc", "detrimental_delta", "fp_gap", "meets", "highlighted"]
CROSS_POLICY_COLUMNS = ["seed", "arch", "version", "budget", "highlighted", "paper_cell", "d_own", "d_with_robust_policy",
                        "d_with_random_policy", "w_fp", "w_with_d_policy", "r_fp", "r_with_d_policy", "policy_has_choice",
                        "collapse_needs_both", "others_hold"]
DEPTH_COLUMNS = ["seed", "arch", "rank", "layer", "relative_depth", "d_acc", "r_acc"]


@dataclass(frozen=True)
class Bar:
    """The effect's thresholds (the config's ``evaluate.effect``), in points."""
    min_detrimental_drop: float
    max_robust_drop: float
    max_fp_gap: float
    max_white_box_gap: float
    min_white_box_acc: float
    max_cross_policy_drop: float


def _r9(series: pd.Series) -> pd.Series:
    # accuracies are multiples of 100/n computed along different float paths: compare rounded values
    return series.round(9)


def by_mode(table1: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per ``keys`` cell that has both a robust and a detrimental pair: ``robust_fp_acc``,
    ``robust_delta``, ``detrimental_fp_acc``, ``detrimental_delta`` and ``fp_gap`` = |FP_R − FP_D|
    (rounded to nine decimals), ``keys`` as columns, in the table's order."""
    if table1.duplicated([*keys, "mode"]).any():
        raise ValueError(f"table 1 has more than one row for some ({', '.join(keys)}, mode)")
    wide = table1.pivot(index=keys, columns="mode", values=["fp_acc", "delta"])
    wide = wide.reindex(pd.MultiIndex.from_frame(table1[keys]).unique()).dropna()
    out = pd.DataFrame({f"{mode}_{value}": wide[(value, mode)] for mode in ("robust", "detrimental")
                        for value in ("fp_acc", "delta")}).reset_index()
    out["fp_gap"] = _r9((out["robust_fp_acc"] - out["detrimental_fp_acc"]).abs())
    return out


def effect(table1: pd.DataFrame, bar: Bar) -> pd.DataFrame:
    """Per (seed, arch, version, budget) with both modes, whether the cell shows the effect:

        Δ_D ≤ −min_detrimental_drop,  Δ_R ≥ −max_robust_drop,  |FP_R − FP_D| ≤ max_fp_gap,
        |FP_R − W| ≤ max_white_box_gap and |FP_D − W| ≤ max_white_box_gap,  W ≥ min_white_box_acc.

    ``highlighted`` is False here; :func:`dptq.tables.merge_tables` marks the cell chosen on the means.
    """
    keys = ["seed", "arch", "version", "budget"]
    out = by_mode(table1, keys)
    white = table1.groupby(keys, sort=False)["white_box_acc"].first()
    out["white_box_acc"] = white.reindex(pd.MultiIndex.from_frame(out[keys])).to_numpy()
    w = _r9(out["white_box_acc"])
    out["meets"] = ((_r9(out["detrimental_delta"]) <= -bar.min_detrimental_drop)
                    & (_r9(out["robust_delta"]) >= -bar.max_robust_drop)
                    & (out["fp_gap"] <= bar.max_fp_gap)
                    & (_r9((out["robust_fp_acc"] - out["white_box_acc"]).abs()) <= bar.max_white_box_gap)
                    & (_r9((out["detrimental_fp_acc"] - out["white_box_acc"]).abs()) <= bar.max_white_box_gap)
                    & (w >= bar.min_white_box_acc))
    out["highlighted"] = False
    return out[EFFECT_COLUMNS]


def policy_has_choice(options: str, capacity: int, num_layers: int) -> bool:
    """Whether a cell's knapsack (docs/method.md §2.6, §2.8) leaves the policy a choice: more than one
    allocation of ``num_layers`` layers, each taking one of ``options`` (Table 1's ``"low-high"``),
    sums to ``capacity``.

    Exactly one does when every layer must take the same option: the options are all equal
    (the bit floor, §2.23), or C = N·low (every layer at its lowest, as at §2.6's III-A) or C = N·high.
    Any C strictly between puts two layers on different options, which can swap.
    """
    low, high = (int(bits) for bits in str(options).split("-"))
    return low != high and num_layers * low < capacity < num_layers * high


def choice_at_cells(table1: pd.DataFrame, num_layers: Mapping[str, int]) -> dict[tuple, bool]:
    """Per (seed, arch, version, budget) of Table 1, :func:`policy_has_choice` from the cell's options
    and capacity and the arch's N (``num_layers``)."""
    cells = table1.drop_duplicates(["seed", "arch", "version", "budget"])
    return {(row.seed, row.arch, row.version, row.budget): policy_has_choice(row.options, row.capacity, num_layers[row.arch])
            for row in cells.itertuples()}


def cross_policy(table3: pd.DataFrame, bar: Bar, choice: Mapping[tuple, bool]) -> pd.DataFrame:
    """Per (seed, arch) and each cell Table 3 was computed at (the seed's highlighted cell, the
    paper's), Table 3's two claims there:

    - the collapse needs both D and π_D: Q(D, π_D) ≤ Q(D, π_R) − min_detrimental_drop and
      Q(D, π_D) ≤ Q(D, random) − min_detrimental_drop. Where the cell leaves the policy no choice
      (``choice``: :func:`choice_at_cells`; ``policy_has_choice`` False) all three policies
      give the one allocation, so the claim is not applicable: None, not a miss;
    - π_D alone does not break the other networks: |Q(W, π_D) − FP(W)| ≤ max_cross_policy_drop and
      |Q(R, π_D) − FP(R)| ≤ max_cross_policy_drop.
    """
    rows = []
    for (seed, arch, version, budget), sub in table3.groupby(["seed", "arch", "version", "budget"], sort=False):
        q = sub.set_index(["network", "policy"])["q_acc"]
        fp = sub.groupby("network")["fp_acc"].first()
        row = dict(seed=seed, arch=arch, version=version, budget=budget, highlighted=bool(sub["highlighted"].iloc[0]),
                   paper_cell=bool(sub["paper_cell"].iloc[0]), d_own=q[("detrimental", "detrimental")],
                   d_with_robust_policy=q[("detrimental", "robust")], d_with_random_policy=q[("detrimental", "random")],
                   w_fp=fp["white_box"], w_with_d_policy=q[("white_box", "detrimental")],
                   r_fp=fp["robust"], r_with_d_policy=q[("robust", "detrimental")],
                   policy_has_choice=choice[(seed, arch, version, budget)])
        others = min(row["d_with_robust_policy"], row["d_with_random_policy"])
        row["collapse_needs_both"] = (bool(round(row["d_own"] + bar.min_detrimental_drop, 9) <= round(others, 9))
                                      if row["policy_has_choice"] else None)
        row["others_hold"] = bool(round(abs(row["w_with_d_policy"] - row["w_fp"]), 9) <= bar.max_cross_policy_drop
                                  and round(abs(row["r_with_d_policy"] - row["r_fp"]), 9) <= bar.max_cross_policy_drop)
        rows.append(row)
    return pd.DataFrame(rows, columns=CROSS_POLICY_COLUMNS)


def failure_depth(layer_scan: pd.DataFrame, top: int = 3, split: str = "test") -> pd.DataFrame:
    """Per (seed, arch), the ``top`` layers whose quantization alone costs D the most (the lowest
    accuracy in the single-layer scan on ``split``; ties: the earlier layer), with R's accuracy when
    the same layer alone is quantized."""
    single = layer_scan[(layer_scan["scan"] == "single") & (layer_scan["split"] == split)]
    rows = []
    for (seed, arch), sub in single.groupby(["seed", "arch"], sort=False):
        d = sub[sub["network"] == "detrimental"].sort_values(["acc", "layer"], kind="stable").head(top)
        r = sub[sub["network"] == "robust"].set_index("layer")["acc"]
        rows += [dict(seed=seed, arch=arch, rank=rank, layer=int(x.layer), relative_depth=x.relative_depth,
                      d_acc=x.acc, r_acc=r.get(x.layer, float("nan"))) for rank, x in enumerate(d.itertuples(), 1)]
    return pd.DataFrame(rows, columns=DEPTH_COLUMNS)
