"""Metrics for low-dimensional distillation against an exact Gaussian-mixture teacher.

The teacher is duck-typed: anything with ``.weights [K]`` (summing to 1),
``.log_prob(x, sigma=0.0) -> [N]`` (exact log density of the teacher convolved with
``N(0, sigma^2 I)``), ``.assign(x) -> LongTensor [N]`` (the mode of each sample) and
``.sample(n, generator=None)`` works, e.g. :class:`fdistill.teachers.GaussianMixture`.

Because the teacher density is exact, these metrics compare the student with the very
distribution it was distilled towards: which modes it kept (mode-seeking divergences drop
some), how far its mode weights are from the teacher's, and how well the learned density
ratio that drives the f-divergence weighting matches the true one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from fdistill.metrics.knn import knn_precision_recall


class MixtureTeacher(Protocol):
    weights: Tensor

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor: ...
    def assign(self, x: Tensor) -> Tensor: ...
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


def mode_histogram(samples: Tensor, teacher: MixtureTeacher) -> Tensor:
    """Fraction of ``samples`` assigned to each of the teacher's K modes (float64 ``[K]``)."""
    k = teacher.weights.shape[0]
    counts = torch.bincount(teacher.assign(samples).reshape(-1).cpu(), minlength=k)
    return counts.to(torch.float64) / max(samples.shape[0], 1)


def mode_coverage(hist: Tensor, weights: Tensor, threshold: float = 0.5) -> float:
    """Fraction of modes whose share of samples is at least ``threshold`` x their weight.

    A mode that receives a trickle of samples is counted as dropped, which a plain
    "any sample" test would miss with large sample counts.
    """
    h = torch.as_tensor(hist, dtype=torch.float64).cpu()
    w = torch.as_tensor(weights, dtype=torch.float64).cpu()
    return (h >= threshold * w).double().mean().item()


def tv_distance(hist: Tensor, weights: Tensor) -> float:
    """Total-variation distance ``0.5 * sum |hist - weights|`` between mode distributions."""
    h = torch.as_tensor(hist, dtype=torch.float64).cpu()
    w = torch.as_tensor(weights, dtype=torch.float64).cpu()
    return 0.5 * (h - w).abs().sum().item()


def log_kde(x: Tensor, samples: Tensor, sigma: float | Tensor, batch: int = 4096) -> Tensor:
    """``log (1/M) sum_j N(x_i; y_j, sigma_i^2 I)`` for ``x [N, D]``, ``samples y [M, D]``.

    This is the exact density of the empirical sample distribution convolved with the
    diffusion noise, i.e. ``q_sigma`` of a student known only through samples. ``sigma`` is
    a float or a per-row tensor ``[N]``, all > 0. Float64 ``[N]``, blocked logsumexp over
    ``batch x batch`` pairs so large sample sets fit in memory.
    """
    if x.ndim != 2 or samples.ndim != 2 or x.shape[1] != samples.shape[1]:
        raise ValueError(
            f"need x [N, D] and samples [M, D], got {tuple(x.shape)}, {tuple(samples.shape)}"
        )
    n, d = x.shape
    m = samples.shape[0]
    x64 = x.to(torch.float64)
    y64 = samples.to(device=x.device, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    if s.shape[0] not in (1, n):
        raise ValueError(f"sigma must be a float or have shape [{n}], got {tuple(s.shape)}")
    if not (s > 0).all():
        raise ValueError("sigma must be > 0")
    s2 = s.expand(n).square()
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for i in range(0, n, batch):
        xi, inv2 = x64[i : i + batch], 0.5 / s2[i : i + batch, None]
        acc = torch.full((xi.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        for j in range(0, m, batch):
            # Direct differences, not the matmul expansion: at sigma ~ 1e-3 the expansion's
            # cancellation error would be amplified by 1 / sigma^2.
            dist = torch.cdist(xi, y64[j : j + batch], compute_mode="donot_use_mm_for_euclid_dist")
            acc = torch.logaddexp(acc, torch.logsumexp(-dist.square() * inv2, dim=1))
        out[i : i + batch] = acc
    return out - math.log(m) - 0.5 * d * torch.log(2 * math.pi * s2)


def _pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation; NaN when either input is constant (correlation undefined)."""
    a, b = a - a.mean(), b - b.mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return (a * b).sum().div(denom).item() if denom > 0 else math.nan


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return eps.to(x.device)


@torch.no_grad()
def logr_calibration(
    logr_fn: Callable[[Tensor, Tensor], Tensor],
    teacher: MixtureTeacher,
    student_samples: Tensor,
    sigmas: Sequence[float],
    n_eval: int = 2000,
    generator: torch.Generator | None = None,
    clip: float | None = None,
) -> dict[str, Any]:
    """How well a learned log density ratio matches the true ``log p_sigma / q_sigma``.

    ``logr_fn(x, sigma [N]) -> [N]`` is the critic's estimate (the discriminator logit).
    At each sigma it is evaluated on ``x_t = x0 + sigma * eps`` where ``x0`` is half fresh
    student samples and half teacher samples: the two populations the discriminator is
    trained to separate. The truth is ``teacher.log_prob(x_t, sigma)`` minus
    :func:`log_kde` of the *remaining* ``student_samples`` (disjoint from the fresh half,
    since a sample's own kernel would inflate ``q_sigma`` at small sigma).

    What it measures: the ratio against the student's *empirical* distribution noised at
    sigma. That equals the continuous student's ratio in expectation over the reference
    draw, but at sigma small next to the spacing of the reference samples it is dominated by
    sampling noise (values of order ``distance^2 / sigma^2``): trust the small-sigma numbers
    only with many reference samples, or compare with ``clip`` set to the critic's clamp,
    which clamps both estimate and truth to ``[-clip, clip]``.

    Returns ``sigma``, ``mae`` (mean |learned - true|), ``mae_student`` / ``mae_teacher``
    (the same on each half) and ``pearson_per_sigma``, all lists over ``sigmas``; and
    ``mae_mean`` (mean of ``mae``) and ``pearson`` (pooled over every sigma; NaN if either
    side is constant).
    """
    m = student_samples.shape[0]
    n_s = n_eval // 2
    if n_s < 1 or m - n_s < 1:
        raise ValueError(
            f"need n_eval >= 2 and more than n_eval // 2 = {n_s} student samples, got {m}"
        )
    perm = torch.randperm(m, generator=generator).to(student_samples.device)
    fresh, reference = student_samples[perm[:n_s]], student_samples[perm[n_s:]]
    real = teacher.sample(n_eval - n_s, generator=generator)
    x0 = torch.cat([fresh, real.to(device=fresh.device, dtype=fresh.dtype)])

    out: dict[str, Any] = {
        k: [] for k in ("sigma", "mae", "mae_student", "mae_teacher", "pearson_per_sigma")
    }
    all_learned, all_true = [], []
    for sigma in sigmas:
        sigma = float(sigma)
        x_t = x0 + sigma * _randn_like(x0, generator)
        true = teacher.log_prob(x_t, sigma).to(torch.float64) - log_kde(x_t, reference, sigma)
        sig = torch.full((x_t.shape[0],), sigma, dtype=x_t.dtype, device=x_t.device)
        learned = logr_fn(x_t, sig).reshape(-1).to(device=true.device, dtype=torch.float64)
        if clip is not None:
            true, learned = true.clamp(-clip, clip), learned.clamp(-clip, clip)
        err = (learned - true).abs()
        out["sigma"].append(sigma)
        out["mae"].append(err.mean().item())
        out["mae_student"].append(err[:n_s].mean().item())
        out["mae_teacher"].append(err[n_s:].mean().item())
        out["pearson_per_sigma"].append(_pearson(learned, true))
        all_learned.append(learned)
        all_true.append(true)
    out["mae_mean"] = sum(out["mae"]) / max(len(out["mae"]), 1)
    out["pearson"] = _pearson(torch.cat(all_learned), torch.cat(all_true)) if all_true else math.nan
    return out


@torch.no_grad()
def toy_metrics(
    student: Tensor,
    teacher: MixtureTeacher,
    real: Tensor | None = None,
    k: int = 3,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Summary of student samples ``[M, D]`` against the teacher, as JSON-ready floats.

    ``mode_coverage`` and ``tv`` compare the mode histogram with the teacher's weights;
    ``precision`` / ``recall`` are k-NN (Kynkäänniemi) against ``real`` (default: M fresh
    teacher samples); ``teacher_loglik`` is the mean exact ``log p(student)``; ``mode_hist``
    the histogram itself.
    """
    if real is None:
        real = teacher.sample(student.shape[0], generator=generator)
    real = real.to(student.device)
    hist = mode_histogram(student, teacher)
    weights = teacher.weights
    # Blocks of 512: the same distances and radii to the bit as larger blocks, several
    # times faster for 2-D points (4096 x 4096 float64 blocks leave the caches).
    pr = knn_precision_recall(real, student, k=k, batch=512)
    return {
        "mode_coverage": mode_coverage(hist, weights),
        "tv": tv_distance(hist, weights),
        "precision": pr["precision"],
        "recall": pr["recall"],
        "teacher_loglik": teacher.log_prob(student).to(torch.float64).mean().item(),
        "mode_hist": hist.tolist(),
    }
