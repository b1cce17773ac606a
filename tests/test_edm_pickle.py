"""NVlabs EDM pickles: read safely (no code from the file runs) and reproduce EDM's own outputs.

References are independent of the code under test: ``*_ref.npz`` and ``*_state_dict.txt`` were
written by NVlabs/edm itself (see the fixtures' README), and the safety tests check for the
side effects that a normal ``pickle.load`` would have.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fdistill.teachers import detect_format, load_teacher
from fdistill.teachers.edm_pickle import (
    PersistentRecord,
    UnsafePickleError,
    is_edm_pickle,
    read_edm_pickle,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "edm"
NETS = ["songunet", "dhariwal"]
MODULES = {"songunet": "fdistill.denoisers.songunet", "dhariwal": "fdistill.denoisers.dhariwal"}


def _fixture(name: str) -> Path:
    p = FIXTURES / f"edm_{name}_tiny_cond.pkl"
    if not p.exists():
        pytest.skip(f"EDM fixture {p} is absent (shared fixtures not checked out)")
    return p


def _need_network(name: str) -> None:
    pytest.importorskip(MODULES[name], reason=f"{MODULES[name]} is not available")


def _max_rel(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(b).to(a.dtype)
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- reading the format


@pytest.mark.parametrize("name", NETS)
def test_state_dict_matches_edm_listing(name):
    """Every key, shape and dtype EDM's own state_dict() listed, in its order."""
    path = _fixture(name)
    data = read_edm_pickle(path)
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    rec = data["ema"]
    assert isinstance(rec, PersistentRecord) and rec.class_name == "EDMPrecond"
    lines = (FIXTURES / f"edm_{name}_tiny_cond_state_dict.txt").read_text().splitlines()
    n_tensors, n_elems = (int(s.split()[0]) for s in lines[0].split(";")[1].split(","))
    listed = [line.split("\t") for line in lines[1:] if line.strip()]
    sd = rec.state_dict
    assert list(sd) == [k for k, _, _ in listed]
    for k, shape, dtype in listed:
        assert str(tuple(sd[k].shape)) == shape and str(sd[k].dtype) == dtype, k
    assert len(sd) == n_tensors and sum(t.numel() for t in sd.values()) == n_elems
    # every tensor is data: finite, no autograd state, no hooks
    assert all(torch.isfinite(t).all() and not t.requires_grad for t in sd.values())
    # the wrapper's attributes and constructor arguments (see *_structure.txt)
    assert rec.get("sigma_data") == 0.5 and rec.get("label_dim") == 10
    assert rec.get("sigma_max") == math.inf and rec.get("img_resolution") == 8
    assert rec.init_kwargs["model_type"] == ("SongUNet" if name == "songunet" else "DhariwalUNet")
    assert rec.module_src.startswith("# Copyright (c) 2022, NVIDIA")
    assert data["augment_pipe"].init_kwargs["p"] == 0.12
    assert data["dataset_kwargs"]["resolution"] == 8


@pytest.mark.parametrize("name", NETS)
def test_fixture_is_detected_as_edm_pickle(name):
    assert detect_format(_fixture(name)).name == "edm-pickle"


# ---------------------------------------------------------------------- EDM's own outputs


@pytest.mark.parametrize("name", NETS)
def test_fixture_reproduces_edm_outputs(name):
    _need_network(name)
    path = _fixture(name)
    ref = np.load(FIXTURES / f"edm_{name}_tiny_cond_ref.npz")
    d = load_teacher(path)
    assert not d.training and not any(p.requires_grad for p in d.parameters())
    x, sigma = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"])
    labels = torch.from_numpy(ref["labels"])
    ids = torch.from_numpy(ref["class_idx"])
    errs = {}
    with torch.no_grad():
        errs["D"] = _max_rel(d(x, sigma, labels), ref["D"])
        errs["D ids"] = _max_rel(d(x, sigma, ids), ref["D"])
        zero = torch.zeros_like(labels)
        errs["D_zero_labels"] = _max_rel(d(x, sigma, zero), ref["D_zero_labels"])
        for i, s in enumerate(ref["sigma_grid"].tolist()):
            errs[f"D_grid[{s}]"] = _max_rel(d(x, s, labels), ref["D_grid"][i])
        c_skip, _, _, c_noise = d.coefficients(sigma)
    errs["c_skip"] = _max_rel(c_skip, ref["c_skip"])
    errs["c_noise"] = _max_rel(c_noise, ref["c_noise"])
    assert max(errs.values()) < 1e-5, errs
    # integer ids and their one-hot rows are the same conditioning
    with torch.no_grad():
        torch.testing.assert_close(d(x, sigma, ids), d(x, sigma, labels), rtol=0, atol=0)


@pytest.mark.parametrize("name", NETS)
def test_loaded_teacher_info_and_config_rebuild(name):
    _need_network(name)
    from fdistill.denoisers.registry import copy_denoiser

    d = load_teacher(_fixture(name))
    info = d.info
    assert info.family == "edm-pickle" and info.shape == (3, 8, 8) and info.num_classes == 10
    assert (info.sigma_min, info.sigma_max, info.sigma_data) == (0.002, 80.0, 0.5)
    det = info.details
    assert det["preconditioning"] == "EDMPrecond" and det["classes"] == 10
    assert det["network"] == ("SongUNet" if name == "songunet" else "DhariwalUNet")
    listed = (FIXTURES / f"edm_{name}_tiny_cond_state_dict.txt").read_text().splitlines()[0]
    n_buffers = sum(b.numel() for b in d.buffers())  # resampling filters
    assert det["parameters"] + n_buffers == int(listed.split(",")[1].split()[0])
    assert det["use_fp16"] is False and set(det["other keys"]) == {
        "loss_fn",
        "augment_pipe",
        "dataset_kwargs",
    }
    cfg = d.config
    assert cfg["type"] == "edm" and cfg["precond"] == "EDMPrecond"
    assert cfg["precond_kwargs"] == {"sigma_data": 0.5}
    import json

    assert json.loads(json.dumps(cfg)) == cfg
    # the config rebuilds the architecture: a copy (dropout off) computes the same function
    ref = np.load(FIXTURES / f"edm_{name}_tiny_cond_ref.npz")
    twin = copy_denoiser(d).eval()
    assert twin.config["network_kwargs"]["dropout"] == 0.0
    x, sigma = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"])
    with torch.no_grad():
        assert _max_rel(twin(x, sigma, torch.from_numpy(ref["labels"])), ref["D"]) < 1e-5


# ---------------------------------------------------------------------- crafted pickles


def _fake_persistence(monkeypatch) -> types.ModuleType:
    """A stand-in ``torch_utils.persistence`` so the test can *write* EDM-style pickles."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by the loader
        raise AssertionError("the loader called EDM's reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


class _Persistent:
    """Pickles as EDM's persistent objects do: ``(_reconstruct_persistent_obj, (meta,))``."""

    def __init__(self, fn, class_name, state, module_src="x = 1\n"):
        self.fn, self.meta = (
            fn,
            dict(
                type="class", version=6, module_src=module_src, class_name=class_name, state=state
            ),
        )

    def __reduce__(self):
        return (self.fn, (self.meta,))


def _module_state(params=None, modules=None, **attrs):
    state = dict(training=False, _parameters=dict(params or {}), _buffers={})
    state.update(_non_persistent_buffers_set=set(), _modules=dict(modules or {}))
    state.update(_init_args=(), _init_kwargs=attrs.pop("init_kwargs", {}))
    state.update(attrs)
    return state


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested"])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, how):
    marker = tmp_path / "ran"
    if how == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    else:
        payload = _Evil(exec, f"open({str(marker)!r}, 'w').close()")
    if how == "nested":  # deep inside an otherwise well-formed EDM pickle, so it is detected
        fn = _fake_persistence(monkeypatch)._reconstruct_persistent_obj
        payload = {"ema": _Persistent(fn, "EDMPrecond", _module_state(evil=payload))}
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError) as e:
        read_edm_pickle(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused to load global" in msg
    assert ("exec" in msg) if how != "os.system" else ("system" in msg)
    if how == "nested":
        with pytest.raises(ValueError, match="refused to load global 'builtins.exec'"):
            load_teacher(path)
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    fn = _fake_persistence(monkeypatch)._reconstruct_persistent_obj
    src = f"open({str(marker)!r}, 'w').write('ran')\nclass EDMPrecond: pass\n"
    w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    inner = _Persistent(fn, "Linear", _module_state({"weight": w, "bias": None}), src)
    outer = _Persistent(
        fn, "EDMPrecond", _module_state(modules={"model": inner}, sigma_data=0.25), src
    )
    path = tmp_path / "crafted.pkl"
    path.write_bytes(pickle.dumps({"ema": outer}, protocol=4))
    monkeypatch.delitem(sys.modules, "torch_utils")  # as on a user's machine: no EDM code
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")
    assert is_edm_pickle(path)
    rec = read_edm_pickle(path)["ema"]
    assert not marker.exists()
    assert rec.class_name == "EDMPrecond" and rec.module_src == src
    assert rec.get("sigma_data") == 0.25
    assert list(rec.state_dict) == ["model.weight"]
    assert torch.equal(rec.state_dict["model.weight"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(
    "class_name, model, expect",
    [
        ("iDDPMPrecond", "SongUNet", "preconditioning 'iDDPMPrecond' is not supported"),
        ("EDMPrecond", "MyUNet", "network class 'MyUNet' is not supported"),
    ],
)
def test_unsupported_classes_are_named(tmp_path, monkeypatch, class_name, model, expect):
    fn = _fake_persistence(monkeypatch)._reconstruct_persistent_obj
    inner = _Persistent(fn, model, _module_state(init_kwargs={"img_resolution": 8}))
    outer = _Persistent(
        fn,
        class_name,
        _module_state(modules={"model": inner}, img_resolution=8, img_channels=3, label_dim=0),
    )
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"ema": outer}, protocol=4))
    with pytest.raises(ValueError, match=expect) as e:
        load_teacher(path)
    assert "\n" not in str(e.value) and "supported: " in str(e.value)
    with pytest.raises(ValueError, match="no network under key 'generator'"):
        load_teacher(path, key="generator")


def test_other_files_are_not_edm_pickles(tmp_path):
    zipped = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(3), "note": "_reconstruct_persistent_obj"}, zipped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    noise = tmp_path / "noise.pkl"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.pkl"
    folder.mkdir()
    for p in (zipped, legacy, noise, plain, empty, folder, tmp_path / "missing.pkl"):
        assert not is_edm_pickle(p), p
    for p in (zipped, legacy, noise, plain, folder):
        try:
            assert detect_format(p).name != "edm-pickle", p
        except ValueError:
            pass  # no format claims it


@pytest.mark.parametrize("cut", [0.0005, 0.02, 0.5, 0.999, -1])
def test_truncated_fixture_gives_one_line_error(tmp_path, cut):
    data = _fixture("songunet").read_bytes()
    n = len(data) + cut if cut < 0 else int(len(data) * cut)
    path = tmp_path / "edm_songunet_tiny_cond.pkl"
    path.write_bytes(data[:n])
    with pytest.raises(ValueError) as e:
        read_edm_pickle(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "truncated or corrupt" in msg
    if is_edm_pickle(path):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_teacher(path)


def test_corrupt_tensor_payload_gives_one_line_error(tmp_path):
    """Bytes flipped inside a storage payload: torch's own loader rejects it, we name the file."""
    data = bytearray(_fixture("dhariwal").read_bytes())
    at = data.index(b"torch.storage") + 200
    data[at : at + 64] = bytes(64)
    path = tmp_path / "bad.pkl"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        read_edm_pickle(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bare_network_pickle_and_missing_file(tmp_path, monkeypatch):
    fn = _fake_persistence(monkeypatch)._reconstruct_persistent_obj
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps(_Persistent(fn, "EDMPrecond", _module_state()), protocol=5))
    assert is_edm_pickle(path) and read_edm_pickle(path)["ema"].class_name == "EDMPrecond"
    with pytest.raises(FileNotFoundError):
        read_edm_pickle(tmp_path / "nope.pkl")


# ---------------------------------------------------------------------- VP / VE wrappers


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond"])
def test_vp_ve_pickles_load_with_their_preconditioning(tmp_path, monkeypatch, precond):
    """An EDM-style VP/VE pickle around a SongUNet: D follows EDM's Table 1 in float64."""
    _need_network("songunet")
    from fdistill.denoisers.songunet import SongUNet

    kw = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0, model_channels=16)
    kw.update(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    torch.manual_seed(0)
    raw = SongUNet(**kw)
    for p in raw.parameters():  # output layers start at zero: give every weight a value
        p.data.normal_(0, 0.2)
    attrs = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=True)
    if precond == "VPPrecond":
        attrs.update(beta_d=18.0, beta_min=0.2, M=1000, epsilon_t=1e-5)
    else:
        attrs.update(sigma_min=0.02, sigma_max=100)
    fn = _fake_persistence(monkeypatch)._reconstruct_persistent_obj
    # the raw net's weights as flat parameter names of the inner record (no sub-records)
    inner_state = _module_state(params=raw.state_dict(), init_kwargs=kw)
    inner = _Persistent(fn, "SongUNet", inner_state)
    state = _module_state(modules={"model": inner}, init_kwargs=dict(attrs), **attrs)
    path = tmp_path / f"{precond}.pkl"
    path.write_bytes(pickle.dumps({"ema": _Persistent(fn, precond, state)}, protocol=4))
    d = load_teacher(path)
    assert d.config["precond"] == precond and "float32" in d.info.details["use_fp16"]
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.0, 50.0])
    s = sigma.double().reshape(-1, 1, 1, 1)
    if precond == "VPPrecond":
        t = ((0.2**2 + 2 * 18.0 * torch.log1p(s**2)).sqrt() - 0.2) / 18.0
        c_out, c_in, c_noise = -s, 1 / (1 + s**2).sqrt(), 999 * t
        assert math.isclose(d.info.sigma_max, 80.0)
        assert d.info.sigma_min == 0.002  # sigma(1e-5) ~ 1.4e-3 is clipped to EDM's sampler's
    else:
        c_out, c_in, c_noise = s, torch.ones_like(s), torch.log(s / 2)
        assert (d.info.sigma_min, d.info.sigma_max) == (0.02, 80.0)
    with torch.no_grad():
        f = raw(x * c_in.float(), c_noise.reshape(-1).float())
        expect = x.double() + c_out * f.double()
        got = d(x, sigma)
    # EDM computes c_noise in float32 as we do; against float64 it moves by ~1e-5
    assert float((got.double() - expect).abs().max() / expect.abs().max()) < 1e-4


def test_a_file_cannot_change_the_loader_for_the_next(tmp_path):
    """pickle's BUILD opcode sets attributes on whatever is on its stack, globals included."""
    import fdistill.teachers.edm_pickle as ep

    defaults = ep._rebuild_tensor_v2.__defaults__
    setstate = ep.ModuleDictRecord.__setstate__
    payloads = {  # hand-written opcodes: GLOBAL, (None, {attr: value}), BUILD, STOP
        "function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00"
        b"__defaults__K\x01\x85s\x86b.",
        "class": b"\x80\x02ctorch.nn.modules.container\nModuleDict\nN}X\x0c\x00\x00\x00"
        b"__setstate__ctorch.storage\n_load_from_bytes\ns\x86b.",
    }
    for what, raw in payloads.items():
        path = tmp_path / f"{what}.pkl"
        path.write_bytes(raw)
        with pytest.raises(ValueError) as e:
            read_edm_pickle(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert ep._rebuild_tensor_v2.__defaults__ == defaults
    assert ep.ModuleDictRecord.__setstate__ is setstate
    if FIXTURES.exists():
        assert len(read_edm_pickle(_fixture("dhariwal"))["ema"].state_dict) == 150


def test_builder_names_what_it_cannot_build():
    from fdistill.denoisers.registry import build_denoiser

    base = {"type": "edm", "network": "SongUNet", "network_kwargs": {}}
    with pytest.raises(ValueError, match="'iDDPMPrecond' is not supported; supported: EDMPrecond"):
        build_denoiser({**base, "precond": "iDDPMPrecond"})
    with pytest.raises(ValueError, match="'ADMNet' is not supported; supported: SongUNet"):
        build_denoiser({**base, "network": "ADMNet"})


def test_storage_payload_loader_refuses_code():
    """The inner ``_load_from_bytes`` payload goes through torch's weights-only loader."""
    from fdistill.teachers.edm_pickle import _load_from_bytes

    buf = io.BytesIO()
    pickle.dump(_Evil(exec, "raise SystemExit('ran')"), buf, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        _load_from_bytes(buf.getvalue())
