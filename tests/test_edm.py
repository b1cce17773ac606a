"""EDM, VP and VE preconditioning, loss and noise grid against Karras et al. (2022), Table 1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fdistill.denoisers.base import FeatureMap, FeatureTaps
from fdistill.denoisers.edm import EDMLoss, EDMPrecond, VEPrecond, VPPrecond, karras_sigmas

SIGMAS = [0.002, 0.05, 0.5, 1.0, 3.0, 80.0]


class Recorder(nn.Module):
    """Raw network that records its inputs and returns a fixed output."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = value

    def forward(self, x, c_noise, cond=None, return_features=False):
        self.x_in, self.c_noise, self.cond = x, c_noise, cond
        out = torch.full_like(x, self.value)
        return (out, x.mean(1)) if return_features else out


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_coefficients_match_edm_table(sigma_data):
    pre = EDMPrecond(Recorder(), sigma_data=sigma_data)
    for s in SIGMAS:
        c_skip, c_out, c_in, c_noise = pre.coefficients(torch.tensor(s, dtype=torch.float64))
        r = math.hypot(s, sigma_data)
        assert math.isclose(c_skip.item(), sigma_data**2 / r**2, rel_tol=1e-12)
        assert math.isclose(c_out.item(), s * sigma_data / r, rel_tol=1e-12)
        assert math.isclose(c_in.item(), 1 / r, rel_tol=1e-12)
        assert math.isclose(c_noise.item(), 0.25 * math.log(s), rel_tol=1e-12)


def test_precond_forward_uses_coefficients():
    sd = 0.5
    x = torch.randn(6, 3)
    sigma = torch.tensor(SIGMAS)
    for value in (0.0, 1.0):
        net = Recorder(value)
        d = EDMPrecond(net, sigma_data=sd)(x, sigma, cond=torch.arange(6))
        r = (sigma**2 + sd**2).sqrt()[:, None]
        c_skip, c_out = sd**2 / r**2, sigma[:, None] * sd / r
        # F = 0 gives D = c_skip x; a constant F = 1 adds c_out.
        torch.testing.assert_close(d, c_skip * x + value * c_out)
        torch.testing.assert_close(net.x_in, x / r)
        torch.testing.assert_close(net.c_noise, sigma.log() / 4)
        assert torch.equal(net.cond, torch.arange(6))
    x0, feats = EDMPrecond(Recorder(), sigma_data=sd)(x, 2.0, return_features=True)
    torch.testing.assert_close(x0, sd**2 / (4 + sd**2) * x)
    torch.testing.assert_close(feats, (x / math.sqrt(4 + sd**2)).mean(1))


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_network_input_and_target_have_unit_variance(sigma):
    # Non-Gaussian data of std sigma_data (scaled Rademacher) to show that only the
    # variance matters.
    sd, n = 0.5, 400_000
    g = torch.Generator().manual_seed(0)
    y = sd * (torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1)
    noise = sigma * torch.randn(n, generator=g, dtype=torch.float64)
    c_skip, c_out, c_in, _ = EDMPrecond(Recorder(), sd).coefficients(
        torch.tensor(sigma, dtype=torch.float64)
    )
    x = y + noise
    assert abs((c_in * x).var().item() - 1) < 0.01
    assert abs(((y - c_skip * x) / c_out).var().item() - 1) < 0.01


def _loss_mean(denoiser, x0, loss, seed=0):
    return loss(denoiser, x0, generator=torch.Generator().manual_seed(seed)).mean().item()


def test_exact_denoiser_minimises_edm_loss():
    # 1-D Gaussian data N(0, s0^2): the Bayes-optimal denoiser is s0^2 / (s0^2 + sigma^2) x.
    # Common random numbers: every candidate sees the same sigmas and noise.
    s0, n = 0.7, 100_000
    x0 = s0 * torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    loss = EDMLoss()

    def exact(x, sigma, cond=None):
        s = sigma.reshape(-1, 1)
        return s0**2 / (s0**2 + s**2) * x

    base = _loss_mean(exact, x0, loss)
    for perturbed in (
        lambda x, s, c=None: exact(x, s) + 0.02,
        lambda x, s, c=None: exact(x, s) - 0.02,
        lambda x, s, c=None: exact(x, s) * 1.02,
        lambda x, s, c=None: exact(x, s) * 0.98,
    ):
        assert _loss_mean(perturbed, x0, loss) > base


def test_edm_loss_weighting_closed_form():
    # A constant offset eps adds, in expectation, eps^2 * E[lambda(sigma)] with
    # lambda = 1/sigma_data^2 + 1/sigma^2 and ln sigma ~ N(P_mean, P_std^2), so
    # E[1/sigma^2] = exp(-2 P_mean + 2 P_std^2). The exact denoiser makes the cross term
    # zero-mean.
    s0, sd, n, eps = 0.5, 0.5, 400_000, 0.1
    pm, ps = -0.5, 0.4
    loss = EDMLoss(p_mean=pm, p_std=ps, sigma_data=sd)
    x0 = s0 * torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def exact(x, sigma, cond=None):
        s = sigma.reshape(-1, 1)
        return s0**2 / (s0**2 + s**2) * x

    excess = _loss_mean(lambda x, s, c=None: exact(x, s) + eps, x0, loss) - _loss_mean(
        exact, x0, loss
    )
    expected = eps**2 * (1 / sd**2 + math.exp(-2 * pm + 2 * ps**2))
    assert abs(excess / expected - 1) < 0.05


def test_edm_loss_is_per_sample_and_reproducible():
    x0 = torch.randn(5, 2, 3)
    loss = EDMLoss()

    def d(x, sigma, cond=None):
        return torch.zeros_like(x)

    a = loss(d, x0, generator=torch.Generator().manual_seed(3))
    b = loss(d, x0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5,) and torch.equal(a, b)


def test_karras_sigmas_closed_form():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 18
    assert math.isclose(t[0].item(), 80.0, rel_tol=1e-12)
    assert math.isclose(t[-1].item(), 0.002, rel_tol=1e-12)
    assert (t[1:] < t[:-1]).all()
    # sigma^(1/rho) is evenly spaced: a straight line in the index.
    r = t ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], torch.full_like(r[1:], (r[-1] - r[0]).item() / 17))
    # rho = 1 is a linspace; n = 3 has the midpoint ((a + b) / 2)^rho.
    lin = karras_sigmas(5, 1.0, 5.0, rho=1.0)
    torch.testing.assert_close(lin, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    mid = karras_sigmas(3, 0.002, 80.0)[1].item()
    assert math.isclose(mid, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, rel_tol=1e-12)
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_teacher_trained_on_gaussian_data_matches_closed_form():
    """The library's teacher loop on N(mu, diag(s^2)) data learns the Bayes denoiser
    mu + s^2 / (s^2 + sigma^2) * (x - mu) (a known closed form, not the code under test)."""
    from fdistill.denoisers import MLP, EDMPrecond
    from fdistill.training import TeacherTrainConfig, train_teacher

    mu, s = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.25])

    def sample_real(n, gen):
        return mu + s * torch.randn(n, 2, generator=gen), None

    torch.manual_seed(0)
    net = EDMPrecond(MLP(2, hidden=64, depth=2), sigma_data=0.4)
    cfg = TeacherTrainConfig(steps=800, batch=1024, lr=3e-3, ema_decay=0.99, progress=False)
    ema = train_teacher(net, sample_real, cfg)
    g = torch.Generator().manual_seed(5)
    for sigma in (0.05, 0.3, 1.0, 3.0):
        x = mu + (s**2 + sigma**2).sqrt() * torch.randn(4096, 2, generator=g)  # p_sigma
        exact = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        with torch.no_grad():
            d = ema.module(x, sigma)
        # RMS error in units of the posterior std, the denoiser's irreducible error
        # (measured 0.02-0.08; an untrained network is off by more than 1)
        post_var = s**2 * sigma**2 / (s**2 + sigma**2)
        rel = ((d - exact) ** 2 / post_var).mean().sqrt()
        assert rel < 0.15, (sigma, float(rel))


# ------------------------------------------------------------------- VP / VE preconditioning
# EDM's Table 1, checked against float64 closed forms written with math (log1p, expm1).

VP_DEFAULTS = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
WIDE_SIGMAS = [0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0]


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t))


@pytest.mark.parametrize("beta_d, beta_min, M", [(19.9, 0.1, 1000), (18.0, 0.3, 500)])
def test_vp_coefficients_match_table(beta_d, beta_min, M):
    pre = VPPrecond(Recorder(), beta_d=beta_d, beta_min=beta_min, M=M)
    for s in WIDE_SIGMAS:
        c_skip, c_out, c_in, c_noise = (
            c.item() for c in pre.coefficients(torch.tensor(s, dtype=torch.float64))
        )
        assert c_skip == 1.0 and c_out == -s
        assert math.isclose(c_in, 1 / math.sqrt(1 + s * s), rel_tol=1e-12)
        # c_noise / (M - 1) is the time t >= 0 whose schedule reaches s:
        # beta_d t^2 / 2 + beta_min t = log(1 + s^2)
        t = c_noise / (M - 1)
        assert t > 0
        lhs = 0.5 * beta_d * t * t + beta_min * t
        assert math.isclose(lhs, math.log1p(s * s), rel_tol=1e-9)
        assert math.isclose(_vp_sigma(t, beta_d, beta_min), s, rel_tol=1e-9)


def test_vp_schedule_round_trip_and_range():
    pre = VPPrecond(Recorder(), **VP_DEFAULTS)
    t = torch.linspace(1e-5, 1.0, 101, dtype=torch.float64)
    sig = pre.sigma(t)
    for ti, si in zip(t.tolist(), sig.tolist(), strict=True):
        assert math.isclose(si, _vp_sigma(ti), rel_tol=1e-9)  # exp - 1 vs expm1 at t ~ 0
    torch.testing.assert_close(pre.sigma_inv(sig), t, rtol=1e-9, atol=0)
    s = torch.tensor(WIDE_SIGMAS, dtype=torch.float64)
    torch.testing.assert_close(pre.sigma(pre.sigma_inv(s)), s, rtol=1e-9, atol=0)
    # the range EDM records for VP: sigma(epsilon_t) .. sigma(1), about 0.001 .. 152
    assert math.isclose(pre.sigma_min, _vp_sigma(1e-5), rel_tol=1e-9)
    assert math.isclose(pre.sigma_max, _vp_sigma(1.0), rel_tol=1e-12)
    assert 0.0009 < pre.sigma_min < 0.0011 and 151 < pre.sigma_max < 153


@pytest.mark.parametrize("sigma_min, sigma_max", [(0.02, 100.0), (0.01, 50.0)])
def test_ve_coefficients_match_table(sigma_min, sigma_max):
    pre = VEPrecond(Recorder(), sigma_min=sigma_min, sigma_max=sigma_max)
    assert (pre.sigma_min, pre.sigma_max) == (sigma_min, sigma_max)
    for s in WIDE_SIGMAS + [100.0]:
        c_skip, c_out, c_in, c_noise = (
            c.item() for c in pre.coefficients(torch.tensor(s, dtype=torch.float64))
        )
        assert (c_skip, c_out, c_in) == (1.0, s, 1.0)
        assert math.isclose(c_noise, math.log(s) - math.log(2), rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("kind", ["VP", "VE"])
def test_vp_ve_forward_uses_their_coefficients(kind):
    x = torch.randn(len(WIDE_SIGMAS), 3, dtype=torch.float64)
    sig = WIDE_SIGMAS
    for value in (0.0, 1.0):
        net = Recorder(value)
        pre = VPPrecond(net, **VP_DEFAULTS) if kind == "VP" else VEPrecond(net)
        d = pre(x.float(), torch.tensor(sig), cond=torch.arange(len(sig)))
        c_out = torch.tensor([-s if kind == "VP" else s for s in sig], dtype=torch.float64)
        c_in = torch.tensor(
            [1 / math.sqrt(1 + s * s) if kind == "VP" else 1.0 for s in sig], dtype=torch.float64
        )
        # F = 0 gives D = x (c_skip = 1); a constant F = 1 adds c_out
        torch.testing.assert_close(d.double(), x + value * c_out[:, None], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net.x_in.double(), x * c_in[:, None], rtol=1e-6, atol=1e-7)
        if kind == "VE":
            expect = torch.tensor([math.log(s / 2) for s in sig])
        else:  # t from the quadratic, solved with log1p in float64
            expect = torch.tensor(
                [999 * (math.sqrt(0.01 + 39.8 * math.log1p(s * s)) - 0.1) / 19.9 for s in sig]
            )
        # EDM evaluates the coefficients in float32, and so do we: VP's log(1 + s^2) then loses
        # digits at small sigma (1.3% of c_noise at s = 0.002, 3e-4 at s = 0.01)
        torch.testing.assert_close(net.c_noise, pre.coefficients(torch.tensor(sig))[3])
        torch.testing.assert_close(net.c_noise[1:], expect[1:], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(net.c_noise[:1], expect[:1], rtol=2e-2, atol=0)
        assert torch.equal(net.cond, torch.arange(len(sig)))


class TapNet(FeatureTaps, nn.Module):
    """Raw network with two feature taps; features are the input's channel means."""

    def feature_maps(self):
        return [FeatureMap("enc8", 3, 8), FeatureMap("mid", 3, 4)]

    def forward(self, x, c_noise, cond=None, return_features=False):
        feats = [x.mean(1) for _ in self.feature_taps]
        if return_features == "only":
            return feats
        return (x, feats) if return_features else x


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond])
def test_preconditioning_delegates_feature_taps(cls):
    net = TapNet()
    pre = cls(net)
    assert isinstance(pre, FeatureTaps)
    assert [m.name for m in pre.feature_maps()] == ["enc8", "mid"]
    assert pre.feature_taps == ("enc8",)
    pre.set_feature_taps(["mid", "enc8"])
    assert net.feature_taps == ("enc8", "mid") == pre.feature_taps
    feats = pre(torch.randn(2, 3, 8, 8), 1.0, return_features="only")
    assert len(feats) == 2
    with pytest.raises(ValueError, match="valid: enc8, mid"):
        pre.set_feature_taps(["enc4"])
    with pytest.raises(ValueError, match="offers no discriminator features"):
        cls(Recorder()).feature_maps()
