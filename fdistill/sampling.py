"""Sampling: per-sample seeds, batched generation (also under ``torchrun``), the sampler of a
loaded run (Heun for a teacher, the student's step), training grids, and text-to-image images.

Sample ``i`` of ``--seed s`` depends only on the network, ``s`` and ``i`` (its own seed), never
on the batch it ran in or the number of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor, nn

from fdistill import runs
from fdistill.conditioning import Codec, Conditioning, Labels
from fdistill.data.captions import CAPTIONS_JSONL
from fdistill.engine import EMA, Dist
from fdistill.generator import Student
from fdistill.images import save_image_grid, to_uint8
from fdistill.models import LoadedRun, with_pipeline
from fdistill.samplers import DEFAULT_TEACHER_NFE, SeededGenerator, sample_with_nfe

# torch's CPU generator keeps only the low 32 bits of a seed, so seeds are built inside them.
_SEED_STRIDE = 1_000_003


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds: sample ``i`` of ``--seed s`` uses ``(s * 1_000_003 + i) mod 2**32``,
    so different ``s`` give disjoint samples for up to a million samples each."""
    return [(seed * _SEED_STRIDE + i) % (1 << 32) for i in range(n)]


class WithNoise:
    """A sampler ``fn(z, c, noise)`` that draws from each sample's own stream after its latent
    (``noise``: a :class:`fdistill.samplers.SeededGenerator`), e.g. a K-step student decoded."""

    def __init__(self, fn: Callable[[Tensor, object, SeededGenerator], Tensor]):
        self.fn = fn

    def __call__(self, z: Tensor, c: object, noise: SeededGenerator) -> Tensor:
        return self.fn(z, c, noise)


def run_fn(fn: Callable, z: Tensor, c: object, noise: SeededGenerator) -> Tensor:
    """One batch of a sampler: a student (:class:`fdistill.generator.Student`) samples its K
    steps with ``noise`` (each sample's own stream, after its latent), and so does a
    :class:`WithNoise`; any other ``fn(z, c)`` (a teacher's Heun sampler) needs no noise."""
    if isinstance(fn, Student):
        return fn.sample(z, c, noise)
    if isinstance(fn, WithNoise):
        return fn(z, c, noise)
    return fn(z, c)


def check_finite_samples(x: Tensor, seeds: Sequence[int]) -> Tensor:
    """``x`` unchanged, or one line naming the first sample (by seed) that holds NaN/Inf: a
    broken network or option (e.g. a NaN guidance scale) stops before anything is written."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"generated samples hold NaN or Inf ({int(bad.sum())} of {len(x)} in this batch, "
            f"first: seed {seeds[i]}); nothing was written. Check the network and the "
            "sampling options (--guidance, --nfe)"
        )
    return x


def seeded_labels(seeds: list[int], num_classes: int) -> Tensor:
    """A uniform class per sample, from that sample's own seed (independent of its latent)."""
    return Labels(num_classes).for_seeds(seeds)


@torch.no_grad()
def generate(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    shape: tuple[int, ...],
    seeds: list[int],
    labels: Tensor | None = None,
    batch: int = 256,
    device: torch.device | str = "cpu",
    *,
    ddp: Dist | None = None,
) -> Tensor | None:
    """``fn(z, c)`` over latents drawn per seed, ``batch`` samples at a time; float [N, ...].

    With ``ddp`` of several processes (``torchrun``) every rank must call it: batch ``j`` runs
    on rank ``j % world``, the very batches one process would run, and rank 0 gathers them.
    Rank 0 gets all samples, the other ranks None.
    """
    rank, world = (ddp.rank, ddp.world) if ddp is not None else (0, 1)
    mine = generate_batches(fn, shape, seeds, labels, batch, device, rank, world)
    if world > 1:
        mine = _gather_to_main(mine, world, rank)
        if mine is None:
            return None
    return torch.cat([mine[j] for j in range(len(mine))])


def generate_batches(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    shape: tuple[int, ...],
    seeds: list[int],
    labels: Tensor | None,
    batch: int,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
) -> dict[int, Tensor]:
    """Batches ``rank, rank + world, ...`` of :func:`generate`, by batch number, on the CPU."""
    out = {}
    for j, i in enumerate(range(0, len(seeds), batch)):
        if j % world != rank:
            continue
        noise = SeededGenerator(seeds[i : i + batch], device)
        z = noise.randn(shape)  # the latents of seeded_randn, then each sample's own stream
        c = labels[i : i + batch].to(device) if labels is not None else None
        out[j] = check_finite_samples(run_fn(fn, z, c, noise).float().cpu(), seeds[i : i + batch])
    return out


def _gather_to_main(parts: dict[int, Tensor], world: int, rank: int) -> dict[int, Tensor] | None:
    """Every rank's numbered batches, merged on rank 0 (None on the other ranks)."""
    import torch.distributed as dist

    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object(parts, gathered, dst=0)
    if rank != 0:
        return None
    return {j: x for part in gathered for j, x in part.items()}


def run_sampler(
    run: LoadedRun, nfe: int | None = None, guidance: float = 1.0
) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``fn(z, c) -> images`` for a loaded run: Heun with ``nfe`` calls (teacher, default 35)
    or the student's single step."""
    if not (isinstance(guidance, int | float) and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance must be a finite number >= 0, got {guidance!r}")
    if nfe is not None and nfe < 1:
        raise ValueError(f"--nfe must be an integer >= 1, got {nfe}")
    if run.kind == "teacher":
        s = run.config["sampler"]
        nfe = DEFAULT_TEACHER_NFE if nfe is None else nfe
        return lambda z, c: sample_with_nfe(
            run.model, z, nfe, c, s["sigma_min"], s["sigma_max"], s["rho"], guidance=guidance
        )
    steps = run.model.steps if isinstance(run.model, Student) else 1
    if nfe not in (None, steps):
        what = "a one-step student" if steps == 1 else f"a {steps}-step student"
        raise ValueError(f"{what} samples with {steps} NFE, got --nfe {nfe}")
    if guidance != 1.0:
        raise ValueError("guidance is distilled into the student; sample it without --guidance")
    return run.model


def sample_run(
    run: LoadedRun,
    n: int,
    seed: int = 0,
    *,
    nfe: int | None = None,
    class_label: int | None = None,
    guidance: float = 1.0,
    batch: int = 256,
    device: str | torch.device = "cpu",
    ddp: Dist | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``n`` samples [n, C, H, W] in [-1, 1] (unclipped floats) and their labels.

    Sample ``i`` depends only on the checkpoint, ``seed`` and ``i``. Class-conditional runs
    use ``class_label`` for every sample, or a uniform label per sample from its seed.
    Under ``torchrun`` pass ``ddp`` (every rank calls it): the ranks share the batches and
    rank 0 gets the samples, equal to one process's; the other ranks get None for them.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if run.config.get("model", {}).get("type") == "sd-unet":
        raise ValueError(
            "a text-to-image model samples from prompts: pass --prompt TEXT or --prompts FILE "
            "(fdistill.t2i.sample_images)"
        )
    seeds = sample_seeds(seed, n)
    labels = None
    if run.num_classes:
        if class_label is None:
            labels = seeded_labels(seeds, run.num_classes)
        elif 0 <= class_label < run.num_classes:
            labels = torch.full((n,), class_label, dtype=torch.long)
        else:
            raise ValueError(f"--class must be in [0, {run.num_classes}), got {class_label}")
    elif class_label is not None:
        raise ValueError("--class given but the run is unconditional")
    fn = run_sampler(run, nfe, guidance)
    return generate(fn, run.shape, seeds, labels, batch, device, ddp=ddp), labels


def grid_labels(n: int, num_classes: int) -> Tensor | None:
    """Labels ``i % num_classes`` so that each column of a ``num_classes``-wide grid is a class."""
    return torch.arange(n) % num_classes if num_classes else None


@torch.no_grad()
def iter_images(
    run: LoadedRun,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    nfe: int | None = None,
    guidance: float = 1.0,
    batch: int = 16,
    device: str | torch.device = "cpu",
) -> Iterator[Tensor]:
    """Decoded images ``[b, 3, H, W]`` (float, about [-1, 1]), ``batch`` at a time: image ``i``
    from ``prompts[i]`` and the latent of ``seeds[i]``. A student takes one step; a teacher
    (a pipeline folder) Heun with ``nfe`` calls and classifier-free ``guidance``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    den = with_pipeline(run)
    fn = run_sampler(run, nfe, guidance)
    for i in range(0, len(prompts), batch):
        noise = SeededGenerator(seeds[i : i + batch], device)
        z = noise.randn(run.shape)
        x = run_fn(fn, z, den.encode_prompts(prompts[i : i + batch]), noise)
        yield check_finite_samples(den.decode_latents(x).float().cpu(), seeds[i : i + batch])


def sample_images(run: LoadedRun, prompts: Sequence[str], seed: int = 0, **kwargs) -> Tensor:
    """All images of :func:`iter_images` for ``prompts`` with the seeds of ``--seed``."""
    seeds = sample_seeds(seed, len(prompts))
    return torch.cat(list(iter_images(run, prompts, seeds, **kwargs)))


def save_png(image: Tensor, path: str | Path) -> None:
    """One ``[3, H, W]`` image in [-1, 1] as an 8-bit PNG, pixel for pixel."""
    PIL.Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).save(path)


def sample_to_files(
    run: LoadedRun,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    out: str | Path | None = None,
    grid: str | Path | None = None,
    grid_max: int = 64,
    **kwargs,
) -> dict:
    """Generate one image per prompt; write ``out/NNNNNN.png`` with ``out/captions.jsonl``
    (``file``, ``caption``, ``seed``: the folder is itself a captioned set) and a grid of the
    first ``grid_max`` (``grid``, or ``out/grid.png``). Returns counts and seconds."""
    if not prompts:
        raise ValueError("no prompts to sample")
    seeds = sample_seeds(seed, len(prompts))
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.glob("*.png")) or (folder / CAPTIONS_JSONL).exists():
            raise ValueError(f"--out {folder} already holds images; choose an empty folder")
    records, first, done, t0 = [], [], 0, time.perf_counter()
    for images in iter_images(run, prompts, seeds, **kwargs):
        for img in images:
            if folder is not None:
                name = f"{done:06d}.png"
                save_png(img, folder / name)
                records.append({"file": name, "caption": prompts[done], "seed": seeds[done]})
            if len(first) < grid_max:
                first.append(img)
            done += 1
    seconds = time.perf_counter() - t0
    if folder is not None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        runs.atomic_write_text(text, folder / CAPTIONS_JSONL)
    grid_path = grid or (folder / "grid.png" if folder is not None else None)
    if grid_path is not None:
        save_image_grid(torch.stack(first).clamp(-1, 1), grid_path)
    return {
        "n": done,
        "seconds": seconds,
        "out": str(folder) if folder else None,
        "grid": grid_path,
    }


def grid_writer(
    out: Path | None,
    every: int,
    total: int,
    ddp: Dist,
    shape: tuple[int, ...],
    conditioning: Conditioning,
    codec: Codec,
    n: int,
    render: Callable[[nn.Module], Callable[[Tensor, object], Tensor]],
) -> Callable[[int, EMA], None]:
    """Training callback: a PNG grid of the EMA network's samples (fixed seeds, the
    conditioning's grid, decoded by ``codec``) every ``every`` steps and at the end; it draws
    nothing from the training streams. ``render(module)`` is the sampler of the averaged
    module (Heun for a teacher, the student itself)."""
    seeds = sample_seeds(0, n)

    def on_step(done: int, ema: EMA) -> None:
        if out is None or not ddp.main or every <= 0 or (done % every and done != total):
            return
        fn = render(ema.module)
        decoded = WithNoise(lambda z, c, noise: codec.decode(run_fn(fn, z, c, noise)))
        images = generate(decoded, shape, seeds, conditioning.grid(n), device=ddp.device)
        save_image_grid(
            images, runs.grid_path(out, done), nrow=conditioning.grid_columns, padding=1
        )

    return on_step
