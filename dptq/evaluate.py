"""Evaluation (paper Sect. 4): accuracy at full precision and quantized with a policy's bits.

The inference passes behind Table 1 (every pair's FP accuracy and Δ = Q - FP), Table 2
(transitory points) and Table 3 (cross-policy) of one seed and arch (docs/method.md §2.12-2.15);
the tables' own rules (highlight, merge, summary over seeds) are in :mod:`dptq.tables`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint, data
from .checkpoint import Pair
from .data import Data
from .policy import RandomPolicy, allocate
from .quant import DynamicQuant
from .runtime import Runtime
from .tables import HINGE_COLUMNS, TABLE1_COLUMNS, TABLE2_COLUMNS, TABLE3_COLUMNS, budget_order, highlight

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


def random_policy(num_layers: int, num_options: int, seed: int) -> RandomPolicy:
    """A fresh seeded random policy: every evaluation draws the same profits, whatever ran before."""
    return RandomPolicy(num_layers, num_options, seed=seed)


# --- Table 2 and the per-arch evaluation ---------------------------------------------------------

def transitory_pct(fp_r_correct, fp_d_correct, q_d_correct) -> float:
    """Transitory points in percent of the test set: correct for R at FP and D at FP, wrong for D quantized.

        100 · mean(fp_R ∧ fp_D ∧ ¬q_D)
    """
    flags = [torch.as_tensor(f).bool().flatten() for f in (fp_r_correct, fp_d_correct, q_d_correct)]
    if len({f.numel() for f in flags}) != 1 or flags[0].numel() == 0:
        raise ValueError(f"transitory_pct needs three non-empty per-example flags of one length, got {[f.numel() for f in flags]}")
    return 100.0 * (flags[0] & flags[1] & ~flags[2]).float().mean().item()


def _pair_accuracy(pair: Pair, loader, rt: Runtime, profits: str, labels: Tensor) -> tuple[Tensor, Tensor, dict]:
    """A pair's predictions at full precision and quantized by its own policy, and its Table 1
    columns: cell, options, capacity, fp_acc, q_acc and Δ = q_acc − fp_acc."""
    fp = predict(pair.quant, loader, rt)[0]
    q = predict(pair.quant, loader, rt, profits, policy=pair.policy, options=pair.options, capacity=pair.capacity)[0]
    fp_acc, q_acc = accuracy(fp, labels), accuracy(q, labels)
    cell = pair.cell
    return fp, q, dict(version=cell["version"], budget=cell["budget"], mode=cell["mode"],
                       options=f"{min(pair.options)}-{max(pair.options)}", capacity=pair.capacity,
                       fp_acc=fp_acc, q_acc=q_acc, delta=q_acc - fp_acc)


def evaluate_arch(seed: int, arch: str, network: str | Path, pairs: Sequence[str | Path], out: Mapping[str, str | Path], *,
                  dataset: Mapping, runtime: Mapping, quant: Mapping, profits: str, batch_size: int,
                  highlight_max_fp_gap: float, random_policy_seed: int, paper_cell: str | None = None,
                  hinge_pairs: Sequence[str | Path] = ()) -> None:
    """Tables 1-3 of one arch and seed into ``out["table1"]``, ``out["table2"]``, ``out["table3"]``, and
    the detrimental pairs trained with the hinge alone (``hinge_pairs``, ``pairs.hinge_beside``) into
    ``out["hinge"]`` (Table 1's columns for them; no rows when there are none).

    ``network`` is the distilled white-box checkpoint, ``pairs`` every pair checkpoint of the arch
    (each knows its cell; Table 1 keeps their order); all must be ``arch``'s. Every (network, policy) combination is one
    pass over the test set; each network's full-precision predictions are computed once and reused. Table 1 holds one
    pair in memory at a time. Tables 2 and 3 are computed at the seed's highlighted cell and at
    ``paper_cell`` (the paper's highlighted cell, ``"II-B"``; None or not trained here: skipped),
    loading those cells' two pairs again.
    """
    rt, test = Runtime(seed, **runtime), Data(**dataset)
    loader = test.loader(test.build("test"), batch_size, rt)
    white = checkpoint.white_box(network, rt, test.image_size, quant, arch)
    white_fp, labels = predict(white, loader, rt)
    fp, q, paths, rows, levels = {}, {}, {}, [], {}
    for path in tqdm(pairs, desc=f"{arch}: table 1", leave=False):
        pair = checkpoint.pair(path, rt, test.image_size, quant, arch)
        key = (pair.cell["version"], pair.cell["budget"], pair.cell["mode"])
        levels[pair.cell["budget"]] = pair.cell["level"]
        paths[key] = path
        fp[key], q[key], row = _pair_accuracy(pair, loader, rt, profits, labels)
        rows.append(dict(seed=seed, arch=arch, **row))
    table1 = pd.DataFrame(rows)
    hinge = [dict(seed=seed, arch=arch, **_pair_accuracy(checkpoint.pair(path, rt, test.image_size, quant, arch),
                                                         loader, rt, profits, labels)[2])
             for path in hinge_pairs]
    versions = list(dict.fromkeys(table1["version"]))
    version, budget = highlight(table1, highlight_max_fp_gap, budget_order(levels), versions)
    table1["highlighted"] = (table1["version"] == version) & (table1["budget"] == budget)
    table1["white_box_acc"] = accuracy(white_fp, labels)

    random = functools.partial(random_policy, seed=random_policy_seed)
    paper = tuple(paper_cell.partition("-")[::2]) if paper_cell else None
    table2, table3 = [], []
    for cell in dict.fromkeys([(version, budget), paper]):
        if cell is None or (*cell, "detrimental") not in paths or (*cell, "robust") not in paths:
            continue
        at = dict(seed=seed, arch=arch, version=cell[0], budget=cell[1], highlighted=cell == (version, budget),
                  paper_cell=cell == paper)
        r, d = (*cell, "robust"), (*cell, "detrimental")
        table2.append(dict(at, transitory_pct=transitory_pct(fp[r] == labels, fp[d] == labels, q[d] == labels)))
        robust, detrimental = (checkpoint.pair(paths[key], rt, test.image_size, quant, arch) for key in (r, d))
        table3.append(cross_policy(loader, rt, profits, labels, white, white_fp, robust, detrimental, random,
                                   known=(fp, q, r, d)).assign(**at))
    table2, table3 = pd.DataFrame(table2), pd.concat(table3, ignore_index=True)
    for name, table, columns in (("table1", table1, TABLE1_COLUMNS), ("table2", table2, TABLE2_COLUMNS),
                                 ("table3", table3, TABLE3_COLUMNS), ("hinge", pd.DataFrame(hinge, columns=HINGE_COLUMNS),
                                                                     HINGE_COLUMNS)):
        Path(out[name]).parent.mkdir(parents=True, exist_ok=True)
        table[columns].to_csv(out[name], index=False)


def cross_policy(loader, rt: Runtime, profits: str, labels: Tensor, white: DynamicQuant, white_fp: Tensor,
                 robust: Pair, detrimental: Pair, random_policy, known: tuple) -> pd.DataFrame:
    """Table 3: networks {W, R, D} × policies {π_R, π_D, random} at the two pairs' cell.

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
