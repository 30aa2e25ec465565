"""dptq.analysis: scan masks and the histogram/sparsity measure against their definitions, then
evaluate_arch and every analysis end to end on tiny untrained pairs (16 px, 16 images).

The end-to-end network is timm's ``test_resnet`` (a ResNet of 15 quantizable layers, 0.4 M
parameters): on one CPU thread a quantized ResNet18 call costs about 0.3 s, mostly the 16-bit
fake quantization of its 11 M weights, and the layer scan alone needs 3·N calls per batch.
"""
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from torch.utils.data import Subset

from dptq import analysis, budgets, checkpoint, config, data, evaluate, models, tables
from dptq.policy import BitPolicy
from dptq.quant import DynamicQuant

torch.set_num_threads(1)
# torchvision 0.29 deprecates its JPEG coder (used by v2.JPEG) in favour of torchcodec
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"
N = models.num_quantizable_layers(ARCH)
SEED = 3  # the training seed: every CSV's first column; the data subsets do not depend on it
PAPER_CELL = "I-A"  # Tables 2 and 3 are computed here too (the highlight rule picks a cell of I-A, I-B)


# --- the layer scan's shared prefix --------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv4_conv_medium", "regnetx_016", "efficientnet_b0"])
def test_a_replayed_run_equals_the_full_run_bit_for_bit(arch):
    model = timm.create_model(arch, num_classes=10).eval()
    quant = DynamicQuant(model, image_size=32)
    n = quant.num_layers
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    bits = torch.randint(3, 9, (4, n)).float()
    masks = [analysis.scan_masks(n, kind, layer) for kind in analysis.SCANS for layer in (1, 2, n // 2, n - 1, n)]
    with torch.no_grad():
        full = [quant(x, bits, mask) for mask in masks]
        with analysis.SharedPrefix(quant) as prefix:
            for reference in ([True] * n, [False] * n):
                assert torch.equal(prefix.reference(lambda: quant(x, bits, reference)), quant(x, bits, reference))
                for mask, expected in zip(masks, full):
                    agree = analysis.agreement(mask, reference)
                    assert torch.equal(prefix.replay(lambda: quant(x, bits, mask), agree), expected), (mask, agree)
        assert torch.equal(quant(x, bits, masks[3]), full[3])  # nothing left behind


def test_a_replay_skips_the_agreeing_prefix():
    """Claiming agreement the run does not have returns the reference's values: the prefix is really skipped."""
    quant = DynamicQuant(timm.create_model("resnet18", num_classes=10).eval(), image_size=32)
    n, x = quant.num_layers, torch.randn(2, 3, 32, 32)
    bits = torch.full((2, n), 3.0)
    calls = []
    quant.layers[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), analysis.SharedPrefix(quant) as prefix:
        quantized = prefix.reference(lambda: quant(x, bits))
        fp = quant(x, bits, [False] * n)
        calls.clear()
        assert torch.equal(prefix.replay(lambda: quant(x, bits, [False] * n), n), quantized)
        assert not calls  # not even the first layer ran
        assert torch.equal(prefix.replay(lambda: quant(x, bits, [False] * n), 0), fp)
        assert calls


@pytest.mark.parametrize("mask,reference,expected", [([1, 1, 0], [1, 1, 1], 2), ([0, 1], [1, 1], 0), ([1, 0], [1, 0], 2)])
def test_agreement_counts_the_leading_equal_layers(mask, reference, expected):
    assert analysis.agreement([bool(m) for m in mask], [bool(r) for r in reference]) == expected


# --- scan masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 20])
def test_scan_masks_match_the_definitions(n):
    for layer in range(1, n + 1):
        before, after, single = (analysis.scan_masks(n, kind, layer) for kind in analysis.SCANS)
        assert [i + 1 for i, m in enumerate(before) if m] == list(range(1, layer + 1))
        assert [i + 1 for i, m in enumerate(after) if m] == list(range(layer, n + 1))
        assert [i + 1 for i, m in enumerate(single) if m] == [layer]
        # layer l is in all three; before and after overlap exactly there and cover everything
        assert [b and a for b, a in zip(before, after)] == single
        assert all(b or a for b, a in zip(before, after))
    assert all(analysis.scan_masks(n, "before", n)) and all(analysis.scan_masks(n, "after", 1))


@pytest.mark.parametrize("kind,layer", [("before", 0), ("after", 6), ("middle", 2)])
def test_scan_masks_refuse_bad_arguments(kind, layer):
    with pytest.raises(ValueError):
        analysis.scan_masks(5, kind, layer)


# --- histogram and sparsity ----------------------------------------------------------------------

def sparsity_and_hist(values, value_range, width):
    """Sparsity (%) and the renormalised histogram of ``values`` without the zero bin, as
    :class:`analysis.LayerHistograms` computes them for one layer's inputs."""
    return analysis.finish_histogram(*analysis.bin_counts(values, value_range, width), value_range)


def test_sparsity_is_the_share_in_the_zero_bin_and_the_rest_is_a_density():
    # 1000 values: 600 exact zeros, 100 tiny positives (also in [0, w)), 200 at 0.5, 50 at 1.5,
    # 50 outside [0, r] (negative or above r): counted in the total, in no bin
    values = torch.cat([torch.zeros(600), torch.full((100,), 0.005), torch.full((200,), 0.5),
                        torch.full((50,), 1.5), torch.full((25,), -0.3), torch.full((25,), 7.0)])
    values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))].view(10, 10, 10)
    sparsity, edges, density = sparsity_and_hist(values, 2.0, 0.02)
    assert sparsity == pytest.approx(70.0)
    assert len(edges) == len(density) + 1 == 100
    assert edges[0].item() == pytest.approx(0.02) and edges[-1].item() == pytest.approx(2.0)
    width = 0.02
    assert (density * width).sum().item() == pytest.approx(1.0)
    mass = dict(zip([round(e, 2) for e in edges[:-1].tolist()], (density * width).tolist()))
    assert mass[0.5] == pytest.approx(0.8) and mass[1.5] == pytest.approx(0.2)


def test_histogram_of_all_zeros_is_fully_sparse_and_finite():
    sparsity, _, density = sparsity_and_hist(torch.zeros(3, 4), 1.0, 0.1)
    assert sparsity == 100.0 and torch.equal(density, torch.zeros(9, dtype=density.dtype))


def test_histogram_needs_two_bins():
    with pytest.raises(ValueError, match="bin_width"):
        sparsity_and_hist(torch.ones(4), 1.0, 0.8)


def test_counts_of_several_batches_add_up_to_the_histogram_of_all():
    values = torch.rand(2, 500, generator=torch.Generator().manual_seed(1)) * 1.5 - 0.2
    (a, n_a), (b, n_b) = (analysis.bin_counts(v, 1.0, 0.1) for v in values)
    assert n_a == n_b == 500 and a.dtype == torch.float64 and len(a) == 10
    together = analysis.finish_histogram(a + b, n_a + n_b, 1.0)
    for got, want in zip(together, sparsity_and_hist(values, 1.0, 0.1)):
        assert got == pytest.approx(want) if isinstance(got, float) else torch.allclose(got, want)


def test_batch_seeds_are_distinct_and_reproducible():
    seeds = {analysis.batch_seed(0, s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and analysis.batch_seed(0, 1, 2) == analysis.batch_seed(0, 1, 2)


# --- end to end on tiny pairs --------------------------------------------------------------------

def tiny_config() -> dict:
    cfg = config.load([ROOT / "config.yaml"], {
        "runtime": {"device": "cpu"},
        "dataset": {"image_size": 16},
        "evaluate": {"batch_size": 8, "highlight_max_fp_gap": 100.0},
        "pairs": {"policy": {"input_size": 16, "width": 4}},
        "analysis": {"corruptions": {"names": ["jpeg", "rotation", "distribution_shift"], "degrees": 2, "seeds": 2},
                     "remedy": {"flag_drop": 0.0}},
    })
    cfg["kd"]["archs"] = [ARCH]
    # the default's per-arch maps do not name the test arch
    cfg["pairs"]["lr"], cfg["pairs"]["epochs"], cfg["pairs"]["alpha"], cfg["kd"]["epochs"] = 0.03, 2, 1.0, 20
    cfg["pairs"]["range_grad"], cfg["pairs"]["objective"]["spread_weight"] = False, 0.0
    cfg["analysis"]["histogram"]["archs"] = [ARCH]
    cfg["pairs"]["versions"], cfg["pairs"]["budget_offset"] = {"I": [3, 10]}, {"I": 0}
    cfg["pairs"]["budgets"] = {"B": 5.5, "A": 4.0}  # out of level order: the tie rule sorts by level
    return config.check(cfg)


def untrained() -> dict:
    """An untrained state dict whose predictions depend on the input: timm zero-initialises the
    last BatchNorm of every residual block, which makes a fresh network nearly constant."""
    model = models.create(ARCH, 10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    return model.state_dict()


def write_checkpoints(cfg: dict, root: Path) -> tuple[Path, list[Path]]:
    """A distilled white box and one pair per cell of ``cfg``: untrained, seeded, 10 classes.
    Each pair's checkpoint holds its cell; the paths are returned in (version, budget, mode) order."""
    n, p = N, cfg["pairs"]
    pc = p["policy"]
    torch.manual_seed(0)
    white = root / "distill.pt"
    checkpoint.save(dict(kind="distill", arch=ARCH, num_classes=10, model=untrained()), white)
    paths = []
    for version, bit_range in p["versions"].items():
        for budget, level in p["budgets"].items():
            options, capacity = budgets.cell(n, bit_range, level, p["budget_offset"][version])
            for mode in p["modes"]:
                cell = dict(version=version, budget=budget, mode=mode, options=options, capacity=capacity, level=level,
                            num_layers=n, policy_input_size=pc["input_size"], policy_width=pc["width"])
                policy = BitPolicy(n, len(options), pc["input_size"], pc["width"])
                paths.append(root / "pair" / version / budget / f"{mode}.pt")
                checkpoint.save(dict(kind="pair", arch=ARCH, num_classes=10, model=untrained(),
                                     policy=policy.state_dict(), cell=cell), paths[-1])
    return white, paths


def start(cfg: dict, seed: int = SEED) -> analysis.Job:
    return analysis.Job.from_config(seed, cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config()
    return (cfg, *write_checkpoints(cfg, root))


@pytest.fixture(scope="module")
def run(checkpoints, tmp_path_factory):
    """evaluate_arch and the four analyses once, on 16 test (and 16 train) images."""
    cfg, white, pairs = checkpoints
    root = tmp_path_factory.mktemp("tiny_run")
    build = data.Data.build
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data.Data, "build", lambda self, split, randaugment=None: Subset(build(self, split, randaugment), range(16)))
        written = {name: root / "tables" / f"{name}.csv" for name in ("table1", "table2", "table3", "hinge")}
        # the B detrimental pair stands in for a hinge-alone pair: its row must repeat Table 1's
        evaluate.evaluate_arch(SEED, ARCH, white, pairs, written, dataset=cfg["dataset"], runtime=cfg["runtime"],
                               quant=cfg["quant"], profits=cfg["pairs"]["policy"]["profits"], paper_cell=PAPER_CELL,
                               hinge_pairs=pairs[1:2],
                               **{k: v for k, v in cfg["evaluate"].items() if k != "effect"})  # the tables job's key
        out, a, table1 = root / "analysis", cfg["analysis"], written["table1"]
        job = start(cfg)
        analysis.layer_scan(job, table1, pairs, out / "layer_scan.csv", max_examples=a["max_examples"], **a["layer_scan"])
        analysis.histograms(job, table1, pairs, out / "histograms.csv", range=a["histogram"]["range"],
                            bin_width=a["histogram"]["bin_width"])
        analysis.corruptions(job, table1, pairs, out / "corruptions.csv", max_examples=a["max_examples"], **a["corruptions"])
        analysis.remedy(job, table1, out / "layer_scan.csv", pairs, white, out / "remedy.csv", **a["remedy"])
        analysis.remedy(job, table1=table1, layer_scan=out / "layer_scan.csv", pairs=pairs, network=None,
                        out=out / "remedy_without_white_box.csv", **a["remedy"])
    read = lambda path: pd.read_csv(path, dtype={"version": str, "budget": str, "options": str})  # noqa: E731
    return cfg, {p.stem: read(p) for p in [*written.values(), *out.glob("*.csv")]}


def test_every_csv_starts_with_the_training_seed(run):
    _, t = run
    assert len(t) == 9
    for name, table in t.items():
        assert table.columns[0] == "seed" and (table["seed"] == SEED).all(), name


def test_evaluate_arch_hinge_pairs_get_table1s_columns_and_numbers(run):
    _, t = run
    assert list(t["hinge"].columns) == tables.HINGE_COLUMNS
    row = t["table1"].iloc[[1]][tables.HINGE_COLUMNS].reset_index(drop=True)
    assert row[["budget", "mode"]].values.tolist() == [["B", "detrimental"]]
    pd.testing.assert_frame_equal(t["hinge"], row)


def in_percent(series) -> bool:
    # accuracies over 16 images are multiples of 6.25 %
    return bool(((series >= 0) & (series <= 100) & ((series / 6.25).round(6) % 1 == 0)).all())


def test_evaluate_arch_tables(run):
    cfg, t = run
    t1, t2, t3 = t["table1"], t["table2"], t["table3"]
    assert list(t1.columns) == tables.TABLE1_COLUMNS
    assert len(t1) == 4 and set(t1["options"]) == {"3-10"} and set(t1["capacity"]) == {round(4.0 * N), round(5.5 * N)}
    # the rows in the order of the pair checkpoints given, each labelled with the cell its checkpoint holds
    assert list(zip(t1["budget"], t1["mode"])) == [("B", "robust"), ("B", "detrimental"), ("A", "robust"), ("A", "detrimental")]
    assert dict(zip(t1["budget"], t1["capacity"])) == {"A": round(4.0 * N), "B": round(5.5 * N)}
    assert in_percent(t1["fp_acc"]) and in_percent(t1["q_acc"]) and in_percent(t1["white_box_acc"])
    assert (t1["delta"] - (t1["q_acc"] - t1["fp_acc"])).abs().max() < 1e-9
    hl = t1[t1["highlighted"]]
    assert len(hl) == 2 and set(hl["mode"]) == {"robust", "detrimental"} and hl["budget"].nunique() == 1
    # Tables 2 and 3 at the highlighted cell and at the paper's (a third cell, not trained here, is skipped)
    highlighted = (hl["version"].iloc[0], hl["budget"].iloc[0])
    paper = tuple(PAPER_CELL.split("-"))
    cells = list(dict.fromkeys([highlighted, paper]))
    assert list(t2.columns) == tables.TABLE2_COLUMNS and list(zip(t2["version"], t2["budget"])) == cells
    assert t2["highlighted"].tolist() == [c == highlighted for c in cells]
    assert t2["paper_cell"].tolist() == [c == paper for c in cells]
    assert ((t2["transitory_pct"] >= 0) & (t2["transitory_pct"] <= 100)).all()
    assert list(t3.columns) == tables.TABLE3_COLUMNS and len(t3) == 9 * len(cells)
    for (version, budget), at in t3.groupby(["version", "budget"], sort=False):
        assert set(zip(at["network"], at["policy"])) == {(n, p) for n in ("white_box", "robust", "detrimental")
                                                        for p in ("robust", "detrimental", "random")}
        # the own-policy entries of Table 3 are Table 1's rows of that cell
        rows = t1[(t1["version"] == version) & (t1["budget"] == budget)]
        for mode in ("robust", "detrimental"):
            row = at[(at["network"] == mode) & (at["policy"] == mode)].iloc[0]
            assert row["q_acc"] == pytest.approx(rows[rows["mode"] == mode]["q_acc"].item())
            assert row["fp_acc"] == pytest.approx(rows[rows["mode"] == mode]["fp_acc"].item())
    assert (t3[t3["network"] == "white_box"]["fp_acc"] == t1["white_box_acc"].iloc[0]).all()


def test_layer_scan_csv(run):
    _, t = run
    scan = t["layer_scan"]
    assert list(scan.columns) == analysis.LAYER_SCAN_COLUMNS
    assert len(scan) == 2 * 2 * 3 * N  # networks × splits × scans × layers
    assert set(scan["split"]) == {"train", "test"} and scan["layer"].between(1, N).all()
    assert (scan["relative_depth"] - scan["layer"] / N).abs().max() < 1e-12 and in_percent(scan["acc"])
    # before at l = N and after at l = 1 both quantize every layer: Table 1's Q on the test split
    hl = t["table1"][t["table1"]["highlighted"]].set_index("mode")
    for (network, split), g in scan.groupby(["network", "split"]):
        full = g[(g["scan"] == "before") & (g["layer"] == N)]["acc"].item()
        assert g[(g["scan"] == "after") & (g["layer"] == 1)]["acc"].item() == full
        if split == "test":
            assert full == pytest.approx(hl.loc[network, "q_acc"])


def test_histograms_csv(run):
    cfg, t = run
    h = t["histograms"]
    assert list(h.columns) == analysis.HISTOGRAM_COLUMNS
    bins = round(cfg["analysis"]["histogram"]["range"] / cfg["analysis"]["histogram"]["bin_width"]) - 1
    assert len(h) == 2 * 2 * N * bins and set(h["precision"]) == {"fp", "q"}
    assert h["sparsity"].between(0, 100).all() and (h["density"] >= 0).all() and (h["bin_left"] >= 0.02 - 1e-9).all()
    mass = (h["density"] * (h["bin_right"] - h["bin_left"])).groupby([h["network"], h["precision"], h["layer"]]).sum()
    assert mass.map(lambda m: abs(m - 1) < 1e-6 or m == 0).all()  # 0: nothing outside the zero bin
    # the q histograms count the fake-quantized inputs (3..10 bits), not the FP ones
    wide = h.set_index(["network", "layer", "bin_left", "precision"])["density"].unstack("precision")
    changed = (wide["q"] - wide["fp"]).abs().groupby(level=["network", "layer"]).max() > 1e-6
    assert changed.mean() > 0.5


def test_corruptions_csv(run):
    cfg, t = run
    c = t["corruptions"]
    assert list(c.columns) == analysis.CORRUPTION_COLUMNS
    names, seeds, degrees = 3, 2, 2
    assert len(c) == 2 * 2 * names * seeds * (degrees + 1)
    assert set(c["degree"]) == {0, 1, 2} and set(c["corruption_seed"]) == {0, 1} and in_percent(c["acc"])
    clean = c[c["degree"] == 0].groupby(["network", "precision"])["acc"]
    assert (clean.nunique() == 1).all()  # degree 0 is the one clean measurement: Table 1's
    hl = t["table1"][t["table1"]["highlighted"]].set_index("mode")
    for (network, precision), acc in clean.first().items():
        assert acc == pytest.approx(hl.loc[network, f"{precision}_acc"])


def test_remedy_csv(run):
    cfg, t = run
    r, t1 = t["remedy"], t["table1"]
    assert list(r.columns) == analysis.REMEDY_COLUMNS
    assert set(r["setting"]) == {"minmax", "minmax_keep_flagged", "percentile", "percentile_keep_flagged"}
    assert len(r) == 4 * 4 and in_percent(r["q_acc"]) and in_percent(r["fp_acc"])
    hl = t1[t1["highlighted"]].set_index("mode")
    for mode in ("robust", "detrimental"):
        own = r[(r["network"] == mode) & (r["policy"] == mode)].set_index("setting")
        # the paper's setting reproduces Table 1; FP is the same in every row
        assert own.loc["minmax", "q_acc"] == pytest.approx(hl.loc[mode, "q_acc"])
        assert (own["fp_acc"] == hl.loc[mode, "fp_acc"]).all()
        assert own.loc["minmax", "flagged_layers"] == "none"
    # without the white box checkpoint, its rows are left out and the others are unchanged
    assert t["remedy_without_white_box"].equals(r[r["network"] != "white_box"].reset_index(drop=True))
    kept = r[r["keep_flagged"]]["flagged_layers"]
    assert kept.map(lambda s: s == "none" or all(1 <= int(v) <= N for v in s.split(";"))).all()


def test_flagged_layers(run):
    """Flagged: the single-scan drop on the test split above flag_drop; the test split is required."""
    cfg, t = run
    scan = t["layer_scan"].assign(acc=-1000.0)
    flagged = analysis.flagged_layers(scan, ARCH, "detrimental", fp_acc=50.0, flag_drop=5.0)
    assert flagged == list(range(1, N + 1))
    assert analysis.flagged_layers(t["layer_scan"].assign(acc=50.0), ARCH, "robust", 50.0, 5.0) == []
    with pytest.raises(ValueError, match="layer_scan.splits"):
        analysis.flagged_layers(scan[scan["split"] == "train"], ARCH, "robust", 50.0, 5.0)


# --- the highlighted pairs, their bits, and the seeded subsets -----------------------------------

def test_highlighted_pairs_are_found_by_the_cell_each_checkpoint_holds(run, checkpoints, tmp_path):
    cfg, _, pairs = checkpoints
    job = start(cfg)
    table1 = tmp_path / "table1.csv"
    t1 = run[1]["table1"]
    t1.to_csv(table1, index=False)
    loaded = analysis.highlighted_pairs(job, table1, list(reversed(pairs)))  # any order
    budget = t1.loc[t1["highlighted"], "budget"].iloc[0]
    assert list(loaded) == ["robust", "detrimental"]
    for mode, pair in loaded.items():
        assert (pair.cell["version"], pair.cell["budget"], pair.cell["mode"]) == ("I", budget, mode)
    x = torch.rand(3, 3, 16, 16)
    b = analysis.bits(loaded["detrimental"], x, job)
    assert b.shape == (3, N) and (b.sum(1) == loaded["detrimental"].capacity).all()
    assert set(b.unique().tolist()) <= set(loaded["detrimental"].options)
    others = [p for p in pairs if checkpoint.cell(p)["budget"] != budget or checkpoint.cell(p)["mode"] != "detrimental"]
    with pytest.raises(ValueError, match=rf"highlighted cell I-{budget} has no \['detrimental'\] pair among the 3 checkpoints"):
        analysis.highlighted_pairs(job, table1, others)
    t1.assign(highlighted=False).to_csv(table1, index=False)
    with pytest.raises(ValueError, match="expected one highlighted cell.*found 0 highlighted rows"):
        analysis.highlighted_pairs(job, table1, pairs)


def test_analysis_subsets_depend_on_the_split_seed_not_the_training_seed():
    cfg = tiny_config()
    subset = lambda job: analysis.subset_loader(job, "test", 150).dataset.indices  # noqa: E731
    first = subset(start(cfg, seed=0))
    assert len(first) == 150 and first == subset(start(cfg, seed=7))
    other = config.merge(cfg, {"dataset": {"split_seed": 1}})
    assert first != subset(start(other, seed=0))
