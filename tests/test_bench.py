"""Smoke tests of the benchmark scripts: each script's ``main`` on tiny shapes with the torch backend.

They check the JSON layout the README generator relies on and that the load calibration reaches its
target; they time nothing that matters (one repetition, no warmup).
"""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))  # appended: nothing here may shadow an installed module

cli = importlib.import_module("harness.cli")
provenance = importlib.import_module("harness.provenance")
workload = importlib.import_module("harness.workload")
layer_speedup = importlib.import_module("layer_speedup")
kernel_bench = importlib.import_module("kernel_bench")
finetune_step = importlib.import_module("finetune_step")
load_dial = importlib.import_module("load_dial")
make_readme_table = importlib.import_module("make_readme_table")
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402

FAST = ["--device", "cpu", "--backend", "torch", "--dtype", "float32", "--reps", "1", "--warmup", "0",
        "--no-progress"]
META_KEYS = {"device_name", "device", "dtype", "backend", "torch", "triton", "numpy", "timestamp", "script"}


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's (process-wide) thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(path):
    payload = json.loads(Path(path).read_text())
    assert META_KEYS <= payload["meta"].keys()
    assert payload["rows"]
    return payload


@pytest.mark.parametrize("m,k", [(8, 3), (16, 4)])
def test_calibration_hits_target(m, k):
    n, T = 8, 512
    logits = torch.randn(T, n + m)
    tol = workload.load_tolerance(T)
    for target in workload.PAPER_LOADS:
        cal = workload.calibrate_null_bias(
            lambda b: workload.routing_load(logits, k, n, m, b, backend="torch"), target, tol=tol)
        assert cal["hit"], cal
        assert abs(cal["load"] - target) <= tol
        # the bias really produces that load
        assert workload.routing_load(logits, k, n, m, cal["bias"]) == pytest.approx(cal["load"])


def test_device_name_is_a_slug():
    name = provenance.device_name(torch.device("cpu"))
    assert name.startswith("cpu-") and name == provenance.slugify(name)


def test_layer_speedup(tmp_path):
    res = layer_speedup.main(FAST + ["--hidden", "32", "--intermediate", "64", "--tokens", "128",
                                     "--loads", "1.0", "0.5", "--out", str(tmp_path)])
    payload = _load(res["json"])
    rows, floor = payload["rows"][:-1], payload["rows"][-1]
    assert [r["config"] for r in rows] == ["top2", "m8k3", "m8k3", "m16k4", "m16k4"]
    for r in rows:
        for key in ("load", "load_target", "fwd_ms", "fwdbwd_ms", "speedup_fwd", "speedup_fwdbwd",
                    "ideal_speedup", "ref_fwd_ms", "calibration_hit", "T", "H", "I",
                    "bound_speedup_fwd", "bound_speedup_fwdbwd"):
            assert key in r, key
        assert r["calibration_hit"]
        assert abs(r["load"] - r["load_target"]) <= workload.load_tolerance(r["T"])
        # the bound is the FLOP ideal capped by the floor: never above 2/L, never below 1 at L<=2
        for mode in ("fwd", "fwdbwd"):
            assert r[f"bound_speedup_{mode}"] <= r["ideal_speedup"] + 1e-9
            top2 = rows[0][f"{mode}_ms"]
            assert r[f"bound_speedup_{mode}"] == pytest.approx(
                top2 / max(top2 * r["load"] / 2, floor[f"{mode}_ms"]))
        for mode in ("fwd", "fwdbwd"):  # the torch backend has no scopes: router + the rest
            assert {"router", "other"} <= set(r[f"breakdown_{mode}"])
    # the floor setting routes exactly one token to each true expert
    assert floor["config"] == "floor" and floor["true_assignments"] == floor["n"]
    assert floor["load"] == pytest.approx(floor["n"] / floor["T"])
    assert Path(res["png"]).exists()
    assert Path(res["png"]).with_name(Path(res["png"]).stem + "_breakdown.png").exists()


@pytest.mark.skipif(not cpu_extension_available(), reason="C++ CPU backend not built")
def test_layer_speedup_cpu_breakdown(tmp_path):
    """On the C++ backend every setting's breakdown names the phases of the call (its profiler
    scopes), and they add up to no more than the profiled call."""
    res = layer_speedup.main(["--device", "cpu", "--backend", "cpu", "--dtype", "bfloat16",
                              "--reps", "1", "--warmup", "0", "--no-progress", "--no-reference",
                              "--no-plot", "--hidden", "64", "--intermediate", "96", "--tokens",
                              "64", "--loads", "0.5", "--configs", "m8k3", "--out", str(tmp_path)])
    for r in _load(res["json"])["rows"]:
        fwd, fwdbwd = r["breakdown_fwd"], r["breakdown_fwdbwd"]
        assert {"router", "route", "gate_up", "down", "combine", "other"} <= set(fwd), fwd
        assert {"bwd_dy_down", "bwd_swiglu", "bwd_grad_down", "bwd_grad_gate_up", "bwd_dx",
                "bwd_combine", "route_backward"} <= set(fwdbwd), fwdbwd
        assert all(v >= 0 for v in fwd.values()) and all(v >= 0 for v in fwdbwd.values())


def test_kernels(tmp_path):
    res = kernel_bench.main(FAST + ["--hidden", "32", "--intermediate", "64", "--tokens", "64",
                               "--route-tokens", "256", "--loads", "1.0", "--out", str(tmp_path)])
    payload = _load(res["json"])
    assert payload["sync_check"]["checked"] is False  # CPU
    route = [r for r in payload["rows"] if r["part"] == "route"]
    gemm = [r for r in payload["rows"] if r["part"] == "gemm"]
    assert {r["config"] for r in route} == {"top2", "m8k3", "m16k4"}
    assert {r["impl"] for r in gemm} == set(kernel_bench.IMPLS)
    for r in gemm:
        if "skipped" in r:
            continue
        assert r["fwd_tflops"] > 0 and r["fwdbwd_tflops"] > 0
        if r["impl"] != "dense_mm":  # every implementation computes the same layer
            assert r["max_abs_diff_vs_reference"] < 1e-4, r
    assert Path(res["png"]).exists()


def test_finetune_step(tmp_path):
    res = finetune_step.main(FAST + ["--hidden", "32", "--intermediate", "64", "--layers", "2",
                                     "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--batch", "1",
                                     "--seq", "32", "--configs", "m8k3", "--loads", "1.0",
                                     "--out", str(tmp_path)])
    rows = _load(res["json"])["rows"]
    assert [r["config"] for r in rows] == ["top2-hf", "top2", "m8k3"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0
    ada = rows[-1]
    assert ada["calibration_hit"] and abs(ada["load"] - 1.0) <= 0.1


@pytest.mark.parametrize("variant", [["--impl", "convert_model"], ["--model", "llama-molora"]])
def test_finetune_step_package_models(tmp_path, variant):
    """The step benchmark through ak.convert_model / ak.add_mo_lora and their load dial."""
    needed = "convert_model" if "convert_model" in variant else "add_mo_lora"
    if not hasattr(finetune_step.ak, needed):
        pytest.skip(f"ak.{needed} is not available")
    configs = ["m8k3"] if needed == "convert_model" else ["m5k2"]
    res = finetune_step.main(FAST + variant + ["--hidden", "32", "--intermediate", "64", "--layers", "1",
                                               "--heads", "2", "--kv-heads", "1", "--vocab", "64",
                                               "--batch", "1", "--seq", "32", "--configs", *configs,
                                               "--loads", "1.0", "--no-hf-baseline", "--no-plot",
                                               "--out", str(tmp_path)])
    rows = _load(res["json"])["rows"]
    assert [r["config"] for r in rows] == ["top2", *configs]
    assert abs(rows[-1]["load"] - 1.0) <= 0.1


@pytest.mark.slow
def test_finetune_step_nproc(tmp_path):
    """``--nproc 2``: DDP, FSDP2 and expert parallel on 2 gloo ranks; bytes of the expert
    all-to-alls fall with the load (null slots are not sent); the README generator renders it."""
    res = finetune_step.main(FAST + ["--nproc", "2", "--threads", "1", "--hidden", "32",
                                     "--intermediate", "64", "--layers", "1", "--heads", "2",
                                     "--kv-heads", "1", "--vocab", "64", "--batch", "2", "--seq", "32",
                                     "--configs", "m8k3", "--loads", "1.0", "--no-plot",
                                     "--out", str(tmp_path / "results" / "cpu-test")])
    rows = _load(res["json"])["rows"]
    assert [(r["strategy"], r["config"]) for r in rows] == [
        (s, c) for s in ("ddp", "fsdp", "ep") for c in ("top2", "m8k3")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and r["calibration_hit"]
    top2, ada = [r for r in rows if r["strategy"] == "ep"]
    assert top2["bytes_per_step"] == top2["bytes_per_step_nulls_shipped"]  # no null slot at top-2
    assert ada["bytes_per_step"] < 0.75 * top2["bytes_per_step"]           # L = 1 instead of 2
    assert ada["bytes_per_step"] < ada["bytes_per_step_nulls_shipped"] / 2
    table = make_readme_table.render(make_readme_table.load_results(tmp_path / "results"), tmp_path)
    assert "Training step on 2 processes" in table and "| ep | m8k3 |" in table


def test_load_dial(tmp_path):
    """In-process fine-tuning run (tiny), then the dial and top-p sweeps; then --model reloads it."""
    tiny_ft = "--base-steps 3 --steps-per-epoch 2 --epochs 1 --eval-windows 4 --batch-size 2 --seq-len 32"
    res = load_dial.main(FAST + ["--quick", "--finetune-args", tiny_ft, "--finetune-out", str(tmp_path / "ft"),
                                 "--loads", "1.0", "0.5", "--top-p", "1.0", "0.1",
                                 "--out", str(tmp_path / "results" / "cpu-test")])
    payload = _load(res["json"])
    rows = payload["rows"]
    assert [r["sweep"] for r in rows] == ["natural", "load_dial", "load_dial", "top_p", "top_p",
                                          "top2_same_weights"]
    for r in rows:
        for key in ("load", "eval_loss", "fwd_ms", "tokens_per_s", "speedup_vs_natural"):
            assert r[key] is not None and r[key] == r[key], (key, r)
    nat, dial1, dial05, p1, p01, top2 = rows
    assert abs(dial1["calib_load"] - 1.0) <= 0.1 and abs(dial05["calib_load"] - 0.5) <= 0.1
    assert dial05["load"] < dial1["load"]
    assert p1["load"] == pytest.approx(nat["load"]) and p01["load"] <= p1["load"]
    assert p1["eval_loss"] == pytest.approx(nat["eval_loss"], abs=1e-5)  # p = 1 keeps the top-k
    assert top2["load"] == pytest.approx(2.0)
    meta = payload["meta"]
    assert meta["adamoe"]["top_k"] == 3 and meta["model_source"]["finetune_summary"]["eval_loss"]
    assert Path(res["png"]).exists()
    # the README generator renders it
    table = make_readme_table.render(make_readme_table.load_results(tmp_path / "results"), tmp_path)
    assert "Load dial and top-p" in table and f"{dial05['eval_loss']:.3f}" in table
    # a saved run, loaded with --model
    res2 = load_dial.main(FAST + ["--quick", "--model", str(tmp_path / "ft" / "model"), "--loads", "1.0",
                                  "--top-p", "0.5", "--no-top2", "--no-plot", "--out", str(tmp_path / "r2")])
    rows2 = res2["rows"]
    assert [r["sweep"] for r in rows2] == ["natural", "load_dial", "top_p"]
    assert rows2[0]["eval_loss"] == pytest.approx(nat["eval_loss"], abs=1e-5)  # same model, same data


def test_reexec_with_cpu_malloc(monkeypatch):
    """Script runs on CPU re-exec once with the allocator settings; never when opted out, already
    set, or on CUDA."""
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, args, env: calls.append((args, env)))
    for k in cli.CPU_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    cli.reexec_with_cpu_malloc(["--quick", "--device", "cpu"])
    assert len(calls) == 1 and calls[0][0][-3:] == ["--quick", "--device", "cpu"]
    assert all(calls[0][1][k] == v for k, v in cli.CPU_MALLOC_ENV.items())
    cli.reexec_with_cpu_malloc(["--device=cpu", "--system-malloc"])
    cli.reexec_with_cpu_malloc(["--device", "cuda"])
    cli.reexec_with_cpu_malloc(["--device=cuda:1"])
    for k, v in cli.CPU_MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    cli.reexec_with_cpu_malloc(["--device", "cpu"])
    assert len(calls) == 1


def test_make_readme_table(tmp_path, capsys):
    res = layer_speedup.main(FAST + ["--hidden", "32", "--intermediate", "64", "--tokens", "64",
                                     "--loads", "1.0", "--no-backward", "--no-reference", "--no-plot",
                                     "--out", str(tmp_path / "results" / "cpu-test")])
    rows = res["rows"]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    make_readme_table.main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "old" not in text and "cpu-test" in text
    m8k3 = next(r for r in rows if r["config"] == "m8k3")
    assert f"{m8k3['speedup_fwd']:.2f}×" in text  # numbers come from the JSON
    make_readme_table.main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    assert readme.read_text() == text  # idempotent
    # no markers: the README is left alone and the tables go to stdout
    plain = tmp_path / "PLAIN.md"
    plain.write_text("nothing here\n")
    capsys.readouterr()
    make_readme_table.main(["--results", str(tmp_path / "results"), "--readme", str(plain)])
    assert plain.read_text() == "nothing here\n"
    assert "cpu-test" in capsys.readouterr().out
