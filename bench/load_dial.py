"""The load dial and top-p at inference: eval loss and forward wall-clock vs the load L reached.

The model is the tiny fine-tuned AdaMoE Mixtral of the fine-tuning command (``adamoe-finetune``:
a byte-level Mixtral trained as top-2 on CPython's pydoc topics, converted to m8k3 and fine-tuned
with the null-aware loss). Without ``--model`` the script runs that command's default config
(``--quick``: its ``--quick`` config) in-process, saves the model and reloads it with
``ak.from_pretrained``; ``--model PATH`` loads a saved run (``<out>/model``) instead.

Two dials, each swept on the same model, measured on held-out windows the model never trained on:

* load dial: ``ak.set_target_load(model, L, calib_batch)`` bisects each layer's null-expert
  selection bias on a calibration batch of *training* text so the layer's load is ``L``;
* top-p: ``ak.set_top_p(model, p)`` (null bias back to 0): each token keeps the smallest prefix of
  its top-k whose probability mass reaches ``p``.

Per point: the load reached on the eval windows (``ak.expert_load``, mean over layers and
batches), the eval loss (``adamoe_kernels.training.finetune.evaluate``), and the forward time of one eval
batch (``torch.no_grad()``, all points timed interleaved with ``timing.bench_many``). Reference
points: the fine-tuned model as trained (``natural``: bias 0, no top-p) and, for time only, the
same weights with the null experts removed (``top2_same_weights``: ``ak.convert_model(copy, 0, 2)``
keeps the true router rows; its loss is *not* that of a trained top-2 model). The top-2 base
model's eval loss and that of the top-2 control fine-tuned on the same batches (the command's
default; ``--finetune-args=--no-control`` skips it) come from the fine-tuning run's log.

    python bench/load_dial.py --quick
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import cli, plotting, provenance, results, timing, workload  # noqa: E402
import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402
from adamoe_kernels.training import finetune as ft  # noqa: E402
from adamoe_kernels.integrations.load_control import adamoe_layers, reset_null_bias  # noqa: E402

SCRIPT = "load_dial"
LOADS = (3.0, 2.5, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25)  # clipped to <= k
# Top-p grid. Top-p drops slot j once the mass before it reaches p, so where the load moves
# depends on how peaked the router is: the default fine-tuned model (top-1 probability ~0.4-0.55)
# moves from p = 0.9 down; the --quick one's router is nearly flat (top-1 ~0.1 of n+m = 16) and
# moves only below p = 0.2. The grid covers both.
TOP_PS = (1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05)


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.set_defaults(dtype="float32")  # the fine-tuned model's own dtype (its eval loss is the point)
    p.add_argument("--model", default=None,
                   help="a saved fine-tuning run's model folder (adamoe-finetune writes "
                        "<out>/model); default: run the fine-tuning command in-process")
    p.add_argument("--finetune-out", default=None,
                   help="where the in-process fine-tuning run writes (log.json, model/); "
                        "default: a temporary folder, deleted afterwards")
    p.add_argument("--finetune-args", default="",
                   help="extra arguments for the in-process fine-tuning run, e.g. "
                        "'--no-control' or '--base-steps 100' (--quick adds its --quick)")
    p.add_argument("--loads", type=float, nargs="+", default=None,
                   help=f"load-dial targets, clipped to <= k (default {' '.join(map(str, LOADS))})")
    p.add_argument("--top-p", type=float, nargs="+", default=None,
                   help=f"top-p values (default {' '.join(map(str, TOP_PS))})")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows for loss and load (default: the fine-tuning run's)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="training-text windows the load dial is calibrated on (default: one batch)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward (eval and timing; default: the fine-tuning run's)")
    p.add_argument("--no-top2", action="store_true",
                   help="skip the top-2 same-weights timing reference")
    return p.parse_args(argv)


# ---- the model -----------------------------------------------------------------------------------

def finetune_config(args, backend: str, out_dir: str) -> ft.RunConfig:
    if backend not in ("cpu", "torch"):  # adamoe-finetune trains on the CPU: no triton there
        backend = "cpu" if cpu_extension_available() else "torch"
    argv = ["--out", out_dir, "--backend", backend, "--device", "cpu", "--no-plots"]
    if args.quick:
        argv.append("--quick")
    if args.no_progress:
        argv.append("--no-progress")
    argv += ["--seed", str(args.seed)] + shlex.split(args.finetune_args)
    return ft.parse_args(argv)


def get_model(args, backend, dtype, work_dir):
    """``(model, source)``: the saved run at ``--model``, or a fresh in-process fine-tuning run.

    ``source`` records where the model came from, the fine-tuning config and its eval losses
    (``run_config`` / ``finetune_summary``; from ``log.json`` next to a saved model if present).
    """
    if args.model:
        path = Path(args.model)
        source = {"kind": "saved", "path": str(path), "finetune_seconds": None}
        log = path.parent / "log.json"
        if log.exists():
            payload = json.loads(log.read_text())
            source["run_config"] = payload.get("config")
            source["finetune_summary"] = _summary_subset(payload.get("summary", {}))
            source["finetune_seconds"] = source["finetune_summary"].get("wall_seconds")
    else:
        cfg = finetune_config(args, backend, work_dir)
        t0 = time.perf_counter()
        summary = ft.run(cfg)
        source = {"kind": "in-process adamoe-finetune" + (" --quick" if args.quick else ""),
                  "finetune_seconds": time.perf_counter() - t0, "run_config": asdict(cfg),
                  "finetune_summary": _summary_subset(summary)}
        path = Path(summary["saved_model"])
    model = ak.from_pretrained(str(path), backend=backend, dtype=dtype).eval()
    return model, source


def _summary_subset(summary: dict) -> dict:
    keys = ("model", "adamoe", "eval_loss", "eval_load_before", "eval_load_after",
            "finetune_tokens_per_s", "wall_seconds")
    return {k: summary[k] for k in keys if k in summary}


def data_split(model, source, seq_len, eval_windows, calib_windows, seed):
    """Held-out eval windows and training-text calibration windows, split as the run split them.

    A byte-vocab model is the demo's: base on the first 60% of the text, fine-tune on the rest,
    of which the last 10% is held out. Other models: the last 10% of the text (``--model`` runs).
    Eval windows are evenly spaced over the held-out part, as ``adamoe-finetune`` evaluates.
    """
    text_path = (source.get("run_config") or {}).get("text")
    text = ft.builtin_text() if text_path is None else open(text_path, encoding="utf-8").read()
    if model.config.vocab_size == ft.ByteTokenizer.vocab_size:
        ids = torch.tensor(ft.ByteTokenizer().encode(text), dtype=torch.long)
        ids = ids[int(ids.numel() * 0.6):]
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source["path"])
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long).reshape(-1)
    held = int(ids.numel() * 0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    eval_data = ft.windows(ids[held:], seq_len, eval_windows, gen, contiguous=True)
    calib = ft.windows(ids[:held], seq_len, calib_windows, gen)
    return eval_data, calib


# ---- the sweeps ----------------------------------------------------------------------------------

def dial_state(model):
    layers = list(adamoe_layers(model))
    return {"null_bias": [float(layer.null_bias) for layer in layers], "top_p": layers[0].top_p}


def apply_state(model, state):
    for layer, b in zip(adamoe_layers(model), state["null_bias"]):
        layer.null_bias.fill_(b)
        layer.top_p = state["top_p"]


def measure(model, eval_data, batch_size, timing_batch):
    """Eval loss and mean eval load (``finetune.evaluate``) and the load on the timed batch."""
    loss, load = ft.evaluate(model, eval_data, batch_size)
    with torch.no_grad():
        model(input_ids=timing_batch)
    loads = ak.expert_load(model)
    return {"eval_loss": loss, "load": load, "layer_loads_timed_batch": loads,
            "load_timed_batch": sum(loads) / len(loads)}


def router_stats(model, k):
    """Per layer, over the last forward's tokens: the mean probability of the 1st..k-th choice
    and the median mass of the slots before each one (top-p keeps slot j while that is < p)."""
    out = []
    for layer in adamoe_layers(model):
        probs = torch.softmax(layer.last_router_logits.float(), dim=-1)
        top = probs.topk(k, dim=-1).values
        before = top.cumsum(-1) - top
        out.append({"mean_topk_prob": [round(float(x), 4) for x in top.mean(0)],
                    "median_mass_before_slot": [round(float(x), 4) for x in before.median(0).values]})
    return out


def load_targets(args, k: int) -> list[float]:
    """The load-dial targets, clipped to ``<= k``, highest first (duplicates after clipping merged)."""
    return sorted({min(float(L), float(k)) for L in (args.loads or LOADS)}, reverse=True)


def sweep(args, model, info, eval_data, calib, batch_size, backend, bar):
    """The points: natural, load dial, top-p. Each row keeps the dial state it was measured at."""
    k = info["top_k"]
    timing_batch = eval_data[:batch_size]
    rows = []

    def add(row):
        row["state"] = dial_state(model)
        row.update(measure(model, eval_data, batch_size, timing_batch))
        rows.append(row)
        bar.update()

    reset_null_bias(model)
    ak.set_top_p(model, None)
    add({"sweep": "natural", "label": "natural", "target_load": None, "top_p": None})
    rows[0]["router_stats"] = router_stats(model, k)  # of the timed batch

    targets = load_targets(args, k)
    tol = max(0.02, workload.load_tolerance(calib.numel()))
    for L in targets:
        reset_null_bias(model)
        t0 = time.perf_counter()
        calib_loads = ak.set_target_load(model, L, input_ids=calib, tol=tol)
        add({"sweep": "load_dial", "label": f"L*={L:g}", "target_load": L, "top_p": None,
             "calib_layer_loads": calib_loads, "calib_load": sum(calib_loads) / len(calib_loads),
             "calibration_hit": all(abs(x - L) <= tol for x in calib_loads), "calib_tol": tol,
             "calib_seconds": time.perf_counter() - t0})

    reset_null_bias(model)
    for p in sorted(args.top_p or TOP_PS, reverse=True):
        ak.set_top_p(model, p)
        add({"sweep": "top_p", "label": f"p={p:g}", "target_load": None, "top_p": p})
    ak.set_top_p(model, None)

    for r in rows:  # every backend routes with the bias and top-p natively (C++ on cpu)
        r["routing_backend"] = backend
    return rows, timing_batch


def top2_reference(model, backend, eval_data, batch_size, timing_batch):
    """The same weights with the null experts removed: ``convert_model(copy, 0, 2)`` keeps the
    true router rows (the top-2 compute reference; not a trained top-2 model)."""
    top2 = ak.convert_model(copy.deepcopy(model), num_null_experts=0, top_k=2, backend=backend).eval()
    row = {"sweep": "top2_same_weights", "label": "top-2 (null experts removed)",
           "target_load": None, "top_p": None, "state": None, "routing_backend": backend}
    row.update(measure(top2, eval_data, batch_size, timing_batch))
    return top2, row


def time_all(model, top2, rows, top2_row, timing_batch, device, warmup, reps, bar):
    """Forward time of one eval batch per point, interleaved: every round runs every point once
    (each call first sets its point's null biases and top-p, a few 0-d fills)."""
    def point(state):
        def fn():
            apply_state(model, state)
            with torch.no_grad():
                model(input_ids=timing_batch)
        return fn

    def plain(m):
        def fn():
            with torch.no_grad():
                m(input_ids=timing_batch)
        return fn

    fns = {i: (point(r["state"]), None) for i, r in enumerate(rows)}
    if top2 is not None:
        fns["top2"] = (plain(top2), None)
    timings = timing.bench_many(fns, device, warmup=warmup, reps=reps, on_round=bar.update)
    tokens = timing_batch.numel()
    natural = timings[0]["ms"]
    for key, t in timings.items():
        r = top2_row if key == "top2" else rows[key]
        r.update(fwd_ms=t["ms"], fwd_timing=t, tokens_per_s=tokens / t["ms"] * 1e3,
                 speedup_vs_natural=natural / t["ms"])
    if top2 is not None:
        for r in rows + [top2_row]:
            r["speedup_vs_top2"] = timings["top2"]["ms"] / r["fwd_ms"]
    reset_null_bias(model)
    ak.set_top_p(model, None)


def run(args):
    device = cli.resolve_device(args.device)
    device_note = None
    if device.type != "cpu":
        device_note = ("adamoe-finetune trains on the CPU (cpu/torch backend); the saved model is "
                       "reloaded with the timed backend and moved to the device")
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    cli.apply_timing(args)
    cli.seed_all(args.seed)
    t_start = time.perf_counter()
    tmp = None
    if args.model is None and args.finetune_out is None:
        tmp = tempfile.TemporaryDirectory(prefix="adamoe-load-dial-")
    work_dir = args.finetune_out or (tmp.name if tmp else None)
    try:
        model, source = get_model(args, backend, dtype, work_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    model.to(device)
    info = dict(model.config.adamoe)
    cfg = source.get("run_config") or {}
    seq_len = cfg.get("seq_len", 64 if args.quick else 256)
    batch_size = args.batch_size or cfg.get("batch_size", 8 if args.quick else 16)
    eval_windows = args.eval_windows or cfg.get("eval_windows", 16 if args.quick else 32)
    calib_windows = args.calib_windows or batch_size
    eval_data, calib = data_split(model, source, seq_len, eval_windows, calib_windows, args.seed)
    eval_data, calib = eval_data.to(device), calib.to(device)

    k = info["top_k"]
    n_points = 1 + len(load_targets(args, k)) + len(args.top_p or TOP_PS)
    warmup = args.warmup if args.warmup is not None else 1
    reps = cli.reps_for(args, device, quick_default=5, full_default=7)
    n_fns = n_points + (0 if args.no_top2 else 1)
    bar = cli.progress_bar(n_fns + timing.bench_rounds(n_fns, device, warmup, reps),
                              desc=SCRIPT, disable=args.no_progress)
    rows, timing_batch = sweep(args, model, info, eval_data, calib, batch_size, backend, bar)
    top2 = top2_row = None
    if not args.no_top2:
        top2, top2_row = top2_reference(model, backend, eval_data, batch_size, timing_batch)
        bar.update()
    time_all(model, top2, rows, top2_row, timing_batch, device, warmup, reps, bar)
    bar.close()
    natural = rows[0]
    all_rows = rows + ([top2_row] if top2_row else [])
    for r in all_rows:
        r["eval_loss_vs_natural"] = r["eval_loss"] - natural["eval_loss"]
        r["null_bias"] = r["state"]["null_bias"] if r.get("state") else None
        r.pop("state", None)
    setup = {
        "model_source": source, "adamoe": info,
        "model_sizes": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                        "intermediate": model.config.intermediate_size,
                        "vocab": model.config.vocab_size, "num_experts": info["num_experts"]},
        "seq_len": seq_len, "batch_size": batch_size, "eval_windows": eval_windows,
        "eval_tokens": eval_data.numel(), "calib_windows": calib_windows,
        "timed_batch_shape": list(timing_batch.shape), "tokens_per_timed_batch": timing_batch.numel(),
        "warmup": warmup, "reps": reps, "total_seconds": time.perf_counter() - t_start,
        "device_note": device_note,
    }
    return device, dtype, backend, setup, all_rows


TABLE_COLUMNS = [("label", "point"), ("load", "L reached (eval)"), ("eval_loss", "eval loss"),
                 ("eval_loss_vs_natural", "Δ loss vs natural"), ("fwd_ms", "fwd ms/batch"),
                 ("tokens_per_s", "tokens/s"), ("speedup_vs_natural", "speedup vs natural"),
                 ("routing_backend", "routing")]


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = {"load_dial": dict(marker="o", color="C0", label="load dial (set_target_load)"),
              "top_p": dict(marker="s", color="C1", label="top-p (set_top_p)")}
    for sweep_name, style in styles.items():
        pts = sorted((r for r in rows if r["sweep"] == sweep_name), key=lambda r: r["load"])
        if not pts:
            continue
        xs = [r["load"] for r in pts]
        ax_loss.plot(xs, [r["eval_loss"] for r in pts], lw=1.3, ms=5, **style)
        ax_time.plot(xs, [r["fwd_ms"] for r in pts], lw=1.3, ms=5, **style)
        x_range = max(r["load"] for r in rows) - min(r["load"] for r in rows)
        for group in _coinciding(pts, tol=0.025 * x_range):  # one label per cluster of points
            key = "target_load" if sweep_name == "load_dial" else "top_p"
            vals = sorted(r[key] for r in group)
            text = f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}–{vals[-1]:g}"
            # dial labels above-right of its points, top-p labels below-left (under its curve)
            offset, ha = ((4, 4), "left") if sweep_name == "load_dial" else ((-5, -11), "right")
            r = group[len(group) // 2]
            ax_loss.annotate(text, (r["load"], r["eval_loss"]), textcoords="offset points",
                             xytext=offset, fontsize=7, color=style["color"], ha=ha)
    nat = next(r for r in rows if r["sweep"] == "natural")
    for ax, key in ((ax_loss, "eval_loss"), (ax_time, "fwd_ms")):
        ax.plot([nat["load"]], [nat[key]], marker="*", ms=14, color="k", ls="none",
                label=f"fine-tuned as trained (L={nat['load']:.2f})", zorder=4)
    top2 = next((r for r in rows if r["sweep"] == "top2_same_weights"), None)
    if top2 is not None:
        for ax, key in ((ax_loss, "eval_loss"), (ax_time, "fwd_ms")):
            ax.plot([top2["load"]], [top2[key]], marker="X", ms=9, color="grey", ls="none",
                    label="top-2, same weights, null experts removed", zorder=4)
    losses = [r["eval_loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    span = max(hi - lo, 0.01)
    evals = (meta.get("model_source", {}).get("finetune_summary") or {}).get("eval_loss", {})
    for key, ls, what in (("base_top2", ":", "top-2 base model before fine-tuning"),
                          ("top2_finetuned", "--", "top-2 fine-tuned on the same batches")):
        v = evals.get(key)
        if v is None:
            continue
        if lo - span <= v <= hi + span:
            ax_loss.axhline(v, color="grey", ls=ls, lw=1, label=f"{what} ({v:.3f})")
        else:  # keep the axis on the sweep; the legend says where the reference is
            ax_loss.plot([], [], color="grey", ls=ls, lw=1, label=f"{what}: {v:.3f} (off scale)")
    ax_loss.set_xlabel("load L reached on the eval windows (true experts / token)")
    byte_vocab = meta["model_sizes"]["vocab"] == ft.ByteTokenizer.vocab_size
    ax_loss.set_ylabel(f"eval loss (nats / {'byte' if byte_vocab else 'token'})")
    ax_loss.set_title("Eval loss vs load (labels: target L / p)", fontsize=10)
    ax_time.set_xlabel("load L reached on the eval windows (true experts / token)")
    ax_time.set_ylabel(f"forward ms per batch ({meta['tokens_per_timed_batch']} tokens)")
    ax_time.set_title("Forward wall-clock vs load", fontsize=10)
    ax_time.set_ylim(bottom=0)
    for ax in (ax_loss, ax_time):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    info = meta["adamoe"]
    s = meta["model_sizes"]
    fig.suptitle(f"Tiny fine-tuned AdaMoE Mixtral (m={info['num_null_experts']}, k={info['top_k']}, "
                 f"n={info['num_experts']}, H={s['hidden']}, {s['layers']} layers) — "
                 f"{meta['device_name']}, {meta['dtype']}, backend {meta['backend']}", fontsize=9)
    return plotting.save_figure(fig, path)


def _coinciding(points, tol=0.02):
    """Consecutive points (sorted by load) closer than ``tol`` in load, as groups."""
    groups = []
    for r in points:
        if groups and abs(r["load"] - groups[-1][-1]["load"]) < tol:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def main(argv=None):
    args = parse_args(argv)
    device, dtype, backend, setup, rows = run(args)
    meta = provenance.environment(device, dtype, backend)
    meta.update(script=SCRIPT, quick=args.quick, **setup,
                timed="model(input_ids=batch) under torch.no_grad(), one eval batch, all points "
                      "interleaved (timing.bench_many)",
                note="natural = the fine-tuned model as trained (null bias 0, no top-p); "
                     "top2_same_weights = convert_model(copy, 0, 2): the true router rows and "
                     "experts of the same model with top-2 routing, a compute reference (its loss "
                     "is not a trained top-2 model's)")
    out = results.output_dir(args, device)
    stem = results.result_stem(SCRIPT, args.quick)
    return results.save_results(args, out, stem, meta, rows, plot, [(rows, TABLE_COLUMNS)],
                               header=f"{setup['model_source']['kind']} | "
                                      f"{setup['total_seconds']:.0f} s")


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
