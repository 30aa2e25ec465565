"""dptq.config: overlays merge, the default and the shipped profiles validate."""
from pathlib import Path

import pytest

from dptq import config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_valid():
    cfg = config.load([ROOT / "config.yaml"])
    assert cfg["dataset"]["name"] == "digits"


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_profiles_overlay_the_default(profile):
    cfg = config.load([ROOT / "config.yaml", ROOT / "config" / profile])
    assert set(cfg) == set(config.read_yaml(ROOT / "config.yaml"))


def test_the_grid_is_pairs_cells_where_given():
    cfg = config.load([ROOT / "config.yaml"])
    assert config.grid_cells(cfg["pairs"]) == [f"{v}-{b}" for v in ("I", "II", "III") for b in "ABC"]
    floor = config.load([ROOT / "config.yaml", ROOT / "config" / "bit_floor.yaml"])
    assert config.cells(floor["pairs"]) == {"b4-F": ("b4", "F"), "b5-F": ("b5", "F"), "b6-F": ("b6", "F"), "b8-F": ("b8", "F")}
    assert all(lo == hi for lo, hi in (floor["pairs"]["versions"][v] for v, _ in config.cells(floor["pairs"]).values()))


def test_merge_is_deep_and_lists_replace():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert config.merge(base, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}, "d": 1}
    assert base["a"]["c"] == [1, 2]


def test_per_arch_settings_resolve_for_the_arch():
    cfg = {"kd": {"batch_size": {"resnet18": 256, "mobilenetv4_conv_medium": 64}, "epochs": 3},
           "pairs": {"lr": 0.03}, "teacher": {"lr": {"resnet18": 1.0}}}
    assert config.section_for(cfg, "kd", "mobilenetv4_conv_medium") == {"batch_size": 64, "epochs": 3}
    assert config.section_for(cfg, "pairs", "resnet18") == {"lr": 0.03}
    assert config.section_for(cfg, "teacher", None) == cfg["teacher"]  # no per-arch keys there
    per_epoch = {"kd": {"epochs": {"resnet18": 20, "regnetx_016": 40}, "batch_size": 64}}
    assert config.section_for(per_epoch, "kd", "regnetx_016") == {"epochs": 40, "batch_size": 64}


def test_per_mode_settings_resolve_for_the_arch_and_mode():
    cfg = {"pairs": {"alpha": {"resnet18": 1.0, "regnetx_016": {"robust": 2.0, "detrimental": 3.0}}, "lr": 0.03}}
    assert config.section_for(cfg, "pairs", "regnetx_016", "detrimental") == {"alpha": 3.0, "lr": 0.03}
    assert config.section_for(cfg, "pairs", "regnetx_016", "robust")["alpha"] == 2.0
    assert config.section_for(cfg, "pairs", "resnet18", "robust")["alpha"] == 1.0
    assert config.section_for({"pairs": {"alpha": 0.5}}, "pairs", "resnet18", "detrimental")["alpha"] == 0.5
    assert config.section_for(cfg, "pairs", "regnetx_016")["alpha"] == {"robust": 2.0, "detrimental": 3.0}
    # a job declares its own mode's entry and so never sees (nor re-runs for) the other one
    declared = config.declared(cfg, ["pairs.alpha.regnetx_016.robust"])
    assert declared == {"pairs": {"alpha": {"regnetx_016": {"robust": 2.0}}}}
    assert config.section_for(declared, "pairs", "regnetx_016", "robust")["alpha"] == 2.0
    assert config.declared(cfg, ["pairs.alpha.resnet18.robust"]) == {"pairs": {"alpha": {"resnet18": 1.0}}}


def test_objective_resolves_per_arch_and_mode_and_the_default_is_the_hinge():
    cfg = config.load([ROOT / "config.yaml"])
    hinge = {"loss": "hinge", "target": 5.0, "weight": 1.0, "spread_weight": 0.0, "spread_target": 55.0}
    assert config.section_for(cfg, "pairs", "resnet18", "detrimental", "I")["objective"] == hinge
    overlay = {"pairs": {"objective": {"loss": {"resnet18": {"robust": "hinge", "detrimental": "target"}, "regnetx_016": "hinge",
                                                "mobilenetv4_conv_medium": "hinge"},
                                       "weight": {"resnet18": {"robust": 1.0, "detrimental": 0.25}, "regnetx_016": 1.0,
                                                  "mobilenetv4_conv_medium": 1.0}}}}
    cfg = config.check(config.merge(cfg, overlay))
    assert config.section_for(cfg, "pairs", "resnet18", "detrimental", "I")["objective"] == dict(hinge, loss="target", weight=0.25)
    assert config.section_for(cfg, "pairs", "resnet18", "robust")["objective"] == hinge
    assert cfg["pairs"]["objective"]["loss"]["resnet18"] == {"robust": "hinge", "detrimental": "target"}  # not resolved in place
    # a job declares its own arch's and mode's entries
    declared = config.declared(cfg, ["pairs.objective.loss.resnet18.detrimental", "pairs.objective.target.resnet18.detrimental",
                                     "pairs.objective.weight.resnet18.detrimental"])
    assert declared == {"pairs": {"objective": {"loss": {"resnet18": {"detrimental": "target"}}, "target": 5.0,
                                                "weight": {"resnet18": {"detrimental": 0.25}}}}}
    assert config.section_for(declared, "pairs", "resnet18", "detrimental")["objective"]["weight"] == 0.25


def test_pair_epochs_may_differ_per_mode_and_the_warm_up_fits_the_fewest():
    epochs = {"resnet18": {"robust": 4, "detrimental": 16}, "regnetx_016": 4, "mobilenetv4_conv_medium": 8}
    cfg = config.load([ROOT / "config.yaml"], {"pairs": {"epochs": epochs}})
    assert [config.section_for(cfg, "pairs", "resnet18", mode)["epochs"] for mode in ("robust", "detrimental")] == [4, 16]
    assert config.section_for(cfg, "pairs", "regnetx_016", "detrimental")["epochs"] == 4
    with pytest.raises(config.ConfigError, match=r"pairs\.warmup_epochs: 5 is more than pairs\.epochs .* use at most 4"):
        config.load([ROOT / "config.yaml"], {"pairs": {"epochs": epochs, "warmup_epochs": 5}})


def test_pair_settings_may_differ_per_version_under_an_arch_and_mode():
    """The paper-cells recipe (range gradient, D at 8 epochs) for versions II and III only: each
    version's pair resolves its own value; a map that leaves out a trained version, a map keyed by
    version above the mode, and the key's old place are refused by name."""
    per_version = {"I": False, "II": True, "III": True}
    overlay = {"pairs": {"epochs": {"resnet18": {"robust": 4, "detrimental": {"I": 4, "II": 8, "III": 8}}},
                         "range_grad": {"resnet18": {"robust": per_version, "detrimental": per_version},
                                        "mobilenetv4_conv_medium": False, "regnetx_016": True},
                         "beta": {"resnet18": {"robust": 1.0, "detrimental": {"I": 1.0, "II": 2.0, "III": 2.0}},
                                  "mobilenetv4_conv_medium": 1.0, "regnetx_016": 1.0}}}
    cfg = config.load([ROOT / "config.yaml"], overlay)
    resolved = lambda arch, mode, version: {k: config.section_for(cfg, "pairs", arch, mode, version)[k]  # noqa: E731
                                            for k in ("epochs", "range_grad", "beta")}
    assert resolved("resnet18", "detrimental", "I") == {"epochs": 4, "range_grad": False, "beta": 1.0}
    assert resolved("resnet18", "detrimental", "II") == {"epochs": 8, "range_grad": True, "beta": 2.0}
    assert resolved("resnet18", "robust", "III") == {"epochs": 4, "range_grad": True, "beta": 1.0}
    assert resolved("regnetx_016", "robust", "I") == {"epochs": 4, "range_grad": True, "beta": 1.0}
    # a job that names no version sees the version map as it is
    assert config.section_for(cfg, "pairs", "resnet18", "detrimental")["epochs"] == {"I": 4, "II": 8, "III": 8}
    with pytest.raises(config.ConfigError, match=r"pairs\.beta\.resnet18\.detrimental: the map has no value "
                                                 r"for version\(s\) \['III'\] of the grid's cells"):
        config.load([ROOT / "config.yaml"], {"pairs": {"beta": {"resnet18": {"robust": 1.0, "detrimental": {"I": 1.0, "II": 2.0}},
                                                                "mobilenetv4_conv_medium": 1.0, "regnetx_016": 1.0}}})
    # versions the grid does not train need no value (a profile with its own versions and cells)
    config.load([ROOT / "config.yaml"], {"pairs": {"cells": ["I-A"], "range_grad": {"resnet18": {"robust": {"I": True}, "detrimental": False},
                                                                               "mobilenetv4_conv_medium": False, "regnetx_016": False}}})
    with pytest.raises(config.ConfigError, match=r"pairs\.range_grad: \['I', 'II', 'III'\] name versions, not archs"):
        config.load([ROOT / "config.yaml"], {"pairs": {"range_grad": per_version}})
    with pytest.raises(config.ConfigError, match=r"quant: unknown key 'range_grad' \(moved to pairs\.range_grad\)"):
        config.load([ROOT / "config.yaml"], {"quant": {"range_grad": True}})


def test_objective_refuses_the_target_penalty_for_a_robust_pair():
    with pytest.raises(config.ConfigError, match=r"pairs\.objective\.loss: the robust pairs of \['resnet18', "
                                                 r"'mobilenetv4_conv_medium', 'regnetx_016'\] get 'target'.*\{robust: hinge, detrimental: target\}"):
        config.load([ROOT / "config.yaml"], {"pairs": {"objective": {"loss": "target"}}})
    config.load([ROOT / "config.yaml"], {"pairs": {"modes": ["detrimental"], "objective": {"loss": "target"}}})
    with pytest.raises(config.ConfigError, match=r"pairs\.objective\.target: 0 is out of range"):
        config.load([ROOT / "config.yaml"], {"pairs": {"objective": {"target": 0}}})


def test_objective_refuses_the_spread_term_for_a_robust_pair():
    with pytest.raises(config.ConfigError, match=r"pairs\.objective\.spread_weight: the robust pairs of \['resnet18'\] get a "
                                                 r"spread term.*\{robust: 0, detrimental: WEIGHT\}"):
        config.load([ROOT / "config.yaml"], {"pairs": {"objective": {"spread_weight": {"resnet18": 1.0}}}})
    config.load([ROOT / "config.yaml"], {"pairs": {"objective": {"spread_weight": {"resnet18": {"robust": 0.0, "detrimental": 1.0}}}}})


def test_hinge_beside_the_off_hinge_detrimental_pair_at_the_papers_cell():
    """The default trains a hinge-alone D at each arch's paper cell (ResNet18 II-B, MobileNetV4 III-A,
    RegNetX III-B: their D there has the spread term), none where D is on the hinge, none when off or
    when the cell is not trained."""
    cfg = config.load([ROOT / "config.yaml"])
    beside = {arch: config.hinge_beside(cfg, arch, cell) for arch, cell in
              (("resnet18", "II-B"), ("mobilenetv4_conv_medium", "III-A"), ("regnetx_016", "III-B"))}
    assert beside == {"resnet18": [("II", "B")], "mobilenetv4_conv_medium": [("III", "A")], "regnetx_016": [("III", "B")]}
    on_hinge = config.merge(cfg, {"pairs": {"objective": {"spread_weight": {"resnet18": 0.0}}}})
    assert config.hinge_beside(on_hinge, "resnet18", "II-B") == []
    assert config.hinge_beside(cfg, "mobilenetv4_conv_medium", None) == []
    assert config.hinge_beside(config.merge(cfg, {"pairs": {"hinge_beside": False}}), "regnetx_016", "III-B") == []
    assert config.hinge_beside(config.merge(cfg, {"pairs": {"cells": ["I-A"]}}), "regnetx_016", "III-B") == []
    target = config.merge(on_hinge, {"pairs": {"objective": {"loss": {"resnet18": {"robust": "hinge", "detrimental": "target"}}}}})
    assert config.hinge_beside(target, "resnet18", "II-B") == [("II", "B")]
    section = config.section_for(cfg, "pairs", "regnetx_016", "detrimental", "III")
    alone = config.hinge_alone(section)
    assert alone["objective"] == {"loss": "hinge", "spread_weight": 0.0} and config.off_hinge(section["objective"])
    assert not config.off_hinge(alone["objective"])
    assert {k: v for k, v in alone.items() if k != "objective"} == {k: v for k, v in section.items() if k != "objective"}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(config.ConfigError, match="bad.yaml: not valid YAML"):
        config.load([bad])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="top level must be a mapping"):
        config.load([bad])


# --- seeds, and what one job may read ------------------------------------------------------------

def test_seeds_is_one_seed_or_a_list():
    assert config.seeds({"seed": 3}) == [3]
    assert config.seeds({"seed": [0, 1, 2]}) == [0, 1, 2]
    assert config.seeds(config.load([ROOT / "config.yaml", ROOT / "config" / "seeds.yaml"])) == [0, 1, 2]
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(config.ConfigError, match="seed"):
            config.load([ROOT / "config.yaml"], {"seed": bad})


CFG = {"seed": 0, "dataset": {"name": "digits", "augment": {"hflip": False, "crop_padding": 3}},
       "pairs": {"lr": {"resnet18": 0.03, "regnetx_016": 0.01}, "epochs": 2},
       "evaluate": {"batch_size": 256, "random_policy_seed": 0}}


def test_declared_takes_the_named_parts_nested_as_in_the_config():
    got = config.declared(CFG, ["dataset", "evaluate.batch_size", "seed"])
    assert got == {"dataset": CFG["dataset"], "evaluate": {"batch_size": 256}, "seed": 0}
    got["dataset"]["augment"]["hflip"] = True
    assert CFG["dataset"]["augment"]["hflip"] is False  # a copy
    assert config.declared(CFG, ["dataset.augment.hflip", "dataset.name"]) == {"dataset": {"augment": {"hflip": False}, "name": "digits"}}


def test_declared_per_arch_path_takes_one_entry_of_a_map_or_the_one_value():
    assert config.declared(CFG, ["pairs.lr.resnet18"]) == {"pairs": {"lr": {"resnet18": 0.03}}}
    one = config.merge(CFG, {"pairs": {"lr": 0.1}})
    assert config.declared(one, ["pairs.lr.resnet18"]) == {"pairs": {"lr": 0.1}}
    # what a job then reads through section_for is the arch's value either way
    for cfg in (CFG, one):
        declared = config.declared(cfg, ["pairs.lr.resnet18", "pairs.epochs"])
        assert config.section_for(declared, "pairs", "resnet18")["lr"] == config.section_for(cfg, "pairs", "resnet18")["lr"]


def test_declared_refuses_a_key_not_in_the_config():
    with pytest.raises(config.ConfigError, match=r"pairs\.lr\.mobilenetv4_conv_medium: declared .*no key 'pairs\.lr\.mobilenetv4_conv_medium'"):
        config.declared(CFG, ["pairs.lr.mobilenetv4_conv_medium"])
    with pytest.raises(config.ConfigError, match=r"no key 'kd'"):
        config.declared(CFG, ["kd.epochs"])


def test_leaves_are_the_paths_to_values_and_empty_maps():
    assert config.leaves({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {("a", "b"), ("a", "c", "d"), ("e",)}


def test_settings_refuses_an_undeclared_key_naming_it_and_the_job():
    settings = config.Settings(config.declared(CFG, ["dataset", "evaluate.batch_size"]), job="evaluate")
    assert settings["evaluate"]["batch_size"] == 256
    with pytest.raises(config.ConfigError, match=r"evaluate: reads config key evaluate\.random_policy_seed, which its rule does not declare"):
        settings["evaluate"]["random_policy_seed"]
    with pytest.raises(config.ConfigError, match=r"reads config key pairs\b.*add 'pairs' to the rule's keys"):
        settings["pairs"]
    with pytest.raises(config.ConfigError, match=r"dataset\.augment\.hflipp"):
        settings["dataset"]["augment"]["hflipp"]


def test_settings_lists_the_values_never_read():
    settings = config.Settings(config.declared(CFG, ["dataset", "pairs.lr.resnet18", "evaluate"]), job="j")
    assert settings.unread() == ["dataset.augment.crop_padding", "dataset.augment.hflip", "dataset.name",
                                 "evaluate.batch_size", "evaluate.random_policy_seed", "pairs.lr.resnet18"]
    assert settings["dataset"]["name"] == "digits"
    settings["dataset"]["augment"]  # a map read is not a read of its values
    assert "dataset.name" not in settings.unread() and "dataset.augment.hflip" in settings.unread()
    assert config.section_for(settings, "pairs", "resnet18")["lr"] == 0.03
    assert settings.unread() == ["dataset.augment.crop_padding", "dataset.augment.hflip",
                                 "evaluate.batch_size", "evaluate.random_policy_seed"]
    value = settings["dataset"]["augment"]["crop_padding"]
    assert value == 3 and settings.unread() == ["dataset.augment.hflip", "evaluate.batch_size", "evaluate.random_policy_seed"]
    assert settings.plain() == config.declared(CFG, ["dataset", "pairs.lr.resnet18", "evaluate"])
    assert settings.unread() == []


def test_settings_unpacked_with_double_star_counts_as_read():
    settings = config.Settings(config.declared(CFG, ["dataset.augment", "evaluate"]), job="j")

    def job(*, batch_size, random_policy_seed):
        return batch_size, random_policy_seed

    assert job(**settings["evaluate"]) == (256, 0)
    assert dict(settings["dataset"]["augment"]) == CFG["dataset"]["augment"]
    assert settings.unread() == []
    nested = config.Settings({"a": {"b": [1]}}, job="j")
    got = nested["a"]["b"]
    got.append(2)
    assert nested["a"]["b"] == [1]  # a read hands out a copy


def test_every_problem_of_a_profile_is_named_at_once(tmp_path):
    """A profile that adds two archs (every per-arch map and the histogram list then lack them), or
    that mistypes two keys: one error names all of it, on one line, instead of one key per round
    of ``snakemake -n``."""
    profile = tmp_path / "mine.yaml"
    profile.write_text("kd: {archs: [resnet18, efficientnet_b0, convnext_atto]}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load([ROOT / "config.yaml", profile])
    message = str(err.value)
    assert "\n" not in message and message.count(" | ") == 6 and "7 problems" in message
    assert "analysis.histogram.archs: ['mobilenetv4_conv_medium', 'regnetx_016'] are not in kd.archs" in message
    for key in ("kd.epochs", "pairs.epochs", "pairs.range_grad", "pairs.lr", "pairs.alpha", "pairs.objective.spread_weight"):
        assert f"{key}: the map has no value for ['convnext_atto', 'efficientnet_b0']" in message, key
    profile.write_text("dataset: {image_size: -3}\nkd: {epochs: many}\n")
    with pytest.raises(config.ConfigError, match=r"2 problems: dataset.image_size: -3 .* \| kd.epochs: 'many' "):
        config.load([ROOT / "config.yaml", profile])
