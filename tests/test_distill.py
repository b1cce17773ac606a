"""FDistill's two losses against a plain reference: every network run in full, with a graph.

The library skips work (feature-only passes, no graph through decoders whose outputs enter
the loss detached); the reference below does none of that and must give the same losses and
the same gradients for every feature source, with and without the GAN term and R1, with the
discriminator reading several encoder maps. Its logged statistics are checked against direct
computations too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fdistill.critic import MultiScaleHead
from fdistill.denoisers import EDMPrecond, UNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.loss import (
    discriminator_loss,
    distribution_matching_loss,
    gan_generator_loss,
    r1_penalty,
)
from fdistill.training import host_stats


def _model(
    disc_features: str,
    gan_weight: float,
    r1_gamma: float = 0.0,
    taps: list[str] | None = None,
    **loss,
) -> FDistill:
    torch.manual_seed(0)

    def unet() -> EDMPrecond:
        net = UNet(8, 1, model_channels=8, channel_mult=(1, 2), num_classes=3)
        for p in net.parameters():  # a trained-looking net: the zero-initialised output too
            torch.nn.init.normal_(p, std=0.2)
        net.set_feature_taps(taps)
        return EDMPrecond(net)

    teacher, fake = unet(), unet()
    loss = {"real_sigma": "same"} | loss  # the references below draw one level per pair
    cfg = LossConfig(gan_weight=gan_weight, r1_gamma=r1_gamma, disc_features=disc_features, **loss)
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy.deepcopy(teacher), sigma_init=cfg.sigma_max),
        fake_score=fake,
        head=MultiScaleHead.for_network(fake if disc_features == "fake" else teacher, hidden=16),
        divergence=get_divergence("js"),
        cfg=cfg,
    )


def _inputs():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 1, 8, 8, generator=g)
    x_real = torch.randn(6, 1, 8, 8, generator=g).clamp(-1, 1)
    return z, torch.arange(6) % 3, x_real, torch.arange(6) % 3


def _reference_generator_loss(m: FDistill, z, cond, gen) -> torch.Tensor:
    x = m.generator(z, cond)
    sigma = m.sample_sigma(x.shape[0], gen)
    eps = torch.randn(x.shape, generator=gen)
    x_t = x + sigma.view(-1, 1, 1, 1) * eps
    d_teacher, t_feats = m.teacher(x_t, sigma, cond, return_features=True)
    d_fake, f_feats = m.fake_score(x_t, sigma, cond, return_features=True)
    logit = m.head(f_feats if m.cfg.disc_features == "fake" else t_feats)
    h = m.weights(logit.detach(), sigma)
    loss = distribution_matching_loss(x, d_teacher.detach(), d_fake.detach(), h, sigma)
    if m.cfg.gan_weight > 0:
        loss = loss + m.cfg.gan_weight * gan_generator_loss(logit)
    return loss.mean()


def _reference_critic_loss(m: FDistill, z, cond, x_real, cond_real, gen) -> torch.Tensor:
    with torch.no_grad():
        x_fake = m.generator(z, cond)
    sigma = m.sample_sigma(x_fake.shape[0], gen)
    # the official code draws the real batch's levels on their own
    sigma_r = m.sample_sigma(x_real.shape[0], gen) if m.cfg.real_sigma == "independent" else sigma
    s, sr = sigma.view(-1, 1, 1, 1), sigma_r.view(-1, 1, 1, 1)
    xf_t = x_fake + s * torch.randn(x_fake.shape, generator=gen)
    xr_t = (x_real + sr * torch.randn(x_real.shape, generator=gen)).requires_grad_(True)
    d_fake, f_fake = m.fake_score(xf_t, sigma, cond, return_features=True)
    err = (d_fake - x_fake).pow(2).flatten(1).mean(1)
    if m.cfg.fake_weighting == "edm":
        err = err * (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    feats = m.fake_score if m.cfg.disc_features == "fake" else m.teacher
    _, f_real = feats(xr_t, sigma_r, cond_real, return_features=True)
    if m.cfg.disc_features == "teacher":
        _, f_fake = m.teacher(xf_t, sigma, cond, return_features=True)
    logit_real = m.head(f_real)
    loss = err + discriminator_loss(logit_real, m.head(f_fake))
    if m.cfg.r1_gamma > 0 and m.cfg.r1 == "exact":
        loss = loss + 0.5 * m.cfg.r1_gamma * r1_penalty(logit_real, xr_t)
    if m.cfg.r1_gamma > 0 and m.cfg.r1 == "approx":  # FastGen: mse(logit(x), logit(x + 0.1 eps))
        x_pert = xr_t + 0.1 * torch.randn(xr_t.shape, generator=gen)
        logit_pert = m.head(feats(x_pert, sigma_r, cond_real, return_features=True)[1])
        loss = loss + m.cfg.r1_gamma * (logit_real - logit_pert).pow(2)
    return loss.mean()


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize(
    ("features", "gan_weight", "taps"),
    [
        ("fake", 0.0, None),
        ("fake", 0.5, None),
        ("teacher", 0.0, None),
        ("teacher", 0.5, None),
        ("teacher", 0.5, ["enc8", "mid"]),
    ],
)
def test_generator_loss_matches_reference(features, gan_weight, taps):
    m = _model(features, gan_weight, taps=taps)
    ref = copy.deepcopy(m)
    z, cond, _, _ = _inputs()
    loss, stats = m.generator_loss(z, cond, torch.Generator().manual_seed(7))
    loss.backward()
    loss_ref = _reference_generator_loss(ref, z, cond, torch.Generator().manual_seed(7))
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    pairs = zip(_grads(m.generator.parameters()), _grads(ref.generator.parameters()), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    # the generator step must leave the critic's weights untouched (no stray gradients)
    for p in [*m.fake_score.parameters(), *m.head.parameters(), *m.teacher.parameters()]:
        assert p.grad is None
    assert ("loss_gan" in stats) == (gan_weight > 0)


@pytest.mark.parametrize(
    ("features", "r1_gamma", "fake_weighting", "taps", "extra"),
    [
        ("fake", 0.0, "edm", None, {}),
        ("fake", 0.3, "none", None, {}),
        ("teacher", 0.0, "none", None, {}),
        ("teacher", 0.3, "edm", None, {}),
        ("teacher", 0.3, "edm", ["enc8", "mid"], {}),
        ("teacher", 0.0, "none", None, {"real_sigma": "independent"}),
        ("fake", 0.3, "none", None, {"real_sigma": "independent", "r1": "approx"}),
        ("teacher", 0.3, "none", None, {"r1": "approx"}),
        ("teacher", 0.3, "none", None, {"r1": "off"}),
    ],
)
def test_critic_loss_matches_reference(features, r1_gamma, fake_weighting, taps, extra):
    m = _model(features, 0.5, r1_gamma, taps=taps, fake_weighting=fake_weighting, **extra)
    ref = copy.deepcopy(m)
    z, cond, x_real, cond_real = _inputs()
    loss, _ = m.critic_loss(z, cond, x_real, cond_real, torch.Generator().manual_seed(9))
    loss.backward()
    args = (z, cond, x_real, cond_real, torch.Generator().manual_seed(9))
    loss_ref = _reference_critic_loss(ref, *args)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    pairs = zip(_grads(m.critic_parameters()), _grads(ref.critic_parameters()), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in [*m.generator.parameters(), *m.teacher.parameters()]:
        assert p.grad is None


def test_fake_score_weighting_is_the_direct_computation():
    """``loss_dsm`` is the mean of lambda(sigma) * x0 error ("edm") or of the x0 error ("none")."""
    z, cond, x_real, cond_real = _inputs()
    got = {}
    for w in ("edm", "none"):
        m = _model("fake", 0.0, fake_weighting=w)
        _, stats = m.critic_loss(z, cond, x_real, cond_real, torch.Generator().manual_seed(4))
        got[w] = float(stats["loss_dsm"])
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x0 = m.generator(z, cond)
        sigma = m.sample_sigma(6, gen).double()
        x_t = x0 + sigma.float().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
        err = (m.fake_score(x_t, sigma.float(), cond) - x0).double().pow(2).flatten(1).mean(1)
    lam = (sigma**2 + 0.25) / (sigma**2 * 0.25)
    assert got["none"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert got["edm"] == pytest.approx(float((lam * err).mean()), rel=1e-5)
    assert got["edm"] > 10 * got["none"]  # lambda(sigma) >= 1 / sigma_data^2 = 4


def test_critic_statistics_per_noise_bin():
    m = _model("teacher", 0.5, ratio_binning="linear-sigma", ratio_bins=10)
    z, cond, x_real, cond_real = _inputs()
    _, dev_stats = m.critic_loss(z, cond, x_real, cond_real, torch.Generator().manual_seed(9))
    # Statistics stay on the device (no host sync per update) until a logging step.
    assert all(isinstance(v, torch.Tensor) for v in dev_stats.values())
    stats = host_stats(dev_stats)
    # Recompute logits and bins directly from the same draws.
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        x_fake = m.generator(z, cond)
        sigma = m.sample_sigma(6, gen)
        s = sigma.view(-1, 1, 1, 1)
        xf_t = x_fake + s * torch.randn(x_fake.shape, generator=gen)
        xr_t = x_real + s * torch.randn(x_real.shape, generator=gen)
        lr = m.head(m.teacher(xr_t, sigma, cond_real, return_features=True)[1]).double()
        lf = m.head(m.teacher(xf_t, sigma, cond, return_features=True)[1]).double()
    disc = torch.nn.functional.softplus(-lr) + torch.nn.functional.softplus(lf)
    assert stats["disc_gap"] == pytest.approx(float(lr.mean() - lf.mean()), abs=1e-5)
    width = (80.0 - 0.002) / 10
    bins = [min(int((float(v) - 0.002) // width), 9) for v in sigma.double()]
    expect = {}
    for k in sorted(set(bins)):
        sel = torch.tensor([b == k for b in bins])
        expect[f"disc_gap/bin{k}"] = float((lr - lf)[sel].mean())
        expect[f"disc_loss/bin{k}"] = float(disc[sel].mean())
    got = {k: v for k, v in stats.items() if "/bin" in k}
    assert got.keys() == expect.keys()
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert all(isinstance(v, float) for v in stats.values())


def test_generator_statistics_spread_of_h():
    m = _model("fake", 0.0, normalize=False)
    z, cond, _, _ = _inputs()
    _, stats = m.generator_loss(z, cond, torch.Generator().manual_seed(5))
    stats = host_stats(stats)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = m.generator(z, cond)
        sigma = m.sample_sigma(6, gen)
        x_t = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
        logit = m.head(m.fake_score(x_t, sigma, cond, return_features=True)[1]).double()
    h = torch.sigmoid(logit.clamp(-10, 10))  # JS: h = r / (r + 1), no normalisation
    assert stats["h_min"] == pytest.approx(float(h.min()), rel=1e-5)
    assert stats["h_mean"] == pytest.approx(float(h.mean()), rel=1e-5)
    assert stats["h_max"] == pytest.approx(float(h.max()), rel=1e-5)
    cv = float(h.std(unbiased=False) / h.mean())
    assert stats["h_cv"] == pytest.approx(cv, rel=1e-4) and cv > 0


@pytest.mark.parametrize(
    ("option", "value"),
    [("fake_weighting", "lambda"), ("ratio_binning", "log"), ("disc_features", "both")],
)
def test_bad_loss_options_are_refused_in_one_line(option, value):
    with pytest.raises(ValueError, match=f"^loss option {option} must be one of .*got '{value}'$"):
        LossConfig(**{option: value}).validate()
    kw = {option: value}
    features = kw.pop("disc_features", "fake")
    with pytest.raises(ValueError, match=f"loss option {option}"):
        _model(features, 0.0, **kw)
