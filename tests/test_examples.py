"""examples/*.py run as subprocesses on tiny random models and small QA / document files written here.

run_mbc_qa.py (train + eval + save, then eval-only from the saved folder), online_adaptation.py (streaming with
resume, answers, scoring), push_to_hub.py (--dry-run folder, and an upload to `hub_server.LoopbackHub` on
127.0.0.1). Multi-process runs of run_mbc_qa.py are in test_multiprocess.py.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import LoopbackHub, same_files
from transformers import AutoModelForCausalLM

import mbc_hf  # noqa: F401
from mbc_hf.data import documents, load_qa_file
from mbc_hf.hub import folder_files, load_memory_bank

pytestmark = pytest.mark.slow  # subprocesses / training loops (issue 37: the fast tier skips them)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_paragraphs(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"paragraph_id": f"T#{i}", "title": "T", "paragraph_index": i,
                                "context": f"Room {i} of the old museum holds painting number {i * 11}.",
                                "qas": [{"id": f"q{i}", "question": f"Which painting is in room {i}?",
                                         "answers": {"text": [str(i * 11)], "answer_start": [0]}},
                                        {"id": f"q{i}b", "question": f"What does room {i} hold?",
                                         "answers": {"text": [f"painting number {i * 11}"], "answer_start": [0]}}]})
                    + "\n")


def run(script, *args, cwd, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, env=env, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    return out


QA_ARGS = ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
           "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--memory_gain_questions", "2",
           "--eval_max_questions", "6"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    write_paragraphs(tmp / "train.jsonl", 8)
    write_paragraphs(tmp / "dev.jsonl", 5, offset=100)
    run("run_mbc_qa.py", "--base_model", "tiny", "--encoder", "tiny-bert", "--train_file", "train.jsonl",
        "--validation_file", "dev.jsonl", "--do_train", "--do_eval", "--max_steps", "3", "--output_dir", "model",
        "--save_memory_bank", "--license", "mit", *QA_ARGS, cwd=tmp)
    return tmp, tmp / "model"


def test_run_mbc_qa_writes_metrics_model_card_and_bank(trained):
    tmp, out = trained
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(train["train_loss"]) and train["train_samples"] == 16
    assert evaluation["eval_n_docs"] == 3 and evaluation["eval_n_questions"] == 6  # first 6 questions = 3 rooms
    assert json.loads((out / "all_results.json").read_text()) == {**train, **evaluation}
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 3

    model = AutoModelForCausalLM.from_pretrained(out)
    bank = load_memory_bank(out, model=model)  # the bank of the final evaluation, in file order
    dev = load_qa_file(tmp / "dev.jsonl").select(range(6))
    assert bank.doc_ids == [doc_id for doc_id, _ in documents(dev)]
    card = (out / "README.md").read_text()
    for key, value in evaluation.items():
        if key != "eval_samples":
            assert f"| {key} | {value:.4g} |" in card, key
    assert "license: mit" in card and "`train.jsonl` (16 questions on 8 documents)" in card
    assert "| documents | 3 |" in card


def test_run_mbc_qa_eval_only_from_the_saved_folder_reproduces_the_final_evaluation(trained):
    tmp, out = trained
    run("run_mbc_qa.py", "--model_name_or_path", "model", "--validation_file", "dev.jsonl", "--do_eval",
        "--output_dir", "eval-only", *QA_ARGS, cwd=tmp)
    first = json.loads((out / "eval_results.json").read_text())
    again = json.loads((tmp / "eval-only" / "eval_results.json").read_text())
    for key in ("eval_em", "eval_f1", "eval_n_docs", "eval_bank_bytes", "eval_nll_gold", "eval_nll_empty",
                "eval_memory_gain"):
        assert again[key] == pytest.approx(first[key], abs=1e-5), key


def test_run_mbc_qa_refuses_incomplete_arguments(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / "run_mbc_qa.py"), "--base_model", "tiny", "--do_train",
                          "--output_dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "--do_train needs --train_file" in out.stderr


def test_online_adaptation_streams_resumes_and_answers(trained):
    tmp, out = trained
    (tmp / "docs.txt").write_text("The red door is in Rome.\nThe blue door is in Oslo.\nThe green door is in Lima.\n")
    run("online_adaptation.py", "--model_name_or_path", "model", "--documents", "docs.txt", "--memory_bank",
        "stream.safetensors", "--chunk_size", "2", "--output_file", "first.json", cwd=tmp)
    first = json.loads((tmp / "first.json").read_text())
    assert first["added"] == 3 and first["bank"]["documents"] == 3
    (tmp / "docs.txt").write_text("The red door is in Rome.\nThe white door is in Nice.\n")  # one old, one new
    questions = ["Where is the red door?", "Where is the white door?"]
    run("online_adaptation.py", "--model_name_or_path", "model", "--documents", "docs.txt", "--memory_bank",
        "stream.safetensors", "--questions", *questions, "--questions_file", "dev.jsonl", "--max_new_tokens", "3",
        "--output_file", "second.json", cwd=tmp)
    second = json.loads((tmp / "second.json").read_text())
    assert second["added"] == 1 and second["bank"]["documents"] == 4
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    bank = load_memory_bank(tmp / "stream.safetensors", model=model)
    assert len(bank) == 4
    assert [a["answer"] for a in second["answers"]] == model.answer(questions, memory_bank=bank, max_new_tokens=3)
    assert second["metrics"]["n_questions"] == 10 and second["metrics"]["n_docs"] == 4  # answered, not adapted


def test_push_to_hub_dry_run_and_upload_to_a_loopback_hub(trained):
    tmp, out = trained
    online = {"HF_HUB_OFFLINE": "0"}  # as for the upload below (transformers records it in tokenizer_config.json)
    run("push_to_hub.py", "--model_name_or_path", "model", "--repo_id", "carol/rooms", "--dry-run",
        "--output_dir", "dry", cwd=tmp, env=online)
    dry = folder_files(tmp / "dry")
    card = dry["README.md"].decode()
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert f"| eval_f1 | {evaluation['eval_f1']:.4g} |" in card  # metrics survive save -> load -> save
    assert "license: mit" in card and 'from_pretrained("carol/rooms")' in card and "| documents | 3 |" in card
    # weights, adapter, bank, tokenizers and card data as saved by run_mbc_qa.py (the *config.json files are
    # re-serialised by transformers on load -> save: sub-config dtypes, tokenizer call defaults, use_cache; the .py
    # files are copied from the installed package at each save)
    def kept(files):
        return {k: v for k, v in files.items() if k.endswith((".safetensors", "tokenizer.json"))
                or k in ("kv_lora/adapter_config.json", "model_card_data.json")}

    same_files(kept(dry), kept(folder_files(out)))
    # model + bank + adapter weights, adapter config, tokenizer, card data (a vocabulary codebook: no encoder tokenizer)
    assert len(kept(dry)) == 6 and "modeling_mbc.py" in dry
    assert json.loads(dry["config.json"])["auto_map"] == json.loads((out / "config.json").read_text())["auto_map"]
    with LoopbackHub() as hub:
        run("push_to_hub.py", "--model_name_or_path", "model", "--repo_id", "carol/rooms", "--endpoint",
            hub.endpoint, "--token", "hf_test", "--private", cwd=tmp, env=online)
    assert hub.repos["carol/rooms"]["private"] and hub.auth == {"Bearer hf_test"}
    same_files(hub.repos["carol/rooms"]["files"], dry)
