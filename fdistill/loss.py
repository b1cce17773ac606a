"""The f-distill losses: h-weighted distribution matching, GAN terms and ratio normalisation.

Every function returns per-sample losses (shape ``[N]``), as EDM's losses do; the training
loop takes their mean. Gradients flow only where the method says: through the student sample
``x = G(z)`` in the generator loss, through the discriminator in its own loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill import rng
from fdistill.denoisers.base import sigma_view
from fdistill.divergences import Divergence


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over DDP processes (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def distribution_matching_loss(
    x: Tensor,
    d_teacher: Tensor,
    d_fake: Tensor,
    h: Tensor,
    sigma: float | Tensor,
    weighting: str = "dmd",
) -> Tensor:
    """Per-sample f-distill generator loss ``0.5 * ||x - sg(x - g)||^2``.

    ``x`` is the student sample (carrying the graph to the generator), ``d_teacher`` and
    ``d_fake`` the teacher's and the fake score's denoised estimates at ``x_t = x + sigma*eps``,
    ``h`` the per-sample weight ``h(r(x_t))``. Its gradient w.r.t. ``x`` is ``g``:

    * ``weighting="score"``: ``g = h * (grad log q_t - grad log p_t)
      = h * (d_fake - d_teacher) / sigma^2``, summed over dimensions: the exact f-divergence
      gradient of the paper's theorem (tested against quadrature).
    * ``weighting="dmd"`` (training default): ``g = h * (d_fake - d_teacher) / mean|x - d_teacher|``
      with the normaliser per sample and the squared error averaged over dimensions, as DMD/DMD2
      do, so that published learning rates carry over.
    """
    n = x.shape[0]
    diff = (d_fake - d_teacher).detach().float()
    hv = sigma_view(h.detach().float(), x)
    if weighting == "score":
        g = hv * diff / sigma_view(sigma, x).float() ** 2
        reduce = torch.sum
    elif weighting == "dmd":
        norm = (x.detach().float() - d_teacher.detach().float()).abs().reshape(n, -1).mean(1)
        g = hv * diff / sigma_view(norm.clamp_min(1e-8), x)
        reduce = torch.mean
    else:
        raise ValueError(f"weighting must be 'dmd' or 'score', got '{weighting}'")
    target = (x.float() - g).detach()
    return 0.5 * reduce((x.float() - target).pow(2).reshape(n, -1), dim=1)


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """Logistic loss with real = 1, fake = 0; at optimum ``logit = log(p_t / q_t)``."""
    return F.softplus(-logit_real) + F.softplus(logit_fake)


def gan_generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss for the generator: ``softplus(-logit)``."""
    return F.softplus(-logit_fake)


def r1_penalty(logit_real: Tensor, x_real: Tensor) -> Tensor:
    """Per-sample ``||grad_x logit||^2`` at real inputs (``x_real`` must require grad)."""
    (grad,) = torch.autograd.grad(logit_real.sum(), x_real, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1)


def approx_r1_penalty(
    logit_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x_real_noised: Tensor,
    sigma: Tensor,
    cond: Tensor | None = None,
    generator: rng.RandomSource = None,
    scale: float = 0.1,
    logit_real: Tensor | None = None,
    perturb_from: Tensor | None = None,
) -> Tensor:
    """Approximate R1 (APT, as the official DMD2/f-distill code has it): per-sample
    ``mean((logit(x) - logit(x + scale * eps))^2)`` with ``eps ~ N(0, I)``, no double backward.

    ``logit_fn(x, sigma, cond)`` is the discriminator (features and head) returning logits [N]
    or [N, ...]; ``x_real_noised`` its real input at levels ``sigma`` [N]. ``logit_real``: the
    logits already computed on ``x_real_noised`` (saves a pass). ``perturb_from``: the tensor
    that gets the extra noise, default ``x_real_noised``; FastGen (dmd2.py,
    ``_compute_r1_regularization``) passes the *clean* real batch there while keeping the
    noised one's logits, which is ``perturb_from=x_real``. The batch mean of the result is
    ``F.mse_loss(logit_real, logit_perturbed)``. Gradients flow through both logit passes.
    Computed in at least float32 (bf16 logits are upcast before the difference).
    """
    if logit_real is None:
        logit_real = logit_fn(x_real_noised, sigma, cond)
    base = x_real_noised if perturb_from is None else perturb_from
    eps = rng.randn(base.shape, generator, device=base.device, dtype=base.dtype)
    logit_pert = logit_fn(base + scale * eps, sigma, cond)
    n, dtype = logit_real.shape[0], torch.promote_types(logit_real.dtype, torch.float32)
    return (logit_real.to(dtype) - logit_pert.to(dtype)).pow(2).reshape(n, -1).mean(1)


RATIO_BINNINGS = {"log-sigma": 8, "linear-sigma": 10}
"""Noise-level binnings of the ratio normalisation and their default number of bins."""


class SigmaBins(nn.Module):
    """``num_bins`` equal-width noise-level bins over ``[sigma_min, sigma_max]``.

    ``binning="log-sigma"``: equal width in ``log sigma`` (8 bins by default), so every decade of
    noise gets bins. ``"linear-sigma"``: equal width in ``sigma`` (10 by default), the official
    code's ``floor((sigma - sigma_min) / width)``. Levels outside the range go to the end bins.
    Calling it maps ``sigma`` [N] to bin indices [N] (long).
    """

    def __init__(
        self,
        sigma_min: float,
        sigma_max: float,
        num_bins: int | None = None,
        binning: str = "log-sigma",
    ):
        super().__init__()
        if binning not in RATIO_BINNINGS:
            raise ValueError(
                f"ratio binning must be one of {', '.join(RATIO_BINNINGS)}, got {binning!r}"
            )
        num_bins = RATIO_BINNINGS[binning] if num_bins is None else int(num_bins)
        if num_bins < 1:
            raise ValueError(f"ratio bins must be a positive number of bins, got {num_bins}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma range [{sigma_min}, {sigma_max}] must have 0 < min < max")
        self.binning, self.num_bins = binning, num_bins
        lo, hi = float(sigma_min), float(sigma_max)
        if binning == "log-sigma":
            lo, hi = math.log(lo), math.log(hi)
        edges = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)[1:-1]
        self.register_buffer("edges", edges.float(), persistent=False)

    def forward(self, sigma: Tensor) -> Tensor:
        s = sigma.detach().float().reshape(-1)
        if self.binning == "log-sigma":
            return torch.bucketize(s.log(), self.edges)
        # right=True: a level on an edge goes to the upper bin, as floor() does.
        return torch.bucketize(s, self.edges, right=True)


class RatioNormalizer(nn.Module):
    """Variance control for the weights ``h(r)`` ("two-stage normalisation").

    1. clip ``r`` to ``r_clip``;
    2. divide ``r`` by its mean over samples in the same noise-level bin (:class:`SigmaBins`:
       ``binning`` ``"log-sigma"`` or the official ``"linear-sigma"``; the bin means optionally
       smoothed by an EMA kept as a buffer; a bin's first mean is taken as it is);
    3. compute ``h`` and divide it by its batch mean.

    Means are all-reduced across DDP processes, so every rank uses the same normaliser.
    """

    def __init__(
        self,
        sigma_min: float,
        sigma_max: float,
        num_bins: int | None = None,
        r_clip: tuple[float, float] = (0.1, 20.0),
        ema: float = 0.0,
        binning: str = "log-sigma",
        bins: nn.Module | None = None,
    ):
        super().__init__()
        if not 0 <= ema < 1:
            raise ValueError(f"ratio EMA must be in [0, 1), got {ema}")
        # ``bins``: any sigma -> bin index module with ``num_bins`` (e.g. timestep bins of a
        # discrete-time teacher); default the sigma bins of ``binning``
        self.bins = bins if bins is not None else SigmaBins(sigma_min, sigma_max, num_bins, binning)
        nb = self.bins.num_bins
        self.register_buffer("bin_mean", torch.ones(nb))
        self.register_buffer("bin_seen", torch.zeros(nb, dtype=torch.bool))
        self.log_clip = (math.log(r_clip[0]), math.log(r_clip[1]))
        self.ema = ema
        self._fixed: tuple[Tensor, Tensor] | None = None  # whole-batch statistics (fixed())

    @property
    def edges(self) -> Tensor:
        return self.bins.edges

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints before SigmaBins saved the edges; they are derived from the config now.
        state_dict.pop(prefix + "edges", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bin_means(self, logr: Tensor, sigma: Tensor) -> Tensor:
        """The mean clipped ratio per bin over these samples of every process (stage 1),
        blended by the EMA (updated here in training mode)."""
        logr = logr.detach().float().clamp(*self.log_clip)
        idx = self.bins(sigma)
        nb = self.bin_mean.numel()
        stats = torch.zeros(2, nb, device=logr.device)
        stats[0].index_add_(0, idx, logr.exp())
        stats[1].index_add_(0, idx, torch.ones_like(logr))
        stats = all_reduce_sum(stats)
        present = stats[1] > 0
        batch_mean = stats[0] / stats[1].clamp_min(1)
        mean = torch.where(present, batch_mean, self.bin_mean)
        if self.ema > 0:
            blend = torch.where(
                self.bin_seen, self.ema * self.bin_mean + (1 - self.ema) * mean, mean
            )
            mean = torch.where(present, blend, self.bin_mean)
            if self.training:
                self.bin_mean.copy_(mean)
                self.bin_seen |= present
        return mean

    def normalize_logr(self, logr: Tensor, sigma: Tensor) -> Tensor:
        """Stages 1-2: clipped log-ratio minus the log of its bin's mean ratio."""
        mean = self.bin_means(logr, sigma) if self._fixed is None else self._fixed[0]
        return logr.detach().float().clamp(*self.log_clip) - mean.log()[self.bins(sigma)]

    def _h_mean(self, h: Tensor) -> Tensor:
        tot = all_reduce_sum(torch.stack([h.sum(), h.new_tensor(float(h.numel()))]))
        return (tot[0] / tot[1]).clamp_min(1e-12)

    def forward(self, h_fn, logr: Tensor, sigma: Tensor) -> Tensor:
        """Normalised weights: ``h(normalised r)`` divided by its (global) batch mean."""
        h = h_fn(self.normalize_logr(logr, sigma)).float()
        return h / (self._h_mean(h) if self._fixed is None else self._fixed[1])

    @contextlib.contextmanager
    def fixed(self, h_fn, logr: Tensor, sigma: Tensor):
        """Normalise with the statistics of ``(logr, sigma)`` — every sample of a batch that is
        processed in micro-batches — instead of each call's own: inside the block, calls give
        exactly the weights the whole batch would get (bin means and the EMA update taken once,
        from all the samples of every process)."""
        mean = self.bin_means(logr, sigma)
        self._fixed = None
        h = h_fn(logr.detach().float().clamp(*self.log_clip) - mean.log()[self.bins(sigma)])
        self._fixed = (mean, self._h_mean(h.float()))
        try:
            yield
        finally:
            self._fixed = None


class FDistillWeights(nn.Module):
    """Turn discriminator logits into per-sample weights ``h`` for the generator loss.

    ``logr = clamp(logit, -logit_clip, logit_clip)``; then either the plain ``h(logr)`` or,
    with a :class:`RatioNormalizer`, the two-stage-normalised weights.
    """

    def __init__(
        self,
        divergence: Divergence,
        logit_clip: float = 10.0,
        normalizer: RatioNormalizer | None = None,
    ):
        super().__init__()
        self.divergence = divergence
        self.logit_clip = float(logit_clip)
        self.normalizer = normalizer

    def forward(self, logit: Tensor, sigma: Tensor) -> Tensor:
        logr = logit.detach().float().clamp(-self.logit_clip, self.logit_clip)
        if self.normalizer is None:
            return self.divergence.h(logr)
        return self.normalizer(self.divergence.h, logr, sigma)

    def fixed(self, logit: Tensor, sigma: Tensor) -> contextlib.AbstractContextManager:
        """Weights of the whole batch whose logits and levels are ``logit``, ``sigma`` for the
        calls inside the block (:meth:`RatioNormalizer.fixed`); without a normaliser every
        weight is per-sample already."""
        if self.normalizer is None:
            return contextlib.nullcontext()
        logr = logit.detach().float().clamp(-self.logit_clip, self.logit_clip)
        return self.normalizer.fixed(self.divergence.h, logr, sigma)
