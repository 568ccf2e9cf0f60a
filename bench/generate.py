"""Decode throughput of a converted Mixtral-shaped model: AdaMoE at controlled loads vs top-2.

``model.generate`` (greedy, KV cache) on a ``MixtralForCausalLM`` with real layer widths and few
layers (CPU: H=1024, I=2816, n=8, 2 layers; GPU: Mixtral-8x7B's H=4096, I=14336, 2 layers), for
transformers' top-2 (``eager`` and ``grouped_mm`` experts, the same weights) and the AdaMoE
conversion m8k3 with ``ak.set_target_load`` at L in {2, 1.5, 1, 0.5}; batch 1, 4, 16, 64,
prompt 128, 64 new tokens. Per setting: prefill ms, decode tokens/s, the median per-step
latency (a ``StoppingCriteria`` stamps every step), the load reached while decoding, and the
bytes a decode step must read: expert weights of the experts some token touches (distinct
experts x bytes per expert, counted in an untimed pass with the same tokens) plus everything
else (attention, norms, router, LM head, the KV cache), next to this machine's memory bandwidth
measured in the same run (a large copy). Compiled generation: ``cache_implementation="static"``
with the decode step under ``torch.compile(fullgraph=True)`` (transformers' ``compile_config``),
with transformers' default attention (sdpa) and with its eager attention, checked to give the
eager tokens, with a profile of where its step goes (torch.profiler phases). A per-op breakdown
of one decode step (module hooks: attention, router, experts, LM head, norms/embedding, the
rest of the model's Python, the generate loop) and the routing + grouping cost at T <= 64
(profiler phases of one MoE layer).

    python bench/generate.py --quick          # < 1 min on a 2-core CPU
    python bench/generate.py                  # bf16 and fp32, ~10 min on a 2-core CPU
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# harness first: importing it puts the repository on sys.path (a checkout without pip install)
from harness import breakdown, cli, plotting, provenance, results, timing  # noqa: E402
import adamoe_kernels as ak  # noqa: E402

SCRIPT = "generate"
NUM_EXPERTS = 8
ADAMOE = ("m8k3", 8, 3)
TOP2_IMPLS = ("eager", "grouped_mm")
LOADS = (2.0, 1.5, 1.0, 0.5)

# Model shapes: real layer widths, few layers (the expert weights are what decoding reads).
CPU_SHAPE = dict(hidden=1024, intermediate=2816, layers=2, vocab=512, heads=8, kv_heads=2)
GPU_SHAPE = dict(hidden=4096, intermediate=14336, layers=2, vocab=32000, heads=32, kv_heads=8)
QUICK_SHAPE = dict(hidden=256, intermediate=704, layers=2, vocab=256, heads=4, kv_heads=2)
FULL = dict(batches=[1, 4, 16, 64], prompt=128, new_tokens=64, compile_batches=[1, 16])
QUICK = dict(batches=[1, 4], prompt=32, new_tokens=16, compile_batches=[1])
BANDWIDTH_MIB = 512  # the copy that measures memory bandwidth: 512 MiB read + 512 MiB written
NULL_ROW_NOISE = 0.5  # see untie_null_rows
# Compiled runs with transformers' default attention (sdpa) and with its eager attention: on CPU
# SDPA's flash kernel costs ~0.2 ms a layer for one query row, eager attention compiles to a few
# fused kernels (measured: bench/results/*/generate*.json, compiled profile).
COMPILE_ATTN = ("sdpa", "eager")


def parse_args(argv=None):
    p = cli.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(cli.DTYPES),
                   help="dtypes to run, one JSON each (default: --dtype; the full CPU run: "
                        "bfloat16 float32)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per sequence")
    p.add_argument("--loads", type=float, nargs="+", default=list(LOADS),
                   help="target loads L of the AdaMoE model (ak.set_target_load)")
    p.add_argument("--top2-impls", nargs="*", default=list(TOP2_IMPLS),
                   help="transformers experts implementations of the top-2 baseline")
    p.add_argument("--compile-batches", type=int, nargs="*", default=None,
                   help="batches of the compiled static-cache runs (none: --no-compile)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled generation")
    p.add_argument("--compile-attn", nargs="+", default=list(COMPILE_ATTN),
                   choices=["sdpa", "eager"],
                   help="attention implementations of the compiled runs (the eager runs keep "
                        "the model's default, sdpa)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-op breakdown")
    p.add_argument("--decode-linears", action="store_true",
                   help="both models' dense layers (attention, LM head; AdaMoE's routers too) on "
                        "the C++ small-M kernel (ak.use_decode_linears); results go to "
                        "generate_decode_linears*")
    return p.parse_args(argv)


def sizes(args, device) -> dict:
    base = QUICK_SHAPE if args.quick else (GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    shape = dict(base)
    for key in ("hidden", "intermediate", "layers", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    run = dict(QUICK if args.quick else FULL)
    if args.batches:
        run["batches"] = args.batches
    if args.prompt:
        run["prompt"] = args.prompt
    if args.new_tokens:
        run["new_tokens"] = args.new_tokens
    if args.compile_batches is not None:
        run["compile_batches"] = args.compile_batches
    if args.no_compile:
        run["compile_batches"] = []
    return {**shape, **run}


# ---- the models ---------------------------------------------------------------------------------

def build_models(sz, dtype, device, backend, seed):
    """transformers' top-2 Mixtral (random init) and its AdaMoE m8k3 conversion (a copy)."""
    import transformers

    heads = sz["heads"]
    cfg = transformers.MixtralConfig(
        vocab_size=sz["vocab"], hidden_size=sz["hidden"], intermediate_size=sz["intermediate"],
        num_hidden_layers=sz["layers"], num_attention_heads=heads,
        num_key_value_heads=sz["kv_heads"], num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
        max_position_embeddings=sz["prompt"] + sz["new_tokens"] + 8,
        experts_implementation="eager", bos_token_id=1, eos_token_id=None, pad_token_id=0,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    # on CUDA the random init runs there (seconds instead of a minute for the 8x7B widths)
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        hf = transformers.MixtralForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    hf.generation_config.eos_token_id = None
    ada = copy.deepcopy(hf)
    _, m, k = ADAMOE
    ak.convert_model(ada, num_null_experts=m, top_k=k, backend=backend)
    untie_null_rows(ada, seed)
    return hf, ada


def untie_null_rows(model, seed, scale=NULL_ROW_NOISE):
    """Perturb the copied null rows of every router (a stand-in for fine-tuning).

    ``convert_model`` copies true row ``j`` into null row ``n+j``: the pair's logits tie exactly,
    so a bias on the null logits flips every pair at once and the load jumps from 2 to 1 with
    nothing in between (``set_target_load`` cannot reach L=1.5). A fine-tuned model's null rows
    have moved away from their copies; here they get Gaussian noise of ``scale`` times the true
    rows' standard deviation.
    """
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for block in moe_blocks(model):
            w = block.gate.weight
            n = block.num_experts
            noise = torch.randn(w[n:].shape, generator=g).to(w.device, w.dtype)
            w[n:] += scale * w[:n].float().std().to(w.dtype) * noise


def set_experts_impl(model, impl: str) -> None:
    model.set_experts_implementation(impl)


def moe_blocks(model):
    return [layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
            for layer in model.model.layers]


def expert_bytes(model) -> int:
    """Bytes of one expert's weights (gate_up + down) in one layer."""
    experts = moe_blocks(model)[0].experts
    return (experts.gate_up_proj[0].numel() * experts.gate_up_proj.element_size()
            + experts.down_proj[0].numel() * experts.down_proj.element_size())


def non_expert_bytes(model, batch: int, cache_len: float) -> float:
    """Bytes a decode step reads besides the experts: every other weight (the embedding only for
    the rows looked up) and the KV cache (``cache_len`` positions, keys and values)."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if "embed_tokens" in name:
            total += batch * p.shape[1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * head_dim * cache_len * elem
    return float(total + kv)


# ---- generation ---------------------------------------------------------------------------------

class StepClock:
    """A ``StoppingCriteria`` that never stops and stamps the time after every generated token."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def compile_config():
    """transformers' compile config for the decode step: fullgraph, static shapes, on any
    device (``_compile_all_devices``: transformers compiles only on accelerators by default)."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cc._compile_all_devices = True
    return cc


def generate(model, ids, new_tokens, device, *, static=False, compiled=False, clock=None):
    """Greedy ``generate`` with a KV cache; returns ``(tokens, clock)``."""
    from transformers import StoppingCriteriaList

    clock = clock or StepClock(device)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids), stopping_criteria=StoppingCriteriaList([clock]))
    if static or compiled:
        kw["cache_implementation"] = "static"
    if compiled:
        kw["compile_config"] = compile_config()
    else:
        kw["disable_compile"] = True  # a static cache on CUDA would otherwise compile
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.no_grad():
        clock.start = time.perf_counter()
        out = model.generate(ids, **kw)
    return out, clock


def timing_of(clock, batch) -> dict:
    steps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]
    decode_s = clock.times[-1] - clock.times[0]
    return {"prefill_ms": (clock.times[0] - clock.start) * 1e3,
            "decode_tok_s": batch * len(steps) / decode_s if decode_s > 0 else None,
            "step_ms_median": statistics.median(steps) if steps else None,
            "step_ms_min": min(steps) if steps else None}


class ExpertCounter:
    """Forward pre-hooks on every experts module: per decode call, the distinct true experts
    touched and the true assignments (the load). Used in an untimed pass."""

    def __init__(self, model, batch):
        self.batch, self.calls = batch, []
        self.handles = [b.experts.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for b in moe_blocks(model)]

    def _hook(self, module, args, kwargs):
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        if ids.shape[0] != self.batch:  # the prefill
            return
        true = ids[ids < module.num_experts]
        self.calls.append((int(torch.unique(true).numel()), int(true.numel()) / ids.shape[0]))

    def close(self):
        for h in self.handles:
            h.remove()


def count_experts(model, ids, new_tokens, device) -> dict:
    counter = ExpertCounter(model, ids.shape[0])
    try:
        tokens, _ = generate(model, ids, new_tokens, device)
    finally:
        counter.close()
    layers = len(moe_blocks(model))
    touched = [c[0] for c in counter.calls]
    new = tokens[:, ids.shape[1]:]
    distinct = sum(len(set(row.tolist())) for row in new) / new.shape[0]
    return {"tokens": tokens, "distinct_new_tokens": distinct,
            "experts_touched_per_layer": sum(touched) / len(touched),
            "experts_touched_per_step": sum(touched) / (len(touched) / layers),
            "load_decode": sum(c[1] for c in counter.calls) / len(counter.calls)}


# ---- per-op breakdown of a decode step ---------------------------------------------------------

class StepBreakdown:
    """Wall-clock of the modules a decode step runs, from forward pre/post hooks (perf_counter;
    on CUDA a synchronize at every hook, so use it on CPU). Only calls of decode steps count."""

    PHASES = ("attention", "router", "experts", "lm_head", "norms_embed", "model_other",
              "generate_loop")

    def __init__(self, model, device):
        self.device, self.acc, self.stack, self.steps = device, {}, [], 0
        self.decoding = False
        self.handles = []
        self._watch(model, "forward", top=True)
        for layer in model.model.layers:
            self._watch(layer.self_attn, "attention")
            block = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
            self._watch(block, "moe_block")
            self._watch(block.experts, "experts")
            self._watch(layer.input_layernorm, "norms_embed")
            self._watch(layer.post_attention_layernorm, "norms_embed")
        self._watch(model.model.norm, "norms_embed")
        self._watch(model.model.embed_tokens, "norms_embed")
        self._watch(model.lm_head, "lm_head")

    def _watch(self, module, name, top=False):
        def pre(mod, args, kwargs):
            if top:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.decoding = ids is not None and ids.shape[-1] == 1
                if self.decoding:
                    self.steps += 1
            if self.decoding:
                self._sync()
                self.stack.append(time.perf_counter())

        def post(mod, args, kwargs, out):
            if self.decoding:
                self._sync()
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - self.stack.pop()

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self):
        for h in self.handles:
            h.remove()

    def result(self, step_ms: float, layers: int) -> dict:
        per = {k: v * 1e3 / max(self.steps, 1) for k, v in self.acc.items()}
        out = {"attention": per.get("attention", 0.0),
               "router": per.get("moe_block", 0.0) - per.get("experts", 0.0),
               "experts": per.get("experts", 0.0), "lm_head": per.get("lm_head", 0.0),
               "norms_embed": per.get("norms_embed", 0.0)}
        inside = out["attention"] + per.get("moe_block", 0.0) + out["lm_head"] + out["norms_embed"]
        out["model_other"] = max(per.get("forward", 0.0) - inside, 0.0)
        out["generate_loop"] = max(step_ms - per.get("forward", 0.0), 0.0)
        out["moe_layer_ms"] = per.get("moe_block", 0.0) / layers
        out["step_ms"] = step_ms
        return {k: round(v, 4) for k, v in out.items()}


def step_breakdown(model, ids, new_tokens, device, runs=2) -> dict:
    """The breakdown of the least disturbed of ``runs`` untimed generates (smallest step)."""
    best = None
    for _ in range(runs):
        bd = StepBreakdown(model, device)
        try:
            _, clock = generate(model, ids, new_tokens, device)
        finally:
            bd.close()
        steps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]
        res = bd.result(sum(steps) / len(steps), len(model.model.layers))
        if best is None or res["step_ms"] < best["step_ms"]:
            best = res
    return best


# ---- where a compiled decode step goes -----------------------------------------------------------

PROFILE_PHASES = (  # op-name patterns of torch.profiler's events, first match wins
    ("experts", ("moe_mlp", "adamoe_cpu::", "_grouped_mm")),
    ("route", ("route_cpu",)),  # the routing op (the gate's GEMV is a dense GEMM)
    ("attention_sdpa", ("scaled_dot_product",)),
    ("dense_gemm", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn")),
    ("dynamo_guards", ("TorchDynamo Cache Lookup",)),
    ("inductor_kernels", ("CompiledFxGraph", "Torch-Compiled Region")),
)
INSIDE_PHASES = ("experts", "route", "attention_sdpa")  # an op inside one of these counts there


def _phase_of(name: str) -> str:
    return next((n for n, pats in PROFILE_PHASES if any(p in name for p in pats)), "other")


class ProfiledSteps(StepClock):
    """A ``StepClock`` that runs ``torch.profiler`` from the first generated token on (so the
    prefill, run eagerly by transformers, is not in it)."""

    def __init__(self, device):
        super().__init__(device)
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.running = False

    def __call__(self, input_ids, scores, **kwargs):
        out = super().__call__(input_ids, scores, **kwargs)
        if not self.running:
            self.prof.start()
            self.running = True
        return out


def compiled_step_profile(model, ids, new_tokens, device, top=6) -> dict | None:
    """Self CPU time per decode step of a compiled generate, by phase (``PROFILE_PHASES``; an op
    called inside the experts, the routing or attention counts there, e.g. the ``aten::mm`` of
    top-2's ``grouped_mm`` on CPU; the rest is ``other``) and the ``top`` ops. CPU only; the
    profiler's own cost inflates the small ops, so the shares, not the sums, are the
    measurement."""
    if device.type != "cpu":
        return None
    clock = ProfiledSteps(device)
    try:
        generate(model, ids, new_tokens, device, compiled=True, clock=clock)
    finally:
        if clock.running:
            clock.prof.stop()
    steps = max(len(clock.times) - 1, 1)
    phases = {name: 0.0 for name, _ in PROFILE_PHASES}
    phases["other"] = 0.0
    for e in clock.prof.events():  # self time, to the phase of the op or of its caller
        phase, up = _phase_of(e.name), e.cpu_parent
        while phase not in INSIDE_PHASES and up is not None:
            if _phase_of(up.name) in INSIDE_PHASES:
                phase = _phase_of(up.name)
            up = up.cpu_parent
        phases[phase] += e.self_cpu_time_total / 1e3 / steps
    ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in clock.prof.key_averages()]
    ops.sort(key=lambda o: -o[1])
    return {"per_step_ms": {k: round(v, 4) for k, v in phases.items()},
            "top_ops_ms": [[k[:60], round(v, 4)] for k, v in ops[:top]]}


# ---- routing + grouping at decode sizes --------------------------------------------------------

def routing_rows(ada, device, dtype, backend, batches, reps) -> list[dict]:
    """One MoE layer of the converted model at T = batch rows (a decode step): ``ak.route``
    alone, and the C++ phases of the layer call (``harness/breakdown.py``: route, groups,
    gather, gate_up, down, combine)."""
    block = moe_blocks(ada)[0]
    rows = []
    for T in batches:
        x = torch.randn(T, ada.config.hidden_size, dtype=dtype, device=device)
        logits = block.gate(x)
        n, m, k = block.num_experts, block.num_null_experts, block.top_k

        def route():
            return ak.route(logits, k, n, backend=backend)

        def layer():
            with torch.no_grad():
                block(x)

        t_route = timing.bench_fn(route, device, warmup=3, reps=max(reps, 20))
        t_layer = timing.bench_fn(layer, device, warmup=3, reps=max(reps, 20))
        row = {"T": T, "route_us": t_route["ms"] * 1e3, "layer_us": t_layer["ms"] * 1e3,
               "route_share": t_route["ms"] / t_layer["ms"], "n": n, "m": m, "k": k}
        if backend == "cpu":
            phases = breakdown.op_breakdown(layer, device, reps=max(reps, 10))
            row["phases_us"] = {p: round(v * 1e3, 1) for p, v in phases.items()}
            row["route_groups_share"] = ((phases.get("route", 0) + phases.get("groups", 0))
                                         / max(sum(phases.values()), 1e-9))
        rows.append(row)
    return rows


# ---- bandwidth ----------------------------------------------------------------------------------

def copy_bandwidth(device, mib=BANDWIDTH_MIB, reps=5) -> dict:
    """Memory bandwidth from a large copy: (bytes read + bytes written) / time, best of ``reps``."""
    n = mib << 20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    best = math.inf
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    read = math.inf
    flat = src.view(torch.float32)
    for _ in range(reps + 1):  # a read-only pass for context: a sum over the same bytes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        flat.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        read = min(read, time.perf_counter() - t0)
    del src, dst, flat
    return {"copy_mib": mib, "gb_s": 2 * n / best / 1e9, "read_gb_s": n / read / 1e9,
            "threads": torch.get_num_threads()}


def bandwidth_near(before: dict, after: dict) -> dict:
    """The bandwidth a batch's rows are held to: the mean of the copies measured right before its
    timed runs and right after its breakdown (a shared machine's bandwidth drifts by 10-30%
    within a run; one copy at the start made the bytes bounds move with it)."""
    return {"gb_s": (before["gb_s"] + after["gb_s"]) / 2,
            "samples_gb_s": [before["gb_s"], after["gb_s"]]}


def bandwidth_summary(samples: list[dict]) -> dict:
    """All copies of the run: the median (the headline), the range and each sample."""
    return {"copy_mib": samples[0]["copy_mib"], "threads": samples[0]["threads"],
            "gb_s": statistics.median(s["gb_s"] for s in samples),
            "read_gb_s": statistics.median(s["read_gb_s"] for s in samples),
            "min_gb_s": min(s["gb_s"] for s in samples),
            "max_gb_s": max(s["gb_s"] for s in samples),
            "samples_gb_s": [round(s["gb_s"], 2) for s in samples],
            "read_samples_gb_s": [round(s["read_gb_s"], 2) for s in samples]}


# ---- the sweep ----------------------------------------------------------------------------------

def settings_of(args):
    out = [{"setting": f"top2-{impl}", "config": "top2", "impl": impl, "m": 0, "k": 2,
            "load_target": 2.0} for impl in args.top2_impls]
    label, m, k = ADAMOE
    out += [{"setting": f"{label} L={L:g}", "config": label, "impl": "adamoe", "m": m, "k": k,
             "load_target": L} for L in args.loads]
    return out


def calibrate(ada, loads, sz, device, seed) -> dict:
    """``ak.set_target_load`` per L on a fixed calibration batch (prompt-length random tokens);
    returns ``{L: (per-layer biases, per-layer loads reached)}``."""
    g = torch.Generator().manual_seed(seed + 1)
    calib = torch.randint(3, sz["vocab"], (4, sz["prompt"]), generator=g).to(device)
    out = {}
    for L in loads:
        reached = ak.set_target_load(ada, L, calib)
        out[L] = ([float(b.null_bias) for b in moe_blocks(ada)], reached)
    ak.load_control.reset_null_bias(ada)
    return out


def apply_setting(s, hf, ada, biases):
    if s["config"] == "top2":
        set_experts_impl(hf, s["impl"])
        return hf
    with torch.no_grad():
        for block, b in zip(moe_blocks(ada), biases[s["load_target"]][0]):
            block.null_bias.fill_(b)
    return ada


def run_dtype(args, device, dtype, backend):
    sz = sizes(args, device)
    reps = cli.reps_for(args, device, quick_default=1, full_default=3)
    hf, ada = build_models(sz, dtype, device, backend, args.seed)
    # both models' nn.Linears alike; AdaMoE's routers too (transformers' top-2 router fuses its
    # GEMV with softmax and top-k in one forward: ~20 us a layer of a ~7 ms step at batch 1)
    if args.decode_linears:
        sz["decode_linears"] = [ak.use_decode_linears(hf), ak.use_decode_linears(ada)]
    settings = settings_of(args)
    biases = calibrate(ada, args.loads, sz, device, args.seed)
    samples = []  # copies before and after each batch's timed runs (bandwidth_near)
    per_expert = expert_bytes(hf)
    sz["bytes_per_expert"] = per_expert
    layers = sz["layers"]
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    todo = len(sz["batches"]) * len(settings) * (reps + 2) + len(sz["compile_batches"]) * len(
        args.compile_attn) * (len(settings) - len(args.top2_impls) + 1) * (reps + 1)
    bar = cli.progress_bar(todo, desc=f"{SCRIPT} {str(dtype)[6:]}", disable=args.no_progress)
    for B in sz["batches"]:
        ids = torch.randint(3, sz["vocab"], (B, sz["prompt"]), generator=g).to(device)
        group = []
        for s in settings:  # untimed: tokens, experts touched, load while decoding
            model = apply_setting(s, hf, ada, biases)
            row = {**s, "batch": B, "compiled": False, "cache": "dynamic",
                   "attn": hf.config._attn_implementation,
                   "load_calibrated": (statistics.mean(biases[s["load_target"]][1])
                                       if s["config"] != "top2" else 2.0)}
            c = count_experts(model, ids, sz["new_tokens"], device)
            row.update({k: v for k, v in c.items() if k != "tokens"})
            row["_tokens"] = c["tokens"]
            group.append(row)
            bar.update()
        samples.append(copy_bandwidth(device))
        for _ in range(reps):  # timed: settings interleaved, each rep one generate per setting
            for row in group:
                model = apply_setting(row, hf, ada, biases)
                _, clock = generate(model, ids, sz["new_tokens"], device)
                t = timing_of(clock, B)
                row.setdefault("_runs", []).append(t)
                bar.update()
        for row in group:
            if not args.no_breakdown:
                model = apply_setting(row, hf, ada, biases)
                row["breakdown"] = step_breakdown(model, ids, sz["new_tokens"], device)
            bar.update()
        samples.append(copy_bandwidth(device))
        bw = bandwidth_near(samples[-2], samples[-1])
        for row in group:
            finish_row(row, B, sz, per_expert, layers, hf, bw)
        rows += group
        if B in sz["compile_batches"]:
            rows += compiled_rows(args, group, hf, ada, biases, ids, sz, device, reps, bar,
                                  per_expert, layers, bw)
    bar.close()
    add_ratios(rows)
    routing = routing_rows(ada, device, dtype, backend, sz["batches"], reps)
    for row in rows:
        row.pop("_tokens", None)
    return sz, bandwidth_summary(samples), rows, routing


def finish_row(row, B, sz, per_expert, layers, hf, bw):
    runs = row.pop("_runs")
    best = max(runs, key=lambda t: t["decode_tok_s"] or 0)
    row.update(prefill_ms=min(t["prefill_ms"] for t in runs), decode_tok_s=best["decode_tok_s"],
               step_ms_median=min(t["step_ms_median"] for t in runs),
               decode_tok_s_all=[round(t["decode_tok_s"], 2) for t in runs])
    cache_len = sz["prompt"] + sz["new_tokens"] / 2
    row["expert_bytes_per_step"] = row["experts_touched_per_step"] * per_expert
    row["other_bytes_per_step"] = non_expert_bytes(hf, B, cache_len)
    row["bytes_per_step"] = row["expert_bytes_per_step"] + row["other_bytes_per_step"]
    row["bandwidth_gb_s"] = bw["gb_s"]
    row["bandwidth_samples_gb_s"] = [round(v, 2) for v in bw["samples_gb_s"]]
    row["bytes_bound_step_ms"] = row["bytes_per_step"] / (bw["gb_s"] * 1e9) * 1e3
    row["expert_bytes_bound_layer_ms"] = (row["expert_bytes_per_step"] / layers
                                          / (bw["gb_s"] * 1e9) * 1e3)
    bd = row.get("breakdown")
    if bd:
        row["moe_layer_ms"] = bd["moe_layer_ms"]
        row["moe_layer_vs_bytes"] = bd["moe_layer_ms"] / row["expert_bytes_bound_layer_ms"]
        row["experts_vs_bytes"] = bd["experts"] / layers / row["expert_bytes_bound_layer_ms"]


def compiled_rows(args, group, hf, ada, biases, ids, sz, device, reps, bar, per_expert, layers,
                  bw) -> list[dict]:
    """Static cache + the decode step under ``torch.compile(fullgraph=True)``: the AdaMoE model
    at every L (one compile per batch: the load dial is a buffer) and top-2 ``grouped_mm``
    (transformers' compilable experts), with each attention implementation of
    ``--compile-attn``; ``speedup_vs_eager`` is over the eager run (dynamic cache, default
    attention), whose tokens each should give."""
    out = []
    default_attn = hf.config._attn_implementation
    try:
        for attn in args.compile_attn:
            torch._dynamo.reset()  # a fresh recompile budget per attention implementation
            for model in (hf, ada):
                model.set_attn_implementation(attn)
            out += _compiled_rows_one_attn(attn, group, hf, ada, biases, ids, sz, device, reps,
                                           bar, per_expert, layers, bw)
    finally:
        for model in (hf, ada):
            model.set_attn_implementation(default_attn)
    return out


def _compiled_rows_one_attn(attn, group, hf, ada, biases, ids, sz, device, reps, bar, per_expert,
                            layers, bw) -> list[dict]:
    B = ids.shape[0]
    out = []
    chosen = [r for r in group if r["config"] != "top2"]
    chosen += [r for r in group if r.get("impl") == "grouped_mm"]
    for base in chosen:
        model = apply_setting(base, hf, ada, biases)
        row = {k: v for k, v in base.items() if not k.startswith("_") and k not in (
            "breakdown", "moe_layer_ms", "moe_layer_vs_bytes", "experts_vs_bytes",
            "prefill_ms", "decode_tok_s", "step_ms_median", "decode_tok_s_all")}
        row.update(compiled=True, cache="static", attn=attn)
        try:
            static, _ = generate(model, ids, sz["new_tokens"], device, static=True)
            t0 = time.perf_counter()
            tokens, _ = generate(model, ids, sz["new_tokens"], device, compiled=True)  # compiles
            row["first_call_s"] = time.perf_counter() - t0
            row["same_tokens_as_eager"] = bool(torch.equal(tokens, base["_tokens"]))
            row["same_tokens_as_eager_static"] = bool(torch.equal(tokens, static))
            row["token_agreement_vs_eager_static"] = float((tokens == static).float().mean())
            bar.update()
            runs = []
            for _ in range(reps):
                _, clock = generate(model, ids, sz["new_tokens"], device, compiled=True)
                runs.append(timing_of(clock, B))
                bar.update()
            row["_runs"] = runs
            row["profile"] = compiled_step_profile(model, ids, sz["new_tokens"], device)
            finish_row(row, B, sz, per_expert, layers, hf, bw)
            row["speedup_vs_eager"] = row["decode_tok_s"] / base["decode_tok_s"]
        except Exception as e:  # noqa: BLE001 (recorded: a model that does not compile)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"[generate] compiled {base['setting']} B={B} attn={attn}: {row['error']}",
                  file=sys.stderr)
        out.append(row)
    return out


def add_ratios(rows):
    """Against transformers' top-2 at the same batch (eager cache, the faster of its experts
    implementations; compiled rows against compiled top-2 when there is one): the tokens/s
    ratio, and the ratio of bytes read per step that bounds it."""
    for r in rows:
        peers = [p for p in rows if p["batch"] == r["batch"] and p["config"] == "top2"
                 and p["compiled"] == r["compiled"] and p.get("decode_tok_s")]
        if not peers or not r.get("decode_tok_s"):
            continue
        best = max(peers, key=lambda p: p["decode_tok_s"])
        eager = next((p for p in peers if p["impl"] == "eager"), None)
        r["top2_baseline"] = best["setting"]
        r["speedup_vs_top2"] = r["decode_tok_s"] / best["decode_tok_s"]
        if eager is not None:
            r["speedup_vs_top2_eager"] = r["decode_tok_s"] / eager["decode_tok_s"]
        r["bytes_ratio_vs_top2"] = best["bytes_per_step"] / r["bytes_per_step"]
        r["speedup_over_bytes_ratio"] = r["speedup_vs_top2"] / r["bytes_ratio_vs_top2"]


# ---- output -------------------------------------------------------------------------------------

TABLE_COLUMNS = [("batch", "B"), ("setting", "setting"), ("cache", "cache"),
                 ("compiled", "compiled"), ("attn", "attention"), ("load_decode", "L decode"),
                 ("prefill_ms", "prefill ms"), ("decode_tok_s", "decode tok/s"),
                 ("step_ms_median", "step ms"), ("experts_touched_per_layer", "experts/layer"),
                 ("bytes_per_step", "bytes/step"), ("bytes_bound_step_ms", "bytes/BW ms"),
                 ("moe_layer_vs_bytes", "MoE layer / (expert bytes/BW)"),
                 ("speedup_vs_top2", "vs top-2"), ("bytes_ratio_vs_top2", "bytes ratio")]
ROUTING_COLUMNS = [("T", "T"), ("route_us", "ak.route µs"), ("layer_us", "MoE layer µs"),
                   ("route_share", "route share"), ("route_groups_share", "route+groups share")]


def plot(rows, meta, path):
    plt = plotting.pyplot()
    if plt is None:
        return None
    eager = [r for r in rows if not r["compiled"] and r.get("decode_tok_s")]
    batches = sorted({r["batch"] for r in eager})
    settings = list(dict.fromkeys(r["setting"] for r in eager))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    width = 0.8 / max(len(settings), 1)
    for i, s in enumerate(settings):
        vals = [next((r["decode_tok_s"] for r in eager if r["batch"] == b and r["setting"] == s),
                     0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=s)
    comp = [r for r in rows if r["compiled"] and r.get("decode_tok_s")]
    for r in comp:
        j = batches.index(r["batch"])
        i = settings.index(r["setting"]) if r["setting"] in settings else 0
        ax.plot(j + i * width, r["decode_tok_s"], "k*" if r.get("attn") != "eager" else "kx",
                ms=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("decode tok/s (best run; compiled, static cache: * sdpa, x eager attn)")
    ax.set_title("decode throughput")
    ax.legend(fontsize=7)
    ax = axes[1]
    for b in batches:
        sel = [r for r in eager if r["batch"] == b and r.get("speedup_vs_top2")]
        ax.plot([r["bytes_ratio_vs_top2"] for r in sel], [r["speedup_vs_top2"] for r in sel], "o",
                label=f"B={b}")
    lim = max([2.0] + [r.get("bytes_ratio_vs_top2") or 0 for r in eager]) * 1.1
    ax.plot([0, lim], [0, lim], "k:", label="tokens/s ratio = bytes ratio")
    ax.plot([0, lim], [0, 0.85 * lim], "k--", lw=0.7, label="0.85 x bytes ratio")
    ax.set_xlabel("bytes read per step: top-2 / setting")
    ax.set_ylabel("decode tokens/s: setting / top-2")
    ax.set_title("speedup vs bytes read")
    ax.legend(fontsize=7)
    ax = axes[2]
    b0 = batches[0]
    sel = [r for r in eager if r["batch"] == b0 and r.get("breakdown")]
    phases = list(StepBreakdown.PHASES)
    left = [0.0] * len(sel)
    for pi, p in enumerate(phases):
        w = [r["breakdown"].get(p, 0.0) for r in sel]
        ax.barh(range(len(sel)), w, left=left, label=p, color=plt.get_cmap("tab10")(pi))
        left = [a + c for a, c in zip(left, w)]
    ax.plot([r["bytes_bound_step_ms"] for r in sel], range(len(sel)), "k|", ms=14,
            label="bytes / bandwidth")
    ax.set_yticks(range(len(sel)), [r["setting"] for r in sel], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (module hooks)")
    ax.set_title(f"one decode step, B={b0}")
    ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"generate: {meta['model']} — {meta['device_name']}, {meta['dtype']}, "
                 f"backend {meta['backend']}", fontsize=9)
    return plotting.save_figure(fig, path)


def _compiled_target(comp) -> dict:
    return {"best": max((r["speedup_vs_eager"] for r in comp), default=None),
            "worst": min((r["speedup_vs_eager"] for r in comp), default=None),
            "met": bool(comp) and all(r["speedup_vs_eager"] >= 1.5 for r in comp)}


def targets(rows, routing) -> dict:
    """The issue's targets, checked on this run (benchmark results, not timed tests)."""
    eager = [r for r in rows if not r["compiled"] and r["config"] != "top2"]
    small = [r for r in rows
             if not r["compiled"] and r["batch"] in (1, 4) and "moe_layer_vs_bytes" in r]
    b1 = [r for r in eager if r["batch"] == 1 and r.get("speedup_over_bytes_ratio")]
    big = [r for r in eager if r["batch"] >= 16 and r.get("speedup_vs_top2")]
    comp = [r for r in rows if r["compiled"] and r["batch"] == 1 and r.get("speedup_vs_eager")]
    return {
        "moe_layer_within_1.25x_of_bytes_over_bw": {
            "worst": max((r["moe_layer_vs_bytes"] for r in small), default=None),
            "met": bool(small) and all(r["moe_layer_vs_bytes"] <= 1.25 for r in small)},
        "b1_speedup_at_least_0.85x_bytes_ratio": {
            "worst": min((r["speedup_over_bytes_ratio"] for r in b1), default=None),
            "met": bool(b1) and all(r["speedup_over_bytes_ratio"] >= 0.85 for r in b1)},
        "b16_b64_never_slower_than_top2": {
            "worst": min((r["speedup_vs_top2"] for r in big), default=None),
            "met": bool(big) and all(r["speedup_vs_top2"] >= 1.0 for r in big)},
        "compiled_b1_at_least_1.5x_eager": {
            **_compiled_target(comp),
            "by_attn": {a: _compiled_target([r for r in comp if r.get("attn") == a])
                        for a in sorted({r.get("attn") for r in comp} - {None})}},
        "route_share_of_layer_max": max((r["route_share"] for r in routing), default=None),
    }


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    backend = cli.resolve_bench_backend(args.backend, device)
    cli.apply_threads(args, device)
    cli.apply_timing(args)
    cli.seed_all(args.seed)
    dtypes = args.dtypes or [args.dtype]
    out = results.output_dir(args, device)
    saved = []
    for dname in dtypes:
        dtype = cli.DTYPES[dname]
        t0 = time.time()
        sz, bw, rows, routing = run_dtype(args, device, dtype, backend)
        meta = provenance.environment(device, dtype, backend)
        meta.update(
            script=SCRIPT, quick=args.quick, seconds=round(time.time() - t0, 1),
            model=(f"MixtralForCausalLM H={sz['hidden']} I={sz['intermediate']} n={NUM_EXPERTS} "
                   f"layers={sz['layers']} vocab={sz['vocab']} (random init)"),
            sizes=sz, loads=args.loads, decode_linears=bool(args.decode_linears),
            adamoe={"config": ADAMOE[0], "m": ADAMOE[1], "k": ADAMOE[2]},
            bandwidth=bw, bytes_per_expert=sz["bytes_per_expert"],
            generation=("greedy model.generate, KV cache (dynamic; static for the compiled "
                        "rows), eos off; decode tok/s = batch x (new tokens - 1) / (last step - "
                        "first token), best of the runs; step ms = median step, best run"),
            bytes=("expert bytes per step = distinct true experts touched per layer (untimed "
                   "pass, same tokens) x bytes per expert, summed over layers; other bytes = "
                   "all non-expert weights (embedding: the rows looked up) + the KV cache read"),
            bandwidth_note=("memory bandwidth = (read + written bytes) / time of a 512 MiB "
                            "copy, best of 5, same threads; measured before and after each "
                            "batch's timed runs, each row held to the mean of its batch's two "
                            "(bandwidth_samples_gb_s); meta gb_s = the median of all copies"),
            breakdown_note=("module hooks (perf_counter) over one untimed generate; router = "
                            "MoE block - experts; model_other = model forward - its modules "
                            "(residuals, rotary, masks, Python); generate_loop = step - forward"),
            machine_note=("CPU shared with other processes (see busy_cores_at_start, loadavg): "
                          "timings are noisy; compare ratios within one run"),
            routing=routing)
        meta["targets"] = targets(rows, routing)
        suffix = "" if dtype == torch.bfloat16 else "_" + str(dtype).removeprefix("torch.")
        if args.decode_linears:
            suffix = "_decode_linears" + suffix
        stem = results.result_stem(SCRIPT + suffix, args.quick)
        saved.append(results.save_results(args, out, stem, meta, rows, plot,
                                          [(rows, TABLE_COLUMNS), (routing, ROUTING_COLUMNS)]))
        print("targets:", meta["targets"])
    return saved[0] if len(saved) == 1 else {"runs": saved, **saved[0]}


if __name__ == "__main__":
    cli.reexec_with_cpu_malloc()
    main()
