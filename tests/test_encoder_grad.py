"""``return_features="encoder_grad"``: one pass whose graph ends at the deepest tap.

The generator update needs gradients through the discriminator's features but uses the
denoised estimate detached. Each network must give, from one pass, exactly what two passes
gave before (a ``"only"`` pass with a graph, a full pass without one): the same ``x0`` and
features bit for bit, the same input gradient through the features, no graph on ``x0``, and
no autograd recording in the layers after the taps. The method must then run each network
once per generator loss.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fdistill.critic import MultiScaleHead
from fdistill.denoisers import MLP, EDMPrecond, UNet
from fdistill.denoisers.dhariwal import DhariwalUNet
from fdistill.denoisers.songunet import SongUNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator

DDPM = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers" / "ddpm_tiny_eps"


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in net.parameters():  # zero-initialised output layers would hide a wrong output
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def _edm_song() -> torch.nn.Module:
    net = SongUNet(8, 3, 3, label_dim=4, model_channels=8, channel_mult=(1, 2), num_blocks=1)
    return EDMPrecond(_randomised(net))


def _edm_dhariwal() -> torch.nn.Module:
    net = DhariwalUNet(
        8, 3, 3, label_dim=4, model_channels=8, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,),
    )  # fmt: skip
    return EDMPrecond(_randomised(net))


def _unet() -> torch.nn.Module:
    return EDMPrecond(_randomised(UNet(8, 3, model_channels=8, channel_mult=(1, 2), num_classes=4)))


def _mlp() -> torch.nn.Module:
    return EDMPrecond(_randomised(MLP(2, hidden=16, depth=2, num_classes=4)))


def _diffusers() -> torch.nn.Module:
    pytest.importorskip("diffusers", reason="the diffusers teachers need diffusers installed")
    if not DDPM.is_dir():
        pytest.skip(f"the diffusers fixtures are absent ({DDPM})")
    from fdistill.teachers import load_teacher

    return load_teacher(DDPM).eval()


NETWORKS = {
    "songunet": (_edm_song, (3, 3, 8, 8)),
    "dhariwal": (_edm_dhariwal, (3, 3, 8, 8)),
    "unet": (_unet, (3, 3, 8, 8)),
    "mlp": (_mlp, (3, 2)),
    "diffusers": (_diffusers, (3, 3, 8, 8)),
}


def _after_tap_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that run after every default tap: the decoders and output layers."""
    net = getattr(model, "net", None)
    if isinstance(net, MLP):
        return [net.out]
    if isinstance(net, UNet):
        return [*net.dec, net.conv_out]
    if net is not None:
        return list(net.dec.values())
    return list(model.unet.up_blocks)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_one_pass_equals_two_passes(name):
    build, shape = NETWORKS[name]
    model = build()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    cond = torch.tensor([0, 2, 3])

    with torch.no_grad():
        x0_ref = model(x, sigma, cond)
    feats_ref = model(x, sigma, cond, return_features="only")
    (grad_ref,) = torch.autograd.grad(sum(f.square().sum() for f in feats_ref), x)

    recorded: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(lambda *a: recorded.append(torch.is_grad_enabled()))
        for m in _after_tap_modules(model)
    ]
    try:
        x0, feats = model(x, sigma, cond, return_features="encoder_grad")
    finally:
        for h in hooks:
            h.remove()
    assert recorded and not any(recorded)  # nothing after the taps recorded a graph
    assert torch.is_grad_enabled()  # the caller's grad mode is back
    assert not x0.requires_grad and x0.grad_fn is None
    assert torch.equal(x0, x0_ref)
    assert len(feats) == len(feats_ref)
    for a, b in zip(feats, feats_ref, strict=True):
        assert a.requires_grad and torch.equal(a, b)
    (grad,) = torch.autograd.grad(sum(f.square().sum() for f in feats), x)
    assert torch.equal(grad, grad_ref)

    with torch.no_grad():  # under no_grad it stays off, and the values are the same
        x0_ng, _ = model(x, sigma, cond, return_features="encoder_grad")
    assert not torch.is_grad_enabled() or torch.equal(x0_ng, x0_ref)
    assert torch.is_grad_enabled()


def test_unknown_feature_mode_is_refused():
    with pytest.raises(ValueError, match="return_features must be one of"):
        _unet()(torch.randn(1, 3, 8, 8), 1.0, None, return_features="encoder")


def _method(disc_features: str, gan_weight: float) -> FDistill:
    torch.manual_seed(0)

    def unet() -> EDMPrecond:
        return EDMPrecond(_randomised(UNet(8, 1, model_channels=8, channel_mult=(1, 2))))

    teacher, fake = unet(), unet()
    cfg = LossConfig(gan_weight=gan_weight, disc_features=disc_features)
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy.deepcopy(teacher), sigma_init=cfg.sigma_max),
        fake_score=fake,
        head=MultiScaleHead.for_network(fake if disc_features == "fake" else teacher, hidden=8),
        divergence=get_divergence("js"),
        cfg=cfg,
    )


@pytest.mark.parametrize("disc_features", ["teacher", "fake"])
@pytest.mark.parametrize("gan_weight", [0.0, 1e-2])
def test_generator_loss_runs_each_network_once(disc_features, gan_weight):
    """The teacher's and the fake score's first encoder block each run once per generator
    loss (they ran twice when the GAN term took a features pass of its own)."""
    m = _method(disc_features, gan_weight)
    calls = {"teacher": 0, "fake": 0}
    for key, net in (("teacher", m.teacher), ("fake", m.fake_score)):

        def count(*_, key=key):
            calls[key] += 1

        net.net.conv_in.register_forward_pre_hook(count)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss, _ = m.generator_loss(z, None, torch.Generator().manual_seed(2))
    loss.backward()
    assert calls == {"teacher": 1, "fake": 1}
    assert all(p.grad is None for p in [*m.teacher.parameters(), *m.fake_score.parameters()])
    assert any(p.grad is not None for p in m.generator.parameters())
