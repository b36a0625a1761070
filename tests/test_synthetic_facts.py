"""The synthetic fact stream (`mbc_hf.data.synthetic_facts`): deterministic by seed, train and test entities
disjoint, one question per attribute whose answer only the document holds, readable by the loaders and the CLI."""
import math

import pytest

from mbc_hf.data import chance_em, load_qa_file, synthetic_facts, write_synthetic_facts
from mbc_hf.synthetic_facts import _TEST_OFFSET, ATTRIBUTES, entity_name


def test_the_same_seed_gives_the_same_stream_and_another_seed_another():
    a, b = synthetic_facts(50, "train", seed=3), synthetic_facts(50, "train", seed=3)
    assert a.to_dict() == b.to_dict()
    other = synthetic_facts(50, "train", seed=4)
    assert other["context"] != a["context"]


def test_train_and_test_entities_are_disjoint_and_names_are_distinct():
    train = {entity_name(i, seed=0) for i in range(3000)}
    test = {entity_name(_TEST_OFFSET + i, seed=0) for i in range(3000)}
    assert len(train) == len(test) == 3000 and not train & test
    docs = {ctx for ctx in synthetic_facts(200, "test", seed=0)["context"]}
    assert all(not any(name in ctx for name in list(train)[:200]) for ctx in docs)


def test_each_document_has_two_to_four_attributes_with_one_question_each_answered_in_the_document():
    ds = synthetic_facts(300, "test", seed=1)
    per_doc = {}
    for row in ds:
        per_doc.setdefault(row["doc_id"], []).append(row["attribute"])
        value = row["answers"][0]
        assert value in ATTRIBUTES[row["attribute"]][0] and value in row["context"]
    assert {len(v) for v in per_doc.values()} == {2, 3, 4}
    assert all(len(set(v)) == len(v) for v in per_doc.values())  # one question per attribute
    assert len({ds["question"][i].split(" ")[0] for i in range(len(ds))}) > 3  # varied question templates


def test_chance_em_is_the_mean_of_one_over_the_set_sizes():
    ds = synthetic_facts(100, "train", seed=0)
    sizes = {"city": 64, "profession": 32, "year": 100, "colour": 16}
    expected = 100 * sum(1 / sizes[a] for a in ds["attribute"]) / len(ds)
    assert chance_em(ds) == pytest.approx(expected) and 1 < chance_em(ds) < 7


def test_written_file_loads_like_squad_paragraphs(tmp_path):
    path = write_synthetic_facts(tmp_path / "facts.jsonl", 20, "test", seed=2)
    loaded, direct = load_qa_file(path), synthetic_facts(20, "test", seed=2)
    assert loaded["question"] == direct["question"] and loaded["context"] == direct["context"]
    assert [a for a in loaded["answers"]] == direct["answers"] and loaded["doc_id"] == direct["doc_id"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        synthetic_facts(3, "dev")
    with pytest.raises(ValueError, match="num_entities"):
        synthetic_facts(0)



def test_a_pretrained_tiny_lm_can_express_answers_and_stays_frozen():
    """A random tiny LM cannot express any answer (every logit within about ±0.6); `pretrain_tiny_lm` makes it a
    small base LM on the synthetic stream (so the tiny benchmark measures the memory, not the LM), then freezes it."""
    import torch

    from mbc_hf.testing import pretrain_tiny_lm, tiny_mbc_model

    train = synthetic_facts(300, "train")
    texts = list(dict.fromkeys(train["context"]))
    model = tiny_mbc_model(corpus=texts, vocab_size=600, seed=0)
    batch = model.tokenizer(texts[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model.lm(**batch).logits
    assert logits.abs().max() < 1.0  # the random LM's bound
    before = [p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n]
    loss = pretrain_tiny_lm(model, texts, steps=60, batch_size=16)
    assert loss < 0.6 * math.log(len(model.tokenizer))  # far below the uniform prior ln V
    after = [p for n, p in model.lm.named_parameters() if "lora_" not in n]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert not any(p.requires_grad for p in after)  # frozen again: MBC trains only KV-LoRA on the LM
