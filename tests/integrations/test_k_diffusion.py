"""genie_kernels.k_diffusion: k-diffusion's conventions around the package's solvers.

On the analytic mixture, a sampler fed the grid ``sigmas = γ(ts)`` and the start
``x = noise · √(1 + γ_0²)`` must give ``gk.sample()``'s sample on ``ts`` (scaled to the VE
state, ``x̄ = x √(1 + γ²)``), and with a final σ = 0 the denoised one.  Everything is
float64, so the two agree to rounding; a wrong unit (σ vs t, x_VE vs x_VP) or a lost
history would not.
"""

import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels import k_diffusion as K
from genie_kernels.ode.schedules import time_grid

f64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
STEPS = 6


@pytest.fixture(scope="module")
def mix():
    return gk.image_mixture((3, 4, 4), components=3, seed=2)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(3, 3, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(0))


def mlp_head():
    torch.manual_seed(0)
    head = gk.MLPHead(48, hidden=32, num_layers=2).double()
    torch.nn.init.normal_(head.linear_out.weight, std=0.02)  # not the zero start, which is DDIM
    return head.eval()


SAMPLERS = {"ddim": K.sample_ddim, "ab2": K.sample_ab2, "ab3": K.sample_ab3}


def run(solver, denoiser, x, sigmas, **kwargs):
    if solver == "genie":
        return K.sample_genie(denoiser, x, sigmas, head=mlp_head(), disable=True, **kwargs)
    return SAMPLERS[solver](denoiser, x, sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("solver", ["genie", "ddim", "ab2", "ab3"])
@pytest.mark.parametrize("striding", ["quadratic", "karras"])
def test_it_equals_sample_on_the_mixture(mix, noise, solver, striding):
    ts = time_grid(mix.schedule, STEPS, 1e-3, striding)
    gammas = mix.schedule.gamma(ts)
    start = noise * math.sqrt(1 + float(gammas[0]) ** 2)
    head = mlp_head() if solver == "genie" else None
    expected = gk.sample(mix, noise, STEPS, solver=solver, head=head, striding=striding)
    got = run(solver, K.VPDenoiser(mix), start, gammas)
    torch.testing.assert_close(got, expected * math.sqrt(1 + float(gammas[-1]) ** 2), **TOL)
    # a final σ = 0 lands on the denoised sample, as denoise=True does
    expected = gk.sample(mix, noise, STEPS, solver=solver, head=head, striding=striding, denoise=True)
    got = run(solver, K.VPDenoiser(mix), start, torch.cat([gammas, gammas.new_zeros(1)]))
    torch.testing.assert_close(got, expected, **TOL)


def test_genie_with_a_head_differs_from_ddim_so_the_comparison_can_fail(mix, noise):
    ts = time_grid(mix.schedule, STEPS)
    gammas = mix.schedule.gamma(ts)
    start = noise * math.sqrt(1 + float(gammas[0]) ** 2)
    assert (run("genie", K.VPDenoiser(mix), start, gammas) - run("ddim", K.VPDenoiser(mix), start, gammas)).abs().max() > 1e-3


def test_callback_gets_k_diffusions_keys_and_extra_args_reach_the_model(mix, noise):
    calls, seen = [], []

    def denoiser(x, sigma, *, tag):
        calls.append(tag)
        return K.VPDenoiser(mix)(x, sigma)

    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=f64)
    K.sample_ab2(denoiser, noise * 80, sigmas, extra_args={"tag": "x"}, callback=seen.append, disable=True)
    assert calls == ["x"] * 3
    assert [info["i"] for info in seen] == [0, 1, 2]
    assert all(set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"} for info in seen)
    assert float(seen[1]["sigma"]) == 10.0 and float(seen[1]["sigma_hat"]) == 10.0


def test_the_denoiser_of_an_eps_model_is_x_minus_sigma_eps(mix, noise):
    sigma = torch.full((3,), 2.0, dtype=f64)
    t = mix.schedule.t_from_gamma(sigma)
    expected = noise - 2.0 * mix(noise / math.sqrt(5.0), t)
    torch.testing.assert_close(K.VPDenoiser(mix)(noise, sigma), expected, **TOL)


def test_bad_input_is_refused(mix, noise):
    with pytest.raises(ValueError, match="strictly decreasing"):
        K.sample_ddim(K.VPDenoiser(mix), noise, torch.tensor([1.0, 10.0]))
    with pytest.raises(ValueError, match="positive but for a final 0"):
        K.sample_ddim(K.VPDenoiser(mix), noise, torch.tensor([10.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="needs a head"):
        K.sample_genie(K.VPDenoiser(mix), noise, torch.tensor([10.0, 1.0]))
    with pytest.raises(ValueError, match="reads the network's feature_dim"):
        K.sample_genie(K.VPDenoiser(mix), noise, torch.tensor([10.0, 1.0]), head=gk.MLPHead(48, feature_dim=4))
