import math

import pytest
import torch

from fdistill.divergences import NAMES, Divergence, _second_derivative, get_divergence

BUILTINS = [n for n in NAMES if n != "alpha"]
R = torch.logspace(-6, 6, 241, dtype=torch.float64)


def all_divergences():
    return [get_divergence(n) for n in BUILTINS] + [
        get_divergence("alpha", alpha=a) for a in (-1.0, 0.5, 2.0, 3.0)
    ]


@pytest.mark.parametrize("div", all_divergences(), ids=lambda d: f"{d.name}{d.params or ''}")
def test_h_equals_r2_fpp_by_autograd(div):
    """h(log r) == r^2 f''(r), with f'' from float64 double autograd of the divergence's own f."""
    ref = R**2 * _second_derivative(div.f, R)
    got = div.h(R.log())
    # 2e-4 only because float64 autograd of e.g. Neyman's (1-r)^2/r cancels at r = 1e6;
    # a dropped constant in h would be off by a factor, not by 1e-4.
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=0)
    assert abs(float(div.f(torch.ones(1, dtype=torch.float64)))) < 1e-12


def test_table_values():
    """Spot values of DESIGN.md's table at r = 3, computed by hand."""
    r = 3.0
    expect = {
        "rkl": 1.0,
        "srkl": 1 / (r + 1),
        "js": r / (r + 1),
        "hellinger": math.sqrt(r) / 4,
        "fkl": r,
        "jeffreys": r + 1,
        "pearson": 2 * r**2,
        "neyman": 2 / r,
    }
    lr = torch.tensor([math.log(r)], dtype=torch.float64)
    for name, value in expect.items():
        assert float(get_divergence(name).h(lr)) == pytest.approx(value, rel=1e-12), name
    assert float(get_divergence("alpha", alpha=0.3).h(lr)) == pytest.approx(r**0.3)


@pytest.mark.parametrize("name", BUILTINS)
def test_from_f_reproduces_table(name):
    ref = get_divergence(name)
    custom = Divergence.from_f(ref.f, name=f"custom-{name}")
    lr = torch.linspace(-12, 12, 97)
    torch.testing.assert_close(custom.h(lr), ref.h(lr), rtol=1e-5, atol=0)
    assert custom.h(lr).dtype == torch.float32


def test_from_f_rejects_bad_generators():
    with pytest.raises(ValueError, match=r"f\(1\) must be 0"):
        Divergence.from_f(lambda r: r * torch.log(r) + 1)
    with pytest.raises(ValueError, match="convex"):
        Divergence.from_f(lambda r: torch.log(r))
    with pytest.raises(ValueError, match="convex"):
        Divergence.from_f(lambda r: torch.sin(r - 1))


@pytest.mark.parametrize("div", all_divergences(), ids=lambda d: f"{d.name}{d.params or ''}")
def test_float32_extremes(div):
    """float32 h is finite and accurate for logr in [-50, 50] unless its true value overflows."""
    lr = torch.linspace(-50, 50, 201)
    got = div.h(lr)
    ref = div.h(lr.double())
    representable = ref.abs() < torch.finfo(torch.float32).max
    assert torch.isfinite(got[representable]).all()
    # atol only admits float32 underflow to 0 (values below 1e-35).
    torch.testing.assert_close(
        got[representable].double(), ref[representable], rtol=1e-5, atol=1e-35
    )
    overflows = div.name == "pearson" or div.params.get("alpha", 0) > 1.7
    assert representable.all() != overflows
    assert (got >= 0).all()


def test_unknown_and_bad_params():
    with pytest.raises(ValueError, match="valid names: rkl, srkl, js"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="alpha="):
        get_divergence("alpha")
    with pytest.raises(ValueError, match="not 0 or 1"):
        get_divergence("alpha", alpha=1.0)
    with pytest.raises(ValueError, match="takes no parameters"):
        get_divergence("js", alpha=0.5)
    assert get_divergence(" JS ").name == "js"


@pytest.mark.parametrize(
    "f",
    [
        lambda r: r - 1,
        lambda r: 2.5 * (1 - r),
        lambda r: 0 * r,
        lambda r: torch.zeros_like(r),
        lambda r: torch.relu(r - 1),  # convex, but f'' = 0 wherever autograd can see it
    ],
    ids=["affine", "affine-negative-slope", "zero-times-r", "zero", "piecewise-linear"],
)
def test_from_f_refuses_zero_curvature(f):
    """h = r^2 f'' would be 0 everywhere: refused in one line, never built with h = 0."""
    with pytest.raises(ValueError, match=r"f''\(r\) is 0 for every r checked") as err:
        Divergence.from_f(f, name="flat")
    assert "'flat'" in str(err.value) and "\n" not in str(err.value)


def test_from_f_refuses_non_tensor_f():
    with pytest.raises(ValueError, match="same shape"):
        Divergence.from_f(lambda r: 0)


def test_from_f_accepts_valid_f_with_closed_form_h():
    """A valid custom f, checked against its hand-derived h: f = (r-1)^4 + r log r."""
    div = Divergence.from_f(lambda r: (r - 1) ** 4 + r * torch.log(r), name="quartic")
    r = torch.tensor([0.05, 0.5, 1.0, 2.0, 7.0], dtype=torch.float64)
    want = r**2 * (12 * (r - 1) ** 2 + 1 / r)
    torch.testing.assert_close(div.h(r.log()), want, rtol=1e-12, atol=0)
    assert div.name == "quartic"
