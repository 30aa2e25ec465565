"""dptq.evaluate: the highlight rule, transitory points, table merging and the stale-checkpoint check,
on hand-made tables (the end-to-end run of evaluate_arch is in test_analysis.py)."""
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from dptq import checkpoint, config, evaluate, models
from dptq.policy import BitPolicy

torch.set_num_threads(1)


def table(cells: dict, arch: str = "rn") -> pd.DataFrame:
    """Table 1 rows from {(version, budget): (fp_R, delta_R, fp_D, delta_D)}."""
    rows = []
    for (version, budget), (fp_r, d_r, fp_d, d_d) in cells.items():
        for mode, fp, delta in (("robust", fp_r, d_r), ("detrimental", fp_d, d_d)):
            rows.append(dict(arch=arch, version=version, budget=budget, mode=mode, fp_acc=fp, q_acc=fp + delta, delta=delta))
    return pd.DataFrame(rows)


def test_highlight_maximises_the_delta_gap_within_the_fp_gap():
    t = table({("I", "A"): (88.0, -1.0, 86.0, -40.0),   # best objective, but FP gap 2.0 > 1.0
               ("II", "B"): (88.2, -0.2, 88.1, -24.4),  # objective 24.2, gap 0.1
               ("III", "C"): (87.9, 0.1, 87.5, -10.0)})  # objective 10.1
    assert evaluate.highlight(t, 1.0) == ("II", "B")
    assert evaluate.highlight(t, 2.0) == ("I", "A")  # the gap is inclusive


def test_highlight_ties_go_to_the_lower_budget_then_the_earlier_version():
    same = (88.0, -1.0, 88.0, -21.0)
    t = table({("II", "B"): same, ("III", "A"): same, ("I", "B"): same})
    assert evaluate.highlight(t, 1.0) == ("III", "A")  # sorted labels: A before B
    assert evaluate.highlight(t, 1.0, budget_order=["B", "A"]) == ("I", "B")  # then version I before II
    assert evaluate.highlight(t, 1.0, budget_order=["B", "A"], version_order=["II", "I", "III"]) == ("II", "B")


def test_highlight_ties_ignore_float_noise():
    # 0.1 + 0.2 != 0.3 in floats; the two cells have the same objective to nine decimals
    t = table({("I", "B"): (90.0, 0.1 + 0.2, 90.0, 0.0), ("I", "A"): (90.0, 0.3, 90.0, 0.0)})
    assert evaluate.highlight(t, 1.0) == ("I", "A")


def test_highlight_falls_back_to_the_smallest_fp_gap_with_a_warning():
    t = table({("I", "A"): (90.0, 0.0, 80.0, -50.0), ("I", "B"): (90.0, 0.0, 87.0, -5.0), ("II", "B"): (90.0, 0.0, 87.0, -9.0)})
    with pytest.warns(UserWarning, match="smallest gap"):
        assert evaluate.highlight(t, 1.0) == ("II", "B")  # gap 3.0 twice: the larger objective wins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate.highlight(t, 10.0) == ("I", "A")


def test_highlight_skips_incomplete_cells_and_refuses_bad_tables():
    t = table({("I", "A"): (88.0, 0.0, 88.0, -5.0), ("I", "B"): (88.0, 0.0, 88.0, -50.0)})
    t = t[~((t["budget"] == "B") & (t["mode"] == "detrimental"))]  # I-B lost its detrimental pair
    assert evaluate.highlight(t, 1.0) == ("I", "A")
    with pytest.raises(ValueError, match="robust and detrimental"):
        evaluate.highlight(t[t["mode"] == "robust"], 1.0)
    with pytest.raises(ValueError, match="one arch"):
        evaluate.highlight(pd.concat([t, t.assign(arch="other")]), 1.0)
    with pytest.raises(ValueError, match="more than one row"):
        evaluate.highlight(pd.concat([t, t]), 1.0)


def test_budget_order_follows_the_levels():
    cfg = {"pairs": {"budgets": {"C": 7.0, "A": 4.0, "X": 4.0, "B": 5.5}}}
    assert evaluate.budget_order(cfg) == ["A", "X", "B", "C"]


def test_transitory_points_by_hand():
    fp_r = [1, 1, 1, 0, 1, 1, 0, 1]
    fp_d = [1, 1, 0, 1, 1, 1, 0, 1]
    q_d = [0, 1, 0, 0, 0, 1, 0, 1]
    # both FP right and Q_D wrong: examples 0 and 4 -> 2 of 8
    assert evaluate.transitory_pct(torch.tensor(fp_r).bool(), torch.tensor(fp_d).bool(), torch.tensor(q_d).bool()) == 25.0
    assert evaluate.transitory_pct([True] * 4, [True] * 4, [True] * 4) == 0.0
    with pytest.raises(ValueError, match="one length"):
        evaluate.transitory_pct([True], [True, False], [True])


def write_tables(folder, arch):
    folder.mkdir()
    t1 = table({("I", "A"): (88.0, -1.0, 87.5, -20.0)}, arch).assign(options="3-10", capacity=80, highlighted=True, white_box_acc=88.1)
    t1[evaluate.TABLE1_COLUMNS].to_csv(folder / "table1.csv", index=False)
    pd.DataFrame([dict(arch=arch, transitory_pct=12.5)]).to_csv(folder / "table2.csv", index=False)
    pd.DataFrame([dict(arch=arch, network="robust", policy="random", q_acc=80.0, fp_acc=88.0)]).to_csv(folder / "table3.csv", index=False)


def test_merge_tables(tmp_path):
    write_tables(tmp_path / "a", "rn")
    write_tables(tmp_path / "b", "mnv4")
    evaluate.merge_tables([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    t1 = evaluate.read_table(tmp_path / "all" / "table1.csv")
    assert list(t1.columns) == evaluate.TABLE1_COLUMNS and list(t1["arch"]) == ["rn", "rn", "mnv4", "mnv4"]
    assert t1["options"].tolist() == ["3-10"] * 4 and t1["highlighted"].all()
    assert list(pd.read_csv(tmp_path / "all" / "table2.csv")["arch"]) == ["rn", "mnv4"]
    pd.DataFrame([dict(arch="rn", pct=1.0)]).to_csv(tmp_path / "b" / "table2.csv", index=False)
    with pytest.raises(ValueError, match="expected"):
        evaluate.merge_tables([tmp_path / "a", tmp_path / "b"], tmp_path / "all")


def test_load_pair_refuses_a_checkpoint_from_another_config(tmp_path):
    cfg = config.load([Path(__file__).resolve().parents[1] / "config.yaml"], {"runtime": {"device": "cpu"}, "dataset": {"image_size": 16}})
    arch = "test_resnet"
    n = models.num_quantizable_layers(arch)
    cell = dict(version="I", budget="A", mode="robust", options=list(range(3, 11)), capacity=4 * n + 1,
                num_layers=n, policy_input_size=16, policy_width=4)
    path = tmp_path / "pair.pt"
    checkpoint.save(dict(kind="pair", arch=arch, num_classes=10, model=models.create(arch, 10).state_dict(),
                         policy=BitPolicy(n, 8, 16, 4).state_dict(), cell=cell), path)
    with pytest.raises(checkpoint.CheckpointError, match="capacity"):
        evaluate.load_pair(cfg, arch, path, torch.device("cpu"), "I", "A", "robust")
    checkpoint.save({**checkpoint.load(path), "cell": {**cell, "capacity": 4 * n}}, path)
    pair = evaluate.load_pair(cfg, arch, path, torch.device("cpu"), "I", "A", "robust")
    assert pair.capacity == 4 * n and pair.quant.num_layers == n
