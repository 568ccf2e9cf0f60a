"""Fine-tune a transformers model with null experts: ``python -m adamoe_kernels.training.finetune``.

With no arguments it runs an embedded demo that needs no network: a tiny Mixtral (byte-level,
``n = 8`` experts, top-2) is first trained briefly as a plain top-2 MoE on part of the Python docs
that ship with CPython (``pydoc_data.topics``), standing in for a pretrained MoE. That model is
fine-tuned as it is, the control; then it is converted to AdaMoE (paper §4.2: ``m = 8`` null
experts, top-3, router rows copied) and fine-tuned alike, for 2 epochs on the same fixed sample of
the other part, with the null-aware loss annealed by ``ak.AlphaSchedule()`` (α = 0.02, then
0.0001). Both are evaluated on the same held-out windows during their runs. It prints the eval
loss before and after fine-tuning, the final load and the comparison with the control
(``training.comparison``), and writes ``log.json`` and PNG plots (loss, per-layer load, FLOPs
saved vs top-2, eval loss of both runs vs step, wall-clock and expert FLOPs) to ``--out``.

``--model PATH`` fine-tunes a local checkpoint instead (with its tokenizer): MoE models
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) get null experts via ``ak.convert_model``, dense models
(Llama, ...) get Mo-LoRA experts via ``ak.add_mo_lora``, checkpoints saved after either are
reloaded with ``ak.from_pretrained``.

Under ``torchrun --nproc-per-node N`` the same command trains data parallel (DDP), with
``--fsdp`` sharded by FSDP2, with ``--expert-parallel`` with every MoE block's true experts split
over the ranks (``adamoe_kernels.training.parallel``); each rank takes its rows of the same global
batch, so the run equals the single-process one. ``--save-every N`` writes checkpoints that
survive a kill (``adamoe_kernels.training.checkpoint``) and ``--resume`` continues from the
newest intact one, bit for bit on the deterministic CPU backend.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..integrations import SUPPORTED_MOE_MODELS, add_mo_lora, convert_model, from_pretrained
from ..integrations.hf_models import adamoe_layers
from ..integrations.load_control import LoadController
from ..losses import AlphaSchedule
from ..ops.backend import BACKENDS, resolve_backend
from . import comparison
from .checkpoint import (MANIFEST, CheckpointError, Checkpointer, CheckpointLock, rng_state,
                         set_rng_state)
from .parallel import Parallel, watch_launcher


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
    control: bool = True
    eval_every: int = 0
    plots: bool = True
    progress: bool = True
    device: str = "auto"
    fsdp: bool = False
    expert_parallel: bool = False
    target_load: float | None = None
    load_rate: float = 0.01
    save_every: int = 0
    keep_last: int = 2
    checkpoint_dir: str | None = None
    resume: str | None = None


# What may differ between a run and its resumption: where things go and how the work is spread
# (torch.distributed.checkpoint reshards). Everything else must match the checkpoint.
RESUME_MAY_CHANGE = ("out", "save_model", "plots", "progress", "device", "backend", "fsdp",
                     "expert_parallel", "save_every", "keep_last", "checkpoint_dir", "resume")


class ResumeError(ValueError):
    """``--resume``: the checkpoint cannot be continued from (corrupt, other settings or text);
    ``main`` prints the message on one line and exits with code 1."""


def _model_experts(p: argparse.ArgumentParser, model: str) -> int | None:
    """The number of true experts k is chosen from for ``--model DIR`` (its config.json), or
    None when DIR is already an adamoe model (its own routing is kept)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError) as err:
        p.error(f"--model {model}: config.json is unreadable ({err})")
    if config.get("adamoe"):
        return None
    n = config.get("num_local_experts") or config.get("num_experts")
    return n if isinstance(n, int) and n > 0 else 4  # not an MoE: add_mo_lora's 4 LoRA experts


def _check_args(p: argparse.ArgumentParser, cfg: RunConfig) -> None:
    """Every argument checked before any work: ``p.error`` (exit code 2) names the bad one."""
    for flag, value in (("--batch-size", cfg.batch_size), ("--eval-windows", cfg.eval_windows),
                        ("--steps-per-epoch", cfg.steps_per_epoch), ("--seq-len", cfg.seq_len),
                        ("--epochs", cfg.epochs)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if cfg.base_steps < 0:
        p.error(f"--base-steps must be >= 0, got {cfg.base_steps}")
    if cfg.num_null_experts < 0:
        p.error(f"--num-null-experts must be >= 0, got {cfg.num_null_experts}")
    for flag, value in (("--lr", cfg.lr), ("--base-lr", cfg.base_lr),
                        ("--load-rate", cfg.load_rate)):
        if not value > 0:
            p.error(f"{flag} must be > 0, got {value}")
    n = cfg.num_experts
    if cfg.model is not None:
        if not (Path(cfg.model) / "config.json").is_file():
            p.error(f"--model {cfg.model}: not a directory with a config.json")
        n = _model_experts(p, cfg.model)
    if cfg.top_k < 1:
        p.error(f"--top-k must be >= 1, got {cfg.top_k}")
    if n is not None and cfg.top_k > n + cfg.num_null_experts:
        p.error(f"--top-k {cfg.top_k} exceeds the {n} true + {cfg.num_null_experts} null experts")
    if cfg.target_load is not None:
        if cfg.num_null_experts == 0 and n is not None:
            p.error("--target-load needs null experts (--num-null-experts 0: the load is always k)")
        if not 0 < cfg.target_load <= cfg.top_k:
            p.error(f"--target-load must be in (0, k={cfg.top_k}], got {cfg.target_load}")
    if cfg.text is not None and not (Path(cfg.text).is_file() and os.access(cfg.text, os.R_OK)):
        p.error(f"--text {cfg.text}: not a readable file")
    if cfg.resume not in (None, "latest") and not (Path(cfg.resume) / MANIFEST).is_file():
        p.error(f"--resume {cfg.resume}: no such checkpoint folder (no {MANIFEST} in it)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for flag, rows in (("--batch-size", cfg.batch_size), ("--eval-windows", cfg.eval_windows)):
        if rows % world:
            p.error(f"{flag} ({rows}) must be divisible by the number of processes ({world}): "
                    "each rank takes an equal share of the rows")


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
    p.add_argument("--no-control", action="store_true",
                   help="skip the control: by default the top-2 model is also fine-tuned on the "
                        "same batches and compared with AdaMoE (MoE models only)")
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the old opt-in
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="held-out eval every N optimizer steps of each fine-tune (0: 8 evals "
                        "per run); the curves of the control comparison")
    p.add_argument("--no-save", action="store_true", help="do not save the fine-tuned model")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--device", default="auto",
                   help="'auto' (this rank's GPU if CUDA is available, else CPU), 'cpu', 'cuda'")
    g = p.add_argument_group(
        "scale-out (launch with torchrun --nproc-per-node N; plain data parallel (DDP) by "
        "default; --batch-size is the global batch, split evenly over the ranks)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 "
                        "(fully_shard per decoder layer)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="split each MoE block's true experts over the ranks (all-to-all of the "
                        "true assignments only); the rest data parallel (DDP, or FSDP2 with --fsdp)")
    g = p.add_argument_group("load controller")
    g.add_argument("--target-load", type=float, default=None,
                   help="hold each layer's load near L during fine-tuning with ak.LoadController "
                        "(a null-logit bias stepped after every optimizer step)")
    g.add_argument("--load-rate", type=float, default=0.01, help="the controller's bias step")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a checkpoint every N optimizer steps (0: never)")
    g.add_argument("--keep-last", type=int, default=2, metavar="K",
                   help="keep the K newest checkpoints")
    g.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default: OUT/checkpoints; with several machines a "
                        "file system they all see)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the newest intact checkpoint (or from the checkpoint "
                        "folder PATH); starts from the beginning if there is none")
    a = p.parse_args(argv)
    cfg = RunConfig(model=a.model, text=a.text, out=a.out, num_null_experts=a.num_null_experts,
                    top_k=a.top_k, normalize=a.normalize, backend=a.backend, epochs=a.epochs,
                    steps_per_epoch=a.steps_per_epoch, base_steps=a.base_steps,
                    batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, base_lr=a.base_lr,
                    eval_windows=a.eval_windows, seed=a.seed, save_model=not a.no_save,
                    control=not a.no_control, eval_every=a.eval_every,
                    plots=not a.no_plots, progress=not a.no_progress, device=a.device,
                    fsdp=a.fsdp, expert_parallel=a.expert_parallel, target_load=a.target_load,
                    load_rate=a.load_rate, save_every=a.save_every, keep_last=a.keep_last,
                    checkpoint_dir=a.checkpoint_dir, resume=a.resume)
    _check_args(p, cfg)
    if cfg.save_every < 0:
        p.error("--save-every must be >= 0")
    if cfg.keep_last < 1:
        p.error("--keep-last must be >= 1")
    if cfg.eval_every < 0:
        p.error("--eval-every must be >= 0")
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
    """``--model PATH``: (model, tokenizer, kind, control) with kind 'moe' or 'mo_lora'; the
    control (with ``cfg.control``, MoE models only) is the model as it is, top-k of its n
    experts (``convert_model`` with ``m = 0`` runs exactly as transformers)."""
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
        return model, tokenizer, config.adamoe["kind"], None  # already AdaMoE: no top-k twin
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if any(k.__name__ in SUPPORTED_MOE_MODELS for k in type(model).__mro__):
        control = None
        if cfg.control:
            control = copy.deepcopy(model)
            convert_model(control, 0, config.num_experts_per_tok, backend=cfg.backend)
        convert_model(model, cfg.num_null_experts, cfg.top_k, cfg.normalize,
                      backend=cfg.backend)
        return model, tokenizer, "moe", control
    add_mo_lora(model, num_experts=4, num_null_experts=cfg.num_null_experts, top_k=cfg.top_k,
                normalize=cfg.normalize or "true", backend=cfg.backend)
    return model, tokenizer, "mo_lora", None


# ---- training ---------------------------------------------------------------------------------

PHASES = ("base", "baseline_top2", "finetune")  # the control first: AdaMoE is compared with it
BASE_SNAPSHOT = "base_top2.pt"  # the demo's base model in the checkpoint folder (the control's start)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int,
             parallel: Parallel | None = None) -> tuple[float, float]:
    """Mean LM loss over ``data [N, S]`` windows, and the mean load (over layers and tokens).

    Under several ranks each takes its rows of every batch (a collective: all ranks call it
    with the same ``data``) and the sums are all-reduced."""
    par = parallel or Parallel()
    was_training = model.training
    model.eval()
    layers = adamoe_layers(par.unwrap(model))
    sums = torch.zeros(2)
    for i in range(0, data.shape[0], batch_size):
        batch = par.shard(data[i:i + batch_size])
        out = model(input_ids=batch, labels=batch, output_router_logits=False)
        load = torch.stack([layer.last_load.float() for layer in layers]).mean()
        sums += torch.stack([out.loss.float(), load]).cpu() * batch.shape[0]
    model.train(was_training)
    loss, load = (par.mean(sums) * par.world_size / data.shape[0]).tolist()
    return loss, load


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True, initial=initial)


class RunState:
    """What one run carries between phases: its config and ranks, the log, the eval losses, the
    checkpoints and, with ``--resume``, the checkpoint it continues from."""

    def __init__(self, cfg: RunConfig, parallel: Parallel, data_sha256: str):
        self.cfg, self.par, self.data_sha256 = cfg, parallel, data_sha256
        self.log: list = []
        self.evals: dict = {}
        self.eval_curve: list = []  # held-out evals during each fine-tune (the comparison's curves)
        self.global_step = 0
        self.phase_tokens, self.phase_seconds = 0, 0.0
        self.resume_path: Path | None = None
        self.resume_state: dict | None = None
        self.ckpt = None
        if cfg.save_every or cfg.resume:
            self.ckpt = Checkpointer(checkpoint_root(cfg), keep_last=cfg.keep_last,
                                     parallel=parallel)

    # ---- resume -------------------------------------------------------------------------------

    def find_resume_point(self) -> None:
        """With ``--resume``: the checkpoint to continue from, its log and eval losses."""
        cfg = self.cfg
        if not cfg.resume:
            return
        if cfg.resume == "latest":
            path = self.ckpt.latest()
        else:
            path = Path(cfg.resume)
            error = self.ckpt.verify_all(path)
            if error is not None:
                raise ResumeError(f"--resume {path}: {error}")
        if path is None:
            if self.par.is_main:
                print(f"--resume: no checkpoint in {self.ckpt.root}; starting from the beginning",
                      flush=True)
            return
        state = self.ckpt.read_trainer_state(path)
        saved, now = state["config"], asdict(cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
        if changed:
            raise ResumeError(f"--resume {path}: the checkpoint was written with other settings: "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed))
        if state["data_sha256"] != self.data_sha256:
            raise ResumeError(f"--resume {path}: the training text differs from the checkpoint's")
        if state["world_size"] != self.par.world_size and self.par.is_main:
            warnings.warn(f"--resume {path}: saved by {state['world_size']} processes, resumed by "
                          f"{self.par.world_size}: the model and optimizer are resharded, but "
                          "the run is no longer bit-identical to an uninterrupted one",
                          RuntimeWarning, stacklevel=2)
        self.resume_path, self.resume_state = path, state
        self.log, self.evals = state["log"], state["evals"]
        self.eval_curve = state.get("eval_curve", [])
        self.global_step = state["global_step"]
        if self.par.is_main:
            print(f"resuming from {path} ({state['phase']} step {state['phase_step']})",
                  flush=True)

    def done(self, phase: str) -> bool:
        """Did the checkpoint we resume from come after ``phase``?"""
        return self.resume_state is not None and \
            PHASES.index(self.resume_state["phase"]) > PHASES.index(phase)

    def restore(self, phase: str, wrapped, opt, sched, controller) -> int:
        """Load the checkpoint into this phase's model, optimizer, scheduler and RNG; returns
        the step to continue from (0 when the checkpoint is not of this phase)."""
        state = self.resume_state
        if state is None or state["phase"] != phase:
            return 0
        app = self.par.model_state(wrapped, opt)
        self.ckpt.load_app_state(self.resume_path, app)
        self.par.load_model_state(wrapped, opt, app)
        sched.load_state_dict(state["scheduler"])
        if controller is not None and state["controller"] is not None:
            controller.target_load = state["controller"]["target_load"]
            controller.rate = state["controller"]["rate"]
        rng = self.ckpt.read_rank_state(self.resume_path)
        if rng is not None:
            set_rng_state(rng, self.par.device)
        return state["phase_step"]

    # ---- the demo's base model, the control's starting point ----------------------------------

    def save_base(self, model) -> None:
        """With checkpoints, keep the trained base model (``BASE_SNAPSHOT``): a run resumed after
        the base phase starts the control and the conversion from it. Rank 0 writes (every rank
        holds the whole base model: its phase is data parallel only)."""
        if self.ckpt is None or not self.par.is_main:
            return
        self.ckpt.root.mkdir(parents=True, exist_ok=True)
        path = self.ckpt.root / BASE_SNAPSHOT
        tmp = path.with_name(path.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)

    def load_base(self, model) -> None:
        """The base weights into ``model`` when the base phase was done before a resume."""
        path = self.ckpt.root / BASE_SNAPSHOT
        if not path.is_file():
            raise ResumeError(f"--resume: {path} is missing (the trained base model the control "
                              "and the conversion start from)")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ---- save ---------------------------------------------------------------------------------

    def maybe_save(self, phase: str, phase_step: int, wrapped, opt, sched, schedule,
                   controller) -> None:
        every = self.cfg.save_every
        if not every or self.global_step % every:
            return
        trainer = {
            "phase": phase, "phase_step": phase_step, "global_step": self.global_step,
            "scheduler": sched.state_dict(),
            "alpha_schedule": asdict(schedule) if schedule is not None else None,
            "controller": ({"target_load": controller.target_load, "rate": controller.rate}
                           if controller is not None else None),
            "log": self.log, "evals": self.evals, "eval_curve": self.eval_curve,
            "config": asdict(self.cfg),
            "data_sha256": self.data_sha256,
        }
        self.ckpt.save(self.global_step, self.par.model_state(wrapped, opt), trainer,
                       rng_state(self.par.device))


def train_phase(model, batches: list[torch.Tensor], *, lr: float, schedule: AlphaSchedule | None,
                steps_per_epoch: int, phase: str, run: RunState, aux: bool,
                controller: LoadController | None = None,
                data_parallel_only: bool = False, eval_data: torch.Tensor | None = None,
                eval_every: int = 0, initial_eval: tuple[float, float] | None = None):
    """One optimizer step per global batch; ``schedule(epoch)`` sets ``router_aux_loss_coef``.

    ``model`` is wrapped for the run's ranks (``Parallel.wrap``: DDP, FSDP2, expert parallel);
    each rank trains on its rows of every batch. Returns the wrapped model. The loss is the LM
    loss plus α times the null-aware loss of the global batch; loss, aux loss and per-layer
    loads are averaged over the ranks before they are logged, and the load controller (if any)
    steps every layer's ``null_bias`` from the global loads. With ``--save-every`` a checkpoint
    is written every N steps of the whole run; a resumed run continues where it left off.

    Every step's record carries the phase's training seconds so far (evals left out) and its
    expert FLOPs so far (forward + backward, from the per-layer loads). With ``eval_data`` the
    held-out loss is measured every ``eval_every`` steps and after the last one (and
    ``initial_eval``, the model's loss and load before the phase, is its step-0 point); the points
    go to ``run.eval_curve``.
    """
    par, cfg = run.par, run.cfg
    wrapped = par.wrap(model, data_parallel_only=data_parallel_only)
    base = par.unwrap(wrapped)
    layers = adamoe_layers(base)
    info = base.config.adamoe
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = len(batches)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    start = run.restore(phase, wrapped, opt, sched, controller)
    bar = _progress(total, phase, cfg.progress and par.is_main, initial=start)
    wrapped.train()
    expert_flops_per_token_load = 3 * _expert_flops_per_token_load(base.config)  # fwd + bwd
    done = [r for r in run.log if r["phase"] == phase]
    train_s0, flops = (done[-1]["train_s"], done[-1]["expert_flops"]) if done else (0.0, 0.0)
    if eval_data is not None and start == 0 and initial_eval is not None:
        run.eval_curve.append({"phase": phase, "step": 0, "eval_loss": initial_eval[0],
                               "eval_load": initial_eval[1], "train_s": 0.0, "expert_flops": 0.0})
    tokens, t0, eval_s = 0, time.perf_counter(), 0.0
    for step in range(start, total):
        epoch = step // steps_per_epoch
        alpha = schedule(epoch) if schedule is not None else getattr(
            base, "router_aux_loss_coef", 0.0)
        base.router_aux_loss_coef = alpha
        x = par.shard(batches[step])
        out = wrapped(input_ids=x, labels=x, output_router_logits=False)
        aux_loss = par.aux_loss(tuple(layer.last_router_logits for layer in layers),
                                info["top_k"], info["num_experts"]) if aux else None
        loss = out.loss + alpha * aux_loss if aux else out.loss
        loss.backward()
        par.finish_backward()
        par.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=loss.device)
        stats = par.mean(torch.stack([loss.detach(), out.loss.detach(),
                                      aux_loss.detach() if aux else zero,
                                      *[layer.last_load.float().to(loss.device)
                                        for layer in layers]]))
        if controller is not None:
            par.set_loads(layers, stats[3:])
            controller.update(base)
        values = stats.tolist()
        tokens += batches[step].numel()
        flops += batches[step].numel() * sum(values[3:]) * expert_flops_per_token_load
        elapsed = time.perf_counter() - t0 - eval_s
        rec = {"phase": phase, "step": step, "epoch": epoch, "loss": values[0],
               "lm_loss": values[1], "aux_loss": values[2], "alpha": alpha, "load": values[3:],
               "tokens_per_s": tokens / elapsed, "train_s": train_s0 + elapsed,
               "expert_flops": flops}
        if controller is not None:
            rec["null_bias"] = [float(layer.null_bias) for layer in layers]
        run.log.append(rec)
        run.global_step += 1
        if bar is not None:
            loads = values[3:]
            bar.set_postfix(loss=f"{values[1]:.3f}", load=f"{sum(loads) / len(loads):.2f}",
                            tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
        if eval_data is not None and ((step + 1) % eval_every == 0 or step + 1 == total):
            t_eval = time.perf_counter()
            loss_eval, load_eval = evaluate(wrapped, eval_data, cfg.batch_size, par)
            run.eval_curve.append({"phase": phase, "step": step + 1, "eval_loss": loss_eval,
                                   "eval_load": load_eval, "train_s": rec["train_s"],
                                   "expert_flops": flops})
            eval_s += time.perf_counter() - t_eval
        run.maybe_save(phase, step + 1, wrapped, opt, sched, schedule, controller)
    if bar is not None:
        bar.close()
    run.phase_tokens, run.phase_seconds = tokens, time.perf_counter() - t0 - eval_s
    return wrapped


def _expert_flops_per_token_load(config) -> float:
    """Forward FLOPs of one routed expert on one token in one layer (``2 * 3 H I``)."""
    every_layer = (forward_flops_per_token(config, 1.0, 0, 0)
                   - forward_flops_per_token(config, 0.0, 0, 0))
    return every_layer / config.num_hidden_layers


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

def checkpoint_root(cfg: RunConfig) -> str:
    return cfg.checkpoint_dir or os.path.join(cfg.out, "checkpoints")


def run(cfg: RunConfig) -> dict:
    """The whole run (a collective under torchrun: every rank calls it); returns the summary.

    Under torchrun every worker ends when its launcher dies (``watch_launcher``), and with
    checkpoints rank 0 holds the checkpoint folder's lock (``CheckpointLock``) for the whole run,
    taken before any work: a second run on the folder fails at once, naming the holder."""
    watch_launcher()
    lock = None
    rank = (torch.distributed.get_rank() if torch.distributed.is_initialized()
            else int(os.environ.get("RANK", "0")))
    if (cfg.save_every or cfg.resume) and rank == 0:
        lock = CheckpointLock(checkpoint_root(cfg)).acquire()
    try:
        par = Parallel.setup(fsdp=cfg.fsdp, expert_parallel=cfg.expert_parallel,
                             device=cfg.device)
        try:
            return _run(cfg, par)
        finally:
            par.close()
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, par: Parallel) -> dict:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    par.check_batch(cfg.batch_size, "--batch-size")
    par.check_batch(cfg.eval_windows, "--eval-windows")
    if par.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    text = builtin_text() if cfg.text is None else open(cfg.text, encoding="utf-8").read()

    if cfg.model is None:
        tokenizer = ByteTokenizer()
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    else:
        model, tokenizer, kind, control = load_user_model(cfg)
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)
    run_state = RunState(cfg, par, hashlib.sha256(ids.numpy().tobytes()).hexdigest())
    run_state.find_resume_point()
    evals = run_state.evals

    if cfg.model is None:
        # base model on the first 60% of the docs, fine-tune on the rest (last 10% held out)
        cut = int(ids.numel() * 0.6)
        base_ids, ft_ids = ids[:cut], ids[cut:]
        model = tiny_mixtral(cfg, tokenizer.vocab_size).to(par.device)
        description = (f"tiny Mixtral (H={cfg.hidden_size}, layers={cfg.num_layers}, "
                       f"I={cfg.intermediate_size}, n={cfg.num_experts}, top-2, byte vocab)")
        kind = "moe"
        held = int(ft_ids.numel() * 0.9)
        ft_train, ft_eval = ft_ids[:held], ft_ids[held:]
        eval_data = windows(ft_eval, cfg.seq_len, cfg.eval_windows, gen, contiguous=True)
        # 1) the stand-in for a pretrained MoE: plain top-2 (m = 0 runs exactly like transformers),
        #    data parallel whatever the flags (it is converted afterwards)
        convert_model(model, 0, 2, backend=cfg.backend)
        base_batches = [windows(base_ids, cfg.seq_len, cfg.batch_size, gen)
                        for _ in range(cfg.base_steps)]
        if not run_state.done("base"):
            wrapped = train_phase(model, base_batches, lr=cfg.base_lr, schedule=None,
                                  steps_per_epoch=max(cfg.base_steps, 1), phase="base",
                                  run=run_state, aux=True, data_parallel_only=True)
            model = par.unwrap(wrapped)
            del wrapped  # its DDP hooks go with it
            run_state.save_base(model)
        elif run_state.resume_state["phase"] != "finetune":
            # the control and the conversion start from it (a checkpoint of AdaMoE's fine-tune
            # holds the converted model itself)
            run_state.load_base(model)
        if "base_top2" not in evals:
            evals["base_top2"], _ = evaluate(model, eval_data, cfg.batch_size, par)
        control = copy.deepcopy(model) if cfg.control else None
        control_eval = (evals["base_top2"], 2.0)
        # 2) AdaMoE: m null experts, top-k over n+m, router rows copied (paper §4.2.1)
        convert_model(model, cfg.num_null_experts, cfg.top_k, cfg.normalize,
                      backend=cfg.backend)
    else:
        model = model.to(par.device)
        control_eval = None
        description = f"{type(model).__name__} from {cfg.model}"
        held = int(ids.numel() * 0.9)
        ft_train, ft_eval = ids[:held], ids[held:]
        eval_data = windows(ft_eval, cfg.seq_len, cfg.eval_windows, gen, contiguous=True)

    info = model.config.adamoe
    if "before" not in evals:
        evals["before"], evals["load_before"] = evaluate(model, eval_data, cfg.batch_size, par)
    sample = windows(ft_train, cfg.seq_len, cfg.steps_per_epoch * cfg.batch_size, gen)
    ft_batches = []
    for _ in range(cfg.epochs):
        order = torch.randperm(sample.shape[0], generator=gen)
        ft_batches += [sample[order[i:i + cfg.batch_size]]
                       for i in range(0, sample.shape[0], cfg.batch_size)]
    eval_every = cfg.eval_every or max(1, len(ft_batches) // 8)
    if control is not None:  # the top-2 model fine-tuned on the same batches, evaluated alike
        if not run_state.done("baseline_top2"):
            control = control.to(par.device)
            if control_eval is None:
                control_eval = evaluate(control, eval_data, cfg.batch_size, par)
            wrapped = train_phase(control, ft_batches, lr=cfg.lr, schedule=AlphaSchedule(),
                                  steps_per_epoch=cfg.steps_per_epoch, phase="baseline_top2",
                                  run=run_state, aux=True, eval_data=eval_data,
                                  eval_every=eval_every, initial_eval=control_eval)
            del wrapped
        del control
        evals["top2_finetuned"] = comparison.curve(run_state.eval_curve,
                                                   comparison.CONTROL)[-1]["eval_loss"]
    controller = (LoadController(cfg.target_load, cfg.load_rate)
                  if cfg.target_load is not None else None)
    wrapped = train_phase(model, ft_batches, lr=cfg.lr, schedule=AlphaSchedule(),
                          steps_per_epoch=cfg.steps_per_epoch, phase="finetune", run=run_state,
                          aux=True, controller=controller, eval_data=eval_data,
                          eval_every=eval_every,
                          initial_eval=(evals["before"], evals.get("load_before", 2.0)))
    ft_tokens, ft_seconds = run_state.phase_tokens, run_state.phase_seconds
    last = comparison.curve(run_state.eval_curve, comparison.ADAMOE)[-1]
    evals["after"], load_after = last["eval_loss"], last["eval_load"]
    log = run_state.log
    ft_log = [r for r in log if r["phase"] == "finetune"]
    final_load = ft_log[-1]["load"] if ft_log else []

    # FLOPs vs the top-2 model (MoE models; Mo-LoRA experts add negligible FLOPs)
    n, m, k = info["num_experts"], info["num_null_experts"], info["top_k"]
    flops_curve = []
    if kind == "moe":
        f_top2 = forward_flops_per_token(model.config, 2.0, n, cfg.seq_len)
        for r in ft_log:
            L = sum(r["load"]) / len(r["load"])
            f = forward_flops_per_token(model.config, L, n + m, cfg.seq_len)
            flops_curve.append({"step": r["step"], "load": L,
                                "experts_pct": 100 * (1 - L / 2.0),
                                "model_pct": 100 * (1 - f / f_top2)})
    load_before = evals.pop("load_before", None)  # kept in evals for the checkpoints
    summary = {
        "model": description,
        "adamoe": info,
        "backend": resolve_backend(cfg.backend, par.device),
        "device": str(par.device),
        "parallel": {"strategy": par.strategy, "world_size": par.world_size},
        "resumed_from": str(run_state.resume_path) if run_state.resume_path else None,
        "eval_loss": evals,
        "eval_load_before": load_before,
        "eval_load_after": load_after,
        "final_train_load_per_layer": final_load,
        "flops_saved_vs_top2_pct": ({
            "experts": 100 * (1 - load_after / 2.0),
            "whole_model": 100 * (1 - forward_flops_per_token(model.config, load_after, n + m,
                                                              cfg.seq_len)
                                  / forward_flops_per_token(model.config, 2.0, n,
                                                            cfg.seq_len))}
            if kind == "moe" else None),
        "finetune_tokens_per_s": ft_tokens / ft_seconds if ft_tokens and ft_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
        "comparison": comparison.compare(run_state.eval_curve, log,
                                         cfg.batch_size * cfg.seq_len),
    }
    plots = []
    if cfg.plots and par.is_main:
        plots = write_plots(cfg.out, log, evals, flops_curve, k)
        compared = comparison.plot(os.path.join(cfg.out, "vs_control.png"), run_state.eval_curve)
        plots += [compared] if compared else []
    summary["plots"] = plots
    if cfg.save_model:
        par.save_pretrained(wrapped, os.path.join(cfg.out, "model"))
        summary["saved_model"] = os.path.join(cfg.out, "model")
    summary["log"] = os.path.join(cfg.out, "log.json")
    if par.is_main:
        with open(summary["log"], "w") as f:
            json.dump({"config": asdict(cfg), "summary": summary, "steps": log,
                       "eval_curve": run_state.eval_curve}, f, indent=1)
        print_summary(summary, k)
    return summary


def print_summary(s: dict, k: int) -> None:
    ev, info = s["eval_loss"], s["adamoe"]
    total = info["num_experts"] + info["num_null_experts"]
    lines = ["", "AdaMoE fine-tune summary", f"  model      : {s['model']}",
             f"  adamoe     : m={info['num_null_experts']} null experts, top-{info['top_k']} of "
             f"n+m={total}, normalize={info['normalize']!r}, backend={s['backend']}"]
    par = s.get("parallel") or {}
    if par.get("world_size", 1) > 1 or par.get("strategy", "single") != "single":
        lines.append(f"  parallel   : {par['strategy']} over {par['world_size']} processes "
                     f"({s['device']})")
    if s.get("resumed_from"):
        lines.append(f"  resumed    : from {s['resumed_from']}")
    if "base_top2" in ev:
        lines.append(f"  eval loss  : base top-2 {ev['base_top2']:.4f}")
    lines.append(f"  eval loss  : before fine-tune {ev['before']:.4f} -> after {ev['after']:.4f}")
    lines.append(f"  load       : eval {s['eval_load_before']:.3f} -> {s['eval_load_after']:.3f} "
                 f"(k = {k}, top-2 = 2.00); last train step per layer "
                 f"[{', '.join(f'{x:.2f}' for x in s['final_train_load_per_layer'])}]")
    if s["flops_saved_vs_top2_pct"] is not None:
        fl = s["flops_saved_vs_top2_pct"]
        lines.append(f"  FLOPs saved vs top-2: experts {fl['experts']:.1f}%, whole model "
                     f"{fl['whole_model']:.1f}%")
    if s["finetune_tokens_per_s"] is not None:
        lines.append(f"  speed      : {s['finetune_tokens_per_s']:.0f} tokens/s fine-tuning, "
                     f"{s['wall_seconds']:.0f} s in all ({s['torch_threads']} threads)")
    elif s["resumed_from"]:
        lines.append("  speed      : nothing left to train: resumed from the final checkpoint")
    if s.get("comparison"):
        lines += comparison.summary_lines(s["comparison"])
    lines.append(f"  log        : {s['log']}")
    if s["plots"]:
        lines.append(f"  plots      : {', '.join(s['plots'])}")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ResumeError, CheckpointError) as err:
        print(f"adamoe-finetune: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
