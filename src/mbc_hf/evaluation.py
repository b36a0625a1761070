"""Online adaptation and QA evaluation (MAC/MBC protocol, method notes §4.1): stream the documents of a QA set into
a memory bank once (no gradients), then answer every question against the final bank and score EM/F1.

* `evaluate_online`: adapt on a QA set's documents, answer its questions, score them.
* `retention_curve` / `write_retention`: MAC's forgetting measurement (F1 on the first documents' questions while
  more documents stream into the same bank), as rows, a CSV and a PNG plot.
* `adapt_stream`: memorize an unbounded stream of documents (e.g. a `datasets.IterableDataset`) in batches, with
  optional atomic checkpoints of the bank.
* `relevances` / `abstention_rates` / `calibrate_abstention`: abstention (``MBCConfig.relevance_threshold``, a
  vocabulary codebook): a bank of half a QA set's documents, the relevance of every question's best document, and
  the threshold that wrongly flags at most a given share of the answerable questions (addressing only, no
  generation).

Timers (ms): ``adapt_ms_per_doc`` = wall time of `memorize` (tokenization included) / unique documents;
``query_ms`` = wall time of `answer` (aggregation over the bank included, unlike the reference) / questions.
"""

import csv
import io
import math
import resource
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from .atomic import atomic_write
from .data import EmptyDocumentWarning, document_id, documents, first_questions
from .modeling_mbc import lone_surrogate_at

#: Columns of the rows returned by `retention_curve`, in the order they are written to ``retention.csv``.
RETENTION_COLUMNS = ("reader", "n_docs", "n_questions", "em", "f1", "prefix_em", "retention", "bank_docs",
                     "bank_bytes")


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
    predictions = model.answer(questions, memory_bank=bank, aggregation=aggregation, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, show_progress=show_progress)
    query_ms = (time.perf_counter() - start) * 1000 / max(len(questions), 1)
    n_docs, nbytes = (len(bank), bank.nbytes) if bank is not None else (0, 0)
    return {**score(predictions, dataset), "n_docs": n_docs, "n_questions": len(questions), "bank_bytes": nbytes,
            "bytes_per_doc": nbytes / max(n_docs, 1), "adapt_ms_per_doc": adapt_ms, "query_ms": query_ms,
            "peak_rss_mb": peak_rss_mb(), "predictions": predictions, "memory_bank": bank}


def _check_count(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _select(dataset, indices: list[int]):
    """Rows ``indices`` of a `datasets.Dataset` (``select``) or of a dict of lists."""
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return {column: [values[i] for i in indices] for column, values in dataset.items()}


def retention_curve(model, dataset, first: int = 200, step: int = 200, until: int | None = 1600,
                    max_questions_per_doc: int | None = None, compress: bool | None = None,
                    aggregation: str | None = None, max_new_tokens: int = 16, batch_size: int = 16,
                    show_progress: bool = True, hybrid: bool = False) -> list[dict]:
    """MAC's forgetting measurement: F1 on the questions of the first documents while more documents stream in.

    The unique documents of ``dataset`` are taken in file order (`mbc_hf.data.documents`). The model memorizes the
    first ``first`` of them into a new bank and answers the questions of those documents (at most
    ``max_questions_per_doc`` per document, the first ones in file order); then it keeps memorizing the following
    documents into the SAME bank and answers the SAME questions again after every ``step`` further documents, up to
    ``until`` documents or the end of the stream (the last point is measured even when it is not a multiple of
    ``step`` past ``first``). Answering never changes the bank or the model.

    With ``hybrid=True`` every measurement is taken twice: by the bank alone (``reader="bank"``) and in hybrid
    reading (``reader="hybrid"``: `MBCModelForCausalLM.answer` with a `TextStore` that holds the full text of the
    same documents streamed so far, whose BM25 top-1 passage goes in the prompt; issue 36's retention curve).

    Args:
        model: an `MBCModelForCausalLM`.
        dataset: rows with ``doc_id, context, question, answers`` (a `datasets.Dataset` from
            `mbc_hf.data.load_qa_file`, or a dict of equal-length lists).
        first, step: documents (counts, not bytes). until: last document count to measure (``None``: all).
        max_questions_per_doc: cap on the measured questions per document (``None``: all of them).
        compress: ``False`` uses an uncompressed `DenseMemoryBank` (MAC-style; default: the model's setting).
        aggregation, max_new_tokens, batch_size: as in `evaluate_online`.
        hybrid: also measure hybrid reading (above).

    Returns:
        One dict per measurement and reader, keys `RETENTION_COLUMNS`: ``reader`` ("bank" or "hybrid"), ``n_docs``
        (int, documents of the stream memorized so far), ``n_questions`` (int, the same at every row),
        ``em``/``f1``/``prefix_em`` (float, percent), ``retention`` (float, ``f1 / f1 of the reader's first row *
        100``, so 100.0 on its first row; NaN on every row of a reader whose first F1 is 0, since the ratio is
        undefined), ``bank_docs`` (int, rows in the bank) and ``bank_bytes`` (int, `bank.nbytes`: codes plus
        doc-id bytes).

    Raises:
        ValueError: ``first``/``step``/``until``/``max_questions_per_doc`` not positive ints, ``until < first``, or
            fewer than ``first`` unique documents in ``dataset``. Errors of `memorize`/`answer` propagate (e.g. empty
            documents, which `load_qa_file` already drops).
    """
    for value, name in ((first, "first"), (step, "step")):
        _check_count(value, name)
    _check_count(until, "until", allow_none=True)
    _check_count(max_questions_per_doc, "max_questions_per_doc", allow_none=True)
    if until is not None and until < first:
        raise ValueError(f"until={until} is smaller than first={first}")
    docs = documents(dataset)
    if len(docs) < first:
        raise ValueError(f"the dataset has {len(docs)} unique documents, fewer than first={first}; "
                         "lower --retention-first or use a larger file")
    end = len(docs) if until is None else min(until, len(docs))
    points = list(range(first, end + 1, step))
    if points[-1] != end:
        points.append(end)

    subset = _select(dataset, first_questions(dataset, first, max_questions_per_doc))
    questions = list(subset["question"])

    rows: list[dict] = []
    bank, done, first_f1 = None, 0, {}
    readers = {"bank": None}  # reader -> the text store it reads beside the bank
    if hybrid:
        from .text_store import TextStore

        readers["hybrid"] = TextStore()  # in memory: the texts of the documents streamed so far
    try:
        for n in points:
            chunk = docs[done:n]
            bank = model.memorize([text for _, text in chunk], memory_bank=bank, doc_ids=[i for i, _ in chunk],
                                  batch_size=batch_size, compress=compress, show_progress=False)
            if hybrid:
                readers["hybrid"].add([i for i, _ in chunk], [text for _, text in chunk])
            done = n
            for reader, text_store in readers.items():
                predictions = model.answer(questions, memory_bank=bank, aggregation=aggregation,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           show_progress=show_progress, text_store=text_store)
                scores = score(predictions, subset)
                base = first_f1.setdefault(reader, scores["f1"])
                rows.append({"reader": reader, "n_docs": n, "n_questions": len(questions), "em": scores["em"],
                             "f1": scores["f1"], "prefix_em": scores["prefix_em"],
                             "retention": scores["f1"] / base * 100 if base > 0 else math.nan,
                             "bank_docs": len(bank), "bank_bytes": bank.nbytes})
    finally:
        if hybrid:
            readers["hybrid"].close()
    return rows


def write_retention(rows: list[dict], output_dir, title: str | None = None) -> tuple[Path, Path]:
    """Write `retention_curve` rows as ``retention.csv`` (header `RETENTION_COLUMNS`, one line per row; NaN written
    as ``nan``) and ``retention.png`` (F1 retention in percent, solid, and F1, dashed, against documents streamed;
    one colour per reader) in
    ``output_dir`` (created if missing). Each file is written to a temporary file and renamed into place, so a reader
    never sees a partial file. Needs matplotlib (``pip install matplotlib``; no pyplot state is touched).

    Returns:
        (csv path, png path).

    Raises:
        ValueError: no rows, or a row lacks one of `RETENTION_COLUMNS`. ImportError: matplotlib is missing.
    """

    if not rows:
        raise ValueError("no retention rows to write")
    for i, row in enumerate(rows):
        missing = [c for c in RETENTION_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"retention row {i} lacks {missing}; expected the columns {RETENTION_COLUMNS}")
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("write_retention needs matplotlib for retention.png: pip install matplotlib") from exc
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_dir / "retention.csv", output_dir / "retention.png"

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RETENTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(str(csv_path), lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")  # Agg canvas by default; no pyplot, no global backend
    ax = fig.subplots()
    f1_axis = ax.twinx()
    readers = list(dict.fromkeys(r["reader"] for r in rows))
    for reader, colour in zip(readers, ("tab:blue", "tab:green", "tab:purple", "tab:red")):
        mine = [r for r in rows if r["reader"] == reader]
        n_docs = [r["n_docs"] for r in mine]
        ax.plot(n_docs, [r["retention"] for r in mine], marker="o", color=colour, label=f"{reader}: retention (%)")
        f1_axis.plot(n_docs, [r["f1"] for r in mine], marker="s", linestyle="--", color=colour,
                     label=f"{reader}: F1")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("documents streamed into the bank")
    ax.set_ylabel("F1 retention (% of the first measurement), solid")
    f1_axis.set_ylabel("F1 (%), dashed")
    # axes from 0, so that a flat curve looks flat (auto-scaling blows a 0.1-point wobble up to the full height)
    finite = [r["retention"] for r in rows if r["retention"] == r["retention"]]
    ax.set_ylim(0, max([110.0, *finite]) * 1.05)
    f1_axis.set_ylim(0, max(1.0, *(r["f1"] for r in rows)) * 1.2)
    handles = [h for h in ax.get_lines() if not h.get_label().startswith("_")] + f1_axis.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title(title or f"Retention on the questions of the first {rows[0]['n_docs']} documents "
                          f"({rows[0]['n_questions']} questions)", fontsize=10)
    atomic_write(str(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return csv_path, png_path


def _stream_item(item, position: int, text_column: str, id_column: str | None) -> tuple[str, str]:
    """(doc_id, text) of one stream item; raises naming its position."""
    if isinstance(item, str):
        text, doc_id = item, None
    elif isinstance(item, tuple) and len(item) == 2:
        doc_id, text = item
    elif isinstance(item, Mapping):
        if text_column not in item:
            raise ValueError(f"stream item {position} has no column {text_column!r} (columns: {sorted(item)}); "
                             "pass text_column= the name of the document-text column")
        text = item[text_column]
        if id_column is None:
            doc_id = None
        elif id_column not in item:
            raise ValueError(f"stream item {position} has no column {id_column!r} (columns: {sorted(item)}); pass "
                             "id_column=None to use the SHA-1 document_id of the text")
        else:
            doc_id = item[id_column]
    else:
        raise TypeError(f"stream item {position} is a {type(item).__name__}; expected a str, a (doc_id, text) tuple "
                        "or a mapping with a text column")
    if not isinstance(text, str):
        raise TypeError(f"stream item {position}: the document text is {type(text).__name__}, not str")
    if (at := lone_surrogate_at(text)) is not None:
        raise ValueError(f"stream item {position}: the document text is not valid Unicode (a lone surrogate at "
                         f"character {at}); clean it before memorizing")
    if doc_id is None:
        return (document_id(text) if text.strip() else ""), text
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
        raise TypeError(f"stream item {position}: doc id {doc_id!r} must be a non-empty str or an int")
    return str(doc_id), text


def adapt_stream(model, stream: Iterable, memory_bank=None, *, batch_size: int = 32, text_column: str = "context",
                 id_column: str | None = None, compress: bool | None = None, on_duplicate: str = "skip",
                 show_progress: bool = True, save_every: int | None = None, bank_path=None,
                 total: int | None = None):
    """Memorize a stream of documents into a memory bank, ``batch_size`` at a time (online adaptation, no gradient).

    Only the current batch of texts is held in memory: the stream is read lazily (a `datasets.IterableDataset`,
    e.g. ``load_dataset("json", data_files=..., streaming=True)["train"]``, a generator, a list...). The codes are the
    ones `model.memorize` gives for the same documents (memorize is batch-invariant).

    Args:
        model: an `MBCModelForCausalLM`.
        stream: items that are either a str (the text), a ``(doc_id, text)`` tuple (what
            `mbc_hf.data.load_documents_file` returns) or a mapping (a dataset row) holding the text under
            ``text_column`` and, when ``id_column`` is set, the id under ``id_column`` (str or int).
        memory_bank: a bank to extend in place (default: a new one, compressed unless ``compress=False``).
        id_column: ``None`` = the id is `document_id(text)` (SHA-1 prefix), as in `memorize`.
        on_duplicate: ``"skip"`` (default): an id already in the bank or earlier in the stream is not encoded again
            (first occurrence wins; e.g. a QA dataset with one row per question gives one row per document).
            ``"overwrite"`` / ``"fail"``: as in `memorize` (with ``"fail"`` the batches before the duplicate stay
            stored).
        save_every: with ``bank_path``, save the bank (atomically, `bank.save`) each time at least this many new
            documents were stored since the last save, and once at the end; a killed run leaves the last complete
            checkpoint, and running again on the same stream with that bank resumes (stored ids are skipped).
        bank_path: where to save the bank at the end (and at checkpoints). ``None``: not saved.
        total: number of items, for the progress bar only (default: ``len(stream)`` when defined).

    Empty or whitespace-only texts are skipped; one `EmptyDocumentWarning` at the end counts them.

    Returns:
        The bank (``memory_bank`` itself when given).

    Raises:
        ValueError: ``batch_size``/``save_every`` not positive ints, ``save_every`` without ``bank_path``, a bank
            built with another codebook (checked before reading the stream), an item without the text/id column, a
            text with lone surrogates. TypeError: an item of another type, a non-str text, an id that is not a
            non-empty str or int. Errors of `memorize` and `bank.save` propagate; stored documents stay in
            ``memory_bank``.
    """
    _check_count(batch_size, "batch_size")
    _check_count(save_every, "save_every", allow_none=True)
    if save_every is not None and bank_path is None:
        raise ValueError("save_every needs bank_path (where to write the checkpoints)")
    if memory_bank is None:
        memory_bank = model.new_memory_bank(compress)
    model.memorize([], memory_bank=memory_bank)  # validates the bank against this model's codebook, stores nothing
    if total is None:
        try:
            total = len(stream)
        except TypeError:  # generators, IterableDataset
            total = None
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc="memorize", unit="doc", disable=not show_progress)
    ids: list[str] = []
    texts: list[str] = []
    pending: set[str] = set()
    n_empty = stored_since_save = 0
    saved = False  # the file at bank_path holds the bank as it is now

    def flush() -> None:
        nonlocal stored_since_save, saved
        if not texts:
            return
        before = len(memory_bank)
        model.memorize(texts, memory_bank=memory_bank, doc_ids=ids, batch_size=batch_size, compress=compress,
                       on_duplicate=on_duplicate)
        stored_since_save += len(memory_bank) - before if on_duplicate == "skip" else len(texts)
        ids.clear()
        texts.clear()
        pending.clear()
        saved = saved and stored_since_save == 0
        if save_every is not None and stored_since_save >= save_every:
            memory_bank.save(bank_path)
            stored_since_save, saved = 0, True

    for position, item in enumerate(stream):
        progress.update(1)
        doc_id, text = _stream_item(item, position, text_column, id_column)
        if not text.strip():
            n_empty += 1
            continue
        if on_duplicate == "skip" and (doc_id in pending or doc_id in memory_bank):
            continue
        pending.add(doc_id)
        ids.append(doc_id)
        texts.append(text)
        if len(texts) >= batch_size:
            flush()
            progress.set_postfix(bank=len(memory_bank), refresh=False)
    flush()
    progress.set_postfix(bank=len(memory_bank))
    progress.close()
    if bank_path is not None and not saved:
        memory_bank.save(bank_path)
    if n_empty:
        warnings.warn(f"adapt_stream: skipped {n_empty} empty or whitespace-only document(s)", EmptyDocumentWarning,
                      stacklevel=2)
    return memory_bank


def relevances(model, questions: list[str], memory_bank, batch_size: int = 64):
    """(n,) float64 numpy array: each question's relevance (`mbc_hf.addressing.relevance`; with the compact key on
    and a bank with keys, the best document's fused score, `mbc_hf.compact_key`; a learned codebook with the key: the
    key similarity) to its best document of ``memory_bank`` (a non-empty bank of a model that addresses).
    Addressing only, no generation.

    Raises:
        ValueError: a model without addressing, or an empty bank.
    """
    import numpy as np

    model.reader.check_addressing()
    if memory_bank is None or not len(memory_bank):
        raise ValueError("relevances needs a non-empty bank: with no document every question is not grounded.")
    memory, out = model.memory_from_bank(memory_bank), []
    for start in range(0, len(questions), batch_size):
        q = model.encode_questions(list(questions[start:start + batch_size]))
        scores, _ = model.read_documents(q["question_input_ids"], q["question_attention_mask"], memory, k=1)
        out.append(model.reader.relevance(q["question_input_ids"], q["question_attention_mask"], scores[:, 0],
                                          memory).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _article(doc_id: str) -> str:
    return doc_id.rsplit("#", 1)[0] if "#" in doc_id else doc_id


def abstention_rates(model, dataset, threshold: float | None = None, by: str = "article", batch_size: int = 64
                     ) -> dict:
    """How abstention splits a QA set: half its documents go in a bank, and the questions about them (answerable)
    and about the others (absent: their document is not in the bank) are addressed against it.

    Args:
        model: a vocabulary-codebook `MBCModelForCausalLM`. dataset: rows with ``doc_id, context, question``.
        threshold: the relevance threshold to measure (default ``model.config.relevance_threshold``; None: only the
            relevances are returned).
        by: "article": every other article goes in the bank (an article is the doc id before its last "#", as
            in SQuAD paragraph ids "Title#3"; an id without "#" is its own article), so an absent question's topic
            is in no stored document; "document": every other document, so the other paragraphs of an absent
            question's article are in the bank (harder).

    Returns:
        dict: ``n_bank_docs``, ``n_answerable``, ``n_absent``, ``answerable_relevance`` / ``absent_relevance``
        (numpy arrays) and, with a threshold, ``threshold``, ``absent_flagged`` (share of absent questions flagged
        not grounded) and ``answerable_flagged`` (share of answerable ones wrongly flagged).
    """
    import numpy as np

    if by not in ("article", "document"):
        raise ValueError(f"by={by!r}: use 'article' or 'document'.")
    docs = documents(dataset)
    if by == "article":
        order = list(dict.fromkeys(_article(i) for i, _ in docs))
        kept = set(order[::2])
        stored = [(i, t) for i, t in docs if _article(i) in kept]
    else:
        stored = docs[::2]
    texts = {t for _, t in stored}
    if not stored or len(stored) == len(docs):
        raise ValueError(f"abstention_rates needs at least two {'articles' if by == 'article' else 'documents'} "
                         "(one in the bank, one left out).")
    bank = model.memorize([t for _, t in stored], doc_ids=[i for i, _ in stored], batch_size=batch_size)
    questions, contexts = list(dataset["question"]), list(dataset["context"])
    rel = relevances(model, questions, bank, batch_size)
    answerable = np.array([c in texts for c in contexts], dtype=bool)
    out = {"by": by, "n_bank_docs": len(stored), "n_answerable": int(answerable.sum()),
           "n_absent": int((~answerable).sum()), "answerable_relevance": rel[answerable],
           "absent_relevance": rel[~answerable]}
    threshold = model.config.relevance_threshold if threshold is None else threshold
    if threshold is not None:
        out.update(threshold=float(threshold),
                   answerable_flagged=float(np.mean(out["answerable_relevance"] < threshold)),
                   absent_flagged=float(np.mean(out["absent_relevance"] < threshold)))
    return out


def calibrate_abstention(model, dataset, max_flagged: float = 0.05, by: str = "article", batch_size: int = 64
                         ) -> dict:
    """Calibrate ``MBCConfig.relevance_threshold`` on training data: the threshold that wrongly flags at most
    ``max_flagged`` of the answerable questions (`mbc_hf.addressing.calibrate_threshold`) in the split of
    `abstention_rates`, with the shares it flags there. Does not change the model: set
    ``model.config.relevance_threshold = result["threshold"]`` (it then saves with the model).
    """
    from .addressing import calibrate_threshold

    rates = abstention_rates(model, dataset, threshold=None, by=by, batch_size=batch_size)
    rates.pop("threshold", None)
    threshold = calibrate_threshold(rates["answerable_relevance"], max_flagged)
    return {**rates, "max_flagged": max_flagged, "threshold": threshold,
            "answerable_flagged": float((rates["answerable_relevance"] < threshold).mean()),
            "absent_flagged": float((rates["absent_relevance"] < threshold).mean())}
