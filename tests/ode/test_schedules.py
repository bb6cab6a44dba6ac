import math

import pytest
import torch

from genie_kernels.ode.schedules import DiscreteVPSchedule, LinearVPSchedule, schedule_from_config, time_grid

f64 = torch.float64


def test_linear_schedule_values_from_design():
    s = LinearVPSchedule()
    g = s.gamma(torch.tensor([1.0, 1e-3], dtype=f64))
    assert g[0].item() == pytest.approx(152.2, abs=0.05)
    assert g[1].item() == pytest.approx(0.0105, abs=5e-5)


def test_linear_schedule_identities():
    s = LinearVPSchedule(0.1, 20.0)
    t = torch.linspace(1e-3, 1, 101, dtype=f64)
    alpha, sigma, gamma = s.alpha(t), s.sigma(t), s.gamma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(gamma, sigma / alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.lambda_(t), torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)
    # the closed-form inverse of docs/design.md §1 (t(γ) of the linear schedule)
    closed = (-0.1 + torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(gamma**2))) / 19.9
    torch.testing.assert_close(s.t_from_gamma(gamma), t, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(closed, t, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(s.dt_dgamma(gamma), 2 * gamma / ((1 + gamma**2) * (0.1 + 19.9 * t)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", [LinearVPSchedule(), DiscreteVPSchedule.from_continuous(LinearVPSchedule(), 1000)], ids=["linear", "discrete"])
def test_dt_dgamma_matches_autograd(schedule):
    t = torch.tensor([0.0123, 0.2071, 0.5555, 0.9994], dtype=f64)
    gamma = schedule.gamma(t).requires_grad_()
    (grad,) = torch.autograd.grad(schedule.t_from_gamma(gamma).sum(), gamma)
    torch.testing.assert_close(schedule.dt_dgamma(gamma.detach()), grad, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.t_from_gamma(gamma.detach()), t, rtol=1e-12, atol=1e-14)


def test_discrete_schedule_matches_its_knots_and_the_continuous_one():
    cont = LinearVPSchedule()
    disc = DiscreteVPSchedule.from_continuous(cont, 1000)
    knots = torch.arange(1, 1001, dtype=f64) / 1000
    torch.testing.assert_close(disc.alpha(knots) ** 2, disc.alphas_cumprod, rtol=1e-12, atol=0)
    t = torch.rand(200, dtype=f64, generator=torch.Generator().manual_seed(0)) * 0.999 + 0.001
    # log α is quadratic in t: linear interpolation over a 1/1000 grid is accurate to ~β_d h²/16
    torch.testing.assert_close(disc.log_alpha(t), cont.log_alpha(t), rtol=0, atol=19.9 / 16 / 1000**2 * 1.01)
    torch.testing.assert_close(disc.timestep_from_t(knots), torch.arange(1000, dtype=f64))


@pytest.mark.parametrize("bad, message", [
    ([0.9, 0.95], "decreasing"), ([0.9, 0.9, 0.5], "decreasing"), ([1.2, 0.5], "inside"), ([0.5, 0.0], "inside"),
    ([float("nan"), 0.5], "inside"), ([0.5], "2 entries"),
])
def test_discrete_schedule_rejects_bad_alphas(bad, message):
    with pytest.raises(ValueError, match=message):
        DiscreteVPSchedule(bad)


@pytest.mark.parametrize("beta_min, beta_max", [(0.1, 0.1), (0.0, 20.0), (5.0, 1.0)])
def test_linear_schedule_rejects_betas_out_of_order(beta_min, beta_max):
    with pytest.raises(ValueError, match="0 < beta_min < beta_max"):
        LinearVPSchedule(beta_min, beta_max)


def test_schedule_config_round_trip():
    for s in (LinearVPSchedule(0.2, 15.0), DiscreteVPSchedule([0.9, 0.5, 0.1])):
        again = schedule_from_config(s.config())
        t = torch.tensor([0.3, 0.9], dtype=f64)
        torch.testing.assert_close(again.gamma(t), s.gamma(t))


@pytest.mark.parametrize("striding", ["uniform", "quadratic", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_time_grid_shape_ends_and_monotone(striding, steps):
    s = LinearVPSchedule()
    ts = time_grid(s, steps, 2e-3, striding)
    assert ts.dtype == f64 and ts.shape == (steps + 1,)
    assert ts[0].item() == 1.0 and ts[-1].item() == pytest.approx(2e-3, rel=1e-12)
    assert (ts[1:] < ts[:-1]).all()


def test_time_grid_spacings():
    s = LinearVPSchedule()
    uniform = time_grid(s, 8, 1e-3, "uniform")
    torch.testing.assert_close(torch.diff(uniform), torch.full((8,), (1e-3 - 1) / 8, dtype=f64))
    quadratic = time_grid(s, 8, 1e-3, "quadratic")
    # GENIE's official grid: equal steps in sqrt(t), t = linspace(1, sqrt(t_end), N + 1)²
    torch.testing.assert_close(torch.diff(quadratic.sqrt()), torch.full((8,), (math.sqrt(1e-3) - 1) / 8, dtype=f64))
    assert time_grid(s, 10, 1e-3, "quadratic")[-2].item() == pytest.approx(0.01650, abs=1e-5)
    lam = s.lambda_(time_grid(s, 8, 1e-3, "logsnr"))
    torch.testing.assert_close(torch.diff(lam), torch.full((8,), float(lam[-1] - lam[0]) / 8, dtype=f64))


@pytest.mark.parametrize("striding", ["uniform", "quadratic", "logsnr"])
def test_time_grid_from_a_later_start(striding):
    """A grid from t_start = 0.6 is the same construction on [t_end, 0.6]."""
    s = LinearVPSchedule()
    ts = time_grid(s, 6, 1e-3, striding, t_start=0.6)
    assert ts[0].item() == 0.6 and ts[-1].item() == pytest.approx(1e-3, rel=1e-12)
    frac = torch.linspace(0, 1, 7, dtype=f64)
    expected = {"uniform": 0.6 + (1e-3 - 0.6) * frac, "quadratic": (math.sqrt(0.6) + (math.sqrt(1e-3) - math.sqrt(0.6)) * frac) ** 2}
    if striding in expected:
        torch.testing.assert_close(ts, expected[striding], rtol=1e-14, atol=1e-15)
    else:
        lam = s.lambda_(ts)
        torch.testing.assert_close(torch.diff(lam), torch.full((6,), float(lam[-1] - lam[0]) / 6, dtype=f64))
    with pytest.raises(ValueError, match="t_start"):
        time_grid(s, 6, 0.7, striding, t_start=0.6)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(s, 6, 1e-3, striding, t_start=1.5)


def test_time_grid_too_fine_for_float64_is_refused():
    with pytest.raises(ValueError, match="not strictly decreasing"):
        time_grid(LinearVPSchedule(), 4, 0.5, "uniform", t_start=math.nextafter(0.5, 1.0))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"steps": 0}, ValueError),
        ({"steps": -3}, ValueError),
        ({"steps": 2.5}, TypeError),
        ({"t_end": 0.0}, ValueError),
        ({"t_end": 1.0}, ValueError),
        ({"t_end": float("nan")}, ValueError),
        ({"striding": "cosine"}, ValueError),
    ],
)
def test_time_grid_rejects_bad_arguments(kwargs, error):
    args = {"steps": 4, "t_end": 1e-3, "striding": "uniform"} | kwargs
    with pytest.raises(error, match="steps|t_end|striding"):
        time_grid(LinearVPSchedule(), **args)


def test_a_numpy_float32_t_end_gives_the_grid_of_its_float_value():
    np = pytest.importorskip("numpy")
    t_end = np.float32(1e-3)
    for striding in ("uniform", "quadratic", "logsnr"):
        ts = time_grid(LinearVPSchedule(), 5, t_end, striding)
        assert ts.dtype == f64 and float(ts[0]) == 1.0 and float(ts[-1]) == float(t_end)
        torch.testing.assert_close(ts, time_grid(LinearVPSchedule(), 5, float(t_end), striding), rtol=0, atol=0)
