#!/usr/bin/env python
"""Online adaptation: stream documents from a file into a memory bank, then ask questions against it.

    python examples/online_adaptation.py --model_name_or_path runs/mbc-qa --documents news.txt \\
        --memory_bank bank.safetensors --questions "Who won the match?" "Where is the summit?"

The documents are memorized in chunks of ``--chunk_size`` (no gradient, the model is frozen; only the bank grows)
and the bank is saved atomically after every chunk, so an interrupted stream resumes where it stopped when run
again (documents already in the bank are skipped). An existing ``--memory_bank`` is extended; with
``--start_from_shipped_bank`` a new bank starts from the ``memory_bank.safetensors`` saved with the model.
``--documents`` takes a ``.txt`` (one document per line), a JSONL/CSV with ``text`` (and optional ``id``), or any QA
file of `mbc_hf.data.load_qa_file` (its unique documents). ``--questions_file`` (a QA file) scores EM/F1 of its
questions against the final bank. ``--output_file`` gets a JSON report (answers, bank size, timings, metrics).
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import mbc_hf  # noqa: F401  (registers the Auto classes)
from mbc_hf.cli import build, load_model
from mbc_hf.data import load_documents_file, load_qa_file
from mbc_hf.evaluation import adapt_stream, evaluate_online
from mbc_hf.atomic import write_text_atomic
from mbc_hf.hub import bank_statistics, load_memory_bank


@dataclass
class OnlineArguments:
    documents: str = field(metadata={"help": "Documents to stream into the bank (.txt / JSONL / CSV / QA file)."})
    memory_bank: str = field(metadata={"help": "The bank (.safetensors): extended if it exists, else created."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved MBC model (folder or Hub id)."})
    base_model: str = field(default="embedded", metadata={"help": "Without --model_name_or_path: base LM of a new, "
                                                                  "untrained model ('embedded', a path, 'tiny')."})
    encoder: str = field(default="embedded", metadata={"help": "Without --model_name_or_path: its encoder."})
    start_from_shipped_bank: bool = field(default=False, metadata={
        "help": "When --memory_bank does not exist yet, start from the bank saved with the model."})
    chunk_size: int = field(default=64, metadata={"help": "Documents memorized (and the bank saved) per chunk."})
    batch_size: int = field(default=16, metadata={"help": "Documents / questions per forward pass."})
    max_documents: int | None = field(default=None, metadata={"help": "Only the first N documents of the file."})
    questions: list[str] = field(default_factory=list, metadata={"help": "Questions to answer from the bank."})
    questions_file: str | None = field(default=None, metadata={"help": "A QA file whose questions are answered "
                                                                       "from the bank and scored (EM/F1)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Answer length limit in LM tokens."})
    output_file: str | None = field(default=None, metadata={"help": "JSON report (written atomically)."})


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(OnlineArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    if args.chunk_size < 1:
        raise SystemExit("--chunk_size must be >= 1")
    model = load_model(args.model_name_or_path) if args.model_name_or_path else build(args.base_model,
                                                                                       args.encoder).eval()
    if Path(args.memory_bank).exists():
        bank = load_memory_bank(args.memory_bank, model=model)
    elif args.start_from_shipped_bank:
        bank = model.load_memory_bank(args.model_name_or_path)
    else:
        bank = model.new_memory_bank()
    docs = load_documents_file(args.documents, downsample_to=args.max_documents)
    before, start = len(bank), time.perf_counter()
    # the bank is saved (atomically) after every chunk of new documents: a crash keeps the last complete one
    adapt_stream(model, docs, bank, batch_size=args.batch_size, save_every=args.chunk_size,
                 bank_path=args.memory_bank)
    print(f"{len(docs)} documents streamed, bank: {len(bank)} documents, {bank.nbytes} bytes", flush=True)
    seconds = time.perf_counter() - start
    report = {"memory_bank": args.memory_bank, "documents_in_file": len(docs), "added": len(bank) - before,
              "adapt_ms_per_doc": seconds * 1000 / max(len(docs), 1), "bank": bank_statistics(bank)}
    if args.questions:
        answers = model.answer(args.questions, memory_bank=bank, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
        report["answers"] = [{"question": q, "answer": a} for q, a in zip(args.questions, answers)]
        for q, a in zip(args.questions, answers):
            print(f"Q: {q}\nA: {a}")
    if args.questions_file:
        dataset = load_qa_file(args.questions_file)
        metrics = evaluate_online(model, dataset, memory_bank=bank, adapt=False, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, show_progress=False)
        predictions, _ = metrics.pop("predictions"), metrics.pop("memory_bank")
        report["metrics"] = metrics
        report["predictions"] = [{"question_id": qid, "prediction": p}
                                 for qid, p in zip(dataset["question_id"], predictions)]
        print(json.dumps(metrics, indent=2))
    if args.output_file:
        write_text_atomic(args.output_file, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
