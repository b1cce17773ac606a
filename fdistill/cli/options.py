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


def given(**values) -> dict:
    """The options the user set (argparse leaves the others at None)."""
    return {k: v for k, v in values.items() if v is not None}


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
