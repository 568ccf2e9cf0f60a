"""One command for one GPU lease: environment, correctness, no host sync, speed and tuning of the
Triton kernels, in under 8 minutes on an H200, everything written to one folder.

    python3 bench/gpu_check.py                    # on the GPU machine, from the repo root ($OUT)
    python bench/gpu_check.py --dry-run --out DIR  # CPU, Triton interpreter, tiny shapes (< 1 min)

Steps, in order. Each runs in its own process with a hard timeout (a failing, hanging or crashing
step is logged and the next one starts on a fresh CUDA context); the timeouts add up to
``BUDGET_S``, and time a step leaves unused goes to the next:

1. ``env``: GPU name, SMs, memory, L2, torch/triton/CUDA/driver versions, clocks (nvidia-smi),
   the measured copy bandwidth and bf16 matmul rate;
2. ``tests``: the kernel tests on CUDA (route, counting sort, grouped GEMM fwd/bwd in
   fp32/fp16/bf16, LoRA experts, edge cases, torch.compile, validation) against ``reference.py``;
3. ``determinism``: route + moe_mlp forward+backward twice, bitwise equal, and against the fp32
   reference (relative errors), at a mid-size shape per dtype and at the Mixtral shape in bf16;
4. ``nosync``: ``torch.cuda.set_sync_debug_mode("error")`` around route + moe_mlp fwd+bwd (three
   dtypes), the router-to-output layer and the LoRA experts; a CUDA-graph capture and replay of
   the layer forward (bitwise equal to eager, replay vs eager time);
5. ``layer``: ``bench/layer_speedup.py`` at the Mixtral shape (H=4096, I=14336, n=8, bf16),
   T=4096 then T=16384, top-2 vs m8k3/m16k4 at L in {2, 1.66, 1, 0.5, 0.25}, fwd and fwd+bwd
   (interleaved CUDA-event medians), the Triton kernels' registers/spills as the GPU compiled them;
6. ``kernels``: ``bench/kernel_bench.py`` at the Mixtral shape, T=4096: grouped-GEMM TFLOP/s of
   adamoe vs dense ``torch.mm`` on the same rows, ``torch._grouped_mm``, transformers' eager,
   ``grouped_mm`` (and ``sonicmoe`` where it loads) experts; ``ak.route`` vs torch ops; the
   routing share of the layer at T=4096;
7. ``tuning``: a sweep of BLOCK_M/N/K, num_warps, num_stages for the grouped GEMM's three ops at
   the benchmark shape, written as ``<device-slug>.json`` for ``adamoe_kernels/configs/``;
8. ``decode``: decode tokens/s of ``bench/generate.py``'s GPU model (Mixtral-8x7B widths, 2
   layers, bf16), top-2 ``grouped_mm`` vs m8k3 at L = 1 and 0.5 (``ak.set_target_load``), batch
   1/16/64, a static cache and the decode step captured once as a ``torch.cuda.CUDAGraph``
   (``StaticDecoder``; eager steps too, the graph's tokens checked against them).

Output (``--out``, default ``$OUT``): ``gpu_check.log``, ``gpu_check.json`` (every step's status,
time and results; rewritten after each step, so a killed run still leaves it), ``layer_speedup``
``.json``/``.png``, ``kernels.json``/``.png``, ``<device-slug>.json``: 7 files, no folders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUDGET_S = 475   # the sum of the step timeouts: the whole run stays under 8 minutes
MAX_FILES = 8

# name, estimate on an H200 (s), timeout on the GPU (s), timeout in --dry-run (s)
STEPS = [
    ("env", 10, 20, 20),
    ("tests", 90, 100, 40),
    ("determinism", 20, 35, 20),
    ("nosync", 20, 30, 20),
    ("layer", 105, 120, 40),
    ("kernels", 45, 60, 40),
    ("tuning", 55, 55, 30),
    ("decode", 40, 55, 30),
]

# The kernel tests that run on CUDA (their "cuda" device parameter; conftest drops "cpu" there).
TEST_FILES = ["tests/test_routing.py", "tests/test_routing_extensions.py", "tests/test_moe_mlp.py",
              "tests/test_lora.py", "tests/test_compile.py", "tests/test_validation.py",
              "tests/test_losses.py"]
DRY_TESTS = ["tests/test_routing.py::test_route_is_deterministic",
             "tests/test_moe_mlp.py::test_moe_mlp_empty_expert"]

# Shapes per mode. GPU: the benchmark shapes of the issue; dry: tiny, for the interpreter.
PLAN = {
    "gpu": dict(dtype="bfloat16", H=4096, I=14336, tokens=[4096, 16384], loads=None,
                configs=["m8k3", "m16k4"], cuda_rep_ms=60, cuda_warmup_ms=10,
                kernels_args=["--route-tokens", "4096", "16384", "65536"],
                det_shapes=[(2048, 1024, 2816, d) for d in ("float32", "float16", "bfloat16")]
                + [(4096, 4096, 14336, "bfloat16")],
                sync_shape=(2048, 2048, 7168), graph_tokens=[64, 2048],
                tune_shapes=[(4096, 4096, 14336, 3), (16384, 4096, 14336, 3)],
                warm_tokens=512, warm_hidden=1024, tune_rep_ms=40,
                decode=dict(shape="gpu", batches=[1, 16, 64], prompt=128, new_tokens=32,
                            loads=[1.0, 0.5], reps=3, graphs=True)),
    "dry": dict(dtype="float32", H=32, I=32, tokens=[32], loads=[1.0], configs=["m8k3"],
                cuda_rep_ms=None, cuda_warmup_ms=None,
                kernels_args=["--route-tokens", "32", "--loads", "1.0", "--tokens", "32",
                              "--impls", "adamoe", "dense_mm", "torch_grouped_mm", "hf_grouped_mm",
                              "hf_sonicmoe"],
                det_shapes=[(21, 32, 32, "bfloat16")],
                sync_shape=(16, 32, 32), graph_tokens=[8],
                tune_shapes=[(16, 32, 32, 3)], warm_tokens=8, warm_hidden=32, tune_rep_ms=None,
                decode=dict(shape=dict(hidden=32, intermediate=32, layers=1, vocab=64, heads=4,
                                       kv_heads=2), batches=[1, 2], prompt=8, new_tokens=4,
                            loads=[1.0, 0.5], reps=1, graphs=False, calibrate_backend="torch")),
}
NUM_EXPERTS = 8

# Tuning candidates per op (bf16/fp16 on Hopper): the default first, then the usual Hopper tiles,
# each compiled ahead of time for sm_90 without a spill in the bf16 launches (tests/aot_compile.py,
# Triton 3.9: 128x128x64 with 4 warps and 128x256x64 spilled in the fused gate/up GEMM). One that
# does not compile or fit on the device is recorded and skipped.
CANDIDATES = {
    "gemm": [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)],
    "wgrad": [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3),
              (64, 64, 64, 4, 4)],
    "swiglu_bwd": [(64, 128, 64, 8, 2), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
                   (64, 64, 64, 4, 3), (64, 128, 32, 8, 4)],
}
DRY_CANDIDATES = [(16, 32, 32, 4, 1), (32, 32, 32, 4, 1)]
TUNE_MIN_GAIN = 0.02  # an entry is written only when it beats the default by 2 %


# ---- the parent: run the steps, each in a child process ----------------------------------------

class Runner:
    def __init__(self, args):
        self.args = args
        self.mode = "dry" if args.dry_run else "gpu"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "a", buffering=1)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.t0 = time.time()
        self.summary = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                 "mode": self.mode, "budget_s": args.budget_s,
                                 "started": _now(), "out": str(self.out)},
                        "steps": {}}

    def say(self, text: str) -> None:
        for line in text.rstrip("\n").split("\n"):
            print(line, flush=True)
            self.log.write(line + "\n")

    def save(self) -> None:
        self.summary["meta"]["elapsed_s"] = round(time.time() - self.t0, 1)
        _write_json(self.out / "gpu_check.json", self.summary)

    def run_step(self, name: str, estimate: float, timeout: float) -> dict:
        result_file = self.tmp / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(self.out),
               "--result", str(result_file), "--step-budget", f"{timeout:.0f}"]
        if self.args.dry_run:
            cmd.append("--dry-run")
        env = _child_env(self.args.dry_run)
        if "warmup" in self.summary["meta"]:
            env["ADAMOE_GPU_CHECK_WARMED"] = "1"
        self.say(f"\n=== [{name}] estimate ~{estimate:.0f} s on an H200, timeout {timeout:.0f} s "
                 f"({time.time() - self.t0:.0f} s elapsed) ===")
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reader = threading.Thread(target=self._pump, args=(proc, name), daemon=True)
        reader.start()
        status = "ok"
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
            _kill_group(proc)
        reader.join(timeout=10)
        elapsed = time.time() - start
        result = _read_json(result_file) or {}
        if status == "ok" and rc != 0:
            status = "crashed" if "error" not in result else "error"
        elif status == "ok" and result.get("ok") is False:
            status = "failed"
        entry = {"status": status, "seconds": round(elapsed, 1), "timeout_s": round(timeout),
                 "estimate_s": estimate, "returncode": rc, "result": result}
        self.summary["steps"][name] = entry
        self.save()
        self.say(f"=== [{name}] {status} in {elapsed:.1f} s ===")
        return entry

    def start_warm(self) -> None:
        """Compile what the later steps launch, in parallel processes, while ``tests`` runs."""
        specs = warm_specs(PLAN[self.mode])
        self.say(f"--- compile warm-up: {len(specs)} processes in the background ---")
        self.warm_pool = WarmPool(specs, parallel=_parallel())

    def finish_warm(self, timeout: float) -> None:
        """Before a step that times or captures: wait for the warm-up (or stop it)."""
        pool = getattr(self, "warm_pool", None)
        if pool is None:
            return
        self.warm_pool = None
        info = pool.finish(timeout)
        self.summary["meta"]["warmup"] = info
        self.save()
        self.say(f"--- compile warm-up: {info['warmed']}/{info['of']} done in {info['seconds']} s, "
                 f"{len(info['failed'])} failed, {info['unfinished']} stopped ---")
        for f in info["failed"]:
            self.say(f"warm-up failed: {json.dumps(f)[:800]}")

    def _pump(self, proc, name):
        for line in proc.stdout:
            self.say(f"[{name}] {line.rstrip()}")

    def run(self) -> int:
        steps = [s for s in STEPS if not self.args.steps or s[0] in self.args.steps]
        self.say(f"gpu_check ({self.mode}) -> {self.out}; budget {self.args.budget_s:.0f} s; "
                 f"steps: {', '.join(s[0] for s in steps)}")
        self.save()
        allowed = 0.0
        scale = self.args.budget_s / BUDGET_S
        for name, estimate, gpu_timeout, dry_timeout in steps:
            allowed += (dry_timeout if self.args.dry_run else gpu_timeout) * scale
            if name in ("nosync", "layer", "kernels", "tuning"):
                self.finish_warm(allowed - (time.time() - self.t0) - 10)
            used = time.time() - self.t0
            timeout = min(allowed - used, self.args.budget_s - used)
            if timeout < 5:
                self.summary["steps"][name] = {"status": "skipped", "reason": "no time left"}
                self.say(f"=== [{name}] skipped: no time left ===")
                continue
            self.run_step(name, estimate, timeout)
            if name == "env" and not self.args.dry_run and self.args.warm:
                self.start_warm()
        self.finish_warm(0)
        self.summary["headline"] = headline(self.summary)
        self.save()
        self.say("\n" + render_summary(self.summary))
        files = sorted(p.name for p in self.out.iterdir())
        if len(files) > MAX_FILES:
            self.say(f"WARNING: {len(files)} files in {self.out} (at most {MAX_FILES} come back)")
        shutil.rmtree(self.tmp, ignore_errors=True)
        bad = [n for n, s in self.summary["steps"].items() if s["status"] != "ok"]
        return 1 if bad else 0


def _child_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network there: hub lookups must fail at once
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, on a GPU machine too
    else:
        env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _kill_group(proc) -> None:
    """SIGTERM, then SIGKILL, to the step's process group (it and every process it started)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---- the summary --------------------------------------------------------------------------------

def headline(summary: dict) -> dict:
    """The few numbers the issue asks about, pulled from the steps' results."""
    steps = summary["steps"]
    get = lambda name: (steps.get(name) or {}).get("result") or {}  # noqa: E731
    head = {"steps": {n: s["status"] for n, s in steps.items()}}
    env = get("env")
    head["device"] = env.get("device", {}).get("name") or env.get("cpu")
    tests = get("tests")
    head["tests"] = tests.get("counts")
    det = get("determinism")
    head["bitwise_deterministic"] = det.get("all_bitwise")
    head["max_rel_error"] = det.get("max_rel_error")
    sync = get("nosync")
    head["host_sync_free"] = sync.get("all_sync_free")
    head["graph_replay_equal"] = sync.get("graph_equal")
    head["speedups"] = get("layer").get("speedups")
    head["routing_share"] = get("kernels").get("routing_share")
    head["tuning"] = get("tuning").get("best")
    head["decode"] = [{k: r.get(k) for k in ("batch", "setting", "decode_tok_s", "speedup_vs_top2",
                                             "graph_vs_eager")}
                      for r in get("decode").get("rows") or [] if r.get("decode_tok_s")]
    return head


def render_summary(summary: dict) -> str:
    lines = ["| step | status | s (timeout) | note |", "| --- | --- | --- | --- |"]
    for name, s in summary["steps"].items():
        r = s.get("result") or {}
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} ({s.get('timeout_s', '-')}) "
                     f"| {r.get('note', s.get('reason', ''))} |")
    speed = (summary.get("headline") or {}).get("speedups") or []
    if speed:
        lines += ["", "| T | config | L target | L | ideal | bound fwd | fwd | bound fwd+bwd | fwd+bwd |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in speed:
            lines.append(f"| {r['T']} | {r['config']} | {r['load_target']:g} | {r['load']:.2f} "
                         f"| {_x(r.get('ideal'))} | {_x(r.get('bound_fwd'))} | {_x(r.get('fwd'))} "
                         f"| {_x(r.get('bound_fwdbwd'))} | {_x(r.get('fwdbwd'))} |")
    decode = (summary.get("headline") or {}).get("decode") or []
    if decode:
        lines += ["", "| B | setting | decode tok/s | vs top-2 | graph vs eager |",
                  "| --- | --- | --- | --- | --- |"]
        for r in decode:
            lines.append(f"| {r['batch']} | {r['setting']} | {r['decode_tok_s']:.1f} "
                         f"| {_x(r.get('speedup_vs_top2'))} | {_x(r.get('graph_vs_eager'))} |")
    lines.append(f"\nelapsed {summary['meta'].get('elapsed_s')} s; details in gpu_check.json")
    return "\n".join(lines)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


# ---- the child: one step in-process -------------------------------------------------------------

class Step:
    """What a step function gets: the plan, the output folder, its time budget, and ``report``
    (rewrites the step's result file, so a killed step still leaves what it had)."""

    def __init__(self, args):
        self.args = args
        self.mode = "dry" if args.dry_run else "gpu"
        self.plan = PLAN[self.mode]
        self.out = Path(args.out)
        self.result_file = Path(args.result)
        self.deadline = time.time() + float(args.step_budget)
        self.result: dict = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def report(self, **kv) -> None:
        self.result.update(kv)
        _write_json(self.result_file, self.result)


def _torch():
    import torch

    return torch


def _device():
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_env(st: Step) -> None:
    import platform

    torch = _torch()
    import triton

    from harness import gpu, provenance

    dev = _device()
    res = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "git_commit": provenance._git_commit(), "cpu": provenance.cpu_model_name(),
           "cpu_count": os.cpu_count(), "device_slug": provenance.device_name(dev)}
    for mod in ("transformers", "numpy", "xdist", "pytest_timeout"):
        res[f"has_{mod}"] = _importable(mod)
    res["versions"] = {m: provenance._version(m) for m in ("transformers", "numpy")}
    from adamoe_kernels import support

    res["tested_range"] = support.check_versions()
    res["inside_tested_range"] = all(r["ok"] for r in res["tested_range"])
    print(("versions inside the tested range: " if res["inside_tested_range"] else
           "WARNING: versions outside the tested range (results may not hold): ")
          + support.describe(res["tested_range"]), flush=True)
    if dev.type == "cuda":
        res["device"] = gpu.device_info(dev)
        res["nvidia_smi"] = gpu.nvidia_smi()
        st.report(**res)
        res["ceilings"] = gpu.ceilings(dev)
        res["nvidia_smi_after"] = gpu.nvidia_smi()
        c = res["ceilings"]
        res["note"] = (f"{res['device']['name']}, {res['device']['sm_count']} SMs; copy "
                       f"{c['copy_tb_s']:.2f} TB/s, bf16 mm {c['bf16_mm_tflops']:.0f} TFLOP/s")
    else:
        res["note"] = f"CPU only ({res['cpu']}); dry run"
    res["note"] += ("; versions in the tested range" if res["inside_tested_range"] else
                    "; versions OUTSIDE the tested range: " + support.describe(
                        [r for r in res["tested_range"] if not r["ok"]]))
    print(json.dumps(res, indent=1, default=str))
    st.report(**res)


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def step_tests(st: Step) -> None:
    import re

    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
           "-m", "not slow"]
    if st.mode == "dry":
        cmd += DRY_TESTS + ["-k", "cpu"]
    else:
        cmd += TEST_FILES
        if _importable("xdist"):
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
        if _importable("pytest_timeout"):
            cmd += ["--timeout", "90"]
    print(" ".join(cmd), flush=True)
    st.report(command=" ".join(cmd))
    env = dict(os.environ, ADAMOE_POISON_EMPTY="1")
    # its own process group: on a timeout pytest and its xdist workers all stop (none may keep
    # the GPU busy while the next steps time kernels)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(5.0, st.left() - 5))
    except subprocess.TimeoutExpired:
        rc = None
        _kill_group(proc)
        lines.append(f"pytest stopped after {float(st.args.step_budget) - st.left():.0f} s\n")
    reader.join(timeout=5)
    text = "".join(lines)
    print(text[-20000:], flush=True)
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                                last[-1] if last else "")}
    failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:40]
    note = ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "no pytest summary"
    st.report(ok=rc == 0, returncode=rc, counts=counts, failures=failures, note=note)


def _layer_tensors(T, H, I, m, dtype, device, seed):
    """Random inputs of one layer (n = 8 true, m null experts), drawn on ``device`` (the Mixtral
    weights are 1.4 G values: far faster there than on the host)."""
    torch = _torch()
    g = torch.Generator(device=device).manual_seed(seed)
    n = NUM_EXPERTS

    def rand(*shape, scale=1.0, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt) * scale

    return {"logits": rand(T, n + m, scale=2.0, dt=torch.float32),
            "x": rand(T, H), "gate_up": rand(n, 2 * I, H, scale=H ** -0.5),
            "down": rand(n, H, I, scale=I ** -0.5), "dy": rand(T, H)}


def _fwd_bwd(t, k, route, moe_mlp, dtype=None):
    """route + moe_mlp forward and backward on fresh leaves; returns ``[y, d logits, d x,
    d gate_up, d down]``."""
    leaves = {name: (t[name].to(dtype) if dtype and name != "logits" else t[name]).detach()
              .clone().requires_grad_() for name in ("logits", "x", "gate_up", "down")}
    r = route(leaves["logits"], k, NUM_EXPERTS)
    y = moe_mlp(leaves["x"], leaves["gate_up"], leaves["down"], r)
    (y.float() * t["dy"].float()).sum().backward()
    return [y.detach()] + [leaves[n].grad for n in ("logits", "x", "gate_up", "down")]


def step_determinism(st: Step) -> None:
    torch = _torch()
    import adamoe_kernels as ak
    from adamoe_kernels import reference

    dev = _device()
    names = ["y", "d_logits", "d_hidden", "d_gate_up", "d_down"]
    # ||kernels - fp32 reference|| / ||reference|| on the same (rounded) inputs: the kernels keep
    # h and the per-slot outputs in the input dtype, fp32 stays exact (no TF32 unless enabled)
    limits = {"float32": 1e-4, "float16": 1.5e-2, "bfloat16": 3e-2}
    rows, m, k = [], 8, 3
    for i, (T, H, I, dtype_name) in enumerate(st.plan["det_shapes"]):
        if st.left() < 10 and rows:
            rows.append({"T": T, "H": H, "I": I, "dtype": dtype_name, "skipped": "no time left"})
            continue
        dtype = getattr(torch, dtype_name)
        t = _layer_tensors(T, H, I, m, dtype, dev, seed=100 + i)
        a = _fwd_bwd(t, k, ak.route, ak.moe_mlp)
        b = _fwd_bwd(t, k, ak.route, ak.moe_mlp)
        bitwise = all(torch.equal(p, q) for p, q in zip(a, b))
        ref = _fwd_bwd(t, k, reference.route, reference.moe_mlp, dtype=torch.float32)
        rel = {}
        for name, got, want in zip(names, a, ref):
            err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
            rel[name] = float(err)
        worst = max(rel.values())
        row = {"T": T, "H": H, "I": I, "dtype": dtype_name, "n": NUM_EXPERTS, "m": m, "k": k,
               "bitwise_equal": bitwise, "rel_error": rel, "max_rel_error": worst,
               "within_limit": bool(worst <= limits[dtype_name]), "limit": limits[dtype_name],
               "true_assignments": int(ak.route(t["logits"], k, NUM_EXPERTS).expert_offsets[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del t, a, b, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        st.report(rows=rows)
    done = [r for r in rows if "skipped" not in r]
    ok = bool(done) and all(r["bitwise_equal"] and r["within_limit"] for r in done)
    worst = max((r["max_rel_error"] for r in done), default=None)
    st.report(rows=rows, ok=ok, all_bitwise=all(r["bitwise_equal"] for r in done),
              max_rel_error=worst,
              note=f"{len(done)} shapes, bitwise {'yes' if ok else 'NO'}, max rel err {worst:.2e}"
              if worst is not None else "nothing ran")


def step_nosync(st: Step) -> None:
    torch = _torch()
    import torch.nn.functional as F

    import adamoe_kernels as ak
    import kernel_bench
    from harness import gpu

    dev = _device()
    res = {"sync": []}
    dtypes = ["bfloat16", "float16", "float32"] if dev.type == "cuda" else ["float32"]
    for name in dtypes:
        res["sync"].append({"what": "route + moe_mlp fwd+bwd",
                            **kernel_bench.sync_check(dev, getattr(torch, name), "triton")})
        st.report(**res)
    T, H, I = st.plan["sync_shape"]
    dtype = getattr(torch, st.plan["dtype"])
    n, m, k = NUM_EXPERTS, 8, 3
    t = _layer_tensors(T, H, I, m, dtype, dev, seed=7)
    router = (torch.randn(n + m, H, device=dev, dtype=dtype) / H ** 0.5).requires_grad_()
    x, gu, dn = (t[name].requires_grad_() for name in ("x", "gate_up", "down"))

    def layer():
        logits = F.linear(x, router).float()
        return ak.moe_mlp(x, gu, dn, ak.route(logits, k, n))

    def layer_step():
        layer().backward(t["dy"])

    layer_step()  # runs on CPU too (the dry run exercises the path)
    res["sync"].append({"what": f"router + route + moe_mlp fwd+bwd T={T} H={H} I={I}",
                        **gpu.no_host_sync(layer_step, dev)})
    r = 16
    A = (torch.randn(n, r, H, device=dev, dtype=dtype) * 0.05).requires_grad_()
    B = (torch.randn(n, H, r, device=dev, dtype=dtype) * 0.05).requires_grad_()

    def lora_step():
        rt = ak.route(t["logits"], k, n)
        ak.moe_lora(x, A, B, rt, 2.0).backward(t["dy"])

    lora_step()
    res["sync"].append({"what": f"moe_lora fwd+bwd r={r}", **gpu.no_host_sync(lora_step, dev)})
    st.report(**res)
    res["graph"] = []
    for T_g in st.plan["graph_tokens"]:
        tg = _layer_tensors(T_g, H, I, m, dtype, dev, seed=11)
        tg["gate_up"], tg["down"] = gu.detach(), dn.detach()

        def fwd(tg=tg):
            with torch.no_grad():
                logits = F.linear(tg["x"], router.detach()).float()
                return ak.moe_mlp(tg["x"], tg["gate_up"], tg["down"], ak.route(logits, k, n))

        fwd()
        res["graph"].append({"T": T_g, **gpu.graph_replay(fwd, dev)})
        st.report(**res)
    checked = [s for s in res["sync"] if s.get("checked")]
    graphs = [g for g in res["graph"] if g.get("checked")]
    res["all_sync_free"] = not any(s["host_sync"] for s in checked) if checked else None
    res["graph_equal"] = all(g["replay_equals_eager"] for g in graphs) if graphs else None
    ok = (res["all_sync_free"] and res["graph_equal"]) if dev.type == "cuda" else True
    res["note"] = (f"{len(checked)} sync checks {'clean' if res['all_sync_free'] else 'SYNC'}, "
                   f"graph replay {'equal' if res['graph_equal'] else 'DIFFERS'}"
                   if dev.type == "cuda" else "CPU: paths ran, sync/graph checks need CUDA")
    for g in graphs:
        res["note"] += f"; T={g['T']}: eager {g['eager_ms']:.3f} ms, replay {g['replay_ms']:.3f} ms"
    print(json.dumps(res, indent=1, default=str), flush=True)
    st.report(ok=ok, **res)


# ---- compile warm-up in parallel processes ---------------------------------------------------------

def warm(spec: dict) -> None:
    """One forward+backward of the layer at ``spec``'s shape (``--warm-spec``): fills Triton's disk
    cache for the kernels a setting launches, so the timed process finds them compiled."""
    torch = _torch()
    import adamoe_kernels as ak
    from adamoe_kernels.ops import tuning
    from adamoe_kernels.ops._common import KernelConfig

    dev = _device()
    dtype = getattr(torch, spec["dtype"])
    t = _layer_tensors(spec["T"], spec["H"], spec["I"], spec["m"], dtype, dev, seed=1)
    forced = {op: KernelConfig(**c) for op, c in spec.get("force", {}).items()}
    with tuning.force_configs(**forced):
        if spec.get("backward", True):
            _fwd_bwd(t, spec["k"], ak.route, ak.moe_mlp)
        else:
            with torch.no_grad():
                ak.moe_mlp(t["x"], t["gate_up"], t["down"], ak.route(t["logits"], spec["k"],
                                                                     NUM_EXPERTS))
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _spawn_warm(spec: dict):
    """A ``--warm-spec`` process; its stderr goes to a temporary file (a pipe nobody reads
    could fill up and block it)."""
    env = _child_env(os.environ.get("TRITON_INTERPRET") == "1")
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm-spec",
                             json.dumps(spec)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=err, text=True, start_new_session=True)
    proc.err_file = err
    return proc


def _stderr_tail(proc, chars: int = 600) -> str:
    proc.err_file.seek(0)
    return proc.err_file.read()[-chars:]


class WarmPool:
    """``warm`` processes, at most ``parallel`` at a time; ``finish`` waits (or kills at the
    deadline) and summarises. The parent starts one in the background after ``env``."""

    def __init__(self, specs: list[dict], parallel: int):
        self.pending, self.running, self.parallel = list(specs), [], parallel
        self.total, self.done, self.failed, self.start = len(specs), 0, [], time.time()
        self.poll()

    def poll(self) -> bool:
        """Reap finished processes and start pending ones; True while work remains."""
        for spec, proc in list(self.running):
            if proc.poll() is not None:
                self.running.remove((spec, proc))
                self.done += 1
                if proc.returncode:
                    self.failed.append({"spec": spec, "error": _stderr_tail(proc)})
                proc.err_file.close()
        while self.pending and len(self.running) < self.parallel:
            spec = self.pending.pop(0)
            self.running.append((spec, _spawn_warm(spec)))
        return bool(self.pending or self.running)

    def finish(self, timeout: float) -> dict:
        deadline = time.time() + max(0.0, timeout)
        while self.poll() and time.time() < deadline:
            time.sleep(0.2)
        unfinished = len(self.pending) + len(self.running)
        for _, proc in self.running:
            _kill_group(proc)
        self.running, self.pending = [], []
        return {"warmed": self.done, "of": self.total, "failed": self.failed,
                "unfinished": unfinished, "seconds": round(time.time() - self.start, 1)}


def warm_parallel(specs: list[dict], timeout: float, parallel: int) -> dict:
    """Run ``warm`` for each spec in its own process, ``parallel`` at a time, within ``timeout``."""
    return WarmPool(specs, parallel).finish(timeout)


def warm_specs(plan: dict) -> list[dict]:
    """What the steps after ``tests`` compile: the layer per setting (bf16, k = 2, 3, 4), the
    determinism and sync dtypes (k = 3), the decode-sized graph forward (smaller row tiles) and
    every tuning candidate. ``H`` only enters the kernels as runtime integers (divisible by 16
    either way), so a smaller one compiles the same kernels with less memory and time."""
    T, H, I = plan["warm_tokens"], plan["warm_hidden"], plan["I"]
    base = {"T": T, "H": H, "I": I, "dtype": plan["dtype"]}
    specs = [{**base, "m": m, "k": k} for m, k in ((0, 2), (8, 3), (16, 4))]
    mid = plan["det_shapes"][0]
    specs += [{**base, "I": mid[2], "m": 8, "k": 3, "dtype": d} for d in ("float16", "float32")]
    specs += [{**base, "T": t, "m": 8, "k": 3, "backward": False}
              for t in plan["graph_tokens"] if t < T]
    return specs + tuning_specs(plan)


def tuning_specs(plan: dict) -> list[dict]:
    """One warm-up per tuning candidate (the other ops at their defaults)."""
    base = {"T": plan["warm_tokens"], "H": plan["warm_hidden"], "I": plan["I"], "m": 8, "k": 3,
            "dtype": plan["dtype"]}
    return [{**base, "backward": op != "gemm", "force": {op: _cfg(c)}}
            for op, cands in CANDIDATES.items() for c in cands[1:]]


def _parallel() -> int:
    """Warm-up processes at a time: half the cores (the tests use the rest), at most 8
    (each holds a few GB of GPU memory)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# ---- speed ---------------------------------------------------------------------------------------

def _bench_argv(st: Step) -> list[str]:
    p = st.plan
    argv = ["--dtype", p["dtype"], "--no-progress"]
    if st.mode == "dry":
        argv += ["--device", "cpu", "--backend", "triton", "--reps", "1", "--warmup", "0",
                 "--threads", "1"]
    else:
        argv += ["--device", "cuda", "--cuda-rep-ms", str(p["cuda_rep_ms"]),
                 "--cuda-warmup-ms", str(p["cuda_warmup_ms"])]
    return argv


def step_layer(st: Step) -> None:
    import layer_speedup
    from adamoe_kernels.kernels import grouped_gemm, routing
    from harness import gpu, results, workload

    p, dev = st.plan, _device()
    labels = {c[0]: c for c in workload.ADAMOE_CONFIGS}
    specs = [{"T": p["warm_tokens"], "H": p["warm_hidden"], "I": p["I"], "m": m, "k": k,
              "dtype": p["dtype"]} for m, k in [(0, 2)] + [labels[c][1:] for c in p["configs"]]]
    # the interpreter compiles nothing; with the parent's warm-up this is done already
    if dev.type == "cuda" and os.environ.get("ADAMOE_GPU_CHECK_WARMED") != "1":
        st.report(warmup=warm_parallel(specs, timeout=min(60, st.left() / 3), parallel=_parallel()))
        print(f"compile warm-up: {st.result['warmup']}", flush=True)
    rows, meta = [], None
    for T in p["tokens"]:
        if st.left() < 15 and rows:
            print(f"T={T}: skipped, {st.left():.0f} s left", flush=True)
            break
        argv = _bench_argv(st) + ["--hidden", str(p["H"]), "--intermediate", str(p["I"]),
                                  "--tokens", str(T), "--no-reference", "--configs", *p["configs"],
                                  "--out", str(Path(st.args.result).parent / f"layer_T{T}")]
        if p["loads"]:
            argv += ["--loads", *map(str, p["loads"])]
        t0 = time.time()
        res = layer_speedup.main(argv)
        rows += res["rows"]
        meta = dict(res["meta"], tokens=sorted({r["T"] for r in rows}))
        results.write_results(st.out, "layer_speedup", meta, rows)
        layer_speedup.plot(rows, meta, st.out / "layer_speedup.png")
        print(f"T={T}: {time.time() - t0:.1f} s", flush=True)
        st.report(speedups=_speedups(rows), seconds_per_T={**st.result.get("seconds_per_T", {}),
                                                           str(T): round(time.time() - t0, 1)})
    if dev.type == "cuda":
        st.report(kernel_resources=gpu.triton_kernel_resources(routing, grouped_gemm),
                  nvidia_smi_after=gpu.nvidia_smi())
        spilled = [r for r in st.result["kernel_resources"] if r.get("spills")]
        st.report(spilling_kernels=spilled)
    sp = _speedups(rows)
    best = max((r for r in sp if r["config"] != "top2"), key=lambda r: r.get("fwdbwd") or 0,
               default=None)
    note = f"{len(rows)} rows" + (f"; best fwd+bwd {best['fwdbwd']:.2f}x at T={best['T']} "
                                  f"{best['config']} L={best['load']:.2f}" if best else "")
    st.report(ok=bool(rows), note=note)


def _speedups(rows) -> list[dict]:
    """The speedup rows (the floor setting only enters through each row's bound)."""
    return [{"T": r["T"], "config": r["config"], "load_target": r["load_target"],
             "load": r["load"], "ideal": r.get("ideal_speedup"), "fwd": r.get("speedup_fwd"),
             "fwdbwd": r.get("speedup_fwdbwd"), "bound_fwd": r.get("bound_speedup_fwd"),
             "bound_fwdbwd": r.get("bound_speedup_fwdbwd"), "fwd_ms": r.get("fwd_ms"),
             "fwdbwd_ms": r.get("fwdbwd_ms"), "fwd_tflops": r.get("fwd_tflops")}
            for r in rows if r["config"] != layer_speedup_floor()]


def layer_speedup_floor() -> str:
    import layer_speedup

    return layer_speedup.FLOOR[0]


def step_kernels(st: Step) -> None:
    import kernel_bench

    p = st.plan
    tmp = Path(st.args.result).parent / "kernels"
    argv = _bench_argv(st) + p["kernels_args"] + ["--out", str(tmp)]
    if st.mode == "dry":
        argv += ["--hidden", str(p["H"]), "--intermediate", str(p["I"])]
    res = kernel_bench.main(argv)
    for suffix in (".json", ".png"):
        src = tmp / f"kernels{suffix}"
        if src.exists():
            shutil.copy(src, st.out / f"kernels{suffix}")
    gemm = [r for r in res["rows"] if r["part"] == "gemm" and "fwd_ms" in r]
    tflops = [{k: r.get(k) for k in ("config", "load", "impl", "fwd_tflops", "fwdbwd_tflops")}
              for r in gemm]
    share = routing_share(res["rows"], results_path=st.out / "layer_speedup.json")
    ada = [r for r in gemm if r["impl"] == "adamoe"]
    note = (f"adamoe fwd {max(r['fwd_tflops'] for r in ada):.1f} TFLOP/s max" if ada else "no rows")
    st.report(ok=bool(gemm), tflops=tflops, routing_share=share, sync_check=res.get("sync_check"),
              skipped=res.get("skipped"), note=note)


def routing_share(kernel_rows, results_path: Path, T: int | None = None) -> list[dict]:
    """``ak.route`` time (kernels step) over the layer's forward time (layer step) per setting,
    at the routing benchmark's first T (4096 on the GPU) where the layer sweep has that T."""
    layer = _read_json(results_path) or {}
    route = [r for r in kernel_rows if r["part"] == "route"]
    T = T or (route[0]["T"] if route else None)
    out = []
    for r in route:
        if r["T"] != T:
            continue
        for lr in layer.get("rows", []):
            if lr["T"] == T and lr["config"] == r["config"] and lr.get("fwd_ms"):
                out.append({"T": T, "config": r["config"], "load": lr["load"],
                            "route_us": r["adamoe_us"], "layer_fwd_ms": lr["fwd_ms"],
                            "share": r["adamoe_us"] / 1e3 / lr["fwd_ms"]})
    return out


# ---- tuning --------------------------------------------------------------------------------------

def _cfg(t) -> dict:
    bm, bn, bk, w, s = t
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}


def step_tuning(st: Step) -> None:
    torch = _torch()
    import adamoe_kernels as ak
    from adamoe_kernels.ops import grouped_mlp, tuning
    from adamoe_kernels.ops._common import KernelConfig
    from harness import provenance, timing

    dev, p = _device(), st.plan
    dtype = getattr(torch, p["dtype"])
    if p["tune_rep_ms"]:
        timing.set_cuda_budget(warmup_ms=5, rep_ms=p["tune_rep_ms"])
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else provenance.cpu_model_name())
    slug = provenance.device_name(dev)
    path = st.out / f"{slug}.json"
    entries, trials, best_all = [], [], []
    if dev.type == "cuda" and os.environ.get("ADAMOE_GPU_CHECK_WARMED") != "1":
        # compile the candidates in parallel processes first (the parent's warm-up does it too)
        info = warm_parallel(tuning_specs(p), timeout=min(45, st.left() / 3), parallel=_parallel())
        print(f"compile warm-up: {info}", flush=True)
        st.report(warmup=info)
    for T, H, I, k in p["tune_shapes"]:
        if st.left() < 20 and trials:
            break
        m = 8
        t = _layer_tensors(T, H, I, m, dtype, dev, seed=3)
        r = ak.route(t["logits"], k, NUM_EXPERTS)
        rows = math.ceil(T * k / NUM_EXPERTS)
        leaves = [t[n].requires_grad_() for n in ("x", "gate_up", "down")]

        def fwd():
            with torch.no_grad():
                return ak.moe_mlp(t["x"], t["gate_up"], t["down"], r)

        def fwdbwd():
            ak.moe_mlp(t["x"], t["gate_up"], t["down"], r).backward(t["dy"])

        chosen: dict[str, KernelConfig] = {}
        for op in ("gemm", "wgrad", "swiglu_bwd"):
            if st.left() < 15:
                break
            default = grouped_mlp.kernel_config(op, t["x"], NUM_EXPERTS, H, I, rows)
            cands = [KernelConfig(**_cfg(c)) for c in (CANDIDATES[op] if st.mode == "gpu"
                                                       else DRY_CANDIDATES)]
            if st.mode == "dry":
                default = cands[0]
            cands = [default] + [c for c in cands if c != default]
            measure = fwd if op == "gemm" else fwdbwd
            ok_cands, out0 = {}, None
            for i, c in enumerate(cands):
                trial = {"T": T, "H": H, "I": I, "k": k, "op": op, "config": c.__dict__}
                try:
                    with tuning.force_configs(**chosen, **{op: c}):
                        y = fwd()
                        if op != "gemm":
                            for leaf in leaves:
                                leaf.grad = None
                            fwdbwd()
                            y = torch.cat([leaves[1].grad.flatten()[:1 << 20], y.flatten()])
                    if out0 is None:
                        out0 = y.float()
                    err = float((y.float() - out0).norm() / out0.norm().clamp_min(1e-30))
                    trial["rel_diff_vs_default"] = err
                    if not err <= 2e-2:
                        raise RuntimeError(f"result differs from the default config's: {err:.3g}")
                    ok_cands[i] = c
                except Exception as e:  # noqa: BLE001 (out of resources, compile error: skip it)
                    trial["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                trials.append(trial)
            if not ok_cands or 0 not in ok_cands:
                st.report(trials=trials)
                continue

            def timed(c, fn):
                def call():
                    with tuning.force_configs(**chosen, **{op: c}):
                        fn()
                return call

            fns = {i: (timed(c, measure), leaves if op != "gemm" else None)
                   for i, c in ok_cands.items()}
            times = timing.bench_many(fns, dev, warmup=0, reps=1)
            for trial in trials[-len(cands):]:
                idx = cands.index(KernelConfig(**trial["config"]))
                if idx in times:
                    trial["ms"] = times[idx]["ms"]
            best_i = min(times, key=lambda i: times[i]["ms"])
            gain = times[0]["ms"] / times[best_i]["ms"] - 1
            best = {"op": op, "T": T, "H": H, "I": I, "k": k, "rows_per_expert": rows,
                    "default": cands[0].__dict__, "default_ms": times[0]["ms"],
                    "best": cands[best_i].__dict__, "best_ms": times[best_i]["ms"],
                    "gain": gain, "written": gain >= TUNE_MIN_GAIN or st.mode == "dry"}
            best_all.append(best)
            print(json.dumps(best), flush=True)
            if best["written"]:
                chosen[op] = cands[best_i]
                entries.append({"op": op, "dtype": p["dtype"], "n": NUM_EXPERTS, "H": H, "I": I,
                                "rows_per_expert": rows,
                                "config": {k_: v for k_, v in cands[best_i].__dict__.items()
                                           if k_ != "GROUP_M"},
                                "ms": round(times[best_i]["ms"], 4),
                                "default_ms": round(times[0]["ms"], 4),
                                "timed": "moe_mlp forward" if op == "gemm" else "moe_mlp fwd+bwd"})
                data = tuning.table_json(entries, device=name, generated_by="bench/gpu_check.py",
                                         generated=_now(), torch=torch.__version__,
                                         triton=_triton_version())
                _write_json(path, data)
            st.report(trials=trials, best=best_all, config_file=str(path) if entries else None)
        t = r = leaves = None  # free this shape's tensors before the next one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    gains = ", ".join(f"{b['op']}@T={b['T']} {b['gain'] * 100:+.0f}%" for b in best_all)
    st.report(ok=bool(best_all), trials=trials, best=best_all,
              config_file=str(path) if entries else None,
              note=(f"{len(entries)} entries -> {path.name}; " if entries else "no gain: no file; ")
              + gains)


# ---- decode: one token per step, a static cache, the step as one CUDA graph ----------------------

class StaticDecoder:
    """Greedy decoding of ``ids`` with a transformers ``StaticCache``, one forward per token.

    The decode step (unmask the slot of the token, the forward, argmax, the token into the input
    buffer and the history) only reads and writes fixed buffers: the cache's slots, its device
    counter ``cumulative_length`` (advanced by the forward itself), a 4D additive mask (a 4D mask
    goes to attention as is: no mask building, no ``padding_mask.all()`` host sync), the token.
    With ``graph`` (CUDA) it is captured once as a ``torch.cuda.CUDAGraph`` and replayed; a
    change of the load dial (``null_bias``, a buffer filled in place) needs no new capture.
    The prefill runs eagerly before every decode, on the same cache.
    """

    def __init__(self, model, ids, new_tokens: int, graph: bool):
        import inspect

        from transformers import StaticCache

        torch = _torch()
        self.model, self.ids, self.new_tokens = model, ids, new_tokens
        B, P = ids.shape
        dev, dtype = ids.device, next(model.parameters()).dtype
        self.cache = StaticCache(config=model.config, max_cache_len=P + new_tokens)
        # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` deprecated)
        self.kw = ("cache" if "cache" in inspect.signature(model.forward).parameters
                   else "past_key_values")
        self.neg = torch.finfo(dtype).min
        self.mask = torch.full((B, 1, 1, P + new_tokens), self.neg, dtype=dtype, device=dev)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.hist = torch.zeros(B, new_tokens, dtype=torch.long, device=dev)
        self.prefill()  # initialises the cache's tensors (lazily, at the first update)
        self.pos = self.cache.layers[0].cumulative_length  # the slot the next token goes to
        self.graph = None
        if graph:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs do
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()

    def prefill(self) -> None:
        torch = _torch()
        P = self.ids.shape[1]
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(0)
        with torch.no_grad():
            out = self.model(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                             use_cache=True, **{self.kw: self.cache})
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.hist[:, :1].copy_(self.tok)
        self.mask.fill_(self.neg)
        self.mask[..., :P] = 0

    def step(self) -> None:
        torch = _torch()
        slot = self.pos.view(1).clone()
        self.mask.index_fill_(-1, slot, 0.0)
        with torch.no_grad():
            out = self.model(input_ids=self.tok, attention_mask=self.mask, use_cache=True,
                             **{self.kw: self.cache})
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.hist.index_copy_(1, slot - self.ids.shape[1] + 1, self.tok)

    def run(self) -> dict:
        """Prefill (timed apart), then ``new_tokens - 1`` decode steps; tokens/s of the steps."""
        torch = _torch()
        dev = self.ids.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.prefill()
        sync()
        t1 = time.perf_counter()
        for _ in range(self.new_tokens - 1):
            self.graph.replay() if self.graph is not None else self.step()
        sync()
        t2 = time.perf_counter()
        steps = self.new_tokens - 1
        return {"prefill_ms": (t1 - t0) * 1e3, "step_ms": (t2 - t1) * 1e3 / steps,
                "decode_tok_s": self.ids.shape[0] * steps / (t2 - t1),
                "tokens": self.hist.clone()}


def _best(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["decode_tok_s"])
    return {"prefill_ms": min(r["prefill_ms"] for r in runs), "step_ms": best["step_ms"],
            "decode_tok_s": best["decode_tok_s"], "tokens": best["tokens"]}


def step_decode(st: Step) -> None:
    """Decode tokens/s of ``bench/generate.py``'s model (GPU: Mixtral-8x7B layer widths, 2 layers,
    bf16): top-2 ``grouped_mm`` vs m8k3 at L (``ak.set_target_load``), batch 1/16/64, eager and
    CUDA-graph-replayed steps (``StaticDecoder``); the graph's tokens must equal the eager ones."""
    torch = _torch()
    from types import SimpleNamespace

    import generate as gen

    p, dev = st.plan["decode"], _device()
    if st.mode == "dry":  # tiny ops: one thread (as the dry bench steps' --threads 1)
        torch.set_num_threads(1)
    dtype = getattr(torch, st.plan["dtype"])
    shape = gen.GPU_SHAPE if p["shape"] == "gpu" else p["shape"]
    sz = {**shape, "prompt": p["prompt"], "new_tokens": p["new_tokens"]}
    graphs = bool(p["graphs"]) and dev.type == "cuda"
    seed = 0
    t0 = time.time()
    hf, ada = gen.build_models(sz, dtype, dev, "triton", seed)
    blocks = gen.moe_blocks(ada)
    for block in blocks:  # dry run: the interpreter is slow for calibration's ~60 forwards per L
        block.backend = p.get("calibrate_backend") or "triton"
    biases = gen.calibrate(ada, p["loads"], sz, dev, seed)
    for block in blocks:
        block.backend = "triton"
    settings = gen.settings_of(SimpleNamespace(top2_impls=["grouped_mm"], loads=p["loads"]))
    res = {"model": (f"MixtralForCausalLM H={sz['hidden']} I={sz['intermediate']} "
                     f"n={gen.NUM_EXPERTS} layers={sz['layers']} vocab={sz['vocab']}"),
           "dtype": st.plan["dtype"], "prompt": sz["prompt"], "new_tokens": sz["new_tokens"],
           "graphs": graphs, "setup_s": round(time.time() - t0, 1),
           "load_calibrated": {str(L): sum(b[1]) / len(b[1]) for L, b in biases.items()},
           "rows": [], "errors": []}
    st.report(**res)
    print(f"setup {res['setup_s']} s: {res['model']}", flush=True)
    g = torch.Generator().manual_seed(seed)
    for B in p["batches"]:
        if st.left() < 10 and res["rows"]:
            res["errors"].append(f"B={B}: skipped, {st.left():.0f} s left")
            break
        ids = torch.randint(3, sz["vocab"], (B, sz["prompt"]), generator=g).to(dev)
        decoders = {}
        group = []
        for s in settings:
            model = gen.apply_setting(s, hf, ada, biases)
            row = {"batch": B, "setting": s["setting"], "config": s["config"],
                   "load_target": s["load_target"]}
            try:
                eager = StaticDecoder(model, ids, sz["new_tokens"], graph=False)
                e = _best([eager.run() for _ in range(max(1, p["reps"] - 1))])
                row.update(eager_tok_s=e["decode_tok_s"], eager_step_ms=e["step_ms"],
                           prefill_ms=e["prefill_ms"])
                if B == p["batches"][0]:  # the manual loop is model.generate's greedy decoding
                    ref, _ = gen.generate(model, ids, sz["new_tokens"], dev, static=True)
                    row["token_agreement_vs_generate"] = float(
                        (ref[:, ids.shape[1]:] == e["tokens"]).float().mean())
                if graphs:
                    key = id(model)  # one capture per model and batch: L is a buffer
                    if key not in decoders:
                        t1 = time.time()
                        decoders[key] = StaticDecoder(model, ids, sz["new_tokens"], graph=True)
                        row["capture_s"] = round(time.time() - t1, 2)
                    r = _best([decoders[key].run() for _ in range(p["reps"])])
                    row.update(graph_tok_s=r["decode_tok_s"], graph_step_ms=r["step_ms"],
                               graph_vs_eager=r["decode_tok_s"] / e["decode_tok_s"],
                               same_tokens_as_eager=bool(torch.equal(r["tokens"], e["tokens"])))
                row["decode_tok_s"] = row.get("graph_tok_s") or row["eager_tok_s"]
            except Exception as exc:  # noqa: BLE001 (recorded; the other settings go on)
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                res["errors"].append(f"B={B} {s['setting']}: {row['error']}")
                traceback.print_exc()
            group.append(row)
        top2 = next((r for r in group if r["config"] == "top2" and r.get("decode_tok_s")), None)
        for r in group:
            if top2 is not None and r.get("decode_tok_s"):
                r["speedup_vs_top2"] = r["decode_tok_s"] / top2["decode_tok_s"]
                if r.get("eager_tok_s"):
                    r["eager_speedup_vs_top2"] = r["eager_tok_s"] / top2["eager_tok_s"]
            print(json.dumps(r, default=str), flush=True)
        res["rows"] += group
        st.report(**res)
        del decoders
    ok_rows = [r for r in res["rows"] if r.get("decode_tok_s")]
    same = [r["same_tokens_as_eager"] for r in ok_rows if "same_tokens_as_eager" in r]
    res["graph_tokens_equal"] = all(same) if same else None
    best = max((r for r in ok_rows if r["config"] != "top2"),
               key=lambda r: r.get("speedup_vs_top2") or 0, default=None)
    res["note"] = (f"{len(ok_rows)}/{len(res['rows'])} rows, "
                   + ("CUDA graphs" if graphs else "eager (no graphs)")
                   + (f"; best {best['speedup_vs_top2']:.2f}x vs top-2 at B={best['batch']} "
                      f"{best['setting']}" if best and best.get("speedup_vs_top2") else ""))
    ok = (bool(ok_rows) and len(ok_rows) == len(res["rows"])
          and res["graph_tokens_equal"] is not False)
    st.report(ok=ok, **res)


def _triton_version():
    import triton

    return triton.__version__


STEP_FUNCTIONS = {"env": step_env, "tests": step_tests, "determinism": step_determinism,
                  "nosync": step_nosync, "layer": step_layer, "kernels": step_kernels,
                  "tuning": step_tuning, "decode": step_decode}


def run_child(args) -> int:
    sys.path.insert(0, str(BENCH))
    import harness  # noqa: F401  (puts the repository on sys.path)

    st = Step(args)
    st.report(started=_now())
    try:
        STEP_FUNCTIONS[args.step](st)
    except Exception as e:  # noqa: BLE001 (logged; the parent moves on to the next step)
        traceback.print_exc()
        st.report(ok=False, error=f"{type(e).__name__}: {str(e)[:1000]}",
                  note=f"error: {type(e).__name__}: {str(e)[:120]}")
        return 1
    return 0


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="output folder (default: $OUT, else runs/gpu_check-<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes: proves the script in < 1 minute")
    p.add_argument("--steps", nargs="+", choices=[s[0] for s in STEPS],
                   help="run only these steps (in the fixed order)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="no background compile warm-up during the tests step")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="total seconds; the step timeouts are scaled to it")
    p.add_argument("--step", choices=list(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--step-budget", default="60", help=argparse.SUPPRESS)
    p.add_argument("--warm-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "runs" / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.warm_spec:
        sys.path.insert(0, str(BENCH))
        import harness  # noqa: F401

        warm(json.loads(args.warm_spec))
        return 0
    if args.step:
        return run_child(args)
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
