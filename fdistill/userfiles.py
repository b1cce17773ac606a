"""One error path for user files: whatever a bad file makes a loader raise becomes one line.

Loading a file a user points at (a teacher, a checkpoint, a data set, a JSON config, a prompt
list) can fail in many ways that have nothing to do with a bug: a state dict that does not fit
its config (``RuntimeError``), JSON or pickles nested thousands deep (``RecursionError``), a
header claiming a terabyte (``MemoryError``), objects of the wrong kind (``TypeError``,
``AttributeError``, ``KeyError``), pickled code (``pickle.UnpicklingError``), decompression
bombs, broken zips, malformed JSON, a bare ``Exception`` from a tokenizer library.
:func:`user_file` turns each into a :class:`UserFileError` (a ``ValueError``) whose message is
one line naming the file and what is wrong, so the command line prints it without a traceback.

Also here: the checks that run *before* allocating for a file (:func:`check_allocation`,
:func:`available_memory`) and :func:`read_json`, which refuses deeply nested or oversized
JSON before parsing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# JSON configs are small (a Stable Diffusion UNet's is ~2 KB, a tokenizer vocabulary ~2 MB);
# anything far larger is not a config.
MAX_JSON_BYTES = 256 << 20
# Real configs nest a handful of levels; 64 leaves room and stays far below the recursion
# limit that json's decoder would hit.
MAX_JSON_DEPTH = 64
_MSG_CHARS = 240


class UserFileError(ValueError):
    """A user-supplied file cannot be loaded; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


def _one_line(text: str, limit: int = _MSG_CHARS) -> str:
    """The first non-empty line of ``text``, shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def reason_for(exc: BaseException) -> str:
    """What an exception raised while loading a file says about the file, in one line.

    Messages that would mislead a user are replaced: torch's ``UnpicklingError`` suggests
    ``weights_only=False``, which would run code from the file, so it is never repeated.
    """
    # Optional imports: PIL is a dependency of the data loaders only.
    try:
        from PIL.Image import DecompressionBombError
    except ImportError:  # pragma: no cover - PIL is installed with fdistill
        DecompressionBombError = ()  # type: ignore[assignment]  # noqa: N806
    msg = _one_line(str(exc))
    if isinstance(exc, RecursionError):
        return "nested too deeply to load (a crafted or corrupt file)"
    if isinstance(exc, MemoryError):
        return "too large to load into the memory of this machine"
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "holds pickled objects other than tensors and plain data (code?); fdistill loads "
            "only weights and plain data from such files"
        )
    if DecompressionBombError and isinstance(exc, DecompressionBombError):
        return "image is too large to decode (a decompression bomb?)"
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a readable zip archive ({msg or 'corrupt'})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError):
        return exc.strerror or msg or type(exc).__name__
    if isinstance(exc, RuntimeError) and "size mismatch" in str(exc):
        return "its weights do not fit the architecture its config describes (size mismatch)"
    if isinstance(exc, RuntimeError) and "state_dict" in str(exc):
        return "its weights do not fit the architecture its config describes (" + msg + ")"
    if "weights_only" in msg:  # never suggest loading with weights_only=False
        return "holds objects other than tensors and plain data"
    if isinstance(exc, ValueError):
        return msg or "invalid content"
    return f"malformed ({type(exc).__name__}{': ' + msg if msg else ''})"


def as_user_error(path: str | os.PathLike, exc: BaseException, what: str = "") -> ValueError:
    """``exc`` (raised while loading ``path``) as a one-line error naming the file.

    A ``ValueError`` whose message is already one line naming the file is returned as is
    (loaders' own messages say more than any generic reason).
    """
    name = str(path)
    if isinstance(exc, UserFileError):
        return exc
    text = str(exc)
    if isinstance(exc, ValueError) and "\n" not in text.strip() and name in text:
        return exc
    reason = reason_for(exc)
    return UserFileError(name, f"{what + ' ' if what else ''}{reason}".strip())


@contextlib.contextmanager
def user_file(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Wrap the loading of a user file: any ``Exception`` becomes a :class:`UserFileError`.

    ``what`` prefixes the reason (e.g. ``"teacher"``). ``FileNotFoundError`` and
    ``PermissionError`` keep their type (callers test for them; their message names the
    path). ``KeyboardInterrupt`` and ``SystemExit`` pass through untouched. Use it as::

        with user_file(path, "checkpoint"):
            ckpt = torch.load(path, weights_only=True)
    """
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if "\n" in str(e).strip():
            raise UserFileError(path, reason_for(e)) from e
        raise
    except Exception as e:  # noqa: BLE001 - that is the point: every failure is one line
        err = as_user_error(path, e, what)
        if err is e:
            raise
        raise err from e


def load_user_file(path: str | os.PathLike, loader, *args: Any, what: str = "", **kw: Any) -> Any:
    """``loader(*args, **kw)`` under :func:`user_file` ``(path, what)``."""
    with user_file(path, what):
        return loader(*args, **kw)


# --------------------------------------------------------------------------- sizes


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (Linux ``MemAvailable``, else the
    free physical pages); ``None`` when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(
    nbytes: int, path: str | os.PathLike, what: str, limit: int | None = None
) -> None:
    """Refuse (one line naming ``path``) an allocation of ``nbytes`` that a file declares,
    before making it: above ``limit`` (when given) or above the memory available now."""
    nbytes = int(nbytes)
    if nbytes < 0:
        raise UserFileError(path, f"{what} declares a negative size")
    if limit is not None and nbytes > limit:
        raise UserFileError(
            path, f"{what} declares {_size(nbytes)}, more than the {_size(limit)} allowed"
        )
    free = available_memory()
    if free is not None and nbytes > free:
        raise UserFileError(
            path, f"{what} declares {_size(nbytes)}, more than the {_size(free)} of memory free"
        )


def declared_nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    """``prod(shape) * itemsize`` in Python integers (no overflow, unlike numpy's)."""
    n = int(itemsize)
    for s in shape:
        n *= int(s)
    return n


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------------- JSON

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text (strings skipped), without parsing."""
    bare = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes | str, source: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text from ``source`` (a file, or a member of one) with its depth checked
    first; any failure is a :class:`UserFileError` naming ``source``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    depth = json_depth(raw)
    if depth > max_depth:
        raise UserFileError(
            source, f"JSON nested {depth} levels deep (at most {max_depth} accepted)"
        )
    with user_file(source):
        return json.loads(raw)


def read_json(
    path: str | os.PathLike,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    *,
    object_only: bool = True,
) -> Any:
    """Read a JSON file safely: size and nesting depth checked before parsing.

    ``object_only`` (default) also requires the top level to be an object (every config is).
    Failures are one-line :class:`UserFileError`\\ s naming the file (``FileNotFoundError``
    for a missing one).
    """
    path = Path(path)
    with user_file(path):
        size = path.stat().st_size
        if size > max_bytes:
            raise UserFileError(path, f"{_size(size)} is too large for a JSON config")
        raw = path.read_bytes()
    data = parse_json(raw, path, max_depth)
    if object_only and not isinstance(data, dict):
        raise UserFileError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "UserFileError",
    "as_user_error",
    "available_memory",
    "check_allocation",
    "declared_nbytes",
    "json_depth",
    "load_user_file",
    "parse_json",
    "read_json",
    "reason_for",
    "user_file",
]
