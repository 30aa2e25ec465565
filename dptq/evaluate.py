"""Evaluation (paper Sect. 4): accuracy at full precision and quantized with a policy's bits.

Table 1 (every pair's FP accuracy and Δ = Q - FP, the highlighted cell), Table 2 (transitory
points) and Table 3 (cross-policy) per arch, then merged over archs (SPEC §2, §7).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import budgets, checkpoint, data, runtime
from .policy import RandomPolicy, allocate
from .quant import DynamicQuant

TABLE1_COLUMNS = ["arch", "version", "budget", "mode", "options", "capacity", "fp_acc", "q_acc", "delta",
                  "highlighted", "white_box_acc"]
TABLE2_COLUMNS = ["arch", "transitory_pct"]
TABLE3_COLUMNS = ["arch", "network", "policy", "q_acc", "fp_acc"]


@torch.no_grad()
def predict(quant: DynamicQuant, loader, cfg: Mapping, dev: torch.device, *, policy=None,
            options: Sequence[int] | None = None, capacity: int | None = None,
            mask: Sequence[bool] | None = None, normalize=data.normalize) -> tuple[Tensor, Tensor]:
    """Predicted and true labels over ``loader`` (CPU tensors).

    Without ``policy`` the network runs at full precision; with one, every batch gets its
    bit-widths from one batched MCKP call and runs quantized (``mask`` picks the layers).
    ``normalize`` maps [0, 1] images to the network's input (a corruption may replace it).
    """
    preds, labels = [], []
    quant.model.eval()
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    rule = cfg["pairs"]["policy"]["profits"]
    for images, target in loader:
        x = network_input(images, cfg, dev, normalize)
        with runtime.autocast(cfg, dev):
            if policy is None:
                logits = quant.model(x)
            else:
                bits = allocate(policy, x, options, capacity, rule)
                logits = quant(x, bits, mask)
        preds.append(logits.argmax(1).cpu())
        labels.append(target)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (preds == labels).float().mean().item()


def network_input(images: Tensor, cfg: Mapping, dev: torch.device, normalize=data.normalize) -> Tensor:
    """A [0, 1] batch as the network sees it: on ``dev``, normalised, in the run's memory format."""
    return normalize(images.to(dev, non_blocking=True)).contiguous(memory_format=runtime.memory_format(cfg, dev))


# --- loading -------------------------------------------------------------------------------------

@dataclass
class Pair:
    """A trained network-policy pair, ready to run: the network behind ``quant``, its policy and cell."""

    quant: DynamicQuant
    policy: torch.nn.Module
    options: list[int]
    capacity: int


def quantizer(cfg: Mapping, model: torch.nn.Module, dev: torch.device) -> DynamicQuant:
    """``model`` on ``dev`` wrapped for quantized runs with the config's weight bits and scale rule."""
    q = cfg["quant"]
    model = runtime.to_device(model, cfg, dev).eval()
    return DynamicQuant(model, weight_bits=q["weight_bits"], scale_rule=q["activation_scale"],
                        percentile=q["percentile"], image_size=cfg["dataset"]["image_size"])


def load_white_box(cfg: Mapping, arch: str, path: str | Path, dev: torch.device) -> DynamicQuant:
    ckpt = checkpoint.load(path, kind="distill", arch=arch, recover=f"re-run the distill job for {arch}")
    return quantizer(cfg, checkpoint.network(ckpt), dev)


def load_pair(cfg: Mapping, arch: str, path: str | Path, dev: torch.device, version: str, budget: str, mode: str) -> Pair:
    """Load a pair checkpoint and check that it was trained for the cell the config describes now."""
    recover = f"re-run the pair job for {arch} {version} {budget} {mode}"
    ckpt = checkpoint.load(path, kind="pair", arch=arch, recover=recover)
    options, capacity = budgets.cell(cfg, arch, version, budget)
    cell = ckpt["cell"]
    stored = (cell["version"], cell["budget"], cell["mode"], list(cell["options"]), int(cell["capacity"]))
    if stored != (version, budget, mode, options, capacity):
        raise checkpoint.CheckpointError(
            f"{path}: trained for version {stored[0]}, budget {stored[1]}, mode {stored[2]}, options {stored[3]}, "
            f"capacity {stored[4]}, but the config gives version {version}, budget {budget}, mode {mode}, options "
            f"{options}, capacity {capacity} (pairs.versions / pairs.budgets / pairs.budget_offset changed?); {recover}")
    policy = runtime.to_device(checkpoint.policy(ckpt), cfg, dev).eval()
    return Pair(quantizer(cfg, checkpoint.network(ckpt), dev), policy, options, capacity)


def pair_path(pairs: str | Path, version: str, budget: str, mode: str) -> Path:
    """The checkpoint path of one pair from a template with ``{version}``, ``{budget}``, ``{mode}``."""
    return Path(str(pairs).format(version=version, budget=budget, mode=mode))


def budget_order(cfg: Mapping) -> list[str]:
    """Budget labels from the lowest level to the highest (config order among equal levels)."""
    levels = cfg["pairs"]["budgets"]
    return sorted(levels, key=lambda label: levels[label])


def random_policy(num_layers: int, num_options: int, cfg: Mapping) -> RandomPolicy:
    """A fresh seeded random policy: every evaluation draws the same profits, whatever ran before."""
    return RandomPolicy(num_layers, num_options, seed=cfg["evaluate"]["random_policy_seed"])


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


def evaluate_arch(cfg: Mapping, arch: str, network: str | Path, pairs: str | Path, out_dir: str | Path) -> None:
    """Tables 1-3 of one arch into ``out_dir``/table1.csv, table2.csv, table3.csv.

    ``network`` is the distilled white-box checkpoint, ``pairs`` a path template with ``{version}``,
    ``{budget}`` and ``{mode}``. Every (network, policy) combination is one pass over the test
    set; each network's full-precision predictions are computed once and reused.
    """
    dev = runtime.setup(cfg)
    loader = data.loader(data.build(cfg, "test"), cfg["evaluate"]["batch_size"], cfg)
    white = load_white_box(cfg, arch, network, dev)
    white_fp, labels = predict(white, loader, cfg, dev)
    p = cfg["pairs"]
    cells = [(v, b, m) for v in p["versions"] for b in p["budgets"] for m in p["modes"]]
    fp, q, rows = {}, {}, []
    for version, budget, mode in tqdm(cells, desc=f"{arch}: table 1", leave=False):
        pair = load_pair(cfg, arch, pair_path(pairs, version, budget, mode), dev, version, budget, mode)
        key = (version, budget, mode)
        fp[key] = predict(pair.quant, loader, cfg, dev)[0]
        q[key] = predict(pair.quant, loader, cfg, dev, policy=pair.policy, options=pair.options, capacity=pair.capacity)[0]
        fp_acc, q_acc = accuracy(fp[key], labels), accuracy(q[key], labels)
        rows.append(dict(arch=arch, version=version, budget=budget, mode=mode,
                         options=f"{min(pair.options)}-{max(pair.options)}", capacity=pair.capacity,
                         fp_acc=fp_acc, q_acc=q_acc, delta=q_acc - fp_acc))
    table1 = pd.DataFrame(rows)
    version, budget = highlight(table1, cfg["evaluate"]["highlight_max_fp_gap"], budget_order(cfg), list(p["versions"]))
    table1["highlighted"] = (table1["version"] == version) & (table1["budget"] == budget)
    table1["white_box_acc"] = accuracy(white_fp, labels)

    r, d = (version, budget, "robust"), (version, budget, "detrimental")
    table2 = pd.DataFrame([dict(arch=arch, transitory_pct=transitory_pct(fp[r] == labels, fp[d] == labels, q[d] == labels))])
    table3 = cross_policy(cfg, arch, dev, loader, labels, white, white_fp, pairs, version, budget, known=(fp, q))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table1[TABLE1_COLUMNS].to_csv(out_dir / "table1.csv", index=False)
    table2[TABLE2_COLUMNS].to_csv(out_dir / "table2.csv", index=False)
    table3[TABLE3_COLUMNS].to_csv(out_dir / "table3.csv", index=False)


def cross_policy(cfg: Mapping, arch: str, dev: torch.device, loader, labels: Tensor, white: DynamicQuant,
                 white_fp: Tensor, pairs: str | Path, version: str, budget: str, known: tuple[dict, dict]) -> pd.DataFrame:
    """Table 3: networks {W, R, D} × policies {π_R, π_D, random} at the highlighted cell's budget.

    ``known`` holds Table 1's (FP, own-policy) predictions, keyed (version, budget, mode), so the
    R-with-π_R and D-with-π_D passes are not repeated.
    """
    fp, q = known
    loaded = {mode: load_pair(cfg, arch, pair_path(pairs, version, budget, mode), dev, version, budget, mode)
              for mode in ("robust", "detrimental")}
    options, capacity = loaded["robust"].options, loaded["robust"].capacity
    networks = {"white_box": (white, white_fp), **{m: (loaded[m].quant, fp[(version, budget, m)]) for m in loaded}}
    rows = []
    for name, (quant, fp_preds) in tqdm(networks.items(), desc=f"{arch}: table 3", leave=False):
        for policy_name in ("robust", "detrimental", "random"):
            if policy_name == name:
                preds = q[(version, budget, name)]
            else:
                policy = (loaded[policy_name].policy if policy_name in loaded
                          else random_policy(quant.num_layers, len(options), cfg))
                preds = predict(quant, loader, cfg, dev, policy=policy, options=options, capacity=capacity)[0]
            rows.append(dict(arch=arch, network=name, policy=policy_name,
                             q_acc=accuracy(preds, labels), fp_acc=accuracy(fp_preds, labels)))
    return pd.DataFrame(rows)


def read_table(path: str | Path) -> pd.DataFrame:
    """A table CSV with its label columns kept as text (a budget named ``1`` stays ``"1"``)."""
    return pd.read_csv(path, dtype={"version": str, "budget": str, "options": str})


def merge_tables(arch_dirs: Sequence[str | Path], out_dir: str | Path) -> None:
    """Concatenate every arch's table1/2/3.csv into ``out_dir``/table1.csv, table2.csv, table3.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, columns in (("table1.csv", TABLE1_COLUMNS), ("table2.csv", TABLE2_COLUMNS), ("table3.csv", TABLE3_COLUMNS)):
        tables = [read_table(Path(d) / name) for d in arch_dirs]
        for d, table in zip(arch_dirs, tables):
            if list(table.columns) != columns:
                raise ValueError(f"{Path(d) / name}: columns {list(table.columns)}, expected {columns}; "
                                 "re-run the evaluate job for that arch")
        pd.concat(tables, ignore_index=True).to_csv(out_dir / name, index=False)
