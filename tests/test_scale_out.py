"""The fine-tuning command on several processes (CPU, gloo, 2 ranks): DDP, FSDP2 and expert
parallel equal one process on the same global batch; a run killed with SIGKILL (after a
checkpoint, or in the middle of writing one) and resumed ends bit for bit where an uninterrupted
run ends.

The equivalence runs share one pair of spawned ranks (``ranks`` fixture); the kill tests launch
the command as users do, ``python -m adamoe_kernels.training.finetune`` and ``torchrun``.
Every process runs one thread (``OMP_NUM_THREADS=1``) and the deterministic ``cpu`` backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402
from adamoe_kernels.training import finetune  # noqa: E402
from adamoe_kernels.training.checkpoint import STALL_ENV  # noqa: E402
from adamoe_kernels.training.parallel import Parallel  # noqa: E402
from helpers import alive, init_gloo, process_tree, spawn_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "cpu" if cpu_extension_available() else "torch"
# 4 top-2 steps, 2 epochs of 3 steps of the top-2 control, conversion to m8k3, 2 epochs of
# 3 steps; global batch 4 (2 rows per rank). The equivalence runs and torchrun's leave the
# control out (NO_CONTROL): it is one more phase of the same loop.
NO_CONTROL = ["--no-control"]
RUN = ["--quick", "--backend", BACKEND, "--device", "cpu", "--base-steps", "4",
       "--steps-per-epoch", "3", "--batch-size", "4", "--seq-len", "32", "--eval-windows", "4",
       "--no-progress", "--no-plots", "--target-load", "1.5"]
STRATEGIES = {"ddp": [], "fsdp": ["--fsdp"], "ep": ["--expert-parallel"],
              "ep_fsdp": ["--expert-parallel", "--fsdp"]}
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32, a different reduction order; Adam amplifies it a bit
# Near ties: an identity null copy starts as its true expert's twin and stays close to it, so
# another reduction order can send a token to the other side of a tie (measured: DDP, cpu
# backend, fine-tune step 4, one token of 128 in one layer). From then on the runs are close,
# no longer equal: the tolerances below.
ONE_TOKEN = 1 / 128 + 1e-6  # a layer's load moves by 1/128 per token
AFTER_FLIP = dict(loss=1e-3, load=0.05, null_bias=0.05, weights=dict(atol=1e-3, rtol=1e-3))


def _steps(out: Path) -> list[dict]:
    return json.loads((out / "log.json").read_text())["steps"]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


# ---- one pair of ranks for the equivalence tests ----------------------------------------------

def _tiny_converted_mixtral():
    torch.manual_seed(0)
    model = finetune.tiny_mixtral(finetune.RunConfig(hidden_size=32, num_layers=2,
                                                     intermediate_size=48), 256)
    return ak.convert_model(model, 4, 3, backend=BACKEND)


def _ids():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _ep_model_step(rank: int, world: int) -> dict:
    """Forward and one backward of a converted Mixtral with its experts sharded over 2 ranks."""
    model = _tiny_converted_mixtral()
    par = Parallel.setup(expert_parallel=True)
    wrapped = par.wrap(model)
    x = par.shard(_ids())
    out = wrapped(input_ids=x, labels=x)
    layers = ak.integrations.hf_models.adamoe_layers(model)
    aux = par.aux_loss(tuple(layer.last_router_logits for layer in layers), 3, 8)
    (out.loss + 0.02 * aux).backward()
    par.finish_backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if name in par._experts:
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g, group=par.ep_group)
            g = torch.cat(parts)
        grads[name] = g
    stats = [vars(block.last_stats) for block in layers]
    return {"logits": out.logits.detach(), "grads": grads, "stats": stats,
            "aux": float(par.mean(aux))}


def _ranks_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    result = {"ep_model": _ep_model_step(rank, world)}
    for name, flags in STRATEGIES.items():
        finetune.main(RUN + NO_CONTROL + flags + ["--out", f"{out_dir}/{name}"])
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torch.set_num_threads(1)
    try:
        finetune.main(RUN + NO_CONTROL + ["--out", str(out / "single")])
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    spawn_ranks(_ranks_worker, 2, str(out / "pg_init"), (str(out),), timeout_s=240)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_parallel_run_equals_one_process(ranks, strategy):
    single, par = _steps(ranks / "single"), _steps(ranks / strategy)
    assert [(r["phase"], r["step"]) for r in par] == [(r["phase"], r["step"]) for r in single]
    assert len([r for r in par if r["phase"] == "finetune"]) == 6
    flipped = False
    for a, b in zip(single, par):
        where = (strategy, a["phase"], a["step"])
        if not flipped and b["load"] != pytest.approx(a["load"], abs=1e-6):  # counts: exact ...
            assert b["load"] == pytest.approx(a["load"], abs=ONE_TOKEN), where  # ... or one flip
            flipped = True
        tol = AFTER_FLIP["loss"] if flipped else 1e-5
        for key in ("loss", "lm_loss", "alpha"):
            assert b[key] == pytest.approx(a[key], abs=tol, rel=tol), where + (key,)
        # The aux loss's hits are a top-k over probabilities without the controller's null
        # bias, where the twins tie even more closely: one of the 256 row hits may flip at any
        # step, which moves the loss by (n+m)/256 * (P_true - P_null), ~4e-4 here.
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], abs=1e-3), where
        if flipped:
            assert b["load"] == pytest.approx(a["load"], abs=AFTER_FLIP["load"]), where
        if "null_bias" in a:                                       # the load controller
            assert b["null_bias"] == pytest.approx(
                a["null_bias"], abs=AFTER_FLIP["null_bias"] if flipped else 1e-5), where
    w_single, w_par = _weights(ranks / "single"), _weights(ranks / strategy)
    assert w_single.keys() == w_par.keys()
    for name in w_single:  # the full model, expert shards gathered
        torch.testing.assert_close(w_par[name], w_single[name],
                                   **(AFTER_FLIP["weights"] if flipped else TOL),
                                   msg=lambda m, name=name: f"{name}: {m}")
    summary = json.loads((ranks / strategy / "log.json").read_text())["summary"]
    label = {"ddp": "ddp", "fsdp": "fsdp", "ep": "ddp+ep", "ep_fsdp": "fsdp+ep"}[strategy]
    assert summary["parallel"] == {"strategy": label, "world_size": 2}


@pytest.mark.slow
def test_expert_parallel_converted_mixtral(ranks):
    """Logits and one step's gradients of the sharded model equal the one-process model; the
    null slots never leave their rank."""
    got = [torch.load(ranks / f"rank{r}.pt")["ep_model"] for r in range(2)]
    model = _tiny_converted_mixtral()
    x = _ids()
    out = model(input_ids=x, labels=x)  # the LM loss alone, as under the ranks
    layers = ak.integrations.hf_models.adamoe_layers(model)
    aux = ak.null_aware_aux_loss(tuple(layer.last_router_logits for layer in layers), 3, 8)
    (out.loss + 0.02 * aux).backward()
    torch.testing.assert_close(torch.cat([g["logits"] for g in got]), out.logits.detach(),
                               atol=1e-5, rtol=1e-5)
    assert got[0]["aux"] == pytest.approx(float(aux.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        for g in got:
            torch.testing.assert_close(g["grads"][name], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
    H, W, k = 32, 2, 3
    for i, layer in enumerate(layers):
        stats = [g["stats"][i] for g in got]
        true = int(ak.route(layer.last_router_logits, k, 8).expert_counts.sum())
        assert sum(s["true_slots"] for s in stats) == true < sum(s["slots"] for s in stats)
        for s in stats:  # fp32 rows out and back, plus n/W int32 counts to the other rank
            assert s["bytes_sent"] == (W - 1) * 4 * 4 + (s["rows_sent"] + s["rows_received"]) * H * 4
        assert sum(s["rows_sent"] for s in stats) == sum(s["rows_received"] for s in stats)


# ---- kill and resume --------------------------------------------------------------------------

def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", STALL_ENV)}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _command(nproc: int) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return launcher + ["-m", "adamoe_kernels.training.finetune"]


CKPT = ["--save-every", "3", "--keep-last", "2"]  # 16 steps in all (10 without the control)


def _run(out: Path, flags: list[str], nproc: int, timeout: float = 120) -> str:
    proc = subprocess.run(_command(nproc) + RUN + CKPT + flags + ["--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, pids)), "a killed process is still running"


def _run_and_kill(out: Path, flags: list[str], nproc: int, stall: str, timeout: float = 120):
    """Start the run and SIGKILL it, every process of it (torchrun's agent and its workers),
    once the checkpoint hook ``stall`` (``during:N`` or ``after:N``) has stopped it there."""
    where, step = stall.split(":")
    marker = out / "checkpoints" / f".stalled-{where}-{step}"
    proc = subprocess.Popen(_command(nproc) + RUN + CKPT + flags + ["--out", str(out)], cwd=ROOT,
                            env=_env(**{STALL_ENV: stall}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach the checkpoint"
            time.sleep(0.2)
    finally:
        _kill_tree(process_tree(proc.pid))
        proc.wait()
        proc.stdout.close()
    assert not (out / "log.json").exists()


def _assert_bitwise(a: Path, b: Path) -> None:
    steps_a, steps_b = _steps(a), _steps(b)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s")}  # noqa: E731
    assert [drop(r) for r in steps_b] == [drop(r) for r in steps_a]
    curve_a, curve_b = (json.loads((x / "log.json").read_text())["eval_curve"] for x in (a, b))
    assert [drop(p) for p in curve_b] == [drop(p) for p in curve_a]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = json.loads((a / "log.json").read_text())["summary"]
    sb = json.loads((b / "log.json").read_text())["summary"]
    assert sa["eval_loss"] == sb["eval_loss"]


@pytest.mark.slow
def test_kill_and_resume_single_process(tmp_path):
    """SIGKILL after the checkpoint of step 6 (in the top-2 control's fine-tune: the resumed run
    restarts it from the checkpoint and converts the saved base model), and in the middle of
    writing it; a truncated newest checkpoint; SIGKILL after step 12 (AdaMoE's fine-tune). Each
    resumed run ends exactly as the uninterrupted one."""
    _run(tmp_path / "full", [], 1)
    after = tmp_path / "after"
    _run_and_kill(after, [], 1, "after:6")
    assert (after / "checkpoints" / finetune.BASE_SNAPSHOT).is_file()
    truncated = tmp_path / "truncated"
    shutil.copytree(after, truncated)
    log = _run(after, ["--resume"], 1)
    assert "resuming from" in log and "step-00000006 (baseline_top2 step 2)" in log
    _assert_bitwise(tmp_path / "full", after)

    late = tmp_path / "late"
    _run_and_kill(late, [], 1, "after:12")
    log = _run(late, ["--resume"], 1)
    assert "step-00000012 (finetune step 2)" in log
    _assert_bitwise(tmp_path / "full", late)

    shard = truncated / "checkpoints" / "step-00000006" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 3)
    log = _run(truncated, ["--resume"], 1)
    assert f"{shard} has" in log and "truncated" in log and "falling back" in log
    assert "step-00000003 (base step 3)" in log
    _assert_bitwise(tmp_path / "full", truncated)

    during = tmp_path / "during"
    _run_and_kill(during, [], 1, "during:6")
    assert (during / "checkpoints" / ".tmp-step-00000006").is_dir()   # the unfinished write
    assert not (during / "checkpoints" / "step-00000006").exists()
    log = _run(during, ["--resume"], 1)
    assert "step-00000003 (base step 3)" in log
    _assert_bitwise(tmp_path / "full", during)
    assert sorted(p.name for p in (during / "checkpoints").iterdir()
                  if not p.name.startswith(".stalled")) == [finetune.BASE_SNAPSHOT,
                                                            "step-00000012", "step-00000015"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,stall", [("fsdp", "during:6"), ("ep", "after:6")])
def test_kill_and_resume_torchrun(tmp_path, strategy, stall):
    """Under torchrun (2 ranks, each rank's shard saved by torch.distributed.checkpoint)."""
    flags = STRATEGIES[strategy] + NO_CONTROL
    _run(tmp_path / "full", flags, 2)
    killed = tmp_path / "killed"
    _run_and_kill(killed, flags, 2, stall)
    files = {p.name for p in (killed / "checkpoints" / "step-00000003").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt"} <= files
    log = _run(killed, ["--resume"] + flags, 2)
    assert ("step-00000003 (base step 3)" if stall.startswith("during")
            else "step-00000006 (finetune step 2)") in log
    _assert_bitwise(tmp_path / "full", killed)
