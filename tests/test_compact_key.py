"""The compact key (issue 36, item 2): 48-byte keys in the bank's format, FAISS search, fused addressing.

Tiny random models only; a 1-layer BERT of width 384 (`mbc_hf.testing.tiny_key_encoder`) stands in for
all-MiniLM-L6-v2, so keys are 48 bytes as with the real encoder.
"""

import os

import pytest
import safetensors
import safetensors.torch
import torch

from mbc_hf import MBCConfig
from mbc_hf.addressing import CodeIndex, relevance, top_k
from mbc_hf.compact_key import (KEY_BYTES, KeyIndex, SentenceEncoder, binarize, fused_scores, fused_search, hamming,
                                key_search, question_vectors, similarity)
from mbc_hf.evaluation import relevances
from mbc_hf.memory_bank import CompressedMemoryBank
from mbc_hf.testing import tiny_key_encoder, tiny_mbc_model

DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at 100 degrees.",
        "The quick brown fox jumps over the lazy dog.", "A wise owl reads old news about science and sport.",
        "Document 1 says that item 2 costs 3 euros."]
MORE = ["Fact 4: the code of room 5 is 678.", "Who wrote the book? When did it happen?"]
QUESTIONS = ["What is the capital of France?", "Where did the cat sit?"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return tiny_key_encoder(tmp_path_factory.mktemp("key-encoder") / "enc")


def keyed_model(encoder_dir, **overrides):
    model = tiny_mbc_model(codebook_type="vocabulary", addressing_key="minilm-binary",
                           addressing_key_encoder=encoder_dir, **overrides).eval()
    model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS + MORE])
    return model


@pytest.fixture(scope="module")
def model(encoder_dir):
    return keyed_model(encoder_dir)


def expected_keys(model, texts):
    return model.reader.key.encoder.keys(texts)


def test_key_shape_dtype_bytes(model, encoder_dir):
    encoder = SentenceEncoder.from_pretrained(encoder_dir)
    keys = encoder.keys(DOCS)
    assert keys.dtype == torch.uint8 and tuple(keys.shape) == (len(DOCS), KEY_BYTES) == (len(DOCS), 48)
    emb = encoder.embed(DOCS)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(DOCS)), atol=1e-5)  # L2-normalised mean pooling
    assert torch.equal(keys, binarize(emb))
    bank = model.memorize(DOCS)
    assert bank.key_bytes == 48 and torch.equal(bank.keys, keys)
    plain = CompressedMemoryBank(bank.codebook_size, bank.num_tokens, bank.codebook_fingerprint)
    plain.extend(bank.doc_ids, bank.codes)
    assert bank.nbytes - plain.nbytes == 48 * len(DOCS)


def test_binarize_sign_bits():
    x = torch.tensor([[1.0, -1, 0.5, -0.5, 0, 2, -2, 3] + [-1.0] * 8])
    assert binarize(x).tolist() == [[0b10100101, 0]]
    with pytest.raises(ValueError, match="multiple of 8"):
        binarize(torch.zeros(2, 12))


def test_keys_stored_in_shards_and_checksummed(model, tmp_path):
    bank = model.memorize(DOCS)
    path = tmp_path / "bank.index.json"
    bank.save(path, shard_rows=2)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) == 3
    for name in shards:
        with safetensors.safe_open(tmp_path / name, "pt") as fh:
            assert "keys" in fh.keys() and fh.get_tensor("keys").shape == (2, 48)
            assert fh.metadata()["key_bytes"] == "48"
    loaded = CompressedMemoryBank.load(path)
    assert torch.equal(loaded.keys, bank.keys) and loaded.key_fingerprint == bank.key_fingerprint
    single = tmp_path / "single.safetensors"
    bank.save(single)
    assert torch.equal(CompressedMemoryBank.load(single).keys, bank.keys)
    # one flipped key bit is caught by the checksum
    tensors = dict(safetensors.torch.load_file(single))
    with safetensors.safe_open(single, "pt") as fh:
        header = fh.metadata()
    tensors["keys"][0, 0] ^= 1
    safetensors.torch.save_file(tensors, single, metadata=header)
    with pytest.raises(ValueError, match="checksum mismatch"):
        CompressedMemoryBank.load(single)


def test_append_without_rewrite_keeps_keys_aligned(model, tmp_path):
    path = tmp_path / "bank.index.json"
    model.memorize(DOCS).save(path)
    first = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors")}
    bank = CompressedMemoryBank.load(path)
    model.memorize(MORE, memory_bank=bank)
    model.memorize(DOCS[:2], memory_bank=bank)  # duplicates: skipped
    bank.save(path)
    after = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    # a merge of the small first shard with the new rows would rewrite it; with 6 + 2 rows the first stays
    assert set(first) <= set(after) and all(os.path.getmtime(tmp_path / f) == t for f, t in first.items())
    loaded = CompressedMemoryBank.load(path)
    assert len(loaded) == len(DOCS + MORE)
    texts = dict(zip(bank.doc_ids, DOCS + MORE))
    assert torch.equal(loaded.keys, expected_keys(model, [texts[d] for d in loaded.doc_ids]))


def test_remove_and_overwrite_keep_alignment(model, tmp_path):
    path = tmp_path / "bank.index.json"
    bank = model.memorize(DOCS + MORE)
    ids = bank.doc_ids
    texts = dict(zip(ids, DOCS + MORE))
    bank.save(path, shard_rows=3)
    bank = CompressedMemoryBank.load(path)
    bank.remove([ids[1], ids[4]])  # tombstones
    model.memorize([DOCS[0]], memory_bank=bank, doc_ids=[ids[2]], on_duplicate="overwrite")  # row 2 now DOCS[0]
    texts[ids[2]] = DOCS[0]
    want = expected_keys(model, [texts[d] for d in bank.doc_ids])
    assert torch.equal(bank.keys, want)
    assert torch.equal(bank.get_keys([ids[2]]), expected_keys(model, [DOCS[0]]))
    bank.save(path, shard_rows=3)
    loaded = CompressedMemoryBank.load(path)
    assert loaded.doc_ids == bank.doc_ids and torch.equal(loaded.keys, want)
    loaded.compact(shard_rows=3)
    assert torch.equal(CompressedMemoryBank.load(path).keys, want)


def test_old_bank_without_keys_loads_and_addresses_lexically(model, encoder_dir, tmp_path):
    lexical = tiny_mbc_model(codebook_type="vocabulary").eval()
    lexical.codebook.fit([lexical.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS + MORE])
    path = tmp_path / "old.safetensors"
    lexical.memorize(DOCS).save(path)
    with safetensors.safe_open(path, "pt") as fh:
        assert set(fh.keys()) == {"codes", "doc_ids"} and "key_bytes" not in fh.metadata()
    old = CompressedMemoryBank.load(path)
    assert old.key_bytes is None and old.keys is None
    keyed = keyed_model(encoder_dir)
    keyed.load_state_dict(lexical.state_dict())
    a = lexical.answer(QUESTIONS, memory_bank=old, max_new_tokens=2, return_sources=True)
    b = keyed.answer(QUESTIONS, memory_bank=old, max_new_tokens=2, return_sources=True)
    assert a == b  # same sources, scores and relevance: lexical addressing, as before keys existed
    keyed.memorize(MORE, memory_bank=old)  # an old bank grows without keys
    assert old.key_bytes is None and len(old) == len(DOCS + MORE)


def test_faiss_exact_search_equals_brute_force_hamming():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 256, (2000, 48), generator=g, dtype=torch.uint8)
    keys[100:110] = keys[5]  # exact ties
    queries = torch.randint(0, 256, (16, 48), generator=g, dtype=torch.uint8)
    queries[0] = keys[5]
    index = KeyIndex()
    index.add(keys[:700])
    index.add(keys[700:])  # appended, not rebuilt
    assert index.exact and "exact" in index.description
    distances, rows = index.search(queries, 40)
    reference = hamming(queries, keys).sort(dim=1, stable=True)
    assert torch.equal(distances, reference.values[:, :40]) and torch.equal(rows, reference.indices[:, :40])
    assert rows[0, :11].tolist() == [5] + list(range(100, 110))


def test_key_index_beyond_exact_size_is_named_approximate(caplog):
    keys = torch.randint(0, 256, (300, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    index = KeyIndex(exact_max_docs=100)
    index.add(keys[:80])
    with caplog.at_level("WARNING"):
        index.add(keys[80:200])
    index.add(keys[200:])  # appended to the approximate index
    assert len(index) == 300
    assert not index.exact and "approximate" in index.description and "approximate" in caplog.text
    distances, rows = index.search(keys[:5], 1)
    assert rows[:, 0].tolist() == list(range(5)) and distances[:, 0].tolist() == [0] * 5


def random_bank(n, t, v, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, v, (n, t), generator=g)
    keys = torch.randint(0, 256, (n, 48), generator=g, dtype=torch.uint8)
    weights = torch.zeros(6, v, dtype=torch.float64)
    for b in range(6):  # a few tokens per question, weights multiples of 2^-20 (as question_weights)
        tokens = torch.randint(0, v, (4,), generator=g)
        weights[b, tokens] = torch.round(torch.rand(4, generator=g, dtype=torch.float64) * 2 ** 20) / 2 ** 20
    weights[5] = 0  # a question without weighted tokens
    questions = question_vectors(torch.nn.functional.normalize(torch.randn(6, 384, generator=g), dim=1))
    return codes, keys, weights, questions


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
def test_fused_search_equals_brute_force(weight):
    codes, keys, weights, questions = random_bank(1500, 8, 300, seed=2)
    lexical, index = CodeIndex(codes, 300), KeyIndex()
    index.add(keys)
    ref_scores, ref_rows = top_k(fused_scores(weights, codes, questions, keys, weight), 5)
    for depth in (2, 64):  # a small depth makes the threshold test fail and the lists grow
        scores, rows = fused_search(lexical, index, codes, keys, weights, questions, 5, weight, depth=depth,
                                    exact=True)
        assert torch.equal(rows, ref_rows) and torch.equal(scores, ref_scores)
    # the default candidate search with every document in the lists is the brute-force ranking too
    scores, rows = fused_search(lexical, index, codes, keys, weights, questions, 5, weight, depth=1500)
    assert torch.equal(rows, ref_rows) and torch.equal(scores, ref_scores)


def test_similarity_is_the_cosine_with_the_sign_vector():
    q = question_vectors(torch.nn.functional.normalize(torch.randn(3, 384), dim=1))
    keys = binarize(torch.randn(5, 384))
    signs = torch.tensor([[1.0 if (int(keys[n, i // 8]) >> (7 - i % 8)) & 1 else -1.0 for i in range(384)]
                          for n in range(5)], dtype=torch.float64)
    assert torch.allclose(similarity(q, keys), q @ signs.T / 384 ** 0.5)
    assert torch.allclose(similarity(q, binarize(q)).diagonal(), q.abs().sum(1) / 384 ** 0.5)  # its own key: best


def test_fusion_picks_a_document_only_the_key_matches():
    codes, keys, weights, questions = random_bank(50, 8, 300, seed=3)
    weights = weights[:1] * 0  # the question's tokens are in no document: lexically every document scores 0
    weights[0, 299] = 1.0
    codes[codes == 299] = 0
    keys[17] = binarize(questions[:1].float())[0]  # only document 17's key matches the question
    lexical, index = CodeIndex(codes, 300), KeyIndex()
    index.add(keys)
    assert lexical.search(weights, 1)[0][0, 0] == 0  # lexical alone: nothing, the earliest document by tie
    _, rows = fused_search(lexical, index, codes, keys, weights, questions[:1], 1, 0.7)
    assert rows[0, 0] == 17


def test_model_answers_with_fused_scores_and_relevance(model):
    bank = model.memorize(DOCS)
    out = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=2, return_sources=True)
    enc = model.encode_questions(QUESTIONS)
    weights = model.codebook.question_weights(enc["question_input_ids"], enc["question_attention_mask"])
    q = model.reader.key.question_vectors(QUESTIONS)
    reference = fused_scores(weights, bank.codes.long(), q, bank.keys, model.config.addressing_key_weight)
    ref_scores, ref_rows = top_k(reference, model.config.read_documents)
    for i, row in enumerate(out):  # 6 documents < FUSION_DEPTH: the candidate search reads them all (exact)
        assert row["sources"] == [bank.doc_ids[r] for r in ref_rows[i].tolist()]
        assert row["scores"] == pytest.approx(ref_scores[i].tolist())
        assert row["relevance"] == pytest.approx(float(ref_scores[i, 0]))  # relevance = best fused score
    # calibration reads the same relevance
    assert relevances(model, QUESTIONS, bank).tolist() == pytest.approx(ref_scores[:, 0].tolist())
    lexical_rel = relevance(weights, torch.tensor([1.0, 1.0]))
    assert lexical_rel.shape == (2,)


def test_abstention_with_the_key(encoder_dir):
    model = keyed_model(encoder_dir, relevance_threshold=1.0)  # nothing reaches 1: every question abstains
    bank = model.memorize(DOCS)
    out = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=2, return_sources=True)
    assert all(not row["grounded"] and row["sources"] == [] for row in out)


def test_bad_key_input_refused(model):
    bank = model.memorize(DOCS[:2])
    n = len(bank)
    with pytest.raises(ValueError, match=r"keys must have shape \(n=1, key_bytes=48\)"):
        bank.extend(["x"], torch.zeros(1, 4, dtype=torch.long), keys=torch.zeros(1, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 packed sign bits"):
        bank.extend(["x"], torch.zeros(1, 4, dtype=torch.long), keys=torch.zeros(1, 384))
    with pytest.raises(ValueError, match="pass keys="):
        bank.extend(["x"], torch.zeros(1, 4, dtype=torch.long))
    assert len(bank) == n  # unchanged
    plain = CompressedMemoryBank(bank.codebook_size, 4, bank.codebook_fingerprint)
    with pytest.raises(ValueError, match="stores no compact keys"):
        plain.extend(["x"], torch.zeros(1, 4, dtype=torch.long), keys=torch.zeros(1, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="key_fingerprint"):
        CompressedMemoryBank(10, 4, "fp", key_bytes=48)
    index = KeyIndex()
    with pytest.raises(ValueError, match=r"shape \(n=2, 48\)"):
        index.add(torch.zeros(2, 47, dtype=torch.uint8))


def test_key_config_validated_in_one_place():
    with pytest.raises(ValueError, match="addressing_key='sbert'"):
        MBCConfig(codebook_type="vocabulary", addressing_key="sbert")
    with pytest.raises(ValueError, match="choose one"):  # two addressings of learned codes
        MBCConfig(addressing_key="minilm-binary", aggregation="topk")
    with pytest.raises(ValueError, match="relevance_threshold needs addressing"):
        MBCConfig(relevance_threshold=0.5)  # a learned codebook without the key reads the whole bank
    assert MBCConfig(addressing_key="minilm-binary", relevance_threshold=0.5).relevance_threshold == 0.5
    with pytest.raises(ValueError, match="addressing_key_weight"):
        MBCConfig(codebook_type="vocabulary", addressing_key="minilm-binary", addressing_key_weight=1.5)
    assert MBCConfig(codebook_type="vocabulary").addressing_key is None  # off by default


def test_key_encoder_too_wide_or_foreign_is_refused(model, encoder_dir, tmp_path):
    wide = keyed_model(tiny_key_encoder(tmp_path / "wide", hidden_size=392))
    with pytest.raises(ValueError, match="at most 384"):
        wide.memorize(DOCS[:1])
    other = keyed_model(tiny_key_encoder(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="another|key encoder"):
        other.answer(QUESTIONS[:1], memory_bank=model.memorize(DOCS[:2]), max_new_tokens=1)
    plain = tiny_mbc_model(codebook_type="vocabulary").eval()
    plain.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="addressing_key='minilm-binary'"):
        plain.memorize(MORE, memory_bank=model.memorize(DOCS[:2]))


def test_key_search_equals_brute_force():
    _, keys, _, questions = random_bank(1500, 8, 300, seed=4)
    index = KeyIndex()
    index.add(keys)
    ref_scores, ref_rows = top_k(similarity(questions, keys), 5)
    for depth in (2, 64):  # a small depth fails the threshold test: the candidate list grows until it is exact
        scores, rows = key_search(index, keys, questions, 5, depth=depth, exact=True)
        assert torch.equal(rows, ref_rows) and torch.equal(scores, ref_scores)
    scores, rows = key_search(index, keys, questions, 5, depth=1500)  # every document a candidate
    assert torch.equal(rows, ref_rows) and torch.equal(scores, ref_scores)


# ---- a learned codebook addressed by the key alone (issue 35: the shipped form of `synthetic_facts.py --key-...`)
def learned_keyed_model(encoder_dir, **overrides):
    return tiny_mbc_model(addressing_key="minilm-binary", addressing_key_encoder=encoder_dir, **overrides).eval()


def test_learned_codebook_reads_only_the_documents_the_key_ranks_first(encoder_dir):
    model = learned_keyed_model(encoder_dir, read_documents=2)
    bank = model.memorize(DOCS)
    assert bank.keys.shape == (len(DOCS), KEY_BYTES)  # the bank stores codes + keys
    out = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=2, return_sources=True)
    q = model.reader.key.question_vectors(QUESTIONS)
    ref_scores, ref_rows = top_k(similarity(q, bank.keys), 2)
    for i, row in enumerate(out):
        assert row["grounded"] and row["sources"] == [bank.doc_ids[r] for r in ref_rows[i].tolist()]
        assert row["scores"] == pytest.approx(ref_scores[i].tolist())
        assert row["relevance"] == pytest.approx(float(ref_scores[i, 0]))
    # the prefix is the one of a bank holding only the addressed documents (best first): the rest is never read
    enc = model.encode_questions(QUESTIONS[:1])
    prefix = model.prefix_key_values(enc["question_input_ids"], enc["question_attention_mask"],
                                     model.memory_from_bank(bank))
    ids = [DOCS[r] for r in ref_rows[0].tolist()]
    alone = model.memorize(ids)
    alone_prefix = model.prefix_key_values(enc["question_input_ids"], enc["question_attention_mask"],
                                           model.memory_from_bank(alone))
    whole = model.prefix_key_values(enc["question_input_ids"], enc["question_attention_mask"],
                                    model.memory_from_bank(bank, aggregation="dense"))  # asked for: the whole bank
    assert all(torch.allclose(a, b, atol=1e-5) for (a, _), (b, _) in zip(prefix, alone_prefix))
    assert not all(torch.allclose(a, b, atol=1e-5) for (a, _), (b, _) in zip(prefix, whole))


def test_learned_codebook_with_the_key_abstains_and_reads_old_banks_whole(encoder_dir):
    model = learned_keyed_model(encoder_dir, relevance_threshold=1.0)  # no key similarity reaches 1
    out = model.answer(QUESTIONS, memory_bank=model.memorize(DOCS), max_new_tokens=2, return_sources=True)
    assert all(not row["grounded"] and row["sources"] == [] for row in out)
    plain = tiny_mbc_model().eval()  # same seed, same weights, no key: its bank has no keys
    old = plain.memorize(DOCS)
    assert not old.key_bytes
    keyed = learned_keyed_model(encoder_dir)
    assert len(keyed.answer(QUESTIONS, memory_bank=old, max_new_tokens=2)) == 2  # read whole, as before keys
    with pytest.raises(ValueError, match="no compact keys"):
        keyed.answer(QUESTIONS, memory_bank=old, return_sources=True)
    with pytest.raises(ValueError, match="addressing_key='minilm-binary'"):
        plain.answer(QUESTIONS, memory_bank=old, return_sources=True)  # no addressing: the message names the fix
