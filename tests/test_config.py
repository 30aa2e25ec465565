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
