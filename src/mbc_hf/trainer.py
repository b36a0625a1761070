"""Meta-training and evaluation of MBC with the HF `Trainer` (MBC §3.4 / MAC §3.3).

Each training batch is a set of (document, question, answer) rows; the batch's unique documents are encoded,
quantized and form the memory that every question of the batch reads (the others act as distractors), and the
loss is the QA loss on `` answer<eos>`` tokens + λ·VQ loss (+ the optional reconstruction term). The codebook's
online resetting runs inside the model's training forward.

Additions that make the memory path learnable on a small CPU budget (none is in the paper; see README):
* a gold-only curriculum: for the first ``gold_only_steps`` steps a question sees only its own document;
* learning rates per module group (encoders, KV-LoRA, the rest), and KV-LoRA frozen until ``lora_start_step``;
* evaluation reports the **memory gain**: answer NLL with an empty memory (and with unrelated documents) minus
  answer NLL with the gold document, on fixed held-out questions. A positive gain means the memory is read.
"""

import math
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments



@dataclass
class MBCTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus MBC's schedule knobs. ``remove_unused_columns`` defaults to False (the collator
    needs the raw text columns)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep text columns for the collator."})
    gold_only_steps: int = field(default=0, metadata={"help": "Steps in which each question sees only its own "
                                                               "document (curriculum), before the whole batch."})
    encoder_learning_rate: float | None = field(default=None, metadata={"help": "LR of the encoder backbones "
                                                                                 "(default: learning_rate)."})
    lora_learning_rate: float | None = field(default=None, metadata={"help": "LR of KV-LoRA (default: learning_rate)."})
    lora_start_step: int = field(default=0, metadata={"help": "KV-LoRA stays frozen before this optimizer step."})
    memory_gain_questions: int = field(default=32, metadata={"help": "Held-out questions for the memory gain."})
    eval_max_questions: int = field(default=0, metadata={"help": "If > 0, evaluation also adapts online on the "
                                                                  "eval documents and answers this many questions "
                                                                  "(EM/F1); 0 = memory gain and loss only."})


@dataclass
class MBCDataCollator:
    """Rows ``{"doc_id", "context", "question", "answers"}`` -> an MBC training batch.

    Returns CPU tensors: ``input_ids``/``attention_mask``/``labels`` (B, L) (prompt + `` answer<eos>``, labels
    only on the answer; the gold answer is the shortest reference, as in the reference code),
    ``question_input_ids``/``question_attention_mask`` (B, S), ``context_input_ids``/``context_attention_mask``
    (N, S') of the N unique documents, ``question_doc_index`` (B,) int64, and, when the model's
    ``reconstruction_loss_weight`` > 0, ``reconstruction_input_ids``/``reconstruction_attention_mask`` (N, R).
    """

    model: object

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        doc_index, docs = {}, []
        for row in rows:
            if row["doc_id"] not in doc_index:
                doc_index[row["doc_id"]] = len(docs)
                docs.append(row["context"])
        answers = [min(row["answers"], key=len) for row in rows]
        batch = self.model.encode_questions([row["question"] for row in rows], answers, device="cpu")
        context = self.model.encode_documents(docs, device="cpu")
        batch["context_input_ids"], batch["context_attention_mask"] = context["input_ids"], context["attention_mask"]
        batch["question_doc_index"] = torch.tensor([doc_index[row["doc_id"]] for row in rows])
        if self.model.config.reconstruction_loss_weight > 0:
            batch.update(self.model.encode_reconstruction_targets(docs, device="cpu"))
        return batch


@torch.no_grad()
def memory_gain(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Answer NLL (nats/token) of a collated batch with the gold document alone, with an empty memory and with an
    unrelated document (each question gets the next question's document), and the gains
    ``memory_gain = nll_empty - nll_gold`` and ``memory_gain_unrelated = nll_unrelated - nll_gold``. With
    reconstruction targets in the batch, also ``reconstruction_gain``: NLL of each document's first tokens from
    another document's memory minus from its own (> 0 means the codes carry the document)."""
    was_training = model.training
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    qa = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "question_input_ids",
                                "question_attention_mask")}
    idx = batch["question_doc_index"]
    n_docs = int(batch["context_input_ids"].shape[0])

    def nll(memory_kwargs):
        return float(model(**qa, **memory_kwargs).qa_loss)

    docs = dict(context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"])
    gold = nll(dict(docs, question_doc_index=idx))
    empty = nll(dict(memory=model.memory_from_bank(None)))
    unrelated = nll(dict(docs, question_doc_index=(idx + 1) % n_docs)) if n_docs > 1 else float("nan")
    out = {"nll_gold": gold, "nll_empty": empty, "nll_unrelated": unrelated, "memory_gain": empty - gold,
           "memory_gain_unrelated": unrelated - gold}
    if "reconstruction_input_ids" in batch and n_docs > 1:  # do the codes carry the document at all?
        rec = (batch["reconstruction_input_ids"], batch["reconstruction_attention_mask"])

        def rec_nll(ids, mask):
            return float(model.reconstruction_loss(model.memory_from_documents(ids, mask)[0], *rec))

        out["reconstruction_nll_gold"] = rec_nll(docs["context_input_ids"], docs["context_attention_mask"])
        out["reconstruction_nll_unrelated"] = rec_nll(docs["context_input_ids"].roll(1, 0),
                                                      docs["context_attention_mask"].roll(1, 0))
        out["reconstruction_gain"] = out["reconstruction_nll_unrelated"] - out["reconstruction_nll_gold"]
    model.train(was_training)
    return out


class LoraWarmStartCallback(TrainerCallback):
    """Keeps KV-LoRA's learning rate at 0 until ``lora_start_step`` (the memory path trains first)."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or args.lora_start_step <= 0:
            return
        for group in optimizer.param_groups:
            if group.get("name") == "kv_lora":
                if state.global_step < args.lora_start_step:
                    group["lr"] = 0.0


class MBCTrainer(Trainer):
    """`Trainer` for MBC meta-training; `evaluate` adds the memory gain (and EM/F1 after online adaptation).

    Use with `MBCTrainingArguments` and `MBCDataCollator` (the default collator when none is given).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by accumulation steps

    def __init__(self, *args, data_collator=None, **kwargs):
        model = kwargs.get("model") or (args[0] if args else None)
        super().__init__(*args, data_collator=data_collator or MBCDataCollator(model), **kwargs)
        self.add_callback(LoraWarmStartCallback())
        self._parts = {}

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Trainer's save, with the training arguments as JSON instead of the pickled ``training_args.bin``."""
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir or self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def create_optimizer(self, model=None):
        """AdamW with three parameter groups: encoder backbones, KV-LoRA, and the other MBC modules."""
        if self.optimizer is None:
            model = self.model if model is None else model
            args, groups = self.args, {"encoders": [], "kv_lora": [], "mbc": []}
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                key = "kv_lora" if "lora_" in name else "encoders" if ".backbone." in name else "mbc"
                groups[key].append(p)
            lrs = {"encoders": args.encoder_learning_rate or args.learning_rate,
                   "kv_lora": args.lora_learning_rate or args.learning_rate, "mbc": args.learning_rate}
            self.optimizer = torch.optim.AdamW(
                [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps],
                lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step >= self.args.gold_only_steps or not model.training:
            inputs = {k: v for k, v in inputs.items() if k != "question_doc_index"}
        outputs = model(**inputs)
        if model.training:
            for key in ("qa_loss", "vq_loss", "perplexity", "reconstruction_loss"):
                value = getattr(outputs, key)
                if value is not None:
                    total, count = self._parts.get(key, (0.0, 0))
                    self._parts[key] = (total + float(value.detach()), count + 1)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            logs.update({k: round(total / count, 4) for k, (total, count) in self._parts.items()})
            logs["gold_only"] = float(self.state.global_step <= self.args.gold_only_steps)
            self._parts = {}
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Memory gain on the first ``memory_gain_questions`` eval rows (one row per document), plus EM/F1 after
        online adaptation on the eval documents when ``eval_max_questions`` > 0. Metrics are logged and returned
        with the ``eval_`` prefix (e.g. ``eval_memory_gain``, usable as ``metric_for_best_model``)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        start = time.time()
        rows, seen = [], set()
        for row in dataset:
            if row["doc_id"] not in seen:
                seen.add(row["doc_id"])
                rows.append(row)
            if len(rows) == self.args.memory_gain_questions:
                break
        metrics = {}
        for i in range(0, len(rows), self.args.per_device_eval_batch_size):
            part = memory_gain(model, self.data_collator(rows[i:i + self.args.per_device_eval_batch_size]))
            for k, v in part.items():
                metrics.setdefault(k, []).append(v)
        metrics = {k: sum(v) / len(v) for k, v in metrics.items()}
        if self.args.eval_max_questions > 0:
            from .evaluation import evaluate_online

            subset = dataset.select(range(min(len(dataset), self.args.eval_max_questions)))
            online = evaluate_online(model, subset, show_progress=False)
            metrics.update({k: v for k, v in online.items() if k not in ("predictions", "memory_bank")})
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if not (isinstance(v, float)
                                                                                     and math.isnan(v))}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
        model.eval_metrics = metrics
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics
