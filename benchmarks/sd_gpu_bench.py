"""One-shot GPU benchmark of text-to-image f-distill at Stable Diffusion v1.5's real size.

SD v1.5's UNet (860M parameters, random weights) as teacher, student and fake score, all
three on the card with AdamW (fused) for the two trained ones, the ``t2i`` preset's losses
(CFG 1.75, GAN 1e-3, R1 1, discriminator on the teacher's mid-block features), 64x64 latents
(512x512 images) at ``--batch`` per update. For each setting (bf16 autocast, activation
checkpointing of the three UNets, ``torch.compile`` of the UNets) it prints, as it goes, the
median time of a critic and of a generator update (forward, backward, AdamW), the time of an
iteration (``critic_ratio`` critic updates + one generator update) and the student images it
trains per second, the teacher's CFG denoising step for scale, and the peak GPU memory. A
setting that runs out of memory prints ``OOM`` and the next one runs. Then the one-step
student's sampling throughput (UNet, and UNet + VAE decode). With R1 (the preset) ``compile``
leaves the teacher eager: aot_autograd has no double backward, and R1 differentiates through
the teacher's encoder twice.

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
import contextlib
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_cost import SD15_UNET, TINY_UNET, distill_model, sd_teacher  # noqa: E402

from fdistill.denoisers.registry import copy_denoiser  # noqa: E402
from fdistill.generator import OneStepGenerator  # noqa: E402
from fdistill.pipeline import PRESETS  # noqa: E402

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, reps: int, device: torch.device) -> float:
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
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
        teacher = sd_teacher(unet_cfg, device)
        student = OneStepGenerator(copy_denoiser(teacher), teacher.info.sigma_max)
        fake = copy_denoiser(teacher)
    student.requires_grad_(True)
    fake.requires_grad_(True)
    model = distill_model(teacher, student, fake).to(device)
    n_params = sum(p.numel() for p in teacher.unet.parameters())
    fused = {"fused": True} if device.type == "cuda" else {}
    g_params = list(model.generator.parameters())
    c_params = model.critic_parameters()
    opt_g = torch.optim.AdamW(g_params, lr=1e-5, weight_decay=1e-2, **fused)
    opt_c = torch.optim.AdamW(c_params, lr=1e-5, weight_decay=1e-2, **fused)
    gen = torch.Generator(device).manual_seed(0)
    b, ctx = args.batch, teacher.null_cond.shape[1:]
    z = torch.randn(b, 4, side, side, device=device, generator=gen)
    x_real = torch.randn(b, 4, side, side, device=device, generator=gen)
    cond = torch.randn(b, *ctx, device=device, generator=gen)
    print(
        f"UNet {n_params / 1e6:.1f}M parameters x 3 (teacher frozen; student and fake score "
        f"with AdamW), latents {side}x{side}, batch {b}, critic ratio {args.critic_ratio}; "
        f"built in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )

    def autocast(bf16: bool):
        if bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def update(bf16: bool, critic: bool) -> None:
        opt = opt_c if critic else opt_g
        opt.zero_grad(set_to_none=True)
        with autocast(bf16):
            if critic:
                loss, _ = model.critic_loss(z, cond, x_real, cond, gen)
            else:
                loss, _ = model.generator_loss(z, cond, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(c_params if critic else g_params, 10.0)
        opt.step()

    def teacher_step(bf16: bool) -> None:
        with torch.no_grad(), autocast(bf16):
            teacher.guided(z * 3.0, 3.0, cond, 1.75)

    nets = (teacher, student.denoiser, fake)
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
        if "compile" in opts and not compiled:
            # aot_autograd has no double backward: with R1 the discriminator's feature network
            # (the teacher) stays eager.
            targets = nets if model.cfg.r1_gamma == 0 else nets[1:]
            if device.type == "cuda" or args.compile_backend != "inductor":
                for net in targets:
                    net.unet.compile(backend=args.compile_backend)
            compiled = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            update(bf16, True)  # warm-up (and compilation)
            update(bf16, False)
            warm = time.perf_counter() - t0
            tc = median_time(lambda: update(bf16, True), args.reps, device)  # noqa: B023
            tg = median_time(lambda: update(bf16, False), args.reps, device)  # noqa: B023
            tt = median_time(lambda: teacher_step(bf16), args.reps, device)  # noqa: B023
        except torch.OutOfMemoryError:
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            print(f"| {s} | OOM at batch {b} | | | | | |", flush=True)
            continue
        it = args.critic_ratio * tc + tg
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        note = f" (first updates {warm:.0f} s)" if "compile" in opts else ""
        print(
            f"| {s}{note} | {tt * 1e3:.0f} ms | {tc * 1e3:.0f} ms | {tg * 1e3:.0f} ms "
            f"| {it:.2f} s | {b / it:.2f} | {mem:.1f} GiB |",
            flush=True,
        )

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
        with torch.no_grad(), autocast(True):
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
