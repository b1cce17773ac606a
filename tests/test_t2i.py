"""Text-to-image f-distill on the tiny Stable Diffusion fixture: prompt and caption files, the
latent cache, rank-independent prompt draws, a distillation run that resumes bit for bit,
sampling, the diffusers export (checked with plain diffusers), and CLIP score against a hand
computation with a tiny random CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers", reason="text-to-image needs diffusers")
transformers = pytest.importorskip("transformers", reason="text-to-image needs transformers")

from fdistill import rng, t2i  # noqa: E402
from fdistill.cli import main  # noqa: E402
from fdistill.runs import load_checkpoint  # noqa: E402
from fdistill.teachers import load_teacher  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers" / "sd15_tiny"
CAPTIONS = ["a red square", "a blue circle", "a green field", "a small cat"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    """A writable copy of the tiny SD v1.5-layout pipeline."""
    if not (FIXTURE / "unet" / "config.json").is_file():
        pytest.skip(f"the Stable Diffusion fixture is absent ({FIXTURE})")
    dst = tmp_path_factory.mktemp("pipe") / "sd"
    shutil.copytree(FIXTURE, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def teacher(sd):
    return load_teacher(sd)


def _png(path: Path, h: int, w: int, seed: int, grey: bool = False) -> None:
    a = np.random.default_rng(seed).integers(0, 256, (h, w) if grey else (h, w, 3), np.uint8)
    PIL.Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Captioned PNGs (one not square, one grey; two captions per image) and a prompt file."""
    root = tmp_path_factory.mktemp("data")
    data = root / "coco-mini"
    data.mkdir()
    lines = []
    for i, cap in enumerate(CAPTIONS):
        _png(data / f"img{i}.png", 64 if i else 72, 64, i, grey=i == 3)
        lines.append({"file": f"img{i}.png", "caption": cap})
        lines.append({"file": f"img{i}.png", "text": f"{cap}, again"})
    (data / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  a dog on a bus  \nan apple\n")
    return {"data": data, "prompts": prompts, "root": root}


# --------------------------------------------------------------------------- files
def test_read_prompts_formats_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n")
    assert t2i.read_prompts(txt) == ["first", "second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"caption": "a"}\n\n{"text": "b", "x": 1}\n')
    assert t2i.read_prompts(jl) == ["a", "b"]
    unsuffixed = tmp_path / "p.data"  # JSONL recognised by its first line
    unsuffixed.write_text('{"text": "c"}\n')
    assert t2i.read_prompts(unsuffixed) == ["c"]
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "d"}]}))
    assert t2i.read_prompts(coco) == ["d"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        t2i.read_prompts(tmp_path / "missing.txt")
    jl.write_text('{"caption": "a"}\n{"caption": 3}\n')
    with pytest.raises(ValueError, match="line 2.*'caption' or 'text'"):
        t2i.read_prompts(jl)
    jl.write_text('{"caption": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        t2i.read_prompts(jl)
    txt.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        t2i.read_prompts(txt)


def test_read_captioned_jsonl_and_coco(files, tmp_path):
    d = t2i.read_captioned(files["data"])
    assert d.files == tuple(f"img{i}.png" for i in range(4)) and len(d) == 8
    assert d.captions[:2] == ("a red square", "a red square, again") and d.image_of[:3] == (0, 0, 1)
    assert len(t2i.read_captioned(files["data"], max_images=2)) == 4
    # COCO layout: annotations/ beside train2017/
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    _png(tmp_path / "train2017" / "000001.jpg", 16, 16, 0)
    ann = {
        "images": [{"id": 7, "file_name": "000001.jpg"}],
        "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 7, "caption": "y"}],
    }
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(ann))
    for spec in (tmp_path, tmp_path / "annotations" / "captions_train2017.json"):
        c = t2i.read_captioned(spec)
        assert c.root == tmp_path / "train2017" and c.captions == ("x", "y")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.jsonl").write_text('{"file": "nope.png", "caption": "z"}\n')
    with pytest.raises(FileNotFoundError, match="line 1: no image"):
        t2i.read_captioned(bad)


# --------------------------------------------------------------------------- latents
def test_latent_cache_matches_vae_reused_and_invalidated(teacher, files, tmp_path):
    data = t2i.read_captioned(files["data"])
    cache = tmp_path / "cache"
    first = t2i.encode_latents(data, teacher, 64, cache, batch=3, progress=False)
    assert not first.reused and first.latents.shape == (4, 4, 8, 8)
    # Independent: diffusers' VAE on the same images, posterior mean x scaling_factor.
    vae = teacher.components.vae
    imgs = torch.stack([t2i.load_image(data.root / f, 64) for f in data.files])
    with torch.no_grad():
        ref = vae.encode(imgs).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(first.latents.float(), ref, rtol=1e-3, atol=1e-4)  # float16 storage
    with torch.no_grad():  # the posterior's std, in the same units
        ref_std = vae.encode(imgs).latent_dist.std * vae.config.scaling_factor
    assert torch.allclose(first.std.float(), ref_std, rtol=1e-3, atol=1e-4)
    # real batches: a fresh posterior sample mean + std * eps, eps drawn after the indices
    sample = t2i.captioned_sampler(first.latents, data, teacher, torch.device("cpu"), first.std)
    x, _ = sample(5, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    rows = torch.tensor(data.image_of)[torch.randint(len(data), (5,), generator=g)]
    eps = torch.randn((5, 4, 8, 8), generator=g)
    want = first.latents[rows].float() + first.std[rows].float() * eps
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    assert t2i.load_image(data.root / "img3.png", 64).shape == (3, 64, 64)  # grey -> RGB
    mtime = first.path.stat().st_mtime_ns
    again = t2i.encode_latents(data, teacher, 64, cache, progress=False)
    assert again.reused and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert torch.equal(again.latents, first.latents)
    small = t2i.encode_latents(data, teacher, 32, cache, progress=False)
    assert not small.reused and small.path != first.path and small.latents.shape == (4, 4, 4, 4)
    # A changed VAE (one weight) or a changed image file gets new latents.
    with torch.no_grad():
        p = next(vae.parameters())
        p.add_(1.0)
        try:
            assert not t2i.encode_latents(data, teacher, 64, cache, progress=False).reused
        finally:
            p.sub_(1.0)
    _png(tmp_path / "x.png", 64, 64, 9)
    shutil.copytree(files["data"], tmp_path / "d2")
    _png(tmp_path / "d2" / "img1.png", 64, 64, 99)
    changed = t2i.read_captioned(tmp_path / "d2")
    assert not t2i.encode_latents(changed, teacher, 64, cache, progress=False).reused


def test_prompt_draws_do_not_depend_on_the_process_split(teacher):
    prompts = [f"prompt {i}" for i in range(7)]
    sample = t2i.prompt_sampler(prompts, teacher, (4, 8, 8), torch.device("cpu"))
    z1, c1 = sample(6, rng.BatchRandom(11))
    parts = [sample(3, rng.BatchRandom(11, r, 2)) for r in range(2)]
    assert torch.equal(z1, torch.cat([p[0] for p in parts]))
    assert torch.equal(c1, torch.cat([p[1] for p in parts]))
    # cond rows are the text encoder's embeddings of the prompts drawn after the latents
    g = torch.Generator().manual_seed(11)
    assert torch.equal(z1, torch.randn(6, 4, 8, 8, generator=g))
    idx = torch.randint(7, (6,), generator=g).tolist()
    assert torch.equal(c1, teacher.encode_prompts([prompts[i] for i in idx]))


def test_gradient_checkpointing_keeps_gradients(teacher):
    """The generator's gradient with activation checkpointing equals the plain one."""
    grads = []
    for ckpt in (False, True):
        cfg = t2i.T2IConfig(teacher="x", prompts="p", grad_checkpointing=ckpt)
        torch.manual_seed(0)
        model = t2i.build_t2i_distill(cfg, teacher)
        cond = teacher.encode_prompts(["a cat", "a dog"])
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        loss, _ = model.generator_loss(z, cond, torch.Generator().manual_seed(2))
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.generator.parameters()]))
        for net in (model.generator.denoiser, model.fake_score, model.teacher):
            net.unet.disable_gradient_checkpointing()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- end to end
def _distill(sd, files, out, steps: int, *extra: str) -> None:
    args = ["distill", "--teacher", str(sd), "--prompts", str(files["prompts"])]
    args += ["--out", str(out), "--steps", str(steps), "--preset", "t2i", "--batch", "2"]
    args += ["--critic-ratio", "2", "--no-progress", "--seed", "4", "--device", "cpu"]
    args += ["--latent-cache", str(files["root"] / "cache")]
    assert main([*args, *extra]) == 0


def _same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_distill_resumes_samples_and_exports(sd, files, tmp_path, capsys):
    data = ["--data", str(files["data"]), "--resolution", "64"]
    _distill(sd, files, tmp_path / "straight", 3, *data, "--grid-every", "2")
    _distill(sd, files, tmp_path / "split", 1, *data, "--grid-every", "0")
    _distill(sd, files, tmp_path / "split", 3, *data, "--grid-every", "0", "--resume")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    _same(a["state"], b["state"], "state")
    _same(a["rng"], b["rng"], "rng")
    assert (tmp_path / "straight" / "grids" / "0000003.png").is_file()
    cfg = a["config"]
    assert cfg["t2i"]["pipeline"] == str(sd.resolve()) and cfg["disc_taps"] == ["mid"]
    assert cfg["t2i"]["latent_cache"] == b["config"]["t2i"]["latent_cache"]
    assert a["state"]["head"] and cfg["options"]["loss"]["gan_weight"] == 1e-3
    init = load_teacher(sd).state_dict()
    moved = {k.removeprefix("denoiser."): v for k, v in a["state"]["generator"].items()}
    assert any(not torch.equal(moved[k], v) for k, v in init.items())
    # A resume with another prompt list is refused.
    other = tmp_path / "other.txt"
    other.write_text("something else\n")
    args = ["distill", "--teacher", str(sd), "--prompts", str(other), *data, "--resume"]
    args += ["--out", str(tmp_path / "split"), "--steps", "4", "--preset", "t2i", "--batch", "2"]
    args += ["--critic-ratio", "2", "--seed", "4", "--no-progress", "--device", "cpu"]
    args += ["--latent-cache", str(files["root"] / "cache")]
    assert main(args) == 2
    assert "prompts" in capsys.readouterr().err

    # Sampling: a sample depends on its seed and prompt, not on the batch.
    from fdistill.pipeline import load_run

    run = load_run(tmp_path / "straight")
    one = t2i.sample_images(run, ["a red bus"] * 3, seed=5, batch=1)
    three = t2i.sample_images(run, ["a red bus"] * 3, seed=5, batch=3)
    assert one.shape == (3, 3, 64, 64) and not torch.equal(one[0], one[1])
    torch.testing.assert_close(one, three, rtol=0, atol=1e-5)
    out = tmp_path / "imgs"
    argv = ["sample", "--ckpt", str(tmp_path / "straight"), "--prompts", str(files["prompts"])]
    assert main([*argv, "--n", "2", "--out", str(out), "--batch", "2"]) == 0
    recs = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in recs] == ["a photo of a cat", "a dog on a bus"]
    assert (out / "grid.png").is_file() and (out / "000001.png").is_file()

    # Export: plain diffusers loads the UNet and makes the same image in one step.
    exp = tmp_path / "unet"
    assert main(["export", str(tmp_path / "straight"), "--out", str(exp)]) == 0
    assert main(["inspect", str(exp)]) == 0
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(exp)
    pipe = StableDiffusionPipeline.from_pretrained(sd, unet=unet, safety_checker=None)
    with torch.no_grad():
        emb = pipe.encode_prompt(["a red bus"], "cpu", 1, False)[0]
        abar = pipe.scheduler.alphas_cumprod[-1].double()
        sigma = ((1 - abar) / abar).sqrt()
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()
        eps = unet((z * (1 - abar).sqrt()).float(), 999, encoder_hidden_states=emb).sample
        x0 = (sigma * (z - eps.double())).float()
        img = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    ours = t2i.sample_images(run, ["a red bus"], seed=0)
    torch.testing.assert_close(img, ours, rtol=0, atol=1e-4)
    again = t2i.sample_images(load_run(exp), ["a red bus"], seed=0)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_without_data_trains_distribution_matching_alone(sd, files, tmp_path, capsys):
    _distill(sd, files, tmp_path / "dm", 2, "--grid-every", "0", "--divergence", "fkl")
    assert "distribution-matching loss alone" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "dm")
    assert ckpt["state"]["head"] == {} and ckpt["config"]["data"] is None
    assert ckpt["config"]["options"]["loss"]["gan_weight"] == 0.0
    rec = json.loads((tmp_path / "dm" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_disc" not in rec and "loss_gan" not in rec and rec["h_cv"] == 0.0


def test_t2i_option_errors(sd, files, tmp_path, capsys):
    base = ["distill", "--teacher", str(sd), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base) == 2
    assert "--prompts is needed" in capsys.readouterr().err
    args = [*base, "--prompts", str(files["prompts"]), "--resolution", "40"]
    assert main(args) == 2
    assert "--resolution must be a multiple of 16" in capsys.readouterr().err
    ddpm = FIXTURE.parent / "ddpm_tiny_eps"
    args = ["distill", "--teacher", str(ddpm), "--prompts", str(files["prompts"])]
    assert main([*args, "--out", str(tmp_path / "r2"), "--data", str(files["data"])]) == 2
    assert "is not text-conditioned" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(sd), "--n", "2", "--grid", str(tmp_path / "g.png")]) == 2
    assert "--prompt" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLIP score
def _hand_scores(path: Path, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosine of projected CLIP embeddings, pooled and projected by hand in float64."""
    model = transformers.CLIPModel.from_pretrained(path).double().eval()
    tok = transformers.CLIPTokenizer.from_pretrained(path)
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model.text_model(input_ids=ids.input_ids).last_hidden_state
        eos = (ids.input_ids == 999).int().argmax(1)
        t = h[torch.arange(len(texts)), eos] @ model.text_projection.weight.T
        v = model.vision_model(pixel_values=pixels.double()).last_hidden_state[:, 0]
        ln = model.vision_model.post_layernorm
        v = (v - v.mean(-1, keepdim=True)) / (
            v.var(-1, unbiased=False, keepdim=True) + ln.eps
        ).sqrt()
        v = (v * ln.weight + ln.bias) @ model.visual_projection.weight.T
    return (t * v).sum(-1) / (t.norm(dim=-1) * v.norm(dim=-1))


def test_clip_score_matches_hand_computation(tiny_clip):
    from fdistill.metrics.clip import CLIPScorer, clip_score

    g = np.random.default_rng(3)
    u8 = torch.from_numpy(g.integers(0, 256, (3, 3, 32, 32), np.uint8))
    images = u8.double() / 127.5 - 1  # exactly the 8-bit pixels
    texts = ["a photo of a cat", "a dog", "an apple on a table"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).double()[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).double()[:, None, None]
    pixels = (u8.double() / 255 - mean) / std  # at the crop size: no resize
    expect = _hand_scores(tiny_clip, pixels, texts)
    scorer = CLIPScorer(tiny_clip)
    got = scorer.score(images.float(), texts).double()
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    assert clip_score(images.float(), texts, scorer, batch=2) == pytest.approx(
        float(expect.mean()), abs=1e-5
    )
    assert expect.std() > 1e-3  # the pairs differ: a wrong pairing would show
    # Larger, non-square images: the resize and crop of transformers' own PIL processor.
    big = torch.from_numpy(g.integers(0, 256, (2, 3, 40, 56), np.uint8))
    proc = transformers.CLIPImageProcessorPil.from_pretrained(tiny_clip)
    ref_px = proc(images=[im.permute(1, 2, 0).numpy() for im in big], return_tensors="pt")
    torch.testing.assert_close(
        scorer.preprocess(big.float() / 127.5 - 1), ref_px.pixel_values, rtol=0, atol=1e-5
    )


@pytest.mark.slow
def test_eval_cli_clip_and_fid_on_generated_images(sd, files, tiny_clip, tmp_path):
    from fdistill.metrics.inception import find_inception

    run = tmp_path / "run"
    _distill(sd, files, run, 1, "--grid-every", "0")
    out = tmp_path / "m.json"
    args = ["eval", "--ckpt", str(run), "--captions", str(files["data"] / "captions.jsonl")]
    args += ["--clip", str(tiny_clip), "--n", "4", "--out", str(out), "--batch", "3"]
    try:
        find_inception()
        args += ["--ref", str(files["data"])]
    except FileNotFoundError:
        pass
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["source"]["kind"] == "student" and res["resolution"] == 64
    # the same images written by `sample --prompts`, scored as a captioned folder
    imgs = tmp_path / "imgs"
    argv = ["sample", "--ckpt", str(run), "--prompts", str(files["data"] / "captions.jsonl")]
    assert main([*argv, "--n", "4", "--out", str(imgs)]) == 0
    det = ChannelMeans()
    res2 = t2i.evaluate_t2i(imgs, clip=tiny_clip, ref=files["data"], inception=det, batch=3)
    m = res2["metrics"]
    assert m["clip_score"] == pytest.approx(res["metrics"]["clip_score"], abs=1e-4)
    if "fid" in res["metrics"]:
        assert np.isfinite(res["metrics"]["fid"]) and res["num_reference"] == 4
    # FID by hand: features of the PNGs as read back, and of the reference images.
    from fdistill.data.loading import decode_image
    from fdistill.metrics.fid import frechet_distance

    fake = torch.stack([torch.from_numpy(decode_image(imgs / f"{i:06d}.png")) for i in range(4)])
    data = t2i.read_captioned(files["data"])
    real = torch.stack([t2i.load_image(data.root / f, 64) for f in data.files])
    want = frechet_distance(det(fake).numpy(), det(real).numpy())
    assert m["fid"] == pytest.approx(want, rel=1e-6) and want > 0
    assert res2["num_reference"] == 4 and res2["source"]["kind"] == "images"


class ChannelMeans(torch.nn.Module):
    """Inception stand-in: the mean of each colour channel of the 8-bit image (3 features)."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u8 = torch.floor((images.double() + 1) * 127.5 + 0.5).clamp(0, 255)
        return u8.mean((2, 3))


def _benchmark(name: str):
    """``benchmarks/<name>.py`` as a module."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_gpu_benchmark_script_runs_tiny_on_cpu(engine_updates, capsys):
    """benchmarks/sd_gpu_bench.py is meant for a GPU; --tiny checks it end to end on a CPU.
    Every update it times is the engine's own (``Engine.update``, counted) of the f-distill
    method ``distill`` builds."""
    bench = _benchmark("sd_gpu_bench")
    calls = engine_updates
    args = ["--tiny", "--batch", "2", "--reps", "1", "--settings", "bf16,bf16+ckpt,fp32+ckpt"]
    bench.main(args)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| bf16")]
    assert len(rows) == 2 and "OOM" not in out
    assert "one-step sampling, batch 2" in out
    # Per setting: a warm-up critic and generator update, then --reps of each.
    assert calls == {("FDistill", "critic"): 3 * 2, ("FDistill", "generator"): 3 * 2}


@pytest.mark.slow
def test_sd_cost_script_runs_tiny(engine_updates, monkeypatch, tmp_path, capsys):
    """benchmarks/sd_cost.py --tiny, its phases in this process: every update it times is the
    engine's own (``Engine.update``, counted), and it writes its table."""
    bench = _benchmark("sd_cost")
    calls = engine_updates
    monkeypatch.setattr(bench, "run_phase", lambda name, args: bench.PHASES[name](args))
    threads = torch.get_num_threads()
    out = tmp_path / "sd_cost.md"
    try:
        bench.main(["--tiny", "--latent", "8", "--rounds", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    # A warm-up and one timed round of: the critic update with R1 and without, the generator.
    assert calls == {("FDistill", "critic"): 2 * 2, ("FDistill", "generator"): 2}
    text = out.read_text()
    for row in (
        "| **teacher denoising step**",
        "| critic update (fwd",
        "| critic update without R1",
        "| generator update (fwd",
        "| **distillation update**",
        "| AdamW step",
    ):
        assert row in text, row
    assert "| critic update (fwd" in capsys.readouterr().out  # printed as it goes


def test_t2i_sampling_refuses_torchrun(sd, monkeypatch, tmp_path, capsys):
    """Under torchrun every rank would write the same files: one line, exit 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["sample", "--ckpt", str(sd), "--prompt", "a cat", "--grid", str(tmp_path / "g.png")]
    assert main(args) == 2
    assert "without torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_protocol_dmd2_end_to_end(sd, files, tiny_clip, tmp_path):
    """--protocol dmd2: captions drawn with the fixed seed and written beside the results, the
    protocol recorded, images scored at 256 with the prefix, FID against the reference."""
    run = tmp_path / "run"
    _distill(sd, files, run, 1, "--grid-every", "0")
    coco = tmp_path / "captions_val.json"
    anns = [{"image_id": i // 2, "caption": f"caption {i}"} for i in range(10)]
    coco.write_text(json.dumps({"annotations": anns}))
    out = tmp_path / "res"
    res = t2i.evaluate_t2i(
        run, captions=coco, ref=files["data"], clip=tiny_clip, inception=ChannelMeans(),
        n=3, batch=2, protocol="dmd2", out_dir=out,
    )  # fmt: skip
    assert res["protocol"] == "dmd2" and res["n"] == 3 and res["resolution"] == 256
    drawn = [json.loads(x) for x in (out / "captions_drawn.jsonl").read_text().splitlines()]
    assert len(drawn) == 3 and len({d["image_id"] for d in drawn}) == 3  # one per image
    rng = np.random.default_rng(0)  # the documented draw: choice of images, then a caption
    order = rng.choice(5, size=3, replace=False)
    picks = [int(rng.integers(2)) for _ in order]
    want = [f"caption {2 * i + k}" for i, k in zip(order, picks, strict=True)]
    assert [d["caption"] for d in drawn] == want
    m = res["metrics"]
    assert np.isfinite(m["fid"]) and m["num_reference"] == 4 and -1 <= m["clip_score"] <= 1
    assert res["protocol_settings"]["clip_prefix"] == "A photo depicts "


@pytest.mark.slow
def test_gpu_benchmark_run_mode_tiny_on_cpu(sd, files, tiny_clip, tmp_path):
    """sd_gpu_bench.py --run: distil a pipeline for some minutes, resume exactly to the steps
    that fit, evaluate with --protocol dmd2 (the tiny fixtures, on the CPU)."""
    bench = _benchmark("sd_gpu_bench")
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": i, "caption": c}
                                                for i, c in enumerate(CAPTIONS)]}))  # fmt: skip
    out = tmp_path / "run"
    args = ["--run", str(sd), "--prompts", str(files["prompts"]), "--data", str(files["data"])]
    args += ["--minutes", "0.02", "--captions", str(coco), "--clip", str(tiny_clip)]
    args += ["--n-eval", "2", "--batch", "2", "--critic-ratio", "2", "--device", "cpu"]
    args += ["--out", str(out), "--latent-cache", str(files["root"] / "cache")]
    res = bench.run_mode(bench.parse_args(args))
    assert res["protocol"] == "dmd2" and res["n"] == 2 and "clip_score" in res["metrics"]
    assert (out / "captions_drawn.jsonl").is_file() and (out / "eval_dmd2.json").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["steps"] >= 3
