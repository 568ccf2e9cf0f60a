"""Wall-clock speedup of one AdaMoE layer over top-2 at controlled loads.

One Mixtral-shaped MoE layer (n = 8 true experts; router ``nn.Linear`` + ``ak.route`` +
``ak.moe_mlp``), timed forward (inference, no grad) and forward+backward. The baseline is top-2
(m = 0, k = 2, load L = 2); the AdaMoE settings of the paper (m8k3, m16k4) are timed at target
loads L by adding a scalar bias to the null-expert logits, found by bisection on the routing's load
over the timed batch before timing (the load actually reached is reported). Figure of merit:
``speedup = t(top-2) / t(AdaMoE at L)``, against the ideal ``2 / L`` (time proportional to FLOPs).
The torch reference (a per-expert Python loop, like HF eager) is timed at the same routing, in
rounds of its own (its calls in between would slow the package's: the allocator hands those back
cold memory).

Where the FLOPs stop mattering: the *floor* setting routes exactly one token to each true expert
(every other token all-null), so it reads every expert's weights once and computes almost nothing.
No load can be faster than that while every expert gets a token, so ``bound = t(top-2) /
max(t(top-2) * L / 2, t(floor))`` is the speedup this machine allows at load L (the FLOP ideal
until the weight reads dominate). Each setting also gets a per-op breakdown from the profiler
(``harness/breakdown.py``), written to the JSON and plotted in ``<stem>_breakdown.png``.

    python bench/layer_speedup.py --quick           # < 2 min on a 2-core CPU
    python bench/layer_speedup.py                   # full sweep (Mixtral shapes on a GPU)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import breakdown, cli, plotting, provenance, results, timing, workload  # noqa: E402
import adamoe_kernels as ak  # noqa: E402

SCRIPT = "layer_speedup"
NUM_EXPERTS = 8

# (name, H, I): Mixtral-8x7B and a scaled copy on a GPU; CPU-sized layers otherwise.
GPU_SHAPES = [("mixtral-8x7b", 4096, 14336), ("mixtral-half", 2048, 7168)]
GPU_QUICK_SHAPES = [("mixtral-half", 2048, 7168)]
CPU_SHAPES = [("cpu", 1024, 2816)]
CPU_QUICK_SHAPES = [("cpu-quick", 512, 1408)]
GPU_TOKENS, GPU_QUICK_TOKENS = [512, 4096, 16384], [4096]
CPU_TOKENS, CPU_QUICK_TOKENS = [512, 2048], [256, 2048]


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=None, help="H (with --intermediate: one custom shape)")
    p.add_argument("--intermediate", type=int, default=None, help="I")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="T values")
    p.add_argument("--loads", type=float, nargs="+", default=list(workload.PAPER_LOADS),
                   help="target loads L for the AdaMoE settings")
    p.add_argument("--configs", nargs="+", default=[c[0] for c in workload.ADAMOE_CONFIGS],
                   choices=[c[0] for c in workload.ADAMOE_CONFIGS], help="AdaMoE settings")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--no-reference", action="store_true", help="skip the torch-reference timings")
    return p.parse_args(argv)


def shapes(args, device):
    if args.hidden or args.intermediate:
        if not (args.hidden and args.intermediate):
            raise SystemExit("--hidden and --intermediate go together")
        return [("custom", args.hidden, args.intermediate)]
    if device.type == "cuda":
        return GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
    return CPU_QUICK_SHAPES if args.quick else CPU_SHAPES


def token_counts(args, device):
    if args.tokens:
        return args.tokens
    if device.type == "cuda":
        return GPU_QUICK_TOKENS if args.quick else GPU_TOKENS
    return CPU_QUICK_TOKENS if args.quick else CPU_TOKENS


@dataclass
class Problem:
    """One layer's tensors, shared by every setting of a (shape, T) group.

    The router of a setting with m null experts is ``router[:n+m]`` (sliced inside the timed
    call, so one leaf collects every setting's gradient). All four are leaves that require grad;
    forward timings run under ``torch.no_grad()``. Gradients are reset before every timed call.
    """

    x: torch.Tensor            # [T, H]
    router: torch.Tensor       # [n + max m, H]
    gate_up: torch.Tensor      # [n, 2I, H]
    down: torch.Tensor         # [n, H, I]
    dy: torch.Tensor           # [T, H]

    @classmethod
    def make(cls, T, H, I, n, max_null, dtype, device):
        kw = dict(dtype=dtype, device=device)
        return cls(x=torch.randn(T, H, **kw).requires_grad_(),
                   router=(torch.randn(n + max_null, H, **kw) / H ** 0.5).requires_grad_(),
                   gate_up=(torch.randn(n, 2 * I, H, **kw) / H ** 0.5).requires_grad_(),
                   down=(torch.randn(n, H, I, **kw) / I ** 0.5).requires_grad_(),
                   dy=torch.randn(T, H, **kw))

    @property
    def leaves(self):
        return [self.x, self.router, self.gate_up, self.down]


def moe_layer(prob, m, null_bias, k, backend):
    """Router (linear, fp32 logits, + the null bias) -> ``ak.route`` -> ``ak.moe_mlp``."""
    logits = F.linear(prob.x, prob.router[: NUM_EXPERTS + m]).float()
    if null_bias is not None:
        logits = logits + null_bias
    r = ak.route(logits, k, NUM_EXPERTS, backend=backend)
    return ak.moe_mlp(prob.x, prob.gate_up, prob.down, r, backend=backend)


def layer_fns(prob, m, k, null_bias, backend):
    """``{"fwd": fn, "fwdbwd": fn}`` of the layer at one routing."""
    def fwd():
        with torch.no_grad():
            moe_layer(prob, m, null_bias, k, backend)

    def fwdbwd():
        moe_layer(prob, m, null_bias, k, backend).backward(prob.dy)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


FLOOR = ("floor", 8, 3)  # (label, m, k): one true assignment per expert, see the docstring


def floor_bias(T, n, m, device):
    """[T, n+m] logit offsets: token t < n picks true expert t first and then null experts; every
    other token picks only null experts. One true row per expert (fewer when T < n)."""
    bias = torch.zeros(T, n + m, device=device)
    bias[:, :n] = -60.0
    idx = torch.arange(min(n, T), device=device)
    bias[idx, idx] = 60.0
    return bias


def calibrate(prob, m, k, target, backend, tol):
    """The null bias that makes this batch's load hit ``target`` (bisection on ``ak.route``)."""
    with torch.no_grad():
        logits = F.linear(prob.x, prob.router[: NUM_EXPERTS + m]).float()
    return workload.calibrate_null_bias(
        lambda b: workload.routing_load(logits, k, NUM_EXPERTS, m, b, backend=backend), target, tol=tol)


def run(args):
    device = cli.resolve_device(args.device)
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    cli.apply_timing(args)
    cli.seed_all(args.seed)
    warmup = args.warmup if args.warmup is not None else 1
    reps = cli.reps_for(args, device, quick_default=5, full_default=10)
    settings = [(*workload.TOP2, 2.0)] + [(label, m, k, L) for label, m, k in workload.ADAMOE_CONFIGS
                                        if label in args.configs for L in args.loads]
    max_null = max(m for _, m, _, _ in settings)
    modes = ["fwd"] if args.no_backward else ["fwd", "fwdbwd"]
    backends = [backend] + ([] if args.no_reference or backend == "torch" else ["torch"])
    groups = [(shape, T) for shape in shapes(args, device) for T in token_counts(args, device)]
    per_mode = (sum(timing.bench_rounds(len(settings) + (be == backend), device, warmup, reps)
                    for be in backends) + len(settings) + 1)  # + the breakdowns
    bar = cli.progress_bar(len(groups) * (len(settings) + len(modes) * per_mode), desc=SCRIPT,
                           disable=args.no_progress)

    rows = []
    for (name, H, I), T in groups:
        prob = Problem.make(T, H, I, NUM_EXPERTS, max_null, dtype, device)
        tol = workload.load_tolerance(T)
        group = []
        for label, m, k, target in settings:  # calibrate every setting before timing any
            if m == 0:
                cal = {"bias": None, "load": float(min(k, NUM_EXPERTS)), "target": target,
                       "iterations": 0, "hit": True}
            else:
                cal = calibrate(prob, m, k, target, backend, tol)
            null_bias = None if m == 0 else workload.null_bias_vector(NUM_EXPERTS, m, cal["bias"], device)
            fns = {be: layer_fns(prob, m, k, null_bias, be) for be in backends}
            group.append(({"shape": name, "H": H, "I": I, "n": NUM_EXPERTS, "T": T, "config": label,
                           "m": m, "k": k, "load_target": target, "load": cal["load"],
                           "null_bias": cal["bias"], "calibration_hit": cal["hit"],
                           "calibration_iterations": cal["iterations"],
                           "true_assignments": round(cal["load"] * T)}, fns))
            bar.update()
        label, m, k = FLOOR
        group.append(({"shape": name, "H": H, "I": I, "n": NUM_EXPERTS, "T": T, "config": label,
                       "m": m, "k": k, "load_target": None, "load": min(NUM_EXPERTS, T) / T,
                       "true_assignments": min(NUM_EXPERTS, T)},
                      {backend: layer_fns(prob, m, k, floor_bias(T, NUM_EXPERTS, m, device),
                                          backend)}))
        for mode in modes:  # per mode and backend, all settings interleaved
            timings = {}
            for be in backends:  # the reference apart: its calls in between slow ours (allocator)
                todo = {(i, be): (fns[be][mode], prob.leaves) for i, (_, fns) in enumerate(group)
                        if be in fns}
                timings.update(timing.bench_many(todo, device, warmup=warmup, reps=reps,
                                                 on_round=bar.update))
            for (i, be), t in timings.items():
                pre = "" if be == backend else "ref_"
                group[i][0][f"{pre}{mode}_ms"] = t["ms"]
                if not pre:
                    group[i][0][f"{mode}_timing"] = t
            for row, fns in group:  # where the time goes (profiled separately from the timings)
                row[f"breakdown_{mode}"] = breakdown.op_breakdown(
                    fns[backend][mode], device, reps=2, grad_to_none=prob.leaves)
                bar.update()
        for row, _ in group:
            if backend == "torch":
                for mode in modes:
                    row[f"ref_{mode}_ms"] = row[f"{mode}_ms"]
            row["fwd_tflops"] = workload.moe_flops(row["true_assignments"], H, I) / row["fwd_ms"] / 1e9
            rows.append(row)
        del prob, group
    bar.close()
    add_speedups(rows)
    return device, dtype, backend, rows


def add_speedups(rows):
    """speedup = t(top-2) / t(setting) within each (shape, T); ideal = 2 / L; bound = t(top-2) /
    max(t(top-2) * L / 2, t(floor)) (see the module docstring)."""
    base = {(r["shape"], r["T"]): r for r in rows if r["config"] == "top2"}
    floor = {(r["shape"], r["T"]): r for r in rows if r["config"] == FLOOR[0]}
    for r in rows:
        b, f = base[(r["shape"], r["T"])], floor.get((r["shape"], r["T"]))
        r["ideal_speedup"] = 2.0 / r["load"] if r["load"] > 0 else None
        for mode in ("fwd", "fwdbwd"):
            for pre in ("", "ref_"):
                key = f"{pre}{mode}_ms"
                if key in r and key in b:
                    r[f"{pre}speedup_{mode}"] = b[key] / r[key]
            key = f"{mode}_ms"
            if f is not None and key in b and key in f and r["load"] > 0:
                r[f"bound_speedup_{mode}"] = b[key] / max(b[key] * r["load"] / 2.0, f[key])


TABLE_COLUMNS = [("shape", "shape"), ("T", "T"), ("config", "config"), ("load_target", "L target"),
                 ("load", "L reached"), ("ideal_speedup", "ideal 2/L"), ("fwd_ms", "fwd ms"),
                 ("speedup_fwd", "speedup fwd"), ("bound_speedup_fwd", "bound fwd"),
                 ("fwdbwd_ms", "fwd+bwd ms"), ("speedup_fwdbwd", "speedup fwd+bwd"),
                 ("bound_speedup_fwdbwd", "bound fwd+bwd"), ("ref_fwd_ms", "torch ref fwd ms"),
                 ("ref_speedup_fwd", "torch ref speedup fwd")]


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    groups = sorted({(r["shape"], r["T"]) for r in rows}, key=lambda g: (g[0], g[1]))
    modes = [m for m in ("fwd", "fwdbwd") if any(f"speedup_{m}" in r for r in rows)]
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(5.2 * len(modes), 4 * len(groups)),
                             squeeze=False)
    loads = [0.2 + 0.02 * i for i in range(96)]
    for gi, (shape, T) in enumerate(groups):
        for mi, mode in enumerate(modes):
            ax = axes[gi][mi]
            ax.plot(loads, [2 / L for L in loads], "k:", label="ideal 2/L")
            ax.axhline(1.0, color="grey", lw=0.8)
            bound = sorted((r for r in rows if r["shape"] == shape and r["T"] == T
                            and f"bound_speedup_{mode}" in r and r["config"] != FLOOR[0]),
                           key=lambda r: r["load"])
            if bound:
                ax.plot([r["load"] for r in bound], [r[f"bound_speedup_{mode}"] for r in bound],
                        "--", color="grey", label="bound (weight-read floor)")
            for ci, (label, _, _) in enumerate(workload.ADAMOE_CONFIGS):
                sel = sorted((r for r in rows if r["shape"] == shape and r["T"] == T
                              and r["config"] == label), key=lambda r: r["load"])
                if not sel:
                    continue
                color = f"C{ci}"
                ax.plot([r["load"] for r in sel], [r.get(f"speedup_{mode}") for r in sel], "o-",
                        color=color, label=f"{label} ({meta['backend']})")
                if any(f"ref_speedup_{mode}" in r for r in sel) and meta["backend"] != "torch":
                    ax.plot([r["load"] for r in sel], [r.get(f"ref_speedup_{mode}") for r in sel],
                            "x--", color=color, alpha=0.5, label=f"{label} (torch ref)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks([0.25, 0.5, 1.0, 1.66, 2.0], ["0.25", "0.5", "1", "1.66", "2"])
            top = max([8.0] + [r.get(f"speedup_{mode}") or 0 for r in rows])
            ticks = [2 ** i for i in range(int(math.log2(top)) + 2)]
            ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("load L (mean true experts per token)")
            ax.set_ylabel("speedup over top-2")
            ax.set_title(f"{shape} T={T} {'forward' if mode == 'fwd' else 'forward+backward'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"AdaMoE layer speedup vs top-2 — {meta['device_name']}, {meta['dtype']}", fontsize=10)
    plotting.save_figure(fig, path)
    plot_breakdown(rows, meta, path.with_name(path.stem + "_breakdown.png"))
    return path


def plot_breakdown(rows, meta, path):
    """Stacked bars of the per-op breakdown: one panel per (shape, T) and mode, one bar per
    setting (top-2, each config at each load, the floor)."""
    plt = plotting.pyplot()
    groups = sorted({(r["shape"], r["T"]) for r in rows}, key=lambda g: (g[0], g[1]))
    modes = [m for m in ("fwd", "fwdbwd") if any(f"breakdown_{m}" in r for r in rows)]
    if plt is None or not modes:
        return None
    phases = [p for p in breakdown.PHASE_ORDER
              if any(p in r.get(f"breakdown_{m}", {}) for r in rows for m in modes)]
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(phases)}
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(6.5 * len(modes), 4.2 * len(groups)),
                             squeeze=False)
    for gi, (shape, T) in enumerate(groups):
        sel = [r for r in rows if r["shape"] == shape and r["T"] == T]
        order = ["top2"] + [c for c, _, _ in workload.ADAMOE_CONFIGS] + [FLOOR[0]]
        sel.sort(key=lambda r: (order.index(r["config"]), -r["load"]))
        labels = [r["config"] if r["config"] in ("top2", FLOOR[0]) else f"{r['config']} L={r['load']:.2f}"
                  for r in sel]
        for mi, mode in enumerate(modes):
            ax = axes[gi][mi]
            left = [0.0] * len(sel)
            for p in phases:
                widths = [r.get(f"breakdown_{mode}", {}).get(p, 0.0) for r in sel]
                ax.barh(range(len(sel)), widths, left=left, color=colors[p], label=p)
                left = [a + b for a, b in zip(left, widths)]
            ax.set_yticks(range(len(sel)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("ms per call (profiled)")
            ax.set_title(f"{shape} T={T} {'forward' if mode == 'fwd' else 'forward+backward'}")
            ax.grid(True, axis="x", alpha=0.3)
        axes[gi][-1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.suptitle(f"Where the time goes — {meta['device_name']}, {meta['dtype']}, backend "
                 f"{meta['backend']}", fontsize=10)
    return plotting.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    device, dtype, backend, rows = run(args)
    meta = provenance.environment(device, dtype, backend)
    meta.update(script=SCRIPT, quick=args.quick, num_experts=NUM_EXPERTS,
                shapes=[{"name": s, "H": H, "I": I} for s, H, I in shapes(args, device)],
                tokens=token_counts(args, device), loads=args.loads,
                settings=[{"config": c, "m": m, "k": k} for c, m, k in workload.ADAMOE_CONFIGS
                          if c in args.configs],
                layer="router linear (fp32 logits + null bias) -> ak.route -> ak.moe_mlp",
                reference="ak backend 'torch' (per-expert Python loop over torch ops, like HF eager)")
    out = results.output_dir(args, device)
    # bf16 (the default) keeps the plain name; other dtypes get their own file.
    suffix = "" if dtype == torch.bfloat16 else "_" + str(dtype).removeprefix("torch.")
    stem = results.result_stem(SCRIPT + suffix, args.quick)
    saved = results.save_results(args, out, stem, meta, rows, plot, [(rows, TABLE_COLUMNS)])
    print(READING_NOTE)
    return saved


READING_NOTE = """
How to read it: speedup = t(top-2) / t(setting); "ideal 2/L" assumes time proportional to FLOPs.
"bound" is what this machine allows at that load: the FLOP ideal until reading every expert's
weights dominates ("floor" = one token per expert: the weights read once, almost no FLOPs).
Few tokens per expert (small T, low L) are weight-read bound, so the speedup saturates at
t(top-2) / t(floor); with more tokens it follows 2/L further. Per-op breakdown: the JSON and
*_breakdown.png; method: docs/benchmarks.md."""


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
