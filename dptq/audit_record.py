"""The audit's result (dptq.audit): one typed record, written once as audit.json and read back by the
report. Torch-free, so that reading it costs nothing. docs/method.md §2.21 describes every field."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_text


@dataclass
class Verdict:
    """Accuracy, its drop from the clean accuracy (points) and pass/fail against the tolerated drop."""

    acc: float
    drop: float
    verdict: str

    @classmethod
    def of(cls, acc: float, clean_acc: float, tolerated: float) -> "Verdict":
        drop = clean_acc - acc
        return cls(acc, drop, "pass" if drop <= tolerated else "fail")


@dataclass
class CellResult:
    """One audited cell: each controller's test accuracy, the worst, and the worst with the float layers kept."""

    cell: str
    acc: dict[str, float]  # controller (POLICIES) -> accuracy
    worst_acc: float
    worst_policy: str
    learned_beats_heuristics: bool  # the learned policy at or below both the random and the greedy one
    worst_acc_float_layers: float


@dataclass
class Agreement:
    """Two sets of logits of the same inputs: top-1 agreement (%) and the median and max |Δlogit|."""

    top1_agreement: float
    median_abs_dlogit: float
    max_abs_dlogit: float


@dataclass
class RuntimeResult:
    """ONNX Runtime's dynamic int8 quantization of N at batch 1 (``audit.runtime`` settings)."""

    verdict: Verdict
    acc_float_layers: float  # with the recommended float layers excluded from quantization
    like_for_like_fp_acc: float  # the exported float network, in torch
    like_for_like_sim_acc: float  # the like-for-like simulator
    simulator: Agreement  # simulator vs runtime
    emulation: Agreement | None  # integer emulation vs runtime (None: not emulable, see emulation_skipped)
    emulation_skipped: str | None
    settings: dict
    others: list[dict] = field(default_factory=list)  # the pipeline's R and D: network, cell, fp_acc, runtime_acc


@dataclass
class AuditResult:
    """Everything one audit found; audit.json is this, field by field."""

    model: str
    arch: str
    inputs: dict  # what was audited: weights (path, sha256) or checkpoint, dataset, image size, mean/std, versions
    clean_acc: float
    test_images: int
    subset_images: int
    tolerated_drop: float
    cells: list[CellResult]
    float_layers: list[str]  # torch module names, most sensitive first
    nodes_to_exclude: list[str]  # their ONNX node names, for onnxruntime's quantize_dynamic
    simulated: Verdict  # the worst case over every cell and controller
    runtime: RuntimeResult
    coupling: list[dict]  # per (runner, kind, batch_size): batches, drop, ci95 (tables.coupling_drops)
    cpu: dict
    seconds: dict[str, float]
    coupling_verdict: dict | None = None  # the runtime as served (tables.coupling_verdict); None in records before it
    guard: dict | None = None  # the range guard (coupling.RangeGuard): threshold, shares served alone, cost, verdict

    def write(self, path: str | Path) -> Path:
        return atomic_text(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, path: str | Path) -> "AuditResult":
        raw = json.loads(Path(path).read_text())
        run = raw["runtime"]
        runtime = RuntimeResult(**{**run, "verdict": Verdict(**run["verdict"]), "simulator": Agreement(**run["simulator"]),
                                   "emulation": Agreement(**run["emulation"]) if run["emulation"] else None})
        return cls(**{**raw, "cells": [CellResult(**c) for c in raw["cells"]], "simulated": Verdict(**raw["simulated"]),
                      "runtime": runtime})

    def summary(self, record: str | Path) -> str:
        """What a person reads first: every verdict with its numbers, the tolerated drop, the advice."""
        worst = min(self.cells, key=lambda c: c.worst_acc)
        lines = [f"{self.model} ({self.arch}): clean accuracy {self.clean_acc:.1f} % on {self.test_images} test images; "
                 f"a verdict fails when the drop exceeds {self.tolerated_drop:g} points",
                 f"  simulated worst case: {self.simulated.verdict.upper()}, {self.simulated.acc:.1f} % (drop "
                 f"{self.simulated.drop:.1f}; the {worst.worst_policy} controller at cell {worst.cell})",
                 f"  ONNX Runtime int8, batch 1: {self.runtime.verdict.verdict.upper()}, {self.runtime.verdict.acc:.1f} % "
                 f"(drop {self.runtime.verdict.drop:.1f})"]
        if self.coupling_verdict is not None:
            lines.append(f"  batch coupling in ONNX Runtime: {_coupling_line(self.coupling_verdict)}")
        if self.guard is not None and self.guard["verdict"] is not None:
            lines.append(f"  with the range guard (inputs over {self.guard['threshold_bits']:.1f} bits served alone: "
                         f"{self.guard['served_alone_clean_pct']:.1f} % of clean, {self.guard['served_alone_corrupted_pct']:.1f} % "
                         f"of corrupted test images): {_coupling_line(self.guard['verdict'])}")
        if self.float_layers:
            kept = min(c.worst_acc_float_layers for c in self.cells)
            lines.append(f"  advice: keep {len(self.float_layers)} layer(s) in float (quantize_dynamic's nodes_to_exclude: "
                         f"{', '.join(self.nodes_to_exclude)}): worst case {kept:.1f} %, runtime "
                         f"{self.runtime.acc_float_layers:.1f} %")
        else:
            lines.append("  advice: no layer needs to stay in float")
        lines.append(f"  record: {record}")
        return "\n".join(lines)


def _coupling_line(verdict: Mapping) -> str:
    """``FAIL: one crafted batch-mate costs the others 38.0 ± 13.9 points at batch 8 (8 batches)``."""
    return (f"{verdict['verdict'].upper()}: one {verdict['kind']} batch-mate costs the others {verdict['drop']:.1f} ± "
            f"{verdict['ci95']:.1f} points at batch {verdict['batch_size']} ({verdict['batches']} batches; the largest "
            f"mean drop {verdict['largest_drop']:.1f})")
