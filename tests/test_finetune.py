"""The fine-tuning command end to end, shrunk: base top-2 steps, conversion, 2 epochs, outputs."""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from adamoe_kernels.training import comparison, finetune  # noqa: E402


def test_finetune_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # backend="torch": this test is about the command, not the kernels (interpreted here)
    rc = finetune.main(["--quick", "--out", str(out), "--backend", "torch", "--base-steps", "40",
                        "--steps-per-epoch", "8", "--batch-size", "4", "--seq-len", "32",
                        "--eval-windows", "8", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eval loss  : before fine-tune" in printed and "FLOPs saved vs top-2" in printed
    with open(out / "log.json") as f:
        log = json.load(f)
    s = log["summary"]
    assert s["eval_loss"]["after"] < s["eval_loss"]["before"]
    assert s["adamoe"]["num_null_experts"] == 8 and s["adamoe"]["top_k"] == 3
    assert all(0.0 <= L < 3.0 for L in s["final_train_load_per_layer"])
    steps = [r for r in log["steps"] if r["phase"] == "finetune"]
    assert len(steps) == 16
    assert steps[0]["alpha"] == 0.02 and steps[-1]["alpha"] == 0.0001  # AlphaSchedule by epoch
    for name in ("loss.png", "load.png", "flops.png", "vs_control.png"):
        assert os.path.getsize(out / name) > 1000
    assert os.path.exists(out / "model" / "config.json")

    # the top-2 control: fine-tuned first, on the same batches, evaluated on the same windows
    assert "vs control : AdaMoE eval loss" in printed and "verdict    : AdaMoE" in printed
    control = [r for r in log["steps"] if r["phase"] == "baseline_top2"]
    assert len(control) == 16 and all(r["load"] == [2.0, 2.0] for r in control)
    curve = {ph: [p for p in log["eval_curve"] if p["phase"] == ph]
             for ph in ("baseline_top2", "finetune")}
    assert [p["step"] for p in curve["finetune"]] == [p["step"] for p in curve["baseline_top2"]] \
        == list(range(0, 17, 2))                                   # 8 evals per run + step 0
    ev = s["eval_loss"]
    assert curve["baseline_top2"][0]["eval_loss"] == ev["base_top2"] == ev["before"]
    assert curve["baseline_top2"][-1]["eval_loss"] == ev["top2_finetuned"]
    assert curve["finetune"][-1]["eval_loss"] == ev["after"]
    # expert FLOPs: 16 steps x 4*32 tokens x 2 layers x 2 experts x 6 H I, times 3 (fwd + bwd)
    H, I = 64, 128
    assert curve["baseline_top2"][-1]["expert_flops"] == pytest.approx(16 * 128 * 2 * 2 * 6 * H * I * 3)
    mean_load = sum(sum(r["load"]) for r in steps) / (2 * len(steps))
    assert curve["finetune"][-1]["expert_flops"] == pytest.approx(
        16 * 128 * 2 * mean_load * 6 * H * I * 3)
    cmp = s["comparison"]
    assert cmp["eval_loss_gap_pct"] == pytest.approx(
        100 * (ev["after"] / ev["top2_finetuned"] - 1))
    assert cmp["expert_flops_saved_pct"] == pytest.approx(100 * (1 - mean_load / 2))
    reach = cmp["reaches_control"]
    below = [p for p in curve["finetune"] if p["eval_loss"] <= ev["top2_finetuned"]]
    assert (reach is None) == (not below)
    if below:
        assert reach["step"] == below[0]["step"]


def test_comparison_first_reach_and_fractions():
    """``comparison.compare`` on made-up curves with known answers."""
    def point(phase, step, loss, s, f):
        return {"phase": phase, "step": step, "eval_loss": loss, "eval_load": 0.0,
                "train_s": s, "expert_flops": f}

    def steps(phase, n, load, seconds):
        return [{"phase": phase, "load": [load], "train_s": seconds * (i + 1) / n}
                for i in range(n)]

    curve = [point("baseline_top2", 0, 3.0, 0, 0), point("baseline_top2", 4, 2.0, 8, 100),
             point("finetune", 0, 3.0, 0, 0), point("finetune", 2, 2.5, 3, 30),
             point("finetune", 4, 1.9, 6, 60)]
    log = steps("baseline_top2", 4, 2.0, 8.0) + steps("finetune", 4, 1.2, 6.0)
    cmp = comparison.compare(curve, log, tokens_per_step=10)
    assert cmp["reaches_control"] == {"step": 4, "train_seconds": 6, "expert_flops": 60,
                                      "wall_clock_fraction": 0.75, "flops_fraction": 0.6}
    assert cmp["control"]["tokens_per_s"] == 5.0 and cmp["adamoe"]["tokens_per_s"] == 40 / 6
    assert cmp["expert_flops_saved_pct"] == pytest.approx(40.0)
    assert cmp["adamoe"]["mean_train_load"] == pytest.approx(1.2)
    curve[-1]["eval_loss"] = 2.1                                  # never reaches 2.0
    assert comparison.compare(curve, log, 10)["reaches_control"] is None
    assert comparison.compare(curve[2:], log, 10) is None          # no control run


def test_parse_args_quick_shrinks_run():
    cfg = finetune.parse_args(["--quick"])
    assert cfg.num_layers == 2 and cfg.steps_per_epoch <= 25 and cfg.base_steps <= 60
    assert finetune.parse_args([]).out == "runs/finetune"
    assert finetune.parse_args([]).control and not finetune.parse_args(["--no-control"]).control


def test_user_moe_model_gets_its_own_top_k_as_control(tmp_path):
    """``--model PATH`` with a plain transformers Mixtral: the control is that model as it is
    (top-2 of its 8 experts), fine-tuned on the same batches before the AdaMoE conversion."""
    import torch

    torch.manual_seed(0)
    cfg = finetune.RunConfig(hidden_size=32, num_layers=2, intermediate_size=48)
    finetune.tiny_mixtral(cfg, 256).save_pretrained(tmp_path / "mixtral")  # byte vocabulary
    out = tmp_path / "run"
    finetune.main(["--model", str(tmp_path / "mixtral"), "--out", str(out), "--backend", "torch",
                   "--steps-per-epoch", "2", "--batch-size", "2", "--seq-len", "16",
                   "--eval-windows", "2", "--no-progress", "--no-save", "--no-plots"])
    log = json.loads((out / "log.json").read_text())
    control = [r for r in log["steps"] if r["phase"] == "baseline_top2"]
    assert len(control) == 4 and all(r["load"] == [2.0, 2.0] for r in control)
    assert [r["phase"] for r in log["steps"]] == ["baseline_top2"] * 4 + ["finetune"] * 4
    cmp = log["summary"]["comparison"]
    assert cmp["control"]["final_eval_load"] == 2.0
    before = [p for p in log["eval_curve"] if p["step"] == 0]
    assert before[0]["eval_loss"] == before[1]["eval_loss"]  # m = 0 and the conversion tie
