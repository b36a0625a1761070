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


LEGEND = {
    "closed_book": "closed_book: the base LM answers the question alone (no memory, KV-LoRA off)",
    "empty": "empty: the reader with an empty memory (what it answers from its priors)",
    "bank": "bank: the reader with the bank of the dev documents (addressing picks the documents it reads)",
    "bank_short_training": "bank_short_training: the same bank read by this run's short training",
    "em": "em / f1: SQuAD exact match / token F1 against the references, percent",
    "prefix_em": "prefix_em: the answer starts with the shortest reference (the MBC/MAC papers' EM), percent",
    "query_ms": "query_ms: wall time per question (memory read + generation), milliseconds",
    "gain": "memory gain: answer NLL (nats/token) with an empty memory minus with the gold document (> 0: the "
            "memory is read); unrelated: with another dev document minus with the gold one (> 0: it reads *this* "
            "document)",
}


class _Heartbeat:
    """Prints ``label: N s`` every ``every`` seconds until the block ends (steps without a progress bar)."""

    def __init__(self, label: str, every: float = 30.0):
        import threading

        self.label, self.every, self._stop = label, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import time

        start = time.time()
        while not self._stop.wait(self.every):
            print(f"  ... {self.label}: {time.time() - start:.0f} s", flush=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _OncePerCause:
    """Shows each warning cause once: messages equal up to their numbers (the truncation warning of every row and
    batch) are one cause."""

    def __enter__(self):
        import re
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        seen, show = set(), warnings.showwarning

        def once(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            key = (category, "max_document_length" if "max_document_length" in text else re.sub(r"\d+", "N", text))
            if key not in seen:
                seen.add(key)
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = once
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def run_demo(train, dev, model_args, data_args, args, demo) -> dict:
    """Train a model for ``args.max_steps`` optimizer steps (a budget in steps, not minutes: the table is the same on
    a busy machine), then answer one question per dev document from a bank of the dev documents, from an empty
    memory and closed-book. With the embedded default and the package's shipped reader (`mbc_hf.pretrained`,
    trained longer by the command in README) the memory rows use the shipped reader and the short training gets a
    bank row of its own; every row says which model answered. The arguments are those of `mbc_hf.arguments`
    (`ModelArguments`, `DataArguments`, `MBCTrainingArguments`, `DemoArguments`). Writes ``demo.output`` (JSON:
    ``rows`` {closed_book, empty, bank[, bank_short_training]} -> {em, f1, ...}, ``memory_gain_unrelated``,
    ``bytes_per_doc``, ``models``) and nothing else (no checkpoint), and returns it. Each row prints a line when it
    starts and a progress bar (or a line every 30 s); warnings are shown once per cause."""
    with _OncePerCause():
        return _run_demo(train, dev, model_args, data_args, args, demo)


def _run_demo(train, dev, model_args, data_args, args, demo) -> dict:
    import time

    from . import pretrained
    from .evaluation import evaluate_base_lm, evaluate_online
    from .factory import model_from_args, split_train_eval
    from .trainer import MBCTrainer

    from transformers import set_seed

    set_seed(args.seed)  # the model's random init follows --seed too: the short-training row repeats run to run
    model = model_from_args(model_args)
    train, held = split_train_eval(train, data_args.eval_docs)
    trainer = MBCTrainer(model=model, args=args, train_dataset=train, eval_dataset=held)
    budget = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    if args.max_minutes:
        budget += f" or {args.max_minutes:g} min, whichever comes first"
    print(f"[1/5] meta-training for {budget} of {args.per_device_train_batch_size} questions, on {len(train)} "
          "training questions ...", flush=True)
    with _Heartbeat("meta-training", every=45.0):  # a step can outlast a minute on a busy machine
        trainer.train()
    model.eval()
    shipped = (model_args.base_model == "embedded" and model_args.codebook_type == "vocabulary"
               and not demo.no_pretrained and pretrained.available())
    reader = pretrained.load() if shipped else model
    name = (f"shipped reader (mbc_hf.pretrained, {reader.config.num_context_tokens} codes/doc)" if shipped
            else f"this run ({trainer.state.global_step} steps)")
    models = {"closed_book": "base LM, KV-LoRA off", "empty": name, "bank": name}
    n_docs = len(set(dev["doc_id"]))
    steps = ["closed_book", "empty", "bank"] + (["bank_short_training"] if shipped else [])
    rows = {}
    for i, key in enumerate(steps, 2):
        what = {"closed_book": f"closed-book base LM on {len(dev)} questions",
                "empty": f"{name} with an empty memory, {len(dev)} questions",
                "bank": f"adapting {name} on {n_docs} dev documents, then {len(dev)} questions from the bank",
                "bank_short_training": f"the same with this run's {trainer.state.global_step}-step model"}[key]
        print(f"[{i}/{len(steps) + 2}] {what} ...", flush=True)
        start = time.time()
        if key == "closed_book":
            with _Heartbeat("closed-book answers"):
                rows[key] = evaluate_base_lm(reader, dev, lambda r: CLOSED_BOOK.format(question=r["question"]))
        else:
            with _Heartbeat(key, every=45.0):  # beside the progress bar: a batch can outlast a minute
                rows[key] = evaluate_online(model if key == "bank_short_training" else reader, dev,
                                            adapt=key != "empty", show_progress=True)
        if key == "bank_short_training":
            models[key] = f"this run ({trainer.state.global_step} steps)"
        print(f"      F1 {rows[key]['f1']:.2f}, EM {rows[key]['em']:.2f} ({time.time() - start:.0f} s)", flush=True)
    bank = rows["bank"]["memory_bank"]
    print(f"[{len(steps) + 2}/{len(steps) + 2}] memory gain on 64 dev documents ...", flush=True)
    with _Heartbeat("memory gain"):
        gain = dev_memory_gain(reader, dev)
    for r in rows.values():
        r.pop("predictions", None), r.pop("memory_bank", None)
    table = [{"row": key, "model": models[key], **r} for key, r in rows.items()]
    print()
    print(markdown_table(table, ["row", "model", "em", "f1", "prefix_em", "query_ms"]))
    print("\n".join(["", *(LEGEND[k] for k in rows), *(LEGEND[k] for k in ("em", "prefix_em", "query_ms", "gain"))]))
    print(f"\nmemory gain on the dev documents (answer NLL, {name}): empty minus gold "
          f"{gain['memory_gain']:.4f} nats/token; unrelated minus gold {gain['memory_gain_unrelated']:.4f}")
    print(f"bank: {len(bank)} documents, {bank.nbytes} bytes ({bank.nbytes / len(bank):.1f} bytes/doc, "
          f"{reader.config.num_context_tokens} codes of {math.log2(reader.config.codebook_size):.1f} bits each + "
          "the doc id)")
    record = {"rows": rows, "memory_gain_unrelated": gain["memory_gain_unrelated"],
              "memory_gain": gain["memory_gain"], "bytes_per_doc": bank.nbytes / len(bank), "models": models,
              "training_steps": trainer.state.global_step}
    out = demo.output or Path(args.output_dir, "demo.json")
    write_json_report(out, record)
    print(f"wrote {out}")
    return record
