"""``ak.use_decode_linears`` and its C++ op ``linear_small_m_cpu``: the dense layers of a CPU decode
step on the small-M streaming kernel. The op against a float64 ``x @ W^T + b``; a patched model
against the unpatched one; the fallbacks (gradients, more rows, other dtypes) give ``F.linear``
exactly; the op traces under ``torch.compile(fullgraph=True)``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adamoe_kernels as ak
from adamoe_kernels.integrations.modules import AdaMoERouter
from adamoe_kernels.ops.backend import cpu_extension_available

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="C++ CPU backend not built")


def _features():
    from adamoe_kernels.ops.cpu import cpu_features

    return cpu_features()


def _kernel_dtypes():
    f = _features()
    return [dt for dt, need in ((torch.float32, "avx512"), (torch.bfloat16, "avx512_bf16"))
            if f[need]]


def _needs(dtype):
    if dtype not in _kernel_dtypes():
        pytest.skip(f"this CPU has no {dtype} small-M kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 70), (3, 64, 1024), (16, 13, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_small_m_matches_float64(dtype, M, N, K, with_bias):
    _needs(dtype)
    from adamoe_kernels.ops.cpu import linear_small_m_cpu

    g = torch.Generator().manual_seed(M * 1000 + N + K)
    wide = torch.randn(M, K + 5, generator=g).to(dtype)
    x = wide[:, 2:K + 2]  # rows with a stride of K + 5 (the kernel reads any row stride)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if with_bias else None
    y = linear_small_m_cpu(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of a sum that is exact up to fp32 ordering
        torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=2 ** -7, atol=1e-2)


def test_linear_small_m_transposed_weight_and_errors():
    _needs(torch.float32)
    from adamoe_kernels.ops.cpu import linear_small_m_cpu

    x = torch.randn(2, 24)
    wt = torch.randn(24, 10).T  # columns contiguous: copied to rows first
    torch.testing.assert_close(linear_small_m_cpu(x, wt), x @ wt.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        linear_small_m_cpu(x, wt.double())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        linear_small_m_cpu(x.half(), wt.half())
    with pytest.raises(RuntimeError, match="does not match"):
        linear_small_m_cpu(x, torch.randn(10, 23))
    with pytest.raises(RuntimeError, match="bias"):
        linear_small_m_cpu(x, wt, torch.randn(9))


def _tiny_mixtral(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = ak.convert_model(transformers.MixtralForCausalLM(cfg), num_null_experts=2, top_k=3,
                             backend="cpu")
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_matches_unpatched(dtype):
    _needs(dtype)
    model = _tiny_mixtral(dtype)
    plain = [m for m in model.modules() if type(m) in (nn.Linear, AdaMoERouter)]
    assert sum(type(m) is AdaMoERouter for m in plain) == 2  # one router per layer
    ids = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
        assert ak.use_decode_linears(model) == len(plain) > 0
        got = model(ids).logits
        assert ak.use_decode_linears(model, max_rows=4) == len(plain)
        assert torch.equal(model(ids).logits, want)  # 6 rows > 4: F.linear, bit for bit
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert ak.use_decode_linears(model, enable=False) == 0
    assert not any("forward" in m.__dict__ for m in plain)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_patched_linear_falls_back_for_gradients_and_dtypes():
    _needs(torch.float32)
    lin = nn.Linear(16, 8)
    x = torch.randn(2, 16)
    want = F.linear(x, lin.weight, lin.bias)
    assert ak.use_decode_linears(lin) == 1
    y = lin(x)  # the weight wants a gradient: F.linear, differentiable
    assert y.requires_grad and torch.equal(y, want)
    y.sum().backward()
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(8, 16))
    assert lin(x[:0]).shape == (0, 8)  # no rows: F.linear
    with torch.no_grad():
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, 3, 16)  # leading dims kept
        assert lin(x3).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="max_rows"):
        ak.use_decode_linears(lin, max_rows=0)
    with pytest.raises(TypeError, match="nn.Module"):
        ak.use_decode_linears(object())


def test_patched_router_keeps_its_contract():
    _needs(torch.float32)
    router = AdaMoERouter(24, num_experts=4, num_null_experts=3)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        want = router(x)
        assert ak.use_decode_linears(router) == 1
        got = router(x)  # 6 rows of [..., H]: flat [T, n+m] logits, as unpatched
        assert got.shape == want.shape == (6, 7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert ak.use_decode_linears(router, max_rows=4) == 1
        assert torch.equal(router(x), want)  # more rows than max_rows: F.linear, bit for bit
    y = router(x)  # the weight wants a gradient: F.linear, differentiable
    assert y.requires_grad and torch.equal(y.detach(), want)
    ak.use_decode_linears(router, enable=False)
    assert "forward" not in router.__dict__


def test_patched_linear_compiles_fullgraph():
    _needs(torch.float32)
    lin = nn.Linear(40, 12)
    ak.use_decode_linears(lin)
    x = torch.randn(1, 40)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
