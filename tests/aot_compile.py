"""Compile every Triton kernel the ops really launch for sm_80 and sm_90, without a GPU, and read
each compile's registers, spills and shared memory.

Run as a script (``python tests/aot_compile.py``) with ``TRITON_INTERPRET`` unset: the ops are
called on CPU tensors with the GPU configs, every ``kernel[grid](...)`` launch is recorded instead
of run, and each distinct launch is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. A launch is specialised as
a real one would be (Triton's own binder: 16-byte aligned pointers and integers divisible by 16
get ``tt.divisibility``, integers equal to 1 become constants), so the compiled code is the code a
GPU would run, up to the Triton version. The interpreter accepts code the GPU compiler rejects
(non-power-of-two aranges, tl.dot dims < 16, too much shared memory, dtype mismatches in
tl.where/tl.store), so this is the check that the GPU path builds.

Workloads: ``core`` (route, moe_mlp fwd/bwd for bf16/fp16/fp32, a decode-sized batch), ``lora``
(moe_lora fwd/bwd at a small and a wide rank) and ``tuned`` (every committed
``adamoe_kernels/configs/*.json``, at its shapes, with that table in effect).

Resources (sm_90 and sm_80): registers per thread and stack frame from ``cuobjdump -res-usage``
on the cubin, spill stores/loads from ``ptxas -v`` (run only when the stack frame is not empty:
Triton kernels keep no local arrays, so a stack frame means spills), shared memory from the
compile's metadata.

    python tests/aot_compile.py                                # JSON lines, exit 1 on a failure
    python tests/aot_compile.py --table docs/kernel_resources.md   # regenerate the table

Prints one JSON line per compiled kernel and arch.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["ADAMOE_POISON_EMPTY"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.ops import grouped_mlp as mlp_ops  # noqa: E402
from adamoe_kernels.ops import lora as lora_ops  # noqa: E402
from adamoe_kernels.ops import routing as routing_ops  # noqa: E402
from adamoe_kernels.ops import tuning  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_table  # noqa: E402

ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                torch.int32: "*i32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_recorded: dict = {}    # key -> (fn, {cc: (signature, constexprs, attrs, options)}, workload)
_workload = ["?"]


@contextlib.contextmanager
def workload(label: str):
    """Tag the launches recorded inside the block (the table's 'workload' column)."""
    _workload.append(label)
    try:
        yield
    finally:
        _workload.pop()


def _specialize(fn, args, kwargs, cc):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` would build them for a
    launch on an sm_<cc> device (Triton's binder; CPU tensors specialise like GPU ones)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return signature, constexprs, attrs, options.__dict__


def _plain(fn, args, kwargs):
    """Fallback for a Triton without the binder API: types only, no specialisation."""
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    values = list(args) + [kwargs[p.name] for p in fn.params[len(args):]]
    signature, constexprs = {}, {}
    for p, v in zip(fn.params, values):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = TRITON_TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return signature, constexprs, None, options


def _record(self, *args, grid, warmup, **kwargs):
    try:
        per_cc = {cc: _specialize(self, args, kwargs, cc) for cc in ARCHS}
    except (ImportError, AttributeError, TypeError):
        per_cc = {cc: _plain(self, args, dict(kwargs)) for cc in ARCHS}
    sig, cx, attrs, opts = per_cc[90]
    key = (self.__name__, json.dumps(sig, sort_keys=True),
           json.dumps({str(k): str(v) for k, v in cx.items()}, sort_keys=True), str(attrs),
           json.dumps({k: opts.get(k) for k in LAUNCH_OPTIONS}, sort_keys=True, default=str))
    _recorded.setdefault(key, (self, per_cc, _workload[-1]))


def record_launches(fn) -> None:
    """Run ``fn`` with every Triton launch recorded instead of executed."""
    original = JITFunction.run
    JITFunction.run = _record
    try:
        fn()
    finally:
        JITFunction.run = original


# ---- workloads ------------------------------------------------------------------------------------

def _layer_launches(T, H, I, n, m, k, dtype, null_kinds=("zero", "identity"), empty=False):
    """route (+ backward, + top-p/bias variant) and moe_mlp fwd/bwd on CPU tensors.

    ``empty=True``: weights by ``torch.empty`` (full-size shapes cost no memory: nothing runs)."""
    new = torch.empty if empty else torch.randn
    logits = torch.randn(T, n + m)
    w, ids, counts, offsets, slots = routing_ops.route_op(logits.to(dtype), k, n, "true")
    routing_ops.route_backward_op(w, logits.to(dtype), ids, n, "true")
    routing_ops.route_op(logits.to(dtype), k, n, "all", 0.7, torch.zeros(n + m))
    x = new(T, H, dtype=dtype)
    gu = new(n, 2 * I, H, dtype=dtype)
    d = new(n, H, I, dtype=dtype)
    for null_kind in null_kinds:
        mlp_ops.moe_mlp_op(x, gu, d, ids, w, slots, offsets, null_kind)
        mlp_ops.moe_mlp_backward_op(x, x, gu, d, ids, w, slots, offsets, null_kind, True)


def core_workloads() -> None:
    """The launches of route, moe_mlp forward and backward for the dtypes users run on GPU."""
    H, I, n, m, k = 256, 320, 8, 8, 3
    for T, dtype in ((300, torch.bfloat16), (300, torch.float16), (300, torch.float32),
                     (5, torch.bfloat16)):  # T=5: decode-sized row tiles
        with workload(f"core T={T}"):
            _layer_launches(T, H, I, n, m, k, dtype)


LORA_RANKS = (16, 128)  # BLOCK_R 16 (ranks 8/16) and a wide rank (BLOCK_R 128, smaller tiles)


def lora_workloads() -> None:
    """The launches of moe_lora forward and backward (ranks ``LORA_RANKS``)."""
    T, in_f, out_f, n, m, k = 300, 256, 192, 8, 4, 2
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for r in LORA_RANKS:
            with workload(f"lora r={r}"):
                logits = torch.randn(T, n + m)
                w, ids, _, offsets, slots = routing_ops.route_op(logits, k, n, "true")
                x = torch.randn(T, in_f, dtype=dtype)
                A = torch.randn(n, r, in_f, dtype=dtype)
                B = torch.randn(n, out_f, r, dtype=dtype)
                _, u = lora_ops.moe_lora_fwd_op(x, A, B, ids, w, slots, offsets, 0.5)
                dy = torch.randn(T, out_f, dtype=dtype)
                lora_ops.moe_lora_bwd_op(dy, x, A, B, ids, w, slots, offsets, u, 0.5)


def config_files() -> list[str]:
    return sorted(glob.glob(os.path.join(str(tuning.CONFIG_DIR), "*.json")))


def tuned_workloads() -> None:
    """Every committed tuned table, at each of its (dtype, n, H, I, rows per expert), with the
    table in effect: the configs a GPU of that model would launch."""
    for path in config_files():
        table = tuning.load_table(path)
        shapes = sorted({(e.dtype, e.n, e.H, e.I, e.rows_per_expert or 64) for e in table.entries})
        with tuning.use_table(table):
            for dtype, n, H, I, rows in shapes:
                k = 2
                T = max(1, rows * n // k)
                with workload(f"tuned {os.path.basename(path)}"):
                    _layer_launches(T, H, I, n, 8, k, tuning.DTYPES[dtype],
                                    null_kinds=("zero",), empty=True)


WORKLOADS = {"core": core_workloads, "lora": lora_workloads, "tuned": tuned_workloads}


# ---- compile and resources --------------------------------------------------------------------------

def _nvidia_tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _ptxas(cc: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except Exception:  # noqa: BLE001 (another Triton layout: the bundled binary)
        return _nvidia_tool("ptxas")


def resource_usage(compiled, cc: int) -> dict:
    """``{"regs", "stack", "spill_stores", "spill_loads"}`` of a compiled kernel (None if unknown)."""
    out = {"regs": None, "stack": None, "spill_stores": None, "spill_loads": None}
    cuobjdump = _nvidia_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        if cuobjdump:
            text = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True,
                                  text=True).stdout
            m = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
            if m:
                out["regs"], out["stack"] = int(m.group(1)), int(m.group(2))
        if out["stack"] == 0:
            out["spill_stores"] = out["spill_loads"] = 0
            return out
        ptxas = _ptxas(cc)
        if ptxas:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
            log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx,
                                  "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
            text = log.stdout + log.stderr
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            if m:
                out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
            m = re.search(r"Used (\d+) registers", text)
            if m and out["regs"] is None:
                out["regs"] = int(m.group(1))
    return out


def _dtype(signature: dict) -> str:
    """The launch's data type: its widest-use float pointer type (bf16 > fp16 > fp32)."""
    types = set(signature.values())
    for t in ("*bf16", "*fp16", "*fp32"):
        if t in types:
            return t[1:]
    return "int"


def _variant(fn, constexprs: dict) -> dict:
    names = {(i,): p.name for i, p in enumerate(fn.params)}
    return {names.get(k, k) if not isinstance(k, str) else k: v for k, v in constexprs.items()}


def compile_all(ccs=ARCHS, resource_ccs=(90,)) -> tuple[list[dict], int]:
    """Compile every recorded launch for each arch; returns (rows, failures). Registers and
    spills are read for the archs in ``resource_ccs`` (cuobjdump/ptxas runs in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, compiled_of, failures = [], {}, 0
    for (name, *_), (fn, per_cc, label) in sorted(_recorded.items(), key=lambda kv: kv[0]):
        for cc in ccs:
            signature, constexprs, attrs, options = per_cc[cc]
            variant = _variant(fn, constexprs)
            info = {"kernel": name, "sm": cc, "workload": label, "dtype": _dtype(signature),
                    "num_warps": options.get("num_warps", 4),
                    "num_stages": options.get("num_stages", 3),
                    "constexprs": {k: (v if isinstance(v, (bool, int, float)) else str(v))
                                   for k, v in variant.items()},
                    "dtypes": sorted({t for t in signature.values() if t.startswith("*")})}
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                ptx = compiled.asm["ptx"]
                info.update(shared=compiled.metadata.shared, wgmma="wgmma" in ptx, mma="mma" in ptx,
                            regs=None, stack=None, spill_stores=None, spill_loads=None)
                if cc in resource_ccs:
                    compiled_of[len(rows)] = (compiled, cc)
            except Exception as err:  # report every failure, then fail
                failures += 1
                info["error"] = repr(err)[:2000]
            rows.append(info)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        usage = dict(zip(compiled_of, pool.map(lambda kc: resource_usage(*kc),
                                                compiled_of.values())))
    for i, u in usage.items():
        rows[i].update(u)
    for info in rows:
        print(json.dumps(info), flush=True)
    return rows, failures


def run(workloads=tuple(WORKLOADS)) -> tuple[list[dict], int]:
    for name in workloads:
        record_launches(WORKLOADS[name])
    if not _recorded:
        raise SystemExit("no launches recorded")
    return compile_all()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", help="rewrite the generated table in this markdown file")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = p.parse_args(argv)
    rows, failures = run(args.workloads)
    if args.table and not failures:
        kernel_table.write_table(args.table, rows, triton.__version__)
    print(json.dumps({"kernels": len(_recorded), "failures": failures, "version": ak.__version__,
                      "triton": triton.__version__}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
