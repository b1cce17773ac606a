"""Noise levels of the distillation losses, drawn in the teacher's own time variable.

Every loss of the method (the generator's distribution matching, the fake score's denoising
loss, the discriminator) noises a sample at a level ``sigma`` (EDM convention,
``x = x0 + sigma * eps``). Which levels, and how often, depends on how the teacher was trained:

* EDM teachers (continuous ``sigma``): :class:`KarrasGridLevels`, a uniform index into the
  Karras grid (``rho = 7``) with the extremes excluded. By default it
  draws exactly what ``FDistill.sample_sigma`` has always drawn, with the same generator calls.
  The official code (NVIDIA FastGen, ``EDMNoiseSchedule`` with ``time_dist_type="polynomial"``)
  uses the same 1000-level grid without its largest level and its two smallest.
* Discrete-time teachers (diffusers DDPM / Stable Diffusion): :class:`DiscreteTimeLevels`,
  integer timesteps uniform over ``[t_min, t_max]``, turned into noise levels by the teacher's
  schedule, ``sigma_t = sqrt((1 - abar_t) / abar_t)``. The default ``[1, 999]`` is the official
  SD v1.5 f-distill config (``t`` uniform in ``[0.001, 0.999]``, times 1000 steps; FastGen
  draws ``t`` continuously and reads its table at ``floor(1000 t)``, so its noise levels are
  those of timesteps 1..998); DMD2 draws ``[20, 980]``.

The ratio normalisation bins the density ratio by noise level in the same variable: linear in
``sigma`` for EDM teachers (``SigmaBins(..., binning="linear-sigma")``), linear in the timestep
for discrete-time teachers (:class:`TimestepBins`; official: 10 bins over ``[0, 0.999] * T``).
:func:`ratio_bins` picks the right one for a sampler.

Draws go through :func:`fdistill.rng.randint`, so a ``torch.Generator`` and a
:class:`fdistill.rng.BatchRandom` both work and multi-process draws do not depend on the rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fdistill import rng
from fdistill.denoisers.edm import karras_sigmas
from fdistill.loss import SigmaBins

TIME_PARAMETERISATIONS = ("edm", "discrete")
"""``edm``: the teacher takes any ``sigma``; ``discrete``: it was trained on integer timesteps."""

OFFICIAL_T_RANGE = (1, 999)
"""FastGen's SD v1.5 f-distill config: ``min_t=0.001``, ``max_t=0.999`` of 1000 timesteps."""

DMD2_T_RANGE = (20, 980)
"""DMD2's ``randint(20, 981)`` (``min_step_percent=0.02``, ``max_step_percent=0.98``)."""

OFFICIAL_RATIO_BINS = 10
"""Number of ratio-normalisation bins in the official code (``bin_num``)."""

OFFICIAL_BIN_RANGE = (0.0, 0.999)
"""Official discrete-time bin range, as a fraction of the number of training timesteps."""


def _device_of(generator: rng.RandomSource, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


class KarrasGridLevels(nn.Module):
    """Noise levels for EDM teachers: a uniform index into a Karras grid, ends excluded.

    The grid is ``karras_sigmas(num_sigmas, sigma_min, sigma_max, rho)`` (float64, then float32,
    descending) without its ``exclude_high`` largest and ``exclude_low`` smallest levels.
    The defaults (1 and 1) are fdistill's; :meth:`sample` then calls the random source exactly
    as ``FDistill.sample_sigma`` does, so swapping one for the other keeps runs bit-identical.
    FastGen's EDM configs draw grid indices ``2 .. 998`` of the ascending 1000-level grid,
    i.e. ``exclude_high=1, exclude_low=2``.
    """

    kind: Literal["edm"] = "edm"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        num_sigmas: int = 1000,
        exclude_high: int = 1,
        exclude_low: int = 1,
    ) -> None:
        super().__init__()
        if min(exclude_high, exclude_low) < 0 or num_sigmas - exclude_high - exclude_low < 1:
            raise ValueError(
                f"excluding {exclude_high} + {exclude_low} levels of {num_sigmas} leaves none"
            )
        grid = karras_sigmas(num_sigmas, sigma_min, sigma_max, rho)
        grid = grid[exclude_high : num_sigmas - exclude_low]
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.register_buffer("sigma_grid", grid.float(), persistent=False)

    def sample(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        """``n`` noise levels [n] (float32, on the grid's device)."""
        device = _device_of(generator, self.sigma_grid.device)
        idx = rng.randint(len(self.sigma_grid), (n,), generator, device=device)
        return self.sigma_grid[idx.to(self.sigma_grid.device)]

    def forward(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        return self.sample(n, generator)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` in float64: a DDPM state in EDM units."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
    if len(abar) < 2 or not ((abar > 0) & (abar < 1)).all():
        raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1)")
    return ((1 - abar) / abar).sqrt()


def _log_sigma_at(log_sigmas: Tensor, t: Tensor) -> Tensor:
    """``log sigma`` at continuous timesteps ``t``, linear between integer timesteps."""
    t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - lo.to(torch.float64)
    return log_sigmas[lo] * (1 - w) + log_sigmas[lo + 1] * w


def _timestep_of_sigma(log_sigmas: Tensor, sigma: Tensor) -> Tensor:
    """Continuous timestep (float64) of ``sigma``: linear in ``log sigma`` between the integer
    timesteps of an ascending ``log_sigmas`` table, clamped to the table."""
    log_s = sigma.detach().to(device=log_sigmas.device, dtype=torch.float64).log()
    log_s = log_s.reshape(-1).clamp(log_sigmas[0], log_sigmas[-1])
    lo = (torch.searchsorted(log_sigmas, log_s, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_s - log_sigmas[lo]) / (log_sigmas[lo + 1] - log_sigmas[lo])).clamp(0, 1)
    return (lo.to(torch.float64) + w).reshape(sigma.shape)


class DiscreteTimeLevels(nn.Module):
    """Noise levels for discrete-time teachers: integer timesteps uniform over ``[t_min, t_max]``.

    ``alphas_cumprod``: the teacher's ``abar_t`` for ``t = 0 .. T-1`` (a diffusers teacher
    exposes it as ``teacher.schedule.alphas_cumprod``; see :meth:`from_schedule`). A drawn
    timestep ``t`` becomes ``sigma_t = sqrt((1 - abar_t) / abar_t)``, so the teacher, which
    maps ``sigma`` back to its timestep, sees exactly ``t``.
    """

    kind: Literal["discrete"] = "discrete"

    def __init__(self, alphas_cumprod: Tensor, t_min: int = 1, t_max: int = 999) -> None:
        super().__init__()
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        t_min, t_max = int(t_min), int(t_max)
        if not 0 <= t_min <= t_max < len(sigmas):
            raise ValueError(
                f"timestep range [{t_min}, {t_max}] must lie in [0, {len(sigmas) - 1}] "
                f"(the teacher has {len(sigmas)} timesteps)"
            )
        self.t_min, self.t_max = t_min, t_max
        self.num_timesteps = len(sigmas)
        self.sigma_min, self.sigma_max = float(sigmas[t_min]), float(sigmas[t_max])
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        self.register_buffer("alphas_cumprod", abar.clone(), persistent=False)
        self.register_buffer("sigmas64", sigmas, persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)

    @classmethod
    def from_schedule(cls, schedule, t_min: int = 1, t_max: int = 999) -> DiscreteTimeLevels:
        """From any object with an ``alphas_cumprod`` table (e.g. a ``DiscreteSchedule``)."""
        return cls(schedule.alphas_cumprod, t_min, t_max)

    def sample_timesteps(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        """``n`` integer timesteps [n] (long), uniform over ``[t_min, t_max]``."""
        device = _device_of(generator, self.sigmas.device)
        k = rng.randint(self.t_max - self.t_min + 1, (n,), generator, device=device)
        return k.to(self.sigmas.device) + self.t_min

    def sigma_of_timestep(self, t: Tensor) -> Tensor:
        """Noise levels (float32) of integer timesteps."""
        return self.sigmas[t.long()]

    def timestep_of_sigma(self, sigma: Tensor) -> Tensor:
        """Continuous timestep (float64) of each ``sigma``, linear in ``log sigma`` between
        integer timesteps (the teacher's own inverse); levels outside the table are clamped."""
        return _timestep_of_sigma(self.sigmas64.log(), sigma)

    def sample(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        """``n`` noise levels [n] (float32): the sigmas of uniform integer timesteps."""
        return self.sigma_of_timestep(self.sample_timesteps(n, generator))

    def forward(self, n: int, generator: rng.RandomSource = None) -> Tensor:
        return self.sample(n, generator)


def timestep_bin_index(
    t: Tensor,
    num_bins: int = OFFICIAL_RATIO_BINS,
    t_lo: float = 0.0,
    t_hi: float = 999.0,
) -> Tensor:
    """Official discrete-time binning: ``floor((t - t_lo) / ((t_hi - t_lo) / num_bins))``,
    clamped to ``[0, num_bins - 1]`` (FastGen computes it on ``t / T`` over ``[0, 0.999]``)."""
    width = (float(t_hi) - float(t_lo)) / num_bins
    idx = ((t.to(torch.float64) - float(t_lo)) / width).floor().long()
    return idx.clamp(0, num_bins - 1)


class TimestepBins(nn.Module):
    """Ratio-normalisation bins linear in the timestep, applied to noise levels.

    Equal-width bins over ``[t_lo, t_hi]`` (default the official ``[0, 0.999 * T]``). Calling it
    maps ``sigma`` [N] to bin indices [N] (long) like :class:`fdistill.loss.SigmaBins`: each
    level's timestep (``log sigma`` interpolated between integer timesteps, as the teacher
    does), then :func:`timestep_bin_index`. Levels outside the range go to the end bins.
    """

    binning = "linear-timestep"
    snap = 1e-3
    """A level whose timestep is within ``snap`` of an integer counts as that integer: float32
    rounding of a table level moves its timestep by about 1e-5, and must not cross an edge
    that falls on an integer timestep."""

    def __init__(
        self,
        alphas_cumprod: Tensor,
        num_bins: int = OFFICIAL_RATIO_BINS,
        t_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
        num_bins = int(num_bins)
        if num_bins < 1:
            raise ValueError(f"ratio bins must be a positive number of bins, got {num_bins}")
        n = len(sigmas)
        if t_range is None:
            t_range = (n * OFFICIAL_BIN_RANGE[0], n * OFFICIAL_BIN_RANGE[1])
        lo, hi = float(t_range[0]), float(t_range[1])
        if not 0 <= lo < hi <= n - 1:
            raise ValueError(f"bin range [{lo}, {hi}] must lie in [0, {n - 1}] with lo < hi")
        self.num_bins, self.t_lo, self.t_hi = num_bins, lo, hi
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        t_edges = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)[1:-1]
        self.register_buffer("t_edges", t_edges, persistent=False)
        # The same edges as noise levels (for display, like SigmaBins.edges).
        self.register_buffer(
            "edges", _log_sigma_at(self.log_sigmas, t_edges).exp(), persistent=False
        )

    def timestep(self, sigma: Tensor) -> Tensor:
        """Timestep (float64) of each level, snapped to an integer within :attr:`snap`."""
        t = _timestep_of_sigma(self.log_sigmas, sigma)
        r = t.round()
        return torch.where((t - r).abs() < self.snap, r, t)

    def forward(self, sigma: Tensor) -> Tensor:
        idx = timestep_bin_index(
            self.timestep(sigma).reshape(-1), self.num_bins, self.t_lo, self.t_hi
        )
        return idx.to(sigma.device)


def ratio_bins(
    levels: KarrasGridLevels | DiscreteTimeLevels,
    num_bins: int = OFFICIAL_RATIO_BINS,
) -> nn.Module:
    """The official ratio bins for a sampler: linear in ``sigma`` over the EDM range, linear in
    the timestep (``[0, 0.999 * T]``) for a discrete-time teacher."""
    if isinstance(levels, DiscreteTimeLevels):
        return TimestepBins(levels.alphas_cumprod, num_bins)
    return SigmaBins(levels.sigma_min, levels.sigma_max, num_bins, "linear-sigma")


def noise_levels_for(
    schedule=None,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    num_sigmas: int = 1000,
    t_range: tuple[int, int] = OFFICIAL_T_RANGE,
) -> KarrasGridLevels | DiscreteTimeLevels:
    """The sampler for a teacher's time parameterisation.

    ``schedule``: the teacher's discrete schedule (anything with ``alphas_cumprod``, e.g.
    ``teacher.schedule`` of a diffusers teacher) or ``None`` for an EDM teacher, which gets the
    Karras grid over ``[sigma_min, sigma_max]``.
    """
    abar = getattr(schedule, "alphas_cumprod", None)
    if abar is None:
        return KarrasGridLevels(sigma_min, sigma_max, rho, num_sigmas)
    return DiscreteTimeLevels(abar, *t_range)


def timesteps_of_levels(
    levels: DiscreteTimeLevels | KarrasGridLevels, alphas_cumprod: Tensor
) -> Tensor:
    """Every level a sampler can draw, each equally likely, as a continuous timestep (float64)
    of the schedule ``alphas_cumprod``: exact statistics of a sampler in timestep units (e.g.
    the share of Karras-grid draws below timestep 20 of Stable Diffusion)."""
    ref = DiscreteTimeLevels(alphas_cumprod, 0, len(alphas_cumprod) - 1)
    if isinstance(levels, DiscreteTimeLevels):
        grid = levels.sigmas64[levels.t_min : levels.t_max + 1]
    else:
        grid = levels.sigma_grid.double()
    return ref.timestep_of_sigma(grid)


__all__ = [
    "DMD2_T_RANGE",
    "OFFICIAL_BIN_RANGE",
    "OFFICIAL_RATIO_BINS",
    "OFFICIAL_T_RANGE",
    "TIME_PARAMETERISATIONS",
    "DiscreteTimeLevels",
    "KarrasGridLevels",
    "TimestepBins",
    "timesteps_of_levels",
    "noise_levels_for",
    "ratio_bins",
    "sigmas_from_alphas_cumprod",
    "timestep_bin_index",
]
