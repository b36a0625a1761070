"""Loading model folders, the command line, the text store and input checks against damaged, foreign or hostile
input (issue 34 items 8-11 and 13, issue 40 items 4, 6-13; docs/bad_inputs.md lists each case with its test)."""

import builtins
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from mbc_hf import MBCConfig
from mbc_hf.cli import PART_FOLDER_PREFIX, clean_stale_part_folders, load_model, main
from mbc_hf.data import load_documents_file, load_qa_file
from mbc_hf.memory_bank import CompressedMemoryBank, load_bank
from mbc_hf.modeling_mbc import MBCModelForCausalLM
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.text_store import TextStore

DOCS = ["The red door is in Rome.", "The blue door is in Oslo.", "The green door is in Lima."]


def vocabulary_model():
    model = tiny_mbc_model(seed=0, codebook_type="vocabulary").eval()
    model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS],
                       special_ids=model.tokenizer.all_special_ids)
    return model


def model_of(codebook_type: str):
    return vocabulary_model() if codebook_type == "vocabulary" else tiny_mbc_model(seed=0).eval()


def save(model, path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"a": save(tiny_mbc_model(seed=0), root / "a"),
            "topk": save(tiny_mbc_model(seed=1, aggregator_layers=1, aggregation="topk"), root / "topk"),
            "rank8": save(tiny_mbc_model(seed=2, prefix_rank=8), root / "rank8")}


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def cli_error(argv) -> str:
    """The one-line message `main` exits with (status 1)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str), f"expected an error message, got exit code {message!r}"
    assert "\n" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------------------ 34.8: foreign weights
@pytest.mark.parametrize("other", ["topk", "rank8"])
def test_weights_of_another_mbc_model_are_refused_naming_the_folder(folders, tmp_path, other):
    """34.8: model.safetensors of another MBC model (other modules: missing/unexpected keys; other shapes) used to
    load with those modules randomly initialised, and `mbc-hf adapt` wrote a bank of random codes."""
    mixed = copy_folder(folders["a"], tmp_path / "mixed")
    shutil.copy(folders[other] / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit config.json") as info:
        MBCModelForCausalLM.from_pretrained(mixed)
    assert str(mixed) in str(info.value) and "save_pretrained" in str(info.value)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")
    bank = tmp_path / "bank.safetensors"
    message = cli_error(["adapt", "--model", str(mixed), "--documents", str(docs), "--bank", str(bank)])
    assert str(mixed) in message and not bank.exists()


def test_a_matching_folder_still_loads_and_a_missing_training_statistic_is_allowed(folders, tmp_path):
    """The check refuses what would be random weights, not a folder saved before a training-only buffer existed."""
    from safetensors.torch import load_file, save_file

    model, info = MBCModelForCausalLM.from_pretrained(folders["a"], output_loading_info=True)
    assert info["missing_keys"] == [] or not info["missing_keys"]
    older = copy_folder(folders["a"], tmp_path / "older")
    weights = load_file(older / "model.safetensors")
    dropped = [k for k in weights if k.endswith(("codebook.unused_steps", "codebook.ema_cluster_size"))]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, older / "model.safetensors",
              metadata={"format": "pt"})
    MBCModelForCausalLM.from_pretrained(older)  # no error
    learned = [k for k in weights if k.startswith("aggregator.")][:1]
    save_file({k: v for k, v in weights.items() if k not in learned}, older / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 missing"):
        MBCModelForCausalLM.from_pretrained(older)


# ------------------------------------------------------------------------------------------ 34.9: remote code
def test_the_cli_never_runs_code_shipped_in_a_model_folder(folders, tmp_path, monkeypatch):
    """34.9: a folder whose config names an unknown model_type made transformers offer to run the folder's *.py
    files (auto_map); answering "y" ran them. The CLI loads with trust_remote_code=False and names the fix."""
    evil = copy_folder(folders["a"], tmp_path / "evil")
    marker = tmp_path / "ran-folder-code"
    edit_config(evil, lambda c: c.update(model_type="mbc_custom"))
    assert "auto_map" in json.loads((evil / "config.json").read_text())
    for name in ("configuration_mbc.py", "modeling_mbc.py"):
        if (evil / name).exists():
            (evil / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + (evil / name).read_text())
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    bank = tmp_path / "bank.safetensors"
    tiny_mbc_model(seed=0).memorize(DOCS[:1]).save(bank)
    message = cli_error(["ask", "--model", str(evil), "--bank", str(bank), "Where is the red door?"])
    assert not marker.exists()
    assert str(evil) in message and "model_type 'mbc_custom'" in message and '"model_type": "mbc"' in message


def test_the_cli_loads_with_trust_remote_code_false(folders, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(str(folders["a"]))
    assert seen.get("trust_remote_code") is False


# ------------------------------------------------------------------------------------------ 34.10, 34.11: questions
def test_answer_to_no_questions_is_an_empty_list():
    """34.10: answer([]) raised a raw IndexError from the tokenizer."""
    model = tiny_mbc_model(seed=0).eval()
    bank = model.memorize(DOCS)
    assert model.answer([], memory_bank=bank) == []
    assert model.answer([]) == []
    vocabulary = vocabulary_model()
    assert vocabulary.answer([], memory_bank=vocabulary.memorize(DOCS), return_sources=True) == []


class RecordingTokenizer:
    """Forwards to a tokenizer and records the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, *args, **kwargs):
        for t in [texts] if isinstance(texts, str) else texts:
            self.longest = max(self.longest, len(t))
        return self.tok(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("codebook_type", ["learned", "vocabulary"])
def test_a_huge_question_is_cut_before_tokenizing_and_reads_the_same_tokens(codebook_type):
    """34.11: a 10 MB question was tokenized whole (~20 s, ~1.3 GB) though only its last max_question_length tokens
    are read. It is now cut to a suffix (LM prompt) / prefix (question encoder) first; the tokens read are the same."""
    model = model_of(codebook_type)
    words = ["cat", "Paris", "water", "boils", "capital", "owl", "sport", "news", "42", "fox"]
    huge = " ".join(words[(i * 7) % len(words)] + str(i % 13) for i in range(40_000)) + " where is the cat?"
    n = model.config.max_question_length
    # what the old code computed: the whole prompt tokenized, its last n tokens; the encoder's first n tokens
    prompt = model.config.prompt_template.format(question=huge)
    expected_lm = model.tokenizer(prompt, add_special_tokens=False)["input_ids"][-n:]
    expected_q = model.encoder_tokenizer(model.reader.question_texts([huge]), truncation=True,
                                         max_length=n)["input_ids"][0]
    lm_tok, enc_tok = RecordingTokenizer(model.tokenizer), RecordingTokenizer(model.encoder_tokenizer)
    model.tokenizer, model.encoder_tokenizer = lm_tok, (lm_tok if enc_tok.tok is lm_tok.tok else enc_tok)
    batch = model.encode_questions([huge])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ids[-n:] == expected_lm
    q = batch["question_input_ids"][0][batch["question_attention_mask"][0].bool()].tolist()
    assert q == expected_q
    assert max(lm_tok.longest, enc_tok.longest) < 20_000 < len(huge)
    with pytest.warns(UserWarning, match="1 of 1 questions exceed"):
        model.answer([huge], memory_bank=model.memorize(DOCS), max_new_tokens=1)


# ------------------------------------------------------------------------------------------ 40.4: deep JSON
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_deeply_nested_json_line_names_the_file_and_line(tmp_path, suffix):
    """40.4: JSON nested 100,000 levels deep raised a raw RecursionError with no file or line."""
    path = tmp_path / f"docs{suffix}"
    path.write_text('{"text": "ok"}\n{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    for load in (load_documents_file, load_qa_file):
        with pytest.raises(ValueError, match=r"line 2: JSON nested too deeply") as info:
            load(path)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------ 40.6-40.8: text store
def test_text_store_refuses_files_it_did_not_write_naming_the_path(tmp_path):
    """40.6: a non-database file or a missing folder gave sqlite's message without the path; a foreign SQLite
    database with a `documents` table was opened and written into."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database " * 100)
    with pytest.raises(ValueError, match="not a TextStore database") as info:
        TextStore(notes)
    assert str(notes) in str(info.value) and notes.read_text() == "not a database " * 100
    missing = tmp_path / "no-such-folder" / "texts.sqlite"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        TextStore(missing)
    assert str(missing) in str(info.value) and not missing.parent.exists()
    with pytest.raises(ValueError, match="is a folder"):
        TextStore(tmp_path)
    for name, schema in (("other-columns", "CREATE TABLE documents (id INTEGER, body TEXT, author TEXT)"),
                         ("more-tables", "CREATE TABLE documents (doc_id TEXT PRIMARY KEY, text TEXT NOT NULL); "
                                         "CREATE TABLE users (name TEXT)")):
        foreign = tmp_path / f"{name}.sqlite"
        db = sqlite3.connect(foreign)
        db.executescript(schema)
        db.commit()
        db.close()
        before = foreign.read_bytes()
        with pytest.raises(ValueError, match="database of another program") as info:
            TextStore(foreign)
        assert str(foreign) in str(info.value) and foreign.read_bytes() == before


def test_text_store_written_before_the_mark_still_opens(tmp_path):
    """Nothing stored is lost: a store written by an earlier version (no application id) opens with its texts."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS documents (doc_id TEXT PRIMARY KEY, text TEXT NOT NULL)")
    db.execute("INSERT INTO documents VALUES ('d1', 'Paris is the capital of France.')")
    db.commit()
    db.close()
    store = TextStore(path)
    assert store.get("d1") == "Paris is the capital of France." and store.search(["capital"])[0][0] == ["d1"]
    store.add(["d2"], ["Water boils at 100 degrees."])
    store.close()
    new = TextStore(tmp_path / "new.sqlite")
    new.add(["x"], ["some text"])
    new.close()
    assert len(TextStore(tmp_path / "new.sqlite")) == 1 and len(TextStore(path)) == 2


def test_text_store_add_refuses_a_single_string():
    """40.7: add("id7", "abc") stored one document per character; unequal lengths counted characters."""
    store = TextStore()
    with pytest.raises(TypeError, match=r"add\(\[doc_id\], \[text\]\)"):
        store.add("id7", "abc")
    with pytest.raises(TypeError, match="single str"):
        store.add("id7", ["abc", "de"])
    assert len(store) == 0
    with pytest.raises(ValueError, match="1 ids and 2 texts"):
        store.add(["id7"], ["abc", "de"])
    assert len(store) == 0


def test_a_store_of_stop_words_does_not_break_answer_and_score_zero_passages_stay_out():
    """40.8: a store holding only stop words / one-letter words broke answer(text_store=) with "max() arg is an
    empty sequence" and every later call with an AttributeError; the top passage went into the prompt at score 0."""
    model = vocabulary_model()
    bank = model.memorize(DOCS)
    store = TextStore()
    store.add(["s1", "s2"], ["the and of it", "a b c"])
    questions = ["Where is the red door?"]
    plain = model.answer(questions, memory_bank=bank, max_new_tokens=3)
    for _ in range(2):  # the second call used to fail on the half-built index
        assert store.search(questions) == [([], [])]
        out = model.answer(questions, memory_bank=bank, text_store=store, return_sources=True, max_new_tokens=3)
        assert out[0]["passages"] == [] and out[0]["answer"] == plain[0]
    store.add(["p1"], ["Paris is the capital of France."])  # the index is rebuilt with a searchable text
    assert store.search(["capital of France"])[0][0] == ["p1"]
    # a question sharing no word with any passage: its top hit has score 0 and is not put in the prompt
    zero = ["Zebra?"]
    assert store.search(zero)[0][1] in ([], [0.0])
    out = model.answer(zero, memory_bank=bank, text_store=store, return_sources=True, max_new_tokens=3)
    assert out[0]["passages"] == []
    assert model.answer(zero, memory_bank=bank, text_store=store, max_new_tokens=3) == \
        model.answer(zero, memory_bank=bank, max_new_tokens=3)


# ------------------------------------------------------------------------------------------ 40.9: damaged folders
def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


DAMAGE = {
    "truncated-weights": _truncate,  # SafetensorError
    "huge-int": lambda f: edit_config(f, lambda c: c.update(num_context_tokens=10 ** 30)),  # overflow in torch
    "text-config-list": lambda f: edit_config(f, lambda c: c.update(text_config=[1])),  # AttributeError
    "tokenizer-json": lambda f: (f / "tokenizer.json").write_text("{}"),  # KeyError
    "prompt-template-index": lambda f: edit_config(f, lambda c: c.update(prompt_template="{0} {question}")),
    "config-not-json": lambda f: (f / "config.json").write_text("{bad"),
    "config-array": lambda f: (f / "config.json").write_text("[1, 2]"),
    "string-int": lambda f: edit_config(f, lambda c: c.update(max_question_length="128")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_folder(folders, tmp_path, damage):
    """40.9: damaged or edited folders ended in raw tracebacks (SafetensorError, OverflowError, TypeError, KeyError,
    IndexError at answer time for a prompt_template with {0}): the CLI caught only ValueError and OSError."""
    broken = copy_folder(folders["a"], tmp_path / "broken")
    DAMAGE[damage](broken)
    bank = tmp_path / "bank.safetensors"
    tiny_mbc_model(seed=0).memorize(DOCS[:1]).save(bank)
    message = cli_error(["ask", "--model", str(broken), "--bank", str(bank), "Where is the red door?"])
    assert message.startswith("mbc-hf ask: error: ") and str(broken) in message


def test_prompt_template_is_checked_when_the_config_is_built():
    for template in ("{0} {question}", "{question} {answer}", "{question} }"):
        with pytest.raises(ValueError, match="prompt_template"):
            MBCConfig(prompt_template=template)
    MBCConfig(prompt_template="{{literal}} {question}")


# ------------------------------------------------------------------------------------------ 40.10: config ranges
@pytest.mark.parametrize("field,value", [("max_document_length", 0), ("aggregator_layers", -1),
                                         ("aggregator_layers", 0), ("max_question_length", 0),
                                         ("max_question_length", "128")])
def test_lengths_and_layers_out_of_range_are_refused(field, value):
    """40.10: max_document_length=0 made memorize() loop forever; aggregator_layers=-1 and max_question_length=0
    were accepted silently."""
    with pytest.raises(ValueError, match=f"{field} must be an int >= 1"):
        MBCConfig(**{field: value})


def test_memorize_with_max_document_length_zero_set_later_raises_instead_of_looping():
    model = tiny_mbc_model(seed=0).eval()
    model.config.max_document_length = 0
    result = {}

    def run():
        try:
            model.memorize(DOCS[:1])
        except ValueError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "memorize loops forever with max_document_length=0"
    assert "max_document_length must be >= 1" in result["error"]


# ------------------------------------------------------------------------------------------ 40.11: no weights file
def test_a_folder_without_weights_names_the_folder_not_a_hub_url(folders, tmp_path):
    """40.11: a model folder without model.safetensors pointed to a huggingface.co URL built from the local path."""
    empty = copy_folder(folders["a"], tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        MBCModelForCausalLM.from_pretrained(empty)
    assert str(empty) in str(info.value) and "huggingface.co" not in str(info.value)
    assert "model.safetensors" in str(info.value)
    bank = tmp_path / "bank.safetensors"
    tiny_mbc_model(seed=0).memorize(DOCS[:1]).save(bank)
    message = cli_error(["ask", "--model", str(empty), "--bank", str(bank), "Where is the red door?"])
    assert str(empty) in message and "huggingface.co" not in message


# ------------------------------------------------------------------------------------------ 40.12: topk sources
def test_return_sources_on_a_topk_model_does_not_deny_its_addressing():
    """40.12: return_sources=True on an aggregation="topk" model said a learned codebook "does not do addressing"."""
    model = tiny_mbc_model(seed=0, aggregation="topk").eval()
    bank = model.memorize(DOCS)
    with pytest.raises(ValueError) as info:
        model.answer(["Where is the red door?"], memory_bank=bank, return_sources=True)
    assert "does not do addressing" not in str(info.value) and "aggregation='topk'" in str(info.value)
    with pytest.raises(ValueError, match="aggregation='histogram'"):
        tiny_mbc_model(seed=0).answer(["Where?"], memory_bank=bank, return_sources=True)


# ------------------------------------------------------------------------------------------ 40.13: full disk in CLI
@pytest.mark.parametrize("num_proc", ["1"])
def test_adapt_reports_a_failed_bank_save_naming_the_bank(folders, tmp_path, monkeypatch, num_proc):
    """40.13 (command line part): a save on a full disk raised a SafetensorError naming no file and `mbc-hf adapt`
    printed a traceback. The bank file keeps its last complete save."""
    from safetensors import SafetensorError

    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")
    bank = tmp_path / "bank.safetensors"
    main(["adapt", "--model", str(folders["a"]), "--documents", str(docs), "--bank", str(bank)])
    before = bank.read_bytes()
    docs.write_text("The white door is in Quito.\n")

    def full_disk(self, *args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(CompressedMemoryBank, "save", full_disk)
    message = cli_error(["adapt", "--model", str(folders["a"]), "--documents", str(docs), "--bank", str(bank),
                         "--num-proc", num_proc])
    assert f"could not write the bank {bank}" in message and "No space left" in message
    monkeypatch.undo()
    assert bank.read_bytes() == before and len(load_bank(bank)) == len(DOCS)


# ------------------------------------------------------------------------------------------ 34.13: killed adapt
def test_stale_part_folders_are_removed_and_live_or_foreign_ones_kept(folders, tmp_path, monkeypatch):
    """34.13: part folders of a killed `adapt --num-proc` run stayed in the temp folder forever; the next run
    removes them (its owner lock is free), but not the folder of a running adapt nor a folder it did not write."""
    import tempfile

    from mbc_hf.cli import _part_owner_lock

    dead = tmp_path / f"{PART_FOLDER_PREFIX}dead"
    dead.mkdir()
    (dead / ".owner.lock").write_text("")
    (dead / "part1.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f"{PART_FOLDER_PREFIX}live"
    live.mkdir()
    held = _part_owner_lock(str(live))
    held.acquire()
    legacy = tmp_path / f"{PART_FOLDER_PREFIX}legacy"
    legacy.mkdir()
    (legacy / "part1.safetensors").write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(legacy / "part1.safetensors", (old, old))
    os.utime(legacy, (old, old))
    foreign = tmp_path / f"{PART_FOLDER_PREFIX}notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        docs = tmp_path / "docs.txt"
        docs.write_text("\n".join(DOCS) + "\n")
        main(["adapt", "--model", str(folders["a"]), "--documents", str(docs), "--bank",
              str(tmp_path / "bank.safetensors")])  # the next run cleans up
        assert not dead.exists() and not legacy.exists()
        assert live.exists() and (foreign / "notes.txt").read_text() == "mine"
    finally:
        held.release()
    assert clean_stale_part_folders(str(tmp_path)) == [str(live)]


def _children_gone(procs, timeout: float) -> list:
    """The processes of ``procs`` (psutil) still running (zombies count as gone) after up to ``timeout`` s."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow
def _cmdline(process) -> list[str]:
    """A child's command line, or [] for one that has ended meanwhile (a zombie not yet reaped raises in psutil)."""
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def test_adapt_workers_exit_when_the_parent_is_killed(folders, tmp_path):
    """34.13: `mbc-hf adapt --num-proc 2` killed with SIGKILL shortly after it spawned its worker left the worker
    (model loaded) and multiprocessing's resource tracker alive forever, blocked on a pipe, and its part folder.
    The workers now exit within seconds of the parent's death, and the next run removes the part folder."""
    psutil = pytest.importorskip("psutil")
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"Room {i} of the museum holds painting number {i * 7}." for i in range(3000)) + "\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen([sys.executable, "-c", "from mbc_hf.cli import main; main()", "adapt", "--model",
                               str(folders["a"]), "--documents", str(docs), "--bank", str(tmp_path / "bank.st"),
                               "--num-proc", "2", "--batch-size", "4"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            children = psutil.Process(parent.pid).children(recursive=True)
            if any("spawn_main" in " ".join(_cmdline(c)) for c in children):
                break
            time.sleep(0.1)
        assert parent.poll() is None, "adapt ended before its worker was seen"
        time.sleep(1.0)  # the worker is starting up / loading the model
        children = psutil.Process(parent.pid).children(recursive=True)
        assert any(list(tmp.glob(PART_FOLDER_PREFIX + "*")))
        parent.kill()
        parent.wait(timeout=30)
        alive = _children_gone(children, timeout=30)
        assert not alive, f"still running after the parent was killed: {[_cmdline(p) for p in alive]}"
    finally:
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        if parent.poll() is None:
            parent.kill()
    assert clean_stale_part_folders(str(tmp)) and not list(tmp.glob(PART_FOLDER_PREFIX + "*"))
