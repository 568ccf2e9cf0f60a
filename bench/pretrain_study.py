"""AdaMoE trained from scratch (the paper's open question 3): tiny byte-level MoE LMs, equal budgets.

Every config is the same tiny Mixtral (``adamoe_kernels.training.finetune.tiny_mixtral``: byte
vocabulary, ``n = 8`` true experts) built from the same seed and trained from its random init on
the same batches of CPython's pydoc topics (``finetune.builtin_text``; the last 10% held out for
eval), through ``ak.convert_model`` on the C++ ``cpu`` backend, fp32:

* ``top1``, ``top2``: plain top-k MoE (``m = 0``, exactly transformers' Mixtral routing);
* ``m8k3``, ``m16k4``: AdaMoE with zero null experts (paper §4.2, ``normalize="true"``);
* ``m8k3-identity``: identity null experts (``null_kind="identity"``, ``normalize="all"``);
* ``m8k3-top-p``: m8k3 routed with top-p over its top-k (``ak.set_top_p``) while training;
* ``m8k3-L<t>``: m8k3 with ``ak.LoadController`` holding every layer's load near ``t``.

All use the null-aware load-balancing loss (``m = 0``: Mixtral's own) with the paper's two-stage α
(0.02, then 0.0001) over the steps (``ak.AlphaSchedule.by_steps``), AdamW, linear warmup + cosine.

Two budgets, both with the same seeds:

* **equal tokens**: every config trains ``--steps`` steps of ``batch * seq_len`` tokens;
* **equal wall-clock**: the time top-2 needs for those steps (its median step time times
  ``--steps``) is the budget; each config gets ``round(budget / its median step time)`` steps,
  its step time measured in the equal-tokens runs (median over its steps and seeds). Converting
  the budget to a step count keeps every run deterministic: rerunning one seed with the same
  step count gives the same losses and loads bitwise on the CPU backend (``tests/
  test_pretrain_study.py``); only the times differ. top-2's equal-time run is its equal-tokens
  run.

Per run: eval loss and load on the held-out windows every ``--eval-every`` steps, with the
training wall-clock (eval excluded) and the training FLOPs (matmuls, 3x the forward, at each
step's measured load; ``finetune.forward_flops_per_token``) at that point; tokens/s; the mean
training load. JSON + PNG go to ``bench/results/<device>/pretrain_study[_quick].json``;
``--write-doc`` regenerates the table in ``docs/pretrain_study.md`` from that JSON.

    python bench/pretrain_study.py --quick          # CI-sized, < 1 minute
    python bench/pretrain_study.py --threads 1      # the full study
    python bench/pretrain_study.py --write-doc      # table from the JSON into docs/pretrain_study.md
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import REPO_DIR, RESULTS_DIR, cli, plotting, provenance, results  # noqa: E402
import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.integrations.hf_models import adamoe_layers  # noqa: E402
from adamoe_kernels.training import finetune as ft  # noqa: E402

SCRIPT = "pretrain_study"
DOC = REPO_DIR / "docs" / "pretrain_study.md"
DOC_START, DOC_END = "<!-- table:start -->", "<!-- table:end -->"
BUDGETS = ("tokens", "time")


@dataclass(frozen=True)
class Setting:
    """One routing config: ``m`` null experts, top-``k``, and what else it trains with."""
    name: str
    m: int
    k: int
    normalize: str = "true"
    null_kind: str = "zero"
    top_p: float | None = None
    target_load: float | None = None


def settings(top_p: float, target_load: float) -> list[Setting]:
    return [Setting("top1", 0, 1), Setting("top2", 0, 2), Setting("m8k3", 8, 3),
            Setting("m16k4", 16, 4),
            Setting("m8k3-identity", 8, 3, normalize="all", null_kind="identity"),
            Setting(f"m8k3-top-p{top_p:g}", 8, 3, top_p=top_p),
            Setting(f"m8k3-L{target_load:g}", 8, 3, target_load=target_load)]


@dataclass
class Shape:
    hidden: int = 64
    intermediate: int = 256
    layers: int = 2
    seq_len: int = 128
    batch: int = 8
    lr: float = 3e-3
    eval_windows: int = 32
    load_rate: float = 0.01
    alpha: tuple = field(default=(0.02, 0.0001))


# ---- one run ------------------------------------------------------------------------------------

def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): the shipped corpus as bytes, the last 10% held out."""
    ids = torch.tensor(ft.ByteTokenizer().encode(ft.builtin_text()), dtype=torch.long)
    cut = int(ids.numel() * 0.9)
    return ids[:cut], ids[cut:]


def build_model(s: Setting, shape: Shape, seed: int, backend: str):
    """The tiny Mixtral of ``adamoe-finetune`` from ``seed``, converted to ``s`` (random init)."""
    torch.manual_seed(seed)
    cfg = ft.RunConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_layers=shape.layers, seq_len=shape.seq_len)
    model = ft.tiny_mixtral(cfg, ft.ByteTokenizer.vocab_size)
    ak.convert_model(model, s.m, s.k, s.normalize, s.null_kind, backend=backend)
    if s.top_p is not None:
        ak.set_top_p(model, s.top_p)
    return model


def train_run(s: Setting, shape: Shape, seed: int, steps: int, data: tuple, *, backend: str,
              eval_every: int) -> dict:
    """Train ``s`` from scratch for ``steps`` steps; the eval curve, loads, times and FLOPs.

    Deterministic given (setting, shape, seed, steps) on the CPU backend: the batches come from
    a generator seeded by ``seed`` (the same for every setting), the init from ``seed``."""
    train_ids, eval_ids = data
    model = build_model(s, shape, seed, backend)
    info = model.config.adamoe
    layers = adamoe_layers(model)
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_data = ft.windows(eval_ids, shape.seq_len, shape.eval_windows, gen, contiguous=True)
    opt = torch.optim.AdamW(model.parameters(), lr=shape.lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    alpha = ak.AlphaSchedule.by_steps(max(steps, len(shape.alpha)), values=shape.alpha)
    controller = (ak.LoadController(s.target_load, shape.load_rate)
                  if s.target_load is not None else None)
    tokens_per_step = shape.batch * shape.seq_len
    rows = info["num_experts"] + info["num_null_experts"]
    f_top2 = ft.forward_flops_per_token(model.config, 2.0, info["num_experts"], shape.seq_len)
    expert_macs = 3 * shape.hidden * shape.intermediate * shape.layers  # per token per unit load
    seconds = flops = expert_flops = 0.0
    curve, step_times, losses, loads = [], [], [], []

    def record(step):
        loss, load = ft.evaluate(model, eval_data, shape.batch)
        curve.append({"step": step, "tokens": step * tokens_per_step, "seconds": seconds,
                      "flops": flops, "expert_flops": expert_flops, "eval_loss": loss,
                      "eval_load": load})

    model.train()
    record(0)
    for step in range(steps):
        x = ft.windows(train_ids, shape.seq_len, shape.batch, gen)
        t0 = time.perf_counter()
        model.router_aux_loss_coef = alpha(step)
        out = model(input_ids=x, labels=x, output_router_logits=True)  # loss = LM + α aux
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if controller is not None:
            controller.update(model)
        dt = time.perf_counter() - t0
        layer_loads = [float(layer.last_load) for layer in layers]
        L = sum(layer_loads) / len(layer_loads)
        seconds += dt
        step_times.append(dt)
        losses.append(float(out.loss.detach()))
        loads.append(L)
        flops += 3 * tokens_per_step * ft.forward_flops_per_token(model.config, L, rows,
                                                                  shape.seq_len)
        expert_flops += 3 * tokens_per_step * 2 * expert_macs * L
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            record(step + 1)
    tail = loads[-max(1, steps // 10):]
    return {"config": s.name, "seed": seed, "steps": steps, "tokens": steps * tokens_per_step,
            "eval_loss": curve[-1]["eval_loss"], "eval_load": curve[-1]["eval_load"],
            "train_load_mean": sum(loads) / len(loads), "train_load_last10pct": sum(tail) / len(tail),
            "train_seconds": seconds, "median_step_ms": 1000 * statistics.median(step_times),
            "tokens_per_s": steps * tokens_per_step / seconds, "flops": flops,
            "expert_flops": expert_flops,
            "model_flops_saved_vs_top2": 1 - (flops / (3 * tokens_per_step * steps)) / f_top2,
            "null_bias": [float(layer.null_bias) for layer in layers],
            "train_losses": losses, "curve": curve}


# ---- the study ----------------------------------------------------------------------------------

def time_budget_steps(token_rows: list[dict], steps: int) -> tuple[float, dict]:
    """The equal-wall-clock budget (top-2's median step time x ``steps``) as steps per config."""
    med = {}
    for r in token_rows:
        med.setdefault(r["config"], []).append(r["median_step_ms"])
    med = {c: statistics.median(v) for c, v in med.items()}
    budget_s = med["top2"] * steps / 1000
    return budget_s, {c: max(1, round(budget_s * 1000 / ms)) for c, ms in med.items()}


def run_study(args) -> tuple[list[dict], dict]:
    shape = Shape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                  seq_len=args.seq_len, batch=args.batch, eval_windows=args.eval_windows)
    cfgs = settings(args.top_p, args.target_load)
    data = corpus()
    seeds = list(range(args.seed, args.seed + args.seeds))
    rows, t0 = [], time.perf_counter()
    total = len(seeds) * (2 * len(cfgs) - 1)
    bar = cli.progress_bar(total, "runs", disable=args.no_progress)
    warmup = 3 if args.warmup is None else args.warmup
    for s in cfgs if warmup else ():  # first calls (allocator, kernels) out of the timed runs
        train_run(s, shape, seeds[0], warmup, data, backend=args.backend, eval_every=warmup)
    # phase 1: equal tokens; settings interleaved within each seed so machine load spreads evenly
    for seed in seeds:
        for s in cfgs:
            r = train_run(s, shape, seed, args.steps, data, backend=args.backend,
                          eval_every=args.eval_every)
            rows.append({**r, "budget": "tokens"})
            bar.update()
    budget_s, time_steps = time_budget_steps(rows, args.steps)
    if args.time_steps:
        time_steps = {**time_steps, **json.loads(args.time_steps)}
    # phase 2: equal wall-clock, as a step count per setting (top-2's run is its tokens run)
    for seed in seeds:
        for s in cfgs:
            if s.name == "top2" and time_steps[s.name] == args.steps:
                twin = next(r for r in rows if r["config"] == "top2" and r["seed"] == seed
                            and r["budget"] == "tokens")
                rows.append({**twin, "budget": "time"})
                continue
            r = train_run(s, shape, seed, time_steps[s.name], data, backend=args.backend,
                          eval_every=args.eval_every)
            rows.append({**r, "budget": "time"})
            bar.update()
    bar.close()
    setup = {"shape": asdict(shape), "settings": [asdict(s) for s in cfgs], "seeds": seeds,
             "steps_equal_tokens": args.steps, "time_budget_s": budget_s,
             "steps_equal_time": time_steps, "eval_every": args.eval_every,
             "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
             "total_seconds": time.perf_counter() - t0}
    return rows, setup


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (budget, config): mean and sample std over seeds."""
    out = []
    order = list(dict.fromkeys(r["config"] for r in rows))
    for budget in BUDGETS:
        top2 = [r["eval_loss"] for r in rows if r["budget"] == budget and r["config"] == "top2"]
        for c in order:
            rs = [r for r in rows if r["budget"] == budget and r["config"] == c]
            if not rs:
                continue
            losses = [r["eval_loss"] for r in rs]

            def mean(key):
                return statistics.fmean(r[key] for r in rs)

            out.append({
                "budget": budget, "config": c, "seeds": len(rs), "steps": rs[0]["steps"],
                "tokens": rs[0]["tokens"], "eval_loss_mean": statistics.fmean(losses),
                "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "delta_vs_top2": (statistics.fmean(losses) - statistics.fmean(top2)
                                  if top2 else None),
                "train_load": mean("train_load_mean"), "eval_load": mean("eval_load"),
                "tokens_per_s": mean("tokens_per_s"), "train_seconds": mean("train_seconds"),
                "pflops": mean("flops") / 1e15,
                "model_flops_saved_vs_top2": mean("model_flops_saved_vs_top2")})
    return out


def doc_table(payload: dict) -> str:
    """The markdown the doc carries between its markers, from the study's JSON."""
    meta, summary = payload["meta"], summarize(payload["rows"])
    sh = meta["shape"]
    lines = [f"(generated by `python bench/pretrain_study.py --write-doc` from "
             f"`{payload.get('_path', 'the JSON')}`; {meta['device_description']}, "
             f"{meta.get('cpu_threads')} thread(s), backend `{meta['backend']}`, "
             f"torch {meta['torch']}, commit {meta.get('git_commit')}, {meta['timestamp']}; "
             f"load average after the run {meta.get('loadavg_1_5_15min')})", "",
             f"Tiny byte-level Mixtral from scratch: H={sh['hidden']}, I={sh['intermediate']}, "
             f"{sh['layers']} layers, n=8, {sh['batch']}x{sh['seq_len']} tokens/step, fp32, "
             f"lr {sh['lr']}; seeds {meta['seeds']}; equal tokens: {meta['steps_equal_tokens']} "
             f"steps; equal wall-clock: {meta['time_budget_s']:.1f} s of training each "
             f"(top-2's time for those steps). Eval loss: mean ± sample std over the seeds, "
             f"{sh['eval_windows']} held-out windows; Δ = mean minus top-2's at the same budget "
             f"(lower is better); load: mean true experts per token over training (eval load "
             f"at the end in brackets).", ""]
    for budget, title in (("tokens", "Equal tokens"), ("time", "Equal wall-clock")):
        lines += [f"**{title}**", "",
                  "| config | steps | tokens | eval loss | Δ vs top-2 | load (eval) | tokens/s | "
                  "train s | TFLOPs | FLOPs saved vs top-2 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in summary:
            if r["budget"] != budget:
                continue
            lines.append(
                f"| {r['config']} | {r['steps']} | {r['tokens']} | {r['eval_loss_mean']:.4f} ± "
                f"{r['eval_loss_std']:.4f} | {r['delta_vs_top2']:+.4f} | {r['train_load']:.2f} "
                f"({r['eval_load']:.2f}) | {r['tokens_per_s']:.0f} | {r['train_seconds']:.1f} | "
                f"{1000 * r['pflops']:.2f} | {100 * r['model_flops_saved_vs_top2']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def write_doc(json_path: Path, doc: Path = DOC) -> Path:
    """Replace the table between the doc's markers with the one from ``json_path``."""
    payload = json.loads(Path(json_path).read_text())
    try:
        payload["_path"] = str(Path(json_path).resolve().relative_to(REPO_DIR))
    except ValueError:
        payload["_path"] = Path(json_path).name
    table = doc_table(payload)
    text = doc.read_text() if doc.exists() else f"# Pretraining from scratch\n\n{DOC_START}\n{DOC_END}\n"
    i, j = text.find(DOC_START), text.find(DOC_END)
    if i < 0 or j < i:
        raise SystemExit(f"{doc}: markers {DOC_START} / {DOC_END} not found")
    doc.write_text(text[: i + len(DOC_START)] + "\n" + table + text[j:])
    return doc


# ---- plot ---------------------------------------------------------------------------------------

def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    names = list(dict.fromkeys(r["config"] for r in rows))
    colors = {c: plt.cm.tab10(i) for i, c in enumerate(names)}
    for row_i, (budget, title) in enumerate((("tokens", "equal tokens"),
                                             ("time", "equal wall-clock"))):
        for col_i, (key, scale, xlabel) in enumerate((("seconds", 1.0, "training wall-clock (s)"),
                                                       ("flops", 1e-15, "training PFLOPs"))):
            ax = axes[row_i][col_i]
            for c in names:
                rs = [r for r in rows if r["budget"] == budget and r["config"] == c]
                if not rs:
                    continue
                n_pts = min(len(r["curve"]) for r in rs)
                xs = [statistics.fmean(r["curve"][i][key] for r in rs) * scale
                      for i in range(1, n_pts)]
                ys = [statistics.fmean(r["curve"][i]["eval_loss"] for r in rs)
                      for i in range(1, n_pts)]
                ax.plot(xs, ys, marker=".", color=colors[c], label=c)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval loss (mean over seeds)")
            ax.set_title(f"{title}: eval loss vs {xlabel.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device_name']} | tiny byte-level Mixtral from scratch | "
                 f"{len(meta['seeds'])} seeds")
    return plotting.save_figure(fig, path)


# ---- command line -------------------------------------------------------------------------------

TABLE_COLUMNS = [("budget", "budget"), ("config", "config"), ("steps", "steps"),
                 ("eval_loss_mean", "eval loss"), ("eval_loss_std", "± std"),
                 ("delta_vs_top2", "Δ vs top-2"), ("train_load", "load"),
                 ("tokens_per_s", "tokens/s"), ("train_seconds", "train s"),
                 ("pflops", "PFLOPs")]


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.set_defaults(dtype="float32", backend="cpu")
    p.add_argument("--steps", type=int, default=400, help="steps of the equal-tokens budget")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--top-p", type=float, default=0.5, help="the top-p setting's p")
    p.add_argument("--target-load", type=float, default=1.0,
                   help="the load-controller setting's target L")
    p.add_argument("--time-steps", default=None,
                   help='JSON {"config": steps} overriding the equal-time step counts (to rerun '
                        "a study's equal-time runs exactly)")
    p.add_argument("--write-doc", nargs="?", const="auto", default=None, metavar="JSON",
                   help="only regenerate the table in docs/pretrain_study.md from JSON "
                        "(default: this device's full-run JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers = min(args.hidden, 32), min(args.intermediate, 64), 1
        args.seq_len, args.batch, args.eval_windows = min(args.seq_len, 32), min(args.batch, 4), 4
        args.steps, args.seeds, args.eval_every = min(args.steps, 12), min(args.seeds, 1), 6
    if args.dtype not in ("float32", "fp32"):
        p.error("the study trains in float32 (--dtype float32)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.device not in ("auto", "cpu"):
        raise SystemExit("pretrain_study runs on the CPU (the bitwise-reproducible backend)")
    if args.write_doc is not None:
        path = (RESULTS_DIR / provenance.device_name(device) / f"{SCRIPT}.json"
                if args.write_doc == "auto" else Path(args.write_doc))
        print(f"wrote {write_doc(path)}")
        return {"doc": DOC}
    args.backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    torch.use_deterministic_algorithms(True)
    rows, setup = run_study(args)
    meta = provenance.environment(device, torch.float32, args.backend)
    meta.update(script=SCRIPT, quick=args.quick, **setup,
                timed="time.perf_counter around each training step (forward, backward, clip, "
                      "AdamW, load controller); evals excluded",
                flops="matmul FLOPs, 3x forward (finetune.forward_flops_per_token at each step's "
                      "mean load), summed over steps")
    out = results.output_dir(args, device)
    stem = results.result_stem(SCRIPT, args.quick)
    summary = summarize(rows)
    return results.save_results(args, out, stem, meta, rows, plot, [(summary, TABLE_COLUMNS)],
                                header=f"{setup['total_seconds']:.0f} s", summary=summary)


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
