"""gk.encode (the DDIM ODE solved forwards, data → noise, by the same solvers) and gk.slerp."""

import math

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.schedules import LinearVPSchedule, time_grid


@pytest.fixture(scope="module")
def mixture_and_data():
    model = gk.image_mixture()
    return model, model.sample_data(8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("solver", ["ab3", "genie_exact"])
def test_encode_then_sample_gives_the_data_back(mixture_and_data, solver):
    model, x0 = mixture_and_data
    z, nfe = gk.encode(model, x0, 100, solver=solver, return_nfe=True)
    assert nfe == (200 if solver == "genie_exact" else 100)
    assert 0.9 < float(z.std()) < 1.1  # the mixture's encodings look like standard noise
    x = gk.sample(model, z, 100, solver=solver)
    assert float((x - x0).square().mean().sqrt()) < 1e-3


def test_encode_runs_the_reversed_sampling_grid_through_the_solver_functions(mixture_and_data):
    model, x0 = mixture_and_data
    ts = time_grid(LinearVPSchedule(), 12, 1e-3, "logsnr").flip(0)
    seen = []
    z = gk.encode(model, x0, 12, solver="ab2", striding="logsnr", callback=lambda info: seen.append(info["t"]))
    assert seen == ts[1:].tolist()
    assert torch.equal(z, gk.ab2(model, x0, ts, LinearVPSchedule()).sample)
    assert torch.equal(z, gk.encode(model, x0, timesteps=ts.tolist(), solver="ab2"))


def test_encode_with_a_head_that_predicts_zero_is_ddim(mixture_and_data):
    model, x0 = mixture_and_data
    zero_head = lambda x, out, gamma: torch.zeros_like(out.eps)  # noqa: E731
    assert torch.equal(gk.encode(model, x0, 5, solver="genie", head=zero_head), gk.encode(model, x0, 5, solver="ddim"))


def test_encode_and_the_solvers_refuse_bad_grids_and_settings(mixture_and_data):
    model, x0 = mixture_and_data
    with pytest.raises(ValueError, match="increase strictly"):
        gk.encode(model, x0, timesteps=[1.0, 0.5, 0.01])
    with pytest.raises(ValueError, match=r"t_end must lie in \(0, 1\)"):
        gk.encode(model, x0, 10, t_end=1.0)
    with pytest.raises(ValueError, match=r"t_end must lie in \(0, 1\)"):
        gk.encode(model, x0, 10, t_end=0.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        gk.encode(model, x0, timesteps=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="either steps"):
        gk.encode(model, x0, 10, timesteps=[0.1, 1.0])
    with pytest.raises(ValueError, match="afs nor denoise"):
        gk.ab3(model, x0, torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64), LinearVPSchedule(), afs=True)
    with pytest.raises(ValueError, match="decrease strictly"):  # sample() keeps refusing the encoding direction
        gk.sample(model, x0, timesteps=[0.1, 0.5, 1.0], solver="ab3")


def test_slerp_ends_at_its_endpoints_and_keeps_the_norm_of_gaussian_noise():
    gen = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 4, 3, 32, 32, generator=gen)
    assert torch.allclose(gk.slerp(z0, z1, 0.0), z0, atol=1e-6)
    assert torch.allclose(gk.slerp(z0, z1, 1.0), z1, atol=1e-6)
    d = z0[0].numel()
    for alpha in (0.25, 0.5, 0.75):
        norms = gk.slerp(z0, z1, alpha).flatten(1).norm(dim=1)
        ends = 0.5 * (z0.flatten(1).norm(dim=1) + z1.flatten(1).norm(dim=1))
        assert torch.allclose(norms, ends, rtol=0.03)  # noise stays noise of the same scale
        assert torch.allclose(norms / math.sqrt(d), torch.ones(4), rtol=0.05)
    lerp = (0.5 * (z0 + z1)).flatten(1).norm(dim=1)
    assert torch.allclose(lerp / math.sqrt(d), torch.full((4,), math.sqrt(0.5)), rtol=0.05)  # the line shrinks


def test_slerp_follows_the_great_circle_and_takes_one_alpha_per_sample():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    got = gk.slerp(e0.expand(3, 2), e1.expand(3, 2), torch.tensor([0.0, 0.5, 1.0]))
    half = math.sqrt(0.5)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0], [half, 2 * half], [0.0, 2.0]]), atol=1e-6)


def test_slerp_of_parallel_vectors_is_the_straight_line():
    z = torch.randn(2, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = gk.slerp(z, 3.0 * z, 0.5)
    assert torch.isfinite(got).all() and torch.allclose(got, 2.0 * z)


def test_slerp_refuses_bad_alpha_and_inputs():
    z0, z1 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    for bad in (float("nan"), float("inf"), -0.1, 1.5, torch.tensor([0.5, float("nan"), 0.5])):
        with pytest.raises(ValueError, match="finite and lie in"):
            gk.slerp(z0, z1, bad)
    with pytest.raises(TypeError, match="alpha must be a number"):
        gk.slerp(z0, z1, "0.5")
    with pytest.raises(ValueError, match="shape"):
        gk.slerp(z0, z1, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="same shape"):
        gk.slerp(z0, z1[:2], 0.5)
    with pytest.raises(ValueError, match="opposite"):
        gk.slerp(z0, -z0, 0.5)
    with pytest.raises(ValueError, match="zero"):
        gk.slerp(z0, torch.zeros_like(z0), 0.5)
