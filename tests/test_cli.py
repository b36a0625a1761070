"""`mbc-hf` command line on a tiny model and files the tests write (train -> adapt -> ask -> eval)."""
import csv
import json
import time

import pytest
import torch

from mbc_hf.cli import main
from mbc_hf.memory_bank import CompressedMemoryBank, DenseMemoryBank, load_bank


def write_paragraphs(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"paragraph_id": f"T#{i}", "title": "T", "paragraph_index": i,
                                "context": f"Room {i} of the old museum holds painting number {i * 11}.",
                                "qas": [{"id": f"q{i}", "question": f"Which painting is in room {i}?",
                                         "answers": {"text": [str(i * 11)], "answer_start": [0]}}]}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    write_paragraphs(tmp / "train.jsonl")
    out = tmp / "model"
    main(["train", "--train-file", str(tmp / "train.jsonl"), "--output-dir", str(out), "--base-model", "tiny",
          "--encoder", "tiny-bert", "--codebook-type", "learned", "--max-steps", "3", "--batch-size", "2",
          "--eval-docs", "2",
          "--memory-gain-questions", "2", "--eval-steps", "2", "--logging-steps", "1", "--save-steps", "2"])
    return tmp, out


def test_train_writes_a_loadable_model_and_metrics(trained):
    tmp, out = trained
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert "eval_memory_gain" in metrics


def test_train_is_reproducible_run_to_run(tmp_path):
    """Same command, same --seed -> the same weights, whatever the global RNG held before: the random init of a
    model built around pretrained parts (KV-LoRA here) follows --seed (it did not, and the demo's short-training row
    changed from run to run)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mbc_hf.testing import tiny_lm_config, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tmp_path / "base"  # a local folder: built like the embedded default, not by tiny_mbc_model (seeded)
    AutoModelForCausalLM.from_config(tiny_lm_config("llama", len(tok), tok.pad_token_id, tok.bos_token_id,
                                                    tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    write_paragraphs(tmp_path / "train.jsonl")
    weights = {}
    for name, global_seed, seed in (("a", 1234, "42"), ("b", 4321, "42"), ("c", 1234, "7")):
        torch.manual_seed(global_seed)
        main(["train", "--train-file", str(tmp_path / "train.jsonl"), "--output-dir", str(tmp_path / name),
              "--base-model", str(base), "--codebook-type", "vocabulary", "--max-steps", "2", "--batch-size", "2",
              "--eval-docs", "0", "--logging-steps", "1", "--save-strategy", "no", "--seed", seed])
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    a, b, c = weights["a"], weights["b"], weights["c"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapt_appends_and_ask_answers(trained, capsys):
    tmp, out = trained
    docs = tmp / "docs.txt"
    docs.write_text("The red door is in Rome.\nThe blue door is in Oslo.\n")
    bank = tmp / "bank.safetensors"
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank)])
    assert len(CompressedMemoryBank.load(bank)) == 2
    docs.write_text("The green door is in Lima.\nThe red door is in Rome.\n")  # one new, one already stored
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank)])
    assert len(CompressedMemoryBank.load(bank)) == 3
    capsys.readouterr()
    main(["ask", "--model", str(out), "--bank", str(bank), "--max-new-tokens", "3", "Where is the red door?"])
    printed = capsys.readouterr().out
    assert "Q: Where is the red door?" in printed and "A:" in printed


def test_adapt_with_the_compact_key_and_ask_with_its_sources(trained, capsys):
    """--addressing-key: adapt stores the 48-byte key of every document beside its codes (also through --num-proc
    workers, on a bank that has keys without the flag), and ask on a learned codebook then reports the document the
    key ranks first (without the key it reads the whole bank and reports none)."""
    from mbc_hf.compact_key import SentenceEncoder

    tmp, out = trained
    docs, bank = tmp / "keyed.txt", tmp / "keyed.safetensors"
    texts = ["The red door is in Rome.", "A violin concerto was played in Vienna."]
    docs.write_text("\n".join(texts) + "\n")
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank), "--addressing-key",
          "minilm-binary"])
    more = ["The green door is in Lima.", "Snow fell on the northern mountains.", "Bread is baked at dawn."]
    docs.write_text("\n".join(texts + more) + "\n")
    main(["adapt", "--model", str(out), "--documents", str(docs), "--bank", str(bank), "--num-proc", "2"])
    stored = load_bank(bank)
    assert len(stored) == 5 and stored.key_bytes == 48
    expected = SentenceEncoder.from_pretrained("embedded").keys(texts + more)
    assert torch.equal(stored.keys, expected)  # rows in file order, keys of the worker's part included
    capsys.readouterr()
    main(["ask", "--model", str(out), "--bank", str(bank), "--max-new-tokens", "2", "Who played a violin concerto?"])
    printed = capsys.readouterr().out
    first_source = printed.split("sources:")[1].split('")')[0]  # read: one document, the best key first
    assert "keyed.txt:2" in first_source


def test_two_adapt_runs_on_one_bank_keep_both_writers_documents(trained, capsys):
    """adapt holds <bank>.lock from load to save: a run that starts while another writer holds the lock waits,
    then appends to what that writer saved (without the lock the last save would drop the other's documents)."""
    import threading

    from mbc_hf.cli import load_model
    from mbc_hf.memory_bank import bank_lock

    tmp, out = trained
    docs, bank = tmp / "lock_docs.txt", tmp / "locked.safetensors"
    docs.write_text("The red door is in Rome.\n")
    lock = bank_lock(bank)  # <bank>.lock, the lock object save() takes in this process (re-entrant here)
    lock.acquire()
    run = threading.Thread(target=main, args=(["adapt", "--model", str(out), "--documents", str(docs),
                                               "--bank", str(bank)],))
    run.start()
    deadline = time.time() + 60
    while "waiting for another writer" not in capsys.readouterr().err and time.time() < deadline:
        time.sleep(0.1)  # the run is now blocked on the lock
    other = load_model(str(out)).memorize(["The blue door is in Oslo."], doc_ids=["other-writer"])
    other.save(bank)  # the other writer saves while holding the lock
    lock.release()
    run.join(timeout=120)
    assert not run.is_alive()
    stored = CompressedMemoryBank.load(bank)
    assert len(stored) == 2 and "other-writer" in stored.doc_ids


def test_eval_writes_metrics_with_the_documented_keys(trained):
    tmp, out = trained
    data = tmp / "dev.jsonl"
    write_paragraphs(data, n=4)
    main(["eval", "--model", str(out), "--data", str(data), "--downsample-to", "3", "--output",
          str(tmp / "metrics.json"), "--max-new-tokens", "3"])
    metrics = json.loads((tmp / "metrics.json").read_text())
    for key in ("em", "f1", "prefix_em", "n_docs", "n_questions", "bank_bytes", "bytes_per_doc", "adapt_ms_per_doc",
                "query_ms"):
        assert key in metrics
    assert metrics["n_docs"] == 3 and metrics["n_questions"] == 3


def test_eval_retention_writes_the_curve(trained, capsys):
    tmp, out = trained
    data = tmp / "stream.jsonl"
    write_paragraphs(data, n=6)
    report = tmp / "retention"
    main(["eval", "--model", str(out), "--data", str(data), "--retention", "--retention-first", "2",
          "--retention-step", "1", "--retention-until", "4", "--max-new-tokens", "3", "--output-dir", str(report),
          "--output", str(tmp / "retention.json")])
    with open(report / "retention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["n_docs"]) for r in rows] == [2, 3, 4]  # --retention-until: documents 5 and 6 are not streamed
    assert [int(r["n_questions"]) for r in rows] == [2, 2, 2]  # the first 2 documents' questions, every time
    assert (report / "retention.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [r["n_docs"] for r in json.loads((tmp / "retention.json").read_text())["retention"]] == [2, 3, 4]
    assert "| reader | n_docs | n_questions | em | f1 |" in capsys.readouterr().out
    main(["eval", "--model", str(out), "--data", str(data), "--retention", "--hybrid", "--retention-first", "2",
          "--retention-step", "2", "--retention-until", "4", "--max-new-tokens", "3", "--output-dir", str(report)])
    with open(report / "retention.csv", newline="") as f:  # --hybrid: a bank row and a hybrid row per point
        assert [(r["reader"], int(r["n_docs"])) for r in csv.DictReader(f)] == [
            ("bank", 2), ("hybrid", 2), ("bank", 4), ("hybrid", 4)]
    with pytest.raises(SystemExit, match="add --retention"):
        main(["eval", "--model", str(out), "--data", str(data), "--hybrid"])


def test_model_trained_without_vq_keeps_float_memory_everywhere(trained, tmp_path):
    """--no-vq trains a MAC-style model; its codebook is untrained, so adapt/eval default to an uncompressed bank and
    a compressed one is refused (codes from an untrained codebook would silently lose every document)."""
    from mbc_hf.cli import load_model

    tmp, compressed = trained
    out = tmp_path / "no-vq"
    main(["train", "--train-file", str(tmp / "train.jsonl"), "--output-dir", str(out), "--base-model", "tiny",
          "--encoder", "tiny-bert", "--codebook-type", "learned", "--max-steps", "2", "--batch-size", "2",
          "--eval-docs", "2", "--no-vq",
          "--memory-gain-questions", "2", "--eval-steps", "2", "--save-steps", "2"])
    model = load_model(str(out))
    assert model.config.use_vq is False
    with pytest.raises(ValueError, match="trained with the VQ bypassed.*compress=False"):
        model.new_memory_bank(compress=True)

    main(["adapt", "--model", str(out), "--documents", str(tmp / "train.jsonl"),
          "--bank", str(tmp_path / "b.safetensors")])
    assert isinstance(load_bank(tmp_path / "b.safetensors"), DenseMemoryBank)

    data = tmp_path / "dev.jsonl"
    write_paragraphs(data, n=3)
    sizes = {}
    for name, model_dir, flags in [("no-vq", out, []), ("no-vq --no-compress", out, ["--no-compress"]),
                                   ("vq", compressed, [])]:
        main(["eval", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "m.json"),
              "--max-new-tokens", "2", *flags])
        sizes[name] = json.loads((tmp_path / "m.json").read_text())["bytes_per_doc"]
    T, d = model.config.num_context_tokens, model.config.text_config.hidden_size
    assert sizes["no-vq"] == sizes["no-vq --no-compress"]
    assert sizes["no-vq"] >= T * d * 4 > 10 * sizes["vq"]  # fp32 vectors vs integer codes


def test_errors_exit_with_a_message_instead_of_a_traceback(trained, tmp_path):
    tmp, out = trained
    write_paragraphs(tmp_path / "dev.jsonl", n=2)
    with pytest.raises(SystemExit, match="mbc-hf eval: error: --retention writes .* give --output-dir"):
        main(["eval", "--model", str(out), "--data", str(tmp_path / "dev.jsonl"), "--retention"])
    with pytest.raises(SystemExit, match="mbc-hf eval: error: the dataset has 2 unique documents, fewer than first=3"):
        main(["eval", "--model", str(out), "--data", str(tmp_path / "dev.jsonl"), "--retention", "--retention-first",
              "3", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=r"mbc-hf ask: error: .*absent\.safetensors"):
        main(["ask", "--model", str(out), "--bank", str(tmp_path / "absent.safetensors"), "Where?"])


def test_held_out_documents_are_spread_over_the_file_and_disjoint_from_training(tmp_path):
    from mbc_hf.cli import split_train_eval
    from mbc_hf.data import load_qa_file

    write_paragraphs(tmp_path / "p.jsonl", n=12)
    dataset = load_qa_file(str(tmp_path / "p.jsonl"))
    train, held = split_train_eval(dataset, 3)
    order = list(dict.fromkeys(dataset["doc_id"]))
    positions = sorted(order.index(d) for d in set(held["doc_id"]))
    assert positions == [0, 4, 8]
    assert not set(train["doc_id"]) & set(held["doc_id"]) and len(train) + len(held) == len(dataset)
    assert split_train_eval(dataset, 0)[1] is None


@pytest.mark.parametrize("n_docs, per_doc, expected", [(2, 1, ["a1", "b1"]), (2, 0, ["a1", "a2", "b1"]),
                                                        (3, 2, ["a1", "a2", "b1", "c1", "c2"])])
def test_first_questions_keeps_the_first_documents_in_file_order(n_docs, per_doc, expected):
    import datasets

    from mbc_hf.data import first_questions

    ids = ["a1", "a2", "b1", "c1", "c2", "c3", "d1"]
    rows = datasets.Dataset.from_dict({"doc_id": [i[0] for i in ids], "context": [f"text {i[0]}" for i in ids],
                                       "question_id": ids})
    assert rows.select(first_questions(rows, n_docs, per_doc or None))["question_id"] == expected


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """`mbc-hf demo` (the README's main job) on given files: trains, adapts the first dev documents, answers one
    question per document, prints the table and writes demo_metrics.json."""
    write_paragraphs(tmp_path / "train.jsonl", n=8)
    write_paragraphs(tmp_path / "dev.jsonl", n=5)
    main(["demo", "--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "dev.jsonl"),
          "--dev-docs", "3", "--base-model", "tiny", "--encoder", "tiny-bert", "--max-steps", "2", "--batch-size", "2",
          "--eval-docs", "2", "--memory-gain-questions", "2", "--output-dir", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert "closed_book" in printed and "bank" in printed and "bytes/doc" in printed and "memory gain" in printed
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["closed_book", "empty", "bank"]  # a tiny model: no shipped reader, no extra row
    assert all(set(r) >= {"em", "f1"} and r["n_questions"] == 3 for r in rows.values())
    assert rows["bank"]["n_docs"] == 3 and report["bytes_per_doc"] >= 2 * 48  # 48 uint16 codes + the doc id
    assert isinstance(report["memory_gain_unrelated"], float) and "this run" in report["models"]["bank"]


def test_train_resume_after_a_finished_run_continues_with_the_same_frozen_parts(trained, tmp_path):
    """--resume on a folder that already holds the final model reloads it; the reload must freeze what the run
    froze (the base LM, the encoder backbones), or the optimizer state no longer fits and the LM would train."""
    import shutil

    import torch

    from mbc_hf.cli import load_model

    tmp, _ = trained
    out = tmp_path / "run"
    flags = ["train", "--train-file", str(tmp / "train.jsonl"), "--output-dir", str(out), "--base-model", "tiny",
             "--encoder", "tiny-bert", "--codebook-type", "learned", "--batch-size", "2", "--eval-docs", "2",
             "--memory-gain-questions", "2", "--eval-steps", "100", "--save-steps", "2", "--freeze-amortization"]
    main([*flags, "--max-steps", "2"])
    first = load_model(str(out))
    shutil.copytree(out, tmp_path / "first")
    main([*flags, "--max-steps", "4", "--resume"])
    state = json.loads(max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                       .joinpath("trainer_state.json").read_text())
    assert state["global_step"] == 4
    second = load_model(str(out))
    changed = {n for n, p in second.state_dict().items()
               if p.is_floating_point() and not torch.equal(p, first.state_dict()[n])}
    assert changed and all(n.startswith(("aggregator.", "prefix_generator.", "question_encoder.", "codebook.",
                                         "reconstruction_query")) or "lora_" in n for n in changed), sorted(changed)
    trainable = {n for n, p in second.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in first.named_parameters() if p.requires_grad}
    assert not any(n.startswith("lm.") and "lora_" not in n for n in trainable)
    assert not any(n.startswith("amortization.") or ".backbone." in n for n in trainable)
