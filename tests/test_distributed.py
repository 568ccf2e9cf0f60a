"""ExpertParallelMoE against the single-process reference, on 2 and 4 CPU processes (gloo).

Each multi-process test spawns the ranks once and runs every case of that world size in them; the
ranks save outputs, gradients and dispatch stats, and the parent compares them with
``ak.reference`` run on the full batch with the full weights (the oracle). The ranks pass an
explicit ``backend`` ("torch" or "cpu"): the Triton interpreter is far too slow here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import adamoe_kernels as ak
from adamoe_kernels.ops.backend import cpu_extension_available
from adamoe_kernels.training.distributed import ExpertParallelMoE, combine
from helpers import init_gloo, spawn_ranks

BACKENDS = ["torch"] + (["cpu"] if cpu_extension_available() else [])
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


@dataclass(frozen=True)
class Case:
    n: int
    m: int
    k: int
    tokens: tuple                # tokens per rank
    normalize: str = "true"
    null_kind: str = "zero"
    dead_expert: int | None = None    # routed no token at all
    null_every: int | None = None     # every such token is all-null (needs m >= k)
    null_rank: int | None = None      # all tokens of this rank are all-null
    dtype: torch.dtype = torch.float32
    backends: tuple = tuple(BACKENDS)
    H: int = 16
    I: int = 8


CASES_2 = {
    "null": Case(n=4, m=4, k=3, tokens=(13, 6), dead_expert=1, null_every=4),
    "top2": Case(n=4, m=0, k=2, tokens=(9, 11)),
    "identity": Case(n=4, m=2, k=2, tokens=(7, 8), normalize="all", null_kind="identity"),
    "null_bf16": Case(n=2, m=2, k=2, tokens=(10, 5), null_every=3, dtype=torch.bfloat16,
                      backends=tuple(BACKENDS[-1:])),
}
CASES_4 = {
    # expert 3 (rank 3's only expert) gets no row; rank 2's tokens are all null (it sends nothing)
    "null": Case(n=4, m=4, k=2, tokens=(5, 9, 6, 8), dead_expert=3, null_rank=2, null_every=5),
    "top2": Case(n=8, m=0, k=2, tokens=(4, 6, 5, 7), backends=tuple(BACKENDS[-1:])),
}


def make_problem(case: Case, seed: int = 0):
    """Full weights, per-rank inputs and upstream gradients; the same on every process."""
    g = torch.Generator().manual_seed(seed)
    n, m, H, I = case.n, case.m, case.H, case.I
    router = torch.randn(n + m, H, generator=g)
    gate_up = torch.randn(n, 2 * I, H, generator=g) / H ** 0.5
    down = torch.randn(n, H, I, generator=g) / I ** 0.5
    xs = [torch.randn(t, H, generator=g) for t in case.tokens]
    grads = [torch.randn(t, H, generator=g) for t in case.tokens]
    # Feature 1 is a constant 1 on every token: a -30 there silences the dead expert.
    # Feature 0 is 3 on all-null tokens, 0 elsewhere: +-10 there makes every null beat every true.
    router[:, :2] = 0
    if case.dead_expert is not None:
        router[case.dead_expert, 1] = -30
    router[:n, 0], router[n:, 0] = -10, 10
    for r, x in enumerate(xs):
        x[:, 1], x[:, 0] = 1, 0
        if case.null_every:
            x[::case.null_every, 0] = 3
        if case.null_rank == r:
            x[:, 0] = 3
    cast = lambda ts: [t.to(case.dtype) for t in ts]  # noqa: E731
    return (*cast([router, gate_up, down]), cast(xs), grads)


def _worker(rank: int, world: int, init_file: str, cases: dict, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    results = {}
    for name, case in cases.items():
        router, gate_up, down, xs, grads = make_problem(case)
        for backend in case.backends:
            layer = ExpertParallelMoE.from_dense((router, gate_up, down), top_k=case.k,
                                                 normalize=case.normalize,
                                                 null_kind=case.null_kind, backend=backend)
            x = xs[rank].clone().requires_grad_()
            y = layer(x)
            (y.float() * grads[rank]).sum().backward()
            layer.sync_router_grads()
            results[name, backend] = {
                "y": y.detach(), "dx": x.grad, "d_router": layer.router.weight.grad,
                "d_gate_up": layer.gate_up_proj.grad, "d_down": layer.down_proj.grad,
                "stats": asdict(layer.last_stats), "load": float(layer.last_load),
            }
    try:  # n not divisible by W
        ExpertParallelMoE(8, 4, world + 1, 0, 1)
        results["indivisible"] = None
    except ValueError as e:
        results["indivisible"] = str(e)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, cases: dict, tmp_path, timeout_s: float = 120.0) -> list[dict]:
    spawn_ranks(_worker, world, str(tmp_path / "pg_init"), (cases, str(tmp_path)), timeout_s)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def reference_run(case: Case, world: int):
    """The single-process oracle on the full batch: output, grads and routing."""
    router, gate_up, down, xs, grads = make_problem(case)
    x = torch.cat(xs).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (router, gate_up, down)]
    r = ak.reference.route(F.linear(x, leaves[0]), case.k, case.n, case.normalize)
    y = ak.reference.moe_mlp(x, leaves[1], leaves[2], r, case.null_kind)
    (y.float() * torch.cat(grads)).sum().backward()
    return y.detach(), x.grad, [t.grad for t in leaves], r


def expected_stats(case: Case, world: int, r: ak.Routing, element_size: int) -> list[dict]:
    ids = r.topk_ids.long()
    owner = torch.where(ids < case.n, ids // (case.n // world), torch.full_like(ids, -1))
    src = torch.repeat_interleave(torch.arange(world), torch.tensor(case.tokens))[:, None]
    out = []
    for rank in range(world):
        mine = src == rank
        sent = int((mine & (owner >= 0) & (owner != rank)).sum())
        received = int((~mine & (owner == rank)).sum())
        out.append({
            "slots": case.tokens[rank] * case.k, "true_slots": int((mine & (owner >= 0)).sum()),
            "rows_sent": sent, "rows_received": received,
            "bytes_sent": (world - 1) * (case.n // world) * 4 + (sent + received) * case.H * element_size,
        })
    return out


def check_against_reference(world: int, cases: dict, results: list[dict]) -> None:
    for name, case in cases.items():
        y_ref, dx_ref, (d_router, d_gate_up, d_down), r = reference_run(case, world)
        # the case really has what it is meant to exercise
        if case.dead_expert is not None:
            assert int(r.expert_counts[case.dead_expert]) == 0, name
        if case.null_every or case.null_rank is not None:
            assert bool((r.topk_ids >= case.n).all(1).any()), name
        stats = expected_stats(case, world, r, torch.empty((), dtype=case.dtype).element_size())
        atol, rtol = TOL[case.dtype]
        bounds = [0, *torch.tensor(case.tokens).cumsum(0).tolist()]
        for backend in case.backends:
            got = [res[name, backend] for res in results]
            what = f"{name}/{backend}/W={world}"
            for rank, g in enumerate(got):
                sl = slice(bounds[rank], bounds[rank + 1])
                torch.testing.assert_close(g["y"], y_ref[sl], atol=atol, rtol=rtol, msg=what)
                torch.testing.assert_close(g["dx"], dx_ref[sl], atol=atol, rtol=rtol, msg=what)
                torch.testing.assert_close(g["d_router"], d_router, atol=atol, rtol=rtol, msg=what)
                assert g["stats"] == stats[rank], (what, rank)
            torch.testing.assert_close(torch.cat([g["d_gate_up"] for g in got]), d_gate_up,
                                       atol=atol, rtol=rtol, msg=what)
            torch.testing.assert_close(torch.cat([g["d_down"] for g in got]), d_down,
                                       atol=atol, rtol=rtol, msg=what)
            # null slots never travel: rows sent over all ranks = true assignments to remote ranks
            assert sum(g["stats"]["rows_sent"] for g in got) == \
                sum(g["stats"]["rows_received"] for g in got)
    for res in results:
        assert "divisible" in res["indivisible"]


@pytest.mark.slow
def test_expert_parallel_2_ranks(tmp_path):
    check_against_reference(2, CASES_2, run_ranks(2, CASES_2, tmp_path))


@pytest.mark.slow
def test_expert_parallel_4_ranks(tmp_path):
    results = run_ranks(4, CASES_4, tmp_path)
    check_against_reference(4, CASES_4, results)
    for backend in CASES_4["null"].backends:
        assert results[2]["null", backend]["stats"]["true_slots"] == 0  # sends no row at all
        assert results[3]["null", backend]["stats"]["rows_received"] == 0  # computes nothing


# ---- single process (no torch.distributed: W = 1) -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_single_process_matches_moe_mlp(backend):
    case = CASES_2["null"]
    router, gate_up, down, xs, _ = make_problem(case)
    layer = ExpertParallelMoE.from_dense((router, gate_up, down), top_k=case.k, backend=backend)
    assert layer.world_size == 1 and layer.gate_up_proj.shape[0] == case.n
    x = torch.cat(xs)
    layer.null_bias.fill_(0.7)  # the load dial: selection-only bias on the null logits
    y = layer(x)
    bias = torch.tensor([0.0] * case.n + [0.7] * case.m)
    r = ak.route(F.linear(x, router), case.k, case.n, selection_bias=bias, backend="torch")
    torch.testing.assert_close(y, ak.moe_mlp(x, gate_up, down, r, backend="torch"))
    assert layer.last_stats.rows_sent == 0 and layer.last_bytes_sent == 0
    assert layer.last_stats.true_slots == int(r.expert_offsets[-1])
    assert float(layer.last_load) == pytest.approx(float(r.load()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_process_top_p(backend):
    """ak.set_top_p reaches the expert-parallel layer too (every backend routes with it)."""
    case = CASES_2["null"]
    router, gate_up, down, xs, _ = make_problem(case)
    layer = ExpertParallelMoE.from_dense((router, gate_up, down), top_k=case.k, backend=backend)
    x = torch.cat(xs)
    ak.set_top_p(layer, 0.4)
    y = layer(x)
    r = ak.reference.route(F.linear(x, router), case.k, case.n, top_p=0.4)
    torch.testing.assert_close(y, ak.reference.moe_mlp(x, gate_up, down, r), atol=1e-5, rtol=1e-5)
    assert float(layer.last_load) == pytest.approx(float(r.load()))


def test_from_dense_module_layout():
    """A module with HF v5 Mixtral names (``gate.weight``, ``experts.gate_up_proj``, ``top_k``)."""
    case = CASES_2["top2"]
    router, gate_up, down, xs, _ = make_problem(case)
    block = nn.Module()
    block.gate = nn.Linear(case.H, case.n, bias=False)
    block.gate.weight.data.copy_(router)
    block.experts = nn.Module()
    block.experts.gate_up_proj = nn.Parameter(gate_up)
    block.experts.down_proj = nn.Parameter(down)
    block.top_k = case.k
    layer = ExpertParallelMoE.from_dense(block, backend="torch")
    assert layer.top_k == case.k and layer.num_null_experts == 0
    x = xs[0]
    r = ak.reference.route(F.linear(x, router), case.k, case.n)
    torch.testing.assert_close(layer(x), ak.reference.moe_mlp(x, gate_up, down, r))


def test_combine_paths_agree():
    T, k, H = 7, 3, 5
    slots = torch.randperm(T * k)[:12]  # some tokens with 0, some with several true slots
    outputs, weights = torch.randn(12, H), torch.rand(T, k)
    expected = torch.zeros(T, H)
    for i, s in enumerate(slots.tolist()):
        expected[s // k] += weights[s // k, s % k] * outputs[i]
    for compact in (True, False):
        y = combine(outputs, slots, weights, compact=compact)
        torch.testing.assert_close(y, expected)
        assert torch.equal(y, combine(outputs, slots, weights, compact=compact))  # deterministic


def test_validation():
    with pytest.raises(ValueError, match="null_kind"):
        ExpertParallelMoE(8, 4, 4, 2, 2, null_kind="identity")
    with pytest.raises(ValueError, match="top_k"):
        ExpertParallelMoE(8, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="group"):
        ExpertParallelMoE(8, 4, 2, 1, 2, group=object())
    layer = ExpertParallelMoE(8, 4, 2, 1, 2, backend="torch")
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x is"):
        layer(torch.randn(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="top_k"):
        ExpertParallelMoE.from_dense((torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)))
    with pytest.raises(TypeError, match="source"):
        ExpertParallelMoE.from_dense(torch.randn(3, 8), top_k=1)
    assert isinstance(ak.distributed.ExpertParallelMoE, type)
