"""The fine-tuning command end to end, shrunk: base top-2 steps, conversion, 2 epochs, outputs."""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from adamoe_kernels.training import finetune  # noqa: E402


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
    for name in ("loss.png", "load.png", "flops.png"):
        assert os.path.getsize(out / name) > 1000
    assert os.path.exists(out / "model" / "config.json")


def test_parse_args_quick_shrinks_run():
    cfg = finetune.parse_args(["--quick"])
    assert cfg.num_layers == 2 and cfg.steps_per_epoch <= 25 and cfg.base_steps <= 60
    assert finetune.parse_args([]).out == "runs/finetune"
