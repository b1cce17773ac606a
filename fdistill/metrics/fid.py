"""Frechet distance (FID) between feature sets, reference statistics, and a torchmetrics path.

Every FID in fdistill ends in `frechet_distance_from_stats`, computed in float64 with a matrix
square root that stays correct for rank-deficient covariances (fewer samples than features).
Reference statistics use NVlabs EDM's `.npz` layout (keys `mu`, `sigma`), so EDM / clean-fid
reference files load directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ArrayLike = Tensor | np.ndarray

_FID_EXTRA_HINT = "pip install 'fdistill[fid]'"


def _as_f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _cholesky(s: np.ndarray) -> np.ndarray | None:
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        return None


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, factor1: np.ndarray | None = None) -> float:
    """tr (S1 S2)^1/2 for PSD S1, S2; `factor1` is an optional known A with A A^T = S1.

    With S1 = A A^T the eigenvalues of S1 S2 are those of the symmetric PSD matrix A^T S2 A, so
    one symmetric eigensolve suffices (no Schur decomposition as in `sqrtm(S1 @ S2)`), the
    result is real, and singular covariances (fewer samples than features) are exact. The
    factor is a Cholesky factor of S1 or else of S2 (cheap, and backward stable whenever it
    completes), else the clamped symmetric square root of S1. Eigenvalues at round-off level
    count as 0, so the null space of a singular covariance adds no sqrt(round-off) terms.
    """
    a, other = factor1, s2
    if a is None:
        a = _cholesky(s1)
    if a is None:
        a, other = _cholesky(s2), s1
    if a is None:
        w, v = np.linalg.eigh(s1)
        a, other = v * np.sqrt(np.clip(w, 0.0, None)), s2
    m = a.T @ other @ a
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tol = max(m.shape[0], s1.shape[0]) * np.finfo(np.float64).eps * max(eig[-1], 0.0)
    return float(np.sqrt(np.where(eig > tol, eig, 0.0)).sum())


def _check_stats(mu1, s1, mu2, s2) -> None:
    f = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {s2.shape}; expected [F] means and [F, F] covariances"
        )


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); see `_trace_sqrt_product` for how the
    matrix square root is kept real, exact for singular covariances, and cheap.
    """
    mu1, mu2 = _as_f64(mu1), _as_f64(mu2)
    s1, s2 = _as_f64(sigma1), _as_f64(sigma2)
    _check_stats(mu1, s1, mu2, s2)
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    diff = mu1 - mu2
    tr_sqrt = _trace_sqrt_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (ddof=1, as EDM and torchmetrics) in float64."""
    x = _as_f64(feats)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2, got shape {x.shape}")
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a metric over seeds."""
    t = torch.tensor(list(xs), dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(t) > 1 else 0.0)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """FID between two feature sets [N, F] and [M, F] (Gaussian fit of each, then Frechet).

    With fewer samples than features, the centred samples of the smaller set are themselves a
    factor of its covariance, which makes the eigenproblem only min(N, M) large.
    """
    xa, xb = _as_f64(feats_a), _as_f64(feats_b)
    mu_a, sigma_a = feature_stats(xa)
    mu_b, sigma_b = feature_stats(xb)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    if len(xb) < len(xa):
        xa, mu_a, sigma_a, xb, mu_b, sigma_b = xb, mu_b, sigma_b, xa, mu_a, sigma_a
    factor = None
    if len(xa) < xa.shape[1]:
        factor = (xa - mu_a).T / np.sqrt(len(xa) - 1)
    diff = mu_a - mu_b
    tr_sqrt = _trace_sqrt_product(sigma_a, sigma_b, factor)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_sqrt)


class StatsAccumulator:
    """Streaming float64 mean/covariance of features, fed batch by batch.

    Holds only sums (like EDM's fid.py), so 50k x 2048 features never sit in memory at once.
    """

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.count = 0
        self._sum = np.zeros(num_features, dtype=np.float64)
        self._outer = np.zeros((num_features, num_features), dtype=np.float64)

    def update(self, feats: ArrayLike) -> None:
        """Add a batch of features [B, F]."""
        x = _as_f64(feats)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features [B, {self.num_features}], got {x.shape}")
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (mu, sigma) of everything seen so far (ddof=1)."""
        n = self.count
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {n}")
        mu = self._sum / n
        sigma = (self._outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma


def save_stats(path: str | os.PathLike, mu: ArrayLike, sigma: ArrayLike) -> Path:
    """Write reference statistics as `.npz` with EDM's keys `mu`, `sigma`; returns the path.

    The file is written at exactly `path` (no `.npz` is appended); parent folders are created.
    """
    mu, sigma = _as_f64(mu), _as_f64(sigma)
    f = mu.shape[0] if mu.ndim == 1 else -1
    if f < 0 or sigma.shape != (f, f):
        raise ValueError(f"expected mu [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read `(mu, sigma)` float64 from an EDM-style `.npz` (keys `mu`, `sigma`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics not found: '{path}'")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"'{path}' lacks key(s) {missing} (has {sorted(data.files)}); FID reference "
                "statistics need arrays 'mu' [F] and 'sigma' [F, F], as written by EDM's fid.py "
                "or fdistill.metrics.fid.save_stats"
            )
        mu = data["mu"].astype(np.float64)
        sigma = data["sigma"].astype(np.float64)
    f = mu.shape[0] if mu.ndim == 1 else -1
    if f < 0 or sigma.shape != (f, f):
        raise ValueError(f"'{path}': mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# torchmetrics path


_metric_class: type | None = None


def _torchmetrics_fid_class() -> type:
    """torchmetrics' FrechetInceptionDistance with our float64 Frechet distance in `compute`."""
    global _metric_class
    if _metric_class is not None:
        return _metric_class
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(
            f"FID through torchmetrics needs the optional torchmetrics: {_FID_EXTRA_HINT}"
        ) from e

    class _FrechetDistanceMetric(FrechetInceptionDistance):
        # torchmetrics keeps float64 feature sums (synced across processes before `compute`);
        # only the final distance is replaced so that every FID path shares one implementation.
        def compute(self) -> Tensor:
            n_r, n_f = int(self.real_features_num_samples), int(self.fake_features_num_samples)
            if n_r < 2 or n_f < 2:
                raise RuntimeError("FID needs at least 2 real and 2 fake samples")
            stats = []
            for total, outer, n in (
                (self.real_features_sum, self.real_features_cov_sum, n_r),
                (self.fake_features_sum, self.fake_features_cov_sum, n_f),
            ):
                mu = total.double() / n
                sigma = (outer.double() - n * torch.outer(mu, mu)) / (n - 1)
                stats += [mu, sigma]
            return torch.tensor(frechet_distance_from_stats(*stats), dtype=torch.float64)

    _metric_class = _FrechetDistanceMetric
    return _metric_class


def torchmetrics_fid(feature_module: nn.Module, **kwargs) -> nn.Module:
    """A torchmetrics `FrechetInceptionDistance` metric that uses `feature_module` for features.

    `feature_module` maps an image batch to [B, F] features and should carry an int
    `num_features` (otherwise torchmetrics probes it with a dummy 3x299x299 batch). Images given
    to `update(images, real=...)` go to the module unchanged. The custom-module path needs only
    torchmetrics, not torch-fidelity. `kwargs` go to torchmetrics (e.g. `reset_real_features`).
    """
    return _torchmetrics_fid_class()(feature=feature_module, **kwargs)


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        return images.split(batch_size)
    return images


def fid_torchmetrics(
    feature_module: nn.Module,
    real_images: Tensor | Iterable[Tensor],
    fake_images: Tensor | Iterable[Tensor],
    batch_size: int = 64,
) -> float:
    """FID of two image sets through torchmetrics' FrechetInceptionDistance and our features.

    Each image set is a tensor (split into `batch_size` chunks) or an iterable of batches, in
    whatever format `feature_module` expects (`InceptionFeatures`: float in [-1, 1]).
    """
    metric = torchmetrics_fid(feature_module)
    for batch in _batches(real_images, batch_size):
        metric.update(batch, real=True)
    for batch in _batches(fake_images, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())
