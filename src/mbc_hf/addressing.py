"""Addressing: which documents of a bank a question reads (design.md, part 3).

With set aggregation a compressed bank is only its code histogram (`mbc_hf.aggregator`), so answering from one
document among thousands needs addressing: rank the bank's documents for the question, then read *their* codes.
For a vocabulary codebook the score of document n for a question is the summed weight of the question's distinct
tokens found among the document's codes (`VocabularyCodebook.question_weights`: their IDF):

    score[b, n] = sum_t  weights[b, t] · count_n(t)        (count_n(t): how often code t is in row n)

`score_codes` computes it by brute force (O(B·N·T)); `CodeIndex` holds the same codes as posting lists (for each
token, the documents holding it) and searches them with MaxScore, so a question reads the lists of its rare tokens
and stops before the long lists of its common ones; it returns exactly the brute-force ranking (scores in float64,
ties broken towards the earlier document). `bank_index` caches a `BankIndex` on a bank: `CodeIndex` segments that
grow with its appends, so streaming into a large bank does not rebuild the index. The ranked ids and scores are also
the answer's attribution (``answer(..., return_sources=True)``).

Abstention (``MBCConfig.relevance_threshold``): `relevance` makes the best document's score comparable across
questions (it divides by what the question could score at most), and a question whose relevance is below the
threshold reads no document. `calibrate_threshold` picks the threshold from the relevances of answerable training
questions (their document is in the bank) so that at most a given share of them is flagged.
"""

import numpy as np
import torch
from torch import nn


def score_codes(weights: torch.Tensor, codes: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Brute-force addressing scores.

    Args:
        weights: (B, V) float64, the weight of each vocabulary token for each question.
        codes: (B or 1, N, T) int64 codes in [0, V); documents are scored ``chunk`` at a time (memory O(B·chunk·T)).

    Returns:
        (B, N) float64.
    """
    b, t = weights.shape[0], codes.shape[-1]
    if codes.shape[-2] == 0:
        return weights.new_zeros(b, 0)
    return torch.cat([weights.gather(1, part.expand(b, -1, t).reshape(b, -1)).view(b, -1, t).sum(-1)
                      for part in codes.split(chunk, dim=-2)], dim=1)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) scores -> (scores (B, k), indices (B, k) int64), best first; ties: the earlier document."""
    order = scores.sort(dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def relevance(weights: torch.Tensor, best_scores: torch.Tensor) -> torch.Tensor:
    """How well the best document answers each question, comparable across questions.

    Args:
        weights: (B, V) float64 question weights (`VocabularyCodebook.question_weights`).
        best_scores: (B,) float64, each question's best addressing score (the first of `CodeIndex.search`).

    Returns:
        (B,) float64: ``best_scores / weights.sum(1)``, the share of the question's token weight found among the
        best document's codes (in [0, 1] for a document of distinct codes, as a vocabulary codebook selects; a code
        repeated in a row counts each time, as in the score), 0 for a question with no weighted token.
    """
    total = weights.double().sum(1)
    return torch.where(total > 0, best_scores.double().to(total.device) / total.clamp_min(1e-300),
                       torch.zeros_like(total))


def calibrate_threshold(answerable, max_flagged: float = 0.05) -> float:
    """The relevance threshold that flags (``relevance < threshold``) at most ``max_flagged`` of the answerable
    questions: the largest such value among the given relevances, i.e. the ``floor(max_flagged · n)``-th smallest
    (0-based). Any higher threshold would flag more than ``max_flagged`` of them.

    Args:
        answerable: relevances (`relevance`) of questions whose document is in the bank (1-D, at least one).
        max_flagged: the share of them that may be wrongly flagged as not grounded, in [0, 1).

    Raises:
        ValueError: no relevances, a non-finite one, or ``max_flagged`` outside [0, 1).
    """
    values = np.sort(np.asarray(answerable, dtype=np.float64).reshape(-1))
    if not len(values) or not np.isfinite(values).all():
        raise ValueError("calibrate_threshold needs at least one finite relevance of an answerable question.")
    if not 0 <= max_flagged < 1:
        raise ValueError(f"max_flagged={max_flagged} must be in [0, 1): the share of answerable questions that may be "
                         "flagged not grounded.")
    return float(values[int(np.floor(max_flagged * len(values)))])


def max_copies(codes: np.ndarray, vocab_size: int) -> np.ndarray:
    """(N, T) integer codes -> (V,) float64: the most copies of each code in any one row (at least 1)."""
    rows = np.sort(codes, axis=1)
    run = np.ones(rows.shape, dtype=np.int64)  # run[:, j]: copies of rows[:, j] among rows[:, :j + 1]
    for j in range(1, rows.shape[1]):
        same = rows[:, j] == rows[:, j - 1]
        run[same, j] = run[same, j - 1] + 1
    out = np.ones(vocab_size)
    repeated = run > 1
    np.maximum.at(out, rows[repeated], run[repeated])
    return out


class CodeIndex:
    """Inverted index over a bank's codes: exact `score_codes` ranking at a cost that follows the rare tokens.

    Args:
        codes: (N, T) integer codes in [0, V) (a `CompressedMemoryBank`'s ``codes``).
        vocab_size: V.

    Memory: the codes as int32 plus one int32 posting per code, 8·N·T bytes (the bank's own codes not counted).
    One search at a time per index (it reuses a scratch mask of N bools).

    ``search`` is MaxScore (Turtle & Flood, 1995), exact: a question's tokens are taken by weight, highest first;
    the documents of their posting lists are scored in full from their codes, and the search stops as soon as the
    k-th best score exceeds what a document holding none of the tokens taken so far could reach (the sum of the
    remaining weights, each times the most copies of that token in any one row). Common tokens of low weight, whose
    posting lists grow with the bank, are then never read. The result equals
    ``top_k(score_codes(weights, codes[None]), k)``, ties included, when every sum of weights is exact in float64
    (as `VocabularyCodebook.question_weights`, multiples of 2^-20, guarantees): the two add a document's weights in
    different orders.

    ``search(..., max_postings=L)`` is the approximate mode, whose cost does not grow with the bank: a posting list
    longer than L is read only up to its first L documents, so a question reads at most L documents per token
    whatever N is. Every document it returns still has its exact score (scored in full from its codes); what it may
    miss is a document found only through a truncated list (fewer than k found: the earliest others fill the list,
    also scored exactly). Its agreement with the exact ranking is measured by
    ``benchmarks/bank_scale.py --max-postings L``.
    """

    def __init__(self, codes: torch.Tensor, vocab_size: int):
        n, t = codes.shape
        self.codes = np.ascontiguousarray(np.asarray(codes, dtype=np.int32))  # (N, T)
        flat = self.codes.reshape(-1)
        keys = flat.astype(np.uint16) if vocab_size <= 1 << 16 else flat  # 16-bit keys: numpy's radix sort
        order = np.argsort(keys, kind="stable")  # by code, then by document (row-major flat order)
        self.documents = np.repeat(np.arange(n, dtype=np.int32), t)[order]  # posting lists, concatenated: (N·T,)
        self.indptr = np.zeros(vocab_size + 1, dtype=np.int64)  # code v's postings: documents[indptr[v]:indptr[v+1]]
        np.cumsum(np.bincount(flat, minlength=vocab_size), out=self.indptr[1:])
        self.max_copies = max_copies(self.codes, vocab_size)  # (V,) the bound on a code's count in one row
        self.num_docs, self.vocab_size = n, vocab_size
        self._seen = np.zeros(n, dtype=bool)  # scratch: documents scored by the current question (one at a time)

    def __len__(self) -> int:
        return self.num_docs

    def document_frequency(self) -> np.ndarray:
        """(V,) int64: how many codes of the bank equal each token (a document holding it twice counts twice)."""
        return np.diff(self.indptr)

    def search(self, weights: torch.Tensor, k: int, max_postings: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) float64 question weights (nonnegative) -> (scores (B, k') float64, indices (B, k') int64), best
        first, ties: the earlier document; k' = min(k, N). ``max_postings``: None for the exact ranking, or L > 0 to
        read at most L postings of each token (approximate, cost independent of N; see the class docstring).

        Raises:
            ValueError: a negative weight (the early stop assumes weights >= 0), or ``max_postings`` < 1.
        """
        if max_postings is not None and max_postings < 1:
            raise ValueError(f"CodeIndex.search: max_postings={max_postings}; use None (exact) or a positive cap")
        k = min(k, self.num_docs)
        w = weights.detach().cpu().double().numpy()
        if (w < 0).any():
            raise ValueError("CodeIndex.search: negative question weights; addressing weights are IDFs (>= 0)")
        out_scores = np.zeros((w.shape[0], k))
        out_index = np.zeros((w.shape[0], k), dtype=np.int64)
        for b in range(w.shape[0]):
            out_scores[b], out_index[b] = self._search_one(w[b], k, max_postings)
        return torch.from_numpy(out_scores), torch.from_numpy(out_index)

    def _search_one(self, w: np.ndarray, k: int, max_postings: int | None) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.flatnonzero(w)
        tokens = tokens[np.lexsort((tokens, -w[tokens]))]  # highest weight first
        reach = w[tokens] * self.max_copies[tokens]
        bound = np.concatenate([np.cumsum(reach[::-1])[::-1][1:], [0.0]])  # bound[j]: best score without 0..j
        docs, scores, best = [], [], np.zeros(0)
        kth = -np.inf
        try:
            for j, token in enumerate(tokens):
                end = self.indptr[token + 1] if max_postings is None else \
                    min(self.indptr[token + 1], self.indptr[token] + max_postings)
                new = self.documents[self.indptr[token]:end]  # sorted: copies are adjacent
                new = new[~self._seen[new]]
                new = new[np.r_[True, new[1:] != new[:-1]]] if len(new) else new
                if len(new):
                    docs.append(new)
                    self._seen[new] = True
                    scores.append(w[self.codes[new]].sum(1))
                    best = np.concatenate([best, scores[-1]])  # the k best scores so far
                    if len(best) > k:
                        best = np.partition(best, len(best) - k)[len(best) - k:]
                    if len(best) == k:
                        kth = best.min() if k else np.inf
                if kth > bound[j]:  # no unscored document can reach the k-th score: stop
                    break
        finally:  # the scratch mask is clean again, even if the search was interrupted
            for part in docs:
                self._seen[part] = False
        docs = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
        scores = np.concatenate(scores) if scores else np.zeros(0)
        keep = scores != 0
        docs, scores = docs[keep].astype(np.int64), scores[keep]
        order = np.lexsort((docs, -scores))[:k]  # by score descending, then by document
        docs, scores = docs[order], scores[order]
        if len(docs) < k:  # padded with the earliest documents not found (exact search: they match nothing, score 0)
            rest = np.setdiff1d(np.arange(min(self.num_docs, k + len(docs))), docs)[:k - len(docs)].astype(np.int64)
            docs, scores = np.concatenate([docs, rest]), np.concatenate([scores, w[self.codes[rest]].sum(1)])
            order = np.lexsort((docs, -scores))
            docs, scores = docs[order], scores[order]
        return scores, docs


class BankIndex:
    """A bank's addressing index kept in step with its appends: `CodeIndex` segments over consecutive row ranges.

    Each append is indexed as a new segment; the last two merge (are rebuilt as one) while the last is at least half
    the one before, so a bank has O(log N) segments and an append costs what it adds, amortised (as the bank's row
    chunks). ``search`` searches every segment and merges: each segment's top k is exact, so the merged top k is the
    `CodeIndex` ranking of the whole bank, ties (by row) and zero-score padding included.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.segments: list[tuple[int, CodeIndex]] = []  # (first row, index of rows first .. first + len)

    def __len__(self) -> int:
        return self.segments[-1][0] + len(self.segments[-1][1]) if self.segments else 0

    def extend(self, rows_from, num_rows: int) -> None:
        """Index rows ``len(self) .. num_rows``; ``rows_from(start)`` returns the bank's (num_rows - start, T) rows
        from ``start``. The segments the new one would merge with are absorbed first, so each is built once."""
        first = len(self)
        while self.segments and len(self.segments[-1][1]) <= 2 * (num_rows - first):
            first = self.segments.pop()[0]
        self.segments.append((first, CodeIndex(rows_from(first), self.vocab_size)))

    def search(self, weights: torch.Tensor, k: int, max_postings: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `CodeIndex.search` over all the rows: (scores (B, k') float64, row indices (B, k') int64);
        ``max_postings`` caps each segment's lists (approximate)."""
        if len(self.segments) == 1:
            return self.segments[0][1].search(weights, k, max_postings)
        if not self.segments:
            return weights.new_zeros(weights.shape[0], 0, dtype=torch.float64), torch.zeros(weights.shape[0], 0,
                                                                                             dtype=torch.int64)
        parts = [(index.search(weights, k, max_postings), first) for first, index in self.segments]
        scores = torch.cat([s for (s, _), _ in parts], dim=1).numpy()
        docs = torch.cat([d + first for (_, d), first in parts], dim=1).numpy()
        k = min(k, len(self))
        order = np.stack([np.lexsort((docs[b], -scores[b]))[:k] for b in range(scores.shape[0])])
        return (torch.from_numpy(np.take_along_axis(scores, order, 1)),
                torch.from_numpy(np.take_along_axis(docs, order, 1)))


def bank_index(bank) -> BankIndex:
    """The `BankIndex` of a `CompressedMemoryBank`, built on first use and cached on the bank: appends extend it
    (a new segment), overwrite and remove drop it (``bank._invalidate``) and it is rebuilt on next use."""
    cached = bank._code_index
    if cached is None or len(cached) > len(bank):
        cached = bank._code_index = BankIndex(bank.codebook_size)
    if len(cached) < len(bank):
        cached.extend(lambda start: bank._row_range(start, len(bank)), len(bank))
    return cached


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``owner.feature_grad_scale``, read at backward time
    (so a trainer can set it between the forward and the backward)."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.owner.feature_grad_scale, None


class LearnedAddressing(nn.Module):
    """Top-k addressing for a learned codebook (``aggregation="topk"``; CMT's top-k aggregation, not in MBC).

    A document's key is computed from its codes alone (the mean of its T decoded code vectors, or of the first
    ``key_codes`` of them, LayerNorm, linear), so the bank stays codes-only; a question's key comes from its
    question-encoder latents the same way. Each question reads the k documents of highest
    ``score = q · key / sqrt(a)``; the selection itself passes no gradient, so the keys are trained by the
    addressing loss (`loss`): cross-entropy of the gold document among the batch's documents.

    ``feature_grad_scale`` (float, default 1.0: plain end-to-end training) multiplies the addressing gradient that
    leaves the key heads for the features they read (code vectors, question latents), i.e. the share of it that
    reaches the memory path the QA loss trains too (amortization network, codebook, question encoder); the key heads
    themselves always get the full gradient. `mbc_hf.trainer.MBCTrainer` sets it at every step from
    ``addressing_grad_ratio`` (the gradient budget; docs/findings.md, "Learned top-k addressing").

    Args:
        dim: width of the code vectors and of the question latents (the LM's hidden size).
        key_dim: a, the width of the keys.
        key_codes: A, the key reads only the first A of a document's T code vectors (0: all T;
            ``MBCConfig.addressing_codes``). The addressing loss then shapes only those codes, and the others are
            left to the QA loss.
    """

    def __init__(self, dim: int, key_dim: int = 64, key_codes: int = 0):
        super().__init__()
        self.key_codes = key_codes
        self.document_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, key_dim))
        self.question_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, key_dim))
        self.scale = key_dim ** -0.5
        self.feature_grad_scale = 1.0

    def document_keys(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, T, d) float code vectors of N documents -> (N, a) keys (from the first ``key_codes`` of them)."""
        if self.key_codes:
            vectors = vectors[:, :self.key_codes]  # (N, A, d)
        return self.document_key(_ScaleGrad.apply(vectors, self).mean(1))

    def scores(self, latents: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T, d) question latents and (N, a) document keys -> (B, N) float scores."""
        return self.question_key(_ScaleGrad.apply(latents, self).mean(1)) @ keys.T * self.scale

    @staticmethod
    def select(vectors: torch.Tensor, scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best documents of each question and their code vectors.

        Args:
            vectors: (N, T, d) float, the documents' code vectors. scores: (B, N). k: documents read per question
                (fewer when N, or a row of ``allowed``, holds fewer). allowed: (B, N) bool or None.

        Returns:
            (indices (B, k) int64 best first, ties: the earlier document; vectors (B, k·T, d)).
        """
        scores = scores.detach()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
            k = min(k, int(allowed.sum(1).min()))
        _, docs = top_k(scores, min(k, vectors.shape[0]))
        return docs, vectors[docs].flatten(1, 2)  # (B, k, T, d) -> (B, k·T, d)

    @staticmethod
    def loss(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Addressing loss: mean cross-entropy of each question's gold document (B,) int64 among the (B, N) scores."""
        return nn.functional.cross_entropy(scores.float(), gold)
