"""Tests for mbc_hf.aggregator (cross-attention over the memory, exact histogram form) and mbc_hf.prefix (the
prefix generator and the LM's KV shape)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from mbc_hf.aggregator import Aggregator, Memory
from mbc_hf.prefix import PrefixGenerator, SoftTokenPrefix, kv_shape
from mbc_hf.testing import tiny_mbc_model

BASES = ("llama", "gpt2")

# (K codes, d, heads, dim_head, depth, number of stored vectors N·T, how codes are drawn)
HISTOGRAM_CASES = [
    pytest.param(64, 32, 4, 8, 2, 200, "subset", id="repeats-unused-codes"),
    pytest.param(16, 24, 3, 8, 3, 400, "uniform", id="all-codes-many-repeats"),
    pytest.param(128, 16, 2, 4, 1, 37, "uniform", id="sparse-few-repeats"),
    pytest.param(32, 32, 2, 16, 2, 50, "single", id="single-used-code"),
    pytest.param(32, 32, 2, 16, 2, 1, "single", id="one-stored-vector"),
]


def draw_codes(kind: str, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "single":
        return torch.full((n,), 5)
    if kind == "subset":  # repeats, and codes that never occur (count 0)
        allowed = torch.randperm(k, generator=gen)[: k // 4]
        return allowed[torch.randint(0, len(allowed), (n,), generator=gen)]
    return torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize("k, d, heads, dim_head, depth, n, kind", HISTOGRAM_CASES)
def test_histogram_memory_equals_dense_memory(k, d, heads, dim_head, depth, n, kind):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    agg = Aggregator(d, depth, heads, dim_head).eval()
    codebook = torch.randn(k, d, generator=gen)
    codes = draw_codes(kind, k, n, gen)
    counts = torch.bincount(codes, minlength=k)
    latents = torch.randn(3, 5, d, generator=gen)

    histogram = Memory.from_codebook(codebook, counts)
    assert histogram.size == int((counts > 0).sum())  # codes with count 0 are dropped
    dense = Memory(codebook[codes].reshape(1, -1, d))
    assert dense.size == n
    with torch.no_grad():
        out_hist, out_dense = agg(latents, histogram), agg(latents, dense)
    assert out_hist.shape == latents.shape
    torch.testing.assert_close(out_hist, out_dense, atol=1e-5, rtol=1e-5)


def test_histogram_memory_depends_on_counts():
    """The log-count bias matters: same used codes, other counts -> other output (so the test above can fail)."""
    torch.manual_seed(0)
    agg = Aggregator(32, 2, 4, 8).eval()
    codebook, latents = torch.randn(8, 32), torch.randn(2, 4, 32)
    a = agg(latents, Memory.from_codebook(codebook, torch.tensor([1, 1, 1, 1, 1, 1, 1, 1])))
    b = agg(latents, Memory.from_codebook(codebook, torch.tensor([50, 1, 1, 1, 1, 1, 1, 1])))
    assert not torch.allclose(a, b, atol=1e-4)


def feed_forward_only(agg: Aggregator, x: torch.Tensor) -> torch.Tensor:
    for block in agg.blocks:
        x = x + block.ff(x)
    return x


@pytest.mark.parametrize("depth", [1, 3])
def test_empty_memory_leaves_only_the_feed_forward_path(depth):
    torch.manual_seed(0)
    agg = Aggregator(32, depth, 4, 8).eval()
    latents = torch.randn(2, 6, 32)
    empty = Memory(torch.zeros(1, 0, 32))
    assert empty.size == 0
    out = agg(latents, empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, feed_forward_only(agg, latents), atol=0, rtol=0)
    empty_histogram = Memory.from_codebook(torch.randn(16, 32), torch.zeros(16, dtype=torch.long))
    assert empty_histogram.size == 0
    torch.testing.assert_close(agg(latents, empty_histogram), out, atol=0, rtol=0)
    assert not torch.allclose(agg(latents, Memory(torch.randn(1, 4, 32))), out, atol=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "per-row-memory"])
def test_mask_restricts_attention(shared):
    torch.manual_seed(0)
    b, m, d = 3, 10, 32
    agg = Aggregator(d, 2, 4, 8).eval()
    latents = torch.randn(b, 4, d)
    vectors = torch.randn(1 if shared else b, m, d)
    mask = torch.rand(b, m) < 0.5
    mask[:, 0] = True  # every row sees at least one vector
    mask[0, 1], mask[1, 1] = False, True  # position 1: hidden from row 0, visible to row 1
    out = agg(latents, Memory(vectors, mask=mask))

    # each row equals attending to its visible vectors alone
    for i in range(b):
        own = vectors[0 if shared else i][mask[i]][None]
        torch.testing.assert_close(out[i:i + 1], agg(latents[i:i + 1], Memory(own)), atol=1e-5, rtol=1e-5)

    # changing vectors hidden from row 0 does not change row 0, but changes a row that sees them
    changed = vectors.clone()
    changed[:, ~mask[0]] = torch.randn_like(changed[:, ~mask[0]]) * 5
    out2 = agg(latents, Memory(changed, mask=mask))
    torch.testing.assert_close(out2[0], out[0], atol=0, rtol=0)
    assert not torch.allclose(out2[1], out[1], atol=1e-4)


# ----------------------------------------------------------------------------- prefix generator


def lm_cache_shapes(lm, batch: int) -> list[tuple[int, ...]]:
    """(B, n_kv, S, head_dim) of the LM's own key cache per layer, for a short input."""
    with torch.no_grad():
        cache = lm(input_ids=torch.ones(batch, 3, dtype=torch.long), use_cache=True).past_key_values
    return [tuple(layer.keys.shape) for layer in cache.layers]


@pytest.mark.parametrize("prefix_length", [1, 2, 3])
@pytest.mark.parametrize("base", BASES)
def test_prefix_generator_matches_the_lm_kv_cache_shape(base, prefix_length):
    model = tiny_mbc_model(base, "bert", seed=0, prefix_length=prefix_length).eval()
    text = model.config.text_config
    expected_kv_heads = text.num_key_value_heads if base == "llama" else text.n_head  # llama: GQA (2 of 4)
    batch, T, d = 3, model.config.num_context_tokens, text.hidden_size
    prefix = model.prefix_generator(torch.randn(batch, T, d))
    cache = lm_cache_shapes(model.lm, batch)
    assert len(prefix) == len(cache) == text.num_hidden_layers
    for (key, value), (b, n_kv, _, head_dim) in zip(prefix, cache):
        assert n_kv == expected_kv_heads
        assert key.shape == value.shape == (batch, n_kv, prefix_length, head_dim)
        assert key.dtype == value.dtype == torch.float32
    # keys and values of the same layer, and different layers, are different tensors (no slot reuse)
    assert not torch.equal(prefix[0][0], prefix[0][1]) and not torch.equal(prefix[0][0], prefix[-1][0])


KV_SHAPE_CASES = [
    pytest.param(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2), (3, 2, 8), id="llama-gqa"),
    pytest.param(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16), (2, 1, 16),
                 id="llama-mqa-explicit-head-dim"),
    pytest.param(GPT2Config(vocab_size=50, n_embd=48, n_layer=5, n_head=6), (5, 6, 8), id="gpt2"),
    pytest.param(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2), (2, 2, 8), id="qwen2"),
]


@pytest.mark.parametrize("config, expected", KV_SHAPE_CASES)
def test_kv_shape(config, expected):
    assert kv_shape(config) == expected
    lm = AutoModelForCausalLM.from_config(config).eval()
    layers, kv_heads, head_dim = expected
    shapes = lm_cache_shapes(lm, 1)
    assert len(shapes) == layers and all(s[1] == kv_heads and s[3] == head_dim for s in shapes)


def formula(d, T, P, r, L, n_kv, head_dim):
    """The parameter count stated in prefix.py: A·T + 2d + (d+1)·r + 2L·r·n_kv·head_dim + A·n_kv·head_dim."""
    A = 2 * L * P
    return A * T + 2 * d + (d + 1) * r + 2 * L * r * n_kv * head_dim + A * n_kv * head_dim


@pytest.mark.parametrize("d, T, P, r, L, n_kv, head_dim", [
    pytest.param(32, 4, 2, 16, 4, 2, 8, id="tiny-llama"),
    pytest.param(48, 5, 3, 7, 3, 6, 8, id="odd-sizes"),
    pytest.param(576, 12, 2, 256, 30, 3, 64, id="smollm2-135m"),
])
def test_prefix_generator_parameter_count_formula(d, T, P, r, L, n_kv, head_dim):
    gen = PrefixGenerator(d, T, P, r, L, n_kv, head_dim)
    assert sum(p.numel() for p in gen.parameters()) == formula(d, T, P, r, L, n_kv, head_dim)


def test_prefix_generator_size_claim_for_smollm2():
    """prefix.py states 3.12M parameters for SmolLM2-135M (L=30, d=576, 3 KV heads x 64, P=2, T=12, r=256)."""
    gen = PrefixGenerator(576, 12, 2, 256, 30, 3, 64)
    assert round(sum(p.numel() for p in gen.parameters()) / 1e6, 2) == 3.12


def test_prefix_generator_initial_mix_repeats_the_latents():
    """At init every slot copies one latent (reference repetition), consecutive slots share a latent."""
    gen = PrefixGenerator(16, 5, 2, 8, 3, 2, 4)  # A = 12 slots for T = 5 latents
    owner = gen.mix.argmax(dim=1)
    assert torch.equal(gen.mix.sum(dim=1), torch.ones(12))
    assert torch.equal(torch.bincount(owner, minlength=5), torch.tensor([3, 3, 2, 2, 2]))
    assert (owner.diff() >= 0).all()


# ----------------------------------------------------------------------------- soft-token prefix


@pytest.mark.parametrize("base", BASES)
def test_soft_token_prefix_equals_the_soft_tokens_inline(base):
    """Question logits after the soft-token prefix cache equal those of one LM pass over [soft tokens; question]
    (same rotary positions, same keys/values), and the prefix has the LM's own KV-cache shape."""
    model = tiny_mbc_model(base, "bert", seed=0, prefix_mode="soft_tokens", prefix_length=5).eval()
    gen, lm = model.prefix_generator, model.lm
    latents = torch.randn(2, model.config.num_context_tokens, model.config.text_config.hidden_size)
    prefix = gen(latents, lm)
    assert [tuple(k.shape) for k, _ in prefix] == [(2, s[1], 5, s[3]) for s in lm_cache_shapes(lm, 2)]
    ids = torch.randint(5, 60, (2, 4))
    with torch.no_grad():
        cache, mask = model._prefix_cache(prefix, torch.ones_like(ids), 2)
        cached = lm(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        embeds = gen.scale * gen.proj(torch.einsum("pt,btd->bpd", gen.mix, latents))
        inline = lm(inputs_embeds=torch.cat([embeds, lm.get_input_embeddings()(ids)], 1)).logits[:, 5:]
    torch.testing.assert_close(cached, inline, atol=1e-5, rtol=1e-4)


def test_soft_token_prefix_starts_at_the_embedding_scale():
    model = tiny_mbc_model("llama", "bert", seed=0, prefix_mode="soft_tokens", prefix_length=4)
    embeddings = model.lm.get_input_embeddings().weight
    model.prefix_generator.match_embedding_scale(embeddings)
    gen = model.prefix_generator
    soft = gen.scale * gen.proj(torch.randn(64, model.config.text_config.hidden_size))
    ratio = soft.pow(2).mean().sqrt() / embeddings.pow(2).mean().sqrt()
    assert 0.8 < float(ratio.detach()) < 1.25


def test_soft_token_prefix_parameter_count():
    """prefix.py: P·T + 2d + (d+1)·d_emb + 1 parameters (0.33M for SmolLM2-135M with P = T = 12)."""
    gen = SoftTokenPrefix(576, 12, 12, 576)
    n = sum(p.numel() for p in gen.parameters())
    assert n == 12 * 12 + 2 * 576 + 577 * 576 + 1
    assert round(n / 1e6, 2) == 0.33
