"""The compact ε-UNet: shapes, adapter outputs, forward-mode AD, config round-trip, size."""

import json

import pytest
import torch

from genie_kernels import sample
from genie_kernels.ode.protocol import ModelOutput
from genie_kernels.models.unet import UNet, timestep_embedding

TINY = {"image_size": 8, "in_channels": 1, "channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
        "attn_resolutions": [4], "norm_groups": 4, "time_scale": 1000.0}


def randomized(model, seed=0, scale=0.2):
    """Random weights everywhere (the zero-initialised output layers would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


@pytest.mark.parametrize("size, attn", [(28, 7), (32, 8)])
def test_shapes_features_and_temb(size, attn):
    model = UNet(image_size=size, attn_resolutions=(attn,))
    x, t = torch.randn(3, 1, size, size), torch.rand(3)
    out = model.forward_features(x, t)
    assert isinstance(out, ModelOutput)
    assert out.eps.shape == x.shape
    assert out.features.shape == (3, model.feature_channels, size, size)
    assert out.temb.shape == (3, model.temb_dim) == (3, 4 * 32)
    # Zero-initialised output conv: an untrained network predicts ε = 0.
    assert torch.equal(out.eps, torch.zeros_like(x))


def test_eps_depends_on_x_and_t():
    model = randomized(UNet(), scale=0.05).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.1, 0.9])
    out = model.forward_features(x, t)
    assert out.eps.shape == x.shape and out.features.shape[-2:] == (28, 28)
    assert torch.equal(model(x, t), out.eps)
    assert not torch.allclose(model(x, t.flip(0)), out.eps)
    assert not torch.allclose(model(x.flip(0), t), out.eps)
    # Batch elements are independent (GroupNorm, not BatchNorm).
    torch.testing.assert_close(model(x[:1], t[:1]), out.eps[:1], rtol=1e-5, atol=1e-5)


def test_shipped_size_fits_10_mb():
    model = UNet()
    assert model.config()["image_size"] == 28 and model.config()["attn_resolutions"] == [7]
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 <= 10 * 1024 * 1024, n


def test_timestep_embedding():
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    emb = timestep_embedding(t, 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64))
    assert emb[1, 0] == torch.sin(torch.tensor(500.0, dtype=torch.float64))


def test_jvp_matches_finite_differences_float64():
    model = randomized(UNet.from_config(TINY)).double().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    vx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    vt = torch.tensor([0.5, -1.0], dtype=torch.float64)
    h = 1e-7  # central differences: truncation error O(h²), round-off O(1e-16 / h)
    # ∂ε/∂x and ∂ε/∂t separately (∂ε/∂t is ~100× larger, time_scale = 1000), then together.
    for tx, tt in ((vx, torch.zeros_like(t)), (torch.zeros_like(x), vt), (vx, vt)):
        eps, jvp = torch.func.jvp(lambda x_, t_: model(x_, t_), (x, t), (tx, tt))
        torch.testing.assert_close(eps, model(x, t))
        fd = (model(x + h * tx, t + h * tt) - model(x - h * tx, t - h * tt)) / (2 * h)
        assert jvp.abs().max() > 1e-2  # not trivially zero
        torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-6 * float(jvp.abs().max()))


def test_jvp_runs_on_default_model_and_genie_exact_samples():
    model = randomized(UNet(), scale=0.02).eval()
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([0.5])
    _, jvp = torch.func.jvp(lambda x_, t_: model(x_, t_), (x, t), (torch.randn_like(x), torch.ones_like(t)))
    assert jvp.shape == x.shape and torch.isfinite(jvp).all()
    tiny = randomized(UNet.from_config(TINY), scale=0.1).eval()
    out, nfe = sample(tiny, torch.randn(2, 1, 8, 8), 2, solver="genie_exact", return_nfe=True)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all() and nfe > 2


def test_config_round_trip():
    model = UNet.from_config(TINY)
    config = json.loads(json.dumps(model.config()))
    assert config == {**TINY, "time_input": "t", "num_classes": 0,
                      "schedule": {"type": "linear", "beta_min": 0.1, "beta_max": 20.0}}
    copy = UNet.from_config(config)
    assert {k: v.shape for k, v in copy.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    copy.load_state_dict(randomized(model).state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert torch.equal(copy(x, t), model(x, t))


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNet.from_config({**TINY, "dropout": 0.1})
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="expected x of shape"):
        UNet.from_config(TINY)(torch.randn(2, 3, 8, 8), torch.rand(2))
