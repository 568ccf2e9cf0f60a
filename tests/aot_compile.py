"""Compile every Triton kernel the ops really launch for sm_80 and sm_90, without a GPU.

Run as a script (``python tests/aot_compile.py``) with ``TRITON_INTERPRET`` unset: the ops are
called on CPU tensors with the GPU configs, every ``kernel[grid](...)`` launch is recorded instead
of run, and each distinct (kernel, signature, constexprs, options) is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. The interpreter accepts code
the GPU compiler rejects (non-power-of-two aranges, tl.dot dims < 16, too much shared memory,
dtype mismatches in tl.where/tl.store), so this is the check that the GPU path builds.

Prints one JSON line per compiled kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["ADAMOE_POISON_EMPTY"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.ops import routing as routing_ops  # noqa: E402
from adamoe_kernels.ops import grouped_mlp as mlp_ops  # noqa: E402

TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                torch.int32: "*i32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_recorded: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    params = self.params
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    values = list(args) + [kwargs[p.name] for p in params[len(args):]]
    signature, constexprs = {}, {}
    for p, v in zip(params, values):
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
            raise TypeError(f"{self.__name__}: cannot type argument {p.name}={v!r}")
    key = (self.__name__, json.dumps(signature, sort_keys=True),
           json.dumps({k: str(v) for k, v in constexprs.items()}, sort_keys=True),
           json.dumps(options, sort_keys=True))
    _recorded.setdefault(key, (self, signature, constexprs, options))


def record_launches(fn) -> None:
    """Run ``fn`` with every Triton launch recorded instead of executed."""
    original = JITFunction.run
    JITFunction.run = _record
    try:
        fn()
    finally:
        JITFunction.run = original


def core_workloads() -> None:
    """The launches of route, moe_mlp forward and backward for the dtypes users run on GPU."""
    H, I, n, m, k = 256, 320, 8, 8, 3
    for T, dtype in ((300, torch.bfloat16), (300, torch.float16), (300, torch.float32),
                     (5, torch.bfloat16)):  # T=5: decode-sized row tiles
        logits = torch.randn(T, n + m)
        w, ids, counts, offsets, slots = routing_ops.route_op(logits.to(dtype), k, n, "true")
        routing_ops.route_backward_op(w, logits.to(dtype), ids, n, "true")
        routing_ops.route_op(logits.to(dtype), k, n, "all", 0.7, torch.zeros(n + m))
        x = torch.randn(T, H, dtype=dtype)
        gu = torch.randn(n, 2 * I, H, dtype=dtype)
        d = torch.randn(n, H, I, dtype=dtype)
        for null_kind in ("zero", "identity"):
            mlp_ops.moe_mlp_op(x, gu, d, ids, w, slots, offsets, null_kind)
            mlp_ops.moe_mlp_backward_op(x, x, gu, d, ids, w, slots, offsets, null_kind, True)


def compile_all(ccs=(80, 90)) -> int:
    failures = 0
    for (name, *_), (fn, signature, constexprs, options) in sorted(_recorded.items(),
                                                                    key=lambda kv: kv[0]):
        for cc in ccs:
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                info = {"kernel": name, "sm": cc, "shared": compiled.metadata.shared,
                        "wgmma": "wgmma" in compiled.asm["ptx"], "options": options,
                        "dtypes": sorted({t for t in signature.values() if t.startswith("*")})}
                print(json.dumps(info), flush=True)
            except Exception as err:  # report every failure, then fail
                failures += 1
                print(json.dumps({"kernel": name, "sm": cc, "error": repr(err)[:2000]}),
                      flush=True)
    return failures


def main() -> int:
    workloads = {"core": core_workloads}
    try:
        from adamoe_kernels.ops import lora as lora_ops  # noqa: F401
        if hasattr(lora_ops, "aot_workloads"):
            workloads["lora"] = lora_ops.aot_workloads
    except ImportError:
        pass
    for fn in workloads.values():
        record_launches(fn)
    if not _recorded:
        print("no launches recorded", file=sys.stderr)
        return 1
    failures = compile_all()
    print(json.dumps({"kernels": len(_recorded), "failures": failures, "version": ak.__version__}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
