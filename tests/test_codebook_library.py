"""The learned codebook on vector-quantize-pytorch (``codebook_backend="vector-quantize-pytorch"``, issue 35 item 3):
the same contract as the paper's `VectorQuantizer` (codes, decode, k-means usage scale, eval and freeze keep stored
codes valid, dead codes re-seeded), and a tiny MBC model that trains, memorizes and reloads with it."""

import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")

from mbc_hf import MBCModelForCausalLM  # noqa: E402
from mbc_hf.codebook_library import LibraryVectorQuantizer  # noqa: E402
from mbc_hf.configuration_mbc import MBCConfig  # noqa: E402
from mbc_hf.testing import tiny_mbc_model  # noqa: E402


def kmeans_quantizer(k=32, d=8, n=400, per_step=32, dead=10, seed=0):
    torch.manual_seed(seed)
    vq = LibraryVectorQuantizer(k, d, dead_code_steps=dead).train()
    vq.vectors_per_step = per_step
    vq.kmeans_init(torch.randn(n, d))
    return vq


def test_codes_are_the_nearest_library_codes_and_decode_to_them():
    vq = kmeans_quantizer().eval()
    z = torch.randn(3, 5, 8)
    out = vq(z)
    expected = torch.cdist(z.reshape(-1, 8), vq.code_weight).argmin(1).view(3, 5)
    assert torch.equal(out.codes, expected) and torch.equal(vq.nearest_codes(z), expected)
    assert torch.allclose(vq.decode(out.codes), out.quantized, atol=1e-5)


def test_kmeans_init_puts_the_library_usage_on_the_per_step_scale():
    vq = kmeans_quantizer(n=400, per_step=32)
    lib = vq.vq._codebook
    assert bool(lib.initted)
    assert lib.cluster_size.sum().item() == pytest.approx(32, rel=1e-5)  # one forward's vectors, not all 400
    assert torch.allclose(lib.embed_avg[0], vq.code_weight * lib.cluster_size[0][:, None])


def test_training_moves_the_codes_and_reseeds_codes_the_batch_no_longer_uses():
    vq = kmeans_quantizer(dead=10)
    before = vq.code_weight.clone()
    collapsed = torch.zeros(4, 8, 8) + 0.01 * torch.randn(4, 8, 8)
    for _ in range(300):
        vq(collapsed)
    assert vq.num_resets > 0 and bool(vq.reset_mask.any())
    assert not torch.equal(vq.code_weight, before)
    assert vq.restart_optimizer_state(torch.optim.Adam([torch.zeros(1)])) == 0 and not vq.reset_mask.any()


def test_eval_and_freeze_never_change_the_codes():
    vq = kmeans_quantizer()
    weights = vq.code_weight.clone()
    vq.eval()(torch.randn(4, 8, 8))
    vq.train().freeze()
    vq(torch.randn(4, 8, 8))
    assert torch.equal(vq.code_weight, weights)


def test_gradient_reaches_the_input_through_the_quantization():
    vq = kmeans_quantizer()
    z = torch.randn(2, 4, 8, requires_grad=True)
    out = vq(z)
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_config_refuses_the_library_backend_where_it_does_not_apply():
    tiny = tiny_mbc_model(seed=0).config.to_dict()
    for overrides in (dict(codebook_dim=4), dict(code_entropy_weight=0.1), dict(codebook_backend="faiss")):
        with pytest.raises(ValueError, match="codebook_backend"):
            MBCConfig(**{**tiny, "codebook_backend": "vector-quantize-pytorch", **overrides})


def test_a_tiny_model_with_the_library_codebook_trains_memorizes_and_reloads(tmp_path):
    model = tiny_mbc_model(seed=0, codebook_backend="vector-quantize-pytorch")
    assert isinstance(model.codebook, LibraryVectorQuantizer)
    docs = ["the cat sat on the mat", "a dog ran in the park"]
    batch = model.encode_questions(["where did the cat sit?", "where did the dog run?"], ["the mat", "the park"])
    enc = model.encode_documents(docs)
    out = model(**batch, context_input_ids=enc["input_ids"], context_attention_mask=enc["attention_mask"])
    out.loss.backward()
    bank = model.eval().memorize(docs)
    model.save_pretrained(tmp_path)
    loaded = MBCModelForCausalLM.from_pretrained(tmp_path)
    loaded.tokenizer, loaded.encoder_tokenizer = model.tokenizer, model.encoder_tokenizer
    assert isinstance(loaded.codebook, LibraryVectorQuantizer)
    assert torch.equal(loaded.memorize(docs).codes, bank.codes)
    assert loaded.codebook.fingerprint() == model.codebook.fingerprint()
