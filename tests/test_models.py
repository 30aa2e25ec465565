"""dptq.models: the layer-count table (dptq/layer_counts.yaml) stays equal to timm's count, an arch
it does not list is counted, the config check needs neither timm nor torch, and every unreadable
weights file fails in one line, as teacher.pretrained and through the audit's command line."""
import os
import re
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
    with pytest.raises(models.WeightsError, match="notes.txt is not a PyTorch or safetensors weights file"):
        models.create("resnet18", 10, str(junk))
    assert models.create("resnet18", 10, str(wrong)).fc.out_features == 10  # the right file loads


class Runs:
    """Unpickling this runs code: ``weights_only`` loading must refuse it, and nothing run."""

    def __reduce__(self):
        return (print, ("this ran",))


def bad_weights(folder: Path) -> dict[str, tuple[Path, str]]:
    """Every kind of unreadable weights file a user hands over → (file, what its one line says)."""
    import torch

    good = folder / "resnet18_10.pth"
    torch.save(models.create("resnet18", 10).state_dict(), good)
    (folder / "notes.pth").write_text("these are not weights\n")
    (folder / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"fc.weight": Runs()}, folder / "code.pth")
    return {"text": (folder / "notes.pth", r"notes.pth is not a PyTorch or safetensors weights file \(it starts with b'these a"),
            "truncated": (folder / "truncated.pth", r"truncated.pth is truncated or damaged"),
            "code": (folder / "code.pth", r"code.pth was refused: unpickling it would run code \(it holds builtins.print\), "
                                          r"and nothing was run; if you trust its source, load it with torch.load"),
            "misfit": (good, r"resnet18_10.pth does not fit resnet50 \(tensors: 198 missing, e.g. layer1.0.conv3.weight")}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_weights(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", ["text", "truncated", "code", "misfit"])
def test_every_unreadable_teacher_weights_file_fails_in_one_line(bad, kind, capsys):
    path, says = bad[kind]
    with pytest.raises(models.WeightsError, match="teacher.pretrained: .*" + says) as refused:
        models.create("resnet50" if kind == "misfit" else "resnet18", 10, str(path))
    assert "\n" not in str(refused.value) and "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["text", "truncated", "code", "misfit"])
def test_every_unreadable_weights_file_fails_the_command_line_in_one_line(bad, kind, tmp_path):
    path, says = bad[kind]
    # from an empty folder, on dptq's packaged defaults: the error is the file's, and no folder is left
    out = subprocess.run([sys.executable, "-m", "dptq", "audit", "--arch", "resnet50" if kind == "misfit" else "resnet18",
                          "--weights", str(path), "--dataset", "digits"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "Traceback" not in out.stderr and "this ran" not in out.stdout, out.stderr[-2000:]
    assert not list(tmp_path.iterdir())
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: audit.models.{path.stem}.weights: ") and re.search(says, last), last
