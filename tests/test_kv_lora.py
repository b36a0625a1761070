"""Tests for mbc_hf.kv_lora (KV-LoRA as a PEFT tuner), on tiny Llama (GQA) and GPT-2 models built from configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from mbc_hf.kv_lora import (
    KVLoraConfig,
    KVLoraLayer,
    apply_kv_lora,
    kv_lora_state_dict,
    save_kv_lora_adapter,
)

NUM_LAYERS = 4
LAST_N = 2

# name -> (config factory, K/V module suffixes, attention-module path template)
MODEL_CASES = {
    "llama": (
        lambda: LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=NUM_LAYERS,
            vocab_size=100,
            max_position_embeddings=64,
        ),
        ("k_proj", "v_proj"),
        "model.layers.{i}.self_attn.{name}",
    ),
    "gpt2": (
        lambda: GPT2Config(
            n_embd=32,
            n_head=4,
            n_layer=NUM_LAYERS,
            vocab_size=100,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        ("c_attn",),
        "transformer.h.{i}.attn.{name}",
    ),
}
CASES = list(MODEL_CASES)


def make_lm(case: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(MODEL_CASES[case][0]()).eval()


def expected_targets(case: str) -> set[str]:
    _, names, template = MODEL_CASES[case]
    return {template.format(i=i, name=n) for i in range(NUM_LAYERS - LAST_N, NUM_LAYERS) for n in names}


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def train_one_step(model, ids: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def inject(entry: str, case: str, **config_kwargs):
    """Return (model, config) with KV-LoRA injected either in place or via get_peft_model."""
    lm = make_lm(case)
    config = KVLoraConfig(last_n_layers=LAST_N, lora_dropout=0.0, **config_kwargs)
    model = apply_kv_lora(lm, config) if entry == "inplace" else get_peft_model(lm, config)
    return model, config


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("entry", ["inplace", "peft"])
@pytest.mark.parametrize("case", CASES)
def test_only_kv_of_last_n_layers_adapted_and_trainable(case, entry):
    model, config = inject(entry, case)
    wrapped = {strip_peft_prefix(n) for n, m in model.named_modules() if isinstance(m, KVLoraLayer)}
    assert wrapped == expected_targets(case)
    assert config.layers_to_transform == list(range(NUM_LAYERS - LAST_N, NUM_LAYERS))
    assert config.target_modules == list(MODEL_CASES[case][1])

    for name, param in model.named_parameters():
        name = strip_peft_prefix(name)
        is_lora = ".lora_A.default." in name or ".lora_B.default." in name
        assert param.requires_grad == is_lora, name
        if is_lora:
            assert name.rsplit(".lora_", 1)[0] in expected_targets(case)
    # 2 modules/params per layer for separate k/v, 1 fused module for GPT-2; A and B each.
    n_lora = sum(".lora_" in n for n, _ in model.named_parameters())
    assert n_lora == 2 * len(expected_targets(case))


@pytest.mark.parametrize("entry", ["inplace", "peft"])
@pytest.mark.parametrize("case", CASES)
def test_zero_init_is_identity_then_training_changes_outputs(case, entry):
    ids = input_ids()
    base_logits = make_lm(case)(ids).logits
    model, _ = inject(entry, case)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    for module in model.modules():
        if isinstance(module, KVLoraLayer):
            assert torch.count_nonzero(module.lora_B["default"].weight) == 0
            assert torch.count_nonzero(module.lora_A["default"].weight) > 0

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_one_step(model, ids)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"frozen parameter {name} changed"


def _c_attn_slices(layer: KVLoraLayer, x: torch.Tensor):
    with torch.no_grad():
        base, out = layer.base_layer(x), layer(x)
    return base.split(32, dim=-1), out.split(32, dim=-1)


def test_gpt2_query_third_never_changes():
    model, _ = inject("inplace", "gpt2")
    layer = model.transformer.h[NUM_LAYERS - 1].attn.c_attn
    assert isinstance(layer, KVLoraLayer) and layer.q_features == 32
    assert layer.lora_B["default"].weight.shape == (2 * 32, 16)  # K and V only
    x = torch.randn(2, 8, 32)

    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    (q0, k0, v0), (q, k, v) = _c_attn_slices(layer, x)
    assert torch.equal(q, q0)
    assert not torch.allclose(k, k0) and not torch.allclose(v, v0)

    train_one_step(model, input_ids())
    (q0, k0, v0), (q, k, v) = _c_attn_slices(layer, x)
    assert torch.equal(q, q0)
    assert not torch.allclose(k, k0) and not torch.allclose(v, v0)

    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.base_layer.weight.shape == (32, 96)
    assert torch.count_nonzero(delta[:, :32]) == 0


def test_llama_gqa_lora_shapes():
    model, _ = inject("inplace", "llama")
    cfg = model.config
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    assert kv_dim == 16 and kv_dim != cfg.hidden_size
    for name in ("k_proj", "v_proj"):
        layer = getattr(model.model.layers[NUM_LAYERS - 1].self_attn, name)
        assert layer.lora_A["default"].weight.shape == (16, cfg.hidden_size)
        assert layer.lora_B["default"].weight.shape == (kv_dim, 16)
        assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_disable(case):
    ids = input_ids()
    model, _ = inject("peft", case)
    train_one_step(model, ids)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, make_lm(case)(ids).logits)
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, KVLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_layer_respects_input_dtype():
    base = torch.nn.Linear(8, 4).to(torch.bfloat16)
    layer = KVLoraLayer(base, "default", r=2, lora_alpha=4)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 4)


@pytest.mark.parametrize("case", CASES)
def test_peft_save_and_reload_round_trip(case, tmp_path):
    ids = input_ids()
    model, _ = inject("peft", case)
    train_one_step(model, ids)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MBC_KVLORA"
    assert saved["layers_to_transform"] == [2, 3]

    reloaded = PeftModel.from_pretrained(make_lm(case), tmp_path)
    assert isinstance(reloaded.peft_config["default"], KVLoraConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.parametrize("case", CASES)
def test_inplace_save_and_state_dict_round_trip(case, tmp_path):
    ids = input_ids()
    model, config = inject("inplace", case)
    train_one_step(model, ids)
    with torch.no_grad():
        expected = model(ids).logits

    state = kv_lora_state_dict(model)
    peft_model, _ = inject("peft", case)
    assert set(state) == set(kv_lora_state_dict(peft_model))  # same key format as PeftModel checkpoints
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in state)

    save_kv_lora_adapter(model, config, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MBC_KVLORA"
    assert config.inference_mode is False  # the caller's config is not modified
    reloaded = PeftModel.from_pretrained(make_lm(case), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)

    # The state dict also loads into a freshly injected plain model.
    fresh = apply_kv_lora(make_lm(case), KVLoraConfig(last_n_layers=LAST_N, lora_dropout=0.0))
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"last_n_layers": 0}, "last_n_layers must be a positive integer"),
        ({"layers_to_transform": [-1]}, "non-negative"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVLoraConfig(**kwargs)


@pytest.mark.parametrize("entry", ["inplace", "peft"])
def test_last_n_layers_larger_than_model(entry):
    with pytest.raises(ValueError, match=r"last_n_layers=5 exceeds the 4 hidden layers.*'llama'"):
        lm = make_lm("llama")
        config = KVLoraConfig(last_n_layers=5)
        apply_kv_lora(lm, config) if entry == "inplace" else get_peft_model(lm, config)


def test_layers_to_transform_out_of_range():
    with pytest.raises(ValueError, match="outside the 4 hidden layers"):
        apply_kv_lora(make_lm("gpt2"), KVLoraConfig(layers_to_transform=[3, 4]))


def test_unknown_model_type_needs_target_modules():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=100
    )
    lm = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"'gpt_neox'.*target_modules"):
        apply_kv_lora(lm, KVLoraConfig(last_n_layers=1))


def test_explicit_layers_and_targets():
    model = apply_kv_lora(make_lm("llama"), KVLoraConfig(layers_to_transform=[0], target_modules=["v_proj"]))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, KVLoraLayer)}
    assert wrapped == {"model.layers.0.self_attn.v_proj"}
