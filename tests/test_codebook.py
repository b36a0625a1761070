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
    k, d = 64, 8
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d).train()  # default init: every code starts dead (never used), as in the reference
    assert (vq.unused_steps >= vq.dead_code_steps).all()
    before = vq.embedding.weight.detach().clone()
    z = torch.randn(2, 4, d)  # 8 vectors
    out = vq(z)
    used = torch.bincount(out.codes.flatten(), minlength=k) > 0
    weight = vq.embedding.weight.detach()
    changed = (weight != before).any(dim=1)
    assert int(changed.sum()) == 8 == vq.num_resets  # at most one code per batch vector
    assert not changed[used].any()  # a code picked in this forward is never reset
    assert rows_from(weight, z.reshape(-1, d))[changed].all()  # reseeded rows are batch vectors
    assert len({tuple(r.tolist()) for r in weight[changed]}) == 8  # ... distinct ones
    assert (vq.unused_steps[changed | used] == 0).all() and torch.equal(vq.reset_mask, changed)

    fed = [z.reshape(-1, d)]
    for _ in range(10):
        batch = torch.randn(2, 4, d)
        fed.append(batch.reshape(-1, d))
        vq(batch)
    weight = vq.embedding.weight.detach()
    reseeded = rows_from(weight, torch.cat(fed))
    assert (reseeded | (weight == before).all(dim=1)).all()  # a row is either untouched or a batch vector
    assert int(reseeded.sum()) > 8  # later batches revived more codes


@pytest.mark.parametrize("n_steps", [1, 5, 100])
def test_a_code_is_reset_exactly_when_unused_for_dead_code_steps_forwards(n_steps):
    torch.manual_seed(0)
    vq = make_vq(16, 4).train()
    vq.dead_code_steps = n_steps
    vq.unused_steps.zero_()  # every code just used
    target = vq.codebook.detach()[3].clone()
    z = target.expand(1, 16, 4).clone()  # every vector sits on code 3: the other 15 go unused
    for step in range(1, n_steps + 1):
        vq(z)
        assert vq.num_resets == (15 if step == n_steps else 0), step


def test_collapsed_input_after_kmeans_is_reseeded_within_dead_code_steps_plus_one():
    """Issue 35: k-means set the usage EMA to cluster counts over all its vectors, so after the VQ warm-up a code
    that stopped being used waited ~1,000 steps for its reset. Now the reset fires N steps after the last use."""
    torch.manual_seed(0)
    k, d, n_steps = 64, 16, 20
    points, _ = clustered(k, d, 30)  # 1,920 vectors, as k-means sees ~1,000 documents × T
    vq = VectorQuantizer(k, d, dead_code_steps=n_steps).train()
    vq.vectors_per_step = 96
    vq.kmeans_init(points)
    collapsed = points[:1].expand(96, d).reshape(8, 12, d)  # the encoder collapsed onto one point
    first = None
    for step in range(1, 3 * n_steps):
        vq(collapsed + 1e-3 * torch.randn_like(collapsed))
        if first is None and vq.num_resets:
            first = step
    assert first is not None and first <= n_steps + 1, first


def test_a_trained_codebook_saved_without_unused_steps_is_not_reset_wholesale():
    """A checkpoint from before ``unused_steps`` existed loads with every code marked unused for N steps; a used
    codebook (usage EMA > 0) then restarts them all as just used instead of re-seeding every code at once."""
    vq = make_vq(32, 8).train()
    state = {k: v for k, v in vq.state_dict().items() if k != "unused_steps"}
    state["ema_cluster_size"] = torch.ones(32)
    fresh = make_vq(32, 8, seed=1).train()
    fresh.load_state_dict(state, strict=False)
    fresh(torch.randn(2, 4, 8))
    assert fresh.num_resets == 0
    vq_fresh = VectorQuantizer(32, 8).train()  # a new codebook (usage 0) still re-seeds its dead codes at once
    vq_fresh(torch.randn(2, 4, 8))
    assert vq_fresh.num_resets == 8


def test_kmeans_init_puts_usage_on_the_per_step_scale():
    torch.manual_seed(0)
    points, _ = clustered(8, 16, 20)
    vq = VectorQuantizer(8, 16)
    vq.vectors_per_step = 12  # the last training forward quantized 12 vectors
    counts = vq.kmeans_init(points)
    torch.testing.assert_close(vq.ema_cluster_size.sum(), torch.tensor(12.0))  # one forward's worth, not 160
    torch.testing.assert_close(vq.ema_cluster_size, counts.float() * 12 / len(points))
    assert torch.equal(vq.unused_steps, torch.where(counts > 0, 0, vq.dead_code_steps))
    assert vq.reset_mask.all()  # the old codebook's optimizer moments restart too


def test_reset_restarts_the_optimizer_moments_of_reseeded_codes_only():
    torch.manual_seed(0)
    vq = make_vq(16, 4).train()
    vq.unused_steps.zero_()
    optimizer = torch.optim.Adam(vq.parameters(), lr=0.1)
    for _ in range(3):  # build up moments on every code
        optimizer.zero_grad()
        vq(torch.randn(4, 8, 4)).loss.backward()
        vq.reset_mask.fill_(False)
        optimizer.step()
    moments = {k: v.clone() for k, v in optimizer.state[vq.embedding.weight].items() if v.dim() == 2}
    assert all(v.abs().sum(1).gt(0).sum() > 8 for v in moments.values())
    vq.unused_steps[[2, 5]] = vq.dead_code_steps - 1  # codes 2 and 5 die in the next forward, which skips them
    others = vq.codebook.detach()[[i for i in range(16) if i not in (2, 5)]]
    optimizer.zero_grad()
    vq((others + 0.01 * torch.randn_like(others))[None]).loss.backward()
    assert vq.reset_mask.nonzero().flatten().tolist() == [2, 5]
    before = vq.embedding.weight.detach().clone()
    assert vq.restart_optimizer_state(optimizer) == 2 and not vq.reset_mask.any()
    state = optimizer.state[vq.embedding.weight]
    for key, old in moments.items():
        assert (state[key][[2, 5]] == 0).all()
        assert torch.equal(state[key][[0, 1, 3]], old[[0, 1, 3]])
    assert (vq.embedding.weight.grad[[2, 5]] == 0).all()
    optimizer.step()
    moved = (vq.embedding.weight.detach() - before).abs().sum(1)
    assert moved[[2, 5]].eq(0).all() and moved.gt(0).sum() > 0  # a fresh code does not ride the old momentum


def test_usage_perplexity_counts_codes_over_time_not_per_batch():
    torch.manual_seed(0)
    vq = make_vq(64, 8).train()
    vq.unused_steps.zero_()
    codes = vq.codebook.detach()
    for step in range(200):  # each forward uses 4 codes, a different 4 each time: 64 over time
        vq(codes[(step * 4) % 64:(step * 4) % 64 + 4][None])
    assert vq(codes[:4][None]).perplexity <= 4.01  # a batch sees at most its own vectors
    assert vq.usage_perplexity() > 50


@pytest.mark.parametrize("codebook_dim", [None, 4], ids=["paper-d-dim", "factorized"])
def test_entropy_loss_with_resets_trains(codebook_dim):
    """The paper's d-dim codes with the entropy loss failed in backward: the reset wrote into the weight that the
    entropy loss's distances had read ("modified by an inplace operation")."""
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 16, codebook_dim=codebook_dim, entropy_weight=0.1).train()  # all codes dead: resets
    z = torch.randn(4, 3, 16, requires_grad=True)
    out = vq(z)
    assert vq.num_resets > 0
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and vq.embedding.weight.grad is not None


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
    vq = factorized(dead_code_steps=1).train()  # every unused code is dead -> resets happen in forward
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
