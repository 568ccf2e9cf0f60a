"""Tuned kernel configs as data (``adamoe_kernels/ops/tuning.py``): which file applies, how an
entry is chosen, that the launchers use it (and their defaults without it), that the interpreter
keeps its pinned config, and that a malformed file gives an error naming it."""

import json

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from adamoe_kernels.ops import grouped_mlp, tuning
from adamoe_kernels.ops._common import KernelConfig
from adamoe_kernels.ops.backend import interpreter_enabled
from helpers import assert_close, make_experts, make_logits

BIG = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4)
WIDE = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=5)


def _entry(op="gemm", dtype="bfloat16", n=8, H=4096, I=14336, rows=None, cfg=BIG, **extra):
    e = {"op": op, "dtype": dtype, "n": n, "H": H, "I": I,
         "config": {k: getattr(cfg, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
                                                 "num_stages")}, **extra}
    if rows is not None:
        e["rows_per_expert"] = rows
    return e


def _write(path, entries, **top):
    path.write_text(json.dumps({"format": 1, "device": "NVIDIA H200", **top, "entries": entries}))
    return path


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.ENV_FILE, raising=False)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path / "configs")
    return tmp_path


@pytest.fixture
def compiled_path(monkeypatch):
    """The launchers as on a GPU (not interpreting), on CPU tensors: only configs are chosen."""
    monkeypatch.setattr(grouped_mlp, "interpreting", lambda t: False)


def test_device_slug():
    assert tuning.device_slug("NVIDIA H200") == "nvidia-h200"
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_without_a_file_the_defaults_apply_unchanged(no_env, compiled_path):
    x16, x32 = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8)
    for A, n in ((300 * 3, 8), (5 * 3, 8)):
        old_rule = dict(BLOCK_M=min(64, max(16, 1 << (-(-A // n) - 1).bit_length())))
        assert grouped_mlp.gemm_config(x16, A, n, 4096, 14336) == \
            KernelConfig(**{**grouped_mlp.GPU_GEMM.__dict__, **old_rule})
        assert grouped_mlp.gemm_config(x32, A, n, 4096, 14336) == \
            KernelConfig(**{**grouped_mlp.GPU_GEMM_FP32.__dict__, **old_rule})
    assert grouped_mlp.wgrad_config(x16, 8, 4096, 14336, 900) == grouped_mlp.GPU_WGRAD
    assert grouped_mlp.wgrad_config(x32) == grouped_mlp.GPU_GEMM_FP32
    assert tuning.config_path(torch.device("cpu")) is None


def test_a_fake_device_file_is_picked_up(no_env, monkeypatch):
    configs = no_env / "configs"
    configs.mkdir()
    _write(configs / "nvidia-h200.json", [_entry(rows=1536)])
    monkeypatch.setattr(tuning, "_cuda_name", lambda device: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert tuning.config_path(cuda) == configs / "nvidia-h200.json"
    assert tuning.lookup("gemm", cuda, torch.bfloat16, n=8, H=4096, I=14336,
                         rows_per_expert=1536) == BIG
    # another shape, dtype, op or device model: no entry, so the caller's default
    assert tuning.lookup("gemm", cuda, torch.bfloat16, n=8, H=2048, I=7168) is None
    assert tuning.lookup("gemm", cuda, torch.float16, n=8, H=4096, I=14336) is None
    assert tuning.lookup("wgrad", cuda, torch.bfloat16, n=8, H=4096, I=14336) is None
    monkeypatch.setattr(tuning, "_cuda_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert tuning.config_path(cuda) is None


def test_the_launchers_use_the_table(no_env, compiled_path, monkeypatch):
    path = _write(no_env / "h200.json", [_entry(rows=1536), _entry(op="swiglu_bwd", cfg=WIDE),
                                         _entry(op="wgrad", cfg=WIDE)])
    monkeypatch.setenv(tuning.ENV_FILE, str(path))
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert grouped_mlp.gemm_config(x, 6144 * 2, 8, 4096, 14336) == BIG
    assert grouped_mlp.gemm_config(x, 6144 * 2, 8, 4096, 14336, op="swiglu_bwd") == WIDE
    assert grouped_mlp.wgrad_config(x, 8, 4096, 14336, 6144 * 2) == WIDE
    # BLOCK_M still shrinks to the rows per expert (a decode batch)
    assert grouped_mlp.gemm_config(x, 5 * 2, 8, 4096, 14336).BLOCK_M == 16
    # no H/I given, or another shape: the defaults
    assert grouped_mlp.gemm_config(x, 6144 * 2, 8).BLOCK_N == grouped_mlp.GPU_GEMM.BLOCK_N
    assert grouped_mlp.gemm_config(x, 6144 * 2, 8, 1024, 2816) == grouped_mlp.GPU_GEMM


def test_nearest_rows_per_expert_and_generic_entries(tmp_path):
    small = KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)
    table = tuning.load_table(_write(tmp_path / "t.json", [
        _entry(rows=256, cfg=small), _entry(rows=2048), _entry(op="wgrad", cfg=WIDE)]))
    look = lambda rows, op="gemm": table.lookup(op, torch.bfloat16, 8, 4096, 14336, rows)  # noqa: E731
    assert look(300) == small and look(128) == small
    assert look(1500) == BIG and look(65536) == BIG
    assert look(None) in (small, BIG)
    assert look(7, "wgrad") == WIDE  # an entry without rows_per_expert matches any batch
    generic = tuning.load_table(_write(tmp_path / "g.json", [_entry(cfg=WIDE), _entry(rows=64)]))
    assert generic.lookup("gemm", torch.bfloat16, 8, 4096, 14336, 4096) == BIG  # sized one wins


needs_interpreter = pytest.mark.skipif(not interpreter_enabled(),
                                       reason="runs the kernels on CPU under the interpreter")


@needs_interpreter
def test_the_interpreter_keeps_its_pinned_config(no_env, monkeypatch):
    monkeypatch.setenv(tuning.ENV_FILE, str(_write(no_env / "t.json", [_entry(H=32, I=48)])))
    x = torch.zeros(4, 32, dtype=torch.bfloat16)
    assert grouped_mlp.interpreting(x)  # tests run the kernels under the interpreter
    assert grouped_mlp.gemm_config(x, 900, 8, 32, 48) is grouped_mlp.INTERPRETER_GEMM
    assert grouped_mlp.wgrad_config(x, 8, 32, 48, 900) is grouped_mlp.INTERPRETER_GEMM


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"format": 1}', "'entries' list"),
    ('{"format": 2, "entries": []}', "format 2"),
    (json.dumps({"entries": [_entry(op="gemm2")]}), r"entries\[0\]: op must be one of"),
    (json.dumps({"entries": [_entry(dtype="bf16")]}), r"entries\[0\]: dtype"),
    (json.dumps({"entries": [_entry(H=0)]}), r"entries\[0\]: H must be a positive integer"),
    (json.dumps({"entries": [_entry(rows=-4)]}), "rows_per_expert"),
    (json.dumps({"entries": [_entry(), {**_entry(), "config": {"BLOCK_M": 48, "BLOCK_N": 64,
                                                                "BLOCK_K": 32}}]}),
     r"entries\[1\]: BLOCK_M must be a power of two"),
    (json.dumps({"entries": [{**_entry(), "config": {"BLOCK_M": 64, "BLOCK_N": 64}}]}),
     r"missing \['BLOCK_K'\]"),
    (json.dumps({"entries": [{**_entry(), "config": {**_entry()["config"], "warps": 4}}]}),
     r"unknown \['warps'\]"),
    (json.dumps({"entries": [{**_entry(), "config": {**_entry()["config"], "num_warps": 3}}]}),
     "num_warps"),
])
def test_a_malformed_file_gives_an_error_naming_it(no_env, compiled_path, monkeypatch, content,
                                                   match):
    path = no_env / "broken-h200.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        tuning.load_table(path)
    assert str(err.value).startswith(str(path))
    monkeypatch.setenv(tuning.ENV_FILE, str(path))  # through the launcher, as on a GPU
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
        grouped_mlp.gemm_config(torch.zeros(4, 8, dtype=torch.bfloat16), 900, 8, 4096, 14336)


def test_a_missing_env_file_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_FILE, str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="nope.json: cannot read"):
        tuning.lookup("gemm", torch.device("cpu"), torch.bfloat16, n=8, H=32, I=48)


def test_table_json_validates_what_the_tuner_writes(tmp_path):
    data = tuning.table_json([_entry(rows=1536, ms=1.0, default_ms=1.2)], device="NVIDIA H200")
    path = tmp_path / "nvidia-h200.json"
    path.write_text(json.dumps(data))
    assert tuning.load_table(path).entries[0].config == BIG
    with pytest.raises(ValueError, match="op must be"):
        tuning.table_json([_entry(op="nope")])


@needs_interpreter
def test_forced_configs_run_under_the_interpreter():
    """The tuner's path: a forced config drives the kernels (here: under the interpreter) and the
    layer still matches the reference."""
    T, H, I, n, m, k = 24, 32, 48, 4, 4, 3
    logits = make_logits(T, n, m)
    x = torch.randn(T, H)
    gate_up, down = make_experts(n, H, I)
    r = reference.route(logits, k, n)
    want = reference.moe_mlp(x, gate_up, down, r)
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    with tuning.force_configs(gemm=cfg, swiglu_bwd=cfg, wgrad=cfg):
        assert grouped_mlp.gemm_config(x, T * k, n, H, I) == cfg
        got = ak.moe_mlp(x, gate_up, down, ak.route(logits, k, n))
    assert grouped_mlp.gemm_config(x, T * k, n, H, I) is grouped_mlp.INTERPRETER_GEMM
    assert_close(got, want, 1e-4, 1e-4, "y")
    with pytest.raises(ValueError, match="unknown ops"):
        with tuning.force_configs(gemm_fwd=cfg):
            pass
