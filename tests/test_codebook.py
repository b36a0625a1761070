"""Tests for mbc_hf.codebook.VectorQuantizer (MBC §3.2-3.3): nearest-code lookup, straight-through gradients,
the VQ loss, online resetting of dead codes, and the guarantees that keep stored codes valid (eval / freeze)."""

import pytest
import torch
import torch.nn.functional as F

from mbc_hf.codebook import VectorQuantizer

# (codebook_size K, dim d, leading shape of z)
SHAPE_CASES = [
    pytest.param(64, 16, (4, 8), id="K64-d16-B4T8"),
    pytest.param(17, 5, (3, 2), id="K17-d5-B3T2"),
    pytest.param(512, 32, (2, 12), id="K512-d32-B2T12"),
    pytest.param(8, 4, (50,), id="K8-d4-flat"),
]


def make_vq(k: int, d: int, seed: int = 0, beta: float = 0.25, spread: bool = True) -> VectorQuantizer:
    """A quantizer; with ``spread`` its codes are N(0, 1) (the default init is uniform(±1/K), nearly degenerate)."""
    torch.manual_seed(seed)
    vq = VectorQuantizer(k, d, commitment_cost=beta)
    if spread:
        with torch.no_grad():
            vq.embedding.weight.copy_(torch.randn(k, d))
    return vq


def brute_force_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = z.reshape(-1, z.shape[-1]).double()
    return torch.cdist(flat, codebook.double()).argmin(dim=1).view(z.shape[:-1])


def state(vq: VectorQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    return vq.embedding.weight.detach().clone(), vq.ema_cluster_size.clone()


# ----------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("k, d, lead", SHAPE_CASES)
def test_nearest_codes_equals_cdist_argmin(k, d, lead):
    vq = make_vq(k, d)
    z = torch.randn(*lead, d) * 1.5
    codes = vq.nearest_codes(z)
    assert codes.shape == lead and codes.dtype == torch.int64
    assert torch.equal(codes, brute_force_codes(z, vq.codebook.detach()))


@pytest.mark.parametrize("k, d, lead", SHAPE_CASES)
def test_vectors_on_the_codebook_map_to_their_own_code(k, d, lead):
    vq = make_vq(k, d)
    target = torch.randint(0, k, lead)
    assert torch.equal(vq.nearest_codes(vq.codebook.detach()[target]), target)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_decode_is_a_codebook_lookup(dtype):
    vq = make_vq(128, 8)
    codes = torch.randint(0, 128, (5, 3)).to(dtype)  # banks store uint8/uint16 codes
    out = vq.decode(codes)
    assert out.shape == (5, 3, 8)
    assert torch.equal(out, vq.codebook[codes.long()])


# ----------------------------------------------------------------------------- gradients and loss


@pytest.mark.parametrize("k, d, lead", SHAPE_CASES)
def test_quantized_value_is_the_code_and_gradient_is_straight_through(k, d, lead):
    vq = make_vq(k, d).eval()
    z = torch.randn(*lead, d, requires_grad=True)
    out = vq(z)
    assert torch.allclose(out.quantized, vq.codebook[out.codes], atol=1e-6)
    w = torch.randn_like(z)
    (grad,) = torch.autograd.grad((out.quantized * w).sum(), z)
    assert torch.equal(grad, w)  # d quantized / d z = identity


@pytest.mark.parametrize("beta", [0.25, 1.0, 0.0])
def test_loss_is_codebook_plus_beta_commitment(beta):
    k, d = 32, 6
    vq = make_vq(k, d, beta=beta).eval()
    z = torch.randn(4, 5, d, requires_grad=True)
    out = vq(z)
    q = vq.codebook[out.codes]
    expected = F.mse_loss(q, z.detach()) + beta * F.mse_loss(q.detach(), z)
    assert torch.allclose(out.loss, expected, atol=1e-7, rtol=1e-6)

    out.loss.backward()
    numel = z.numel()
    # the commitment term alone pulls the encoder output: beta * 2 (z - q) / numel
    assert torch.allclose(z.grad, beta * 2 * (z - q).detach() / numel, atol=1e-7)
    # the codebook term alone moves the codes: sum over assigned z of 2 (c_k - z) / numel
    expected_cb = torch.zeros(k, d).index_add_(0, out.codes.flatten(), (2 * (q - z) / numel).detach().reshape(-1, d))
    assert torch.allclose(vq.embedding.weight.grad, expected_cb, atol=1e-7)


def test_gradients_reach_exactly_the_used_codes():
    vq = make_vq(64, 8).train()
    z = torch.randn(3, 4, 8, requires_grad=True)
    out = vq(z)
    (out.loss + (out.quantized ** 2).sum()).backward()
    grad = vq.embedding.weight.grad
    assert grad is not None
    used = torch.zeros(64, dtype=torch.bool)
    used[out.codes.flatten()] = True
    assert (grad[used].abs().sum(dim=1) > 0).all()
    assert (grad[~used] == 0).all()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_perplexity_counts_evenly_used_codes():
    vq = make_vq(16, 4).eval()
    every_code_once = vq(vq.codebook.detach()[None])  # (1, 16, 4): each code exactly once
    assert torch.equal(every_code_once.codes[0], torch.arange(16))
    assert torch.allclose(every_code_once.perplexity, torch.tensor(16.0), rtol=1e-4)
    assert every_code_once.loss.item() == pytest.approx(0.0, abs=1e-12)
    one_code = vq(vq.codebook.detach()[3].expand(2, 5, 4))
    assert torch.allclose(one_code.perplexity, torch.tensor(1.0), rtol=1e-4)


# ----------------------------------------------------------------------------- online resetting


def rows_from(weight: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(K,) bool: which codebook rows are bit-identical to one of `vectors`."""
    return (weight[:, None, :] == vectors[None, :, :]).all(-1).any(-1)


def test_dead_codes_are_reseeded_from_the_batch_in_training():
    k, d, decay = 64, 8, 0.99
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, ema_decay=decay).train()  # default init: every code starts dead (EMA 0)
    assert (vq.ema_cluster_size == 0).all()
    before = vq.embedding.weight.detach().clone()
    z = torch.randn(2, 4, d)  # 8 vectors
    out = vq(z)
    counts = torch.bincount(out.codes.flatten(), minlength=k).float()
    ema = (1 - decay) * counts  # EMA after this step, before resetting
    alive = ema >= vq.dead_code_threshold
    weight = vq.embedding.weight.detach()
    changed = (weight != before).any(dim=1)
    n_reset = min(int((~alive).sum()), 8)
    assert int(changed.sum()) == n_reset
    assert not changed[alive].any()  # live codes are never reset
    assert rows_from(weight, z.reshape(-1, d))[changed].all()  # reseeded rows are batch vectors
    assert len({tuple(r.tolist()) for r in weight[changed]}) == n_reset  # ... distinct ones
    assert torch.allclose(vq.ema_cluster_size[~changed], ema[~changed])
    assert torch.allclose(vq.ema_cluster_size[changed], ema.mean().expand(n_reset))

    fed = [z.reshape(-1, d)]
    for _ in range(10):
        batch = torch.randn(2, 4, d)
        fed.append(batch.reshape(-1, d))
        vq(batch)
    weight = vq.embedding.weight.detach()
    assert (vq.ema_cluster_size >= vq.dead_code_threshold).all()  # no dead code left
    reseeded = rows_from(weight, torch.cat(fed))
    assert (reseeded | (weight == before).all(dim=1)).all()  # a row is either untouched or a batch vector
    assert int(reseeded.sum()) > n_reset  # later batches revived more codes


def test_codebook_never_changes_in_eval_mode():
    vq = make_vq(64, 8, spread=False).eval()  # all codes dead: training mode would reset them at once
    weight, ema = state(vq)
    fingerprint = vq.fingerprint()
    for _ in range(25):
        vq(torch.randn(4, 6, 8))
    assert torch.equal(vq.embedding.weight, weight) and torch.equal(vq.ema_cluster_size, ema)
    assert vq.fingerprint() == fingerprint
    vq.train()(torch.randn(4, 6, 8))  # the same quantizer does change in training
    assert not torch.equal(vq.embedding.weight, weight) and not torch.equal(vq.ema_cluster_size, ema)


def test_freeze_stops_every_change_even_in_training():
    vq = make_vq(64, 8, spread=False).freeze().train()
    assert vq.embedding.weight.requires_grad is False and bool(vq.frozen)
    weight, ema = state(vq)
    z = torch.randn(4, 6, 8, requires_grad=True)
    for _ in range(25):
        out = vq(z)
    out.loss.backward()
    assert torch.equal(vq.embedding.weight, weight) and torch.equal(vq.ema_cluster_size, ema)
    assert vq.embedding.weight.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0  # the commitment loss still trains the encoder


def test_frozen_state_survives_a_state_dict_round_trip():
    frozen = make_vq(32, 8).freeze()
    fresh = make_vq(32, 8, seed=1)
    fresh.load_state_dict(frozen.state_dict())
    assert bool(fresh.frozen)
    fresh.train()
    weight = fresh.embedding.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad] or [torch.zeros(1)], lr=1.0)
    fresh(torch.randn(2, 5, 8, requires_grad=True)).loss.backward()
    optimizer.step()
    assert torch.equal(fresh.embedding.weight, weight)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_identifies_the_codebook():
    vq = make_vq(64, 8)
    fp = vq.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert vq.fingerprint() == fp
    twin = make_vq(64, 8, seed=5)
    twin.load_state_dict(vq.state_dict())
    assert twin.fingerprint() == fp
    with torch.no_grad():
        vq.embedding.weight[17, 3] = torch.nextafter(vq.embedding.weight[17, 3], torch.tensor(float("inf")))
    assert vq.fingerprint() != fp  # a one-ulp change of one row is enough
    assert make_vq(64, 8, seed=1).fingerprint() != fp


# --- factorized, l2-normalised codes (codebook_dim) -------------------------------------------------------------
def factorized(k=32, d=16, c=4, **kw):
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, codebook_dim=c, **kw)
    torch.nn.init.normal_(vq.embedding.weight)
    return vq


def test_factorized_nearest_code_is_the_cosine_nearest_in_projected_space():
    vq = factorized().eval()
    vq.running_mean.normal_()
    z = torch.randn(3, 5, 16)
    x = F.normalize(vq.project_in(z) - vq.running_mean, dim=-1)  # centred, then unit length
    codes = F.normalize(vq.embedding.weight, dim=-1)
    expected = (x @ codes.t()).argmax(-1)
    assert torch.equal(vq.nearest_codes(z), expected)


def test_factorized_decode_matches_forward_and_codebook_rows():
    vq = factorized().eval()
    z = torch.randn(2, 6, 16)
    out = vq(z)
    assert out.quantized.shape == z.shape
    torch.testing.assert_close(out.quantized, vq.decode(out.codes))
    torch.testing.assert_close(vq.decode(out.codes), vq.codebook[out.codes])


def test_factorized_training_step_with_reset_backpropagates():
    vq = factorized(dead_code_threshold=0.5).train()  # every unused code is dead -> resets happen in forward
    before = vq.embedding.weight.detach().clone()
    z = torch.randn(4, 3, 16, requires_grad=True)
    out = vq(z)
    (out.quantized.sum() + out.loss).backward()  # must not fail although resets wrote into the weight
    assert z.grad is not None and vq.embedding.weight.grad is not None
    assert not torch.equal(before, vq.embedding.weight.detach())


def test_factorized_fingerprint_covers_the_projections():
    vq = factorized()
    fp = vq.fingerprint()
    with torch.no_grad():
        vq.project_out.weight[0, 0] += 1.0
    assert vq.fingerprint() != fp


def test_factorized_codes_are_centred_with_the_batch_mean_in_training_and_its_ema_in_eval():
    vq = factorized(ema_decay=0.5).train()
    z = torch.randn(64, 2, 16) + 5.0  # a large component shared by every vector
    vq(z)
    batch_mean = vq.project_in(z).reshape(-1, 4).mean(0)
    torch.testing.assert_close(vq.running_mean, 0.5 * batch_mean.detach())
    vq.eval()
    before = vq.running_mean.clone()
    vq(z)
    assert torch.equal(before, vq.running_mean)  # eval never updates it


# ----------------------------------------------------------------------------- entropy loss (LFQ / MAGVIT-v2)


def test_entropy_loss_is_low_when_vectors_spread_over_codes_and_high_when_they_collapse():
    vq = make_vq(16, 8)
    codes = vq.embedding.weight.detach()
    spread = codes[torch.arange(16)] + 0.01 * torch.randn(16, 8)  # each vector next to its own code
    collapsed = codes[torch.zeros(16, dtype=torch.long)] + 0.01 * torch.randn(16, 8)  # all next to code 0
    low, high = vq.entropy_loss(spread), vq.entropy_loss(collapsed)
    assert low.item() == pytest.approx(-torch.log(torch.tensor(16.0)).item(), abs=0.05)  # sure of each code, 16 used
    assert high.item() == pytest.approx(0.0, abs=0.05)  # sure of one code, one used
    assert low < high


def test_entropy_weight_adds_to_the_training_loss_only():
    torch.manual_seed(0)
    z = torch.randn(4, 3, 8)
    plain, weighted = make_vq(16, 8), make_vq(16, 8)
    weighted.entropy_weight = 0.5
    for vq in (plain, weighted):
        vq.eval()
    assert torch.equal(plain(z).loss, weighted(z).loss)  # eval: no entropy term
    plain.train(), weighted.train()
    base = plain(z).loss
    x = weighted._lookup_space(z)
    expected = base + 0.5 * weighted.entropy_loss(x)
    torch.testing.assert_close(weighted(z).loss, expected)


def test_entropy_loss_gradient_spreads_collapsed_vectors_over_more_codes():
    """Factorized unit-length codes (where the distances the 0.1 temperature assumes, in [0, 4], hold)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 16, codebook_dim=8).eval()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(32, 8))
    vq.requires_grad_(False)
    anchor = vq.project_in.weight.pinverse() @ F.normalize(vq.embedding.weight[0], dim=0)  # maps onto code 0
    z = (anchor + 0.05 * torch.randn(64, 16)).requires_grad_(True)
    before = vq.nearest_codes(z).unique().numel()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        vq.entropy_loss(vq._lookup_space(z)).backward()
        opt.step()
    assert before <= 3 and vq.nearest_codes(z).unique().numel() >= before + 8


# ----------------------------------------------------------------------------- k-means initialisation


def clustered(k: int, d: int, per: int, seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """k well-separated unit centres and ``per`` noisy points around each: (k·per, d) points, (k, d) centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    return (centres.repeat_interleave(per, 0) + noise * torch.randn(k * per, d, generator=g)), centres


def test_kmeans_init_puts_a_code_on_each_cluster_and_counts_its_members():
    torch.manual_seed(0)
    points, centres = clustered(8, 16, 20)
    vq = VectorQuantizer(8, 16)
    counts = vq.kmeans_init(points, iters=20)
    assert counts.sum() == len(points) and counts.shape == (8,)
    nearest = torch.cdist(centres, vq.codebook.detach()).min(1).values
    assert nearest.max() < 0.1  # every true centre has a code next to it
    assert vq.nearest_codes(points).unique().numel() == 8
    assert torch.equal(vq.ema_cluster_size, counts.float())


def test_kmeans_init_factorized_gives_unit_codes_and_sets_the_centring_mean():
    torch.manual_seed(0)
    points, _ = clustered(16, 24, 10)
    points = points + 3.0  # a large shared component, as context vectors have
    vq = VectorQuantizer(16, 24, codebook_dim=8)
    vq.kmeans_init(points)
    assert torch.allclose(vq.running_mean, vq.project_in(points).mean(0), atol=1e-5)
    assert torch.allclose(vq._codes().norm(dim=-1), torch.ones(16), atol=1e-5)
    vq.eval()
    assert vq.nearest_codes(points).unique().numel() >= 12  # the shared offset no longer sends all to one code


def test_kmeans_init_with_too_few_vectors_names_the_fix():
    vq = VectorQuantizer(64, 8)
    before = state(vq)
    with pytest.raises(ValueError, match="at least 64 context vectors, got 20; encode at least 16 documents"):
        vq.kmeans_init(torch.randn(5, 4, 8))  # 5 documents × T=4 = 20 vectors
    assert all(torch.equal(a, b) for a, b in zip(before, state(vq)))  # the codebook is unchanged
