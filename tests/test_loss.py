"""Ratio normalisation and weights: checked against direct computations in float64."""

import math

import pytest
import torch

from fdistill.divergences import get_divergence
from fdistill.loss import (
    FDistillWeights,
    RatioNormalizer,
    discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)


def reference_weights(logit, sigma, div, edges, r_clip, logit_clip):
    """Straightforward float64 loop version of the two-stage normalisation."""
    logr = (
        logit.double()
        .clamp(-logit_clip, logit_clip)
        .clamp(math.log(r_clip[0]), math.log(r_clip[1]))
    )
    r = logr.exp()
    bins = [sum(float(e) < math.log(s) for e in edges) for s in sigma.double().tolist()]
    out = torch.empty_like(r)
    for b in set(bins):
        idx = [i for i, bb in enumerate(bins) if bb == b]
        out[idx] = r[idx] / r[idx].mean()
    h = div.h(out.log())
    return h / h.mean()


@pytest.mark.parametrize("name", ["rkl", "js", "fkl", "hellinger", "jeffreys"])
def test_two_stage_normalisation_matches_reference(name):
    gen = torch.Generator().manual_seed(0)
    logit = torch.randn(512, generator=gen) * 6
    sigma = torch.exp(
        torch.rand(512, generator=gen) * (math.log(80) - math.log(0.002)) + math.log(0.002)
    )
    norm = RatioNormalizer(0.002, 80.0, num_bins=8, r_clip=(0.1, 20.0))
    div = get_divergence(name)
    got = FDistillWeights(div, logit_clip=10.0, normalizer=norm)(logit, sigma)
    ref = reference_weights(logit, sigma, div, norm.edges, (0.1, 20.0), 10.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert abs(float(got.mean()) - 1) < 1e-5


def test_unnormalised_weights_are_h_of_clipped_logit():
    div = get_divergence("fkl")
    logit = torch.tensor([-60.0, -3.0, 0.0, 2.5, 60.0])
    got = FDistillWeights(div, logit_clip=10.0)(logit, torch.ones(5))
    torch.testing.assert_close(
        got, torch.tensor([math.exp(-10), math.exp(-3), 1, math.exp(2.5), math.exp(10)])
    )


def test_extreme_logits_stay_finite():
    for name in ("fkl", "jeffreys", "pearson", "neyman"):
        w = FDistillWeights(get_divergence(name), normalizer=RatioNormalizer(0.002, 80))
        logit = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4, float("inf")])
        out = w(logit, torch.tensor([0.002, 0.1, 1.0, 5.0, 80.0, 1.0]))
        assert torch.isfinite(out).all(), name


def test_ratio_ema_tracks_bin_means():
    norm = RatioNormalizer(0.1, 10.0, num_bins=2, ema=0.5)
    sigma = torch.tensor([0.2, 0.2, 5.0, 5.0])
    norm.normalize_logr(torch.log(torch.tensor([1.0, 3.0, 4.0, 4.0])), sigma)
    torch.testing.assert_close(norm.bin_mean, torch.tensor([2.0, 4.0]))
    norm.normalize_logr(torch.log(torch.tensor([4.0, 4.0, 2.0, 2.0])), sigma)
    torch.testing.assert_close(norm.bin_mean, torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="EMA"):
        RatioNormalizer(0.1, 10.0, ema=1.0)


def test_gan_losses_and_optimal_discriminator():
    """The logistic loss is minimised at logit = log(p/q): check with two known densities."""
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    p = torch.exp(-0.5 * (x - 1) ** 2)
    q = torch.exp(-0.5 * (x + 0.5) ** 2 / 1.5) / math.sqrt(1.5)
    opt_logit = (p / q).log().requires_grad_(True)
    loss = (p * discriminator_loss(opt_logit, torch.full_like(x, -1e30))).sum()
    loss = loss + (q * torch.nn.functional.softplus(opt_logit)).sum()
    (grad,) = torch.autograd.grad(loss, opt_logit)
    assert float(grad.abs().max()) < 1e-12
    for delta in (-0.1, 0.1):  # and it is a minimum
        moved = opt_logit.detach() + delta
        worse = (
            p * torch.nn.functional.softplus(-moved) + q * torch.nn.functional.softplus(moved)
        ).sum()
        assert float(worse) > float(loss.detach())
    l_real, l_fake = torch.tensor([0.3]), torch.tensor([-0.7])
    expect = math.log1p(math.exp(-0.3)) + math.log1p(math.exp(-0.7))
    assert float(discriminator_loss(l_real, l_fake)) == pytest.approx(expect)
    assert float(gan_generator_loss(torch.tensor([2.0]))) == pytest.approx(math.log1p(math.exp(-2)))


def test_r1_penalty_matches_closed_form():
    """For logit = w . x, the R1 penalty is ||w||^2 per sample."""
    w = torch.tensor([1.5, -2.0, 0.5])
    x = torch.randn(4, 3, requires_grad=True)
    pen = r1_penalty(x @ w, x)
    torch.testing.assert_close(pen, torch.full((4,), float(w.pow(2).sum())))
