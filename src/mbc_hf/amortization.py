"""The amortization network of MAC/MBC: a text -> T context vectors in the LM's hidden size (MAC §3.1; reference
``T5ForwardWrapper`` in ``models/online_llm_adapter.py``). The same module serves as the question encoder.

Two kinds of backbone are supported:

* encoder–decoder (T5, the paper's choice): the encoder reads the text and the decoder takes T learned query
  vectors as ``decoder_inputs_embeds``; its T output states are the context.
* encoder-only (BERT, MiniLM): T learned queries read the encoder states through one `CrossAttentionBlock`.
  Query t starts from the mean of the t-th of T equal segments of the text (`segment_pool`, not in the paper):
  learned queries alone start near-identical (cosine 0.98 between the T slots of one document), so every slot
  quantized to the same code; segment means make the T slots differ, and carry the text, from the first step.

A shared MLP then maps each of the T states to the LM width:
``MLP(x) = skip(x) + Linear(d_lm, d_lm)(tanh(Linear(d_enc, d_lm)(LN(x))))`` (the reference keeps T separate MLPs;
the learned queries already tell the T slots apart, so one MLP is shared).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig

from .aggregator import CrossAttentionBlock, Memory


class ContextMLP(nn.Module):
    """(…, d_in) -> (…, d_out): LN -> Linear -> tanh -> Linear, plus a linear skip (identity when d_in == d_out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_out))
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


def segment_pool(hidden: torch.Tensor, mask: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of each of ``num_segments`` contiguous, equal-length segments of every text's real tokens.

    hidden (B, S, d) float, mask (B, S) 0/1 -> (B, num_segments, d); token i of a text with n real tokens belongs to
    segment ``floor(i·num_segments/n)``. Segments of texts shorter than ``num_segments`` tokens may be empty (zeros).
    """
    mask = mask.long()  # integer arithmetic: exact for any length and hidden dtype
    position = mask.cumsum(1) - 1  # (B, S): index among the real tokens
    length = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    segment = torch.div(position * num_segments, length, rounding_mode="floor").clamp(0, num_segments - 1)
    weights = F.one_hot(segment, num_segments).to(hidden.dtype) * mask[..., None].to(hidden.dtype)  # (B, S, T)
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    return torch.einsum("bst,bsd->btd", weights, hidden)


class AmortizationNetwork(nn.Module):
    """Text -> T context vectors.

    Args:
        backbone_config: config of the backbone (``is_encoder_decoder`` selects the T5 route).
        num_tokens: T, context vectors per text.
        out_dim: width of the context vectors (the LM hidden size).

    Shapes: ``forward(input_ids (B, S) int64, attention_mask (B, S) int/bool) -> (B, T, out_dim) float``.
    """

    def __init__(self, backbone_config: PreTrainedConfig, num_tokens: int, out_dim: int):
        super().__init__()
        self.backbone = AutoModel.from_config(backbone_config)
        self.is_encoder_decoder = bool(backbone_config.is_encoder_decoder)
        if not self.is_encoder_decoder and hasattr(self.backbone, "pooler"):
            self.backbone.pooler = None  # unused; keeps every parameter reachable by the loss
        width = backbone_config.d_model if self.is_encoder_decoder else backbone_config.hidden_size
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        if not self.is_encoder_decoder:
            heads = backbone_config.num_attention_heads
            self.readout = CrossAttentionBlock(width, width, heads, width // heads, backbone_config.intermediate_size)
        self.mlp = ContextMLP(width, out_dim)

    def freeze_backbone(self) -> None:
        """Freeze the pretrained backbone: no gradients and no dropout; it then runs under no_grad, which makes a
        CPU training step several times cheaper (only the learned queries, readout and MLP train)."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        queries = self.queries[None].expand(batch, -1, -1)  # (B, T, d_enc)
        if self.is_encoder_decoder:  # the decoder reads the learned queries, so it always runs with gradients
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   decoder_inputs_embeds=queries).last_hidden_state  # (B, T, d_enc)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,S,d)
            queries = queries + segment_pool(hidden, attention_mask, queries.shape[1])  # (B, T, d_enc)
            states = self.readout(queries, Memory(hidden, mask=attention_mask.bool()))  # (B, T, d_enc)
        return self.mlp(states)  # (B, T, out_dim)
