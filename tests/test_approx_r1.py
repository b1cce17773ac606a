"""The approximate R1 penalty (APT; FastGen dmd2.py) against the formula computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdistill.loss import approx_r1_penalty, r1_penalty
from fdistill.rng import BatchRandom


def _disc(seed: int = 0):
    """A small nonlinear discriminator ``logit(x, sigma, cond)`` [N], float64."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(12, 3 * 4 * 4, generator=g, dtype=torch.float64).requires_grad_(True)
    w2 = torch.randn(12, generator=g, dtype=torch.float64).requires_grad_(True)

    def logit(x, sigma, cond):
        h = torch.tanh(x.reshape(len(x), -1) @ w1.T / (1 + sigma[:, None]))
        out = h @ w2
        return out + (0.0 if cond is None else cond.to(out.dtype))

    return logit, (w1, w2)


def test_equals_the_formula_by_hand():
    logit, params = _disc()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    cond = torch.arange(5)
    got = approx_r1_penalty(logit, x, sigma, cond, torch.Generator().manual_seed(9))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    by_hand = (logit(x, sigma, cond) - logit(x + 0.1 * eps, sigma, cond)) ** 2
    assert got.shape == (5,)
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)
    # the batch mean is the official F.mse_loss(real_logit, perturbed_logit, reduction="mean")
    official = F.mse_loss(logit(x, sigma, cond), logit(x + 0.1 * eps, sigma, cond))
    assert float(got.detach().mean()) == pytest.approx(float(official.detach()), rel=1e-12)
    # gradients reach the discriminator through both passes, as in the official code
    g1 = torch.autograd.grad(got.sum(), params)
    g2 = torch.autograd.grad(by_hand.sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_reuses_given_logits_and_perturbs_what_it_is_told():
    logit, _ = _disc(2)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=g)
    sigma = torch.full((4,), 0.7, dtype=torch.float64)
    x_t = x0 + 0.7 * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    lr = logit(x_t, sigma, None)
    # FastGen's literal form: logits of the noised real vs logits of clean real + 0.1 eps
    got = approx_r1_penalty(
        logit, x_t, sigma, None, torch.Generator().manual_seed(4), logit_real=lr, perturb_from=x0
    )
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    by_hand = (lr - logit(x0 + 0.1 * eps, sigma, None)) ** 2
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)
    scaled = approx_r1_penalty(logit, x_t, sigma, None, torch.Generator().manual_seed(4), 0.5)
    by_hand = (lr - logit(x_t + 0.5 * eps, sigma, None)) ** 2
    torch.testing.assert_close(scaled, by_hand, rtol=0, atol=0)


def test_rank_independent_draws():
    logit, _ = _disc(5)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    sigma = torch.linspace(0.1, 3, 6, dtype=torch.float64)
    whole = approx_r1_penalty(logit, x, sigma, None, BatchRandom(11, 0, 1))
    parts = [
        approx_r1_penalty(
            logit, x[2 * r : 2 * r + 2], sigma[2 * r : 2 * r + 2], None, BatchRandom(11, r, 3)
        )
        for r in range(3)
    ]
    # same draws; only the matmul's batch-size-dependent rounding differs
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-12)


def test_expectation_is_scale_squared_times_exact_r1_for_a_linear_logit():
    """Closed form: for ``logit = w . x`` the penalty is ``(s w . eps)^2``, whose mean is
    ``s^2 ||w||^2 = s^2 * ||grad logit||^2`` (the exact R1 penalty)."""
    w = torch.randn(48, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def logit(x, sigma, cond):
        return x.reshape(len(x), -1) @ w

    x = torch.randn(
        20_000, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8)
    )
    sigma = torch.ones(len(x), dtype=torch.float64)
    got = approx_r1_penalty(logit, x, sigma, None, torch.Generator().manual_seed(0)).double()
    xr = x[:4].clone().requires_grad_(True)
    exact = r1_penalty(logit(xr, sigma[:4], None), xr)
    torch.testing.assert_close(exact, (w @ w).expand(4), rtol=1e-12, atol=0)
    # (s w.eps)^2 = s^2 ||w||^2 chi2_1: relative standard error sqrt(2 / 20000) = 1 %
    assert float(got.mean()) == pytest.approx(0.01 * float(w @ w), rel=0.05)
