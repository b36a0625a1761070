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

With a frozen backbone the encoder's states of a text never change, so `EncoderStateCache` can keep them between
calls (`AmortizationNetwork.cache_encoder_states`): in meta-training a document comes back once per question about
it, and its encoder forward is then skipped (not in the paper; the issue's "measure a step and remove waste").
"""

from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutput

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


class EncoderStateCache:
    """Least-recently-used store of a frozen encoder's last hidden states, one entry per text.

    The key is the text's real token ids and the position of its first one (so left- and right-padded rows of the
    same text never share an entry); the value is its (n_real, d) states. Entries are evicted, oldest use first,
    once the stored states exceed ``max_bytes``; ``misses`` counts texts encoded, ``hits`` rows that needed no
    encoder forward.

    Raises:
        ValueError: ``max_bytes`` <= 0.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"EncoderStateCache needs max_bytes > 0, got {max_bytes}; to cache nothing, do not "
                             "create a cache.")
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
        real = attention_mask.bool().cpu()
        ids = input_ids.cpu()
        first = real.int().argmax(1)
        return [int(f).to_bytes(4, "little") + row[m].numpy().tobytes() for row, m, f in zip(ids, real, first)]

    def get(self, key: bytes) -> torch.Tensor | None:
        states = self._store.get(key)
        if states is not None:
            self._store.move_to_end(key)
        return states

    def put(self, key: bytes, states: torch.Tensor) -> None:
        """Store ``states`` under ``key``, evicting least recently used entries to stay within ``max_bytes``; states
        larger than the whole budget are not stored (they would evict everything else)."""
        size = states.numel() * states.element_size()
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def encode(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``encoder(input_ids, attention_mask)`` -> (B, S, d) last hidden states, computed (in one call) only for
        the texts not stored yet, each once even if it fills several rows; padding positions are zeros (every
        reader masks them). ``misses`` counts the texts encoded, ``hits`` the other rows (no encoder forward)."""
        if input_ids.shape[0] == 0:
            return encoder(input_ids, attention_mask)
        keys, real = self.keys(input_ids, attention_mask), attention_mask.bool()
        states = {key: s for key in set(keys) if (s := self.get(key)) is not None}
        missing = list(dict.fromkeys(k for k in keys if k not in states))  # distinct, in row order
        if missing:
            rows = [keys.index(k) for k in missing]  # the first row of each missing text
            fresh = encoder(input_ids[rows], attention_mask[rows])  # (M, S, d)
            for j, (i, key) in enumerate(zip(rows, missing)):
                states[key] = fresh[j][real[i]].detach()  # (n_real, d)
                self.put(key, states[key])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        some = states[keys[0]]
        hidden = some.new_zeros(*input_ids.shape, some.shape[-1])  # (B, S, d)
        for i, key in enumerate(keys):
            hidden[i][real[i]] = states[key]
        return hidden


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
        self.state_cache: EncoderStateCache | None = None

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

    @property
    def encoder(self) -> nn.Module:
        """The part of the backbone that reads the text (T5's encoder stack, or the whole encoder-only model)."""
        return self.backbone.get_encoder() if self.is_encoder_decoder else self.backbone

    @contextmanager
    def cache_encoder_states(self, max_bytes: int):
        """Within the block, keep the encoder's states of every text read (LRU, at most ``max_bytes`` bytes of
        states) and reuse them when the same text comes back. Only used while the encoder is frozen (no gradient and
        in eval mode, as `freeze_backbone` leaves it; otherwise its states change with every step or dropout draw);
        the states stay on the encoder's device; the cache is dropped on exit. Yields the `EncoderStateCache`.

        Raises:
            ValueError: ``max_bytes`` <= 0.
        """
        self.state_cache = EncoderStateCache(max_bytes)
        try:
            yield self.state_cache
        finally:
            self.state_cache = None

    def encoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, S, d_enc) the encoder's last hidden states; under no_grad and from the state cache
        (see `cache_encoder_states`) when the encoder is frozen."""
        frozen = not self.encoder.training and not any(p.requires_grad for p in self.encoder.parameters())

        def encode(ids, mask):
            return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if frozen and self.state_cache is not None:
                return self.state_cache.encode(encode, input_ids, attention_mask)
            return encode(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        queries = self.queries[None].expand(batch, -1, -1)  # (B, T, d_enc)
        hidden = self.encoder_states(input_ids, attention_mask)  # (B, S, d_enc)
        if self.is_encoder_decoder:  # the decoder reads the learned queries, so it always runs with gradients
            states = self.backbone(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                                   attention_mask=attention_mask, decoder_inputs_embeds=queries).last_hidden_state
        else:
            queries = queries + segment_pool(hidden, attention_mask, queries.shape[1])  # (B, T, d_enc)
            states = self.readout(queries, Memory(hidden, mask=attention_mask.bool()))  # (B, T, d_enc)
        return self.mlp(states)  # (B, T, out_dim)
