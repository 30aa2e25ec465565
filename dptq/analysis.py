"""Analyses of the paper's Sect. 4.2-4.3 on the highlighted pairs (docs/method.md §2.16-2.19, Fig. 2-4).

- :func:`layer_scan` (Fig. 2): quantize only some layers (``before`` / ``after`` / ``single``);
- :func:`histograms` (Fig. 3): input-activation histograms at FP and quantized, with sparsity;
- :func:`corruptions` (Fig. 4): accuracy under nine corruptions of growing degree;
- :func:`remedy` (the fix that Sect. 4.2 proposes): percentile scale, flagged layers kept at FP.

Each writes one tidy CSV (one observation per row, the training seed in the first column) for
one (seed, arch). The policy's bits are computed once per batch and shared by every setting
evaluated on it. The seeded subsets and corruptions draw from ``dataset.split_seed``, so every
training seed is measured on the same images.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint, config, data, tables
from .checkpoint import Pair
from .corruptions import SEEDLESS, corrupt
from .data import Data
from .policy import allocate
from .quant import DynamicQuant
from .runtime import Runtime

MODES = ("robust", "detrimental")
SCANS = ("before", "after", "single")
LAYER_SCAN_COLUMNS = ["seed", "arch", "network", "split", "scan", "layer", "relative_depth", "acc"]
HISTOGRAM_COLUMNS = ["seed", "arch", "network", "precision", "layer", "bin_left", "bin_right", "density", "sparsity"]
CORRUPTION_COLUMNS = ["seed", "arch", "network", "precision", "corruption", "degree", "corruption_seed", "acc"]
REMEDY_COLUMNS = ["seed", "arch", "network", "policy", "setting", "scale_rule", "keep_flagged", "flagged_layers", "q_acc", "fp_acc"]


# --- shared plumbing -----------------------------------------------------------------------------

@dataclass
class Job:
    """What every analysis pass needs: the runtime, the data, the config's ``quant`` section, the
    policies' profit rule and the inference batch size."""

    seed: int
    rt: Runtime
    data: Data
    quant: Mapping
    profits: str
    batch_size: int

    @classmethod
    def from_config(cls, seed: int, cfg: Mapping) -> "Job":
        """Started for an inference job: ``cfg`` holds the keys of workflow/rules/common.smk's ``INFERENCE``."""
        return cls(seed, Runtime(seed, **cfg["runtime"]), Data(**cfg["dataset"]), dict(cfg["quant"]),
                   cfg["pairs"]["policy"]["profits"], cfg["evaluate"]["batch_size"])

    def pair(self, path) -> Pair:
        return checkpoint.pair(path, self.rt, self.data.image_size, self.quant)


def highlighted_pairs(job: Job, table1: str | Path, pairs: Sequence[str | Path]) -> dict[str, Pair]:
    """The robust and detrimental pairs of the highlighted cell of ``table1`` (one arch's CSV),
    found among the checkpoints ``pairs`` by the cell each was trained for."""
    table = tables.read_table(table1)
    rows = table[table["highlighted"].astype(bool)]
    cells = set(zip(rows["version"], rows["budget"]))
    if len(cells) != 1 or set(rows["mode"]) != set(MODES):
        raise ValueError(f"{table1}: expected one highlighted cell with a robust and a detrimental row, "
                         f"found {len(rows)} highlighted rows; re-run the evaluate job that writes it")
    version, budget = cells.pop()
    found = {}
    for path in pairs:
        cell = checkpoint.cell(path)
        if (cell["version"], cell["budget"]) == (version, budget):
            found[cell["mode"]] = path
    missing = sorted(set(MODES) - set(found))
    if missing:
        raise ValueError(f"{table1}: the highlighted cell {config.cell_name(version, budget)} has no {missing} pair among the "
                         f"{len(pairs)} checkpoints given; re-run the pair jobs of that cell")
    return {mode: job.pair(found[mode]) for mode in MODES}


def bits(pair: Pair, x: Tensor, job: Job) -> Tensor:
    """The pair's own allocation for the network input ``x``: one batched MCKP call."""
    return allocate(pair.policy, x, pair.options, pair.capacity, job.profits)


@torch.no_grad()
def accuracies(loader, job: Job, run_batch: Callable[[Tensor], Tensor],
               corrupt_batch: Callable | None = None, desc: str = "", normalize=data.normalize) -> Tensor:
    """Top-1 accuracy in percent of every prediction set that ``run_batch`` makes, over ``loader``.

    ``run_batch(x)`` maps one network-input batch to predicted labels ``[S, B]`` (S settings);
    ``corrupt_batch(images, index)``, if given, returns the corrupted [0, 1] batch of loader
    batch ``index`` and the normalisation to use with it instead of ``normalize``.
    """
    correct, total = torch.zeros((), dtype=torch.float64), 0
    for index, (images, target) in enumerate(tqdm(loader, desc=desc, leave=False)):
        to_input = normalize
        if corrupt_batch is not None:
            images, to_input = corrupt_batch(images, index)
        x = data.network_input(images, job.rt, to_input)
        with job.rt.autocast():
            preds = run_batch(x)
        correct = correct + (preds.cpu() == target).sum(1)
        total += len(target)
    return 100.0 * correct / total


def _write(rows: list[dict], columns: Sequence[str], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(columns)).to_csv(out, index=False)


def _test_loader(job: Job):
    return job.data.loader(job.data.build("test"), job.batch_size, job.rt)


def subset_loader(job: Job, split: str, max_examples: int):
    """The split for the costly analyses (N·3 passes per network for the scan, dozens for the
    corruptions): at most ``max_examples`` examples (0: all), a random subset seeded with
    ``dataset.split_seed``."""
    dataset = job.data.build(split)
    if 0 < max_examples < len(dataset):
        generator = torch.Generator().manual_seed(job.data.split_seed)
        keep = torch.randperm(len(dataset), generator=generator)[:max_examples].sort().values
        dataset = torch.utils.data.Subset(dataset, keep.tolist())
    return job.data.loader(dataset, job.batch_size, job.rt)


# --- Fig. 2: layer scan --------------------------------------------------------------------------

def scan_masks(n: int, kind: str, layer: int) -> list[bool]:
    """Which of the N layers are quantized in one scan step (``layer`` l is 1-based):

    ``before`` layers 1..l, ``after`` layers l..N, ``single`` layer l only; the rest stay FP.
    """
    if not 1 <= layer <= n:
        raise ValueError(f"layer {layer} is out of range 1..{n}")
    keep = {"before": lambda i: i <= layer, "after": lambda i: i >= layer, "single": lambda i: i == layer}
    if kind not in keep:
        raise ValueError(f"unknown scan {kind!r}; use one of {SCANS}")
    return [keep[kind](i) for i in range(1, n + 1)]


class SharedPrefix:
    """Runs of one quantized network on one batch that agree with a reference run up to a layer
    take what the reference computed before it instead of computing it again.

    Inside ``with SharedPrefix(quant) as prefix``: ``prefix.reference(run)`` calls ``run()`` and
    records the output of every module that holds a quantizable layer (the layers themselves
    aside), keyed by the module and the number of layers that had run when it was called;
    ``prefix.replay(run, agree)`` then calls ``run()`` again, and a module call after which at most
    ``agree`` layers have run returns a copy of its recorded output instead of running. That is
    exact when the replayed run quantizes the first ``agree`` layers (in execution order) as the
    reference did: those calls see the same inputs and weights and so would compute the same
    values. A copy, because the caller may work on it in place.
    """

    def __init__(self, quant: DynamicQuant):
        layers = {id(layer) for layer in quant.layers}
        self.layers = quant.layers
        self.modules = [m for m in quant.model.modules()
                        if id(m) not in layers and any(id(sub) in layers for sub in m.modules())]
        self.recorded: dict[tuple[int, int], tuple[int, Tensor]] = {}
        self.count, self.agree, self.recording = 0, -1, False

    def __enter__(self) -> "SharedPrefix":
        self.handles = [layer.register_forward_pre_hook(self._count) for layer in self.layers]
        for module in self.modules:
            module.forward = self._reusing(module, module.forward)
        return self

    def __exit__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.modules:
            del module.forward  # back to the class's forward
        self.recorded.clear()

    def _count(self, *_) -> None:
        self.count += 1

    def _reusing(self, module, forward):
        def run(*args, **kwargs):
            key = (id(module), self.count)
            end, out = self.recorded.get(key, (None, None))
            if not self.recording and end is not None and end <= self.agree:
                self.count = end
                return out.clone()
            out = forward(*args, **kwargs)
            if self.recording and isinstance(out, Tensor):
                self.recorded[key] = (self.count, out.clone())
            return out
        return run

    def _call(self, run: Callable[[], Tensor], recording: bool, agree: int) -> Tensor:
        self.count, self.recording, self.agree = 0, recording, agree
        try:
            return run()
        finally:
            self.recording, self.agree = False, -1

    def reference(self, run: Callable[[], Tensor]) -> Tensor:
        self.recorded.clear()
        return self._call(run, True, -1)

    def replay(self, run: Callable[[], Tensor], agree: int) -> Tensor:
        return self._call(run, False, agree)


def agreement(mask: Sequence[bool], reference: Sequence[bool]) -> int:
    """How many leading layers ``mask`` quantizes as ``reference`` does."""
    return next((i for i, (a, b) in enumerate(zip(mask, reference)) if a != b), len(mask))


def _scan_batch(pair: Pair, masks: Sequence[Sequence[bool]], job: Job, x: Tensor) -> Tensor:
    """Predictions ``[S, B]`` for every mask, each replayed from the reference it agrees with longest:
    all layers quantized (the ``before`` scans) or none (``after`` and ``single``)."""
    b, n = bits(pair, x, job), pair.quant.num_layers
    references = ([True] * n, [False] * n)
    closest = [max(range(len(references)), key=lambda r: agreement(mask, references[r])) for mask in masks]
    preds: list[Tensor | None] = [None] * len(masks)
    with SharedPrefix(pair.quant) as prefix:
        for r, reference in enumerate(references):
            prefix.reference(lambda: pair.quant(x, b, reference))
            for i, mask in enumerate(masks):
                if closest[i] == r:
                    preds[i] = prefix.replay(lambda: pair.quant(x, b, mask), agreement(mask, reference)).argmax(1)
    return torch.stack(preds)


def layer_scan(job: Job, table1: str | Path, pairs: Sequence[str | Path], out: str | Path, *,
               max_examples: int, splits: Sequence[str]) -> None:
    """Fig. 2: accuracy of the highlighted R and D networks, own policy, with only some layers quantized.

    One row per (network, split, scan, layer); ``relative_depth`` = l / N. ``splits``: "train"
    (without augmentation) and/or "test", each on its seeded subset of ``max_examples``.
    """
    loaded = highlighted_pairs(job, table1, pairs)
    rows = []
    for mode, pair in loaded.items():
        n = pair.quant.num_layers
        steps = [(kind, layer) for kind in SCANS for layer in range(1, n + 1)]
        run = functools.partial(_scan_batch, pair, [scan_masks(n, kind, layer) for kind, layer in steps], job)
        for split in splits:
            acc = accuracies(subset_loader(job, split, max_examples), job, run, desc=f"{pair.arch} {mode} layer scan ({split})")
            rows += [dict(seed=job.seed, arch=pair.arch, network=mode, split=split, scan=kind, layer=layer,
                          relative_depth=layer / n, acc=a) for (kind, layer), a in zip(steps, acc.tolist())]
    _write(rows, LAYER_SCAN_COLUMNS, out)


# --- Fig. 3: activation histograms ---------------------------------------------------------------

def num_bins(value_range: float, width: float) -> int:
    """round(r / w) bins of width r / bins over [0, r]; at least two (one is removed as the zero bin)."""
    bins = int(round(value_range / width))
    if bins < 2:
        raise ValueError(f"analysis.histogram: range {value_range} / bin_width {width} gives {bins} bin(s); "
                         "need at least 2 (the bin holding 0 is removed)")
    return bins


def bin_counts(values: Tensor, value_range: float, width: float) -> tuple[Tensor, int]:
    """Counts of ``values`` in the bins of [0, r] (float64, on the values' device) and the number of values.

    Values outside [0, r] fall in no bin but count in the total.
    """
    counts = torch.histc(values.detach().float().flatten(), bins=num_bins(value_range, width), min=0.0, max=float(value_range))
    return counts.double(), values.numel()


def finish_histogram(counts: Tensor, total: int, value_range: float) -> tuple[float, Tensor, Tensor]:
    """(sparsity, edges, density) from bin counts over [0, r].

    sparsity = 100 · counts[0] / total (the share of all values in the bin holding 0, in %);
    density over the other bins: counts[k] / (Σ_{j≥1} counts[j] · width), so Σ density · width = 1
    (all zeros when nothing lands there). ``edges`` are the edges of those kept bins, one entry
    more than ``density``.
    """
    counts = counts.detach().double().cpu()
    edges = torch.linspace(0.0, float(value_range), len(counts) + 1, dtype=torch.float64)
    rest = counts[1:]
    mass = rest.sum()
    density = rest / (mass * (edges[1] - edges[0])) if mass > 0 else torch.zeros_like(rest)
    sparsity = 100.0 * counts[0].item() / total if total else 0.0
    return sparsity, edges[1:], density


class LayerHistograms:
    """Accumulates, per quantizable layer, the bin counts of the input the layer actually sees.

    Forward pre-hooks registered after :class:`DynamicQuant`'s own see its output, so in a
    quantized call they count the fake-quantized input; in a full-precision call the raw one.
    Counts go to ``counts[self.active]``; nothing else is kept.
    """

    def __init__(self, quant: DynamicQuant, value_range: float, width: float, names: Sequence[str] = ("fp", "q")):
        self.value_range, self.width = value_range, width
        bins, n = num_bins(value_range, width), quant.num_layers
        device = next(quant.model.parameters()).device
        self.counts = {name: torch.zeros(n, bins, dtype=torch.float64, device=device) for name in names}
        self.totals = {name: [0] * n for name in names}
        self.active = names[0]
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(quant.layers)]

    def _hook(self, index: int):
        def count(_module, args):
            counts, total = bin_counts(args[0], self.value_range, self.width)
            self.counts[self.active][index] += counts
            self.totals[self.active][index] += total
        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def rows(self) -> list[dict]:
        """One row per (precision, layer, bin) without the zero bin; layers 1-based."""
        rows = []
        for name, counts in self.counts.items():
            for layer, (layer_counts, total) in enumerate(zip(counts, self.totals[name]), start=1):
                sparsity, edges, density = finish_histogram(layer_counts, total, self.value_range)
                rows += [dict(precision=name, layer=layer, bin_left=a, bin_right=b, density=d, sparsity=sparsity)
                         for a, b, d in zip(edges[:-1].tolist(), edges[1:].tolist(), density.tolist())]
        return rows


def _histogram_batch(pair: Pair, hist: LayerHistograms, job: Job, x: Tensor) -> Tensor:
    hist.active = "fp"
    fp = pair.quant.model(x).argmax(1)
    hist.active = "q"
    return torch.stack([fp, pair.quant(x, bits(pair, x, job)).argmax(1)])


def histograms(job: Job, table1: str | Path, pairs: Sequence[str | Path], out: str | Path, *,
               range: float, bin_width: float) -> None:
    """Fig. 3: per-layer input-activation histograms of the highlighted R and D over the test set.

    ``fp``: the network at full precision; ``q``: the fake-quantized input each layer sees with the
    pair's own bits. Bins over [0, ``range``] of width ``bin_width``; the bin holding 0 is
    dropped and the rest renormalised; ``sparsity`` is the dropped share in %.
    """
    loaded = highlighted_pairs(job, table1, pairs)
    loader = _test_loader(job)
    rows = []
    for mode, pair in loaded.items():
        hist = LayerHistograms(pair.quant, range, bin_width)
        try:
            accuracies(loader, job, functools.partial(_histogram_batch, pair, hist, job), desc=f"{pair.arch} {mode} histograms")
        finally:
            hist.remove()
        rows += [dict(seed=job.seed, arch=pair.arch, network=mode, **row) for row in hist.rows()]
    _write(rows, HISTOGRAM_COLUMNS, out)


# --- Fig. 4: corruptions -------------------------------------------------------------------------

def batch_seed(base: int, seed: int, index: int) -> int:
    """An independent 32-bit seed for loader batch ``index`` of run ``seed`` (same at every degree)."""
    return int(np.random.SeedSequence([base, seed, index]).generate_state(1)[0])


def _corrupt_batch(name: str, degree: int, base: int, seed: int, images: Tensor, index: int):
    return corrupt(images, name, degree, batch_seed(base, seed, index))


def _robustness_batch(settings: Sequence[tuple[Pair, str]], job: Job, x: Tensor) -> Tensor:
    shared: dict[int, Tensor] = {}  # one allocation per pair and batch, shared by its settings
    preds = []
    for pair, precision in settings:
        if precision == "fp":
            preds.append(pair.quant.model(x).argmax(1))
        else:
            b = shared.setdefault(id(pair), bits(pair, x, job))
            preds.append(pair.quant(x, b).argmax(1))
    return torch.stack(preds)


def corruptions(job: Job, table1: str | Path, pairs: Sequence[str | Path], out: str | Path, *, max_examples: int,
                names: Sequence[str], degrees: int, seeds: int, quantized: bool) -> None:
    """Fig. 4: accuracy of the highlighted R and D under each corruption of ``names``, degree 0
    (clean) to ``degrees``, for corruption seeds 0..``seeds`` - 1, on the seeded subset of
    ``max_examples`` test images.

    Precision ``fp``, plus ``q`` (own policy, bits chosen on the corrupted image, as a deployed
    system would) when ``quantized``. Each batch is corrupted once and
    shared by every (network, precision); the clean accuracy is measured once and repeated as
    degree 0 of every corruption and seed, and a corruption that draws nothing at random
    (``SEEDLESS``) is measured at seed 0 and repeated for the other seeds.
    """
    loaded = highlighted_pairs(job, table1, pairs)
    arch = loaded["robust"].arch
    loader = subset_loader(job, "test", max_examples)
    precisions = ["fp", "q"] if quantized else ["fp"]
    keys = [(mode, precision) for mode in loaded for precision in precisions]
    run = functools.partial(_robustness_batch, [(loaded[mode], precision) for mode, precision in keys], job)

    def add(acc: Tensor, name: str, degree: int, seed: int) -> None:
        rows.extend(dict(seed=job.seed, arch=arch, network=mode, precision=precision, corruption=name, degree=degree, corruption_seed=seed, acc=a)
                    for (mode, precision), a in zip(keys, acc.tolist()))

    rows: list[dict] = []
    clean = accuracies(loader, job, run, desc=f"{arch} clean")
    for name in names:
        for seed in range(seeds):
            add(clean, name, 0, seed)
            for degree in range(1, degrees + 1):
                if name in SEEDLESS and seed > 0:  # the same images as seed 0: the same accuracies
                    acc = torch.tensor([r["acc"] for r in rows
                                        if (r["corruption"], r["degree"], r["corruption_seed"]) == (name, degree, 0)])
                else:
                    corrupt_batch = functools.partial(_corrupt_batch, name, degree, job.data.split_seed, seed)
                    acc = accuracies(loader, job, run, corrupt_batch, desc=f"{arch} {name} {degree} seed {seed}")
                add(acc, name, degree, seed)
    _write(rows, CORRUPTION_COLUMNS, out)


# --- the remedy of Sect. 4.2 ---------------------------------------------------------------------

def flagged_layers(scan: pd.DataFrame, arch: str, network: str, fp_acc: float, flag_drop: float) -> list[int]:
    """1-based layers whose ``single`` scan on the test split loses more than ``flag_drop`` points vs. FP."""
    rows = scan[(scan["arch"] == arch) & (scan["network"] == network) & (scan["split"] == "test") & (scan["scan"] == "single")]
    if rows.empty:
        raise ValueError(f"the layer scan has no 'single' rows on the test split for {arch} {network}; "
                         "analysis.layer_scan.splits must include 'test' for the remedy")
    return sorted(int(layer) for layer in rows.loc[fp_acc - rows["acc"] > flag_drop, "layer"])


def _fp_batch(nets: Sequence[DynamicQuant], x: Tensor) -> Tensor:
    return torch.stack([q.model(x).argmax(1) for q in nets])


def _remedy_batch(nets: Mapping[tuple[str, str], DynamicQuant], loaded: Mapping[str, Pair], settings: Sequence[dict],
                  job: Job, x: Tensor) -> Tensor:
    """``nets``: (network, scale rule) → its quantizer."""
    allocation = {mode: bits(pair, x, job) for mode, pair in loaded.items()}
    return torch.stack([nets[s["network"], s["scale_rule"]](x, allocation[s["policy"]], s["mask"]).argmax(1)
                        for s in settings])


def remedy(job: Job, table1: str | Path, layer_scan: str | Path, pairs: Sequence[str | Path],
           network: str | Path | None, out: str | Path, *, activation_scale: str, keep_flagged_fp: bool,
           flag_drop: float) -> None:
    """The fix Sect. 4.2 suggests, on the highlighted pairs and (if given) the white box ``network``.

    Networks and policies: R with π_R, D with π_D, and the white box W with π_R and with π_D.
    Settings: the paper's scale rule (``quant.activation_scale``) and the remedy's
    (``activation_scale``), each also with the flagged layers kept at full precision when
    ``keep_flagged_fp``. A layer is flagged for a policy when quantizing it alone (``single`` scan
    of that policy's own pair, test split) costs its network more than ``flag_drop`` points. ``flagged_layers`` lists the layers kept at
    full precision in that row (1-based, ``;``-separated, ``none`` if none).
    """
    loaded = highlighted_pairs(job, table1, pairs)
    arch = loaded["robust"].arch
    nets = {m: p.quant for m, p in loaded.items()}
    if network is not None:
        nets["white_box"] = checkpoint.white_box(network, job.rt, job.data.image_size, job.quant, arch)
    loader = _test_loader(job)
    fp_run = functools.partial(_fp_batch, list(nets.values()))
    fp_acc = dict(zip(nets, accuracies(loader, job, fp_run, desc=f"{arch} remedy (FP)").tolist()))
    scan = pd.read_csv(layer_scan)
    flags = {mode: flagged_layers(scan, arch, mode, fp_acc[mode], flag_drop) for mode in loaded}

    rules = list(dict.fromkeys([job.quant["activation_scale"], activation_scale]))
    keeps = [False, True] if keep_flagged_fp else [False]
    combos = [(mode, mode) for mode in loaded] + [("white_box", mode) for mode in loaded if "white_box" in nets]
    settings = []
    for net, policy in combos:
        n = nets[net].num_layers
        for rule in rules:
            for keep in keeps:
                kept = flags[policy] if keep else []
                settings.append(dict(network=net, policy=policy, scale_rule=rule, keep_flagged=keep,
                                     setting=f"{rule}_keep_flagged" if keep else rule,
                                     flagged_layers=";".join(map(str, kept)) or "none",
                                     mask=[layer not in kept for layer in range(1, n + 1)]))
    # a setting that keeps no layer at FP is its rule's plain setting: measured once
    run_of = lambda s: (s["network"], s["policy"], s["scale_rule"], tuple(s["mask"]))  # noqa: E731
    runs = {run_of(s): s for s in settings}
    by_rule = {(net, rule): quant.with_scale_rule(rule) for net, quant in nets.items() for rule in rules}
    q_acc = accuracies(loader, job, functools.partial(_remedy_batch, by_rule, loaded, list(runs.values()), job), desc=f"{arch} remedy")
    acc_of = dict(zip(runs, q_acc.tolist()))
    rows = [dict(seed=job.seed, arch=arch, **{k: v for k, v in s.items() if k != "mask"}, q_acc=acc_of[run_of(s)],
                 fp_acc=fp_acc[s["network"]]) for s in settings]
    _write(rows, REMEDY_COLUMNS, out)
