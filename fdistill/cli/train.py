"""The training commands: ``toy``, ``train-teacher`` and ``distill``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from fdistill import recipes, toy
from fdistill.cli.options import (
    add_data_options,
    add_loop_options,
    divergence_list,
    given,
    int_list,
    loop_values,
    name_list,
    set_threads,
)
from fdistill.config import (
    PRESETS,
    DistillConfig,
    T2IConfig,
    TeacherConfig,
    apply_preset,
    validate_loop,
)
from fdistill.divergences import NAMES
from fdistill.models import is_text_teacher


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
        type=divergence_list,
        default=None,
        metavar="D1,D2,...",
        help="run several divergences and print a table (e.g. rkl,fkl,js)",
    )
    p.add_argument(
        "--seeds",
        type=int_list,
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


def add_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train an EDM diffusion teacher on images",
        description="Train an EDM-preconditioned denoiser (UNet or MLP) on an image data set. "
        "Writes checkpoint.pt, config.json, metrics.jsonl and grids/*.png into --out. Runs as "
        "one process or under torchrun (DDP).",
    )
    add_data_options(p, default="digits")
    p.add_argument("--arch", choices=("unet", "mlp"), default="unet")
    p.add_argument("--channels", type=int, help="UNet base channels / MLP hidden width")
    p.add_argument("--channel-mult", type=int_list, metavar="M1,M2,...", help="UNet levels")
    p.add_argument("--num-blocks", type=int, help="UNet residual blocks per level")
    p.add_argument("--depth", type=int, help="MLP residual blocks")
    p.add_argument("--label-dropout", type=float, help="UNet label dropout, for guidance")
    p.add_argument("--unconditional", action="store_true", help="ignore the data set's labels")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-warmup", type=int, help="steps of linear learning-rate warm-up")
    add_loop_options(p, "runs/teacher")
    p.set_defaults(func=run_train_teacher)


def run_train_teacher(args: argparse.Namespace) -> int:
    cfg = TeacherConfig()
    if args.arch == "unet":
        if args.depth is not None:
            raise ValueError("--depth is an MLP option; the UNet takes --num-blocks")
        model = given(
            model_channels=args.channels,
            channel_mult=args.channel_mult,
            num_blocks=args.num_blocks,
            label_dropout=args.label_dropout,
        )
    else:
        unet_only = given(
            channel_mult=args.channel_mult,
            num_blocks=args.num_blocks,
            label_dropout=args.label_dropout,
        )
        if unet_only:
            raise ValueError(f"--arch mlp takes no UNet option ({', '.join(unet_only)})")
        model = given(hidden=args.channels, depth=args.depth)
    train = replace(cfg.train, **loop_values(args), **given(lr=args.lr, lr_warmup=args.lr_warmup))
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
        **given(grid_every=args.grid_every),
    )
    set_threads(args)
    res = recipes.train_teacher_run(
        cfg, args.out, resume=args.resume or args.resume_or_start, start_fresh=args.resume_or_start
    )
    print(f"teacher: {res.steps} steps in {res.seconds:.0f} s -> {res.out}")
    return 0


def add_distill(sub: argparse._SubParsersAction) -> None:
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
    add_data_options(p, default=None)
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
        type=name_list,
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
    add_loop_options(p, "runs/distill")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    text = args.prompts is not None or is_text_teacher(args.teacher)
    cfg = (T2IConfig if text else DistillConfig)(teacher=args.teacher)
    if not text and (args.latent_cache or args.grad_checkpointing):
        raise ValueError("--latent-cache and --grad-checkpointing apply to text-to-image teachers")
    if args.preset:
        cfg = apply_preset(cfg, args.preset)
    lr = given(lr_gen=args.lr, lr_critic=args.lr)
    lr |= given(lr_gen=args.lr_gen, lr_critic=args.lr_critic)
    train = replace(cfg.train, **loop_values(args), **lr, **given(critic_ratio=args.critic_ratio))
    loss = replace(
        cfg.loss,
        **given(
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
        **given(
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
    set_threads(args)
    res = recipes.distill_run(
        cfg, args.out, resume=args.resume or args.resume_or_start, start_fresh=args.resume_or_start
    )
    print(f"distill ({cfg.divergence}): {res.steps} steps in {res.seconds:.0f} s -> {res.out}")
    return 0
