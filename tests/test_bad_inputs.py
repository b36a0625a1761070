"""Bad inputs across the library and the command line (docs/bad_inputs.md lists every case and where it is tested).

Cases that concern one module only live next to that module's tests (tests/test_data.py, tests/test_memory_bank.py,
tests/test_modeling.py, tests/test_streaming.py); here are the ones that cross modules or processes: long documents,
out-of-range codes met at use, the command line's error reporting, and processes killed while saving or read while
another one writes.
"""

import json
import os
import signal
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from mbc_hf.cli import main
from mbc_hf.evaluation import adapt_stream
from mbc_hf.memory_bank import CompressedMemoryBank
from mbc_hf.modeling_mbc import document_id
from mbc_hf.testing import tiny_mbc_model

MEMORY_BANK_PY = Path(__file__).resolve().parents[1] / "src" / "mbc_hf" / "memory_bank.py"
# memory_bank.py needs only the stdlib, torch, safetensors and .atomic: loading those files by path keeps the
# child processes below from importing transformers (seconds on a busy machine).
LOAD_MEMORY_BANK = f"""
import importlib, sys, types
package = types.ModuleType("mbc_hf_files")  # the package's files without its __init__ (no transformers import)
package.__path__ = [{str(MEMORY_BANK_PY.parent)!r}]
sys.modules["mbc_hf_files"] = package
mb = importlib.import_module("mbc_hf_files.memory_bank")
"""
DOCS = ["The red door is in Rome.", "The blue door is in Oslo.", "The green door is in Lima.",
        "The black door is in Cairo.", "The white door is in Quito.", "The grey door is in Perth.",
        "The pink door is in Bern.", "The gold door is in Riga."]


def spread_codes(model):
    """One online reset of the dead codes on real encodings, so different documents get different codes."""
    with torch.no_grad():
        z = model.amortization(**model.encode_documents(DOCS))
        model.codebook.train()
        model.codebook(z)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    spread_codes(tiny_mbc_model(seed=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    from mbc_hf.cli import load_model

    return load_model(str(model_dir))


def start(script: str, *args, stderr=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            stderr=stderr, env=env)


def wait_for_line(proc: subprocess.Popen, expected: str) -> str:
    line = proc.stdout.readline()
    assert line.startswith(expected), f"child printed {line!r} (exit code {proc.poll()}), expected {expected!r}"
    return line


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


# ----------------------------------------------------------------------------------- documents longer than the window


def test_long_documents_are_truncated_with_a_warning(model):
    window = model.config.max_document_length  # encoder tokens
    shared = " ".join(f"word{i}" for i in range(3 * window))  # far more than `window` tokens
    long_a, long_b = shared + " The treasure is in Rome.", shared + " The treasure is in Oslo."
    with pytest.warns(UserWarning, match=rf"2 of 3 documents exceed max_document_length={window}.*truncated"):
        bank = model.memorize([long_a, long_b, DOCS[0]])
    assert len(bank) == 3  # both are stored under their own ids...
    a, b = bank.get_codes([document_id(long_a), document_id(long_b)])
    assert torch.equal(a, b)  # ...but only their first `window` tokens were encoded: the differing ends are lost


def test_the_truncation_warning_counts_every_batch_and_a_huge_document_is_cut_before_tokenizing(model):
    import warnings
    from unittest import mock

    window = model.config.max_document_length
    docs = [" ".join(f"w{i}x{k}" for k in range(3 * window)) for i in range(10)]
    with pytest.warns(UserWarning, match=rf"^10 of 10 documents exceed max_document_length={window}") as caught:
        bank = model.memorize(docs, batch_size=4)  # three batches: one warning, counting all of them
    assert len([w for w in caught if "exceed" in str(w.message)]) == 1 and len(bank) == 10
    huge = "Rome is far. " * 400_000  # 5 MB
    tokenize = model.encoder_tokenizer.__call__
    with mock.patch.object(type(model.encoder_tokenizer), "__call__", autospec=True,
                           side_effect=lambda self, text, **kw: tokenize(text, **kw)) as spy:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = model.encode_documents([huge])
    longest = max(len(t) for call in spy.call_args_list for t in ([call.args[1]] if isinstance(call.args[1], str)
                                                                    else call.args[1]))
    assert longest <= 64 * window  # never the whole 5 MB
    assert enc["input_ids"].shape[1] == window  # still a full window of tokens
    assert torch.equal(enc["input_ids"], model.encode_documents(["Rome is far. " * 4 * window])["input_ids"])


# ------------------------------------------------------------------------------------- invalid ids, metadata, sizes


@pytest.mark.parametrize("call", [
    lambda m, b: m.memorize(["A new text."], memory_bank=b, doc_ids=["\udc00"]),
    lambda m, b: m.memorize(["A new text.", "Another."], memory_bank=b, metadata=[{}, {"title": "\ud800"}]),
    lambda m, b: b.extend(["\ud800"], b.get_codes([b.doc_ids[0]])),
    lambda m, b: b.append("ok", b.get_codes([b.doc_ids[0]])[0], metadata={"k": "\udfff"}),
    lambda m, b: m.memorize(["x y", "y z"], memory_bank=b, batch_size=-1),
    lambda m, b: m.memorize(["x y", "y z"], memory_bank=b, batch_size=0),
    lambda m, b: m.memorize(["one text", "another text"], memory_bank=b, doc_ids=["same", "same"]),
    lambda m, b: adapt_stream(m, [("\ud800", "A streamed text.")], memory_bank=b, show_progress=False),
], ids=["surrogate-id", "surrogate-metadata", "extend-surrogate-id", "append-surrogate-metadata", "batch-size-neg",
        "batch-size-zero", "one-id-two-texts", "stream-surrogate-id"])
def test_a_mutating_call_that_raises_leaves_the_bank_saveable_and_as_it_was(model, tmp_path, call):
    bank = model.memorize(DOCS[:3])
    before = (list(bank.doc_ids), bank.codes.clone())
    with pytest.raises(ValueError, match=r"surrogate|batch_size|another text"):
        call(model, bank)
    assert (bank.doc_ids, bank.codes.tolist()) == (before[0], before[1].tolist())
    bank.save(tmp_path / "bank.safetensors")  # a failed call never poisons later saves
    bank.remove(bank.doc_ids[0])
    assert len(CompressedMemoryBank.load(tmp_path / "bank.safetensors")) == 3


# ------------------------------------------------------------------------------------- codes out of range at use time


def test_codes_beyond_the_models_codebook_are_refused_at_use(model, tmp_path):
    K = model.config.codebook_size
    forged = CompressedMemoryBank(2 * K, model.config.num_context_tokens, model.codebook.fingerprint())
    forged.extend(["x"], torch.full((1, model.config.num_context_tokens), K + 3))  # valid for the bank's own K
    forged.save(tmp_path / "forged.safetensors")
    loaded = CompressedMemoryBank.load(tmp_path / "forged.safetensors",
                                       codebook_fingerprint=model.codebook.fingerprint())
    for use in (lambda: model.answer(["Where is the red door?"], memory_bank=loaded),
                lambda: model.memorize([DOCS[0]], memory_bank=loaded)):
        with pytest.raises(ValueError, match=rf"K={2 * K}.*this model's codebook has .*K={K}"):
            use()
    assert loaded.doc_ids == ["x"]


def test_codes_modified_in_place_after_counting_are_refused_by_the_dense_path(model):
    """code_counts() caches; the dense path recounts (check_codes), so an edit after a first use is still caught."""
    bank = model.memorize(DOCS[:3])
    model.answer(["Where is the red door?"], memory_bank=bank)  # counts cached
    bank.codes[0, 0] = model.config.codebook_size + 2
    with pytest.raises(ValueError, match=r"code 130 at row 0 .*modified in place"):
        model.answer(["Where is the red door?"], memory_bank=bank, aggregation="dense")


def test_codes_modified_in_place_are_refused_at_use(model):
    bank = model.memorize(DOCS[:3])
    bank.codes[1, 2] = model.config.codebook_size + 1  # what the docs say never to do (uint8 holds up to 255)
    with pytest.raises(ValueError, match=r"code 129 at row 1 .*position 2 .*modified in place"):
        bank.code_counts()
    for aggregation in ("histogram", "dense"):
        with pytest.raises(ValueError, match="modified in place"):
            model.answer(["Where is the red door?"], memory_bank=bank, aggregation=aggregation)


# ------------------------------------------------------------------------------- command line: clear errors, no loss


def test_cli_adapt_with_a_bank_from_another_codebook_keeps_the_bank(model_dir, tmp_path):
    bank = tmp_path / "bank.safetensors"
    spread_codes(tiny_mbc_model(seed=1)).memorize(DOCS[:2]).save(bank)
    before = bank.read_bytes()
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS[2:4]) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(bank)])
    message = str(info.value.code)
    assert message.startswith("mbc-hf adapt: error: memory bank codebook mismatch") and "memorize()" in message
    assert bank.read_bytes() == before


@pytest.mark.parametrize("name, content, expected", [
    ("docs.jsonl", b'{"text": "ok"}\n{"text": "no end"\n', r"docs\.jsonl: line 2: invalid JSON"),
    ("docs.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"docs\.jsonl: line 2: missing required column"),
    ("docs.txt", b"fine\nbad \xff byte\n", r"docs\.txt: line 2: invalid UTF-8 at byte offset 9"),
    ("docs.txt", b" \n\t\n", r"docs\.txt: no documents found"),
])
def test_cli_adapt_reports_malformed_documents_with_file_and_line(model_dir, tmp_path, name, content, expected):
    bank = tmp_path / "bank.safetensors"
    CompressedMemoryBank(128, 4, "unused").save(bank)  # checked after the documents: never read here
    before = bank.read_bytes()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as info:
        main(["adapt", "--model", str(model_dir), "--documents", str(tmp_path / name), "--bank", str(bank)])
    assert str(info.value.code).startswith("mbc-hf adapt: error: ")
    assert re.search(expected, str(info.value.code)), info.value.code
    assert bank.read_bytes() == before


def test_cli_reports_a_corrupted_bank_and_leaves_it(model_dir, model, tmp_path, monkeypatch):
    bank = tmp_path / "bank.safetensors"
    model.memorize(DOCS[:3]).save(bank)
    bank.write_bytes(bank.read_bytes()[:-5])  # truncated
    before = bank.read_bytes()
    docs = tmp_path / "docs.txt"
    docs.write_text(DOCS[4] + "\n")
    for argv in (["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(bank)],
                 ["ask", "--model", str(model_dir), "--bank", str(bank), "Where?"]):
        with pytest.raises(SystemExit, match=r"bank\.safetensors: not a readable safetensors file"):
            main(argv)
    assert bank.read_bytes() == before
    monkeypatch.setenv("MBC_HF_TRACEBACK", "1")  # the original exception, for debugging
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        main(["ask", "--model", str(model_dir), "--bank", str(bank), "Where?"])


# ---------------------------------------------------------------------------------------- killed during a save


KILLED_SAVE = LOAD_MEMORY_BANK + """
import os, time, safetensors.torch, torch
path, mode = sys.argv[1], sys.argv[2]
bank = mb.CompressedMemoryBank.load(path)
bank.extend([f"new{i}" for i in range(500)], torch.randint(0, bank.codebook_size, (500, bank.num_tokens)))
if mode == "mid-write":
    def half_write(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        print("half written", flush=True)
        time.sleep(120)
    safetensors.torch.save_file = half_write
else:  # the complete new file is in place under its temporary name, the rename has not happened yet
    def slow_replace(src, dst):
        print("before rename", flush=True)
        time.sleep(120)
    os.replace = slow_replace
bank.save(path)
"""


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_sigkill_during_save_keeps_the_previous_bank(tmp_path, mode):
    path = tmp_path / "bank.safetensors"
    old = CompressedMemoryBank(256, 6, "fp")
    old.extend([f"d{i}" for i in range(5)], torch.randint(0, 256, (5, 6)))
    old.save(path)
    before = path.read_bytes()
    proc = start(KILLED_SAVE, path, mode)
    try:
        wait_for_line(proc, "half written" if mode == "mid-write" else "before rename")
        sigkill(proc)
    finally:
        proc.kill()
    assert path.read_bytes() == before
    loaded = CompressedMemoryBank.load(path)
    assert loaded.doc_ids == old.doc_ids and torch.equal(loaded.codes, old.codes)
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".bank.safetensors.")  # documented: remove by hand
    old.append("after", torch.zeros(6, dtype=torch.long))
    old.save(path)  # the stray temporary file does not get in the way
    assert len(CompressedMemoryBank.load(path)) == 6


KILLED_ADAPT = """
import os, sys, time
bank_path = os.path.abspath(sys.argv[1])
real_replace, saves = os.replace, []
def replace(src, dst):
    if os.path.abspath(dst) == bank_path:
        saves.append(dst)
        if len(saves) == 2:  # the second checkpoint: complete temporary file written, not yet renamed
            print("second checkpoint", flush=True)
            time.sleep(120)
    return real_replace(src, dst)
os.replace = replace
from mbc_hf.cli import main
main(["adapt", "--model", sys.argv[2], "--documents", sys.argv[3], "--bank", sys.argv[1], "--batch-size", "2",
      "--save-every", "2"])
"""


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
def test_sigkill_during_cli_adapt_leaves_the_last_checkpoint_and_a_rerun_resumes(model_dir, model, tmp_path):
    bank_path = tmp_path / "bank.safetensors"
    model.memorize(DOCS[:2]).save(bank_path)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")  # 2 stored, 6 new
    with open(tmp_path / "child.err", "w") as err:
        proc = start(KILLED_ADAPT, bank_path, model_dir, docs, stderr=err)
        try:
            wait_for_line(proc, "second checkpoint")
            sigkill(proc)
        finally:
            proc.kill()
    checkpoint = CompressedMemoryBank.load(bank_path, codebook_fingerprint=model.codebook.fingerprint())
    assert checkpoint.doc_ids == [document_id(d) for d in DOCS[:4]]  # the old 2 and the first checkpoint's 2
    assert torch.equal(checkpoint.codes, model.memorize(DOCS[:4]).codes)
    main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(bank_path), "--batch-size", "2",
          "--save-every", "2"])
    resumed = CompressedMemoryBank.load(bank_path)
    assert resumed.doc_ids == [document_id(d) for d in DOCS]
    assert torch.equal(resumed.codes, model.memorize(DOCS).codes)


# -------------------------------------------------------------------------------- reading while another process saves


READER = LOAD_MEMORY_BANK + """
import json, os, torch
path, stop = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sizes, errors, loads = [], [], 0
while not os.path.exists(stop):
    loads += 1
    try:
        bank = mb.CompressedMemoryBank.load(path)
        n = len(bank)
        if bank.doc_ids != [f"d{i}" for i in range(n)]:
            errors.append(f"doc ids of a {n}-row bank are not d0..d{n - 1}")
        expected = (torch.arange(n)[:, None] * 7 + torch.arange(bank.num_tokens)[None, :]) % bank.codebook_size
        if not torch.equal(bank.codes.long(), expected):
            errors.append(f"codes of a {n}-row bank do not match their doc ids")
        if sizes and n < sizes[-1]:
            errors.append(f"went back from {sizes[-1]} to {n} rows")
        sizes.append(n)
    except Exception as exc:
        errors.append(repr(exc))
print(json.dumps({"loads": loads, "sizes": sorted(set(sizes)), "errors": errors[:5]}), flush=True)
"""


def rows(start: int, stop: int, t: int, k: int) -> torch.Tensor:
    return (torch.arange(start, stop)[:, None] * 7 + torch.arange(t)[None, :]) % k


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
def test_a_reader_sees_complete_banks_while_another_process_appends(tmp_path):
    path, stop = tmp_path / "bank.safetensors", tmp_path / "stop"
    K, T, step = 512, 8, 400
    bank = CompressedMemoryBank(K, T, "fp")
    bank.extend([f"d{i}" for i in range(step)], rows(0, step, T, K))
    bank.save(path)
    proc = start(READER, path, stop)
    try:
        wait_for_line(proc, "ready")
        began, saves = time.monotonic(), 0
        while saves < 20 or time.monotonic() - began < 2.0:
            n = len(bank)
            bank.extend([f"d{i}" for i in range(n, n + step)], rows(n, n + step, T, K))
            bank.save(path)
            saves += 1
        stop.touch()
        report = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert report["errors"] == []
    assert report["loads"] >= 3 and len(report["sizes"]) >= 2, report  # the reader did race the writer
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


# -------------------------------------------------------------------------------- messages that name the fix


def test_a_missing_model_folder_is_reported_as_such(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["ask", "--model", str(tmp_path / "nonexistent"), "--bank", str(tmp_path / "b.safetensors"), "q?"])
    assert "nonexistent: no such folder" in str(info.value.code) and "mbc-hf train" in str(info.value.code)


@pytest.mark.parametrize("call", [
    lambda m: m.answer(["Where is the red door?"], batch_size=0),
    lambda m: m.answer_with_base_lm(["Question: where?\nAnswer:"], batch_size=0),
    lambda m: m.memorize(DOCS[:2], batch_size=0),
], ids=["answer", "answer_with_base_lm", "memorize"])
def test_a_zero_batch_size_names_the_argument(model, call):
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        call(model)


def test_a_bank_with_another_codebook_size_says_what_to_do(model):
    other = CompressedMemoryBank(model.config.codebook_size * 2, model.config.num_context_tokens,
                                 model.codebook.fingerprint())  # same fingerprint, another K
    other.append("d0", torch.zeros(model.config.num_context_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match=r"K=.*Fix: re-encode the documents into a new bank .*mbc-hf adapt"):
        model.answer(["Where is the red door?"], memory_bank=other)


def test_a_question_longer_than_the_window_is_answered_with_a_counted_warning(model):
    long_question = "Where is the door " + "and the window " * model.config.max_question_length + "?"
    with pytest.warns(UserWarning, match=r"1 of 2 questions exceed max_question_length=\d+ tokens"):
        answers = model.answer(["Where is the red door?", long_question], max_new_tokens=2)
    assert len(answers) == 2


def test_one_text_under_two_ids_in_a_documents_file_is_stored_under_both_as_by_the_api(model_dir, model, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "The red door is in Rome."}\n'
                    '{"id": "b", "text": "The red door is in Rome."}\n')
    main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(tmp_path / "bank.safetensors")])
    cli = CompressedMemoryBank.load(tmp_path / "bank.safetensors")
    api = model.memorize(["The red door is in Rome."] * 2, doc_ids=["a", "b"])
    assert cli.doc_ids == api.doc_ids == ["a", "b"] and torch.equal(cli.codes, api.codes)


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
def test_adapt_in_two_processes_equals_one_process_without_losses_or_duplicates(model_dir, model, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.index.json"
    model.memorize(DOCS[:3]).save(two)  # an existing bank: its 3 documents are not encoded again
    main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(one)])
    main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(two), "--num-proc", "2"])
    a, b = CompressedMemoryBank.load(one), CompressedMemoryBank.load(two)
    assert a.doc_ids == b.doc_ids == [document_id(d) for d in DOCS] and torch.equal(a.codes, b.codes)
    with pytest.raises(SystemExit, match="--num-proc"):
        main(["adapt", "--model", str(model_dir), "--documents", str(docs), "--bank", str(one), "--num-proc", "0"])
