"""Bad configs are refused before any job runs, with a message naming the key path and value.

Each case is an overlay on config.yaml. :func:`dptq.config.load` must raise ``ConfigError`` whose
message holds every expected fragment (the key path and the bad value, or for an unknown key
the section and the key). A few cases also go through ``snakemake -n``, as a user meets them.
"""
from __future__ import annotations

import pytest
import yaml

from conftest import BIN, ROOT, run
from dptq import config


def at(path: str, value) -> dict:
    """The overlay that sets one dotted key path: ``at("a.b", 1) == {"a": {"b": 1}}``."""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def shown(value) -> str:
    """How a message shows ``value``: strings bare (whatever quotes surround them), else str()."""
    return value if isinstance(value, str) else str(value)


def bad(case: str, path: str, value):
    """Setting ``path`` to ``value`` is refused naming both."""
    return pytest.param(at(path, value), [path, shown(value)], id=case)


def bad_item(case: str, path: str, value: list, index: int):
    """Item ``index`` of the list ``value`` at ``path`` is refused naming its own path and value."""
    return pytest.param(at(path, value), [f"{path}.{index}", shown(value[index])], id=case)


def unknown(path: str):
    """A key that the schema does not know at ``path``'s level is refused naming the section and key."""
    section, _, key = path.rpartition(".")
    return pytest.param(at(path, 1), [section or "<top level>", key], id=f"unknown-{path}")


def cross(case: str, overlay: dict, *fragments: str):
    """A rule across keys (or a map's keys) that ``overlay`` breaks; the message names ``fragments``."""
    return pytest.param(overlay, list(fragments), id=case)


CASES = [
    # Unknown keys at every level (typos of real keys, so the hint is exercised too).
    unknown("sed"),
    unknown("runtime.gpus"),
    unknown("dataset.size"),
    unknown("dataset.augment.flip"),
    unknown("teacher.epoch"),
    unknown("kd.temp"),
    unknown("kd.randaugment.ops"),
    unknown("pairs.budget"),
    unknown("pairs.policy.hidden"),
    unknown("quant.act_bits"),
    unknown("evaluate.batchsize"),
    unknown("analysis.figures"),
    unknown("analysis.layer_scan.split"),
    unknown("analysis.histogram.bins"),
    unknown("analysis.corruptions.severity"),
    unknown("analysis.remedy.scale"),
    # Wrong types.
    bad("string-for-int", "teacher.epochs", "20"),
    bad("float-for-int", "dataset.image_size", 32.5),
    bad("string-for-bool", "dataset.download", "yes"),
    bad("bool-for-number", "quant.percentile", True),
    bad("list-for-map", "pairs.budgets", [4.0, 5.5]),
    bad("map-for-list", "kd.archs", {"resnet18": 1}),
    bad("string-for-list", "pairs.modes", "robust"),
    bad("int-for-pretrained", "teacher.pretrained", 1),
    bad("string-for-range-grad", "pairs.range_grad", "yes"),
    bad("null-for-int", "seed", None),
    # Out of range.
    bad("negative-lr", "teacher.lr", -0.1),
    bad("zero-kd-lr", "kd.lr", 0),
    bad("margin-above-1", "pairs.margin", 1.5),
    bad("percentile-50", "quant.percentile", 50),
    bad("percentile-below-50", "quant.percentile", 12.5),
    bad("weight-bits-1", "quant.weight_bits", 1),
    bad("image-size-0", "dataset.image_size", 0),
    bad("val-fraction-0.9", "dataset.val_fraction", 0.9),
    bad("momentum-1", "pairs.momentum", 1.0),
    bad("zero-temperature", "kd.temperature", 0),
    bad("degrees-6", "analysis.corruptions.degrees", 6),
    bad("zero-batch", "evaluate.batch_size", 0),
    bad_item("bits-0", "pairs.versions.I", [0, 10], 0),
    bad_item("bits-17", "pairs.versions.I", [3, 17], 1),
    bad("three-ends", "pairs.versions.I", [3, 5, 10]),
    # Enumerations.
    bad("unknown-dataset", "dataset.name", "cifar10"),
    bad("unknown-device", "runtime.device", "tpu"),
    bad("unknown-optimizer", "kd.optimizer", "adam"),
    bad_item("unknown-mode", "pairs.modes", ["robust", "adversarial"], 1),
    bad("unknown-scale-rule", "quant.activation_scale", "absmax"),
    bad("unknown-remedy-scale-rule", "analysis.remedy.activation_scale", "mse"),
    bad("unknown-profits", "pairs.policy.profits", "probabilities"),
    bad_item("unknown-corruption", "analysis.corruptions.names", ["jpeg", "fog"], 1),
    bad_item("unknown-split", "analysis.layer_scan.splits", ["val"], 0),
    # Cross-field rules (the loader's, after the schema).
    bad("inverted-range", "pairs.versions.I", [10, 3]),
    bad("budget-below-every-range", "pairs.budgets.A", 2.0),
    bad("budget-above-every-range", "pairs.budgets.C", 12),
    cross("offset-for-unknown-version", at("pairs.budget_offset.IV", 1), "pairs.budget_offset", "IV"),
    cross("no-offset-for-version", at("pairs.versions.IV", [6, 10]), "pairs.budget_offset", "IV"),
    cross("unknown-kd-arch", at("kd.archs", ["resnet18", "resnet_18x"]), "kd.archs", "resnet_18x"),
    bad("unknown-teacher-arch", "teacher.arch", "resnet5O"),
    cross("teacher-min-lr-above-lr", {"teacher": {"lr": 1e-3, "min_lr": 1e-2}}, "teacher.min_lr", "0.01"),
    cross("pairs-min-lr-above-lr", {"pairs": {"lr": 1e-3, "min_lr": 1e-2}}, "pairs.min_lr", "0.01"),
    cross("kd-warmup-longer-than-training", {"kd": {"epochs": 3, "warmup_epochs": 5}}, "kd.warmup_epochs", "5", "kd.epochs"),
    bad("negative-warmup", "pairs.warmup_epochs", -1),
    cross("batch-size-map-misses-arch", at("kd.batch_size", {"resnet18": 64, "regnetx_016": 64}),
          "kd.batch_size", "mobilenetv4_conv_medium"),
    cross("pairs-lr-map-misses-arch", {"kd": {"archs": ["resnet18", "efficientnet_b0"], "epochs": 20}, "pairs": {"epochs": 2, "alpha": 1.0},
                                       "analysis": {"histogram": {"archs": ["resnet18"]}}}, "pairs.lr", "efficientnet_b0"),
    cross("kd-epochs-map-misses-arch", {"kd": {"archs": ["resnet18", "efficientnet_b0"]},
                                        "analysis": {"histogram": {"archs": ["resnet18"]}}}, "kd.epochs", "efficientnet_b0"),
    cross("pairs-warmup-longer-than-an-archs-epochs", {"pairs": {"warmup_epochs": 5}}, "pairs.warmup_epochs", "5",
          "at most 4"),
    cross("pairs-beta-mode-map-misses-mode", at("pairs.beta", {"resnet18": {"robust": 2.0}, "mobilenetv4_conv_medium": 1.0,
                                                               "regnetx_016": 1.0}),
          "pairs.beta.resnet18", "detrimental"),
    cross("pairs-alpha-unknown-mode", at("pairs.alpha.resnet18", {"robust": 2.0, "detrimentl": 3.0}),
          "pairs.alpha.resnet18", "detrimentl", "robust", "detrimental"),
    bad("unknown-objective", "pairs.objective.loss", "squared"),
    cross("objective-target-for-a-robust-pair", at("pairs.objective.loss", {"resnet18": "target", "regnetx_016": "hinge",
                                                                            "mobilenetv4_conv_medium": "hinge"}),
          "pairs.objective.loss", "resnet18", "robust: hinge, detrimental: target"),
    cross("pairs-range-grad-mode-map-misses-mode", at("pairs.range_grad.mobilenetv4_conv_medium", {"detrimental": True}),
          "pairs.range_grad.mobilenetv4_conv_medium", "robust"),
    cross("pairs-lr-map-negative", at("pairs.lr", {"resnet18": -1.0}), "pairs.lr.resnet18", "-1.0", "out of range"),
    cross("histogram-arch-not-distilled", at("analysis.histogram.archs", ["resnet34"]),
          "analysis.histogram.archs", "resnet34"),
    cross("bin-width-above-range", at("analysis.histogram", {"range": 0.5, "bin_width": 1.0}),
          "analysis.histogram.bin_width", "1.0"),
    # The audit.
    unknown("audit.policy.epoch"),
    unknown("audit.models.mine.weight"),
    bad("unknown-weight-type", "audit.runtime.weight_type", "QInt4"),
    bad("unknown-audit-start", "audit.policy.start", "worst"),
    bad_item("cell-without-budget", "audit.cells", ["I"], 0),
    cross("cell-not-in-grid", at("audit.cells", ["I-D"]), "audit.cells", "I-D"),
    bad_item("pairs-cell-without-budget", "pairs.cells", ["I"], 0),
    cross("pairs-cell-not-in-grid", at("pairs.cells", ["I-A", "IV-A"]), "pairs.cells", "IV-A"),
    cross("audit-cell-not-trained", {"pairs": {"cells": ["I-A"]}, "audit": {"cells": ["II-B"]}}, "audit.cells", "II-B"),
    cross("model-named-like-an-arch", at("audit.models.resnet18", {"arch": "resnet18", "weights": "w.pth"}),
          "audit.models", "resnet18"),
    cross("model-arch-unknown", at("audit.models.mine", {"arch": "resnet_18", "weights": "w.pth"}),
          "audit.models.mine.arch", "resnet_18"),
]


@pytest.mark.parametrize("overlay, fragments", CASES)
def test_bad_config_is_refused(overlay, fragments):
    with pytest.raises(config.ConfigError) as refused:
        config.load([ROOT / "config.yaml"], overlay)
    message = str(refused.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"the message does not name {missing}: {message}"


# One of each kind: unknown key, range, enumeration, and the loader's two cross-field checks.
SNAKEMAKE_CASES = [case for case in CASES if case.id in
                   {"unknown-dataset.augment.flip", "negative-lr", "unknown-mode", "inverted-range",
                    "budget-above-every-range"}]


@pytest.mark.slow
@pytest.mark.parametrize("overlay, fragments", SNAKEMAKE_CASES)
def test_snakemake_dry_run_refuses_bad_config(overlay, fragments, tmp_path):
    assert (ROOT / "Snakefile").exists(), "the Snakefile is missing"
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(overlay))
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", str(configfile)], ROOT, 300, check=False)
    assert out.returncode != 0, f"snakemake -n accepted {overlay}:\n{out.stdout[-3000:]}"
    missing = [f for f in fragments if f not in out.stdout]
    assert not missing, f"snakemake -n does not name {missing}:\n{out.stdout[-3000:]}"
