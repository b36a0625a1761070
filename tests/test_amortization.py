"""Tests for the amortization network: segment pooling and the frozen encoder's state cache (mbc_hf.amortization)."""

import pytest
import torch

from mbc_hf.amortization import EncoderStateCache, segment_pool
from mbc_hf.testing import tiny_mbc_model


def test_segment_pool_means_of_equal_segments_ignore_padding():
    hidden = torch.arange(8.0).view(1, 8, 1).repeat(2, 1, 1)  # token i has value i
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pooled = segment_pool(hidden, mask, 3)
    # 6 real tokens -> segments {0,1}, {2,3}, {4,5}; 8 tokens -> {0,1,2}, {3,4,5}, {6,7}
    torch.testing.assert_close(pooled[..., 0], torch.tensor([[0.5, 2.5, 4.5], [1.0, 4.0, 6.5]]))


def test_segment_pool_short_text_leaves_empty_segments_at_zero():
    hidden = torch.tensor([[[2.0], [4.0], [9.0]]])
    pooled = segment_pool(hidden, torch.tensor([[1, 1, 0]]), 4)
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([2.0, 0.0, 4.0, 0.0]))


def test_slots_of_one_document_differ_at_initialisation():
    """Learned queries alone start near-identical; with segment pooling the T slots of a document differ."""
    model = tiny_mbc_model("llama", "bert", seed=0).eval()
    enc = model.encode_documents(["The cat sat on the mat. Paris is the capital of France. Water boils at 100."])
    z = model.amortization(**enc)[0]  # (T, d)
    cosine = torch.nn.functional.cosine_similarity(z[:, None], z[None], dim=-1)
    off_diagonal = cosine[~torch.eye(len(z), dtype=torch.bool)]
    assert off_diagonal.max() < 0.95


@pytest.mark.parametrize("position", [0, -1])
def test_slot_depends_on_its_own_segment(position):
    """Changing the first (last) words changes the first (last) slot more than the opposite one."""
    model = tiny_mbc_model("llama", "bert", seed=0).eval()
    words = "the quick brown fox jumps over the lazy dog while a wise owl reads old news about science".split()
    changed = list(words)
    changed[position] = "Paris"
    z = model.amortization(**model.encode_documents([" ".join(words), " ".join(changed)]))
    delta = (z[0] - z[1]).norm(dim=-1)  # (T,)
    assert delta[position] > delta[-1 - position]


# ----------------------------------------------------------------------------------- encoder state cache
DOCS = ["The cat sat on the mat.", "Paris is the capital of France and a large city on the Seine.",
        "Water boils at 100 degrees.", "A short one."]


@pytest.mark.parametrize("encoder", ["bert", "t5"])
def test_state_cache_gives_the_same_context_vectors_and_encodes_each_text_once(encoder):
    model = tiny_mbc_model("llama", encoder, seed=0, freeze_encoders=True).eval()
    net = model.amortization
    first = model.encode_documents(DOCS[:3])
    second = model.encode_documents([DOCS[3], DOCS[0], DOCS[3]])  # a new text twice, a known one
    assert second["input_ids"].shape[1] < first["input_ids"].shape[1]  # another width: the key ignores padding
    with torch.no_grad():
        want = [net(**first), net(**second)]
    calls = []
    hook = net.encoder.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    with net.cache_encoder_states(2**20) as cache, torch.no_grad():
        got = [net(**first), net(**second)]
        assert (cache.misses, cache.hits, len(cache)) == (4, 2, 4)
    hook.remove()
    assert calls == [3, 1]  # the second batch encoded only its one new text, once
    assert net.state_cache is None  # dropped on exit
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_state_cache_keeps_left_and_right_padded_rows_of_a_text_apart():
    """BERT's positions count from the first column, so a left-padded text has other states than a right-padded one."""
    model = tiny_mbc_model(seed=0, freeze_encoders=True).eval()
    net = model.amortization
    right = model.encode_documents([DOCS[0], DOCS[1]])
    model.encoder_tokenizer.padding_side = "left"
    left = model.encode_documents([DOCS[0], DOCS[1]])
    assert left["attention_mask"][0, 0] == 0  # DOCS[0] is the shorter one: padded on the left
    with torch.no_grad():
        want = net(**left)
        with net.cache_encoder_states(2**20) as cache:
            net(**right)
            torch.testing.assert_close(net(**left), want, atol=1e-5, rtol=1e-4)
            assert cache.misses == 3  # DOCS[0] twice (two offsets), DOCS[1] once (offset 0 both times)


def test_state_cache_evicts_least_recently_used_within_its_byte_budget():
    model = tiny_mbc_model(seed=0, freeze_encoders=True).eval()
    net = model.amortization
    enc = [model.encode_documents([d]) for d in DOCS]
    with torch.no_grad():
        want = [net(**e) for e in enc]
    sizes = [int(e["attention_mask"].sum()) * 32 * 4 for e in enc]  # (n_real, 32) fp32 states per document
    with net.cache_encoder_states(sizes[0] + sizes[1]) as cache, torch.no_grad():
        net(**enc[0]), net(**enc[1]), net(**enc[0])  # document 0 becomes the most recently used
        net(**enc[2])  # over budget: document 1 (least recently used) goes
        assert cache.bytes <= cache.max_bytes
        assert cache.get(EncoderStateCache.keys(**enc[0])[0]) is not None
        assert cache.get(EncoderStateCache.keys(**enc[1])[0]) is None
        torch.testing.assert_close(net(**enc[1]), want[1], atol=1e-5, rtol=1e-4)  # recomputed, still right
        kept = len(cache)
        cache.put(b"huge", torch.zeros(cache.max_bytes // 4 + 1))  # larger than the whole budget: not stored
        assert len(cache) == kept and cache.get(b"huge") is None and cache.bytes <= cache.max_bytes


def test_state_cache_is_not_used_for_a_trained_encoder():
    model = tiny_mbc_model(seed=0).train()  # encoders train: their states change with every step
    net = model.amortization
    enc = model.encode_documents(DOCS[:2])
    with net.cache_encoder_states(2**20) as cache:
        net(**enc).sum().backward()
        net(**enc)
        assert cache.hits + cache.misses == 0
    assert any(p.grad is not None for p in net.encoder.parameters())


def test_state_cache_rejects_an_empty_budget():
    with pytest.raises(ValueError, match="max_bytes > 0"):
        EncoderStateCache(0)
