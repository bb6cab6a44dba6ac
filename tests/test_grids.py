"""sample()'s custom grids and partial trajectories: ``timesteps=``, ``t_start=``,
``striding="karras"`` and ``gk.noise_to``, each against the explicit float64 grid handed to
the solver functions, and the errors for grids and starts that make no sense."""

import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.schedules import time_grid

f64 = torch.float64
TOL = dict(atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def mix():
    return gk.image_mixture((3, 4, 4), components=3, seed=4)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 3, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("solver", ["ddim", "ab3", "genie_exact"])
def test_continuous_timesteps_equal_the_explicit_grid(mix, noise, solver):
    ts = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.08, 0.01], dtype=f64)
    got = gk.sample(mix, noise, timesteps=ts.tolist(), solver=solver)
    expected = getattr(gk, solver)(mix, noise, ts, mix.schedule).sample
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - gk.sample(mix, noise, 5, solver=solver)).abs().max() > 1e-4  # another grid, another sample


def test_the_grid_of_steps_given_as_timesteps_is_the_same_sample(mix, noise):
    ts = time_grid(mix.schedule, 7, 1e-3, "logsnr")
    torch.testing.assert_close(gk.sample(mix, noise, timesteps=ts, solver="ab2"),
                               gk.sample(mix, noise, 7, solver="ab2", striding="logsnr"), **TOL)


def test_integer_timesteps_are_a_discrete_models_steps():
    schedule = gk.DiscreteVPSchedule.from_continuous(gk.LinearVPSchedule(), 1000)
    mix = gk.image_mixture((3, 4, 4), components=3, seed=4, schedule=schedule)
    noise = torch.randn(2, 3, 4, 4, dtype=f64)
    ts = torch.tensor([1000, 601, 301, 51], dtype=f64) / 1000  # k at t = (k + 1)/N
    expected = gk.ab2(mix, noise, ts, schedule).sample
    for timesteps in ([999, 600, 300, 50], torch.tensor([999, 600, 300, 50])):
        torch.testing.assert_close(gk.sample(mix, noise, timesteps=timesteps, solver="ab2"), expected, **TOL)
    with pytest.raises(ValueError, match="must lie in 0..999"):
        gk.sample(mix, noise, timesteps=[1000, 500], solver="ab2")
    with pytest.raises(ValueError, match="integer timesteps index a discrete model"):
        gk.sample(gk.image_mixture((3, 4, 4)), noise, timesteps=[999, 500], solver="ab2")


def test_t_start_starts_from_a_noised_image(mix, noise):
    x0 = torch.randn_like(noise)
    start = gk.noise_to(x0, 0.4, noise, mix.schedule)
    alpha, sigma = mix.schedule.alpha(torch.tensor(0.4, dtype=f64)), mix.schedule.sigma(torch.tensor(0.4, dtype=f64))
    torch.testing.assert_close(start, alpha * x0 + sigma * noise, **TOL)
    got = gk.sample(mix, start, 5, solver="ab2", t_start=0.4)
    expected = gk.ab2(mix, start, time_grid(mix.schedule, 5, 1e-3, "quadratic", t_start=0.4), mix.schedule).sample
    torch.testing.assert_close(got, expected, **TOL)
    per_sample = gk.noise_to(x0, torch.tensor([0.4, 0.9], dtype=f64), noise, mix.schedule)
    torch.testing.assert_close(per_sample[0], start[0], **TOL)
    assert not torch.allclose(per_sample[1], start[1])


def test_karras_striding_follows_the_rho_7_formula(mix):
    ts = time_grid(mix.schedule, 8, 2e-3, "karras")
    g = mix.schedule.gamma(ts)
    lo, hi = float(g[-1]) ** (1 / 7), float(g[0]) ** (1 / 7)
    expected = torch.tensor([(hi + i / 8 * (lo - hi)) ** 7 for i in range(9)], dtype=f64)
    torch.testing.assert_close(g, expected, atol=0, rtol=1e-10)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 2e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(timesteps=[0.1, 0.5, 0.9]), "decrease strictly"),
    (dict(timesteps=[999, 999, 10]), "decrease strictly"),
    (dict(timesteps=[1.5, 0.5]), r"in \(0, 1\]"),
    (dict(timesteps=torch.tensor([999.0, 500.0])), "integer dtype"),
    (dict(timesteps=[0.5]), "at least 2"),
    (dict(steps=4, timesteps=[0.9, 0.1]), "not both"),
    (dict(), "got neither"),
    (dict(timesteps=[0.9, 0.1], t_start=0.5), "whole time grid"),
    (dict(timesteps=[0.9, 0.1], striding="karras"), "whole time grid"),
    (dict(steps=4, t_start=1.5), r"t_start must lie in \(t_end, 1\]"),
    (dict(steps=4, t_start=1e-4), r"t_start must lie in \(t_end, 1\]"),
    (dict(steps=4, t_start=0.5, afs=True), "t = 1 only"),
    (dict(timesteps=[0.9, 0.5, 0.1], afs=True), "t = 1 only"),
    (dict(steps=4, striding="sigmoid"), "unknown striding"),
])
def test_bad_grids_and_starts_are_refused(mix, noise, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gk.sample(mix, noise, solver="ddim", **kwargs)


def test_noise_to_refuses_times_outside_the_schedule(mix, noise):
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        gk.noise_to(noise, 0.0, noise, mix.schedule)
    with pytest.raises(ValueError, match="same shape"):
        gk.noise_to(noise, 0.5, noise[:1], mix.schedule)
