"""File-system checks run before long jobs, so a bad output path fails in seconds, not hours.

:func:`check_writable` probes an output folder; :class:`RunLock` holds a run folder for one
process; :func:`check_outputs` refuses outputs that would overwrite an input.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Mapping
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


# --------------------------------------------------------------------------- run-folder lock

LOCK_NAME = ".fdistill.lock"


class RunLockedError(ValueError):
    """Another live process holds the run folder (the message names its pid and host)."""


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (signal 0 probes without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _read_holder(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file, or None when it is unreadable or half-written."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        return int(fields["pid"]), fields["host"]
    except (KeyError, ValueError):
        return None


class RunLock:
    """Hold a run folder for one process: ``with RunLock(folder): ...``.

    Entering creates ``folder/.fdistill.lock`` atomically (``O_CREAT | O_EXCL``, so of two
    processes starting together exactly one wins) holding this process's pid and host; leaving
    (also on an exception) removes it. A lock left by a dead process on this host (its pid no
    longer exists) is stale and taken over; one held by a live process, or by any process of
    another host (whose liveness cannot be checked), is refused with a one-line
    :class:`RunLockedError` naming the holder. The folder is created if missing.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "--out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False

    def _stamp(self) -> bytes:
        return f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode()

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` (see the class)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(8):  # a stale lock removed by a rival between tries: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            try:
                os.write(fd, self._stamp())
            finally:
                os.close(fd)
            self.held = True
            return self
        raise RunLockedError(f"{self.what}: could not lock run folder {str(self.folder)!r}")

    def _clear_stale(self) -> None:
        holder = _read_holder(self.path)
        if holder is None:
            # Just created by a rival that has not written its pid yet, or garbage: give a
            # writer a moment, then treat an unreadable lock older than that as stale.
            time.sleep(0.05)
            holder = _read_holder(self.path)
            if holder is None:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    return
                if age < 2.0:
                    raise RunLockedError(
                        f"{self.what}: run folder {str(self.folder)!r} is being locked by "
                        "another process right now; wait for it to finish"
                    )
                self._remove_if_same(None)
                return
        pid, host = holder
        if host == socket.gethostname() and not _pid_alive(pid):
            self._remove_if_same(holder)
            return
        raise RunLockedError(
            f"{self.what}: run folder {str(self.folder)!r} is in use by process {pid} on "
            f"{host} (lock {LOCK_NAME}); wait for it to finish, or delete the lock file if "
            "that process is gone"
        )

    def _remove_if_same(self, holder: tuple[int, str] | None) -> None:
        """Remove the stale lock, unless a rival replaced it since it was read: the stale
        file is first renamed to a name unique to this process, so only one taker removes
        it, and a fresh lock that appeared meanwhile is put back untouched."""
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if _read_holder(grave) != holder:
            try:  # a live rival's fresh lock: put it back (link fails if another exists now)
                os.link(grave, self.path)
            except OSError:
                pass
        with contextlib.suppress(OSError):
            os.remove(grave)

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        if _read_holder(self.path) == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- outputs vs inputs

# What a run or export folder holds that an output must never replace (see fdistill.runs).
RUN_FILES = ("checkpoint.pt", "config.json", "model.safetensors", "fdistill_t2i.json")


def _real(path: str | os.PathLike) -> Path:
    """``path`` made absolute with every symlink resolved (missing tails kept as written)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | None],
) -> None:
    """Refuse, in one ``ValueError`` naming both options, an output that would overwrite or
    clobber an input, before any work. Paths are compared with symlinks resolved.

    * an input file (a checkpoint, a teacher pickle, a prompt list) or an input folder that is
      not a run folder (``--data``, a diffusers teacher): an output equal to it, inside it or
      containing it is refused;
    * an input run folder (holding ``checkpoint.pt`` or ``config.json``): an output equal to
      the folder or containing it is refused, and so is one equal to its ``checkpoint.pt`` or
      ``config.json``; other paths inside it (``RUN/samples``, ``RUN/grid.png``) are allowed.

    ``outputs``/``inputs`` map an option name (``"--out"``, ``"--ckpt"``) to its path;
    ``None`` entries are skipped.
    """
    ins: list[tuple[str, Path, bool]] = []  # (option, path, outputs inside allowed)
    for opt, p in inputs.items():
        if p is None:
            continue
        r = _real(p)
        if _is_run_folder(r):
            ins.append((opt, r, True))
            ins += [(f"{opt} ({name})", r / name, False) for name in RUN_FILES]
        else:
            ins.append((opt, r, False))
    for out_opt, p in outputs.items():
        if p is None:
            continue
        out = _real(p)
        for in_opt, inp, inside_ok in ins:
            if out == inp:
                how = "is"
            elif out in inp.parents:
                how = "contains"
            elif inp in out.parents and not inside_ok:
                how = "is inside"
            else:
                continue
            raise ValueError(
                f"{out_opt} {str(p)!r} {how} the input {in_opt} {str(inp)!r}; choose an output "
                "path outside the inputs"
            )
