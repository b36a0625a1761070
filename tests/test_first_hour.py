"""Issue 37, a newcomer's first hour: a CLI that starts at once, paths that are paths, readable sources, one warning
per cause, training that talks, no leftovers (tiny models only)."""
import io
import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from mbc_hf.cli import main, remove_empty_output_dir
from mbc_hf.data import load_documents_file
from mbc_hf.factory import describe_folder, load_model, looks_local

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def imported_modules(*args) -> set[str]:
    """The top-level modules a ``python -X importtime -m mbc_hf.cli ARGS`` run imports."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "mbc_hf.cli", *args], capture_output=True,
                         text=True, env=ENV, timeout=120)
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["adapt", "--model", "m"]])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(args):
    modules = imported_modules(*args)
    assert "mbc_hf" in modules and not modules & {"torch", "transformers", "peft", "datasets"}


def test_an_empty_documents_file_is_reported_before_torch_loads(tmp_path):
    docs = tmp_path / "empty.txt"
    docs.write_text("\n  \n")
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "mbc_hf.cli", "adapt", "--model", "m",
                          "--documents", str(docs), "--bank", str(tmp_path / "b.safetensors")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 1 and "no documents found" in run.stderr
    assert not any(line.rsplit("|", 1)[-1].strip() in ("torch", "transformers") for line in run.stderr.splitlines())


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
def test_import_mbc_hf_still_registers_the_auto_classes():
    code = ("import mbc_hf, transformers; from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print('mbc' in CONFIG_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


# ------------------------------------------------------------------------------------------------------- paths
def test_which_model_arguments_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert looks_local("mbc") and looks_local("./x/y") and looks_local("/abs/x") and looks_local("a/b/c")
    assert not looks_local("owner/name")  # a Hub id
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/mbc")  # its first folder exists here: README's spelling is a path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert looks_local("owner/name")


def test_a_missing_relative_folder_never_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="runs/mbc: no such folder"):
        load_model("runs/mbc")


def test_a_folder_without_a_model_says_what_it_holds(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="the folder is empty"):
        load_model(str(empty))
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    (run / "notes.md").write_text("x")
    text = describe_folder(str(run))
    assert "checkpoint-10, checkpoint-2, notes.md" in text and "no config.json and no model.safetensors" in text
    assert text.endswith(f"--model {run / 'checkpoint-10'}")


def test_an_interrupted_train_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "runs" / "mbc"
    (out / "logs").mkdir(parents=True)
    assert remove_empty_output_dir(str(out), existed=False) and not out.exists()
    kept = tmp_path / "kept"
    (kept / "checkpoint-3").mkdir(parents=True)
    (kept / "checkpoint-3" / "config.json").write_text("{}")
    assert not remove_empty_output_dir(str(kept), existed=False) and kept.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert not remove_empty_output_dir(str(mine), existed=True) and mine.exists()  # not created by the run


# ----------------------------------------------------------------------------------------------------- sources
def test_txt_documents_carry_their_file_and_line(tmp_path):
    from mbc_hf import modeling_mbc
    from mbc_hf.data import document_id

    docs = tmp_path / "my_docs.txt"
    docs.write_text("The Eiffel Tower is in Paris, on the Champ de Mars since 1889.\n\n\nWater boils at 100 C.\n")
    (first, text, meta), (_, _, meta2) = load_documents_file(docs, with_sources=True)
    assert first == modeling_mbc.document_id(text) == document_id(text)  # ids stay content-addressed
    assert meta == {"source": "my_docs.txt:1", "text": "The Eiffel Tower is in Paris, on the…"}
    assert meta2 == {"source": "my_docs.txt:4", "text": "Water boils at 100 C."}
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"id": "doc-7", "text": "A kept id."}) + "\n" + json.dumps({"text": "No id."}) + "\n")
    assert load_documents_file(rows, with_sources=True) == [
        ("doc-7", "A kept id.", {"text": "A kept id."}),
        (document_id("No id."), "No id.", {"text": "No id.", "source": "d.jsonl:2"})]
    assert load_documents_file(rows) == [("doc-7", "A kept id."), (document_id("No id."), "No id.")]


@pytest.fixture(scope="module")
def vocabulary_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first_hour")
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"paragraph_id": f"T#{i}", "context": f"Room {i} holds painting {i * 11}.",
                                "qas": [{"id": f"q{i}", "question": f"Which painting is in room {i}?",
                                         "answers": {"text": [str(i * 11)], "answer_start": [0]}}]}) + "\n")
    out = tmp / "model"
    main(["train", "--train-file", str(tmp / "train.jsonl"), "--output-dir", str(out), "--base-model", "tiny",
          "--max-steps", "1", "--batch-size", "2", "--eval-docs", "0", "--logging-steps", "1"])
    return tmp, out


def test_ask_prints_file_line_and_first_words_of_each_source(vocabulary_model, capsys):
    tmp, out = vocabulary_model
    docs, bank = tmp / "my_docs.txt", tmp / "bank.index.json"
    docs.write_text("The red door is in Rome.\n\nThe blue door is in Oslo.\n")
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank)])
    capsys.readouterr()
    main(["ask", "--model", str(out), "--bank", str(bank), "--max-new-tokens", "2", "Where is the red door?"])
    printed = capsys.readouterr().out
    red = load_documents_file(docs)[0][0]
    assert f'{red} (' in printed and 'my_docs.txt:1 "The red door is in Rome.")' in printed  # id (score, line words)


def test_training_without_a_terminal_logs_progress_lines(vocabulary_model, capsys):
    """The tiny run of the fixture printed a line per step (stdout is not a terminal under pytest)."""
    from mbc_hf.trainer import ProgressLogCallback

    log = io.StringIO()
    callback = ProgressLogCallback(every=5, stream=log)
    args = SimpleNamespace(max_minutes=None)
    state = SimpleNamespace(global_step=0, max_steps=20, is_world_process_zero=True)
    callback.on_train_begin(args, state, None)
    callback.on_log(args, state, None, logs={"loss": 2.5})
    for step in range(1, 11):
        state.global_step = step
        callback.on_step_end(args, state, None)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 5/20 loss 2.5000") and "steps/s" in lines[0]
    assert "ends in ~" in lines[1]
    quiet = io.StringIO()  # before the first logged loss the line says nothing of the loss (no "loss -")
    first = ProgressLogCallback(every=5, stream=quiet)
    state.global_step = 0
    first.on_train_begin(args, state, None)
    state.global_step = 5
    first.on_step_end(args, state, None)
    assert quiet.getvalue().startswith("step 5/20 ") and " steps/s" in quiet.getvalue()
    assert "loss" not in quiet.getvalue()


def test_a_timed_stop_writes_no_checkpoint_when_saving_is_off():
    from mbc_hf.trainer import StopAfterMinutes

    stop, control = StopAfterMinutes(0.0), SimpleNamespace(should_training_stop=False, should_save=False)
    stop.on_train_begin(None, None, control)
    stop.on_step_end(SimpleNamespace(save_strategy="no"), None, control)
    assert control.should_training_stop and not control.should_save


# ---------------------------------------------------------------------------------------------------- warnings
def test_the_demo_shows_one_warning_per_cause(capsys):
    from mbc_hf.demo import _OncePerCause

    shown = []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
        with _OncePerCause():
            warnings.warn("3 of 200 documents exceed max_document_length=512 encoder tokens and were truncated")
            warnings.warn("5 of 64 documents exceed max_document_length=512 encoder tokens and were truncated")
            warnings.warn("documents exceed max_document_length=512 encoder tokens and are truncated (1 of 8)")
            warnings.warn("another cause")
    assert len(shown) == 2 and shown[1] == "another cause"


def test_the_collator_truncation_warning_does_not_say_training():
    import inspect

    from mbc_hf import trainer

    assert "training documents exceed" not in inspect.getsource(trainer.MBCDataCollator)


def test_train_help_gives_one_default_per_option():
    from mbc_hf.arguments import train_parser

    text = " ".join(train_parser("mbc-hf train").format_help().split())
    assert "12 with the learned one). (default" not in text and "(default: None)" not in text
    assert "(default: 32)" in text and "--help-all" in text  # eval_docs' default, once


def test_the_demo_keeps_talking_while_a_step_outlasts_its_period(capsys):
    """A training step or an answer batch can take over a minute on a loaded machine: the demo's heartbeat prints
    meanwhile, and stops with the block (issue 37: no silent stretch over 60 s)."""
    import time

    from mbc_hf.demo import _Heartbeat

    with _Heartbeat("meta-training", every=0.05):
        time.sleep(0.32)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 4 and all(line.startswith("  ... meta-training: ") for line in lines)
    time.sleep(0.15)
    assert capsys.readouterr().out == ""
