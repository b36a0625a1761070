"""Tests for the amortization network's segment pooling (mbc_hf.amortization.segment_pool)."""

import pytest
import torch

from mbc_hf.amortization import segment_pool
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
