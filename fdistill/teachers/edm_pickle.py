"""NVlabs EDM network pickles (``edm-*.pkl``, ``network-snapshot-*.pkl``), read without running
the code they carry.

EDM saves each network as a *persistent object*: the pickle holds the source code of the
network's module and, on a normal ``pickle.load``, compiles and executes it. Here a restricted
unpickler rebuilds only data: tensors, ``OrderedDict``, numpy scalars and a
:class:`PersistentRecord` for each EDM object (its class name, constructor arguments,
attributes and flat state dict). The embedded source is kept as text and never compiled.
The records are then mapped onto fdistill's own networks (``SongUNet``, ``DhariwalUNet``) and
preconditioning (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``), and the weights loaded strictly.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fdistill.denoisers.edm import EDMPrecond, VEPrecond, VPPrecond
from fdistill.denoisers.registry import build_denoiser, build_edm
from fdistill.denoisers.songunet import NETWORKS as _NETWORK_CLASSES
from fdistill.teachers.registry import TeacherFormat, TeacherInfo, register_format
from fdistill.userfiles import UserFileError, user_file

_MARKER = b"_reconstruct_persistent_obj"  # the global every EDM persistent object reduces to
_HEAD_BYTES = 1 << 16

PRECONDS: dict[str, type[EDMPrecond]] = {
    "EDMPrecond": EDMPrecond,
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
}
# attribute -> EDM's default, for each wrapper: what our preconditioning needs from it
_PRECOND_ATTRS: dict[str, dict[str, float]] = {
    "EDMPrecond": {"sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
    "VEPrecond": {"sigma_min": 0.02, "sigma_max": 100.0},
}
NETWORKS: dict[str, str] = {  # class name -> module that defines it
    name: cls.__module__ for name, cls in _NETWORK_CLASSES.items()
}
# EDM's generate.py clips the network's own range to this sampling range
_SAMPLE_SIGMA_MIN, _SAMPLE_SIGMA_MAX = 0.002, 80.0


class UnsafePickleError(ValueError):
    """The pickle asked for a global outside the allowed set (it would run code)."""


@dataclass
class PersistentRecord:
    """What an EDM persistent object (``torch_utils.persistence``) holds, as plain data.

    ``attributes`` are the object's public attributes (``sigma_data``, ``sigma_min``,
    ``label_dim``, ``img_resolution``, ``use_fp16``, ``beta_d``...), ``modules`` its
    sub-modules (records or :class:`ModuleDictRecord`), ``state_dict`` every persistent
    parameter and buffer under its ``torch`` state-dict key. ``module_src`` is the embedded
    source, kept as text only.
    """

    class_name: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict, repr=False)
    state_dict: dict[str, Tensor] = field(default_factory=dict, repr=False)
    version: int | None = None
    module_src: str = field(default="", repr=False)

    def get(self, name: str, default: Any = None) -> Any:
        """An attribute, falling back to the constructor's keyword argument, then ``default``."""
        return self.attributes.get(name, self.init_kwargs.get(name, default))


class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict``: records the state pickle hands it."""

    def __init__(self, *args: Any) -> None:
        self.state: dict = {}

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError("ModuleDict state is not a dict")
        self.state = state

    @property
    def state_dict(self) -> dict[str, Tensor]:
        return _flat_state_dict(self.state)


def _flat_state_dict(state: dict) -> dict[str, Tensor]:
    """``nn.Module.state_dict()`` order: own parameters, persistent buffers, then children."""
    out: dict[str, Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{kind} entry {name!r} is not a tensor")
            out[name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord | ModuleDictRecord):
            raise TypeError(f"sub-module {name!r} is a {type(child).__name__}")
        out.update({f"{name}.{k}": v for k, v in child.state_dict.items()})
    return out


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: data only."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise TypeError("persistent object without a state dict")
    state = meta["state"]
    src = meta.get("module_src", "")
    return PersistentRecord(
        class_name=str(meta.get("class_name", "")),
        init_args=tuple(state.get("_init_args") or ()),
        init_kwargs=dict(state.get("_init_kwargs") or {}),
        attributes={k: v for k, v in state.items() if not k.startswith("_") and k != "training"},
        modules=dict(state.get("_modules") or {}),
        state_dict=_flat_state_dict(state),
        version=meta.get("version"),
        module_src=src if isinstance(src, str) else "",
    )


def _load_from_bytes(data: Any) -> Any:
    """``torch.storage._load_from_bytes`` through torch's own weights-only loader."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError("storage payload is not bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise TypeError("storage payload is not a storage")
    return storage


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` after checking every argument is plain data."""
    ints = (tuple, list)
    if (
        not isinstance(storage, torch.storage.TypedStorage)
        or not isinstance(storage_offset, int)
        or not isinstance(size, ints)
        or not isinstance(stride, ints)
        or not all(isinstance(v, int) for v in (*size, *stride))
        or backward_hooks  # hooks are callables: never accepted
        or metadata  # tensor metadata (conj/neg bits) is not used by EDM's weights
    ):
        raise TypeError("unexpected arguments to _rebuild_tensor_v2")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, tuple(size), tuple(stride), bool(requires_grad), None
    )


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Tensor:
    """A parameter comes back as its plain tensor (a state-dict value)."""
    if not isinstance(data, Tensor) or backward_hooks:
        raise TypeError("unexpected arguments to _rebuild_parameter")
    return data.detach()


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar`` for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise TypeError("numpy scalar of an object dtype or without raw bytes")
    if len(data) != dtype.itemsize:
        raise TypeError("numpy scalar payload of the wrong size")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(obj, str):
        raise TypeError("numpy dtype from something other than a type string")
    return np.dtype(obj, align=bool(align), copy=bool(copy))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
}


class _Sealed:
    """An allowed function as the unpickler hands it out: pickle's BUILD opcode can set
    attributes on any object on its stack, so functions and classes are never handed out
    themselves (that would let one file change them for the next)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("sealed")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path
        # NEWOBJ needs a real class: a throw-away subclass per file
        self._module_dict = type("ModuleDict", (ModuleDictRecord,), {})

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load global '{module}.{name}' (allowed: tensors, "
                "OrderedDict, numpy scalars and EDM persistent objects); EDM pickles are read "
                "without running any code from the file"
            )
        if fn is ModuleDictRecord:
            return self._module_dict
        if fn is collections.OrderedDict:  # a built-in type: its attributes cannot be set
            return fn
        return _Sealed(fn)


def read_edm_pickle(path: str | Path) -> dict:
    """Read an EDM pickle as data: its top-level dict with each network a
    :class:`PersistentRecord` (a pickle holding a bare network comes back as ``{'ema': it}``).

    No code from the file runs. A global outside the allowed set raises
    :class:`UnsafePickleError` (a ``ValueError``); a truncated or corrupt file a one-line
    ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle '{path}' does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # any failure while rebuilding the data means a bad file
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: not a readable EDM network pickle (truncated or corrupt: "
            f"{type(e).__name__}{': ' + msg if msg else ''})"
        ) from None
    if isinstance(obj, PersistentRecord):
        return {"ema": obj}
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, not EDM's dict of networks or a network"
        )
    return obj


def is_edm_pickle(path: Path) -> bool:
    """A pickle (protocol 2-5 header, so not a zip like ``torch.save`` files) that names
    EDM's persistent-object loader near its start. Never raises."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return False
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and _MARKER in head


# ---------------------------------------------------------------------------- the family


def _plain(v: Any) -> Any:
    """JSON-able copy: numpy scalars to Python numbers, tuples to lists."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, PersistentRecord):
        return v.class_name
    return v


def _config_from_record(rec: PersistentRecord, where: str) -> dict:
    """Our model config for an EDM wrapper record."""
    if rec.class_name not in PRECONDS:
        raise ValueError(
            f"{where}: EDM preconditioning '{rec.class_name}' is not supported; "
            f"supported: {', '.join(PRECONDS)}"
        )
    precond_kwargs = {
        k: _plain(rec.get(k, default)) for k, default in _PRECOND_ATTRS[rec.class_name].items()
    }
    model = rec.modules.get("model")
    if isinstance(model, PersistentRecord) and not model.init_args:
        network, network_kwargs = model.class_name, dict(model.init_kwargs)
    else:  # what EDM's wrappers pass to globals()[model_type](...)
        network = rec.init_kwargs.get("model_type", "DhariwalUNet")
        skip = {"model_type", "img_resolution", "img_channels", "label_dim", "use_fp16"}
        skip |= set(_PRECOND_ATTRS[rec.class_name]) | {"sigma_min", "sigma_max", "sigma_data"}
        network_kwargs = {k: v for k, v in rec.init_kwargs.items() if k not in skip}
        channels = rec.get("img_channels")
        network_kwargs.update(
            img_resolution=rec.get("img_resolution"),
            in_channels=channels,
            out_channels=channels,
            label_dim=rec.get("label_dim", 0),
        )
    if network not in NETWORKS:
        raise ValueError(
            f"{where}: EDM network class '{network}' is not supported; "
            f"supported: {', '.join(NETWORKS)}"
        )
    return {
        "type": "edm",
        "precond": rec.class_name,
        "precond_kwargs": precond_kwargs,
        "network": network,
        "network_kwargs": _plain(network_kwargs),
    }


def _describe(v: Any) -> Any:
    if isinstance(v, PersistentRecord):
        return (
            f"{v.class_name}({', '.join(f'{k}={x!r}' for k, x in _plain(v.init_kwargs).items())})"
        )
    return _plain(v) if isinstance(v, dict | list | tuple | int | float | str) else type(v).__name__


def _sampling_range(model: EDMPrecond, rec: PersistentRecord) -> tuple[float, float]:
    lo, hi = getattr(model, "sigma_min", None), getattr(model, "sigma_max", None)
    lo = float(rec.get("sigma_min", 0.0) if lo is None else lo)
    hi = float(rec.get("sigma_max", math.inf) if hi is None else hi)
    return max(lo, _SAMPLE_SIGMA_MIN), min(hi, _SAMPLE_SIGMA_MAX)


# Bounds on what an EDM network's kwargs may declare: far above every published network
# (EDM's largest: ImageNet-64 ADM, 192 channels, mult up to 4, 3 blocks) and far below what
# would take seconds or gigabytes to build.
_KWARG_LIMITS = {
    "img_resolution": 4096,
    "in_channels": 64,
    "out_channels": 64,
    "label_dim": 100_000,
    "model_channels": 4096,
    "num_blocks": 64,
    "augment_dim": 1024,
    "channel_mult_noise": 64,
    "channel_mult_emb": 64,
}
_MAX_LIST = 64


def check_network_kwargs(config: dict, path: Path) -> None:
    """One-line ``UserFileError`` for network kwargs no real EDM network has (negative or huge
    sizes, huge lists), checked before the network is built even on the ``meta`` device."""
    kw = config.get("network_kwargs")
    if not isinstance(kw, dict):
        raise UserFileError(path, "the network's init_kwargs are not a dict")
    for k, v in kw.items():
        if isinstance(v, list | tuple):
            if len(v) > _MAX_LIST:
                raise UserFileError(path, f"network kwarg {k} is a list of {len(v)} values")
            values = v
        else:
            values = [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, int):
                continue
            limit = _KWARG_LIMITS.get(k, 1 << 20)
            if not 0 <= x <= limit:
                raise UserFileError(
                    path, f"network kwarg {k}={x} is outside 0..{limit}; a crafted or corrupt file"
                )
    mult = kw.get("channel_mult") or [1]
    if isinstance(mult, list | tuple) and all(isinstance(m, int) for m in mult):
        widest = int(kw.get("model_channels") or 0) * max([1, *mult])
        if widest > _KWARG_LIMITS["model_channels"] * 4:
            raise UserFileError(path, f"the network declares {widest} channels at its widest")


def load_edm_pickle(path: str | Path, key: str = "ema") -> EDMPrecond:
    """The network under ``key`` of an EDM pickle as a denoiser with ``.info`` and ``.config``.

    ``use_fp16`` networks are loaded in float32 (said in ``info.details``).
    """
    path = Path(path)
    data = read_edm_pickle(path)
    rec = data.get(key)
    if not isinstance(rec, PersistentRecord):
        nets = [k for k, v in data.items() if isinstance(v, PersistentRecord)]
        raise ValueError(
            f"{path}: no network under key '{key}'; networks in this pickle: "
            f"{', '.join(map(str, nets)) or 'none'}"
        )
    config = _config_from_record(rec, str(path))
    state = {
        ("net." + k[len("model.") :] if k.startswith("model.") else k): v.float()
        if v.is_floating_point()
        else v
        for k, v in rec.state_dict.items()
    }
    # Validate what the file declares against the weights it holds before any real memory
    # is allocated: a small pickle declaring a huge network must fail here, not after
    # building it (a 1 MB file could otherwise allocate gigabytes of random weights).
    check_network_kwargs(config, path)
    with user_file(path, f"cannot build {config['network']}:"), torch.device("meta"):
        mine = build_denoiser(config).state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    wrong = [k for k in mine if k in state and mine[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: the weights do not fit {config['network']}: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of "
            f"another shape {wrong[:3]}"
        )
    with user_file(path, f"cannot build {config['network']}:"):
        model = build_denoiser(config)
    model.load_state_dict(state, strict=True)

    try:
        label_dim = int(rec.get("label_dim", 0) or 0)
        res, ch = int(rec.get("img_resolution")), int(rec.get("img_channels"))
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: {rec.class_name} lacks integer img_resolution/img_channels/label_dim"
        ) from None
    use_fp16 = bool(rec.get("use_fp16", False))
    lo, hi = _sampling_range(model, rec)
    others = {str(k): _describe(v) for k, v in data.items() if k != key}
    model.info = TeacherInfo(
        family="edm-pickle",
        shape=(ch, res, res),
        num_classes=label_dim,
        sigma_min=lo,
        sigma_max=hi,
        sigma_data=float(getattr(model, "sigma_data", 0.5)),
        details={
            "key": key,
            "preconditioning": rec.class_name,
            "network": config["network"],
            "resolution": res,
            "channels": ch,
            "classes": label_dim,
            "init_kwargs": _plain(rec.init_kwargs),
            "parameters": sum(p.numel() for p in model.parameters()),
            "use_fp16": "true (loaded in float32)" if use_fp16 else False,
            "network sigma range": f"{rec.get('sigma_min', lo)} .. {rec.get('sigma_max', hi)}",
            "other keys": others,
        },
    )
    return model


register_format(
    TeacherFormat(
        name="edm-pickle",
        accepts="an NVlabs EDM network pickle (.pkl)",
        detect=is_edm_pickle,
        load=load_edm_pickle,
    )
)

__all__ = [
    "ModuleDictRecord",
    "PersistentRecord",
    "UnsafePickleError",
    "build_edm",
    "is_edm_pickle",
    "load_edm_pickle",
    "read_edm_pickle",
]
