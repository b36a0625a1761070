"""Tests for mbc_hf.modeling_mbc.MBCModelForCausalLM on tiny random models (mbc_hf.testing.tiny_mbc_model):
forward/loss, what trains, KV-LoRA placement, save/load, histogram vs dense banks, generation, memorize/answer.

Every case is parametrized over the base LM (Llama with GQA, GPT-2 with fused c_attn) and, where the document
encoder matters, over the encoder (BERT encoder-only, T5 encoder-decoder).
"""

import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import mbc_hf  # noqa: F401  (registers the "mbc" model type with the Auto classes)
from mbc_hf import CompressedMemoryBank, DenseMemoryBank, MBCModelForCausalLM, Memory, document_id
from mbc_hf.kv_lora import KVLoraLayer
from mbc_hf.testing import tiny_encoder_config, tiny_lm_config, tiny_mbc_model, tiny_tokenizer

BASES = ("llama", "gpt2")
ENCODERS = ("bert", "t5")
MODEL_CASES = [pytest.param(b, e, id=f"{b}-{e}") for b in BASES for e in ENCODERS]

DOCS = [
    "Paris is the capital of France.",
    "The cat sat on the mat.",
    "Water boils at 100 degrees.",
    "Fact 4: the code of room 5 is 678.",
]
QUESTIONS = ["What is the capital of France?", "Where did the cat sit?", "What is the code of room 5?"]
ANSWERS = ["Paris", "on the mat", "678"]

def generated_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("cat dog owl fox Paris France water room code item costs euros news science sport quick brown lazy "
             "old wise capital book day").split()
    return [f"Doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 999)}."
            for i in range(n)]


def seed_codebook(model: MBCModelForCausalLM, texts: list[str]) -> None:
    """Online resetting once on real encodings, so codes are spread over the documents (at init they are all dead
    and almost every document maps to the same code)."""
    with torch.no_grad():
        z = model.amortization(**model.encode_documents(texts))
    was_training = model.codebook.training
    model.codebook.train()
    model.codebook(z)
    model.codebook.train(was_training)


def randomize_kv_lora(model: MBCModelForCausalLM, seed: int = 0, std: float = 0.2) -> None:
    """KV-LoRA starts as an exact no-op (B = 0); random B makes tests of it able to fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def nontrivial_model(base: str, encoder: str, seed: int = 0, **overrides) -> MBCModelForCausalLM:
    model = tiny_mbc_model(base, encoder, seed=seed, **overrides)
    seed_codebook(model, generated_docs(40, seed=seed))
    randomize_kv_lora(model, seed)
    return model.eval()


def training_inputs(model: MBCModelForCausalLM, reconstruction: bool = False) -> dict:
    inputs = model.encode_questions(QUESTIONS, ANSWERS)
    docs = model.encode_documents(DOCS)
    inputs.update(context_input_ids=docs["input_ids"], context_attention_mask=docs["attention_mask"])
    if reconstruction:
        inputs.update(model.encode_reconstruction_targets(DOCS))
    return inputs


def base_lm_names(model: MBCModelForCausalLM) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("lm.") and "lora_" not in n]


# ============================================================================= forward and loss


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_forward_shapes_dtypes_and_loss_composition(base, encoder):
    model = tiny_mbc_model(base, encoder, vq_loss_weight=0.5).eval()
    vocab = model.config.text_config.vocab_size
    prompts = model.encode_questions(QUESTIONS)
    out = model(**prompts)
    assert out.logits.shape == (*prompts["input_ids"].shape, vocab) and out.logits.dtype == torch.float32
    assert out.loss is None and out.vq_loss is None

    inputs = training_inputs(model)
    out = model(**inputs)
    assert out.logits.shape == (*inputs["input_ids"].shape, vocab)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert out.vq_loss is not None and out.vq_loss.item() >= 0
    torch.testing.assert_close(out.loss, out.qa_loss + 0.5 * out.vq_loss)
    assert 1.0 <= out.perplexity.item() <= model.config.codebook_size + 1e-3
    # qa_loss is the NLL of the answer tokens only (labels -100 elsewhere)
    labels = inputs["labels"]
    logp = out.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.qa_loss, -picked[target != -100].mean(), atol=1e-5, rtol=1e-5)

    bank = model.memorize(DOCS)
    out = model(**model.encode_questions(QUESTIONS, ANSWERS), memory_bank=bank)  # reading a bank: no VQ term
    assert out.vq_loss is None and torch.equal(out.loss, out.qa_loss)


def test_loss_with_reconstruction_term_and_without_vq():
    model = tiny_mbc_model("llama", "bert", vq_loss_weight=0.7, reconstruction_loss_weight=0.3).eval()
    out = model(**training_inputs(model, reconstruction=True))
    assert torch.isfinite(out.reconstruction_loss)
    torch.testing.assert_close(out.loss, out.qa_loss + 0.7 * out.vq_loss + 0.3 * out.reconstruction_loss)

    no_vq = tiny_mbc_model("llama", "bert", use_vq=False).eval()
    out = no_vq(**training_inputs(no_vq))
    assert out.vq_loss.item() == 0.0 and torch.equal(out.loss, out.qa_loss)


@pytest.mark.parametrize("gold_only", [False, True], ids=["distractors", "gold-only"])
def test_contrastive_term_scores_answers_from_a_memory_without_the_gold_document(gold_only):
    margin = 100.0  # larger than any gap here, so the hinge is active for every question: margin - mean gap
    model = nontrivial_model("llama", "bert", contrastive_loss_weight=0.4, contrastive_margin=margin,
                             vq_loss_weight=0.7)
    inputs = training_inputs(model)
    gold = torch.tensor([0, 1, 3])  # question i asks about document gold[i] (ANSWERS vs DOCS)
    if gold_only:
        inputs["question_doc_index"] = gold
    out = model(**inputs, contrastive_doc_index=gold)
    torch.testing.assert_close(out.loss, out.qa_loss + 0.7 * out.vq_loss + 0.4 * out.contrastive_loss)

    # recompute by hand: the same quantized vectors, each question sees every document but its own (or the next one)
    memory, _, _ = model.memory_from_documents(inputs["context_input_ids"], inputs["context_attention_mask"])
    owner = torch.arange(len(DOCS)).repeat_interleave(model.config.num_context_tokens)
    without = owner[None] != gold[:, None] if not gold_only else owner[None] == ((gold + 1) % len(DOCS))[:, None]
    qa = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels", "question_input_ids",
                                 "question_attention_mask")}
    per_row = []
    for mask in (None if not gold_only else owner[None] == gold[:, None], without):
        logits = model(**qa, memory=Memory(memory.vectors, mask=mask)).logits
        per_row.append(mbc_hf.modeling_mbc.answer_nll_per_row(logits, inputs["labels"]))
    gap = per_row[1] - per_row[0]
    assert gap.abs().max() > 1e-4  # the two memories really differ for this model
    torch.testing.assert_close(out.contrastive_loss, margin - gap.mean(), atol=1e-4, rtol=1e-5)

    model.config.contrastive_margin = 0.0  # hinge: only questions the gold document does not already help count
    out = model(**inputs, contrastive_doc_index=gold)
    torch.testing.assert_close(out.contrastive_loss, torch.relu(-gap).mean(), atol=1e-5, rtol=1e-5)


def test_contrastive_term_is_skipped_without_weight_index_or_a_second_document():
    model = nontrivial_model("llama", "bert")
    inputs = training_inputs(model)
    gold = torch.tensor([0, 1, 3])
    assert model(**inputs, contrastive_doc_index=gold).contrastive_loss is None  # weight 0 (default)
    model.config.contrastive_loss_weight = 1.0
    assert model(**inputs).contrastive_loss is None  # no gold index
    one = model.encode_documents(DOCS[:1])
    single = dict(inputs, context_input_ids=one["input_ids"], context_attention_mask=one["attention_mask"])
    out = model(**single, contrastive_doc_index=torch.zeros(3, dtype=torch.long))
    assert out.contrastive_loss is None and torch.isfinite(out.loss)


GOLD_DOCS = [DOCS[0], DOCS[1], DOCS[3]]  # the document each of QUESTIONS asks about


@pytest.mark.parametrize("base", BASES)
def test_in_context_teacher_input_is_the_gold_document_then_the_same_prompt_and_answer(base):
    model = tiny_mbc_model(base, "bert")
    student = model.encode_questions(QUESTIONS, ANSWERS)
    teacher = model.encode_in_context(GOLD_DOCS, student)
    for i, doc in enumerate(GOLD_DOCS):
        # the distilled tokens are the same tokens, in the same order, in both batches
        assert torch.equal(student["input_ids"][i][teacher["target_mask"][i]],
                           teacher["teacher_input_ids"][i][teacher["teacher_target_mask"][i]])
        row = teacher["teacher_input_ids"][i][teacher["teacher_attention_mask"][i].bool()].tolist()
        doc_ids = model.tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        n_bos = len(row) - len(doc_ids) - int(student["attention_mask"][i].sum())
        assert n_bos in (0, 1) and row[n_bos:n_bos + len(doc_ids)] == doc_ids  # [bos] + document + prompt + answer
        answer = student["input_ids"][i][student["labels"][i] != -100]
        assert row[-len(answer):] == answer.tolist()
    with pytest.raises(ValueError, match="one document per question"):
        model.encode_in_context(GOLD_DOCS[:2], student)


@pytest.mark.parametrize("base", BASES)
def test_distillation_term_is_kl_from_the_base_lm_reading_the_document_in_context(base):
    model = nontrivial_model(base, "bert", distillation_loss_weight=0.3, vq_loss_weight=0.7)
    inputs = training_inputs(model)
    inputs.update(model.encode_in_context(GOLD_DOCS, inputs))
    out = model(**inputs)
    torch.testing.assert_close(out.loss, out.qa_loss + 0.7 * out.vq_loss + 0.3 * out.distillation_loss)

    # by hand: teacher = base LM without KV-LoRA on [bos] + document + prompt + answer; next-token KL per token
    def next_token_logprobs(logits, mask):
        return logits[:, :-1][mask[:, 1:]].log_softmax(-1)

    with torch.no_grad():
        with model.kv_lora_disabled():
            teacher = model.lm(input_ids=inputs["teacher_input_ids"],
                               attention_mask=inputs["teacher_attention_mask"]).logits
        with_lora = model.lm(input_ids=inputs["teacher_input_ids"],
                             attention_mask=inputs["teacher_attention_mask"]).logits
    t = next_token_logprobs(teacher, inputs["teacher_target_mask"])
    s = next_token_logprobs(out.logits, inputs["target_mask"])
    n_bos = len(mbc_hf.modeling_mbc._bos(model.tokenizer))  # all prompt and answer tokens but the first prompt token
    assert t.shape[0] == int(inputs["target_mask"].sum()) == int(inputs["attention_mask"].sum()) - 3 * (n_bos + 1)
    expected = (t.exp() * (t - s)).sum(-1).mean()
    torch.testing.assert_close(out.distillation_loss, expected, atol=1e-5, rtol=1e-5)
    lora_t = next_token_logprobs(with_lora, inputs["teacher_target_mask"])
    assert not torch.allclose((lora_t.exp() * (lora_t - s)).sum(-1).mean(), expected)  # the teacher has no KV-LoRA

    # only the memory path and KV-LoRA learn from it; the base LM stays frozen
    model.zero_grad()
    out.distillation_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("aggregator."))
    assert all(p.grad is None for n, p in model.named_parameters() if n in base_lm_names(model))


def test_distillation_term_needs_matching_batches_and_is_skipped_at_weight_zero():
    model = nontrivial_model("llama", "bert")
    inputs = training_inputs(model)
    inputs.update(model.encode_in_context(GOLD_DOCS, inputs))
    assert model(**inputs).distillation_loss is None  # weight 0 (default)
    model.config.distillation_loss_weight = 1.0
    other = model.encode_in_context(GOLD_DOCS, model.encode_questions(QUESTIONS, ["a much longer answer"] * 3))
    with pytest.raises(ValueError, match="from the question batch given"):
        model(**dict(inputs, **{k: v for k, v in other.items() if k != "target_mask"}))


# ============================================================================= what trains


@pytest.mark.parametrize("freeze_encoders", [False, True], ids=["train-encoders", "freeze-encoders"])
@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_gradients_reach_only_trainable_parts(base, encoder, freeze_encoders):
    model = tiny_mbc_model(base, encoder, reconstruction_loss_weight=0.5, freeze_encoders=freeze_encoders).train()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    lora = {n for n in named if n.startswith("lm.") and "lora_" in n}
    assert lora and lora <= trainable  # KV-LoRA trains ...
    assert not trainable & set(base_lm_names(model))  # ... and nothing else of the LM does
    backbones = {n for n in named if ".backbone." in n}
    if freeze_encoders:
        assert not trainable & backbones
    else:
        assert backbones <= trainable

    model(**training_inputs(model, reconstruction=True)).loss.backward()
    no_grad = sorted(n for n in trainable if named[n].grad is None)
    assert no_grad == []
    assert all(named[n].grad is None for n in named if n not in trainable)
    zero = sorted(n for n in trainable if not named[n].grad.abs().sum() > 0)
    # lora_A gets exactly zero gradient while lora_B = 0 (standard LoRA init: dL/dA = B^T ... = 0)
    assert zero == sorted(n for n in lora if "lora_A" in n)
    assert all(named[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)
    assert named["codebook.embedding.weight"].grad.abs().sum() > 0

    # without the auxiliary inputs only the reconstruction query is (provably) unused
    model.zero_grad(set_to_none=True)
    model(**training_inputs(model)).loss.backward()
    assert sorted(n for n in trainable if named[n].grad is None) == ["reconstruction_query"]

    # once B != 0, lora_A receives gradient too
    randomize_kv_lora(model)
    model.zero_grad(set_to_none=True)
    model(**training_inputs(model)).loss.backward()
    assert all(named[n].grad.abs().sum() > 0 for n in lora)


# (base, kv_lora_layers) -> which modules must be wrapped
@pytest.mark.parametrize("n_layers", [0, 1, 2, 4])
@pytest.mark.parametrize("base", BASES)
def test_kv_lora_touches_exactly_kv_of_the_last_layers(base, n_layers):
    model = tiny_mbc_model(base, "bert", kv_lora_layers=n_layers)
    total = model.config.text_config.num_hidden_layers
    layers = range(total - n_layers, total)
    if base == "llama":
        expected = {f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("k_proj", "v_proj")}
    else:
        expected = {f"transformer.h.{i}.attn.c_attn" for i in layers}
    wrapped = {name for name, m in model.lm.named_modules() if isinstance(m, KVLoraLayer)}
    assert wrapped == expected
    text = model.config.text_config
    for name in wrapped:
        layer = model.lm.get_submodule(name)
        out_features = layer.lora_B["default"].out_features
        if base == "llama":  # GQA: K and V are num_key_value_heads * head_dim wide
            assert out_features == text.num_key_value_heads * text.hidden_size // text.num_attention_heads
        else:  # fused [Q|K|V]: only the K and V thirds are adapted
            assert out_features == 2 * text.hidden_size and layer.q_features == text.hidden_size
    trainable_lm = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable_lm == {f"{w}.lora_{ab}.default.weight" for w in wrapped for ab in "AB"}


@pytest.mark.parametrize("base", BASES)
def test_query_projection_unchanged_by_training_while_keys_and_values_change(base):
    model = tiny_mbc_model(base, "bert", kv_lora_dropout=0.0)
    d = model.config.text_config.hidden_size
    attn = model.lm.model.layers[-1].self_attn if base == "llama" else model.lm.transformer.h[-1].attn
    x = torch.randn(2, 5, d)

    def projections():
        with torch.no_grad():
            if base == "llama":
                return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            return attn.c_attn(x).split(d, dim=-1)  # GPT-2: [Q | K | V] thirds of c_attn

    q0, k0, v0 = projections()
    model.train()
    inputs = training_inputs(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    model.eval()
    q1, k1, v1 = projections()
    assert torch.equal(q1, q0)
    assert not torch.allclose(k1, k0, atol=1e-4) and not torch.allclose(v1, v0, atol=1e-4)


# ============================================================================= save / load


def logits_with_bank(model, bank, questions=QUESTIONS):
    with torch.no_grad():
        return model(**model.encode_questions(questions), memory_bank=bank).logits


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_save_pretrained_writes_a_self_contained_auto_checkpoint(base, encoder, tmp_path):
    model = nontrivial_model(base, encoder)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mbc"
    assert {"AutoConfig", "AutoModelForCausalLM"} <= set(config["auto_map"])
    assert config["base_model_name_or_path"] is None
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    # self-contained: every base LM weight is stored (tied copies may be stored once)
    tied = set(model.all_tied_weights_keys)
    assert {n for n in base_lm_names(model) if n not in tied} <= stored
    assert {n for n, _ in model.named_parameters() if "lora_" in n} <= stored
    assert (tmp_path / "kv_lora" / "adapter_config.json").exists()
    assert (tmp_path / "tokenizer_config.json").exists() and (tmp_path / "encoder_tokenizer").is_dir()


@pytest.mark.parametrize("base, encoder", [
    pytest.param(b, e, id=f"{b}-{e}")
    for b in BASES for e in ENCODERS
])
def test_save_and_auto_load_give_identical_outputs(base, encoder, tmp_path):
    model = nontrivial_model(base, encoder)
    bank = model.memorize(generated_docs(30))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MBCModelForCausalLM
    assert loaded.codebook.fingerprint() == model.codebook.fingerprint()  # the old bank stays valid
    assert loaded.tokenizer("a b c")["input_ids"] == model.tokenizer("a b c")["input_ids"]
    assert loaded.encoder_tokenizer("a b c")["input_ids"] == model.encoder_tokenizer("a b c")["input_ids"]
    torch.testing.assert_close(logits_with_bank(loaded, bank), logits_with_bank(model, bank), atol=1e-6, rtol=0)
    assert loaded.answer(QUESTIONS, memory_bank=bank, max_new_tokens=6) == \
        model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=6)


def test_frozen_codebook_stays_frozen_after_reload(tmp_path):
    model = tiny_mbc_model("llama", "bert")
    model.codebook.freeze()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    fingerprint = loaded.codebook.fingerprint()
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    loaded(**training_inputs(loaded)).loss.backward()
    optimizer.step()
    assert loaded.codebook.fingerprint() == fingerprint


SMALL = dict(num_context_tokens=4, codebook_size=64, aggregator_layers=1, aggregator_heads=2, prefix_rank=8,
             kv_lora_r=4, kv_lora_alpha=8, kv_lora_layers=2, max_document_length=64, max_question_length=32)


def referenced_model(base: str, encoder: str, tmp_path):
    """An MBC model built around a base LM saved in tmp_path/base, which its checkpoints reference."""
    tok, enc_tok = tiny_tokenizer(), tiny_tokenizer(encoder=True)
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(tiny_lm_config(base, len(tok), tok.pad_token_id, tok.bos_token_id,
                                                         tok.eos_token_id)).eval()
    lm.save_pretrained(tmp_path / "base")
    enc = AutoModel.from_config(tiny_encoder_config(encoder, len(enc_tok), enc_tok.pad_token_id))
    model = MBCModelForCausalLM.from_components(lm, enc, tok, enc_tok,
                                                base_model_name_or_path=str(tmp_path / "base"), **SMALL)
    seed_codebook(model, generated_docs(20))
    randomize_kv_lora(model)
    return model.eval(), lm


@pytest.mark.parametrize("base", BASES)
def test_referenced_base_checkpoint_stores_no_base_weights(base, tmp_path):
    model, lm = referenced_model(base, "bert", tmp_path)
    with model.kv_lora_disabled(), torch.no_grad():  # the copied base weights are the base LM's
        ids = torch.randint(5, 300, (2, 7))
        torch.testing.assert_close(model.lm(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "mbc")
    with safe_open(str(tmp_path / "mbc" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert not [k for k in stored if k.startswith("lm.") and "lora_" not in k]
    assert {n for n, _ in model.named_parameters() if "lora_" in n} <= stored
    model.save_pretrained(tmp_path / "full", include_base_model=True)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        assert set(base_lm_names(model)) - set(model.all_tied_weights_keys) <= set(f.keys())


@pytest.mark.parametrize("base", BASES)
def test_referenced_base_checkpoint_reloads_identically(base, tmp_path):
    model, _ = referenced_model(base, "bert", tmp_path)
    bank = model.memorize(generated_docs(10))
    model.save_pretrained(tmp_path / "mbc")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mbc").eval()
    torch.testing.assert_close(logits_with_bank(loaded, bank), logits_with_bank(model, bank), atol=1e-6, rtol=0)


@pytest.mark.parametrize("referenced", [False, True], ids=["self-contained", "referenced-base"])
@pytest.mark.parametrize("base", BASES)
def test_kv_lora_export_loads_with_peft(base, referenced, tmp_path):
    if referenced:
        model, _ = referenced_model(base, "bert", tmp_path)
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    else:
        model = nontrivial_model(base, "bert")
        fresh = AutoModelForCausalLM.from_config(model.config.text_config)
        plain = {k.replace(".base_layer.", "."): v for k, v in model.lm.state_dict().items() if "lora_" not in k}
        fresh.load_state_dict(plain)
    model.save_pretrained(tmp_path / "mbc")
    adapter_config = json.loads((tmp_path / "mbc" / "kv_lora" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MBC_KVLORA" and adapter_config["r"] == model.config.kv_lora_r
    peft_model = PeftModel.from_pretrained(fresh.eval(), tmp_path / "mbc" / "kv_lora").eval()
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        expected = model.lm(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
        with peft_model.disable_adapter():  # the adapter is not a no-op, so the comparison above can fail
            assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-4)


# ============================================================================= banks: histogram vs dense


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_histogram_equals_dense_on_a_large_bank(base, encoder):
    model = nontrivial_model(base, encoder)
    docs = generated_docs(2000)
    bank = model.memorize(docs, batch_size=250)
    assert len(bank) == 2000 and isinstance(bank, CompressedMemoryBank)
    assert int((bank.code_counts() > 0).sum()) > 5  # the codes are spread, not one code repeated
    hist = logits_with_bank(model, bank)
    dense = model.forward(**model.encode_questions(QUESTIONS), memory_bank=bank, aggregation="dense").logits
    torch.testing.assert_close(hist, dense.detach(), atol=1e-4, rtol=0)
    assert not torch.allclose(hist, logits_with_bank(model, None), atol=1e-3)  # the memory does matter
    assert model.answer(QUESTIONS, memory_bank=bank, aggregation="histogram", max_new_tokens=8) == \
        model.answer(QUESTIONS, memory_bank=bank, aggregation="dense", max_new_tokens=8)


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_dense_bank(base, encoder):
    model = nontrivial_model(base, encoder)
    docs = generated_docs(12)
    bank = model.memorize(docs, compress=False)
    T, d = model.config.num_context_tokens, model.config.text_config.hidden_size
    assert isinstance(bank, DenseMemoryBank) and bank.vectors.shape == (12, T, d)
    with torch.no_grad():
        z = model.amortization(**model.encode_documents(docs))  # VQ bypassed: the encoder outputs themselves
    torch.testing.assert_close(bank.vectors, z, atol=1e-5, rtol=1e-5)
    prompts = model.encode_questions(QUESTIONS)
    with torch.no_grad():
        out = model(**prompts, memory_bank=bank, aggregation="dense").logits
        ref = model(**prompts, memory=Memory(z.reshape(1, -1, d))).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="histogram"):
        model(**prompts, memory_bank=bank, aggregation="histogram")
    with pytest.raises(ValueError, match="histogram"):
        model.answer(QUESTIONS, memory_bank=bank, aggregation="histogram")
    answers = model.answer(QUESTIONS, memory_bank=bank, aggregation="dense", max_new_tokens=4)
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) for a in answers)
    more = generated_docs(15)[12:]
    model.memorize(more, memory_bank=bank)  # extending a dense bank keeps it dense (compress follows the bank)
    assert len(bank) == 15 and isinstance(bank, DenseMemoryBank)


# ============================================================================= generation


@pytest.mark.parametrize("base", BASES)
def test_greedy_generate_matches_step_by_step_forward(base):
    model = nontrivial_model(base, "bert")
    bank = model.memorize(DOCS)
    eos, new = model.tokenizer.eos_token_id, 6
    prompt = model.encode_questions(QUESTIONS[:1])  # one question: no padding
    out = model.generate(**prompt, memory_bank=bank, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, attention_mask=mask, question_input_ids=prompt["question_input_ids"],
                           question_attention_mask=prompt["question_attention_mask"], memory_bank=bank).logits[:, -1]
            logits[:, eos] = -float("inf")  # min_new_tokens suppresses eos
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ids)


GENERATE_CASES = [
    pytest.param(dict(do_sample=False), 1, id="greedy"),
    pytest.param(dict(num_beams=3), 1, id="beam3"),
    pytest.param(dict(num_beams=3, num_return_sequences=2), 2, id="beam3-return2"),
    pytest.param(dict(do_sample=True, top_k=5, num_return_sequences=2), 2, id="sample-return2"),
]


@pytest.mark.parametrize("kwargs, per_prompt", GENERATE_CASES)
@pytest.mark.parametrize("base", BASES)
def test_generate_with_a_bank(base, kwargs, per_prompt):
    model = nontrivial_model(base, "bert")
    bank = model.memorize(DOCS)
    new = 5
    prompts = model.encode_questions(QUESTIONS[:2])  # different lengths: left padded
    assert (prompts["attention_mask"][:, 0] == 0).any()
    torch.manual_seed(0)
    out = model.generate(**prompts, memory_bank=bank, max_new_tokens=new, min_new_tokens=new, **kwargs)
    B, L = prompts["input_ids"].shape
    assert out.shape == (B * per_prompt, L + new) and out.dtype == torch.long
    assert torch.equal(out[:, :L], prompts["input_ids"].repeat_interleave(per_prompt, dim=0))
    if kwargs.get("do_sample"):
        return
    # batched (padded, prefix repeated per beam/sequence) == each question alone
    for i, question in enumerate(QUESTIONS[:2]):
        alone = model.encode_questions([question])
        single = model.generate(**alone, memory_bank=bank, max_new_tokens=new, min_new_tokens=new, **kwargs)
        assert torch.equal(out[i * per_prompt:(i + 1) * per_prompt, L:], single[:, -new:])


# ============================================================================= memorize / answer


@pytest.mark.parametrize("base", BASES)
def test_empty_bank_is_no_bank(base):
    model = nontrivial_model(base, "bert")
    empty = model.new_memory_bank()
    assert len(empty) == 0
    torch.testing.assert_close(logits_with_bank(model, empty), logits_with_bank(model, None), atol=0, rtol=0)
    assert model.answer(QUESTIONS, memory_bank=empty, max_new_tokens=6) == \
        model.answer(QUESTIONS, max_new_tokens=6)
    full = model.memorize(DOCS)
    assert not torch.allclose(logits_with_bank(model, full), logits_with_bank(model, None), atol=1e-4)


def test_bank_from_another_codebook_is_refused():
    model, other = nontrivial_model("llama", "bert", seed=0), nontrivial_model("llama", "bert", seed=1)
    foreign = other.memorize(DOCS)
    with pytest.raises(ValueError, match="codebook"):
        model.answer(QUESTIONS, memory_bank=foreign)
    with pytest.raises(ValueError, match="codebook"):
        model(**model.encode_questions(QUESTIONS), memory_bank=foreign)
    with pytest.raises(ValueError, match="codebook"):
        model.memorize(["A new document."], memory_bank=foreign)
    assert len(foreign) == len(DOCS)
    with pytest.raises(ValueError, match="codebook"):  # the bank also refuses after this model's codebook changed
        own = model.memorize(DOCS)
        with torch.no_grad():
            model.codebook.embedding.weight[0] += 0.01  # as one optimizer step on the codebook would
        model.answer(QUESTIONS, memory_bank=own)


BAD_TEXTS = [
    pytest.param("a single string", TypeError, id="str"),
    pytest.param(None, TypeError, id="none"),
    pytest.param(["ok", 3], TypeError, id="int-item"),
    pytest.param(["ok", b"bytes"], TypeError, id="bytes-item"),
    pytest.param(["ok", ""], ValueError, id="empty"),
    pytest.param([" \n\t"], ValueError, id="whitespace"),
    pytest.param(["ok", "caf\ud800"], ValueError, id="lone-surrogate"),
]


@pytest.mark.parametrize("texts, error", BAD_TEXTS)
def test_invalid_texts_are_rejected(texts, error):
    model = tiny_mbc_model("gpt2", "bert").eval()
    bank = model.memorize(DOCS)
    with pytest.raises(error):
        model.memorize(texts, memory_bank=bank)
    assert len(bank) == len(DOCS)
    with pytest.raises(error):
        model.answer(texts, memory_bank=bank)


def test_memorize_ids_metadata_and_duplicates():
    model = nontrivial_model("llama", "bert")
    bank = model.memorize([DOCS[0], DOCS[1], DOCS[0]])
    assert len(bank) == 2 and bank.doc_ids == [document_id(DOCS[0]), document_id(DOCS[1])]
    codes = bank.codes.clone()
    model.memorize([DOCS[1], DOCS[2]], memory_bank=bank)
    assert len(bank) == 3 and torch.equal(bank.codes[:2], codes)
    model.memorize(DOCS[:3], memory_bank=bank)
    assert len(bank) == 3
    with pytest.raises(ValueError, match="duplicate"):
        model.memorize([DOCS[0]], memory_bank=bank, on_duplicate="fail")

    meta = [{"title": "capital", "year": 2024}, {"title": "cat"}]
    named = model.memorize(DOCS[:2], doc_ids=["paris", "cat"], metadata=meta)
    assert named.doc_ids == ["paris", "cat"] and named.metadata == meta
    assert torch.equal(named.get_codes(["paris"]), bank.get_codes([document_id(DOCS[0])]))
    with pytest.raises(ValueError):
        model.memorize(DOCS[:2], doc_ids=["only-one"])


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_memorize_never_changes_the_codebook_and_is_batch_invariant(base, encoder):
    model = tiny_mbc_model(base, encoder).train()  # fresh codebook: all codes dead, training would reset them
    weight, ema = model.codebook.embedding.weight.detach().clone(), model.codebook.ema_cluster_size.clone()
    seed_codebook(model, generated_docs(40))  # (sanity: the same model in training does change the codebook)
    assert not torch.equal(model.codebook.embedding.weight, weight)
    weight, ema = model.codebook.embedding.weight.detach().clone(), model.codebook.ema_cluster_size.clone()
    docs = generated_docs(50, seed=3)
    one_by_one = model.memorize(docs, batch_size=1)
    batched = model.memorize(docs, batch_size=64)
    assert model.training  # restored
    assert torch.equal(model.codebook.embedding.weight, weight) and torch.equal(model.codebook.ema_cluster_size, ema)
    assert torch.equal(one_by_one.codes, batched.codes)  # padding in a batch does not change a document's codes


# ============================================================================= training sanity


@pytest.mark.parametrize("base, encoder", MODEL_CASES)
def test_a_few_training_steps_lower_the_loss(base, encoder):
    model = tiny_mbc_model(base, encoder)
    inputs = training_inputs(model)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = model(**inputs)
        model.train()
        return out.loss.item(), out.qa_loss.item()

    loss0, qa0 = eval_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    loss1, qa1 = eval_loss()
    assert qa1 < qa0 - 0.1, (qa0, qa1)
    assert loss1 < loss0 - 0.1, (loss0, loss1)


# ============================================================================= training memory (gold-only mask)


def test_gold_only_memory_shows_each_question_its_own_document():
    model = nontrivial_model("llama", "bert")
    inputs = training_inputs(model)  # questions 0, 1, 2 belong to documents 0, 1, 3
    gold = torch.tensor([0, 1, 3])
    with torch.no_grad():
        out = model(**inputs, question_doc_index=gold).logits
        changed = dict(inputs)
        ids = inputs["context_input_ids"].clone()
        n_tokens = int(inputs["context_attention_mask"][3].sum())
        gen = torch.Generator().manual_seed(0)
        ids[3, 1:n_tokens - 1] = torch.randint(10, 390, (n_tokens - 2,), generator=gen)  # rewrite document 3
        changed["context_input_ids"] = ids
        codes = [model.codebook.nearest_codes(model.amortization(i, inputs["context_attention_mask"]))[3]
                 for i in (inputs["context_input_ids"], ids)]
        assert not torch.equal(*codes)  # precondition: document 3 now has other codes
        out2 = model(**changed, question_doc_index=gold).logits
        all_docs = model(**inputs).logits
        all_docs2 = model(**changed).logits
    torch.testing.assert_close(out2[:2], out[:2], atol=0, rtol=0)  # questions 0, 1 never see document 3
    assert not torch.allclose(out2[2], out[2], atol=1e-4)  # question 2 does
    assert not torch.allclose(all_docs2[0], all_docs[0], atol=1e-5)  # without the mask everyone sees it


def test_loading_a_referencing_checkpoint_does_not_call_it_corrupted(tmp_path):
    import logging

    model, _ = referenced_model("gpt2", "bert", tmp_path)  # GPT-2 ties its input and output embeddings
    model.save_pretrained(tmp_path / "mbc")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        MBCModelForCausalLM.from_pretrained(tmp_path / "mbc")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "corrupted" in r.getMessage()]
    assert not logger.filters  # the filter is removed again


@pytest.mark.parametrize("freeze", [{}, {"freeze_encoders": True},
                                    {"freeze_encoders": True, "freeze_amortization": True}],
                         ids=["defaults", "frozen-encoders", "frozen-amortization"])
def test_from_pretrained_keeps_what_the_config_freezes(tmp_path, freeze):
    """Loading replaces parameters (and their requires_grad); a loaded model must train the same parts as the saved
    one: never the base LM (only KV-LoRA), nor the backbones / amortization network the config freezes."""
    model = tiny_mbc_model(seed=0, **freeze)
    model.codebook.freeze()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == want
    assert any("lora_" in n for n in want) and all("lora_" in n for n in want if n.startswith("lm."))
    assert not any(n.startswith("codebook.") for n in want)
