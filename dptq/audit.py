"""Deployment audit (SPEC §8; beyond the paper): the worst a per-example bit controller can do to a
given, already trained network, and whether the failure happens in a real int8 runtime.

For one network N (a timm arch and its weights, or one of the pipeline's own) on the dataset:

- **sensitivity**: each quantizable layer alone at the lowest option of the audited cells, the
  rest at full precision (the seeded subset of the analyses);
- **worst case per cell** (version × budget of the grid, same options, budget and exact MCKP):
  full precision; the *uniform* allocation (every layer the budget's mean bits, rounded so that
  the sum is exact); a seeded *random* policy; the *greedy* rule (the lowest bits to the layers
  the sensitivity scan finds most fragile: static profits P[l, k] ∝ −r_l · o_k with r_l the
  layer's fragility rank, whose exact MCKP answer gives the most fragile layers the lowest
  options and the rest the highest, the budget met exactly); and a *learned* detrimental policy
  trained against the frozen N (:class:`dptq.train.FrozenPolicyStage`). The worst case is the
  lowest of them;
- **recommendation**: the fewest most-sensitive layers (up to ``max_float_layers``) whose being
  kept in float brings every cell's worst case within ``tolerated_drop`` of FP on the subset
  (each policy's allocations as they are, those layers' inputs left unquantized), then measured
  on the test set,
  with their ONNX node names (onnxruntime's ``nodes_to_exclude``);
- **real runtime** (:mod:`dptq.deploy`): ONNX Runtime's dynamic int8 quantization, checked like
  for like against the simulator, and N's (and the pipeline's R and D networks') accuracy
  through it, with and without the recommended float layers;
- **batch coupling** (:mod:`dptq.coupling`): what one batch-mate costs the others in the runtime;
- **verdicts**: pass when the drop from FP is at most ``tolerated_drop``, for the simulated
  worst case (3-8-bit activations: what a lower-bit or adaptive runtime would face) and for the
  runtime of today (8-bit activations).

The first quantizable layer reads the raw image and is never quantized, in the simulator and in
the runtime alike (its ONNX node is always excluded).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from . import analysis, budgets, checkpoint, coupling, data, deploy, evaluate, models, train
from .corruptions import corrupt
from .data import Data
from .policy import allocate, even_profits
from .runtime import Runtime

CELL_COLUMNS = ["model", "version", "budget", "policy", "network", "acc", "fp_acc", "drop"]
SENSITIVITY_COLUMNS = ["model", "layer", "module", "onnx_node", "bits", "acc", "drop", "rank", "keep_float"]
POLICIES = ("uniform", "random", "greedy", "learned")
AUDIT_KEYS = ("cells", "tolerated_drop", "max_float_layers", "policy", "runtime", "coupling")  # one model's settings


class Restricted(nn.Module):
    """N's logits at the dataset's classes only: column c is the model's class ``index[c]`` (a
    class mapping, for a model whose classes are not the dataset's)."""

    def __init__(self, model: nn.Module, index: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).index_select(1, self.index)


def class_index(class_map: Mapping[str, int] | Sequence[int] | None, classes: Sequence[str], where: str) -> list[int] | None:
    """The model's class index of every dataset class (``None``: the same classes, in order).

    ``class_map`` maps a dataset class name to the model's index, or lists the indices in the
    dataset's class order."""
    if class_map is None:
        return None
    if isinstance(class_map, Mapping):
        missing = [c for c in classes if c not in class_map]
        if missing:
            raise ValueError(f"{where}.class_map: no model class for dataset class(es) {missing[:5]}; "
                             f"map every one of the dataset's {len(classes)} classes")
        return [int(class_map[c]) for c in classes]
    if len(class_map) != len(classes):
        raise ValueError(f"{where}.class_map: lists {len(class_map)} indices for the dataset's {len(classes)} classes")
    return [int(i) for i in class_map]


def subject(spec: Mapping, classes: Sequence[str], where: str) -> nn.Module:
    """The network to audit, in eval mode: ``spec`` is a model entry of ``audit.models`` (``arch``,
    ``weights``, ``num_classes``, ``class_map``) or, for the pipeline's own, a checkpoint path."""
    if "checkpoint" in spec:
        return checkpoint.network(checkpoint.load(spec["checkpoint"], kind="distill", arch=spec["arch"],
                                                  recover=f"re-run the distillation of {spec['arch']}"))
    index = class_index(spec.get("class_map"), classes, where)
    num_classes = spec.get("num_classes") or len(classes)
    model = models.trained(spec["arch"], num_classes, spec["weights"], key=f"{where}.weights")
    if index is None and num_classes != len(classes):
        raise ValueError(f"{where}: the model has {num_classes} classes, the dataset {len(classes)}; "
                         f"give a class_map from dataset classes to the model's")
    return model if index is None else Restricted(model, index).eval()


class StaticPolicy:
    """The same profits ``[N, K]`` for every image (the uniform and greedy allocations)."""

    def __init__(self, profits: Tensor):
        self.profits = profits

    def __call__(self, images: Tensor) -> Tensor:
        return self.profits.to(images.device).expand(images.shape[0], -1, -1)


def greedy_profits(drops: Sequence[float], options: Sequence[int]) -> Tensor:
    """P[l, k] = −(r_l / N) · (o_k / max o), r_l = 1 + the number of layers less fragile than l
    (ties: the later layer counts as more fragile, so the ranks are distinct and the answer
    unique). A positive scale leaves the MCKP's answer as it is; this one keeps |P| ≤ 1, so a
    policy that starts here (``audit.policy.start: greedy``) can learn away from it."""
    order = sorted(range(len(drops)), key=lambda l: (drops[l], l))
    rank = torch.empty(len(drops))
    rank[torch.tensor(order)] = torch.arange(1, len(drops) + 1, dtype=torch.float32) / len(drops)
    opts = torch.as_tensor(list(options), dtype=torch.float32)
    return -rank[:, None] * (opts / opts.max())[None, :]


def fragility_order(drops: Sequence[float]) -> list[int]:
    """Layers (0-based), most fragile first (ties: the later layer first, as in :func:`greedy_profits`)."""
    return sorted(range(len(drops)), key=lambda l: (-drops[l], -l))


def sensitivity(job: analysis.Job, quant, loader, bits: int, normalize) -> list[float]:
    """Accuracy with layer l alone quantized at ``bits`` (the rest FP), for every l, on ``loader``."""
    n = quant.num_layers
    masks = [analysis.scan_masks(n, "single", layer) for layer in range(1, n + 1)]

    def run(x: Tensor) -> Tensor:
        b = torch.full((x.shape[0], n), float(bits), device=x.device)
        return torch.stack([quant(x, b, mask).argmax(1) for mask in masks])

    return analysis.accuracies(loader, job, run, desc="sensitivity", normalize=normalize).tolist()


def masked_accuracies(job: analysis.Job, quant, loader, policies: Mapping[str, tuple], masks: Sequence[Sequence[bool]],
                      normalize) -> dict[str, list[float]]:
    """Accuracy of every (policy, mask) on ``loader``; each policy's bits computed once per batch.
    ``policies``: name → (policy, options, capacity, profit rule)."""

    def run(x: Tensor) -> Tensor:
        preds = []
        for policy, options, capacity, rule in policies.values():
            b = allocate(policy, x, options, capacity, rule)
            preds += [quant(x, b, mask).argmax(1) for mask in masks]
        return torch.stack(preds)

    acc = analysis.accuracies(loader, job, run, desc="float layers", normalize=normalize).tolist()
    return {name: acc[i * len(masks):(i + 1) * len(masks)] for i, name in enumerate(policies)}


def recommend(fp_acc: float, acc_by_k: Mapping[str, Sequence[float]], tolerated: float) -> int:
    """The fewest layers k (the k most sensitive) kept in float such that every policy's accuracy with
    them kept is within ``tolerated`` of FP; the largest k tried when none is."""
    tried = len(next(iter(acc_by_k.values())))
    for k in range(tried):
        if all(fp_acc - acc[k] <= tolerated for acc in acc_by_k.values()):
            return k
    return tried - 1


@contextlib.contextmanager
def _timed(record: dict, part: str):
    """Adds ``seconds_{part}``, the wall time of the block, to ``record``."""
    start = time.perf_counter()
    yield
    record[f"seconds_{part}"] = round(time.perf_counter() - start, 2)


def audit_model(name: str, spec: Mapping, out_dir: str | Path, figure: str | Path, *, seed: int, dataset: Mapping,
                runtime: Mapping, quant: Mapping, pairs: Mapping, audit: Mapping, max_examples: int, batch_size: int,
                random_policy_seed: int, corruptions: Mapping, others: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Audit network ``name`` (``spec``: see :func:`subject`) and write ``out_dir``/audit.json with
    cells.csv, sensitivity.csv, coupling.csv beside it and the figure ``figure``.

    ``pairs``: the grid (``versions``, ``budgets``, ``budget_offset``, ``policy``); ``audit``: the
    audit section; ``others``: for the pipeline's networks, network name (R, D) → cell → pair
    checkpoint, whose runtime accuracy is measured too. ``seed`` seeds the policies' training and
    the attackers' draws.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt, data_ = Runtime(seed, **runtime), Data(**{**dataset, "image_size": spec.get("image_size") or dataset["image_size"]})
    image_size = data_.image_size
    normalize = functools.partial(data.normalize, mean=spec.get("mean") or data.MEAN, std=spec.get("std") or data.STD)
    test_set = data_.build("test")
    model = subject(spec, test_set.classes, where=f"audit.models.{name}")
    exported = copy.deepcopy(model)  # the job's device rewrites (runtime.Runtime.to_device) are the simulator's only
    simulated = checkpoint.quantizer(model, rt, image_size, **quant)
    job = analysis.Job(seed, rt, data_, dict(quant), pairs["policy"]["profits"], batch_size)
    test = data_.loader(test_set, batch_size, rt)
    subset = analysis.subset_loader(job, "test", max_examples)
    fp_preds, labels = evaluate.predict(simulated, test, rt, normalize=normalize)
    fp_acc = evaluate.accuracy(fp_preds, labels)
    record = {"model": name, "arch": spec["arch"], "clean_acc": fp_acc, "test_images": int(len(labels)),
              "subset_images": int(len(subset.dataset)), "tolerated_drop": float(audit["tolerated_drop"])}
    cells = grid_cells(pairs, audit["cells"], simulated.num_layers, name)
    low = min(min(options) for options, _ in cells.values())

    with _timed(record, "sensitivity"):
        subset_fp_acc = analysis.accuracies(subset, job, lambda x: simulated.model(x).argmax(1)[None],
                                            normalize=normalize).item()
        scan = sensitivity(job, simulated, subset, low, normalize)
        drops = [subset_fp_acc - a for a in scan]
        order = fragility_order(drops)
    with _timed(record, "policies"):
        policies = {cell: cell_policies(model, name, cell, options, capacity, drops, pairs, audit, out_dir, data_,
                                        seed=seed, runtime=runtime, quant=quant, random_policy_seed=random_policy_seed)
                    for cell, (options, capacity) in cells.items()}
    with _timed(record, "worst_case"):
        table = worst_case(simulated, policies, test, labels, rt, normalize, fp_acc, name)
        # the float layers: kept in sensitivity order until every cell's worst case holds on the
        # subset; their effect then measured on the test set
        masks = [[layer not in order[:k] for layer in range(simulated.num_layers)]
                 for k in range(min(int(audit["max_float_layers"]), simulated.num_layers) + 1)]
        attackers = {cell: {k: v for k, v in chosen.items() if k != "uniform"} for cell, chosen in policies.items()}
        keep = max(recommend(subset_fp_acc, masked_accuracies(job, simulated, subset, chosen, masks, normalize),
                             audit["tolerated_drop"]) for chosen in attackers.values())
        float_layers = order[:keep]
        kept = {f"{v}-{b}": min(a[0] for a in masked_accuracies(job, simulated, test, chosen, [masks[keep]],
                                                                normalize).values())
                for (v, b), chosen in attackers.items()}
    record.update(cell_record(table, kept))
    worst_sim = min(record[f"worst_acc_{v}-{b}"] for v, b in cells)

    with _timed(record, "runtime"):
        deployed = runtime_audit(exported, simulated, image_size, out_dir, float_layers, test, normalize,
                                 audit["runtime"], record, others)
    modules, nodes = deployed["modules"], deployed["nodes"]
    sens = pd.DataFrame([dict(model=name, layer=l + 1, module=modules[l], onnx_node=nodes[l], bits=low, acc=scan[l],
                              drop=drops[l], rank=order.index(l) + 1, keep_float=l in float_layers)
                         for l in range(simulated.num_layers)])
    record.update(float_layers=[modules[l] for l in float_layers], nodes_to_exclude=[nodes[l] for l in float_layers],
                  num_float_layers=len(float_layers), simulated_worst_acc=worst_sim, simulated_drop=fp_acc - worst_sim,
                  simulated_verdict=verdict(fp_acc - worst_sim, audit["tolerated_drop"]),
                  runtime_drop=fp_acc - record["runtime_acc"],
                  runtime_verdict=verdict(fp_acc - record["runtime_acc"], audit["tolerated_drop"]))

    with _timed(record, "coupling"):
        points = coupling_points(deployed, image_size, subset, analysis.subset_loader(job, "train", max_examples),
                                 normalize, audit["coupling"], corruptions["names"], corruptions["degrees"], seed=seed)
    points.insert(0, "model", name)
    for runner, frame in points.groupby("runner", sort=False):
        for row in coupling.summarize(frame).itertuples():
            record[f"coupling_drop_{runner}_{row.kind}_n{row.batch_size}"] = float(row.drop)
            record[f"coupling_ci95_{runner}_{row.kind}_n{row.batch_size}"] = float(row.ci95)

    table[CELL_COLUMNS].to_csv(out_dir / "cells.csv", index=False)
    sens[SENSITIVITY_COLUMNS].to_csv(out_dir / "sensitivity.csv", index=False)
    points.to_csv(out_dir / "coupling.csv", index=False)
    from .figures import audit_figure  # matplotlib and seaborn only here

    audit_figure(sens, points, name, figure)
    tmp = out_dir / "audit.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out_dir / "audit.json")
    return record


def cell_policies(model: nn.Module, name: str, cell: tuple[str, str], options: list[int], capacity: int,
                  drops: Sequence[float], pairs: Mapping, audit: Mapping, out_dir: Path, data_: Data, *, seed: int,
                  runtime: Mapping, quant: Mapping, random_policy_seed: int) -> dict[str, tuple]:
    """One cell's bit controllers: name → (policy, options, capacity, profit rule)."""
    n = len(drops)
    starts = {"even": even_profits(n, options, capacity), "greedy": greedy_profits(drops, options), "random": None}
    learned = learned_policy(model, name, *cell, pairs, audit, out_dir, data_, starts[audit["policy"]["start"]],
                             seed=seed, runtime=runtime, quant=quant)
    rule = pairs["policy"]["profits"]
    return {"uniform": (StaticPolicy(starts["even"]), options, capacity, "logits"),
            "random": (evaluate.random_policy(n, len(options), random_policy_seed), options, capacity, rule),
            "greedy": (StaticPolicy(starts["greedy"]), options, capacity, "logits"),
            "learned": (learned, options, capacity, rule)}


def worst_case(simulated, policies: Mapping, loader, labels: Tensor, rt: Runtime, normalize, fp_acc: float,
               name: str) -> pd.DataFrame:
    """Test accuracy of every cell's controllers (and FP): the rows of cells.csv."""
    rows = []
    for (version, budget), controllers in policies.items():
        rows.append(dict(model=name, version=version, budget=budget, policy="fp", network="N", acc=fp_acc, fp_acc=fp_acc))
        for policy_name, (policy, options, capacity, rule) in controllers.items():
            if policy_name == "random":  # a fresh seeded draw per pass, as in Table 3
                policy = evaluate.random_policy(simulated.num_layers, len(options), policy.generator.initial_seed())
            preds = evaluate.predict(simulated, loader, rt, rule, policy=policy, options=options, capacity=capacity,
                                     normalize=normalize)[0]
            rows.append(dict(model=name, version=version, budget=budget, policy=policy_name, network="N",
                             acc=evaluate.accuracy(preds, labels), fp_acc=fp_acc))
    return pd.DataFrame(rows).assign(drop=lambda t: t["fp_acc"] - t["acc"])


def cell_record(table: pd.DataFrame, float_kept: Mapping[str, float]) -> dict:
    """Per cell: each controller's accuracy, the worst and its controller, whether the learned
    policy is at or below both heuristics (random, greedy), and the worst with the float layers kept."""
    record = {}
    for (version, budget), rows in table[table["policy"] != "fp"].groupby(["version", "budget"], sort=False):
        cell = f"{version}-{budget}"
        acc = dict(zip(rows["policy"], rows["acc"]))
        worst = min(acc, key=acc.get)
        record.update({f"{p}_acc_{cell}": float(acc[p]) for p in POLICIES})
        record.update({f"worst_acc_{cell}": float(acc[worst]), f"worst_policy_{cell}": worst,
                       f"learned_beats_heuristics_{cell}": bool(acc["learned"] <= min(acc["random"], acc["greedy"])),
                       f"worst_acc_float_layers_{cell}": float(float_kept[cell])})
    return record


def verdict(drop: float, tolerated: float) -> str:
    return "pass" if drop <= tolerated else "fail"


def grid_cells(pairs: Mapping, chosen: Sequence[str] | None, num_layers: int, name: str) -> dict[tuple[str, str], tuple[list[int], int]]:
    """(version, budget) → (options, capacity) of the audited cells ("I-A", ...; ``None``: the grid)."""
    grid = [(v, b) for v in pairs["versions"] for b in pairs["budgets"]]
    wanted = grid if chosen is None else [tuple(c.split("-", 1)) for c in chosen]
    unknown = [f"{v}-{b}" for v, b in wanted if (v, b) not in grid]
    if unknown:
        raise ValueError(f"audit.cells: unknown cell(s) {unknown}; use version-budget of the grid, e.g. "
                         f"{grid[0][0]}-{grid[0][1]}, or null for all")
    return {(v, b): budgets.cell(num_layers, pairs["versions"][v], pairs["budgets"][b], pairs["budget_offset"][v],
                                 where=f"audit of {name}, cell {v}-{b}") for v, b in wanted}


def learned_policy(model: nn.Module, name: str, version: str, budget: str, pairs: Mapping, audit: Mapping,
                   out_dir: Path, data_: Data, start: Tensor | None, *, seed: int, runtime: Mapping,
                   quant: Mapping) -> nn.Module:
    """The detrimental policy trained against the frozen ``model`` for one cell, from the
    allocation of profits ``start`` (resumable; kept in ``out_dir``/policies), in eval mode."""
    path = out_dir / "policies" / f"{version}-{budget}.pt"
    rt = Runtime(seed, **runtime)
    if not path.exists():
        recipe = train._recipe(audit["policy"], audit["policy"]["batch_size"], grad_clip=pairs["grad_clip"],
                               select_best=pairs["select_best"])
        cell = dict(version=version, budget=budget, bit_range=pairs["versions"][version], level=pairs["budgets"][budget],
                    offset=pairs["budget_offset"][version])
        stage = train.FrozenPolicyStage(recipe, data_, rt, model, name, cell, quant, pairs["policy"],
                                        audit["policy"]["margin"], start)
        train.fit(stage, seed, path, path.with_suffix(".csv"))
    ckpt = checkpoint.load(path, kind="audit-policy", recover=f"delete {path} to train the policy again")
    return rt.to_device(checkpoint.policy_of(ckpt), data_.image_size).eval()


def _inputs(loader, normalize) -> tuple[Tensor, Tensor]:
    """Every network input (CPU float32) and label of ``loader``."""
    pairs = [(normalize(images.float()), labels) for images, labels in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def runtime_audit(model: nn.Module, simulated, image_size: int, out_dir: Path, float_layers: Sequence[int], loader,
                  normalize, settings: Mapping, record: dict, others: Mapping[str, Mapping[str, str]] | None) -> dict:
    """ONNX Runtime (``audit.runtime``): N at batch 1 against the like-for-like simulator, N with the
    float layers kept, and the accuracy of ``others`` (pair checkpoints) through the runtime. Fills
    ``record``; returns the layers' torch names, ONNX nodes and the runtime sessions."""
    model = model.cpu().float().eval()
    quantize = functools.partial(deploy.quantize, weight_type=settings["weight_type"],
                                 per_channel=settings["per_channel"], reduce_range=settings["reduce_range"])

    def int8(net: nn.Module, stem: str, keep: Sequence[int] = ()) -> tuple[deploy.Session, list[str], list[str]]:
        fp32 = deploy.export(net, image_size, out_dir / "onnx" / f"{stem}.fp32.onnx", opset=settings["opset"])
        by_module = deploy.node_names(net, fp32, image_size)  # every Conv2d/Linear, in execution order
        first, *layers = by_module
        nodes = [by_module[m] for m in layers]
        path = quantize(fp32, out_dir / "onnx" / f"{stem}.int8.onnx", exclude=[by_module[first], *(nodes[l] for l in keep)])
        return deploy.Session(path, settings["threads"]), layers, nodes

    inputs, labels = _inputs(loader, normalize)
    session, modules, nodes = int8(model, "model")
    if len(modules) != simulated.num_layers:
        raise ValueError(f"the ONNX graph has {len(modules) + 1} Conv/Gemm nodes, the simulator {simulated.num_layers + 1} layers")
    kept = int8(model, "model_float_layers", float_layers)[0] if float_layers else session
    runtime_logits = session(inputs, 1)
    like = deploy.simulator_like_runtime(model, image_size)
    with torch.no_grad():
        sim_logits = torch.cat([like(x, torch.full((len(x), like.num_layers), 8.0)) for x in inputs.split(256)])
        fp_logits = torch.cat([model(x) for x in inputs.split(256)])
    try:  # the runtime's integer arithmetic itself: tells a real difference from summation order
        emulation = deploy.integer_emulation(model, image_size).eval()
        with torch.no_grad():
            emulated = torch.cat([emulation(x) for x in inputs.split(256)])
        record.update({f"emulation_{k}": v for k, v in deploy.agreement(emulated, runtime_logits).items()})
    except ValueError as err:
        record["emulation_skipped"] = str(err)
    acc = lambda logits: evaluate.accuracy(logits.argmax(1), labels)  # noqa: E731
    record.update(runtime_acc=acc(runtime_logits), runtime_acc_float_layers=acc(kept(inputs, 1)),
                  like_for_like_fp_acc=acc(fp_logits), like_for_like_sim_acc=acc(sim_logits),
                  **{f"agreement_{k}": v for k, v in deploy.agreement(sim_logits, runtime_logits).items()},
                  **{f"cpu_{k}" if not k.startswith("cpu") else k: v for k, v in deploy.cpu_features().items()},
                  **{f"runtime_{k}": v for k, v in settings.items()})
    for network, paths in (others or {}).items():
        for cell, path in paths.items():
            ckpt = checkpoint.load(path, kind="pair", recover="re-run the pair job that writes it")
            net = checkpoint.network(ckpt).float()
            with torch.no_grad():
                record[f"fp_acc_{network}_{cell}"] = acc(torch.cat([net(x) for x in inputs.split(256)]))
            record[f"runtime_acc_{network}_{cell}"] = acc(int8(net, f"{network}_{cell}")[0](inputs, 1))
    return {"modules": modules, "nodes": nodes, "runtime": session, "runtime_float_layers": kept, "model": model}


def coupling_points(deployed: Mapping, image_size: int, evaluation, fit, normalize, settings: Mapping,
                    corruption_names: Sequence[str], degree: int, seed: int) -> pd.DataFrame:
    """Batch coupling (:mod:`dptq.coupling`): the batch-mates' accuracy with one attacker of each
    kind in the runtime as served (batch n), and with the float layers kept (when there are any);
    tidy rows with a ``runner`` column. The attacks are optimised through the like-for-like
    simulator's ``batch`` rule (tests/test_coupling.py: it equals the runtime at batch n)."""
    model = deployed["model"]
    attack = deploy.simulator_like_runtime(model, image_size, scale_rule="batch", range_grad=True)
    pixels, labels = (torch.cat(t) for t in zip(*[(images.float(), y) for images, y in evaluation]))
    fit_pixels = torch.cat([images.float() for images, _ in fit])
    natural = pixels[coupling.largest_range_image(pixels, attack, normalize)]
    candidates = torch.cat([corrupt(pixels, name, degree, seed)[0] for name in corruption_names
                            if name != "distribution_shift"])  # the service's normalisation is not the attacker's
    crude = coupling.crude(attack, natural, normalize, steps=settings["steps"], lr=settings["lr"])
    attackers = {"natural": natural, "corrupted": coupling.worst_corrupted(pixels, attack, candidates, normalize),
                 "crude": crude,
                 "crafted": coupling.craft(attack, fit_pixels, normalize, init=crude, steps=settings["steps"],
                                           lr=settings["lr"], seed=seed)}
    # per-example ranges (the runtime at batch 1, the simulator's minmax and percentile rules) have no
    # coupling by construction: the mates' batch-1 accuracy is the reference of every curve
    runners = {"runtime": deployed["runtime"]}
    if deployed["runtime_float_layers"] is not deployed["runtime"]:
        runners["runtime_float_layers"] = deployed["runtime_float_layers"]
    frames = [coupling.curves(run, pixels, labels, attackers, normalize, batch_sizes=settings["batch_sizes"],
                              batches=settings["batches"], seed=seed).assign(runner=name) for name, run in runners.items()]
    return pd.concat(frames, ignore_index=True)


def run_job(name: str, cfg: Mapping, *, network: Sequence[str], pairs: Sequence[str], json_path: str | Path,
            figure: str | Path) -> dict:
    """The workflow's audit job: ``cfg`` holds the keys its rule declares; ``network`` the
    pipeline's W checkpoint (with ``pairs``, its R and D pairs of the audited cells) or nothing
    for a model of ``audit.models``."""
    spec = dict(cfg["audit"]["models"][name]) if not network else {"arch": name, "checkpoint": network[0]}
    others: dict[str, dict[str, str]] = {}
    for path in pairs:
        cell = checkpoint.cell(path)
        others.setdefault({"robust": "R", "detrimental": "D"}[cell["mode"]], {})[f"{cell['version']}-{cell['budget']}"] = path
    evaluate_ = cfg["evaluate"]
    return audit_model(name, spec, Path(json_path).parent, figure, seed=cfg["dataset"]["split_seed"],
                       dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"], pairs=cfg["pairs"],
                       audit={k: cfg["audit"][k] for k in AUDIT_KEYS}, max_examples=cfg["analysis"]["max_examples"],
                       batch_size=evaluate_["batch_size"], random_policy_seed=evaluate_["random_policy_seed"],
                       corruptions=cfg["analysis"]["corruptions"], others=others)
