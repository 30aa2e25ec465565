"""Capacities of all 27 cells of the three networks (SPEC §2), computed by hand here."""
import pytest

from dptq import budgets, config

N = {"resnet18": 20, "mobilenetv4_conv_medium": 77, "regnetx_016": 59}
LEVEL = {"A": 4.0, "B": 5.5, "C": 7.0}
OFFSET = {"I": 0, "II": 1, "III": 1}
# round((a + d) N) by hand; .5 ties go to the even integer (Python's round): 6.5·77 = 500.5 -> 500, 5.5·59 = 324.5 -> 324
EXPECTED = {
    "resnet18": {"I": (80, 110, 140), "II": (100, 130, 160), "III": (100, 130, 160)},
    "mobilenetv4_conv_medium": {"I": (308, 424, 539), "II": (385, 500, 616), "III": (385, 500, 616)},
    "regnetx_016": {"I": (236, 324, 413), "II": (295, 384, 472), "III": (295, 384, 472)},
}


def test_capacity_table_of_the_default_config():
    cfg = config.read_yaml("config.yaml")
    rows = budgets.table(cfg)
    assert len(rows) == 27
    for row in rows:
        assert row["num_layers"] == N[row["arch"]]
        assert row["capacity"] == EXPECTED[row["arch"]][row["version"]]["ABC".index(row["budget"])]
        assert row["options"] == list(range(*{"I": (3, 11), "II": (4, 11), "III": (5, 11)}[row["version"]]))


def test_resnet18_II_is_the_papers_plus_twenty():
    assert budgets.capacity(20, 5.5, 1) - budgets.capacity(20, 5.5, 0) == 20


def test_infeasible_cell_names_arch_version_budget():
    cfg = config.merge(config.read_yaml("config.yaml"), {"pairs": {"budgets": {"A": 2.5}}})
    with pytest.raises(ValueError, match=r"arch resnet18, version I, budget A.*N=20.*capacity 50"):
        budgets.cell(cfg, "resnet18", "I", "A")
