"""dptq.tables: the highlight rule, the seeds' summary with its t-interval, and table merging, on
hand-made tables (the end-to-end run of evaluate_arch is in test_analysis.py)."""
import dataclasses
import math
import warnings

import pandas as pd
import pytest

from dptq import claims, tables

def table(cells: dict, arch: str = "rn", seed: int = 0) -> pd.DataFrame:
    """Table 1 rows from {(version, budget): (fp_R, delta_R, fp_D, delta_D)}."""
    rows = []
    for (version, budget), (fp_r, d_r, fp_d, d_d) in cells.items():
        for mode, fp, delta in (("robust", fp_r, d_r), ("detrimental", fp_d, d_d)):
            rows.append(dict(seed=seed, arch=arch, version=version, budget=budget, mode=mode, fp_acc=fp, q_acc=fp + delta,
                             delta=delta))
    return pd.DataFrame(rows)


def test_highlight_maximises_the_delta_gap_within_the_fp_gap():
    t = table({("I", "A"): (88.0, -1.0, 86.0, -40.0),   # best objective, but FP gap 2.0 > 1.0
               ("II", "B"): (88.2, -0.2, 88.1, -24.4),  # objective 24.2, gap 0.1
               ("III", "C"): (87.9, 0.1, 87.5, -10.0)})  # objective 10.1
    assert tables.highlight(t, 1.0) == ("II", "B")
    assert tables.highlight(t, 2.0) == ("I", "A")  # the gap is inclusive


def test_highlight_ties_go_to_the_lower_budget_then_the_earlier_version():
    same = (88.0, -1.0, 88.0, -21.0)
    t = table({("II", "B"): same, ("III", "A"): same, ("I", "B"): same})
    assert tables.highlight(t, 1.0) == ("III", "A")  # sorted labels: A before B
    assert tables.highlight(t, 1.0, budget_order=["B", "A"]) == ("I", "B")  # then version I before II
    assert tables.highlight(t, 1.0, budget_order=["B", "A"], version_order=["II", "I", "III"]) == ("II", "B")


def test_highlight_ties_ignore_float_noise():
    # 0.1 + 0.2 != 0.3 in floats; the two cells have the same objective to nine decimals
    t = table({("I", "B"): (90.0, 0.1 + 0.2, 90.0, 0.0), ("I", "A"): (90.0, 0.3, 90.0, 0.0)})
    assert tables.highlight(t, 1.0) == ("I", "A")


def test_highlight_falls_back_to_the_smallest_fp_gap_with_a_warning():
    t = table({("I", "A"): (90.0, 0.0, 80.0, -50.0), ("I", "B"): (90.0, 0.0, 87.0, -5.0), ("II", "B"): (90.0, 0.0, 87.0, -9.0)})
    with pytest.warns(UserWarning, match="smallest gap"):
        assert tables.highlight(t, 1.0) == ("II", "B")  # gap 3.0 twice: the larger objective wins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tables.highlight(t, 10.0) == ("I", "A")


def test_highlight_skips_incomplete_cells_and_refuses_bad_tables():
    t = table({("I", "A"): (88.0, 0.0, 88.0, -5.0), ("I", "B"): (88.0, 0.0, 88.0, -50.0)})
    t = t[~((t["budget"] == "B") & (t["mode"] == "detrimental"))]  # I-B lost its detrimental pair
    assert tables.highlight(t, 1.0) == ("I", "A")
    with pytest.raises(ValueError, match="robust and detrimental"):
        tables.highlight(t[t["mode"] == "robust"], 1.0)
    with pytest.raises(ValueError, match="one arch"):
        tables.highlight(pd.concat([t, t.assign(arch="other")]), 1.0)
    with pytest.raises(ValueError, match="more than one row"):
        tables.highlight(pd.concat([t, t]), 1.0)


def test_budget_order_follows_the_levels():
    assert tables.budget_order({"C": 7.0, "A": 4.0, "X": 4.0, "B": 5.5}) == ["A", "X", "B", "C"]


# --- the seeds' summary and the merged tables ---------------------------------------------------

def test_ci95_is_the_student_t_half_width():
    # n = 3, s = 1: t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    assert tables.ci95(pd.Series([1.0, 2.0, 3.0])) == pytest.approx(2.4841, abs=1e-4)
    # n = 2, s = sqrt(2): t_{0.975, 1} · sqrt(2) / sqrt(2) = 12.7062
    assert tables.ci95(pd.Series([0.0, 2.0])) == pytest.approx(12.7062, abs=1e-4)
    assert tables.ci95(pd.Series([5.0, 5.0, 5.0])) == 0.0
    assert math.isnan(tables.ci95(pd.Series([88.0])))


LEVELS = {"B": 5.5, "A": 4.0}
EFFECT = claims.Bar(min_detrimental_drop=20.0, max_robust_drop=3.0, max_fp_gap=2.0, max_white_box_gap=3.0,
              min_white_box_acc=90.0, max_cross_policy_drop=5.0)


def summarize(t1, max_fp_gap=1.0):
    return tables.summarize(t1, max_fp_gap, LEVELS, claims.effect(t1, EFFECT))


def full_table1(cells: dict, arch: str = "rn", seed: int = 0, white_box_acc: float = 90.0) -> pd.DataFrame:
    """A complete Table 1 (every column) of one arch and seed; ``highlighted`` marks nothing."""
    t = table(cells, arch, seed)
    return t.assign(options=t["version"].map({"I": "3-10", "II": "4-10"}),
                    capacity=t["budget"].map({"A": 80, "B": 110}), highlighted=False,
                    white_box_acc=white_box_acc)[tables.TABLE1_COLUMNS]


def three_seeds(arch: str = "rn") -> pd.DataFrame:
    """Seed 0 alone highlights I-A (objective 30 against 10); on the means II-B wins (10 2/3 against 10)."""
    per_seed = [{("I", "A"): (88.0, -1.0, 87.5, -31.0), ("II", "B"): (88.0, -1.0, 88.0, -11.0)},
                {("I", "A"): (89.0, 0.0, 88.5, 0.0), ("II", "B"): (88.0, 0.0, 88.0, -12.0)},
                {("I", "A"): (90.0, -2.0, 89.5, -2.0), ("II", "B"): (88.0, -2.0, 88.0, -12.0)}]
    return pd.concat([full_table1(cells, arch, seed, 90.0 + seed) for seed, cells in enumerate(per_seed)], ignore_index=True)


def test_summary_over_three_seeds_highlights_on_the_means():
    t1 = three_seeds()
    assert tables.highlight(t1[t1["seed"] == 0], 1.0, ["A", "B"]) == ("I", "A")
    summary = summarize(t1)
    assert list(summary.columns) == tables.SUMMARY_COLUMNS and len(summary) == 4
    assert (summary["n_seeds"] == 3).all()
    row = summary.set_index(["version", "budget", "mode"]).loc[("I", "A", "robust")]
    assert (row["options"], row["capacity"]) == ("3-10", 80)
    assert row["fp_acc_mean"] == pytest.approx(89.0) and row["fp_acc_ci95"] == pytest.approx(2.4841, abs=1e-4)
    assert row["delta_mean"] == pytest.approx(-1.0) and row["q_acc_mean"] == pytest.approx(88.0)
    assert row["white_box_acc_mean"] == pytest.approx(91.0) and row["white_box_acc_ci95"] == pytest.approx(2.4841, abs=1e-4)
    detrimental = summary.set_index(["version", "budget", "mode"]).loc[("II", "B", "detrimental")]
    assert detrimental["delta_mean"] == pytest.approx(-35 / 3) and detrimental["fp_acc_ci95"] == 0.0
    highlighted = summary[summary["highlighted"]]
    assert set(zip(highlighted["version"], highlighted["budget"])) == {("II", "B")} and len(highlighted) == 2
    # only seed 0's I-A meets the effect (D -31 <= -20, R -1, gap 0.5, FP within 2.5 of W = 90, W >= 90)
    meeting = summary.set_index(["version", "budget", "mode"])["seeds_meeting_effect"]
    assert meeting.to_dict() == {("I", "A", "robust"): 1, ("I", "A", "detrimental"): 1,
                                 ("II", "B", "robust"): 0, ("II", "B", "detrimental"): 0}


def test_summary_of_one_seed_has_no_interval():
    summary = summarize(three_seeds().query("seed == 1"))
    assert (summary["n_seeds"] == 1).all() and summary["delta_ci95"].isna().all()
    assert summary.loc[summary["highlighted"], "version"].unique().tolist() == ["II"]


def test_the_bit_floor_is_the_summarys_single_option_versions():
    """Versions 8 (options 8-8) and 5 (5-5) give every layer one bit-width; version I (3-10) does not."""
    t1 = three_seeds()
    t1 = pd.concat([t1, t1[t1["version"] == "II"].assign(version="8", options="8-8"),
                    t1[t1["version"] == "II"].assign(version="5", options="5-5")], ignore_index=True)
    floor = tables.bit_floor(summarize(t1))
    assert list(floor.columns) == tables.BIT_FLOOR_COLUMNS
    assert floor[["bits", "mode"]].values.tolist() == [[8, "robust"], [8, "detrimental"], [5, "robust"], [5, "detrimental"]]
    row = floor.set_index(["bits", "mode"]).loc[(5, "detrimental")]
    assert row["delta_mean"] == pytest.approx(-35 / 3) and row["n_seeds"] == 3 and row["version"] == "5"
    assert tables.bit_floor(summarize(three_seeds())).empty


def write_tables(folder, arch, seed=0, t1=None):
    folder.mkdir()
    if t1 is None:
        t1 = full_table1({("I", "A"): (88.0, -1.0, 87.5, -20.0)}, arch, seed, 88.1).assign(highlighted=True)
    t1[tables.TABLE1_COLUMNS].to_csv(folder / "table1.csv", index=False)
    at = dict(seed=seed, arch=arch, version="I", budget="A", highlighted=True, paper_cell=False)
    pd.DataFrame([dict(at, transitory_pct=12.5)]).to_csv(folder / "table2.csv", index=False)
    pd.DataFrame([dict(at, network="robust", policy="random", q_acc=80.0, fp_acc=88.0)]).to_csv(
        folder / "table3.csv", index=False)
    # a hinge-alone pair beside seed 1's D only; the others wrote the header alone
    hinge = t1[(t1["mode"] == "detrimental") & (t1["seed"] == 1)].assign(delta=-2.0)
    hinge[tables.HINGE_COLUMNS].to_csv(folder / "hinge.csv", index=False)
    return [folder / f"table{i}.csv" for i in (1, 2, 3)]


def merge(folders, out):
    """merge_tables on the tables of ``folders``, written under ``out``."""
    names = ("table1", "summary", "table2", "table3", "hinge", "effect", "bit_floor")
    tables.merge_tables(*([f / f"{name}.csv" for f in folders] for name in ("table1", "table2", "table3", "hinge")),
                        {n: out / f"{n}.csv" for n in names},
                        highlight_max_fp_gap=1.0, budget_levels=LEVELS, effect=dataclasses.asdict(EFFECT))


def test_merge_tables(tmp_path):
    write_tables(tmp_path / "a", "rn")
    write_tables(tmp_path / "b", "mnv4")
    write_tables(tmp_path / "c", "rn", seed=1)
    merge([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "all")
    t1 = tables.read_table(tmp_path / "all" / "table1.csv")
    assert list(t1.columns) == tables.TABLE1_COLUMNS and list(t1["arch"]) == ["rn", "rn", "mnv4", "mnv4", "rn", "rn"]
    assert t1["seed"].tolist() == [0, 0, 0, 0, 1, 1]
    assert t1["options"].tolist() == ["3-10"] * 6 and t1["highlighted"].all()
    t2 = pd.read_csv(tmp_path / "all" / "table2.csv")
    assert list(t2.columns) == tables.TABLE2_COLUMNS and list(t2["arch"]) == ["rn", "mnv4", "rn"]
    assert list(pd.read_csv(tmp_path / "all" / "table3.csv").columns) == tables.TABLE3_COLUMNS
    hinge = tables.read_table(tmp_path / "all" / "hinge.csv")
    assert list(hinge.columns) == tables.HINGE_COLUMNS
    assert hinge[["seed", "arch", "mode", "delta"]].values.tolist() == [[1, "rn", "detrimental", -2.0]]
    summary = tables.read_table(tmp_path / "all" / "summary.csv")
    assert list(summary.columns) == tables.SUMMARY_COLUMNS
    assert dict(zip(summary["arch"], summary["n_seeds"])) == {"rn": 2, "mnv4": 1} and summary["highlighted"].all()
    pd.DataFrame([dict(arch="rn", pct=1.0)]).to_csv(tmp_path / "b" / "table2.csv", index=False)
    with pytest.raises(ValueError, match=r"b/table2\.csv: columns .* expected .*re-run the evaluate job"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "all")


def test_merged_summary_highlights_each_arch_on_its_means(tmp_path):
    folders = []
    for arch in ("rn", "mnv4"):
        t1 = three_seeds(arch)
        for seed in range(3):
            folders.append(tmp_path / f"{arch}{seed}")
            write_tables(folders[-1], arch, seed, t1[t1["seed"] == seed])
    merge(folders, tmp_path / "all")
    summary = tables.read_table(tmp_path / "all" / "summary.csv")
    assert len(summary) == 8 and (summary["n_seeds"] == 3).all()
    for arch, rows in summary.groupby("arch"):
        assert set(zip(rows.loc[rows["highlighted"], "version"], rows.loc[rows["highlighted"], "budget"])) == {("II", "B")}
    effect = tables.read_table(tmp_path / "all" / "effect.csv")
    assert list(effect.columns) == claims.EFFECT_COLUMNS and len(effect) == 12  # 2 archs x 3 seeds x 2 cells
    assert set(zip(effect.loc[effect["highlighted"], "version"], effect.loc[effect["highlighted"], "budget"])) == {("II", "B")}
    assert effect["highlighted"].sum() == 6
    assert effect.loc[effect["meets"], ["seed", "version"]].drop_duplicates().values.tolist() == [[0, "I"]]
