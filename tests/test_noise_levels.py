"""Noise-level samplers in the teacher's time variable, checked against independent computations.

* The EDM sampler is bit-identical to ``FDistill.sample_sigma`` (same draws, same generator state).
* Discrete-time draws pass a chi-square goodness-of-fit test for the uniform law on
  ``[t_min, t_max]`` (and the Karras grid seen in timesteps fails it: the test can fail).
* Timesteps become noise levels as a float64 computation from the betas says.
* Ratio bins linear in the timestep agree with the official ``floor`` formula, done by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fdistill.loss import SigmaBins
from fdistill.noise_levels import (
    DMD2_T_RANGE,
    DiscreteTimeLevels,
    KarrasGridLevels,
    TimestepBins,
    noise_levels_for,
    ratio_bins,
    sigmas_from_alphas_cumprod,
    timestep_bin_index,
    timesteps_of_levels,
)
from fdistill.rng import BatchRandom

try:  # the schedule's home moves with the teachers' refactor
    from fdistill.teachers.diffusers_base import DiscreteSchedule
except ImportError:
    from fdistill.teachers.diffusers_unet import DiscreteSchedule

stats = pytest.importorskip("scipy.stats")

SD15 = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


def _sd_sigmas_by_hand() -> np.ndarray:
    """SD v1.5's noise levels in float64 numpy, from the betas (no torch, no fdistill)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


# --------------------------------------------------------------------------- EDM: Karras grid
def _tiny_fdistill(**loss):
    from fdistill.critic import MultiScaleHead
    from fdistill.denoisers import EDMPrecond, UNet

    try:
        from fdistill.methods.fdistill import FDistill, LossConfig
    except ImportError:
        from fdistill.distill import FDistill, LossConfig
    from fdistill.divergences import get_divergence
    from fdistill.generator import OneStepGenerator

    torch.manual_seed(0)

    def unet():
        return EDMPrecond(UNet(8, 1, model_channels=4, channel_mult=(1,), num_classes=0))

    schedule = loss.pop("schedule", None)
    teacher = unet()
    cfg = LossConfig(**loss)
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(unet(), sigma_init=cfg.sigma_max),
        fake_score=unet(),
        head=MultiScaleHead.for_network(teacher, hidden=4),
        divergence=get_divergence("js"),
        cfg=cfg,
        schedule=schedule,
    )


@pytest.mark.parametrize(
    "loss",
    [{}, {"sigma_min": 0.0292, "sigma_max": 14.61, "num_sigmas": 257, "rho": 5.0}],
)
@pytest.mark.parametrize("source", ["generator", "batch-random"])
def test_karras_levels_are_bit_identical_to_fdistill_sample_sigma(loss, source):
    model = _tiny_fdistill(**loss)
    cfg = model.cfg
    levels = KarrasGridLevels(cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.num_sigmas)

    def make():
        if source == "generator":
            return torch.Generator().manual_seed(5)
        return BatchRandom(5, rank=1, world=3)

    g_old, g_new = make(), make()
    for n in (1, 7, 64):
        old = model.sample_sigma(n, g_old)
        new = levels.sample(n, g_new)
        assert new.dtype == old.dtype == torch.float32
        assert torch.equal(new, old)
    assert torch.equal(g_old.get_state(), g_new.get_state())


def test_karras_grid_by_hand_and_fastgen_exclusions():
    """The grid is EDM's formula in float64; FastGen's draws are ascending indices 2..998."""
    n, lo, hi, rho = 1000, 0.002, 80.0, 7.0
    by_hand = [
        (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        for i in range(n)
    ]
    ours = KarrasGridLevels(lo, hi, rho, n).sigma_grid
    assert torch.equal(ours, torch.tensor(by_hand[1:-1], dtype=torch.float64).float())
    fastgen = KarrasGridLevels(lo, hi, rho, n, exclude_high=1, exclude_low=2).sigma_grid
    ascending = sorted(by_hand)
    assert torch.equal(fastgen.flip(0), torch.tensor(ascending[2:999], dtype=torch.float64).float())
    with pytest.raises(ValueError, match="leaves none"):
        KarrasGridLevels(num_sigmas=4, exclude_high=2, exclude_low=2)


def test_karras_grid_on_sd_is_what_the_issue_reports():
    """On SD v1.5's sigma range the Karras grid puts 17 % of draws below t=20, median t~427."""
    s = _sd_sigmas_by_hand()
    abar = torch.from_numpy(1 / (1 + s**2))  # sigma = sqrt((1 - abar) / abar), inverted
    t = timesteps_of_levels(KarrasGridLevels(s[0], s[-1]), abar)
    assert float((t < 20).double().mean()) == pytest.approx(0.173, abs=0.002)
    assert float(t.median()) == pytest.approx(427, abs=1.0)
    uniform = timesteps_of_levels(DiscreteTimeLevels(abar), abar)
    assert torch.allclose(uniform, torch.arange(1, 1000, dtype=torch.float64), atol=1e-6)


# --------------------------------------------------------------------------- discrete time
@pytest.mark.parametrize("t_range", [(1, 999), DMD2_T_RANGE])
def test_discrete_timesteps_are_uniform_chi_square(t_range):
    levels = DiscreteTimeLevels.from_schedule(DiscreteSchedule(SD15), *t_range)
    g = torch.Generator().manual_seed(123)
    t = torch.cat([levels.sample_timesteps(50_000, g) for _ in range(4)])
    assert t.dtype == torch.long
    lo, hi = t_range
    assert int(t.min()) == lo and int(t.max()) == hi
    counts = torch.bincount(t - lo, minlength=hi - lo + 1).numpy()
    assert len(counts) == hi - lo + 1  # nothing outside the range
    p = stats.chisquare(counts).pvalue  # H0: every integer of [lo, hi] equally likely
    assert p > 1e-3, p
    # The same test rejects the Karras grid's draws read as timesteps: it has power.
    karras = KarrasGridLevels(levels.sigma_min, levels.sigma_max)
    kt = levels.timestep_of_sigma(karras.sample(200_000, torch.Generator().manual_seed(1)))
    kc = torch.bincount(kt.round().long().clamp(lo, hi) - lo, minlength=hi - lo + 1).numpy()
    assert stats.chisquare(kc).pvalue < 1e-12


def test_discrete_draws_are_rank_independent():
    levels = DiscreteTimeLevels(DiscreteSchedule(SD15).alphas_cumprod, *DMD2_T_RANGE)
    whole = levels.sample(12, BatchRandom(7, rank=0, world=1))
    parts = [levels.sample(4, BatchRandom(7, rank=r, world=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expect = torch.randint(961, (5,), generator=g2) + 20
    assert torch.equal(levels.sample_timesteps(5, g1), expect)


def test_timestep_to_sigma_matches_float64_from_betas():
    s = _sd_sigmas_by_hand()
    levels = DiscreteTimeLevels.from_schedule(DiscreteSchedule(SD15))
    np.testing.assert_allclose(levels.sigmas64.numpy(), s, rtol=1e-13, atol=0)
    t = torch.tensor([1, 2, 20, 427, 500, 980, 999])
    got = levels.sigma_of_timestep(t)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(s[t.numpy()]).float())
    # sampled levels are those of their timesteps, and the teacher maps them back to them
    g = torch.Generator().manual_seed(0)
    ts = levels.sample_timesteps(256, g)
    sig = levels.sample(256, torch.Generator().manual_seed(0))
    assert torch.equal(sig, torch.from_numpy(s[ts.numpy()]).float())
    back = DiscreteSchedule(SD15).timestep(sig)
    assert torch.allclose(back, ts.double(), atol=2e-3)
    assert torch.allclose(levels.timestep_of_sigma(sig), back, atol=1e-9)
    assert levels.sigma_min == pytest.approx(s[1], rel=1e-13)
    assert levels.sigma_max == pytest.approx(s[999], rel=1e-13)


def test_sigma_conversion_agrees_with_diffusers_tables():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(**SD15)
    abar = sched.alphas_cumprod.double()  # diffusers computes it in float32
    ours = sigmas_from_alphas_cumprod(DiscreteSchedule(SD15).alphas_cumprod)
    theirs = ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=0)


def test_bad_ranges_are_refused():
    abar = DiscreteSchedule(SD15).alphas_cumprod
    with pytest.raises(ValueError, match="timestep range"):
        DiscreteTimeLevels(abar, 10, 1000)
    with pytest.raises(ValueError, match="timestep range"):
        DiscreteTimeLevels(abar, 50, 20)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteTimeLevels(torch.tensor([0.5, 1.0]))


# --------------------------------------------------------------------------- ratio bins
def test_timestep_bins_follow_the_official_floor_formula():
    abar = DiscreteSchedule(SD15).alphas_cumprod
    levels = DiscreteTimeLevels(abar, 0, 999)
    bins = ratio_bins(levels)
    assert isinstance(bins, TimestepBins) and bins.num_bins == 10
    t = torch.arange(1000)
    got = bins(levels.sigma_of_timestep(t))  # float32 levels, as the losses see them
    # FastGen f_distill.py: floor((t/1000 - min_t) / ((max_t - min_t) / bin_num)), min 0, max .999
    by_hand = [min(math.floor((k / 1000 - 0.0) / ((0.999 - 0.0) / 10)), 9) for k in range(1000)]
    assert got.tolist() == by_hand
    assert timestep_bin_index(t).tolist() == by_hand
    assert torch.bincount(got).tolist() == [100] * 9 + [100]  # t 0..99, 100..199, ..., 900..999
    # Levels off the grid use the teacher's log-sigma interpolation; beyond the table: end bins.
    mid = torch.tensor([levels.sigmas64[99] * 0.5 + levels.sigmas64[100] * 0.5])
    assert bins(mid).tolist() == timestep_bin_index(levels.timestep_of_sigma(mid)).tolist()
    assert bins(torch.tensor([1e-6, 1e6])).tolist() == [0, 9]
    custom = TimestepBins(abar, 4, (20.0, 980.0))
    assert (
        custom(levels.sigma_of_timestep(t)).tolist() == timestep_bin_index(t, 4, 20, 980).tolist()
    )


def test_edm_ratio_bins_are_linear_in_sigma():
    levels = KarrasGridLevels(0.002, 80.0)
    bins = ratio_bins(levels)
    assert isinstance(bins, SigmaBins) and bins.binning == "linear-sigma"
    s = levels.sigma_grid
    by_hand = [min(max(math.floor((float(x) - 0.002) / ((80 - 0.002) / 10)), 0), 9) for x in s]
    assert bins(s).tolist() == by_hand


def test_noise_levels_for_follows_the_time_parameterisation():
    sched = DiscreteSchedule(SD15)
    assert isinstance(noise_levels_for(None), KarrasGridLevels)
    d = noise_levels_for(sched, t_range=DMD2_T_RANGE)
    assert isinstance(d, DiscreteTimeLevels) and (d.t_min, d.t_max) == DMD2_T_RANGE
    e = noise_levels_for(None, sigma_min=0.01, sigma_max=10.0, num_sigmas=50)
    assert float(e.sigma_grid[0]) < 10.0 and len(e.sigma_grid) == 48


# --------------------------------------------------------------------------- the method uses them
def test_fdistill_takes_the_teachers_time_variable():
    """With a discrete-time teacher's schedule, f-distill's noise levels are uniform timesteps
    over --t-range (the draws of DiscreteTimeLevels, number for number) and its ratio bins are
    linear in the timestep; an EDM teacher keeps the Karras grid and sigma bins; asking an EDM
    teacher for timesteps is one line."""
    sched = DiscreteSchedule(SD15)
    m = _tiny_fdistill(schedule=sched, t_range=(20, 980), sigma_min=sched.sigma_min,
                       sigma_max=sched.sigma_max)  # fmt: skip
    ref = DiscreteTimeLevels(sched.alphas_cumprod, 20, 980)
    got = m.sample_sigma(64, torch.Generator().manual_seed(3))
    want = ref.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    t = m.levels.timestep_of_sigma(got.double())
    assert t.min() >= 20 - 1e-6 and t.max() <= 980 + 1e-6
    assert isinstance(m.sigma_bins, TimestepBins)
    assert m.weights.normalizer.bins is m.sigma_bins
    edm = _tiny_fdistill()
    assert isinstance(edm.levels, KarrasGridLevels) and edm.sigma_bins.binning == "linear-sigma"
    with pytest.raises(ValueError, match="discrete-time teacher"):
        _tiny_fdistill(noise_levels="timestep")
