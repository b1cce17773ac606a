"""FDistill's two losses against a plain reference: every network run in full, with a graph.

The library skips work (feature-only passes, no graph through decoders whose outputs enter
the loss detached); the reference below does none of that and must give the same losses and
the same gradients for every feature source, with and without the GAN term and R1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fdistill.critic import DiscriminatorHead
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


def _model(disc_features: str, gan_weight: float, r1_gamma: float = 0.0) -> FDistill:
    torch.manual_seed(0)

    def unet() -> EDMPrecond:
        net = UNet(8, 1, model_channels=8, channel_mult=(1, 2), num_classes=3)
        for p in net.parameters():  # a trained-looking net: the zero-initialised output too
            torch.nn.init.normal_(p, std=0.2)
        return EDMPrecond(net)

    teacher = unet()
    cfg = LossConfig(gan_weight=gan_weight, r1_gamma=r1_gamma, disc_features=disc_features)
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy.deepcopy(teacher), sigma_init=cfg.sigma_max),
        fake_score=unet(),
        head=DiscriminatorHead(16, spatial=True, hidden=16),
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
    s = sigma.view(-1, 1, 1, 1)
    xf_t = x_fake + s * torch.randn(x_fake.shape, generator=gen)
    xr_t = (x_real + s * torch.randn(x_real.shape, generator=gen)).requires_grad_(True)
    d_fake, f_fake = m.fake_score(xf_t, sigma, cond, return_features=True)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    dsm = lam * (d_fake - x_fake).pow(2).flatten(1).mean(1)
    feats = m.fake_score if m.cfg.disc_features == "fake" else m.teacher
    _, f_real = feats(xr_t, sigma, cond_real, return_features=True)
    if m.cfg.disc_features == "teacher":
        _, f_fake = m.teacher(xf_t, sigma, cond, return_features=True)
    logit_real = m.head(f_real)
    loss = dsm + discriminator_loss(logit_real, m.head(f_fake))
    if m.cfg.r1_gamma > 0:
        loss = loss + 0.5 * m.cfg.r1_gamma * r1_penalty(logit_real, xr_t)
    return loss.mean()


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("features", ["fake", "teacher"])
@pytest.mark.parametrize("gan_weight", [0.0, 0.5])
def test_generator_loss_matches_reference(features, gan_weight):
    m = _model(features, gan_weight)
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


@pytest.mark.parametrize("features", ["fake", "teacher"])
@pytest.mark.parametrize("r1_gamma", [0.0, 0.3])
def test_critic_loss_matches_reference(features, r1_gamma):
    m = _model(features, 0.5, r1_gamma)
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
