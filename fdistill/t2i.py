"""Text-to-image f-distill: a one-step student of a Stable Diffusion pipeline.

The method is the class-conditional one (:mod:`fdistill.distill`, :func:`train_distill`, the
run folder of :mod:`fdistill.runs`) on VAE latents, with text embeddings as ``cond``:

* prompts (``--prompts``): a text file (one prompt a line), a JSONL with a ``caption`` or
  ``text`` field, or a COCO ``captions_*.json``; the latent sampler draws one prompt per
  sample from the rank-independent random streams and encodes the batch with the frozen text
  encoder (cheap next to the UNet passes each sample sees, so nothing is cached);
* captioned images (``--data``): a folder with ``captions.jsonl`` of ``{"file", "caption"}``,
  or a COCO ``captions_*.json`` with its image folder; the images are encoded to latents once
  and cached on disk under a key made of the VAE's weights, the resolution and the file list;
  the real sampler returns ``(latents, caption embeddings)`` for the discriminator. Without
  ``--data`` there is no density ratio: the run trains the distribution-matching loss alone
  (no GAN term, no discriminator) and says so;
* sampling decodes with the pipeline's VAE; a run records where its pipeline lives, and
  ``export`` writes the student UNet as a diffusers ``UNet2DConditionModel`` folder;
* evaluation: CLIP score (:mod:`fdistill.metrics.clip`) and zero-shot Inception FID of images
  generated from captions against the captioned set's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill import rng, runs
from fdistill.data.loading import IMAGE_EXTENSIONS, decode_image
from fdistill.distill import FDistill
from fdistill.divergences import get_divergence
from fdistill.images import save_image_grid, to_uint8
from fdistill.pipeline import (
    DistillConfig,
    LoadedRun,
    RunResult,
    _begin,
    _resume_options,
    _with_resumable,
    build_distill,
    load_run,
    run_sampler,
    sample_seeds,
    state_digest,
    validate_distill_config,
)
from fdistill.samplers import seeded_randn
from fdistill.teachers import load_teacher
from fdistill.training import EMA, Dist, distributed, make_batch_randoms, train_distill

CAPTIONS_JSONL = "captions.jsonl"
PROMPT_FIELDS = ("caption", "text")
EXPORT_META = "fdistill_t2i.json"
EXPORT_FORMAT = "fdistill-t2i-unet"
T2I_METRICS = ("fid", "clip")
_PROMPT_FORMATS = (
    "a text file (one prompt a line), a .jsonl with a 'caption' or 'text' field, or a COCO "
    "captions_*.json"
)
_DATA_FORMATS = (
    f"a folder with {CAPTIONS_JSONL} ({{'file', 'caption'}} per line) or a COCO "
    "captions_*.json beside its image folder"
)


# --------------------------------------------------------------------------- prompts
def _caption_of(record: Any, where: str) -> str:
    if isinstance(record, dict):
        for key in PROMPT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{where}: expected a JSON object with a 'caption' or 'text' string")


def _coco(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO captions file with an 'annotations' list")
    return d


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file (one a line, blank lines skipped), a JSONL (``caption`` or
    ``text`` field; also a captioned set's ``captions.jsonl``) or a COCO ``captions_*.json``."""
    p = Path(path)
    if p.is_dir() and (p / CAPTIONS_JSONL).is_file():
        p = p / CAPTIONS_JSONL
    if not p.is_file():
        raise FileNotFoundError(f"--prompts: no such file '{path}'; pass {_PROMPT_FORMATS}")
    if p.suffix.lower() == ".json":
        d = _coco(p)
        prompts = [_caption_of(a, f"{p}: annotation {i}") for i, a in enumerate(d["annotations"])]
    else:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e})") from None
        first = next((s.strip() for s in lines if s.strip()), "")
        if p.suffix.lower() == ".jsonl" or first.startswith("{"):
            prompts = []
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p} line {i} is not JSON ({e.msg})") from None
                prompts.append(_caption_of(rec, f"{p} line {i}"))
        else:
            prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        raise ValueError(f"{p} holds no prompts; pass {_PROMPT_FORMATS}")
    return prompts


# --------------------------------------------------------------------------- captioned images
@dataclass(frozen=True)
class CaptionedData:
    """Images with captions: ``files`` (unique, relative to ``root``) and, per caption, the
    index of its image in ``files`` (COCO has about five captions per image)."""

    source: str
    root: Path
    files: tuple[str, ...]
    image_of: tuple[int, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)


def _from_jsonl(folder: Path) -> list[tuple[str, str]]:
    path = folder / CAPTIONS_JSONL
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            raise ValueError(f"{path} line {i}: expected {{'file': ..., 'caption': ...}}")
        if not (folder / rec["file"]).is_file():
            raise FileNotFoundError(f"{path} line {i}: no image '{folder / rec['file']}'")
        pairs.append((rec["file"], _caption_of(rec, f"{path} line {i}")))
    return pairs


def _coco_images(path: Path, d: dict) -> tuple[Path, list[tuple[str, str]]]:
    names = {img.get("id"): img.get("file_name") for img in d.get("images", [])}
    pairs = []
    for i, a in enumerate(d["annotations"]):
        name = names.get(a.get("image_id"))
        if not isinstance(name, str):
            raise ValueError(
                f"{path}: annotation {i} names image_id {a.get('image_id')!r}, "
                "which is not in 'images'"
            )
        pairs.append((name, _caption_of(a, f"{path}: annotation {i}")))
    if not pairs:
        raise ValueError(f"{path} holds no captions")
    split = path.stem.removeprefix("captions_")
    here, up = path.parent, path.parent.parent
    for root in (here / split, up / split, here, up):
        if (root / pairs[0][0]).is_file():
            return root, pairs
    raise FileNotFoundError(
        f"{path}: image folder not found; put the images in '{split}/' beside the JSON or "
        "beside its folder (COCO's layout: annotations/ and train2017/ side by side)"
    )


def read_captioned(spec: str | Path, max_images: int | None = None) -> CaptionedData:
    """Captioned images from ``spec`` (see the module docstring); ``max_images`` keeps the first
    N images (sorted by name) with all their captions."""
    p = Path(spec)
    if p.is_dir() and (p / CAPTIONS_JSONL).is_file():
        root, pairs = p, _from_jsonl(p)
    else:
        if p.is_dir():
            found = sorted([*p.glob("captions_*.json"), *p.glob("annotations/captions_*.json")])
            if len(found) != 1:
                what = "several" if found else "no"
                raise ValueError(
                    f"--data {spec}: {what} captions_*.json found; pass {_DATA_FORMATS}"
                )
            p = found[0]
        if not p.is_file() or p.suffix.lower() != ".json":
            raise FileNotFoundError(f"--data: '{spec}' is not {_DATA_FORMATS}")
        root, pairs = _coco_images(p, _coco(p))
    files = sorted({f for f, _ in pairs})
    if max_images is not None:
        files = files[:max_images]
    index = {f: i for i, f in enumerate(files)}
    kept = [(index[f], c) for f, c in pairs if f in index]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--data {spec}: image '{root / missing[0]}' does not exist")
    return CaptionedData(
        str(spec), root, tuple(files), tuple(i for i, _ in kept), tuple(c for _, c in kept)
    )


def load_image(path: str | Path, resolution: int) -> Tensor:
    """One image as float ``[3, R, R]`` in [-1, 1]: centre crop to a square, bicubic resize
    (antialiased), grey replicated to RGB."""
    x = torch.from_numpy(decode_image(path))
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    h, w = x.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top : top + s, left : left + s]
    if s != resolution:
        x = F.interpolate(
            x[None], (resolution, resolution), mode="bicubic", antialias=True, align_corners=False
        )[0]
    return x.clamp(-1, 1).contiguous()


# --------------------------------------------------------------------------- latent cache
class LatentCache(NamedTuple):
    """Latents of a captioned set's images (float16, ``[len(files), 4, r, r]``, CPU)."""

    latents: Tensor
    path: Path
    key: str
    reused: bool


def default_cache_dir() -> Path:
    """Where latents are cached by default: ``$FDISTILL_CACHE/latents``, else
    ``fdistill/latents`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""

    base = os.environ.get("FDISTILL_CACHE")
    if base:
        return Path(base) / "latents"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fdistill" / "latents"


def latent_cache_key(data: CaptionedData, resolution: int, vae_digest: str) -> str:
    """What the cached latents depend on: the VAE's weights, the resolution and the image files
    (names, sizes, modification times)."""
    files = []
    for f in data.files:
        st = (data.root / f).stat()
        files.append([f, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": 1, "vae": vae_digest, "resolution": resolution, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_latents(
    data: CaptionedData,
    teacher: nn.Module,
    resolution: int,
    cache_dir: str | Path | None = None,
    *,
    batch: int = 8,
    progress: bool = True,
    key: str | None = None,
) -> LatentCache:
    """The latents of ``data``'s images at ``resolution``, from the cache or encoded once with
    ``teacher``'s VAE (posterior mean times ``scaling_factor``) and saved there atomically."""
    vae = teacher.components.vae
    key = key or latent_cache_key(data, resolution, state_digest(vae))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"latents-{key[:32]}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") == key:
                return LatentCache(saved["latents"], path, key, True)
        except (RuntimeError, OSError, ValueError, EOFError):
            pass  # unreadable: encode again
    from tqdm.auto import tqdm

    out = []
    chunks = range(0, len(data.files), batch)
    bar = tqdm(chunks, desc=f"encoding {len(data.files)} images", disable=not progress)
    for i in bar:
        imgs = torch.stack(
            [load_image(data.root / f, resolution) for f in data.files[i : i + batch]]
        )
        out.append(teacher.encode_images(imgs).float().cpu().half())
    latents = torch.cat(out)
    folder.mkdir(parents=True, exist_ok=True)
    runs.atomic_save(
        {"key": key, "resolution": resolution, "files": list(data.files), "latents": latents}, path
    )
    return LatentCache(latents, path, key, False)


# --------------------------------------------------------------------------- distillation
@dataclass
class T2IConfig(DistillConfig):
    """A text-to-image distillation: :class:`DistillConfig` plus the prompts, the latent cache
    folder (None: :func:`default_cache_dir`), activation checkpointing of the three UNets and
    the VAE encoding batch. ``data`` is the captioned set (None: no GAN term), ``resolution``
    the image side (default: the pipeline's own)."""

    prompts: str | None = None
    latent_cache: str | None = None
    grad_checkpointing: bool = False
    encode_batch: int = 8
    grid_n: int = 16


class ConstantLogit(nn.Module):
    """A head that reads no features and returns logit 0 (``r = 1``): without real data there
    is no density ratio, so every divergence's weight ``h`` is constant."""

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return feats[0].new_zeros(feats[0].shape[0], dtype=torch.float32)


class DistributionMatchingOnly(FDistill):
    """f-distill without real data: the critic step trains the fake score alone (no
    discriminator, nothing read from ``x_real``); the generator loss is the distribution-
    matching term with ``h = 1`` after normalisation (reverse KL, i.e. DMD)."""

    def critic_loss(self, z, cond, x_real=None, cond_real=None, generator=None):
        with torch.no_grad():
            x_fake = self.generator(z, cond)
        n = x_fake.shape[0]
        sigma = self.sample_sigma(n, generator).to(x_fake.dtype)
        xf_t = self._noise(x_fake, sigma, generator)
        err = (self.fake_score(xf_t, sigma, cond) - x_fake).float().pow(2).reshape(n, -1).mean(1)
        dsm = self.fake_score_weight(sigma.float()) * err
        return dsm.mean(), {"loss_dsm": float(dsm.detach().mean())}


def is_text_teacher(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers folder with a text-conditioned ``UNet2DConditionModel``
    (read from its config, nothing loaded)."""
    from fdistill.teachers.diffusers_unet import resolve

    try:
        _, unet_cfg, _ = resolve(Path(path))
    except (ValueError, OSError):
        return False
    return unet_cfg.get("_class_name") == "UNet2DConditionModel"


def vae_factor(teacher: nn.Module) -> int:
    """How many image pixels one latent pixel spans (8 for Stable Diffusion)."""
    return 2 ** (len(teacher.components.vae.config.block_out_channels) - 1)


def latent_resolution(teacher: nn.Module, resolution: int | None) -> tuple[int, int]:
    """``(image side, latent side)`` for ``--resolution`` (None: the pipeline's own size)."""
    f = vae_factor(teacher)
    native = teacher.info.shape[1] * f
    res = native if resolution is None else resolution
    down = 2 ** (len(teacher.unet.config.block_out_channels) - 1)
    if res % (f * down):
        raise ValueError(
            f"--resolution must be a multiple of {f * down} for this pipeline (VAE factor {f}, "
            f"UNet downsampling {down}), got {res}; its own resolution is {native}"
        )
    return res, res // f


def _set_latent_size(teacher: nn.Module, size: int) -> None:
    # The feature taps read their map sizes from sample_size: train at another resolution by
    # saying so in the config the student, fake score and exports are rebuilt from.
    if teacher.unet.config.sample_size != size:
        teacher.unet.register_to_config(sample_size=size)
        teacher.config["unet"]["sample_size"] = size


def validate_t2i_config(cfg: T2IConfig, world: int = 1) -> None:
    """:func:`validate_distill_config` plus the text-to-image options (one line each)."""
    validate_distill_config(cfg, world)
    if not cfg.prompts:
        raise ValueError(f"--prompts is needed for a text-to-image teacher: {_PROMPT_FORMATS}")
    if cfg.value_range is not None:
        raise ValueError("--range does not apply to a text-to-image run (images are read as files)")
    if not cfg.teacher_ema:
        raise ValueError(
            "--raw-teacher applies to fdistill teacher runs, not to a diffusers pipeline"
        )
    if not isinstance(cfg.encode_batch, int) or cfg.encode_batch < 1:
        raise ValueError(f"encode_batch must be an integer >= 1, got {cfg.encode_batch!r}")


def r1_attention_processor():
    """An attention processor whose passes with gradients use PyTorch's math attention, the
    only kernel with a double backward (R1 differentiates the discriminator's gradient);
    passes without gradients keep the fused kernels."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class MathWhenGrad(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            if torch.is_grad_enabled():
                with sdpa_kernel(SDPBackend.MATH):
                    return super().__call__(*args, **kwargs)
            return super().__call__(*args, **kwargs)

    return MathWhenGrad()


def build_t2i_distill(cfg: T2IConfig, teacher: nn.Module, discriminator: bool = True) -> FDistill:
    """:func:`fdistill.pipeline.build_distill` for a Stable Diffusion teacher; without a
    ``discriminator`` the distribution-matching loss alone (:class:`DistributionMatchingOnly`).
    ``cfg.grad_checkpointing`` turns on diffusers' activation checkpointing in all three UNets
    (the teacher's matters for the GAN and R1 terms, which backpropagate through its encoder).
    With R1 the feature network's attention runs PyTorch's math kernel when gradients are on:
    the fused kernels have no double backward."""
    model = build_distill(cfg, teacher)
    if not discriminator:
        params = {"alpha": cfg.alpha} if cfg.alpha is not None else {}
        model = DistributionMatchingOnly(
            model.teacher,
            model.generator,
            model.fake_score,
            ConstantLogit(),
            get_divergence(cfg.divergence, **params),
            model.cfg,
        )
    if discriminator and cfg.loss.r1_gamma > 0:
        features = model.teacher if cfg.loss.disc_features == "teacher" else model.fake_score
        features.unet.set_attn_processor(r1_attention_processor())
    if cfg.grad_checkpointing:
        for net in (model.generator.denoiser, model.fake_score, model.teacher):
            net.unet.enable_gradient_checkpointing()
    return model


Sampler = Callable[[int, rng.RandomSource], tuple[Tensor | None, Tensor | None]]


def prompt_sampler(
    prompts: Sequence[str], teacher: nn.Module, shape: tuple[int, ...], device: torch.device
) -> Sampler:
    """``sample(n, gen) -> (z, text embeddings)``: a uniform prompt and a unit-normal latent per
    sample from ``gen`` (rank-independent streams: a draw depends on the seed, not the split)."""

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Tensor]:
        idx = rng.randint(len(prompts), (n,), gen).tolist()
        z = rng.randn((n, *shape), gen, device=device)
        return z, teacher.encode_prompts([prompts[i] for i in idx])

    return sample


def captioned_sampler(
    latents: Tensor, data: CaptionedData, teacher: nn.Module, device: torch.device
) -> Sampler:
    """``sample(n, gen) -> (latents, caption embeddings)``: uniform (image, caption) pairs."""
    image_of = torch.tensor(data.image_of)

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Tensor]:
        idx = rng.randint(len(data), (n,), gen).cpu()
        x = latents[image_of[idx]].to(device, torch.float32)
        return x, teacher.encode_prompts([data.captions[i] for i in idx.tolist()])

    return sample


def _no_real(n: int, gen: rng.RandomSource) -> tuple[None, None]:
    return None, None


def _grid_writer(
    out: Path | None,
    every: int,
    total: int,
    ddp: Dist,
    teacher: nn.Module,
    shape: tuple[int, ...],
    prompts: Sequence[str],
    n: int,
) -> Callable[[int, EMA], None]:
    """Training callback: decoded EMA samples of the first prompts (fixed seeds) every ``every``
    steps; draws nothing from the training streams."""
    seeds = sample_seeds(0, n)
    grid_prompts = [prompts[i % len(prompts)] for i in range(n)]
    cache: list[Tensor] = []

    def on_step(done: int, ema: EMA) -> None:
        if out is None or not ddp.main or every <= 0 or (done % every and done != total):
            return
        with torch.no_grad():
            if not cache:
                cache.append(teacher.encode_prompts(grid_prompts))
            x = ema.module(seeded_randn(seeds, shape, device=ddp.device), cache[0])
            images = teacher.decode_latents(x).float().clamp(-1, 1)
        save_image_grid(images, out / "grids" / f"{done:07d}.png", padding=1)

    return on_step


def _text_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def distill_t2i_run(
    cfg: T2IConfig, out: str | Path, resume: bool = False, start_fresh: bool = False
) -> RunResult:
    """Distil a Stable Diffusion pipeline folder (``cfg.teacher``) into a one-step
    text-to-image student; writes a run to ``out``. Options are validated before any work and
    ``resume`` is strict, as in :func:`fdistill.pipeline.distill_run`."""
    out = Path(out)
    with distributed(cfg.device) as ddp:
        validate_t2i_config(cfg, ddp.world)
        prompts = read_prompts(cfg.prompts)
        teacher = load_teacher(cfg.teacher)
        info = teacher.info
        if info.details.get("conditioning") != "text":
            raise ValueError(
                f"--prompts: the teacher '{cfg.teacher}' is not text-conditioned; accepted: a "
                "Stable Diffusion (v1/v2-style) pipeline folder"
            )
        res, size = latent_resolution(teacher, cfg.resolution)
        _set_latent_size(teacher, size)
        shape = (int(info.shape[0]), size, size)
        data = read_captioned(cfg.data, cfg.max_images) if cfg.data else None
        if data is None:
            cfg = replace(cfg, loss=replace(cfg.loss, gan_weight=0.0, r1_gamma=0.0))
        teacher.to(ddp.device)
        parts = teacher.components
        digests = {
            "teacher": state_digest(teacher),
            "text_encoder": state_digest(parts.text_encoder),
            "prompts": _text_digest(prompts),
        }
        key = None
        if data is not None:
            key = latent_cache_key(data, res, state_digest(parts.vae))
            digests["data"] = hashlib.sha256(
                (key + _text_digest(data.captions)).encode()
            ).hexdigest()
        options = _begin(out, resume, start_fresh, _resume_options(asdict(cfg), **digests), ddp)
        cfg = _with_resumable(cfg, options)
        if ddp.main and data is None:
            print(
                "note: no --data: training the distribution-matching loss alone (GAN weight 0, "
                "no discriminator); without a density ratio h is constant, so every "
                "--divergence reduces to reverse KL (DMD). Pass captioned images with --data "
                "for f-distill proper."
            )
        cache = None
        if data is not None:
            cache = _shared_latents(data, teacher, res, cfg, key, ddp)
        torch.manual_seed(cfg.train.seed)  # identical head initialisation on every rank
        model = build_t2i_distill(cfg, teacher, discriminator=data is not None).to(ddp.device)
        torch.manual_seed(cfg.train.seed * 1_000_003 + ddp.rank)
        pipeline_dir = Path(cfg.teacher).resolve()
        if pipeline_dir.name == "unet":
            pipeline_dir = pipeline_dir.parent
        feature_net = model.teacher if cfg.loss.disc_features == "teacher" else model.fake_score
        run_config = {
            "model": model.generator.denoiser.config,
            "shape": list(shape),
            "num_classes": 0,
            "sigma_init": info.sigma_max,
            "teacher": {
                "path": str(pipeline_dir),
                "family": info.family,
                "digest": digests["teacher"],
                "step": None,
                "options": {"data": cfg.data, "resolution": res, "max_images": cfg.max_images},
            },
            "data": (
                {"spec": str(cfg.data), "name": "captioned", "size": len(data)}
                if data is not None
                else None
            ),
            "t2i": {
                "pipeline": str(pipeline_dir),
                "resolution": res,
                "prompts": str(Path(cfg.prompts).resolve()),
                "num_prompts": len(prompts),
                "discriminator": data is not None,
                "latent_cache": str(cache.path) if cache is not None else None,
            },
            "disc_taps": list(feature_net.feature_taps) if data is not None else [],
            "options": asdict(cfg),
            "resume_options": options,
        }
        grids = _grid_writer(
            out, cfg.grid_every, cfg.train.steps, ddp, teacher, shape, prompts, cfg.grid_n
        )
        real = (
            captioned_sampler(cache.latents, data, teacher, ddp.device)
            if cache is not None
            else _no_real
        )
        t0 = time.perf_counter()
        ema = train_distill(
            model,
            real,
            prompt_sampler(prompts, teacher, shape, ddp.device),
            cfg.train,
            out,
            config=run_config,
            ddp=ddp,
            resume=resume,
            on_step=grids,
            gens=make_batch_randoms(cfg.train.seed, ddp),
        )
        return RunResult(out, cfg.train.steps, time.perf_counter() - t0, model, ema.module)


def _shared_latents(
    data: CaptionedData, teacher: nn.Module, res: int, cfg: T2IConfig, key: str, ddp: Dist
) -> LatentCache:
    """Rank 0 encodes (or finds) the latents; the other ranks then read its cache file."""
    kwargs = dict(batch=cfg.encode_batch, key=key)
    if ddp.world == 1:
        return encode_latents(
            data, teacher, res, cfg.latent_cache, progress=cfg.train.progress, **kwargs
        )
    import torch.distributed as dist

    if ddp.main:
        cache = encode_latents(
            data, teacher, res, cfg.latent_cache, progress=cfg.train.progress, **kwargs
        )
    dist.barrier()
    if not ddp.main:
        cache = encode_latents(data, teacher, res, cfg.latent_cache, progress=False, **kwargs)
    return cache


# --------------------------------------------------------------------------- sampling
def is_t2i(run: LoadedRun) -> bool:
    """Whether a loaded run, export or teacher is a text-to-image (Stable Diffusion) model."""
    return run.config.get("model", {}).get("type") == "sd-unet"


def with_pipeline(run: LoadedRun, pipeline: str | Path | None = None) -> nn.Module:
    """The run's Stable Diffusion denoiser, with the tokenizer, text encoder and VAE of the
    pipeline folder the run records (or ``pipeline``) attached on first use."""
    from fdistill.teachers.stable_diffusion import load_sd_components

    if not is_t2i(run):
        raise ValueError("--prompt/--prompts need a text-to-image run, export or pipeline")
    den = run.model.denoiser if run.kind == "distill" else run.model
    if den.components is None or pipeline is not None:
        path = pipeline or run.config.get("t2i", {}).get("pipeline") or ""
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"the Stable Diffusion pipeline '{path}' recorded by this run is not found; "
                "its tokenizer, text encoder and VAE are needed to sample"
            )
        den.components = load_sd_components(path)
    return den


@torch.no_grad()
def iter_images(
    run: LoadedRun,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    nfe: int | None = None,
    guidance: float = 1.0,
    batch: int = 16,
    device: str | torch.device = "cpu",
) -> Iterator[Tensor]:
    """Decoded images ``[b, 3, H, W]`` (float, about [-1, 1]), ``batch`` at a time: image ``i``
    from ``prompts[i]`` and the latent of ``seeds[i]``. A student takes one step; a teacher
    (a pipeline folder) Heun with ``nfe`` calls and classifier-free ``guidance``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    den = with_pipeline(run)
    fn = run_sampler(run, nfe, guidance)
    for i in range(0, len(prompts), batch):
        z = seeded_randn(seeds[i : i + batch], run.shape, device=device)
        x = fn(z, den.encode_prompts(prompts[i : i + batch]))
        yield den.decode_latents(x).float().cpu()


def sample_images(run: LoadedRun, prompts: Sequence[str], seed: int = 0, **kwargs) -> Tensor:
    """All images of :func:`iter_images` for ``prompts`` with the seeds of ``--seed``."""
    seeds = sample_seeds(seed, len(prompts))
    return torch.cat(list(iter_images(run, prompts, seeds, **kwargs)))


def save_png(image: Tensor, path: str | Path) -> None:
    """One ``[3, H, W]`` image in [-1, 1] as an 8-bit PNG, pixel for pixel."""
    PIL.Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).save(path)


def sample_to_files(
    run: LoadedRun,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    out: str | Path | None = None,
    grid: str | Path | None = None,
    grid_max: int = 64,
    **kwargs,
) -> dict:
    """Generate one image per prompt; write ``out/NNNNNN.png`` with ``out/captions.jsonl``
    (``file``, ``caption``, ``seed``: the folder is itself a captioned set) and a grid of the
    first ``grid_max`` (``grid``, or ``out/grid.png``). Returns counts and seconds."""
    if not prompts:
        raise ValueError("no prompts to sample")
    seeds = sample_seeds(seed, len(prompts))
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.glob("*.png")) or (folder / CAPTIONS_JSONL).exists():
            raise ValueError(f"--out {folder} already holds images; choose an empty folder")
    records, first, done, t0 = [], [], 0, time.perf_counter()
    for images in iter_images(run, prompts, seeds, **kwargs):
        for img in images:
            if folder is not None:
                name = f"{done:06d}.png"
                save_png(img, folder / name)
                records.append({"file": name, "caption": prompts[done], "seed": seeds[done]})
            if len(first) < grid_max:
                first.append(img)
            done += 1
    seconds = time.perf_counter() - t0
    if folder is not None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        runs.atomic_write_text(text, folder / CAPTIONS_JSONL)
    grid_path = grid or (folder / "grid.png" if folder is not None else None)
    if grid_path is not None:
        save_image_grid(torch.stack(first).clamp(-1, 1), grid_path)
    return {
        "n": done,
        "seconds": seconds,
        "out": str(folder) if folder else None,
        "grid": grid_path,
    }


# --------------------------------------------------------------------------- export
def is_unet_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / EXPORT_META).is_file() and (p / "config.json").is_file()


def export_unet(run: LoadedRun, out: str | Path, ema: bool = True) -> Path:
    """Write a text-to-image student's UNet with diffusers' ``save_pretrained`` (a
    ``UNet2DConditionModel`` folder) plus ``fdistill_t2i.json``: what :func:`load_run` needs to
    sample it (the one-step sigma and timestep, the pipeline folder)."""
    if run.kind != "distill" or not is_t2i(run):
        raise ValueError("export of a text-to-image run needs a distillation run of one")
    out = Path(out)
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds an export; choose another --out")
    den = run.model.denoiser
    den.unet.save_pretrained(out, safe_serialization=True)
    sigma = float(run.model.sigma_init)
    meta = {
        "format": EXPORT_FORMAT,
        "kind": "distill",
        "model": run.config["model"],
        "shape": list(run.shape),
        "num_classes": 0,
        "sigma_init": sigma,
        "timestep": float(den.schedule.timestep(torch.tensor([sigma]))[0]),
        "prediction_type": den.prediction_type,
        "t2i": run.config.get("t2i", {}),
        "teacher": run.config.get("teacher"),
        "step": run.step,
        "weights": "ema" if ema else "raw",
    }
    runs.atomic_write_text(json.dumps(meta, indent=2) + "\n", out / EXPORT_META)
    return out


def load_unet_export(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A student written by :func:`export_unet`, as :func:`fdistill.pipeline.load_run` returns."""
    from fdistill.generator import OneStepGenerator
    from fdistill.teachers.diffusers_unet import pretrained_unet, require_diffusers
    from fdistill.teachers.stable_diffusion import StableDiffusionTeacher

    p = Path(path)
    meta = json.loads((p / EXPORT_META).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{p / EXPORT_META} is not an fdistill text-to-image export")
    cfg = meta["model"]
    unet = pretrained_unet(require_diffusers().UNet2DConditionModel, p)
    den = StableDiffusionTeacher(
        unet, cfg["schedule"], cfg["prediction_type"], context=cfg["context"]
    )
    model = OneStepGenerator(den, sigma_init=meta["sigma_init"])
    model.requires_grad_(False).eval().to(device)
    return LoadedRun("distill", model, meta, int(meta.get("step", 0)))


# --------------------------------------------------------------------------- evaluation
def _image_files(folder: Path) -> list[str]:
    files = [
        q.relative_to(folder).as_posix()
        for q in folder.rglob("*")
        if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(f for f in files if not any(s.startswith(".") for s in f.split("/")))


def _reference_images(ref: str | Path) -> tuple[Path, list[str]]:
    p = Path(ref)
    try:
        data = read_captioned(p)
        return data.root, list(data.files)
    except (ValueError, FileNotFoundError):
        pass
    if not p.is_dir():
        raise FileNotFoundError(f"--ref: '{ref}' is not a folder of images or a captioned set")
    files = _image_files(p)
    if not files:
        raise ValueError(f"--ref: no images in '{ref}'")
    return p, files


def parse_t2i_metrics(text: str | Sequence[str] | None, clip: bool, ref: bool) -> tuple[str, ...]:
    """``--metrics`` of a text-to-image evaluation (default: those the given files allow)."""
    if text is None:
        names = [m for m, ok in (("fid", ref), ("clip", clip)) if ok]
        if not names:
            raise ValueError("nothing to measure: pass --clip DIR (CLIP score) and/or --ref (FID)")
        return tuple(names)
    from fdistill.evaluation import parse_metrics

    names = parse_metrics(text, T2I_METRICS)
    if "clip" in names and not clip:
        raise ValueError("--metrics clip needs --clip DIR (a local transformers CLIP folder)")
    if "fid" in names and not ref:
        raise ValueError("--metrics fid needs --ref (the captioned set's images)")
    return names


def evaluate_t2i(
    source: str | Path,
    *,
    captions: str | Path | None = None,
    ref: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    clip: str | Path | None = None,
    inception: str | Path | nn.Module | None = None,
    n: int | None = None,
    seed: int = 0,
    nfe: int | None = None,
    guidance: float = 1.0,
    batch: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """CLIP score and zero-shot FID of a text-to-image model or of captioned images.

    ``source``: a t2i run, export or pipeline folder (one image per caption of ``captions``,
    the first ``n``, seeds of ``seed``), or a folder with ``captions.jsonl`` (e.g. written by
    ``fdistill sample --prompts``). CLIP score: mean cosine similarity of CLIP image and text
    embeddings (``clip``: a local transformers CLIP folder). FID: Inception features of the
    images against those of ``ref``'s images at the same resolution (streamed, so 30k images
    never sit in memory at once); ``inception``: the detector file (None: the one
    :func:`fdistill.metrics.inception.find_inception` finds) or a features module with
    ``num_features``.
    """
    from fdistill.metrics.fid import StatsAccumulator, frechet_distance_from_stats
    from fdistill.metrics.inception import InceptionFeatures, find_inception

    names = parse_t2i_metrics(metrics, clip is not None, ref is not None)
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    src = Path(source)
    notes: list[str] = []
    run = None
    if (src / CAPTIONS_JSONL).is_file() and not (src / runs.CHECKPOINT).is_file():
        data = read_captioned(src)
        pairs = list(zip(data.image_of, data.captions, strict=True))[:n]
        kind, step, caps = "images", None, [c for _, c in pairs]

        side = min(decode_image(data.root / data.files[pairs[0][0]]).shape[1:])

        def batches() -> Iterator[Tensor]:
            for i in range(0, len(pairs), batch):
                files = [data.root / data.files[j] for j, _ in pairs[i : i + batch]]
                yield torch.stack([load_image(f, side) for f in files])
    else:
        if captions is None:
            raise ValueError("--captions is needed: the prompts to generate one image each from")
        run = load_run(src, device)
        if not is_t2i(run):
            raise ValueError(f"--ckpt {source} is not a text-to-image run, export or pipeline")
        caps = read_prompts(captions)
        if n is not None and n > len(caps):
            notes.append(f"only {len(caps)} captions: evaluated {len(caps)} images")
        caps = caps[:n]
        kind, step = ("student" if run.kind == "distill" else "teacher"), run.step
        seeds = sample_seeds(seed, len(caps))

        def batches() -> Iterator[Tensor]:
            yield from iter_images(
                run, caps, seeds, nfe=nfe, guidance=guidance, batch=batch, device=device
            )

    scorer = detector = acc = None
    if "clip" in names:
        from fdistill.metrics.clip import CLIPScorer

        scorer = CLIPScorer(clip, device=device)
    if "fid" in names:
        if isinstance(inception, nn.Module):
            detector = inception
        else:
            try:
                detector = InceptionFeatures(find_inception(inception)).to(device)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--inception: {e}") from e
        acc = StatsAccumulator(detector.num_features)
    cosines: list[Tensor] = []
    done, size, seconds, t0 = 0, None, 0.0, time.perf_counter()
    for images in batches():
        seconds += time.perf_counter() - t0
        images = images.clamp(-1, 1)
        size = images.shape[-1]
        if scorer is not None:
            cosines.append(scorer.score(images, caps[done : done + len(images)]).cpu())
        if acc is not None:
            acc.update(detector(images).cpu().numpy())
        done += len(images)
        t0 = time.perf_counter()
    result: dict[str, Any] = {"num_images": done}
    if cosines:
        c = torch.cat(cosines).double()
        result |= {"clip_score": float(c.mean()), "clip_score_std": float(c.std(correction=0))}
    num_ref = None
    if acc is not None:
        root, files = _reference_images(ref)
        ref_acc = StatsAccumulator(detector.num_features)
        for i in range(0, len(files), batch):
            imgs = torch.stack([load_image(root / f, size) for f in files[i : i + batch]])
            ref_acc.update(detector(imgs).cpu().numpy())
        num_ref = len(files)
        result["fid"] = frechet_distance_from_stats(*acc.compute(), *ref_acc.compute())
    generation = None
    if run is not None:
        generation = {"seconds": seconds, "samples_per_s": done / seconds if seconds > 0 else None}
    return {
        "source": {
            "spec": str(source),
            "kind": kind,
            "step": step,
            "nfe": (nfe or 35) if kind == "teacher" else (1 if run is not None else None),
        },
        "n": done,
        "seed": seed,
        "captions": str(captions) if captions is not None else str(src / CAPTIONS_JSONL),
        "reference": str(ref) if ref is not None else None,
        "num_reference": num_ref,
        "clip_model": str(clip) if clip is not None else None,
        "resolution": size,
        "generation": generation,
        "metrics": result,
        "notes": notes,
    }


def format_t2i_table(res: dict[str, Any]) -> str:
    """A short plain-text table of :func:`evaluate_t2i`'s result."""
    src, m = res["source"], res["metrics"]
    rows = [
        (
            "source",
            f"{src['spec']} ({src['kind']}"
            + (f" step {src['step']})" if src["step"] is not None else ")"),
        ),
        ("images", f"{res['n']} at {res['resolution']}px, seed {res['seed']}"),
        ("captions", res["captions"]),
    ]
    if "clip_score" in m:
        rows.append(("CLIP score", f"{m['clip_score']:.4f} (cosine, {res['clip_model']})"))
    if "fid" in m:
        rows.append(
            (
                "zero-shot FID",
                f"{m['fid']:.3f} vs {res['reference']} ({res['num_reference']} images)",
            )
        )
    gen = res["generation"]
    if gen is not None and gen["samples_per_s"]:
        rows.append(("images/s", f"{gen['samples_per_s']:.2f} ({gen['seconds']:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {x}" for x in res["notes"]])


__all__ = [
    "CaptionedData",
    "ConstantLogit",
    "DistributionMatchingOnly",
    "LatentCache",
    "T2IConfig",
    "build_t2i_distill",
    "captioned_sampler",
    "default_cache_dir",
    "distill_t2i_run",
    "encode_latents",
    "evaluate_t2i",
    "export_unet",
    "format_t2i_table",
    "is_t2i",
    "is_text_teacher",
    "is_unet_export",
    "iter_images",
    "latent_cache_key",
    "latent_resolution",
    "load_image",
    "load_unet_export",
    "parse_t2i_metrics",
    "prompt_sampler",
    "r1_attention_processor",
    "read_captioned",
    "read_prompts",
    "sample_images",
    "sample_to_files",
    "save_png",
    "validate_t2i_config",
    "with_pipeline",
]
