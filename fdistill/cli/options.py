"""Option types and option groups the commands share; argparse lives in this package only,
the library receives plain values and dataclasses."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def check_outputs(
    files: dict[str, str | None],
    inputs: dict[str, str | None] | None = None,
    folders: dict[str, str | None] | None = None,
) -> None:
    """Before any work: refuse an output (``files`` / ``folders``: option -> path) that is,
    holds or sits inside an input of the command (a checkpoint, a run folder's files, data,
    prompts), and an output that cannot be written; one line naming both options."""
    from fdistill.fsutil import check_outputs as refuse_clobbering
    from fdistill.fsutil import check_writable

    ins: dict[str, str | None] = {}
    for flag, path in (inputs or {}).items():
        ins[flag] = path
        if path and Path(path).is_file() and Path(path).name == "checkpoint.pt":
            ins[f"{flag} (its run folder)"] = str(Path(path).parent)
    refuse_clobbering({**files, **(folders or {})}, ins)
    for flag, path in files.items():
        if path:
            check_writable(path, flag, is_file=True)
    for flag, path in (folders or {}).items():
        if path:
            check_writable(path, flag)


def one_process(what: str) -> None:
    """Refuse to run ``what`` under torchrun: every rank would write the same files."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} runs in one process; run it without torchrun")


def set_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU threads (N >= 1)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {n}")
    import torch

    torch.set_num_threads(n)
