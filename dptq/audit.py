"""Deployment audit (SPEC §8; beyond the paper): the worst a per-example bit controller can do to a
given, already trained network, and whether the failure happens in a real int8 runtime.

For one network N (a timm arch and its weights, or one of the pipeline's own) on the dataset:

- **sensitivity**: each quantizable layer alone at the lowest option of the audited cells, the
  rest at full precision (the seeded subset of the analyses);
- **worst case per cell** (version × budget of the grid, same options, budget and exact MCKP):
  full precision; the *uniform* allocation (every layer the budget's mean bits, rounded so that
  the sum is exact); a seeded *random* policy; the *greedy* rule (the lowest bits to the layers
  the sensitivity scan finds most fragile: :func:`dptq.policy.greedy_profits`); and a *learned*
  detrimental policy trained against the frozen N (:class:`dptq.train.FrozenPolicyStage`). The
  worst case is the lowest of them;
- **recommendation**: the fewest most-sensitive layers (up to ``max_float_layers``) whose being
  kept in float brings every cell's worst case within ``tolerated_drop`` of FP on the subset
  (each policy's allocations as they are, those layers' inputs left unquantized), then measured
  on the test set, with their ONNX node names (onnxruntime's ``nodes_to_exclude``);
- **real runtime** (:mod:`dptq.deploy`, :mod:`dptq.int8`): ONNX Runtime's dynamic int8
  quantization, checked like for like against the simulator and the integer emulation, and N's
  (and the pipeline's R and D networks') accuracy through it, with and without the float layers;
- **batch coupling** (:mod:`dptq.coupling`): what one batch-mate costs the others in the runtime;
- **verdicts**: pass when the drop from FP is at most ``tolerated_drop``, for the simulated
  worst case (3-8-bit activations: what a lower-bit or adaptive runtime would face) and for the
  runtime of today (8-bit activations).

The result is one :class:`AuditResult`, written once as audit.json, beside the tidy cells.csv,
sensitivity.csv and coupling.csv (docs/method.md §2.21 describes every field). The first
quantizable layer reads the raw image and is never quantized, in the simulator and in the runtime
alike (its ONNX node is always excluded).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from . import analysis, budgets, checkpoint, config, coupling, data, deploy, evaluate, int8, models, tables, train
from .data import Data
from .audit_record import Agreement, AuditResult, CellResult, RuntimeResult, Verdict
from .policy import RandomPolicy, StaticPolicy, allocate, even_profits, fragility_order, greedy_profits
from .runtime import Runtime

CELL_COLUMNS = ["model", "version", "budget", "policy", "network", "acc", "fp_acc", "drop"]
SENSITIVITY_COLUMNS = ["model", "layer", "module", "onnx_node", "bits", "acc", "drop", "rank", "keep_float"]
POLICIES = ("uniform", "random", "greedy", "learned")
AUDIT_KEYS = ("cells", "tolerated_drop", "max_float_layers", "policy", "runtime", "coupling")  # one model's settings


# --- the subject ---------------------------------------------------------------------------------

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


def subject(spec: Mapping, classes: Sequence[str], where: str, image_size: int | None = None) -> nn.Module:
    """The network to audit, in eval mode: ``spec`` is a model entry of ``audit.models`` (``arch``,
    ``weights``, ``num_classes``, ``class_map``) or, for the pipeline's own, a checkpoint path; an
    arch of a fixed input size (ViT) is built for ``image_size``."""
    if "checkpoint" in spec:
        return checkpoint.network(checkpoint.load(spec["checkpoint"], kind="distill", arch=spec["arch"],
                                                  recover=f"re-run the distillation of {spec['arch']}"))
    index = class_index(spec.get("class_map"), classes, where)
    num_classes = spec.get("num_classes") or len(classes)
    model = models.trained(spec["arch"], num_classes, spec["weights"], key=f"{where}.weights", image_size=image_size)
    if index is None and num_classes != len(classes):
        raise ValueError(f"{where}: the model has {num_classes} classes, the dataset {len(classes)}; "
                         f"give a class_map from dataset classes to the model's")
    return model if index is None else Restricted(model, index).eval()


@dataclass
class Context:
    """What every part of one audit shares: the job's runtime and data, the analyses' job, the
    model's input normalisation, the output folder and the seed."""

    job: analysis.Job
    normalize: object
    out_dir: Path
    seed: int

    @property
    def rt(self) -> Runtime:
        return self.job.rt

    @property
    def data(self) -> Data:
        return self.job.data


# --- the simulated worst case --------------------------------------------------------------------

def sensitivity(job: analysis.Job, quant, loader, bits: int, normalize=data.normalize) -> list[float]:
    """Accuracy with layer l alone quantized at ``bits`` (the rest FP), for every l, on ``loader``."""
    n = quant.num_layers
    masks = [analysis.scan_masks(n, "single", layer) for layer in range(1, n + 1)]

    def run(x: Tensor) -> Tensor:
        b = torch.full((x.shape[0], n), float(bits), device=x.device)
        return torch.stack([quant(x, b, mask).argmax(1) for mask in masks])

    return analysis.accuracies(loader, job, run, desc="sensitivity", normalize=normalize).tolist()


def masked_accuracies(ctx: Context, quant, loader, policies: Mapping[str, tuple], masks: Sequence[Sequence[bool]]
                      ) -> dict[str, list[float]]:
    """Accuracy of every (policy, mask) on ``loader``; each policy's bits computed once per batch.
    ``policies``: name → (policy, options, capacity, profit rule)."""

    def run(x: Tensor) -> Tensor:
        preds = []
        for policy, options, capacity, rule in policies.values():
            b = allocate(policy, x, options, capacity, rule)
            preds += [quant(x, b, mask).argmax(1) for mask in masks]
        return torch.stack(preds)

    acc = analysis.accuracies(loader, ctx.job, run, desc="float layers", normalize=ctx.normalize).tolist()
    return {name: acc[i * len(masks):(i + 1) * len(masks)] for i, name in enumerate(policies)}


def recommend(fp_acc: float, acc_by_k: Mapping[str, Sequence[float]], tolerated: float) -> int:
    """The fewest layers k (the k most sensitive) kept in float such that every policy's accuracy with
    them kept is within ``tolerated`` of FP; the largest k tried when none is."""
    tried = len(next(iter(acc_by_k.values())))
    for k in range(tried):
        if all(fp_acc - acc[k] <= tolerated for acc in acc_by_k.values()):
            return k
    return tried - 1


class Cell(NamedTuple):
    """An audited cell of the grid: its name, version and budget, and the options and capacity they give N."""

    name: str
    version: str
    budget: str
    options: list[int]
    capacity: int


def grid_cells(pairs: Mapping, names: Sequence[str] | None, num_layers: int, model: str) -> list[Cell]:
    """The audited cells ``names`` (None: the grid; names already checked by dptq.config)."""
    return [Cell(name, v, b, *budgets.cell(num_layers, pairs["versions"][v], pairs["budgets"][b], pairs["budget_offset"][v],
                                           where=f"audit of {model}, cell {name}"))
            for name, (v, b) in config.cells(pairs, names).items()]


def learned_policy(ctx: Context, model: nn.Module, name: str, cell: Cell, pairs: Mapping, audit: Mapping,
                   start: Tensor | None, quant: Mapping) -> nn.Module:
    """The detrimental policy trained against the frozen ``model`` for one cell, from the
    allocation of profits ``start`` (resumable; kept in ``out_dir``/policies), in eval mode. Every
    cell's policy starts from freshly seeded generators, so it does not depend on the cells before it."""
    path = ctx.out_dir / "policies" / f"{cell.name}.pt"
    ctx.rt.reseed()
    if not path.exists():
        policy = audit["policy"]
        recipe = train.recipe(policy, policy["batch_size"], grad_clip=pairs["grad_clip"], select_best=pairs["select_best"])
        spec = dict(version=cell.version, budget=cell.budget, bit_range=pairs["versions"][cell.version],
                    level=pairs["budgets"][cell.budget], offset=pairs["budget_offset"][cell.version])
        stage = train.FrozenPolicyStage(recipe, ctx.data, ctx.rt, model, name, spec, quant, pairs["policy"],
                                        policy["margin"], start)
        fit_from_start(stage, ctx.seed, path)
    ckpt = checkpoint.load(path, kind="audit-policy", recover=f"delete {path} to train the policy again")
    return ctx.rt.to_device(checkpoint.policy_of(ckpt), ctx.data.image_size).eval()


def fit_from_start(stage: train.FrozenPolicyStage, seed: int, path: Path) -> None:
    """Train ``stage``'s policy into ``path``; with the best epoch kept (``pairs.select_best``), its
    start counts as epoch 0: the policy is left where it started unless an epoch beats the start's
    validation objective. A policy started at the greedy allocation thus ends no weaker than the
    greedy rule on the validation part, where a few epochs of SGD could leave it for a worse one."""
    trained, metrics = path.with_suffix(".trained.pt"), path.with_suffix(".csv")
    start = stage.start_objective()
    if not trained.exists():
        train.fit(stage, seed, trained, metrics)
    ckpt = checkpoint.load(trained, kind="audit-policy", recover=f"delete {trained} to train the policy again")
    if start is not None and start[1] <= pd.read_csv(metrics)["objective"].min():
        ckpt = {**ckpt, "policy": start[0], "best_epoch": 0}
    checkpoint.save(ckpt, path)
    trained.unlink()


def cell_policies(ctx: Context, model: nn.Module, name: str, cell: Cell, drops: Sequence[float], pairs: Mapping,
                  audit: Mapping, quant: Mapping, random_policy_seed: int) -> dict[str, tuple]:
    """One cell's bit controllers: name → (policy, options, capacity, profit rule)."""
    n, options, capacity, rule = len(drops), cell.options, cell.capacity, pairs["policy"]["profits"]
    starts = {"even": even_profits(n, options, capacity), "greedy": greedy_profits(drops, options), "random": None}
    random = RandomPolicy(n, len(options), random_policy_seed)
    learned = learned_policy(ctx, model, name, cell, pairs, audit, starts[audit["policy"]["start"]], quant)
    return {"uniform": (StaticPolicy(starts["even"]), options, capacity, "logits"),
            "random": (random, options, capacity, rule),
            "greedy": (StaticPolicy(starts["greedy"]), options, capacity, "logits"),
            "learned": (learned, options, capacity, rule)}


def worst_case(ctx: Context, simulated, cells: Sequence[Cell], policies: Mapping[str, Mapping], loader, labels: Tensor,
               fp_acc: float, name: str) -> pd.DataFrame:
    """Test accuracy of every cell's controllers (``policies``: cell name → controllers) and FP: the rows of cells.csv."""
    rows = []
    for version, budget, controllers in ((c.version, c.budget, policies[c.name]) for c in cells):
        rows.append(dict(model=name, version=version, budget=budget, policy="fp", network="N", acc=fp_acc, fp_acc=fp_acc))
        for policy_name, (policy, options, capacity, rule) in controllers.items():
            if policy_name == "random":  # a fresh seeded draw per pass, as in Table 3
                policy = RandomPolicy(simulated.num_layers, len(options), policy.generator.initial_seed())
            preds = evaluate.predict(simulated, loader, ctx.rt, rule, policy=policy, options=options, capacity=capacity,
                                     normalize=ctx.normalize)[0]
            rows.append(dict(model=name, version=version, budget=budget, policy=policy_name, network="N",
                             acc=evaluate.accuracy(preds, labels), fp_acc=fp_acc))
    return pd.DataFrame(rows).assign(drop=lambda t: t["fp_acc"] - t["acc"])


def cell_results(table: pd.DataFrame, float_kept: Mapping[str, float]) -> list[CellResult]:
    """Per cell of cells.csv's rows: each controller's accuracy, the worst and its controller, whether
    the learned policy is at or below both heuristics, and the worst with the float layers kept."""
    results = []
    for (version, budget), rows in table[table["policy"] != "fp"].groupby(["version", "budget"], sort=False):
        cell = config.cell_name(version, budget)
        acc = {p: float(a) for p, a in zip(rows["policy"], rows["acc"])}
        worst = min(acc, key=acc.get)
        results.append(CellResult(cell, {p: acc[p] for p in POLICIES}, acc[worst], worst,
                                  bool(acc["learned"] <= min(acc["random"], acc["greedy"])), float(float_kept[cell])))
    return results


@dataclass
class Simulated:
    """The simulated part of an audit: the sensitivity scan, the float layers and every cell's worst case."""

    scan: list[float]  # each layer's accuracy alone at ``bits``
    drops: list[float]
    bits: int
    float_layers: list[int]  # 0-based, most sensitive first
    table: pd.DataFrame  # the rows of cells.csv
    cells: list[CellResult]


def simulate(ctx: Context, model: nn.Module, simulated, name: str, cells: Sequence[Cell],
             test, subset, labels: Tensor, fp_acc: float, *, pairs: Mapping, audit: Mapping, quant: Mapping,
             random_policy_seed: int, seconds: dict) -> Simulated:
    """The sensitivity scan (on the ``subset`` loader), each cell's controllers and worst case (on
    ``test``), and the float layers."""
    low = min(min(cell.options) for cell in cells)
    with _timed(seconds, "sensitivity"):
        subset_fp_acc = analysis.accuracies(subset, ctx.job, lambda x: simulated.model(x).argmax(1)[None],
                                            normalize=ctx.normalize).item()
        scan = sensitivity(ctx.job, simulated, subset, low, ctx.normalize)
        drops = [subset_fp_acc - a for a in scan]
        order = fragility_order(drops)
    with _timed(seconds, "policies"):
        policies = {cell.name: cell_policies(ctx, model, name, cell, drops, pairs, audit, quant, random_policy_seed)
                    for cell in cells}
    with _timed(seconds, "worst_case"):
        table = worst_case(ctx, simulated, cells, policies, test, labels, fp_acc, name)
        # the float layers: kept in sensitivity order until every cell's worst case holds on the
        # subset; their effect then measured on the test set
        masks = [[layer not in order[:k] for layer in range(simulated.num_layers)]
                 for k in range(min(int(audit["max_float_layers"]), simulated.num_layers) + 1)]
        attackers = {cell: {k: v for k, v in chosen.items() if k != "uniform"} for cell, chosen in policies.items()}
        keep = max(recommend(subset_fp_acc, masked_accuracies(ctx, simulated, subset, chosen, masks), audit["tolerated_drop"])
                   for chosen in attackers.values())
        kept = {cell: min(a[0] for a in masked_accuracies(ctx, simulated, test, chosen, [masks[keep]]).values())
                for cell, chosen in attackers.items()}
    return Simulated(scan, drops, low, order[:keep], table, cell_results(table, kept))


# --- the real runtime ----------------------------------------------------------------------------

@dataclass
class Deployed:
    """N in ONNX Runtime: its layers' torch names and ONNX nodes, the sessions, and what they measured."""

    modules: list[str]
    nodes: list[str]
    session: deploy.Session
    session_float_layers: deploy.Session  # the float layers excluded (the same session when there are none)
    model: nn.Module  # the float network exported, on the CPU
    result: RuntimeResult


def _inputs(loader, normalize) -> tuple[Tensor, Tensor]:
    """Every network input (CPU float32) and label of ``loader``."""
    pairs = [(normalize(images.float()), labels) for images, labels in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _logits(model, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in inputs.split(256)])


def run_in_runtime(ctx: Context, model: nn.Module, image_size: int, float_layers: Sequence[int], loader,
                   clean_acc: float, tolerated: float, settings: Mapping,
                   others: Mapping[str, Mapping[str, str]] | None) -> Deployed:
    """ONNX Runtime (``audit.runtime``): N at batch 1 against the like-for-like simulator and the
    integer emulation, N with the float layers kept, and the accuracy of ``others`` (pair
    checkpoints) through the runtime."""
    model = model.cpu().float().eval()
    quantize = functools.partial(deploy.quantize, weight_type=settings["weight_type"],
                                 per_channel=settings["per_channel"], reduce_range=settings["reduce_range"])

    def int8_session(net: nn.Module, stem: str,
                     keep: Sequence[int] = ()) -> tuple[deploy.Session, list[str], list[str], list[str]]:
        """The session, the quantizable modules (all but the first) and their nodes, and the modules
        the quantized graph computes in integers (read from it, not assumed)."""
        fp32 = deploy.export(net, image_size, ctx.out_dir / "onnx" / f"{stem}.fp32.onnx", opset=settings["opset"])
        by_module = deploy.node_names(net, fp32, image_size)  # every Conv2d/Linear, in execution order
        first, *layers = by_module
        nodes = [by_module[m] for m in layers]
        path = quantize(fp32, ctx.out_dir / "onnx" / f"{stem}.int8.onnx", exclude=[by_module[first], *(nodes[l] for l in keep)])
        integer = set(deploy.quantized_nodes(fp32, path))
        return deploy.Session(path, settings["threads"]), layers, nodes, [m for m in by_module if by_module[m] in integer]

    inputs, labels = _inputs(loader, ctx.normalize)
    acc = lambda logits: evaluate.accuracy(logits.argmax(1), labels)  # noqa: E731
    session, modules, nodes, integer = int8_session(model, "model")
    kept = int8_session(model, "model_float_layers", float_layers)[0] if float_layers else session
    runtime_logits = session(inputs, 1)
    like = int8.simulator_like_runtime(model, image_size)
    sim_logits = _logits(lambda x: like(x, torch.full((len(x), like.num_layers), 8.0)), inputs)
    emulation, skipped = None, None
    pinned = {"weight_type": "QInt8", "per_channel": False, "reduce_range": False}  # what int8 computes
    if any(settings[key] != value for key, value in pinned.items()):
        skipped = (f"int8.integer_emulation computes {pinned} only, audit.runtime has "
                   f"{ {key: settings[key] for key in pinned} }; set those to compare it with the runtime")
    else:
        try:  # the runtime's integer arithmetic itself: tells a real difference from summation order
            emulated = int8.integer_emulation(model, image_size, integer).eval()
            emulation = Agreement(**int8.agreement(_logits(emulated, inputs), runtime_logits))
        except ValueError as err:
            skipped = str(err)
    others_measured = []
    for network, paths in (others or {}).items():
        for cell, path in paths.items():
            net = checkpoint.network(checkpoint.load(path, kind="pair", recover="re-run the pair job that writes it")).float()
            others_measured.append(dict(network=network, cell=cell, fp_acc=acc(_logits(net, inputs)),
                                        runtime_acc=acc(int8_session(net, f"{network}_{cell}")[0](inputs, 1))))
    result = RuntimeResult(verdict=Verdict.of(acc(runtime_logits), clean_acc, tolerated),
                           acc_float_layers=acc(kept(inputs, 1)), like_for_like_fp_acc=acc(_logits(model, inputs)),
                           like_for_like_sim_acc=acc(sim_logits),
                           simulator=Agreement(**int8.agreement(sim_logits, runtime_logits)),
                           emulation=emulation, emulation_skipped=skipped, settings=dict(settings), others=others_measured)
    return Deployed(modules, nodes, session, kept, model, result)


# --- one audit -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _timed(seconds: dict, part: str):
    """Sets ``seconds[part]``, the wall time of the block."""
    start = time.perf_counter()
    yield
    seconds[part] = round(time.perf_counter() - start, 2)


def audit_model(name: str, spec: Mapping, out_dir: str | Path, figure: str | Path, *, seed: int, dataset: Mapping,
                runtime: Mapping, quant: Mapping, pairs: Mapping, audit: Mapping, evaluation: Mapping,
                analysis_settings: Mapping, others: Mapping[str, Mapping[str, str]] | None = None) -> AuditResult:
    """Audit network ``name`` (``spec``: see :func:`subject`) and write ``out_dir``/audit.json with
    cells.csv, sensitivity.csv, coupling.csv beside it and the figure ``figure``.

    ``pairs``: the grid (``versions``, ``budgets``, ``budget_offset``, ``policy``, ``grad_clip``,
    ``select_best``); ``audit``: the audit section; ``evaluation``: ``batch_size`` and
    ``random_policy_seed``; ``analysis_settings``: ``max_examples`` and ``corruptions``;
    ``others``: for the pipeline's networks, network name (R, D) → cell → pair checkpoint, whose
    runtime accuracy is measured too. ``seed`` seeds the policies' training and the attackers' draws.
    """
    out_dir = Path(out_dir)  # made by the first file written: a failed audit leaves no empty folder
    data_ = Data(**{**dataset, "image_size": spec.get("image_size") or dataset["image_size"]})
    job = analysis.Job(seed, Runtime(seed, **runtime), data_, dict(quant), pairs["policy"]["profits"], evaluation["batch_size"])
    ctx = Context(job, functools.partial(data.normalize, mean=spec.get("mean") or data.MEAN, std=spec.get("std") or data.STD),
                  out_dir, seed)
    image_size, seconds = data_.image_size, {}
    test_set = data_.build("test")
    model = subject(spec, test_set.classes, where=f"audit.models.{name}", image_size=image_size)
    exported = copy.deepcopy(model)  # the job's device rewrites (runtime.Runtime.to_device) are the simulator's only
    simulated = checkpoint.quantizer(model, ctx.rt, image_size, **quant)
    test = data_.loader(test_set, evaluation["batch_size"], ctx.rt)
    fp_preds, labels = evaluate.predict(simulated, test, ctx.rt, normalize=ctx.normalize)
    fp_acc = evaluate.accuracy(fp_preds, labels)
    subset = analysis.subset_loader(job, "test", analysis_settings["max_examples"])
    cells = grid_cells(pairs, audit["cells"], simulated.num_layers, name)
    found = simulate(ctx, model, simulated, name, cells, test, subset, labels, fp_acc, pairs=pairs, audit=audit,
                     quant=quant, random_policy_seed=evaluation["random_policy_seed"], seconds=seconds)
    with _timed(seconds, "runtime"):
        deployed = run_in_runtime(ctx, exported, image_size, found.float_layers, test, fp_acc, audit["tolerated_drop"],
                                  audit["runtime"], others)
    if len(deployed.modules) != simulated.num_layers:
        raise ValueError(f"the ONNX graph has {len(deployed.modules) + 1} Conv/Gemm nodes, the simulator "
                         f"{simulated.num_layers + 1} layers")
    # per-example ranges (the runtime at batch 1, the simulator's minmax and percentile rules) have no
    # coupling by construction: the runtime as served, and with the float layers kept
    runners = {"runtime": deployed.session}
    if deployed.session_float_layers is not deployed.session:
        runners["runtime_float_layers"] = deployed.session_float_layers
    with _timed(seconds, "coupling"):
        points, guard = coupling.measure(deployed.model, runners, image_size, subset,
                                  analysis.subset_loader(job, "train", analysis_settings["max_examples"]), ctx.normalize,
                                  audit["coupling"], analysis_settings["corruptions"], seed)
    points.insert(0, "model", name)
    drops = tables.coupling_drops(points, ("runner", "kind", "batch_size")).to_dict("records")
    worst = min(c.worst_acc for c in found.cells)
    result = AuditResult(
        model=name, arch=spec["arch"], inputs=inputs(spec, dataset, image_size), clean_acc=fp_acc, test_images=int(len(labels)),
        subset_images=int(len(subset.dataset)), tolerated_drop=float(audit["tolerated_drop"]), cells=found.cells,
        float_layers=[deployed.modules[l] for l in found.float_layers],
        nodes_to_exclude=[deployed.nodes[l] for l in found.float_layers],
        simulated=Verdict.of(worst, fp_acc, audit["tolerated_drop"]), runtime=deployed.result,
        coupling=drops, coupling_verdict=tables.coupling_verdict(drops, "runtime", audit["tolerated_drop"]),
        guard=None if guard is None else guard | {"verdict": tables.coupling_verdict(drops, "runtime_guarded", audit["tolerated_drop"])},
        cpu=deploy.cpu_features(), seconds=seconds)
    write(result, found, deployed, points, out_dir, figure)
    return result


def inputs(spec: Mapping, dataset: Mapping, image_size: int) -> dict:
    """What was audited, for the record: the weights file (or the pipeline's checkpoint) with its
    sha256, the dataset, the image size and normalisation, and the package versions."""
    from .report import versions  # reads package metadata only

    path = Path(spec.get("weights") or spec["checkpoint"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"weights" if "weights" in spec else "checkpoint": str(path.resolve()), "sha256": digest.hexdigest(),
            "num_classes": spec.get("num_classes"), "class_map": spec.get("class_map"),
            "dataset": {"name": dataset["name"], "root": str(Path(dataset["root"]).resolve())}, "image_size": image_size,
            "mean": list(spec.get("mean") or data.MEAN), "std": list(spec.get("std") or data.STD), "versions": versions()}


def write(result: AuditResult, found: Simulated, deployed: Deployed, points: pd.DataFrame, out_dir: Path,
          figure: str | Path) -> None:
    """cells.csv, sensitivity.csv, coupling.csv, the figure, and audit.json last (the job's done-marker)."""
    order = fragility_order(found.drops)
    out_dir.mkdir(parents=True, exist_ok=True)
    sens = pd.DataFrame([dict(model=result.model, layer=l + 1, module=deployed.modules[l], onnx_node=deployed.nodes[l],
                              bits=found.bits, acc=found.scan[l], drop=found.drops[l], rank=order.index(l) + 1,
                              keep_float=l in found.float_layers) for l in range(len(found.scan))])
    found.table[CELL_COLUMNS].to_csv(out_dir / "cells.csv", index=False)
    sens[SENSITIVITY_COLUMNS].to_csv(out_dir / "sensitivity.csv", index=False)
    points.to_csv(out_dir / "coupling.csv", index=False)
    from .figures import audit_figure  # matplotlib and seaborn only here

    audit_figure(sens, points, result.model, figure)
    result.write(out_dir / "audit.json")


def run_job(name: str, cfg: Mapping, *, network: Sequence[str], pairs: Sequence[str], json_path: str | Path,
            figure: str | Path) -> AuditResult:
    """The workflow's audit job: ``cfg`` holds the keys its rule declares; ``network`` the
    pipeline's W checkpoint (with ``pairs``, its R and D pairs of the audited cells) or nothing
    for a model of ``audit.models``."""
    spec = dict(cfg["audit"]["models"][name]) if not network else {"arch": name, "checkpoint": network[0]}
    others: dict[str, dict[str, str]] = {}
    for path in pairs:
        cell = checkpoint.cell(path)
        network_name = {"robust": "R", "detrimental": "D"}[cell["mode"]]
        others.setdefault(network_name, {})[config.cell_name(cell["version"], cell["budget"])] = path
    return audit_model(name, spec, Path(json_path).parent, figure, seed=cfg["dataset"]["split_seed"],
                       dataset=cfg["dataset"], runtime=cfg["runtime"], quant=cfg["quant"], pairs=cfg["pairs"],
                       audit={k: cfg["audit"][k] for k in AUDIT_KEYS},
                       evaluation=cfg["evaluate"], analysis_settings=cfg["analysis"], others=others)
