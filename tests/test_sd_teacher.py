"""The Stable Diffusion teacher against outputs saved from diffusers' own pipeline components
(``sd15_tiny_ref.npz``) and against DDIM's ``pred_original_sample`` for v-prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the Stable Diffusion teacher needs diffusers")
pytest.importorskip("transformers", reason="the Stable Diffusion teacher needs transformers")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402

from fdistill.denoisers.registry import build_denoiser, copy_denoiser  # noqa: E402
from fdistill.teachers import detect_format, load_teacher  # noqa: E402
from fdistill.teachers.diffusers_unet import detect  # noqa: E402
from fdistill.teachers.stable_diffusion import (  # noqa: E402
    SDComponents,
    StableDiffusionTeacher,
    load_sd_components,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers"
SD = FIXTURES / "sd15_tiny"
REF = FIXTURES / "sd15_tiny_ref.npz"
F64 = torch.float64


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).to(F64), torch.as_tensor(b).to(F64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sd():
    if not (SD / "unet" / "config.json").is_file() or not REF.is_file():
        pytest.skip(f"the Stable Diffusion fixture is absent ({SD})")
    return load_teacher(SD), dict(np.load(REF))


def test_loaded_as_text_teacher(sd):
    model, ref = sd
    assert detect_format(SD).name == "diffusers"
    assert detect(SD / "unet") and not detect(SD / "vae") and not detect(SD / "tokenizer")
    assert isinstance(model, StableDiffusionTeacher)
    info = model.info
    assert info.family == "diffusers" and info.shape == (4, 8, 8) and info.num_classes == 0
    assert info.details["conditioning"] == "text"
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    sig = np.sqrt((1 - abar) / abar)
    assert info.sigma_min == pytest.approx(sig[0], rel=1e-12)
    assert info.sigma_max == pytest.approx(sig[-1], rel=1e-12)
    # the fixture's sigmas come from diffusers' float32 table
    np.testing.assert_allclose(sig[ref["t"]], ref["sigma"], rtol=2e-5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_prompts_match_reference(sd):
    model, ref = sd
    prompt = str(ref["prompt"])
    np.testing.assert_array_equal(model.tokenize([prompt]).numpy(), ref["input_ids_cond"])
    np.testing.assert_array_equal(model.tokenize([""]).numpy(), ref["input_ids_uncond"])
    emb = model.encode_prompts([prompt, ""])
    assert emb.shape == (2, 77, 32)
    assert _rel(emb[:1], ref["embeds_cond"]) < 1e-5
    assert _rel(emb[1:], ref["embeds_uncond"]) < 1e-5
    assert _rel(model.null_cond, ref["embeds_uncond"]) < 1e-5
    with pytest.raises(ValueError, match="list of prompts"):
        model.encode_prompts(prompt)


def test_denoiser_matches_reference_eps_and_guidance(sd):
    """Each stored sigma: D(x, sigma, None) and D(x, sigma, text) give the UNet's stored eps
    (x0 = x - sigma * eps), and the guided denoiser the stored D_cfg."""
    model, ref = sd
    w = float(ref["guidance_scale"])
    text = torch.from_numpy(ref["embeds_cond"])
    for i, s in enumerate(ref["sigma"].tolist()):
        x = torch.from_numpy(ref["x_edm"][i])
        x64 = x.to(F64)
        with torch.no_grad():
            d_u, d_c = model(x, s, None), model(x, s, text)
            guided = model.guided(x, s, text, w)
        for d, eps in ((d_u, ref["eps_uncond"][i]), (d_c, ref["eps_cond"][i])):
            eps64 = torch.from_numpy(eps).to(F64)
            assert _rel(d, x64 - s * eps64) < 1e-5, (i, "D")
            assert _rel((x64 - d.to(F64)) / s, eps64) < 1e-5, (i, "eps")
        assert _rel(d_u + w * (d_c - d_u), ref["D_cfg"][i]) < 1e-5, i
        assert _rel(guided, ref["D_cfg"][i]) < 1e-5, i


def test_student_copy_is_the_unet_only(sd):
    model, ref = sd
    keys = set(model.state_dict())
    assert keys == {"null_cond"} | {f"unet.{k}" for k in model.unet.state_dict()}
    cfg = json.loads(json.dumps(model.config))
    assert cfg["type"] == "sd-unet" and cfg["context"] == [77, 32]
    fresh = build_denoiser(cfg).eval()
    x = torch.from_numpy(ref["x_edm"][1])
    with pytest.raises(ValueError, match="empty-prompt embedding"):
        fresh(x, 0.7)
    copy = copy_denoiser(model).eval()
    assert copy.components is None
    with torch.no_grad():
        torch.testing.assert_close(copy(x, 0.7), model(x, 0.7), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rebuilt without its tokenizer"):
        copy.encode_prompts(["a cat"])


def test_features_mid_and_encoder(sd):
    model, ref = sd
    maps = [(m.name, m.channels, m.resolution) for m in model.feature_maps()]
    assert maps == [("enc8", 32, 8), ("enc4", 64, 4), ("mid", 64, 4)]
    x = torch.from_numpy(ref["x_edm"][1]).expand(2, -1, -1, -1)
    seen = {}
    own = model.unet.mid_block.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", o))
    calls = []
    up = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in model.unet.up_blocks]
    try:
        model.set_feature_taps(["enc8", "mid"])
        with torch.no_grad():
            _, feats = model(x, 0.7, None, return_features=True)
            n_full = len(calls)
            only = model(x, 0.7, None, return_features="only")
    finally:
        own.remove()
        for h in up:
            h.remove()
        model.set_feature_taps(None)
    assert n_full == 2 and len(calls) == 2  # the "only" pass ran no up block
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    for a, b in zip(only, feats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(feats[1], seen["mid"], rtol=0, atol=0)


def test_vae_helpers_use_posterior_mean(sd):
    model, _ = sd
    vae = AutoencoderKL.from_pretrained(SD / "vae", low_cpu_mem_usage=False).eval()
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        lat = model.encode_images(img)
        ref = vae.encode(img).latent_dist.mean * 0.18215
        dec = model.decode_latents(lat)
        ref_dec = vae.decode(ref / 0.18215).sample
    assert lat.shape == (2, 4, 8, 8)
    torch.testing.assert_close(lat, ref)
    torch.testing.assert_close(model.encode_images(img), lat, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(dec, ref_dec)


def test_components_are_frozen_and_local(sd):
    parts = load_sd_components(SD)
    assert isinstance(parts, SDComponents)
    tok, enc, vae = parts
    assert tok.model_max_length == 77
    assert not any(p.requires_grad for p in enc.parameters())
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(FileNotFoundError, match="tokenizer/, text_encoder/ and vae/"):
        load_sd_components(SD / "scheduler")


def test_tiny_v_prediction_unet_matches_ddim():
    """A v-prediction UNet2DConditionModel (SD 2.x style) built here, random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=12,
        attention_head_dim=4,
    ).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    schedule = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    model = StableDiffusionTeacher(unet, schedule, "v_prediction", context=(7, 12))
    sched = DDIMScheduler(**schedule, prediction_type="v_prediction", clip_sample=False)
    sched.set_timesteps(20)
    gen = torch.Generator().manual_seed(1)
    ts = [int(t) for t in sched.timesteps[[0, 7, 14, 19]]]
    x0 = torch.randn(4, 4, 8, 8, generator=gen) * 2
    eps = torch.randn(4, 4, 8, 8, generator=gen)
    text = torch.randn(4, 7, 12, generator=gen)
    abar = sched.alphas_cumprod[ts].view(-1, 1, 1, 1)
    sample = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        ref = torch.cat(
            [
                sched.step(
                    unet(sample[i : i + 1], t, encoder_hidden_states=text[i : i + 1]).sample,
                    t,
                    sample[i : i + 1],
                ).pred_original_sample
                for i, t in enumerate(ts)
            ]
        )
        sigma = model.schedule.sigmas[ts].float()
        ours = model((sample.double() / abar.double().sqrt()).float(), sigma, text)
    errs = [_rel(ours[i], ref[i]) for i in range(4)]
    assert max(errs) < 1e-5, errs
    assert ref.abs().max() > 2  # unclipped
    with pytest.raises(ValueError, match="text embeddings"):
        model(ours, sigma, text[:, :, :5])


def test_refuses_inpainting_unet():
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=12,
    )
    with pytest.raises(ValueError, match="inpainting"):
        StableDiffusionTeacher(unet, {}, context=(7, 12))
