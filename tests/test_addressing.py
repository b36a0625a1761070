"""Addressing a bank of vocabulary codes (`mbc_hf.addressing`): the inverted index against brute force, its cache on
a bank, reading k documents, attribution (``answer(..., return_sources=True)``) and hybrid reading with a
`TextStore`, on tiny random models."""
import pytest
import torch

from mbc_hf.addressing import CodeIndex, bank_index, score_codes, top_k
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.text_store import TextStore

DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at 100 degrees.",
        "The quick brown fox jumps over the lazy dog.", "A wise owl reads old news about science.",
        "Document 1 says that item 2 costs 3 euros.", "The code of room 5 is 678."]
QUESTIONS = ["Where did the cat sit?", "What is the capital of France?", "At what temperature does water boil?",
             "What does the wise owl read?", "Over what does the quick fox jump?"]
# more texts for the IDF only, so that tokens differ in IDF (the DOCS alone would give each token the same IDF)
IDF_EXTRA = ["The cat and the dog.", "France and Paris and the old owl.", "The water is old.", "The fox and the cat."]


def fitted_model(**overrides):
    model = tiny_mbc_model(codebook_type="vocabulary", seed=0, **overrides).eval()
    model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS + IDF_EXTRA],
                       special_ids=model.tokenizer.all_special_ids)
    return model


def expected_ranking(model, question_ids, question_mask, codes):
    """Reference addressing in plain Python: for each question, documents sorted by the summed IDF of the question's
    distinct tokens among the document's codes (descending), ties by document index."""
    idf = model.codebook.idf.double().tolist()
    out = []
    for ids, mask in zip(question_ids.tolist(), question_mask.tolist()):
        tokens = {t for t, m in zip(ids, mask) if m}
        scores = [sum(idf[t] for t in tokens if t in set(row)) for row in codes.tolist()]
        out.append(sorted(range(len(scores)), key=lambda n: (-scores[n], n)))
    return out


# ---------------------------------------------------------------------------------------------- CodeIndex


def _dyadic_weights(gen, b, v, density):
    """(b, V) float64 weights in {0, 1/4, ..., 7/4}: sums of a few are exact in float64 in any order, so the index
    and brute force must agree bit for bit and their tie breaking is what is compared."""
    w = torch.randint(1, 8, (b, v), generator=gen).double() / 4
    return w * (torch.rand(b, v, generator=gen) < density)


def test_code_index_search_equals_brute_force_top_k_with_ties_and_repeated_codes():
    gen = torch.Generator().manual_seed(0)
    n, t, v = 500, 8, 60
    codes = torch.randint(0, 50, (n, t), generator=gen)  # tokens 50..59 are in no document
    codes[10] = codes[3]  # identical documents: an exact tie the index must break towards row 3
    codes[20, :4] = codes[20, 0]  # a code repeated within a document counts each time
    assert len({tuple(r) for r in codes.tolist()}) < n and any(len(set(r)) < t for r in codes.tolist())
    index = CodeIndex(codes, v)
    assert len(index) == n
    for density in (0.02, 0.1, 0.5):
        weights = _dyadic_weights(gen, 6, v, density)
        weights[0] = 0  # matches nothing
        weights[1] = 0
        weights[1, 55] = 1.0  # only a token that no document holds: matches nothing either
        for k in (1, 3, 10, n, n + 5):
            scores, docs = index.search(weights, k)
            ref_scores, ref_docs = top_k(score_codes(weights, codes[None]), k)
            assert scores.shape == docs.shape == (6, min(k, n))
            assert scores.dtype == torch.float64 and docs.dtype == torch.int64
            assert torch.equal(scores, ref_scores), (density, k)
            assert torch.equal(docs, ref_docs), (density, k)
            assert docs[0].tolist() == docs[1].tolist() == list(range(min(k, n)))  # no match: the earliest ones
            if k >= n:  # every document exactly once
                assert sorted(docs[2].tolist()) == list(range(n))


def test_code_index_ranks_a_tie_towards_the_earlier_document_and_pads_with_the_earliest_non_matching():
    codes = torch.tensor([[5, 6], [1, 2], [7, 8], [1, 2], [1, 9]])
    w = torch.zeros(2, 10, dtype=torch.float64)
    w[0, 1], w[0, 2], w[0, 9] = 1.0, 1.0, 0.5  # rows 1 and 3 score 2, row 4 scores 1.5, rows 0 and 2 score 0
    scores, docs = CodeIndex(codes, 10).search(w, 5)
    assert docs.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]]
    assert scores.tolist() == [[2.0, 2.0, 1.5, 0.0, 0.0], [0.0] * 5]
    empty = CodeIndex(torch.zeros(0, 2, dtype=torch.long), 10)
    assert [x.shape for x in empty.search(w, 3)] == [(2, 0), (2, 0)]


def test_code_index_early_stop_is_exact_for_skewed_weights_and_ties_at_the_bound():
    """MaxScore stops once the k-th score beats what the unread posting lists could add. Questions with one heavy
    token and many light ones (the case it stops early on), and a document that ties the k-th score using only
    light tokens and comes earlier (the case where stopping at equality would be wrong), against brute force."""
    gen = torch.Generator().manual_seed(1)
    n, t, v = 3000, 6, 200
    codes = torch.randint(0, v, (n, t), generator=gen)
    codes[:, 0] = torch.where(torch.rand(n, generator=gen) < 0.5, 0, codes[:, 0])  # token 0 in half the docs
    weights = torch.zeros(40, v, dtype=torch.float64)
    for b in range(40):
        light = torch.randint(0, v, (8,), generator=gen)
        weights[b, light] = 0.25
        weights[b, torch.randint(1, v, (1,), generator=gen)] = 4.0
    codes[codes == 7] = 8  # token 7: only in document 5, which scores 1.5 for question 0 ...
    codes[5] = torch.tensor([7, 1, 2, 3, 4, 5])
    codes[0] = torch.tensor([0, 0, 0, 0, 0, 0])  # ... as does document 0, from 6 copies of the light token 0
    index = CodeIndex(codes, v)
    weights[0] = 0
    weights[0, 0], weights[0, 7] = 0.25, 1.5
    for k in (1, 3, 25):
        assert [torch.equal(a, b) for a, b in zip(index.search(weights, k),
                                                   top_k(score_codes(weights, codes[None]), k))] == [True, True], k
    assert index.search(weights[:1], 1)[1].item() == 0
    with pytest.raises(ValueError, match="negative"):
        index.search(-weights[:1], 1)


def test_code_index_with_max_postings_reads_at_most_that_many_documents_per_token_and_scores_them_exactly():
    """The approximate mode (``max_postings=L``): a cap at least the longest posting list is the exact search; a
    smaller one finds only documents within the first L postings of some question token, and each document it returns
    carries its exact brute-force score, best first."""
    gen = torch.Generator().manual_seed(2)
    n, t, v = 2000, 6, 40  # 40 tokens over 12,000 codes: every posting list is long
    codes = torch.randint(0, v, (n, t), generator=gen)
    index = CodeIndex(codes, v)
    weights = _dyadic_weights(gen, 8, v, 0.3)
    longest = int(index.document_frequency().max())
    exact = index.search(weights, 5)
    assert [torch.equal(a, b) for a, b in zip(index.search(weights, 5, max_postings=longest), exact)] == [True] * 2
    brute = score_codes(weights, codes[None])  # (8, n)
    cap = 20
    scores, docs = index.search(weights, 5, max_postings=cap)
    for b in range(8):
        tokens = weights[b].nonzero().flatten().tolist()
        reachable = set()
        for token in tokens:
            reachable |= set(index.documents[index.indptr[token]:index.indptr[token] + cap].tolist())
        assert set(docs[b].tolist()) <= reachable, b
        assert torch.equal(scores[b], brute[b, docs[b]]), b
        assert (scores[b, :-1] >= scores[b, 1:]).all()
    assert not torch.equal(docs, exact[1])  # with 20 of ~300 postings a token, some question misses its best
    # fewer than k found: the earliest other documents fill the list, with their exact scores, best first
    small = CodeIndex(torch.tensor([[1, 2], [1, 3], [7, 8], [4, 4]]), 10)
    w = torch.zeros(1, 10, dtype=torch.float64)
    w[0, 1] = 1.0  # token 1 is in rows 0 and 1; a cap of 1 finds row 0 only, and row 1 fills the list
    assert [x.tolist() for x in small.search(w, 3, max_postings=1)] == [[[1.0, 1.0, 0.0]], [[0, 1, 2]]]
    with pytest.raises(ValueError, match="max_postings"):
        index.search(weights, 5, max_postings=0)


def test_model_addresses_approximately_when_the_config_caps_the_posting_lists():
    model = fitted_model(read_documents=2)
    bank = model.memorize(DOCS * 1 + [f"The cat number {i} sat on a mat in room {i}." for i in range(40)])
    batch = model.encode_questions(QUESTIONS)
    q, m = batch["question_input_ids"], batch["question_attention_mask"]
    exact = model.read_documents(q, m, model.memory_from_bank(bank))
    model.config.addressing_max_postings = 1
    approx = model.read_documents(q, m, model.memory_from_bank(bank))
    assert not torch.equal(exact[1], approx[1])  # "cat", "the" ... are on many rows: one posting each is not enough
    brute = model.codebook.score(q, m, bank.codes.long()[None])
    assert torch.equal(approx[0], brute.gather(1, approx[1]))  # what it returns is scored exactly
    with pytest.raises(ValueError, match="addressing_max_postings"):
        tiny_mbc_model(codebook_type="vocabulary", addressing_max_postings=0)


def test_question_weights_make_index_and_brute_force_agree_whatever_the_order_of_the_codes():
    """Two documents with the same codes in another order tie exactly under both scorers: question_weights are
    multiples of 2^-20, so float64 sums do not depend on the order (with raw IDF floats they differ in the last bit
    and the ranking could flip between the index and brute force)."""
    model = fitted_model()
    book = model.codebook
    book.idf.copy_(torch.rand(book.codebook_size) * 10 + 0.1)  # non-dyadic floats, as a real IDF
    q = torch.randint(0, book.codebook_size, (4, 12))
    weights = book.question_weights(q, None)
    assert torch.equal(weights * 2**20, torch.round(weights * 2**20))
    row = q[0, :6]
    codes = torch.stack([row, row.flip(0), row[torch.randperm(6)]] * 30)  # (90, 6), each triple the same set
    scores, docs = CodeIndex(codes, book.codebook_size).search(weights, 90)
    ref_scores, ref_docs = top_k(score_codes(weights, codes[None]), 90)
    assert torch.equal(docs, ref_docs) and torch.equal(scores, ref_scores)
    assert docs[0, :3].tolist() == [0, 1, 2]  # the permuted copies tie: the earlier document first


# ---------------------------------------------------------------------------------------------- bank_index


def test_bank_index_over_a_stream_of_appends_equals_a_fresh_index_with_few_segments():
    """Appends add segments that merge as a binary counter: after 40 appends of 1..7 rows the index still ranks
    exactly as a `CodeIndex` built on the whole bank (ties and zero-score padding across segments included) and
    holds O(log N) segments."""
    from mbc_hf.memory_bank import CompressedMemoryBank

    gen = torch.Generator().manual_seed(2)
    v, t = 40, 5
    bank = CompressedMemoryBank(v, t, "sha256:test")
    weights = _dyadic_weights(gen, 5, v, 0.1)
    weights[0] = 0  # matches nothing: the earliest rows, across segments
    index, n = None, 0
    for step in range(40):
        m = int(torch.randint(1, 8, (1,), generator=gen))
        codes = torch.randint(0, v, (m, t), generator=gen)
        if step % 5 == 0:
            codes[0] = bank.codes[0] if len(bank) else codes[0]  # an exact tie with row 0, in a later segment
        bank.extend([f"d{n + i}" for i in range(m)], codes)
        n += m
        index = bank_index(bank)
        for k in (1, 4, n):
            got, ref = index.search(weights, k), CodeIndex(bank.codes, v).search(weights, k)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (step, k)
    assert index is bank_index(bank) and len(index) == n
    assert 1 < len(index.segments) <= 2 * n.bit_length()


def test_bank_index_is_not_reused_after_a_save_merges_another_writers_rows(tmp_path):
    """A save that merges another process's rows reorders the bank (theirs first, then ours): the index this bank
    had cached must not survive it, or addressing would read the wrong rows."""
    from mbc_hf.memory_bank import CompressedMemoryBank

    v, t, path = 30, 3, tmp_path / "bank.safetensors"
    gen = torch.Generator().manual_seed(3)
    base = CompressedMemoryBank(v, t, "sha256:test")
    old = [f"d{i}" for i in range(20)]
    base.extend(old, torch.randint(10, v, (20, t), generator=gen))
    base.save(path)
    ours, theirs = CompressedMemoryBank.load(path), CompressedMemoryBank.load(path)
    ours.extend(["ours"], torch.tensor([[7, 8, 9]]))
    bank_index(ours)  # cached over d0..d19, ours (row 20)
    theirs.extend(["theirs"], torch.tensor([[10, 11, 12]]))
    theirs.save(path)
    ours.save(path)  # merges: d0..d19, theirs (now row 20), ours (row 21)
    assert ours.doc_ids == [*old, "theirs", "ours"]
    weights = torch.zeros(1, v, dtype=torch.float64)
    weights[0, 7] = 1.0
    scores, docs = bank_index(ours).search(weights, 2)
    assert docs[0].tolist() == [21, 0] and scores[0].tolist() == [1.0, 0.0]  # only "ours" holds code 7


def test_bank_index_is_cached_extended_on_append_and_rebuilt_after_remove_and_overwrite():
    model = fitted_model()
    V = model.config.codebook_size
    bank = model.memorize(DOCS[:4])
    batch = model.encode_questions(["What does the wise owl read?"])  # about DOCS[4], not yet in the bank
    weights = model.codebook.question_weights(batch["question_input_ids"], batch["question_attention_mask"])

    def check(index):
        fresh = CodeIndex(bank.codes, V).search(weights, len(bank))
        got = index.search(weights, len(bank))
        assert len(index) == len(bank) and all(torch.equal(a, b) for a, b in zip(got, fresh))
        return got

    first = bank_index(bank)
    assert bank_index(bank) is first and model.memory_from_bank(bank).index is first
    check(first)

    model.memorize(DOCS[4:], memory_bank=bank)  # append: the cached index indexes the new rows
    extended = bank_index(bank)
    assert extended is first and len(extended) == len(DOCS)
    _, docs = check(extended)
    owl = bank.index_of(bank.doc_ids[4])
    assert docs[0, 0].item() == owl == 4
    assert bank_index(bank) is extended

    bank.remove(bank.doc_ids[4])  # remove the owl document
    removed = bank_index(bank)
    assert removed is not extended and len(removed) == len(DOCS) - 1
    scores, docs = check(removed)
    assert float(scores[0, 0]) < float(extended.search(weights, 1)[0][0, 0])  # the best match is gone

    owl_codes = model.codebook.select(**model.encode_documents([DOCS[4]]))
    target = bank.doc_ids[0]
    bank.extend([target], owl_codes, on_duplicate="overwrite")  # same length, other codes
    overwritten = bank_index(bank)
    assert overwritten is not removed and len(overwritten) == len(removed)
    _, docs = check(overwritten)
    assert docs[0, 0].item() == bank.index_of(target) == 0


# ---------------------------------------------------------------------------------------------- read_documents


@pytest.mark.parametrize("read", [1, 3])
def test_read_documents_through_the_bank_index_equals_brute_force(read):
    model = fitted_model(read_documents=read)
    bank = model.memorize(DOCS)
    batch = model.encode_questions(QUESTIONS)
    q, m = batch["question_input_ids"], batch["question_attention_mask"]
    indexed = model.memory_from_bank(bank)
    brute = model.token_memory(bank.codes.long())
    assert indexed.index is not None and brute.index is None
    for k in (None, 1, 3):
        s_idx, d_idx = model.read_documents(q, m, indexed, k=k)
        s_bf, d_bf = model.read_documents(q, m, brute, k=k)
        width = k or read
        assert d_idx.shape == d_bf.shape == (len(QUESTIONS), width)
        assert torch.equal(d_idx, d_bf) and torch.equal(s_idx, s_bf), k
        assert (s_idx[:, :-1] >= s_idx[:, 1:]).all()
        ranking = expected_ranking(model, q, m, bank.codes.long())
        assert d_idx.tolist() == [r[:width] for r in ranking]
    assert d_idx[1, 0].item() == 1 and d_idx[2, 0].item() == 2  # France -> Paris, water -> boils


def test_token_prefix_reads_bos_and_the_codes_of_the_two_addressed_documents_best_first():
    model = fitted_model(read_documents=2)
    T = model.config.num_context_tokens
    bank = model.memorize(DOCS)
    questions = ["What is the capital of France?", "At what temperature does water boil?"]
    batch = model.encode_questions(questions)
    q, m = batch["question_input_ids"], batch["question_attention_mask"]
    memory = model.memory_from_bank(bank)
    codes = bank.codes.long()
    ranking = expected_ranking(model, q, m, codes)
    with torch.no_grad():
        prefix = model.token_prefix(q, m, memory)
        bos = model.config.text_config.bos_token_id
        tokens = torch.stack([torch.cat([torch.tensor([bos]), codes[r[0]], codes[r[1]]]) for r in ranking])
        assert tokens.shape == (2, 1 + 2 * T)
        cache = model.lm.base_model(input_ids=tokens, use_cache=True).past_key_values
        assert len(prefix) == len(cache.layers) == model.config.text_config.num_hidden_layers
        for (k, v), layer in zip(prefix, cache.layers):
            assert k.shape[2] == v.shape[2] == 1 + 2 * T
            assert torch.allclose(k, layer.keys, atol=1e-6) and torch.allclose(v, layer.values, atol=1e-6)
        # the other order of the two documents is another prefix: the order is read
        swapped = torch.stack([torch.cat([torch.tensor([bos]), codes[r[1]], codes[r[0]]]) for r in ranking])
        other = model.lm.base_model(input_ids=swapped, use_cache=True).past_key_values
        assert not torch.allclose(prefix[-1][0], other.layers[-1].keys, atol=1e-4)
        # and the LM's answer logits are those of the LM reading the same tokens before the question
        out = model(**model.encode_questions(questions[:1], ["Paris"]), memory=memory).logits
        qa = model.encode_questions(questions[:1], ["Paris"])["input_ids"]
        direct = model.lm(input_ids=torch.cat([tokens[:1], qa], dim=1)).logits[:, tokens.shape[1]:]
    assert torch.allclose(out, direct, atol=1e-5)


# ---------------------------------------------------------------------------------------------- attribution


def test_answer_returns_sources_best_first_with_their_scores():
    model = fitted_model(read_documents=2)
    ids = [f"doc-{i}" for i in range(len(DOCS))]
    bank = model.memorize(DOCS, doc_ids=ids)
    questions = QUESTIONS[:3]
    plain = model.answer(questions, memory_bank=bank, max_new_tokens=3)
    rich = model.answer(questions, memory_bank=bank, max_new_tokens=3, return_sources=True)
    assert isinstance(rich, list) and len(rich) == len(questions)
    batch = model.encode_questions(questions)
    ranking = expected_ranking(model, batch["question_input_ids"], batch["question_attention_mask"],
                               bank.codes.long())
    for out, answer, ranked in zip(rich, plain, ranking):
        assert set(out) == {"answer", "sources", "scores", "grounded", "relevance"} and out["grounded"]
        assert isinstance(out["answer"], str) and out["answer"] == answer
        assert out["sources"] == [ids[i] for i in ranked[:2]]
        assert len(out["scores"]) == 2 and all(isinstance(s, float) for s in out["scores"])
        assert out["scores"][0] >= out["scores"][1]
    assert rich[1]["sources"][0] == "doc-1" and rich[1]["scores"][0] > 0
    calls = []
    read = model.read_documents
    model.read_documents = lambda *a, **k: calls.append(1) or read(*a, **k)
    assert model.answer(questions, memory_bank=bank, max_new_tokens=3, return_sources=True) == rich
    assert len(calls) == 1  # one batch, addressed once: the sources are the documents the prefix read


def test_return_sources_needs_a_vocabulary_codebook():
    model = tiny_mbc_model(seed=0).eval()  # learned codebook: no addressing
    with pytest.raises(ValueError, match="vocabulary"):
        model.answer(["Where did the cat sit?"], return_sources=True, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------- hybrid reading


def _check_store(store):
    assert len(store) == 0 and store.search(["cat"], k=2) == [([], [])]
    store.add(["a", "b", "c"], ["The cat sat on the mat.", "Paris is the capital of France.",
                                "Water boils at 100 degrees."])
    assert len(store) == 3 and "b" in store and "z" not in store
    assert store.get("b") == "Paris is the capital of France."
    with pytest.raises(KeyError):
        store.get("z")
    with pytest.raises(ValueError):
        store.add(["d", "e"], ["only one text"])
    assert len(store) == 3  # the failed add wrote nothing
    found = store.search(["capital of France", "boils water", "cat mat"], k=2)
    assert [ids[0] for ids, _ in found] == ["b", "c", "a"]
    for ids, scores in found:
        assert len(ids) == len(scores) == 2 and scores[0] > scores[1]
    assert len(store.search(["capital"], k=10)[0][0]) == 3  # k is capped by the store's size
    store.add(["a"], ["A capital idea about France and Paris."])  # replace: searches see the new text
    assert len(store) == 3 and store.search(["idea"], k=1)[0][0] == ["a"]


def test_text_store_in_memory_and_on_disk(tmp_path):
    memory = TextStore(":memory:")
    _check_store(memory)
    memory.close()
    path = tmp_path / "texts.sqlite"
    store = TextStore(path)
    _check_store(store)
    store.close()
    reopened = TextStore(path)
    assert len(reopened) == 3 and reopened.get("b") == "Paris is the capital of France."
    assert reopened.search(["boils water"], k=1)[0][0] == ["c"]
    reopened.close()


def test_encode_questions_puts_each_passage_before_its_prompt():
    model = fitted_model()
    tok = model.tokenizer
    passage = "Paris is the capital of France."
    questions = ["What is the capital of France?", "Where did the cat sit?"]
    batch = model.encode_questions(questions, contexts=[passage, ""])
    plain = model.encode_questions(questions)
    bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) else []
    prompts = [model.config.prompt_template.format(question=q) for q in questions]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    context_ids = tok(passage + "\n\n", add_special_tokens=False)["input_ids"]
    assert context_ids[-len(tok("\n\n", add_special_tokens=False)["input_ids"]):] == \
        tok("\n\n", add_special_tokens=False)["input_ids"]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows[0] == bos + context_ids + prompt_ids[0]
    assert rows[1] == bos + prompt_ids[1]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padded for generation
    assert torch.equal(batch["question_input_ids"], plain["question_input_ids"])  # addressing ignores passages
    # with answers (training layout): labels still only on the answer
    trained = model.encode_questions(questions, ["Paris", "mat"], contexts=[passage, ""])
    answer_ids = tok([" Paris"], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
    assert trained["input_ids"][0, :len(bos) + len(context_ids)].tolist() == bos + context_ids
    assert trained["labels"][0][trained["labels"][0] != -100].tolist() == answer_ids


def test_answer_with_a_text_store_reports_the_top_passage():
    model = fitted_model()
    bank = model.memorize(DOCS)
    store = TextStore()
    store.add([f"p{i}" for i in range(len(DOCS))], DOCS)
    questions = ["What is the capital of France?", "At what temperature does water boil?"]
    out = model.answer(questions, memory_bank=bank, text_store=store, return_sources=True, max_new_tokens=3)
    top = [ids[0] for ids, _ in store.search(questions, k=1)]
    assert top == ["p1", "p2"]
    assert [o["passages"] for o in out] == [[t] for t in top]
    assert [o["sources"][0] for o in out] == [bank.doc_ids[1], bank.doc_ids[2]]
    # the passage is in the prompt: the answers are those of generating after the passage
    hybrid = model.answer(questions, memory_bank=bank, text_store=store, max_new_tokens=3)
    assert [o["answer"] for o in out] == hybrid
    batch = model.encode_questions(questions, contexts=[store.get(t) for t in top])
    with torch.no_grad():
        gen = model.generate(**batch, memory_bank=bank, max_new_tokens=3, do_sample=False,
                             eos_token_id=model.tokenizer.eos_token_id)
    texts = model.tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert hybrid == [t.strip().split("\n")[0].strip() for t in texts]
    store.close()
