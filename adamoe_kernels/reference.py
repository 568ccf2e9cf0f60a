"""The oracle: AdaMoE routing, expert MLP and null-aware loss in plain, obvious PyTorch.

Every kernel in this package is tested against these functions. They favour clarity over speed
(boolean masks, per-expert Python loops, host syncs) and follow ``shared/DESIGN.md`` exactly:

* experts ``0..n-1`` are true, ``n..n+m-1`` are null (cost nothing);
* ``route`` takes the top-k of ``softmax(router_logits.float())`` over all ``n+m`` experts, an
  exact tie going to the lower index (a true expert before a null one);
* ``moe_mlp`` runs only the true assignments, Mixtral layout
  ``E_e(x) = down_e (silu(gate_e x) * up_e x)`` with ``gate, up = (gate_up_proj[e] x).chunk(2)``;
* ``null_aware_aux_loss`` is the paper's eq. 6 (null experts share their mean load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._contract import (Routing, check_moe_lora_args, check_moe_mlp_args, check_route_args,
                        check_tensor)


def topk_lower_index_first(scores: torch.Tensor, top_k: int):
    """``(values, ids)`` of the ``top_k`` largest scores per row, descending; equal scores go to
    the lower index (so an exact tie between a true and a null expert picks the true one).

    ``torch.topk`` leaves the order of ties unspecified; a stable descending sort does not.
    """
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :top_k], ids[:, :top_k]


def normalize_topk(topk_probs: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                   normalize: str, topk_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Routing weights from the top-k probabilities ``[T, k]`` (DESIGN.md, semantics 2).

    ``"true"`` is ``p_j / sum_true p``, computed as a softmax of the selected true logits
    ``topk_logits`` (the softmax normaliser cancels), so it stays finite with a finite gradient
    when every true probability underflows in fp32 (a null logit ~88 above them). A token whose
    top-k is all null gets all-zero weights and a zero gradient.
    """
    if normalize == "none":
        return topk_probs
    if normalize == "all":
        return topk_probs / topk_probs.sum(-1, keepdim=True)
    if topk_logits is None:
        raise ValueError('normalize="true" needs topk_logits (the selected slots\' logits)')
    is_true = topk_ids < num_experts
    any_true = is_true.any(-1, keepdim=True)
    z = torch.where(is_true, topk_logits.float(), torch.full_like(topk_logits, float("-inf")))
    # All-null rows: a finite dummy row (weights masked to 0 below), so neither pass sees -inf - -inf.
    z = torch.where(any_true, z, torch.zeros_like(z))
    return torch.where(is_true, torch.softmax(z, dim=-1), torch.zeros_like(z))


def group_slots(topk_ids: torch.Tensor, num_experts: int):
    """Counting sort of the flat slots ``t*k+j`` by true expert (stable: slot order kept).

    Returns ``(expert_counts [n], expert_offsets [n+1], sorted_slots [T*k])``, all int32. The
    null slots follow the true ones in ``sorted_slots``, in slot order.
    """
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat < num_experts, flat, torch.full_like(flat, num_experts))
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_slots = torch.argsort(key, stable=True)
    return counts.int(), offsets.int(), sorted_slots.int()


def route(router_logits: torch.Tensor, top_k: int, num_experts: int, normalize: str = "true", *,
          top_p: float | None = None, selection_bias: torch.Tensor | None = None) -> Routing:
    """Top-k of ``n+m`` experts, null assignments dropped, weights normalised, slots grouped.

    ``selection_bias [n+m]`` is added to the logits for *choosing* experts only (the weights come
    from the unbiased probabilities). ``top_p`` keeps slot ``j`` only while the selection mass of
    the slots before it is below ``top_p`` (null experts count in the mass); a dropped slot gets
    id ``n+m`` and weight 0 and is treated like a null slot.
    """
    check_route_args(router_logits, top_k, num_experts, normalize, top_p=top_p,
                     selection_bias=selection_bias)
    probs = torch.softmax(router_logits.float(), dim=-1)
    if selection_bias is None:
        select = probs
    else:
        select = torch.softmax(router_logits.float() + selection_bias.float(), dim=-1)
    select_top, topk_ids = topk_lower_index_first(select, top_k)
    topk_probs = probs.gather(1, topk_ids)
    topk_logits = router_logits.float().gather(1, topk_ids)
    if top_p is not None:
        keep = (torch.cumsum(select_top, dim=-1) - select_top) < top_p
        topk_ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, probs.shape[1]))
        topk_probs = torch.where(keep, topk_probs, torch.zeros_like(topk_probs))
    weights = normalize_topk(topk_probs, topk_ids, num_experts, normalize, topk_logits)
    counts, offsets, sorted_slots = group_slots(topk_ids, num_experts)
    return Routing(topk_ids=topk_ids.int(), topk_weights=weights, expert_counts=counts,
                   expert_offsets=offsets, sorted_slots=sorted_slots, normalize=normalize)


def _zero_through(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 0-d exact zero with a (zero) gradient path to each tensor: sums of empty slices."""
    return sum(t[:0].float().sum() for t in tensors)


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One Mixtral expert on rows ``x [r, H]``: ``down (silu(gate x) * up x)``."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def moe_mlp(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
            routing: Routing, null_kind: str = "zero") -> torch.Tensor:
    """``y_t = sum_{true j} w_tj E_{e_tj}(x_t)`` (+ ``w_tj x_t`` per null slot for "identity")."""
    check_moe_mlp_args(hidden, gate_up_proj, down_proj, routing, null_kind)
    n = gate_up_proj.shape[0]
    ids = routing.topk_ids.long()
    weights = routing.topk_weights
    y = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    # An exact 0 that depends on every differentiable input, so the output has a gradient (zero)
    # even when no token has a true assignment (T = 0 or all-null), as on the other backends.
    y = y + _zero_through(hidden, gate_up_proj, down_proj, weights)
    for e in range(n):
        token_idx, slot_idx = torch.where(ids == e)
        if token_idx.numel() == 0:
            continue
        out = expert_mlp(hidden[token_idx], gate_up_proj[e], down_proj[e])
        y = y.index_add(0, token_idx, out.float() * weights[token_idx, slot_idx, None].float())
    if null_kind == "identity":
        null_w = torch.where(ids >= n, weights, torch.zeros_like(weights)).float().sum(-1)
        y = y + null_w[:, None] * hidden.float()
    return y.to(hidden.dtype)


def null_aware_aux_loss(router_logits, top_k: int, num_experts: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Paper eq. 6: ``(n+m) * sum_i f~_i P_i``, HF's masking and layer-pooling conventions.

    ``router_logits`` is one ``[T, n+m]`` tensor or a tuple of per-layer ones (rows of all layers
    pooled, as HF does). ``f_i`` is the fraction of (unmasked) tokens whose top-k holds ``i``
    (``sum f = k``), ``P_i`` the mean probability; null experts share the mean of the null ``f``.
    With ``m = 0`` this equals ``transformers``' Mixtral ``load_balancing_loss_func``.
    """
    layers = tuple(router_logits) if isinstance(router_logits, (tuple, list)) else (router_logits,)
    if len(layers) == 0:
        raise ValueError("router_logits must hold at least one layer's logits")
    for i, lg in enumerate(layers):
        check_route_args(lg, top_k, num_experts, "true")
        if lg.shape[1] != layers[0].shape[1]:
            raise ValueError(f"router_logits[{i}] has {lg.shape[1]} experts, layer 0 has "
                             f"{layers[0].shape[1]}")
    total = layers[0].shape[1]
    device = layers[0].device
    logits = torch.cat([lg.to(device) for lg in layers], dim=0).float()
    probs = torch.softmax(logits, dim=-1)
    _, ids = topk_lower_index_first(probs, top_k)
    chosen = F.one_hot(ids, total).float().sum(1)  # [rows, n+m], 0/1
    if attention_mask is None:
        mask = torch.ones(logits.shape[0], device=device)
    else:
        check_tensor("attention_mask", attention_mask, ndim=2)
        tokens = attention_mask.numel()
        if logits.shape[0] != tokens * len(layers):
            raise ValueError(
                f"attention_mask has {tokens} tokens but each layer's router_logits must have "
                f"that many rows; got {logits.shape[0]} rows over {len(layers)} layer(s)"
            )
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32).repeat(len(layers))
    # No row counts (an empty batch, an all-zero mask): f = P = 0 and the loss is 0, with a
    # gradient path to the logits (zero), instead of 0 / 0.
    rows = mask.sum()
    rows = torch.where(rows > 0, rows, torch.ones_like(rows))
    f = (chosen * mask[:, None]).sum(0) / rows
    P = (probs * mask[:, None]).sum(0) / rows
    m = total - num_experts
    if m > 0:
        f = torch.cat([f[:num_experts], f[num_experts:].mean().expand(m)])
    return total * (f * P).sum()


def moe_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: Routing,
             scaling: float = 1.0) -> torch.Tensor:
    """LoRA experts: ``delta_t = sum_{true j} w_tj * scaling * B_e A_e x_t`` (null slots add 0).

    ``x [T, in]``, ``lora_A [n, r, in]``, ``lora_B [n, out, r]``; returns ``[T, out]`` in x's dtype.
    """
    check_moe_lora_args(x, lora_A, lora_B, routing, scaling)
    n = lora_A.shape[0]
    ids = routing.topk_ids.long()
    weights = routing.topk_weights
    y = torch.zeros((x.shape[0], lora_B.shape[1]), dtype=torch.float32, device=x.device)
    y = y + _zero_through(x, lora_A, lora_B, weights)
    for e in range(n):
        token_idx, slot_idx = torch.where(ids == e)
        if token_idx.numel() == 0:
            continue
        delta = F.linear(F.linear(x[token_idx], lora_A[e]), lora_B[e])
        w = weights[token_idx, slot_idx, None].float() * scaling
        y = y.index_add(0, token_idx, delta.float() * w)
    return y.to(x.dtype)
