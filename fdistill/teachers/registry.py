"""Teacher formats: detect what a path holds and load it as a denoiser.

``load_teacher(path)`` returns an ``nn.Module`` that speaks ``D(x, sigma, cond) -> x0`` and
carries ``.info`` (:class:`TeacherInfo`: shape, classes, sigma range, a description for
``fdistill inspect``) and ``.config`` (rebuilds the architecture through
:func:`fdistill.denoisers.registry.build_denoiser`). A family is one file in this package
that calls :func:`register_format` (and ``register_model`` for its networks); the kind is
detected from the file's content, never from its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fdistill.userfiles import user_file


@dataclass
class TeacherInfo:
    """What the pipeline needs to know about a loaded teacher."""

    family: str  # the format that loaded it, e.g. "fdistill-run", "edm-pickle", "diffusers"
    shape: tuple[int, int, int]  # (C, H, W) of x
    num_classes: int  # 0: unconditional
    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5
    details: dict = field(default_factory=dict)  # architecture, preconditioning, ... (inspect)
    # A discrete-time teacher's schedule (``alphas_cumprod``, ``sigmas``, ``timestep``); None
    # for a continuous-sigma (EDM) teacher. Decides the noise-level sampler and ratio bins.
    schedule: Any = None


@dataclass
class TeacherFormat:
    """A loadable kind of file or folder."""

    name: str
    accepts: str  # what a user passes, for the error listing every format
    detect: Callable[[Path], bool]  # cheap check of the content; must not raise
    load: Callable[..., nn.Module]  # load(path, **options) -> denoiser with .info and .config


_FORMATS: dict[str, TeacherFormat] = {}


def register_format(fmt: TeacherFormat) -> TeacherFormat:
    """Add a format to those :func:`detect_format` tries (a family module calls this)."""
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[TeacherFormat]:
    """Every registered format, in registration order (``fdistill.teachers`` imports each
    family module, so all are registered once any part of the package is imported)."""
    return list(_FORMATS.values())


def detect_format(path: str | Path) -> TeacherFormat:
    """The format whose ``detect`` accepts ``path``; one-line ``ValueError`` otherwise."""
    p = Path(path)
    known = formats()
    if not p.exists():
        raise FileNotFoundError(f"teacher '{path}' does not exist; {accepted(known)}")
    for fmt in known:
        if fmt.detect(p):
            return fmt
    raise ValueError(f"'{path}' is not a teacher fdistill can load; {accepted(known)}")


def accepted(known: list[TeacherFormat] | None = None) -> str:
    """The formats a user may pass, for error messages."""
    return "accepted: " + "; ".join(f.accepts for f in (known or formats()))


def load_teacher(path: str | Path, **options) -> nn.Module:
    """Load ``path`` as a frozen denoiser (eval mode, no weight gradients).

    Every failure caused by the file's content is a one-line ``ValueError``
    (:class:`fdistill.userfiles.UserFileError`) naming the file; a missing path stays a
    ``FileNotFoundError``.
    """
    with user_file(path):
        fmt = detect_format(path)
    if options:
        import inspect

        params = inspect.signature(fmt.load).parameters
        bad = [k for k in options if k not in params]
        if bad:
            raise ValueError(
                f"'{path}' is a {fmt.name} teacher, which takes no option {', '.join(bad)} "
                "(e.g. --raw-teacher applies to fdistill teacher runs only)"
            )
    with user_file(path):
        model = fmt.load(Path(path), **options)
    return model.requires_grad_(False).eval()


__all__ = [
    "TeacherFormat",
    "TeacherInfo",
    "accepted",
    "detect_format",
    "formats",
    "load_teacher",
    "register_format",
]
