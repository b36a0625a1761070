"""Which T tokens a vocabulary codebook selects for a document (`VocabularyCodebook`): code order, whole words,
padding, the trained selector (fit, determinism, fingerprint, save/load), `fit_vocabulary_idf`, and training with
``read_retrieved`` (`MBCTrainer.compute_loss` reading a bank of all training documents)."""
import functools
import math

import datasets
import pytest
import torch

from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments, document_codes, fit_vocabulary_idf
from mbc_hf.vocabulary_codebook import VocabularyCodebook

ROWS = [dict(doc_id=f"d{i}", context=f"Fact {i}: the code of room {i} is {i * 7}.",
             question=f"What is the code of room {i}?", answers=[str(i * 7)], question_id=f"q{i}") for i in range(8)]


def random_corpus(gen, n, v, length):
    return [torch.randint(1, v, (int(torch.randint(1, length, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------- order


def test_document_order_is_the_importance_selection_sorted_by_first_occurrence():
    book_i = VocabularyCodebook(12, 4, pad_code=0, order="importance")
    book_d = VocabularyCodebook(12, 4, pad_code=0, order="document")
    corpus = [[1, 2, 3, 4], [1, 2, 3], [1, 2], [1]]  # df: 1 -> 4, 2 -> 3, 3 -> 2, 4 -> 1; 5, 6 in no document
    book_i.fit(corpus)
    book_d.fit(corpus)
    doc = torch.tensor([[5, 1, 4, 2, 6, 3, 5, 4]])
    # by IDF: 5 and 6 (unseen, the largest; tie -> lower id first), then 4, then 3 (1 and 2 are left out)
    assert book_i.select(doc).tolist() == [[5, 6, 4, 3]]
    assert book_d.select(doc).tolist() == [[5, 4, 6, 3]]  # first positions 0, 2, 4, 5


def test_orders_agree_on_the_code_set_on_random_documents():
    gen = torch.Generator().manual_seed(0)
    v, t = 30, 5
    corpus = random_corpus(gen, 40, v, 12)
    books = {o: VocabularyCodebook(v, t, pad_code=0, order=o) for o in ("importance", "document")}
    for book in books.values():
        book.fit(corpus, special_ids=[7])
    docs = random_corpus(gen, 30, v, 20)
    idf = books["importance"].idf.tolist()
    for ids in docs:
        x = torch.tensor([ids])
        imp, doc = books["importance"].select(x)[0].tolist(), books["document"].select(x)[0].tolist()
        real = [c for c in imp if idf[c] > 0]
        assert sorted(imp) == sorted(doc)
        # importance: the top-T distinct tokens by (IDF desc, token id asc), IDF 0 excluded
        ranked = sorted({i for i in ids if idf[i] > 0}, key=lambda i: (-idf[i], i))[:t]
        assert real == ranked
        # document: the same tokens by first occurrence
        assert [c for c in doc if idf[c] > 0] == sorted(ranked, key=ids.index)


# ---------------------------------------------------------------------------------------------- whole words

VOCAB = ["<pad>", "<s>", "Ġthe", "Ġbr", "own", "Ġfox", "Ġju", "mp", "s", "Ġdog", ".", "ing"]
TOK = {s: i for i, s in enumerate(VOCAB)}
# "<s> the br-own fox-ing ju-mp-s dog ." ("ing" is a special token here: IDF 0)
SENTENCE = [TOK[s] for s in ["<s>", "Ġthe", "Ġbr", "own", "Ġfox", "ing", "Ġju", "mp", "s", "Ġdog", "."]]
IDF = {"Ġthe": 1.0, "Ġbr": 2.0, "own": 5.0, "Ġfox": 3.0, "Ġju": 1.5, "mp": 6.0, "s": 1.0, "Ġdog": 2.5, ".": 0.5}


def word_book(t, whole_words=True, order="importance"):
    book = VocabularyCodebook(len(VOCAB), t, pad_code=0, order=order, whole_words=whole_words)
    with torch.no_grad():
        for s, value in IDF.items():
            book.idf[TOK[s]] = value
    if whole_words:
        book.fit_words(VOCAB)
    return book


def test_fit_words_marks_tokens_that_begin_a_word():
    book = VocabularyCodebook(len(VOCAB) + 2, 4, pad_code=0, whole_words=True)
    book.fit_words(VOCAB)
    starts = {s for s, start in zip(VOCAB, book.word_start.tolist()) if start}
    assert starts == {"<pad>", "<s>", "Ġthe", "Ġbr", "Ġfox", "Ġju", "Ġdog", "."}
    assert book.word_start[-2:].tolist() == [True, True]  # ids past the given strings count as word starts
    book.fit_words(["▁Paris", "ians", " x", "\nq", "", "9"])
    assert book.word_start[:6].tolist() == [True, False, True, True, True, False]


def test_whole_words_bring_all_their_pieces_and_skip_words_that_do_not_fit():
    doc = torch.tensor([SENTENCE])
    names = lambda codes: [VOCAB[c] for c in codes[0].tolist()]  # noqa: E731
    # T=4: "jumps" (best piece mp, 3 pieces) fits; "brown" (own 5.0 > fox 3.0, 2 pieces) would make 5: skipped;
    # "fox" (its piece "ing" has IDF 0 and is left out) fits in the last slot; "dog" does not fit any more
    assert names(word_book(4).select(doc)) == ["Ġju", "mp", "s", "Ġfox"]
    assert names(word_book(4, order="document").select(doc)) == ["Ġfox", "Ġju", "mp", "s"]
    # T=5: "jumps" + "brown" fill it; "Ġbr" (IDF 2.0, below fox) comes with its word's "own"
    assert sorted(names(word_book(5).select(doc))) == sorted(["Ġju", "mp", "s", "Ġbr", "own"])
    # word pieces (whole_words off) take the 5 best pieces instead, splitting both words
    assert sorted(names(word_book(5, whole_words=False).select(doc))) == sorted(["mp", "own", "Ġfox", "Ġdog", "Ġbr"])
    for t in (1, 2, 3, 4, 5, 8, 11):
        book = word_book(t)
        codes = [c for c in book.select(doc)[0].tolist() if c != book.pad_code]
        assert codes and all(book.idf[c] > 0 for c in codes), t
        assert len(set(codes)) == len(codes) <= t
        words, word = {}, -1  # every word is taken whole (its pieces of IDF > 0) or not at all
        for token in SENTENCE:
            word += bool(book.word_start[token])
            if book.idf[token] > 0:
                words.setdefault(word, set()).add(token)
        for pieces in words.values():
            assert pieces <= set(codes) or not pieces & set(codes), (t, pieces, codes)


# ---------------------------------------------------------------------------------------------- T columns


@pytest.mark.parametrize("options", [dict(), dict(order="document"), dict(selector="trained"),
                                     dict(whole_words=True)])
def test_select_returns_t_columns_padded_with_the_pad_code(options):
    book = VocabularyCodebook(10, 5, pad_code=9, **options)
    book.fit([[1, 2, 3, 4, 5, 6], [1, 2], [3, 4, 7, 8]], special_ids=[0])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],  # 8 selectable tokens: 5 codes
                        [2, 2, 0, 9, 1, 9, 9, 9],  # 2 selectable (0 special, 9 pad): padded
                        [0, 9, 0, 9, 0, 9, 0, 9],  # none
                        [3, 4, 8, 8, 8, 8, 8, 8]])
    mask = torch.tensor([[1] * 8, [1] * 8, [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])  # row 3: only 3 and 4 count
    codes = book.select(ids, mask)
    assert codes.shape == (4, 5) and codes.dtype == torch.long
    rows = codes.tolist()
    assert 9 not in rows[0] and len(set(rows[0])) == 5 and set(rows[0]) <= set(range(1, 9))
    assert sorted(rows[1][:2]) == [1, 2] and rows[1][2:] == [9, 9, 9]
    assert rows[2] == [9] * 5
    assert sorted(rows[3][:2]) == [3, 4] and rows[3][2:] == [9, 9, 9]


# ---------------------------------------------------------------------------------------------- trained selector

V_TOY = 40
# 12 documents: token 1 in all (the lowest IDF), 3 tokens of their own each (the highest); questions ask for 1
TOY_DOCS = [[1, 2 + 3 * i, 3 + 3 * i, 4 + 3 * i] for i in range(12)]
TOY_TARGETS = [{1} for _ in TOY_DOCS]


def toy_book(order="importance", selector="trained", t=2):
    book = VocabularyCodebook(V_TOY, t, pad_code=0, selector=selector, order=order)
    book.fit(TOY_DOCS)
    return book


def test_trained_selector_ranks_by_idf_until_fit_selector():
    gen = torch.Generator().manual_seed(1)
    corpus = random_corpus(gen, 30, V_TOY, 10)
    trained = VocabularyCodebook(V_TOY, 4, pad_code=0, selector="trained")
    idf = VocabularyCodebook(V_TOY, 4, pad_code=0)
    trained.fit(corpus, special_ids=[5])
    idf.fit(corpus, special_ids=[5])
    docs = torch.randint(0, V_TOY, (20, 15), generator=gen)
    assert torch.equal(trained.select(docs), idf.select(docs))
    for row in docs:
        assert torch.equal(trained.token_scores(row)[2], idf.token_scores(row)[2])


def test_fit_selector_learns_to_select_a_low_idf_token_the_questions_ask_for():
    book = toy_book()
    docs = torch.tensor(TOY_DOCS)
    assert book.idf[1] < book.idf[2]  # token 1 has the lowest IDF of the documents' tokens
    assert not (book.select(docs) == 1).any()  # IDF alone never picks it
    before = book.fingerprint()
    loss = book.fit_selector(TOY_DOCS, TOY_TARGETS)
    assert math.isfinite(loss) and loss < math.log(2)  # better than chance
    assert (book.select(docs) == 1).any(1).all()  # now every document keeps it
    assert book.selector_bias[1] > book.selector_bias[2:38].max()
    assert book.fingerprint() != before


def test_fit_selector_is_deterministic_and_the_fingerprint_tells_the_orders_apart():
    a, b = toy_book(), toy_book()
    torch.manual_seed(0)
    loss_a = a.fit_selector(TOY_DOCS, TOY_TARGETS, steps=50)
    torch.manual_seed(1)  # the global RNG plays no part
    loss_b = b.fit_selector(TOY_DOCS, TOY_TARGETS, steps=50)
    assert loss_a == loss_b
    for name in ("idf", "selector_bias", "selector_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fingerprint() == b.fingerprint()
    doc = toy_book(order="document")
    doc.fit_selector(TOY_DOCS, TOY_TARGETS, steps=50)
    assert torch.equal(doc.selector_bias, a.selector_bias)
    assert doc.fingerprint() != a.fingerprint()
    assert toy_book(selector="idf").fingerprint() != toy_book(selector="trained").fingerprint()
    c = toy_book()
    c.fit_selector(TOY_DOCS, TOY_TARGETS, steps=60)  # other buffers: another fingerprint
    assert c.fingerprint() != a.fingerprint()


def test_fit_selector_refuses_an_idf_selector_an_unfitted_idf_and_mismatched_targets():
    with pytest.raises(ValueError):
        toy_book(selector="idf").fit_selector(TOY_DOCS, TOY_TARGETS)
    with pytest.raises(ValueError):
        VocabularyCodebook(V_TOY, 2, pad_code=0, selector="trained").fit_selector(TOY_DOCS, TOY_TARGETS)
    with pytest.raises(ValueError):
        toy_book().fit_selector(TOY_DOCS, TOY_TARGETS[:-1])
    with pytest.raises(ValueError):
        VocabularyCodebook(V_TOY, 2, pad_code=0, selector="guess")


# ---------------------------------------------------------------------------------------------- tiny models


def tokens(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_fit_vocabulary_idf_fits_the_idf_and_the_trained_selector():
    model = tiny_mbc_model(codebook_type="vocabulary", code_selector="trained", seed=0).eval()
    book = model.codebook
    assert book.selector == "trained" and not book.fitted
    dataset = datasets.Dataset.from_list(ROWS[:6] + ROWS[:3])  # repeated documents count once
    idf = fit_vocabulary_idf(model, dataset)
    expected = VocabularyCodebook(model.config.codebook_size, model.config.num_context_tokens, book.pad_code)
    expected.fit([tokens(model, r["context"]) for r in ROWS[:6]], special_ids=model.tokenizer.all_special_ids)
    assert book.fitted and torch.equal(idf, expected.idf) and torch.equal(book.idf, expected.idf)
    assert book.selector_bias.abs().sum() > 0
    assert not torch.equal(book.selector_weight, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # fit_selector ran
    # a word every question asks for ends up above one no question asks for (both in every document)
    asked, never = tokens(model, " code")[0], tokens(model, "Fact")[0]
    assert all(asked in tokens(model, r["context"]) and never in tokens(model, r["context"]) for r in ROWS[:6])
    assert book.selector_bias[asked] > book.selector_bias[never]


def test_fit_vocabulary_idf_sets_the_word_starts_from_the_tokenizer():
    model = tiny_mbc_model(codebook_type="vocabulary", whole_words=True, seed=0).eval()
    fit_vocabulary_idf(model, datasets.Dataset.from_list(ROWS[:4]))
    strings = model.tokenizer.convert_ids_to_tokens(list(range(model.config.codebook_size)))
    expected = [s[0] in "Ġ▁ \n" or not s[0].isalnum() for s in strings]
    assert model.codebook.word_start.tolist() == expected and 0 < sum(expected) < len(expected)


def test_a_trained_selector_survives_save_and_load(tmp_path):
    import mbc_hf  # noqa: F401  (registers the auto classes)
    from transformers import AutoModelForCausalLM

    model = tiny_mbc_model(codebook_type="vocabulary", code_selector="trained", code_order="document",
                           seed=0).eval()
    fit_vocabulary_idf(model, datasets.Dataset.from_list(ROWS))
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    book, other = model.codebook, loaded.codebook
    assert (other.selector, other.order) == ("trained", "document")
    for name in ("idf", "selector_bias", "selector_weight"):
        assert torch.equal(getattr(other, name), getattr(book, name)), name
    assert other.selector_bias.abs().sum() > 0 and other.fingerprint() == book.fingerprint()
    docs = [r["context"] for r in ROWS] + ["The quick brown fox jumps over the lazy dog."]
    bank, again = model.memorize(docs), loaded.memorize(docs)
    assert torch.equal(bank.codes, again.codes) and bank.codebook_fingerprint == again.codebook_fingerprint
    # the codes are those of the trained scorer, not of the IDF alone
    idf_only = VocabularyCodebook(book.codebook_size, book.num_tokens, book.pad_code, order="document")
    idf_only.idf.copy_(book.idf)
    enc = model.encode_documents(docs)
    assert not torch.equal(idf_only.select(**enc), bank.codes.long())


# ---------------------------------------------------------------------------------------------- read_retrieved


def test_training_with_read_retrieved_reads_the_bank_of_all_training_documents(tmp_path):
    model = tiny_mbc_model(codebook_type="vocabulary", seed=0, read_documents=2)
    rows = ROWS[:6] + ROWS[:2]  # 6 unique documents, 2 of them twice
    args = MBCTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-3,
                                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                logging_steps=1, max_steps=3, gold_only_steps=1, read_retrieved=True)
    trainer = MBCTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows))
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*a, **kwargs):
        calls.append((trainer.state.global_step, model.training, dict(kwargs)))
        return forward(*a, **kwargs)

    model.forward = spy
    assert trainer._retrieval_bank is None
    trainer.train()
    unique = list(dict.fromkeys(r["context"] for r in rows))
    bank = trainer._retrieval_bank
    assert bank is not None and bank.shape == (len(unique), model.config.num_context_tokens)
    assert torch.equal(bank, document_codes(model, unique))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    training = [(step, kw) for step, train, kw in calls if train]
    assert [step for step, _ in training] == [0, 1, 2]
    for step, kw in training:
        if step < args.gold_only_steps:  # gold only: the batch's own documents, each question its own
            assert "memory" not in kw and "context_input_ids" in kw and "question_doc_index" in kw
        else:  # then the whole bank of training documents, addressed as at test time
            assert kw.get("memory") is not None
            assert torch.equal(kw["memory"].codes, bank.reshape(1, -1))
            for key in ("context_input_ids", "context_attention_mask", "question_doc_index",
                        "contrastive_doc_index"):
                assert key not in kw, (step, key)
