"""Samplers against the closed-form probability-flow ODE of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from fdistill.samplers import (
    SeededGenerator,
    euler_sampler,
    guided,
    heun_sampler,
    sample_with_nfe,
    seeded_randn,
    sigma_grid,
    steps_for_nfe,
    stochastic_sampler,
)

MU, S0, SMAX = 0.3, 0.5, 80.0


def gaussian_denoiser(mu: float | torch.Tensor, s0: float):
    """Exact ``E[x0 | x]`` for data ``N(mu, s0^2 I)``."""

    def denoise(x, sigma, cond=None):
        return mu + s0**2 / (s0**2 + sigma**2) * (x - mu)

    return denoise


def ode_solution(z: torch.Tensor, mu: float, s0: float, sigma: float = 0.0) -> torch.Tensor:
    """Closed-form PF-ODE solution at ``sigma`` from ``x(SMAX) = SMAX * z``."""
    return mu + (SMAX * z - mu) * math.sqrt(s0**2 + sigma**2) / math.sqrt(s0**2 + SMAX**2)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.conds = fn, 0, []

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.conds.append(cond)
        return self.fn(x, sigma, cond)


def _rel_err(x, z):
    ref = ode_solution(z, MU, S0)
    return ((x - ref).abs() / (ref - MU).abs()).max().item()


def test_sigma_grid_ends_at_zero_and_single_step():
    t = sigma_grid(18)
    assert t.dtype == torch.float64 and len(t) == 19
    assert t[0] == 80.0 and t[-1] == 0.0 and math.isclose(t[-2].item(), 0.002, rel_tol=1e-12)
    assert torch.equal(sigma_grid(1, sigma_max=7.0), torch.tensor([7.0, 0.0], dtype=torch.float64))


def test_heun_matches_closed_form_ode_and_is_second_order():
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = gaussian_denoiser(MU, S0)
    errs = [_rel_err(heun_sampler(d, z, num_steps=n), z) for n in (18, 36, 72)]
    # x(0) - mu is 160x smaller than x(sigma_max) - mu, so a relative error of a few % at the
    # end is ~1e-4 of the path.
    assert errs[0] < 0.08
    for a, b in zip(errs[:-1], errs[1:], strict=True):
        assert 3.5 < a / b < 5.5, errs


def test_euler_is_first_order():
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = gaussian_denoiser(MU, S0)
    errs = [_rel_err(euler_sampler(d, z, num_steps=n), z) for n in (18, 36, 72)]
    for a, b in zip(errs[:-1], errs[1:], strict=True):
        assert 1.7 < a / b < 2.3, errs
    assert errs[0] > _rel_err(heun_sampler(d, z, num_steps=18), z)


def test_float32_latents_return_float32_and_match_float64_solver():
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    d = gaussian_denoiser(MU, S0)
    x32 = heun_sampler(d, z)
    x64 = heun_sampler(d, z.double())
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nfe", list(range(1, 11)) + [35])
def test_sample_with_nfe_makes_exactly_nfe_calls(nfe):
    d = Counting(gaussian_denoiser(MU, S0))
    z = torch.randn(4, 2, dtype=torch.float64)
    x = sample_with_nfe(d, z, nfe)
    assert d.calls == nfe
    assert torch.isfinite(x).all()


def test_step_counts_of_samplers():
    z = torch.randn(2, 2, dtype=torch.float64)
    for sampler, n, expected in [
        (heun_sampler, 18, 35),
        (euler_sampler, 18, 18),
        (heun_sampler, 1, 1),
    ]:
        d = Counting(gaussian_denoiser(MU, S0))
        sampler(d, z, num_steps=n)
        assert d.calls == expected
    d = Counting(gaussian_denoiser(MU, S0))
    stochastic_sampler(d, z, num_steps=10, S_churn=5, generator=torch.Generator().manual_seed(0))
    assert d.calls == 19
    assert steps_for_nfe(35) == (18, 1) and steps_for_nfe(4) == (3, 2)


def test_nfe_one_is_denoiser_at_sigma_max():
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = gaussian_denoiser(MU, S0)
    torch.testing.assert_close(sample_with_nfe(d, z, 1), d(SMAX * z, SMAX))
    # Odd NFE is EDM's Heun sampler with (nfe + 1) / 2 steps.
    torch.testing.assert_close(sample_with_nfe(d, z, 35), heun_sampler(d, z, num_steps=18))


def test_even_nfe_converges():
    z = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    d = gaussian_denoiser(MU, S0)
    errs = [_rel_err(sample_with_nfe(d, z, nfe), z) for nfe in (36, 72, 144)]
    assert errs[0] < 0.1 and errs[2] < errs[1] < errs[0]


def test_seeded_randn_is_per_sample():
    seeds = [11, 5, 2**40, 0, 7, 3, 99]
    batch = seeded_randn(seeds, (2, 3))
    assert batch.shape == (7, 2, 3) and batch.dtype == torch.float32
    for i, s in enumerate(seeds):
        ref = torch.randn((2, 3), generator=torch.Generator().manual_seed(s))
        assert torch.equal(batch[i], ref)
        assert torch.equal(seeded_randn([s], (2, 3))[0], batch[i])
    assert torch.equal(seeded_randn(torch.tensor(seeds), (2, 3)), batch)


def test_stochastic_sample_independent_of_batch_size():
    seeds = list(range(100, 107))
    d = gaussian_denoiser(MU, S0)
    kw = dict(num_steps=12, S_churn=30.0)
    z = seeded_randn(seeds, (5,), dtype=torch.float64)
    batch = stochastic_sampler(d, z, generator=SeededGenerator(seeds), **kw)
    for i in (0, 3, 6):
        zi = seeded_randn(seeds[i : i + 1], (5,), dtype=torch.float64)
        alone = stochastic_sampler(d, zi, generator=SeededGenerator(seeds[i : i + 1]), **kw)
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-12)
    other = stochastic_sampler(d, z, generator=SeededGenerator([s + 1 for s in seeds]), **kw)
    assert not torch.allclose(other, batch)


def test_seeded_generator_batch_mismatch_raises():
    with pytest.raises(ValueError):
        SeededGenerator([1, 2]).randn_like(torch.zeros(3, 1))


@pytest.mark.parametrize("kw", [dict(S_churn=40.0, S_min=0.05, S_max=50.0), dict(S_churn=80.0)])
def test_stochastic_sampler_gives_data_distribution(kw):
    n, dim = 4000, 8
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = stochastic_sampler(
        gaussian_denoiser(MU, S0), z, num_steps=64, generator=torch.Generator().manual_seed(6), **kw
    )
    se = S0 / math.sqrt(n * dim)
    assert abs(x.mean().item() - MU) < 4 * se
    assert abs(x.std().item() / S0 - 1) < 0.03
    # Churn re-noises the trajectory, so the sample is no longer a function of z alone.
    corr = torch.corrcoef(torch.stack([x.reshape(-1), z.reshape(-1)]))[0, 1].item()
    assert corr < 0.9


def test_guidance_scale_one_is_conditional_and_none_is_unconditional():
    means = torch.tensor([[-1.0, 2.0], [3.0, 0.5]], dtype=torch.float64)

    def d(x, sigma, cond=None):
        mu = 0.0 if cond is None else means[cond]
        return gaussian_denoiser(mu, S0)(x, sigma)

    x = torch.randn(2, 2, dtype=torch.float64)
    cond = torch.tensor([1, 0])
    assert torch.equal(guided(d, 1.0)(x, 3.0, cond), d(x, 3.0, cond))
    assert torch.equal(guided(d, 2.5)(x, 3.0, None), d(x, 3.0, None))


def test_guided_sampling_matches_closed_form():
    # For N(0, s0^2) unconditional and N(m_c, s0^2) conditional data, D_u + w (D_c - D_u) is
    # the exact denoiser of N(w m_c, s0^2), whose ODE solution is known in closed form.
    m_c, w = 0.8, 2.5

    def d(x, sigma, cond=None):
        return gaussian_denoiser(0.0 if cond is None else m_c, S0)(x, sigma)

    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    counting = Counting(d)
    cond = torch.zeros(16, dtype=torch.long)
    x = heun_sampler(counting, z, cond=cond, num_steps=128, guidance=w)
    ref = ode_solution(z, w * m_c, S0)
    assert ((x - ref).abs() / (ref - w * m_c).abs()).max() < 0.01
    assert counting.calls == 2 * 255
    assert sum(c is None for c in counting.conds) == 255
