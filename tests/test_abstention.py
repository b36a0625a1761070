"""Abstention (``MBCConfig.relevance_threshold``): a question whose best document is not relevant enough reads no
document (the empty memory) and is flagged ``grounded: False``; the threshold saves with the model and is
calibrated on answerable questions (`mbc_hf.addressing.calibrate_threshold`, `mbc_hf.evaluation`)."""
import numpy as np
import pytest
import torch

from mbc_hf import MBCConfig
from mbc_hf.addressing import calibrate_threshold, relevance
from mbc_hf.evaluation import abstention_rates, calibrate_abstention, relevances
from mbc_hf.testing import tiny_mbc_model

GOLD = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at 100 degrees."]
UNRELATED = ["The quick brown fox jumps over the lazy dog.", "A wise owl reads old news about science.",
             "The code of room 5 is 678."]
QUESTIONS = ["What sat on the mat?", "What is the capital of France?", "Water boils at what degrees?"]
IDF_EXTRA = ["The cat and the dog.", "France and Paris and the old owl.", "The water is old.", "The fox and the cat."]
THRESHOLD = 0.5


def fitted_model(**overrides):
    """A tiny vocabulary-codebook model whose documents keep all their tokens as codes (T = 16), IDF fitted."""
    settings = dict(num_context_tokens=16, read_documents=2)
    settings.update(overrides)
    model = tiny_mbc_model(codebook_type="vocabulary", seed=0, **settings).eval()
    model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"]
                        for d in GOLD + UNRELATED + IDF_EXTRA], special_ids=model.tokenizer.all_special_ids)
    return model


def test_relevance_is_the_best_score_over_the_question_weight():
    weights = torch.tensor([[0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    rel = relevance(weights, torch.tensor([3.0, 0.0], dtype=torch.float64))
    assert rel.dtype == torch.float64 and rel.tolist() == [0.75, 0.0]  # no weighted token: 0, not nan


def test_calibrate_threshold_meets_its_target_rate_and_is_the_largest_that_does():
    gen = np.random.default_rng(0)
    answerable = np.concatenate([gen.uniform(0, 1, 997), [0.3, 0.3, 0.3]])  # ties
    for share in (0.0, 0.01, 0.05, 0.2, 0.5):
        t = calibrate_threshold(answerable, share)
        assert np.mean(answerable < t) <= share  # at most `share` wrongly flagged
        assert np.mean(answerable < np.nextafter(t, np.inf)) > share  # any higher threshold flags more
    assert calibrate_threshold(answerable, 0.0) == answerable.min()  # flags none
    absent = gen.uniform(0, 0.4, 500)  # a constructed split: absent questions score low
    t = calibrate_threshold(answerable, 0.05)
    assert np.mean(absent < t) > 0.1 and np.mean(answerable < t) <= 0.05
    with pytest.raises(ValueError, match="max_flagged"):
        calibrate_threshold(answerable, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([], 0.05)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([0.2, float("nan")], 0.05)


def test_threshold_is_validated_and_saved_and_loaded_with_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    assert MBCConfig().relevance_threshold is None  # off by default
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match="relevance_threshold"):
            tiny_mbc_model(codebook_type="vocabulary", relevance_threshold=bad)
    with pytest.raises(ValueError, match="vocabulary"):  # a learned codebook has no addressing to threshold
        tiny_mbc_model(relevance_threshold=0.2)
    model = fitted_model(relevance_threshold=0.25)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.relevance_threshold == 0.25
    assert MBCConfig.from_pretrained(tmp_path).relevance_threshold == 0.25


def test_unrelated_bank_is_not_grounded_and_answers_as_the_empty_memory():
    model = fitted_model(relevance_threshold=THRESHOLD)
    bank = model.memorize(UNRELATED, doc_ids=["u0", "u1", "u2"])
    empty = model.answer(QUESTIONS, memory_bank=None, max_new_tokens=4)
    out = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4, return_sources=True)
    for o, e in zip(out, empty):
        assert o["grounded"] is False and o["sources"] == [] and o["scores"] == []
        assert 0 <= o["relevance"] < THRESHOLD
        assert o["answer"] == e  # the empty memory's answer
    assert model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4) == empty  # also without return_sources
    model.config.relevance_threshold = None  # off: the unrelated documents are read, and called grounded
    off = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4, return_sources=True)
    assert all(o["grounded"] and len(o["sources"]) == 2 for o in off)
    assert [o["relevance"] for o in off] == [o["relevance"] for o in out]


def test_gold_bank_is_grounded_and_reads_as_without_threshold():
    model = fitted_model(relevance_threshold=THRESHOLD)
    bank = model.memorize(GOLD + UNRELATED, doc_ids=["g0", "g1", "g2", "u0", "u1", "u2"])
    out = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4, return_sources=True)
    for i, o in enumerate(out):
        assert o["grounded"] is True and o["sources"][0] == f"g{i}" and len(o["scores"]) == 2
        assert o["relevance"] >= THRESHOLD and o["scores"][0] > 0
    model.config.relevance_threshold = None
    assert model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=4, return_sources=True) == out


def test_a_batch_mixing_grounded_and_not_answers_each_as_alone():
    model = fitted_model(relevance_threshold=THRESHOLD)
    bank = model.memorize(GOLD[:2], doc_ids=["g0", "g1"])
    questions = [QUESTIONS[0], "Which old owl reads the news about science?", QUESTIONS[1]]
    out = model.answer(questions, memory_bank=bank, max_new_tokens=4, return_sources=True)
    assert [o["grounded"] for o in out] == [True, False, True]
    assert out[1]["sources"] == [] and out[1]["answer"] == model.answer(questions[1:2], max_new_tokens=4)[0]
    model.config.relevance_threshold = None
    grounded = model.answer([questions[0], questions[2]], memory_bank=bank, max_new_tokens=4)
    assert [out[0]["answer"], out[2]["answer"]] == grounded


def test_empty_bank_is_not_grounded():
    model = fitted_model(relevance_threshold=THRESHOLD)
    out = model.answer(QUESTIONS[:1], memory_bank=model.new_memory_bank(), max_new_tokens=2, return_sources=True)
    assert out[0]["grounded"] is False and out[0]["sources"] == [] and out[0]["relevance"] == 0.0


def test_calibrate_abstention_meets_its_target_on_a_constructed_split():
    model = fitted_model()
    rows = {"doc_id": [], "context": [], "question": []}
    other = ["What does the quick brown fox jump over?", "What does the wise owl read?", "What is the code of room 5?"]
    for article, (texts, questions) in enumerate([(GOLD, QUESTIONS), (UNRELATED, other)]):
        for i, (text, question) in enumerate(zip(texts, questions)):
            for q in (question, question.replace("?", " today?")):
                rows["doc_id"].append(f"A{article}#{i}")
                rows["context"].append(text)
                rows["question"].append(q)
    for by, stored in (("article", 3), ("document", 3)):
        cal = calibrate_abstention(model, rows, max_flagged=0.2, by=by)
        assert cal["n_bank_docs"] == stored and cal["n_answerable"] + cal["n_absent"] == 12
        assert cal["answerable_flagged"] <= 0.2
        assert cal["threshold"] == calibrate_threshold(cal["answerable_relevance"], 0.2)
        assert cal["absent_flagged"] == np.mean(cal["absent_relevance"] < cal["threshold"])
    rates = abstention_rates(model, rows, threshold=cal["threshold"], by="document")
    assert rates["answerable_flagged"] == cal["answerable_flagged"]
    bank = model.memorize(GOLD)
    assert np.allclose(relevances(model, QUESTIONS, bank, batch_size=2),
                       [o["relevance"] for o in model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=1,
                                                             return_sources=True)])


def test_ask_prints_not_found_with_the_empty_memory_answer_marked(tmp_path, capsys):
    from mbc_hf.cli import main

    model = fitted_model(relevance_threshold=THRESHOLD)
    model.save_pretrained(tmp_path / "model")
    model.memorize(UNRELATED).save(tmp_path / "bank.safetensors")
    capsys.readouterr()
    main(["ask", "--model", str(tmp_path / "model"), "--bank", str(tmp_path / "bank.safetensors"),
          "--max-new-tokens", "2", QUESTIONS[1]])
    printed = capsys.readouterr().out
    assert "not found in the memory" in printed and "A (empty memory" in printed


def test_hybrid_reading_keeps_its_passage_when_the_bank_is_not_grounded():
    from mbc_hf.text_store import TextStore

    model = fitted_model(relevance_threshold=THRESHOLD)
    store = TextStore()
    store.add(["g0", "g1", "g2"], GOLD)
    bank = model.memorize(UNRELATED, doc_ids=["u0", "u1", "u2"])
    out = model.answer(QUESTIONS, memory_bank=bank, text_store=store, max_new_tokens=4, return_sources=True)
    alone = model.answer(QUESTIONS, memory_bank=None, text_store=store, max_new_tokens=4, return_sources=True)
    for o, a in zip(out, alone):
        assert o["grounded"] is False and o["sources"] == [] and o["passages"] == a["passages"] != []
        assert o["answer"] == a["answer"]  # the passage in the prompt, no document of the bank
