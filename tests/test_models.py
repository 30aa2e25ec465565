"""dptq.models: the layer-count table (dptq/layer_counts.yaml) stays equal to timm's count, an arch
it does not list is counted, and the config check needs neither timm nor torch."""
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import timm
import yaml

from dptq import models

ROOT = Path(__file__).resolve().parents[1]
TABLE = yaml.safe_load(resources.files("dptq").joinpath("layer_counts.yaml").read_text())


def test_the_table_was_counted_with_the_installed_timm():
    assert str(TABLE["timm"]) == timm.__version__, (
        f"dptq/layer_counts.yaml was counted with timm {TABLE['timm']}, timm {timm.__version__} is installed: "
        "recount with dptq.models.count_quantizable_layers and update the file")


@pytest.mark.parametrize("arch", sorted(TABLE["layers"]))
def test_the_table_equals_timms_count(arch):
    assert TABLE["layers"][arch] == models.count_quantizable_layers(arch)
    assert models.num_quantizable_layers(arch) == TABLE["layers"][arch] and models.exists(arch)


def test_an_arch_not_in_the_table_is_counted():
    assert "resnet10t" not in TABLE["layers"]
    n = models.num_quantizable_layers("resnet10t")
    assert n == models.count_quantizable_layers("resnet10t") and n > 0
    assert models.exists("resnet10t") and not models.exists("resnet10tt")


def test_the_config_check_imports_neither_timm_nor_torch():
    code = ("import sys; from dptq import config; config.load(['config.yaml']); "
            "print(sorted({'timm', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
