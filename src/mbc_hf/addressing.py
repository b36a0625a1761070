"""Addressing: which documents of a bank a question reads (design.md, part 3).

With set aggregation a compressed bank is only its code histogram (`mbc_hf.aggregator`), so answering from one
document among thousands needs addressing: rank the bank's documents for the question, then read *their* codes.
For a vocabulary codebook the score of document n for a question is the summed weight of the question's distinct
tokens found among the document's codes (`VocabularyCodebook.question_weights`: their IDF):

    score[b, n] = sum_t  weights[b, t] · count_n(t)        (count_n(t): how often code t is in row n)

`score_codes` computes it by brute force (O(B·N·T)); `CodeIndex` holds the same counts as an inverted index
(a ``scipy.sparse`` CSC matrix, V × N), so a question touches only the documents that share one of its tokens, and
returns exactly the brute-force ranking (scores in float64, ties broken towards the earlier document). The ranked
ids and scores are also the answer's attribution (``answer(..., return_sources=True)``).
"""

import numpy as np
import torch
from scipy import sparse
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


class CodeIndex:
    """Inverted index over a bank's codes: exact `score_codes` ranking at a cost that follows the matches.

    Args:
        codes: (N, T) integer codes in [0, V) (a `CompressedMemoryBank`'s ``codes``).
        vocab_size: V.

    ``search`` equals ``top_k(score_codes(weights, codes[None]), k)``, ties included, when every sum of weights is
    exact in float64 (as `VocabularyCodebook.question_weights`, multiples of 2^-20, guarantees): the two add a
    document's weights in different orders.
    """

    def __init__(self, codes: torch.Tensor, vocab_size: int):
        n, t = codes.shape
        rows = np.asarray(codes, dtype=np.int64).reshape(-1)
        docs = np.repeat(np.arange(n, dtype=np.int64), t)
        counts = sparse.coo_matrix((np.ones(n * t, dtype=np.float64), (rows, docs)), shape=(vocab_size, n))
        self.postings = counts.tocsr()  # (V, N): row t lists the documents holding code t, with counts
        self.num_docs, self.vocab_size = n, vocab_size

    def __len__(self) -> int:
        return self.num_docs

    def search(self, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) float64 question weights -> (scores (B, k') float64, indices (B, k') int64), best first, ties: the
        earlier document; k' = min(k, N)."""
        k = min(k, self.num_docs)
        w = weights.detach().cpu().double()
        rows, cols = w.nonzero(as_tuple=True)  # a question has a few dozen nonzero weights out of V
        w = sparse.csr_matrix((w[rows, cols].numpy(), (rows.numpy(), cols.numpy())), shape=tuple(w.shape))
        matched = (w @ self.postings).tocsr()  # (B, N), nonzero only where a question token is among the codes
        out_scores = np.zeros((weights.shape[0], k))
        out_index = np.zeros((weights.shape[0], k), dtype=np.int64)
        for b in range(weights.shape[0]):
            start, end = matched.indptr[b], matched.indptr[b + 1]
            docs, vals = matched.indices[start:end], matched.data[start:end]
            keep = vals != 0
            docs, vals = docs[keep], vals[keep]
            order = np.lexsort((docs, -vals))[:k]  # by score descending, then by document
            docs, vals = docs[order], vals[order]
            if len(docs) < k:  # the rest score 0: the earliest documents that matched nothing
                rest = np.setdiff1d(np.arange(min(self.num_docs, k + len(docs))), docs, assume_unique=False)
                docs = np.concatenate([docs, rest[:k - len(docs)]])
                vals = np.concatenate([vals, np.zeros(k - len(vals))])
            out_scores[b], out_index[b] = vals, docs
        return torch.from_numpy(out_scores), torch.from_numpy(out_index)


def bank_index(bank) -> CodeIndex:
    """The `CodeIndex` of a `CompressedMemoryBank`, built on first use and cached on the bank until it changes
    (``bank._invalidate`` drops it on overwrite/remove; appends rebuild it)."""
    cached = getattr(bank, "_code_index", None)
    if cached is None or len(cached) != len(bank):
        cached = CodeIndex(bank.codes, bank.codebook_size)
        bank._code_index = cached
    return cached


class LearnedAddressing(nn.Module):
    """Top-k addressing for a learned codebook (``aggregation="topk"``; CMT's top-k aggregation, not in MBC).

    A document's key is computed from its codes alone (the mean of its T decoded code vectors, LayerNorm, linear),
    so the bank stays codes-only; a question's key comes from its question-encoder latents the same way. Each
    question reads the k documents of highest ``score = q · key / sqrt(a)``; the selection itself passes no
    gradient, so the keys are trained by the addressing loss (`loss`): cross-entropy of the gold document among the
    batch's documents.

    Args:
        dim: width of the code vectors and of the question latents (the LM's hidden size).
        key_dim: a, the width of the keys.
    """

    def __init__(self, dim: int, key_dim: int = 64):
        super().__init__()
        self.document_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, key_dim))
        self.question_key = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, key_dim))
        self.scale = key_dim ** -0.5

    def document_keys(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, T, d) float code vectors of N documents -> (N, a) keys."""
        return self.document_key(vectors.mean(1))

    def scores(self, latents: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T, d) question latents and (N, a) document keys -> (B, N) float scores."""
        return self.question_key(latents.mean(1)) @ keys.T * self.scale

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
