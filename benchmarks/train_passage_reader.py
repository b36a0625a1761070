"""Train the RAG baseline's reader: the same frozen base LM with LoRA on the same projections as MBC's KV-LoRA,
fine-tuned to answer from a passage in its prompt, so that ``qa_squad.py --passage-reader DIR`` can put "BM25 top-1
passage in context, read by a reader trained on passages" beside the bank (issue 19: the strongest fair RAG row).

Fair means the same as the MBC reader: the same training questions (the shared SQuAD train part), the same
adapter (LoRA r=16, alpha=32, dropout 0.05 on ``k_proj``/``v_proj`` of every layer, as KV-LoRA on all 30 layers),
the same optimiser settings (AdamW, LR 1e-3 constant after 50 warm-up steps, batches of 8, grad norm 1.0) and the
same wall-clock budget (``--max-minutes``, 50 for the shipped reader). Each example is the benchmark's own
``chat-short`` prompt (``qa_squad.PromptBuilder``: system message, one-shot example, the gold passage cut to 350
LM tokens, the question) followed by the first gold answer and EOS; the loss is on the answer tokens only.

Usage::

    python benchmarks/train_passage_reader.py \\
        --train-file ../shared/data/squad/train-part.first44articles.paragraphs.jsonl \\
        --output-dir runs/passage-reader --max-minutes 50

Writes a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and ``training.json``
(steps, minutes, loss). Plain ``transformers.Trainer`` + ``peft``: nothing MBC-specific is trained here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", required=True, help="QA file (the shared SQuAD train part)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--base-model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a path or Hub id")
    p.add_argument("--max-minutes", type=float, default=50.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (default: the time budget only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--passage-tokens", type=int, default=350)
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def examples(dataset, tokenizer, prompt_style: str = "chat-short", passage_tokens: int = 350):
    """``dataset`` rows (question, context, answers) -> tokenized examples: input_ids (prompt + answer + EOS) and
    labels (-100 on the prompt, so the loss is on the answer tokens only)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from qa_squad import PromptBuilder

    build = PromptBuilder(tokenizer, prompt_style, passage_tokens)

    def encode(row):
        prompt = tokenizer(build(row["question"], row["context"]))["input_ids"]
        answer = tokenizer(" " + row["answers"][0].strip(), add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    return dataset.map(encode, remove_columns=dataset.column_names)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from mbc_hf.trainer import StopAfterMinutes
    from mbc_hf.data import load_qa_file
    from mbc_hf.embedded import resolve

    torch.manual_seed(a.seed)
    base = resolve(a.base_model, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lm = get_peft_model(lm, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.05,
                                       target_modules=["k_proj", "v_proj"], task_type="CAUSAL_LM"))
    train = examples(load_qa_file(a.train_file).shuffle(seed=a.seed), tokenizer, passage_tokens=a.passage_tokens)
    args = TrainingArguments(
        output_dir=a.output_dir, per_device_train_batch_size=a.batch_size, learning_rate=a.learning_rate,
        warmup_steps=a.warmup_steps, lr_scheduler_type="constant_with_warmup", max_grad_norm=1.0,
        max_steps=a.max_steps, num_train_epochs=1, logging_steps=a.logging_steps, save_strategy="no",
        report_to="none", use_cpu=True, seed=a.seed, disable_tqdm=not sys.stderr.isatty(), dataloader_num_workers=0)
    trainer = Trainer(model=lm, args=args, train_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[StopAfterMinutes(a.max_minutes)])
    start = time.time()
    result = trainer.train()
    lm.save_pretrained(a.output_dir)
    tokenizer.save_pretrained(a.output_dir)
    log = {"base_model": a.base_model, "steps": result.global_step, "minutes": (time.time() - start) / 60,
           "train_loss": result.training_loss, "args": vars(a),
           "loss_curve": [h for h in trainer.state.log_history if "loss" in h]}
    Path(a.output_dir, "training.json").write_text(json.dumps(log, indent=1))
    print(f"[train_passage_reader] {result.global_step} steps in {log['minutes']:.1f} min, mean loss "
          f"{result.training_loss:.3f}: {a.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
