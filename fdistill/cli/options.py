"""Option types and option groups the commands share; argparse lives in this package only,
the library receives plain values and dataclasses."""

from __future__ import annotations

import argparse

from fdistill.divergences import NAMES


def divergence_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown divergence(s) {', '.join(bad)}; valid: {', '.join(NAMES)}"
        )
    return names


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected names separated by commas")
    return names


def lo_hi(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI (e.g. 0,1 or -1,1), got {text!r}"
        ) from None
    return lo, hi


def given(**values) -> dict:
    """The options the user set (argparse leaves the others at None)."""
    return {k: v for k, v in values.items() if v is not None}


def add_loop_options(p: argparse.ArgumentParser, out: str) -> None:
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


def loop_values(args: argparse.Namespace) -> dict:
    return given(
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


def check_outputs(*pairs: tuple[str, str | None]) -> None:
    """Refuse unwritable output files before any work starts."""
    from fdistill.fsutil import check_writable

    for flag, path in pairs:
        if path:
            check_writable(path, flag, is_file=True)


def one_process(what: str) -> None:
    """Refuse to run ``what`` under torchrun: every rank would write the same files."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} runs in one process; run it without torchrun")


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_data_options(p: argparse.ArgumentParser, default: str | None) -> None:
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
        type=lo_hi,
        metavar="LO,HI",
        help="value range of float image arrays (mapped to [-1, 1]); uint8 needs none",
    )
