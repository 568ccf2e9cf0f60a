"""AdaMoE against its top-k control: the question a fine-tune answers — *for the same wall-clock,
or the same expert FLOPs, is the AdaMoE model better or worse than the model it came from,
fine-tuned alike?*

``adamoe-finetune`` fine-tunes both on the same batches and evaluates both on the same held-out
windows every few steps (``eval_curve`` points: ``phase``, ``step``, ``eval_loss``,
``eval_load``, ``train_s`` = training seconds so far, evals left out, ``expert_flops`` = expert
FLOPs so far, forward + backward). This module turns the two curves into the summary's
``comparison`` block and the three-panel plot (eval loss vs step, vs wall-clock, vs expert FLOPs).
"""

from __future__ import annotations

import os

CONTROL, ADAMOE = "baseline_top2", "finetune"  # the phases' names in the run's log


def curve(points: list, phase: str) -> list:
    """The eval points of one phase (``CONTROL`` or ``ADAMOE``), in step order."""
    return [p for p in points if p["phase"] == phase]


def _run_stats(points: list, steps: list, tokens_per_step: int) -> dict:
    last = points[-1]
    loads = [sum(r["load"]) / len(r["load"]) for r in steps]
    seconds = steps[-1]["train_s"] if steps else last["train_s"]
    return {"final_eval_loss": last["eval_loss"], "final_eval_load": last["eval_load"],
            "mean_train_load": sum(loads) / len(loads) if loads else None,
            "train_seconds": seconds, "expert_flops": last["expert_flops"],
            "tokens_per_s": len(steps) * tokens_per_step / seconds if seconds > 0 else None}


def first_reach(points: list, target: float) -> dict | None:
    """The first of ``points`` (one phase's eval points) at or below ``target`` (None if none)."""
    for p in points:
        if p["eval_loss"] <= target:
            return p
    return None


def compare(eval_curve: list, log: list, tokens_per_step: int) -> dict | None:
    """The ``comparison`` block of the summary (None without a control run).

    ``reaches_control``: the first AdaMoE eval point at or below the control's final eval loss,
    with its step, training seconds and expert FLOPs as fractions of the control's whole run;
    None when AdaMoE does not get there within the run."""
    control, adamoe = curve(eval_curve, CONTROL), curve(eval_curve, ADAMOE)
    if not control or not adamoe:
        return None
    c = _run_stats(control, [r for r in log if r["phase"] == CONTROL], tokens_per_step)
    a = _run_stats(adamoe, [r for r in log if r["phase"] == ADAMOE], tokens_per_step)
    hit = first_reach(adamoe, c["final_eval_loss"])
    reach = None
    if hit is not None:
        reach = {"step": hit["step"], "train_seconds": hit["train_s"],
                 "expert_flops": hit["expert_flops"],
                 "wall_clock_fraction": hit["train_s"] / c["train_seconds"]
                 if c["train_seconds"] > 0 else None,
                 "flops_fraction": hit["expert_flops"] / c["expert_flops"]
                 if c["expert_flops"] > 0 else None}
    return {
        "control": c, "adamoe": a,
        "eval_loss_gap_pct": 100 * (a["final_eval_loss"] / c["final_eval_loss"] - 1),
        "expert_flops_saved_pct": 100 * (1 - a["expert_flops"] / c["expert_flops"])
        if c["expert_flops"] > 0 else None,
        "tokens_per_s_ratio": a["tokens_per_s"] / c["tokens_per_s"]
        if a["tokens_per_s"] and c["tokens_per_s"] else None,
        "reaches_control": reach,
    }


def summary_lines(cmp: dict) -> list[str]:
    """The summary's lines about the control (``compare``'s block)."""
    c, a = cmp["control"], cmp["adamoe"]

    def speed(r):
        return f"{r['tokens_per_s']:.0f} tokens/s" if r["tokens_per_s"] else "- tokens/s"

    ratio = f" ({cmp['tokens_per_s_ratio']:.2f}x)" if cmp["tokens_per_s_ratio"] else ""
    saved = cmp["expert_flops_saved_pct"]
    lines = [
        f"  control    : top-{round(c['final_eval_load'])} fine-tuned on the same batches: "
        f"eval loss "
        f"{c['final_eval_loss']:.4f}, load {c['mean_train_load']:.2f}, {speed(c)}, "
        f"{c['train_seconds']:.0f} s",
        f"  vs control : AdaMoE eval loss {a['final_eval_loss']:.4f} "
        f"({cmp['eval_loss_gap_pct']:+.2f}%), load {a['mean_train_load']:.2f}, {speed(a)}{ratio}, "
        f"{a['train_seconds']:.0f} s"
        + (f", {saved:.1f}% fewer expert FLOPs" if saved is not None else ""),
    ]
    reach = cmp["reaches_control"]
    if reach is None:
        lines.append("  verdict    : AdaMoE does not reach the control's final eval loss within "
                     "the run")
    else:
        wall, flops = reach["wall_clock_fraction"], reach["flops_fraction"]
        lines.append(
            f"  verdict    : AdaMoE reaches the control's final eval loss at step {reach['step']}"
            + (f", at {100 * wall:.0f}% of its wall-clock" if wall is not None else "")
            + (f" and {100 * flops:.0f}% of its expert FLOPs" if flops is not None else ""))
    return lines


def plot(path: str, eval_curve: list) -> str | None:
    """Eval loss of AdaMoE and its control vs optimizer step, training seconds and expert FLOPs
    (one PNG, three panels); None without both curves."""
    control, adamoe = curve(eval_curve, CONTROL), curve(eval_curve, ADAMOE)
    if not control or not adamoe:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    axes_x = (("step", "optimizer step", 1.0), ("train_s", "training wall-clock (s)", 1.0),
              ("expert_flops", "expert FLOPs (fwd + bwd, TFLOP)", 1e-12))
    for ax, (key, label, scale) in zip(axes, axes_x):
        top_k = round(control[-1]["eval_load"])  # m = 0: every token uses its k experts
        for points, name, style in ((control, f"top-{top_k} control", "--"),
                                    (adamoe, "AdaMoE", "-")):
            ax.plot([p[key] * scale for p in points], [p["eval_loss"] for p in points], style,
                    marker="o", ms=3, label=name)
        ax.axhline(control[-1]["eval_loss"], color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out eval loss (nats / token)")
    axes[0].legend()
    fig.suptitle("AdaMoE vs its control on the same batches and eval windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
