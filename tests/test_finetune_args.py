"""adamoe-finetune checks every argument up front (issue 22, item 7): a bad one exits with code 2
and a message naming it, before any model is built or trained."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adamoe_kernels.training import finetune

QUICK = ["--quick", "--base-steps", "2", "--steps-per-epoch", "2", "--batch-size", "2",
         "--seq-len", "16", "--eval-windows", "2", "--no-progress", "--no-plots", "--no-save"]


BAD = [
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-windows", "0"], "--eval-windows"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch"),
    (["--seq-len", "0"], "--seq-len"),
    (["--epochs", "0"], "--epochs"),
    (["--base-steps", "-1"], "--base-steps"),
    (["--num-null-experts", "-1"], "--num-null-experts"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "17", "-m", "8"], "--top-k"),          # n = 8 true + 8 null
    (["--target-load", "0"], "--target-load"),
    (["--target-load", "4", "-k", "3"], "--target-load"),
    (["--target-load", "1", "-m", "0", "-k", "2"], "--target-load"),
    (["--lr", "0"], "--lr"),
    (["--base-lr", "-1"], "--base-lr"),
    (["--load-rate", "0"], "--load-rate"),
    (["--model", "{tmp}/nowhere"], "--model"),
    (["--model", "{tmp}/moe", "-m", "1", "-k", "4"], "--top-k"),  # the dir's 2 experts + 1 null
    (["--text", "{tmp}/missing.txt"], "--text"),
    (["--resume", "{tmp}/no-checkpoint"], "--resume"),
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_exits_2_naming_it(tmp_path, capsys, args, flag):
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps({"num_local_experts": 2}))
    (tmp_path / "no-checkpoint").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        finetune.main(QUICK + ["--out", str(tmp_path / "out")] + args)
    assert exc.value.code == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert flag in err and "Repo id" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--eval-windows"])
def test_rows_not_divisible_by_world_size_exit_2(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        finetune.parse_args(QUICK + [flag, "3"])
    assert exc.value.code == 2
    assert f"{flag} (3) must be divisible" in capsys.readouterr().err


def test_adamoe_model_keeps_its_own_routing(tmp_path):
    """--top-k is not checked against an already-converted model's experts (it keeps its own)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_local_experts": 2,
                                                             "adamoe": {"kind": "moe"}}))
    cfg = finetune.parse_args(QUICK + ["--model", str(tmp_path / "m"), "-k", "9", "-m", "0"])
    assert cfg.top_k == 9


def test_corrupt_resume_path_one_line_error(tmp_path):
    """An explicit --resume PATH whose manifest is broken: exit code 1, one line, no traceback."""
    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{truncated")
    env = dict(os.environ, PYTHONPATH=str(Path(finetune.__file__).parents[2]))
    r = subprocess.run([sys.executable, "-m", "adamoe_kernels.training.finetune", *QUICK,
                        "--backend", "torch", "--out", str(tmp_path / "out"),
                        "--resume", str(ckpt)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"adamoe-finetune: error: --resume {ckpt}" in r.stderr


def test_resume_from_final_checkpoint_nothing_left(tmp_path, capsys):
    """Resuming the final checkpoint (issue 22, item 10b): says so, no '0 tokens/s' speed."""
    args = QUICK + ["--backend", "torch", "--epochs", "1", "--out", str(tmp_path),
                    "--save-every", "1", "--keep-last", "1"]
    first = finetune.run(finetune.parse_args(args))
    assert first["finetune_tokens_per_s"] > 0
    capsys.readouterr()
    again = finetune.run(finetune.parse_args(args + ["--resume"]))
    out = capsys.readouterr().out
    assert again["finetune_tokens_per_s"] is None
    assert "nothing left to train: resumed from the final checkpoint" in out
    assert not re.search(r"(?<![\d.])0 tokens/s", out)  # (the control's line has its own)
