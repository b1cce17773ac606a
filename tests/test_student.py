"""The K-step student (fdistill.generator): sampling, backward simulation, forward inputs,
rank independence, the K = 1 case against the historical one-step generator, default levels
and validation. Tiny MLP denoisers; every reference below is computed independently."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fdistill.denoisers import EDMPrecond
from fdistill.denoisers.mlp import MLP
from fdistill.generator import (
    OneStepGenerator,
    Student,
    default_student_sigmas,
    default_student_timesteps,
    draw_step,
    validate_student_sigmas,
)
from fdistill.rng import BatchRandom
from fdistill.samplers import SeededGenerator

DIM = 4
SIGMAS4 = [80.0, 17.5, 2.5, 0.17]


def _den(num_classes: int = 0, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = MLP(DIM, hidden=16, depth=1, num_classes=num_classes)
    for p in net.parameters():  # nonzero output layer: every step changes the sample
        nn.init.normal_(p, std=0.3)
    return EDMPrecond(net)


class Recorder(nn.Module):
    """Passes calls through to ``inner`` and records each call's input and grad mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, x, sigma, cond=None):
        self.calls.append(
            {
                "x": x.detach().clone(),
                "sigma": sigma,
                "grad_enabled": torch.is_grad_enabled(),
                "x_requires_grad": x.requires_grad,
            }
        )
        return self.inner(x, sigma, cond)


class Zero(nn.Module):
    """``D = 0``: each step's input is then ``sigma_k * eps_k``, so the noise can be read back."""

    def forward(self, x, sigma, cond=None):
        return torch.zeros_like(x)


class OldOneStepGenerator(nn.Module):
    """The one-step generator as it was before few-step students (the reference for K = 1)."""

    def __init__(self, denoiser: nn.Module, sigma_init: float = 80.0):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z, cond=None):
        return self.denoiser(z * self.sigma_init, self.sigma_init, cond)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]).double())[0, 1])


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sample_calls_network_k_times_at_the_student_levels(k):
    rec = Recorder(_den())
    student = Student(rec, SIGMAS4[:k])
    g = SeededGenerator(range(5))
    z = g.randn((DIM,))
    with torch.no_grad():
        out = student.sample(z, None, g)
    assert len(rec.calls) == k
    assert [c["sigma"] for c in rec.calls] == SIGMAS4[:k]
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_sample_equals_reference_loop_and_is_independent_of_the_batch():
    den = _den(num_classes=3)
    student = Student(copy.deepcopy(den), SIGMAS4)
    seeds, cond = list(range(10, 16)), torch.tensor([0, 1, 2, 0, 1, 2])
    g = SeededGenerator(seeds)
    z = g.randn((DIM,))
    with torch.no_grad():
        out = student(z, cond, g)
        # reference: each sample from its own torch.Generator, one row at a time
        for i, s in enumerate(seeds):
            gi = torch.Generator().manual_seed(s)
            zi = torch.randn((1, DIM), generator=gi)
            x0 = den(SIGMAS4[0] * zi, SIGMAS4[0], cond[i : i + 1])
            for sk in SIGMAS4[1:]:
                x0 = den(x0 + sk * torch.randn((1, DIM), generator=gi), sk, cond[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], x0, rtol=1e-5, atol=1e-5)


def test_sample_needs_a_noise_source_beyond_one_step():
    z = torch.randn(3, DIM)
    with pytest.raises(ValueError, match="noise source"):
        Student(_den(), SIGMAS4[:2])(z)
    with pytest.raises(ValueError, match="noise source"):
        Student(_den(), SIGMAS4[:2]).sample(z, None)
    # K = 1 needs none; a torch.Generator and a callable are accepted noise sources
    assert Student(_den(), SIGMAS4[:1])(z).shape == z.shape
    two = Student(_den(), SIGMAS4[:2])
    a = two(z, None, torch.Generator().manual_seed(0))
    b = two(z, None, lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="train=True"):
        two(z, None, torch.Generator(), step=1)


# --------------------------------------------------------------------------- backward simulation


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_backward_simulation_no_gradient_into_simulated_steps(k):
    den = _den(num_classes=3)
    rec = Recorder(copy.deepcopy(den))
    student = Student(rec, SIGMAS4)
    gz = torch.Generator().manual_seed(7)
    z, cond = torch.randn(6, DIM, generator=gz), torch.tensor([0, 1, 2, 2, 1, 0])
    gen = torch.Generator().manual_seed(3)
    ref_gen = torch.Generator().manual_seed(3)
    draw = student.training_sample(z, cond, gen, step=k)
    assert (draw.step, draw.sigma) == (k, SIGMAS4[k])

    # k no-grad calls, then exactly one with a graph, on an input that carries none
    assert len(rec.calls) == k + 1
    assert [c["grad_enabled"] for c in rec.calls] == [False] * k + [True]
    assert not any(c["x_requires_grad"] for c in rec.calls)
    assert [c["sigma"] for c in rec.calls] == SIGMAS4[: k + 1]

    # values: an independent replay of the chain (with a forced step, only noise is drawn)
    with torch.no_grad():
        x = SIGMAS4[0] * z
        for j in range(1, k + 1):
            x = den(x, SIGMAS4[j - 1], cond) + SIGMAS4[j] * torch.randn(6, DIM, generator=ref_gen)
    torch.testing.assert_close(rec.calls[-1]["x"], x, rtol=1e-6, atol=1e-6)
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # k draws, nothing more

    # gradients equal those of one step at sigma_k on that input, computed on a fresh copy
    draw.x0.square().sum().backward()
    single = copy.deepcopy(den)
    single(rec.calls[-1]["x"], SIGMAS4[k], cond).square().sum().backward()
    for p, q in zip(rec.inner.parameters(), single.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_drawn_step_is_uniform_and_costs_one_number():
    student = Student(_den(), SIGMAS4)
    gen, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    seen = []
    for _ in range(40):
        z = torch.randn(2, DIM, generator=gen)
        torch.randn(2, DIM, generator=ref)
        draw = student.training_sample(z, None, gen)
        k = int(torch.randint(4, (1,), generator=ref).item())
        assert draw.step == k
        for _ in range(k):
            torch.randn(2, DIM, generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())
        seen.append(k)
    assert set(seen) == {0, 1, 2, 3}
    assert draw_step(1, gen) == 0  # K = 1 draws nothing
    assert torch.equal(gen.get_state(), ref.get_state())


def test_renoising_draws_are_fresh_and_independent():
    n = 4000
    rec = Recorder(Zero())
    student = Student(rec, SIGMAS4)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(n, DIM, generator=gen)
    student.training_sample(z, None, gen, step=3)
    noises = [c["x"] / s for c, s in zip(rec.calls, SIGMAS4, strict=True)]  # z, eps1..eps3
    torch.testing.assert_close(noises[0], z)
    for i, a in enumerate(noises):
        assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
        for b in noises[i + 1 :]:
            assert abs(_corr(a, b)) < 0.05

    # inference with per-sample generators: each step a fresh draw of the sample's own stream
    rec.calls.clear()
    g = SeededGenerator(range(500))
    z = g.randn((DIM,))
    student.sample(z, None, g)
    noises = [c["x"] / s for c, s in zip(rec.calls, SIGMAS4, strict=True)]
    torch.testing.assert_close(noises[0], z)
    for i, a in enumerate(noises):
        for b in noises[i + 1 :]:
            assert abs(_corr(a, b)) < 0.1


def test_step_index_and_rows_match_one_process():
    """BatchRandom ranks 0 and 1 of 2 draw the same step and the world-1 run's rows."""
    n, seed = 3, 123
    student = Student(_den(), SIGMAS4)
    one = BatchRandom(seed, 0, 1)
    ranks = [BatchRandom(seed, r, 2) for r in range(2)]
    steps = []
    for _ in range(12):
        z1 = one.randn((2 * n, DIM))
        d1 = student.training_sample(z1, None, one)
        for r, g in enumerate(ranks):
            zr = g.randn((n, DIM))
            torch.testing.assert_close(zr, z1[r * n : (r + 1) * n], rtol=0, atol=0)
            dr = student.training_sample(zr, None, g)
            assert dr.step == d1.step
            torch.testing.assert_close(dr.x0, d1.x0[r * n : (r + 1) * n], rtol=1e-6, atol=1e-6)
            assert torch.equal(g.get_state(), one.get_state())
        steps.append(d1.step)
    assert len(set(steps)) > 1


# --------------------------------------------------------------------------- forward inputs


def test_forward_inputs_noise_real_data_at_the_drawn_level():
    rec = Recorder(_den())
    student = Student(rec, SIGMAS4, inputs="forward")
    assert student.needs_real_data
    z, x_real = torch.randn(500, DIM), torch.randn(500, DIM) * 0.5 + 1
    with pytest.raises(ValueError, match="x_real"):
        student.training_sample(z, None, torch.Generator())
    gen, ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    draw = student.training_sample(z, None, gen, x_real=x_real, step=2)
    assert len(rec.calls) == 1 and rec.calls[0]["grad_enabled"] and rec.calls[0]["sigma"] == 2.5
    eps = torch.randn(500, DIM, generator=ref)
    torch.testing.assert_close(rec.calls[0]["x"], x_real + 2.5 * eps, rtol=0, atol=0)
    assert abs(_corr(eps, z)) < 0.1
    assert draw.x0.requires_grad and draw.step == 2
    # k = 0 is pure noise, as for the sampler's first step
    rec.calls.clear()
    student.training_sample(z, None, gen, x_real=x_real, step=0)
    torch.testing.assert_close(rec.calls[0]["x"], 80.0 * z, rtol=0, atol=0)


# --------------------------------------------------------------------------- K = 1


@pytest.mark.parametrize("inputs", ["backward", "forward"])
def test_k1_reproduces_the_one_step_generator_bit_for_bit(inputs):
    den = _den(num_classes=3)
    old = OldOneStepGenerator(copy.deepcopy(den), 80.0)
    new = OneStepGenerator(copy.deepcopy(den), 80.0)
    student = Student(copy.deepcopy(den), [80.0], inputs=inputs)
    assert list(new.state_dict()) == list(old.state_dict()) == list(student.state_dict())
    new.load_state_dict(old.state_dict())  # old checkpoints load
    assert new.sigma_init == 80.0 and isinstance(new.sigma_init, float)
    assert not student.needs_real_data

    z, cond = torch.randn(5, DIM), torch.tensor([0, 1, 2, 1, 0])
    ref = old(z, cond)
    assert torch.equal(new(z, cond), ref) and torch.equal(student(z, cond), ref)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    gens = [torch.Generator().manual_seed(1), BatchRandom(2, 1, 2), None]
    for gen in gens:
        before = gen.get_state() if gen is not None else None
        for model in (new, student):
            draw = model.training_sample(z, cond, gen)
            assert torch.equal(draw.x0, ref) and (draw.step, draw.sigma) == (0, 80.0)
            draw = model(z, cond, gen, train=True)
            assert torch.equal(draw.x0, ref)
        if gen is not None:
            assert torch.equal(gen.get_state(), before)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_config_round_trip_and_old_runs():
    student = Student(_den(), SIGMAS4, inputs="forward")
    cfg = student.config
    assert cfg == {"steps": 4, "sigmas": SIGMAS4, "inputs": "forward"}
    again = Student.from_config(_den(seed=1), cfg)
    again.load_state_dict(student.state_dict())
    assert again.config == cfg and again.sigma_init == 80.0 and again.steps == 4
    old = Student.from_config(_den(), {"sigma_init": 14.6})
    assert old.config == {"steps": 1, "sigmas": [14.6], "inputs": "backward"}
    assert OneStepGenerator(_den(), 3.0).config == {
        "steps": 1,
        "sigmas": [3.0],
        "inputs": "backward",
    }


# --------------------------------------------------------------------------- default levels


def _sd_sigmas_reference(timesteps: list[int]) -> list[float]:
    """SD's scaled_linear schedule in plain float64 Python."""
    n, a, b = 1000, math.sqrt(0.00085), math.sqrt(0.012)
    abar, out, prod = [], [], 1.0
    for i in range(n):
        beta = (a + i * (b - a) / (n - 1)) ** 2
        prod *= 1 - beta
        abar.append(prod)
    for t in timesteps:
        out.append(math.sqrt((1 - abar[t]) / abar[t]))
    return out


def test_default_sd_sigmas_are_the_schedule_at_999_749_499_249():
    from fdistill.teachers.diffusers_unet import DiscreteSchedule

    sched = DiscreteSchedule(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        }
    )
    teacher = SimpleNamespace(
        schedule=sched, info=SimpleNamespace(sigma_min=sched.sigma_min, sigma_max=sched.sigma_max)
    )
    assert default_student_timesteps(4, 1000) == [999, 749, 499, 249]
    assert default_student_timesteps(2, 1000) == [999, 499]
    assert default_student_timesteps(1, 1000) == [999]
    got = default_student_sigmas(4, teacher)
    for a, b in zip(got, _sd_sigmas_reference([999, 749, 499, 249]), strict=True):
        assert a == pytest.approx(b, rel=1e-12)
    assert default_student_sigmas(1, teacher) == [sched.sigma_max]  # today's sigma_init
    assert default_student_sigmas(4, {"schedule_sigmas": sched.sigmas}) == got
    validate_student_sigmas(got, 4, sched.sigma_min, sched.sigma_max)


def test_default_edm_sigmas_are_the_karras_grid_without_its_last_point():
    info = SimpleNamespace(sigma_min=0.002, sigma_max=80.0)
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    for k in (1, 2, 4):
        ref = [(a + i / k * (b - a)) ** 7 for i in range(k)]
        got = default_student_sigmas(k, info)
        assert got == pytest.approx(ref, rel=1e-12)
        validate_student_sigmas(got, k, 0.002, 80.0)
    assert default_student_sigmas(1, info) == [80.0]
    assert default_student_sigmas(2, SimpleNamespace(info=info)) == default_student_sigmas(2, info)
    with pytest.raises(ValueError, match="sigma_min and sigma_max"):
        default_student_sigmas(2, None)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: validate_student_sigmas([80.0], steps=0), "must be >= 1"),
        (lambda: default_student_sigmas(0, {"sigma_min": 0.002, "sigma_max": 80}), ">= 1"),
        (lambda: default_student_timesteps(0, 1000), ">= 1"),
        (lambda: validate_student_sigmas([80.0, 80.0]), "strictly descending"),
        (lambda: validate_student_sigmas([1.0, 2.0, 0.5]), "strictly descending"),
        (lambda: validate_student_sigmas([100.0, 1.0], 2, 0.002, 80.0), "outside"),
        (lambda: validate_student_sigmas([80.0, 0.001], 2, 0.002, 80.0), "outside"),
        (lambda: validate_student_sigmas([80.0, 1.0], 3), "for 3 student steps"),
        (lambda: validate_student_sigmas([80.0, 1.0, 0.5], 2), "for 2 student steps"),
        (lambda: validate_student_sigmas([80.0, -1.0]), "positive"),
        (lambda: validate_student_sigmas([]), "empty"),
        (lambda: Student(_den(), [1.0, 2.0]), "strictly descending"),
        (lambda: Student(_den(), [80.0], inputs="sideways"), "backward, forward"),
        (lambda: Student.from_config(_den(), {"steps": 2, "sigmas": [80.0]}), "for 2"),
        (lambda: default_student_timesteps(5, 4), "at most one"),
    ],
)
def test_bad_student_levels_are_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_rounded_top_level_is_inside_the_range():
    top = 14.614641
    validate_student_sigmas([top * (1 + 1e-7), 1.0], 2, 0.03, top)
    with pytest.raises(ValueError, match="outside"):
        validate_student_sigmas([top * 1.001, 1.0], 2, 0.03, top)
    with pytest.raises(ValueError, match="not in"):
        Student(_den(), SIGMAS4).training_sample(torch.randn(2, DIM), None, step=4)
