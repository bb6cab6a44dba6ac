"""Model adapters: hooks pick up features and temb, continuous t maps to diffusers'
timesteps, and the exact dε/dγ through a diffusers UNet2DModel agrees with finite
differences."""

import math
import warnings

import pytest
import torch
from torch import nn

import genie_kernels as gk
from genie_kernels.models.adapters import HookedModel, UNet2DAdapter, ddpm_alphas_cumprod
from genie_kernels.ode.derivative import dx_dgamma, exact_deps_dgamma
from genie_kernels.heads.distill import distill
from genie_kernels.heads.build import head_for

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster and steadier


class TinyNet(nn.Module):
    """ε-network with a time MLP and a last feature map, in float64."""

    def __init__(self):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(2, 6), nn.SiLU(), nn.Linear(6, 6))
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.temb_proj = nn.Linear(6, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x, t):
        temb = self.time_mlp(torch.stack([t.sin(), t.cos()], dim=1))
        h = torch.tanh(self.body(x) + self.temb_proj(temb)[:, :, None, None]).transpose(2, 3)
        return self.out(self.norm(h).transpose(2, 3))  # a non-contiguous GroupNorm input, as in diffusers


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).double().eval()


def central_difference(model, x, gamma, schedule, delta):
    """``(ε(x + δ ẋ, t(γ + δ)) − ε(x − δ ẋ, t(γ − δ))) / 2δ`` with ``ẋ = dx/dγ``: the same
    directional derivative as the JVP, to O(δ²)."""
    delta = torch.as_tensor(delta, dtype=x.dtype).expand(x.shape[0])
    d = delta.reshape(-1, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        eps = model(x, schedule.t_from_gamma(gamma))
        xdot = dx_dgamma(x, eps, gamma)
        plus = model(x + d * xdot, schedule.t_from_gamma(gamma + delta))
        minus = model(x - d * xdot, schedule.t_from_gamma(gamma - delta))
    return (plus - minus) / (2 * d)


def test_hooked_model_returns_eps_features_and_temb():
    torch.manual_seed(0)
    net = TinyNet().double()
    model = HookedModel(net, feature_layer="norm", temb_layer="time_mlp")
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    out = model.forward_features(x, t)
    torch.testing.assert_close(out.eps, net(x, t), rtol=0, atol=0)
    temb = net.time_mlp(torch.stack([t.sin(), t.cos()], dim=1))
    torch.testing.assert_close(out.temb, temb, rtol=0, atol=0)
    h = torch.tanh(net.body(x) + net.temb_proj(temb)[:, :, None, None]).transpose(2, 3)
    torch.testing.assert_close(out.features, net.norm(h), rtol=0, atol=0)
    # the hooks only record while the adapter runs the network
    net(x, t)
    assert model._captured is None


def test_hooked_model_exact_derivative_matches_finite_differences():
    torch.manual_seed(1)
    model = HookedModel(TinyNet().double(), feature_layer="norm", temb_layer="time_mlp")
    schedule = gk.LinearVPSchedule()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    gamma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    _, deps = exact_deps_dgamma(model, x, gamma, schedule)
    fd = central_difference(model, x, gamma, schedule, 1e-5)
    torch.testing.assert_close(deps, fd, rtol=1e-6, atol=1e-8)


def test_hooked_model_brings_the_schedule_it_is_given():
    net = TinyNet().double()
    schedule = gk.DiscreteVPSchedule(ddpm_alphas_cumprod(50))
    model = HookedModel(net, feature_layer="norm", schedule=schedule, time_input=schedule.timestep_from_t)
    assert model.schedule is schedule and not hasattr(HookedModel(net), "schedule")
    noise = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same schedule given twice is no mismatch
        torch.testing.assert_close(gk.sample(model, noise, 3, solver="ddim"),
                                   gk.sample(model, noise, 3, solver="ddim", schedule=schedule), rtol=0, atol=0)
    with pytest.raises(TypeError, match="schedule must be a VPSchedule instance"):
        HookedModel(net, schedule=gk.LinearVPSchedule)


class SkipsNorm(TinyNet):
    """A network whose ``norm`` layer only runs for t > 0.5."""

    def forward(self, x, t):
        return self.out(self.norm(x.repeat(1, 2, 1, 1)) if bool((t > 0.5).all()) else self.body(x))


def test_hooked_model_says_when_a_named_layer_did_not_run():
    model = HookedModel(SkipsNorm().double(), feature_layer="norm")
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert model.forward_features(x, torch.full((2,), 0.9, dtype=torch.float64)).features.shape == (2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="layer 'norm' was not called in the forward pass"):
        model.forward_features(x, torch.full((2,), 0.1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="layer 'time_mlp' was not called"):
        HookedModel(SkipsNorm().double(), temb_layer="time_mlp").forward_features(x, torch.full((2,), 0.9, dtype=torch.float64))


def test_remove_hooks_leaves_the_network_as_it_was():
    net = TinyNet()
    model = HookedModel(net, feature_layer="norm", temb_layer="time_mlp")
    assert net.norm._forward_hooks and net.norm._forward_pre_hooks and net.time_mlp._forward_hooks
    model.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_hooked_model_rejects_unknown_layers():
    with pytest.raises(ValueError, match="not a layer"):
        HookedModel(TinyNet(), feature_layer="nope")
    with pytest.raises(TypeError):
        HookedModel(lambda x, t: x)


def test_unet_adapter_maps_t_to_the_discrete_timestep_and_exposes_features():
    unet = tiny_unet()
    adapter = UNet2DAdapter(unet)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)
    out = adapter.forward_features(x, t)
    with torch.no_grad():
        expected = unet(x, t * 1000 - 1).sample
    torch.testing.assert_close(out.eps, expected, rtol=1e-12, atol=1e-12)
    assert out.features.shape == (2, 8, 8, 8)
    assert out.temb.shape == (2, 32)
    torch.testing.assert_close(adapter.schedule.alphas_cumprod, ddpm_alphas_cumprod(1000), rtol=0, atol=0)
    short = UNet2DAdapter(unet, schedule=gk.LinearVPSchedule(), num_timesteps=50).schedule
    assert short.alphas_cumprod.numel() == 50
    torch.testing.assert_close(short.timestep_from_t(torch.tensor([0.5], dtype=torch.float64)),
                               torch.tensor([24.0], dtype=torch.float64))


def test_unet_adapter_takes_the_schedule_of_a_diffusers_scheduler():
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    adapter = UNet2DAdapter(tiny_unet(), scheduler=scheduler)
    torch.testing.assert_close(adapter.schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=0)
    # v-prediction is converted to ε now (tests/models/test_prediction_types.py); an unknown kind is named
    assert UNet2DAdapter(tiny_unet(), scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction")).prediction_type \
        == "v_prediction"
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        UNet2DAdapter(tiny_unet(), scheduler=diffusers.DDPMScheduler(prediction_type="flow"))
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler instance"):
        UNet2DAdapter(tiny_unet(), scheduler=diffusers.DDPMScheduler)
    with pytest.raises(TypeError, match="schedule must be a VPSchedule instance"):
        UNet2DAdapter(tiny_unet(), schedule="linear")


def test_unet_adapter_exact_derivative_matches_finite_differences():
    """float64, tiny random UNet2DModel with attention.  The x-part of the JVP is checked
    tightly.  The whole derivative is checked against central differences along the ODE
    whose error must shrink like δ² towards it: the t-part runs through diffusers'
    sinusoidal timestep embedding, which oscillates within one timestep and is computed
    in float32, so the smallest useful δ is about 3e-4·γ (0.1 of a timestep)."""
    adapter = UNet2DAdapter(tiny_unet())
    schedule = adapter.schedule
    torch.manual_seed(2)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    # t in the middle of a segment of the piecewise-linear discrete schedule
    gamma = schedule.gamma(torch.tensor([0.3005, 0.6505], dtype=torch.float64))
    with torch.no_grad():
        _, deps = exact_deps_dgamma(adapter, x, gamma, schedule)
    scale = float(deps.abs().max())
    assert scale > 1e-3

    # x-part alone: tangent (ẋ, 0) against finite differences in x at fixed t
    t = schedule.t_from_gamma(gamma)
    with torch.no_grad():
        xdot = dx_dgamma(x, adapter(x, t), gamma)
        _, jvp_x = torch.func.jvp(lambda x_: adapter(x_, t), (x,), (xdot,))
        fd_x = (adapter(x + 1e-6 * xdot, t) - adapter(x - 1e-6 * xdot, t)) / 2e-6
    torch.testing.assert_close(jvp_x, fd_x, rtol=1e-6, atol=1e-8)
    assert float((deps - jvp_x).abs().max()) > 0.1 * scale  # the t-part matters here

    # the whole total derivative along the ODE
    errors = [float((deps - central_difference(adapter, x, gamma, schedule, d * gamma)).abs().max())
              for d in (1e-3, 3e-4)]
    assert errors[1] < 1e-3 * scale, errors
    assert errors[0] / errors[1] > 5.0, errors  # second-order convergence to the JVP


def test_head_and_distillation_on_the_unet_adapter():
    adapter = UNet2DAdapter(tiny_unet())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = adapter.forward_features(x, torch.full((2,), 0.5, dtype=torch.float64))
    torch.manual_seed(0)
    head = head_for(out, x, "conv", nf=8, groups=4).double()
    assert head.feature_channels == 8 and head.temb_channels == 32
    data = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    result = distill(adapter, head, data, adapter.schedule, steps=2, batch_size=4, lr=1e-3, val_size=4,
                     val_buckets=2, progress=False)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert result.validation[-1]["buckets"][0]["rel_err"] > 0
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sample = gk.sample(adapter, noise, 2, solver="genie", head=result.head, schedule=adapter.schedule)
    assert sample.shape == noise.shape and torch.isfinite(sample).all()
    wrong = head_for(out, x, "conv", nf=8, groups=4, feature_channels=16).double()
    with pytest.raises(ValueError, match="16 feature channels"):
        gk.sample(adapter, noise, 2, solver="genie", head=wrong, schedule=adapter.schedule)
