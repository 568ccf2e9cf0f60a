"""Fine-tune a transformers model with null experts: ``python -m adamoe_kernels.training.finetune``.

With no arguments it runs an embedded demo that needs no network: a tiny Mixtral (byte-level,
``n = 8`` experts, top-2) is first trained briefly as a plain top-2 MoE on part of the Python docs
that ship with CPython (``pydoc_data.topics``), standing in for a pretrained MoE; it is then
converted to AdaMoE (paper §4.2: ``m = 8`` null experts, top-3, router rows copied) and
fine-tuned for 2 epochs on a fixed sample of the other part with the null-aware loss annealed by
``ak.AlphaSchedule()`` (α = 0.02, then 0.0001). It prints the eval loss before and after
fine-tuning and the final load, and writes ``log.json`` and PNG plots (loss, per-layer load,
FLOPs saved vs top-2) to ``--out``.

``--model PATH`` fine-tunes a local checkpoint instead (with its tokenizer): MoE models
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) get null experts via ``ak.convert_model``, dense models
(Llama, ...) get Mo-LoRA experts via ``ak.add_mo_lora``, checkpoints saved after either are
reloaded with ``ak.from_pretrained``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..integrations import (SUPPORTED_MOE_MODELS, add_mo_lora, convert_model, expert_load,
                            from_pretrained)
from ..losses import AlphaSchedule
from ..ops.backend import BACKENDS, resolve_backend


# ---- data -------------------------------------------------------------------------------------

def builtin_text() -> str:
    """The CPython docs topics (``pydoc_data.topics``, ~460 KB of English + code), fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); enough for the tiny demo model."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}


def windows(ids: torch.Tensor, seq_len: int, count: int, generator: torch.Generator,
            contiguous: bool = False) -> torch.Tensor:
    """``count`` windows ``[count, seq_len]`` of ``ids``: random starts, or evenly spaced."""
    span = ids.numel() - seq_len
    if span <= 0:
        raise ValueError(f"the text has {ids.numel()} tokens; need more than seq_len={seq_len}")
    if contiguous:
        starts = torch.linspace(0, span, count).long()
    else:
        starts = torch.randint(0, span + 1, (count,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# ---- FLOPs ------------------------------------------------------------------------------------

def forward_flops_per_token(config, load: float, num_router_rows: int, seq_len: int) -> float:
    """Matmul FLOPs per token of a Mixtral-style decoder at expert load ``load`` (2 per MAC).

    Attention projections, attention scores over an average context of ``seq_len / 2``, the
    router, ``load`` experts of ``3 H I`` MACs, any shared expert, and the LM head.
    """
    H = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    I = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
    per_layer = (H * (q + 2 * kv) + q * H          # q, k, v, o
                 + 2 * q * seq_len / 2             # scores and weighted sum
                 + H * num_router_rows + shared * 3 * H + H  # router, shared expert (+ gate)
                 + load * 3 * H * I)               # routed experts
    return 2.0 * (config.num_hidden_layers * per_layer + H * config.vocab_size)


# ---- run configuration ------------------------------------------------------------------------

@dataclass
class RunConfig:
    model: str | None = None
    text: str | None = None
    out: str = "runs/finetune"
    num_null_experts: int = 8
    top_k: int = 3
    normalize: str | None = None
    backend: str | None = None
    epochs: int = 2
    steps_per_epoch: int = 100
    base_steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    base_lr: float = 3e-3
    eval_windows: int = 32
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    num_experts: int = 8
    save_model: bool = True
    baseline: bool = False
    plots: bool = True
    progress: bool = True


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(
        prog="adamoe-finetune",
        description="Fine-tune a transformers model with AdaMoE null experts (no network needed "
                    "for the default run: a tiny Mixtral on CPython's pydoc topics).")
    p.add_argument("--model", help="local checkpoint directory (with its tokenizer); default: "
                                   "the embedded tiny Mixtral")
    p.add_argument("--text", help="UTF-8 text file to train on (default: pydoc_data.topics)")
    p.add_argument("--out", default="runs/finetune", help="output folder (log.json, *.png)")
    p.add_argument("--num-null-experts", "-m", type=int, default=8)
    p.add_argument("--top-k", "-k", type=int, default=3)
    p.add_argument("--normalize", choices=("true", "all", "none"), default=None,
                   help="routing weights (default: the model's own convention)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="adamoe backend (default: triton on CUDA, cpu extension on CPU if built)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=100,
                   help="optimizer steps per epoch (each epoch passes over the same fixed sample "
                        "of steps_per_epoch * batch_size windows, as the paper's 2 epochs)")
    p.add_argument("--base-steps", type=int, default=300,
                   help="top-2 steps that make the tiny base model (default run only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a < 1 minute run (smaller everything)")
    p.add_argument("--baseline", action="store_true",
                   help="default run only: also fine-tune the top-2 base model on the same batches "
                        "(a control for the AdaMoE eval loss)")
    p.add_argument("--no-save", action="store_true", help="do not save the fine-tuned model")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    a = p.parse_args(argv)
    cfg = RunConfig(model=a.model, text=a.text, out=a.out, num_null_experts=a.num_null_experts,
                    top_k=a.top_k, normalize=a.normalize, backend=a.backend, epochs=a.epochs,
                    steps_per_epoch=a.steps_per_epoch, base_steps=a.base_steps,
                    batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, base_lr=a.base_lr,
                    eval_windows=a.eval_windows, seed=a.seed, save_model=not a.no_save,
                    baseline=a.baseline,
                    plots=not a.no_plots, progress=not a.no_progress)
    if a.quick:
        cfg.hidden_size, cfg.num_layers, cfg.intermediate_size = 64, 2, 128
        cfg.seq_len, cfg.eval_windows = min(cfg.seq_len, 64), min(cfg.eval_windows, 16)
        cfg.batch_size = min(cfg.batch_size, 8)
        cfg.base_steps = min(cfg.base_steps, 60)
        cfg.steps_per_epoch = min(cfg.steps_per_epoch, 25)
    return cfg


# ---- model ------------------------------------------------------------------------------------

def tiny_mixtral(cfg: RunConfig, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=cfg.num_experts,
        num_experts_per_tok=2, max_position_embeddings=max(512, cfg.seq_len),
        router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False)
    return MixtralForCausalLM(config)


def load_user_model(cfg: RunConfig):
    """``--model PATH``: (model, tokenizer, kind) with kind 'moe' or 'mo_lora'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError, TypeError):
        if config.vocab_size != ByteTokenizer.vocab_size:
            raise
        tokenizer = ByteTokenizer()  # e.g. the model a default run saved (byte vocab)
    if getattr(config, "adamoe", None):
        model = from_pretrained(cfg.model, backend=cfg.backend, dtype=torch.float32)
        return model, tokenizer, config.adamoe["kind"]
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if any(k.__name__ in SUPPORTED_MOE_MODELS for k in type(model).__mro__):
        convert_model(model, cfg.num_null_experts, cfg.top_k, cfg.normalize,
                      backend=cfg.backend)
        return model, tokenizer, "moe"
    add_mo_lora(model, num_experts=4, num_null_experts=cfg.num_null_experts, top_k=cfg.top_k,
                normalize=cfg.normalize or "true", backend=cfg.backend)
    return model, tokenizer, "mo_lora"


# ---- training ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean LM loss over ``data [N, S]`` windows, and the mean load over layers and batches."""
    was_training = model.training
    model.eval()
    losses, loads = [], []
    for i in range(0, data.shape[0], batch_size):
        batch = data[i:i + batch_size]
        out = model(input_ids=batch, labels=batch, output_router_logits=False)
        losses.append(float(out.loss) * batch.shape[0])
        loads.append(sum(expert_load(model)) / len(expert_load(model)))
    model.train(was_training)
    return sum(losses) / data.shape[0], sum(loads) / len(loads)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def train_phase(model, batches: list[torch.Tensor], *, lr: float, schedule: AlphaSchedule | None,
                steps_per_epoch: int, log: list, phase: str, progress: bool,
                aux: bool) -> None:
    """One optimizer step per batch; ``schedule(epoch)`` sets ``router_aux_loss_coef``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = len(batches)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    bar = _progress(total, phase, progress)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step, batch in enumerate(batches):
        epoch = step // steps_per_epoch
        alpha = schedule(epoch) if schedule is not None else getattr(
            model, "router_aux_loss_coef", 0.0)
        model.router_aux_loss_coef = alpha
        out = model(input_ids=batch, labels=batch, output_router_logits=aux)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        elapsed = time.perf_counter() - t0
        loads = expert_load(model)
        aux_value = float(out.aux_loss.detach()) if aux and out.aux_loss is not None else 0.0
        total_loss = float(out.loss.detach())
        lm_loss = total_loss - alpha * aux_value
        rec = {"phase": phase, "step": step, "epoch": epoch, "loss": total_loss,
               "lm_loss": lm_loss, "aux_loss": aux_value, "alpha": alpha, "load": loads,
               "tokens_per_s": tokens / elapsed}
        log.append(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{lm_loss:.3f}", load=f"{sum(loads) / len(loads):.2f}",
                            tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()


# ---- plots ------------------------------------------------------------------------------------

def write_plots(out_dir: str, log: list, evals: dict, flops_curve: list, top_k: int) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ft = [r for r in log if r["phase"] == "finetune"]
    base = [r for r in log if r["phase"] == "base"]

    fig, ax = plt.subplots(figsize=(7, 4))
    if base:
        ax.plot([r["step"] for r in base], [r["lm_loss"] for r in base], lw=1,
                label="base (top-2) train LM loss")
    offset = len(base)
    ax.plot([offset + r["step"] for r in ft], [r["lm_loss"] for r in ft], lw=1,
            label="AdaMoE fine-tune train LM loss")
    control = [r for r in log if r["phase"] == "baseline_top2"]
    if control:
        ax.plot([offset + r["step"] for r in control], [r["lm_loss"] for r in control], lw=1,
                alpha=0.7, label="top-2 fine-tune, same batches (control)")
    ax.scatter([offset, offset + len(ft)], [evals["before"], evals["after"]], color="k",
               zorder=3, label="eval loss (before / after fine-tune)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Loss")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = len(ft[0]["load"]) if ft else 0
    for i in range(min(layers, 32)):
        ax.plot([r["step"] for r in ft], [r["load"][i] for r in ft], lw=1,
                label=f"layer {i}" if layers <= 8 else None)
    ax.axhline(2.0, color="gray", ls="--", label="top-2 baseline")
    ax.axhline(top_k, color="gray", ls=":", label=f"k = {top_k}")
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("load L (true experts / token)")
    ax.set_title("Per-layer load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "load.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if not flops_curve:  # Mo-LoRA: LoRA experts add next to no FLOPs
        return paths
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c["step"] for c in flops_curve], [c["experts_pct"] for c in flops_curve],
            label="expert FLOPs saved")
    ax.plot([c["step"] for c in flops_curve], [c["model_pct"] for c in flops_curve],
            label="whole-model FLOPs saved")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("% saved vs top-2")
    ax.set_title("FLOPs saved vs top-2")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "flops.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ---- main -------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> dict:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    text = builtin_text() if cfg.text is None else open(cfg.text, encoding="utf-8").read()
    log: list = []
    evals: dict = {}

    if cfg.model is None:
        tokenizer = ByteTokenizer()
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        # base model on the first 60% of the docs, fine-tune on the rest (last 10% held out)
        cut = int(ids.numel() * 0.6)
        base_ids, ft_ids = ids[:cut], ids[cut:]
        model = tiny_mixtral(cfg, tokenizer.vocab_size)
        description = (f"tiny Mixtral (H={cfg.hidden_size}, layers={cfg.num_layers}, "
                       f"I={cfg.intermediate_size}, n={cfg.num_experts}, top-2, byte vocab)")
        kind = "moe"
        held = int(ft_ids.numel() * 0.9)
        ft_train, ft_eval = ft_ids[:held], ft_ids[held:]
        eval_data = windows(ft_eval, cfg.seq_len, cfg.eval_windows, gen, contiguous=True)
        # 1) the stand-in for a pretrained MoE: plain top-2 (m = 0 runs exactly like transformers)
        convert_model(model, 0, 2, backend=cfg.backend)
        base_batches = [windows(base_ids, cfg.seq_len, cfg.batch_size, gen)
                        for _ in range(cfg.base_steps)]
        train_phase(model, base_batches, lr=cfg.base_lr, schedule=None,
                    steps_per_epoch=max(cfg.base_steps, 1), log=log, phase="base",
                    progress=cfg.progress, aux=True)
        evals["base_top2"], _ = evaluate(model, eval_data, cfg.batch_size)
        baseline = copy.deepcopy(model) if cfg.baseline else None
        # 2) AdaMoE: m null experts, top-k over n+m, router rows copied (paper §4.2.1)
        convert_model(model, cfg.num_null_experts, cfg.top_k, cfg.normalize,
                      backend=cfg.backend)
    else:
        model, tokenizer, kind = load_user_model(cfg)
        baseline = None
        description = f"{type(model).__name__} from {cfg.model}"
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)
        held = int(ids.numel() * 0.9)
        ft_train, ft_eval = ids[:held], ids[held:]
        eval_data = windows(ft_eval, cfg.seq_len, cfg.eval_windows, gen, contiguous=True)

    info = model.config.adamoe
    evals["before"], load_before = evaluate(model, eval_data, cfg.batch_size)
    sample = windows(ft_train, cfg.seq_len, cfg.steps_per_epoch * cfg.batch_size, gen)
    ft_batches = []
    for _ in range(cfg.epochs):
        order = torch.randperm(sample.shape[0], generator=gen)
        ft_batches += [sample[order[i:i + cfg.batch_size]]
                       for i in range(0, sample.shape[0], cfg.batch_size)]
    t_ft = time.perf_counter()
    train_phase(model, ft_batches, lr=cfg.lr, schedule=AlphaSchedule(),
                steps_per_epoch=cfg.steps_per_epoch, log=log, phase="finetune",
                progress=cfg.progress, aux=True)
    ft_seconds = time.perf_counter() - t_ft
    evals["after"], load_after = evaluate(model, eval_data, cfg.batch_size)
    final_load = expert_load(model)
    if baseline is not None:  # control: the top-2 model fine-tuned on the same batches
        train_phase(baseline, ft_batches, lr=cfg.lr, schedule=AlphaSchedule(),
                    steps_per_epoch=cfg.steps_per_epoch, log=log, phase="baseline_top2",
                    progress=cfg.progress, aux=True)
        evals["top2_finetuned"], _ = evaluate(baseline, eval_data, cfg.batch_size)

    # FLOPs vs the top-2 model (MoE models; Mo-LoRA experts add negligible FLOPs)
    n, m, k = info["num_experts"], info["num_null_experts"], info["top_k"]
    flops_curve = []
    if kind == "moe":
        f_top2 = forward_flops_per_token(model.config, 2.0, n, cfg.seq_len)
        for r in log:
            if r["phase"] != "finetune":
                continue
            L = sum(r["load"]) / len(r["load"])
            f = forward_flops_per_token(model.config, L, n + m, cfg.seq_len)
            flops_curve.append({"step": r["step"], "load": L,
                                "experts_pct": 100 * (1 - L / 2.0),
                                "model_pct": 100 * (1 - f / f_top2)})
    mean_after = load_after
    summary = {
        "model": description,
        "adamoe": info,
        "backend": resolve_backend(cfg.backend, torch.device("cpu")),
        "eval_loss": evals,
        "eval_load_before": load_before,
        "eval_load_after": load_after,
        "final_train_load_per_layer": final_load,
        "flops_saved_vs_top2_pct": ({
            "experts": 100 * (1 - mean_after / 2.0),
            "whole_model": 100 * (1 - forward_flops_per_token(model.config, mean_after, n + m,
                                                              cfg.seq_len)
                                  / forward_flops_per_token(model.config, 2.0, n,
                                                            cfg.seq_len))}
            if kind == "moe" else None),
        "finetune_tokens_per_s": (sum(b.numel() for b in ft_batches) / ft_seconds),
        "wall_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    plots = write_plots(cfg.out, log, evals, flops_curve, k) if cfg.plots else []
    summary["plots"] = plots
    if cfg.save_model:
        model.save_pretrained(os.path.join(cfg.out, "model"))
        summary["saved_model"] = os.path.join(cfg.out, "model")
    with open(os.path.join(cfg.out, "log.json"), "w") as f:
        json.dump({"config": asdict(cfg), "summary": summary, "steps": log}, f, indent=1)
    summary["log"] = os.path.join(cfg.out, "log.json")
    print_summary(summary, k)
    return summary


def print_summary(s: dict, k: int) -> None:
    ev, info = s["eval_loss"], s["adamoe"]
    total = info["num_experts"] + info["num_null_experts"]
    lines = ["", "AdaMoE fine-tune summary", f"  model      : {s['model']}",
             f"  adamoe     : m={info['num_null_experts']} null experts, top-{info['top_k']} of "
             f"n+m={total}, normalize={info['normalize']!r}, backend={s['backend']}"]
    if "base_top2" in ev:
        lines.append(f"  eval loss  : base top-2 {ev['base_top2']:.4f}")
    lines.append(f"  eval loss  : before fine-tune {ev['before']:.4f} -> after {ev['after']:.4f}")
    if "top2_finetuned" in ev:
        lines.append(f"  eval loss  : control, top-2 fine-tuned on the same batches "
                     f"{ev['top2_finetuned']:.4f}")
    lines.append(f"  load       : eval {s['eval_load_before']:.3f} -> {s['eval_load_after']:.3f} "
                 f"(k = {k}, top-2 = 2.00); last train step per layer "
                 f"[{', '.join(f'{x:.2f}' for x in s['final_train_load_per_layer'])}]")
    if s["flops_saved_vs_top2_pct"] is not None:
        fl = s["flops_saved_vs_top2_pct"]
        lines.append(f"  FLOPs saved vs top-2: experts {fl['experts']:.1f}%, whole model "
                     f"{fl['whole_model']:.1f}%")
    lines.append(f"  speed      : {s['finetune_tokens_per_s']:.0f} tokens/s fine-tuning, "
                 f"{s['wall_seconds']:.0f} s in all ({s['torch_threads']} threads)")
    lines.append(f"  log        : {s['log']}")
    if s["plots"]:
        lines.append(f"  plots      : {', '.join(s['plots'])}")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
