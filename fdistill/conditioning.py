"""Conditioning and codec as values: what a teacher is conditioned on, and what its samples are.

A teacher comes with a :class:`Conditioning` — none, class labels (:class:`Labels`) or text
(:class:`Text`: prompts and the teacher's frozen text encoder) — and a :class:`Codec`: the space
it denoises in (pixels, or VAE latents decoded to pixels). Everything that depends on the kind of
conditioning asks this value instead of branching on the teacher: the conditioning of a training
batch (:meth:`Conditioning.draw`), of fixed-seed grids (:meth:`Conditioning.grid`), of per-seed
samples (:meth:`Conditioning.for_seeds`), and the student's training inputs
(:func:`student_inputs`). The null condition is ``None`` for every kind (the denoisers map it to
their null label or the empty prompt), so classifier-free guidance is written once
(:func:`fdistill.samplers.guided`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fdistill import rng

Sampler = Callable[[int, rng.RandomSource], tuple[Tensor, Any]]

_LABEL_SALT = 0x5EED5EED


class Conditioning:
    """No conditioning: every method returns ``None``."""

    kind = "none"

    def draw(self, n: int, gen: rng.RandomSource, device: torch.device | str) -> Any:
        """The conditioning of ``n`` training samples (this rank's rows), from ``gen``."""
        return None

    def grid(self, n: int) -> Any:
        """The conditioning of a fixed grid of ``n`` samples (training grids)."""
        return None

    def for_seeds(self, seeds: Sequence[int]) -> Any:
        """One conditioning per sample seed, independent of the batch the sample runs in."""
        return None

    @property
    def grid_columns(self) -> int | None:
        """Columns of a grid (one class per column), ``None``: square."""
        return None

    def describe(self) -> dict:
        """What a run's config records about the conditioning."""
        return {"kind": self.kind}


class Labels(Conditioning):
    """Class labels ``0 .. num_classes - 1`` (long tensors)."""

    kind = "labels"

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"class labels need num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)

    def draw(self, n: int, gen: rng.RandomSource, device: torch.device | str) -> Tensor:
        return rng.randint(self.num_classes, (n,), gen, device=device)

    def grid(self, n: int) -> Tensor:
        return torch.arange(n) % self.num_classes

    def for_seeds(self, seeds: Sequence[int]) -> Tensor:
        """A uniform class per sample from that sample's own seed (independent of its latent)."""
        gens = (torch.Generator().manual_seed(s ^ _LABEL_SALT) for s in seeds)
        return torch.cat([torch.randint(self.num_classes, (1,), generator=g) for g in gens])

    @property
    def grid_columns(self) -> int:
        return self.num_classes

    def describe(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes}


class Text(Conditioning):
    """Prompts encoded by the teacher's frozen text encoder (``encode(list[str]) -> Tensor``).

    Training batches draw a uniform prompt per sample; grids use the first prompts (cycled).
    Encoding is cheap next to the UNet passes each sample sees, so nothing is cached but the
    grid's embeddings.
    """

    kind = "text"

    def __init__(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor]):
        if not prompts:
            raise ValueError("text conditioning needs at least one prompt")
        self.prompts = list(prompts)
        self.encode = encode
        self._grid: dict[int, Tensor] = {}

    def draw(self, n: int, gen: rng.RandomSource, device: torch.device | str) -> Tensor:
        idx = rng.randint(len(self.prompts), (n,), gen).tolist()
        return self.encode([self.prompts[i] for i in idx])

    def grid(self, n: int) -> Tensor:
        if n not in self._grid:
            with torch.no_grad():
                self._grid[n] = self.encode([self.prompts[i % len(self.prompts)] for i in range(n)])
        return self._grid[n]

    def for_seeds(self, seeds: Sequence[int]) -> Tensor:
        raise ValueError("text-conditioned samples need their prompts: pass --prompt or --prompts")

    def describe(self) -> dict:
        return {"kind": self.kind, "num_prompts": len(self.prompts)}


class Codec:
    """Pixels: the teacher denoises images; decoding is the identity."""

    kind = "pixels"

    def decode(self, x: Tensor) -> Tensor:
        """Images in about [-1, 1] from the teacher's space."""
        return x


class LatentCodec(Codec):
    """VAE latents: ``decode`` runs the pipeline's VAE decoder (``decode_latents``) and clamps
    to [-1, 1]."""

    kind = "latents"

    def __init__(self, decode_latents: Callable[[Tensor], Tensor]):
        self.decode_latents = decode_latents

    def decode(self, x: Tensor) -> Tensor:
        return self.decode_latents(x).float().clamp(-1, 1)


def of_teacher(teacher: nn.Module, prompts: Sequence[str] | None = None) -> Conditioning:
    """The conditioning a loaded teacher (``.info``) takes: text for a text-conditioned
    pipeline (``prompts`` to draw from), class labels for a class-conditional one, else none."""
    info = teacher.info
    if info.details.get("conditioning") == "text":
        if prompts is None:
            raise ValueError("a text-to-image teacher needs prompts: pass --prompts FILE")
        return Text(prompts, teacher.encode_prompts)
    if prompts is not None:
        raise ValueError(
            f"--prompts: the teacher ({info.family}) is not text-conditioned; accepted: a "
            "Stable Diffusion (v1/v2-style) pipeline folder"
        )
    return Labels(info.num_classes) if info.num_classes else Conditioning()


def codec_of(teacher: nn.Module) -> Codec:
    """Latents for a teacher with a VAE (a Stable Diffusion pipeline), else pixels."""
    if teacher.info.details.get("conditioning") == "text":
        return LatentCodec(teacher.decode_latents)
    return Codec()


def student_inputs(
    shape: Sequence[int], conditioning: Conditioning, device: torch.device | str
) -> Sampler:
    """``sample(n, gen) -> (z, cond)``: unit-normal latents of ``shape`` and their conditioning
    (drawn after the latents, from the same stream)."""

    def sample(n: int, gen: rng.RandomSource) -> tuple[Tensor, Any]:
        z = rng.randn((n, *shape), gen, device=device)
        return z, conditioning.draw(n, gen, device)

    return sample
