"""Crafted and corrupt user files: each fails in one line naming the file, leaves it untouched,
and is refused before memory is spent on what it declares."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import sys
import time
import tracemalloc
import types
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fdistill.data import load_dataset
from fdistill.teachers import load_teacher
from fdistill.userfiles import UserFileError, read_json, user_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DIFFUSERS = FIXTURES / "diffusers"


def _digest(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def _copy_fixture(tmp: Path, name: str) -> Path:
    src = DIFFUSERS / name
    if not src.exists():
        pytest.skip(f"fixture folder {src} is absent (a clone without ../shared/fixtures)")
    pytest.importorskip("diffusers")
    dst = tmp / name
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


# ------------------------------------------------------------------------- crafted files


def _npz_header_1tb(tmp: Path) -> Path:
    """An .npz whose images.npy header claims 1 TB, with a few bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (1 << 28, 3, 32, 32)}
    )
    path = tmp / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", b"\x93NUMPY\x01\x00"[:0] + header.getvalue() + b"\0" * 64)
    return path


def _npz_not_zip(tmp: Path) -> Path:
    path = tmp / "garbage.npz"
    path.write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    return path


def _zip_truncated(tmp: Path) -> Path:
    good = tmp / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        buf = io.BytesIO()
        PIL.Image.new("L", (4, 4)).save(buf, "PNG")
        zf.writestr("a.png", buf.getvalue())
    path = tmp / "truncated.zip"
    path.write_bytes(good.read_bytes()[:40])
    return path


def _zip_bomb_member(tmp: Path) -> Path:
    """A zip member declaring 64 MB (deflated to a few KB); the limit is patched to 1 MB."""
    path = tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("img/0.png", b"\0" * (64 << 20))
    return path


def _zip_deep_json(tmp: Path) -> Path:
    path = tmp / "deep.zip"
    buf = io.BytesIO()
    PIL.Image.new("L", (4, 4)).save(buf, "PNG")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", buf.getvalue())
        zf.writestr("dataset.json", '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return path


def _folder_bomb_image(tmp: Path) -> Path:
    """A folder with an image above PIL's bomb limit (the limit is patched down)."""
    root = tmp / "bombs"
    root.mkdir()
    PIL.Image.new("RGB", (64, 64)).save(root / "big.png")
    return root


def _folder_bad_json(tmp: Path) -> Path:
    root = tmp / "edmfolder"
    root.mkdir()
    PIL.Image.new("L", (4, 4)).save(root / "a.png")
    (root / "dataset.json").write_bytes(b'{"labels": [["a.png", 0]')
    return root


def _json_deep(tmp: Path) -> Path:
    path = tmp / "deep.json"
    path.write_text("[" * 50_000 + "]" * 50_000)
    return path


def _json_not_object(tmp: Path) -> Path:
    path = tmp / "list.json"
    path.write_text("[1, 2]")
    return path


def _json_latin1(tmp: Path) -> Path:
    path = tmp / "latin1.json"
    path.write_bytes(b'{"a": "\xe9"}')
    return path


def _sched_timesteps(tmp: Path) -> Path:
    root = _copy_fixture(tmp, "ddpm_tiny_eps")
    _edit_json(root / "scheduler" / "scheduler_config.json", num_train_timesteps=30_000_000)
    return root


def _unet_config_mismatch(tmp: Path) -> Path:
    root = _copy_fixture(tmp, "ddpm_tiny_eps")
    _edit_json(root / "unet" / "config.json", block_out_channels=[512, 1024])
    return root


def _unet_config_deep(tmp: Path) -> Path:
    root = _copy_fixture(tmp, "ddpm_tiny_eps")
    (root / "unet" / "config.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    return root


def _sd_bad_vocab(tmp: Path) -> Path:
    root = _copy_fixture(tmp, "sd15_tiny")
    pytest.importorskip("transformers")
    (root / "tokenizer" / "vocab.json").write_text("[1, 2, 3]")
    return root


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran')",))


def _sd_code_text_encoder(tmp: Path) -> Path:
    root = _copy_fixture(tmp, "sd15_tiny")
    pytest.importorskip("transformers")
    (root / "text_encoder" / "model.safetensors").unlink()
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(buf.getvalue())
    return root


def _edm_truncated(tmp: Path) -> Path:
    src = FIXTURES / "edm" / "edm_songunet_tiny_cond.pkl"
    if not src.exists():
        pytest.skip("EDM fixtures are absent")
    path = tmp / "truncated.pkl"
    path.write_bytes(src.read_bytes()[:40_000])
    return path


def _load_data(path: Path) -> object:
    return load_dataset(path)


def _load_json(path: Path) -> object:
    return read_json(path)


def _load_teacher(path: Path) -> object:
    return load_teacher(path)


CASES = {
    "npz header claims 1 TB": (_npz_header_1tb, _load_data, "declares"),
    "npz that is no zip": (_npz_not_zip, _load_data, ""),
    "truncated EDM zip": (_zip_truncated, _load_data, "zip"),
    "zip member declaring 64 MB": (_zip_bomb_member, _load_data, "declares"),
    "dataset.json nested 100k deep": (_zip_deep_json, _load_data, "nested"),
    "image above PIL's bomb limit": (_folder_bomb_image, _load_data, "too large"),
    "malformed dataset.json": (_folder_bad_json, _load_data, "JSON"),
    "JSON nested 50k deep": (_json_deep, _load_json, "nested"),
    "JSON that is not an object": (_json_not_object, _load_json, "not an object"),
    "JSON that is not UTF-8": (_json_latin1, _load_json, "UTF-8"),
    "scheduler with 3e7 timesteps": (_sched_timesteps, _load_teacher, "num_train_timesteps"),
    "UNet config not matching weights": (_unet_config_mismatch, _load_teacher, "parameters"),
    "UNet config nested deep": (_unet_config_deep, _load_teacher, "nested"),
    "malformed tokenizer vocabulary": (_sd_bad_vocab, _load_teacher, "tokenizer"),
    "code-carrying text encoder .bin": (_sd_code_text_encoder, _load_teacher, "text encoder"),
    "truncated EDM pickle": (_edm_truncated, _load_teacher, "truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_fails_in_one_line(case, tmp_path, monkeypatch):
    import fdistill.data.loading as loading

    monkeypatch.setattr(loading, "MAX_IMAGE_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    make, load, words = CASES[case]
    path = make(tmp_path)
    before = _digest(path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load(path)
    took = time.perf_counter() - t0
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    assert str(path) in msg, msg
    assert words.lower() in msg.lower(), msg
    assert "weights_only=False" not in msg
    assert _digest(path) == before
    assert took < 10, f"{case} took {took:.1f} s"


# ------------------------------------------------------------------------- memory first


def _fake_persistence(monkeypatch) -> types.ModuleType:
    """A stand-in ``torch_utils.persistence`` whose function pickles by reference."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called here
        return meta

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


def _edm_pickle(path: Path, monkeypatch, **net_kwargs) -> Path:
    mod = _fake_persistence(monkeypatch)

    class Persistent:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return (mod._reconstruct_persistent_obj, (self.meta,))

    kwargs = {
        "img_resolution": 32,
        "img_channels": 3,
        "label_dim": 0,
        "model_type": "SongUNet",
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        **net_kwargs,
    }
    state = {
        "_init_args": (),
        "_init_kwargs": kwargs,
        "sigma_data": 0.5,
        "img_resolution": 32,
        "img_channels": 3,
        "label_dim": 0,
        "_parameters": {},
        "_buffers": {},
        "_modules": {},
    }
    meta = {"type": "class", "version": 6, "module_src": "", "class_name": "EDMPrecond"}
    obj = {"ema": Persistent({**meta, "state": state})}
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"model_channels": 2048, "channel_mult": [1, 2, 2, 2], "num_blocks": 4}, "do not fit"),
        ({"model_channels": 10**7}, "outside"),
        ({"num_blocks": 10**6}, "outside"),
    ],
)
def test_edm_pickle_declaring_a_huge_network_is_refused_before_it_is_built(
    tmp_path, monkeypatch, kwargs, words
):
    path = _edm_pickle(tmp_path / "huge.pkl", monkeypatch, **kwargs)
    assert path.stat().st_size < 10_000
    before = _digest(path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=words) as info:
            load_teacher(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert peak < 50 << 20, f"peak {peak / 2**20:.0f} MiB before refusing"
    assert _digest(path) == before


def test_npz_header_is_checked_before_numpy_allocates(tmp_path):
    path = _npz_header_1tb(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="declares"):
            load_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_zip_members_are_streamed_with_their_size_checked(tmp_path, monkeypatch):
    import fdistill.data.loading as loading

    monkeypatch.setattr(loading, "MAX_IMAGE_FILE_BYTES", 1 << 20)
    path = _zip_bomb_member(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="declares"):
            load_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_tokenizer_config_without_model_max_length_gets_clip_context(tmp_path):
    root = _copy_fixture(tmp_path, "sd15_tiny")
    pytest.importorskip("transformers")
    _edit_json(root / "tokenizer" / "tokenizer_config.json", model_max_length=None)
    teacher = load_teacher(root)
    assert teacher.components.tokenizer.model_max_length == 77
    assert tuple(teacher.null_cond.shape[1:2]) == (77,)


def test_user_file_never_suggests_running_code(tmp_path):
    path = tmp_path / "cache.pt"
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(UserFileError) as info, user_file(path, "latent cache:"):
        torch.load(path, weights_only=True)
    msg = str(info.value)
    assert "weights_only" not in msg and str(path) in msg and "\n" not in msg


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("Error(s) in loading state_dict for X:\n\tsize mismatch for w"),
        RecursionError("maximum recursion depth exceeded"),
        MemoryError(),
        TypeError("'NoneType' object is not subscriptable"),
        AttributeError("'list' object has no attribute 'get'"),
        KeyError("step"),
        zipfile.BadZipFile("File is not a zip file"),
        Exception("Error while initializing BPE"),
        PIL.Image.DecompressionBombError("Image size (1 pixels) exceeds limit"),
    ],
)
def test_user_file_makes_every_exception_one_line(tmp_path, exc):
    path = tmp_path / "file.bin"
    with pytest.raises(UserFileError) as info, user_file(path):
        raise exc
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_user_file_keeps_interrupts_and_missing_files(tmp_path):
    with pytest.raises(KeyboardInterrupt), user_file(tmp_path / "x"):
        raise KeyboardInterrupt
    with pytest.raises(FileNotFoundError), user_file(tmp_path / "x"):
        open(tmp_path / "x")
