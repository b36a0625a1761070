"""Learned top-k addressing for the paper's codebook (``aggregation="topk"``): each question reads only the k
documents whose key, computed from their codes alone, best matches its question key; trained by an addressing loss."""
import pytest
import torch

from mbc_hf import Memory
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import MBCDataCollator

DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at 100 degrees.",
        "The red door is in Rome.", "The blue door is in Oslo."]
QUESTIONS = ["Where is Paris?", "Where is the red door?"]


def topk_model(k=2, **kw):
    torch.manual_seed(0)
    return tiny_mbc_model(aggregation="topk", topk_documents=k, seed=0, **kw).eval()


def _rows():
    """One question about each of DOCS."""
    return [dict(doc_id=f"d{i}", context=d, question=q, answers=["x"])
            for i, (d, q) in enumerate(zip(DOCS, ["What sat?", "Capital?", "Boils?", "Red door?", "Blue door?"]))]


def reference_prefix(model, bank, batch, k):
    """Brute force: score every document by hand, gather the k best documents' decoded codes, aggregate."""
    latents = model.question_encoder(batch["question_input_ids"], batch["question_attention_mask"])
    vectors = model.codebook.decode(bank.codes.long())  # (N, T, d)
    read = model.config.addressing_codes or vectors.shape[1]  # the key's codes: the first A, or all T
    keys = model.addressing.document_key(vectors[:, :read].mean(1))
    scores = model.addressing.question_key(latents.mean(1)) @ keys.T / keys.shape[1] ** 0.5
    best = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    memory = Memory(torch.stack([vectors[row].reshape(-1, vectors.shape[-1]) for row in best]))
    return model.prefix_from_latents(model.aggregator(latents, memory)), best


@pytest.mark.parametrize("k,key_codes", [(1, 0), (2, 0), (5, 0), (2, 2)])
def test_topk_reading_equals_a_brute_force_reference(k, key_codes):
    model = topk_model(k, addressing_codes=key_codes)
    bank = model.memorize(DOCS * 20, doc_ids=[f"d{i}" for i in range(100)])  # 100 documents, repeated texts tie
    batch = model.encode_questions(QUESTIONS)
    with torch.no_grad():
        memory = model.memory_from_bank(bank)  # the config's default: "topk"
        assert memory.keys.shape == (100, model.config.addressing_dim)
        prefix = model.prefix_key_values(batch["question_input_ids"], batch["question_attention_mask"], memory)
        expected, _ = reference_prefix(model, bank, batch, k)
    for (key, value), (ref_key, ref_value) in zip(prefix, expected):
        assert key.shape[2] == model.config.prefix_length
        assert torch.allclose(key, ref_key, atol=1e-5) and torch.allclose(value, ref_value, atol=1e-5)
    with torch.no_grad():  # and it is not the histogram's reading of the whole bank
        whole = model.prefix_key_values(batch["question_input_ids"], batch["question_attention_mask"],
                                        model.memory_from_bank(bank, "histogram"))
    assert not torch.allclose(whole[0][0], prefix[0][0], atol=1e-4)


def test_the_addressing_loss_and_its_gradient_match_cross_entropy_over_the_batch():
    model = topk_model(1)  # eval mode (no dropout, no codebook update), gradients on
    batch = MBCDataCollator(model)(_rows())
    gold = batch["question_doc_index"]
    out = model(**batch, contrastive_doc_index=gold)
    grads = torch.autograd.grad(out.addressing_loss, list(model.addressing.parameters()))
    memory, _, _ = model.memory_from_documents(batch["context_input_ids"], batch["context_attention_mask"])
    latents = model.question_encoder(batch["question_input_ids"], batch["question_attention_mask"])
    scores = model.addressing.scores(latents, memory.keys)
    reference = torch.nn.functional.cross_entropy(scores, gold)
    assert torch.allclose(out.addressing_loss, reference, atol=1e-5)
    ref_grads = torch.autograd.grad(reference, list(model.addressing.parameters()))
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
    assert out.loss > out.qa_loss  # the addressing loss is part of the objective (weight 1)


def test_a_few_steps_on_the_addressing_loss_find_the_gold_document():
    model = topk_model(1)  # eval mode: the codes stay fixed, the keys learn
    rows = [dict(doc_id=f"d{i}", context=d, question=d.split()[-1], answers=["x"]) for i, d in enumerate(DOCS)]
    batch = MBCDataCollator(model)(rows)
    gold = batch["question_doc_index"]
    optimizer = torch.optim.Adam(list(model.addressing.parameters()), lr=1e-2)
    for _ in range(100):
        loss = model(**batch, contrastive_doc_index=gold).addressing_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    memory, _, _ = model.memory_from_documents(batch["context_input_ids"], batch["context_attention_mask"])
    latents = model.question_encoder(batch["question_input_ids"], batch["question_attention_mask"])
    assert torch.equal(model.addressing.scores(latents, memory.keys).argmax(1), gold)


def test_topk_is_refused_without_learned_addressing_and_survives_save_and_load(tmp_path):
    plain = tiny_mbc_model(seed=0).eval()
    with pytest.raises(ValueError, match="topk"):
        plain.answer(QUESTIONS, memory_bank=plain.memorize(DOCS), aggregation="topk", max_new_tokens=2)
    from transformers import AutoModelForCausalLM

    model = topk_model(2)
    bank = model.memorize(DOCS)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.aggregation == "topk" and loaded.addressing is not None
    assert loaded.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4) == \
        model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4)
    assert model.answer(QUESTIONS, memory_bank=bank, aggregation="histogram", max_new_tokens=2)  # still readable


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def test_feature_grad_scale_scales_only_what_the_addressing_loss_sends_to_the_memory_path():
    model = topk_model(1, freeze_encoders=False)
    batch = MBCDataCollator(model)(_rows())
    keys = list(model.addressing.parameters())
    shared = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("addressing.")]
    full, scaled = [], []
    for scale, out in ((1.0, full), (0.25, scaled)):
        model.addressing.feature_grad_scale = scale
        loss = model(**batch, contrastive_doc_index=batch["question_doc_index"]).addressing_loss
        out.append((_grads(loss, keys), _grads(loss, shared)))
    (keys_full, shared_full), (keys_scaled, shared_scaled) = full[0], scaled[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(keys_full, keys_scaled))  # key heads: full weight
    assert sum(float(g.abs().sum()) for g in shared_full) > 0  # the addressing loss does reach the memory path
    assert all(torch.allclose(0.25 * a, b, atol=1e-6) for a, b in zip(shared_full, shared_scaled))


@pytest.mark.parametrize("ratio", [0.05, 1000.0, -1.0])
def test_the_trainer_budgets_the_addressing_gradient_on_the_shared_parameters(tmp_path, ratio):
    from datasets import Dataset

    from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments

    model = topk_model(1, freeze_encoders=False).train()
    model.codebook.bypass = True  # no codebook update or dead-code reset between the forwards compared here
    args = MBCTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, addressing_grad_ratio=ratio)
    trainer = MBCTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()))
    batch = MBCDataCollator(model)(_rows())
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    scale = model.addressing.feature_grad_scale
    shared = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("addressing.")]
    g_total = _grads(loss, shared)  # what the Trainer's backward will apply
    model.addressing.feature_grad_scale = 1.0
    torch.manual_seed(0)
    inputs = dict(batch)  # as the trainer reads it after the gold-only steps: the batch's documents are the memory
    gold = inputs.pop("question_doc_index")
    out = model(**inputs, contrastive_doc_index=gold)
    g_addr = _grads(out.addressing_loss, shared)
    g_rest = _grads(out.loss - out.addressing_loss, shared)
    norm = lambda gs: float(torch.sqrt(sum((g ** 2).sum() for g in gs)))  # noqa: E731
    expected = 1.0 if ratio < 0 else min(1.0, ratio * norm(g_rest) / norm(g_addr))  # negative: no budget
    assert abs(scale - expected) < 1e-4
    assert all(torch.allclose(t, r + scale * a, atol=1e-5) for t, r, a in zip(g_total, g_rest, g_addr))
    if 0 <= ratio < 1:
        assert scale < 1 and norm([scale * a for a in g_addr]) <= ratio * norm(g_rest) * 1.001
    else:
        assert scale == 1.0  # a budget larger than the gradient, or none, leaves it whole


def test_key_codes_send_the_addressing_gradient_to_those_codes_only():
    model = topk_model(1, addressing_codes=2)  # T = 4 codes per document, the key reads the first 2
    vectors = torch.randn(3, model.config.num_context_tokens, model.config.text_config.hidden_size, requires_grad=True)
    (grad,) = torch.autograd.grad(model.addressing.document_keys(vectors).square().sum(), vectors)
    assert grad[:, :2].abs().sum() > 0 and torch.equal(grad[:, 2:], torch.zeros_like(grad[:, 2:]))
    with pytest.raises(ValueError, match="addressing_codes"):
        tiny_mbc_model(aggregation="topk", addressing_codes=5)  # more than the T = 4 codes a document has
