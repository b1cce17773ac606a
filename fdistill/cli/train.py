"""The training commands: ``toy``, ``train-teacher`` and ``distill``."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fdistill import recipes, toy
from fdistill.cli.generate import add_config_options, apply_config_options, given_options
from fdistill.cli.options import check_outputs, divergence_list, given, int_list, set_threads
from fdistill.config import (
    PRESETS,
    TEACHER_PRESETS,
    DistillConfig,
    T2IConfig,
    TeacherConfig,
    apply_preset,
    apply_teacher_preset,
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
    p.add_argument(
        "--hidden", type=int, default=None, help="MLP width (default 64; 128 before 2026-12)"
    )
    p.add_argument(
        "--depth", type=int, default=None, help="MLP residual blocks (default 2; 3 before 2026-12)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the toy's networks are too small to gain from more)",
    )
    p.add_argument("--out", default="runs/toy", help="output folder")
    p.set_defaults(func=run_toy)


def run_toy(args: argparse.Namespace) -> int:
    set_threads(args)
    cfg = toy.ToyConfig(divergence=args.divergence, alpha=args.alpha)
    for key in ("hidden", "depth"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key} must be >= 1, got {value}")
            cfg = replace(cfg, **{key: value})
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
        if not 0 <= args.start_modes <= cfg.n_modes:
            raise ValueError(
                f"--start-modes must be in [0, {cfg.n_modes}] (0: from scratch), "
                f"got {args.start_modes}"
            )
        cfg = replace(cfg, start_modes=args.start_modes)
    if args.weight_spread is not None:
        if not args.weight_spread >= 1 or args.weight_spread == float("inf"):
            raise ValueError(
                f"--weight-spread must be a finite number >= 1, got {args.weight_spread}"
            )
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


def _add_run_options(p: argparse.ArgumentParser, out: str) -> None:
    """What every training command has beside its configuration: the run folder and resume."""
    p.add_argument("--out", default=out, help=f"run folder (default {out})")
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
    p.add_argument("--threads", type=int, help="torch CPU threads per process")


def add_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train an EDM diffusion teacher on images",
        description="Train an EDM-preconditioned denoiser (UNet or MLP) on an image data set. "
        "Writes checkpoint.pt, config.json, metrics.jsonl and grids/*.png into --out. Runs as "
        "one process or under torchrun (DDP). Every option not given takes the preset's value.",
    )
    p.add_argument(
        "--preset",
        choices=(*TEACHER_PRESETS, "none"),
        default="digits",
        help="settings laid over the defaults (default digits: small CPU runs; none: the "
        "plain defaults); explicit options override it",
    )
    net = p.add_argument_group("network (overrides of the architecture's defaults)")
    net.add_argument("--channels", type=int, help="UNet base channels / MLP hidden width")
    net.add_argument("--channel-mult", type=int_list, metavar="M1,M2,...", help="UNet levels")
    net.add_argument("--num-blocks", type=int, help="UNet residual blocks per level")
    net.add_argument("--depth", type=int, help="MLP residual blocks")
    net.add_argument("--label-dropout", type=float, help="UNet label dropout, for guidance")
    add_config_options(
        p, TeacherConfig, apply_teacher_preset(TeacherConfig(), "digits"), groups=_LOOP_GROUP
    )
    _add_run_options(p, "runs/teacher")
    p.set_defaults(func=run_train_teacher)


_LOOP_GROUP = {"train.": "training loop"}


def _network_overrides(args: argparse.Namespace, arch: str) -> dict:
    if arch == "unet":
        if args.depth is not None:
            raise ValueError("--depth is an MLP option; the UNet takes --num-blocks")
        return given(
            model_channels=args.channels,
            channel_mult=args.channel_mult,
            num_blocks=args.num_blocks,
            label_dropout=args.label_dropout,
        )
    unet_only = given(
        channel_mult=args.channel_mult, num_blocks=args.num_blocks, label_dropout=args.label_dropout
    )
    if unet_only:
        raise ValueError(f"--arch mlp takes no UNet option ({', '.join(unet_only)})")
    return given(hidden=args.channels, depth=args.depth)


def run_train_teacher(args: argparse.Namespace) -> int:
    cfg = TeacherConfig()
    if args.preset != "none":
        cfg = apply_teacher_preset(cfg, args.preset)
    cfg = apply_config_options(cfg, args, "teacher training")
    cfg = replace(cfg, model=_network_overrides(args, cfg.arch))
    data = cfg.data if Path(cfg.data).exists() else None  # not a built-in name
    check_outputs({}, {"--data": data}, {"--out": args.out})
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
        "matching + GAN loss. Writes checkpoint.pt, config.json, metrics.jsonl, grids/. "
        "Every option not given takes the preset's value.",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="an fdistill teacher run or export, an NVlabs EDM .pkl, or a diffusers folder",
    )
    p.add_argument(
        "--preset",
        choices=(*PRESETS, "none"),
        default="digits",
        help="settings laid over the defaults: paper Table 5 with the official code's "
        "discriminator (cifar10, imagenet64, t2i) or small CPU runs (digits, the default); "
        "none: the plain defaults; explicit options override it",
    )
    p.add_argument("--lr", type=float, help="learning rate of both optimisers")
    add_config_options(
        p,
        T2IConfig,
        apply_preset(DistillConfig(), "digits"),
        skip={"teacher"},
        groups={
            "loss.": "f-distill loss",
            "train.": "training loop",
            **{k: _TEXT_GROUP for k in ("prompts", "latent_cache", "grad_checkpointing")},
            "encode_batch": _TEXT_GROUP,
        },
    )
    _add_run_options(p, "runs/distill")
    p.set_defaults(func=run_distill)


_TEXT_GROUP = "text-to-image (a Stable Diffusion pipeline as --teacher)"


def run_distill(args: argparse.Namespace) -> int:
    text = ("prompts",) in given_options(args) or is_text_teacher(args.teacher)
    cfg = (T2IConfig if text else DistillConfig)(teacher=args.teacher)
    if args.preset != "none":
        cfg = apply_preset(cfg, args.preset)
    if args.lr is not None:
        cfg = replace(cfg, train=replace(cfg.train, lr_gen=args.lr, lr_critic=args.lr))
    cfg = apply_config_options(
        cfg, args, "an image teacher (text-to-image options need a Stable Diffusion --teacher)"
    )
    inputs = {"--teacher": cfg.teacher, "--data": cfg.data if cfg.data else None}
    if text:
        inputs |= {"--prompts": cfg.prompts, "--latent-cache": cfg.latent_cache}
    if inputs["--data"] and not Path(inputs["--data"]).exists():
        inputs["--data"] = None  # a built-in name
    check_outputs({}, inputs, {"--out": args.out})
    set_threads(args)
    res = recipes.distill_run(
        cfg, args.out, resume=args.resume or args.resume_or_start, start_fresh=args.resume_or_start
    )
    print(f"distill ({cfg.divergence}): {res.steps} steps in {res.seconds:.0f} s -> {res.out}")
    return 0
