"""The VQ codebook of MBC (arXiv 2601.00756 §3.2-3.3; reference ``models/modules/membank_comp.py``).

Each context vector is replaced by its nearest code (L2). The codebook is learned by gradient (codebook loss) and
the encoder is pulled towards it (commitment loss, weight β); gradients reach the encoder through the
straight-through estimator. *Online resetting* keeps the codebook alive: a code that no vector picked in the last
``dead_code_steps`` training forwards is dead and is re-seeded from a random vector of the current batch. This is
the paper's rule (an EMA of usage below a threshold) stated per step: in the reference (decay 0.99, threshold 1e-4,
gradient accumulation 4) a code that stops being used is re-seeded after ~90-115 optimizer steps, whatever its
usage was before; the EMA's own window depends on how much a code was used (a k-means cluster of 30 vectors takes
~900 steps), which left the guard off for whole training runs here (issue 35). The usage EMA is still kept, for the
usage perplexity over time (`usage_perplexity`). Outside training, or after `freeze()`, the codebook never changes,
so codes already stored in a memory bank never go stale.

Optional *factorized, l2-normalised codes* (``codebook_dim``; Yu et al. 2022, ViT-VQGAN §3.2, not in MBC): the
lookup happens in a small projected space where both vectors and codes are unit length, and a code decodes
through a linear map back to the LM width. Projected vectors are centred first (batch mean in training, its EMA
otherwise): context vectors of different documents share a large common component (mean pairwise cosine 0.44
for the embedded default, 0.00 after centring), which otherwise sends every document to the same few codes.
With the paper's direct lookup the embedded default collapsed to ~3 codes per batch of 96 vectors (usage
perplexity 3.3), so all documents looked alike to the aggregator.
"""

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class VQOutput:
    """Result of `VectorQuantizer.forward`.

    Attributes:
        quantized: (B, T, d) float, the codes' vectors with straight-through gradients to the input.
        codes: (B, T) int64, index of the nearest code per vector.
        loss: scalar, codebook loss + β·commitment loss (MBC Eq. for L_VQ), + w·entropy loss when
            ``entropy_weight`` > 0 (training only).
        perplexity: scalar, exp(entropy) of code usage in this batch (at most B·T: it hides collapse; see
            `VectorQuantizer.usage_perplexity` for usage over time).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def kmeans_plus_plus(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-means++ seeds (as scikit-learn's): k rows of x (n, c); each step draws 2 + ln k candidates with
    probability ∝ squared distance to the nearest seed so far and keeps the one that lowers the total most."""
    trials = 2 + int(math.log(k))
    seeds = [int(torch.randint(x.shape[0], ()))]
    dist = (x - x[seeds[0]]).pow(2).sum(1)  # (n,)
    for _ in range(k - 1):
        candidates = torch.multinomial(dist + 1e-12, trials, replacement=True)  # (trials,)
        new = torch.minimum(dist[None], torch.cdist(x[candidates], x).pow(2))  # (trials, n)
        best = int(new.sum(1).argmin())
        seeds.append(int(candidates[best]))
        dist = new[best]
    return x[seeds].clone()


def batch_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Scalar exp(entropy) of one batch's (K,) code counts (at most the batch's number of vectors)."""
    probs = counts / counts.sum()
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


def kmeans(x: torch.Tensor, k: int, iters: int = 10, spherical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeds then ``iters`` Lloyd steps on x (n, c): returns (k, c) centroids and (k,) int64 cluster sizes.
    ``spherical``: cosine assignment and unit centroids (x unit length). A cluster that ends empty keeps its seed."""
    centroids = kmeans_plus_plus(x, k)  # (k, c)
    counts = torch.zeros(k, dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = (x @ centroids.t()).argmax(1) if spherical else torch.cdist(x, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        means = torch.zeros_like(centroids).index_add_(0, assign, x) / counts.clamp(min=1)[:, None]
        means = l2norm(means) if spherical else means
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids, counts


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer with EMA usage tracking and dead-code reset.

    Args:
        codebook_size: K codes (MBC uses 512).
        dim: d, size of each vector (the LM hidden size).
        codebook_dim: ``None`` = the paper's lookup of d-dim codes by L2 distance; an int c = factorized codes:
            ``Linear(d, c)`` + l2-normalise, cosine nearest code, decode with ``Linear(c, d)``.
        commitment_cost: β in ``loss = ||sg(z) - q||² + β·||z - sg(q)||²`` (VQ-VAE; MBC uses 0.25).
        ema_decay: decay of the usage EMA, ``ema ← decay·ema + (1 - decay)·counts`` per training forward (MBC:
            0.99); it gives `usage_perplexity`.
        dead_code_steps: N, a code that no vector picked in the last N training forwards is dead and is re-seeded
            from the current batch (MBC §3.3's online resetting, per step; 100 ≈ the reference's window).
        entropy_weight: w of an entropy loss on soft code assignments ``p = softmax(-dist / 0.1)``:
            ``mean_i H(p_i) - H(mean_i p_i)`` (not in MBC; the LFQ / MAGVIT-v2 penalty, Yu et al. 2023 §3.1; the
            temperature 0.1 suits factorized unit-length codes, whose squared distances lie in [0, 4]). It
            keeps each vector sure of its code while the batch spreads over many codes; without it the embedded
            default drifted during training to ~1 code per document (usage perplexity 8 per batch of 96 vectors).

    The codebook is initialised uniform(-1/K, 1/K) as in the reference, so every code starts dead and is re-seeded
    from encoder outputs within the first training forwards (at most B·T codes per forward), as in the reference.

    A reset also marks its codes in ``reset_mask`` (K,) bool: `MBCTrainer` restarts their optimizer moments before
    the next optimizer step and clears it (`restart_optimizer_state`), so a re-seeded code does not move on the
    momentum of the code it replaced. ``num_resets`` counts re-seeded codes since construction.
    """

    def __init__(self, codebook_size: int, dim: int, commitment_cost: float = 0.25, ema_decay: float = 0.99,
                 dead_code_steps: int = 100, codebook_dim: int | None = None, entropy_weight: float = 0.0):
        super().__init__()
        if dead_code_steps < 1:
            raise ValueError(f"dead_code_steps must be >= 1 (training forwards without use before a code is "
                             f"re-seeded), got {dead_code_steps}.")
        self.entropy_weight = entropy_weight
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_cost, self.ema_decay, self.dead_code_steps = commitment_cost, ema_decay, dead_code_steps
        self.factorized = codebook_dim is not None
        self.project_in = nn.Linear(dim, codebook_dim) if self.factorized else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.factorized else nn.Identity()
        self.embedding = nn.Embedding(codebook_size, codebook_dim or dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("running_mean", torch.zeros(codebook_dim or 0))  # centring of factorized codes
        self.register_buffer("ema_cluster_size", torch.zeros(codebook_size))
        # training forwards since each code was last picked; starts at N: every code is dead until used
        self.register_buffer("unused_steps", torch.full((codebook_size,), dead_code_steps, dtype=torch.long))
        self.register_buffer("reset_mask", torch.zeros(codebook_size, dtype=torch.bool), persistent=False)
        self.register_buffer("frozen", torch.tensor(False))
        self.num_resets = 0
        self.vectors_per_step = None  # vectors of the last training forward (sets the k-means usage scale)
        self.bypass = False  # VQ warm-up (`MBCTrainer`, ``vq_warmup_steps``): forward skips the quantization

    @property
    def code_weight(self) -> torch.Tensor:
        """(K, c) the stored code vectors (a parameter trained by the codebook loss)."""
        return self.embedding.weight

    def _codes(self) -> torch.Tensor:
        """(K, c) code vectors in the lookup space (unit length when factorized)."""
        weight = self.code_weight.detach() if bool(self.frozen) else self.code_weight
        # clone: dead-code resets write into the weight after this call, while autograd (the entropy loss's
        # distances, the codebook loss) still needs the values it read
        return l2norm(weight.clone()) if self.factorized else weight.clone()

    def _lookup_space(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z.to(self.code_weight.dtype))
        if not self.factorized:
            return x
        if self.training and not bool(self.frozen):
            mean = x.reshape(-1, x.shape[-1]).mean(0)
            with torch.no_grad():
                self.running_mean.mul_(self.ema_decay).add_(mean.detach(), alpha=1 - self.ema_decay)
        else:
            mean = self.running_mean
        return l2norm(x - mean)

    def usage_perplexity(self) -> float:
        """exp(entropy) of the usage EMA: how many codes are in use over the last ~1/(1 - ema_decay) training
        forwards (K = all used evenly; unlike a batch's perplexity it is not capped at B·T). 0 before any use."""
        total = float(self.ema_cluster_size.sum())
        if total <= 0:
            return 0.0
        p = self.ema_cluster_size / total
        return float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))

    @property
    def codebook(self) -> torch.Tensor:
        """(K, d) float, what each code decodes to (the vectors the aggregator reads)."""
        return self.project_out(self._codes())

    def freeze(self) -> "VectorQuantizer":
        """Stop every codebook change (no gradient, no dead-code reset), even in training mode. The ``frozen``
        buffer is saved with the model; a loaded frozen codebook decodes without gradient."""
        self.frozen.fill_(True)
        self.requires_grad_(False)
        return self

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10) -> torch.Tensor:
        """Initialise the codebook by k-means on context vectors z (..., d) instead of uniform noise (lucidrains'
        ``kmeans_init``; not in MBC, whose codes start uniform and are re-seeded by online resetting).

        Factorized codes: the centring mean becomes the mean of z's projections and the k-means is spherical
        (cosine, unit centroids); otherwise L2. Seeds are drawn by greedy k-means++ (Arthur & Vassilvitskii 2007)
        from the global torch RNG, then ``iters`` Lloyd steps; clusters that end empty keep their seed vector.

        Usage restarts on the per-step scale: a code with members counts as just used (``unused_steps`` 0), an
        empty cluster is dead at once, and the usage EMA is each cluster's share of one forward's vectors
        (``vectors_per_step``, the last training forward's, else K), not its count over all of z (which made a
        stranded code wait ~1,000 steps for its reset, issue 35). Every code is marked in ``reset_mask``: the
        optimizer moments of the old codebook restart too. Source of the need: code collapse on CPU runs
        (docs/findings.md).

        Returns:
            (K,) int64 cluster sizes.

        Raises:
            ValueError: fewer vectors than codes (encode more documents).
        """
        x = self.project_in(z.reshape(-1, z.shape[-1]).to(self.code_weight.dtype))  # (n, c)
        n, K = x.shape[0], self.codebook_size
        if n < K:
            raise ValueError(f"k-means initialisation of {K} codes needs at least {K} context vectors, got {n}; "
                             f"encode at least {-(-K // z.shape[-2]) if z.dim() > 2 else K} documents.")
        if self.factorized:
            self.running_mean.copy_(x.mean(0))
            x = l2norm(x - self.running_mean)
        centroids, counts = kmeans(x, K, iters, spherical=self.factorized)
        self.code_weight.copy_(centroids)
        per_step = self.vectors_per_step or K
        self.ema_cluster_size.copy_(counts.to(self.ema_cluster_size.dtype) * (per_step / n))
        self.unused_steps.copy_(torch.where(counts > 0, 0, self.dead_code_steps))
        self.reset_mask.fill_(True)
        return counts

    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 over the parameters that decide codes and their vectors (fp32 bytes); a bank
        records it to refuse another codebook."""
        digest = hashlib.sha256()
        for _, p in sorted([*self.named_parameters(), ("running_mean", self.running_mean)]):
            digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) float -> (...) int64 index of the nearest code (L2; cosine when factorized)."""
        return self._nearest(self._lookup_space(z))

    def _distances(self, x: torch.Tensor) -> torch.Tensor:
        """(..., c) vectors in the lookup space -> (n, K) squared L2 distances to every code (n = all vectors)."""
        codes = self._codes()
        flat = x.reshape(-1, codes.shape[1])
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(..., c) vectors in the lookup space -> (...) int64 nearest code."""
        return self._distances(x).argmin(dim=1).view(x.shape[:-1])

    def entropy_loss(self, x: torch.Tensor, temperature: float = 0.1, distances: torch.Tensor | None = None):
        """Scalar ``mean_i H(p_i) - H(mean_i p_i)`` of soft assignments ``p_i = softmax(-dist_i / temperature)`` of
        the vectors x (..., c) in the lookup space (see ``entropy_weight``); in nats, in [-log K, log K].
        ``distances``: their (n, K) `_distances` if already computed."""
        distances = self._distances(x) if distances is None else distances
        p = torch.softmax(-distances / temperature, dim=-1)  # (n, K)
        per_vector = -(p * torch.log(p + 1e-10)).sum(-1).mean()
        mean = p.mean(0)
        return per_vector + (mean * torch.log(mean + 1e-10)).sum()

    def unquantized(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): what the aggregator would read with the quantization step skipped (the input itself
        for the paper's codebook; the decoded, centred unit vector before snapping to a code when factorized)."""
        return self.project_out(self._lookup_space(z)).to(z.dtype) if self.factorized else z

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(...) integer codes -> (..., d) code vectors."""
        return self.project_out(F.embedding(codes.long(), self._codes()))

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantize z of shape (B, T, d); in training (and not frozen) also update usage and reset dead codes.

        While ``bypass`` is set (the VQ warm-up of `MBCTrainer`, not in MBC) ``quantized`` is `unquantized` (z), with
        zero loss and perplexity and no codebook update: the memory path learns on float vectors first, and the
        codebook is then k-means initialised on vectors that already carry the documents.
        """
        x = self._lookup_space(z)  # (B, T, c)
        if self.training:
            self.vectors_per_step = x.shape[:-1].numel()
        if self.bypass:
            zero = z.new_zeros((), dtype=torch.float32)
            return VQOutput(quantized=self.project_out(x).to(z.dtype), codes=self._nearest(x), loss=zero,
                            perplexity=zero)
        distances = self._distances(x)  # (B·T, K)
        codes = distances.argmin(dim=1).view(x.shape[:-1])
        q = F.embedding(codes, self._codes())
        loss = F.mse_loss(q, x.detach()) + self.commitment_cost * F.mse_loss(q.detach(), x)
        if self.entropy_weight > 0 and self.training and not bool(self.frozen):
            loss = loss + self.entropy_weight * self.entropy_loss(x, distances=distances)
        quantized = self.project_out(x + (q - x).detach()).to(z.dtype)  # straight-through estimator
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        if self.training and not bool(self.frozen):
            self._reset_dead_codes(rearrange(x.detach(), "... c -> (...) c"), counts)
        return VQOutput(quantized=quantized, codes=codes, loss=loss, perplexity=batch_perplexity(counts))

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        """One training forward's (K,) code counts into the usage EMA and ``unused_steps``."""
        self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _reset_dead_codes(self, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        """Online resetting (MBC §3.3), per training forward: update the usage EMA and ``unused_steps``; codes
        unused for ``dead_code_steps`` forwards are re-seeded from distinct random rows of ``vectors`` (n, c), at
        most n of them, and restart as just used (``unused_steps`` 0, EMA the mean usage, ``reset_mask``)."""
        if bool(self.ema_cluster_size.sum() > 0) and bool((self.unused_steps >= self.dead_code_steps).all()):
            self.unused_steps.zero_()  # a used codebook from a checkpoint without unused_steps: all restart as used
        self._track_usage(counts)
        dead = (self.unused_steps >= self.dead_code_steps).nonzero().flatten()
        n = min(dead.numel(), vectors.shape[0])
        if n == 0:
            return
        dead = dead[torch.randperm(dead.numel(), device=dead.device)[:n]]
        picks = torch.randperm(vectors.shape[0], device=vectors.device)[:n]
        self.embedding.weight[dead] = vectors[picks].to(self.embedding.weight.dtype)
        self.ema_cluster_size[dead] = self.ema_cluster_size.mean()
        self.unused_steps[dead] = 0
        self.reset_mask[dead] = True
        self.num_resets += n

    @torch.no_grad()
    def restart_optimizer_state(self, optimizer: torch.optim.Optimizer) -> int:
        """Zero the gradient and the optimizer moments (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum) of
        the codes in ``reset_mask``, then clear it; call between backward and ``optimizer.step()``. A re-seeded
        code then starts from its batch vector instead of following the momentum of the code it replaced.

        Returns:
            int, the number of codes restarted.
        """
        mask = self.reset_mask
        n = int(mask.sum())
        if n == 0:
            return 0
        weight = self.embedding.weight
        if weight.grad is not None:
            weight.grad[mask] = 0
        for value in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                value[mask] = 0
        mask.fill_(False)
        return n
