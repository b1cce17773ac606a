"""Tests for k-NN precision/recall and the toy-teacher metrics, against independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from fdistill.metrics.knn import knn_precision_recall
from fdistill.metrics.toy import (
    log_kde,
    logr_calibration,
    mode_coverage,
    mode_histogram,
    toy_metrics,
    tv_distance,
)


class IsoMixture:
    """Stub teacher: isotropic Gaussian mixture with closed-form noised log density."""

    def __init__(self, means, stds, weights) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    def _log_comp(self, x, sigma=0.0):
        x = x.to(torch.float64)
        d = x.shape[1]
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = self.stds[None] ** 2 + s**2  # [N or 1, K]
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        return self.weights.log() - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def log_prob(self, x, sigma=0.0):
        return torch.logsumexp(self._log_comp(x, sigma), dim=1)

    def assign(self, x):
        return self._log_comp(x).argmax(dim=1)

    def sample(self, n, generator=None):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * eps).float()


def ring_teacher(k: int = 8, radius: float = 4.0, std: float = 0.2) -> IsoMixture:
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    return IsoMixture(means, [std] * k, torch.arange(1, k + 1, dtype=torch.float64))


def reference_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Brute force: full distance matrices, sort, k-th other neighbour, <= test."""

    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    prec = np.mean(np.any(cdist(fake, real) <= radii(real)[None, :], axis=1))
    rec = np.mean(np.any(cdist(real, fake) <= radii(fake)[None, :], axis=1))
    return float(prec), float(rec)


# ---------------------------------------------------------------- k-NN precision / recall


@pytest.mark.parametrize("k,batch", [(1, 7), (3, 16), (5, 1000)])
def test_knn_pr_matches_brute_force(k: int, batch: int) -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(70, 5))
    fake = rng.normal(size=(55, 5)) * 1.2 + 1.0
    ref_p, ref_r = reference_pr(real, fake, k)
    assert 0.05 < ref_p < 0.95 and 0.05 < ref_r < 0.95  # non-trivial case
    out = knn_precision_recall(torch.tensor(real).float(), torch.tensor(fake).float(), k, batch)
    # float32 inputs are exact in float64, so the reference sees the same points.
    ref_p, ref_r = reference_pr(
        real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64), k
    )
    assert out["precision"] == pytest.approx(ref_p, abs=1e-12)
    assert out["recall"] == pytest.approx(ref_r, abs=1e-12)


def test_knn_pr_identical_sets_is_one() -> None:
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    out = knn_precision_recall(x, x.clone(), k=3, batch=128)
    assert out == {"precision": 1.0, "recall": 1.0}


def test_knn_recall_drops_when_a_mode_is_missing() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[-10.0, 0.0], [10.0, 0.0]])
    real = centers[torch.arange(600) % 2] + torch.randn(600, 2, generator=g)
    fake_full = centers[torch.arange(600) % 2] + torch.randn(600, 2, generator=g)
    fake_one = centers[0] + torch.randn(600, 2, generator=g)
    full = knn_precision_recall(real, fake_full, k=3)
    one = knn_precision_recall(real, fake_one, k=3)
    assert full["precision"] > 0.9 and full["recall"] > 0.9
    assert one["precision"] > 0.9
    assert 0.4 < one["recall"] < 0.52


def test_knn_rejects_k_too_large() -> None:
    with pytest.raises(ValueError):
        knn_precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# ---------------------------------------------------------------- mode metrics


def test_mode_histogram_counts_by_assignment() -> None:
    t = IsoMixture([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], [0.5, 0.5, 0.5], [1, 1, 1])
    x = torch.tensor([[0.1, 0.0], [-0.2, 0.3], [0.0, -0.1], [0.2, 4.8], [0.0, 5.1]])
    assert mode_histogram(x, t).tolist() == pytest.approx([0.6, 0.0, 0.4])


def test_mode_coverage_and_tv_handcrafted() -> None:
    w = torch.tensor([0.5, 0.25, 0.25])
    h = torch.tensor([0.7, 0.2, 0.1])
    assert mode_coverage(h, w) == pytest.approx(2 / 3)  # 0.1 < 0.5 * 0.25
    assert mode_coverage(h, w, threshold=0.3) == pytest.approx(1.0)
    assert mode_coverage(h, w, threshold=1.0) == pytest.approx(1 / 3)
    assert tv_distance(h, w) == pytest.approx(0.5 * (0.2 + 0.05 + 0.15))
    assert tv_distance(w, w) == 0.0
    assert tv_distance(torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 0, 1])) == pytest.approx(1.0)


# ---------------------------------------------------------------- log_kde


def test_log_kde_matches_explicit_loop() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(23, 3)), rng.normal(size=(41, 3)) * 2
    sig = rng.uniform(0.05, 3.0, size=23)
    ref = np.array(
        [
            logsumexp([multivariate_normal.logpdf(x[i], y[j], sig[i] ** 2) for j in range(41)])
            - math.log(41)
            for i in range(23)
        ]
    )
    got = log_kde(torch.tensor(x), torch.tensor(y), torch.tensor(sig), batch=8)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)
    got_f = log_kde(torch.tensor(x), torch.tensor(y), 0.7, batch=5)
    ref_f = [logsumexp(multivariate_normal.logpdf(y, x[i], 0.49)) - math.log(41) for i in range(23)]
    np.testing.assert_allclose(got_f.numpy(), ref_f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.002, 0.1, 1.0, 80.0])
def test_log_kde_point_mass_is_gaussian(sigma: float) -> None:
    y0 = np.array([1.5, -2.0])
    samples = torch.tensor(y0).repeat(37, 1)
    x = np.array([[1.5, -2.0], [1.5 + 3 * sigma, -2.0], [0.0, 0.0], [20.0, 20.0]])
    got = log_kde(torch.tensor(x), samples, sigma, batch=10)
    ref = multivariate_normal.logpdf(x, y0, sigma**2)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


# ---------------------------------------------------------------- logr calibration


def _gauss_setup(m: int = 8000):
    teacher = IsoMixture([[0.0, 0.0]], [1.0], [1.0])
    mu = torch.tensor([0.5, 0.0])
    student = mu + torch.randn(m, 2, generator=torch.Generator().manual_seed(5))

    def true_logr(x, s):
        v = 1.0 + s.to(torch.float64) ** 2
        x = x.to(torch.float64)
        return (((x - mu) ** 2).sum(1) - (x**2).sum(1)) / (2 * v)

    return teacher, student, true_logr


def test_logr_calibration_small_error_for_true_ratio() -> None:
    teacher, student, true_logr = _gauss_setup()
    sigmas = [0.5, 1.0, 5.0]
    g = torch.Generator().manual_seed(0)
    good = logr_calibration(true_logr, teacher, student, sigmas, n_eval=600, generator=g)
    g = torch.Generator().manual_seed(0)
    off = logr_calibration(
        lambda x, s: true_logr(x, s) + 1.0, teacher, student, sigmas, n_eval=600, generator=g
    )
    assert good["sigma"] == sigmas
    # KDE noise only (M = 8000 reference samples); it shrinks as M grows.
    assert max(good["mae"]) < 0.05
    assert good["pearson"] > 0.98 and min(good["pearson_per_sigma"]) > 0.98
    assert all(0.9 < e < 1.1 for e in off["mae"])
    assert off["mae_mean"] == pytest.approx(np.mean(off["mae"]))
    json.dumps(good)


def test_logr_calibration_reference_is_disjoint_from_evaluated_students() -> None:
    # Students on a unit grid, tiny sigma, teacher density flat: a student's own kernel in the
    # KDE would make |log r| small for the student half; disjoint, it is ~ 1 / (2 sigma^2).
    class Flat(IsoMixture):
        def log_prob(self, x, sigma=0.0):
            return torch.zeros(x.shape[0], dtype=torch.float64)

    teacher = Flat([[0.0, 0.0]], [1.0], [1.0])
    grid = torch.stack(torch.meshgrid(torch.arange(30.0), torch.arange(30.0), indexing="ij"), -1)
    out = logr_calibration(
        lambda x, s: torch.zeros(x.shape[0]),
        teacher,
        grid.reshape(-1, 2),
        [1e-3],
        n_eval=200,
        generator=torch.Generator().manual_seed(0),
    )
    assert out["mae_student"][0] > 0.4 / (2 * 1e-3**2)


def test_logr_calibration_finite_over_sigma_range_and_clip() -> None:
    teacher = ring_teacher()
    student = teacher.sample(1200, generator=torch.Generator().manual_seed(2))
    student = student[teacher.assign(student) < 3]  # a student that dropped five modes
    sigmas = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]

    def critic(x, s):
        return 0.1 * x[:, 0] + torch.log(s)

    out = logr_calibration(
        critic, teacher, student, sigmas, n_eval=200, generator=torch.Generator().manual_seed(0)
    )
    for key in ("mae", "mae_student", "mae_teacher", "pearson_per_sigma"):
        assert len(out[key]) == len(sigmas) and all(math.isfinite(v) for v in out[key]), key
    assert math.isfinite(out["mae_mean"]) and math.isfinite(out["pearson"])
    clipped = logr_calibration(
        critic,
        teacher,
        student,
        sigmas,
        n_eval=200,
        generator=torch.Generator().manual_seed(0),
        clip=10.0,
    )
    assert all(e <= 20.0 for e in clipped["mae"])
    assert out["mae"][0] > 100  # unclipped, tiny sigma on dropped modes is huge


# ---------------------------------------------------------------- summary


def test_toy_metrics_student_missing_modes() -> None:
    teacher = ring_teacher()
    g = torch.Generator().manual_seed(4)
    full = teacher.sample(1200, generator=g)
    dropped = full[teacher.assign(full) < 4]  # modes 0-3 carry 10/36 of the weight
    out = toy_metrics(dropped, teacher, generator=g)
    json.dumps(out)
    assert set(out) == {"mode_coverage", "tv", "precision", "recall", "teacher_loglik", "mode_hist"}
    w = teacher.weights.numpy()
    hist_ref = np.zeros(8)
    hist_ref[:4] = w[:4] / w[:4].sum()  # what the dropped student's histogram should approach
    np.testing.assert_allclose(out["mode_hist"], hist_ref, atol=0.04)
    assert out["mode_coverage"] == pytest.approx(4 / 8)
    assert out["tv"] == pytest.approx(0.5 * np.abs(hist_ref - w).sum(), abs=0.04)
    assert out["precision"] > 0.9 and out["recall"] < 0.45
    ref_ll = teacher.log_prob(dropped).mean().item()
    assert out["teacher_loglik"] == pytest.approx(ref_ll)
    same = toy_metrics(teacher.sample(1200, generator=g), teacher, generator=g)
    assert same["mode_coverage"] == 1.0 and same["recall"] > 0.9 and same["tv"] < 0.05
