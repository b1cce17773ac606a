"""Improved precision and recall (Kynkäänniemi et al., 2019) on any feature vectors.

Each set is modelled as the union of hyperspheres centred on its points, the radius of a
point being the distance to its k-th nearest *other* point of the same set. Precision is the
fraction of fake points inside the real manifold (quality); recall is the fraction of real
points inside the fake manifold (coverage, the quantity mode-seeking divergences lose).

Distances are computed in float64 in blocks of ``batch x batch``, so 50k x 50k sets never
allocate an ``N x M`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sq_dists(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` by the matmul expansion, clamped >= 0."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def kth_nn_sq_radii(x: Tensor, k: int, batch: int = 4096) -> Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row (float64 ``[N]``).

    A row is never its own neighbour; an exact duplicate is a neighbour at distance 0.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < number of points, got k={k} for {n} points")
    x = x.reshape(n, -1).to(torch.float64)
    sq = x.pow(2).sum(1)
    out = x.new_empty(n)
    for i in range(0, n, batch):
        xi, sqi = x[i : i + batch], sq[i : i + batch]
        best = None
        for j in range(0, n, batch):
            d = _sq_dists(xi, x[j : j + batch], sqi, sq[j : j + batch])
            if i == j:
                d.fill_diagonal_(float("inf"))
            cand = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            if best is not None:
                cand = torch.cat([best, cand], dim=1)
                cand = cand.topk(min(k, cand.shape[1]), dim=1, largest=False).values
            best = cand
        out[i : i + batch] = best[:, k - 1]
    return out


def in_manifold(queries: Tensor, centers: Tensor, sq_radii: Tensor, batch: int = 4096) -> Tensor:
    """Bool ``[len(queries)]``: whether each query lies in at least one ball ``(center, radius)``.

    A query exactly on a sphere counts as inside, as in the reference implementation.
    """
    q = queries.reshape(queries.shape[0], -1).to(torch.float64)
    c = centers.reshape(centers.shape[0], -1).to(torch.float64)
    r2 = sq_radii.to(device=c.device, dtype=torch.float64)
    q_sq, c_sq = q.pow(2).sum(1), c.pow(2).sum(1)
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    for i in range(0, q.shape[0], batch):
        hit = inside[i : i + batch]
        for j in range(0, c.shape[0], batch):
            if bool(hit.all()):
                break
            d = _sq_dists(
                q[i : i + batch], c[j : j + batch], q_sq[i : i + batch], c_sq[j : j + batch]
            )
            hit |= (d <= r2[None, j : j + batch]).any(dim=1)
    return inside


def knn_precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, batch: int = 4096
) -> dict[str, float]:
    """Improved precision and recall of ``fake`` [M, F] against ``real`` [N, F].

    ``k`` is the neighbour index that sets the sphere radii (3 in the paper); ``batch``
    bounds memory to about ``batch^2`` float64 values per block.
    """
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"feature shapes differ: {tuple(real.shape)} vs {tuple(fake.shape)}")
    real_r2 = kth_nn_sq_radii(real, k, batch)
    fake_r2 = kth_nn_sq_radii(fake, k, batch)
    precision = in_manifold(fake, real, real_r2, batch).double().mean().item()
    recall = in_manifold(real, fake, fake_r2, batch).double().mean().item()
    return {"precision": precision, "recall": recall}
