"""MBCTrainer with 2 processes on the CPU (DDP over gloo), started with ``accelerate launch``.

Note: in accelerate 1.15 ``accelerate launch --cpu --num_processes 2`` starts ONE process unless an MPI hostfile is
given; ``--multi_gpu`` goes through torchrun and, with no CUDA device (or ``--use_cpu``), accelerate picks
MULTI_CPU with the gloo backend. Each test checks that two processes really ran.
"""
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from test_examples import EXAMPLES, write_paragraphs
from transformers import AutoModelForCausalLM

import mbc_hf  # noqa: F401
from mbc_hf.data import documents, load_qa_file
from mbc_hf.evaluation import evaluate_online
from mbc_hf.hub import load_memory_bank

pytestmark = pytest.mark.slow  # subprocesses / training loops (issue 37: the fast tier skips them)

ROWS = [dict(doc_id=f"d{i}", context=f"Fact {i}: the code of room {i} is {i * 7}.",
             question=f"What is the code of room {i}?", answers=[str(i * 7)], question_id=f"q{i}")
        for i in range(24)]
EVAL = [dict(doc_id=f"e{i}", context=f"Note {i}: locker {i} opens with key {i * 3}.",
             question=f"Which key opens locker {i}?" if k == 0 else f"What opens locker {i}?",
             answers=[str(i * 3)], question_id=f"e{i}-{k}") for i in range(20) for k in range(2)]

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import datasets, torch
    from mbc_hf.atomic import write_text_atomic
    from mbc_hf.testing import tiny_mbc_model
    from mbc_hf.trainer import MBCDataCollator, MBCTrainer, MBCTrainingArguments

    out = sys.argv[1]
    rows = json.load(open(out + "/data.json"))
    seen = []

    class Recording(MBCDataCollator):
        def __call__(self, batch):
            seen.extend(r["question_id"] for r in batch)
            return super().__call__(batch)

    model = tiny_mbc_model(seed=0)
    args = MBCTrainingArguments(output_dir=out + "/trainer", per_device_train_batch_size=4,
                                per_device_eval_batch_size=4, learning_rate=3e-3, report_to="none", use_cpu=True,
                                save_strategy="no", disable_tqdm=True, logging_steps=1, max_steps=6, seed=0,
                                memory_gain_questions=4, eval_max_questions=len(rows["eval"]), dataloader_num_workers=0)
    trainer = MBCTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows["train"]),
                         eval_dataset=datasets.Dataset.from_list(rows["eval"]), data_collator=Recording(model))
    trainer.train()
    seen_in_training = list(seen)  # evaluate's memory gain uses the collator too
    params = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in sorted(model.named_parameters())))
    metrics = trainer.evaluate()
    bank, rank = trainer.eval_memory_bank, trainer.accelerator.process_index
    report = dict(rank=rank, world=trainer.accelerator.num_processes, global_step=trainer.state.global_step,
                  seen=seen_in_training, params=params.hexdigest(), fingerprint=model.codebook.fingerprint(),
                  losses=[h["loss"] for h in trainer.state.log_history if "loss" in h], metrics=metrics,
                  doc_ids=bank.doc_ids, codes=bank.codes.tolist(), bank_fingerprint=bank.codebook_fingerprint)
    if trainer.is_world_process_zero():
        model.save_pretrained(out + "/model", memory_bank=bank)
    write_text_atomic(f"{out}/rank{rank}.json", json.dumps(report))
    trainer.accelerator.wait_for_everyone()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args, cwd, timeout=540):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(free_port()), str(script), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out


def test_two_processes_train_and_build_the_single_process_bank(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps({"train": ROWS, "eval": EVAL}))
    (tmp_path / "mp_train.py").write_text(SCRIPT)
    launch(tmp_path / "mp_train.py", tmp_path, cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # both processes ran and stepped: 6 steps of 4 rows each, the first epoch (3 steps each) split without overlap
    assert r0["world"] == r1["world"] == 2 and r0["global_step"] == r1["global_step"] == 6
    assert len(r0["seen"]) == len(r1["seen"]) == 24
    assert not set(r0["seen"][:12]) & set(r1["seen"][:12])
    assert set(r0["seen"][:12]) | set(r1["seen"][:12]) == {r["question_id"] for r in ROWS}
    assert r0["losses"] and all(math.isfinite(x) for x in r0["losses"])
    # same weights and the same codebook on both processes (CodebookSyncCallback) ...
    assert r0["params"] == r1["params"] and r0["fingerprint"] == r1["fingerprint"] == r0["bank_fingerprint"]
    # ... so the same bank: every eval document once, in file order, gathered from both processes
    dataset = datasets.Dataset.from_list(EVAL)
    docs = documents(dataset)
    assert r0["doc_ids"] == r1["doc_ids"] == [doc_id for doc_id, _ in docs]
    timing = ("eval_query_ms", "eval_adapt_ms_per_doc", "eval_peak_rss_mb", "eval_runtime")
    assert r0["codes"] == r1["codes"]
    assert {k: v for k, v in r0["metrics"].items() if k not in timing} == \
        {k: v for k, v in r1["metrics"].items() if k not in timing}

    # the saved model in ONE process builds exactly that bank and scores exactly those metrics
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert model.codebook.fingerprint() == r0["fingerprint"]
    single = model.memorize([text for _, text in docs], doc_ids=[doc_id for doc_id, _ in docs], batch_size=16)
    assert single.codes.tolist() == r0["codes"]
    assert load_memory_bank(tmp_path / "model", model=model).codes.tolist() == r0["codes"]
    online = evaluate_online(model, dataset, show_progress=False)
    for key in ("em", "f1", "prefix_em", "n_docs", "n_questions", "bank_bytes"):
        assert r0["metrics"][f"eval_{key}"] == online[key], key
    assert r0["metrics"]["eval_n_docs"] == 20 and r0["metrics"]["eval_n_questions"] == 40
    assert torch.isfinite(torch.tensor(r0["metrics"]["eval_memory_gain"]))


def test_run_mbc_qa_under_accelerate_launch(tmp_path):
    write_paragraphs(tmp_path / "train.jsonl", 8)
    write_paragraphs(tmp_path / "dev.jsonl", 9, offset=100)
    out = launch(EXAMPLES / "run_mbc_qa.py", "--base_model", "tiny", "--encoder", "tiny-bert",
                 "--codebook_type", "learned", "--train_file",
                 "train.jsonl", "--validation_file", "dev.jsonl", "--do_train", "--do_eval", "--max_steps", "3",
                 "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
                 "--memory_gain_questions", "2", "--eval_max_questions", "18", "--output_dir", "model",
                 "--save_memory_bank", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
                 "--disable_tqdm", "true", cwd=tmp_path)
    assert "process 1 of 2" in out.stdout + out.stderr
    results = json.loads((tmp_path / "model" / "all_results.json").read_text())
    assert results["epoch"] == 0.75  # 3 steps of the 4 an epoch takes with 16 rows over 2 processes x 2 rows
    assert math.isfinite(results["train_loss"])
    assert results["eval_n_docs"] == 9 and results["eval_n_questions"] == 18
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    dev = load_qa_file(tmp_path / "dev.jsonl")
    docs = documents(dev)
    bank = load_memory_bank(tmp_path / "model", model=model)  # gathered from 2 processes, saved by process 0
    single = model.memorize([t for _, t in docs], doc_ids=[d for d, _ in docs], batch_size=16)
    assert bank.doc_ids == single.doc_ids and torch.equal(bank.codes, single.codes)
    assert Path(tmp_path / "model" / "README.md").read_text().count("| eval_f1 |") == 1
