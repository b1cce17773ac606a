"""diffusers UNet2DModel teachers against diffusers' own schedulers and independent float64
references: the scheduler tables, ``pred_original_sample`` of DDPM/DDIM steps, numpy
interpolation of timesteps, and forward hooks of the test's own."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers teachers need diffusers installed")
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from fdistill.denoisers.registry import build_denoiser, copy_denoiser  # noqa: E402
from fdistill.teachers import detect_format, load_teacher  # noqa: E402
from fdistill.teachers.diffusers_unet import (  # noqa: E402
    DiffusersUNetDenoiser,
    DiscreteSchedule,
    require_diffusers,
    schedule_config,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers"
DDPM = FIXTURES / "ddpm_tiny_eps"
F64 = torch.float64


def _need_fixture() -> Path:
    if not (DDPM / "unet" / "config.json").is_file():
        pytest.skip(f"the diffusers fixtures are absent ({DDPM})")
    return DDPM


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).to(F64), torch.as_tensor(b).to(F64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def ddpm():
    path = _need_fixture()
    model = load_teacher(path)
    unet = UNet2DModel.from_pretrained(path / "unet", low_cpu_mem_usage=False).eval()
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sched = DDPMScheduler.from_config({**cfg, "clip_sample": False})
    return model, unet, sched


# ----------------------------------------------------------------------------- schedule

SCHEDULES = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid", "num_train_timesteps": 500},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "rescale_betas_zero_snr": True},
    {"trained_betas": np.linspace(1e-3, 0.05, 200).tolist()},
]  # fmt: skip


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: c.get("beta_schedule", "trained"))
def test_schedule_matches_diffusers_tables(cfg):
    ours = DiscreteSchedule(schedule_config(cfg))
    ref = DDPMScheduler(**cfg).alphas_cumprod.to(F64)
    if cfg.get("rescale_betas_zero_snr"):
        ref[-1] = 2.0**-24  # what diffusers' Euler scheduler substitutes for the zero
    assert ours.alphas_cumprod.dtype == F64
    # diffusers keeps float32 tables: agreement to its rounding, relative to each entry
    assert float(((ours.alphas_cumprod - ref) / ref).abs().max()) < 5e-5
    torch.testing.assert_close(
        ours.sigmas, ((1 - ours.alphas_cumprod) / ours.alphas_cumprod).sqrt(), rtol=0, atol=0
    )
    assert ours.sigma_min == pytest.approx(float(ours.sigmas[0]))
    assert ours.sigma_max == pytest.approx(float(ours.sigmas[-1]))


def test_linear_schedule_in_float64_numpy():
    ours = DiscreteSchedule(schedule_config({"beta_schedule": "linear"}))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), abar, rtol=1e-13)
    assert ours.sigma_max == pytest.approx(np.sqrt((1 - abar[-1]) / abar[-1]), rel=1e-12)


def test_unknown_schedule_is_one_line_error():
    with pytest.raises(ValueError, match="beta_schedule 'exotic'.*accepted"):
        DiscreteSchedule(schedule_config({"beta_schedule": "exotic"}))


def test_timestep_interpolates_in_log_sigma():
    sched = DiscreteSchedule(schedule_config({"beta_schedule": "linear"}))
    # independent grid and interpolation: numpy float64 from the formula
    log_sig = 0.5 * np.log((1 - (abar := np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))) / abar)
    gen = np.random.default_rng(0)
    sig = np.exp(gen.uniform(log_sig[0], log_sig[-1], 200))
    sig = np.concatenate([sig, np.exp(log_sig[[0, 1, 500, 998, 999]]), [1e-4, 1e4]])
    expect = np.interp(np.log(sig), log_sig, np.arange(1000.0))  # clamps outside the grid
    got = sched.timestep(torch.tensor(sig, dtype=F64)).numpy()
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-8)
    assert got[-2] == 0.0 and got[-1] == 999.0


# ----------------------------------------------------------------------------- the fixture


def test_fixture_detected_and_described(ddpm):
    model, unet, _ = ddpm
    assert detect_format(DDPM).name == "diffusers"
    assert detect_format(DDPM / "unet").name == "diffusers"
    info = model.info
    assert info.family == "diffusers"
    assert info.shape == (3, 8, 8) and info.num_classes == 10
    assert info.sigma_min == pytest.approx(0.0100005, rel=1e-5)
    assert info.sigma_max == pytest.approx(157.4073, rel=1e-5)
    assert info.details["prediction_type"] == "epsilon"
    assert info.details["parameters"] == sum(p.numel() for p in unet.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_fixture_matches_ddpm_pred_original_sample(ddpm):
    """Per-sample integer t in one batch, integer class ids, clip_sample off: our x0 is the
    scheduler's own pred_original_sample."""
    model, unet, sched = ddpm
    gen = torch.Generator().manual_seed(0)
    ts = torch.tensor([0, 3, 100, 500, 900, 999])
    labels = torch.tensor([0, 3, 5, 7, 9, 2])
    x0 = torch.randn(6, 3, 8, 8, generator=gen)
    eps = torch.randn(6, 3, 8, 8, generator=gen)
    abar = sched.alphas_cumprod[ts].view(-1, 1, 1, 1)
    sample = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        ref = torch.cat(
            [
                sched.step(
                    unet(sample[i : i + 1], t, class_labels=labels[i : i + 1]).sample,
                    int(t),
                    sample[i : i + 1],
                ).pred_original_sample
                for i, t in enumerate(ts)
            ]
        )
        sigma = model.schedule.sigmas[ts].float()
        x = (sample.double() / abar.double().sqrt()).float()
        ours = model(x, sigma, labels)
        onehot = model(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
    errs = [_rel(ours[i], ref[i]) for i in range(len(ts))]
    assert max(errs) < 1e-5, errs
    torch.testing.assert_close(onehot, ours, rtol=0, atol=0)
    assert ref.abs().max() > 1.5  # clipping would have shown


def test_fixture_off_grid_sigma_uses_interpolated_timestep(ddpm):
    model, unet, _ = ddpm
    gen = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.003, 0.0173, 0.5, 3.3, 80.0, 400.0])
    x = torch.randn(6, 3, 8, 8, generator=gen, dtype=F64) * (1 + sigma.view(-1, 1, 1, 1) ** 2)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    log_sig = 0.5 * np.log((1 - abar) / abar)
    t = np.interp(np.log(sigma.double().numpy()), log_sig, np.arange(1000.0))
    s = sigma.double().view(-1, 1, 1, 1)
    with torch.no_grad():
        x_in = (x / (1 + s**2).sqrt()).float()
        eps = unet(x_in, torch.tensor(t, dtype=torch.float32), class_labels=labels).sample
        ref = x - s * eps.double()
        ours = model(x.float(), sigma, labels)
    assert _rel(ours, ref) < 1e-5


def test_class_conditional_unet_refuses_no_label(ddpm):
    model, _, _ = ddpm
    with pytest.raises(ValueError, match="class-conditional.*no null label"):
        model(torch.zeros(2, 3, 8, 8), 1.0)


def test_fixture_rebuilds_from_config(ddpm):
    model, _, _ = ddpm
    cfg = json.loads(json.dumps(model.config))
    assert cfg["type"] == "diffusers-unet2d" and cfg["prediction_type"] == "epsilon"
    new = build_denoiser(cfg).eval()
    assert isinstance(new, DiffusersUNetDenoiser)
    new.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma, labels = torch.tensor([0.1, 2.0, 30.0]), torch.tensor([4, 5, 6])
    with torch.no_grad():
        torch.testing.assert_close(new(x, sigma, labels), model(x, sigma, labels), rtol=0, atol=0)
        copy = copy_denoiser(model).eval()
        torch.testing.assert_close(copy(x, sigma, labels), model(x, sigma, labels), rtol=0, atol=0)


# ----------------------------------------------------------------------------- features


class _Counter:
    def __init__(self, modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_fixture_features(ddpm):
    model, unet, _ = ddpm
    maps = model.feature_maps()
    assert [(m.name, m.channels, m.resolution) for m in maps] == [
        ("enc8", 16, 8),
        ("enc4", 32, 4),
        ("mid", 32, 4),
    ]
    assert model.feature_taps == ("enc8", "enc4")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma, labels = torch.tensor([0.3, 7.0]), torch.tensor([1, 8])
    # independent capture: the last resnet of the 8x8 block (before its downsampler) and
    # the mid block's output
    seen = {}
    h1 = (
        model.unet.down_blocks[0]
        .resnets[-1]
        .register_forward_hook(lambda m, a, o: seen.__setitem__("enc8", o))
    )
    h2 = model.unet.mid_block.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", o))
    try:
        model.set_feature_taps(["enc8", "enc4", "mid"])
        with torch.no_grad():
            x0, feats = model(x, sigma, labels, return_features=True)
            plain = model(x, sigma, labels)
            up = _Counter(model.unet.up_blocks)
            only = model(x, sigma, labels, return_features="only")
            assert up.calls == 0
            model.set_feature_taps(["enc8"])
            mid = _Counter([model.unet.mid_block, model.unet.down_blocks[1]])
            shallow = model(x, sigma, labels, return_features="only")
            assert mid.calls == 0
            up.remove()
            mid.remove()
    finally:
        h1.remove()
        h2.remove()
        model.set_feature_taps(None)
    assert _hooks_left(model) == 0
    torch.testing.assert_close(x0, plain, rtol=0, atol=0)
    assert [tuple(f.shape) for f in feats] == [
        (2, m.channels, m.resolution, m.resolution) for m in maps
    ]
    for a, b in zip(only, feats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(feats[0], seen["enc8"], rtol=0, atol=0)
    torch.testing.assert_close(feats[2], seen["mid"], rtol=0, atol=0)
    assert len(shallow) == 1
    torch.testing.assert_close(shallow[0], feats[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- own tiny UNets


def _tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return unet.eval()


@pytest.mark.parametrize(
    "prediction_type,schedule",
    [
        ("v_prediction", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                          "beta_end": 0.012}),
        ("epsilon", {"beta_schedule": "squaredcos_cap_v2"}),
    ],
)  # fmt: skip
def test_own_unet_matches_ddim_pred_original_sample(prediction_type, schedule):
    """An unconditional UNet with a scheduler config that omits clip_sample (so DDIM would
    clip by default): our x0 is DDIM's unclipped pred_original_sample."""
    unet = _tiny_unet(0)
    model = DiffusersUNetDenoiser(unet, schedule, prediction_type)
    sched = DDIMScheduler(**schedule, prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(4)
    ts = [int(t) for t in sched.timesteps[[0, 3, 6, 9]]]
    x0 = torch.randn(4, 2, 8, 8, generator=gen) * 2
    eps = torch.randn(4, 2, 8, 8, generator=gen)
    abar = sched.alphas_cumprod[ts].view(-1, 1, 1, 1)
    sample = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        ref = torch.cat(
            [
                sched.step(
                    unet(sample[i : i + 1], t).sample, t, sample[i : i + 1]
                ).pred_original_sample
                for i, t in enumerate(ts)
            ]
        )
        sigma = model.schedule.sigmas[ts].float()
        ours = model((sample.double() / abar.double().sqrt()).float(), sigma)
        ignored = model((sample.double() / abar.double().sqrt()).float(), sigma, torch.ones(4))
    errs = [_rel(ours[i], ref[i]) for i in range(4)]
    assert max(errs) < 1e-5, errs
    assert ref.abs().max() > 2
    torch.testing.assert_close(ignored, ours, rtol=0, atol=0)
    new = build_denoiser(json.loads(json.dumps(model.config))).eval()
    new.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(new(ours, sigma), model(ours, sigma), rtol=0, atol=0)
    assert [m.name for m in model.feature_maps()] == ["enc8", "enc4", "mid"]


# ----------------------------------------------------------------------------- the format


def test_folder_without_model_index_and_unknown_class(tmp_path):
    src = _need_fixture()
    root = tmp_path / "pipe"
    shutil.copytree(src, root)
    (root / "model_index.json").unlink()
    assert detect_format(root).name == "diffusers"
    model = load_teacher(root)
    assert model.info.num_classes == 10
    (tmp_path / "plain").mkdir()
    from fdistill.teachers.diffusers_unet import detect

    assert not detect(tmp_path / "plain")
    assert not detect(tmp_path / "missing")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    cfg["_class_name"] = "UNet3DConditionModel"
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="UNet3DConditionModel.*accepted: UNet2DModel"):
        load_teacher(root)
    (root / "scheduler" / "scheduler_config.json").unlink()
    (root / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load_teacher(root)


def test_missing_diffusers_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=r"needs diffusers: pip install 'fdistill\[diffusers\]'"):
        require_diffusers()
