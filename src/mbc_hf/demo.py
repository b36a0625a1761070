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


def run_demo(train, dev, a) -> list[dict]:
    from .cli import build_from_args, make_trainer, split_train_eval
    from .evaluation import evaluate_base_lm, evaluate_online

    model = build_from_args(a)
    train, held = split_train_eval(train, a.eval_docs)
    trainer = make_trainer(a, model, train, held, save_strategy="no", eval_strategy="no", disable_tqdm=False)
    print(f"meta-training for at most {a.max_minutes} min on {len(train)} questions ...")
    trainer.train()
    gain = trainer.evaluate()
    model.eval()
    print(f"adapting on {len(set(dev['doc_id']))} dev documents, answering {len(dev)} questions ...")
    mbc = evaluate_online(model, dev)
    bank = mbc.pop("memory_bank")
    empty = evaluate_online(model, dev, adapt=False, show_progress=False)
    closed = evaluate_base_lm(model, dev, lambda r: CLOSED_BOOK.format(question=r["question"]))
    d = model.config.text_config.get_text_config().hidden_size
    uncompressed = len(bank) * model.config.num_context_tokens * d * 4  # fp32 [N, T, d], as MAC stores it
    rows = [{"row": "closed-book base LM", **closed},
            {"row": "MBC, empty memory (ablation)", **empty},
            {"row": "MBC, compressed bank", **mbc}]
    for r in rows:
        r.pop("predictions", None), r.pop("memory_bank", None)
    cols = ["row", "em", "f1", "prefix_em", "query_ms"]
    print()
    print(markdown_table(rows, cols))
    print(f"\nmemory gain (answer NLL, empty minus gold document): {gain.get('eval_memory_gain', float('nan')):.4f} "
          f"nats/token; unrelated minus gold: {gain.get('eval_memory_gain_unrelated', float('nan')):.4f}")
    print(f"bank: {len(bank)} documents, {bank.nbytes} bytes ({bank.nbytes / len(bank):.1f} bytes/doc); an "
          f"uncompressed fp32 bank of the same vectors: {uncompressed} bytes ({uncompressed / len(bank):.0f} "
          f"bytes/doc), ratio {bank.nbytes / uncompressed:.2%}")
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    Path(a.output_dir, "demo_metrics.json").write_text(json.dumps({"rows": rows, "memory_gain": gain}, indent=2))
    return rows
