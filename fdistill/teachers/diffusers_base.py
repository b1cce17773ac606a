"""What every diffusers teacher shares: the schedule as EDM noise levels, the denoiser base
class, feature taps by hooks, and reading a diffusers folder.

A diffusers model predicts ``eps``, ``v`` or ``x0`` from ``(sqrt(abar_t) x0 + sqrt(1-abar_t)
eps, t)`` on a grid of ``T`` integer timesteps. With ``sigma_t = sqrt((1 - abar_t) / abar_t)``
the same state in the EDM convention is ``x = x0 + sigma_t * eps``, so the network sees
``x / sqrt(1 + sigma^2)`` and an off-grid ``sigma`` gets a timestep interpolated linearly in
``log sigma`` (as diffusers' ``EulerDiscreteScheduler`` does). x0 is never clipped.

:mod:`fdistill.teachers.diffusers_unet` (``UNet2DModel``) and
:mod:`fdistill.teachers.stable_diffusion` (text-conditioned UNets) build on this module;
:mod:`fdistill.teachers.diffusers_folder` registers the folder format over both.
diffusers is imported lazily: fdistill runs without it until such a teacher is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.denoisers.base import (
    FeatureMap,
    Features,
    FeatureTaps,
    GradUntilTaps,
    after_taps,
    sigma_batch,
)
from fdistill.userfiles import UserFileError, parse_json, read_json, user_file

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "rescale_betas_zero_snr",
)
# Real schedules have 1000 (DDPM, Stable Diffusion) to 4000 (iDDPM) training steps; a config
# claiming millions is crafted or corrupt, and its tables would take seconds and gigabytes.
MAX_TRAIN_TIMESTEPS = 100_000
# A safetensors header is a JSON index of the tensors: a few hundred KB for a full SD UNet.
_MAX_SAFETENSORS_HEADER = 100 << 20


def require_diffusers():
    """Import diffusers, or raise the one-line error telling the user how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ValueError(
            "loading a diffusers teacher needs diffusers: pip install 'fdistill[diffusers]'"
        ) from None
    return diffusers


def _high_precision(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the schedule and conversions run in float64.
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------- schedule


def _alpha_bar_betas(n: int, alpha_bar: Callable[[float], float]) -> Tensor:
    """Betas that discretise a continuous ``alpha_bar(t)``, t in [0, 1] (capped at 0.999)."""
    b = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(b, dtype=torch.float64)


def _cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _timesteps(value) -> int:
    """``num_train_timesteps`` checked before any table of that length is made."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"scheduler num_train_timesteps must be an integer, got {value!r}")
    if not 2 <= value <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"scheduler num_train_timesteps {value:g} is outside 2..{MAX_TRAIN_TIMESTEPS} "
            "(real schedules use 1000 to 4000)"
        )
    return int(value)


def alphas_cumprod_from_config(config: Mapping) -> Tensor:
    """``abar_t`` (float64, ``[T]``) for a diffusers scheduler config.

    Reads ``trained_betas`` or ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2,
    sigmoid, laplace) with ``beta_start``/``beta_end``/``num_train_timesteps``, and
    ``rescale_betas_zero_snr`` (whose zero terminal abar becomes 2**-24, as diffusers' Euler
    scheduler does, so every sigma is finite). Computed in float64 from the formulas, so it
    agrees with diffusers' float32 tables to their rounding.
    """
    n = _timesteps(config.get("num_train_timesteps") or 1000)
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    f64 = torch.float64
    if config.get("trained_betas") is not None:
        trained = config["trained_betas"]
        if not isinstance(trained, list | tuple) or len(trained) > MAX_TRAIN_TIMESTEPS:
            raise ValueError(
                f"scheduler trained_betas must be a list of at most {MAX_TRAIN_TIMESTEPS} numbers"
            )
        betas = torch.tensor(list(trained), dtype=f64)
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=f64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=f64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _alpha_bar_betas(n, _cosine)
    elif kind == "laplace":
        betas = _alpha_bar_betas(n, _laplace)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=f64)) * (end - start) + start
    else:
        raise ValueError(
            f"scheduler beta_schedule {kind!r} is not supported; accepted: "
            f"{', '.join(BETA_SCHEDULES)} or trained_betas"
        )
    if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
        raise ValueError("scheduler betas must be a list of at least 2 values in (0, 1)")
    abar = torch.cumprod(1 - betas, 0)
    if config.get("rescale_betas_zero_snr"):
        # Lin et al. 2023, Algorithm 1: shift sqrt(abar) to end at 0, keep its first value.
        s = abar.sqrt()
        s0, s_last = s[0].clone(), s[-1].clone()
        s = (s - s_last) * s0 / (s0 - s_last)
        abar = s**2
        abar[-1] = 2.0**-24
    return abar


class DiscreteSchedule:
    """A DDPM-style schedule seen as EDM noise levels: ``sigma_t = sqrt((1 - abar_t) / abar_t)``.

    Holds float64 tables on the CPU (copied to a device on first use there, never cast to a
    model's dtype). :meth:`timestep` maps any sigma to the continuous timestep the network
    was trained around.
    """

    def __init__(self, config: Mapping) -> None:
        self.config = {k: config.get(k) for k in _SCHEDULE_KEYS}
        if self.config["trained_betas"] is not None:
            self.config["trained_betas"] = [float(b) for b in self.config["trained_betas"]]
        self.alphas_cumprod = alphas_cumprod_from_config(config)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self._on: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _log_sigmas(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._on:
            self._on[key] = self.log_sigmas.to(device=device, dtype=dtype)
        return self._on[key]

    def timestep(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for each sigma: ``t`` linear in ``log sigma`` between grid
        points, sigma clamped to ``[sigma_min, sigma_max]``. Returned in float64 (float32 on
        MPS), same shape and device as ``sigma``."""
        dtype = _high_precision(sigma.device)
        ls = self._log_sigmas(sigma.device, dtype)
        log_s = sigma.detach().to(dtype).log().clamp(ls[0], ls[-1])
        lo = (torch.searchsorted(ls, log_s.reshape(-1), right=True) - 1).clamp(0, len(ls) - 2)
        lo = lo.reshape(log_s.shape)
        w = ((log_s - ls[lo]) / (ls[lo + 1] - ls[lo])).clamp(0, 1)
        return lo.to(dtype) + w

    def describe(self) -> str:
        c = self.config
        kind = "trained" if c["trained_betas"] is not None else c["beta_schedule"]
        zero = ", zero terminal SNR" if c["rescale_betas_zero_snr"] else ""
        return f"{kind} ({self.num_timesteps} steps{zero})"


def schedule_config(scheduler_config: Mapping) -> dict:
    """The schedule part of a scheduler config, with diffusers' defaults filled in."""
    defaults = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "trained_betas": None,
        "rescale_betas_zero_snr": False,
    }
    return {k: scheduler_config.get(k, v) for k, v in defaults.items()}


# --------------------------------------------------------------------------- features by hooks


class _StopForward(Exception):
    """Raised by the hook of the deepest selected tap for ``return_features="only"``."""


def plain_config(config: Mapping) -> dict:
    """A diffusers model config as a JSON-able dict (drops private keys but the class name)."""
    d = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return json.loads(json.dumps(d))


class DiffusersDenoiserBase(nn.Module, FeatureTaps):
    """A diffusers UNet (``self.unet``) as an EDM denoiser; subclasses say how to call it.

    Subclasses implement :meth:`_call_unet` ``(x_in, t, cond) -> output`` (cond already
    checked). The conversion to x0 and the feature taps live here: taps are forward hooks on
    the UNet's own down blocks and mid block, registered only for the duration of one call.
    """

    def __init__(self, unet: nn.Module, schedule: DiscreteSchedule, prediction_type: str):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; accepted: "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    # -- subclass hooks
    def _call_unet(self, x_in: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _prepare_cond(self, cond: Tensor | None, n: int) -> Tensor | None:
        return cond

    # -- features
    def _taps(self) -> dict[str, tuple[nn.Module, Callable, int, int]]:
        """name -> (module, output -> feature map, channels, resolution), shallow to deep."""
        cfg = self.unet.config
        size = cfg.sample_size
        if size is None:
            raise ValueError("this diffusers UNet's config has no sample_size; set it")
        res = int(size if isinstance(size, int) else size[0])
        blocks = self.unet.down_blocks
        taps: dict[str, tuple[nn.Module, Callable, int, int]] = {}
        for i, block in enumerate(blocks):
            down = getattr(block, "downsamplers", None) is not None
            if not hasattr(block, "downsamplers"):
                down = i < len(blocks) - 1
            # The block returns (h, res_samples, ...); with a downsampler the map before it
            # is the second-to-last residual, else h itself.
            extract = _pre_down if down else _first
            name = f"enc{res}"
            taps.pop(name, None)  # several blocks at one resolution: the last one
            taps[name] = (block, extract, int(cfg.block_out_channels[i]), res)
            if down:
                res //= 2
        if getattr(self.unet, "mid_block", None) is not None:
            taps["mid"] = (self.unet.mid_block, _first, int(cfg.block_out_channels[-1]), res)
        return taps

    def feature_maps(self) -> list[FeatureMap]:
        return [FeatureMap(n, c, r) for n, (_, _, c, r) in self._taps().items()]

    def _run(self, fn: Callable[[], Tensor], return_features: Features):
        if not return_features:
            return fn(), None
        names = self.feature_taps
        taps = self._taps()
        got: dict[str, Tensor] = {}
        only = return_features == "only"
        grad = GradUntilTaps(return_features)

        def hook_for(name: str, extract: Callable):
            def hook(module, args, output):
                got[name] = extract(output)
                if name == names[-1]:
                    grad.taps_done()
                    if only:
                        raise _StopForward

            return hook

        handles = [taps[n][0].register_forward_hook(hook_for(n, taps[n][1])) for n in names]
        out = None
        try:
            with grad:
                out = fn()
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in got]
        if missing:
            raise RuntimeError(f"feature taps {missing} were not reached in the forward pass")
        return out, [got[n] for n in names]

    # -- the denoiser
    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        cond: Tensor | None = None,
        return_features: Features = False,
    ):
        """``D(x, sigma, cond) -> x0`` (and the selected feature maps, see ``FeatureTaps``)."""
        hp = _high_precision(x.device)
        s = sigma_batch(sigma, x.new_empty((x.shape[0], 0), dtype=hp))
        sv = s.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (1 + sv * sv).rsqrt()
        t = self.schedule.timestep(s).to(torch.float32)
        dtype = self.unet.dtype
        xh = x.to(hp)
        x_in = (xh * c_in).to(dtype)
        c = self._prepare_cond(cond, x.shape[0])
        out, feats = self._run(lambda: self._call_unet(x_in, t, c), return_features)
        if return_features == "only":
            return feats
        with after_taps(return_features):
            f = out.to(hp)
            if self.prediction_type == "epsilon":
                x0 = xh - sv * f
            elif self.prediction_type == "v_prediction":
                x0 = xh * c_in * c_in - sv * c_in * f
            else:
                x0 = f
            x0 = x0.to(x.dtype)
        return (x0, feats) if return_features else x0


def _pre_down(output) -> Tensor:
    return output[1][-2]


def _first(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def unet_details(unet: nn.Module, schedule: DiscreteSchedule, prediction_type: str) -> dict:
    """What ``fdistill inspect`` shows about a diffusers UNet."""
    cfg = unet.config
    return {
        "class": type(unet).__name__,
        "prediction_type": prediction_type,
        "schedule": schedule.describe(),
        "down_block_types": list(cfg.down_block_types),
        "up_block_types": list(cfg.up_block_types),
        "block_out_channels": list(cfg.block_out_channels),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }


def image_shape(unet: nn.Module) -> tuple[int, int, int]:
    size = unet.config.sample_size
    if size is None:
        raise ValueError("this diffusers UNet's config has no sample_size; set it")
    h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    return (int(unet.config.in_channels), int(h), int(w))


# --------------------------------------------------------------------------- the folder format


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is not one (for detection: never raises)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _layout(path: Path) -> tuple[Path, Path] | None:
    """``(unet_dir, scheduler_config)`` of a pipeline folder or a ``unet/`` folder."""
    if (path / "unet" / "config.json").is_file():
        root, unet = path, path / "unet"
    elif (path / "config.json").is_file():
        root, unet = path.parent, path
    else:
        return None
    sched = root / "scheduler" / "scheduler_config.json"
    return (unet, sched) if sched.is_file() else None


def detect(path: Path) -> bool:
    """A diffusers pipeline folder (``model_index.json``), or a UNet folder with a scheduler."""
    try:
        if not path.is_dir():
            return False
        if (path / "model_index.json").is_file():
            return True
        found = _layout(path)
        cls = (_read_json(found[0] / "config.json") or {}).get("_class_name") if found else None
        return isinstance(cls, str) and "UNet" in cls
    except OSError:
        return False


def resolve(path: Path) -> tuple[Path, dict, dict]:
    """``(unet_dir, unet_config, scheduler_config)`` for a diffusers folder, or a one-line
    ``ValueError`` naming what is missing."""
    found = _layout(path)
    if found is None:
        raise ValueError(
            f"'{path}' has no unet/config.json with a sibling scheduler/scheduler_config.json; "
            "a diffusers teacher needs both"
        )
    unet_dir, sched_path = found
    return unet_dir, read_json(unet_dir / "config.json"), read_json(sched_path)


def prediction_type_of(sched_cfg: Mapping, override: str | None) -> str:
    pred = override or sched_cfg.get("prediction_type") or "epsilon"
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {pred!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}"
        )
    return pred


def pretrained_unet(cls, unet_dir: Path) -> nn.Module:
    """``cls.from_pretrained(unet_dir)`` from local files, frozen, in eval mode.

    Weights read from safetensors can sit at unaligned addresses, where CPU kernels round
    differently (~1e-6) than for the same weights in fresh storage; re-owning every tensor
    makes the teacher and its ``copy_denoiser`` copies agree bit for bit.
    """
    check_weights_fit(cls, unet_dir)
    with user_file(unet_dir, "UNet"):
        unet = cls.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    with torch.no_grad():
        for t in [*unet.parameters(), *unet.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    return unet.requires_grad_(False).eval()


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def safetensors_numel(path: Path) -> int:
    """Elements of all tensors a safetensors file declares, read from its header only."""
    with user_file(path), open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserFileError(path, "truncated safetensors file (no header)")
        (size,) = struct.unpack("<Q", raw)
        if size > min(_MAX_SAFETENSORS_HEADER, path.stat().st_size):
            raise UserFileError(path, f"safetensors header claims {size} bytes; corrupt file")
        header = parse_json(f.read(size), path)
    if not isinstance(header, dict):
        raise UserFileError(path, "safetensors header is not a JSON object")
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise UserFileError(path, f"safetensors entry {name!r} has no valid shape")
        total += math.prod(shape)
    return total


def check_weights_fit(cls, unet_dir: Path) -> None:
    """Refuse a UNet config that does not describe the weights beside it *before* diffusers
    builds it: the network is built on the ``meta`` device (no memory) and its parameter count
    compared with the safetensors header. Skipped when the weights are in another file."""
    weights = unet_dir / WEIGHTS_FILE
    if not weights.is_file():
        return
    have = safetensors_numel(weights)
    cfg = read_json(unet_dir / "config.json")
    try:
        with torch.device("meta"):
            net = cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any config diffusers cannot build is a bad file
        raise UserFileError(
            unet_dir / "config.json", f"not a valid {cls.__name__} config: {e}"
        ) from None
    need = sum(p.numel() for p in net.parameters())
    if need > have:
        raise UserFileError(
            unet_dir,
            f"config.json describes a {cls.__name__} with {need:,} parameters but "
            f"{WEIGHTS_FILE} holds {have:,} values; the config does not match the weights",
        )


__all__ = [
    "BETA_SCHEDULES",
    "MAX_TRAIN_TIMESTEPS",
    "PREDICTION_TYPES",
    "DiffusersDenoiserBase",
    "DiscreteSchedule",
    "alphas_cumprod_from_config",
    "check_weights_fit",
    "detect",
    "image_shape",
    "plain_config",
    "prediction_type_of",
    "pretrained_unet",
    "require_diffusers",
    "resolve",
    "safetensors_numel",
    "schedule_config",
    "unet_details",
]
