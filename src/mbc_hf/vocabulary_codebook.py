"""A codebook tied to the LM's vocabulary (``MBCConfig.codebook_type="vocabulary"``; not in the paper).

MBC's learned codebook (K = 512, `VectorQuantizer`) is a clustering: on this package's CPU runs with SmolLM2-135M its
12 codes per document carried no answer-relevant content (README, "Is it the reader or the bank?"). Here the code
of a context vector is a token of the LM's vocabulary, so a code names a token the LM can read and copy:

    document tokens (S,)  --select: the T distinct tokens of highest IDF-->  codes (T,) int64 in [0, V)
    codes (T,)            --read by the LM as input tokens-->               prefix key/values

The "amortization" is that selection (IDF fitted once on the training documents, `fit`, and saved with the model),
the codebook is the LM's own vocabulary (nothing to learn, nothing to reset), and a bank stores T uint16 codes per
document (V <= 65,536), 24 bytes for T = 12. At question time `score` ranks a bank's documents by the IDF of the
question tokens they hold, and the LM (with KV-LoRA) reads the best documents' codes as input tokens
(`MBCModelForCausalLM.token_prefix`).
"""

import hashlib
import math

import torch
from torch import nn


class VocabularyCodebook(nn.Module):
    """IDF-ranked token selection over a vocabulary of V tokens.

    Args:
        vocab_size: V, the LM's vocabulary size (the codebook size K).
        num_tokens: T, codes per document.
        pad_code: the code that fills a document with fewer than T distinct tokens (the LM's eos or pad id); it has
            IDF 0, so it never counts towards a retrieval score.

    Buffers (saved in ``model.safetensors``): ``idf`` (V,) float32, all 0 until `fit`.
    """

    def __init__(self, vocab_size: int, num_tokens: int, pad_code: int):
        super().__init__()
        self.codebook_size, self.num_tokens, self.pad_code = vocab_size, num_tokens, pad_code
        self.register_buffer("idf", torch.zeros(vocab_size))

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
            unique = torch.tensor(sorted(set(ids)), dtype=torch.long)
            if len(unique) and (unique[0] < 0 or unique[-1] >= self.codebook_size):
                raise ValueError(f"token ids must lie in [0, {self.codebook_size}); got {unique[0]}..{unique[-1]}: "
                                 "tokenize with the LM's tokenizer.")
            df[unique] += 1
        self.idf.copy_(torch.log((1 + len(documents)) / (1 + df)) + 1)
        self.idf[[self.pad_code, *special_ids]] = 0.0
        return self.idf

    def select(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, S) int64 LM tokens (+ (N, S) mask, 0 = padding; without it every position counts) -> (N, T) int64
        codes: each document's T distinct tokens of highest IDF, highest first (ties: lower token id first), padded
        with ``pad_code``. Tokens of IDF 0 (``pad_code``, special tokens) are never selected.

        Raises:
            ValueError: the IDF was never fitted (every document would select the same tokens).
        """
        if not self.fitted:
            raise ValueError("the vocabulary codebook's IDF is not fitted: call model.codebook.fit(tokenized "
                             "training documents) or train with MBCTrainer, which fits it before the first step.")
        codes = torch.full((input_ids.shape[0], self.num_tokens), self.pad_code, dtype=torch.long)
        all_idf, mask = self.idf.cpu(), None if attention_mask is None else attention_mask.cpu().bool()
        for row, ids in enumerate(input_ids.cpu()):
            if mask is not None:
                ids = ids[mask[row]]
            unique = torch.unique(ids)  # ascending token id
            idf = all_idf[unique]
            unique, idf = unique[idf > 0], idf[idf > 0]
            top = unique[torch.argsort(-idf, stable=True)][:self.num_tokens]
            codes[row, :len(top)] = top
        return codes.to(input_ids.device)

    def score(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None, codes: torch.Tensor,
              chunk: int = 16384) -> torch.Tensor:
        """Retrieval score of each question for each document: the summed IDF of the question's distinct tokens
        that are among the document's codes (documents scored ``chunk`` at a time, so memory stays O(B·chunk·T)).

        Args:
            question_ids / question_mask: (B, S) int64 LM tokens of the questions, ids in [0, V) (mask 0 = padding).
            codes: (B or 1, N, T) int64, the documents' codes, in [0, V).

        Returns:
            (B, N) float32.
        """
        idf = self.idf.float().to(question_ids.device)[question_ids]  # (B, S)
        if question_mask is not None:
            idf = idf * question_mask.to(idf.dtype)
        # a token repeated in the question counts once; amax keeps a real token's IDF if its id is also padding
        weights = torch.zeros(question_ids.shape[0], self.codebook_size, device=question_ids.device)
        weights = weights.scatter_reduce(1, question_ids, idf, reduce="amax")  # (B, V)
        b, t = question_ids.shape[0], codes.shape[-1]
        return torch.cat([weights.gather(1, part.expand(b, -1, t).reshape(b, -1)).view(b, -1, t).sum(-1)
                          for part in codes.split(chunk, dim=-2)], dim=1)

    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 over V and the IDF (fp32 bytes): what decides a document's codes. A bank records
        it to refuse codes selected with another IDF."""
        digest = hashlib.sha256(f"vocabulary:{self.codebook_size}".encode())
        digest.update(self.idf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def extra_repr(self) -> str:
        bits = math.log2(self.codebook_size)
        return f"vocab_size={self.codebook_size}, num_tokens={self.num_tokens}, bits_per_code={bits:.1f}"
