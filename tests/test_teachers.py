"""GaussianMixture against independent references: torch.distributions, scipy, quadrature,
Monte Carlo and closed-form moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from fdistill.teachers import GaussianMixture

F64 = torch.float64


def _random_spd(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=gen, dtype=F64) * 0.4
    return a @ a.transpose(-2, -1) + 0.05 * torch.eye(d, dtype=F64)


def _full_mixture(k: int = 4, d: int = 2, seed: int = 0) -> GaussianMixture:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=F64) * 1.5
    covs = _random_spd(k, d, gen)
    weights = torch.rand(k, generator=gen, dtype=F64) + 0.2
    return GaussianMixture(means, covs, weights)


def _reference_log_prob(gm: GaussianMixture, x: torch.Tensor, sigma) -> torch.Tensor:
    """log p_sigma(x) from torch.distributions, one MixtureSameFamily per row."""
    n, d = x.shape
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(n)
    cov = gm.covs[None] + (s**2)[:, None, None, None] * torch.eye(d, dtype=F64)
    comps = MultivariateNormal(gm.means[None].expand(n, -1, -1), covariance_matrix=cov)
    mix = Categorical(probs=gm.weights[None].expand(n, -1))
    return MixtureSameFamily(mix, comps).log_prob(x)


def _reference_score(gm: GaussianMixture, x: torch.Tensor, sigma) -> torch.Tensor:
    xr = x.detach().to(F64).requires_grad_(True)
    (g,) = torch.autograd.grad(_reference_log_prob(gm, xr, sigma).sum(), xr)
    return g


SIGMAS = [0.0, 0.3, 5.0]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("sigma", SIGMAS + ["per-sample"])
def test_log_prob_and_score_match_autograd_reference(d, sigma):
    gm = _full_mixture(k=5, d=d, seed=d)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, d, generator=gen, dtype=F64) * 2.5
    if sigma == "per-sample":
        sigma = torch.rand(64, generator=gen, dtype=F64) * 4
        sigma[:8] = 0.0
    torch.testing.assert_close(gm.log_prob(x, sigma), _reference_log_prob(gm, x, sigma))
    torch.testing.assert_close(
        gm.score(x, sigma), _reference_score(gm, x, sigma), rtol=1e-9, atol=1e-10
    )


def test_sigma_shapes_broadcast_alike():
    gm = _full_mixture()
    x = torch.randn(10, 2, dtype=F64)
    s = torch.linspace(0.1, 3, 10, dtype=F64)
    ref = _reference_score(gm, x, s)
    torch.testing.assert_close(gm.score(x, s[:, None]), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gm(x, s, cond=torch.zeros(10)), gm.denoise(x, s))
    torch.testing.assert_close(gm.score(x, torch.tensor(0.7)), _reference_score(gm, x, 0.7))


@pytest.mark.parametrize("sigma", [0.3, 5.0, "per-sample"])
def test_denoise_is_tweedie(sigma):
    gm = _full_mixture(k=6)
    x = torch.randn(128, 2, dtype=F64) * 3
    if sigma == "per-sample":
        sigma = torch.logspace(-2, 1.5, 128, dtype=F64)
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
    expected = x + s**2 * _reference_score(gm, x, sigma)
    torch.testing.assert_close(gm.denoise(x, sigma), expected, rtol=1e-9, atol=1e-9)


def test_denoise_at_sigma_zero_returns_x():
    gm = _full_mixture()
    x = torch.randn(20, 2, dtype=torch.float32) * 5
    assert torch.equal(gm.denoise(x, 0.0), x)
    s = torch.full((20,), 0.5)
    s[::2] = 0.0
    out = gm.denoise(x, s)
    assert torch.equal(out[::2], x[::2])
    assert not torch.allclose(out[1::2], x[1::2])


def test_denoise_matches_importance_sampling():
    """E[x0 | x] ~ sum_i w_i x0_i / sum_i w_i, x0_i ~ p drawn by numpy, w_i = N(x; x0_i, s^2 I)."""
    gm = _full_mixture(k=4, seed=3)
    rng = np.random.default_rng(0)
    m = 400_000
    means, covs, w = gm.means.numpy(), gm.covs.numpy(), gm.weights.numpy()
    comp = rng.choice(len(w), size=m, p=w)
    chol = np.linalg.cholesky(covs)
    x0 = means[comp] + np.einsum("nde,ne->nd", chol[comp], rng.standard_normal((m, 2)))
    xq = np.array([[0.0, 0.0], [1.5, -1.0], [-2.0, 2.5], [3.0, 0.5]])
    sigmas = np.array([0.5, 1.0, 3.0, 0.8])
    got = gm.denoise(torch.from_numpy(xq), torch.from_numpy(sigmas)).numpy()
    for xi, si, gi in zip(xq, sigmas, got, strict=True):
        logw = -0.5 * ((x0 - xi) ** 2).sum(1) / si**2
        wi = np.exp(logw - logw.max())
        wi /= wi.sum()
        est = wi @ x0
        se = np.sqrt((wi[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        assert 1 / (wi**2).sum() > 200  # enough effective samples for the error bar to hold
        assert np.all(np.abs(gi - est) < 5 * se + 1e-4), (xi, si, gi, est, se)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_density_integrates_to_one(sigma):
    gm = _full_mixture(k=4, seed=5)
    t = torch.linspace(-9, 9, 721, dtype=F64)
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    p = gm.log_prob(x, sigma).exp().reshape(721, 721)
    h = float(t[1] - t[0])
    total = torch.trapezoid(torch.trapezoid(p, dx=h, dim=1), dx=h).item()
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_single_full_component_matches_scipy(sigma):
    gen = torch.Generator().manual_seed(7)
    mean = torch.randn(1, 3, generator=gen, dtype=F64)
    cov = _random_spd(1, 3, gen)
    gm = GaussianMixture(mean, cov, torch.tensor([3.0]))
    x = torch.randn(50, 3, generator=gen, dtype=F64) * 2
    c = cov[0].numpy() + sigma**2 * np.eye(3)
    ref = multivariate_normal(mean[0].numpy(), c).logpdf(x.numpy())
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), ref, rtol=1e-12, atol=1e-12)
    ref_score = -np.linalg.solve(c, (x.numpy() - mean[0].numpy()).T).T
    np.testing.assert_allclose(gm.score(x, sigma).numpy(), ref_score, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gm.responsibilities(x, sigma), torch.ones(50, 1, dtype=F64))


def test_sample_moments_and_components():
    gm = _full_mixture(k=4, seed=2)
    n = 200_000
    x, comp = gm.sample(n, generator=torch.Generator().manual_seed(0), return_components=True)
    assert x.dtype == torch.get_default_dtype() and x.shape == (n, 2)
    x = x.double()
    w, mu, c = gm.weights, gm.means, gm.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (c + mu[:, :, None] * mu[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    torch.testing.assert_close(gm.mean(), mean)
    torch.testing.assert_close(gm.covariance(), cov)
    se = (torch.diag(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    emp_cov = torch.cov(x.T)
    assert (emp_cov - cov).abs().max() < 0.03 * cov.abs().max()
    freq = torch.bincount(comp, minlength=4).double() / n
    assert ((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()
    for k in range(4):
        xk = x[comp == k]
        assert (xk.mean(0) - mu[k]).abs().max() < 5 * (torch.diag(c[k]).max() / len(xk)).sqrt()
    again = gm.sample(n, generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal(again, x)


def test_ring_and_isotropic_constructors():
    gm = GaussianMixture.ring(8, radius=3.0, std=0.2, weights=torch.arange(1.0, 9.0))
    assert gm.means.shape == (8, 2) and gm.covs.shape == (8, 2, 2)
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((8,), 3.0, dtype=F64))
    angles = torch.atan2(gm.means[:, 1], gm.means[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(8, dtype=F64) * math.pi / 4)
    torch.testing.assert_close(gm.covs, 0.04 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    torch.testing.assert_close(gm.weights, torch.arange(1.0, 9.0, dtype=F64) / 36)
    assert GaussianMixture.ring().weights.allclose(torch.full((8,), 1 / 8, dtype=F64))
    iso = GaussianMixture.isotropic(torch.zeros(2, 3), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(
        torch.diagonal(iso.covs, dim1=1, dim2=2)[:, 0], torch.tensor([1.0, 4.0], dtype=F64)
    )


def test_assign_recovers_components_of_a_separated_ring():
    gm = GaussianMixture.ring(8, radius=2.0, std=0.1)
    x, comp = gm.sample(5000, generator=torch.Generator().manual_seed(1), return_components=True)
    assert torch.equal(gm.assign(x), comp)
    assert gm.assign(x).dtype == torch.long
    # Exact posterior at the midpoint between two equal modes is 1/2 each.
    mid = gm.means[:2].mean(0, keepdim=True)
    r = gm.responsibilities(mid, 0.5)
    torch.testing.assert_close(r[0, :2], torch.full((2,), r[0, :2].sum().item() / 2, dtype=F64))
    torch.testing.assert_close(r.sum(1), torch.ones(1, dtype=F64))


@pytest.mark.parametrize(
    "means, covs, weights, match",
    [
        (torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), torch.tensor([1.0, -1.0]), "positive"),
        (torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), torch.tensor([1.0, 0.0]), "positive"),
        (torch.zeros(2, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2), None, "definite"),
        (torch.zeros(1, 2), torch.zeros(1, 2, 2), None, "definite"),
        (torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]), None, "symmetric"),
        (torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3), None, "covs"),
        (torch.zeros(2, 2), torch.eye(2).expand(3, 2, 2), None, "covs"),
        (torch.zeros(2), torch.eye(2)[None], None, "means"),
        (torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), torch.ones(3), "weights"),
        (torch.tensor([[0.0, float("nan")]]), torch.eye(2)[None], None, "finite"),
    ],
)
def test_bad_inputs_raise(means, covs, weights, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(means, covs, weights)


def test_bad_query_shapes_raise():
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError):
        gm.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError):
        gm.score(torch.zeros(4, 2), torch.ones(3))


def test_float32_finite_over_sigma_range():
    gm = GaussianMixture.ring(8, radius=2.0, std=0.05, weights=torch.logspace(0, 1, 8))
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, 2, generator=gen) * 80, torch.randn(500, 2, generator=gen)])
    sigmas = torch.logspace(math.log10(0.002), math.log10(80), 1000)
    for s in (0.002, 80.0, sigmas):
        for out in (gm.log_prob(x, s), gm.score(x, s), gm.denoise(x, s), gm(x, s)):
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
        r = gm.responsibilities(x, s)
        assert r.dtype == torch.float32 and torch.isfinite(r).all()
    # Far from the data at tiny sigma the posterior mean is the nearest mode's posterior mean.
    far = torch.tensor([[100.0, 0.0]])
    torch.testing.assert_close(
        gm.denoise(far, 0.002).double(),
        gm.means[:1] + (far.double() - gm.means[:1]) * (0.05**2 / (0.05**2 + 0.002**2)),
        rtol=1e-5,
        atol=1e-5,
    )
    # At huge sigma the posterior mean tends to the mixture mean.
    torch.testing.assert_close(
        gm.denoise(torch.zeros(1, 2), 1e4).double()[0], gm.mean(), rtol=0, atol=1e-6
    )
