"""transformers integration: convert_model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), add_mo_lora
(Llama), save/reload, generate, training, PEFT, torch.compile. Tiny random configs, no downloads.

Tests about the integration logic pass ``backend="torch"``; the kernels themselves (the default
backend, the Triton interpreter here) run in the m=0 equality, block and compile tests.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.integrations import (AdaMoESparseMoeBlock, add_mo_lora,  # noqa: E402
                                         convert_model, expert_load, from_pretrained)
from adamoe_kernels.integrations.hf_models import adamoe_layers  # noqa: E402

V, S = 64, 8
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
              experts_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON,
                                                                      num_local_experts=4))


def _qwen2():  # shared expert; layer 1 dense; unnormalised top-k
    cfg = transformers.Qwen2MoeConfig(**COMMON, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=48, num_experts=4,
                                      norm_topk_prob=False, mlp_only_layers=[1])
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3():
    cfg = transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=64, num_experts=4,
                                      norm_topk_prob=True, head_dim=8)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**COMMON, num_experts=4))


def _llama():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()
                                      if k != "experts_implementation"})
    return transformers.LlamaForCausalLM(cfg)


ARCHS = {"mixtral": _mixtral, "qwen2_moe": _qwen2, "qwen3_moe": _qwen3, "olmoe": _olmoe}


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, S), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    return ids, mask


def _break_ties(model, scale=0.05):
    """Copied router rows tie exactly with their true rows; perturb them so tests do not
    depend on how each backend breaks exact ties."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adamoe_layers(model):
            w = layer.gate.weight
            w.add_(scale * torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_m0_equals_hf_eager(arch):
    """m = 0 with the model's own k: logits, loss and aux_loss equal the transformers model."""
    hf = ARCHS[arch]().eval()
    ids, mask = _inputs()
    ref = hf(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    model = convert_model(copy.deepcopy(hf), 0, backend="torch")
    assert type(model).__name__ == "AdaMoE" + type(hf).__name__
    assert isinstance(model, type(hf))
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert len(out.router_logits) == len(ref.router_logits)
    assert expert_load(model) == [2.0] * len(ref.router_logits)


def test_m0_equals_hf_eager_default_backend():
    """The same through the default backend (the kernels)."""
    hf = _mixtral().eval()
    ids, mask = _inputs()
    ref = hf(ids, attention_mask=mask, output_router_logits=True)
    model = convert_model(copy.deepcopy(hf), 0)
    out = model(ids, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch,backend", [("mixtral", None), ("qwen2_moe", None),
                                          ("qwen3_moe", "torch"), ("olmoe", "torch")])
def test_block_with_null_experts_equals_reference(arch, backend):
    """m > 0: each converted block's output equals reference routing + experts on its input."""
    model = convert_model(ARCHS[arch]().eval(), num_null_experts=3, top_k=3, backend=backend)
    _break_ties(model)
    seen = []

    def hook(block, args, output):
        seen.append((block, args[0].detach(), output.detach()))

    blocks = adamoe_layers(model)
    assert all(isinstance(b, AdaMoESparseMoeBlock) for b in blocks)
    handles = [b.register_forward_hook(hook) for b in blocks]
    ids, _ = _inputs()
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert len(seen) == len(blocks)
    for block, x, y in seen:
        flat = x.reshape(-1, x.shape[-1])
        n = block.num_experts
        assert block.gate.weight.shape[0] == n + 3
        r = ak.reference.route(flat @ block.gate.weight.T, 3, n, block.normalize)
        expected = ak.reference.moe_mlp(flat, block.experts.gate_up_proj,
                                        block.experts.down_proj, r)
        if hasattr(block, "shared_expert"):
            expected = expected + torch.sigmoid(block.shared_expert_gate(flat)) * \
                block.shared_expert(flat)
        torch.testing.assert_close(y.reshape(flat.shape), expected, atol=1e-5, rtol=1e-5)
    loads = expert_load(model)
    assert all(0.0 <= L <= 3.0 for L in loads)


def test_router_grows_with_copied_rows_and_config_records_it():
    hf = _mixtral()
    old = [layer.mlp.gate.weight.detach().clone() for layer in hf.model.layers]
    model = convert_model(hf, num_null_experts=6, top_k=3, backend="torch")
    for w0, layer in zip(old, model.model.layers):
        w = layer.mlp.gate.weight
        assert w.shape == (10, 32)
        assert torch.equal(w[:4], w0) and torch.equal(w[4:], w0[[0, 1, 2, 3, 0, 1]])
        assert layer.mlp.experts.gate_up_proj.shape == (4, 128, 32)  # the model's own Parameter
    info = model.config.adamoe
    assert (info["num_null_experts"], info["top_k"], info["normalize"], info["null_kind"]) == \
        (6, 3, "true", "zero")
    assert model.config._experts_implementation == "adamoe"
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.gate.weight" in names


def test_qwen_default_normalize_follows_norm_topk_prob():
    assert convert_model(_qwen2(), 2, backend="torch").config.adamoe["normalize"] == "none"
    assert convert_model(_qwen3(), 2, backend="torch").config.adamoe["normalize"] == "true"


def test_unsupported_model_raises_naming_supported():
    with pytest.raises(ValueError, match="MixtralForCausalLM.*Qwen2MoeForCausalLM.*add_mo_lora"):
        convert_model(_llama(), 2)
    with pytest.raises(ValueError, match="top_k"):
        convert_model(_mixtral(), 1, top_k=6)
    with pytest.raises(ValueError, match="identity"):
        convert_model(_mixtral(), 2, null_kind="identity", normalize="true")


@pytest.mark.parametrize("which", ["moe", "mo_lora"])
def test_save_and_reload_round_trip(tmp_path, which):
    ids, mask = _inputs()
    if which == "moe":
        model = convert_model(_qwen2(), num_null_experts=4, top_k=3, backend="torch")
        _break_ties(model)
    else:
        model = add_mo_lora(_llama(), num_experts=3, num_null_experts=2, top_k=2, rank=4,
                            backend="torch")
        with torch.no_grad():
            for layer in adamoe_layers(model):
                layer.lora_B.normal_(std=0.1)
    with torch.no_grad():
        for layer in adamoe_layers(model):
            layer.null_bias.fill_(0.25)
    model.eval()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, backend="torch").eval()
    assert type(loaded) is type(model)
    assert loaded.config.adamoe == model.config.adamoe
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert [float(layer.null_bias) for layer in adamoe_layers(loaded)] == \
        [0.25] * len(adamoe_layers(model))
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    if which == "mo_lora":
        assert trainable and all(("lora_" in t) or (".router." in t) for t in trainable)
    _llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="adamoe"):
        from_pretrained(tmp_path / "plain")


def test_generate_after_conversion_matches_greedy_without_cache():
    model = convert_model(_mixtral().eval(), num_null_experts=4, top_k=3, backend="torch")
    _break_ties(model)
    ids, _ = _inputs()
    prompt = ids[:1, :5]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_training_step_gives_finite_grads_to_router_and_experts():
    model = convert_model(_mixtral(), num_null_experts=4, top_k=3, backend="torch")
    _break_ties(model)
    ids, mask = _inputs()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert out.aux_loss.requires_grad  # loss = LM loss + coef * aux
    out.loss.backward()
    for layer in adamoe_layers(model):
        for p in (layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj):
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0


def test_aux_loss_is_null_aware_and_scaled_into_loss():
    model = convert_model(_olmoe(), num_null_experts=4, top_k=3, backend="torch")
    _break_ties(model)
    ids, mask = _inputs()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    expected = ak.reference.null_aware_aux_loss(out.router_logits, 3, 4, mask)
    torch.testing.assert_close(out.aux_loss, expected)
    plain = model(ids, attention_mask=mask, labels=ids)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + model.config.router_aux_loss_coef * expected)
    as_tuple = model(ids, labels=ids, output_router_logits=True, return_dict=False)
    assert isinstance(as_tuple, tuple)


def test_peft_lora_on_expert_parameters_trains():
    peft = pytest.importorskip("peft")
    model = convert_model(_mixtral(), num_null_experts=4, top_k=3, backend="torch")
    _break_ties(model)
    ids, _ = _inputs()
    with torch.no_grad():
        base_logits = model(ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate"],
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    pm = peft.get_peft_model(model, config)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trainable) and any("gate.lora" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        out = pm(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert not torch.allclose(pm(input_ids=ids).logits, base_logits)


def test_llama_mo_lora_trains_one_step():
    base = _llama().eval()
    ids, mask = _inputs()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
    model = add_mo_lora(copy.deepcopy(base), num_experts=4, num_null_experts=3, top_k=2,
                        rank=4, backend="torch")
    layers = adamoe_layers(model)
    assert len(layers) == 7 * 2
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref)  # LoRA B = 0 at init
    assert out.aux_loss is not None and len(out.router_logits) == 14
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ("lora_" in name) or (".router." in name)
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers)
    loads = expert_load(model)
    assert len(loads) == 14 and all(0 <= L <= 2 for L in loads)
    with pytest.raises(ValueError, match="target_modules"):
        add_mo_lora(_llama(), target_modules=("nope",))
    with pytest.raises(ValueError, match="already"):
        add_mo_lora(model)


def test_experts_implementation_adamoe_on_plain_model():
    """Registered as a transformers experts implementation, it runs an unconverted model."""
    hf = _olmoe().eval()
    ids, _ = _inputs()
    with torch.no_grad():
        ref = hf(ids).logits
    ak.integrations.register_experts_implementation()
    hf.set_experts_implementation("adamoe")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_converted_mixtral():
    """torch.compile of the converted model's forward (default backend, aot_eager)."""
    torch._dynamo.reset()
    model = convert_model(_mixtral().eval(), num_null_experts=4, top_k=3)
    _break_ties(model)
    ids, _ = _inputs()
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(expert_load(model)) == 2
