"""v- and x₀-prediction adapters give the ε of the ε-network they are built from.

The v- and x₀-networks here are the ε-UNet with its output converted by hand
(``v = (ε − σ x)/α``, ``x₀ = (x − σ ε)/α``), with α and σ differentiable in the timestep, so
the adapters' conversion back must return that ε and, under ``torch.func.jvp``, its exact
total derivative.  Float64 throughout: the agreement is to rounding.
"""

import pytest
import torch

import genie_kernels as gk
from genie_kernels.ode.predictions import eps_from_prediction

diffusers = pytest.importorskip("diffusers")
f64 = torch.float64
TOL = dict(atol=1e-9, rtol=1e-9)


def converted_unet_class(kind, schedule):
    class Converted(diffusers.UNet2DModel):
        """A UNet2DModel that predicts ``kind``, made from an ε-UNet's weights."""

        def forward(self, sample, timestep, class_labels=None, return_dict=True):
            eps = super().forward(sample, timestep, class_labels, return_dict=False)[0]
            t = (torch.as_tensor(timestep, dtype=f64) + 1.0) / 1000.0  # timestep k sits at t = (k + 1)/N
            shape = (-1, 1, 1, 1)
            alpha, sigma = schedule.alpha(t).reshape(shape), schedule.sigma(t).reshape(shape)
            out = (eps - sigma * sample) / alpha if kind == "v_prediction" else (sample - sigma * eps) / alpha
            return (out,) if not return_dict else diffusers.models.unets.unet_2d.UNet2DOutput(sample=out)

    return Converted


@pytest.fixture(scope="module")
def eps_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval().double()


def converted(eps_unet, kind):
    ddpm = diffusers.DDPMScheduler(prediction_type=kind)
    unet = converted_unet_class(kind, gk.DiscreteVPSchedule(ddpm.alphas_cumprod)).from_config(eps_unet.config)
    unet.load_state_dict(eps_unet.state_dict())
    return unet.eval().double(), ddpm


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_the_adapter_reads_the_prediction_type_and_returns_the_eps_and_its_derivative(eps_unet, kind):
    unet, ddpm = converted(eps_unet, kind)
    adapter = gk.UNet2DAdapter(unet, scheduler=ddpm)
    assert adapter.prediction_type == kind
    reference = gk.UNet2DAdapter(eps_unet, scheduler=diffusers.DDPMScheduler())
    x = torch.randn(3, 3, 8, 8, dtype=f64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.4, 0.05], dtype=f64)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, t), reference(x, t), **TOL)
        assert (unet(x, adapter.time_input(t)).sample - reference(x, t)).abs().max() > 1e-2  # v, x₀ are not ε
    gamma = adapter.schedule.gamma(t)
    out, deps = gk.exact_deps_dgamma(adapter, x, gamma, adapter.schedule)
    out_ref, deps_ref = gk.exact_deps_dgamma(reference, x, gamma, reference.schedule)
    torch.testing.assert_close(out.eps, out_ref.eps, **TOL)
    torch.testing.assert_close(deps, deps_ref, atol=1e-7, rtol=1e-7)
    assert deps.abs().max() > 1e-3


def test_an_explicit_prediction_type_overrides_nothing_silently(eps_unet):
    unet, ddpm = converted(eps_unet, "v_prediction")
    adapter = gk.UNet2DAdapter(unet, prediction_type="v_prediction")  # no scheduler: DDPM's linear betas
    assert adapter.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type='epsilon' but the scheduler's config says 'v_prediction'"):
        gk.UNet2DAdapter(unet, scheduler=ddpm, prediction_type="epsilon")


def test_hooked_model_converts_v_with_its_schedule():
    schedule = gk.LinearVPSchedule()
    net = torch.nn.Conv2d(3, 3, 1).double()

    def v_of(x, t):
        shape = (-1, 1, 1, 1)
        return (net(x) - schedule.sigma(t).reshape(shape) * x) / schedule.alpha(t).reshape(shape)

    class VNet(torch.nn.Module):
        def forward(self, x, t):
            return v_of(x, t)

    adapter = gk.HookedModel(VNet(), schedule=schedule, prediction_type="v_prediction")
    x, t = torch.randn(2, 3, 4, 4, dtype=f64), torch.tensor([0.7, 0.2], dtype=f64)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, t), net(x), **TOL)


def test_the_formulas_invert_each_other():
    x, eps = torch.randn(4, 5, dtype=f64), torch.randn(4, 5, dtype=f64)
    alpha = torch.tensor(0.6, dtype=f64)
    sigma = (1 - alpha ** 2).sqrt()
    x_t = alpha * x + sigma * eps
    torch.testing.assert_close(eps_from_prediction("v_prediction", alpha * eps - sigma * x, x_t, alpha, sigma), eps, **TOL)
    torch.testing.assert_close(eps_from_prediction("sample", x, x_t, alpha, sigma), eps, **TOL)


def test_unknown_or_unusable_prediction_types_are_named(eps_unet):
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        gk.UNet2DAdapter(eps_unet, scheduler=diffusers.DDPMScheduler(prediction_type="flow"))
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        gk.HookedModel(torch.nn.Identity(), schedule=gk.LinearVPSchedule(), prediction_type="x0")
    with pytest.raises(ValueError, match="pass schedule="):
        gk.HookedModel(torch.nn.Identity(), prediction_type="sample")
