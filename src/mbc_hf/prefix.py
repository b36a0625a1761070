"""The prefix generator: modulation latents -> per-layer prefix key/values (P-tuning v2) in the LM's real KV shape.

The reference (``TokenSelfAttend``) repeats the T latents to A = P·L·2 slots and gives every slot its own
2-layer FFN, ~28M parameters for DistilGPT2 and ~807M for Llama-2-7B. Here the slots share one bottleneck
and differ only in a learned mixing of the T latents and in a per-(layer, K/V) output projection:

    s = mix @ latents                     (B, A, d)      mix: (A, T), initialised to the reference's repetition
    h = GELU(Linear(d, r)(LN(s)))         (B, A, r)
    kv = h @ W[layer, k|v] + bias[slot]   (B, A, n_kv·head_dim)

Parameters: A·T + 2d + (d+1)·r + 2L·r·n_kv·head_dim + A·n_kv·head_dim. For SmolLM2-135M (L=30, d=576,
3 KV heads × 64, P=2, T=12, r=256) that is 3.12M; for a Llama-2-7B-sized LM (L=32, d=4096, 32 × 128, r=256)
it is 68.7M instead of ~807M.
Keys are not rotated (RoPE applies only to the question's own keys), exactly as with PEFT prefix tuning.
"""

import torch
from einops import rearrange
from torch import nn
from transformers import PreTrainedConfig


def repeat_latents(slots: int, num_tokens: int) -> torch.Tensor:
    """(slots, T) 0/1 mixing matrix of the reference expansion: latent t fills consecutive slots, ``slots // T`` each
    and the first ``slots % T`` latents one more."""
    owner = [t for t in range(num_tokens) for _ in range(slots // num_tokens + (t < slots % num_tokens))]
    return torch.nn.functional.one_hot(torch.tensor(owner), num_tokens).float()


def kv_shape(config: PreTrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a causal LM config (GQA aware: Llama/Qwen/Mistral, GPT-2 MHA)."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixGenerator(nn.Module):
    """(B, T, d) latents -> list over layers of (key, value), each (B, n_kv_heads, P, head_dim).

    Args:
        dim: d, the LM hidden size. num_tokens: T. prefix_length: P per layer. rank: r, the shared bottleneck.
        num_layers, num_kv_heads, head_dim: the LM's KV shape (see `kv_shape`).
    """

    def __init__(self, dim: int, num_tokens: int, prefix_length: int, rank: int, num_layers: int,
                 num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_layers, self.prefix_length = num_layers, prefix_length
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        slots, kv_dim = num_layers * 2 * prefix_length, num_kv_heads * head_dim
        self.mix = nn.Parameter(repeat_latents(slots, num_tokens))  # (A, T), the reference's repetition at init
        self.down = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, rank), nn.GELU())
        self.up = nn.Parameter(torch.randn(num_layers * 2, rank, kv_dim) * rank**-0.5)
        self.bias = nn.Parameter(torch.zeros(slots, kv_dim))

    def forward(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        slots = torch.einsum("at,btd->bad", self.mix, latents)  # (B, A, d)
        h = rearrange(self.down(slots), "b (g p) r -> b g p r", p=self.prefix_length)  # g = layer·(k|v)
        kv = torch.einsum("bgpr,grk->bgpk", h, self.up) + rearrange(self.bias, "(g p) k -> g p k", p=self.prefix_length)
        kv = rearrange(kv, "b (l two) p (h d) -> l two b h p d", two=2, h=self.num_kv_heads)
        return [(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)]


class SoftTokenPrefix(nn.Module):
    """(B, T, d) latents -> P soft tokens in the LM's input-embedding space, whose per-layer key/values the frozen
    LM computes itself (not in the paper; ``config.prefix_mode="soft_tokens"``).

    The paper's generator writes raw key/values that the frozen LM must learn to read at every layer; soft tokens
    are read the way the LM reads any earlier text (as in prompt tuning, ICAE and xRAG), which gives the memory
    path a well-conditioned gradient from the first step. The result has the same form as `PrefixGenerator`'s:

        s = mix @ latents                      (B, P, d)      mix: (P, T), initialised like the generator's
        e = scale · Linear(d, d_emb)(LN(s))    (B, P, d_emb)  scale starts at the LM's embedding RMS
        kv = LM(inputs_embeds=e).past_key_values   L × (key, value), each (B, n_kv_heads, P, head_dim)

    Keys carry the rotary positions 0..P-1, so the question that follows starts at position P (as it does after
    the generator's prefix). Parameters: P·T + 2d + (d+1)·d_emb + 1 (0.33M for SmolLM2-135M with P = T = 12).
    Call `match_embedding_scale` once the LM's real weights are loaded.
    """

    def __init__(self, dim: int, num_tokens: int, prefix_length: int, embed_dim: int):
        super().__init__()
        self.mix = nn.Parameter(repeat_latents(prefix_length, num_tokens))  # (P, T)
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))
        nn.init.normal_(self.proj[1].weight, std=dim**-0.5)  # unit-RMS outputs
        nn.init.zeros_(self.proj[1].bias)
        self.scale = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def match_embedding_scale(self, embeddings: torch.Tensor) -> None:
        """Set ``scale`` to the RMS of the LM's input embeddings (V, d_emb), so soft tokens start at their scale."""
        self.scale.fill_(float(embeddings.float().pow(2).mean().sqrt()))

    def forward(self, latents: torch.Tensor, lm: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        embeds = self.scale * self.proj(torch.einsum("pt,btd->bpd", self.mix, latents))  # (B, P, d_emb)
        cache = lm.base_model(inputs_embeds=embeds.to(lm.dtype), use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]
