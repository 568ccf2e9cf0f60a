"""Kernel microbenchmarks: routing+grouping, and the grouped expert MLP in TFLOP/s.

1. ``ak.route`` (softmax, top-k over n+m, null drop, normalisation, counting sort) against the torch
   ops a user would write (softmax + topk + normalise + stable argsort + bincount).
2. ``ak.moe_mlp`` forward and forward+backward at one routing per load, in TFLOP/s of the *true*
   assignments only (``2*rows*H*2I + 2*rows*I*H`` forward, 3x that forward+backward), against
   (a) ``dense_mm``: the same two GEMMs + SwiGLU as one dense matmul each over the same number of
   rows (the roofline), (b) ``torch_grouped_mm``: gather + ``torch._grouped_mm`` (or
   ``F.grouped_mm``) x2 + SwiGLU + weighted combine, where the device supports it, (c) ``hf_eager``:
   transformers' per-expert Python loop (``MixtralExperts``, eager), (d) transformers'
   ``grouped_mm``, ``batched_mm`` and ``sonicmoe`` experts functions (sonicmoe: CuteDSL kernels of
   the ``kernels`` hub package, Hopper+; skipped with the reason where it does not load).
   Every implementation gets the same routing;
   transformers' functions get the null slots as their expert-parallel sentinel (id ``n``, weight 0,
   ``_is_expert_parallel=True``): ``grouped_mm`` and ``sonicmoe`` then skip them, ``batched_mm``
   still computes them.
On CUDA, also checks that ``ak.route`` + ``ak.moe_mlp`` (forward and backward) make no host sync,
with ``torch.cuda.set_sync_debug_mode("error")``.

    python bench/kernel_bench.py --quick
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import cli, gpu, plotting, provenance, results, timing, workload  # noqa: E402
import adamoe_kernels as ak  # noqa: E402

SCRIPT = "kernels"  # result stem (kernels.json/.png) and README key: kept from before the rename
NUM_EXPERTS = 8

GPU_SHAPE, GPU_QUICK_SHAPE = ("mixtral-8x7b", 4096, 14336, 4096), ("mixtral-half", 2048, 7168, 4096)
CPU_SHAPE, CPU_QUICK_SHAPE = ("cpu", 1024, 2816, 512), ("cpu-quick", 512, 1408, 256)
GPU_ROUTE_TOKENS, CPU_ROUTE_TOKENS, QUICK_ROUTE_TOKENS = [4096, 16384, 65536], [4096, 16384], [4096]
FULL_LOADS, QUICK_LOADS = [1.66, 1.0, 0.5], [1.0]
IMPLS = ("adamoe", "dense_mm", "torch_grouped_mm", "hf_eager", "hf_grouped_mm", "hf_batched_mm",
         "hf_sonicmoe")
HF_IMPLEMENTATIONS = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm",
                      "hf_batched_mm": "batched_mm", "hf_sonicmoe": "sonicmoe"}
# hf_batched_mm gathers a weight copy per slot: skip it when that exceeds this many bytes.
BATCHED_MM_BYTES_LIMIT = 512 << 20


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=None, help="H (with --intermediate and --tokens)")
    p.add_argument("--intermediate", type=int, default=None, help="I")
    p.add_argument("--tokens", type=int, default=None, help="T for the GEMM part")
    p.add_argument("--route-tokens", type=int, nargs="+", default=None, help="T values for routing")
    p.add_argument("--loads", type=float, nargs="+", default=None,
                   help="target loads of m8k3 for the GEMM part (top-2, L=2, is always timed)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--no-backward", action="store_true")
    return p.parse_args(argv)


def gemm_shape(args, device):
    if args.hidden or args.intermediate or args.tokens:
        if not (args.hidden and args.intermediate and args.tokens):
            raise SystemExit("--hidden, --intermediate and --tokens go together")
        return ("custom", args.hidden, args.intermediate, args.tokens)
    if device.type == "cuda":
        return GPU_QUICK_SHAPE if args.quick else GPU_SHAPE
    return CPU_QUICK_SHAPE if args.quick else CPU_SHAPE


def route_tokens(args, device):
    if args.route_tokens:
        return args.route_tokens
    if args.quick:
        return QUICK_ROUTE_TOKENS
    return GPU_ROUTE_TOKENS if device.type == "cuda" else CPU_ROUTE_TOKENS


# ---- routing --------------------------------------------------------------------------------------

def torch_route(router_logits, top_k, num_experts):
    """What a user writes in torch: the same outputs as ``ak.route(..., normalize="true")``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_probs, topk_ids = torch.topk(probs, top_k, dim=-1)
    is_true = topk_ids < num_experts
    w = torch.where(is_true, topk_probs, torch.zeros_like(topk_probs))
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    key = torch.where(is_true, topk_ids, torch.full_like(topk_ids, num_experts)).flatten()
    sorted_slots = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    return topk_ids, w, counts, offsets, sorted_slots


def bench_routing(args, device, backend, warmup, reps, bar):
    rows = []
    for T in route_tokens(args, device):
        for label, m, k in (workload.TOP2, *workload.ADAMOE_CONFIGS):
            logits = torch.randn(T, NUM_EXPERTS + m, device=device)
            t = timing.bench_many(
                {"ak": (lambda: ak.route(logits, k, NUM_EXPERTS, backend=backend), None),
                 "torch": (lambda: torch_route(logits, k, NUM_EXPERTS), None)},
                device, warmup=warmup, reps=reps)
            t_ak, t_torch = t["ak"], t["torch"]
            bar.update()
            load = float(ak.route(logits, k, NUM_EXPERTS, backend=backend).load())
            rows.append({"part": "route", "T": T, "config": label, "m": m, "k": k, "load": load,
                         "adamoe_us": t_ak["ms"] * 1e3, "torch_us": t_torch["ms"] * 1e3,
                         "speedup": t_torch["ms"] / t_ak["ms"]})
    return rows


# ---- expert MLP implementations -------------------------------------------------------------------

def _grouped_mm_fn():
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm, "torch.nn.functional.grouped_mm"
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm, "torch._grouped_mm"
    return None, None


def torch_grouped_mm_moe(x, gate_up, down, r, num_true):
    """Gather + grouped_mm + SwiGLU + grouped_mm + weighted combine over the true rows only.

    ``num_true`` (host int) sizes the gathered buffer: torch's grouped_mm has no device-side bound.
    """
    mm, _ = _grouped_mm_fn()
    k = r.topk_ids.shape[1]
    slots = r.sorted_slots[:num_true].long()
    tokens = slots // k
    offs = r.expert_offsets[1:].int()
    xs = x[tokens]
    g, u = mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out = mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
    w = r.topk_weights.flatten()[slots]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y = y.index_add(0, tokens, out.float() * w[:, None])
    return y.to(x.dtype)


def dense_mm(x_rows, gate_up, down):
    """The roofline: the same SwiGLU MLP as one dense matmul per projection over all rows."""
    g, u = F.linear(x_rows, gate_up[0]).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down[0])


def hf_experts(implementation, H, I, n, gate_up, down):
    """transformers' MixtralExperts with ``implementation`` and our weight tensors, or (None, why)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except Exception as e:  # noqa: BLE001
        return None, f"transformers MixtralExperts not importable: {e!r}"
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=n, hidden_act="silu")
    try:
        cfg._experts_implementation = implementation
    except Exception as e:  # noqa: BLE001
        return None, f"experts_implementation={implementation!r} rejected: {e!r}"
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj, mod.down_proj = gate_up, down
    if implementation != "eager":
        if not hasattr(mod, "_is_expert_parallel"):
            return None, "this transformers has no experts_implementation dispatch"
        mod._is_expert_parallel = True  # null slots come as the EP sentinel id n (weight 0)
    return mod, None


def make_impls(names, r, num_true, x, params, H, I, device, dtype):
    """``{name: (fn(x, gate_up, down, weights) -> y, None)}`` or ``{name: (None, why skipped)}``."""
    n = NUM_EXPERTS
    sentinel_ids = torch.where(r.topk_ids < n, r.topk_ids, torch.full_like(r.topk_ids, n)).long()
    out = {}
    for name in names:
        if name == "adamoe":
            out[name] = (lambda x, gu, dn, w: ak.moe_mlp(
                x, gu, dn, dataclasses.replace(r, topk_weights=w), backend=params["backend"]), None)
        elif name == "dense_mm":
            out[name] = (None, "timed separately (dense rows)")
        elif name == "torch_grouped_mm":
            mm, mm_name = _grouped_mm_fn()
            if mm is None:
                out[name] = (None, "torch has no grouped_mm")
                continue
            fn = lambda x, gu, dn, w: torch_grouped_mm_moe(  # noqa: E731
                x, gu, dn, dataclasses.replace(r, topk_weights=w), num_true)
            try:
                fn(x, params["gate_up"], params["down"], r.topk_weights)
            except Exception as e:  # noqa: BLE001 (unsupported device/dtype: record why)
                out[name] = (None, f"{mm_name} unsupported here: {type(e).__name__}: {str(e)[:200]}")
                continue
            out[name] = (fn, None)
        elif name.startswith("hf_"):
            impl = HF_IMPLEMENTATIONS[name]
            if impl == "batched_mm":
                need = r.topk_ids.numel() * 3 * I * H * torch.finfo(dtype).bits // 8
                if need > BATCHED_MM_BYTES_LIMIT:
                    out[name] = (None, f"needs {need / 2**30:.1f} GiB of gathered weights "
                                       f"(T*k copies of each expert; limit {BATCHED_MM_BYTES_LIMIT >> 20} MiB)")
                    continue
            mod, why = hf_experts(impl, H, I, n, params["gate_up"], params["down"])
            if mod is None:
                out[name] = (None, why)
                continue

            def fn(x, gu, dn, w, mod=mod):
                mod.gate_up_proj, mod.down_proj = gu, dn
                return mod(x, sentinel_ids, w)

            try:
                fn(x, params["gate_up"], params["down"], r.topk_weights)
            except Exception as e:  # noqa: BLE001
                out[name] = (None, f"{type(e).__name__}: {str(e)[:200]}")
                continue
            out[name] = (fn, None)
    return out


def gemm_settings(args):
    label, m, k = workload.ADAMOE_CONFIGS[0]
    loads = args.loads or (QUICK_LOADS if args.quick else FULL_LOADS)
    return [(*workload.TOP2, 2.0)] + [(label, m, k, L) for L in loads]


def bench_gemm(args, device, dtype, backend, warmup, reps, bar):
    """All implementations at each routing, timed interleaved; one row per (setting, impl)."""
    name, H, I, T = gemm_shape(args, device)
    n = NUM_EXPERTS
    max_m = max(m for _, m, _, _ in gemm_settings(args))
    x = nn.Parameter(torch.randn(T, H, device=device, dtype=dtype))
    gu = nn.Parameter(torch.randn(n, 2 * I, H, device=device, dtype=dtype) / H ** 0.5)
    dn = nn.Parameter(torch.randn(n, H, I, device=device, dtype=dtype) / I ** 0.5)
    logits0 = torch.randn(T, n + max_m, device=device)
    dy = torch.randn(T, H, device=device, dtype=dtype)
    params = {"backend": backend, "gate_up": gu, "down": dn}
    modes = ["fwd"] if args.no_backward else ["fwd", "fwdbwd"]

    rows, skipped = [], {}
    for label, m, k, target in gemm_settings(args):
        logits = logits0[:, : n + m]
        if m:
            cal = workload.calibrate_null_bias(
                lambda b: workload.routing_load(logits, k, n, m, b, backend=backend), target,
                tol=workload.load_tolerance(T))
            logits = logits + workload.null_bias_vector(n, m, cal["bias"], device)
        r = ak.route(logits, k, n, backend=backend)
        num_true = int(r.expert_offsets[-1])
        w = nn.Parameter(r.topk_weights.detach().clone())
        with torch.no_grad():
            y_ref = ak.reference.moe_mlp(x, gu, dn, r).float()
        flops = workload.moe_flops(num_true, H, I)
        xr = nn.Parameter(torch.randn(num_true, H, device=device, dtype=dtype))  # dense_mm rows
        dyr = torch.randn(num_true, H, device=device, dtype=dtype)

        fwd_fns, bwd_fns, group = {}, {}, {}
        impls = make_impls([i for i in args.impls if i != "dense_mm"], r, num_true, x, params, H, I,
                           device, dtype)
        for impl in args.impls:
            row = {"part": "gemm", "shape": name, "H": H, "I": I, "T": T, "config": label, "m": m,
                   "k": k, "load_target": target, "load": num_true / T, "true_assignments": num_true,
                   "impl": impl}
            group[impl] = row
            if impl == "dense_mm":
                fwd = lambda: dense_mm(xr, gu, dn)  # noqa: E731
                fwdbwd = lambda: dense_mm(xr, gu, dn).backward(dyr)  # noqa: E731
                leaves = [xr, gu, dn]
            else:
                fn, why = impls[impl]
                if fn is None:
                    skipped[impl] = row["skipped"] = why
                    continue
                with torch.no_grad():  # every implementation must compute the same layer
                    row["max_abs_diff_vs_reference"] = (fn(x, gu, dn, w).float() - y_ref).abs().max().item()
                fwd = lambda fn=fn: fn(x, gu, dn, w)  # noqa: E731
                fwdbwd = lambda fn=fn: fn(x, gu, dn, w).backward(dy)  # noqa: E731
                leaves = [x, gu, dn, w]

            def fwd_nograd(fwd=fwd):
                with torch.no_grad():
                    fwd()

            fwd_fns[impl] = (fwd_nograd, None)
            if "fwdbwd" in modes:
                try:
                    fwdbwd()
                    bwd_fns[impl] = (fwdbwd, leaves)
                except Exception as e:  # noqa: BLE001 (a baseline without a backward here)
                    row["fwdbwd_skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
        for mode, fns in (("fwd", fwd_fns), ("fwdbwd", bwd_fns)):
            if mode not in modes or not fns:
                continue
            timings = timing.bench_many(fns, device, warmup=warmup, reps=reps, on_round=bar.update)
            for impl, t in timings.items():
                f = flops if mode == "fwd" else 3 * flops
                group[impl].update({f"{mode}_ms": t["ms"], f"{mode}_tflops": f / t["ms"] / 1e9,
                                    f"{mode}_timing": t})
        rows += list(group.values())
        bar.update()
    return rows, skipped


# ---- host-sync check --------------------------------------------------------------------------------

def sync_check(device, dtype, backend, shape=None):
    """Run route + moe_mlp (+ backward) under ``set_sync_debug_mode("error")`` on CUDA."""
    n, m, k, T, H, I = NUM_EXPERTS, 8, 3, 512, 256, 512
    if shape:
        T, H, I = shape
    result = {"backend": backend, "dtype": str(dtype).removeprefix("torch."),
              "shape": {"T": T, "H": H, "I": I, "n": n, "m": m, "k": k}}
    if device.type != "cuda":
        return {**result, **gpu.no_host_sync(lambda: None, device)}
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    gu = (torch.randn(n, 2 * I, H, device=device, dtype=dtype) / H ** 0.5).requires_grad_()
    dn = (torch.randn(n, H, I, device=device, dtype=dtype) / I ** 0.5).requires_grad_()
    logits = torch.randn(T, n + m, device=device, requires_grad=True)

    def step():
        r = ak.route(logits, k, n, backend=backend)
        ak.moe_mlp(x, gu, dn, r, backend=backend).sum().backward()

    result.update(gpu.no_host_sync(step, device))
    if result["checked"] and not result["host_sync"]:
        result["message"] = "route + moe_mlp forward+backward ran with no host sync"
    return result


# ---- main ---------------------------------------------------------------------------------------

ROUTE_COLUMNS = [("T", "T"), ("config", "config"), ("load", "L"), ("adamoe_us", "ak.route us"),
                 ("torch_us", "torch ops us"), ("speedup", "speedup")]
GEMM_COLUMNS = [("config", "config"), ("load", "L"), ("impl", "impl"), ("fwd_ms", "fwd ms"),
                ("fwd_tflops", "fwd TFLOP/s"), ("fwdbwd_ms", "fwd+bwd ms"),
                ("fwdbwd_tflops", "fwd+bwd TFLOP/s"), ("skipped", "skipped")]


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    gemm = [r for r in rows if r["part"] == "gemm" and "fwd_ms" in r]
    modes = [m for m in ("fwd", "fwdbwd") if any(f"{m}_tflops" in r for r in gemm)]
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5.2 * (len(modes) + 1), 4), squeeze=False)
    for mi, mode in enumerate(modes):
        ax = axes[0][mi]
        for ii, impl in enumerate(IMPLS):
            sel = sorted((r for r in gemm if r["impl"] == impl and f"{mode}_tflops" in r),
                         key=lambda r: r["load"])
            if sel:
                ax.plot([r["load"] for r in sel], [r[f"{mode}_tflops"] for r in sel], "o-",
                        color=f"C{ii}", label=impl)
        ax.set_xlabel("load L (true rows = L*T)")
        ax.set_ylabel("TFLOP/s (true assignments)")
        ax.set_title(f"expert MLP {'forward' if mode == 'fwd' else 'forward+backward'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    route = [r for r in rows if r["part"] == "route"]
    for ci, label in enumerate(sorted({r["config"] for r in route})):
        sel = sorted((r for r in route if r["config"] == label), key=lambda r: r["T"])
        ax.plot([r["T"] for r in sel], [r["adamoe_us"] for r in sel], "o-", color=f"C{ci}",
                label=f"ak.route {label}")
        ax.plot([r["T"] for r in sel], [r["torch_us"] for r in sel], "x--", color=f"C{ci}",
                alpha=0.6, label=f"torch ops {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    t_values = sorted({r["T"] for r in route})
    ax.set_xticks(t_values, [str(t) for t in t_values])
    ax.minorticks_off()
    ax.set_xlabel("tokens T")
    ax.set_ylabel("microseconds")
    ax.set_title("routing + grouping")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"adamoe kernels — {meta['device_name']}, {meta['dtype']}, backend {meta['backend']}",
                 fontsize=10)
    return plotting.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    cli.apply_timing(args)
    cli.seed_all(args.seed)
    warmup = args.warmup if args.warmup is not None else 1
    reps = cli.reps_for(args, device, quick_default=5, full_default=10)

    sync = sync_check(device, dtype, backend)
    n_settings = len(gemm_settings(args))
    rounds = timing.bench_rounds(len(args.impls), device, warmup, reps)
    bar = cli.progress_bar(len(route_tokens(args, device)) * 3 + n_settings * (1 + 2 * rounds),
                              desc=SCRIPT, disable=args.no_progress)
    route_rows = bench_routing(args, device, backend, warmup, reps, bar)
    gemm_rows, skipped = bench_gemm(args, device, dtype, backend, warmup, reps, bar)
    bar.close()
    rows = route_rows + gemm_rows

    name, H, I, T = gemm_shape(args, device)
    meta = provenance.environment(device, dtype, backend)
    meta.update(script=SCRIPT, quick=args.quick, num_experts=NUM_EXPERTS,
                gemm_shape={"name": name, "H": H, "I": I, "T": T}, route_tokens=route_tokens(args, device),
                flops="true assignments only: fwd 2*rows*H*2I + 2*rows*I*H; fwd+bwd 3x",
                grouped_mm=_grouped_mm_fn()[1])
    out = results.output_dir(args, device)
    stem = results.result_stem(SCRIPT, args.quick)
    return results.save_results(args, out, stem, meta, rows, plot,
                               [(route_rows, ROUTE_COLUMNS), (gemm_rows, GEMM_COLUMNS)],
                               header=f"host-sync check: {sync}", sync_check=sync, skipped=skipped)


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
