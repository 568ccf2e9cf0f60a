"""Expert parallelism that never sends a null: ``ExpertParallelMoE``.

The ``n`` true experts are sharded over the ``W`` ranks of a process group in contiguous blocks
(rank ``r`` owns experts ``r*n/W .. (r+1)*n/W - 1``); the router (``H -> n+m``) is replicated.
One forward on ``x [T_local, H]``:

1. route locally (``ak.route``): ``sorted_slots[:A]`` lists this rank's ``A`` true assignments
   grouped by expert, hence by destination rank (null slots are never in it);
2. all-to-all of the per-expert counts ``expert_counts.view(W, n/W)`` (``n/W`` ints per peer);
3. the one host sync of the layer: a single ``.tolist()`` of the per-rank row totals sent and
   received, because ``all_to_all_single`` takes its split sizes as host ints;
4. all-to-all of the ``A`` token rows ``x[sorted_slots[:A] // k]`` (rows arrive grouped by source
   rank, then by expert);
5. the local experts run ``ak.moe_mlp`` on the received rows with a synthetic top-1, weight-1
   routing (its grouping comes from the received counts, on device), so the package's grouped
   kernels (triton / cpu / torch) do the GEMMs;
6. the reverse all-to-all returns the expert outputs in ``sorted_slots[:A]`` order;
7. combine on the source rank with the routing weights, deterministically (``combine``: on CPU a
   serial ``index_add`` of the ``A`` weighted rows; elsewhere a ``[T*k, H]`` slot buffer reduced
   over ``j`` by a batched matmul, no atomics).

Bytes on the wire are proportional to the true assignments, so they fall with the load ``L``.
The backward mirrors the two row all-to-alls (a custom ``autograd.Function``): gradients flow to
``x``, the router weight (through ``routing.topk_weights``) and the local expert shards.

Gradient convention: an expert's gradient sums the contributions of every rank's tokens (they
were sent to it), i.e. it is the gradient of the *sum* of the ranks' losses. The replicated router
gets only the local contribution: call ``sync_router_grads()`` (a sum all-reduce) after
``backward`` for the same convention, or average both if you average the losses (DDP averages).

On a converted transformers model (``ak.convert_model``), ``shard_experts(model, group)`` gives
every AdaMoE block the same dispatch (``expert_parallel_mlp``): the block keeps its replicated
router and shared expert, its ``experts.gate_up_proj`` / ``experts.down_proj`` become the local
shard (same parameter names), and ``unshard_experts(model)`` gathers them back (to save the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._contract import (SUPPORTED_FLOAT_DTYPES, Routing, check_int, check_layer_args,
                           check_tensor)
from ..integrations.hf_models import AdaMoESparseMoeBlock
from ..integrations.modules import route_with_null_bias
from ..moe import moe_mlp

__all__ = ["DispatchStats", "ExpertParallelMoE", "ExpertParallelSparseMoeBlock", "combine",
           "expert_parallel_mlp", "sharded_expert_parameters", "shard_experts", "unshard_experts"]


@dataclass
class DispatchStats:
    """What one forward of ``ExpertParallelMoE`` moved, seen from this rank (host ints).

    Attributes:
        slots:         ``T_local * k``: all slots, null ones included (what a null-oblivious
                       dispatcher would have to place).
        true_slots:    ``A``: this rank's true assignments (the only rows that leave ``x``).
        rows_sent:     rows sent to *other* ranks in the dispatch (true assignments of local
                       tokens to remote experts); ``A - rows_sent`` stay on this rank.
        rows_received: rows received from other ranks, returned to them in the combine.
        bytes_sent:    bytes this rank put on the wire in the forward: the counts
                       (``(W-1) * n/W`` ints), the dispatched rows and the returned outputs.
                       The backward sends the same number of rows again (mirrored).
    """

    slots: int
    true_slots: int
    rows_sent: int
    rows_received: int
    bytes_sent: int


def _group_info(group) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """``all_to_all_single`` into a fresh tensor: rows ``in_splits`` out, ``out_splits`` in."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable row all-to-all: the backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _all_to_all(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def combine(outputs: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, *,
            compact: bool) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * out[t*k + j]`` in float32, deterministically.

    ``outputs [A, H]`` are the expert outputs of the true slots ``slots [A]`` (flat ``t*k+j``);
    ``weights [T, k]`` float32. ``compact=True``: weight the ``A`` rows and ``index_add`` them by
    token (work and memory proportional to ``A``; deterministic on CPU, where ``index_add_`` runs
    serially). ``compact=False``: place the rows at their slots in a zeroed ``[T*k, H]`` buffer
    and reduce over ``j`` with one batched matmul (fixed order on every device, no atomics).
    """
    T, k = weights.shape
    H = outputs.shape[1]
    if compact:
        contrib = outputs.float() * weights.reshape(-1)[slots].unsqueeze(1)
        return torch.zeros((T, H), dtype=torch.float32, device=outputs.device).index_add(
            0, slots // k, contrib)
    out = torch.zeros((T * k, H), dtype=torch.float32, device=outputs.device)
    out = out.index_copy(0, slots, outputs.float())
    return torch.bmm(weights.unsqueeze(1), out.view(T, k, H)).squeeze(1)


def expert_parallel_mlp(x: torch.Tensor, routing: Routing, gate_up_proj: torch.Tensor,
                        down_proj: torch.Tensor, *, num_experts: int, group=None,
                        null_kind: str = "zero",
                        backend: str | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """The routed experts of one AdaMoE layer with its true experts sharded over ``group``.

    Args:
        x: ``[T_local, H]`` this rank's tokens.
        routing: their ``Routing`` over ``n + m`` experts (``ak.route``).
        gate_up_proj, down_proj: this rank's shard, ``[n/W, 2I, H]`` and ``[n/W, H, I]``: rank
            ``r`` owns the true experts ``r*n/W .. (r+1)*n/W - 1``.
        num_experts: ``n``.
        group: the process group (``None``: the world group; ``W = 1`` without
            ``torch.distributed``).
        null_kind, backend: as in ``ak.moe_mlp``.

    Returns ``(y [T_local, H] in x's dtype, DispatchStats)``. A collective: every rank of the
    group calls it, forward and backward. Only the true assignments are sent (steps 2-7 of the
    module docstring).
    """
    T, H = x.shape
    k = routing.topk_ids.shape[1]
    W, rank = _group_info(group)
    nl = gate_up_proj.shape[0]
    if nl * W != num_experts:
        raise ValueError(f"gate_up_proj holds {nl} experts; with {W} ranks and num_experts="
                         f"{num_experts} each rank must hold num_experts / W")

    # Counts: this rank's true assignments per expert, as [destination rank, local expert].
    send_counts = routing.expert_counts.view(W, nl)
    if W > 1:
        recv_counts = _all_to_all(send_counts, [1] * W, [1] * W, group)
    else:
        recv_counts = send_counts
    # The one host sync of the layer: all_to_all_single needs its split sizes as host ints.
    splits = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    send_splits, recv_splits = splits[:W], splits[W:]
    A, R = sum(send_splits), sum(recv_splits)

    # Dispatch: only the A true slots, grouped by expert (hence by destination rank).
    slots = routing.sorted_slots[:A].long()
    send_x = x.index_select(0, slots // k)                                       # [A, H]
    recv_x = _AllToAll.apply(send_x, recv_splits, send_splits, group) if W > 1 else send_x
    y_recv = _local_experts(recv_x, recv_counts, R, gate_up_proj, down_proj, backend)  # [R, H]
    y_back = _AllToAll.apply(y_recv, send_splits, recv_splits, group) if W > 1 else y_recv

    w = routing.topk_weights.float()                                             # [T, k]
    y = combine(y_back, slots, w, compact=x.device.type == "cpu")
    if null_kind == "identity":
        null_w = torch.where(routing.topk_ids >= num_experts, w, torch.zeros_like(w))
        y = y + null_w.sum(-1, keepdim=True) * x.float()

    es = x.element_size()
    rows_sent, rows_received = A - send_splits[rank], R - recv_splits[rank]
    stats = DispatchStats(
        slots=T * k, true_slots=A, rows_sent=rows_sent, rows_received=rows_received,
        bytes_sent=(W - 1) * nl * send_counts.element_size() + (rows_sent + rows_received) * H * es)
    return y.to(x.dtype), stats


def _local_experts(rows: torch.Tensor, recv_counts: torch.Tensor, R: int,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   backend: str | None) -> torch.Tensor:
    """The local experts on the received rows ``[R, H]`` (grouped by source, then expert)."""
    if R == 0:
        # Nothing to compute, but keep the output attached to the rows and the weights: the
        # backward all-to-alls are collectives and must run on every rank.
        tie = rows.sum() + gate_up_proj.sum() + down_proj.sum()
        return rows.new_zeros((0, rows.shape[1])) + 0 * tie.to(rows.dtype)
    W, nl = recv_counts.shape
    dev = rows.device
    block_expert = torch.arange(nl, device=dev).repeat(W)                        # [W*nl]
    row_expert = torch.repeat_interleave(block_expert, recv_counts.reshape(-1).long(),
                                         output_size=R)                          # [R]
    counts = recv_counts.sum(0).to(torch.int32)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    local = Routing(topk_ids=row_expert.to(torch.int32).unsqueeze(1),
                    topk_weights=torch.ones((R, 1), dtype=torch.float32, device=dev),
                    expert_counts=counts, expert_offsets=offsets,
                    sorted_slots=torch.argsort(row_expert, stable=True).to(torch.int32),
                    normalize="none")
    return moe_mlp(rows, gate_up_proj, down_proj, local, backend=backend)


class ExpertParallelMoE(nn.Module):
    """AdaMoE layer with its true experts sharded over a process group; null slots never sent.

    Args:
        hidden_size: ``H``.
        intermediate_size: ``I`` (Mixtral layout: ``gate_up_proj [n/W, 2I, H]``,
            ``down_proj [n/W, H, I]`` hold this rank's experts only).
        num_experts: ``n`` true experts; must be divisible by the group size ``W``.
        num_null_experts: ``m`` null experts (``0`` gives plain top-k routing).
        top_k: ``k`` of ``n+m``.
        group: the process group (default: the world group; without an initialised
            ``torch.distributed``, ``W = 1`` and nothing is exchanged).
        normalize, null_kind: as in ``ak.route`` / ``ak.moe_mlp``.
        backend: ``ak`` backend of the routing and the local grouped MLP.
        sync_router: broadcast the router weight from the group's first rank at construction,
            so the replicated router starts identical everywhere (a collective: every rank of the
            group must construct the module).

    Attributes:
        router: ``nn.Linear(H, n+m, bias=False)``, replicated.
        gate_up_proj, down_proj: the local shard of the experts.
        expert_start: global id of this rank's first expert.
        null_bias: 0-d buffer, the load dial of ``ak.load_control`` (selection-only bias on the
            null logits; set per rank).
        top_p: ``None`` or top-p routing over the top-k (``ak.set_top_p``).
        last_load: 0-d buffer, this rank's load ``L`` of the last forward (no host sync).
        last_stats: ``DispatchStats`` of the last forward.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 num_null_experts: int, top_k: int, *, group=None, normalize: str = "true",
                 null_kind: str = "zero", backend: str | None = None, device=None, dtype=None,
                 sync_router: bool = True):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("intermediate_size", intermediate_size, 1)
        check_layer_args(num_experts, num_null_experts, top_k, normalize, null_kind)
        world, rank = _group_info(group)
        if num_experts % world != 0:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the process group "
                             f"size ({world}): experts are sharded in equal contiguous blocks")
        self.group = group
        self.world_size, self.rank = world, rank
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.num_null_experts, self.top_k = num_experts, num_null_experts, top_k
        self.num_local_experts = num_experts // world
        self.expert_start = rank * self.num_local_experts
        self.normalize, self.null_kind, self.backend = normalize, null_kind, backend
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Linear(hidden_size, num_experts + num_null_experts, bias=False, **kw)
        nl = self.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(nl, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(nl, hidden_size, intermediate_size, **kw))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.top_p: float | None = None
        self.register_buffer("null_bias", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("last_load", torch.zeros((), dtype=torch.float32, device=device),
                             persistent=False)
        self.last_stats: DispatchStats | None = None
        if sync_router and world > 1:
            with torch.no_grad():
                src = dist.get_global_rank(group or dist.group.WORLD, 0)
                dist.broadcast(self.router.weight.data, src=src, group=group)

    # ---- construction from a single-process layer ------------------------------------------

    @classmethod
    def from_dense(cls, source, *, top_k: int | None = None, group=None,
                   normalize: str | None = None, null_kind: str | None = None,
                   backend: str | None = None) -> "ExpertParallelMoE":
        """Build the layer from full (unsharded) weights and keep this rank's shard.

        ``source`` is ``(router_weight [n+m, H], gate_up_proj [n, 2I, H], down_proj [n, H, I])``
        or a module holding them: a router (``.router`` or ``.gate``, with a ``.weight``) and the
        experts' ``gate_up_proj``/``down_proj`` on the module or on its ``.experts`` (the HF v5
        Mixtral block layout). ``top_k``, ``normalize``, ``null_kind`` default to the module's
        attributes of those names (also looked up on its router), else ``normalize="true"``,
        ``null_kind="zero"``. Every rank must pass the same weights. ``n`` is
        ``gate_up_proj.shape[0]``, ``m = router_weight.shape[0] - n``.
        """
        if isinstance(source, nn.Module):
            router = getattr(source, "router", None)
            router = getattr(source, "gate", None) if router is None else router
            experts = getattr(source, "experts", None)
            experts = source if experts is None else experts
            router_weight = getattr(router, "weight", router)
            gate_up = getattr(experts, "gate_up_proj", None)
            down = getattr(experts, "down_proj", None)
            if not all(isinstance(t, torch.Tensor) for t in (router_weight, gate_up, down)):
                raise TypeError("source module must hold a router (.router or .gate with .weight) "
                                "and gate_up_proj/down_proj tensors (on it or on .experts)")

            def attr(name, value, default):
                if value is not None:
                    return value
                for holder in (source, router):
                    if getattr(holder, name, None) is not None:
                        return getattr(holder, name)
                return default

            top_k = attr("top_k", top_k, None)
            normalize = attr("normalize", normalize, "true")
            null_kind = attr("null_kind", null_kind, "zero")
            null_bias = getattr(source, "null_bias", None)
        else:
            if not isinstance(source, (tuple, list)) or len(source) != 3:
                raise TypeError("source must be (router_weight, gate_up_proj, down_proj) or an "
                                f"nn.Module, got {type(source).__name__}")
            router_weight, gate_up, down = source
            normalize = normalize or "true"
            null_kind = null_kind or "zero"
            null_bias = None
        if top_k is None:
            raise ValueError("top_k is required (source has no top_k attribute)")
        check_tensor("gate_up_proj", gate_up, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
        check_tensor("down_proj", down, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
        check_tensor("router_weight", router_weight, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
        n, two_i, H = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (n, H, two_i // 2):
            raise ValueError(f"down_proj must have shape (n, H, I) = {(n, H, two_i // 2)} for "
                             f"gate_up_proj of shape {tuple(gate_up.shape)}, got {tuple(down.shape)}")
        if router_weight.shape[1] != H or router_weight.shape[0] < n:
            raise ValueError(f"router_weight must have shape (n+m, H) with n = {n}, H = {H}, got "
                             f"{tuple(router_weight.shape)}")
        layer = cls(H, two_i // 2, n, router_weight.shape[0] - n, top_k, group=group,
                    normalize=normalize, null_kind=null_kind, backend=backend,
                    device=gate_up.device, dtype=gate_up.dtype, sync_router=False)
        lo, hi = layer.expert_start, layer.expert_start + layer.num_local_experts
        with torch.no_grad():
            layer.router.weight.copy_(router_weight)
            layer.gate_up_proj.copy_(gate_up[lo:hi])
            layer.down_proj.copy_(down[lo:hi])
            if isinstance(null_bias, torch.Tensor):
                layer.null_bias.copy_(null_bias.reshape(()))
        if isinstance(source, nn.Module):
            layer.top_p = getattr(source, "top_p", None)
        return layer

    # ---- forward ------------------------------------------------------------------------------

    @property
    def last_rows_sent(self) -> int | None:
        """Rows this rank sent to other ranks in the last forward's dispatch."""
        return None if self.last_stats is None else self.last_stats.rows_sent

    @property
    def last_bytes_sent(self) -> int | None:
        """Bytes this rank sent in the last forward (counts + rows out + outputs back)."""
        return None if self.last_stats is None else self.last_stats.bytes_sent

    def _route(self, x: torch.Tensor) -> Routing:
        # The same load dial and top-p as the single-process layers (ak.load_control).
        return route_with_null_bias(self.router(x), self.top_k, self.num_experts, self.normalize,
                                    self.null_bias, self.backend, top_p=getattr(self, "top_p", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T_local, H]`` -> ``[T_local, H]``; a collective: every rank of the group calls it."""
        check_tensor("x", x, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
        if x.shape[1] != self.hidden_size:
            raise ValueError(f"x.shape[1] ({x.shape[1]}) must equal hidden_size ({self.hidden_size})")
        if x.dtype != self.gate_up_proj.dtype or x.device != self.gate_up_proj.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the layer is "
                            f"{self.gate_up_proj.dtype} on {self.gate_up_proj.device}")
        routing = self._route(x)
        with torch.no_grad():
            self.last_load.copy_(routing.load())
        y, self.last_stats = expert_parallel_mlp(
            x, routing, self.gate_up_proj, self.down_proj, num_experts=self.num_experts,
            group=self.group, null_kind=self.null_kind, backend=self.backend)
        return y

    # ---- training helpers -----------------------------------------------------------------

    @torch.no_grad()
    def sync_router_grads(self, average: bool = False) -> None:
        """All-reduce the replicated router's gradient over the group (sum, or mean).

        With ``average=False`` the router gradient becomes that of the sum of the ranks' losses,
        the convention the expert shards already follow.
        """
        g = self.router.weight.grad
        if g is None or self.world_size == 1:
            return
        dist.all_reduce(g, group=self.group)
        if average:
            g.div_(self.world_size)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts} ({self.num_local_experts} local from "
                f"{self.expert_start}), num_null_experts={self.num_null_experts}, "
                f"top_k={self.top_k}, world_size={self.world_size}, normalize={self.normalize!r}, "
                f"null_kind={self.null_kind!r}")


# ---- expert parallelism on a converted transformers model ----------------------------------------

class ExpertParallelSparseMoeBlock(AdaMoESparseMoeBlock):
    """A converted MoE block (``ak.convert_model``) whose true experts are sharded over a group.

    Made by ``shard_experts`` from an ``AdaMoESparseMoeBlock``: the router (``gate``), the load
    dial, top-p and any shared expert stay replicated; ``experts.gate_up_proj`` /
    ``experts.down_proj`` hold experts ``expert_start .. expert_start + num_local_experts - 1``
    only, and the routed experts run through ``expert_parallel_mlp`` (only true assignments are
    sent). ``last_stats`` is the ``DispatchStats`` of the last forward. Every rank of ``group``
    must run the model together (forward and backward are collectives).
    """

    group = None
    world_size, rank, num_local_experts, expert_start = 1, 0, 0, 0
    last_stats: DispatchStats | None = None

    def _run_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        y, self.last_stats = expert_parallel_mlp(
            x, routing, self.experts.gate_up_proj, self.experts.down_proj,
            num_experts=self.num_experts, group=self.group, null_kind=self.null_kind,
            backend=self.backend)
        return y

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", world_size={self.world_size}, local experts "
                f"{self.expert_start}..{self.expert_start + self.num_local_experts - 1}")


_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def shard_experts(model: nn.Module, group=None) -> nn.Module:
    """Expert parallelism on a model converted by ``ak.convert_model`` (in place; returns it).

    Every ``AdaMoESparseMoeBlock`` becomes an ``ExpertParallelSparseMoeBlock``: rank ``r`` of
    ``group`` (default: the world group) keeps true experts ``r*n/W .. (r+1)*n/W - 1`` of each
    block (``n % W == 0``) and the tokens reach them through the all-to-all of
    ``expert_parallel_mlp``, which sends only the true assignments: null slots never cross the
    wire. Parameter names do not change (``...mlp.experts.gate_up_proj`` is now the local shard);
    everything else stays replicated. Every rank must pass the same full weights (load or seed
    the model identically), and build its optimizer after this call.

    Gradients of the shards follow the convention of ``ExpertParallelMoE``: the sum over every
    rank's tokens. Averaging data parallelism (DDP/FSDP on the replicated rest) divides them by
    ``W`` (``adamoe_kernels.training.parallel`` does). Do not let DDP/FSDP manage the shards:
    pass ``sharded_expert_parameters(model)`` as ignored parameters. With DDP use a group of its
    own for the experts (``dist.new_group()``), so the two never interleave collectives.
    """
    blocks = [mod for mod in model.modules() if isinstance(mod, AdaMoESparseMoeBlock)]
    if not blocks:
        raise ValueError("model has no converted MoE blocks: run ak.convert_model first (dense "
                         "Mo-LoRA models have no experts to shard)")
    if any(isinstance(block, ExpertParallelSparseMoeBlock) for block in blocks):
        raise ValueError("model is already expert parallel (shard_experts was called)")
    world, rank = _group_info(group)
    for block in blocks:
        n = block.num_experts
        if n % world:
            raise ValueError(f"num_experts ({n}) must be divisible by the process group size "
                             f"({world}): experts are sharded in equal contiguous blocks")
    for block in blocks:
        nl = block.num_experts // world
        lo = rank * nl
        for name in _EXPERT_WEIGHTS:
            full = getattr(block.experts, name)
            shard = nn.Parameter(full.detach()[lo:lo + nl].clone(),
                                 requires_grad=full.requires_grad)
            setattr(block.experts, name, shard)
        block.__class__ = ExpertParallelSparseMoeBlock
        block.group, block.world_size, block.rank = group, world, rank
        block.num_local_experts, block.expert_start = nl, lo
        block.last_stats = None
    return model


def sharded_expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: shard}`` of the expert weights ``shard_experts`` split over the ranks."""
    out = {}
    for prefix, mod in model.named_modules():
        if isinstance(mod, ExpertParallelSparseMoeBlock):
            for name in _EXPERT_WEIGHTS:
                out[f"{prefix}.experts.{name}"] = getattr(mod.experts, name)
    return out


@torch.no_grad()
def unshard_experts(model: nn.Module) -> nn.Module:
    """Undo ``shard_experts`` (in place; returns ``model``): gather every block's expert shards
    into full ``[n, ...]`` Parameters on every rank (an all-gather per weight: a collective).
    Afterwards ``save_pretrained`` writes the full model and the blocks run locally again."""
    for mod in list(model.modules()):
        if not isinstance(mod, ExpertParallelSparseMoeBlock):
            continue
        for name in _EXPERT_WEIGHTS:
            shard = getattr(mod.experts, name)
            if mod.world_size > 1:
                parts = [torch.empty_like(shard) for _ in range(mod.world_size)]
                dist.all_gather(parts, shard.detach().contiguous(), group=mod.group)
            else:
                parts = [shard.detach()]
            setattr(mod.experts, name, nn.Parameter(torch.cat(parts),
                                                    requires_grad=shard.requires_grad))
        for attr in ("group", "world_size", "rank", "num_local_experts", "expert_start",
                     "last_stats"):
            mod.__dict__.pop(attr, None)
        mod.__class__ = AdaMoESparseMoeBlock
    return model
