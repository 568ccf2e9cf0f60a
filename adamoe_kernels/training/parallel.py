"""Scale-out for training with torch's own engines: one process, DDP, FSDP2, expert parallelism.

``Parallel.setup()`` reads what ``torchrun`` puts in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and initialises ``torch.distributed`` (NCCL on
CUDA, gloo on CPU), or takes the process group already initialised; without torchrun it is one
process and every method below is the single-process operation. ``wrap(model)`` then applies,
in place where torch does so:

* data parallel: ``DistributedDataParallel`` (gradients averaged in the backward);
* ``fsdp=True``: FSDP2, ``fully_shard`` on every decoder layer (``model._no_split_modules``) and
  on the root, over a 1-D ``DeviceMesh`` of all ranks;
* ``expert_parallel=True``: ``shard_experts`` on a group of its own (every AdaMoE block keeps
  ``n/W`` true experts; only true assignments cross the wire), the rest of the model data
  parallel (DDP, or FSDP2 with ``fsdp=True``) with the expert shards left out of it.

Each rank trains on its rows of the global batch (``shard``). What the loop needs across ranks,
reduced so that a run equals the single-process run on the same global batch:

* ``aux_loss``: the null-aware loss of the *global* batch. ``f`` (the top-k hit fractions) is
  all-reduced; each rank's term is scaled so that the ranks' average (what DDP/FSDP average the
  gradients by) is the global loss and its gradient the global gradient;
* ``mean``: metrics (loss, per-layer load) averaged over ranks (every rank has as many tokens);
* ``set_loads``: the global per-layer load written back into the layers before the load
  controller reads it, so every rank moves its ``null_bias`` alike;
* ``finish_backward``: expert shards' gradients (a sum over all ranks' tokens) divided by ``W``;
* ``clip_grad_norm_``: the norm over all parameters, shards of every rank included.

``model_state`` / ``load_model_state`` give the sharded state of model and optimizer for
``torch.distributed.checkpoint`` (expert shards as ``DTensor`` with ``Shard(0)``, so a
checkpoint reloads on another world size); ``save_pretrained`` gathers a full copy for rank 0.

Lifetime under ``torchrun``: ``watch_launcher()`` makes a worker end when its launcher dies
(torchrun starts the workers in sessions of their own, so a SIGKILL of torchrun, even of its
process group, would leave them running); ``close()`` destroys the process group *and* drops
what keeps torch's gloo group alive past ``destroy_process_group`` (see ``_import_before_init``
and ``_drop_cached_groups``), so no gloo thread is left to be torn down at interpreter exit.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..losses import aux_loss_from_terms, aux_loss_terms, null_aware_aux_loss
from .distributed import shard_experts, sharded_expert_parameters

__all__ = ["Parallel", "resolve_device", "watch_launcher"]

# Set by torchrun (torch.distributed.elastic) in the environment of every worker it starts.
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_watching = False


def watch_launcher(sig: int = signal.SIGTERM) -> bool:
    """Under ``torchrun``: have this worker receive ``sig`` (default SIGTERM, which ends it) as
    soon as its launcher dies. Returns whether a watch is set (``False`` outside torchrun).

    torchrun starts every worker in a session of its own (``start_new_session=True`` in
    ``torch.distributed.elastic``), so a SIGKILL of torchrun, or of its process group, reaches
    no worker: they would train on and keep writing checkpoints. On Linux the kernel delivers
    ``sig`` when the parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread
    watches ``os.getppid()`` every 0.5 s. Idempotent; call it first thing in a worker."""
    global _watching
    if _watching:
        return True
    if LAUNCHER_ENV not in os.environ:
        return False
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            _watching = True
            return True
    parent, stop = os.getppid(), threading.Event()

    def watch():
        while not stop.wait(0.5):
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)
                return

    thread = threading.Thread(target=watch, name="adamoe-launcher-watch", daemon=True)
    thread.start()
    atexit.register(lambda: (stop.set(), thread.join(2.0)))
    _watching = True
    return True


def _import_before_init() -> None:
    """Import ``torch._dynamo`` before the process group exists.

    DDP and FSDP2 import it lazily; imported after ``init_process_group`` it keeps references
    to the default group (torch 2.13) that ``destroy_process_group`` does not drop, so the gloo
    group and its threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) outlive ``close()`` and are
    torn down during interpreter finalization, which now and then aborts a rank at exit with
    "terminate called without an active exception". Imported first, it holds no group."""
    import torch._dynamo  # noqa: F401


def _drop_cached_groups() -> None:
    """Clear DTensor's caches (FSDP2 and the expert shards' DTensors fill them): their entries
    keep device meshes, hence process groups, alive after ``destroy_process_group`` (the same
    exit-time teardown as in ``_import_before_init``). Measured holders (torch 2.13): the
    sharding-propagation cache, ``MeshTopoInfo.build_from_mesh``'s lru_cache, the redistribute
    planner cache and ``_gen_transform_infos``' cache; each is cleared where this torch has it."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        from torch.distributed.tensor import debug

        debug._clear_sharding_prop_cache()
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - other torch
        clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
        if clear is not None:
            clear()
    try:
        from torch.distributed.tensor import _collective_utils, _redistribute
    except ImportError:  # pragma: no cover - other torch
        return
    for clear in (getattr(getattr(_collective_utils, "MeshTopoInfo", None), "build_from_mesh",
                          None),
                  getattr(_redistribute, "_gen_transform_infos", None)):
        if hasattr(clear, "cache_clear"):
            clear.cache_clear()
    planner = getattr(_redistribute, "clear_redistribute_planner_cache", None)
    if planner is not None:
        planner()


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"``: ``cuda:LOCAL_RANK`` if CUDA is available, else CPU; ``"cuda"`` means
    this rank's GPU; anything else as ``torch.device`` reads it."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _launched() -> bool:
    return dist.is_available() and (dist.is_initialized() or
                                    ("RANK" in os.environ and "WORLD_SIZE" in os.environ))


@dataclass
class Parallel:
    """How this process takes part in a run (see the module docstring).

    Attributes:
        world_size, rank, local_rank: of the default process group (1, 0, 0 in one process).
        device: this rank's device.
        fsdp: shard parameters, gradients and optimizer state with FSDP2 (else DDP).
        expert_parallel: shard every AdaMoE block's true experts over ``ep_group``.
        ep_group: the process group of the experts (all ranks, a group of its own).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False
    expert_parallel: bool = False
    ep_group: object = None
    owns_process_group: bool = False
    _experts: dict = field(default_factory=dict, repr=False)
    _mesh: object = field(default=None, repr=False)
    _ep_mesh: object = field(default=None, repr=False)

    @classmethod
    def setup(cls, *, fsdp: bool = False, expert_parallel: bool = False,
              device: str | None = None, timeout_s: float = 1800.0) -> "Parallel":
        """The ``Parallel`` of this process: distributed under ``torchrun`` (or when a process
        group is already initialised; a collective then), else one process."""
        if not _launched():
            if fsdp or expert_parallel:
                raise ValueError("--fsdp and --expert-parallel need torch.distributed: launch "
                                 "with torchrun --nproc-per-node N (see docs/finetune.md)")
            return cls(device=resolve_device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        owns = False
        if not dist.is_initialized():
            _import_before_init()
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=dev if dev.type == "cuda" else None)
            owns = True
        # The experts exchange tokens on a group of their own: DDP's gradient all-reduces run
        # asynchronously on the default group during the same backward.
        ep_group = dist.new_group() if expert_parallel else None
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(),
                   local_rank=local_rank, device=dev, fsdp=fsdp,
                   expert_parallel=expert_parallel, ep_group=ep_group, owns_process_group=owns)

    # ---- basics ---------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.owns_process_group or (
            dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def strategy(self) -> str:
        """``"single"``, ``"ddp"`` or ``"fsdp"``, with ``"+ep"`` for expert parallelism."""
        base = "fsdp" if self.fsdp else ("ddp" if self.distributed else "single")
        return base + ("+ep" if self.expert_parallel else "")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Destroy the process group if ``setup`` created it, with every reference this object
        and torch's caches hold to it, so its threads end here and not at interpreter exit."""
        if self.owns_process_group and dist.is_initialized():
            self._mesh = self._ep_mesh = self.ep_group = None
            self._experts = {}
            _drop_cached_groups()
            gc.collect()  # FSDP2's modules and DTensors sit in reference cycles with the mesh
            dist.destroy_process_group()
            self.owns_process_group = False

    def mesh(self):
        """The 1-D ``DeviceMesh`` of all ranks (FSDP2's)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._mesh

    # ---- data -----------------------------------------------------------------------------

    def check_batch(self, rows: int, what: str = "batch_size") -> None:
        if rows % self.world_size:
            raise ValueError(f"{what} ({rows}) must be divisible by the number of processes "
                             f"({self.world_size}): each rank takes an equal share of the rows")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (equal contiguous blocks), on its device."""
        self.check_batch(batch.shape[0])
        b = batch.shape[0] // self.world_size
        return batch[self.rank * b:(self.rank + 1) * b].to(self.device)

    # ---- the model ------------------------------------------------------------------------

    def wrap(self, model: nn.Module, *, data_parallel_only: bool = False) -> nn.Module:
        """The module to train: ``model`` itself (one process; FSDP2 and expert parallelism
        change it in place) or a ``DistributedDataParallel`` around it. Build the optimizer over
        the returned module's parameters afterwards. ``data_parallel_only``: plain DDP whatever
        the flags say (the demo's top-2 base phase, before the model is converted)."""
        self._experts = {}
        if self.expert_parallel and not data_parallel_only:
            shard_experts(model, self.ep_group)
            self._experts = sharded_expert_parameters(model)
        if not self.distributed:
            return model
        ignored = set(self._experts.values())
        if self.fsdp and not data_parallel_only:
            from torch.distributed.fsdp import fully_shard

            mesh = self.mesh()
            names = set(getattr(model, "_no_split_modules", None) or ())
            for module in [m for m in model.modules() if type(m).__name__ in names]:
                fully_shard(module, mesh=mesh, ignored_params=ignored or None)
            fully_shard(model, mesh=mesh, ignored_params=ignored or None)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self._experts:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(self._experts))
        # The load dial's null_bias buffers are kept equal by the loop (set_loads), not by DDP.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   **no_buffer_sync)

    @staticmethod
    def unwrap(wrapped: nn.Module) -> nn.Module:
        """The model inside a DDP wrapper (FSDP2 and expert parallelism wrap nothing)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        return wrapped.module if isinstance(wrapped, DDP) else wrapped

    # ---- what the ranks reduce --------------------------------------------------------------

    def aux_loss(self, router_logits, top_k: int, num_experts: int) -> torch.Tensor:
        """This rank's part of the null-aware loss of the global batch (paper eq. 6).

        One all-reduce of the hit counts; the mean of the ranks' values is the global loss, and
        the ranks' averaged gradient (what DDP and FSDP2 apply) is its gradient."""
        if not self.distributed:
            return null_aware_aux_loss(router_logits, top_k, num_experts)
        hits, prob_sum, rows = aux_loss_terms(router_logits, top_k, num_experts)
        totals = torch.cat([hits, rows.reshape(1)])
        dist.all_reduce(totals)
        hits, rows = totals[:-1], totals[-1]
        return aux_loss_from_terms(hits, prob_sum * (self.world_size / rows), rows, num_experts)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the ranks (a copy)."""
        values = values.detach().float().clone()
        if self.distributed:
            dist.all_reduce(values)
            values /= self.world_size
        return values

    @torch.no_grad()
    def set_loads(self, layers, loads: torch.Tensor) -> None:
        """Write the global per-layer loads into the layers' ``last_load`` (what
        ``ak.LoadController.update`` reads), so every rank steps its ``null_bias`` alike."""
        for layer, value in zip(layers, loads):
            layer.last_load = value.to(layer.null_bias.device).clone()

    @torch.no_grad()
    def finish_backward(self) -> None:
        """Expert shards' gradients from the sum over all ranks' tokens to the mean."""
        if self.world_size > 1:
            for p in self._experts.values():
                if p.grad is not None:
                    p.grad.div_(self.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: with expert parallelism the
        norm includes every rank's expert shards (one all-reduce)."""
        params = [p for p in params if p.grad is not None]
        if not self._experts or self.world_size == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor, Replicate

        shard_ids = {id(p) for p in self._experts.values()}
        dense = [p for p in params if id(p) not in shard_ids]
        shards = [p for p in params if id(p) in shard_ids]
        dense_norm = torch.nn.utils.get_total_norm([p.grad for p in dense])
        if isinstance(dense_norm, DTensor):
            dense_norm = dense_norm.full_tensor()
        shard_sq = torch.nn.utils.get_total_norm([p.grad for p in shards]).float() ** 2
        dist.all_reduce(shard_sq, group=self.ep_group)
        total = (dense_norm.float() ** 2 + shard_sq).sqrt()
        torch.nn.utils.clip_grads_with_norm_(shards, max_norm, total)
        if any(isinstance(p.grad, DTensor) for p in dense):
            total_d = DTensor.from_local(total, self.mesh(), [Replicate()], run_check=False)
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total_d)
        else:
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
        return total

    # ---- state: checkpoints and the final model -------------------------------------------

    def _expert_dtensor(self, t: torch.Tensor):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._ep_mesh is None:
            self._ep_mesh = DeviceMesh.from_group(self.ep_group, self.device.type)
        return DTensor.from_local(t, self._ep_mesh, [Shard(0)], run_check=False)

    def model_state(self, wrapped: nn.Module, optimizer) -> dict:
        """``{"model": ..., "optim": ...}`` for ``torch.distributed.checkpoint``: each rank's
        shard (FSDP2 DTensors; expert shards wrapped as ``DTensor`` ``Shard(0)`` over the expert
        group), replicated tensors saved once. The tensors share storage with the live ones."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(wrapped, optimizer)
        if self._experts and self.distributed:
            for name, p in self._experts.items():
                model_sd[name] = self._expert_dtensor(model_sd[name])
                entry = optim_sd["state"].get(name)
                if entry is not None:  # a new dict: this one is the optimizer's own
                    optim_sd["state"][name] = {
                        key: self._expert_dtensor(value)
                        if isinstance(value, torch.Tensor) and value.shape == p.shape else value
                        for key, value in entry.items()}
        return {"model": model_sd, "optim": optim_sd}

    def load_model_state(self, wrapped: nn.Module, optimizer, state: dict) -> None:
        """Put what ``torch.distributed.checkpoint.load`` read into ``model_state(...)`` back
        into the model and the optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        from torch.distributed.tensor import DTensor

        model_sd, optim_sd = state["model"], state["optim"]
        if self._experts and self.distributed:
            local = lambda v: v.to_local() if isinstance(v, DTensor) else v  # noqa: E731
            for name in self._experts:
                model_sd[name] = local(model_sd[name])
                if name in optim_sd["state"]:
                    optim_sd["state"][name] = {key: local(value) for key, value
                                               in optim_sd["state"][name].items()}
        set_state_dict(wrapped, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def full_state_dict(self, wrapped: nn.Module) -> dict:
        """The unsharded model state on rank 0 (a collective; other ranks get ``{}``)."""
        model = self.unwrap(wrapped)
        if self.fsdp and self.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
        else:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for name, p in self._experts.items():
            if self.world_size > 1:
                parts = [torch.empty_like(p) for _ in range(self.world_size)]
                dist.all_gather(parts, p.detach().contiguous(), group=self.ep_group)
            else:
                parts = [p.detach()]
            if self.is_main:
                sd[name] = torch.cat(parts).cpu()
        return sd if self.is_main else {}

    def save_pretrained(self, wrapped: nn.Module, path: str) -> None:
        """``save_pretrained`` of the full model by rank 0 (a collective: all ranks call it)."""
        state = self.full_state_dict(wrapped)
        if self.is_main:
            self.unwrap(wrapped).save_pretrained(path, state_dict=state)
        self.barrier()
