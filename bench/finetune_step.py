"""Training-step throughput (tokens/s) of a small Mixtral model: AdaMoE vs top-2.

A tiny ``transformers`` ``MixtralForCausalLM`` (random weights) trains on random tokens: forward,
causal-LM loss + alpha * load-balancing loss, backward, AdamW step. Settings:

* ``top2-hf``: the unmodified transformers model (its own experts implementation; context);
* ``top2``: the same model with every MoE block on this package's kernels (m = 0, k = 2);
* ``m8k3`` / ``m16k4`` at target loads L: the MoE blocks grow ``m`` null experts (router rows for
  them are new), the loss is the null-aware one (``ak.null_aware_aux_loss``), and one scalar bias on
  the null logits, shared by all layers, is bisected on the calibration batch to hit L.

``--nproc N`` (N > 1) times the same step on N processes (gloo on CPU, NCCL with one GPU per
rank), the package's own scale-out (``adamoe_kernels.training.parallel``, as ``adamoe-finetune``
under torchrun): ``--strategies ddp fsdp ep`` (DDP, FSDP2, expert parallel with DDP on the rest)
over the global batch ``--batch`` split evenly, converted models only (``ak.convert_model``), the
null-aware loss of the global batch. For expert parallel it also counts the bytes the all-to-alls
send per step (forward and backward, all ranks) and what a dispatcher that ships the null slots
(remapped to expert 0) would send.

``--impl blocks`` (default) swaps each ``MixtralSparseMoeBlock`` for ``BenchMoEBlock`` below (a
``nn.Linear`` router + ``ak.route`` + ``ak.moe_mlp``; depends on nothing but the kernels API).
``--impl convert_model`` converts with ``ak.convert_model`` and sets the load per layer with
``ak.load_control.set_target_load``. ``--model llama-molora`` times ``ak.add_mo_lora`` on a tiny
Llama (n = 4 LoRA experts of rank 8; top-2 vs the paper's m5k2 / m9k4).

    python bench/finetune_step.py --quick
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import cli, plotting, provenance, results, timing, workload  # noqa: E402
import adamoe_kernels as ak  # noqa: E402

SCRIPT = "finetune_step"

# Tiny model sizes: (hidden, intermediate, layers, heads, kv heads, vocab, batch, seq).
SIZES = {
    "cpu": dict(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, vocab=4096, batch=2, seq=512),
    "cpu-quick": dict(hidden=512, intermediate=1408, layers=2, heads=8, kv_heads=4, vocab=2048, batch=2, seq=256),
    "gpu": dict(hidden=2048, intermediate=7168, layers=4, heads=16, kv_heads=8, vocab=32000, batch=4, seq=2048),
    "gpu-quick": dict(hidden=1024, intermediate=3584, layers=2, heads=8, kv_heads=4, vocab=32000, batch=4, seq=1024),
}
STRATEGIES = {"ddp": {}, "fsdp": {"fsdp": True}, "ep": {"expert_parallel": True}}
MOLORA_CONFIGS = (("m5k2", 5, 2), ("m9k4", 9, 4))  # the paper's Llama-2 Mo-LoRA settings (n = 4)
MOLORA_EXPERTS = 4


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    for key in SIZES["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"model/batch {key}")
    p.add_argument("--num-experts", type=int, default=8, help="n true experts")
    p.add_argument("--loads", type=float, nargs="+", default=None,
                   help="target loads for the AdaMoE settings (default 1.66 1.0; quick 1.0)")
    p.add_argument("--configs", nargs="+", default=None,
                   choices=[c[0] for c in workload.ADAMOE_CONFIGS + MOLORA_CONFIGS],
                   help="AdaMoE settings (default: m8k3 m16k4; llama-molora: m5k2 m9k4)")
    p.add_argument("--no-hf-baseline", action="store_true", help="skip the unmodified transformers row")
    p.add_argument("--impl", default="blocks", choices=["blocks", "convert_model"])
    p.add_argument("--model", default="mixtral", choices=["mixtral", "llama-molora"])
    p.add_argument("--freeze-experts", action="store_true",
                   help="train everything but the expert weights (closer to the paper's QLoRA setting, "
                        "where the experts' base weights are frozen): no expert weight gradients")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--aux-alpha", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) to train on; > 1: the scale-out strategies below")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="with --nproc > 1: data parallel (DDP), FSDP2, expert parallel")
    return p.parse_args(argv)


def sizes(args, device):
    key = ("gpu" if device.type == "cuda" else "cpu") + ("-quick" if args.quick else "")
    s = dict(SIZES[key])
    for k in s:
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    return key, s


class BenchMoEBlock(nn.Module):
    """Drop-in for ``MixtralSparseMoeBlock``: linear router over n+m, ``ak.route``, ``ak.moe_mlp``.

    The true experts and the true router rows are the HF block's (shared, not copied); the ``m``
    null rows are new (random, the true rows' scale). ``null_bias`` is the load dial (a buffer).
    """

    def __init__(self, hf_block: nn.Module, num_null: int, top_k: int, backend: str):
        super().__init__()
        experts, gate = hf_block.experts, hf_block.gate
        n, H = gate.weight.shape
        self.num_experts, self.num_null, self.top_k, self.backend = n, num_null, top_k, backend
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        w = gate.weight.detach()
        null_rows = torch.randn(num_null, H, dtype=w.dtype, device=w.device) * w.float().std().to(w.dtype)
        self.router = nn.Linear(H, n + num_null, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.router.weight.copy_(torch.cat([w, null_rows]))
        self.register_buffer("null_bias", torch.zeros(n + num_null, device=w.device), persistent=False)
        self.last_logits = self.last_load = None

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x).float() + self.null_bias
        r = ak.route(logits, self.top_k, self.num_experts, backend=self.backend)
        self.last_logits, self.last_load = logits, r.load()
        return ak.moe_mlp(x, self.gate_up_proj, self.down_proj, r, backend=self.backend).view(shape)


def tiny_mixtral(s, num_experts, dtype, device, seed):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["kv_heads"], num_local_experts=num_experts,
                        num_experts_per_tok=2, max_position_embeddings=max(4096, s["seq"]),
                        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # HF leaves the 3-D expert tensors to _init_weights; make them sane here
        for layer in model.model.layers:
            ex = layer.mlp.experts
            H, I = ex.gate_up_proj.shape[2], ex.down_proj.shape[2]
            ex.gate_up_proj.normal_(0.0, H ** -0.5)
            ex.down_proj.normal_(0.0, I ** -0.5)
    return model


def tiny_llama(s, dtype, device, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=max(4096, s["seq"]),
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def bench_blocks(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, BenchMoEBlock)]


def _package_calibration(model, ids, tokens):
    """Load calibration through ``ak.load_control.set_target_load`` (per-layer null biases)."""
    def calibrate(target):
        tol = max(0.02, workload.load_tolerance(tokens))
        loads = ak.load_control.set_target_load(model, target, input_ids=ids, tol=tol)
        load = sum(loads) / len(loads)
        biases = [float(layer.null_bias) for layer in ak.load_control.adamoe_layers(model)]
        return {"bias": biases, "load": load, "target": target, "iterations": None,
                "hit": abs(load - target) <= tol, "layer_loads": loads}
    return calibrate


def build_setting(base, label, m, k, args, backend, ids, tokens):
    """A fresh copy of ``base`` prepared for one setting: ``(model, aux_fn, calibrate)``.

    ``aux_fn()`` is the load-balancing loss of the last forward (None where the model adds it to
    ``out.loss`` itself); ``calibrate(target)`` sets the null bias(es) for load ``target`` and
    returns the calibration record (None for settings without null experts).
    """
    model = copy.deepcopy(base)
    if label == "top2-hf":
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = args.aux_alpha
        return model, None, None
    if args.model == "llama-molora":
        ak.add_mo_lora(model, num_experts=MOLORA_EXPERTS, num_null_experts=m, top_k=k, rank=8,
                       router_aux_loss_coef=args.aux_alpha, backend=backend)
        model.config.output_router_logits = True
        return model, None, _package_calibration(model, ids, tokens) if m else None
    if args.impl == "convert_model":
        ak.convert_model(model, num_null_experts=m, top_k=k, backend=backend)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = args.aux_alpha
        return model, None, _package_calibration(model, ids, tokens) if m else None
    for layer in model.model.layers:
        layer.mlp = BenchMoEBlock(layer.mlp, m, k, backend)
    n = args.num_experts

    def aux_fn():
        logits = tuple(b.last_logits for b in bench_blocks(model))
        return args.aux_alpha * ak.null_aware_aux_loss(logits, k, n)

    def calibrate(target):
        def load_of_bias(b):
            for block in bench_blocks(model):
                block.null_bias[n:] = b
            with torch.no_grad():
                model(input_ids=ids)
            return model_load(model)

        cal = workload.calibrate_null_bias(load_of_bias, target, max_iter=30,
                                         tol=max(0.02, workload.load_tolerance(tokens)))
        load_of_bias(cal["bias"])
        return cal

    return model, aux_fn, calibrate if m else None


def model_load(model):
    """Mean load over the MoE layers of the last forward."""
    blocks = bench_blocks(model)
    if blocks:
        return float(torch.stack([b.last_load for b in blocks]).mean())
    if hasattr(ak, "expert_load"):
        try:
            loads = ak.expert_load(model)
            return float(torch.as_tensor(loads, dtype=torch.float32).mean())
        except Exception:  # noqa: BLE001 (an unconverted model)
            return None
    return None


def prepare(base, setting, ids, tokens, args, backend):
    """Model, optimizer and calibrated load of one setting; returns ``(row, step_fn, state)``."""
    label, m, k, target = setting
    model, aux_fn, calibrate = build_setting(base, label, m, k, args, backend, ids, tokens)
    model.train()
    if args.freeze_experts:
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                p.requires_grad_(False)
    cal = calibrate(target) if calibrate is not None else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    state = {"model": model, "opt": opt}

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (aux_fn() if aux_fn is not None else 0.0)
        loss.backward()
        opt.step()
        state["loss"] = loss.detach()

    row = {"config": label, "m": m, "k": k, "impl": "transformers" if label == "top2-hf" else args.impl,
           "experts_implementation": getattr(model.config, "_experts_implementation", None)
           if label == "top2-hf" else None,
           "load_target": target, "load": cal["load"] if cal else None,
           "null_bias": cal["bias"] if cal else None, "calibration_hit": cal["hit"] if cal else True}
    return row, step, state


def finish_row(row, state, step_timing, tokens):
    load_end = model_load(state["model"]) if row["m"] else 2.0
    if row["load"] is None:
        row["load"] = load_end
    row.update(load_after_steps=load_end, step_ms=step_timing["ms"], step_timing=step_timing,
               tokens_per_s=tokens / step_timing["ms"] * 1e3,
               loss=float(state["loss"]) if "loss" in state else None)
    return row


def run(args):
    device = cli.resolve_device(args.device)
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    cli.apply_timing(args)
    cli.seed_all(args.seed)
    size_key, s = sizes(args, device)
    warmup = args.warmup if args.warmup is not None else 2  # AdamW state, allocator, oneDNN caches
    steps = cli.reps_for(args, device, quick_default=8, full_default=10)
    loads = args.loads or ([1.0] if args.quick else [1.66, 1.0])

    if args.model == "llama-molora":
        if not hasattr(ak, "add_mo_lora"):
            raise SystemExit("--model llama-molora needs ak.add_mo_lora (adamoe_kernels.integrations)")
        base = tiny_llama(s, dtype, device, args.seed)
        configs = MOLORA_CONFIGS
    else:
        if args.impl == "convert_model" and not hasattr(ak, "convert_model"):
            raise SystemExit("--impl convert_model needs ak.convert_model (adamoe_kernels.integrations)")
        base = tiny_mixtral(s, args.num_experts, dtype, device, args.seed)
        configs = workload.ADAMOE_CONFIGS
    chosen = args.configs or [c[0] for c in configs]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device)
    tokens = s["batch"] * s["seq"]

    plan = [] if args.no_hf_baseline or args.model == "llama-molora" else [("top2-hf", 0, 2, 2.0)]
    plan.append((*workload.TOP2, 2.0))
    plan += [(c, m, k, L) for c, m, k in configs if c in chosen for L in loads if L <= k]
    bar = cli.progress_bar(len(plan) + timing.bench_rounds(len(plan), device, warmup, steps),
                              desc=SCRIPT, disable=args.no_progress)

    rows = []
    if device.type == "cuda":  # one model at a time (memory); the GPU is not shared
        for setting in plan:
            row, step, state = prepare(base, setting, ids, tokens, args, backend)
            bar.update()
            rows.append(finish_row(row, state, timing.bench_fn(step, device, warmup=warmup, reps=steps),
                                   tokens))
            bar.update()
            del state, step
            torch.cuda.empty_cache()
    else:  # all settings' steps interleaved, so a busy machine slows them alike
        prepared = []
        for setting in plan:
            prepared.append(prepare(base, setting, ids, tokens, args, backend))
            bar.update()
        timings = timing.bench_many({i: (step, None) for i, (_, step, _) in enumerate(prepared)}, device,
                                    warmup=warmup, reps=steps, on_round=bar.update)
        rows = [finish_row(row, state, timings[i], tokens) for i, (row, _, state) in enumerate(prepared)]
        del prepared
    bar.close()
    base_row = next(r for r in rows if r["config"] == "top2")
    for r in rows:
        r["speedup"] = base_row["step_ms"] / r["step_ms"]
    return device, dtype, backend, size_key, s, rows


TABLE_COLUMNS = [("config", "config"), ("load_target", "L target"), ("load", "L reached"),
                 ("load_after_steps", "L after steps"), ("step_ms", "step ms"),
                 ("tokens_per_s", "tokens/s"), ("speedup", "speedup vs top2")]


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [r["config"] if r["m"] == 0 else f"{r['config']}\nL={r['load']:.2f}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
           color=["grey" if r["m"] == 0 else "C0" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"tiny Mixtral train step — {meta['device_name']}, {meta['dtype']}, {meta['backend']}",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return plotting.save_figure(fig, path)


# ---- several processes: DDP, FSDP2, expert parallel ----------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(fns: dict, device, warmup: int, reps: int, on_round=None) -> dict:
    """Every rank calls the ``fns`` round-robin, a fixed number of times (collectives must match:
    no adaptive repetition), each call between two barriers, so a call's time is the slowest
    rank's. Returns ``{key: {"ms": median, "ms_min", "ms_p20", "ms_p80", "n"}}``."""
    import torch.distributed as dist

    times = {key: [] for key in fns}
    for i in range(warmup + max(reps, 1)):
        for key, fn in fns.items():
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dist.barrier()
            if i >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)
        if on_round:
            on_round()
    out = {}
    for key, v in times.items():
        q = sorted(v)
        pick = lambda f, q=q: q[min(len(q) - 1, int(round(f * (len(q) - 1))))]  # noqa: E731
        out[key] = {"ms": statistics.median(q), "ms_min": q[0], "ms_p20": pick(0.2),
                    "ms_p80": pick(0.8), "n": len(q)}
    return out


def _ep_bytes(layers, parallel, element_size: int) -> tuple[int, int]:
    """Bytes the expert all-to-alls sent in the last step (forward + backward, all ranks), and
    what they would send if every slot were shipped, null slots remapped to expert 0."""
    import torch.distributed as dist
    from adamoe_kernels.integrations.modules import route_with_null_bias

    W, rank = parallel.world_size, parallel.rank
    sent = padded = 0
    for layer in layers:
        st, nl = layer.last_stats, layer.num_local_experts
        counts = (W - 1) * nl * 4  # int32 counts, forward only
        sent += 2 * st.bytes_sent - counts  # the backward mirrors the row exchanges
        r = route_with_null_bias(layer.last_router_logits.detach(), layer.top_k, layer.num_experts,
                                 layer.normalize, layer.null_bias, layer.backend)
        ids = r.topk_ids.long()
        owner = torch.where(ids < layer.num_experts, ids // nl, torch.zeros_like(ids))
        padded += int((owner != rank).sum()) * layer.gate.in_features * element_size * 2 * 2 + counts
    total = torch.tensor([sent, padded], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total[0]), int(total[1])


def prepare_parallel(base, setting, strategy, ids, args, backend, device, tokens):
    """One setting under one strategy: ``(row, step_fn, state)``; a collective."""
    from adamoe_kernels.integrations.hf_models import adamoe_layers
    from adamoe_kernels.training.parallel import Parallel

    label, m, k, target = setting
    model = copy.deepcopy(base)
    ak.convert_model(model, num_null_experts=m, top_k=k, backend=backend)
    model.train()
    # every rank calibrates on the whole batch, so all get the same biases
    cal = _package_calibration(model, ids, tokens)(target) if m else None
    par = Parallel.setup(device=str(device), **STRATEGIES[strategy])
    wrapped = par.wrap(model)
    layers = adamoe_layers(par.unwrap(wrapped))
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    local = par.shard(ids)
    state = {"par": par, "layers": layers}

    def step():
        opt.zero_grad(set_to_none=True)
        out = wrapped(input_ids=local, labels=local)
        aux = par.aux_loss(tuple(layer.last_router_logits for layer in layers), k, args.num_experts)
        loss = out.loss + args.aux_alpha * aux
        loss.backward()
        par.finish_backward()
        opt.step()
        state["loss"] = loss.detach()

    row = {"strategy": strategy, "config": label, "m": m, "k": k, "impl": "convert_model",
           "load_target": target, "load": cal["load"] if cal else None,
           "null_bias": cal["bias"] if cal else None, "calibration_hit": cal["hit"] if cal else True}
    return row, step, state


def nproc_worker(rank, world, init_file, args, out_file):
    import torch.distributed as dist

    device = cli.resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.seed_all(args.seed)
    size_key, s = sizes(args, device)
    if s["batch"] % world:
        raise SystemExit(f"--batch ({s['batch']}) must be divisible by --nproc ({world})")
    warmup = args.warmup if args.warmup is not None else 2
    reps = cli.reps_for(args, device, quick_default=8, full_default=10)
    loads = args.loads or ([1.0] if args.quick else [1.66, 1.0])
    base = tiny_mixtral(s, args.num_experts, dtype, device, args.seed)
    chosen = args.configs or [c[0] for c in workload.ADAMOE_CONFIGS]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device)
    tokens = s["batch"] * s["seq"]
    plan = [(*workload.TOP2, 2.0)]
    plan += [(c, m, k, L) for c, m, k in workload.ADAMOE_CONFIGS if c in chosen for L in loads if L <= k]
    bar = cli.progress_bar(len(args.strategies) * (len(plan) + warmup + max(reps, 1)),
                           desc=f"{SCRIPT} x{world}", disable=args.no_progress or rank != 0)
    rows = []
    for strategy in args.strategies:  # one strategy's settings at a time, interleaved
        prepared = []
        for setting in plan:
            prepared.append(prepare_parallel(base, setting, strategy, ids, args, backend, device,
                                             tokens))
            bar.update()
        timings = timed_rounds({i: step for i, (_, step, _) in enumerate(prepared)}, device,
                               warmup, reps, on_round=bar.update)
        for i, (row, _, state) in enumerate(prepared):
            row.update(step_ms=timings[i]["ms"], step_timing=timings[i],
                       tokens_per_s=tokens / timings[i]["ms"] * 1e3, loss=float(state["loss"]),
                       load_after_steps=float(state["par"].mean(torch.stack(
                           [layer.last_load.float() for layer in state["layers"]]).mean())))
            if row["load"] is None:
                row["load"] = row["load_after_steps"]
            if strategy == "ep":
                row["bytes_per_step"], row["bytes_per_step_nulls_shipped"] = _ep_bytes(
                    state["layers"], state["par"], torch.empty((), dtype=dtype).element_size())
        base_row = next(r for r, _, _ in prepared if r["config"] == "top2")
        for row, _, _ in prepared:
            row["speedup"] = base_row["step_ms"] / row["step_ms"]
            rows.append(row)
        del prepared, timings
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    if rank == 0:
        torch.save({"rows": rows, "size_key": size_key, "sizes": s, "backend": backend}, out_file)
    dist.barrier()
    dist.destroy_process_group()


PARALLEL_COLUMNS = [("strategy", "strategy"), ("config", "config"), ("load", "L"),
                    ("load_after_steps", "L last step"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"), ("speedup", "speedup vs top2"),
                    ("bytes_per_step", "EP bytes/step"),
                    ("bytes_per_step_nulls_shipped", "EP bytes/step, nulls shipped")]


def plot_parallel(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    ep = [r for r in rows if r.get("bytes_per_step") is not None]
    fig, axes = plt.subplots(1, 2 if ep else 1, figsize=(11 if ep else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    settings = list(dict.fromkeys((r["config"], r["load_target"]) for r in rows))
    width = 0.8 / max(len(settings), 1)
    for j, (cfg, target) in enumerate(settings):
        vals = [next((r["tokens_per_s"] for r in rows if r["strategy"] == st and r["config"] == cfg
                      and r["load_target"] == target), 0) for st in strategies]
        label = cfg if cfg == "top2" else f"{cfg} L={target:g}"
        ax.bar([i + j * width for i in range(len(strategies))], vals, width, label=label)
    ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(strategies))], strategies)
    ax.set_ylabel("training tokens/s (all ranks)")
    ax.set_title("tokens/s per strategy")
    ax.legend(fontsize=8)
    if ep:
        ax = axes[0][1]
        labels = [r["config"] if r["m"] == 0 else f"{r['config']}\nL={r['load']:.2f}" for r in ep]
        xs = range(len(ep))
        ax.bar([x - 0.2 for x in xs], [r["bytes_per_step"] / 2**20 for r in ep], 0.4,
               label="sent (true assignments only)")
        ax.bar([x + 0.2 for x in xs], [r["bytes_per_step_nulls_shipped"] / 2**20 for r in ep], 0.4,
               label="if null slots were shipped")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("MiB per step (fwd + bwd, all ranks)")
        ax.set_title("expert parallel: all-to-all bytes")
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny Mixtral train step on {meta['nproc']} processes ({meta['process_group_backend']}) "
                 f"— {meta['device_name']}, {meta['dtype']}, {meta['backend']}", fontsize=9)
    return plotting.save_figure(fig, path)


def main_parallel(args):
    import torch.multiprocessing as mp

    device = cli.resolve_device(args.device)
    if args.model != "mixtral":
        raise SystemExit("--nproc > 1 times the converted Mixtral (--model mixtral)")
    if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} on CUDA needs one GPU per rank "
                         f"({torch.cuda.device_count()} visible)")
    dtype = cli.DTYPES[args.dtype]
    backend = cli.resolve_bench_backend(args.backend, device)
    meta = provenance.environment(device, dtype, backend)  # load average before the run
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.start_processes(nproc_worker, args=(args.nproc, os.path.join(tmp, "pg"), args, out_file),
                           nprocs=args.nproc, start_method="spawn")
        got = torch.load(out_file)
    rows, s = got["rows"], got["sizes"]
    meta.update(script=SCRIPT, quick=args.quick, model="MixtralForCausalLM (random init)",
                model_size=got["size_key"], sizes=s, num_experts=args.num_experts, impl="convert_model",
                lr=args.lr, aux_alpha=args.aux_alpha, tokens_per_step=s["batch"] * s["seq"],
                nproc=args.nproc, process_group_backend="nccl" if device.type == "cuda" else "gloo",
                threads_per_rank=(None if device.type == "cuda" else
                                  args.threads or max(1, (os.cpu_count() or 1) // args.nproc)),
                strategies={k: {"ddp": "DistributedDataParallel",
                                "fsdp": "FSDP2 fully_shard per decoder layer",
                                "ep": "expert parallel (ak.distributed.shard_experts) + DDP"}[k]
                            for k in args.strategies},
                step="zero_grad + forward (this rank's rows) + CE loss + alpha*aux loss of the global "
                     "batch + backward + AdamW step, between barriers (slowest rank)",
                bytes_per_step="expert all-to-alls, forward + backward, all ranks")
    out = results.output_dir(args, device)
    stem = results.result_stem(f"{SCRIPT}_nproc{args.nproc}", args.quick)
    return results.save_results(args, out, stem, meta, rows, plot_parallel, [(rows, PARALLEL_COLUMNS)],
                                header=f"{got['size_key']} {s}, {args.nproc} processes")


def main(argv=None):
    args = parse_args(argv)
    if args.nproc > 1:
        return main_parallel(args)
    device, dtype, backend, size_key, s, rows = run(args)
    meta = provenance.environment(device, dtype, backend)
    model_desc = ("LlamaForCausalLM + ak.add_mo_lora (n=4, rank 8)" if args.model == "llama-molora"
                  else "MixtralForCausalLM")
    meta.update(script=SCRIPT, quick=args.quick, model=f"{model_desc} (random init)",
                model_size=size_key, sizes=s, num_experts=args.num_experts, impl=args.impl, lr=args.lr,
                aux_alpha=args.aux_alpha, freeze_experts=args.freeze_experts, tokens_per_step=s["batch"] * s["seq"],
                step="zero_grad + forward + CE loss + alpha*aux loss + backward + AdamW step")
    out = results.output_dir(args, device)
    variant = ("_molora" if args.model == "llama-molora" else "") + (
        "_convert_model" if args.impl == "convert_model" and args.model == "mixtral" else "") + (
        "_frozen_experts" if args.freeze_experts else "")
    stem = results.result_stem(SCRIPT + variant, args.quick)
    return results.save_results(args, out, stem, meta, rows, plot, [(rows, TABLE_COLUMNS)],
                               header=f"{size_key} {s}")


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
