"""Command-line interface: ``fdistill <command> ...`` (also ``python -m fdistill``).

Argument parsing lives in this package only; the library receives plain values and dataclasses.
Every failure a user can cause and fix is one line on stderr and exit code 2 (``--debug`` or
``FDISTILL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from fdistill.cli.train import add_distill, add_toy, add_train_teacher
from fdistill.cli.use import (
    add_demo,
    add_eval,
    add_export,
    add_inspect,
    add_ref_stats,
    add_sample,
)


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

    from fdistill.engine import NonFiniteError

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


__all__ = ["build_parser", "main"]
