"""What single steps do, on every backend, against a DDIM recurrence written out here.

The convergence tests in test_solvers.py measure whole trajectories and can miss a term
that barely moves the error (an analytic first step at the wrong γ, a sign in the
denoising step, a callback that reports x̄ instead of x).  These pin each term in float64,
where the backends agree with the recurrence to rounding: the analytic first step, the
callback's values, denoising, ``t_end`` and the schedule a model brings with it.
"""

import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.schedules import DEFAULT_STRIDING
from genie_kernels.ode.schedules import time_grid

f64 = torch.float64
TOL = dict(atol=1e-12, rtol=1e-12)  # float64 rounding over a few steps of O(1) values


@pytest.fixture(params=["reference", "triton", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_extension")  # skips where the extension does not load
    return request.param


@pytest.fixture(scope="module")
def mix():
    return gk.image_mixture((3, 4, 4), components=3, seed=4)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 3, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(7))


def ddim_by_hand(mix, noise, ts, afs=False):
    """``[(x_{n+1}, ε_n)]`` and the final x̄ of DDIM on the grid ``ts``:
    ``x̄_{n+1} = x̄_n + (γ_{n+1} − γ_n) ε_n``, ``x = x̄ / √(1 + γ²)``, ``ε_n = ε(x_n, t_n)``, or with
    ``afs`` at n = 0 the ε of pure noise, ``γ_0 / √(1 + γ_0²) · x_0``."""
    gammas = [float(g) for g in mix.schedule.gamma(ts)]
    x, xbar, steps = noise, noise * math.sqrt(1 + gammas[0] ** 2), []
    for n in range(len(gammas) - 1):
        if afs and n == 0:
            eps = noise * (gammas[0] / math.sqrt(1 + gammas[0] ** 2))
        else:
            eps = mix(x, ts[n].expand(x.shape[0]))
        xbar = xbar + (gammas[n + 1] - gammas[n]) * eps
        x = xbar / math.sqrt(1 + gammas[n + 1] ** 2)
        steps.append((x, eps))
    return steps, xbar


@pytest.mark.parametrize("afs", [False, True])
def test_callback_reports_each_steps_x_eps_and_t(mix, noise, backend, afs):
    seen = []
    gk.sample(mix, noise, 4, solver="ddim", afs=afs, backend=backend, callback=seen.append)
    ts = time_grid(mix.schedule, 4, 1e-3, DEFAULT_STRIDING)
    expected, _ = ddim_by_hand(mix, noise, ts, afs=afs)
    assert [info["i"] for info in seen] == [0, 1, 2, 3]
    assert [info["t"] for info in seen] == pytest.approx(ts[1:].tolist(), rel=1e-15)
    for info, (x, eps) in zip(seen, expected):
        torch.testing.assert_close(info["eps"], eps, **TOL)  # at n = 0 with AFS: σ_0 x_0 exactly
        torch.testing.assert_close(info["x"], x, **TOL)


@pytest.mark.parametrize("solver", ["ddim", "ab2"])
def test_denoising_returns_xbar_minus_gamma_eps_at_the_last_point(mix, noise, backend, solver):
    x_end = gk.sample(mix, noise, 5, solver=solver, backend=backend)
    x0 = gk.sample(mix, noise, 5, solver=solver, backend=backend, denoise=True)
    t_end = torch.tensor(1e-3, dtype=f64)
    gamma = float(mix.schedule.gamma(t_end))
    expected = x_end * math.sqrt(1 + gamma**2) - gamma * mix(x_end, t_end.expand(noise.shape[0]))
    torch.testing.assert_close(x0, expected, **TOL)


def test_t_end_is_where_the_grid_ends(mix, noise, backend):
    seen = []
    x = gk.sample(mix, noise, 4, solver="ddim", t_end=0.05, backend=backend, callback=seen.append)
    assert seen[-1]["t"] == pytest.approx(0.05, rel=1e-15)
    steps, _ = ddim_by_hand(mix, noise, time_grid(mix.schedule, 4, 0.05, DEFAULT_STRIDING))
    torch.testing.assert_close(x, steps[-1][0], **TOL)


def test_a_model_brings_its_own_schedule(noise, backend):
    own = gk.LinearVPSchedule(beta_min=0.5, beta_max=12.0)
    mix = gk.image_mixture((3, 4, 4), components=3, seed=4, schedule=own)
    default = gk.sample(mix, noise, 4, solver="ab2", backend=backend)
    torch.testing.assert_close(default, gk.sample(mix, noise, 4, solver="ab2", backend=backend, schedule=own), **TOL)
    with pytest.warns(UserWarning, match="differs from the model's own schedule"):
        linear = gk.sample(mix, noise, 4, solver="ab2", backend=backend, schedule=gk.LinearVPSchedule())
    assert (default - linear).abs().max() > 1e-3  # the two schedules give visibly different samples
