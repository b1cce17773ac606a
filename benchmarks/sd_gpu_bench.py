"""One-shot GPU benchmark of text-to-image f-distill at Stable Diffusion v1.5's real size.

SD v1.5's UNet (860M parameters, random weights; a CLIP ViT-L/14-sized text encoder beside it)
as teacher, student and fake score, all three on the card, 64x64 latents (512x512 images) at
``--batch`` per update. Every update timed is one update of the training engine
(:meth:`fdistill.engine.Engine.update`: loss, backward, NaN/Inf guard, gradient norm, clipping,
fused AdamW: the code ``distill`` runs) of the :class:`fdistill.methods.FDistill` that
``fdistill distill --preset t2i --r1-gamma 1`` builds for a text teacher
(:func:`fdistill.recipes.build_distill`; CFG 1.75, GAN 1e-3, R1 1 as in the paper's Table 5,
discriminator on the teacher's mid-block features; set up by ``benchmarks/sd_cost.py``), fed as
``distill`` feeds it: the student's latents and prompt embeddings from
:func:`fdistill.conditioning.student_inputs` with the teacher's ``Text`` conditioning, real
latents with their captions' embeddings (prompts encoded in every update, as in a run). For
each setting (bf16 autocast and ``torch.compile``, both the engine's: ``LoopConfig.bf16`` and
:meth:`fdistill.engine.Engine.compile`; activation checkpointing of the three UNets) it builds
the engine afresh and prints, as it goes, the median time of a critic and of a generator update,
the time of an iteration (``critic_ratio`` critic updates + one generator update) and the
student images it trains per second, the teacher's CFG denoising step for scale, and the peak
GPU memory (weights, AdamW moments and the generator's EMA, plus one update: the gradients the
engine holds are dropped before each update; a run also keeps the last generator update's
gradients through the critic updates). A setting that runs out of memory prints ``OOM`` and the
next one runs. Then the one-step student's sampling throughput (UNet, and UNet + VAE decode).
With R1 ``compile`` leaves the teacher eager (the plan's choice): aot_autograd has no double
backward, and R1 differentiates through the teacher's encoder twice.

The teacher CFG step is the script's own (the teacher's no-grad CFG call, a 50-step sampler's
step): fdistill has no teacher-training loss for a text teacher to run in the engine
(:class:`fdistill.methods.Denoising` trains EDM denoisers with the EDM loss).

    python benchmarks/sd_gpu_bench.py                     # sized for < 8 min on one 80 GB card
    python benchmarks/sd_gpu_bench.py --batch 16 --settings bf16+ckpt,bf16+ckpt+compile
    python benchmarks/sd_gpu_bench.py --tiny              # tiny UNet on the CPU: a smoke test

Run mode (``--run PIPELINE``): distil a real Stable Diffusion pipeline folder for ``--minutes``
on one GPU with the ``t2i`` preset (what ``fdistill distill`` runs: the engine, bf16, the
official noise levels), then evaluate the student on a COCO subset with ``eval --protocol
dmd2``, printing as it goes:

    python benchmarks/sd_gpu_bench.py --run sd-v1-5/ --prompts coco-train/captions.jsonl \
        --data coco-train/ --minutes 8 --captions annotations/captions_val2014.json \
        --ref val2014/ --clip clip-vit-g14/ --inception inception-2015-12-05.pt --n-eval 1000

Write the printed table into ``benchmarks/results/`` with the card's name.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_cost import (  # noqa: E402
    PROMPTS,
    SD15_UNET,
    TINY_UNET,
    distill_config,
    distill_engine,
    distill_model,
    sd_teacher,
    t2i_inputs,
)
from step_cost import drop_grads, engine_update, timed  # noqa: E402

from fdistill.config import PRESETS  # noqa: E402
from fdistill.engine import Engine, autocast  # noqa: E402

DEFAULT_SETTINGS = "bf16,bf16+ckpt,bf16+ckpt+compile"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="samples per update (per GPU)")
    p.add_argument("--latent", type=int, help="latent side (default 64; --tiny: 8)")
    p.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="comma-separated; each a '+' of bf16, fp32, ckpt, compile (compile ones run last)",
    )
    p.add_argument("--critic-ratio", type=int, default=PRESETS["t2i"]["critic_ratio"])
    p.add_argument("--reps", type=int, default=3, help="timed updates of each kind per setting")
    p.add_argument("--budget", type=float, default=420, help="seconds; later settings skipped")
    p.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (a smoke test)")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend; another than inductor also compiles on a CPU (aot_eager)",
    )
    p.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    run = p.add_argument_group("run mode: distil a real pipeline for --minutes, then evaluate")
    run.add_argument("--run", metavar="PIPELINE", help="a Stable Diffusion pipeline folder")
    run.add_argument("--prompts", help="prompts of the student's training batches")
    run.add_argument("--data", help="captioned real images for the discriminator")
    run.add_argument("--minutes", type=float, default=8.0, help="training time (after set-up)")
    run.add_argument("--captions", help="COCO captions json (or text) to evaluate on")
    run.add_argument("--ref", help="reference images of the evaluation (e.g. val2014/)")
    run.add_argument("--clip", help="a local transformers CLIP folder (CLIP score)")
    run.add_argument("--inception", help="the Inception TorchScript file (FID)")
    run.add_argument("--n-eval", type=int, default=1000, help="captions to evaluate")
    run.add_argument("--out", default="runs/sd-gpu-bench", help="run folder")
    run.add_argument("--latent-cache", help="latent cache folder (default ~/.cache)")
    return p.parse_args(argv)


def median_time(fn, reps: int, device: torch.device, *engines: Engine) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (synchronised), the gradients the ``engines``
    hold dropped before each (outside the timing; an update drops its own first)."""
    ts = []
    for _ in range(reps):
        drop_grads(*engines)
        ts.append(timed(fn, device))
    return statistics.median(ts)


def run_mode(args: argparse.Namespace) -> dict:
    """Distil ``args.run`` for ``args.minutes`` (a 2-step probe times an engine step, then the
    run resumes exactly to the steps that fit), then ``eval --protocol dmd2``; returns the
    evaluation's result."""
    import json

    from fdistill.config import T2IConfig, apply_preset
    from fdistill.evaluation_text import evaluate_t2i, format_t2i_table
    from fdistill.recipes import distill_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = apply_preset(T2IConfig(teacher=args.run, prompts=args.prompts, data=args.data), "t2i")
    loop = dict(batch=args.batch, critic_ratio=args.critic_ratio, steps=2, progress=False)
    loop |= dict(log_every=1, ckpt_every=10**9)
    cfg = replace(
        cfg,
        device=device,
        latent_cache=args.latent_cache,
        grid_every=0,
        train=replace(cfg.train, **loop),
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    res = distill_run(cfg, out)
    probe = time.perf_counter() - t0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    per_step = 1 / rec["it_s"]
    steps = max(3, int(args.minutes * 60 / per_step))
    print(
        f"set-up and 2 steps in {probe:.0f} s; one step (critic x {args.critic_ratio} + "
        f"generator, batch {args.batch}) {per_step:.2f} s: training to step {steps}",
        flush=True,
    )
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, log_every=max(1, steps // 20)))
    cfg = replace(cfg, train=replace(cfg.train, progress=True))
    res = distill_run(cfg, out, resume=True)
    print(f"trained {res.steps} steps in {res.seconds:.0f} s -> {out}", flush=True)
    metrics = "fid,clip" if args.inception and args.clip else ("clip" if args.clip else "fid")
    result = evaluate_t2i(
        out,
        captions=args.captions,
        ref=args.ref,
        metrics=metrics,
        clip=args.clip,
        inception=args.inception,
        n=args.n_eval,
        batch=args.batch,
        device=device,
        protocol="dmd2",
        out_dir=out,
    )
    print(format_t2i_table(result), flush=True)
    (out / "eval_dmd2.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run:
        run_mode(args)
        return
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type != "cuda" and not args.tiny:
        sys.exit("no CUDA device: run on a GPU, or pass --tiny for a CPU smoke test")
    t_start = time.perf_counter()
    unet_cfg = TINY_UNET if args.tiny else SD15_UNET
    side = args.latent or (8 if args.tiny else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}", flush=True)

    with torch.device(device):
        teacher = sd_teacher(dict(unet_cfg, sample_size=side), device)
    b = args.batch
    cfg = distill_config(b, critic_ratio=args.critic_ratio)
    model = distill_model(teacher, cfg, device)
    inputs = t2i_inputs(teacher, device)
    n_params = sum(p.numel() for p in teacher.unet.parameters())
    gen = torch.Generator(device).manual_seed(0)
    z = torch.randn(b, *teacher.info.shape, device=device, generator=gen)
    cond = teacher.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(b)])
    print(
        f"UNet {n_params / 1e6:.1f}M parameters x 3 (teacher frozen; student and fake score "
        f"with AdamW), latents {side}x{side}, batch {b}, critic ratio {args.critic_ratio}; "
        f"built in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )
    engine: Engine | None = None

    def update(critic: bool) -> None:
        engine_update(engine, "critic" if critic else "generator")

    def teacher_step(bf16: bool) -> None:
        with torch.no_grad(), autocast(device, bf16):
            teacher.guided(z * 3.0, 3.0, cond, 1.75)

    nets = (teacher, model.generator.denoiser, model.fake_score)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    settings.sort(key=lambda s: "compile" in s)  # compiling cannot be undone
    compiled = False
    print()
    print(
        "| setting | teacher CFG step | critic update | generator update | iteration "
        "| train img/s | peak memory |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        opts = set(s.split("+"))
        if time.perf_counter() - t_start > args.budget:
            print(f"| {s} | skipped: over the {args.budget:.0f} s budget | | | | | |", flush=True)
            continue
        bf16 = "fp32" not in opts
        for net in nets:
            if "ckpt" in opts:
                net.unet.enable_gradient_checkpointing()
            else:
                net.unet.disable_gradient_checkpointing()
        # The engine of this setting (bf16 and compile are loop settings): the previous one's
        # AdamW moments and EMA go first.
        engine = None
        gc.collect()
        compiling = "compile" in opts and (
            device.type == "cuda" or args.compile_backend != "inductor"
        )
        loop = replace(cfg.train, bf16=bf16, compile=compiling)
        loop = replace(loop, compile_backend=args.compile_backend)
        engine = distill_engine(model, inputs, loop, device)
        if compiling and not compiled:
            # What the plan allows: with R1 the discriminator's feature network (the teacher)
            # stays eager, aot_autograd having no double backward.
            engine.compile()
            compiled = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            # Warm-up: AdamW moments; compiled, every graph dynamo makes (grad modes, caches
            # filled on the first calls) takes two rounds.
            for critic in (True, False) * (2 if compiling else 1):
                drop_grads(engine)
                update(critic)
            warm = time.perf_counter() - t0
            tc = median_time(lambda: update(True), args.reps, device, engine)  # noqa: B023
            tg = median_time(lambda: update(False), args.reps, device, engine)  # noqa: B023
            tt = median_time(lambda: teacher_step(bf16), args.reps, device)  # noqa: B023
        except torch.OutOfMemoryError:
            drop_grads(engine)
            print(f"| {s} | OOM at batch {b} | | | | | |", flush=True)
            continue
        drop_grads(engine)
        it = args.critic_ratio * tc + tg
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        note = f" (first updates {warm:.0f} s)" if "compile" in opts else ""
        print(
            f"| {s}{note} | {tt * 1e3:.0f} ms | {tc * 1e3:.0f} ms | {tg * 1e3:.0f} ms "
            f"| {it:.2f} s | {b / it:.2f} | {mem:.1f} GiB |",
            flush=True,
        )
    student = model.generator

    # One-step sampling throughput of the student (bf16), UNet alone and with a VAE decode.
    from diffusers import AutoencoderKL

    small = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
    sd15 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    with torch.device(device):
        vae = AutoencoderKL(
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=8 * side,
            **(small if args.tiny else sd15),
        ).eval()

    def sample(decode: bool) -> None:
        with torch.no_grad(), autocast(device, True):
            x = student(z, cond)
            if decode:
                vae.decode(x / 0.18215)

    try:
        sample(True)
        t_unet = median_time(lambda: sample(False), args.reps, device)
        t_full = median_time(lambda: sample(True), args.reps, device)
        print(
            f"\none-step sampling, batch {b}: UNet {b / t_unet:.1f} img/s, UNet + VAE decode "
            f"{b / t_full:.1f} img/s"
        )
    except torch.OutOfMemoryError:
        print("\none-step sampling: OOM")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
