"""A codebook tied to the LM's vocabulary (``MBCConfig.codebook_type="vocabulary"``; not in the paper).

MBC's learned codebook (K = 512, `VectorQuantizer`) is a clustering: on this package's CPU runs with SmolLM2-135M its
12 codes per document carried no answer-relevant content (docs/findings.md). Here the code of a context
vector is a token of the LM's vocabulary, so a code names a token the LM can read and copy:

    document tokens (S,)  --select: the T distinct tokens that score highest-->  codes (T,) int64 in [0, V)
    codes (T,)            --read by the LM as input tokens-->                    prefix key/values

The "amortization" is that selection, fitted once on the training set and saved with the model:

* ``selector="idf"``: a token's score is its IDF over the training documents (`fit`);
* ``selector="trained"``: a token scorer supervised by the training questions and answers (`fit_selector`; in the
  spirit of LLMLingua-2's token classification and of MAC's "salient spans" baseline): ``score = w · features +
  bias[token]``, with features (IDF, log(1 + count in the document), first position / length, 1) and a learned
  bias per vocabulary token, trained by logistic regression to predict the document tokens that occur in its
  questions or answers.

``whole_words`` selects whole words (a word scores as its best token and brings all of its tokens) instead of word
pieces; ``order="document"`` keeps the selected codes in the order they first occur in the document (a telegraphic
summary the LM reads left to right), ``order="importance"`` best first. The codebook is the LM's own vocabulary
(nothing to learn, nothing to reset), and a bank stores T uint16 codes per document (V <= 65,536): 2·T bytes.
Addressing a bank by these codes is `mbc_hf.addressing`.
"""

import hashlib
import math

import torch
from torch import nn

from .configuration_mbc import CODE_ORDERS, CODE_SELECTORS as SELECTORS

NUM_FEATURES = 4  # idf, log(1 + count), first position / length, 1
WEIGHT_SCALE = 2.0 ** 20  # addressing weights are multiples of 1 / WEIGHT_SCALE: their sums are exact in float64


class VocabularyCodebook(nn.Module):
    """Token selection over a vocabulary of V tokens.

    Args:
        vocab_size: V, the LM's vocabulary size (the codebook size K).
        num_tokens: T, codes per document.
        pad_code: the code that fills a document with fewer than T selectable tokens (the LM's eos or pad id); it
            has IDF 0, so it never counts towards an addressing score.
        selector: "idf" or "trained" (see the module docstring).
        order: "importance" or "document".
        whole_words: select whole words rather than word pieces.

    Buffers (saved in ``model.safetensors``): ``idf`` (V,) float32, all 0 until `fit`; with ``selector="trained"``
    ``selector_bias`` (V,) and ``selector_weight`` (4,) float32 (`fit_selector`); with ``whole_words``
    ``word_start`` (V,) bool, the tokens that begin a word (`fit_words`).
    """

    def __init__(self, vocab_size: int, num_tokens: int, pad_code: int, selector: str = "idf",
                 order: str = "importance", whole_words: bool = False):
        super().__init__()
        if selector not in SELECTORS or order not in CODE_ORDERS:
            raise ValueError(f"selector must be one of {SELECTORS} and order one of {CODE_ORDERS}; got "
                             f"{selector!r}, {order!r}.")
        self.codebook_size, self.num_tokens, self.pad_code = vocab_size, num_tokens, pad_code
        self.selector, self.order, self.whole_words = selector, order, whole_words
        self.register_buffer("idf", torch.zeros(vocab_size))
        if selector == "trained":
            self.register_buffer("selector_bias", torch.zeros(vocab_size))
            self.register_buffer("selector_weight", torch.zeros(NUM_FEATURES))
        if whole_words:
            self.register_buffer("word_start", torch.ones(vocab_size, dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        return bool(self.idf.abs().sum() > 0)

    @torch.no_grad()
    def fit(self, documents: list[list[int]], special_ids: list[int] = ()) -> torch.Tensor:
        """Set ``idf[t] = ln((1 + N) / (1 + df_t)) + 1`` (smoothed IDF, as scikit-learn's) over N tokenized
        documents; a token in no document gets the largest value (as rare as the rarest). ``pad_code`` and
        ``special_ids`` (the tokenizer's BOS/EOS/pad...) get 0: they are never selected and never score. Returns
        ``idf`` (V,) float32.

        Raises:
            ValueError: no documents, or a token id outside [0, V).
        """
        if not documents:
            raise ValueError("fit needs at least one tokenized document.")
        df = torch.zeros(self.codebook_size)
        for ids in documents:
            df[self._unique(ids)] += 1
        self.idf.copy_(torch.log((1 + len(documents)) / (1 + df)) + 1)
        self.idf[[self.pad_code, *special_ids]] = 0.0
        if self.selector == "trained":  # until fit_selector, the trained selector ranks by IDF alone
            self.selector_weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
            self.selector_bias.zero_()
        return self.idf

    def _unique(self, ids: list[int]) -> torch.Tensor:
        unique = torch.tensor(sorted(set(ids)), dtype=torch.long)
        if len(unique) and (unique[0] < 0 or unique[-1] >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}); got {unique[0]}..{unique[-1]}: "
                             "tokenize with the LM's tokenizer.")
        return unique

    @torch.no_grad()
    def fit_words(self, token_strings: list[str]) -> None:
        """Set ``word_start`` from the V token strings of the LM's vocabulary (``tokenizer.convert_ids_to_tokens``):
        a token begins a word when it starts with a byte-level space ("Ġ"), a SentencePiece space ("▁"), a space,
        or is not alphanumeric (punctuation). Needs ``whole_words=True``."""
        starts = [not s or s[0] in "Ġ▁ \n" or not s[0].isalnum() for s in token_strings]
        self.word_start.copy_(torch.tensor(starts[:self.codebook_size] + [True] * (self.codebook_size - len(starts))))

    def _features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S,) int64 tokens of one document -> (unique tokens (U,), first position (U,), features (U, 4))."""
        unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        first = torch.full((len(unique),), len(ids), dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(ids)), reduce="amin")
        features = torch.stack([self.idf.cpu()[unique], torch.log1p(counts.float()),
                                first.float() / max(len(ids), 1), torch.ones(len(unique))], dim=1)
        return unique, first, features

    def token_scores(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S,) int64 tokens of one document -> (unique tokens (U,) ascending, their first position (U,), their
        selection score (U,) float32; -inf for tokens of IDF 0, which are never selected)."""
        unique, first, features = self._features(ids)
        if self.selector == "trained":
            score = features @ self.selector_weight.cpu() + self.selector_bias.cpu()[unique]
        else:
            score = features[:, 0].clone()
        return unique, first, score.masked_fill(features[:, 0] <= 0, float("-inf"))

    @torch.enable_grad()
    def fit_selector(self, documents: list[list[int]], targets: list[set[int]], steps: int = 300,
                     lr: float = 0.05, bias_l2: float = 1e-4) -> float:
        """Train the token scorer (``selector="trained"``; call after `fit`): full-batch logistic regression (Adam,
        ``steps``) of "this document token occurs in one of the document's questions or answers" on the features
        and a per-token bias (L2 ``bias_l2``). Deterministic. Returns the final loss (nats per token).

        Args:
            documents: N tokenized documents (LM token ids). targets: N sets, the tokens of each document's
                questions and answers.

        Raises:
            ValueError: not a trained selector, IDF not fitted, or lengths that differ.
        """
        if self.selector != "trained" or not self.fitted or len(documents) != len(targets) or not documents:
            raise ValueError("fit_selector needs selector='trained', a fitted IDF (fit first) and one target set per "
                             f"document (got {len(documents)} documents, {len(targets)} target sets).")
        tokens, features, labels = [], [], []
        for ids, target in zip(documents, targets):
            unique, _, f = self._features(torch.tensor(ids, dtype=torch.long))
            keep = f[:, 0] > 0
            tokens.append(unique[keep]), features.append(f[keep])
            labels.append(torch.tensor([t in target for t in unique[keep].tolist()], dtype=torch.float32))
        tokens, features, labels = torch.cat(tokens), torch.cat(features), torch.cat(labels)
        weight = torch.zeros(NUM_FEATURES, requires_grad=True)
        bias = torch.zeros(self.codebook_size, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            logits = features @ weight + bias[tokens]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels) + bias_l2 * bias.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            self.selector_weight.copy_(weight)
            self.selector_bias.copy_(bias)
        return float(loss.detach())

    def _pick(self, ids: torch.Tensor) -> torch.Tensor:
        """(S,) tokens of one document -> up to T distinct codes, in ``order``."""
        unique, first, score = self.token_scores(ids)
        ranked = torch.argsort(-score, stable=True)  # ties: lower token id first
        ranked = ranked[score[ranked] > float("-inf")]
        if not self.whole_words or not len(ids):
            chosen = ranked[:self.num_tokens]
        else:  # a word scores as its best token; take whole words, best first, while they fit
            slots = torch.searchsorted(unique, ids).tolist()  # position of each document token in `unique`
            starts, scores = self.word_start.cpu()[ids].tolist(), score.tolist()
            words: list[list[int]] = []
            for slot, start in zip(slots, starts):
                if start or not words:
                    words.append([])
                words[-1].append(slot)
            taken, chosen = set(), []
            for word in sorted(words, key=lambda w: -max(scores[s] for s in w)):  # stable: earlier words first
                pieces = [s for s in dict.fromkeys(word) if s not in taken and scores[s] > float("-inf")]
                if pieces and len(chosen) + len(pieces) <= self.num_tokens:
                    chosen += pieces
                    taken.update(pieces)
            chosen = torch.tensor(chosen, dtype=torch.long)
        if self.order == "document":
            chosen = chosen[torch.argsort(first[chosen], stable=True)]
        return unique[chosen]

    def select(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, S) int64 LM tokens (+ (N, S) mask, 0 = padding; without it every position counts) -> (N, T) int64
        codes: each document's T distinct tokens of highest score (ties: lower token id first), in ``order``,
        padded with ``pad_code``. Tokens of IDF 0 (``pad_code``, special tokens) are never selected.

        Raises:
            ValueError: the IDF was never fitted (every document would select the same tokens).
        """
        if not self.fitted:
            raise ValueError("the vocabulary codebook's IDF is not fitted: call model.codebook.fit(tokenized "
                             "training documents) or train with MBCTrainer, which fits it before the first step.")
        codes = torch.full((input_ids.shape[0], self.num_tokens), self.pad_code, dtype=torch.long)
        mask = None if attention_mask is None else attention_mask.cpu().bool()
        for row, ids in enumerate(input_ids.cpu()):
            top = self._pick(ids if mask is None else ids[mask[row]])
            codes[row, :len(top)] = top
        return codes.to(input_ids.device)

    def question_weights(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S) int64 question LM tokens (+ mask, 0 = padding) -> (B, V) float64 addressing weights: the IDF of
        each distinct question token, 0 elsewhere (a token repeated in the question counts once), rounded to a
        multiple of 2^-20 so that any sum of a document's weights is exact in float64 whatever the order of its
        codes: brute-force scoring and the inverted index (`mbc_hf.addressing`) then agree to the bit."""
        idf = torch.round(self.idf.double() * WEIGHT_SCALE) / WEIGHT_SCALE
        idf = idf.to(question_ids.device)[question_ids]  # (B, S)
        if question_mask is not None:
            idf = idf * question_mask.to(idf.dtype)
        weights = torch.zeros(question_ids.shape[0], self.codebook_size, dtype=torch.float64,
                              device=question_ids.device)
        # amax keeps a real token's IDF if its id is also padding
        return weights.scatter_reduce(1, question_ids, idf, reduce="amax")

    def score(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None, codes: torch.Tensor,
              chunk: int = 16384) -> torch.Tensor:
        """Addressing score of each question for each document, by brute force: the summed IDF of the question's
        distinct tokens that are among the document's codes (`mbc_hf.addressing.score_codes`).

        Args:
            question_ids / question_mask: (B, S) int64 LM tokens of the questions, ids in [0, V) (mask 0 = padding).
            codes: (B or 1, N, T) int64, the documents' codes, in [0, V).

        Returns:
            (B, N) float64.
        """
        from .addressing import score_codes

        return score_codes(self.question_weights(question_ids, question_mask), codes, chunk)

    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 over V, the selection options and the fitted buffers (IDF, selector, word starts):
        what decides a document's codes. A bank records it to refuse codes selected otherwise. (An IDF-selected,
        importance-ordered, word-piece codebook hashes as before the options existed, so its banks stay valid.)"""
        digest = hashlib.sha256(f"vocabulary:{self.codebook_size}".encode())
        digest.update(self.idf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if (self.selector, self.order, self.whole_words) != ("idf", "importance", False):
            digest.update(f"{self.selector}:{self.order}:{self.whole_words}".encode())
        for name in ("selector_bias", "selector_weight", "word_start"):
            if hasattr(self, name):
                digest.update(getattr(self, name).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def extra_repr(self) -> str:
        bits = math.log2(self.codebook_size)
        return (f"vocab_size={self.codebook_size}, num_tokens={self.num_tokens}, bits_per_code={bits:.1f}, "
                f"selector={self.selector}, order={self.order}, whole_words={self.whole_words}")
