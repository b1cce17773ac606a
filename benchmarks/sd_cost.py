"""Cost of a text-to-image f-distill update at Stable Diffusion v1.5's real size, on the CPU.

Builds the SD v1.5 UNet at its published configuration with random weights (diffusers'
``UNet2DConditionModel``: block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768,
layers_per_block 2, attention_head_dim 8, sample_size 64) and a CLIP ViT-L/14-sized text encoder
(random weights; a stand-in tokenizer, :class:`HashTokenizer`, since CLIP's vocabulary files are
not at hand) behind fdistill's ``StableDiffusionTeacher``, and measures:

* one teacher denoising step (a 50-step CFG sampler's step: one UNet pass on the cond and
  uncond batch) and one plain UNet pass. fdistill has no teacher-training loss for a text
  teacher (:class:`fdistill.methods.Denoising` trains EDM denoisers with the EDM loss;
  ``train-teacher`` trains no Stable Diffusion UNet), so this step is the script's own: the
  teacher's no-grad CFG call, the scale every update is compared with;
* one critic update (fake-score denoising loss + discriminator with R1) and one generator
  update (student forward/backward, teacher CFG, fake score, GAN term), each one update of the
  training engine (:meth:`fdistill.engine.Engine.update`: the method's loss from a fresh batch,
  backward, NaN/Inf guard, gradient norm, clipping, fused AdamW: the code ``distill`` runs) of
  the :class:`fdistill.methods.FDistill` that ``fdistill distill --preset t2i --r1-gamma 1``
  builds (:func:`fdistill.recipes.build_distill` from a :class:`fdistill.config.T2IConfig`: CFG
  1.75, GAN weight 1e-3, discriminator on the teacher's mid-block features, timestep noise
  levels and ratio bins; R1 1 as in the paper's Table 5, the preset's own R1 0 being the
  "without R1" row), fed as ``distill`` feeds a text teacher: the student's latents and prompt
  embeddings from :func:`fdistill.conditioning.student_inputs` with the teacher's
  :class:`fdistill.conditioning.Text` conditioning, real batches of latents (a VAE posterior
  sample) with the embeddings of their captions (:func:`fdistill.sources.captioned_sampler`);
  both encode their prompts with the text encoder in every update, as a run does. fp32 (the
  preset's ``--bf16`` off: a CPU measurement);
* the engine's AdamW step (:func:`fdistill.engine.make_adamw`: fused) of the 860M-parameter
  network, timed on an eighth of its parameters and scaled (AdamW is elementwise, linear in the
  parameter count); the updates above include their own, this row attributes it;
* the text encoder on one batch of prompts;
* memory: peak resident set of each update above what the process holds when it starts
  (models, AdamW moments; gradients dropped before each, freed memory handed back to the OS),
  and the state (weights, gradients, AdamW moments) of a full run, computed from the parameter
  counts, for a fully trained fake score (DMD2, the paper) and for a LoRA one.

This machine has 23 GB of RAM shared with other jobs, so each process holds at most two
UNets' weights: in the critic update the student shares the teacher's weights (the same forward
cost), in the generator update the fake score does (it only runs without gradients there); the
generator's EMA, which the engine keeps but no update touches, shares the student's. With the
trained network's gradients and AdamW moments a phase holds about 17 GiB at SD size. Each phase
runs in its own process so that peaks do not mix. One torch thread (2 cores shared with other
agents). Latents 32x32 (256x256 images) by default: 64x64 is four times slower per pass.

    python benchmarks/sd_cost.py                      # ~6 min, writes results/sd_cost_cpu.md
    python benchmarks/sd_cost.py --latent 64 --rounds 1
    python benchmarks/sd_cost.py --tiny --out /tmp/sd_cost_tiny.md   # checks the script runs
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import drop_grads, engine_update  # noqa: E402

from fdistill.conditioning import of_teacher, student_inputs  # noqa: E402
from fdistill.config import PRESETS, T2IConfig, apply_preset  # noqa: E402
from fdistill.data.captions import CaptionedData  # noqa: E402
from fdistill.engine import Dist, Engine, LoopConfig, make_adamw, make_batch_randoms  # noqa: E402
from fdistill.methods import FDistill, Inputs  # noqa: E402
from fdistill.methods.fdistill import resolved_levels  # noqa: E402
from fdistill.recipes import build_distill  # noqa: E402
from fdistill.sources import captioned_sampler  # noqa: E402
from fdistill.teachers.registry import TeacherInfo  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
TINY_TEXT = dict(
    SD15_TEXT,
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=998,  # HashTokenizer's, within the tiny vocabulary
    eos_token_id=999,
)
PUBLISHED_UNET = 860e6
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
)
R1_GAMMA = 1.0
"""R1 weight of the measured critic update: the paper's Table 5 value for SD (the ``t2i`` preset
follows the official code, R1 off: the "without R1" measurement)."""
GIB = 2**30
PROMPTS = tuple(
    f"a {a} photo of a {b} {c}"
    for a in ("close-up", "wide", "studio", "blurry")
    for b in ("red", "small", "wooden", "striped")
    for c in ("cat", "bicycle", "teapot", "house")
)
CAPTIONS = tuple(
    f"{thing} {where} a {place}"
    for place in ("table", "street", "beach", "shelf")
    for thing, where in (
        ("a dog", "next to"),
        ("two cups", "on"),
        ("a car", "near"),
        ("a lamp", "by"),
    )
)
REAL_IMAGES = 8
"""Images of the stand-in captioned set (two captions each, as COCO has several)."""


class HashTokenizer:
    """Stand-in for CLIP's tokenizer, whose vocabulary files are not at hand: each word of a
    prompt hashed to an id below ``vocab - 2``, between BOS (``vocab - 2``) and EOS
    (``vocab - 1``, also the padding), padded and truncated to ``model_max_length``, returned as
    ``CLIPTokenizer(..., padding="max_length", truncation=True, return_tensors="pt")`` returns
    them. Its cost is nothing next to the text encoder's."""

    def __init__(self, vocab: int, length: int = 77):
        self.model_max_length = length
        self.bos, self.eos = vocab - 2, vocab - 1
        self.pad_token_id = self.eos

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, **_):
        length = max_length or self.model_max_length
        rows = []
        for p in prompts:
            words = [zlib.crc32(w.encode()) % self.bos for w in p.lower().split()]
            ids = [self.bos, *words[: length - 2], self.eos]
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        return SimpleNamespace(input_ids=torch.tensor(rows))


def text_config(unet_config: dict) -> dict:
    """The CLIP text encoder's config for ``unet_config``: SD v1.5's (CLIP ViT-L/14) for its
    768-wide cross-attention, else a tiny one of the UNet's width."""
    width = unet_config["cross_attention_dim"]
    return SD15_TEXT if width == SD15_TEXT["hidden_size"] else dict(TINY_TEXT, hidden_size=width)


def sd_teacher(unet_config: dict, device: str | torch.device = "cpu", seed: int = 0):
    """A ``StableDiffusionTeacher`` around a randomly initialised UNet of ``unet_config``,
    frozen, with a randomly initialised text encoder of the matching width (and a
    :class:`HashTokenizer`) to encode prompts, and ``.info`` as a loaded pipeline has."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fdistill.teachers.stable_diffusion import SDComponents, StableDiffusionTeacher

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).to(device).requires_grad_(False).eval()
    tcfg = text_config(unet_config)
    encoder = CLIPTextModel(CLIPTextConfig(**tcfg)).to(device).requires_grad_(False).eval()
    tokenizer = HashTokenizer(tcfg["vocab_size"], tcfg["max_position_embeddings"])
    parts = SDComponents(tokenizer, encoder, None)  # no VAE: the latents are given
    teacher = StableDiffusionTeacher(unet, SD15_SCHEDULE, "epsilon", components=parts)
    s = teacher.schedule
    size = unet_config["sample_size"]
    teacher.info = TeacherInfo(
        family="diffusers",
        shape=(4, size, size),
        num_classes=0,
        sigma_min=s.sigma_min,
        sigma_max=s.sigma_max,
        sigma_data=1.0,
        details={"conditioning": "text", "weights": "random"},
        schedule=s,
    )
    return teacher.to(device)


def distill_config(batch: int, r1_gamma: float = R1_GAMMA, **loop) -> T2IConfig:
    """What ``fdistill distill --preset t2i --r1-gamma R1_GAMMA --batch BATCH`` trains
    (``loop``: further loop settings, e.g. ``bf16``), with "auto" noise levels resolved for
    the teacher's discrete schedule as ``distill`` resolves them."""
    cfg = apply_preset(T2IConfig(), "t2i")
    loss = replace(cfg.loss, r1_gamma=r1_gamma, r1="exact", disc_features="teacher")
    levels, binning = resolved_levels(loss, True)
    loss = replace(loss, noise_levels=levels, ratio_binning=binning)
    train = replace(cfg.train, batch=batch, batch_gpu=None, progress=False, **loop)
    return replace(cfg, loss=loss, train=train)


def t2i_inputs(teacher: nn.Module, device: str | torch.device, seed: int = 1) -> Inputs:
    """The engine's inputs as ``distill`` sets them up for a text teacher: the student's unit
    latents and prompt embeddings (:func:`fdistill.conditioning.student_inputs` with the
    teacher's :class:`~fdistill.conditioning.Text` conditioning over :data:`PROMPTS`), and real
    batches of latents with their captions' embeddings (:func:`fdistill.sources.captioned_sampler`
    over :data:`REAL_IMAGES` random "VAE posteriors", a fresh posterior sample per batch)."""
    shape = tuple(teacher.info.shape)
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(REAL_IMAGES, *shape, generator=g)
    std = 0.1 * torch.rand(REAL_IMAGES, *shape, generator=g)
    data = CaptionedData(
        source="random",
        root=Path("."),
        files=tuple(f"{i}.png" for i in range(REAL_IMAGES)),
        image_of=tuple(i % REAL_IMAGES for i in range(len(CAPTIONS))),
        captions=CAPTIONS,
    )
    device = torch.device(device)
    conditioning = of_teacher(teacher, PROMPTS)
    return Inputs(
        real=captioned_sampler(mean, data, teacher, device, std),
        latents=student_inputs(shape, conditioning, device),
    )


def distill_model(teacher: nn.Module, cfg: T2IConfig, device: str | torch.device) -> FDistill:
    """The f-distill method ``distill`` builds from ``teacher`` for ``cfg`` (student and fake
    score copied from it, heads seeded as ``distill`` seeds them), on ``device``."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return build_distill(cfg, teacher).to(device)


def distill_engine(
    model: FDistill, inputs: Inputs, loop: LoopConfig, device: str | torch.device
) -> Engine:
    """``model`` set up in the engine as :func:`fdistill.engine.train` does on one process, with
    the random streams ``distill`` draws from."""
    ddp = Dist(device=torch.device(device))
    return Engine(model, inputs, loop, ddp=ddp, gens=make_batch_randoms(loop.seed, ddp))


def share_weights(copy: nn.Module, source: nn.Module) -> None:
    """Point the parameters and buffers of ``copy`` (``source``'s architecture) at ``source``'s
    tensors: the same forward cost, no memory of its own. The parameters stay ``copy``'s own
    objects (an optimiser over them is unchanged); only an update that does not step them may
    run."""
    with torch.no_grad():
        for a, b in zip(copy.parameters(), source.parameters(), strict=True):
            a.data = b.data
        for a, b in zip(copy.buffers(), source.buffers(), strict=True):
            a.data = b.data


# --------------------------------------------------------------------------- memory
def rss() -> int:
    """Resident set size (bytes) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it), so the resident set counts what
    is held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn) -> tuple[float, int]:
    """Seconds of ``fn()`` and the peak resident memory it added."""
    base = rss()
    reset_peak()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, peak() - base


# --------------------------------------------------------------------------- phases
def _rounds(args, fn, *engines: Engine) -> dict:
    """A warm-up of ``fn`` (allocator, first-call overheads, AdamW moments), then the median
    time and largest transient of ``args.rounds`` calls, each from a state without gradients."""

    def clean():
        drop_grads(*engines)
        trim()

    clean()
    fn()
    runs = []
    for _ in range(args.rounds):
        clean()
        runs.append(timed(fn))
    clean()
    ts, ms = zip(*runs, strict=True)
    return {"seconds": statistics.median(ts), "transient_bytes": max(ms)}


def _unet(args) -> dict:
    """The UNet config at the benchmark's latent size (the discriminator's map sizes follow)."""
    return dict(TINY_UNET if args.tiny else SD15_UNET, sample_size=args.latent)


def phase_teacher(args) -> dict:
    t0 = time.perf_counter()
    teacher = sd_teacher(_unet(args))
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in teacher.unet.parameters())
    g = torch.Generator().manual_seed(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    cond = teacher.encode_prompts(prompts)
    x = 3.0 * torch.randn(args.batch, *teacher.info.shape, generator=g)
    sigma = torch.full((args.batch,), 3.0)
    out = {"unet_params": params, "build_seconds": build, "resident_bytes": rss()}
    with torch.no_grad():
        out["forward"] = _rounds(args, lambda: teacher(x, sigma, cond))
        out["cfg_step"] = _rounds(args, lambda: teacher.guided(x, sigma, cond, 1.75))
    encoder = teacher.components.text_encoder
    out["text_params"] = sum(p.numel() for p in encoder.parameters())
    out["text_encoder"] = _rounds(args, lambda: teacher.encode_prompts(prompts))
    return out


def _engine(args, shared: str) -> Engine:
    """The engine of the distillation with ``shared`` (``"generator"`` or ``"fake_score"``)
    holding the teacher's weights, and the generator's EMA the generator's."""
    teacher = sd_teacher(_unet(args))
    cfg = distill_config(args.batch)
    model = distill_model(teacher, cfg, "cpu")
    net = model.generator.denoiser if shared == "generator" else model.fake_score
    share_weights(net, teacher)
    engine = distill_engine(model, t2i_inputs(teacher, "cpu"), cfg.train, "cpu")
    share_weights(engine.ema.module, model.generator)
    trim()
    return engine


def phase_critic(args) -> dict:
    engine = _engine(args, "generator")
    out = {"resident_bytes": rss()}
    out["update"] = _rounds(args, lambda: engine_update(engine, "critic"), engine)
    # The same update without R1's double backward, as `--r1-gamma 0` builds it: no penalty,
    # and the teacher's attention on its default (fused) kernels.
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = engine.method
    model.cfg.r1_gamma = 0.0
    model.teacher.unet.set_attn_processor(AttnProcessor2_0())
    out["update_no_r1"] = _rounds(args, lambda: engine_update(engine, "critic"), engine)
    return out


def phase_generator(args) -> dict:
    engine = _engine(args, "fake_score")
    out = {"resident_bytes": rss()}
    out["update"] = _rounds(args, lambda: engine_update(engine, "generator"), engine)
    return out


def phase_adamw(args) -> dict:
    """The engine's AdamW (fused, ``distill``'s betas and weight decay) on the first eighth of
    the UNet's parameters (by count), scaled to all."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        shapes = [p.shape for p in UNet2DConditionModel(**_unet(args)).parameters()]
    total = sum(s.numel() for s in shapes)
    params, count = [], 0
    for s in shapes:
        if count >= total / 8:
            break
        p = torch.nn.Parameter(torch.randn(s) * 0.02)
        p.grad = torch.randn(s) * 1e-3
        params.append(p)
        count += s.numel()
    loop = distill_config(args.batch).train
    opt = make_adamw(params, loop.lr_critic, loop.betas, loop.weight_decay, torch.device("cpu"))
    opt.step()  # allocates the moments
    ts = [timed(opt.step)[0] for _ in range(max(2, args.rounds))]
    return {
        "slice_params": count,
        "total_params": total,
        "step_seconds": statistics.median(ts) * total / count,
    }


PHASES = {
    "teacher": phase_teacher,
    "critic": phase_critic,
    "generator": phase_generator,
    "adamw": phase_adamw,
}


# --------------------------------------------------------------------------- report
def lora_params(rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on every attention projection (q, k, v, out) of the
    SD v1.5 UNet, the usual target (e.g. SwiftBrush's LoRA fake score)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    n = 0
    for m in unet.modules():
        if isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0]):
                n += rank * (lin.in_features + lin.out_features)
    return n


def state_table(params: int, lora: int) -> list[str]:
    """Resident state of a full run (fp32 weights, fp32 gradients, AdamW moments, EMA)."""
    w = 4 * params
    rows = [
        "| part | full fake score (DMD2, the paper) | LoRA fake score (rank 64) |",
        "|---|---|---|",
        f"| teacher (frozen) | {w / GIB:.2f} GiB | {w / GIB:.2f} GiB |",
        f"| student: weights + grads + AdamW + EMA | {5 * w / GIB:.2f} GiB "
        f"| {5 * w / GIB:.2f} GiB |",
        f"| fake score: weights + grads + AdamW | {4 * w / GIB:.2f} GiB "
        f"| {(w + 16 * lora) / GIB:.2f} GiB (frozen base + {lora / 1e6:.1f}M trained) |",
        f"| total before activations | **{10 * w / GIB:.1f} GiB** "
        f"| **{(7 * w + 16 * lora) / GIB:.1f} GiB** |",
    ]
    return rows


def run_phase(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--latent", str(args.latent)]
    cmd += ["--batch", str(args.batch), "--rounds", str(args.rounds)] + ["--tiny"] * args.tiny
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-3000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent side (64: SD's 512x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="timed repetitions after a warm-up")
    p.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="a tiny UNet: checks the script runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_cost_cpu.md"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.phase:
        print("RESULT " + json.dumps(PHASES[args.phase](args)), flush=True)
        return

    t_start = time.perf_counter()
    lines = [
        "# Text-to-image f-distill at SD v1.5 size on this 2-core CPU (one torch thread)",
        "",
        f"`python benchmarks/sd_cost.py --latent {args.latent} --batch {args.batch} --rounds "
        f"{args.rounds}` ({time.strftime('%Y-%m-%d')}). Random weights, SD v1.5's UNet config; "
        f"latents {args.latent}x{args.latent} ({8 * args.latent}x{8 * args.latent} images), "
        f"batch {args.batch}; median of {args.rounds} after a warm-up; the 2 cores are shared "
        "with other jobs, so times carry some noise. Critic and generator updates are the "
        "training engine's (`Engine.update`: loss, backward, clipping, fused AdamW).",
        "",
    ]

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    t = run_phase("teacher", args)
    n = t["unet_params"]
    say(
        f"UNet2DConditionModel (SD v1.5 config): {n:,} parameters ({n / 1e6:.1f}M; published "
        f"860M, {100 * (n / PUBLISHED_UNET - 1):+.2f}%); CLIP ViT-L/14 text encoder "
        f"{t['text_params'] / 1e6:.1f}M; weights {4 * n / GIB:.2f} GiB in fp32"
    )
    say()
    fwd, cfg = t["forward"]["seconds"], t["cfg_step"]["seconds"]
    say("| what | time | / teacher denoising step | peak memory above the models held |")
    say("|---|---|---|---|")
    mib = 2**20

    def row(name: str, sec: float, mem: int | None) -> None:
        m = f"{mem / mib:.0f} MiB" if mem is not None else "-"
        say(f"| {name} | {sec:.2f} s | {sec / cfg:.2f}x | {m} |")

    row("UNet forward (batch B)", fwd, t["forward"]["transient_bytes"])
    row("**teacher denoising step** (CFG: one pass on 2B)", cfg, t["cfg_step"]["transient_bytes"])
    row(
        "text encoder, B prompts",
        t["text_encoder"]["seconds"],
        t["text_encoder"]["transient_bytes"],
    )
    a = run_phase("adamw", args)
    adam = a["step_seconds"]
    row("AdamW step, 860M parameters (scaled from 1/8)", adam, None)
    c = run_phase("critic", args)
    crit = c["update"]["seconds"]  # the engine's update includes its AdamW step
    row("critic update (fwd + bwd + AdamW)", crit, c["update"]["transient_bytes"])
    crit0 = c["update_no_r1"]["seconds"]
    row("critic update without R1", crit0, c["update_no_r1"]["transient_bytes"])
    g = run_phase("generator", args)
    gen = g["update"]["seconds"]
    row("generator update (fwd + bwd + AdamW)", gen, g["update"]["transient_bytes"])
    k = PRESETS["t2i"]["critic_ratio"]
    per_update = (k * crit + gen) / (k + 1)
    say(
        f"| **distillation update** (ratio {k} average) | {per_update:.2f} s "
        f"| **{per_update / cfg:.2f}x** | - |"
    )
    it = k * crit + gen
    say(f"| iteration ({k} critic + 1 generator) | {it:.1f} s | {it / cfg:.1f}x | - |")
    per0 = (k * crit0 + gen) / (k + 1)
    say(f"| distillation update without R1 | {per0:.2f} s | {per0 / cfg:.2f}x | - |")
    say()
    say(
        f"In UNet passes (the AdamW step taken out): critic update {(crit - adam) / fwd:.1f} F, "
        f"generator update {(gen - adam) / fwd:.1f} F (F = one UNet forward at batch B, "
        f"{fwd:.2f} s). "
        f"The text encoder costs {t['text_encoder']['seconds'] / fwd:.3f} F per batch of "
        "prompts: embeddings are computed per batch, not cached (the updates above encode "
        "theirs: the critic's real captions and student prompts, the generator's prompts)."
    )
    say()
    say(
        "Resident state of a full distillation run (3 UNets; parameters x bytes, before "
        "activations):"
    )
    say()
    lora = lora_params(64)
    for r in state_table(n, lora):
        say(r)
    say()
    full, part = 10 * 4 * n, 7 * 4 * n + 16 * lora
    say(
        f"Fake score: fully trained, as DMD2 and the paper do. A rank-64 LoRA would train "
        f"{lora / 1e6:.1f}M parameters instead of {n / 1e6:.0f}M and save "
        f"{(full - part) / GIB:.1f} GiB of state ({full / GIB:.1f} -> {part / GIB:.1f} GiB). "
        f"An 80 GB card holds the full run's state with {80e9 / GIB - full / GIB:.0f} GiB left "
        "for activations (which activation checkpointing shrinks); LoRA saves no forward or "
        "backward pass (the backward still runs "
        "through every layer for the input gradient) and limits how closely the fake score can "
        "follow the student's distribution, which every f-distill gradient is measured against."
    )
    say()
    say(
        f"Measured resident sets here: teacher phase {t['resident_bytes'] / GIB:.2f} GiB (one "
        f"UNet + text encoder), critic phase {c['resident_bytes'] / GIB:.2f} GiB and generator "
        f"phase {g['resident_bytes'] / GIB:.2f} GiB (two UNets' weights each + text encoder, "
        "before gradients and AdamW moments)."
    )
    say()
    say(f"total wall time {time.perf_counter() - t_start:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
