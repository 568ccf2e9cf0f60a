"""Peak memory of forward + backward: the kernels against the reference at the same load L.

The Triton path saves nothing for backward but its inputs (it recomputes gate/up per tile) and
chunks the intermediate dimension, so its transient buffers stay near 2*T*k*H elements. Without
a host sync those buffers are sized by the static bound T*k, not by the true rows; the reference
keeps ~(2H + 4I) values per *true* row alive for backward. Measured with the torch profiler's
allocation events (CPU tensors; the interpreter's own numpy temporaries are not torch memory).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import adamoe_kernels as ak
from adamoe_kernels import reference
from helpers import make_experts, make_logits

T, H, I, n = 128, 64, 176, 4


def peak_bytes(fn) -> int:
    """Highest sum of live torch allocations made inside ``fn`` (CPU allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _train_step(api, layers, logits_list, x, k):
    def step():
        h = x.clone().requires_grad_()
        weights = [(gu.clone().requires_grad_(), d.clone().requires_grad_()) for gu, d in layers]
        for (gu, d), logits in zip(weights, logits_list):
            r = api.route(logits.clone().requires_grad_(), k, n)
            h = h + api.moe_mlp(h, gu, d, r)
        h.square().sum().backward()
    return step


@pytest.mark.parametrize("m,k,null_bias,num_layers", [(0, 2, 0.0, 1), (4, 3, 0.0, 1),
                                                       (8, 4, 0.5, 3)])
def test_peak_memory_not_above_reference(m, k, null_bias, num_layers):
    layers = [make_experts(n, H, I, seed=i) for i in range(num_layers)]
    logits_list = [make_logits(T, n, m, null_bias=null_bias, seed=i) for i in range(num_layers)]
    x = torch.randn(T, H)
    load = sum(float(ak.route(lg, k, n).load()) for lg in logits_list) / num_layers
    ours = peak_bytes(_train_step(ak, layers, logits_list, x, k))
    ref = peak_bytes(_train_step(reference, layers, logits_list, x, k))
    print(f"m={m} k={k} layers={num_layers} L={load:.2f}: kernels {ours / 1e6:.2f} MB, "
          f"reference {ref / 1e6:.2f} MB, ratio {ours / ref:.2f}")
    assert ours <= ref, (ours, ref, load)
