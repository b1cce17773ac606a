"""Ratio normalisation and weights: checked against direct computations in float64."""

import math

import numpy as np
import pytest
import torch

from fdistill.divergences import get_divergence
from fdistill.loss import (
    FDistillWeights,
    RatioNormalizer,
    SigmaBins,
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


NUMPY_H = {
    "rkl": lambda r: np.ones_like(r),
    "fkl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "hellinger": lambda r: np.sqrt(r) / 4,
    "jeffreys": lambda r: 1 + r,
}


def official_weights(logit, sigma, h, sigma_min, sigma_max, n_bins, r_clip, bins=None, ema=0.0):
    """The official two-stage normalisation, in numpy float64: 10 equal-width bins over
    [sigma_min, sigma_max] by floor(), per-bin mean ratio (EMA of bins that have samples),
    ratio / (bin mean + 1e-6), then h / (mean h + 1e-6). Returns (h, updated bins)."""
    r = np.clip(np.exp(np.clip(logit, -10.0, 10.0)), *r_clip)
    width = (sigma_max - sigma_min) / n_bins
    idx = np.clip(np.floor((sigma - sigma_min) / width).astype(int), 0, n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins).astype(float)
    tot = np.bincount(idx, weights=r, minlength=n_bins)
    bins = np.ones(n_bins) if bins is None else bins.copy()
    valid = cnt > 0
    bins[valid] = bins[valid] * ema + (1 - ema) * tot[valid] / (cnt[valid] + 1e-6)
    hv = h(r / (bins[idx] + 1e-6))
    return hv / (hv.mean() + 1e-6), bins


@pytest.mark.parametrize("name", ["rkl", "js", "fkl", "hellinger", "jeffreys"])
def test_linear_sigma_bins_match_the_official_normalisation(name):
    rs = np.random.default_rng(0)
    logit = rs.normal(size=600) * 4
    # uniform in sigma, a few outside the range (they go to the end bins), some just above edges
    sigma = np.concatenate([rs.uniform(0.002, 80.0, 590), [0.001, 0.002, 80.0, 95.0]])
    sigma = np.concatenate([sigma, 0.002 + (80 - 0.002) / 10 * np.arange(1, 7) + 1e-3])
    norm = RatioNormalizer(0.002, 80.0, r_clip=(0.1, 20.0), binning="linear-sigma")
    assert norm.bins.num_bins == 10
    got = FDistillWeights(get_divergence(name), logit_clip=10.0, normalizer=norm)(
        torch.tensor(logit, dtype=torch.float32), torch.tensor(sigma, dtype=torch.float32)
    )
    ref, _ = official_weights(
        np.float32(logit).astype(float), np.float32(sigma).astype(float), NUMPY_H[name],
        0.002, 80.0, 10, (0.1, 20.0),
    )  # fmt: skip
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-5, atol=1e-7)


def test_linear_sigma_bins_with_ema_reach_the_official_bin_means():
    """The EMA of bin means follows the official update. (The official code blends a bin's
    first mean with the initial 1; ours takes it as it is: the reference's first step uses no
    EMA, and every bin has samples at every step.)"""
    rs = np.random.default_rng(1)
    norm = RatioNormalizer(0.01, 10.0, num_bins=4, ema=0.5, binning="linear-sigma")
    bins = None
    for step in range(3):
        logit = rs.normal(size=200)
        sigma = rs.uniform(0.01, 10.0, 200)
        t_logr = torch.tensor(logit, dtype=torch.float64).float()
        logr_n = norm.normalize_logr(t_logr, torch.tensor(sigma).float())
        _, bins = official_weights(
            np.float32(logit).astype(float), np.float32(sigma).astype(float), NUMPY_H["fkl"],
            0.01, 10.0, 4, (0.1, 20.0), bins=bins, ema=0.5 if step else 0.0,
        )  # fmt: skip
        np.testing.assert_allclose(norm.bin_mean.double().numpy(), bins, rtol=1e-5)
        r = np.clip(np.exp(np.float32(logit).astype(float)), 0.1, 20.0)
        idx = np.clip(np.floor((sigma - 0.01) / ((10.0 - 0.01) / 4)).astype(int), 0, 3)
        np.testing.assert_allclose(logr_n.exp().double().numpy(), r / bins[idx], rtol=1e-5)


def test_sigma_bins_edges_and_options():
    lin = SigmaBins(1.0, 11.0, 5, "linear-sigma")
    torch.testing.assert_close(lin.edges, torch.tensor([3.0, 5.0, 7.0, 9.0]))
    s = torch.tensor([0.5, 1.0, 2.9, 3.0, 8.99, 9.0, 11.0, 30.0])
    assert lin(s).tolist() == [0, 0, 0, 1, 3, 4, 4, 4]
    log = SigmaBins(0.01, 100.0, 4)  # log-sigma, one bin per decade
    assert log(torch.tensor([0.005, 0.05, 0.5, 5.0, 50.0, 500.0])).tolist() == [0, 0, 1, 2, 3, 3]
    assert SigmaBins(0.01, 100.0).num_bins == 8
    assert SigmaBins(0.01, 100.0, binning="linear-sigma").num_bins == 10
    with pytest.raises(ValueError, match="^ratio binning must be one of log-sigma, linear-sigma"):
        SigmaBins(0.01, 100.0, binning="linear")
    with pytest.raises(ValueError, match="ratio bins must be a positive"):
        SigmaBins(0.01, 100.0, 0)


def test_old_checkpoints_with_saved_edges_still_load():
    norm = RatioNormalizer(0.002, 80.0, num_bins=8, ema=0.5)
    state = norm.state_dict()
    assert set(state) == {"bin_mean", "bin_seen"}
    state["edges"] = torch.zeros(7)  # what checkpoints before SigmaBins held
    state["bin_mean"] = torch.full((8,), 2.0)
    norm.load_state_dict(state)
    torch.testing.assert_close(norm.bin_mean, torch.full((8,), 2.0))
    assert float(norm.edges[0]) != 0.0


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
