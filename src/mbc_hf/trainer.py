"""Meta-training and evaluation of MBC with the HF `Trainer` (MBC §3.4 / MAC §3.3).

Each training batch is a set of (document, question, answer) rows; the batch's unique documents are encoded,
quantized and form the memory that every question of the batch reads (the others act as distractors), and the
loss is the QA loss on `` answer<eos>`` tokens + λ·VQ loss (+ the optional reconstruction term). The codebook's
online resetting runs inside the model's training forward.

Additions that make the memory path learnable on a small CPU budget (none is in the paper; see README):
* a gold-only curriculum: for the first ``gold_only_steps`` steps a question sees only its own document;
* a VQ warm-up: the memory reads the context vectors unquantized (MAC's float memory) until the float memory's gain
  against another document passes ``vq_warmup_gain`` on held-out documents (or for ``vq_warmup_steps`` steps, the
  cap), then the codebook is k-means initialised on them and the codes are read (the learned codebook carried
  nothing without it on CPU budgets; docs/findings.md);
* online resetting's restart of the optimizer moments of re-seeded codes (`CodebookResetCallback`), and the codebook's
  health in the logs: re-seeded codes (``codebook_resets``), the usage perplexity over time
  (``codebook_usage_perplexity``) and, at each evaluation, the distinct codes of held-out documents
  (``eval_distinct_codes``);
* learned top-k addressing: a gradient budget for its addressing loss (``addressing_grad_ratio``), so that it does
  not swamp the QA loss on the parameters they share;
* learning rates per module group (encoders, KV-LoRA, the rest), and KV-LoRA frozen until ``lora_start_step``;
* evaluation reports the **memory gain**: answer NLL with an empty memory (and with unrelated documents) minus
  answer NLL with the gold document, on fixed held-out questions. A positive gain means the memory is read.
"""

import contextlib
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .atomic import write_text_atomic
from .modeling_mbc import answer_nll_per_row

logger = logging.get_logger(__name__)


@dataclass
class MBCTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus MBC's schedule knobs. ``remove_unused_columns`` defaults to False (the collator
    needs the raw text columns)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep text columns for the collator."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "aliases": ["--batch-size"], "help": "Questions per training batch and device."})
    num_train_epochs: float = field(default=3.0, metadata={
        "aliases": ["--epochs"], "help": "Total number of training epochs to perform."})
    max_minutes: float | None = field(default=None, metadata={
        "help": "Stop (and save) after this many minutes of training (`StopAfterMinutes`)."})
    resume: bool = field(default=False, metadata={
        "help": "Command-line runs: continue from the last checkpoint in output_dir when there is one "
                "(resume_from_checkpoint names a checkpoint instead)."})
    gold_only_steps: int = field(default=0, metadata={"help": "Steps in which each question sees only its own "
                                                               "document (curriculum), before the whole batch."})
    encoder_learning_rate: float | None = field(default=None, metadata={"help": "LR of the encoder backbones "
                                                                                 "(default: learning_rate)."})
    lora_learning_rate: float | None = field(default=None, metadata={"help": "LR of KV-LoRA (default: learning_rate)."})
    lora_start_step: int = field(default=0, metadata={"help": "KV-LoRA stays frozen before this optimizer step."})
    codebook_kmeans_docs: int = field(default=0, metadata={"help": "If > 0, before the first step initialise the "
                                                                    "codebook by k-means on the context vectors of "
                                                                    "the first N training documents."})
    vq_warmup_steps: int = field(default=0, metadata={
        "help": "Learned codebook: for the first N steps the memory reads the context vectors with the VQ bypassed "
                "(MAC-style float memory); then the codebook is k-means initialised on the context vectors of the "
                "first codebook_kmeans_docs (default 1000) training documents and the codes are read. With "
                "vq_warmup_gain, N is the cap."})
    vq_warmup_gain: float | None = field(default=None, metadata={
        "help": "Learned codebook with vq_warmup_steps: end the warm-up as soon as the float memory's gain against "
                "another document (answer NLL in nats/token with another document's memory minus with the gold "
                "one, on memory_gain_questions held-out eval documents, every vq_warmup_check_steps steps) reaches "
                "this value, so that the codes are fitted to a memory that has learned something. Needs an eval "
                "set."})
    vq_warmup_check_steps: int = field(default=50, metadata={
        "help": "Steps between two measurements of the float memory's gain for vq_warmup_gain."})
    eval_codes_docs: int = field(default=1000, metadata={
        "help": "Learned codebook: at each evaluation, count the distinct codes of the first N eval documents "
                "(eval_distinct_codes; a collapsed codebook uses few of its K codes). 0 = off."})
    addressing_grad_ratio: float = field(default=0.5, metadata={
        "help": "Learned top-k addressing (aggregation='topk'): the gradient budget of its addressing loss. At every "
                "step the addressing loss's gradient on the parameters it shares with the QA loss (amortization "
                "network, codebook, question encoder) is scaled to at most this ratio times the other losses' "
                "gradient norm there; the key heads keep the full weight. Costs two extra backward passes per "
                "step. A negative value turns it off: one loss and one clipped norm, under which the addressing "
                "gradient swamps the memory path's (docs/findings.md)."})
    freeze_codebook: bool = field(default=False, metadata={
        "help": "Freeze the codebook (after any k-means initialisation): no gradient, no dead-code reset."})
    encoder_state_cache_mb: float = field(default=2048, metadata={
        "help": "During train(), keep the frozen document encoder's states of up to this many MiB of documents and "
                "skip its forward when a document comes back (0 = off; nothing is cached for a trained encoder)."})
    memory_gain_questions: int = field(default=32, metadata={"help": "Held-out questions for the memory gain."})
    memory_gain_article_pairs: bool = field(default=False, metadata={
        "help": "Measure the memory gain on same-article pairs of eval documents (`article_pair_batches`, over the "
                "whole eval set): eval_memory_gain_other_article (does the memory hold the topic?) and "
                "eval_memory_gain_same_article (the paragraph?) instead of eval_memory_gain_unrelated (the next "
                "document, mostly of the same article). Needs doc ids '<article>#<k>' and an even eval batch >= 4."})
    read_retrieved: bool = field(default=False, metadata={
        "help": "Vocabulary codebook: after the gold-only steps, each question reads the config.read_documents "
                "documents that addressing picks from a bank of all training documents (wrong ones included), as at "
                "test time, instead of the batch's documents."})
    hybrid_passages: bool = field(default=False, metadata={
        "help": "Train a hybrid reader (MAC's BM25 + memory row; issue 36): each training question also gets, before "
                "its prompt, the BM25 top-1 passage of a text store of all training documents (wrong passages "
                "included, as at test time), the same prompt as answer(..., text_store=store). Combine with "
                "read_retrieved, so that the prefix holds the codes of the documents addressing picks. Evaluation "
                "questions get theirs from a store of the eval documents (MBCTrainer.eval_collator)."})
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
    ``reconstruction_loss_weight`` > 0, ``reconstruction_input_ids``/``reconstruction_attention_mask`` (N, R), and
    when its ``distillation_loss_weight`` > 0 the teacher's input of `MBCModelForCausalLM.encode_in_context`.

    With ``passages`` (a `mbc_hf.text_store.TextStore`; hybrid training), each question's prompt starts with the
    store's BM25 top-1 passage for it (none when its score is 0), as `MBCModelForCausalLM.answer` with
    ``text_store`` does at test time.
    """

    model: object
    passages: object = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        doc_index, docs = {}, []
        for row in rows:
            if row["doc_id"] not in doc_index:
                doc_index[row["doc_id"]] = len(docs)
                docs.append(row["context"])
        answers = [min(row["answers"], key=len) for row in rows]
        questions = [row["question"] for row in rows]
        contexts = None
        if self.passages is not None:  # the passages answer(..., text_store=...) reads
            contexts = [self.passages.get(d) if d else "" for d in self.passages.top_passages(questions)]
        batch = self.model.encode_questions(questions, answers, device="cpu", contexts=contexts)
        context, n_cut = self.model._encode_documents(docs, device="cpu")
        if n_cut and not getattr(self, "_warned_truncation", False):  # once per run, not on every batch
            self._warned_truncation = True
            warnings.warn(f"documents exceed max_document_length={self.model.config.max_document_length} "
                          f"encoder tokens and are truncated ({n_cut} of {len(docs)} in the first such batch; "
                          "shown once); split long documents into passages to train on all of their content.",
                          stacklevel=2)
        batch["context_input_ids"], batch["context_attention_mask"] = context["input_ids"], context["attention_mask"]
        batch["question_doc_index"] = torch.tensor([doc_index[row["doc_id"]] for row in rows])
        if self.model.config.reconstruction_loss_weight > 0:
            batch.update(self.model.encode_reconstruction_targets(docs, device="cpu"))
        if self.model.config.distillation_loss_weight > 0:
            batch.update(self.model.encode_in_context([row["context"] for row in rows], batch, device="cpu"))
        return batch


def _answer_reads(model, batch: dict[str, torch.Tensor], partners: dict[str, torch.Tensor] | None):
    """Yield ``(name, MBCOutput)`` for a collated batch's questions (teacher-forced on their answers) read with the
    gold document alone (``"gold"``), an empty memory (``"empty"``) and, per partner, that document instead of the
    gold one (default partner ``"unrelated"``: the next document of the batch; none for one document)."""
    qa = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "question_input_ids",
                                "question_attention_mask")}
    idx = batch["question_doc_index"]
    n_docs = int(batch["context_input_ids"].shape[0])
    if partners is None:
        partners = {"unrelated": (torch.arange(n_docs) + 1) % n_docs} if n_docs > 1 else {}
    docs = dict(context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"])
    yield "gold", model(**qa, **docs, question_doc_index=idx)
    yield "empty", model(**qa, memory=model.memory_from_bank(None))
    for name, partner in partners.items():
        yield name, model(**qa, **docs, question_doc_index=partner.to(idx.device)[idx])


@torch.no_grad()
def memory_gain(model, batch: dict[str, torch.Tensor], partners: dict[str, torch.Tensor] | None = None
                ) -> dict[str, float]:
    """Answer NLL (nats/token) of a collated batch with the gold document alone, with an empty memory and with
    another document of the batch, and the gains ``memory_gain = nll_empty - nll_gold`` and, per partner,
    ``memory_gain_<name> = nll_<name> - nll_gold``. With reconstruction targets in the batch, also
    ``reconstruction_gain``: NLL of each document's first tokens from another document's memory minus from its own
    (> 0 means the codes carry the document).

    Args:
        partners: name -> (n_docs,) int64, the document each document's questions read instead of their own; by
            default ``{"unrelated": the next document of the batch}`` (no partner for a batch of one document).
            `article_pair_batches` builds batches whose partners ``other_article`` / ``same_article`` separate "the
            memory holds the topic" from "the memory holds the paragraph".
    """
    was_training = model.training
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    nll = {name: float(out.qa_loss) for name, out in _answer_reads(model, batch, partners)}
    out = {"nll_gold": nll["gold"], "nll_empty": nll["empty"], "memory_gain": nll["empty"] - nll["gold"]}
    for name in list(nll)[2:]:
        out[f"nll_{name}"] = nll[name]
        out[f"memory_gain_{name}"] = nll[name] - nll["gold"]
    n_docs = int(batch["context_input_ids"].shape[0])
    if "reconstruction_input_ids" in batch and n_docs > 1:  # do the codes carry the document at all?
        rec = (batch["reconstruction_input_ids"], batch["reconstruction_attention_mask"])
        docs = (batch["context_input_ids"], batch["context_attention_mask"])

        def rec_nll(ids, mask):
            return float(model.reconstruction_loss(model.memory_from_documents(ids, mask)[0], *rec))

        out["reconstruction_nll_gold"] = rec_nll(*docs)
        out["reconstruction_nll_unrelated"] = rec_nll(docs[0].roll(1, 0), docs[1].roll(1, 0))
        out["reconstruction_gain"] = out["reconstruction_nll_unrelated"] - out["reconstruction_nll_gold"]
    model.train(was_training)
    return out


@torch.no_grad()
def question_gains(model, batch: dict[str, torch.Tensor], partners: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """`memory_gain` per question, for intervals over questions: ``memory_gain`` (empty minus gold) and
    ``memory_gain_<partner>`` (partner minus gold), each (n_questions,) float32 on the CPU, in nats per answer token
    of that question (`mbc_hf.modeling_mbc.answer_nll_per_row`)."""
    was_training = model.training
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    nll = {name: answer_nll_per_row(out.logits, batch["labels"]).float().cpu()
           for name, out in _answer_reads(model, batch, partners)}
    model.train(was_training)
    return {"memory_gain" if name == "empty" else f"memory_gain_{name}": v - nll["gold"]
            for name, v in nll.items() if name != "gold"}


def article_of(doc_id: str) -> str:
    """The article a document belongs to: its ``doc_id`` up to the first ``#`` (the SQuAD paragraph layout's ids
    are ``<title>#<k>``), else the whole ``doc_id`` (a document of its own)."""
    return doc_id.split("#", 1)[0]


def article_pair_batches(rows: list[dict], batch_size: int = 8) -> list[list[dict]]:
    """Batches for a memory gain that tells the topic from the paragraph: each batch is ``batch_size / 2`` pairs of
    documents, the two of a pair from one article and the pairs from different articles, in the order
    ``[a, a', b, b', ...]``. Pairs are consecutive rows of an article in the given order (an odd one out is
    dropped); batches take the articles with the most pairs left, so rows of articles that cannot fill a batch
    with other articles are dropped too. Use with `paired_partners`.

    Raises:
        ValueError: ``batch_size`` is odd or below 4.
    """
    if batch_size < 4 or batch_size % 2:
        raise ValueError(f"batch_size must be even and at least 4 (pairs from 2+ articles), got {batch_size}")
    pairs: dict[str, list] = {}
    for row in rows:
        pairs.setdefault(article_of(row["doc_id"]), []).append(row)
    pairs = {a: [r[i:i + 2] for i in range(0, len(r) - 1, 2)] for a, r in pairs.items()}
    pairs = {a: p for a, p in pairs.items() if p}
    batches, k = [], batch_size // 2
    while len(pairs) >= k:
        chosen = sorted(pairs, key=lambda a: -len(pairs[a]))[:k]
        batches.append([row for a in chosen for row in pairs[a].pop(0)])
        pairs = {a: p for a, p in pairs.items() if p}
    return batches


def paired_partners(batch_size: int) -> dict[str, torch.Tensor]:
    """Partners for `memory_gain` on an `article_pair_batches` batch: ``same_article`` = the other document of the
    pair, ``other_article`` = the same slot of the next pair (another article)."""
    i = torch.arange(batch_size)
    return {"other_article": (i + 2) % batch_size, "same_article": i ^ 1}


def first_row_per_document(rows, n: int | None = None) -> list[dict]:
    """The first row of each of the first ``n`` documents (by ``doc_id``; ``None`` = all) of any iterable of rows
    (a `datasets.Dataset`, an `IterableDataset`, a list of dicts), in order; stops reading after the n-th."""
    out, seen = [], set()
    for row in rows:
        if len(out) == n:
            break
        if row["doc_id"] not in seen:
            seen.add(row["doc_id"])
            out.append(row)
    return out


def training_text_store(dataset):
    """An in-memory `mbc_hf.text_store.TextStore` of a training dataset's unique documents (rows ``doc_id``,
    ``context``), for hybrid training (``hybrid_passages``).

    Raises:
        ValueError: no training dataset (hybrid training searches its documents)."""
    from .text_store import TextStore

    if dataset is None:
        raise ValueError("hybrid_passages=True searches the training documents for each question's passage: pass "
                         "train_dataset to MBCTrainer.")
    docs = dict(zip(dataset["doc_id"], dataset["context"]))  # one text per doc id
    store = TextStore()
    store.add(list(docs), list(docs.values()))
    return store


def fit_vocabulary_idf(model, dataset) -> torch.Tensor:
    """Fit a vocabulary codebook on a training set (`MBCTrainer.train` calls it before the first step when the IDF
    is not fitted yet): the IDF (`VocabularyCodebook.fit`) on the unique documents (``context`` column) in LM tokens
    truncated to ``config.max_document_length``; with ``code_selector="trained"`` the token scorer
    (`VocabularyCodebook.fit_selector`) on the tokens of each document's questions and answers; with
    ``whole_words`` the word starts of the LM's vocabulary. Returns the IDF (V,) float32."""
    tok, book = model.tokenizer, model.codebook
    texts = list(dict.fromkeys(row["context"] for row in dataset))
    ids = tok(texts, add_special_tokens=False, truncation=True,
              max_length=model.config.max_document_length)["input_ids"]
    idf = book.fit(ids, special_ids=tok.all_special_ids)
    if book.whole_words:
        book.fit_words(tok.convert_ids_to_tokens(list(range(book.codebook_size))))
    if book.selector == "trained":
        asked = {text: set() for text in texts}
        for row in dataset:  # a leading space tokenizes a word as inside a text (" Paris", not "Pa" "ris")
            pieces = [" " + row["question"], *(" " + a for a in row["answers"])]
            for piece_ids in tok(pieces, add_special_tokens=False)["input_ids"]:
                asked[row["context"]].update(piece_ids)
        book.fit_selector(ids, [asked[t] for t in texts])
    return idf


def document_codes(model, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, T) int64 codes of documents under a fitted vocabulary codebook (what `memorize` would store)."""
    parts, n_cut = [], 0
    for i in range(0, len(texts), batch_size):
        enc, cut = model._encode_documents(texts[i:i + batch_size], device="cpu")
        parts.append(model.codebook.select(**enc))
        n_cut += cut
    if n_cut:  # one warning that counts every batch
        model._warn_truncated(n_cut, len(texts))
    return torch.cat(parts)


@torch.no_grad()
def kmeans_init_codebook(model, dataset, num_docs: int, batch_size: int = 32, seed: int = 0) -> torch.Tensor:
    """K-means initialisation of ``model.codebook`` (`VectorQuantizer.kmeans_init`) on the context vectors of the
    first ``num_docs`` unique documents of ``dataset`` (rows with ``doc_id`` and ``context``), in order, with the
    global torch RNG seeded with ``seed`` for the k-means and restored afterwards: every process of a multi-process
    run computes the same codebook.

    Returns:
        (K,) int64 cluster sizes.

    Raises:
        ValueError: the documents give fewer context vectors than codes.
    """
    z = context_vectors(model, [row["context"] for row in first_row_per_document(dataset, num_docs)], batch_size)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return model.codebook.kmeans_init(z)
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def context_vectors(model, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(N, T, d) float: the amortization network's context vectors of documents (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    z = []
    for i in range(0, len(texts), batch_size):
        enc = model.encode_documents(texts[i:i + batch_size])
        z.append(model.amortization(enc["input_ids"], enc["attention_mask"]))  # (b, T, d)
    model.train(was_training)
    return torch.cat(z)


def distinct_codes(model, texts: list[str]) -> int:
    """How many of the learned codebook's K codes the documents' codes use (what `memorize` would store)."""
    return int(model.codebook.nearest_codes(context_vectors(model, texts)).unique().numel())


class LoraWarmStartCallback(TrainerCallback):
    """Keeps KV-LoRA's learning rate at 0 until ``lora_start_step`` (the memory path trains first)."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or args.lora_start_step <= 0:
            return
        for group in optimizer.param_groups:
            if group.get("name") == "kv_lora":
                if state.global_step < args.lora_start_step:
                    group["lr"] = 0.0


class CodebookResetCallback(TrainerCallback):
    """Before each optimizer step, restart the optimizer moments of the codes that online resetting re-seeded in
    this step (`VectorQuantizer.restart_optimizer_state`). `MBCTrainer` adds it for a learned codebook."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None:
            getattr(model, "module", model).codebook.restart_optimizer_state(optimizer)


class ProgressLogCallback(TrainerCallback):
    """One line on stdout every ``every`` optimizer steps (and at least every ``seconds``) with the step, the last
    logged loss, steps/s and the estimated end (of ``max_steps``, or of ``max_minutes`` when that comes first), for
    runs whose output is not a terminal (no progress bar; a log file). `MBCTrainer` adds it when
    ``disable_tqdm`` is set or stdout is not a terminal."""

    def __init__(self, every: int = 25, seconds: float = 60.0, stream=None):
        self.every, self.seconds, self.stream = max(1, int(every)), seconds, stream
        self.loss = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = time.time()
        self.first_step = state.global_step  # a resumed run counts its speed from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        now, step = time.time(), state.global_step
        if not state.is_world_process_zero:
            return
        if step % self.every and now - self.last < self.seconds and step < state.max_steps:
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.start, 1e-9)
        left = (state.max_steps - step) / rate if rate > 0 else float("inf")
        if args.max_minutes:
            left = min(left, max(0.0, self.start + args.max_minutes * 60 - now))
        loss = f" loss {self.loss:.4f}," if self.loss is not None else ""  # none before the first logging step
        end = time.strftime("%H:%M", time.localtime(now + left)) if math.isfinite(left) else "?"
        print(f"step {step}/{state.max_steps}{loss} {rate:.2f} steps/s, {_duration(now - self.start)} elapsed, "
              f"ends in ~{_duration(left)} (at {end})", file=self.stream or sys.stdout, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StopAfterMinutes(TrainerCallback):
    """Stops (and saves) once training has run for ``minutes`` (``MBCTrainingArguments.max_minutes``)."""

    def __init__(self, minutes: float):
        self.minutes = minutes

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self.start > self.minutes * 60:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"  # save_strategy="no" (mbc-hf demo) writes no checkpoint


class MBCTrainer(Trainer):
    """`Trainer` for MBC meta-training; `evaluate` adds the memory gain (and EM/F1 after online adaptation).

    Use with `MBCTrainingArguments` and `MBCDataCollator` (the default collator when none is given).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by accumulation steps

    def __init__(self, *args, data_collator=None, **kwargs):
        model = kwargs.get("model") or (args[0] if args else None)
        training_args = kwargs.get("args") or (args[1] if len(args) > 1 else None)
        hybrid = data_collator is None and training_args is not None and training_args.hybrid_passages
        if data_collator is None:
            passages = training_text_store(kwargs.get("train_dataset")) if hybrid else None
            data_collator = MBCDataCollator(model, passages)
        super().__init__(*args, data_collator=data_collator, **kwargs)
        self._eval_collators = {} if hybrid else None  # id(eval dataset) -> (dataset, its hybrid collator)
        self.add_callback(LoraWarmStartCallback())
        if self.args.max_minutes:
            self.add_callback(StopAfterMinutes(self.args.max_minutes))
        self.add_callback(CodebookSyncCallback())  # dead-code resets are per process; DDP does not re-sync them
        if self.args.disable_tqdm or not sys.stdout.isatty():  # no progress bar to watch: a line every N steps
            self.add_callback(ProgressLogCallback(self.args.logging_steps if self.args.logging_steps >= 1 else 25))
        if hasattr(getattr(model, "codebook", None), "restart_optimizer_state"):
            self.add_callback(CodebookResetCallback())
        self._parts = {}
        self._resets_logged = 0
        self.vq_warmup_end = None  # (step, reason) once the VQ warm-up has ended in this trainer
        self._retrieval_bank = None  # (N_train, T) codes of every training document, with read_retrieved

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, after the codebook set-up of ``codebook_kmeans_docs`` / ``freeze_codebook`` (a fresh run
        only: a resumed run loads its codebook from the checkpoint), with the frozen document encoder's states
        cached for ``encoder_state_cache_mb`` (`AmortizationNetwork.cache_encoder_states`). With a vocabulary
        codebook, instead: its IDF is fitted on the training documents (`fit_vocabulary_idf`) unless it already is.

        Raises:
            ValueError: before the first step, for ``memory_gain_article_pairs`` with an eval set it cannot pair, for
                ``codebook_kmeans_docs`` / ``freeze_codebook`` / ``vq_warmup_steps`` with a vocabulary codebook, and
                for ``vq_warmup_steps`` with the VQ bypassed (``use_vq=False``: there is no codebook to warm up)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.args.memory_gain_article_pairs and self.eval_dataset is not None:
            self._article_pair_batches(self.eval_dataset)  # fail now, not at the first evaluation
        if model.uses_vocabulary_codebook:
            if self.args.codebook_kmeans_docs > 0 or self.args.freeze_codebook or self.args.vq_warmup_steps > 0:
                raise ValueError("codebook_kmeans_docs / freeze_codebook / vq_warmup_steps apply to a learned "
                                 "codebook; a vocabulary codebook (codebook_type='vocabulary') has nothing to "
                                 "initialise or freeze: drop them.")
            if not model.codebook.fitted and not resume_from_checkpoint:
                fit_vocabulary_idf(model, self.train_dataset)
            self._retrieval_bank = None  # built at the first step, after a resumed checkpoint restored the codebook
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.vq_warmup_steps > 0 and not model.config.use_vq:
            raise ValueError("vq_warmup_steps reads the memory unquantized before the codes take over, but this model "
                             "bypasses the VQ for good (use_vq=False): drop vq_warmup_steps, or build the model with "
                             "use_vq=True.")
        if self.args.vq_warmup_gain is not None and (self.args.vq_warmup_steps <= 0 or self.eval_dataset is None):
            raise ValueError("vq_warmup_gain ends the VQ warm-up when the float memory's gain on held-out documents "
                             "passes it: it needs vq_warmup_steps > 0 (the cap) and an eval_dataset (CLI: "
                             "--eval-file).")
        # a codebook already in use (a run resumed after its warm-up, a trained model) keeps its codes
        self._warming = self.args.vq_warmup_steps > 0 and not bool(model.codebook.ema_cluster_size.sum() > 0)
        with contextlib.ExitStack() as stack:
            if self.args.encoder_state_cache_mb > 0:
                stack.enter_context(model.amortization.cache_encoder_states(int(self.args.encoder_state_cache_mb
                                                                                * 2**20)))
            if self.args.codebook_kmeans_docs > 0 and not resume_from_checkpoint and self.args.vq_warmup_steps == 0:
                self._kmeans_init(model)
            if self.args.freeze_codebook:
                model.codebook.freeze()
            try:
                result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            except BaseException:
                model.codebook.bypass = False  # the model object outlives a failed run: it reads its codes again
                raise
            if self._warming:  # stopped within the warm-up: the model must leave with usable codes
                self._end_vq_warmup(model)
            return result

    def _vq_warmup(self, model) -> None:
        """Bypass the codebook until the warm-up ends, then `_end_vq_warmup` once: at ``vq_warmup_steps`` optimizer
        steps, or earlier at the first check (every ``vq_warmup_check_steps``) where `float_memory_gain` reaches
        ``vq_warmup_gain``. A codebook already in use (a run resumed after the warm-up) keeps its codes."""
        if not self._warming:
            return
        step, args = self.state.global_step, self.args
        if step >= args.vq_warmup_steps:
            return self._end_vq_warmup(model, f"step cap vq_warmup_steps={args.vq_warmup_steps}")
        if args.vq_warmup_gain is not None and step > 0 and step % args.vq_warmup_check_steps == 0 \
                and step != getattr(self, "_gain_checked_at", None):
            self._gain_checked_at = step
            gain = self.float_memory_gain(model)
            self.log({"vq_warmup_gain": round(gain, 4)})
            if gain >= args.vq_warmup_gain:
                return self._end_vq_warmup(model, f"float memory gain {gain:.3f} >= vq_warmup_gain="
                                                  f"{args.vq_warmup_gain}")
        model.codebook.bypass = True

    def float_memory_gain(self, model) -> float:
        """The gate of ``vq_warmup_gain``: mean `memory_gain` against another document (``memory_gain_unrelated``,
        nats per answer token) of the first ``memory_gain_questions`` eval documents, with the memory as it reads
        now (float during the warm-up)."""
        rows = first_row_per_document(self.eval_dataset, self.args.memory_gain_questions or None)
        size = self.args.per_device_eval_batch_size
        collate = self.eval_collator(self.eval_dataset)
        gains = [memory_gain(model, collate(rows[i:i + size]))["memory_gain_unrelated"]
                 for i in range(0, len(rows), size) if len(rows[i:i + size]) > 1]
        return sum(gains) / max(len(gains), 1)

    def eval_collator(self, dataset):
        """The collator of evaluation batches on ``dataset``: ``data_collator``, except in hybrid training
        (``hybrid_passages``), where each eval question's passage is its BM25 top-1 among the *eval* documents (as
        ``answer(..., text_store=...)`` reads from a store of the documents streamed in), not among the training
        documents, which hold no passage about held-out documents."""
        if self._eval_collators is None:
            return self.data_collator
        if id(dataset) not in self._eval_collators:  # the dataset is kept with it, so its id is not reused
            collator = MBCDataCollator(self.accelerator.unwrap_model(self.model), training_text_store(dataset))
            self._eval_collators[id(dataset)] = (dataset, collator)
        return self._eval_collators[id(dataset)][1]

    def _end_vq_warmup(self, model, reason: str = "the run stopped within the warm-up") -> None:
        """K-means initialisation of the codebook on the context vectors the warm-up trained (the same codebook in
        every process: `kmeans_init_codebook` seeds its RNG), then the codes are read. Logged with its step and
        reason (``self.vq_warmup_end``)."""
        model.codebook.bypass, self._warming = False, False
        self._kmeans_init(model)
        self.vq_warmup_end = (self.state.global_step, reason)
        logger.warning(f"VQ warm-up ended at step {self.state.global_step}: {reason}; the codes are read from now on")
        self.log({"vq_warmup_end_step": float(self.state.global_step)})

    def _kmeans_init(self, model) -> None:
        """`kmeans_init_codebook` on the first ``codebook_kmeans_docs`` (default 1,000) training documents. They
        stay in the encoder state cache; its hit counters restart, so that they count training rows only."""
        kmeans_init_codebook(model, self.train_dataset, self.args.codebook_kmeans_docs or 1000, seed=self.args.seed)
        if model.amortization.state_cache is not None:
            model.amortization.state_cache.hits = model.amortization.state_cache.misses = 0

    def _article_pair_batches(self, dataset) -> list[list[dict]]:
        """The memory-gain batches of ``memory_gain_article_pairs`` (`article_pair_batches`, at most
        ``memory_gain_questions`` documents). Raises ValueError for an odd or small eval batch or an eval set
        without enough same-article pairs."""
        size, limit = self.args.per_device_eval_batch_size, self.args.memory_gain_questions or None
        if size < 4 or size % 2:
            raise ValueError(f"memory_gain_article_pairs needs an even per_device_eval_batch_size >= 4, got {size}")
        rows = first_row_per_document(dataset)
        batches = article_pair_batches(rows, size)[:-(-limit // size) if limit else None]
        if not batches:
            articles = len({article_of(r["doc_id"]) for r in rows})
            raise ValueError(f"memory_gain_article_pairs: the eval set ({len(rows)} documents of {articles} articles) "
                             f"has no {size // 2} articles with two documents each; doc ids must read '<article>#<k>' "
                             "(the SQuAD paragraph layout) and the set must span articles (CLI: --eval-docs 0 takes "
                             "all of --eval-file), or turn the option off")
        return batches

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """`Trainer.save_model` (also what each checkpoint calls), with the training arguments as JSON instead of
        the pickled ``training_args.bin``."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            write_text_atomic(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())

    def _issue_warnings_after_load(self, load_result) -> None:
        """Trainer's warnings after ``--resume`` loads a checkpoint, without the base LM's frozen weights: a
        checkpoint does not store them by design (``_keys_to_ignore_on_load_missing``), so they are always
        "missing" and the warning said nothing."""
        ignore = [re.compile(p) for p in self.accelerator.unwrap_model(self.model)._keys_to_ignore_on_load_missing]
        missing = [k for k in load_result.missing_keys if not any(p.search(k) for p in ignore)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

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
        inputs = dict(inputs)
        if model.training and self.args.vq_warmup_steps > 0:
            self._vq_warmup(self.accelerator.unwrap_model(model))
        if model.training and "question_doc_index" in inputs:
            inputs["contrastive_doc_index"] = inputs["question_doc_index"]  # used when contrastive_loss_weight > 0
        if self.state.global_step >= self.args.gold_only_steps or not model.training:
            inputs.pop("question_doc_index", None)
            unwrapped = self.accelerator.unwrap_model(model)
            if model.training and self.args.read_retrieved and unwrapped.uses_vocabulary_codebook:
                # read what addressing picks from the bank of all training documents, wrong ones included
                if self._retrieval_bank is None:
                    texts = list(dict.fromkeys(self.train_dataset["context"]))
                    self._retrieval_bank = document_codes(unwrapped, texts)  # (N_train, T)
                for key in ("context_input_ids", "context_attention_mask", "contrastive_doc_index"):
                    inputs.pop(key, None)
                inputs["memory"] = unwrapped.token_memory(self._retrieval_bank.to(inputs["input_ids"].device))
        outputs = model(**inputs)
        if model.training and outputs.addressing_loss is not None and self.args.addressing_grad_ratio >= 0:
            self._budget_addressing(model, outputs)
        if model.training:
            for key in ("qa_loss", "vq_loss", "perplexity", "reconstruction_loss", "contrastive_loss",
                        "distillation_loss", "addressing_loss"):
                value = getattr(outputs, key)
                if value is not None:  # a batch's perplexity is capped at its B·T vectors: logged as such
                    self._log_part("batch_perplexity" if key == "perplexity" else key, float(value.detach()))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _log_part(self, key: str, value: float) -> None:
        """Add a value to the running mean that the next `log` reports under ``key``."""
        total, count = self._parts.get(key, (0.0, 0))
        self._parts[key] = (total + value, count + 1)

    def _budget_addressing(self, model, outputs) -> None:
        """The addressing loss's gradient budget (``addressing_grad_ratio`` = r; not in the paper): with
        g_rest and g_addr the gradients of (loss − w·addressing_loss) and of w·addressing_loss on the trainable
        parameters outside the key heads, the addressing gradient that leaves the key heads is scaled by
        ``min(1, r·|g_rest| / |g_addr|)`` (`LearnedAddressing.feature_grad_scale`). Two extra backward passes
        (``torch.autograd.grad``, graph retained); logged as ``addressing_grad_scale``. During the VQ warm-up the
        scale is 0: the float memory path learns from the QA loss alone (on SmolLM2 the addressing gradient took
        the whole warm-up otherwise, docs/findings.md)."""
        unwrapped = self.accelerator.unwrap_model(model)
        addressing = unwrapped.addressing
        if getattr(self, "_warming", False):  # float memory first: the addressing loss trains the key heads only
            addressing.feature_grad_scale = 0.0
            return self._log_part("addressing_grad_scale", 0.0)
        keys = {id(p) for p in addressing.parameters()}
        shared = [p for p in unwrapped.parameters() if p.requires_grad and id(p) not in keys]
        if not shared:
            return
        weighted = unwrapped.config.addressing_loss_weight * outputs.addressing_loss
        addressing.feature_grad_scale = 1.0
        rest, addr = _grad_norm(outputs.loss - weighted, shared), _grad_norm(weighted, shared)
        addressing.feature_grad_scale = min(1.0, self.args.addressing_grad_ratio * rest / max(addr, 1e-12))
        self._log_part("addressing_grad_scale", addressing.feature_grad_scale)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            logs.update({k: round(total / count, 4) for k, (total, count) in self._parts.items()})
            logs["gold_only"] = float(self.state.global_step <= self.args.gold_only_steps)
            self._parts = {}
            amortization = self.accelerator.unwrap_model(self.model).amortization
            cache = amortization.state_cache if amortization is not None else None
            if cache is not None and cache.hits + cache.misses:  # cumulative share of rows not encoded again
                logs["encoder_cache_hit_rate"] = round(cache.hits / (cache.hits + cache.misses), 4)
            codebook = self.accelerator.unwrap_model(self.model).codebook
            if hasattr(codebook, "usage_perplexity"):  # the learned codebook's health (issue 35)
                logs["codebook_resets"] = float(codebook.num_resets - self._resets_logged)
                logs["codebook_usage_perplexity"] = round(codebook.usage_perplexity(), 2)
                self._resets_logged = codebook.num_resets
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Memory gain on the first ``memory_gain_questions`` eval rows (one row per document; with
        ``memory_gain_article_pairs``, on that many documents in same-article pairs), plus EM/F1 after
        online adaptation on the eval documents when ``eval_max_questions`` > 0. Metrics are logged and returned
        with the ``eval_`` prefix (e.g. ``eval_memory_gain``, usable as ``metric_for_best_model``).

        With several processes (DDP) the codebook is first made identical on all of them (`sync_codebook`), every
        process memorizes a share of the eval documents and answers a share of the questions, and codes and
        answers are gathered (`evaluate_online_distributed`): the bank, and so the metrics, equal the
        single-process ones on every process. The memory gain is computed in full on each process. The bank of the
        online evaluation is kept in ``self.eval_memory_bank`` (None when ``eval_max_questions`` is 0).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        sync_codebook(model)
        start = time.time()
        size, limit = self.args.per_device_eval_batch_size, self.args.memory_gain_questions or None
        if self.args.memory_gain_article_pairs:
            batches, partners = self._article_pair_batches(dataset), paired_partners(size)
        else:
            rows = first_row_per_document(dataset, limit)
            batches, partners = [rows[i:i + size] for i in range(0, len(rows), size)], None
        metrics, collate = {}, self.eval_collator(dataset)
        for rows_ in batches:
            part = memory_gain(model, collate(rows_), partners)
            for k, v in part.items():
                metrics.setdefault(k, []).append(v)
        metrics = {k: sum(v) / len(v) for k, v in metrics.items()}
        if hasattr(model.codebook, "usage_perplexity") and model.config.use_vq and self.args.eval_codes_docs > 0:
            texts = [r["context"] for r in first_row_per_document(dataset, self.args.eval_codes_docs)]
            metrics["distinct_codes"] = distinct_codes(model, texts)
        self.eval_memory_bank = None
        if self.args.eval_max_questions > 0:
            from .evaluation import evaluate_online

            subset = dataset.select(range(min(len(dataset), self.args.eval_max_questions)))
            if self.accelerator.num_processes > 1:
                online = evaluate_online_distributed(model, subset, self.accelerator)
            else:
                online = evaluate_online(model, subset, show_progress=False)
            self.eval_memory_bank = online.pop("memory_bank")
            metrics.update({k: v for k, v in online.items() if k != "predictions"})
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if not (isinstance(v, float)
                                                                                     and math.isnan(v))}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
        model.eval_metrics = metrics
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def _grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    """L2 norm of d loss / d params (the graph is kept for the real backward)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


# ---------------------------------------------------------------------------------------------- multi-process
def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync_codebook(model, src: int = 0) -> bool:
    """Copy the VQ codebook (its floating-point parameters and buffers) of process ``src`` to every process.

    Online resetting (`VectorQuantizer._reset_dead_codes`) writes encoder outputs of the *local* batch into the
    codebook weights during the forward; DDP averages gradients but never re-synchronises parameters, so without
    this the processes' codebooks drift apart (seen with 2 CPU processes after a few steps) and their codes
    mean different things. Needs replicated parameters (DDP, DeepSpeed ZeRO-1/2), not sharded ones (FSDP,
    ZeRO-3). Returns False (and does nothing) without an initialised process group of more than one process.
    """
    if _world_size() <= 1:
        return False
    codebook = getattr(model, "module", model).codebook
    for tensor in [*codebook.parameters(), *codebook.buffers()]:
        if tensor.dtype != torch.bool:  # the float codes and usage, and the integer unused-step counts
            torch.distributed.broadcast(tensor.data, src=src)
    return True


class CodebookSyncCallback(TrainerCallback):
    """After every optimizer step, `sync_codebook` (process 0's codebook to all processes); a no-op with one
    process. `MBCTrainer` adds it itself.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            sync_codebook(model)


def shard_in_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Row numbers of process ``rank`` of ``world`` when ``n`` rows are cut into batches of ``batch_size`` (as a
    single process would batch them) and whole batches are dealt out round-robin. Each row belongs to exactly one
    process, and each row is computed in the same batch as in a single process (same padding, same numbers)."""
    return [i for start in range(rank * batch_size, n, world * batch_size)
            for i in range(start, min(start + batch_size, n))]


def gather_rows(accelerator, index: torch.Tensor, values: torch.Tensor, total: int) -> torch.Tensor:
    """Rows spread over processes -> all ``total`` rows in order, on every process (tensor gathers only).

    Args:
        accelerator: the trainer's `accelerate.Accelerator`.
        index: (n,) int64, the global row numbers this process holds (any order; n may differ per process).
        values: (n, ...) those rows (same trailing shape and dtype on every process).
        total: number of rows over all processes.

    Returns:
        (total, ...) CPU tensor, row i = the row whose index is i.

    Raises:
        RuntimeError: the processes together do not hold each of 0..total-1 exactly once (a row lost or held
            twice).
    """
    device = accelerator.device
    width = int(accelerator.gather(torch.tensor([index.numel()], device=device)).max())
    pad = width - index.numel()
    index = torch.cat([index.long(), index.new_full((pad,), -1, dtype=torch.long)]).to(device)
    values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))]).to(device)
    all_index, all_values = accelerator.gather(index).cpu(), accelerator.gather(values).cpu()
    keep = all_index >= 0
    all_index, all_values = all_index[keep], all_values[keep]
    order = torch.argsort(all_index)
    if all_index.numel() != total or not torch.equal(all_index[order], torch.arange(total)):
        raise RuntimeError(f"gathered {all_index.numel()} rows for {total}: rows "
                           f"{sorted(set(range(total)) - set(all_index.tolist()))[:5]} missing or some held twice")
    return all_values[order]


def gather_texts(accelerator, index: torch.Tensor, texts: list[str], total: int) -> list[str]:
    """`gather_rows` for strings (UTF-8 bytes in an int64 tensor, column 0 = byte length)."""
    encoded = [t.encode("utf-8") for t in texts]
    local = max((len(b) for b in encoded), default=0)
    width = int(accelerator.gather(torch.tensor([local], device=accelerator.device)).max())
    rows = torch.zeros((len(encoded), width + 1), dtype=torch.long)
    for r, b in enumerate(encoded):
        rows[r, 0] = len(b)
        rows[r, 1:len(b) + 1] = torch.tensor(list(b), dtype=torch.long)
    gathered = gather_rows(accelerator, index, rows, total)
    return [bytes(row[1:1 + int(row[0])].tolist()).decode("utf-8") for row in gathered]


def evaluate_online_distributed(model, dataset, accelerator, aggregation: str | None = None,
                                compress: bool | None = None, max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """`mbc_hf.evaluation.evaluate_online` split over the processes of ``accelerator``; same arguments and keys.

    Each process memorizes its `shard_in_batches` of the unique documents, the codes (or dense vectors) are
    gathered with `gather_rows`, and every process builds the same bank with the documents in file order, equal to
    the single-process bank (same batches, same codebook: call `sync_codebook` first). Each process then answers
    its share of the questions against that bank (`evaluate_online` with ``adapt=False``) and the answers are
    gathered (`gather_texts`) and scored once. ``adapt_ms_per_doc`` and ``query_ms`` are wall times of the
    distributed phases divided by all documents / questions; ``peak_rss_mb`` is this process's.

    Raises:
        RuntimeError: a document or answer was lost or duplicated in the gather.
    """
    from .data import documents
    from .evaluation import evaluate_online, peak_rss_mb, score

    rank, world = accelerator.process_index, accelerator.num_processes
    compress = model.config.use_vq if compress is None else compress
    docs = documents(dataset)
    start = time.perf_counter()
    mine = shard_in_batches(len(docs), batch_size, rank, world)
    ids = [docs[i][0] for i in mine]
    local = model.memorize([docs[i][1] for i in mine], doc_ids=ids, batch_size=batch_size, compress=compress)
    values = local.get_codes(ids).long() if compress else local.get_vectors(ids).float()
    rows = gather_rows(accelerator, torch.tensor(mine, dtype=torch.long), values, len(docs))
    bank = model.new_memory_bank(compress)
    if docs:
        bank.extend([doc_id for doc_id, _ in docs], rows)
    adapt_ms = (time.perf_counter() - start) * 1000 / max(len(docs), 1)

    start = time.perf_counter()
    mine = shard_in_batches(len(dataset), batch_size, rank, world)
    local_predictions = evaluate_online(model, dataset.select(mine), memory_bank=bank, aggregation=aggregation,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False,
                                        adapt=False)["predictions"] if mine else []
    predictions = gather_texts(accelerator, torch.tensor(mine, dtype=torch.long), local_predictions, len(dataset))
    query_ms = (time.perf_counter() - start) * 1000 / max(len(dataset), 1)
    return {**score(predictions, dataset), "n_docs": len(bank), "n_questions": len(dataset), "bank_bytes": bank.nbytes,
            "bytes_per_doc": bank.nbytes / max(len(bank), 1), "adapt_ms_per_doc": adapt_ms, "query_ms": query_ms,
            "peak_rss_mb": peak_rss_mb(), "predictions": predictions, "memory_bank": bank}
