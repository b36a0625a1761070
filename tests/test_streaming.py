"""`adapt_stream`: memorizing a lazily read stream of documents (datasets IterableDataset, generators) on the tiny
model; and a smoke run of benchmarks/stream_adapt.py."""

import gc
import json
import warnings
import weakref

import datasets
import pytest
import torch

from mbc_hf.data import EmptyDocumentWarning, document_id
from mbc_hf.evaluation import adapt_stream
from mbc_hf.memory_bank import CompressedMemoryBank
from mbc_hf.testing import tiny_mbc_model


def doc(i: int) -> str:
    pet = ["cats", "owls", "tea"][i % 3]
    return f"Document {i}: the code of room {i} is {i * 37 % 1000} and its owner likes {pet}."


@pytest.fixture(scope="module")
def model():
    model = tiny_mbc_model(seed=0)
    with torch.no_grad():  # spread the codes over documents (a fresh codebook maps nearly all to one code)
        z = model.amortization(**model.encode_documents([doc(i) for i in range(40)]))
        model.codebook.train()
        model.codebook(z)
    return model.eval()


def qa_rows(n_docs: int, questions_per_doc: int = 3) -> list[dict]:
    """One row per question, as load_qa_file returns: each document repeats on consecutive rows."""
    return [{"doc_id": f"D{i}", "context": doc(i), "question": f"Q{k} about room {i}?", "answers": ["x"]}
            for i in range(n_docs) for k in range(questions_per_doc)]


class MemorizeSpy:
    """Wraps model.memorize; records how many stream items had been read when each call happened."""

    def __init__(self, model):
        self.model, self.original, self.calls, self.read = model, model.memorize, [], 0
        model.memorize = self

    def __call__(self, texts, **kwargs):
        self.calls.append((self.read, len(texts)))
        return self.original(texts, **kwargs)

    def counting(self, items):
        for item in items:
            self.read += 1
            yield item

    def restore(self):
        del self.model.memorize


def test_iterable_dataset_gives_the_bank_of_memorize(model):
    rows = qa_rows(10)
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    bank = adapt_stream(model, stream, batch_size=3, id_column="doc_id", show_progress=False)
    reference = model.memorize([doc(i) for i in range(10)], doc_ids=[f"D{i}" for i in range(10)])
    assert len(bank) == 10  # 30 rows, one per question: duplicates skipped
    assert bank.doc_ids == reference.doc_ids
    assert torch.equal(bank.codes, reference.codes)


def test_streaming_json_file_with_hash_ids_and_an_existing_bank(model, tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in [0, 1, 2, 1, 3, 4, 0, 5]:
            f.write(json.dumps({"text": doc(i), "source": "test"}) + "\n")
    stream = datasets.load_dataset("json", data_files=str(path), streaming=True, split="train")
    assert isinstance(stream, datasets.IterableDataset)
    bank = model.memorize([doc(0), doc(9)])  # already stored documents are skipped, the bank is extended
    same = adapt_stream(model, stream, bank, batch_size=2, text_column="text", show_progress=False)
    assert same is bank
    order = [0, 9, 1, 2, 3, 4, 5]
    assert bank.doc_ids == [document_id(doc(i)) for i in order]
    assert torch.equal(bank.codes, model.memorize([doc(i) for i in order]).codes)


def test_reads_lazily_and_encodes_each_document_once(model):
    spy = MemorizeSpy(model)
    items = [doc(i % 12) for i in range(30)]  # 12 unique documents, then repeats
    try:
        bank = adapt_stream(model, spy.counting(items), batch_size=4, show_progress=False)
    finally:
        spy.restore()
    calls = [c for c in spy.calls if c[1]]  # memorize([]) validates the bank up front
    assert len(bank) == 12
    assert sum(n for _, n in calls) == 12  # repeats are never encoded again
    assert all(n <= 4 for _, n in calls)
    stored = 0
    for read, n in calls:  # never more than one batch of the stream is held at a time
        stored += n
        assert read == stored  # here every read item is new until the 12th
    assert [read for read, _ in calls] == [4, 8, 12]


class Text(str):
    """A str that can be weakly referenced, to see which texts are still alive."""


def test_texts_are_not_kept(model):
    alive = []  # weak references to every text yielded so far
    most = 0

    def stream():
        nonlocal most
        for i in range(60):
            text = Text(doc(i))
            alive.append(weakref.ref(text))
            yield text
            del text  # texts are freed by reference counting alone: no gc.collect() needed (nor wanted: slow)
            most = max(most, sum(r() is not None for r in alive))

    bank = adapt_stream(model, stream(), batch_size=8, show_progress=False)
    gc.collect()
    assert len(bank) == 60
    assert most <= 8  # at most one batch of texts is alive at any time
    assert sum(r() is not None for r in alive) == 0


def test_checkpoints_are_complete_banks_and_a_rerun_resumes(model, tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    saved_lengths = []
    save = CompressedMemoryBank.save

    def recording_save(self, p):
        save(self, p)
        saved_lengths.append(len(CompressedMemoryBank.load(p)))

    monkeypatch.setattr(CompressedMemoryBank, "save", recording_save)
    items = [(f"id{i}", doc(i)) for i in range(10)]
    bank = adapt_stream(model, items, batch_size=2, save_every=4, bank_path=path, show_progress=False)
    assert saved_lengths == [4, 8, 10]  # every 4 new documents (at batch boundaries), then the end
    reference = model.memorize([t for _, t in items], doc_ids=[i for i, _ in items])
    assert torch.equal(CompressedMemoryBank.load(path).codes, reference.codes)

    saved_lengths.clear()
    partial = model.memorize([t for _, t in items[:4]], doc_ids=[i for i, _ in items[:4]])  # a killed run's checkpoint
    spy = MemorizeSpy(model)
    try:
        resumed = adapt_stream(model, items, partial, batch_size=2, save_every=100, bank_path=path,
                               show_progress=False)
    finally:
        spy.restore()
    assert sum(n for _, n in spy.calls) == 6  # only the missing documents are encoded
    assert saved_lengths == [10]  # save_every not reached: saved once at the end
    assert resumed.doc_ids == bank.doc_ids and torch.equal(resumed.codes, reference.codes)
    assert len(bank) == 10


def test_overwrite_policy_reencodes_stored_ids(model):
    bank = model.memorize([doc(1)], doc_ids=["a"])
    adapt_stream(model, [("a", doc(2)), ("b", doc(3))], bank, on_duplicate="overwrite", show_progress=False)
    assert bank.doc_ids == ["a", "b"]
    assert torch.equal(bank.get_codes(["a"]), model.memorize([doc(2)]).codes)


def test_empty_documents_are_skipped_with_one_warning(model):
    items = [doc(0), "", "   \n", doc(1), "\t"]
    with pytest.warns(EmptyDocumentWarning, match=r"skipped 3 empty or whitespace-only"):
        bank = adapt_stream(model, items, show_progress=False)
    assert bank.doc_ids == [document_id(doc(0)), document_id(doc(1))]


@pytest.mark.parametrize("items, kwargs, error, match", [
    ([doc(0), doc(1), doc(2), 7], {}, TypeError, "stream item 3 is a int"),
    ([doc(0), doc(1), doc(2), {"context": None}], {}, TypeError, "stream item 3: the document text is NoneType"),
    ([doc(0), doc(1), doc(2), {"body": "x"}], {}, ValueError, r"stream item 3 has no column 'context'.*\['body'\]"),
    ([{"context": doc(0)}] * 3 + [{"context": doc(1)}], {"id_column": "doc_id"}, ValueError,
     "stream item 0 has no column 'doc_id'.*id_column=None"),
    ([doc(0), doc(1), doc(2), ("", doc(3))], {}, TypeError, "stream item 3: doc id ''"),
    ([doc(0), doc(1), doc(2), "bad \ud800 text"], {}, ValueError, "stream item 3: .*not valid Unicode"),
])
def test_bad_items_name_their_position_and_keep_what_was_stored(model, items, kwargs, error, match):
    bank = model.new_memory_bank()
    with pytest.raises(error, match=match):
        adapt_stream(model, items, bank, batch_size=2, show_progress=False, **kwargs)
    stored = 2 if "id_column" not in kwargs else 0  # the first full batch was memorized before the bad item
    assert len(bank) == stored
    if stored:
        assert torch.equal(bank.codes, model.memorize([doc(i) for i in range(stored)]).codes)


def test_bank_from_another_codebook_is_refused_before_reading(model, tmp_path):
    foreign = tiny_mbc_model(seed=1).eval().memorize([doc(0)])
    read = []

    def stream():
        read.append(1)
        yield doc(1)

    with pytest.raises(ValueError, match="codebook"):
        adapt_stream(model, stream(), foreign, show_progress=False, bank_path=tmp_path / "b.safetensors")
    assert read == [] and len(foreign) == 1 and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(save_every=5), "save_every needs bank_path"),
    (dict(save_every=0, bank_path="x"), "save_every"),
])
def test_bad_settings(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        adapt_stream(model, [doc(0)], show_progress=False, **kwargs)


def test_dense_bank(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation or other warnings on short documents
        bank = adapt_stream(model, [doc(i) for i in range(5)], compress=False, batch_size=2, show_progress=False)
    reference = model.memorize([doc(i) for i in range(5)], compress=False)
    assert torch.equal(bank.vectors, reference.vectors)


def test_stream_adapt_benchmark_smoke(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("psutil")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stream_adapt.py"
    spec = importlib.util.spec_from_file_location("stream_adapt", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--docs", "300", "--points", "3", "--batch-size", "32", "--save-every", "100",
                       "--bank", str(tmp_path / "b.safetensors")])
    assert [r["docs read"] for r in rows] == [0, 100, 200, 300]
    assert rows[-1]["docs in bank"] == 300 and rows[-1]["bytes/doc"] == rows[-1]["bank bytes"] / 300
    assert len(CompressedMemoryBank.load(tmp_path / "b.safetensors")) == 300
    assert "| docs read | docs in bank | seconds | docs/s | RSS MiB | peak RSS MiB |" in capsys.readouterr().out
