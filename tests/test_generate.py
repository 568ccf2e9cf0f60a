"""Generation with a converted model: greedy tokens equal transformers' own model at m = 0 on every
backend, with the dynamic and the static cache; compiled static-cache generation (the decode step
under ``torch.compile(fullgraph=True)``) gives the eager tokens; a smoke test of
``bench/generate.py``. Tiny random Mixtral configs, fp32, no downloads.
"""

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.integrations import AdaMoESparseMoeBlock  # noqa: E402
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"
V = 64
NEEDS_CPU = pytest.mark.skipif(not cpu_extension_available(), reason="C++ CPU backend not built")
INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"


def _mixtral(layers=2, experts=4):
    cfg = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=64, experts_implementation="eager",
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def _prompt(batch=2, length=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, V, (batch, length), generator=g)


def _generate(model, ids, new_tokens, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **kw)


def _compile_config(backend="inductor"):
    cc = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default" if
                                    backend == "inductor" else None, backend=backend)
    cc._compile_all_devices = True  # transformers compiles only on accelerators by default
    return cc


BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("cpu", id="cpu", marks=NEEDS_CPU),
            pytest.param("triton", id="triton", marks=pytest.mark.skipif(
                not INTERPRETED and not torch.cuda.is_available(),
                reason="triton needs CUDA or the interpreter"))]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_m0_generates_transformers_tokens(backend, cache):
    """m = 0 with the model's own k: greedy ``generate`` gives exactly transformers' tokens."""
    hf = _mixtral()
    ada = ak.convert_model(copy.deepcopy(hf), num_null_experts=0, backend=backend)
    ids = _prompt()
    new = 5 if backend == "triton" else 8  # the Triton interpreter is slow: few tokens
    kw = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
    ref = _generate(hf, ids, new, **kw)
    out = _generate(ada, ids, new, **kw)
    assert torch.equal(out, ref)
    if cache == "static":  # and the static cache changes nothing for transformers itself
        assert torch.equal(ref, _generate(hf, ids, new))


def _adamoe_model(backend):
    """A converted m4k3 model whose null rows are no exact copies, with a nonzero load dial."""
    model = ak.convert_model(_mixtral(), num_null_experts=4, top_k=3, backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdaMoESparseMoeBlock):
                layer.gate.weight.add_(0.05 * torch.randn(layer.gate.weight.shape, generator=g))
                layer.null_bias.fill_(0.2)
    return model


@NEEDS_CPU
def test_compiled_static_generation_gives_eager_tokens():
    """The decode step under ``torch.compile(fullgraph=True)`` with a static cache (transformers'
    ``compile_config``): the custom ops trace without a graph break and the tokens equal eager
    generation's, with the load dial on (null_bias != 0); the compiled step really ran."""
    torch._dynamo.reset()
    model = _adamoe_model("cpu")
    ids = _prompt()
    eager = _generate(model, ids, 6)
    compiled = _generate(model, ids, 6, cache_implementation="static",
                         compile_config=_compile_config())
    assert hasattr(model, "_compiled_call")  # generate took the compiled decode step
    assert torch.equal(compiled, eager)
    loads = ak.expert_load(model)
    assert all(0 < L < 3 for L in loads)
    # bench/generate.py's profile of the compiled decode steps: the compiled graph and the
    # experts' custom op are in it (the same compiled step, reused)
    sys.path.append(str(BENCH))
    gen = importlib.import_module("generate")
    prof = gen.compiled_step_profile(model, ids, 6, torch.device("cpu"))
    phases = prof["per_step_ms"]
    assert set(phases) == {name for name, _ in gen.PROFILE_PHASES} | {"other"}
    assert phases["inductor_kernels"] > 0 and phases["experts"] > 0 and phases["route"] > 0
    assert len(prof["top_ops_ms"]) == 6
    assert [ms for _, ms in prof["top_ops_ms"]] == sorted((ms for _, ms in prof["top_ops_ms"]),
                                                          reverse=True)


@pytest.mark.skipif(not INTERPRETED, reason="CPU interpreter run of the triton backend")
def test_compiled_static_generation_triton_interpreted():
    """The triton backend's custom ops trace with fullgraph=True inside generation too (graph
    capture only, ``aot_eager``: the interpreter runs the kernels)."""
    torch._dynamo.reset()
    model = _adamoe_model("triton")
    ids = _prompt(batch=1, length=4)
    eager = _generate(model, ids, 2)
    compiled = _generate(model, ids, 2, cache_implementation="static",
                         compile_config=_compile_config("aot_eager"))
    assert torch.equal(compiled, eager)


@NEEDS_CPU
def test_generate_bench_quick(tmp_path):
    """``bench/generate.py`` end to end on a tiny model: the JSON rows the README table reads,
    bytes and bandwidth, the breakdown phases and the routing rows."""
    sys.path.append(str(BENCH))
    threads = torch.get_num_threads()
    try:
        gen = importlib.import_module("generate")
        res = gen.main(["--device", "cpu", "--backend", "cpu", "--dtype", "float32", "--reps", "1",
                        "--no-progress", "--no-plot", "--hidden", "64", "--intermediate", "128",
                        "--vocab", "64", "--batches", "1", "2", "--prompt", "6", "--new-tokens", "4",
                        "--loads", "1.0", "--no-compile", "--threads", "1",
                        "--out", str(tmp_path / "results" / "cpu-test")])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(Path(res["json"]).read_text())
    meta, rows = payload["meta"], payload["rows"]
    assert meta["script"] == "generate" and meta["bandwidth"]["gb_s"] > 0
    # the bandwidth is sampled before and after each batch's timed runs; a row is held to its pair
    bw = meta["bandwidth"]
    assert len(bw["samples_gb_s"]) == 2 * 2 and bw["min_gb_s"] <= bw["gb_s"] <= bw["max_gb_s"]
    for i, B in enumerate((1, 2)):
        pair = bw["samples_gb_s"][2 * i:2 * i + 2]
        for r in (r for r in rows if r["batch"] == B):
            assert r["bandwidth_samples_gb_s"] == pytest.approx(pair, abs=0.01)
            assert r["bandwidth_gb_s"] == pytest.approx(sum(pair) / 2, abs=0.01)
            assert r["bytes_bound_step_ms"] == pytest.approx(
                r["bytes_per_step"] / (r["bandwidth_gb_s"] * 1e9) * 1e3)
    assert set(meta["targets"]) >= {"moe_layer_within_1.25x_of_bytes_over_bw",
                                     "b1_speedup_at_least_0.85x_bytes_ratio",
                                     "compiled_b1_at_least_1.5x_eager"}
    eager = [r for r in rows if not r["compiled"]]
    assert {r["setting"] for r in eager} == {"top2-eager", "top2-grouped_mm", "m8k3 L=1"}
    for r in eager:
        assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and r["step_ms_median"] > 0
        assert r["bytes_per_step"] == pytest.approx(r["expert_bytes_per_step"]
                                                    + r["other_bytes_per_step"])
        assert 0 < r["experts_touched_per_layer"] <= 8
        assert {"attention", "router", "experts", "lm_head", "model_other",
                "generate_loop"} <= set(r["breakdown"])
        assert r["speedup_vs_top2"] > 0
    top2 = [r for r in eager if r["config"] == "top2"]
    assert all(r["load_decode"] == pytest.approx(2.0) for r in top2)
    assert not any(r["compiled"] for r in rows)  # --no-compile (compiled generation: above)
    assert [r["T"] for r in meta["routing"]] == [1, 2]
    assert all("route" in r["phases_us"] for r in meta["routing"])
    # the README generator renders it: a row per batch and L, numbers from the JSON
    mrt = importlib.import_module("make_readme_table")
    table = mrt.render(mrt.load_results(tmp_path / "results"), tmp_path)
    assert "Generation (decode)" in table
    gm = {r["batch"]: r for r in eager if r["setting"] == "top2-grouped_mm"}
    for r in eager:
        if r["config"] == "m8k3":
            vs = r["decode_tok_s"] / gm[r["batch"]]["decode_tok_s"]
            assert (f"| {r['batch']} | 1 | {r['load_decode']:.2f} | " in table
                    and f"| {r['decode_tok_s']:.1f} | {vs:.2f}× | " in table), table
