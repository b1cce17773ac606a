"""Cost of a text-to-image f-distill update at Stable Diffusion v1.5's real size, on the CPU.

Builds the SD v1.5 UNet at its published configuration with random weights (diffusers'
``UNet2DConditionModel``: block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768,
layers_per_block 2, attention_head_dim 8, sample_size 64) behind fdistill's
``StableDiffusionTeacher``, and measures with the library's own losses
(:class:`fdistill.distill.FDistill`, the ``t2i`` preset: CFG 1.75, GAN weight 1e-3, R1 1,
discriminator on the teacher's mid-block features):

* one teacher denoising step (a 50-step CFG sampler's step: one UNet pass on the cond and
  uncond batch) and one plain UNet pass;
* one critic update (fake-score denoising loss + discriminator with R1) and one generator
  update (student forward/backward, teacher CFG, fake score, GAN term), forward + backward;
* the AdamW step of the 860M-parameter network, timed on an eighth of its parameters and
  scaled (AdamW is elementwise, linear in the parameter count);
* the text encoder (CLIP ViT-L/14's, 123M parameters) on one batch of prompts;
* memory: peak resident set of each update above the models it holds, and the state
  (weights, gradients, AdamW moments) of a full run, computed from the parameter counts, for a
  fully trained fake score (DMD2, the paper) and for a LoRA one.

This machine has 23 GB of RAM shared with other jobs, so each process holds at most two
UNets: in the critic update the student is the teacher's own weights (the same forward cost),
in the generator update the fake score is (it only runs without gradients there). Each phase
runs in its own process so that peaks do not mix. One torch thread (2 cores shared with other
agents). Latents 32x32 (256x256 images) by default: 64x64 is four times slower per pass.

    python benchmarks/sd_cost.py                      # ~6 min, writes results/sd_cost_cpu.md
    python benchmarks/sd_cost.py --latent 64 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fdistill.critic import MultiScaleHead
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.pipeline import PRESETS, DistillConfig, apply_preset
from fdistill.teachers.registry import TeacherInfo

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
GIB = 2**30


def sd_teacher(unet_config: dict, device: str | torch.device = "cpu", seed: int = 0):
    """A ``StableDiffusionTeacher`` around a randomly initialised UNet of ``unet_config``,
    frozen, with a random empty-prompt embedding and ``.info`` as a loaded pipeline has."""
    from diffusers import UNet2DConditionModel

    from fdistill.teachers.stable_diffusion import StableDiffusionTeacher

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).to(device).requires_grad_(False).eval()
    ctx = (77, unet_config["cross_attention_dim"])
    teacher = StableDiffusionTeacher(unet, SD15_SCHEDULE, "epsilon", context=ctx)
    # The post-load hook marks the empty-prompt embedding as set.
    teacher.load_state_dict({"null_cond": torch.randn(1, *ctx)}, strict=False)
    s = teacher.schedule
    size = unet_config["sample_size"]
    teacher.info = TeacherInfo(
        "diffusers", (4, size, size), 0, s.sigma_min, s.sigma_max, 1.0, {"conditioning": "text"}
    )
    return teacher.to(device)


def loss_config(teacher) -> LossConfig:
    """The ``t2i`` preset's loss settings for ``teacher``'s noise range."""
    loss = apply_preset(DistillConfig(), "t2i").loss
    return replace(
        loss,
        disc_features="teacher",
        sigma_min=teacher.info.sigma_min,
        sigma_max=teacher.info.sigma_max,
        sigma_data=1.0,
    )


def distill_model(teacher, generator, fake):
    """FDistill with the t2i preset's discriminator (mid-block taps) and R1-ready attention."""
    from fdistill.t2i import r1_attention_processor

    for net in {id(teacher): teacher, id(fake): fake}.values():
        net.set_feature_taps(PRESETS["t2i"]["disc_taps"])
    teacher.unet.set_attn_processor(r1_attention_processor())
    head = MultiScaleHead(teacher.selected_feature_maps(), hidden=DistillConfig().head_hidden)
    return FDistill(
        teacher,
        generator,
        fake,
        head,
        get_divergence("js"),
        loss_config(teacher),
        schedule=teacher.info.schedule,
    )


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


def timed(fn) -> tuple[float, int]:
    """Seconds of ``fn()`` and the peak resident memory it added."""
    base = rss()
    reset_peak()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, peak() - base


# --------------------------------------------------------------------------- phases
def _inputs(args, teacher):
    g = torch.Generator().manual_seed(0)
    b, r = args.batch, args.latent
    z = torch.randn(b, 4, r, r, generator=g)
    cond = torch.randn(b, 77, teacher.null_cond.shape[-1], generator=g)
    x_real = torch.randn(b, 4, r, r, generator=g)
    return g, z, cond, x_real


def _rounds(args, fn) -> dict:
    fn()  # warm-up: allocator, first-call overheads
    ts, ms = zip(*(timed(fn) for _ in range(args.rounds)), strict=True)
    return {"seconds": statistics.median(ts), "transient_bytes": max(ms)}


def _unet(args) -> dict:
    """The UNet config at the benchmark's latent size (the discriminator's map sizes follow)."""
    return dict(TINY_UNET if args.tiny else SD15_UNET, sample_size=args.latent)


def phase_teacher(args) -> dict:
    t0 = time.perf_counter()
    teacher = sd_teacher(_unet(args))
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in teacher.unet.parameters())
    g, z, cond, _ = _inputs(args, teacher)
    sigma = torch.full((args.batch,), 3.0)
    x = z * 3.0
    out = {"unet_params": params, "build_seconds": build, "resident_bytes": rss()}
    with torch.no_grad():
        out["forward"] = _rounds(args, lambda: teacher(x, sigma, cond))
        out["cfg_step"] = _rounds(args, lambda: teacher.guided(x, sigma, cond, 1.75))
    from transformers import CLIPTextConfig, CLIPTextModel

    tcfg = (
        dict(
            SD15_TEXT,
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        if args.tiny
        else SD15_TEXT
    )
    text = CLIPTextModel(CLIPTextConfig(**tcfg)).eval()
    ids = torch.randint(tcfg["vocab_size"], (args.batch, 77), generator=g)
    out["text_params"] = sum(p.numel() for p in text.parameters())
    with torch.no_grad():
        out["text_encoder"] = _rounds(args, lambda: text(ids))
    return out


def phase_critic(args) -> dict:
    teacher = sd_teacher(_unet(args))
    from fdistill.denoisers.registry import copy_denoiser

    fake = copy_denoiser(teacher).requires_grad_(True)
    model = distill_model(teacher, OneStepGenerator(teacher, teacher.info.sigma_max), fake)
    g, z, cond, x_real = _inputs(args, teacher)
    out = {"resident_bytes": rss()}

    def update():
        loss, _ = model.critic_loss(z, cond, x_real, cond, g)
        loss.backward()
        for p in model.critic_parameters():
            p.grad = None

    out["update"] = _rounds(args, update)
    model.cfg.r1_gamma = 0.0  # the same update without R1's double backward
    out["update_no_r1"] = _rounds(args, update)
    return out


def phase_generator(args) -> dict:
    teacher = sd_teacher(_unet(args))
    from fdistill.denoisers.registry import copy_denoiser

    student = OneStepGenerator(copy_denoiser(teacher), teacher.info.sigma_max).requires_grad_(True)
    model = distill_model(teacher, student, teacher)
    g, z, cond, _ = _inputs(args, teacher)
    out = {"resident_bytes": rss()}

    def update():
        loss, _ = model.generator_loss(z, cond, g)
        loss.backward()
        for p in student.parameters():
            p.grad = None

    out["update"] = _rounds(args, update)
    return out


def phase_adamw(args) -> dict:
    """AdamW on the first eighth of the UNet's parameters (by count), scaled to all."""
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
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent side (64: SD's 512x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="timed repetitions after a warm-up")
    p.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="a tiny UNet: checks the script runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_cost_cpu.md"))
    args = p.parse_args()
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
        "with other jobs, so times carry some noise.",
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
    crit = c["update"]["seconds"] + adam
    row("critic update (fwd + bwd + AdamW)", crit, c["update"]["transient_bytes"])
    crit0 = c["update_no_r1"]["seconds"] + adam
    row("critic update without R1", crit0, c["update_no_r1"]["transient_bytes"])
    g = run_phase("generator", args)
    gen = g["update"]["seconds"] + adam
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
        f"In UNet passes: critic update {c['update']['seconds'] / fwd:.1f} F, generator update "
        f"{g['update']['seconds'] / fwd:.1f} F (F = one UNet forward at batch B, {fwd:.2f} s). "
        f"The text encoder costs {t['text_encoder']['seconds'] / fwd:.3f} F per batch of "
        "prompts: embeddings are computed per batch, not cached."
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
        f"phase {g['resident_bytes'] / GIB:.2f} GiB (two UNets each, before gradients)."
    )
    say()
    say(f"total wall time {time.perf_counter() - t_start:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
