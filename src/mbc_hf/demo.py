"""``mbc-hf demo``: the main job on the embedded default in a few minutes. A short meta-training on SQuAD train
rows, then online adaptation on dev documents and QA against the bank, compared with the closed-book base LM and
with the same model reading an empty memory; bank size compared with an uncompressed (MAC-style) bank."""

import json
import math
import statistics
from pathlib import Path

from .atomic import write_text_atomic

CLOSED_BOOK = "Question: {question}\nAnswer:"


def write_json_report(path, record: dict) -> None:
    """Write a benchmark's ``record`` to ``path`` as indented UTF-8 JSON: parent folders are created and the file is
    replaced atomically (`write_text_atomic`), so an interrupted run leaves the previous report whole."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts -> a GitHub markdown table (floats with 2 decimals)."""
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def batch_mean_table(parts: list[dict[str, float]], label: str, value: str, spec: str = ".4f"):
    """Per-batch results (one dict per batch, same keys) -> (mean, standard error over batches or None for a single
    batch, a markdown table of both with columns ``label``, ``value``, "standard error"; numbers as ``spec``)."""
    mean = {k: sum(d[k] for d in parts) / len(parts) for k in parts[0]}
    # each batch is an independent draw of documents, so the spread of the batch means gives the standard error
    stderr = {k: statistics.stdev(d[k] for d in parts) / math.sqrt(len(parts)) if len(parts) > 1 else None
              for k in mean}
    table = markdown_table([{label: k, value: format(v, spec),
                             "standard error": "—" if stderr[k] is None else f"{stderr[k]:.4f}"}
                            for k, v in mean.items()], [label, value, "standard error"])
    return mean, stderr, table


def dev_memory_gain(model, dev, n_docs: int = 64, batch_size: int = 8) -> dict[str, float]:
    """Mean `mbc_hf.trainer.memory_gain` over the first question of the first ``n_docs`` dev documents, in batches
    of ``batch_size`` documents: ``memory_gain`` (empty minus gold) and ``memory_gain_unrelated`` (another document
    of the batch minus gold), nats per answer token."""
    from .trainer import MBCDataCollator, first_row_per_document, memory_gain

    rows, collate = first_row_per_document(dev, n_docs), MBCDataCollator(model)
    parts = [memory_gain(model, collate(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]
    parts = [p for p in parts if "memory_gain_unrelated" in p]  # a last batch of one document has no partner
    return {k: sum(p[k] for p in parts) / len(parts) for k in ("memory_gain", "memory_gain_unrelated")}


def run_demo(train, dev, model_args, data_args, args, demo) -> dict:
    """Train a model for ``args.max_minutes``, then answer one question per dev document from a bank of the dev
    documents, from an empty memory and closed-book. With the embedded default and the package's shipped reader
    (`mbc_hf.pretrained`, trained longer by the command in README) the memory rows use the shipped reader and the
    short training gets a bank row of its own; every row says which model answered. The arguments are those of
    `mbc_hf.arguments` (`ModelArguments`, `DataArguments`, `MBCTrainingArguments`, `DemoArguments`). Writes
    ``demo.output`` (JSON: ``rows`` {closed_book, empty, bank[, bank_short_training]} -> {em, f1, ...},
    ``memory_gain_unrelated``, ``bytes_per_doc``, ``models``) and returns it."""
    from . import pretrained
    from .evaluation import evaluate_base_lm, evaluate_online
    from .factory import model_from_args, split_train_eval
    from .trainer import MBCTrainer

    model = model_from_args(model_args)
    train, held = split_train_eval(train, data_args.eval_docs)
    trainer = MBCTrainer(model=model, args=args, train_dataset=train, eval_dataset=held)
    print(f"meta-training for at most {args.max_minutes} min on {len(train)} questions ...")
    trainer.train()
    model.eval()
    shipped = (model_args.base_model == "embedded" and model_args.codebook_type == "vocabulary"
               and not demo.no_pretrained and pretrained.available())
    reader = pretrained.load() if shipped else model
    name = (f"shipped reader (mbc_hf.pretrained, {reader.config.num_context_tokens} codes/doc)" if shipped
            else f"this run ({trainer.state.global_step} steps)")
    models = {"closed_book": "base LM, KV-LoRA off", "empty": name, "bank": name}
    print(f"adapting on {len(set(dev['doc_id']))} dev documents, answering {len(dev)} questions ...")
    rows = {"closed_book": evaluate_base_lm(reader, dev, lambda r: CLOSED_BOOK.format(question=r["question"])),
            "empty": evaluate_online(reader, dev, adapt=False, show_progress=False),
            "bank": evaluate_online(reader, dev)}
    bank = rows["bank"]["memory_bank"]
    if shipped:
        rows["bank_short_training"] = evaluate_online(model, dev, show_progress=False)
        models["bank_short_training"] = f"this run ({trainer.state.global_step} steps)"
    gain = dev_memory_gain(reader, dev)
    for r in rows.values():
        r.pop("predictions", None), r.pop("memory_bank", None)
    table = [{"row": key, "model": models[key], **r} for key, r in rows.items()]
    print()
    print(markdown_table(table, ["row", "model", "em", "f1", "prefix_em", "query_ms"]))
    print(f"\nmemory gain on the dev documents (answer NLL, {name}): empty minus gold "
          f"{gain['memory_gain']:.4f} nats/token; unrelated minus gold {gain['memory_gain_unrelated']:.4f}")
    print(f"bank: {len(bank)} documents, {bank.nbytes} bytes ({bank.nbytes / len(bank):.1f} bytes/doc, "
          f"{reader.config.num_context_tokens} codes of {math.log2(reader.config.codebook_size):.1f} bits each + "
          "the doc id)")
    record = {"rows": rows, "memory_gain_unrelated": gain["memory_gain_unrelated"],
              "memory_gain": gain["memory_gain"], "bytes_per_doc": bank.nbytes / len(bank), "models": models}
    write_json_report(demo.output or Path(args.output_dir, "demo.json"), record)
    return record
