"""dptq.checkpoint: atomic writes, safe loads, clear refusals."""
import os
import pickle

import pytest
import torch

from dptq import checkpoint


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
