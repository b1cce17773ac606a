"""SongUNet and DhariwalUNet: EDM's state-dict layout, EDM's outputs, feature taps, sizes.

The reference numbers are outputs of NVlabs EDM's own code on the fixture pickles (float32);
the layouts are EDM's own key listings; the sizes are the EDM paper's published counts.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdistill.denoisers.dhariwal import DhariwalUNet
from fdistill.denoisers.edm import EDMPrecond
from fdistill.denoisers.edm_layers import Conv2d, GroupNorm, resample_kernel
from fdistill.denoisers.songunet import SongUNet, build_edm_network, edm_preset_kwargs

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "edm"
NAMES = ["edm_songunet_tiny_cond", "edm_dhariwal_tiny_cond"]
TOL = 1e-5


def _fixture(name: str, suffix: str) -> Path:
    path = FIXTURES / f"{name}{suffix}"
    if not path.exists():
        pytest.skip(f"EDM fixture {path} is absent (shared fixtures not checked out)")
    return path


def _init_kwargs(name: str) -> dict:
    """The wrapper's ``init_kwargs`` as EDM recorded them in ``*_structure.txt``."""
    text = _fixture(name, "_structure.txt").read_text()
    return json.loads(re.search(r"^ema\.init_kwargs = (.*)$", text, re.M).group(1))


def _listed_state_dict(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``(key, shape)`` EDM's network had, ``model.`` stripped, in EDM's order."""
    rows = []
    for line in _fixture(name, "_state_dict.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        assert key.startswith("model.")
        rows.append((key[len("model.") :], tuple(ast.literal_eval(shape))))
    return rows


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: EDM zero-initialises output layers, so a fresh net would
    ignore its input (the fixture pickles were randomised the same way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
    return net


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomise(build_edm_network(_init_kwargs(name)), seed).eval()


def _loaded(name: str) -> tuple[EDMPrecond, dict]:
    """``EDMPrecond(our net)`` holding the fixture pickle's weights, and the reference npz."""
    edm_pickle = pytest.importorskip("fdistill.teachers.edm_pickle")
    rec = edm_pickle.read_edm_pickle(_fixture(name, ".pkl"))["ema"]
    net = build_edm_network(rec.init_kwargs)
    state = {k[len("model.") :]: v for k, v in rec.state_dict.items() if k.startswith("model.")}
    net.load_state_dict(state, strict=True)
    model = EDMPrecond(net, float(rec.get("sigma_data"))).eval()
    ref = dict(np.load(_fixture(name, "_ref.npz")))
    return model, {k: torch.from_numpy(v) for k, v in ref.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error over each sample, relative to that sample's largest reference value."""
    n = b.shape[0]
    err = (a - b).abs().reshape(n, -1).amax(1) / b.abs().reshape(n, -1).amax(1)
    return float(err.max())


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_edm(name):
    net = _tiny(name)
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert ours == _listed_state_dict(name)  # same keys, shapes and order
    kw = _init_kwargs(name)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (
        kw["img_resolution"],
        kw["img_channels"],
        kw["label_dim"],
    )
    assert type(net) is {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[kw["model_type"]]


# ------------------------------------------------------------------- EDM's own outputs


@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_edm_reference(name):
    model, r = _loaded(name)
    x, sigma, onehot = r["x"], r["sigma"], r["labels"]
    with torch.no_grad():
        d = model(x, sigma, onehot)
        assert _rel(d, r["D"]) <= TOL
        # Integer class ids are the same labels as one-hot rows.
        assert torch.equal(model(x, sigma, onehot.argmax(1)), d)
        for i, s in enumerate(r["sigma_grid"].tolist()):
            assert _rel(model(x, s, onehot), r["D_grid"][i]) <= TOL
        assert _rel(model(x, sigma, None), r["D_zero_labels"]) <= TOL
        # The network's share c_out * F alone (where D is not mostly c_skip * x).
        big = sigma >= 0.5
        skip = r["c_skip"].reshape(-1, 1, 1, 1) * x
        assert _rel((d - skip)[big], (r["D"] - skip)[big]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_wrong_group_rule_is_caught(name, monkeypatch):
    """The reference comparison can fail: halving the groups of every GroupNorm breaks it."""
    model, r = _loaded(name)
    for m in model.modules():
        if isinstance(m, GroupNorm):
            monkeypatch.setattr(m, "num_groups", max(m.num_groups // 2, 1))
    with torch.no_grad():
        assert _rel(model(r["x"], r["sigma"], r["labels"]), r["D"]) > 100 * TOL


# ----------------------------------------------------------------------- feature taps


def _decoder_hook(net, key: str, fired: list) -> None:
    net.dec[key].register_forward_hook(lambda *a: fired.append(key))


@pytest.mark.parametrize("name", NAMES)
def test_feature_taps(name):
    net = _tiny(name)
    names = [m.name for m in net.feature_maps()]
    assert names == ["enc8", "enc4", "mid"]
    assert net.feature_taps == ("enc8", "enc4")
    x, c = torch.randn(2, 3, 8, 8), torch.tensor([0.3, -1.0])
    cond = torch.tensor([1, 7])
    with torch.no_grad():
        full = net(x, c, cond)
        out, feats = net(x, c, cond, return_features=True)
        assert torch.equal(out, full)
        maps = net.selected_feature_maps()
        assert [tuple(f.shape) for f in feats] == [
            (2, m.channels, m.resolution, m.resolution) for m in maps
        ]

        fired: list[str] = []
        for key in net.dec:
            _decoder_hook(net, key, fired)
        only = net(x, c, cond, return_features="only")
        assert not fired  # the decoder never ran
        assert len(only) == len(feats) and all(
            torch.equal(a, b) for a, b in zip(only, feats, strict=True)
        )

        # "mid" runs the two bottleneck blocks, then stops.
        net.set_feature_taps(["enc8", "mid"])
        only = net(x, c, cond, return_features="only")
        assert fired == ["4x4_in0", "4x4_in1"]
        _, feats = net(x, c, cond, return_features=True)
        assert [f.shape[1] for f in only] == [16, net.dec["4x4_in1"].out_channels]
        assert all(torch.equal(a, b) for a, b in zip(only, feats, strict=True))

        # A shallow tap alone stops before the next resolution's downsampling block.
        net.set_feature_taps(["enc8"])
        enc_fired: list[str] = []
        net.enc["4x4_down"].register_forward_hook(lambda *a: enc_fired.append("down"))
        (f8,) = net(x, c, cond, return_features="only")
        assert not enc_fired and f8.shape == (2, 16, 8, 8)
        assert torch.equal(f8, feats[0])


def test_features_through_preconditioning_and_double_backward():
    """EDMPrecond passes ``return_features`` through; a gradient of a gradient (R1) works
    through attention."""
    net = _tiny("edm_songunet_tiny_cond")
    model = EDMPrecond(net, 0.5)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    feats = model(x, torch.tensor([0.5, 2.0]), torch.tensor([2, 3]), return_features="only")
    (g,) = torch.autograd.grad(sum(f.square().sum() for f in feats), x, create_graph=True)
    g.square().sum().backward()
    assert net.enc["4x4_block0"].qkv.weight.grad is not None


# --------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", NAMES)
def test_class_conditioning_forms(name):
    net = _tiny(name)
    x, c = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.2, 0.3])
    with torch.no_grad():
        ids = torch.tensor([0, 4, 9])
        assert torch.equal(net(x, c, ids), net(x, c, F.one_hot(ids, 10).float()))
        assert torch.equal(net(x, c, None), net(x, c, torch.zeros(3, 10)))
        assert not torch.allclose(net(x, c, ids), net(x, c, None))
        aug = torch.randn(3, 9)
        assert not torch.allclose(net(x, c, ids, augment_labels=aug), net(x, c, ids))
    with pytest.raises(ValueError, match="class ids"):
        net(x, c, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="label rows"):
        net(x, c, torch.zeros(3, 9))
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, torch.zeros(2), ids)


def test_label_dropout_and_unconditional():
    torch.manual_seed(0)
    kw = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    net = _randomise(SongUNet(8, 3, 3, label_dim=5, dropout=0.0, label_dropout=1.0, **kw))
    x, c = torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0])
    with torch.no_grad():
        net.train()  # label_dropout 1 drops every label while training
        assert torch.equal(net(x, c, torch.tensor([1, 2])), net(x, c, None))
        net.eval()
        assert not torch.allclose(net(x, c, torch.tensor([1, 2])), net(x, c, None))
        uncond = _randomise(DhariwalUNet(8, 3, 3, **kw)).eval()
        assert uncond.map_label is None
        assert torch.equal(uncond(x, c, torch.tensor([1, 2])), uncond(x, c))


# ----------------------------------------------------------------------- resampling


def test_resample_filter_normalised():
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(resample_kernel([1, 3, 3, 1])[0, 0], torch.outer(f, f) / 64)
    assert torch.equal(resample_kernel([1, 1])[0, 0], torch.full((2, 2), 0.25))


def test_box_resampling_is_average_pool_and_nearest():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    down = Conv2d(4, 4, 0, down=True).double()
    block_mean = x.reshape(2, 4, 4, 2, 4, 2).mean((3, 5))
    assert torch.allclose(down(x), block_mean, rtol=0, atol=1e-12)
    up = Conv2d(4, 4, 0, up=True).double()
    assert torch.equal(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_fir_resampling_matches_separable_reference():
    """[1, 3, 3, 1]: down = pad 1, separable filter f/8, stride 2; up = zero-stuff, pad,
    separable filter f/4 (gain 1 per axis)."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)

    def sep(img: torch.Tensor, taps: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
        img = F.pad(img, (pad, pad, pad, pad))
        k = len(taps)
        rows = sum(taps[i] * img[..., i : img.shape[-2] - k + 1 + i, :] for i in range(k))
        out = sum(taps[i] * rows[..., i : rows.shape[-1] - k + 1 + i] for i in range(k))
        return out[..., ::stride, ::stride]

    down = Conv2d(2, 2, 0, down=True, resample_filter=[1, 3, 3, 1]).double()
    assert torch.allclose(down(x), sep(x, f / 8, 2, 1), atol=1e-12)
    stuffed = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    stuffed[..., ::2, ::2] = x
    up = Conv2d(2, 2, 0, up=True, resample_filter=[1, 3, 3, 1]).double()
    assert torch.allclose(up(x), sep(stuffed, f.flip(0) / 4, 1, 2)[..., :16, :16], atol=1e-12)


@pytest.mark.parametrize(
    "variant",
    [
        dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
             resample_filter=[1, 3, 3, 1]),
        dict(encoder_type="skip", decoder_type="skip"),
    ],
)  # fmt: skip
def test_ncsnpp_and_skip_variants_run(variant):
    torch.manual_seed(0)
    net = SongUNet(
        16, 3, 3, label_dim=0, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
        attn_resolutions=[8], **variant,
    ).eval()  # fmt: skip
    _randomise(net)
    keys = net.state_dict().keys()
    if variant.get("encoder_type") == "residual":
        assert net.state_dict()["enc.8x8_aux_residual.resample_filter"].shape == (1, 1, 4, 4)
        assert net.state_dict()["map_noise.freqs"].shape == (16,)
    else:
        assert {"enc.8x8_aux_down.resample_filter", "enc.8x8_aux_skip.weight"} <= set(keys)
        assert {"dec.16x16_aux_up.resample_filter", "dec.8x8_aux_conv.weight"} <= set(keys)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, feats = net(x, torch.tensor([0.0, 1.0]), return_features=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (32, 4, 4)]


# --------------------------------------------------------------- published networks


@pytest.mark.parametrize(
    ("preset", "cls", "published"),
    [("cifar10", SongUNet, 55.73e6), ("imagenet64", DhariwalUNet, 295.90e6)],
)
def test_published_sizes(preset, cls, published):
    with torch.device("meta"):
        net = build_edm_network(edm_preset_kwargs(preset))
    assert type(net) is cls
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - published) <= 0.01 * published
    assert abs(count - published) <= 0.01e6  # the paper's figures, to their last digit


def test_build_errors():
    with pytest.raises(ValueError, match="unknown EDM preset"):
        edm_preset_kwargs("cifar100")
    kw = (
        _init_kwargs("edm_songunet_tiny_cond")
        if FIXTURES.exists()
        else edm_preset_kwargs("cifar10")
    )
    with pytest.raises(ValueError, match="model_type"):
        build_edm_network({**kw, "model_type": "UNet"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_edm_network({**kw, "widget": 1})
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(8, 3, 3, encoder_type="fancy")
    with pytest.raises(ValueError, match="img_resolution"):
        DhariwalUNet(12, 3, 3, channel_mult=[1, 2, 2, 2])
