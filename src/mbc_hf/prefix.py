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
        # reference expansion: latent t is repeated to consecutive slots (A // T each, the first A % T once more)
        owner = [t for t in range(num_tokens) for _ in range(slots // num_tokens + (t < slots % num_tokens))]
        self.mix = nn.Parameter(torch.zeros(slots, num_tokens))  # (A, T)
        with torch.no_grad():
            self.mix[torch.arange(slots), torch.tensor(owner)] = 1.0
        self.down = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, rank), nn.GELU())
        self.up = nn.Parameter(torch.randn(num_layers * 2, rank, kv_dim) * rank**-0.5)
        self.bias = nn.Parameter(torch.zeros(slots, kv_dim))

    def forward(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        slots = torch.einsum("at,btd->bad", self.mix, latents)  # (B, A, d)
        h = rearrange(self.down(slots), "b (g p) r -> b g p r", p=self.prefix_length)  # g = layer·(k|v)
        kv = torch.einsum("bgpr,grk->bgpk", h, self.up) + rearrange(self.bias, "(g p) k -> g p k", p=self.prefix_length)
        kv = rearrange(kv, "b (l two) p (h d) -> l two b h p d", two=2, h=self.num_kv_heads)
        return [(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)]
