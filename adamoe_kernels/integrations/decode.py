"""Dense layers of a CPU decode step on the C++ small-M kernel: ``use_decode_linears``.

At decode a layer sees 1-16 rows, so every linear layer is bound by reading its weight. Inside a
decode step on a 2-core AMD EPYC torch's dense GEMM (MKL fp32, oneDNN bf16) read the attention
projections' and the LM head's cold weights at 7-15 GB/s; the streaming kernel the experts use
(``csrc/dense_linear.cpp``) at 13-34 GB/s, 1.6-3x faster per layer (``bench/generate.py
--decode-linears`` measures whole-model tokens/s). Opt-in, for inference: a patched layer falls
back to ``F.linear`` whenever a gradient is wanted, off CPU, for other dtypes or for more rows.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .modules import AdaMoERouter

__all__ = ["DECODE_LINEAR_MAX_ROWS", "use_decode_linears"]

# Most rows (tokens of the step) that take the small-M kernel. Measured faster than torch's
# GEMM at 1, 4 and 16 rows on the AMD EPYC (1.6-3.1x, 256-1024 x 1024 weights, 2 threads). Under
# torch.compile at 16 rows the whole step was slower with it (the op stops inductor's fusions):
# pass max_rows=4 for compiled batches. Not yet measured on an Intel CPU.
DECODE_LINEAR_MAX_ROWS = 16


def _decode_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, b = self.weight, self.bias
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                              or (b is not None and b.requires_grad))
    if (0 < rows <= self._adamoe_decode_max_rows and not wants_grad and x.dtype == w.dtype
            and x.dtype in self._adamoe_decode_dtypes and x.device.type == "cpu"
            and w.device.type == "cpu"
            and (b is None or b.dtype == w.dtype)):
        from ..ops.cpu import linear_small_m_cpu

        y = linear_small_m_cpu(x.reshape(rows, x.shape[-1]), w, b)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


def _decode_router_forward(self: AdaMoERouter, x: torch.Tensor) -> torch.Tensor:
    """``AdaMoERouter.forward`` (logits ``[T, n+m]`` of any ``[..., H]``) on the same kernel."""
    return _decode_linear_forward(self, x.reshape(-1, self.in_features))


_PATCHED_FORWARDS = {nn.Linear: _decode_linear_forward, AdaMoERouter: _decode_router_forward}


def _kernel_dtypes_here() -> tuple[torch.dtype, ...]:
    try:
        from ..ops.cpu import cpu_features
    except (ImportError, OSError):  # the C++ extension is not built
        return ()
    feats = cpu_features()
    return tuple(dt for dt, need in ((torch.float32, "avx512"), (torch.bfloat16, "avx512_bf16"))
                 if feats.get(need))


def use_decode_linears(model: nn.Module, enable: bool = True,
                       max_rows: int = DECODE_LINEAR_MAX_ROWS) -> int:
    """Run ``model``'s plain ``nn.Linear`` layers and AdaMoE routers on the C++ small-M kernel
    when they see at most ``max_rows`` rows on CPU without a gradient (a decode step: attention
    projections, routers, LM head); ``enable=False`` undoes it. Returns how many layers are
    patched (0 where this CPU lacks the kernel's instructions or the C++ backend is not built:
    then nothing changes).

    Results equal ``F.linear`` up to the order of the fp32 sums (bf16: one rounding of the fp32
    sum, as oneDNN's), not bit for bit: greedy tokens can differ where two logits nearly tie.
    Patched are the modules whose type is exactly ``nn.Linear`` or ``AdaMoERouter`` (the router
    of a converted block: at one row its bf16 GEMV took 18-20 us in ``F.linear`` and 4 us here on
    the AMD EPYC); LoRA wrappers keep theirs (their base layers are patched), and each module
    keeps its parameters and ``state_dict``. transformers' own routers (``*TopKRouter``, GEMV,
    softmax and top-k in one ``forward``) are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_decode_linears needs an nn.Module, got {type(model).__name__}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    linears = [m for m in model.modules() if type(m) in _PATCHED_FORWARDS]
    if not enable:
        for m in linears:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_adamoe_decode_max_rows", None)
            m.__dict__.pop("_adamoe_decode_dtypes", None)
        return 0
    dtypes = _kernel_dtypes_here()
    patched = 0
    for m in linears:
        if m.weight.dtype in dtypes and m.weight.device.type == "cpu":
            m._adamoe_decode_max_rows = max_rows
            m._adamoe_decode_dtypes = dtypes  # checked per call: the model may change dtype
            m.forward = types.MethodType(_PATCHED_FORWARDS[type(m)], m)
            patched += 1
    return patched
