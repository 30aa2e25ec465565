"""dptq.checkpoint: atomic writes, safe loads, clear refusals, and pairs and white boxes loaded
ready to run with the cell they were trained for."""
import os

import pytest
import torch

from dptq import checkpoint, models
from dptq.policy import BitPolicy
from dptq.quant import DynamicQuant
from dptq.runtime import Runtime

torch.set_num_threads(1)
ARCH = "test_resnet"
QUANT = {"weight_bits": 8, "activation_scale": "percentile", "percentile": 99.0, "range_grad": True}


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "a" / "c.pt"
    checkpoint.save({"kind": "distill", "model": {"w": torch.ones(2)}, "arch": "resnet18"}, path)
    assert checkpoint.load(path, kind="distill", arch="resnet18")["model"]["w"].sum() == 2
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"kind": "distill", "model": {}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save({"kind": "distill", "model": {}, "bad": lambda: 0}, path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"kind": "distill", "model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError, match=r"c\.pt: truncated or corrupted.*delete .*c\.pt and re-run"):
        checkpoint.load(path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "distill", "model": Exploit()}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt: refused to load.*could run code.*posix\.system|evil\.pt: refused to load.*could run code"):
        checkpoint.load(path)
    assert "weights_only` set to `False" not in str(pytest.raises(checkpoint.CheckpointError, checkpoint.load, path).value)


def test_wrong_kind_and_missing(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"kind": "teacher", "model": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'teacher' checkpoint, expected 'pair'"):
        checkpoint.load(path, kind="pair")
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "none.pt")
    torch.save([1, 2], path)
    with pytest.raises(checkpoint.CheckpointError, match="not a dptq checkpoint"):
        checkpoint.load(path)


def test_mmap_load_reads_the_same_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"kind": "distill", "arch": "resnet18", "model": {"w": torch.arange(5.0)}}, path)
    mapped = checkpoint.load(path, kind="distill", arch="resnet18", mmap=True)
    assert torch.equal(mapped["model"]["w"], torch.arange(5.0))
    with pytest.raises(checkpoint.CheckpointError, match="expected 'pair'"):
        checkpoint.load(path, kind="pair", mmap=True)


def write_pair(path, n: int, capacity: int) -> dict:
    """A pair checkpoint of the test arch whose cell is not one any config gives (capacity 4N + 1)."""
    cell = dict(version="I", budget="A", mode="robust", options=list(range(3, 11)), capacity=capacity, level=4.0,
                num_layers=n, policy_input_size=16, policy_width=4)
    torch.manual_seed(0)
    checkpoint.save(dict(kind="pair", arch=ARCH, num_classes=10, model=models.create(ARCH, 10).state_dict(),
                         policy=BitPolicy(n, 8, 16, 4).state_dict(), cell=cell), path)
    return cell


def test_pair_is_loaded_with_the_cell_it_was_trained_for(tmp_path):
    """The cell comes from the checkpoint itself: no config is asked (the DAG names each pair's cell)."""
    n, path = models.num_quantizable_layers(ARCH), tmp_path / "pair.pt"
    cell = write_pair(path, n, 4 * n + 1)
    assert checkpoint.cell(path) == cell
    rt = Runtime(0, device="cpu", bf16=False, channels_last=False, threads=1)
    pair = checkpoint.pair(path, rt, 16, QUANT)
    assert isinstance(pair, checkpoint.Pair) and pair.arch == ARCH and pair.cell == cell
    assert pair.capacity == 4 * n + 1 and pair.options == list(range(3, 11)) and pair.quant.num_layers == n
    assert isinstance(pair.quant, DynamicQuant) and not pair.quant.model.training and not pair.policy.training
    assert (pair.quant.weight_bits, pair.quant.scale_rule, pair.quant.percentile, pair.quant.range_grad) == (8, "percentile", 99.0, True)
    stored = checkpoint.load(path)["policy"]
    assert all(torch.equal(v, stored[k]) for k, v in pair.policy.state_dict().items())
    assert pair.policy(torch.zeros(2, 3, 16, 16)).shape == (2, n, 8)
    with pytest.raises(checkpoint.CheckpointError, match="expected 'distill'.*re-run the distill job"):
        checkpoint.white_box(path, rt, 16, QUANT)


def test_policy_of_and_white_box(tmp_path):
    n, path = models.num_quantizable_layers(ARCH), tmp_path / "pair.pt"
    write_pair(path, n, 4 * n)
    ckpt = checkpoint.load(path, kind="pair")
    policy = checkpoint.policy_of(ckpt)
    assert isinstance(policy, BitPolicy) and not policy.training
    assert all(torch.equal(v, ckpt["policy"][k]) for k, v in policy.state_dict().items())
    white = tmp_path / "distill.pt"
    checkpoint.save({**ckpt, "kind": "distill"}, white)
    rt = Runtime(0, device="cpu", bf16=False, channels_last=True, threads=1)
    quant = checkpoint.white_box(white, rt, 16, QUANT)
    assert isinstance(quant, DynamicQuant) and quant.num_layers == n and not quant.model.training
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(quant.model(x), checkpoint.network(ckpt)(x))  # the stored weights, folded or not
    with pytest.raises(checkpoint.CheckpointError, match="expected 'pair'.*re-run the pair job"):
        checkpoint.pair(white, rt, 16, QUANT)
    with pytest.raises(checkpoint.CheckpointError, match="expected 'pair'"):
        checkpoint.cell(white)
