"""The aggregator of MAC/MBC: cross-attention from question latents to the memory (MAC §3.2; reference
``models/modules/aggregate.py``), with an exact O(K) *histogram* form for compressed banks.

Every block reads the same memory (keys/values come from the memory vectors, never from the block's output). In a
compressed bank a stored vector is a code vector ``c_k``, so its key and value depend only on ``k``: attention over
all N·T stored vectors equals attention over the K code vectors with ``log(count_k)`` added to their logits
(codes with count 0 are dropped). `Memory.from_codebook` builds that form; `Memory(vectors)` is the dense one.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class Memory:
    """What the aggregator attends to.

    Attributes:
        vectors: (1 or B, M, d) float memory vectors, shared by the batch when the first dim is 1.
        bias: (M,) float added to every attention logit for that vector (log counts), or None.
        mask: (B, M) bool, True where a question may attend, or None for all.
        codes: (1, M) int64, the code of each vector, kept by a vocabulary codebook (``codebook_type="vocabulary"``,
            whose reader reads codes, not vectors), else None.
        index: the bank's `mbc_hf.addressing.BankIndex` (vocabulary codebook, a bank's memory), which addressing
            searches instead of scoring every document; None to score by brute force.
        keys: (N, a) float document keys of learned top-k addressing (``aggregation="topk"``; the vectors are then
            N documents' T vectors one document after another), else None.
    """

    vectors: torch.Tensor
    bias: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    index: object | None = None
    keys: torch.Tensor | None = None

    @classmethod
    def from_codebook(cls, codebook: torch.Tensor, counts: torch.Tensor) -> "Memory":
        """Histogram memory: codebook (K, d) float and counts (K,) int -> the used codes with bias log(count)."""
        used = counts.nonzero().flatten().to(codebook.device)
        return cls(codebook[used][None], torch.log(counts.to(codebook.device)[used].to(codebook.dtype)))

    @property
    def size(self) -> int:
        return self.vectors.shape[1]


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(d, hidden) -> GELU -> Linear(hidden, d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention (queries x, keys/values from the memory) + residual, then a residual feed-forward.

    Args:
        dim: width of the queries x. context_dim: width of the memory vectors.
        heads, dim_head: attention shape (inner width heads·dim_head). ff_hidden: feed-forward hidden width.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, ff_hidden: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.ff = FeedForward(dim, ff_hidden)

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim). An empty memory (M = 0) leaves x to the feed-forward alone."""
        if memory.size > 0:
            x = x + self.to_out(self.attend(self.norm(x), memory))
        return x + self.ff(x)

    def attend(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        b = x.shape[0]
        q = rearrange(self.to_q(x), "b t (h d) -> b h t d", h=self.heads)
        k, v = self.to_kv(self.norm_context(memory.vectors)).chunk(2, dim=-1)
        k, v = (rearrange(t, "b m (h d) -> b h m d", h=self.heads).expand(b, -1, -1, -1) for t in (k, v))
        attn_bias = None
        if memory.bias is not None:
            attn_bias = memory.bias.to(q.dtype).view(1, 1, 1, -1)
        if memory.mask is not None:
            masked = torch.zeros_like(memory.mask, dtype=q.dtype).masked_fill(~memory.mask, float("-inf"))
            attn_bias = masked[:, None, None, :] if attn_bias is None else attn_bias + masked[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return rearrange(out, "b h t d -> b t (h d)")


class Aggregator(nn.Module):
    """A stack of `CrossAttentionBlock`s: question latents (B, T, d) read the memory -> modulation (B, T, d)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        ff_hidden = min(dim, 768)  # reference: hidden 768 if d > 768 else d
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, dim, heads, dim_head, ff_hidden) for _ in range(depth))

    def forward(self, latents: torch.Tensor, memory: Memory) -> torch.Tensor:
        for block in self.blocks:
            latents = block(latents, memory)
        return latents
