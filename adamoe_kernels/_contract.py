"""The contract every public function and the oracle share: ``Routing`` and the input checks.

The public API (``routing``, ``moe``, ``lora``, ``losses``) and the oracle (``reference``) both
import this module and nothing of each other's internals, so neither depends on the other to know
what a valid input is.

Metadata checks (types, ranks, shapes, dtypes, devices, ``top_k``) are free and always on.
The non-finite check reads the data: it runs on CPU tensors, on CUDA only when asked
(``ADAMOE_DEBUG=1`` or ``check_finite=True``), and never while ``torch.compile`` traces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORMALIZE_MODES = ("true", "all", "none")
NULL_KINDS = ("zero", "identity")
MAX_LORA_RANK = 256


@dataclass
class Routing:
    """Where each token goes, grouped by true expert. Produced by ``route``; consumed by ``moe_mlp``.

    Attributes:
        topk_ids:       int32   [T, k]    expert ids in ``[0, n+m)``, by descending probability.
        topk_weights:   float32 [T, k]    routing weights (0 on null slots for ``normalize="true"``);
                                          differentiable w.r.t. the router logits.
        expert_counts:  int32   [n]       true assignments per true expert.
        expert_offsets: int32   [n+1]     exclusive prefix sum of ``expert_counts``.
        sorted_slots:   int32   [T*k]     flat slot ids ``t*k+j``: the first ``expert_offsets[-1]``
                                          are the true slots grouped by expert (expert 0 first), in
                                          slot order within an expert; the null slots follow, also in
                                          slot order (so the whole tensor is a permutation).
        normalize:      str               the ``normalize`` mode the weights were made with.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    normalize: str = "true"

    @property
    def num_experts(self) -> int:
        """``n``, the number of true experts."""
        return self.expert_counts.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    def load(self) -> torch.Tensor:
        """The load L: mean number of true experts per token (a 0-d float tensor, no host sync)."""
        T = max(self.topk_ids.shape[0], 1)
        return self.expert_offsets[-1].float() / T


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def debug_checks_enabled() -> bool:
    return os.environ.get("ADAMOE_DEBUG", "0") not in ("", "0", "false", "False")


def check_tensor(name: str, x, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (it holds no data); adamoe_kernels needs CPU "
                         "or CUDA tensors")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {x.dtype}; supported: {names}")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_finite(name: str, x: torch.Tensor, force: bool = False) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (see the module docstring for when it runs)."""
    if _is_compiling():
        return
    if x.device.type != "cpu" and not (force or debug_checks_enabled()):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_top_p(top_p) -> None:
    """``top_p``: ``None`` (plain top-k) or a float in ``(0, 1]``."""
    if top_p is None:
        return
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float in (0, 1] or None, got {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None to turn top-p off), got {top_p}")


def check_route_values(router_logits, selection_bias=None, check_finite_values=None) -> None:
    """No NaN/Inf in the logits or the selection bias (when ``check_finite`` says it runs)."""
    if selection_bias is not None:
        check_finite("selection_bias", selection_bias, force=bool(check_finite_values))
    check_finite("router_logits", router_logits, force=bool(check_finite_values))


def check_route_args(router_logits, top_k, num_experts, normalize, check_finite_values=None, *,
                     top_p=None, selection_bias=None, check_values=True) -> None:
    """The arguments of ``route``; ``check_values=False`` leaves the data check
    (``check_route_values``) to the caller (the C++ ``route_cpu`` does it in its own pass)."""
    check_tensor("router_logits", router_logits, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
    total = router_logits.shape[1]
    check_int("num_experts", num_experts, 1, None)
    if num_experts > total:
        raise ValueError(
            f"num_experts ({num_experts}) must be <= router_logits.shape[1] (n+m = {total})"
        )
    check_int("top_k", top_k, 1, None)
    if top_k > total:
        raise ValueError(f"top_k ({top_k}) must be <= n+m = router_logits.shape[1] ({total})")
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_top_p(top_p)
    if selection_bias is not None:
        check_tensor("selection_bias", selection_bias, ndim=1, dtypes=SUPPORTED_FLOAT_DTYPES)
        if selection_bias.shape[0] != total:
            raise ValueError(f"selection_bias must have n+m = {total} entries, got "
                             f"{selection_bias.shape[0]}")
        check_same_device("selection_bias", selection_bias, "router_logits", router_logits)
    if check_values:
        check_route_values(router_logits, selection_bias, check_finite_values)


def check_layer_args(num_experts, num_null_experts, top_k, normalize, null_kind="zero") -> None:
    """The routing settings of an AdaMoE layer: ``n >= 1``, ``m >= 0``, ``1 <= k <= n+m``, the
    ``normalize`` and ``null_kind`` modes, and no ``"identity"`` nulls with ``normalize="true"``."""
    check_int("num_experts", num_experts, 1)
    check_int("num_null_experts", num_null_experts, 0)
    check_int("top_k", top_k, 1, num_experts + num_null_experts)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_choice("null_kind", null_kind, NULL_KINDS)
    if null_kind == "identity" and normalize == "true":
        raise ValueError('null_kind="identity" needs normalize="all" or "none": '
                         'normalize="true" gives null slots weight 0')


def check_moe_mlp_args(hidden, gate_up_proj, down_proj, routing, null_kind) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("down_proj", down_proj, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but hidden has dtype {hidden.dtype}")
        check_same_device(name, w, "hidden", hidden)
    T, H = hidden.shape
    n, two_i, h_in = gate_up_proj.shape
    if h_in != H:
        raise ValueError(f"gate_up_proj.shape[2] ({h_in}) must equal hidden.shape[1] ({H})")
    if two_i % 2 != 0 or two_i == 0:
        raise ValueError(f"gate_up_proj.shape[1] must be 2*I (even, > 0), got {two_i}")
    I = two_i // 2
    if tuple(down_proj.shape) != (n, H, I):
        raise ValueError(
            f"down_proj must have shape (n, H, I) = {(n, H, I)}, got {tuple(down_proj.shape)}"
        )
    check_choice("null_kind", null_kind, NULL_KINDS)
    check_routing(routing, T, n)
    check_same_device("routing.topk_ids", routing.topk_ids, "hidden", hidden)
    if null_kind == "identity" and routing.normalize == "true":
        raise ValueError(
            'null_kind="identity" needs routing normalized with normalize="all" or "none": '
            'normalize="true" gives null slots weight 0'
        )


def check_routing(routing, num_tokens: int, num_experts: int) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be an adamoe_kernels.Routing, got {type(routing).__name__}")
    ids, w = routing.topk_ids, routing.topk_weights
    check_tensor("routing.topk_ids", ids, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("routing.topk_weights", w, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
    if ids.shape[0] != num_tokens:
        raise ValueError(
            f"routing.topk_ids has {ids.shape[0]} tokens but hidden has {num_tokens} rows"
        )
    if tuple(w.shape) != tuple(ids.shape):
        raise ValueError(
            f"routing.topk_weights shape {tuple(w.shape)} != routing.topk_ids shape {tuple(ids.shape)}"
        )
    k = ids.shape[1]
    expected = {
        "routing.expert_counts": (routing.expert_counts, (num_experts,)),
        "routing.expert_offsets": (routing.expert_offsets, (num_experts + 1,)),
        "routing.sorted_slots": (routing.sorted_slots, (num_tokens * k,)),
    }
    for name, (t, shape) in expected.items():
        check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64))
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (n = gate_up_proj.shape[0] = {num_experts} true "
                f"experts, T*k = {num_tokens * k}), got {tuple(t.shape)}"
            )
    device = ids.device
    for name, t in (("routing.topk_ids", ids), ("routing.topk_weights", w),
                    ("routing.expert_offsets", routing.expert_offsets),
                    ("routing.sorted_slots", routing.sorted_slots)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but routing.topk_ids is on {ids.device}")



def check_routing_values(routing: Routing, force: bool = False) -> None:
    """Check that a ``Routing``'s tensors agree with each other (reads the data).

    ``topk_ids >= 0``; ``expert_counts`` counts the true slots (ids ``< n``) per expert;
    ``expert_offsets`` is its exclusive prefix sum; ``sorted_slots`` is a permutation of
    ``[0, T*k)`` whose first ``expert_offsets[n]`` entries are the true slots, each inside its
    expert's segment, and whose tail is the null slots, in slot order inside each segment. ``route`` always returns such a Routing;
    this catches one built or edited by hand before a kernel indexes with it. Runs on CPU
    tensors, on CUDA only when asked (``ADAMOE_DEBUG=1`` or ``force``: a host sync), never
    while ``torch.compile`` traces.
    """
    if _is_compiling():
        return
    ids = routing.topk_ids
    if ids.device.type != "cpu" and not (force or debug_checks_enabled()):
        return
    n = routing.expert_counts.shape[0]
    flat = ids.reshape(-1).long()
    num_slots = flat.numel()
    if num_slots and int(flat.min()) < 0:
        raise ValueError("routing.topk_ids holds a negative expert id")
    is_true = flat < n
    counts = torch.bincount(torch.where(is_true, flat, n), minlength=n + 1)[:n]
    if not torch.equal(routing.expert_counts.long(), counts):
        raise ValueError("routing.expert_counts does not count the true slots of routing.topk_ids "
                         "per expert (make the Routing with adamoe_kernels.route)")
    offsets = torch.zeros(n + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    if not torch.equal(routing.expert_offsets.long(), offsets):
        raise ValueError("routing.expert_offsets must be the exclusive prefix sum of "
                         "routing.expert_counts, starting at 0")
    slots = routing.sorted_slots.long()
    if num_slots and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
        raise ValueError(f"routing.sorted_slots entries must be flat slot ids in [0, T*k = "
                         f"{num_slots})")
    if not bool((torch.bincount(slots, minlength=num_slots) == 1).all()):
        raise ValueError("routing.sorted_slots must hold every flat slot id exactly once (a "
                         "permutation of [0, T*k)); it repeats or misses one")
    # Position p of sorted_slots lies in the segment of expert `segment[p]` (n: the null tail).
    segment = torch.repeat_interleave(torch.arange(n + 1, device=ids.device),
                                      torch.cat([counts, (~is_true).sum().reshape(1)]))
    slot_group = torch.where(is_true, flat, n)[slots]
    if not torch.equal(slot_group, segment):
        raise ValueError("routing.sorted_slots must list the true slots grouped by expert "
                         "(expert 0 first, each inside its expert_offsets segment), then the null "
                         "slots (make the Routing with adamoe_kernels.route)")
    if not bool(((slots[1:] > slots[:-1]) | (segment[1:] != segment[:-1])).all()):
        raise ValueError("routing.sorted_slots must keep slot order inside each expert's segment "
                         "(and in the null tail), as route's stable counting sort does")


def check_moe_lora_args(x, lora_A, lora_B, routing, scaling) -> None:
    """Metadata checks of ``moe_lora`` (free, always on): types, shapes, dtypes, devices, routing."""
    check_tensor("x", x, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("lora_A", lora_A, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("lora_B", lora_B, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    for name, w in (("lora_A", lora_A), ("lora_B", lora_B)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
        check_same_device(name, w, "x", x)
    T, in_f = x.shape
    n, r, a_in = lora_A.shape
    if n < 1:
        raise ValueError(f"lora_A must hold at least one expert (shape[0] >= 1), got {n}")
    if r < 1 or r > MAX_LORA_RANK:
        raise ValueError(f"lora_A.shape[1] is the rank r, must be in [1, {MAX_LORA_RANK}], got {r}")
    if a_in != in_f:
        raise ValueError(f"lora_A.shape[2] ({a_in}) must equal x.shape[1] ({in_f})")
    if lora_B.shape[0] != n or lora_B.shape[2] != r or lora_B.shape[1] < 1:
        raise ValueError(
            f"lora_B must have shape (n, out, r) = ({n}, out, {r}) with out >= 1, "
            f"got {tuple(lora_B.shape)}"
        )
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    if scaling != scaling or scaling in (float("inf"), float("-inf")):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be an adamoe_kernels.Routing, got {type(routing).__name__}")
    if isinstance(routing.expert_counts, torch.Tensor) and routing.expert_counts.dim() == 1 \
            and routing.expert_counts.shape[0] != n:
        raise ValueError(
            f"routing has {routing.expert_counts.shape[0]} true experts (routing.expert_counts) "
            f"but lora_A has n = {n}"
        )
    if isinstance(routing.topk_ids, torch.Tensor) and routing.topk_ids.dim() == 2 \
            and routing.topk_ids.shape[0] != T:
        raise ValueError(
            f"routing.topk_ids has {routing.topk_ids.shape[0]} tokens but x has {T} rows"
        )
    check_routing(routing, T, n)
    check_same_device("routing.topk_ids", routing.topk_ids, "x", x)
