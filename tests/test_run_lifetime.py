"""One run per checkpoint folder, and torchrun workers that end with their launcher (issue 22,
item 8): ``CheckpointLock`` and ``watch_launcher`` wired into ``adamoe-finetune``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from adamoe_kernels.training import finetune  # noqa: E402
from adamoe_kernels.training.checkpoint import STALL_ENV, CheckpointLock  # noqa: E402  (unset below)
from helpers import alive, children_by_parent, spawn_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--backend", "torch", "--device", "cpu", "--base-steps", "4",
        "--steps-per-epoch", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2",
        "--no-progress", "--no-plots", "--no-save", "--no-control"]


def test_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with CheckpointLock(out / "checkpoints"):
        t0 = time.monotonic()
        rc = finetune.main(TINY + ["--out", str(out), "--save-every", "2"])
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1 and elapsed < 5, err          # refused before any training
    assert "is in use by another run" in err and f"pid {os.getpid()}" in err
    assert not (out / "log.json").exists()
    # the lock is gone with its holder: the same run now goes through and drops it at the end
    assert finetune.main(TINY + ["--out", str(out), "--save-every", "2"]) == 0
    assert not (out / "checkpoints" / ".lock").exists()
    with CheckpointLock(out / "checkpoints"):   # free again
        pass


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_torchrun_is_killed(tmp_path):
    """SIGKILL of torchrun alone (not its process group: the workers are in sessions of their
    own) while both workers train (a run of minutes, past its first checkpoint): both end within
    seconds instead of training on and writing checkpoints."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop(STALL_ENV, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "adamoe_kernels.training.finetune", *TINY[1:], "--out", str(out),  # no --quick
           "--save-every", "2", "--keep-last", "1", "--steps-per-epoch", "5000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-00000002"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "torchrun ended before the checkpoint"
            assert time.monotonic() < deadline, "the run did not reach the checkpoint"
            time.sleep(0.2)
        workers = children_by_parent().get(proc.pid, [])
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "a worker outlived torchrun"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()


def _threads() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip()
                  for t in os.listdir("/proc/self/task"))


def _lifetime_worker(rank: int, world: int, init_file: str, ports: list, out: str) -> None:
    import json

    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    seen = {}
    runs = (("ddp", []), ("fsdp", ["--fsdp"]), ("ep", ["--expert-parallel"]))
    for (name, flags), port in zip(runs, ports):  # a fresh store per run
        os.environ["MASTER_PORT"] = str(port)
        finetune.run(finetune.parse_args(TINY + flags + ["--out", f"{out}/{name}"]))
        seen[name] = _threads()
    Path(f"{out}/threads-{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_gloo_thread_outlives_the_run(tmp_path):
    """Issue 22, item 9: after ``run`` returns (``Parallel.close``), no gloo thread is left in a
    rank (DDP, FSDP2, expert parallel): none is torn down at interpreter exit, where one now and
    then aborted a rank with "terminate called without an active exception"."""
    import json
    import socket


    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    spawn_ranks(_lifetime_worker, 2, str(tmp_path / "pg"), (ports, str(tmp_path)), timeout_s=240)
    for rank in range(2):
        seen = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        for strategy, names in seen.items():
            assert not [n for n in names if "gloo" in n], (rank, strategy, names)
