#!/usr/bin/env python
"""Meta-train and/or evaluate an MBC model on document-QA files, in the manner of transformers' examples.

    python examples/run_mbc_qa.py --base_model embedded --encoder embedded \\
        --train_file train.paragraphs.jsonl --validation_file dev.paragraphs.jsonl \\
        --do_train --do_eval --max_steps 200 --per_device_train_batch_size 8 --eval_max_questions 200 \\
        --output_dir runs/mbc-qa

    # several processes (DDP; CPU processes talk over gloo, GPUs over NCCL), see docs/distributed.md
    accelerate launch --multi_gpu --num_processes 2 examples/run_mbc_qa.py ... (same arguments)

Files: anything `mbc_hf.data.load_qa_file` reads (SQuAD JSON, paragraph JSONL ``{"context", "qas": [...]}``,
StreamingQA/ArchivalQA CSV/JSONL). Arguments: `ModelArguments`, `DataTrainingArguments` below and every
`mbc_hf.trainer.MBCTrainingArguments` / `transformers.TrainingArguments` option (``--help``); a single ``.json``
file with all of them works too. Writes to ``--output_dir``: the model (``save_pretrained``: weights, KV-LoRA
adapter, tokenizers, modeling code, model card with the final metrics; plus ``memory_bank.safetensors`` of the
validation documents with ``--save_memory_bank``), ``train_results.json``, ``eval_results.json``,
``all_results.json`` and ``training_args.json``.
"""

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, set_seed

import mbc_hf  # noqa: F401  (registers the Auto classes)
from mbc_hf.cli import build, load_model
from mbc_hf.data import load_qa_file
from mbc_hf.atomic import write_text_atomic
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train or evaluate."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved MBC model (folder or Hub id) to continue from; otherwise a new one is built from "
                "--base_model and --encoder."})
    base_model: str = field(default="embedded", metadata={
        "help": "Base causal LM of a new model: 'embedded' (SmolLM2-135M-Instruct from PyPI), a local path or Hub "
                "id, or 'tiny' / 'tiny-gpt2' (random tiny models for smoke tests)."})
    encoder: str = field(default="embedded", metadata={
        "help": "Document encoder of a new model: 'embedded' (all-MiniLM-L6-v2), a path or Hub id (BERT-like or "
                "T5), or 'tiny-bert' / 'tiny-t5' with a tiny base model."})
    codebook_type: str = field(default="vocabulary", metadata={
        "help": "'vocabulary' (default; codes are LM tokens picked by a trained selector, read from the documents "
                "addressing picks) or 'learned' (the paper's VQ codebook)."})
    num_context_tokens: int | None = field(default=None, metadata={
        "help": "T of a new model (default: 48 with the vocabulary codebook, the config's 12 with the learned one)."})
    kv_lora_layers: int | None = field(default=None, metadata={"help": "KV-LoRA on the last N layers (new model)."})
    codebook_dim: int | None = field(default=32, metadata={
        "help": "Factorized l2-normalised codes of this size for a new model (0 = the paper's direct codebook)."})
    reconstruction_weight: float | None = field(default=0.5, metadata={
        "help": "Weight of the auxiliary reconstruction loss of a new model (0 = off)."})
    train_encoders: bool = field(default=False, metadata={"help": "Also train the encoder backbones (new model)."})


@dataclass
class DataTrainingArguments:
    """What to train and evaluate on, and what to write next to the model."""

    train_file: str | None = field(default=None, metadata={"help": "QA file for --do_train."})
    validation_file: str | None = field(default=None, metadata={"help": "QA file for --do_eval."})
    max_train_documents: int | None = field(default=None, metadata={
        "help": "Keep the questions of the first N documents of the train file (file order)."})
    max_eval_documents: int | None = field(default=None, metadata={
        "help": "Keep the questions of the first N documents of the validation file (file order)."})
    save_memory_bank: bool = field(default=False, metadata={
        "help": "Ship the bank of the final online evaluation (needs --eval_max_questions > 0) as "
                "memory_bank.safetensors with the saved model."})
    license: str = field(default="apache-2.0", metadata={"help": "Licence written into the model card."})


def write_json(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MBCTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO
                        if training_args.should_log else logging.WARNING, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    logger.warning("process %d of %d, device %s, distributed: %s", training_args.process_index,
                   training_args.world_size, training_args.device, training_args.parallel_mode.value)
    if not (training_args.do_train or training_args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval")
    if training_args.do_train and not data_args.train_file:
        parser.error("--do_train needs --train_file")
    if training_args.do_eval and not data_args.validation_file:
        parser.error("--do_eval needs --validation_file")
    if data_args.save_memory_bank and not (training_args.do_eval and training_args.eval_max_questions > 0):
        parser.error("--save_memory_bank needs --do_eval and --eval_max_questions > 0")
    set_seed(training_args.seed)

    train = load_qa_file(data_args.train_file, downsample_to=data_args.max_train_documents) \
        if training_args.do_train else None
    evaluation = load_qa_file(data_args.validation_file, downsample_to=data_args.max_eval_documents) \
        if training_args.do_eval else None
    if model_args.model_name_or_path:
        model = load_model(model_args.model_name_or_path).train()
    else:
        learned = model_args.codebook_type == "learned"  # the vocabulary codebook has no encoder-side options
        model = build(model_args.base_model, model_args.encoder, codebook_type=model_args.codebook_type,
                      num_context_tokens=model_args.num_context_tokens, kv_lora_layers=model_args.kv_lora_layers,
                      codebook_dim=model_args.codebook_dim or None if learned else None,
                      reconstruction_loss_weight=model_args.reconstruction_weight if learned else None,
                      freeze_encoders=not model_args.train_encoders)
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
        data = [f"`{Path(f).name}`" for f in (data_args.train_file if training_args.do_train else None,) if f]
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
