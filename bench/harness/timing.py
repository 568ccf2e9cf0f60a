"""Timing: ``bench_fn`` for one callable, ``bench_many`` for callables compared with each other.

On CUDA ``bench_fn`` is ``triton.testing.do_bench`` (CUDA-event timing, L2 flushed, median of its
repetitions; CUDA events directly when triton is missing) and ``bench_many`` interleaves the
callables round by round, each call between two CUDA events after an L2 flush, and takes each
one's median; both spend about ``CUDA_BUDGET`` milliseconds of warm-up and repetitions per
callable (``--cuda-warmup-ms``/``--cuda-rep-ms``). On CPU: the median of ``--reps`` calls timed
with ``time.perf_counter`` after ``--warmup`` untimed calls.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch

# CUDA: milliseconds of warm-up and of timed repetitions per callable (do_bench's defaults).
CUDA_BUDGET = {"warmup_ms": 25.0, "rep_ms": 100.0}
CUDA_MIN_ROUNDS, CUDA_MAX_ROUNDS = 3, 200
_L2_FLUSH_BYTES = 256 << 20  # larger than any L2 (H200: 60 MB), as do_bench's cache clear


def set_cuda_budget(warmup_ms: float | None = None, rep_ms: float | None = None) -> None:
    """Set the CUDA warm-up and repetition time per callable (``--cuda-*-ms``)."""
    if warmup_ms is not None:
        CUDA_BUDGET["warmup_ms"] = float(warmup_ms)
    if rep_ms is not None:
        CUDA_BUDGET["rep_ms"] = float(rep_ms)


def bench_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5,
             grad_to_none: Sequence[torch.Tensor] | None = None) -> dict:
    """Time ``fn`` and return ``{"ms": median, "ms_min", "ms_p20", "ms_p80", "n"}`` in milliseconds.

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call (fwd+bwd timings).
    CUDA: ``triton.testing.do_bench`` (``warmup``/``reps`` are ignored: it runs
    ``CUDA_BUDGET`` ms of warm-up and of repetitions). CPU: ``warmup`` untimed calls, then
    ``reps`` timed calls.
    """
    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            med, p20, p80 = do_bench(call, warmup=CUDA_BUDGET["warmup_ms"], rep=CUDA_BUDGET["rep_ms"],
                                     quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
            return {"ms": med, "ms_min": None, "ms_p20": p20, "ms_p80": p80, "n": None}
        for _ in range(max(warmup, 3)):
            call()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(reps, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return _summary(times)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def bench_many(fns: dict, device: torch.device, *, warmup: int = 2, reps: int = 5,
               on_round: Callable[[], None] | None = None, max_spread: float = 1.5,
               retries: int = 2) -> dict:
    """Time several ``{key: (fn, grad_to_none)}`` that are to be compared with each other.

    The calls are interleaved (round-robin: every round calls each ``fn`` once), so a change in
    the machine's state during the run (load, clocks, temperature) hits every candidate alike.
    On CPU, if another process disturbed the run (some key's p80/p20 above ``max_spread``), the
    rounds are repeated up to ``retries`` times and the least disturbed attempt is kept
    (``attempts`` in each timing); ``on_round`` is called after each round (progress). On CUDA
    see ``_bench_many_cuda``. Returns ``{key: timing}`` as ``bench_fn`` does.
    """
    if device.type == "cuda":
        return _bench_many_cuda(fns, device, on_round)

    for _ in range(warmup):
        for fn, grads in fns.values():
            _call(fn, grads)
        if on_round:
            on_round()
    best, best_spread = None, math.inf
    for attempt in range(1, retries + 2):
        times = {key: [] for key in fns}
        for _ in range(max(reps, 1)):
            for key, (fn, grads) in fns.items():
                t0 = time.perf_counter()
                _call(fn, grads)
                times[key].append((time.perf_counter() - t0) * 1e3)
            if on_round and attempt == 1:
                on_round()
        result = {key: _summary(v) for key, v in times.items()}
        spread = max(t["ms_p80"] / t["ms_p20"] for t in result.values())
        if spread < best_spread:
            best, best_spread = result, spread
        if spread <= max_spread or reps < 3:
            break
    for t in best.values():
        t["attempts"] = attempt
    return best


def _call(fn, grads):
    for t in grads or ():
        t.grad = None
    fn()


def _bench_many_cuda(fns: dict, device: torch.device, on_round=None) -> dict:
    """Interleaved CUDA-event timing: every round calls each ``fn`` once (the order alternates
    between rounds), each call after an L2 flush and between two events; medians per key.

    One untimed call per ``fn`` first (compiles), then one timed call each estimates the round
    time; the warm-up rounds fill ``CUDA_BUDGET["warmup_ms"]`` per fn and the timed rounds
    ``CUDA_BUDGET["rep_ms"]`` per fn (at least ``CUDA_MIN_ROUNDS``). ``on_round`` is called once
    per key at the end (progress bars count keys on CUDA).
    """
    keys = list(fns)
    for key in keys:
        _call(*fns[key])
    torch.cuda.synchronize(device)
    est = {}
    for key in keys:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _call(*fns[key])
        end.record()
        end.synchronize()
        est[key] = max(start.elapsed_time(end), 1e-3)
    round_ms = sum(est.values())
    warm_rounds = min(CUDA_MAX_ROUNDS, int(CUDA_BUDGET["warmup_ms"] * len(keys) / round_ms))
    rounds = max(CUDA_MIN_ROUNDS,
                 min(CUDA_MAX_ROUNDS, int(CUDA_BUDGET["rep_ms"] * len(keys) / round_ms)))
    for _ in range(warm_rounds):
        for key in keys:
            _call(*fns[key])
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = {key: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    for _ in range(rounds)] for key in keys}
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            fn, grads = fns[key]
            for t in grads or ():
                t.grad = None
            flush.zero_()
            start, end = events[key][r]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    out = {}
    for key in keys:
        out[key] = _summary([s.elapsed_time(e) for s, e in events[key]])
        out[key]["rounds"] = rounds
        if on_round:
            on_round()
    return out


def bench_rounds(n_fns: int, device: torch.device, warmup: int, reps: int) -> int:
    """How many times ``bench_many`` calls ``on_round`` (to size a progress bar)."""
    return n_fns if device.type == "cuda" else warmup + max(reps, 1)


def _summary(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"ms": statistics.median(s), "ms_min": s[0], "ms_p20": q(0.2), "ms_p80": q(0.8), "n": len(s)}
