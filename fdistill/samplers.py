"""EDM samplers (Karras et al. 2022) as plain functions, per-seed noise and guidance.

Every sampler takes a denoiser ``D(x, sigma, cond) -> x0_hat`` and unit-normal ``latents``,
scales them by ``sigma_max`` and integrates the probability-flow ODE
``dx/dsigma = (x - D(x, sigma)) / sigma`` down the Karras grid to ``sigma = 0``.

Precision: as in EDM, the solver state is kept in float64 (``solver_dtype``) so that the
accumulation over many steps adds no rounding error of its own; the denoiser is called with
``x`` cast to the latents' dtype (what the network expects) and its output is cast back. The
result is returned in the latents' dtype. Samplers run under ``torch.no_grad()``.

NFE counts calls of the denoiser that is passed in (a guided denoiser makes two network
calls per evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fdistill.denoisers.edm import karras_sigmas

DenoiserFn = Callable[..., Tensor]

DEFAULT_TEACHER_NFE = 35
"""Heun network evaluations of a teacher's samples unless ``--nfe`` says otherwise."""


class SeededGenerator:
    """One ``torch.Generator`` per sample, like EDM's ``StackedRandomGenerator``.

    Row ``i`` of every draw depends only on ``seeds[i]`` (and the device type), never on the
    batch size or how a run is split across processes.
    """

    def __init__(self, seeds: Sequence[int] | Tensor, device: torch.device | str | None = None):
        if isinstance(seeds, Tensor):
            seeds = seeds.reshape(-1).tolist()
        self.device = torch.device(device if device is not None else "cpu")
        self.generators = [
            torch.Generator(device=self.device).manual_seed(int(s) % (1 << 63)) for s in seeds
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape_per_sample: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """A [N, *shape_per_sample] standard-normal draw, row i from generator i."""
        return torch.stack(
            [
                torch.randn(tuple(shape_per_sample), generator=g, device=self.device, dtype=dtype)
                for g in self.generators
            ]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        """A standard-normal draw shaped like ``x`` (whose batch size must equal ``len(self)``)."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} but {len(self)} per-sample generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def seeded_randn(
    seeds: Sequence[int] | Tensor,
    shape_per_sample: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard-normal latents [N, *shape_per_sample], sample i drawn from its own seed i."""
    return SeededGenerator(seeds, device).randn(shape_per_sample, dtype)


def guided(denoiser: DenoiserFn, scale: float) -> DenoiserFn:
    """Classifier-free guidance: ``D_u + scale * (D_c - D_u)`` with ``D_u = D(x, sigma, None)``.

    ``scale = 1`` (or ``cond=None``) is a single plain call of ``denoiser``.
    """

    def denoise(x: Tensor, sigma: float | Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None or scale == 1:
            return denoiser(x, sigma, cond)
        d_u = denoiser(x, sigma, None)
        d_c = denoiser(x, sigma, cond)
        return guide(d_u, d_c, scale)

    return denoise


def guide(d_uncond: Tensor, d_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance of two denoised estimates: ``D_u + scale * (D_c - D_u)`` (the
    one place the formula is written; the sampler and the distillation teacher use it)."""
    return d_uncond + scale * (d_cond - d_uncond)


def sigma_grid(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """The ``num_steps + 1`` noise levels of a sampler: Karras grid then ``0`` (float64).

    ``num_steps = 1`` is the single step ``[sigma_max, 0]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        t = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        t = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def _randn_like(generator: torch.Generator | SeededGenerator | None, x: Tensor) -> Tensor:
    if isinstance(generator, SeededGenerator):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def _solve(
    denoiser: DenoiserFn,
    latents: Tensor,
    t_steps: Tensor,
    second_order: Sequence[bool],
    cond: Tensor | None,
    guidance: float,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    generator: torch.Generator | SeededGenerator | None = None,
    solver_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's Algorithm 2 over ``t_steps`` (descending, ending in 0); Heun where asked."""
    if guidance != 1:
        denoiser = guided(denoiser, guidance)
    net_dtype = latents.dtype
    num_steps = len(t_steps) - 1
    t_steps = t_steps.tolist()

    def d(x: Tensor, t: float) -> Tensor:
        return denoiser(x.to(net_dtype), t, cond).to(solver_dtype)

    x_next = latents.to(solver_dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            noise = _randn_like(generator, x_cur)
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * noise
        d_cur = (x_hat - d(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order[i] and t_next > 0:
            d_prime = (x_next - d(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(net_dtype)


def heun_sampler(
    denoiser: DenoiserFn,
    latents: Tensor,
    cond: Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    solver_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler; ``2 * num_steps - 1`` denoiser calls.

    Every step is Heun except the last (to ``sigma = 0``), which is Euler. ``latents`` are unit
    normal; they are scaled by ``sigma_max`` here. Returns ``x0`` in the latents' dtype.
    """
    t = sigma_grid(num_steps, sigma_min, sigma_max, rho)
    order2 = [True] * (num_steps - 1) + [False]
    return _solve(denoiser, latents, t, order2, cond, guidance, solver_dtype=solver_dtype)


def euler_sampler(
    denoiser: DenoiserFn,
    latents: Tensor,
    cond: Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    solver_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """First-order Euler (DDIM-like) sampler over the same grid; ``num_steps`` denoiser calls."""
    t = sigma_grid(num_steps, sigma_min, sigma_max, rho)
    return _solve(
        denoiser, latents, t, [False] * num_steps, cond, guidance, solver_dtype=solver_dtype
    )


def stochastic_sampler(
    denoiser: DenoiserFn,
    latents: Tensor,
    cond: Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    generator: torch.Generator | SeededGenerator | None = None,
    guidance: float = 1.0,
    solver_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's stochastic sampler (Algorithm 2): Heun steps with noise "churn".

    At each step with ``S_min <= sigma <= S_max`` the noise level is raised by the factor
    ``1 + gamma``, ``gamma = min(S_churn / num_steps, sqrt(2) - 1)``, by adding fresh noise
    (scaled by ``S_noise``) drawn from ``generator``: a ``torch.Generator``, a
    :class:`SeededGenerator` (per-sample, batch-size independent) or ``None`` (global RNG).
    ``S_churn = 0`` is :func:`heun_sampler`. ``2 * num_steps - 1`` denoiser calls.
    """
    t = sigma_grid(num_steps, sigma_min, sigma_max, rho)
    order2 = [True] * (num_steps - 1) + [False]
    return _solve(
        denoiser,
        latents,
        t,
        order2,
        cond,
        guidance,
        S_churn=S_churn,
        S_min=S_min,
        S_max=S_max,
        S_noise=S_noise,
        generator=generator,
        solver_dtype=solver_dtype,
    )


def steps_for_nfe(nfe: int) -> tuple[int, int]:
    """``(num_steps, euler_steps)`` so that Heun sampling makes exactly ``nfe`` denoiser calls.

    Odd ``nfe = 2N - 1``: ``N`` steps, only the last is Euler (EDM's sampler). Even
    ``nfe = 2N``: ``N + 1`` steps whose first step (from ``sigma_max``, where trajectories are
    nearly straight) is Euler as well as the last.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe % 2:
        return (nfe + 1) // 2, 1
    return nfe // 2 + 1, 2


def sample_with_nfe(
    denoiser: DenoiserFn,
    latents: Tensor,
    nfe: int,
    cond: Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    solver_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Deterministic Heun sampling with exactly ``nfe`` denoiser calls (see :func:`steps_for_nfe`).

    ``nfe = 1`` is one Euler step from ``sigma_max`` to 0, i.e. ``D(sigma_max * z, sigma_max)``.
    """
    num_steps, euler = steps_for_nfe(nfe)
    t = sigma_grid(num_steps, sigma_min, sigma_max, rho)
    order2 = [True] * (num_steps - 1) + [False]
    if euler == 2:
        order2[0] = False
    return _solve(denoiser, latents, t, order2, cond, guidance, solver_dtype=solver_dtype)


__all__ = [
    "SeededGenerator",
    "euler_sampler",
    "guided",
    "heun_sampler",
    "sample_with_nfe",
    "guide",
    "seeded_randn",
    "sigma_grid",
    "steps_for_nfe",
    "stochastic_sampler",
]
