"""bench/pretrain_study.py: one seed reruns bitwise on the CPU backend; the --quick study runs."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
study = importlib.import_module("pretrain_study")
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="C++ extension not built")


@pytest.mark.parametrize("name", ["m8k3-L1", "m8k3-identity"])
def test_one_seed_reruns_bitwise(name):
    shape = study.Shape(hidden=32, intermediate=64, layers=1, seq_len=32, batch=4, eval_windows=4)
    s = next(c for c in study.settings(0.5, 1.0) if c.name == name)
    data = study.corpus()
    a, b = (study.train_run(s, shape, 1, 8, data, backend="cpu", eval_every=4) for _ in range(2))
    assert a["train_losses"] == b["train_losses"]
    assert [p["eval_loss"] for p in a["curve"]] == [p["eval_loss"] for p in b["curve"]]
    assert a["null_bias"] == b["null_bias"] and a["train_load_mean"] == b["train_load_mean"]
    assert a["train_losses"][-1] < a["train_losses"][0]


def test_quick_study_and_doc_table(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = study.main(["--quick", "--no-progress", "--no-plot", "--threads", "1",
                          "--warmup", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(Path(res["json"]).read_text())
    rows = payload["rows"]
    assert {r["budget"] for r in rows} == {"tokens", "time"}
    assert len({r["config"] for r in rows}) == 7
    assert all(r["steps"] == 12 for r in rows if r["budget"] == "tokens")
    steps = payload["meta"]["steps_equal_time"]
    assert all(r["steps"] == steps[r["config"]] for r in rows if r["budget"] == "time")
    doc = tmp_path / "doc.md"
    doc.write_text(f"x\n{study.DOC_START}\nold\n{study.DOC_END}\ny\n")
    study.write_doc(res["json"], doc)
    text = doc.read_text()
    assert "old" not in text and "| m8k3-L1 |" in text and text.endswith(f"{study.DOC_END}\ny\n")
