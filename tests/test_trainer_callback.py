"""ak.AdaMoECallback with transformers' Trainer on a converted tiny Mixtral."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.integrations.hf_models import adamoe_layers  # noqa: E402
from adamoe_kernels.training import finetune as ft  # noqa: E402


class Recorder(transformers.TrainerCallback):
    """Placed before AdaMoECallback, as the Trainer places its reporters."""

    def __init__(self):
        self.logs, self.alphas = [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.alphas.append((state.epoch, model.router_aux_loss_coef))

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


class CheckingTrainer(transformers.Trainer):
    """Records (Trainer loss, LM loss, aux loss) of every training forward."""
    seen = []

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        loss, out = super().compute_loss(model, inputs, return_outputs=True, **kw)
        with torch.no_grad():
            lm = model(**inputs, output_router_logits=False).loss
        self.seen.append((float(loss.detach()), float(lm), float(out.aux_loss.detach()),
                          model.router_aux_loss_coef))
        return (loss, out) if return_outputs else loss


def _data(n=16, seq=32):
    ids = torch.tensor(ft.ByteTokenizer().encode(ft.builtin_text()[:20000]))
    w = ft.windows(ids, seq, n, torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r} for r in w]


def test_trainer_logs_load_sets_alpha_and_adds_aux(tmp_path):
    torch.manual_seed(0)
    cfg = ft.RunConfig(hidden_size=32, intermediate_size=64, num_layers=2, seq_len=32)
    model = ak.convert_model(ft.tiny_mixtral(cfg, 256), 8, 3, backend="cpu")
    rec = Recorder()
    cb = ak.AdaMoECallback(ak.AlphaSchedule(values=(0.5, 0.01), boundaries=(0, 1)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0)
    CheckingTrainer.seen = []
    trainer = CheckingTrainer(model=model, args=args, train_dataset=_data(),
                              callbacks=[rec, cb])
    trainer.train()
    seen = CheckingTrainer.seen
    assert len(seen) == 8
    for loss, lm, aux, alpha in seen:  # the Trainer's loss is LM + α · aux
        assert aux > 0
        assert loss == pytest.approx(lm + alpha * aux, rel=1e-5, abs=1e-6)
    assert [a for _, _, _, a in seen] == [0.5] * 4 + [0.01] * 4
    train_logs = [l for l in rec.logs if "loss" in l]
    assert len(train_logs) == 8
    for l in train_logs:  # the recorder, ahead of the callback in the list, sees the keys
        loads = [l["adamoe/load_layer0"], l["adamoe/load_layer1"]]
        assert all(0 <= v <= 3 for v in loads)
        assert l["adamoe/load"] == pytest.approx(sum(loads) / 2)
        assert l["adamoe/expert_flops_saved"] == pytest.approx(1 - l["adamoe/load"] / 2)
    assert [l["adamoe/alpha"] for l in train_logs] == [0.5] * 4 + [0.01] * 4
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert all("adamoe/load" in h for h in hist)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"] - 0.3  # it learns
    assert model.config.output_router_logits is False  # restored after training


def test_controller_raises_bias_and_plain_model_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = ft.RunConfig(hidden_size=32, intermediate_size=64, num_layers=1, seq_len=32)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    model = ak.convert_model(ft.tiny_mixtral(cfg, 256), 8, 3, backend="cpu")
    cb = ak.AdaMoECallback(target_load=0.2, load_rate=0.1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   callbacks=[cb])
    trainer.train()
    (layer,) = adamoe_layers(model)
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    assert first["adamoe/null_bias"] == pytest.approx(0.2)  # two steps with the load above 0.2
    assert second["adamoe/load"] < first["adamoe/load"] - 0.5  # the bias pulled the load down
    assert float(layer.null_bias) > 0
    plain = transformers.Trainer(model=ft.tiny_mixtral(cfg, 256), args=args,
                                 train_dataset=_data(), callbacks=[ak.AdaMoECallback()])
    with pytest.raises(ValueError, match="no AdaMoE layers"):
        plain.train()


def test_readme_example_trainer_with_peft_lora_on_the_experts(tmp_path):
    """The README's example: PEFT LoRA on the router and the experts' parameters of a converted
    model, trained by ``transformers.Trainer`` with ``ak.AdaMoECallback``."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = ft.RunConfig(hidden_size=32, intermediate_size=64, num_layers=2, seq_len=32)
    model = ak.convert_model(ft.tiny_mixtral(cfg, 256), num_null_experts=8, top_k=3,
                             backend="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert any("experts" in n for n in trainable) and any(".gate.lora" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   callbacks=[ak.AdaMoECallback()])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 8 and all(0 <= h["adamoe/load"] <= 3 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    moved = {n for n, p in model.named_parameters() if n in trainable
             and not torch.equal(p.detach(), before[n])}
    assert any("experts" in n for n in moved) and any(".gate.lora" in n for n in moved)
