"""Checkpoints in one process: atomic folders, keep-last, verification and the fallback.

``torch.distributed.checkpoint`` runs without a process group here; the multi-process save
(each rank's shard), the resume after a SIGKILL and the kill during a write are in
``test_scale_out.py``.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from torch import nn

from adamoe_kernels.training.checkpoint import (STALL_ENV, CheckpointError, Checkpointer,
                                                CheckpointWarning, rng_state, set_rng_state)


def _app(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    return model, opt


def _state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def _save(ckpt, step, seed=None):
    model, opt = _app(step if seed is None else seed)
    return ckpt.save(step, _state(model, opt), {"phase": "finetune", "note": step},
                     rng_state()), model


def test_save_keep_last_and_load(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2)
    for step in (3, 6, 9):
        path, model = _save(ckpt, step)
        assert path.name == f"step-{step:08d}" and (path / "manifest.json").is_file()
    assert [p.name for p in ckpt.checkpoints()] == ["step-00000006", "step-00000009"]
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    latest = ckpt.latest()
    assert latest == path
    assert ckpt.read_trainer_state(latest)["note"] == 9
    assert ckpt.read_trainer_state(latest)["step"] == 9
    other, opt = _app(0)  # different weights and optimizer moments, loaded over
    state = _state(other, opt)
    ckpt.load_app_state(latest, state)
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(other, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    manifest = json.loads((latest / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in latest.iterdir()} - {"manifest.json"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_damaged_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=3)
    first, _ = _save(ckpt, 1)
    second, _ = _save(ckpt, 2)
    shard = next(second.glob("*.distcp"))
    size = shard.stat().st_size
    if damage == "truncate":
        os.truncate(shard, size // 2)
        victim, words = shard, "truncated"
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[size // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        victim, words = shard, "sha256"
    elif damage == "manifest":
        (second / "manifest.json").write_text("{not json")
        victim, words = second / "manifest.json", "unreadable"
    else:
        (second / "trainer.pt").unlink()
        victim, words = second / "trainer.pt", "missing"
    with pytest.raises(CheckpointError, match=words):
        ckpt.verify(second)
    with pytest.warns(CheckpointWarning, match=str(victim)):
        assert ckpt.latest() == first
    # the broken one is renamed aside, never deleted or written into; the next save of the same
    # step gets a fresh name
    assert (tmp_path / "ck" / "step-00000002.corrupt").is_dir()
    again, _ = _save(ckpt, 2)
    assert again.name == "step-00000002.1"
    assert ckpt.latest() == again


def test_unfinished_write_is_ignored_and_cleared(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    first, _ = _save(ckpt, 1)
    stale = tmp_path / "ck" / ".tmp-step-00000002"  # what a kill during the write leaves
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest() == first
    second, _ = _save(ckpt, 2)
    assert not stale.exists() and ckpt.latest() == second


def test_nothing_saved_is_rewritten(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=5)
    first, _ = _save(ckpt, 1)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()}
    _save(ckpt, 2)
    again, _ = _save(ckpt, 1, seed=7)  # the same step again: a new folder, the old one intact
    assert again != first
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()} == before
    ckpt.verify(first)


def test_rng_state_roundtrip():
    import numpy as np

    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(5), np.random.seed(9)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    assert Checkpointer(tmp_path / "none").latest() is None
    assert STALL_ENV not in os.environ
