"""The run folder: the one module that reads and writes it.

A run folder holds ``checkpoint.pt`` (weights, EMA, optimisers, RNG states, step and the full
config), ``config.json`` (the same config, readable), ``metrics.jsonl`` and ``grids/``. An
*export* folder holds one network as ``model.safetensors`` with a ``config.json`` beside it
(diffusers style), readable without the run or its teacher.

Everything that touches these files lives here: atomic writes (temp file + fsync + rename),
clean-up of temp files an interrupted write left behind, checkpoint loading with one-line
errors, the strict comparison of a saved run's options with a resumed command's, trimming the
metrics log to the checkpoint on resume, and export.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import Tensor, nn

from fdistill.fsutil import RunLock, check_writable
from fdistill.userfiles import as_user_error, read_json

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_FORMAT = "fdistill-export"
_TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write through ``write`` to a temporary file in the same folder, fsync, rename over
    ``path``: a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and _out_of_space(e, Path(path)):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device writing {path}; the previous {Path(path).name} "
                "(if any) is intact: free space and run again (training: add --resume)",
            ) from None
        raise


def _out_of_space(e: Exception, path: Path) -> bool:
    """Whether a failed write ran out of disk space (torch.save reports it as a RuntimeError
    of its zip writer; plain writes as ENOSPC)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("no space" in text or "write failed" in text)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (temporary file + rename)."""
    _atomic_write(path, "w", lambda f: f.write(text))


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files that writes killed mid-way left in ``folder``; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint file; clear error otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at '{path}': pass a run folder written by fdistill "
            f"(containing {CHECKPOINT}) or a checkpoint file"
        )
    return p


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` archive: a zip whose first entry is
    ``<name>/data.pkl`` or similar inside one folder (an ``.npz`` is a zip of ``.npy`` files at
    the top level). Cheap; never raises."""
    try:
        if not (path.is_file() and zipfile.is_zipfile(path)):
            return False
        with zipfile.ZipFile(path) as z:
            first = next(iter(z.infolist()), None)
        return first is not None and "/" in first.filename
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load an fdistill checkpoint safely (``weights_only``); one-line errors naming the file.
    ``mmap`` maps the tensors instead of reading them (cheap when only the config is needed)."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(e):
            raise ValueError(
                f"{p}: refused to load: it holds Python objects beyond tensors, which a "
                "checkpoint written by fdistill never does (nothing from it was run)"
            ) from None
        raise ValueError(f"{p} is not an fdistill checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p} is truncated or not an fdistill checkpoint ({msg})") from None
    except Exception as e:  # noqa: BLE001 - a crafted file: any failure is one line
        raise as_user_error(p, e, "not an fdistill checkpoint:") from None
    if not isinstance(ckpt, dict) or not {"config", "state", "step"} <= set(ckpt):
        raise ValueError(f"{p} is a torch file but not an fdistill checkpoint")
    return ckpt


# --------------------------------------------------------------------------- configs
def read_config(out: str | Path) -> dict:
    """The ``config.json`` of a run or export folder."""
    path = Path(out) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in '{out}'")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def write_config(out: str | Path, config: Mapping) -> None:
    atomic_write_text(json.dumps(config, indent=2, default=str) + "\n", Path(out) / CONFIG)


def as_json(obj):
    """``obj`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(obj, default=str))


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat |= _flatten(v, key + ".")
        else:
            flat[key] = v
    return flat


def option_differences(
    saved: Mapping,
    now: Mapping,
    resumable: Iterable[str] = (),
    legacy: Mapping[str, object] | None = None,
) -> list[str]:
    """``key: saved -> now`` for every option that differs and may not change on resume
    (``resumable``: the dotted keys that may, :func:`fdistill.options.resumable_paths`;
    ``legacy``: dotted key -> the value of an option a run saved before it existed behaved as,
    :func:`fdistill.options.legacy_values`)."""
    a = _flatten(as_json(dict(legacy or {}))) | _flatten(as_json(saved))
    b = _flatten(as_json(now))
    free = set(resumable)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in free or a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


def prepare_out(out: str | Path, resume: bool, start_fresh: bool = False) -> dict | None:
    """Check ``out`` before a run starts; return the saved config when resuming.

    Without ``resume``, a folder that already holds a run is refused. With it, a folder with
    nothing saved is an error unless ``start_fresh`` (``--resume-or-start``). Temp files left
    by an interrupted write are removed either way.
    """
    out = Path(out)
    clean_temp_files(out)
    has = (out / CHECKPOINT).is_file()
    if has and not resume:
        raise ValueError(
            f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it "
            "or choose another --out"
        )
    if not has:
        if resume and not start_fresh:
            raise ValueError(
                f"--resume: nothing to resume in {out} (no {CHECKPOINT}); drop --resume, or "
                "pass --resume-or-start to start a new run when none is saved"
            )
        return None
    return load_checkpoint(out)["config"]


def check_resume(
    saved_options: Mapping,
    now_options: Mapping,
    out: str | Path,
    resumable: Iterable[str] = (),
    legacy: Mapping[str, object] | None = None,
) -> None:
    """Stop with one line listing each option that differs from the saved run's."""
    diffs = option_differences(saved_options, now_options, resumable, legacy)
    if diffs:
        raise ValueError(
            f"--resume: {out} was trained with other options; repeat them or choose another "
            f"--out ({'; '.join(diffs)})"
        )


def merge_resumable(
    saved_options: Mapping, now_options: Mapping, resumable: Iterable[str] = ()
) -> dict:
    """The options a resumed run actually uses: saved ones, with the resumable ones updated."""
    merged = as_json(saved_options)
    now = as_json(now_options)
    for key in resumable:
        parts = key.split(".")
        src, dst = now, merged
        for p in parts[:-1]:
            src, dst = src.get(p, {}), dst.setdefault(p, {})
        if parts[-1] in src:
            dst[parts[-1]] = src[parts[-1]]
    return merged


def resume_options(options: Mapping, **digests: str) -> dict:
    """What a resumed run must match: the options, with the teacher/data given by content."""
    return as_json(options) | {k: v[:16] for k, v in digests.items()}


@contextlib.contextmanager
def claim(out: str | Path, main: bool = True):
    """Hold the run folder ``out`` for this run (the main process takes
    :class:`fdistill.fsutil.RunLock`; a second process on the same folder stops in one line
    naming the holder)."""
    if not main:
        yield
        return
    check_writable(out, "--out")
    with RunLock(out, "--out"):
        yield


def begin(
    out: str | Path,
    resume: bool,
    start_fresh: bool,
    options: dict,
    main: bool,
    resumable: Iterable[str] = (),
    legacy: Mapping[str, object] | None = None,
) -> dict:
    """Check ``out`` before a run (fresh, or a strict resume: every saved option must equal
    ``options`` but the ``resumable`` ones) and return the options the run will use.
    ``main``: the process that writes (checks that the folder is writable)."""
    if main:
        check_writable(out, "--out")
    saved = prepare_out(out, resume, start_fresh)
    if saved is None:
        return options
    if "resume_options" not in saved:
        raise ValueError(
            f"--resume: {out} was written by an older fdistill that did not record its options "
            "for a strict resume; start a new run in another --out"
        )
    check_resume(saved["resume_options"], options, out, resumable, legacy)
    return merge_resumable(saved["resume_options"], options, resumable)


GRIDS = "grids"
TENSORBOARD = "tb"


def open_metrics(out: str | Path) -> IO:
    """``metrics.jsonl`` of a run folder, opened to append one JSON record a line."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return open(path / METRICS, "a")  # noqa: SIM115 - the caller closes it


def tensorboard_dir(out: str | Path) -> Path:
    """Where a run's TensorBoard events go (when tensorboard is installed)."""
    return Path(out) / TENSORBOARD


def grid_path(out: str | Path, step: int) -> Path:
    """The sample grid of training step ``step``."""
    return Path(out) / GRIDS / f"{step:07d}.png"


def trim_metrics(out: str | Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` (written after the checkpoint a resumed
    run restarts from), so every step appears exactly once."""
    path = Path(out) / METRICS
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a line cut by a kill, or not ours
        step_of = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(step_of, int | float) and step_of <= step:
            keep.append(line)
    atomic_write_text("".join(f"{line}\n" for line in keep), path)


# --------------------------------------------------------------------------- digests
def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents), hex."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def tensor_digest(*tensors: Tensor | None) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (None counts as absent)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


# --------------------------------------------------------------------------- export
def state_digest(module: nn.Module) -> str:
    """A digest of a module's weights (names, dtypes, shapes, bytes)."""
    sd = module.state_dict()
    return tensor_digest(*(sd[k] for k in sorted(sd))) + f"/{len(sd)}"


def is_export(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / EXPORT_WEIGHTS).is_file() and (p / CONFIG).is_file()):
        return False
    try:
        return read_config(p).get("format") == EXPORT_FORMAT
    except (ValueError, OSError):
        return False


def write_export(out: str | Path, module: nn.Module, config: Mapping) -> Path:
    """``module``'s weights as safetensors and ``config`` (+ format tag) as JSON in ``out``."""
    out = Path(out)
    if (out / EXPORT_WEIGHTS).exists():
        raise ValueError(f"{out} already holds an export; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _atomic_write(out / EXPORT_WEIGHTS, "wb", lambda f: f.write(_safetensors_bytes(state)))
    write_config(out, {"format": EXPORT_FORMAT, **config})
    return out


def _safetensors_bytes(state: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses tensors that share memory; tied weights are saved as copies.
    return save({k: v.clone() for k, v in state.items()})


def read_export(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(config, state_dict)`` of an export folder; one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not is_export(p):
        raise ValueError(
            f"'{path}' is not an fdistill export (a folder with {EXPORT_WEIGHTS} and a "
            f"{CONFIG} whose format is '{EXPORT_FORMAT}')"
        )
    try:
        state = load_file(str(p / EXPORT_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p / EXPORT_WEIGHTS} is unreadable ({e})") from None
    except Exception as e:  # noqa: BLE001 - a crafted file: any failure is one line
        raise as_user_error(p / EXPORT_WEIGHTS, e) from None
    return read_config(p), state


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "atomic_save",
    "atomic_write_text",
    "check_resume",
    "clean_temp_files",
    "file_digest",
    "is_checkpoint_file",
    "is_export",
    "load_checkpoint",
    "merge_resumable",
    "option_differences",
    "prepare_out",
    "read_config",
    "read_export",
    "resolve_checkpoint",
    "tensor_digest",
    "trim_metrics",
    "write_config",
    "write_export",
]
