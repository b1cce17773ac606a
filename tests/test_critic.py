"""Multi-scale discriminator head: the official head's design, float32 logits, and that the maps
the feature network taps are what the head reads inside FDistill (and nothing more runs)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fdistill.critic import MultiScaleHead, feature_taps_of
from fdistill.denoisers import MLP, EDMPrecond, UNet
from fdistill.denoisers.base import FeatureMap
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator


def _official_param_count(c: int, r: int) -> int:
    """Parameters of the official head with ``c`` channels throughout on an ``r x r`` map
    (``r`` a power of two >= 8): stride-2 4x4 convs down to 8x8, one 8 -> 4, a 4x4 conv to
    1x1, each with GroupNorm, then a 1x1 conv to one logit."""
    convs = 0
    while r > 8:
        convs, r = convs + 1, r // 2
    convs += 2  # 8 -> 4 and 4 -> 1
    return convs * (c * c * 16 + c + 2 * c) + c + 1


@pytest.mark.parametrize("res", [32, 16, 8])
def test_spatial_head_is_the_official_design(res):
    c = 16
    head = MultiScaleHead([FeatureMap(f"enc{res}", c, res)], hidden=c)
    assert sum(p.numel() for p in head.parameters()) == _official_param_count(c, res)
    sizes = []
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1]))
    head([torch.randn(3, c, res, res)])
    expect, r = [], res
    while r > 4:
        r //= 2
        expect.append(r)
    assert sizes == [*expect, 1, 1]  # ... 8, 4 then the full-map conv and the 1x1 logit conv
    assert all(isinstance(m, torch.nn.GroupNorm) for m in head.heads[0][1::3][:-1])


@pytest.mark.parametrize(("res", "sizes"), [(4, [1, 1]), (2, [1, 1]), (6, [3, 1, 1])])
def test_small_and_odd_maps_collapse_to_one_logit(res, sizes):
    head = MultiScaleHead([FeatureMap("m", 8, res)], hidden=8)
    seen = []
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    assert head([torch.randn(5, 8, res, res)]).shape == (5,)
    assert seen == sizes


def _reference_logit(head: MultiScaleHead, feats: list[torch.Tensor]) -> torch.Tensor:
    """The documented computation, written out with functional ops in float64."""
    logits = []
    for seq, f, m in zip(head.heads, feats, head.maps, strict=True):
        h = f.double()
        if m.resolution == 0:
            lin = [x for x in seq if isinstance(x, torch.nn.Linear)]
            h = F.linear(F.silu(h), lin[0].weight.double(), lin[0].bias.double())
            logits.append(F.linear(F.silu(h), lin[1].weight.double(), lin[1].bias.double()))
            continue
        convs = [x for x in seq if isinstance(x, torch.nn.Conv2d)]
        norms = [x for x in seq if isinstance(x, torch.nn.GroupNorm)]
        for conv, gn in zip(convs[:-1], norms, strict=True):
            w = conv.weight.double()
            if conv.stride == (2, 2):
                h = F.conv2d(h, w, conv.bias.double(), stride=2, padding=1)
            else:  # the kernel covers the remaining map
                assert w.shape[-1] == h.shape[-1]
                h = ((h[:, None] * w[None]).sum((2, 3, 4)) + conv.bias.double())[..., None, None]
            h = F.silu(F.group_norm(h, gn.num_groups, gn.weight.double(), gn.bias.double(), 1e-5))
        last = convs[-1]
        logits.append(F.conv2d(h, last.weight.double(), last.bias.double()))
    return torch.stack([lg.reshape(-1) for lg in logits]).mean(0)


def test_logit_is_the_mean_of_the_heads_and_float32_under_autocast():
    torch.manual_seed(0)
    maps = [FeatureMap("enc16", 8, 16), FeatureMap("enc8", 16, 8), FeatureMap("hidden", 12, 0)]
    head = MultiScaleHead(maps, hidden=8)
    feats = [torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8), torch.randn(4, 12)]
    got = head(feats)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got.double(), _reference_logit(head, feats), rtol=1e-5, atol=1e-6)
    # bf16 features (exactly representable) under bf16 autocast: same float32 logits.
    bf = [f.bfloat16() for f in feats]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf = head(bf)
    assert got_bf.dtype == torch.float32
    torch.testing.assert_close(got_bf, head([f.float() for f in bf]))


def test_head_rejects_features_it_was_not_built_for():
    head = MultiScaleHead([FeatureMap("enc8", 8, 8), FeatureMap("enc4", 16, 4)])
    with pytest.raises(ValueError, match=r"reads 2 feature maps \(enc8, enc4\), got 1"):
        head([torch.randn(2, 8, 8, 8)])
    with pytest.raises(ValueError, match="feature map enc4 has shape"):
        head([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8)])
    with pytest.raises(ValueError, match="offers no discriminator features"):
        feature_taps_of(torch.nn.Linear(2, 2))


def test_mlp_offers_its_hidden_layer():
    net = MLP(3, hidden=16, depth=2)
    d = EDMPrecond(net)
    assert feature_taps_of(d).feature_taps == net.feature_taps == ("hidden",)
    x = torch.randn(5, 3)
    out, feats = d(x, 0.5, return_features=True)
    only = d(x, 0.5, return_features="only")
    assert len(feats) == len(only) == 1 and feats[0].shape == (5, 16)
    torch.testing.assert_close(only[0], feats[0])
    assert MultiScaleHead.for_network(d, hidden=8)(only).shape == (5,)


# --------------------------------------------------------------------------- inside FDistill
def _unet() -> EDMPrecond:
    net = UNet(8, 1, model_channels=8, channel_mult=(1, 2))
    for p in net.parameters():  # a trained-looking net: the zero-initialised output too
        torch.nn.init.normal_(p, std=0.2)
    return EDMPrecond(net)


def _model(taps: list[str] | None, gan_weight: float = 0.0) -> FDistill:
    torch.manual_seed(0)
    teacher = _unet()
    teacher.net.set_feature_taps(taps)
    cfg = LossConfig(gan_weight=gan_weight, disc_features="teacher")
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy.deepcopy(teacher), sigma_init=cfg.sigma_max),
        fake_score=_unet(),
        head=MultiScaleHead.for_network(teacher, hidden=8),
        divergence=get_divergence("js"),
        cfg=cfg,
    )


def _watch(m: FDistill) -> tuple[dict, list, list]:
    """Hooks: the maps the teacher's blocks produce, the head's inputs, teacher modules run."""
    net, seen, head_in, calls = m.teacher.net, {}, [], []
    net.enc[0].register_forward_hook(lambda mod, a, out: seen.setdefault("enc8", []).append(out))
    net.enc[2].register_forward_hook(lambda mod, a, out: seen.setdefault("enc4", []).append(out))
    net.mid[-1].register_forward_hook(lambda mod, a, out: seen.setdefault("mid", []).append(out))
    m.head.register_forward_pre_hook(lambda mod, args: head_in.append(list(args[0])))
    for name, mod in [("mid0", net.mid[0]), ("dec", net.dec[0]), ("conv_out", net.conv_out)]:
        mod.register_forward_hook(lambda mod, a, out, name=name: calls.append(name))
    return seen, head_in, calls


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)


@pytest.mark.parametrize("taps", [None, ["mid"], ["enc8", "mid"]])
def test_head_reads_the_tapped_teacher_maps_and_the_decoder_never_runs(taps):
    m = _model(taps)
    seen, head_in, calls = _watch(m)
    z, x_real = _inputs()
    m.critic_loss(z, None, x_real, None, torch.Generator().manual_seed(2))
    names = list(taps or ["enc8", "enc4"])
    assert len(head_in) == 2  # real, fake
    for k, feats in enumerate(head_in):
        assert len(feats) == len(names)
        assert all(f is seen[n][k] for f, n in zip(feats, names, strict=True))
    # Feature-only teacher passes: no decoder, and no middle blocks unless "mid" is tapped.
    assert "dec" not in calls and "conv_out" not in calls
    assert ("mid0" in calls) == ("mid" in names)


def test_multi_scale_and_bottleneck_heads_see_different_things():
    """Mutation check: a head on the bottleneck alone gives other logits than the default
    multi-scale head, and changing only the 8x8 encoder map moves the multi-scale logit."""
    z, x_real = _inputs()
    sigma = torch.full((4,), 0.05)
    multi, mid = _model(None), _model(["mid"])
    feats_multi = multi.teacher(x_real, sigma, return_features="only")
    feats_mid = mid.teacher(x_real, sigma, return_features="only")
    assert [f.shape[-1] for f in feats_multi] == [8, 4] and [f.shape[-1] for f in feats_mid] == [4]
    assert not torch.allclose(multi.head(feats_multi), mid.head(feats_mid))
    bumped = [feats_multi[0] + 0.1 * torch.randn_like(feats_multi[0]), feats_multi[1]]
    assert (multi.head(bumped) - multi.head(feats_multi)).abs().min() > 1e-4


def test_generator_step_runs_the_teacher_decoder_once():
    m = _model(None, gan_weight=0.5)
    _, head_in, calls = _watch(m)
    z, _ = _inputs()
    m.generator_loss(z, None, torch.Generator().manual_seed(3))
    assert calls.count("conv_out") == 1  # the denoising pass; the GAN pass stops at enc4
    assert len(head_in) == 1 and [f.shape[-1] for f in head_in[0]] == [8, 4]


def test_fdistill_refuses_a_head_built_for_other_taps():
    m = _model(None)
    m.teacher.net.set_feature_taps(["mid"])
    with pytest.raises(ValueError, match=r"reads \['enc8', 'enc4'\] but the teacher"):
        FDistill(m.teacher, m.generator, m.fake_score, m.head, get_divergence("js"), m.cfg)
