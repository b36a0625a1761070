"""The vocabulary codebook (``codebook_type="vocabulary"``): IDF selection, retrieval, the LM reading the codes as
tokens, banks, save/load, training and the CLI, on tiny models."""
import math

import datasets
import pytest
import torch

from mbc_hf import MBCConfig
from mbc_hf.cli import main
from mbc_hf.memory_bank import CompressedMemoryBank
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import MBCDataCollator, MBCTrainer, MBCTrainingArguments
from mbc_hf.vocabulary_codebook import VocabularyCodebook

BASES = ["llama", "gpt2"]
DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at 100 degrees."]


def fitted_model(base="llama", **overrides):
    model = tiny_mbc_model(base=base, codebook_type="vocabulary", seed=0, **overrides).eval()
    model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS])
    return model


def test_fit_is_the_smoothed_idf_and_the_pad_code_counts_nothing():
    book = VocabularyCodebook(vocab_size=6, num_tokens=2, pad_code=5)
    idf = book.fit([[1, 2, 2], [2, 3]])  # N = 2; df: 1 -> 1, 2 -> 2, 3 -> 1, others 0
    expected = [math.log(3 / 1) + 1, math.log(3 / 2) + 1, math.log(3 / 3) + 1, math.log(3 / 2) + 1,
                math.log(3 / 1) + 1, 0.0]
    assert idf.tolist() == pytest.approx(expected)


def test_select_takes_the_distinct_highest_idf_tokens_highest_first_and_pads():
    book = VocabularyCodebook(vocab_size=8, num_tokens=3, pad_code=0)
    book.fit([[1, 2, 3], [1, 2], [1], [4]])  # df: 1 -> 3, 2 -> 2, 3 -> 1, 4 -> 1
    ids = torch.tensor([[1, 2, 3, 3, 4, 0], [2, 1, 2, 7, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])  # row 2: token 7 is padding
    codes = book.select(ids, mask)
    assert codes.tolist() == [[3, 4, 2], [2, 1, 0]]  # ties (3, 4) by token id; row 2 padded with pad_code


def test_score_sums_the_idf_of_question_tokens_found_in_each_document():
    book = VocabularyCodebook(vocab_size=8, num_tokens=2, pad_code=0)
    idf = book.fit([[1, 2], [2, 3], [4]])
    codes = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # (1, N=3, T=2)
    question = torch.tensor([[2, 2, 3, 6]])  # 2 twice counts once; 6 is padding
    scores = book.score(question, torch.tensor([[1, 1, 1, 0]]), codes)
    assert scores.tolist() == [pytest.approx([idf[2].item(), idf[3].item(), 0.0])]


def test_select_before_fit_and_fingerprint_follow_the_idf():
    book = VocabularyCodebook(vocab_size=8, num_tokens=2, pad_code=0)
    with pytest.raises(ValueError, match="not fitted"):
        book.select(torch.tensor([[1, 2]]))
    book.fit([[1, 2]])
    before = book.fingerprint()
    book.fit([[1, 2], [2]])
    assert book.fingerprint() != before


def test_config_takes_the_lm_vocabulary_as_codebook_and_refuses_what_it_cannot_do():
    model = tiny_mbc_model(codebook_type="vocabulary")
    assert model.config.codebook_size == model.config.text_config.vocab_size == len(model.tokenizer)
    assert model.amortization is None and model.aggregator is None and model.encoder_tokenizer is model.tokenizer
    for bad in (dict(use_vq=False), dict(reconstruction_loss_weight=0.5)):
        with pytest.raises(ValueError, match="vocabulary"):
            MBCConfig(codebook_type="vocabulary", **bad)
    with pytest.raises(ValueError, match="codebook_type"):
        MBCConfig(codebook_type="words")


@pytest.mark.parametrize("base", BASES)
def test_memorize_stores_each_documents_selected_tokens_as_uint16_codes(base):
    model = tiny_mbc_model(base=base, codebook_type="vocabulary").eval()
    with pytest.raises(ValueError, match="IDF is not fitted"):
        model.memorize(DOCS)
    model = fitted_model(base)
    bank = model.memorize(DOCS)
    enc = model.encode_documents(DOCS)
    assert bank.codes.dtype == torch.uint16 and bank.codes.shape == (3, model.config.num_context_tokens)
    assert bank.codes.long().tolist() == model.codebook.select(**enc).tolist()
    id_bytes = sum(len(i.encode()) for i in bank.doc_ids)
    assert bank.nbytes == 3 * model.config.num_context_tokens * 2 + id_bytes  # 2 bytes per code
    with pytest.raises(ValueError, match="no uncompressed bank"):
        model.memorize(DOCS, compress=False)


@pytest.mark.parametrize("base", BASES)
def test_the_prefix_is_the_lm_reading_bos_and_the_codes_before_the_question(base):
    model = fitted_model(base)
    batch = model.encode_questions(["Which city is the capital of France?"], ["Paris"])
    enc = model.encode_documents(DOCS)
    with torch.no_grad():
        out = model(**batch, context_input_ids=enc["input_ids"], context_attention_mask=enc["attention_mask"],
                    question_doc_index=torch.tensor([1]))
        codes = model.codebook.select(enc["input_ids"], enc["attention_mask"])[1]
        start = model.config.text_config.bos_token_id
        full = torch.cat([torch.tensor([start]), codes, batch["input_ids"][0]])[None]
        direct = model.lm(input_ids=full).logits[:, 1 + len(codes):]  # the same LM, KV-LoRA included
    assert torch.allclose(out.logits, direct, atol=1e-5)


@pytest.mark.parametrize("base", BASES)
def test_a_question_reads_the_bank_document_that_holds_its_rare_tokens(base):
    model = fitted_model(base)
    bank = model.memorize(DOCS)
    questions = ["At what temperature does water boil?", "Where did the cat sit?"]
    batch = model.encode_questions(questions, ["100", "mat"])
    _, read = model.read_documents(batch["question_input_ids"], batch["question_attention_mask"],
                                   model.memory_from_bank(bank))
    assert read.tolist() == [[2], [0]]
    enc = model.encode_documents(DOCS)
    with torch.no_grad():  # reading the bank = reading the retrieved document alone
        from_bank = model(**batch, memory_bank=bank).logits
        gold = model(**batch, context_input_ids=enc["input_ids"], context_attention_mask=enc["attention_mask"],
                     question_doc_index=torch.tensor([2, 0])).logits
        other = model(**batch, context_input_ids=enc["input_ids"], context_attention_mask=enc["attention_mask"],
                      question_doc_index=torch.tensor([1, 1])).logits
    assert torch.allclose(from_bank, gold, atol=1e-5) and not torch.allclose(from_bank, other, atol=1e-3)


def test_read_documents_takes_the_best_k_and_respects_a_gold_only_mask():
    model = fitted_model(read_documents=2)
    batch = model.encode_questions(["At what temperature does water boil?"])
    memory = model.memory_from_bank(model.memorize(DOCS))
    _, read = model.read_documents(batch["question_input_ids"], batch["question_attention_mask"], memory)
    assert read.shape == (1, 2) and read[0, 0].item() == 2
    T = model.config.num_context_tokens
    from dataclasses import replace

    only_first = replace(memory, mask=torch.arange(3 * T)[None] < T)  # the question may read document 0 only
    assert model.read_documents(batch["question_input_ids"], batch["question_attention_mask"],
                                only_first)[1].tolist() == [[0]]


def test_answers_from_an_empty_bank_read_bos_only_and_save_load_keeps_idf_and_bank(tmp_path):
    model = fitted_model()
    bank = model.memorize(DOCS)
    questions = ["Where did the cat sit?", "What is the capital of France?"]
    answers = model.answer(questions, memory_bank=bank, max_new_tokens=4)
    assert model.answer(questions, memory_bank=None, max_new_tokens=4) == \
        model.answer(questions, memory_bank=model.new_memory_bank(), max_new_tokens=4)
    model.save_pretrained(tmp_path / "m", memory_bank=bank)
    from transformers import AutoModelForCausalLM

    card = (tmp_path / "m" / "README.md").read_text()
    assert "codebook tied to the LM's" in card and "amortization network" not in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.uses_vocabulary_codebook and loaded.encoder_tokenizer is loaded.tokenizer
    assert torch.equal(loaded.codebook.idf, model.codebook.idf)
    assert loaded.answer(questions, memory_bank=loaded.load_memory_bank(), max_new_tokens=4) == answers
    loaded.codebook.fit([[1, 2, 3]])  # another IDF selects other codes: the old bank is refused
    with pytest.raises(ValueError):
        loaded.memorize(["A new document."], memory_bank=CompressedMemoryBank.load(tmp_path / "m" /
                                                                                    "memory_bank.safetensors"))


ROWS = [dict(doc_id=f"d{i}", context=f"Fact {i}: the code of room {i} is {i * 7}.",
             question=f"What is the code of room {i}?", answers=[str(i * 7)], question_id=f"q{i}") for i in range(8)]


def test_trainer_fits_the_idf_and_the_loss_falls_on_a_repeated_batch(tmp_path):
    model = tiny_mbc_model(codebook_type="vocabulary", kv_lora_layers=4, seed=0)
    args = MBCTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-3,
                                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                logging_steps=2, max_steps=20)
    trainer = MBCTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS[:4] * 8))
    batch = MBCDataCollator(model)(ROWS[:4])
    assert not model.codebook.fitted
    trainer.train()
    assert model.codebook.fitted
    expected = VocabularyCodebook(model.config.codebook_size, 4, model.codebook.pad_code)
    expected.fit([model.tokenizer(r["context"], add_special_tokens=False)["input_ids"] for r in ROWS[:4]],
                 special_ids=model.tokenizer.all_special_ids)
    assert torch.equal(model.codebook.idf, expected.idf)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        assert math.isfinite(model(**batch).loss.item())
    with pytest.raises(ValueError, match="vocabulary codebook"):
        MBCTrainer(model=model, args=MBCTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                          freeze_codebook=True),
                   train_dataset=datasets.Dataset.from_list(ROWS)).train()


def test_cli_trains_adapts_asks_and_evaluates_a_vocabulary_codebook_model(tmp_path, capsys):
    import json

    from test_cli import write_paragraphs

    write_paragraphs(tmp_path / "train.jsonl")
    out = tmp_path / "model"
    main(["train", "--train-file", str(tmp_path / "train.jsonl"), "--output-dir", str(out), "--base-model", "tiny",
          "--codebook-type", "vocabulary", "--max-steps", "2", "--batch-size", "2", "--eval-docs", "2",
          "--memory-gain-questions", "2", "--eval-steps", "2", "--logging-steps", "1", "--save-steps", "2"])
    docs = tmp_path / "docs.txt"
    docs.write_text("The red door is in Rome.\nThe blue door is in Oslo.\n")
    bank = tmp_path / "bank.safetensors"
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank)])
    assert len(CompressedMemoryBank.load(bank)) == 2
    capsys.readouterr()
    main(["ask", "--model", str(out), "--bank", str(bank), "--max-new-tokens", "3", "Where is the red door?"])
    printed = capsys.readouterr().out
    red = CompressedMemoryBank.load(bank).doc_ids[0]  # the document that holds "red" and "Rome"
    assert "A:" in printed and f"sources: {red} (" in printed
    main(["eval", "--model", str(out), "--data", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "m.json"),
          "--max-new-tokens", "3"])
    metrics = json.loads((tmp_path / "m.json").read_text())
    T = json.loads((out / "config.json").read_text())["num_context_tokens"]
    assert metrics["n_docs"] == 6 and metrics["bytes_per_doc"] >= 2 * T  # T uint16 codes + the doc id


def test_special_tokens_are_never_codes_and_never_score():
    book = VocabularyCodebook(vocab_size=8, num_tokens=3, pad_code=2)
    book.fit([[3, 4], [4, 5]], special_ids=[1, 2])  # 1 (BOS) never occurs in the fit: without special_ids it
    assert book.idf[1] == 0 and book.idf[2] == 0    # would get the largest IDF and be picked by every document
    assert book.select(torch.tensor([[1, 3, 4, 5, 2]])).tolist() == [[3, 5, 4]]
    assert book.score(torch.tensor([[1, 2]]), None, torch.tensor([[[1, 2, 3]]])).tolist() == [[0.0]]


def test_ties_go_to_the_earlier_document_and_a_higher_score_wins_anywhere_in_a_large_bank():
    model = fitted_model()
    T, n = model.config.num_context_tokens, 100_001
    codes = torch.full((n, T), model.codebook.pad_code)
    rare = int(model.codebook.idf.argmax())
    codes[5, 0] = codes[n - 1, 0] = rare  # two documents hold the question's rarest token
    codes[n - 1, 1] = rare2 = int(model.codebook.idf.topk(2).indices[1])  # the last one also holds another
    q = torch.tensor([[rare, rare2]])
    assert model.read_documents(q, None, model.token_memory(codes))[1].tolist() == [[n - 1]]
    codes[n - 1, 1] = model.codebook.pad_code
    assert model.read_documents(q, None, model.token_memory(codes))[1].tolist() == [[5]]


def test_question_tokens_for_retrieval_tokenize_the_first_word_as_inside_a_document():
    model = fitted_model()
    batch = model.encode_questions(["France has which capital?"])
    france = model.tokenizer(DOCS[1])["input_ids"][-2]  # "ĠFrance": the word as the document holds it
    assert batch["question_input_ids"][0].tolist() == model.tokenizer(" France has which capital?")["input_ids"]
    assert batch["question_input_ids"][0, 0].item() == france


def test_a_dense_bank_or_a_memory_of_vectors_is_refused_with_a_clear_error():
    from mbc_hf import Memory
    from mbc_hf.memory_bank import DenseMemoryBank

    model = fitted_model()
    dense = DenseMemoryBank(model.config.num_context_tokens, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="banks of token codes"):
        model.memorize(DOCS, memory_bank=dense)
    batch = model.encode_questions(["Where did the cat sit?"])
    with pytest.raises(ValueError, match="reads codes"):
        model.prefix_key_values(batch["question_input_ids"], batch["question_attention_mask"],
                                Memory(torch.zeros(1, 4, model.config.text_config.hidden_size)))
