"""Expert-parallel AdaMoE: bytes on the wire and time per forward(+backward) against the load L.

``ak.distributed.ExpertParallelMoE`` over W processes on CPU (gloo; each rank gets
``cpu_count // W`` threads unless ``--threads``), n = 8 true experts sharded over the ranks. The baseline is top-2 (m = 0, k = 2, L = 2); the
AdaMoE settings of the paper (m8k3, m16k4) are run at target loads L set with the layer's load dial
(``null_bias``, calibrated by bisection on the full batch, the same on every rank). Reported per
point: the bytes and rows every rank sent (null slots never travel, so they fall with L), the
bytes a null-oblivious dispatcher would send (every slot shipped, null slots remapped to expert 0,
as the public fused-MoE kernels do), and rank 0's median time of a forward (no grad) and of a
forward+backward, each ending in a barrier; all points are timed interleaved (round-robin).

    python bench/expert_parallel.py --quick             # < 2 min on a 2-core CPU
    python bench/expert_parallel.py --world-size 4
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import cli, plotting, provenance, results, timing, workload  # noqa: E402
import adamoe_kernels as ak  # noqa: E402

SCRIPT = "expert_parallel"
NUM_EXPERTS = 8
# (H, I, tokens per rank)
SHAPES = {"quick": (1024, 2816, 512), "full": (2048, 5632, 1024)}


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="number of processes (ranks)")
    p.add_argument("--hidden", type=int, default=None, help="H (default by --quick/device)")
    p.add_argument("--intermediate", type=int, default=None, help="I")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank")
    p.add_argument("--loads", type=float, nargs="+", default=list(workload.PAPER_LOADS),
                   help="target loads L for the AdaMoE settings")
    p.add_argument("--configs", nargs="+", default=None,
                   choices=[c[0] for c in workload.ADAMOE_CONFIGS],
                   help="AdaMoE settings (default: m8k3 with --quick, all otherwise)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    return p.parse_args(argv)


def make_problem(T_total, H, I, max_null, dtype, seed):
    """Full weights and the whole batch, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(T_total, H, generator=g).to(dtype),
            "dy": torch.randn(T_total, H, generator=g).to(dtype),
            "router": (torch.randn(NUM_EXPERTS + max_null, H, generator=g) / H ** 0.5).to(dtype),
            "gate_up": (torch.randn(NUM_EXPERTS, 2 * I, H, generator=g) / H ** 0.5).to(dtype),
            "down": (torch.randn(NUM_EXPERTS, H, I, generator=g) / I ** 0.5).to(dtype)}


def padded_bytes(logits, k, bias, world, T_local, H, element_size):
    """Bytes a null-oblivious dispatcher sends (all ranks, dispatch + return): every slot is
    shipped, null slots remapped to expert 0 (rank 0)."""
    if bias is not None:
        logits = logits + workload.null_bias_vector(NUM_EXPERTS, logits.shape[1] - NUM_EXPERTS, bias)
    ids = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
    ids = torch.where(ids < NUM_EXPERTS, ids, torch.zeros_like(ids))
    owner = ids // (NUM_EXPERTS // world)
    src = (torch.arange(ids.shape[0]) // T_local)[:, None]
    return int((owner != src).sum()) * 2 * H * element_size


def threads_per_rank(args, world):
    return args.threads or max(1, (os.cpu_count() or 1) // world)


def worker(rank, world, init_file, args, plan, out_file):
    torch.set_num_threads(threads_per_rank(args, world))
    device = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    H, I, T = plan["H"], plan["I"], plan["T"]
    prob = make_problem(T * world, H, I, plan["max_null"], dtype, args.seed)
    sl = slice(rank * T, (rank + 1) * T)
    warmup = args.warmup if args.warmup is not None else 1
    reps = cli.reps_for(args, device, quick_default=10, full_default=10)

    # Build every point first, then time them interleaved (round-robin), so a change in the
    # machine's load hits all loads alike. Every timed call ends in a barrier.
    rows, layers = [], []
    for label, m, k, target in plan["points"]:
        full_logits = F.linear(prob["x"], prob["router"][:NUM_EXPERTS + m]).float()
        if m == 0:
            cal = {"bias": None, "load": float(k), "hit": True}
        else:
            cal = workload.calibrate_null_bias(
                lambda b: workload.routing_load(full_logits, k, NUM_EXPERTS, m, b),
                target, tol=workload.load_tolerance(T * world))
        layer = ak.distributed.ExpertParallelMoE.from_dense(
            (prob["router"][:NUM_EXPERTS + m], prob["gate_up"], prob["down"]), top_k=k,
            backend=backend)
        if cal["bias"] is not None:
            layer.null_bias.fill_(cal["bias"])
        layers.append(layer)
        rows.append({"config": label, "m": m, "k": k, "load_target": target, "load": cal["load"],
                     "null_bias": cal["bias"], "calibration_hit": cal["hit"],
                     "bytes_null_padded_total": padded_bytes(full_logits, k, cal["bias"], world, T,
                                                             H, prob["x"].element_size())})
    x, dy = prob["x"][sl].clone(), prob["dy"][sl]

    def fwd(layer):
        def call():
            with torch.no_grad():
                layer(x)
            dist.barrier()
        return call, None

    def fwdbwd(layer):
        xg = x.clone().requires_grad_()

        def call():
            layer(xg).backward(dy)
            dist.barrier()
        return call, [xg, *layer.parameters()]

    modes = {"fwd": fwd} if args.no_backward else {"fwd": fwd, "fwdbwd": fwdbwd}
    bar = cli.progress(range(len(modes) * (warmup + max(reps, 1))), desc=SCRIPT,
                          disable=args.no_progress or rank != 0)
    ticks = iter(bar)
    for mode, make in modes.items():
        dist.barrier()
        timings = timing.bench_many({i: make(layer) for i, layer in enumerate(layers)}, device,
                                    warmup=warmup, reps=reps, on_round=lambda: next(ticks, None))
        for i, row in enumerate(rows):
            row[f"{mode}_ms"], row[f"{mode}_timing"] = timings[i]["ms"], timings[i]
    for row, layer in zip(rows, layers):
        per_rank = [None] * world
        dist.all_gather_object(per_rank, vars(layer.last_stats))
        row["per_rank"] = per_rank
        for key in ("slots", "true_slots", "rows_sent", "rows_received", "bytes_sent"):
            row[f"{key}_total"] = sum(s[key] for s in per_rank)
        row["load_measured"] = row["true_slots_total"] / (T * world)
    if rank == 0:
        torch.save(rows, out_file)
    dist.barrier()
    dist.destroy_process_group()


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    base = next((r for r in rows if r["config"] == "top2"), None)
    modes = ["fwd"] + (["fwdbwd"] if "fwdbwd_ms" in rows[0] else [])
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=(5.2 * (1 + len(modes)), 4))
    ax = axes[0]
    for label in dict.fromkeys(r["config"] for r in rows if r["config"] != "top2"):
        sel = sorted((r for r in rows if r["config"] == label), key=lambda r: r["load_measured"])
        L = [r["load_measured"] for r in sel]
        ax.plot(L, [r["bytes_sent_total"] / 2**20 for r in sel], "o-", label=f"{label}: true rows only")
        ax.plot(L, [r["bytes_null_padded_total"] / 2**20 for r in sel], "x--",
                label=f"{label}: nulls shipped (remapped to expert 0)")
    if base:
        ax.plot([base["load_measured"]], [base["bytes_sent_total"] / 2**20], "ks", label="top-2")
    ax.set_xlabel("load L (true experts per token)")
    ax.set_ylabel("MiB sent per forward (all ranks)")
    ax.set_title("bytes on the wire")
    ax.legend(fontsize=7)
    for ax, mode in zip(axes[1:], modes):
        for label in dict.fromkeys(r["config"] for r in rows if r["config"] != "top2"):
            sel = sorted((r for r in rows if r["config"] == label), key=lambda r: r["load_measured"])
            ax.plot([r["load_measured"] for r in sel], [r[f"{mode}_ms"] for r in sel], "o-",
                    label=label)
        if base:
            ax.axhline(base[f"{mode}_ms"], color="k", ls=":", label="top-2")
        ax.set_xlabel("load L")
        ax.set_ylabel("ms (rank 0, median)")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode])
        ax.legend(fontsize=7)
    fig.suptitle(f"expert parallel, W={meta['world_size']} ({meta['process_group_backend']}), "
                 f"H={meta['H']} I={meta['I']} T/rank={meta['tokens_per_rank']}, "
                 f"{meta['dtype']}, {meta['device_description']}", fontsize=8)
    return plotting.save_figure(fig, path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("this script runs W processes on CPU with gloo; --device cpu")
    if NUM_EXPERTS % args.world_size:
        raise SystemExit(f"--world-size must divide n = {NUM_EXPERTS}")
    H, I, T = SHAPES["quick" if args.quick else "full"]
    H, I, T = args.hidden or H, args.intermediate or I, args.tokens or T
    configs = args.configs or (["m8k3"] if args.quick else [c[0] for c in workload.ADAMOE_CONFIGS])
    settings = [c for c in workload.ADAMOE_CONFIGS if c[0] in configs]
    points = [(*workload.TOP2, 2.0)] + [(lb, m, k, L) for lb, m, k in settings for L in args.loads]
    plan = {"H": H, "I": I, "T": T, "points": points,
            "max_null": max([m for _, m, _ in settings] + [0])}
    backend = cli.resolve_bench_backend(args.backend, device)
    meta = provenance.environment(device, cli.DTYPES[args.dtype], backend)  # loadavg before the run
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.start_processes(worker, args=(args.world_size, os.path.join(tmp, "pg"), args, plan,
                                         out_file), nprocs=args.world_size, start_method="spawn")
        rows = torch.load(out_file)
    meta.update({"script": SCRIPT, "world_size": args.world_size, "process_group_backend": "gloo",
                 "n": NUM_EXPERTS, "H": H, "I": I, "tokens_per_rank": T,
                 "threads_per_rank": threads_per_rank(args, args.world_size),
                 "quick": args.quick,
                 "bytes_sent": "per forward, all ranks: counts + dispatched rows + returned "
                               "outputs (the backward sends as many rows again)"})
    try:
        meta["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    out = results.output_dir(args, device)
    stem = results.result_stem(SCRIPT, args.quick)
    cols = [("config", "config"), ("load_measured", "L"), ("rows_sent_total", "rows sent"),
            ("bytes_sent_total", "bytes sent"), ("bytes_null_padded_total", "bytes, nulls shipped"),
            ("fwd_ms", "fwd ms"), ("fwdbwd_ms", "fwd+bwd ms")]
    results.save_results(args, out, stem, meta, rows, plot, [(rows, cols)])


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
