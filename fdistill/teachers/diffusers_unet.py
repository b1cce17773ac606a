"""Hugging Face diffusers teachers: a discrete-time UNet behind the EDM denoiser interface.

A diffusers model predicts ``eps``, ``v`` or ``x0`` from ``(sqrt(abar_t) x0 + sqrt(1-abar_t)
eps, t)`` on a grid of ``T`` integer timesteps. With ``sigma_t = sqrt((1 - abar_t) / abar_t)``
the same state in the EDM convention is ``x = x0 + sigma_t * eps``, so the network sees
``x / sqrt(1 + sigma^2)`` and an off-grid ``sigma`` gets a timestep interpolated linearly in
``log sigma`` (as diffusers' ``EulerDiscreteScheduler`` does). x0 is never clipped.

This module holds the parts every diffusers family shares (:class:`DiscreteSchedule`, the
hook-based feature taps, the folder format ``"diffusers"``) and the ``UNet2DModel`` adapter
(DDPM / DDIM pipelines); :mod:`fdistill.teachers.stable_diffusion` adds text-conditioned UNets.
diffusers is imported lazily: fdistill runs without it until such a teacher is loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.denoisers.base import FeatureMap, Features, FeatureTaps, sigma_batch
from fdistill.denoisers.registry import register_model
from fdistill.teachers.registry import TeacherFormat, TeacherInfo, register_format

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


def alphas_cumprod_from_config(config: Mapping) -> Tensor:
    """``abar_t`` (float64, ``[T]``) for a diffusers scheduler config.

    Reads ``trained_betas`` or ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2,
    sigmoid, laplace) with ``beta_start``/``beta_end``/``num_train_timesteps``, and
    ``rescale_betas_zero_snr`` (whose zero terminal abar becomes 2**-24, as diffusers' Euler
    scheduler does, so every sigma is finite). Computed in float64 from the formulas, so it
    agrees with diffusers' float32 tables to their rounding.
    """
    n = int(config.get("num_train_timesteps") or 1000)
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    f64 = torch.float64
    if config.get("trained_betas") is not None:
        betas = torch.tensor(list(config["trained_betas"]), dtype=f64)
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

        def hook_for(name: str, extract: Callable):
            def hook(module, args, output):
                got[name] = extract(output)
                if only and name == names[-1]:
                    raise _StopForward

            return hook

        handles = [taps[n][0].register_forward_hook(hook_for(n, taps[n][1])) for n in names]
        out = None
        try:
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


# --------------------------------------------------------------------------- UNet2DModel


class DiffusersUNetDenoiser(DiffusersDenoiserBase):
    """A diffusers ``UNet2DModel`` (DDPM/DDIM pipelines) as ``D(x, sigma, cond) -> x0``.

    ``cond``: integer class ids ``[N]`` (or one-hot rows ``[N, K]``, read by argmax) for a
    class-conditional UNet; ignored by an unconditional one. diffusers' class embeddings have
    no null label, so a class-conditional UNet refuses ``cond=None``.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: DiscreteSchedule | Mapping,
        prediction_type: str = "epsilon",
    ) -> None:
        if not isinstance(schedule, DiscreteSchedule):
            schedule = DiscreteSchedule(schedule_config(schedule))
        super().__init__(unet, schedule, prediction_type)
        self.config = {
            "type": "diffusers-unet2d",
            "unet": plain_config(unet.config),
            "schedule": dict(schedule.config),
            "prediction_type": prediction_type,
        }

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    def _prepare_cond(self, cond: Tensor | None, n: int) -> Tensor | None:
        if getattr(self.unet, "class_embedding", None) is None:
            return None
        if cond is None:
            raise ValueError(
                "this diffusers UNet2DModel is class-conditional and has no null label: "
                "pass integer class ids [N] (or one-hot rows) as cond"
            )
        if cond.ndim == 2:
            cond = cond.argmax(1)
        if cond.ndim != 1 or cond.shape[0] != n:
            raise ValueError(
                f"cond of shape {tuple(cond.shape)} is not class ids [{n}] or one-hot rows [{n}, K]"
            )
        if self.unet.config.class_embed_type in (None, "embedding"):
            cond = cond.long()
        return cond.to(self.unet.device)

    def _call_unet(self, x_in: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.unet(x_in, t, class_labels=cond, return_dict=False)[0]


@register_model("diffusers-unet2d")
def _build_unet2d(config: dict) -> DiffusersUNetDenoiser:
    diffusers = require_diffusers()
    unet = diffusers.UNet2DModel.from_config(dict(config["unet"]))
    return DiffusersUNetDenoiser(unet, config["schedule"], config["prediction_type"])


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


def _attach_info(model: DiffusersUNetDenoiser) -> DiffusersUNetDenoiser:
    s = model.schedule
    model.info = TeacherInfo(
        family="diffusers",
        shape=image_shape(model.unet),
        num_classes=model.num_classes,
        sigma_min=s.sigma_min,
        sigma_max=s.sigma_max,
        sigma_data=0.5,
        details=unet_details(model.unet, s, model.prediction_type),
    )
    return model


# --------------------------------------------------------------------------- the folder format


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
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
    unet_cfg = _read_json(unet_dir / "config.json")
    sched_cfg = _read_json(sched_path)
    if unet_cfg is None or sched_cfg is None:
        bad = unet_dir / "config.json" if unet_cfg is None else sched_path
        raise ValueError(f"'{bad}' is not a JSON object")
    return unet_dir, unet_cfg, sched_cfg


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
    unet = cls.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    with torch.no_grad():
        for t in [*unet.parameters(), *unet.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)
    return unet.requires_grad_(False).eval()


def load_unet2d(path: str | Path, prediction_type: str | None = None) -> DiffusersUNetDenoiser:
    """Load a diffusers folder holding a ``UNet2DModel`` (local files only)."""
    diffusers = require_diffusers()
    unet_dir, unet_cfg, sched_cfg = resolve(Path(path))
    unet = pretrained_unet(diffusers.UNet2DModel, unet_dir)
    schedule = DiscreteSchedule(schedule_config(sched_cfg))
    model = DiffusersUNetDenoiser(unet, schedule, prediction_type_of(sched_cfg, prediction_type))
    return _attach_info(model)


def load(path: Path, **options) -> nn.Module:
    """Load a diffusers folder, dispatching on the UNet's class."""
    _, unet_cfg, _ = resolve(Path(path))
    cls = unet_cfg.get("_class_name")
    if cls == "UNet2DModel":
        return load_unet2d(path, **options)
    if cls == "UNet2DConditionModel":
        from fdistill.teachers.stable_diffusion import load_sd_teacher

        return load_sd_teacher(path, **options)
    raise ValueError(
        f"diffusers UNet class {cls!r} in '{path}' is not supported; "
        "accepted: UNet2DModel, UNet2DConditionModel"
    )


register_format(
    TeacherFormat(
        name="diffusers",
        accepts="a diffusers pipeline folder (model_index.json) or a UNet folder with a scheduler",
        detect=detect,
        load=load,
    )
)


__all__ = [
    "DiffusersDenoiserBase",
    "DiffusersUNetDenoiser",
    "DiscreteSchedule",
    "alphas_cumprod_from_config",
    "load_unet2d",
    "require_diffusers",
    "schedule_config",
]
