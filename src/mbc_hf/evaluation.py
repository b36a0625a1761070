"""Online adaptation and QA evaluation (MAC/MBC protocol, method notes §4.1): stream the documents of a QA set into
a memory bank once (no gradients), then answer every question against the final bank and score EM/F1.

Timers (ms): ``adapt_ms_per_doc`` = wall time of `memorize` (tokenization included) / unique documents;
``query_ms`` = wall time of `answer` (aggregation over the bank included, unlike the reference) / questions.
"""

import resource
import time

from .data import documents


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score(predictions: list[str], dataset) -> dict:
    """EM, F1 and the reference code's prefix-EM (percent) of predictions against ``dataset["answers"]``,
    computed by the packaged `evaluate` metric (works offline)."""
    from .metrics import load_metric

    scores = load_metric().compute(predictions=predictions, references=list(dataset["answers"]))
    return {"em": scores["exact_match"], "f1": scores["f1"], "prefix_em": scores["prefix_exact_match"]}


def evaluate_base_lm(model, dataset, prompt, max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Memory-free baselines: the plain base LM answers ``prompt(row)`` for every row (closed-book, or a passage
    in context). Returns `score` plus ``n_questions``, ``query_ms`` and ``predictions``."""
    prompts = [prompt(row) for row in dataset]
    start = time.perf_counter()
    predictions = model.answer_with_base_lm(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    query_ms = (time.perf_counter() - start) * 1000 / max(len(prompts), 1)
    return {**score(predictions, dataset), "n_questions": len(prompts), "query_ms": query_ms,
            "peak_rss_mb": peak_rss_mb(), "predictions": predictions}


def evaluate_online(model, dataset, memory_bank=None, aggregation: str | None = None, compress: bool | None = None,
                    max_new_tokens: int = 16, batch_size: int = 16, show_progress: bool = True,
                    adapt: bool = True) -> dict:
    """Adapt on ``dataset``'s unique documents, answer its questions, return metrics.

    Args:
        model: an `MBCModelForCausalLM`. dataset: rows with ``doc_id, context, question, answers`` (see
            `mbc_hf.data.load_qa_file`). memory_bank: a bank to extend (default: a new one; documents already
            in it are skipped). compress: False = uncompressed `DenseMemoryBank` (VQ bypassed).
            adapt: False answers with ``memory_bank`` as given (e.g. None = empty memory, the memory ablation).

    Returns:
        dict with ``em``, ``f1``, ``prefix_em`` (percent), ``n_docs``, ``n_questions``, ``bank_bytes``,
        ``bytes_per_doc``, ``adapt_ms_per_doc``, ``query_ms``, ``peak_rss_mb``, and ``predictions`` (list[str]).
    """
    docs = documents(dataset) if adapt else []
    start = time.perf_counter()
    bank = memory_bank
    if adapt:
        bank = model.memorize([text for _, text in docs], memory_bank=memory_bank, doc_ids=[i for i, _ in docs],
                              batch_size=batch_size, compress=compress, show_progress=show_progress)
    adapt_ms = (time.perf_counter() - start) * 1000 / max(len(docs), 1)
    questions = list(dataset["question"])
    start = time.perf_counter()
    predictions = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(questions), batch_size), desc="answer", disable=not show_progress):
        predictions += model.answer(questions[i:i + batch_size], memory_bank=bank, aggregation=aggregation,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    query_ms = (time.perf_counter() - start) * 1000 / max(len(questions), 1)
    n_docs, nbytes = (len(bank), bank.nbytes) if bank is not None else (0, 0)
    return {**score(predictions, dataset), "n_docs": n_docs, "n_questions": len(questions), "bank_bytes": nbytes,
            "bytes_per_doc": nbytes / max(n_docs, 1), "adapt_ms_per_doc": adapt_ms, "query_ms": query_ms,
            "peak_rss_mb": peak_rss_mb(), "predictions": predictions, "memory_bank": bank}
