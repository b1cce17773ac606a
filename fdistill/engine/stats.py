"""Statistics, the NaN/Inf guard, logging and the optimiser step of the training engine.

The engine never waits for the device inside an update: statistics stay 0-dim device tensors
(a method's losses may return floats or tensors; tensors, and :data:`BINS` sums, are the
sync-free kind), the NaN/Inf watch (:class:`FiniteGuard`) skips bad optimiser steps on the
device, and values reach the host only at logging and checkpoint steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.engine.processes import average_gradients, full_tensor
from fdistill.runs import open_metrics, tensorboard_dir


class NonFiniteError(RuntimeError):
    """Raised when a loss or gradient turns NaN/Inf; the last good checkpoint stays intact."""


def _nonfinite_message(step: int, bad: Sequence[str]) -> str:
    return (
        f"non-finite {', '.join(bad)} at step {step}: training stopped; the last good "
        "checkpoint is kept. Lower the learning rate, enable grad clipping, or check the data."
    )


def check_finite(step: int, stats: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` if any logged value (losses, gradient norms) is NaN/Inf."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(_nonfinite_message(step, bad))


Stat = float | Tensor
BINS = "/bins"
"""Suffix of a binned statistic: a ``[2, num_bins]`` tensor of per-bin sums and counts, which
micro-batches add up and :func:`host_stats` turns into ``<name>/bin<k>`` means (bins with
samples only)."""


def _stat_tensor(v: Stat, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach().float().reshape(()).to(device)
    return torch.full((), float(v), device=device)  # a fill, not a host-to-device copy


def host_stats(stats: dict[str, Stat]) -> dict[str, float]:
    """Statistics as Python floats, with one device-to-host copy for all tensor values."""
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    host: dict[str, Stat] = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    if keys:
        device = stats[keys[0]].device
        flat = [stats[k].detach().float().reshape(-1).to(device) for k in keys]
        values = torch.cat(flat).tolist()
        pos = 0
        for k, f in zip(keys, flat, strict=True):
            host[k] = values[pos] if not k.endswith(BINS) else values[pos : pos + f.numel()]
            pos += f.numel()
    out: dict[str, float] = {}
    for k in stats:
        if not k.endswith(BINS):
            out[k] = host[k]
            continue
        v = host[k]
        nb = len(v) // 2
        name = k[: -len(BINS)]
        out |= {f"{name}/bin{i}": v[i] / v[nb + i] for i in range(nb) if v[nb + i] > 0}
    return out


def merge_stats(parts: Sequence[dict[str, Stat]]) -> dict[str, Stat]:
    """Statistics of a whole batch from those of its equal-sized micro-batches: the mean,
    except ``*_min`` / ``*_max`` (the minimum / maximum) and binned sums and counts
    (:data:`BINS`: the sum). Tensors stay on the device."""
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Stat] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts if k in p]
        if k.endswith(BINS):
            out[k] = torch.stack([v.detach().float() for v in vals]).sum(0)
            continue
        if all(not isinstance(v, Tensor) for v in vals):
            fn = min if k.endswith("_min") else max if k.endswith("_max") else None
            out[k] = fn(vals) if fn else sum(vals) / len(vals)
            continue
        device = next(v.device for v in vals if isinstance(v, Tensor))
        t = torch.stack([_stat_tensor(v, device) for v in vals])
        out[k] = t.amin() if k.endswith("_min") else t.amax() if k.endswith("_max") else t.mean()
    return out


class FiniteGuard:
    """NaN/Inf watch over every update without a host synchronisation per update.

    Each update hands its statistics (losses, gradient norm: 0-dim tensors or floats) to
    :meth:`observe`, which returns ``found_inf``: a float device scalar, 1 when this update or
    any earlier one was non-finite. A fused AdamW reads it and skips its step *on the device*
    (parameters, moments and step count stay as they were; see :func:`apply_update`), and the
    EMA skips too, so from the first bad update on nothing moves: the networks stay as they were
    after the last good update. :meth:`check` copies the flags to the host once and raises
    :class:`NonFiniteError` naming the first bad step and its non-finite statistics; the loops
    call it at every logging step and before every checkpoint, so a checkpoint is never written
    after a bad update, and a NaN at step ``s`` stops the run at the next logging step with
    "non-finite ... at step s" (the steps in between are computed but change nothing).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=self.device)
        self._pending: list[tuple[int, tuple[str, ...], Tensor]] = []

    def nonfinite(self, stats: dict[str, Stat]) -> tuple[tuple[str, ...], Tensor]:
        """``(keys, flags)``: the statistics' names and their non-finite flags (a bool device
        vector), tensor values first. Float values are checked on the host (they are there
        already) and enter as constants, so nothing is copied to the device."""
        tkeys = [k for k, v in stats.items() if isinstance(v, Tensor)]
        fkeys = [k for k, v in stats.items() if not isinstance(v, Tensor)]
        flags = []
        if tkeys:  # a binned statistic is one value here: the sum of its entries
            vals = []
            for k in tkeys:
                v = stats[k].detach().float()
                vals.append((v.sum() if v.ndim else v).to(self.device))
            flags.append(~torch.isfinite(torch.stack(vals)))
        if fkeys:
            host = [not math.isfinite(stats[k]) for k in fkeys]
            if any(host):
                flags.append(torch.stack([torch.full((), b, device=self.device) for b in host]))
            else:
                flags.append(torch.zeros(len(fkeys), dtype=torch.bool, device=self.device))
        if not flags:
            return (), torch.zeros(0, dtype=torch.bool, device=self.device)
        return (*tkeys, *fkeys), flags[0] if len(flags) == 1 else torch.cat(flags)

    def observe(self, step: int, stats: dict[str, Stat]) -> Tensor:
        """Record one update's statistics; return ``found_inf`` (see the class docstring)."""
        keys, bad = self.nonfinite(stats)
        self._pending.append((step, keys, bad))
        self.tripped = self.tripped | bad.any()
        return self.tripped.float()

    def check(self) -> None:
        """Raise :class:`NonFiniteError` for the first non-finite update since the last check."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.cat([b for _, _, b in pending]).tolist()
        pos = 0
        for step, keys, _ in pending:
            bad = [k for k, f in zip(keys, flags[pos : pos + len(keys)], strict=True) if f]
            pos += len(keys)
            if bad:
                raise NonFiniteError(_nonfinite_message(step, bad))


class RunLog:
    """JSONL metrics (+ TensorBoard when installed) and a progress bar, on the main rank only.

    ``enabled`` is False on the other ranks; ``progress=False`` drops only the bar. Every
    logged record carries the wall time and the speed since the previous record (``it_s``).
    """

    def __init__(
        self,
        out: Path | None,
        total: int,
        start: int,
        enabled: bool,
        desc: str,
        progress: bool = True,
    ):
        self.bar = self.jsonl = self.tb = None
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        if out is not None:
            self.jsonl = open_metrics(out)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir(out)))
            except Exception:  # tensorboard is optional
                self.tb = None

    def step(self, step: int, stats: dict[str, float], log: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if log:
                short = {k: f"{v:.3g}" for k, v in stats.items() if k.startswith(("loss", "h_"))}
                self.bar.set_postfix(short, refresh=False)
        if log and self.jsonl is not None:
            now = time.perf_counter()
            speed = (step - self.step_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.step_last = now, step
            rec = {"step": step, "time": now - self.t0, "it_s": speed, **stats}
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in stats.items():
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _skips_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step`` honours ``opt.found_inf`` (fused Adam/AdamW, as GradScaler uses)."""
    return bool(opt.defaults.get("fused")) and isinstance(opt, torch.optim.Adam | torch.optim.AdamW)


def make_adamw(
    params: list[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel, and able to skip a step on the device) on CPU and CUDA."""
    fused = torch.device(device).type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None
    )


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """Total 2-norm of the gradients (a 0-dim tensor; FSDP shards are reduced to the whole)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return full_tensor(norm)


def apply_update(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    stats: dict[str, Stat],
    *,
    step: int,
    grad_clip: float,
    guard: FiniteGuard | None = None,
    norm_key: str = "grad_norm",
) -> None:
    """Gradient norm, NaN/Inf watch, clipping and the optimiser step, gradients already there.

    The norm (computed once, after the gradients were averaged over ranks, so every rank sees
    the same value) goes into ``stats[norm_key]`` and is reused for clipping. With a ``guard``
    nothing waits for the device: an optimiser that can skip on the device
    (:func:`make_adamw`) is handed ``found_inf``; any other checks on the host before its step.
    Without one the check is immediate (:func:`check_finite`), as in :func:`optimizer_step`.
    """
    norm = grad_norm(params)
    if guard is None:
        stats[norm_key] = float(norm)
        check_finite(step, host_stats(stats))
        found_inf = None
    else:
        stats[norm_key] = norm
        found_inf = guard.observe(step, stats)
        if not _skips_on_device(opt):
            guard.check()
            found_inf = None
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    if found_inf is None:
        opt.step()
        return
    opt.found_inf = found_inf  # GradScaler's protocol: fused Adam(W) skips where it is 1
    try:
        opt.step()
    finally:
        del opt.found_inf


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss: Tensor,
    stats: dict[str, float],
    *,
    step: int,
    grad_clip: float,
    world: int,
    norm_key: str = "grad_norm",
) -> None:
    """Backward, average gradients over ranks, stop on NaN/Inf, clip, step (one call, synced).

    ``step`` is the 1-based number of the step being made (used in the NaN/Inf message). For
    code outside the training loops (benchmarks); the loops use :func:`apply_update`.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params, world)
    apply_update(opt, params, stats, step=step, grad_clip=grad_clip, norm_key=norm_key)
