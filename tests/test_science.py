"""The paper's effect on a small problem: a detrimental pair's quantized accuracy falls well
below the robust pair's while both keep their full-precision accuracy (ResNet18, digits, 32 px)."""
import pytest
import torch

from dptq import checkpoint, config, data, evaluate, runtime, train

torch.set_num_threads(1)
SMALL = {
    "dataset": {"image_size": 32, "val_fraction": 0.1},
    "teacher": {"arch": "resnet18", "epochs": 6, "batch_size": 32},
    "kd": {"archs": ["resnet18"]},
    "pairs": {"epochs": 4, "batch_size": 32, "lr": 0.02},
    "analysis": {"histogram": {"archs": ["resnet18"]}},
}


@pytest.mark.slow
def test_detrimental_pair_collapses_when_quantized(tmp_path, monkeypatch):
    build = data.build
    monkeypatch.setattr(data, "build", lambda cfg, split, augment=False: torch.utils.data.Subset(
        build(cfg, split, augment), range(min(len(build(cfg, split)), 450 if split != "val" else 60))))
    cfg = config.merge(config.read_yaml("config.yaml"), SMALL)
    # W: a resnet18 trained on the labels (the teacher stage), used as the distilled network
    train.train_teacher(cfg, tmp_path / "w.pt", tmp_path / "w.csv")
    white_box = checkpoint.load(tmp_path / "w.pt")
    checkpoint.save({**white_box, "kind": "distill"}, tmp_path / "w.pt")
    dev = runtime.setup(cfg)
    loader = data.loader(data.build(cfg, "test"), 256, cfg)
    acc = {}
    for mode in ("robust", "detrimental"):
        out = tmp_path / f"{mode}.pt"
        train.train_pair(cfg, "resnet18", "I", "A", mode, tmp_path / "w.pt", out, tmp_path / f"{mode}.csv")
        pair = evaluate.load_pair(cfg, "resnet18", out, dev, "I", "A", mode)
        fp = evaluate.accuracy(*evaluate.predict(pair.quant, loader, cfg, dev))
        q = evaluate.accuracy(*evaluate.predict(pair.quant, loader, cfg, dev, policy=pair.policy,
                                                options=pair.options, capacity=pair.capacity))
        acc[mode] = (fp, q)
    print(acc)
    (fp_r, q_r), (fp_d, q_d) = acc["robust"], acc["detrimental"]
    assert fp_r > 70 and fp_d > 70
    assert q_r - fp_r > -10
    assert q_d - fp_d < -20 and q_r - q_d > 20
