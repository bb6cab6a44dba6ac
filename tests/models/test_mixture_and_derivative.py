import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.derivative import exact_deps_dgamma
from genie_kernels.models.mixture import GaussianMixture

f64 = torch.float64


def noised_log_density(mix: GaussianMixture, x, gamma):
    """log p_t(x) of the noised mixture, written independently of mixture.py's ε."""
    alpha = 1 / math.sqrt(1 + gamma**2)
    sigma = gamma * alpha
    flat = x.reshape(x.shape[0], 1, -1)
    v = alpha**2 * mix.variances + sigma**2
    log_n = -0.5 * ((flat - alpha * mix.means) ** 2 / v + torch.log(2 * math.pi * v)).sum(-1)
    return torch.logsumexp(mix.log_weights + log_n, -1), sigma


@pytest.mark.parametrize("gamma", [0.02, 0.7, 30.0])
def test_mixture_eps_is_minus_sigma_times_score(image_mix, gamma):
    x = torch.randn(5, 3, 8, 8, dtype=f64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    logp, sigma = noised_log_density(image_mix, x, gamma)
    (score,) = torch.autograd.grad(logp.sum(), x)
    eps = image_mix.eps_from_gamma(x.detach(), torch.full((5,), gamma, dtype=f64))
    torch.testing.assert_close(eps, -sigma * score, rtol=1e-10, atol=1e-12)


def test_mixture_data_sampler_matches_its_moments():
    mix = gk.GaussianMixture([1.0, 3.0], [[-2.0, 0.0], [2.0, 1.0]], [[0.25, 1.0], [0.04, 0.09]])
    x = mix.sample_data(40000, torch.Generator().manual_seed(0))
    w = torch.tensor([0.25, 0.75], dtype=f64)
    mean = (w[:, None] * mix.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)
    second = (w[:, None] * (mix.variances + mix.means**2)).sum(0)
    torch.testing.assert_close((x**2).mean(0), second, atol=0.06, rtol=0)


@pytest.mark.parametrize("schedule", [gk.LinearVPSchedule(), gk.DiscreteVPSchedule.from_continuous(gk.LinearVPSchedule(), 1000)], ids=["linear", "discrete"])
def test_exact_derivative_equals_analytic(schedule):
    """Forward-mode AD through t(γ) and the schedule equals the hand-written derivative."""
    mix = gk.image_mixture((3, 8, 8), components=4, seed=0, schedule=schedule)
    x = torch.randn(6, 3, 8, 8, dtype=f64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.003, 0.05, 0.2, 0.4, 0.7, 0.97], dtype=f64)
    gamma = schedule.gamma(t)
    # a point near the trajectories: x_t = α x0 + σ z
    x0 = mix.sample_data(6, torch.Generator().manual_seed(4))
    a = schedule.alpha(t).view(-1, 1, 1, 1)
    x = a * x0 + (1 - a**2).sqrt() * x
    out, deps = exact_deps_dgamma(mix, x, gamma, schedule)
    analytic = mix.deps_dgamma(x, gamma)
    torch.testing.assert_close(out.eps, mix.eps_from_gamma(x, gamma), rtol=1e-13, atol=1e-13)
    rel = ((deps - analytic).flatten(1).norm(dim=1) / analytic.flatten(1).norm(dim=1)).max().item()
    assert rel < 1e-8


def test_exact_derivative_matches_finite_differences_along_the_trajectory(image_mix, image_noise, schedule):
    """d/dγ ε(x(γ), t(γ)) by central differences of ε along the float64 ODE solution."""
    g_mid = schedule.gamma(torch.tensor([0.8, 0.3, 0.05], dtype=f64))
    gammas = torch.stack([g_mid * (1 + 1e-4), g_mid, g_mid * (1 - 1e-4)], 1).flatten()  # decreasing
    ts = torch.cat([torch.tensor([1.0], dtype=f64), schedule.t_from_gamma(gammas)])
    states = gk.ode_solution(image_mix, image_noise, ts, schedule, steps_per_unit=200)[1:]
    for i in range(3):
        (x_plus, x, x_minus), (g_plus, g, g_minus) = states[3 * i : 3 * i + 3], gammas[3 * i : 3 * i + 3]
        batch = lambda value: value.expand(x.shape[0])  # noqa: E731
        finite = (image_mix.eps_from_gamma(x_plus, batch(g_plus)) - image_mix.eps_from_gamma(x_minus, batch(g_minus))) / (g_plus - g_minus)
        _, deps = exact_deps_dgamma(image_mix, x, batch(g), schedule)
        rel = ((deps - finite).norm() / deps.norm()).item()
        assert rel < 1e-5, (float(g), rel)


def test_log_density_is_the_log_of_the_weighted_gaussians():
    mix = gk.image_mixture((2, 3, 3), components=3, seed=5)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(4, 1, -1)
    per_component = torch.distributions.Normal(mix.means, mix.variances.sqrt()).log_prob(flat).sum(-1)
    expected = torch.log((mix.log_weights.exp() * per_component.exp()).sum(-1))
    torch.testing.assert_close(mix.log_density(x), expected, rtol=1e-12, atol=1e-12)


def test_off_mode_fraction_counts_points_between_modes():
    toy = gk.toy_2d()
    on = toy.sample_data(500, torch.Generator().manual_seed(0))
    assert toy.off_mode_fraction(on) < 0.01
    between = toy.means[:10] + torch.tensor([0.375, 0.0], dtype=f64)  # half-way to the next mode
    assert toy.off_mode_fraction(between) == 1.0


def test_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weights"):
        gk.GaussianMixture([1.0, -1.0], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="variances"):
        gk.GaussianMixture([1.0, 1.0], [[0.0], [1.0]], [1.0, 0.0])
    with pytest.raises(ValueError, match="means must be shaped"):
        gk.image_mixture((0, 4, 4))


def test_exact_derivative_takes_a_plain_eps_function_like_the_model_it_wraps(image_mix, image_noise, schedule):
    gamma = schedule.gamma(torch.full((image_noise.shape[0],), 0.3, dtype=f64))
    x = image_noise / (1 + gamma.square()).sqrt().view(-1, 1, 1, 1)
    _, from_model = exact_deps_dgamma(image_mix, x, gamma, schedule)
    _, from_function = exact_deps_dgamma(lambda x_, t_: image_mix(x_, t_), x, gamma, schedule)
    torch.testing.assert_close(from_function, from_model, rtol=0, atol=0)


def test_mixture_refuses_data_of_another_size(image_mix):
    with pytest.raises(ValueError, match=r"192 values per sample, got x of shape \(2, 3, 4, 4\)"):
        image_mix(torch.zeros(2, 3, 4, 4, dtype=f64), torch.full((2,), 0.5, dtype=f64))


def test_rmse_refuses_tensors_of_different_shapes():
    assert gk.rmse(torch.ones(2, 3), torch.zeros(2, 3)) == 1.0
    with pytest.raises(ValueError, match=r"one shape, got \(2, 1\) and \(1, 2\)"):
        gk.rmse(torch.zeros(2, 1), torch.zeros(1, 2))


@pytest.mark.parametrize("t_start, t_end", [(1.0, 0.0), (1.0, 1.0), (0.5, 0.8), (1.5, 1e-3)])
def test_ground_truth_rejects_a_time_range_outside_0_1(t_start, t_end):
    mix = gk.image_mixture((1, 2, 2))
    with pytest.raises(ValueError, match="decreasing grid of at least 2 times in"):
        gk.ground_truth(mix, torch.randn(1, 1, 2, 2, dtype=torch.float64), mix.schedule, t_end=t_end, t_start=t_start)
