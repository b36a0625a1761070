"""MBC's codebook on lucidrains' ``vector-quantize-pytorch`` (issue 35, item 3):
``codebook_backend="vector-quantize-pytorch"``.

The same interface as `VectorQuantizer` (codes, decode, k-means initialisation, VQ warm-up bypass, freeze,
fingerprint, usage logs), with the library's ``VectorQuantize`` doing the lookup and the codebook update: codes
move by an EMA of their assigned vectors (van den Oord et al. 2017, App. A.1; the library's default) instead of the
paper's codebook loss, gradients reach the encoder through the rotation trick (Fifer et al. 2024) instead of the
straight-through estimator, and a code whose EMA usage falls below ``threshold_ema_dead_code`` is re-seeded from the
batch (the library's dead-code replacement, the paper's online resetting by another rule).

The threshold is 1 / ``dead_code_steps``: a code picked less often than once every N training forwards (its usage
EMA, in vectors per forward, below 1/N) is dead, the rate form of the paper's rule as `VectorQuantizer` states it
per step. The paper's own setting (L2, β = 0.25, gradient-trained codes, reset to batch
vectors) stays ``codebook_backend="mbc"``, the default.
"""

import hashlib

import torch

from .codebook import VectorQuantizer, VQOutput, batch_perplexity


class LibraryVectorQuantizer(VectorQuantizer):
    """`VectorQuantizer` backed by ``vector_quantize_pytorch.VectorQuantize`` (d-dim L2 codes, EMA codebook).

    Args:
        codebook_size: K. dim: d. commitment_cost: β (the library's ``commitment_weight``). ema_decay: the EMA
            decay of the codebook and of its usage (MBC: 0.99). dead_code_steps: N, the dead-code threshold is
            1/N vectors per forward (see the module docstring).

    Raises:
        ImportError: ``vector-quantize-pytorch`` is not installed (``pip install vector-quantize-pytorch``).
    """

    def __init__(self, codebook_size: int, dim: int, commitment_cost: float = 0.25, ema_decay: float = 0.99,
                 dead_code_steps: int = 100):
        super().__init__(codebook_size, dim, commitment_cost, ema_decay, dead_code_steps)
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError as exc:
            raise ImportError("codebook_backend='vector-quantize-pytorch' needs the library: pip install "
                              "vector-quantize-pytorch (or use codebook_backend='mbc').") from exc
        del self.embedding  # the library holds the codes
        self.vq = VectorQuantize(dim, codebook_size, decay=ema_decay, commitment_weight=commitment_cost,
                                 threshold_ema_dead_code=1.0 / dead_code_steps, rotation_trick=True)

    @property
    def code_weight(self) -> torch.Tensor:
        """(K, d) the library's codebook buffer (a view: writes go to the library)."""
        return self.vq._codebook.embed[0]

    @property
    def _library(self):
        return self.vq._codebook

    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 over the code vectors (fp32 bytes): a bank records it to refuse another codebook."""
        return hashlib.sha256(self.code_weight.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10) -> torch.Tensor:
        """`VectorQuantizer.kmeans_init`, then the library's EMA state on the same per-step scale (cluster sizes =
        each cluster's share of one forward's vectors; running sums = centroid × size)."""
        counts = super().kmeans_init(z, iters)
        lib = self._library
        lib.cluster_size[0].copy_(self.ema_cluster_size)
        lib.embed_avg[0].copy_(self.code_weight * self.ema_cluster_size[:, None])
        lib.initted.fill_(True)
        return counts

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantize z (B, T, d) with the library; in training (not frozen) its EMA moves the codes and its dead-code
        replacement re-seeds codes from the batch. ``bypass``: as `VectorQuantizer.forward`."""
        if self.bypass:
            return super().forward(z)
        n = z.shape[:-1].numel()
        update = self.training and not bool(self.frozen)
        if update:
            self.vectors_per_step = n
            before = self._library.cluster_size[0].clone()
        quantized, codes, loss = self.vq(z.float(), freeze_codebook=not update)
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        if update:
            with torch.no_grad():  # what the library re-seeded this forward: below its threshold after the EMA
                ema = before * self.ema_decay + counts * (1 - self.ema_decay)
                dead = (ema < self._library.threshold_ema_dead_code).nonzero().flatten()[:n]
                self.reset_mask[dead] = True
                self.num_resets += dead.numel()
                self._track_usage(counts)
        return VQOutput(quantized=quantized.to(z.dtype), codes=codes, loss=loss.reshape(()),
                        perplexity=batch_perplexity(counts))

    def restart_optimizer_state(self, optimizer: torch.optim.Optimizer) -> int:
        """The library's codes move by EMA, not by the optimizer: nothing to restart. Clears ``reset_mask``.

        Returns:
            int, 0.
        """
        self.reset_mask.fill_(False)
        return 0
