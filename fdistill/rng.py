"""Random draws that do not depend on how a global batch is split across processes.

Under data parallelism each rank handles a slice of the global batch. If every rank drew its
slice from its own generator, a run on 2 processes would see different numbers than the same
run on 1 process. :class:`BatchRandom` makes them equal: every rank draws the whole global
batch from an identically seeded generator and keeps its own rows, so rank ``r``'s rows are
exactly rows ``r*n .. (r+1)*n`` of what a single process draws. The cost is drawing
``world`` times more random numbers than a rank uses, which is small next to the networks.

:func:`randn` and :func:`randint` accept either a :class:`BatchRandom` or a plain
``torch.Generator`` (or ``None``), so losses can take both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class BatchRandom:
    """Draws of a global batch, identical on every rank; :meth:`randn` returns this rank's rows.

    The first dimension of every requested shape is the *per-rank* batch size ``n``; the
    generator advances by the global draw of ``n * world`` rows. ``get_state``/``set_state``
    make it a drop-in for ``torch.Generator`` in checkpoints.
    """

    def __init__(
        self, seed: int, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) % (1 << 63))
        self.rank, self.world = rank, world

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _rows(self, full: Tensor, n: int) -> Tensor:
        return full[self.rank * n : (self.rank + 1) * n]

    def randn(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        n, *rest = shape
        full = torch.randn(
            (n * self.world, *rest), generator=self.generator, dtype=dtype, device=self.device
        )
        return self._rows(full, n).to(device or self.device)

    def randint(
        self, high: int, shape: Sequence[int], *, device: torch.device | str | None = None
    ) -> Tensor:
        n, *rest = shape
        full = torch.randint(
            high, (n * self.world, *rest), generator=self.generator, device=self.device
        )
        return self._rows(full, n).to(device or self.device)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


RandomSource = torch.Generator | BatchRandom | None


def randn(
    shape: Sequence[int],
    generator: RandomSource = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``torch.randn(shape)`` from a ``torch.Generator``, a :class:`BatchRandom` or ``None``."""
    if isinstance(generator, BatchRandom):
        return generator.randn(shape, dtype=dtype, device=device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


def randint(
    high: int,
    shape: Sequence[int],
    generator: RandomSource = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """``torch.randint(high, shape)`` from a generator, a :class:`BatchRandom` or ``None``."""
    if isinstance(generator, BatchRandom):
        return generator.randint(high, shape, device=device)
    return torch.randint(high, tuple(shape), generator=generator, device=device)


__all__ = ["BatchRandom", "RandomSource", "randint", "randn"]
