"""`retention_curve` / `write_retention` (MAC's forgetting measurement) on the tiny random model and a fixture file.

The fixture's reference answers for the measured documents are what the model itself answers after memorizing those
documents, so the first measurement scores F1 = 100 and the retention of every later row is a real ratio; answers of
the other documents can never be produced, so measuring a wrong question set would show up in the scores.
"""

import csv
import json
import math

import pytest
import torch

from mbc_hf.data import documents, load_qa_file
from mbc_hf.evaluation import RETENTION_COLUMNS, retention_curve, score, write_retention
from mbc_hf.testing import tiny_mbc_model

N_DOCS, QUESTIONS_PER_DOC = 14, 3
UNREACHABLE = "zebraxylophonequux"  # one normalised token the tiny model will not generate


def context(i: int) -> str:
    return f"Room {i} of the old museum holds painting number {i * 11} and a statue of a {['cat', 'owl'][i % 2]}."


def question(i: int, k: int) -> str:
    return [f"Which painting is in room {i}?", f"What statue is in room {i}?", f"Who owns room {i}?"][k]


def write_fixture(path, answers: dict[str, str] | None = None) -> None:
    """Paragraph JSONL; ``answers`` maps a question to its reference (default: UNREACHABLE)."""
    answers = answers or {}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_DOCS):
            qas = [{"id": f"q{i}.{k}", "question": question(i, k),
                    "answers": {"text": [answers.get(question(i, k), UNREACHABLE)], "answer_start": [0]}}
                   for k in range(QUESTIONS_PER_DOC)]
            f.write(json.dumps({"paragraph_id": f"R#{i}", "title": "R", "context": context(i), "qas": qas}) + "\n")


@pytest.fixture(scope="module")
def model():
    """Tiny random model whose codes differ between documents and whose KV-LoRA is not a no-op, so its answers
    depend on what the bank holds (a fresh codebook maps almost every document to the same code)."""
    model = tiny_mbc_model(seed=0)
    with torch.no_grad():
        z = model.amortization(**model.encode_documents([context(i) for i in range(N_DOCS)]))
        model.codebook.train()
        model.codebook(z)  # one online reset of the dead codes on these encodings
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def measured_questions(first: int, per_doc: int) -> list[str]:
    return [question(i, k) for i in range(first) for k in range(per_doc)]


def test_retention_rows_csv_and_png(model, tmp_path):
    first, per_doc = 4, 2
    questions = measured_questions(first, per_doc)
    bank = model.memorize([context(i) for i in range(first)], doc_ids=[f"R#{i}" for i in range(first)])
    own = model.answer(questions, memory_bank=bank, batch_size=16)
    assert all(own), "the tiny model answered with an empty string; pick another seed"
    write_fixture(tmp_path / "dev.jsonl", dict(zip(questions, own)))
    dataset = load_qa_file(tmp_path / "dev.jsonl")

    asked = []
    answer = model.answer

    def recording_answer(qs, **kwargs):
        asked.append(list(qs))
        return answer(qs, **kwargs)

    model.answer = recording_answer
    try:
        rows = retention_curve(model, dataset, first=first, step=4, until=12, max_questions_per_doc=per_doc,
                               show_progress=False)
    finally:
        del model.answer

    assert [r["n_docs"] for r in rows] == [4, 8, 12]  # the 2 documents past `until` are never streamed
    assert [r["bank_docs"] for r in rows] == [4, 8, 12]
    assert rows[0]["bank_bytes"] < rows[1]["bank_bytes"] < rows[2]["bank_bytes"]
    assert asked == [questions] * 3  # the same questions, in the same order, at every measurement
    assert all(r["n_questions"] == first * per_doc for r in rows)
    assert rows[0]["em"] == rows[0]["f1"] == 100.0 and rows[0]["retention"] == 100.0
    subset = dataset.filter(lambda r: r["question"] in questions)
    for r in rows:  # each row scores what a bank of the first n documents answers (streaming = memorizing at once)
        assert set(r) == set(RETENTION_COLUMNS)
        fresh = model.memorize([context(i) for i in range(r["n_docs"])])
        expected = score(model.answer(questions, memory_bank=fresh, batch_size=16), subset)
        assert (r["em"], r["f1"], r["prefix_em"]) == (expected["em"], expected["f1"], expected["prefix_em"])
        assert r["retention"] == pytest.approx(r["f1"] / rows[0]["f1"] * 100)

    csv_path, png_path = write_retention(rows, tmp_path / "out")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RETENTION_COLUMNS
        written = list(reader)
    assert [int(r["n_docs"]) for r in written] == [4, 8, 12]
    assert [float(r["retention"]) for r in written] == pytest.approx([r["retention"] for r in rows])
    assert [int(r["bank_bytes"]) for r in written] == [r["bank_bytes"] for r in rows]
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["retention.csv", "retention.png"]  # no temp files


def test_hybrid_retention_reads_a_text_store_of_the_documents_streamed_so_far(model, tmp_path):
    """hybrid=True: each point is measured by the bank alone and with a text store that holds exactly the documents
    streamed so far (the hybrid reader's BM25 passage can only come from them); each reader's retention is against
    its own first F1."""
    write_fixture(tmp_path / "dev.jsonl")
    dataset = load_qa_file(tmp_path / "dev.jsonl")
    seen = []
    answer = model.answer

    def recording_answer(qs, **kwargs):
        store = kwargs.get("text_store")
        seen.append(None if store is None else sorted(i for ids, _ in store.search(["museum"], k=N_DOCS)
                                                      for i in ids))
        return answer(qs, **kwargs)

    model.answer = recording_answer
    try:
        rows = retention_curve(model, dataset, first=4, step=4, until=8, max_questions_per_doc=1,
                               show_progress=False, hybrid=True)
    finally:
        del model.answer
    assert [(r["reader"], r["n_docs"]) for r in rows] == [("bank", 4), ("hybrid", 4), ("bank", 8), ("hybrid", 8)]
    streamed = [d for d, _ in documents(dataset)]
    assert seen[0] is None and seen[2] is None
    assert seen[1] == sorted(streamed[:4]) and seen[3] == sorted(streamed[:8])
    for reader in ("bank", "hybrid"):
        mine = [r for r in rows if r["reader"] == reader]
        assert all(r["retention"] == pytest.approx(r["f1"] / mine[0]["f1"] * 100) for r in mine if mine[0]["f1"])


def test_retention_until_end_of_stream_and_zero_first_f1(model, tmp_path):
    write_fixture(tmp_path / "dev.jsonl")  # every reference is UNREACHABLE: F1 is 0 everywhere
    dataset = load_qa_file(tmp_path / "dev.jsonl")
    rows = retention_curve(model, dataset, first=4, step=4, until=None, show_progress=False)
    assert [r["n_docs"] for r in rows] == [4, 8, 12, 14]  # the end of the stream is measured too
    assert all(r["n_questions"] == 4 * QUESTIONS_PER_DOC for r in rows)  # default: all questions of a document
    assert all(r["f1"] == 0 for r in rows)
    assert all(math.isnan(r["retention"]) for r in rows)  # f1 / 0 is undefined, not 100 or 0
    csv_path, _ = write_retention(rows, tmp_path)
    with open(csv_path, newline="") as f:
        assert [r["retention"] for r in csv.DictReader(f)] == ["nan"] * 4


def test_retention_until_between_steps_and_a_dict_dataset(model, tmp_path):
    write_fixture(tmp_path / "dev.jsonl")
    dataset = load_qa_file(tmp_path / "dev.jsonl").to_dict()  # a dict of lists works as well
    rows = retention_curve(model, dataset, first=3, step=5, until=10, max_questions_per_doc=1, show_progress=False)
    assert [r["n_docs"] for r in rows] == [3, 8, 10]
    assert [r["n_questions"] for r in rows] == [3, 3, 3]
    assert len(documents(dataset)) == N_DOCS


@pytest.mark.parametrize("kwargs, match", [
    (dict(first=0), "first must be a positive int"),
    (dict(step=-1), "step must be a positive int"),
    (dict(first=8, until=4), "until=4 is smaller than first=8"),
    (dict(first=20), "14 unique documents, fewer than first=20"),
    (dict(max_questions_per_doc=0), "max_questions_per_doc"),
])
def test_retention_rejects_bad_settings(model, tmp_path, kwargs, match):
    write_fixture(tmp_path / "dev.jsonl")
    with pytest.raises(ValueError, match=match):
        retention_curve(model, load_qa_file(tmp_path / "dev.jsonl"), **{"first": 4, "step": 4, **kwargs})


def test_write_retention_rejects_rows_without_the_columns(tmp_path):
    with pytest.raises(ValueError, match="no retention rows"):
        write_retention([], tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        write_retention([{"n_docs": 1, "f1": 0.0}], tmp_path)
    assert list(tmp_path.iterdir()) == []
