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


def _resume_hint(argv: list[str], args: argparse.Namespace) -> str:
    """The command that continues an interrupted training run."""
    if args.command not in ("train-teacher", "distill"):
        return ""
    words = [w for w in argv if w not in ("--resume", "--resume-or-start")]
    return f"; the last checkpoint in {args.out} is intact: resume with: fdistill " + " ".join(
        [*words, "--resume"]
    )


def main(argv: list[str] | None = None) -> int:
    import os

    from fdistill.engine import NonFiniteError, check_device

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FDISTILL_DEBUG", "") not in ("", "0")
    try:
        device = getattr(args, "device", None) or getattr(args, "cfg__device", None)
        if device is not None:
            check_device(device)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"fdistill: interrupted{_resume_hint(argv, args)}", file=sys.stderr)
        return 130
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
        text = " ".join(str(e.strerror or e).split())
        print(f"fdistill: error: {text}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
