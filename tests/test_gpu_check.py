"""``bench/gpu_check.py`` (the one command of a GPU lease) works before a lease is spent on it:
its ``--dry-run`` runs every step on CPU under the Triton interpreter with tiny shapes and writes
the files a lease brings back."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.append(str(ROOT / "bench"))  # appended: nothing here may shadow an installed module
gpu_check = importlib.import_module("gpu_check")


def _run(args, timeout):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_gpu_plan_fits_the_lease():
    """Timeouts add up to the budget, which stays under 8 minutes; the output stays in 8 files."""
    assert sum(s[2] for s in gpu_check.STEPS) <= gpu_check.BUDGET_S < 8 * 60
    assert sum(s[1] for s in gpu_check.STEPS) <= gpu_check.BUDGET_S
    assert [s[0] for s in gpu_check.STEPS] == list(gpu_check.STEP_FUNCTIONS)
    plan = gpu_check.PLAN["gpu"]
    assert (plan["H"], plan["I"], plan["dtype"]) == (4096, 14336, "bfloat16")
    assert plan["tokens"] == [4096, 16384] and plan["configs"] == ["m8k3", "m16k4"]
    for op, cands in gpu_check.CANDIDATES.items():  # the first candidate is today's default
        from adamoe_kernels.ops import grouped_mlp
        assert gpu_check._cfg(cands[0]) == {k: getattr(grouped_mlp.GPU_DEFAULTS[op][0], k)
                                            for k in gpu_check._cfg(cands[0])}, op


@pytest.mark.slow
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    proc = _run(["--dry-run", "--out", str(out)], timeout=300)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= gpu_check.MAX_FILES, files
    for name in ("gpu_check.log", "gpu_check.json", "layer_speedup.json", "layer_speedup.png",
                 "kernels.json", "kernels.png"):
        assert name in files, (name, files)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [*summary["steps"]] == [s[0] for s in gpu_check.STEPS]
    assert {n: s["status"] for n, s in summary["steps"].items()} == \
        {s[0]: "ok" for s in gpu_check.STEPS}, summary["steps"]
    steps = {n: s["result"] for n, s in summary["steps"].items()}
    assert steps["tests"]["counts"].get("passed", 0) > 0 and not steps["tests"]["failures"]
    assert steps["determinism"]["all_bitwise"] and steps["determinism"]["max_rel_error"] < 3e-2
    assert {r["config"] for r in steps["layer"]["speedups"]} == {"top2", "m8k3"}
    assert steps["kernels"]["routing_share"], steps["kernels"]
    # the tuned table is a valid config file
    from adamoe_kernels.ops import tuning
    tuned = [f for f in files if f not in ("gpu_check.log", "gpu_check.json") and
             not f.startswith(("layer_speedup", "kernels"))]
    assert len(tuned) == 1 and tuned[0] == f"{steps['env']['device_slug']}.json"
    table = tuning.load_table(out / tuned[0])
    assert {e.op for e in table.entries} == set(tuning.OPS)
    decode = steps["decode"]["rows"]
    assert {r["setting"] for r in decode} == {"top2-grouped_mm", "m8k3 L=1", "m8k3 L=0.5"}
    assert all(r["decode_tok_s"] > 0 and r["speedup_vs_top2"] > 0 for r in decode)
    assert all(r["token_agreement_vs_generate"] == 1.0 for r in decode
               if "token_agreement_vs_generate" in r)
    assert "| layer | ok |" in proc.stdout  # the summary table ends the output
    print(f"dry run: {elapsed:.1f} s")
    assert elapsed < 150, f"--dry-run took {elapsed:.0f} s"


def test_a_step_without_time_is_skipped_and_reported(tmp_path):
    proc = _run(["--dry-run", "--out", str(tmp_path), "--steps", "env", "--budget-s", "1"],
                timeout=60)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["steps"]["env"] == {"status": "skipped", "reason": "no time left"}


@pytest.mark.parametrize("status", ["ok", "timeout"])
def test_summary_rendering(status):
    summary = {"meta": {"elapsed_s": 1.0}, "steps": {
        "env": {"status": "ok", "seconds": 1, "timeout_s": 20, "result": {"note": "H200"}},
        "layer": {"status": status, "seconds": 2, "timeout_s": 9, "result": {
            "speedups": [{"T": 4096, "config": "m8k3", "load_target": 1.0, "load": 1.0,
                          "ideal": 2.0, "bound_fwd": 1.9, "fwd": 1.8, "bound_fwdbwd": None,
                          "fwdbwd": None}]}}}}
    summary["headline"] = gpu_check.headline(summary)
    text = gpu_check.render_summary(summary)
    assert f"| layer | {status} |" in text
    assert "| 4096 | m8k3 | 1 | 1.00 | 2.00x | 1.90x | 1.80x | - | - |" in text


def test_warm_pool_runs_specs_in_processes_and_reports_failures():
    spec = {"T": 8, "H": 32, "I": 32, "m": 8, "k": 3, "dtype": "float32"}
    info = gpu_check.WarmPool([spec, {**spec, "dtype": "float99"}], parallel=2).finish(120)
    assert info["warmed"] == 2 and info["unfinished"] == 0, info
    assert len(info["failed"]) == 1 and "float99" in info["failed"][0]["error"], info


def test_warm_specs_cover_every_setting_and_candidate():
    plan = gpu_check.PLAN["gpu"]
    specs = gpu_check.warm_specs(plan)
    assert {(s["k"], s["dtype"]) for s in specs} >= {(2, "bfloat16"), (3, "bfloat16"),
                                                    (4, "bfloat16"), (3, "float16"),
                                                    (3, "float32")}
    forced = [s["force"] for s in specs if "force" in s]
    assert len(forced) == sum(len(c) - 1 for c in gpu_check.CANDIDATES.values())


def test_kernel_resources_from_triton_caches():
    from types import SimpleNamespace

    gpu = importlib.import_module("harness.gpu")
    kernel = SimpleNamespace(n_regs=96, n_spills=0, src=SimpleNamespace(constants={(1,): 64, (2,): True}),
                             metadata=SimpleNamespace(shared=1024, num_warps=4, num_stages=3))
    fn = SimpleNamespace(arg_names=["x", "BLOCK_M", "FLAG"], device_caches={0: ({"key": kernel}, None)})
    assert gpu.triton_kernel_resources(SimpleNamespace(my_kernel=fn, other=3)) == [
        {"kernel": "my_kernel", "regs": 96, "spills": 0, "shared": 1024, "num_warps": 4,
         "num_stages": 3, "constexprs": {"BLOCK_M": 64, "FLAG": True}}]


def test_static_decoder_gives_generate_tokens():
    """The decode step's manual loop (static cache, 4D mask, the step that a CUDA graph captures)
    is ``model.generate``'s greedy decoding, run after run (each run prefills the same cache)."""
    import torch

    generate = importlib.import_module("generate")
    sz = dict(hidden=32, intermediate=32, layers=2, vocab=64, heads=4, kv_heads=2, prompt=6,
              new_tokens=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hf, ada = generate.build_models(sz, torch.float32, torch.device("cpu"), "torch", 0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, sz["vocab"], (2, sz["prompt"]), generator=g)
        for model in (hf, ada):
            ref, _ = generate.generate(model, ids, sz["new_tokens"], torch.device("cpu"))
            dec = gpu_check.StaticDecoder(model, ids, sz["new_tokens"], graph=False)
            for _ in range(2):
                run = dec.run()
                assert torch.equal(run["tokens"], ref[:, sz["prompt"]:])
                assert run["decode_tok_s"] > 0 and run["prefill_ms"] > 0
    finally:
        torch.set_num_threads(threads)
