"""File-system checks run before long jobs, so a bad output path fails in seconds, not hours."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable(path: str | os.PathLike, what: str, *, is_file: bool = False) -> Path:
    """Check that outputs can be written at ``path``; return it as a ``Path``.

    ``path`` is an output folder, or with ``is_file=True`` an output file whose parent folder
    is checked. Missing folders are created (as the run would create them) and kept; a probe
    file is then created and removed in the folder. Any failure is a one-line ``ValueError``
    naming ``what`` (the option, e.g. ``"--out"``), the path and the reason.
    """
    path = Path(path)
    if is_file and path.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a folder; pass the path of a file to write")
    folder = path.parent if is_file else path
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {str(folder)!r} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"{what}: cannot create folder {str(folder)!r}: {reason}") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".fdistill-write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"{what}: folder {str(folder)!r} is not writable: {reason}") from e
    return path
