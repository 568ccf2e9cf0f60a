"""Regenerate the README's benchmark tables from ``bench/results/*/*.json``.

Writes between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md and touches nothing
else; when the markers are missing (or with ``--stdout``) it prints the tables instead. Every number
comes from the JSON files; for each device the full run is used when there is one, else the quick run.

    python bench/make_readme_table.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load_results(results_dir: Path) -> dict:
    """``{device_dir: {name: payload}}``, the full run preferred over the quick one.

    ``name`` is the file's stem without ``_quick`` (``layer_speedup``, ``finetune_step_frozen_experts``).
    """
    found: dict = {}
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta = payload.get("meta", {})
        if not meta.get("script") or "rows" not in payload:
            continue
        script = path.stem.removesuffix("_quick")
        payload["_file"] = path
        slot = found.setdefault(path.parent.name, {})
        have = slot.get(script)
        if have is None or (have["meta"].get("quick") and not meta.get("quick")):
            slot[script] = payload
    return found


def _x(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}×"


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _source(payload, repo_root: Path) -> str:
    m = payload["meta"]
    try:
        rel = payload["_file"].relative_to(repo_root)
    except ValueError:
        rel = payload["_file"].name
    bits = [f"backend `{m.get('backend')}`", m.get("dtype"), f"torch {m.get('torch')}"]
    if m.get("triton"):
        bits.append(f"triton {m['triton']}")
    if m.get("cpu_threads"):
        bits.append(f"{m['cpu_threads']} CPU thread{'s' if m['cpu_threads'] > 1 else ''}")
    if m.get("git_commit"):
        bits.append(f"commit {m['git_commit']}")
    if m.get("quick"):
        bits.append("`--quick`")
    bits.append(str(m.get("timestamp", ""))[:10])
    return f"{', '.join(b for b in bits if b)} ([`{rel}`]({rel}))"


def layer_table(payload) -> list[str]:
    rows = payload["rows"]
    configs = [c for c in ("m8k3", "m16k4") if any(r["config"] == c for r in rows)]
    has_bwd = any("speedup_fwdbwd" in r for r in rows)
    out = []
    for shape, T in sorted({(r["shape"], r["T"]) for r in rows}, key=lambda g: (g[0], g[1])):
        group = [r for r in rows if r["shape"] == shape and r["T"] == T]
        base = next((r for r in group if r["config"] == "top2"), None)
        if base is None:
            continue
        times = f"top-2: {_f(base.get('fwd_ms'))} ms fwd" + (
            f", {_f(base.get('fwdbwd_ms'))} ms fwd+bwd" if has_bwd else "")
        out.append(f"*{shape}* (H={base['H']}, I={base['I']}, n={base['n']}), T={T}; {times}.")
        out.append("")
        # bound: what this machine allows at L (FLOP ideal until the weight reads dominate; the
        # floor setting of bench/layer_speedup.py), from the first config's row at that target.
        has_bound = any("bound_speedup_fwd" in r for r in group)
        head = ["L target", "ideal 2/L"] + (["bound fwd"] + (["bound fwd+bwd"] if has_bwd else [])
                                            if has_bound else [])
        for c in configs:
            head += [f"{c} L", f"{c} fwd"] + ([f"{c} fwd+bwd"] if has_bwd else [])
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        targets = {r["load_target"] for r in group if r["config"] in configs}
        for target in sorted(targets, reverse=True):
            cells = [f"{target:g}", _x(2.0 / target)]
            if has_bound:
                first = next((r for c in configs for r in group
                              if r["config"] == c and r["load_target"] == target), {})
                cells.append(_x(first.get("bound_speedup_fwd")))
                if has_bwd:
                    cells.append(_x(first.get("bound_speedup_fwdbwd")))
            for c in configs:
                r = next((r for r in group if r["config"] == c and r["load_target"] == target), None)
                if r is None:
                    cells += ["-", "-"] + (["-"] if has_bwd else [])
                    continue
                cells += [_f(r["load"]), _x(r.get("speedup_fwd"))]
                if has_bwd:
                    cells.append(_x(r.get("speedup_fwdbwd")))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def kernels_table(payload) -> list[str]:
    rows = payload["rows"]
    out = []
    route = [r for r in rows if r["part"] == "route"]
    if route:
        out += ["| routing: T | config | `ak.route` µs | torch ops µs | speedup |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {r['T']} | {r['config']} | {_f(r['adamoe_us'], 0)} | {_f(r['torch_us'], 0)} | "
                f"{_x(r['speedup'])} |" for r in route]
        out.append("")
    gemm = [r for r in rows if r["part"] == "gemm"]
    if gemm:
        g0 = gemm[0]
        out.append(f"Expert MLP, H={g0['H']}, I={g0['I']}, T={g0['T']}, TFLOP/s of the true "
                   "assignments (fwd / fwd+bwd):")
        out.append("")
        settings = sorted({(r["config"], r["load_target"]) for r in gemm}, key=lambda s: -s[1])
        head = ["impl"] + [f"{c} L={t:g}" for c, t in settings]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for impl in dict.fromkeys(r["impl"] for r in gemm):
            cells = [impl]
            for c, t in settings:
                r = next((r for r in gemm if r["impl"] == impl and r["config"] == c
                          and r["load_target"] == t), None)
                if r is None or "fwd_tflops" not in r:
                    cells.append("skipped")
                else:
                    cells.append(f"{_f(r['fwd_tflops'], 3)} / {_f(r.get('fwdbwd_tflops'), 3)}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    sync = payload.get("sync_check")
    if sync and sync.get("checked"):
        out.append(f"Host-sync check (`set_sync_debug_mode(\"error\")`): "
                   f"{'no host sync' if not sync.get('host_sync') else 'SYNC: ' + sync.get('message', '')}.")
        out.append("")
    return out


def finetune_table(payload) -> list[str]:
    m = payload["meta"]
    s = m.get("sizes", {})
    model = str(m.get("model", "")).replace(" (random init)", "")
    out = [f"{model}, {s.get('layers')} layers, H={s.get('hidden')}, I={s.get('intermediate')}, "
           f"{m.get('tokens_per_step')} tokens/step:", "",
           "| setting | L | step ms | tokens/s | speedup vs top-2 |", "| --- | --- | --- | --- | --- |"]
    for r in payload["rows"]:
        out.append(f"| {r['config']} | {_f(r['load'])} | {_f(r['step_ms'], 1)} | {_f(r['tokens_per_s'], 0)} | "
                   f"{_x(r.get('speedup'))} |")
    out.append("")
    return out


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


def finetune_parallel_table(payload) -> list[str]:
    """``finetune_step.py --nproc N``: tokens/s per strategy, bytes of the expert all-to-alls."""
    m = payload["meta"]
    s = m.get("sizes", {})
    out = [f"MixtralForCausalLM, {s.get('layers')} layers, H={s.get('hidden')}, "
           f"I={s.get('intermediate')}, {m.get('tokens_per_step')} tokens/step over "
           f"{m.get('nproc')} processes ({m.get('process_group_backend')}"
           + (f", {m['threads_per_rank']} thread(s) each" if m.get("threads_per_rank") else "")
           + "); expert-parallel bytes per step: forward + backward all-to-alls, all ranks, at the "
           "load of the last timed step:", "",
           "| strategy | setting | L | L last step | step ms | tokens/s | speedup vs top-2 | "
           "EP MiB/step | EP MiB/step if nulls were shipped |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["rows"]:
        out.append(f"| {r['strategy']} | {r['config']} | {_f(r['load'])} | "
                   f"{_f(r.get('load_after_steps'))} | {_f(r['step_ms'], 1)} | "
                   f"{_f(r['tokens_per_s'], 0)} | {_x(r.get('speedup'))} | "
                   f"{_mib(r.get('bytes_per_step'))} | {_mib(r.get('bytes_per_step_nulls_shipped'))} |")
    out.append("")
    return out


def load_dial_table(payload) -> list[str]:
    m = payload["meta"]
    info, s = m.get("adamoe", {}), m.get("model_sizes", {})
    evals = ((m.get("model_source") or {}).get("finetune_summary") or {}).get("eval_loss", {})
    rows = payload["rows"]
    nat = next((r for r in rows if r["sweep"] == "natural"), None)
    head = (f"Tiny fine-tuned AdaMoE Mixtral (m={info.get('num_null_experts')}, "
            f"k={info.get('top_k')}, n={info.get('num_experts')}, H={s.get('hidden')}, "
            f"{s.get('layers')} layers; {m.get('eval_tokens')} held-out tokens; forward of "
            f"{m.get('tokens_per_timed_batch')} tokens)")
    if evals.get("base_top2") is not None:
        head += f"; the top-2 base model before fine-tuning: eval loss {_f(evals['base_top2'], 3)}"
    if evals.get("top2_finetuned") is not None:
        head += f", top-2 fine-tuned on the same batches: {_f(evals['top2_finetuned'], 3)}"
    out = [head + ":", "",
           "| point | L reached | eval loss | Δ loss vs as-trained | fwd ms | speedup vs as-trained |",
           "| --- | --- | --- | --- | --- | --- |"]
    names = {"natural": "as trained (bias 0)", "top2_same_weights": "top-2, null experts removed"}
    for r in rows:
        label = names.get(r["sweep"]) or (f"dial L*={r['target_load']:g}" if r["sweep"] == "load_dial"
                                          else f"top-p {r['top_p']:g}")
        delta = r["eval_loss"] - nat["eval_loss"] if nat else None
        out.append(f"| {label} | {_f(r['load'])} | {_f(r['eval_loss'], 3)} | "
                   f"{'-' if delta is None else f'{delta:+.3f}'} | {_f(r.get('fwd_ms'), 1)} | "
                   f"{_x(r.get('speedup_vs_natural'))} |")
    out.append("")
    return out


def generate_table(payload) -> list[str]:
    """``bench/generate.py``: decode tokens/s per batch and load, top-2 (eager, ``grouped_mm``)
    next to m8k3 at L; the ratio of bytes read per step; compiled (static cache) over eager."""
    m, rows = payload["meta"], payload["rows"]
    s = m.get("sizes", {})
    eager = [r for r in rows if not r.get("compiled")]
    comp = [r for r in rows if r.get("compiled") and r.get("decode_tok_s")]
    attns = list(dict.fromkeys(c.get("attn", "sdpa") for c in comp)) or ["sdpa"]
    bw = m.get("bandwidth") or {}
    bw_text = f"copy bandwidth {_f(bw.get('gb_s'), 1)} GB/s"
    if len(bw.get("samples_gb_s") or []) > 1:  # sampled around each batch (bench/generate.py)
        bw_text += (f" (median of {len(bw['samples_gb_s'])} copies, {_f(bw['min_gb_s'], 1)}–"
                    f"{_f(bw['max_gb_s'], 1)}; each batch held to the copies around it)")
    if m.get("decode_linears"):
        bw_text += ("; both models' dense layers (and AdaMoE's routers) on "
                    "`ak.use_decode_linears`")
    out = [f"{str(m.get('model', '')).replace(' (random init)', '')}, prompt {s.get('prompt')}, "
           f"{s.get('new_tokens')} new tokens, greedy `model.generate` with a KV cache; bytes ratio "
           "= bytes read per decode step, top-2 / AdaMoE (experts touched + the rest); "
           f"{bw_text}; compiled = static cache, the decode step under "
           "`torch.compile` (with transformers' attention implementation "
           f"{' / '.join(attns)}), over the eager (dynamic cache, sdpa) tok/s:", "",
           "| B | L target | L decode | top-2 eager tok/s | top-2 grouped_mm tok/s | AdaMoE tok/s "
           "| vs top-2 grouped_mm | bytes ratio | prefill ms (AdaMoE / top-2 grouped_mm) "
           f"| compiled vs eager ({' / '.join(attns)}) |",
           "|" + " --- |" * 10]
    differ = []  # compiled rows whose tokens are not the eager run's
    for B in sorted({r["batch"] for r in eager}):
        group = [r for r in eager if r["batch"] == B]
        top = {r["impl"]: r for r in group if r["config"] == "top2"}
        gm, te = top.get("grouped_mm"), top.get("eager")
        for r in sorted((r for r in group if r["config"] != "top2"), key=lambda r: -r["load_target"]):
            cells = []
            for a in attns:
                c = next((c for c in comp if c["batch"] == B and c["setting"] == r["setting"]
                          and c.get("attn", "sdpa") == a), None)
                mark = ""
                if c is not None and c.get("same_tokens_as_eager") is False:
                    mark = "¹"
                    differ.append(c)
                cells.append(_x((c or {}).get("speedup_vs_eager")) + mark)
            vs = (r["decode_tok_s"] / gm["decode_tok_s"]
                  if gm and gm.get("decode_tok_s") and r.get("decode_tok_s") else None)
            out.append(
                f"| {B} | {r['load_target']:g} | {_f(r.get('load_decode'))} "
                f"| {_f((te or {}).get('decode_tok_s'), 1)} | {_f((gm or {}).get('decode_tok_s'), 1)} "
                f"| {_f(r.get('decode_tok_s'), 1)} | {_x(vs)} | {_x(r.get('bytes_ratio_vs_top2'))} "
                f"| {_f(r.get('prefill_ms'), 1)} / {_f((gm or {}).get('prefill_ms'), 1)} "
                f"| {' / '.join(cells)} |")
    out.append("")
    top2c = [c for c in comp if c["config"] == "top2"]
    differ += [c for c in top2c if c.get("same_tokens_as_eager") is False]
    if top2c:
        out.append("Top-2 `grouped_mm` compiled vs eager: " + ", ".join(
            f"B={c['batch']} {c.get('attn', 'sdpa')} {_x(c.get('speedup_vs_eager'))}"
            + ("¹" if c.get("same_tokens_as_eager") is False else "") for c in top2c) + ".")
    agree = [c["token_agreement_vs_eager_static"] for c in differ
             if c.get("token_agreement_vs_eager_static") is not None]
    if differ:
        out.append(f"¹ the compiled run's greedy tokens are not the eager run's ({m.get('dtype')}"
                   + (f"; share of tokens equal to the eager static-cache run's: "
                      f"{min(agree):.2f}-{max(agree):.2f}" if agree else "") + ").")
    out += _compiled_profile_line(comp)
    if top2c or differ:
        out.append("")
    return out


def _compiled_profile_line(comp) -> list[str]:
    """Where a compiled batch-1 decode step goes (``bench/generate.py``'s profile): AdaMoE at
    its lowest load next to top-2, ms per step by phase."""
    prof = [c for c in comp if c["batch"] == 1 and c.get("profile")]
    ada = sorted((c for c in prof if c["config"] != "top2"), key=lambda c: c["load_target"])
    low = [c for c in ada if c["load_target"] == ada[0]["load_target"]] if ada else []
    pair = low + [c for c in prof if c["config"] == "top2"]
    if not pair:
        return []
    names = " / ".join(f"{c['setting']} {c.get('attn', 'sdpa')}" for c in pair)
    phases = pair[0]["profile"]["per_step_ms"]
    parts = [f"{k.replace('_', ' ')} " + " / ".join(_f(c["profile"]["per_step_ms"].get(k), 2)
                                                     for c in pair) for k in phases]
    return [f"Compiled decode step at B=1, torch.profiler self CPU ms per step ({names} "
            f"attention; the profiler inflates small ops): " + ", ".join(parts) + "."]


def render(results: dict, repo_root: Path) -> str:
    if not results:
        return "_No results yet: run the scripts in `bench/`._\n"
    lines = ["(generated by `python bench/make_readme_table.py` from `bench/results/*/*.json`; "
             "speedup = t(top-2) / t(AdaMoE at load L), ideal 2/L; see `docs/benchmarks.md`)", ""]
    for device, scripts in sorted(results.items()):
        lines += [f"#### {device}", ""]
        for name in sorted(k for k in scripts if k.startswith("layer_speedup")):
            p = scripts[name]
            lines += [f"Layer speedup over top-2 — {_source(p, repo_root)}:", ""] + layer_table(p)
        if "kernels" in scripts:
            p = scripts["kernels"]
            lines += [f"Kernels — {_source(p, repo_root)}:", ""] + kernels_table(p)
        for name in sorted(k for k in scripts if k.startswith("finetune_step")):
            p = scripts[name]
            if (p["meta"].get("nproc") or 1) > 1:
                lines += [f"Training step on {p['meta']['nproc']} processes (DDP, FSDP2, expert "
                          f"parallel) — {_source(p, repo_root)}:", ""] + finetune_parallel_table(p)
                continue
            bits = []
            if p["meta"].get("impl") == "convert_model" and "Mixtral" in str(p["meta"].get("model")):
                bits.append("`ak.convert_model`")
            if p["meta"].get("freeze_experts"):
                bits.append("expert weights frozen")
            what = f" ({', '.join(bits)})" if bits else ""
            lines += [f"Training step{what} — {_source(p, repo_root)}:", ""] + finetune_table(p)
        for name in sorted(k for k in scripts if k.startswith("generate")):
            p = scripts[name]
            lines += [f"Generation (decode) — {_source(p, repo_root)}:", ""] + generate_table(p)
        if "load_dial" in scripts:
            p = scripts["load_dial"]
            lines += [f"Load dial and top-p at inference (`bench/load_dial.py`) — "
                      f"{_source(p, repo_root)}:", ""] + load_dial_table(p)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the markers; False (nothing written) when they are missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + table + text[j:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(BENCH_DIR / "results"), help="results folder")
    p.add_argument("--readme", default=str(BENCH_DIR.parent / "README.md"))
    p.add_argument("--stdout", action="store_true", help="print the tables; do not edit the README")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    table = render(load_results(Path(args.results)), readme.resolve().parent)
    if args.stdout or not update_readme(readme, table):
        if not args.stdout:
            print(f"{readme}: markers {START} / {END} not found; the tables:", file=sys.stderr)
        print(table)
        return table
    print(f"updated {readme}")
    return table


if __name__ == "__main__":
    main()
