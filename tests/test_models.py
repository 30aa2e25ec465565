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


def test_teacher_weights_for_another_arch_or_no_state_dict_fail_in_one_line(tmp_path):
    """teacher.pretrained as a new user gets it wrong: a resnet18 state dict for the resnet50
    teacher, or a file that is no state dict at all."""
    import torch

    wrong = tmp_path / "resnet18.pth"
    torch.save(models.create("resnet18", 10).state_dict(), wrong)
    with pytest.raises(models.WeightsError, match=r"teacher.pretrained: .*resnet18.pth does not fit resnet50 .*set "
                                                  r"teacher.pretrained to false") as refused:
        models.create("resnet50", 10, str(wrong))
    assert "\n" not in str(refused.value)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a state dict\n")
    with pytest.raises(models.WeightsError, match="notes.txt does not fit resnet18"):
        models.create("resnet18", 10, str(junk))
    assert models.create("resnet18", 10, str(wrong)).fc.out_features == 10  # the right file loads
