"""The f-distill gradient, proven on a case where everything is known in closed form.

Teacher p: a 2-D Gaussian mixture. Student: ``x = A z + b`` with ``z ~ N(0, I)``, so
``q_sigma = N(b, A A^T + sigma^2 I)``. The reference is autograd of ``D_f(p_sigma || q_sigma)``
computed by float64 quadrature on a grid; the estimator is our generator loss fed with the
exact scores and the exact log-ratio at Monte-Carlo samples.
"""

import math

import pytest
import torch

from fdistill.divergences import Divergence, get_divergence
from fdistill.loss import distribution_matching_loss
from fdistill.teachers import GaussianMixture

F64 = torch.float64
A0 = torch.tensor([[0.9, 0.3], [-0.2, 0.7]], dtype=F64)
B0 = torch.tensor([0.3, -0.2], dtype=F64)


def teacher() -> GaussianMixture:
    means = torch.tensor([[-1.2, 0.0], [1.0, 0.4], [0.0, 1.3]], dtype=F64)
    covs = torch.stack(
        [
            torch.tensor([[0.30, 0.05], [0.05, 0.20]]),
            torch.tensor([[0.25, -0.08], [-0.08, 0.35]]),
            torch.eye(2) * 0.2,
        ]
    ).to(F64)
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def gaussian_logpdf(x, mean, cov):
    """log N(x; mean, cov) for 2-D ``x`` [..., 2], differentiable in mean and cov."""
    d = x - mean
    sol = torch.linalg.solve(cov, d.reshape(-1, 2).T).T.reshape(d.shape)
    return -0.5 * (d * sol).sum(-1) - 0.5 * torch.logdet(cov) - math.log(2 * math.pi)


def quadrature_divergence(div, p, a, b, sigma):
    """D_f(p_sigma || q_sigma) = int q f(p / q) dx by the trapezoidal rule in float64."""
    cov_q = a @ a.T + sigma**2 * torch.eye(2, dtype=F64)
    spread = max(float(torch.linalg.eigvalsh(cov_q.detach()).max()), 0.4 + sigma**2) ** 0.5
    half = 9 * spread + 2.0
    n = 401
    t = torch.linspace(-half, half, n, dtype=F64)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([xx, yy], -1).reshape(-1, 2)
    logp = p.log_prob(grid, sigma)
    logq = gaussian_logpdf(grid, b, cov_q)
    integrand = (logq.exp() * div.f((logp - logq).exp())).reshape(n, n)
    w = torch.full((n,), float(t[1] - t[0]), dtype=F64)
    w[0] = w[-1] = w[0] / 2
    return (w[:, None] * w[None, :] * integrand).sum()


def estimator_gradient(div, p, a, b, sigma, n=100_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    x = z @ a.T + b
    x_t = (x + sigma * eps).detach()
    cov_q = (a @ a.T + sigma**2 * torch.eye(2, dtype=F64)).detach()
    score_q = -torch.linalg.solve(cov_q, (x_t - b.detach()).T).T
    score_p = p.score(x_t, sigma)
    logr = p.log_prob(x_t, sigma) - gaussian_logpdf(x_t, b.detach(), cov_q)
    # Tweedie: the denoisers that these exact scores correspond to.
    d_teacher, d_fake = x_t + sigma**2 * score_p, x_t + sigma**2 * score_q
    loss = distribution_matching_loss(x, d_teacher, d_fake, div.h(logr), sigma, weighting="score")
    return torch.autograd.grad(loss.mean(), (a, b))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("name", ["rkl", "srkl", "js", "hellinger", "fkl", "jeffreys"])
def test_estimator_matches_quadrature_gradient(name, sigma):
    div, p = get_divergence(name), teacher()
    a, b = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    ref = torch.autograd.grad(quadrature_divergence(div, p, a, b, sigma), (a, b))
    est = estimator_gradient(div, p, a, b, sigma)
    ref_v, est_v = torch.cat([g.flatten() for g in ref]), torch.cat([g.flatten() for g in est])
    rel = float((est_v - ref_v).norm() / ref_v.norm())
    assert rel <= 0.05, f"{name} sigma={sigma}: relative error {rel:.3f}\n{ref_v}\n{est_v}"


def test_wrong_weighting_is_detected():
    """Negative control: JS's f with forward-KL's h must miss the reference by far more than 5%."""
    js, p = get_divergence("js"), teacher()
    wrong = Divergence("wrong", js.f, get_divergence("fkl").h)
    a, b = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    ref = torch.cat(
        [g.flatten() for g in torch.autograd.grad(quadrature_divergence(js, p, a, b, 1.0), (a, b))]
    )
    est = torch.cat([g.flatten() for g in estimator_gradient(wrong, p, a, b, 1.0)])
    assert float((est - ref).norm() / ref.norm()) > 0.3


def test_quadrature_is_a_divergence():
    """Sanity of the reference itself: D_f(p || p) = 0 and D_f >= 0 (zero at the optimum)."""
    p = GaussianMixture(torch.zeros(1, 2, dtype=F64), (A0 @ A0.T)[None], torch.ones(1))
    for name in ("rkl", "js", "fkl"):
        div = get_divergence(name)
        assert abs(float(quadrature_divergence(div, p, A0, B0 * 0, 1.0))) < 1e-8
        assert float(quadrature_divergence(div, teacher(), A0, B0, 1.0)) > 1e-3


def test_rkl_is_the_dmd_vsd_gradient():
    """With h = 1 the loss's gradient w.r.t. x is exactly (D_fake - D_teacher) / sigma^2 / N."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=gen, requires_grad=True)
    d_t, d_f = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen)
    sigma = torch.rand(64, generator=gen) * 5 + 0.1
    h = get_divergence("rkl").h(torch.randn(64, generator=gen) * 20)
    loss = distribution_matching_loss(x, d_t, d_f, h, sigma, weighting="score").mean()
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, (d_f - d_t) / sigma[:, None] ** 2 / 64)


def test_dmd_weighting_gradient():
    """DMD form: gradient h * (D_fake - D_teacher) / mean|x - D_teacher|, averaged over dims."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 4, 4, generator=gen, requires_grad=True)
    d_t, d_f = torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, 3, 4, 4, generator=gen)
    h = torch.rand(8, generator=gen)
    loss = distribution_matching_loss(x, d_t, d_f, h, 2.0, weighting="dmd").sum()
    (g,) = torch.autograd.grad(loss, x)
    norm = (x.detach() - d_t).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, h[:, None, None, None] * (d_f - d_t) / norm / 48)
    with pytest.raises(ValueError, match="weighting"):
        distribution_matching_loss(x, d_t, d_f, h, 2.0, weighting="bogus")
