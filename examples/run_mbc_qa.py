#!/usr/bin/env python
"""Meta-train and/or evaluate an MBC model on document-QA files, in the manner of transformers' examples.

    python examples/run_mbc_qa.py --base_model embedded --encoder embedded \\
        --train_file train.paragraphs.jsonl --validation_file dev.paragraphs.jsonl \\
        --do_train --do_eval --max_steps 200 --per_device_train_batch_size 8 --eval_max_questions 200 \\
        --output_dir runs/mbc-qa

    # several processes (DDP; CPU processes talk over gloo, GPUs over NCCL), see docs/distributed.md
    accelerate launch --multi_gpu --num_processes 2 examples/run_mbc_qa.py ... (same arguments)

Files: anything `mbc_hf.data.load_qa_file` reads (SQuAD JSON, paragraph JSONL ``{"context", "qas": [...]}``,
StreamingQA/ArchivalQA CSV/JSONL). Arguments: the schema of ``mbc-hf train`` (`mbc_hf.arguments`: `ModelArguments`,
`DataArguments` and every `mbc_hf.trainer.MBCTrainingArguments` / `transformers.TrainingArguments` option, with the
same defaults; ``--help``, ``--help-all``); a single ``.json`` or ``.yaml`` file with any of them works too, and
means the same to both. Without ``--validation_file``, ``--eval_docs`` training documents are held out for
evaluation. Writes to ``--output_dir``: the model (``save_pretrained``: weights, KV-LoRA
adapter, tokenizers, modeling code, model card with the final metrics; plus ``memory_bank.safetensors`` of the
validation documents with ``--save_memory_bank``), ``train_results.json``, ``eval_results.json``,
``all_results.json`` and ``training_args.json``.
"""

import json
import logging
import math
import sys
from pathlib import Path

import transformers
from transformers import set_seed

import mbc_hf  # noqa: F401  (registers the Auto classes)
from mbc_hf.arguments import parse_train_args
from mbc_hf.atomic import write_text_atomic
from mbc_hf.data import load_qa_file, load_qa_files
from mbc_hf.factory import model_from_args, split_train_eval
from mbc_hf.trainer import MBCTrainer

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    """(`ModelArguments`, `DataArguments`, `MBCTrainingArguments`): the schema and defaults of ``mbc-hf train``
    (`mbc_hf.arguments`), from the command line or one JSON/YAML config file."""
    return parse_train_args(sys.argv[1:] if argv is None else argv, prog="run_mbc_qa.py")


def write_json(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    error = None
    if not (training_args.do_train or training_args.do_eval):
        error = "nothing to do: pass --do_train and/or --do_eval"
    elif training_args.do_train and not data_args.train_file:
        error = "--do_train needs --train_file"
    elif training_args.do_eval and not (data_args.validation_file or (training_args.do_train and data_args.eval_docs)):
        error = "--do_eval needs --validation_file (or --do_train with --eval_docs > 0 held-out documents)"
    elif data_args.save_memory_bank and not (training_args.do_eval and training_args.eval_max_questions > 0):
        error = "--save_memory_bank needs --do_eval and --eval_max_questions > 0"
    if error:  # as argparse reports a usage error: status 2
        print(f"run_mbc_qa.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO
                        if training_args.should_log else logging.WARNING, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    logger.warning("process %d of %d, device %s, distributed: %s", training_args.process_index,
                   training_args.world_size, training_args.device, training_args.parallel_mode.value)
    set_seed(training_args.seed)

    train = evaluation = None
    if training_args.do_train:
        train = load_qa_files(data_args.train_file, downsample_to=data_args.max_train_documents)
        train, evaluation = split_train_eval(train, 0 if data_args.validation_file else data_args.eval_docs)
    if data_args.validation_file:
        evaluation = load_qa_file(data_args.validation_file, downsample_to=data_args.max_eval_documents)
    model = model_from_args(model_args)
    trainer = MBCTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation)

    results, output_dir = {}, Path(training_args.output_dir)
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = dict(train_result.metrics, train_samples=len(train))
        trainer.log_metrics("train", metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json(output_dir / "train_results.json", metrics)
    if training_args.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(evaluation))
        trainer.log_metrics("eval", metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json(output_dir / "eval_results.json", metrics)

    if trainer.is_world_process_zero():
        data = [f"`{Path(f).name}`" for f in (data_args.train_file if training_args.do_train else [])]
        card = {"license": data_args.license,
                "training_data": (f"{', '.join(data)} ({len(train)} questions on {len(set(train['doc_id']))} "
                                  "documents)") if training_args.do_train else None}
        bank = trainer.eval_memory_bank if data_args.save_memory_bank else None
        model.save_pretrained(output_dir, memory_bank=bank, model_card_kwargs=card)
        write_text_atomic(output_dir / "training_args.json", training_args.to_json_string())
        write_json(output_dir / "all_results.json", results)
        finite = all(math.isfinite(v) for v in results.values() if isinstance(v, float))
        logger.info("saved to %s%s", output_dir, "" if finite else " (some metrics are not finite)")
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
