"""UNet raw network: shapes, feature taps, conditioning, init and trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdistill.denoisers.base import FeatureMap
from fdistill.denoisers.edm import EDMLoss, EDMPrecond
from fdistill.denoisers.unet import UNet


def _perturb(net: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _noise(n: int) -> torch.Tensor:
    return torch.linspace(-1.5, 1.0, n)


def test_shapes_8x8_gray_default():
    torch.manual_seed(0)
    net = UNet(8, 1)
    x = torch.randn(3, 1, 8, 8)
    out, feats = net(x, _noise(3), return_features=True)
    assert out.shape == x.shape
    assert (net.feature_channels, net.feature_resolution) == (64, 4)
    assert net.feature_maps() == [
        FeatureMap("enc8", 32, 8), FeatureMap("enc4", 64, 4), FeatureMap("mid", 64, 4),
    ]  # fmt: skip
    assert net.feature_taps == ("enc8", "enc4")
    assert [f.shape for f in feats] == [(3, 32, 8, 8), (3, 64, 4, 4)]


def test_shapes_16x16_rgb_with_attention_and_classes():
    torch.manual_seed(0)
    net = UNet(
        16, 3, out_channels=6, model_channels=24, channel_mult=(1, 2, 2), attn_resolutions=(8,),
        num_classes=10, embedding="fourier",
    )  # fmt: skip
    attn = [m for m in net.modules() if type(m).__name__ == "Attention"]
    # Encoder 1 + decoder 2 blocks at 8x8, plus the middle block.
    assert len(attn) == 4
    x = torch.randn(2, 3, 16, 16)
    net.set_feature_taps(["enc16", "enc8", "enc4", "mid"])
    out, feats = net(x, _noise(2), torch.tensor([3, 9]), return_features=True)
    assert out.shape == (2, 6, 16, 16)
    assert [tuple(f.shape) for f in feats] == [
        (2, 24, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4), (2, net.feature_channels, 4, 4),
    ]  # fmt: skip
    assert net.feature_resolution == 4
    with pytest.raises(ValueError, match="valid: enc16, enc8, enc4, mid"):
        net.set_feature_taps(["enc2"])


def test_bad_resolution_raises():
    with pytest.raises(ValueError):
        UNet(10, 1, channel_mult=(1, 2, 2))


def _tap_hooks(net: UNet, seen: dict, calls: list) -> None:
    """Record, by forward hooks, the output of the last encoder block of each level, of the
    middle blocks, and which later modules run. Level l's last block is enc[l*(1+nb)+nb-1]
    for nb blocks per level (a downsampling block starts every level after the first)."""
    nb, levels = 1, 2

    def keep(name):
        return lambda m, a, out: seen.__setitem__(name, out)

    for level in range(levels):
        net.enc[level * (1 + nb) + nb - 1].register_forward_hook(keep(f"enc{8 >> level}"))
    net.mid[-1].register_forward_hook(keep("mid"))
    for name, mod in [("conv_in", net.conv_in), ("down", net.enc[nb]), ("mid0", net.mid[0])]:
        mod.register_forward_hook(lambda m, a, out, name=name: calls.append(name))
    for i, blk in enumerate(net.dec):
        blk.register_forward_hook(lambda m, a, out, i=i: calls.append(f"dec{i}"))
    net.conv_out.register_forward_hook(lambda m, a, out: calls.append("conv_out"))


def test_features_are_the_tapped_maps_from_one_pass():
    torch.manual_seed(0)
    net = UNet(8, 1, num_classes=3).eval()
    _perturb(net)
    seen, calls = {}, []
    _tap_hooks(net, seen, calls)
    dec_in = {}
    net.dec[0].register_forward_pre_hook(lambda m, args: dec_in.__setitem__("x", args[0]))
    x, c, y = torch.randn(4, 1, 8, 8), _noise(4), torch.tensor([0, 1, 2, 0])
    net.set_feature_taps(["enc8", "enc4", "mid"])
    out, feats = net(x, c, y, return_features=True)
    assert calls.count("conv_in") == 1
    assert all(f is seen[n] for f, n in zip(feats, ["enc8", "enc4", "mid"], strict=True))
    # The first decoder block sees [bottleneck, encoder skip] concatenated on channels.
    assert torch.equal(dec_in["x"][:, : net.feature_channels], feats[2])
    assert torch.equal(out, net(x, c, y))
    # The old single-map behaviour: only the bottleneck.
    net.set_feature_taps(["mid"])
    (mid,) = net(x, c, y, return_features=True)[1]
    assert torch.equal(mid, feats[2])


@pytest.mark.parametrize(
    ("taps", "ran", "skipped"),
    [
        (["enc8"], ["conv_in"], ["down", "mid0"]),
        (["enc8", "enc4"], ["conv_in", "down"], ["mid0"]),
        (["enc4", "mid"], ["conv_in", "down", "mid0"], []),
    ],
)
def test_features_only_stops_after_the_deepest_tap(taps, ran, skipped):
    torch.manual_seed(0)
    net = UNet(8, 1).eval()
    _perturb(net)
    seen, calls = {}, []
    _tap_hooks(net, seen, calls)
    net.set_feature_taps(taps)
    x, c = torch.randn(2, 1, 8, 8), _noise(2)
    feats = net(x, c, return_features="only")
    assert all(f is seen[n] for f, n in zip(feats, taps, strict=True))
    assert all(name in calls for name in ran), calls
    assert not any(name in calls for name in skipped), calls
    assert not any(name.startswith("dec") or name == "conv_out" for name in calls), calls
    # Same maps as the full pass.
    calls.clear()
    _, full = net(x, c, return_features=True)
    assert all(torch.equal(a, b) for a, b in zip(feats, full, strict=True))
    assert "conv_out" in calls


def test_zero_init_output_makes_precond_the_skip_path():
    sd = 0.5
    net = UNet(8, 1)
    x = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0])
    assert torch.equal(net(x, sigma.log() / 4), torch.zeros_like(x))
    d = EDMPrecond(net, sigma_data=sd)(x, sigma)
    c_skip = sd**2 / (sigma**2 + sd**2)
    torch.testing.assert_close(d, c_skip[:, None, None, None] * x)


def test_class_conditioning_and_null_label():
    torch.manual_seed(0)
    net = UNet(8, 1, num_classes=4, label_dropout=1.0)
    _perturb(net)
    net.eval()
    x, c = torch.randn(4, 1, 8, 8), _noise(4)
    ids = torch.tensor([0, 1, 2, 3])
    out_a = net(x, c, ids)
    out_b = net(x, c, ids.flip(0))
    out_null = net(x, c, None)
    assert (out_a - out_b).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (out_a - out_null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # One-hot floats are the same labels; an all-zero row is the null label.
    torch.testing.assert_close(net(x, c, F.one_hot(ids, 4).float()), out_a)
    torch.testing.assert_close(net(x, c, torch.zeros(4, 4)), out_null)
    # A soft label is the linear mix in embedding space, distinct from both ends.
    soft = net(x, c, 0.5 * F.one_hot(ids, 4).float() + 0.5 * F.one_hot(ids.flip(0), 4).float())
    assert not torch.allclose(soft, out_a) and not torch.allclose(soft, out_b)
    # label_dropout = 1 drops every label in training mode only.
    net.train()
    torch.testing.assert_close(net(x, c, ids), out_null)
    net.label_dropout = 0.0
    torch.testing.assert_close(net(x, c, ids), out_a)


def test_unconditional_net_ignores_cond():
    torch.manual_seed(0)
    net = UNet(8, 1).eval()
    _perturb(net)
    x, c = torch.randn(2, 1, 8, 8), _noise(2)
    assert torch.equal(net(x, c, torch.tensor([1, 2])), net(x, c))


def test_noise_level_changes_output():
    torch.manual_seed(0)
    net = UNet(8, 1).eval()
    _perturb(net)
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.full((2,), -1.0)), net(x, torch.full((2,), 1.0)))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = UNet(
        8, 1, model_channels=16, channel_mult=(1, 2), attn_resolutions=(8,), num_classes=3,
        dropout=0.1,
    )  # fmt: skip
    _perturb(net)
    x = torch.randn(4, 1, 8, 8)
    out, feats = net(x, _noise(4), torch.tensor([0, 1, 2, 1]), return_features=True)
    (out.square().mean() + sum(f.mean() for f in feats)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_group_norm_groups_divide_odd_channel_counts():
    net = UNet(8, 3, model_channels=24, channel_mult=(1, 3))
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
            assert m.num_channels // m.num_groups >= 4
    assert net(torch.randn(1, 3, 8, 8), _noise(1)).shape == (1, 3, 8, 8)


def test_edm_loss_decreases_with_training():
    torch.manual_seed(0)
    # Two fixed 8x8 "images" (a bar and a ring), repeated, std about sigma_data.
    bar = torch.zeros(8, 8)
    bar[:, 3:5] = 1
    ring = torch.zeros(8, 8)
    ring[1:7, 1:7] = 1
    ring[2:6, 2:6] = 0
    x0 = (torch.stack([bar, ring]).repeat(8, 1, 1)[:, None] - 0.3) * 1.2
    d = EDMPrecond(UNet(8, 1, model_channels=16, num_classes=2))
    labels = torch.tensor([0, 1]).repeat(8)
    loss = EDMLoss()

    def eval_loss() -> float:
        with torch.no_grad():
            return loss(d, x0, labels, generator=torch.Generator().manual_seed(123)).mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        step_loss = loss(d, x0, labels, generator=g).mean()
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
