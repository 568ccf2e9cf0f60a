"""Null-aware load-balancing loss (paper eq. 6) and the α schedule that anneals it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._contract import check_route_args, check_tensor
from .reference import topk_lower_index_first


def _stack_layers(router_logits):
    layers = tuple(router_logits) if isinstance(router_logits, (tuple, list)) else (router_logits,)
    if len(layers) == 0:
        raise ValueError("router_logits must hold at least one layer's logits")
    return layers


def null_aware_aux_loss(router_logits, top_k: int, num_experts: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(n+m) * sum_i f~_i P_i`` over one ``[T, n+m]`` tensor or a tuple of per-layer ones.

    ``f_i``: fraction of tokens whose top-k holds expert ``i`` (``sum f = k``); ``P_i``: mean
    softmax probability; ``f~_i = f_i`` for true experts and the mean null ``f`` for null ones, so
    the loss asks for a total null share without balancing the (identical) null experts among
    themselves. Rows of all layers are pooled and padding (``attention_mask == 0``) is left out,
    as ``transformers`` does; with ``m = 0`` this is exactly its Mixtral load-balancing loss.
    Multiply by α outside (see ``AlphaSchedule``). Differentiable w.r.t. the logits (through P);
    no host synchronisation. Returns a 0-d float32 tensor.
    An empty batch or an all-zero ``attention_mask`` (no row counts) gives 0, with a (zero)
    gradient path to the logits.
    """
    hits, prob_sum, rows = aux_loss_terms(router_logits, top_k, num_experts, attention_mask)
    return aux_loss_from_terms(hits, prob_sum / _counted(rows), rows, num_experts)


def _counted(rows: torch.Tensor) -> torch.Tensor:
    """``rows``, or 1 where no row counts (then every sum over rows is 0 and so is the loss)."""
    return torch.where(rows > 0, rows, torch.ones_like(rows))


def aux_loss_terms(router_logits, top_k: int, num_experts: int,
                   attention_mask: torch.Tensor | None = None):
    """The sums the null-aware loss is made of: ``(hits [n+m], prob_sum [n+m], rows [])``.

    ``hits_i``: weighted count of rows whose top-k holds expert ``i`` (no gradient);
    ``prob_sum_i``: weighted sum of the softmax probabilities (differentiable); ``rows``: the
    weight of all rows (the unmasked row count). Sums over rows add up across data-parallel
    ranks, which is how ``adamoe_kernels.training.parallel`` gets the loss of the global batch.
    """
    layers = _stack_layers(router_logits)
    total = layers[0].shape[-1] if isinstance(layers[0], torch.Tensor) else None
    for i, lg in enumerate(layers):
        name = "router_logits" if len(layers) == 1 else f"router_logits[{i}]"
        try:
            check_route_args(lg, top_k, num_experts, "true")
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("router_logits", name, 1)) from None
        if lg.shape[1] != total:
            raise ValueError(f"{name} has {lg.shape[1]} experts but router_logits[0] has {total}")
    device = layers[0].device
    logits = torch.cat([lg.to(device) for lg in layers], dim=0)
    rows = logits.shape[0]
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if rows != attention_mask.numel() * len(layers):
            raise ValueError(
                f"attention_mask holds {attention_mask.numel()} tokens, so each of the "
                f"{len(layers)} layer(s) needs that many router_logits rows; got {rows} in all"
            )
        row_weight = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        row_weight = row_weight.repeat(len(layers))
    else:
        row_weight = torch.ones(rows, dtype=torch.float32, device=device)
    probs = torch.softmax(logits.float(), dim=-1)
    _, ids = topk_lower_index_first(probs.detach(), top_k)  # ties as route breaks them
    hits = torch.zeros(total, dtype=torch.float32, device=device)
    hits = hits.scatter_add(0, ids.reshape(-1), row_weight.repeat_interleave(top_k))
    return hits, (probs * row_weight[:, None]).sum(0), row_weight.sum()


def aux_loss_from_terms(hits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """``(n+m) * sum_i f~_i probs_i`` with ``f = hits / rows`` (``aux_loss_terms``); ``probs`` is
    the mean probability ``P`` (or, on one data-parallel rank, its share of the global ``P``)."""
    total = hits.shape[0]
    f = hits / _counted(rows)
    m = total - num_experts
    if m > 0:
        null_share = f[num_experts:].mean()
        f = torch.cat([f[:num_experts], null_share.expand(m)])
    return total * torch.dot(f, probs)


@dataclass
class AlphaSchedule:
    """The weight α of the null-aware loss over training (paper §3.4: tight, then loose).

    ``AlphaSchedule()`` is the paper's two-stage schedule: α = 0.02 in epoch 0 and 0.0001 from
    epoch 1 on. ``values`` gives α per stage, ``boundaries`` the stage starts (epochs, or steps
    with ``unit="step"``); ``linear=True`` interpolates between stages instead of stepping.

    Use it in a training loop::

        schedule = ak.AlphaSchedule()                       # or AlphaSchedule.by_steps(...)
        for epoch in range(2):
            for batch in loader:
                out = model(**batch, output_router_logits=True)
                aux = ak.null_aware_aux_loss(out.router_logits, k, n)
                loss = out.loss + schedule(epoch) * aux
    """

    values: tuple = (0.02, 0.0001)
    boundaries: tuple = (0, 1)
    unit: str = "epoch"
    linear: bool = False

    def __post_init__(self):
        self.values = tuple(float(v) for v in self.values)
        self.boundaries = tuple(self.boundaries)
        if len(self.values) == 0 or len(self.values) != len(self.boundaries):
            raise ValueError("values and boundaries must be non-empty and of equal length")
        if any(b1 <= b0 for b0, b1 in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"boundaries must increase strictly, got {self.boundaries}")
        if any(v < 0 for v in self.values):
            raise ValueError(f"values must be >= 0, got {self.values}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")

    @classmethod
    def by_steps(cls, total_steps: int, values=(0.02, 0.0001), linear: bool = False):
        """Stages of equal length over ``total_steps`` optimizer steps."""
        if total_steps < len(values):
            raise ValueError(f"total_steps ({total_steps}) must be >= the number of stages")
        bounds = tuple(i * total_steps // len(values) for i in range(len(values)))
        return cls(values=tuple(values), boundaries=bounds, unit="step", linear=linear)

    def __call__(self, position: float) -> float:
        """α at ``position`` (an epoch, fractional allowed, or a step, as ``unit`` says)."""
        stage = 0
        for i, b in enumerate(self.boundaries):
            if position >= b:
                stage = i
        if not self.linear or stage == len(self.values) - 1:
            return self.values[stage]
        b0, b1 = self.boundaries[stage], self.boundaries[stage + 1]
        t = (position - b0) / (b1 - b0)
        return self.values[stage] + t * (self.values[stage + 1] - self.values[stage])
