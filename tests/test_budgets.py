"""Capacities of all 27 cells of the three networks (docs/method.md §2.6), computed by hand here."""
import pytest

from dptq import budgets, config, models

N = {"resnet18": 20, "mobilenetv4_conv_medium": 77, "regnetx_016": 59}
LEVEL = {"A": 4.0, "B": 5.5, "C": 7.0}
OFFSET = {"I": 0, "II": 1, "III": 1}
# round((a + d) N) by hand; .5 ties go to the even integer (Python's round): 6.5·77 = 500.5 -> 500, 5.5·59 = 324.5 -> 324
EXPECTED = {
    "resnet18": {"I": (80, 110, 140), "II": (100, 130, 160), "III": (100, 130, 160)},
    "mobilenetv4_conv_medium": {"I": (308, 424, 539), "II": (385, 500, 616), "III": (385, 500, 616)},
    "regnetx_016": {"I": (236, 324, 413), "II": (295, 384, 472), "III": (295, 384, 472)},
}


def test_capacity_of_every_cell_of_the_default_config():
    cfg = config.read_yaml("config.yaml")
    pairs, cells = cfg["pairs"], 0
    for arch in cfg["kd"]["archs"]:
        n = models.num_quantizable_layers(arch)
        assert n == N[arch]
        for version, bit_range in pairs["versions"].items():
            for budget, level in pairs["budgets"].items():
                options, capacity = budgets.cell(n, bit_range, level, pairs["budget_offset"][version])
                assert capacity == EXPECTED[arch][version]["ABC".index(budget)]
                assert options == list(range(*{"I": (3, 11), "II": (4, 11), "III": (5, 11)}[version]))
                cells += 1
    assert cells == 27
    config.check(cfg)  # no infeasible cell


def test_resnet18_II_is_the_papers_plus_twenty():
    assert budgets.capacity(20, 5.5, 1) - budgets.capacity(20, 5.5, 0) == 20


def test_infeasible_cell_names_where_n_and_capacity():
    with pytest.raises(ValueError, match=r"arch resnet18, version I, budget A: .*N=20.*capacity 50"):
        budgets.cell(20, [3, 10], 2.5, 0, where="arch resnet18, version I, budget A")
    cfg = config.merge(config.read_yaml("config.yaml"), {"pairs": {"budgets": {"A": 2.5}}})
    with pytest.raises(config.ConfigError, match=r"^config: pairs\.budgets\.A: 2\.5 .* arch resnet18, version I .*capacity 50"):
        config.check(cfg)
