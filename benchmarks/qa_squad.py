"""SQuAD document-QA benchmark: MBC against its ablations and against in-context baselines, in one table.

Every row is measured in the same run, on the same questions (the first N unique documents of the file, in file
order, as ``mbc_hf.data.load_qa_file(path, downsample_to=N)``), and each row runs in its own child process
(``multiprocessing`` "spawn"), so that its peak RSS is its own:

    closed_book  closed-book base LM: KV-LoRA off, no prefix, question only   (model.answer_with_base_lm)
    empty        MBC reading an empty memory (memory ablation)                 (evaluate_online(adapt=False))
    mbc          MBC, compressed bank, histogram aggregation                  (evaluate_online(aggregation="histogram"))
    unrelated    MBC reading a compressed bank of as many other documents (the file's last ones, none asked about):
                 is it the right documents that help, or any memory?
    dense        the same model with the VQ bypassed: uncompressed MAC-style DenseMemoryBank, dense aggregation
    bm25         BM25 top-1 passage (bm25s through `mbc_hf.text_store.TextStore` over the stream's unique
                 documents) in the base LM's prompt
    rag          the same passage and prompt, read by the base LM with the LoRA adapter of
                 ``train_passage_reader.py`` (``--passage-reader DIR``; the fair RAG row: same budget as MBC's reader)
    gold         gold passage in the base LM's prompt (upper bound)
    hybrid       the BM25 top-1 passage in the prompt on top of the bank's prefix, read by ``--model``'s reader
    hybrid_trained, bank_hybrid_reader
                 the same hybrid reading, and the bank alone, read by the reader of ``--hybrid-model DIR`` (trained
                 with ``--hybrid-passages``: passage + addressed codes in every training batch; issue 36 item 1)

Usage::

    python benchmarks/qa_squad.py --model runs/X \\
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --downsample-to 200 \\
        --output-dir benchmarks/results

``--model`` is a saved MBC checkpoint, ``tiny`` (random tiny model, smoke tests) or ``embedded-untrained``
(SmolLM2-135M-Instruct + all-MiniLM-L6-v2 with untrained MBC modules: only the closed_book/bm25/gold rows mean
anything). Writes ``results.json``, ``results.md`` and ``predictions.jsonl`` to ``--output-dir`` and prints the
markdown table.

The parent process deliberately imports neither torch nor transformers: a spawned child starts with the peak RSS
of its parent already on its books (Linux carries the high-water mark across fork/exec), so a heavy parent would
inflate every row's peak RSS. ``parent_peak_rss_mib`` in results.json is that floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

ROWS = {
    "closed_book": "closed-book base LM (no memory)",
    "empty": "MBC, empty memory (ablation)",
    "mbc": "MBC, compressed bank (histogram)",
    "mbc_k1": "MBC, compressed bank, reading the top-1 document only",
    "oracle": "MBC, oracle addressing (the gold document's codes alone)",
    "unrelated": "MBC, compressed bank of unrelated documents (ablation)",
    "bank_t12": "MBC, compressed bank, T=12 codes per document (same reader)",
    "bank_t24": "MBC, compressed bank, T=24 codes per document (same reader)",
    "bank_t96": "MBC, compressed bank, T=96 codes per document (same reader)",
    "bank_t192": "MBC, compressed bank, T=192 codes per document (same reader)",
    "mbc_key": "MBC, compressed bank + a 48-byte compact key per document (addressing fused with the key)",
    "dense": "MBC, VQ bypassed (dense MAC-style bank)",
    "bm25": "BM25 top-1 passage in context",
    "rag": "BM25 top-1 passage in context, read by a reader trained on passages (LoRA, same budget)",
    "hybrid": "hybrid: BM25 top-1 passage in the prompt + the bank (same reader)",
    "hybrid_trained": "hybrid: BM25 top-1 passage + the bank, read by a reader trained hybrid (same budget)",
    "bank_hybrid_reader": "MBC, compressed bank alone, read by the reader trained hybrid",
    "gold": "gold passage in context (upper bound)",
}
# rows that need addressing, i.e. a vocabulary codebook (a learned codebook reads the whole bank's histogram)
VOCABULARY_ROWS = ("mbc_k1", "oracle", "bank_t12", "bank_t24", "bank_t96", "bank_t192", "mbc_key", "hybrid",
                   "hybrid_trained", "bank_hybrid_reader")
HYBRID_ROWS = ("hybrid", "hybrid_trained")  # rows with a text store beside the bank
HYBRID_MODEL_ROWS = ("hybrid_trained", "bank_hybrid_reader")  # rows read by --hybrid-model
PROMPT_STYLES = ("chat-short", "plain")
TINY, EMBEDDED_UNTRAINED = "tiny", "embedded-untrained"

PLAIN_CONTEXT = "Context: {passage}\nQuestion: {question}\nAnswer:"
PLAIN_CLOSED = "Question: {question}\nAnswer:"

SYSTEM_CONTEXT = ("You answer questions about a passage. Reply with only the shortest phrase from the passage that "
                  "answers the question, copied word for word: no full sentence, no explanation.")
SYSTEM_CLOSED = ("You answer questions. Reply with only the shortest phrase that answers the question (a name, "
                 "number, date or a few words): no full sentence, no explanation.")
# One-shot example (not from SQuAD, so nothing leaks into the evaluation).
EXAMPLE_PASSAGE = ("The Eiffel Tower was completed in 1889 as the entrance arch of the World's Fair in Paris. It was "
                   "designed and built by the engineering company of Gustave Eiffel and is about 330 metres tall.")
EXAMPLE_QUESTION = "Whose company built the Eiffel Tower?"
EXAMPLE_ANSWER = "Gustave Eiffel"
CHAT_CONTEXT_USER = "Passage: {passage}\nQuestion: {question}"
CHAT_CLOSED_USER = "Question: {question}"

COLUMNS = {  # table header -> results key
    "row": "label", "prompt": "prompt", "EM": "em", "F1": "f1", "prefix-EM": "prefix_em",
    "bank bytes/doc": "bytes_per_doc", "adapt ms/doc": "adapt_ms_per_doc", "query ms": "query_ms",
    "code bytes/doc": "code_bytes_per_doc", "key bytes/doc": "key_bytes_per_doc", "id bytes/doc": "id_bytes_per_doc",
    "peak RSS MiB": "peak_rss_mib", "top-1 addressing acc": "retrieval_top1", "top-3 addressing acc": "retrieval_top3",
}


def peak_rss_mib() -> float:
    """Peak RSS of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------- prompts
class PromptBuilder:
    """Base-LM prompts for the closed-book and in-context rows.

    ``plain``: ``Context: {passage}\\nQuestion: {question}\\nAnswer:`` (closed-book: ``Question: ...\\nAnswer:``).
    ``chat-short``: the tokenizer's chat template with a system message asking for the shortest answer phrase
    copied from the passage and a one-shot example as a prior user/assistant turn (closed-book: the same without
    a passage). Falls back to ``plain`` with a warning when the tokenizer has no chat template. Passages are
    truncated to ``passage_tokens`` LM tokens.
    """

    def __init__(self, tokenizer, style: str = "chat-short", passage_tokens: int = 350):
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {style!r} is not one of {PROMPT_STYLES}")
        if style == "chat-short" and getattr(tokenizer, "chat_template", None) is None:
            warnings.warn("the LM tokenizer has no chat template; using the 'plain' prompt instead of 'chat-short'",
                          stacklevel=2)
            style = "plain"
        self.tokenizer, self.style, self.passage_tokens = tokenizer, style, passage_tokens
        self.truncated = 0  # passages cut so far
        self._cache: dict[str, str] = {}
        # answer_with_base_lm tokenizes with the tokenizer's special tokens; if it prepends BOS itself, drop the
        # BOS the chat template writes, so it is not there twice
        bos = tokenizer.bos_token
        ids = tokenizer("x")["input_ids"]
        self._strip_bos = bool(bos) and tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]

    def passage(self, text: str) -> str:
        """``text`` cut to its first ``passage_tokens`` LM tokens."""
        if text not in self._cache:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.passage_tokens:
                self.truncated += 1
                text_out = self.tokenizer.decode(ids[:self.passage_tokens], skip_special_tokens=True).strip()
            else:
                text_out = text
            self._cache[text] = text_out
        return self._cache[text]

    def __call__(self, question: str, passage: str | None = None) -> str:
        question = question.strip()
        if self.style == "plain":
            if passage is None:
                return PLAIN_CLOSED.format(question=question)
            return PLAIN_CONTEXT.format(passage=self.passage(passage), question=question)
        if passage is None:
            messages = [{"role": "system", "content": SYSTEM_CLOSED},
                        {"role": "user", "content": CHAT_CLOSED_USER.format(question=EXAMPLE_QUESTION)},
                        {"role": "assistant", "content": EXAMPLE_ANSWER},
                        {"role": "user", "content": CHAT_CLOSED_USER.format(question=question)}]
        else:
            messages = [{"role": "system", "content": SYSTEM_CONTEXT},
                        {"role": "user", "content": CHAT_CONTEXT_USER.format(passage=EXAMPLE_PASSAGE,
                                                                             question=EXAMPLE_QUESTION)},
                        {"role": "assistant", "content": EXAMPLE_ANSWER},
                        {"role": "user", "content": CHAT_CONTEXT_USER.format(passage=self.passage(passage),
                                                                             question=question)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self._strip_bos and text.startswith(self.tokenizer.bos_token):
            text = text[len(self.tokenizer.bos_token):]
        return text


# ----------------------------------------------------------------------------------------------------- child side
def load_model(spec: str, seed: int = 0, **config):
    """``tiny`` | ``embedded-untrained`` | a saved MBC checkpoint (``AutoModelForCausalLM.from_pretrained``), with
    ``config`` overriding fields of its `MBCConfig` (e.g. ``addressing_key``)."""
    import torch

    torch.manual_seed(seed)  # untrained MBC modules get the same weights in every child
    if spec == TINY:
        from mbc_hf.testing import tiny_mbc_model

        model = tiny_mbc_model(seed=seed, **config)
    elif spec == EMBEDDED_UNTRAINED:
        from mbc_hf.factory import build_model

        model = build_model(freeze_encoders=True, **config)
    else:
        import mbc_hf  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, **config)
    return model.eval()


def _base_lm_row(model, ds, stream, opts: dict, name: str) -> dict:
    from mbc_hf.data import documents
    from mbc_hf.evaluation import score

    build = PromptBuilder(model.tokenizer, opts["prompt"], opts["passage_tokens"])
    questions, gold = list(ds["question"]), list(ds["context"])
    docs = documents(stream)
    out = {"prompt": build.style, "adapt_ms_per_doc": 0.0, "bytes_per_doc": 0.0}
    if name in ("bm25", "rag", "gold"):  # the stored text: full passages, UTF-8
        out["bytes_per_doc"] = sum(len(t.encode("utf-8")) for _, t in docs) / max(len(docs), 1)
    passages, extra_ms = [None] * len(questions), 0.0
    if name == "gold":
        passages = gold
    elif name in ("bm25", "rag"):
        start = time.perf_counter()
        store = _text_store(docs)
        out["adapt_ms_per_doc"] = (time.perf_counter() - start) * 1000 / max(len(docs), 1)
        start = time.perf_counter()
        top3 = [ids for ids, _ in store.search(questions, k=3)]
        extra_ms = (time.perf_counter() - start) * 1000  # retrieval counts as query time
        text = dict(docs)
        passages = [text[t[0]] if t else "" for t in top3]
        out["retrieved_doc_ids"] = [t[0] if t else None for t in top3]
        out.update(_accuracy(top3, ds["doc_id"]))
    reader = passage_reader(opts["passage_reader"]) if name == "rag" else None  # loading is not query time
    start = time.perf_counter()
    prompts = [build(q, p) for q, p in zip(questions, passages)]
    if reader is not None:
        from mbc_hf.modeling_mbc import complete_prompts

        predictions = complete_prompts(reader, model.tokenizer, prompts, opts["max_new_tokens"], opts["batch_size"])
    else:
        predictions = model.answer_with_base_lm(prompts, max_new_tokens=opts["max_new_tokens"],
                                                batch_size=opts["batch_size"])
    out["query_ms"] = ((time.perf_counter() - start) * 1000 + extra_ms) / max(len(questions), 1)
    out["passages_truncated"] = build.truncated
    out["example_prompt"] = prompts[0] if prompts else ""
    return {**out, **score(predictions, ds), "predictions": predictions}


def passage_reader(path: str):
    """The base LM with the LoRA adapter that ``train_passage_reader.py`` wrote to ``path`` (its base model is the
    one named in ``path/training.json``, ``embedded`` resolved to the packaged SmolLM2)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mbc_hf.embedded import resolve

    base = json.loads((Path(path) / "training.json").read_text())["base_model"]
    lm = AutoModelForCausalLM.from_pretrained(resolve(base, "base"), dtype=torch.float32)
    return PeftModel.from_pretrained(lm, path).eval()


def _text_store(docs: list[tuple[str, str]]):
    """An in-memory `mbc_hf.text_store.TextStore` of (doc_id, text) pairs with its BM25 index (bm25s) built, so the
    build counts as adaptation time, not query time: the BM25 of the bm25/rag rows and of hybrid reading."""
    from mbc_hf.text_store import TextStore

    store = TextStore()
    store.add([d for d, _ in docs], [t for _, t in docs])
    store.search(["index"], k=1)  # the first search builds the index
    return store


def _accuracy(ranked: list[list[str]], gold: list[str]) -> dict:
    """Top-1 and top-3 addressing accuracy: the share of questions whose gold doc id is first / among the first 3
    of ``ranked``."""
    n = max(len(gold), 1)
    return {"retrieval_top1": sum(bool(r) and r[0] == g for r, g in zip(ranked, gold)) / n,
            "retrieval_top3": sum(g in r[:3] for r, g in zip(ranked, gold)) / n}


def _bank_bytes(bank) -> dict:
    """Bytes per document of a bank: all (``nbytes``), of its codes (or vectors), of its compact keys, and of its
    doc ids."""
    if bank is None or not len(bank):
        return {"bytes_per_doc": 0.0, "code_bytes_per_doc": 0.0, "key_bytes_per_doc": 0, "id_bytes_per_doc": 0.0,
                "bank_bytes": 0}
    rows = bank.codes if hasattr(bank, "codes") else bank.vectors
    code = rows.numel() * rows.element_size() / len(bank)
    key = getattr(bank, "key_bytes", None) or 0
    return {"bytes_per_doc": bank.nbytes / len(bank), "code_bytes_per_doc": code, "key_bytes_per_doc": key,
            "id_bytes_per_doc": bank.nbytes / len(bank) - code - key, "bank_bytes": bank.nbytes}


def _mbc_row(model, ds, stream, opts: dict, name: str) -> dict:
    from mbc_hf.data import documents, load_qa_file
    from mbc_hf.evaluation import evaluate_online

    common = dict(max_new_tokens=opts["max_new_tokens"], batch_size=opts["batch_size"],
                  show_progress=opts["progress"])
    if name.startswith("bank_t"):  # the knob T: the same reader reads T codes selected per document
        model.config.num_context_tokens = model.codebook.num_tokens = int(name.removeprefix("bank_t"))
    if name == "mbc_k1":
        model.config.read_documents = 1
    docs = documents(stream)
    if name == "unrelated":  # as many documents as the stream holds, from the end of the file (other articles)
        asked = set(ds["context"])
        docs = [d for d in documents(load_qa_file(opts["data"])) if d[1] not in asked][-len(docs):]
        if not docs:
            raise ValueError(f"row 'unrelated' needs documents beyond the ones asked about in {opts['data']}; "
                             "lower --downsample-to or leave the row out with --rows.")
    bank, adapt_ms, store = None, 0.0, None
    if name != "empty":
        start = time.perf_counter()
        bank = model.memorize([t for _, t in docs], doc_ids=[i for i, _ in docs], batch_size=opts["batch_size"],
                              compress=False if name == "dense" else None, show_progress=opts["progress"])
        adapt_ms = (time.perf_counter() - start) * 1000 / max(len(docs), 1)
    if name in HYBRID_ROWS:
        start = time.perf_counter()
        store = _text_store(docs)
        adapt_ms += (time.perf_counter() - start) * 1000 / max(len(docs), 1)
    if name == "oracle":  # each question reads a bank of its gold document alone
        from mbc_hf.memory_bank import CompressedMemoryBank

        predictions, start = [None] * len(ds), time.perf_counter()
        by_doc = {}
        for row, doc_id in enumerate(ds["doc_id"]):
            by_doc.setdefault(doc_id, []).append(row)
        for doc_id, rows in by_doc.items():
            alone = CompressedMemoryBank(bank.codebook_size, bank.num_tokens, bank.codebook_fingerprint)
            alone.extend([doc_id], bank.get_codes([doc_id]))
            for row, p in zip(rows, model.answer([ds["question"][r] for r in rows], memory_bank=alone,
                                                 max_new_tokens=opts["max_new_tokens"])):
                predictions[row] = p
        from mbc_hf.evaluation import score

        r = {**score(predictions, ds), "query_ms": (time.perf_counter() - start) * 1000 / max(len(ds), 1),
             "predictions": predictions}
    elif store is not None:
        from mbc_hf.evaluation import score

        start = time.perf_counter()
        out = model.answer(list(ds["question"]), memory_bank=bank, text_store=store, return_sources=True,
                           **{k: v for k, v in common.items() if k != "show_progress"})
        r = {**score([o["answer"] for o in out], ds), "predictions": [o["answer"] for o in out],
             "query_ms": (time.perf_counter() - start) * 1000 / max(len(ds), 1),
             **_accuracy([o["passages"] for o in out], ds["doc_id"])}
    else:
        r = evaluate_online(model, ds, memory_bank=bank, adapt=False,
                            aggregation="dense" if name == "dense" else "histogram" if name == "mbc" and not
                            model.uses_vocabulary_codebook else None, **common)
    out = {k: r[k] for k in ("em", "f1", "prefix_em", "query_ms", "predictions", "retrieval_top1", "retrieval_top3")
           if k in r}
    out["adapt_ms_per_doc"] = adapt_ms
    if name == "unrelated":
        out["bank_doc_ids"] = bank.doc_ids
    if model.uses_vocabulary_codebook and bank is not None and name not in ("unrelated", "oracle", *HYBRID_ROWS):
        out.update(_addressing(model, bank, ds, opts["batch_size"]))  # is the document read the gold one?
    out.update(_bank_bytes(bank))
    out["bank_type"] = type(bank).__name__ if bank is not None else None
    out["prompt"] = "memory prefix + model template" + (" after the BM25 passage" if store is not None else "")
    out["prompt_template"] = model.config.prompt_template
    return out


def _addressing(model, bank, ds, batch_size: int) -> dict:
    """Top-1 / top-3 addressing accuracy of the bank's own ranking on the questions of ``ds``."""
    memory, ranked = model.memory_from_bank(bank), []
    for i in range(0, len(ds), batch_size):
        q = model.encode_questions(ds["question"][i:i + batch_size])
        _, docs = model.read_documents(q["question_input_ids"], q["question_attention_mask"], memory, k=3)
        ranked += [[bank.doc_ids[j] for j in row] for row in docs.tolist()]
    return _accuracy(ranked, ds["doc_id"])


def _exit_with_parent(parent_pid: int, every: float = 2.0) -> None:
    """In a child: exit as soon as the parent process is gone (killed parents would otherwise leave the row
    running as an orphan)."""
    import threading

    def watch():
        while True:
            time.sleep(every)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def sample_questions(stream, n: int, seed: int):
    """``n`` questions of the stream drawn without replacement by ``random.Random(seed)``, in stream order (all of
    them for ``n`` = 0 or ``n`` >= the stream's questions): spread over the whole stream, fixed by the seed."""
    import random

    if not n or n >= len(stream):
        return stream
    return stream.select(sorted(random.Random(seed).sample(range(len(stream)), n)))


def run_row(name: str, opts: dict) -> dict:
    """Run one benchmark row (in a fresh process) and return its metrics (JSON-serialisable)."""
    if opts.get("parent_pid") and os.getpid() != opts["parent_pid"]:
        _exit_with_parent(opts["parent_pid"])
    import torch

    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    from mbc_hf.data import documents, load_qa_file

    stream = load_qa_file(opts["data"], downsample_to=opts["downsample_to"])
    ds = sample_questions(stream, opts["questions"], opts["question_seed"])
    model = load_model(opts["hybrid_model"] if name in HYBRID_MODEL_ROWS else opts["model"], opts["seed"],
                       **({"addressing_key": "minilm-binary"} if name == "mbc_key" else {}))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            result = (_base_lm_row if name in BASE_LM_ROWS else _mbc_row)(model, ds, stream, opts, name)
    for w in caught:  # show them once, after the row, and keep them in the results
        print(f"[{name}] warning: {w.category.__name__}: {w.message}", file=sys.stderr)
    label = ROWS[name]
    if getattr(model.config, "codebook_type", "learned") == "vocabulary" and name in COMPRESSED_ROWS:
        label = label.replace("(histogram)", f"(vocabulary codebook: reads the codes of the "
                              f"{model.config.read_documents} documents addressing picks)")
    result.update(row=name, label=label, n_docs=len(documents(stream)), n_questions=len(ds),
                  question_ids=list(ds["question_id"]), row_seconds=time.perf_counter() - start,
                  peak_rss_mib=peak_rss_mib(), torch_threads=torch.get_num_threads(),
                  warnings=sorted({f"{w.category.__name__}: {w.message}" for w in caught}))
    return result


# ----------------------------------------------------------------------------------------------------- parent side
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"saved MBC checkpoint dir, '{TINY}' or '{EMBEDDED_UNTRAINED}'")
    p.add_argument("--data", required=True, help="QA file (e.g. shared/data/squad/dev.minus-holdout.paragraphs.jsonl)")
    p.add_argument("--downsample-to", type=int, default=200, help="first N unique documents in file order: the "
                   "stream every bank holds (the papers' size: 1665)")
    p.add_argument("--questions", type=int, default=0, help="answer N questions spread over the stream, drawn by "
                   "--question-seed (default 0: every question of the stream)")
    p.add_argument("--question-seed", type=int, default=0)
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all; for a model trained "
                   "with --no-vq all but the compressed-bank rows mbc and unrelated; for a vocabulary codebook all "
                   "but dense)")
    p.add_argument("--passage-reader", help="adapter folder of train_passage_reader.py: adds the row rag (BM25 "
                   "top-1 passage read by a reader trained on passages)")
    p.add_argument("--hybrid-model", help="a model trained with mbc-hf train --hybrid-passages: adds the rows "
                   "hybrid_trained and bank_hybrid_reader")
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="chat-short",
                   help="prompt style of the base-LM rows (closed_book, bm25, gold)")
    p.add_argument("--passage-tokens", type=int, default=350, help="truncate in-context passages to N LM tokens")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="run rows in this process (debugging; peak RSS is then cumulative, not per row)")
    p.add_argument("--progress", action="store_true", help="progress bars for the MBC rows")
    a = p.parse_args(argv)
    if a.rows is None:
        uses_vq, vocabulary = _uses_vq(a.model), _codebook_type(a.model) == "vocabulary"
        a.rows = [r for r in ROWS if (r not in COMPRESSED_ROWS or uses_vq) and not (r == "dense" and vocabulary)
                  and (vocabulary or r not in VOCABULARY_ROWS) and (r != "rag" or a.passage_reader)
                  and (r not in HYBRID_MODEL_ROWS or a.hybrid_model)]
    else:
        a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown or not a.rows:
        p.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    if "rag" in a.rows and not a.passage_reader:
        p.error("--rows rag needs --passage-reader DIR (a folder written by benchmarks/train_passage_reader.py)")
    if set(a.rows) & set(HYBRID_MODEL_ROWS) and not a.hybrid_model:
        p.error("--rows hybrid_trained / bank_hybrid_reader need --hybrid-model DIR (mbc-hf train --hybrid-passages)")
    a.rows = [r for r in ROWS if r in a.rows]  # canonical order
    return a


COMPRESSED_ROWS = ("mbc", "unrelated")
BASE_LM_ROWS = ("closed_book", "bm25", "rag", "gold")


def _uses_vq(model: str) -> bool:
    """False for an MBC checkpoint trained with the VQ bypassed (``use_vq=False``): it has no trained codebook, so
    the compressed-bank rows do not apply to it (its banks are dense; see the `dense` row)."""
    from transformers import AutoConfig

    import mbc_hf  # noqa: F401  (registers the "mbc" model type)

    if not (Path(model) / "config.json").is_file():  # "tiny" or a Hub id: a VQ model as built
        return True
    uses = getattr(AutoConfig.from_pretrained(model), "use_vq", True)
    if not uses:
        print(f"[qa_squad] {model} was trained without VQ: leaving out the rows {', '.join(COMPRESSED_ROWS)}",
              file=sys.stderr)
    return uses


def _codebook_type(model: str) -> str:
    """``codebook_type`` of a saved MBC checkpoint ("learned" for ``tiny`` and Hub ids). A vocabulary codebook's
    codes are token ids, which lose nothing, so the `dense` row (VQ bypassed) does not apply to it."""
    from transformers import AutoConfig

    import mbc_hf  # noqa: F401  (registers the "mbc" model type)

    if not (Path(model) / "config.json").is_file():
        return "learned"
    kind = getattr(AutoConfig.from_pretrained(model), "codebook_type", "learned")
    if kind == "vocabulary":
        print(f"[qa_squad] {model} has a vocabulary codebook: leaving out the row dense", file=sys.stderr)
    return kind


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _command_line(argv) -> str:
    script = Path(__file__)
    try:
        script = script.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv])


def _fmt_cell(key: str, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key in ("bytes_per_doc", "code_bytes_per_doc", "id_bytes_per_doc", "peak_rss_mib") and isinstance(value, float):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if key in ("retrieval_top1", "retrieval_top3"):
        return f"{100 * value:.1f}%"
    return value


def render_markdown(results: dict) -> str:
    from mbc_hf.demo import markdown_table  # imports mbc_hf (torch): only after the children have run

    rows = [{h: _fmt_cell(k, r.get(k)) for h, k in COLUMNS.items()} for r in results["rows"]]
    a = results["args"]
    styles = sorted({r["prompt"] for r in results["rows"] if r["row"] in BASE_LM_ROWS})
    templates = sorted({r["prompt_template"] for r in results["rows"] if r.get("prompt_template")})
    template = " / ".join(json.dumps(t)[1:-1] for t in templates) or "n/a"
    if results["isolation"] == "spawn":
        rss = ("ru_maxrss of the child process that ran the row (model, data and libraries loaded; at least the "
               f"parent's {results['parent_peak_rss_mib']:.0f} MiB)")
    else:
        rss = "**cumulative** peak of the single process that ran all rows (--in-process), not per row"
    caption = [
        f"**SQuAD dev stream, first {results['n_docs']} documents, {results['n_questions']} questions**; model "
        f"`{a['model']}`; every row measured in this run on the same questions.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Base-LM rows (closed-book, BM25, RAG reader, gold) use the `{', '.join(styles) or a['prompt']}` prompt "
        f"(requested `--prompt {a['prompt']}`), passages truncated to {a['passage_tokens']} LM tokens; answers: "
        f"greedy, max_new_tokens={a['max_new_tokens']}, first line, stripped. MBC rows use the model's own prompt "
        f"template (`{template}`) after the memory prefix. EM/F1: official SQuAD v1.1; prefix-EM: the MBC/MAC "
        "reference code's EM.",
        "Bank bytes/doc: MBC rows `bank.nbytes/len(bank)` (codes or fp32 vectors + doc-id bytes); BM25 and gold: "
        "UTF-8 bytes of the full stored passage text (the BM25 index itself not counted); closed-book/empty: 0. "
        "Adapt ms/doc: memorize() per unique document (BM25: index build); query ms: per question, retrieval and "
        f"aggregation included. Peak RSS: {rss}. CPU, torch threads "
        f"{results['rows'][0].get('torch_threads') if results['rows'] else '?'}, load average at start "
        f"{results['loadavg_start']}.",
    ]
    return markdown_table(rows, list(COLUMNS)) + "\n\n" + "\n".join(caption) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)  # inherited by the children
    opts = {"model": a.model, "data": str(a.data), "downsample_to": a.downsample_to, "questions": a.questions,
            "question_seed": a.question_seed, "prompt": a.prompt, "passage_reader": a.passage_reader,
            "hybrid_model": a.hybrid_model,
            "passage_tokens": a.passage_tokens, "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
            "threads": a.threads, "seed": a.seed, "progress": a.progress, "parent_pid": os.getpid()}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    loadavg = [round(x, 2) for x in os.getloadavg()]
    parent_rss = peak_rss_mib()
    rows = []
    out_dir = Path(a.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def slim(r: dict) -> dict:  # a row without its per-question lists
        return {k: v for k, v in r.items() if k not in ("predictions", "question_ids", "retrieved_doc_ids")}

    ctx = multiprocessing.get_context("spawn")
    for name in a.rows:
        print(f"[qa_squad] row {name}: {ROWS[name]} ...", file=sys.stderr, flush=True)
        if a.in_process:
            r = run_row(name, opts)
        else:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                r = pool.apply(run_row, (name, opts))
        print(f"[qa_squad]   EM {r['em']:.2f} F1 {r['f1']:.2f} ({r['row_seconds']:.0f} s, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB)", file=sys.stderr, flush=True)
        rows.append(r)
        # the rows so far, so that a long run stopped half-way keeps what it measured
        (out_dir / "results.partial.json").write_text(json.dumps(
            {"rows": [slim(x) for x in rows], "command": _command_line(argv), "timestamp": started}, indent=1) + "\n")
    ref = rows[0]
    if any(r["question_ids"] != ref["question_ids"] for r in rows):
        raise RuntimeError("rows were measured on different questions")
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, qid in enumerate(ref["question_ids"]):
            rec = {"question_id": qid, **{r["row"]: r["predictions"][i] for r in rows}}
            if "retrieved_doc_ids" in (bm25 := next((r for r in rows if r["row"] == "bm25"), {})):
                rec["bm25_doc_id"] = bm25["retrieved_doc_ids"][i]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    results = {
        "rows": [slim(r) for r in rows], "args": vars(a), "command": _command_line(argv), "timestamp": started,
        "model": a.model, "model_path": str(Path(a.model).resolve()) if Path(a.model).exists() else a.model,
        "data": str(Path(a.data).resolve()), "n_docs": ref["n_docs"], "n_questions": ref["n_questions"],
        "versions": {"python": platform.python_version(), "torch": _version("torch"),
                     "transformers": _version("transformers"), "mbc-hf": _version("mbc-hf"),
                     "bm25s": _version("bm25s")},
        "parent_peak_rss_mib": parent_rss, "isolation": "in-process" if a.in_process else "spawn",
        "loadavg_start": loadavg, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    markdown = render_markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
