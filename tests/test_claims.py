"""dptq.claims: the effect, the cross-policy claims and the failure depth, on hand-made tables."""
import pandas as pd
import pytest

from dptq import claims

EFFECT = claims.Bar(min_detrimental_drop=20.0, max_robust_drop=3.0, max_fp_gap=2.0, max_white_box_gap=3.0,
              min_white_box_acc=90.0, max_cross_policy_drop=5.0)


def table1(cells: dict, seed: int = 0, white: float = 92.0) -> pd.DataFrame:
    """Rows from {budget: (fp_R, delta_R, fp_D, delta_D)} of version I, arch "rn"."""
    rows = []
    for budget, (fp_r, d_r, fp_d, d_d) in cells.items():
        for mode, fp, delta in (("robust", fp_r, d_r), ("detrimental", fp_d, d_d)):
            rows.append(dict(seed=seed, arch="rn", version="I", budget=budget, mode=mode, fp_acc=fp, q_acc=fp + delta,
                             delta=delta, white_box_acc=white))
    return pd.DataFrame(rows)


def test_effect_checks_every_condition_inclusively():
    t = table1({"ok": (91.0, -3.0, 89.0, -20.0),          # every bound met with equality (gap 2, |89 - 92| = 3)
                "weak_d": (91.0, -1.0, 91.0, -19.9),      # D loses too little
                "weak_r": (91.0, -3.1, 91.0, -40.0),      # R loses too much
                "fp_gap": (91.5, 0.0, 89.4, -40.0),       # |FP_R - FP_D| = 2.1
                "far_from_w": (88.9, 0.0, 88.9, -40.0)})  # both 3.1 below W
    out = claims.effect(t, EFFECT).set_index("budget")
    assert list(claims.effect(t, EFFECT).columns) == claims.EFFECT_COLUMNS
    assert out["meets"].to_dict() == {"ok": True, "weak_d": False, "weak_r": False, "fp_gap": False, "far_from_w": False}
    assert out.loc["fp_gap", "fp_gap"] == pytest.approx(2.1) and not out["highlighted"].any()
    low_w = claims.effect(table1({"ok": (89.0, 0.0, 89.0, -40.0)}, white=89.9), EFFECT)
    assert not low_w["meets"].any()  # W below 90
    # float noise: 0.1 + 0.2 - 3.3 is -3.0000000000000004, still -3 to nine decimals
    assert claims.effect(table1({"ok": (91.0, 0.1 + 0.2 - 3.3, 91.0, -30.0)}), EFFECT)["meets"].all()


def test_effect_skips_cells_without_both_modes():
    t = table1({"A": (91.0, 0.0, 91.0, -30.0), "B": (91.0, 0.0, 91.0, -30.0)})
    t = t[~((t["budget"] == "B") & (t["mode"] == "robust"))]
    assert claims.effect(t, EFFECT)["budget"].tolist() == ["A"]


def table3(seed: int, d_own: float, d_r: float, d_rand: float, w_d: float, r_d: float,
           cell=("II", "B"), highlighted=True, paper_cell=False) -> pd.DataFrame:
    fp = {"white_box": 92.0, "robust": 91.0, "detrimental": 90.0}
    q = {("white_box", "robust"): 92.0, ("white_box", "detrimental"): w_d, ("white_box", "random"): 91.0,
         ("robust", "robust"): 90.5, ("robust", "detrimental"): r_d, ("robust", "random"): 90.0,
         ("detrimental", "robust"): d_r, ("detrimental", "detrimental"): d_own, ("detrimental", "random"): d_rand}
    return pd.DataFrame([dict(seed=seed, arch="rn", version=cell[0], budget=cell[1], highlighted=highlighted,
                              paper_cell=paper_cell, network=n, policy=p, q_acc=v, fp_acc=fp[n]) for (n, p), v in q.items()])


def test_cross_policy_claims_per_seed_and_cell():
    t3 = pd.concat([table3(0, 40.0, 60.0, 61.0, 87.0, 86.0),     # 20 below both; W and R within 5
                    table3(1, 40.0, 59.9, 80.0, 87.0, 86.0),     # 19.9 below D with π_R
                    table3(2, 40.0, 80.0, 80.0, 86.9, 91.0),     # W with π_D 5.1 below its FP
                    table3(3, 40.0, 40.0, 40.0, 87.0, 86.0),     # one allocation: every policy gives it
                    table3(3, 40.0, 70.0, 70.0, 92.0, 91.0, ("I", "A"), False, True)])  # seed 3 at the paper's cell
    choice = {(0, "rn", "II", "B"): True, (1, "rn", "II", "B"): True, (2, "rn", "II", "B"): True,
              (3, "rn", "II", "B"): False, (3, "rn", "I", "A"): True}
    out = claims.cross_policy(t3, EFFECT, choice)
    assert list(out.columns) == claims.CROSS_POLICY_COLUMNS
    assert out["collapse_needs_both"].tolist() == [True, False, True, None, True]  # not applicable, not a miss
    assert out["others_hold"].tolist() == [True, True, False, True, True]  # judged with or without a choice
    assert out["policy_has_choice"].tolist() == [True, True, True, False, True]
    assert out.loc[0, ["d_own", "d_with_robust_policy", "w_fp", "r_with_d_policy"]].tolist() == [40.0, 60.0, 92.0, 86.0]
    assert out.loc[4, ["seed", "version", "budget", "highlighted", "paper_cell"]].tolist() == [3, "I", "A", False, True]


def test_the_policy_has_a_choice_unless_one_allocation_fits():
    n = 20
    assert claims.policy_has_choice("4-10", 130, n)          # II-B: C = 6.5 N
    assert claims.policy_has_choice("5-10", 101, n)          # one bit above every layer at 5
    assert not claims.policy_has_choice("5-10", 100, n)      # III-A: C = 5 N, every layer at its lowest
    assert not claims.policy_has_choice("5-10", 200, n)      # C = 10 N, every layer at its highest
    assert not claims.policy_has_choice("8-8", 160, n)       # one option (the bit floor)


def test_choice_is_read_at_every_cell_of_table_1():
    """II-B leaves a choice, III-A (C = 5 N) none, on every seed."""
    rows = [dict(seed=seed, arch="rn", version=v, budget=b, mode=mode, options=o, capacity=c, highlighted=False)
            for seed in (0, 1)
            for v, b, o, c in (("II", "B", "4-10", 130), ("III", "A", "5-10", 100))
            for mode in ("robust", "detrimental")]
    choice = claims.choice_at_cells(pd.DataFrame(rows), {"rn": 20})
    assert choice == {(s, "rn", v, b): (v, b) == ("II", "B") for s in (0, 1) for v, b in (("II", "B"), ("III", "A"))}
    # the same cells with N = 19: 100 bits is five above every layer at 5, so III-A has a choice too
    assert all(claims.choice_at_cells(pd.DataFrame(rows), {"rn": 19}).values())


def test_failure_depth_takes_ds_lowest_single_layer_accuracies():
    rows = []
    for network, accs in (("detrimental", [80.0, 30.0, 50.0, 30.0, 90.0]), ("robust", [89.0, 88.0, 87.0, 86.0, 85.0])):
        for layer, acc in enumerate(accs, 1):
            for split, scan, shift in (("test", "single", 0.0), ("train", "single", -50.0), ("test", "before", -60.0)):
                rows.append(dict(seed=0, arch="rn", network=network, split=split, scan=scan, layer=layer,
                                 relative_depth=layer / 5, acc=acc + shift))
    out = claims.failure_depth(pd.DataFrame(rows), top=3)
    assert list(out.columns) == claims.DEPTH_COLUMNS
    assert out["layer"].tolist() == [2, 4, 3]  # the tie at 30 goes to the earlier layer
    assert out["d_acc"].tolist() == [30.0, 30.0, 50.0] and out["r_acc"].tolist() == [88.0, 86.0, 87.0]
    assert out["relative_depth"].tolist() == pytest.approx([0.4, 0.8, 0.6])
