"""The curvature head: mixed parametrisation, shapes, protocol, config round trip, bad input."""

import copy
import types

import pytest
import torch

import genie_kernels as gk
from genie_kernels.heads.base import combine_mixed
from genie_kernels.heads.build import head_for, head_from_config
from genie_kernels.heads.conv import ConvHead
from genie_kernels.cost import RelativeCost, relative_cost
from genie_kernels.heads.cost import head_cost
from genie_kernels.heads.mlp import MLPHead
from genie_kernels.ode.protocol import ModelOutput


def _randomise(head, seed=0):
    """Give every parameter (the zero-initialised output layer too) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return head


def test_combine_mixed_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 6, 4, 4, generator=gen, dtype=torch.float64)
    gamma = torch.tensor([0.01, 1.0, 150.0], dtype=torch.float64)
    got = combine_mixed(k, gamma)
    assert got.shape == (3, 2, 4, 4)
    for b, g in enumerate(gamma.tolist()):
        k1, k2, k3 = k[b, 0:2], k[b, 2:4], k[b, 4:6]
        expected = -k1 / g + k2 * g / (1 + g * g) + k3 / (g * (1 + g * g))
        torch.testing.assert_close(got[b], expected, rtol=1e-14, atol=0)


def test_combine_mixed_rejects_a_channel_count_not_divisible_by_three():
    with pytest.raises(ValueError, match="3C"):
        combine_mixed(torch.zeros(1, 4, 2, 2), torch.ones(1))


def test_conv_head_shapes_dtype_and_zero_start():
    head = ConvHead(3, feature_channels=5, temb_channels=7, nf=8, num_blocks=2, groups=4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out = ModelOutput(torch.randn_like(x), torch.randn(2, 5, 6, 6), torch.randn(2, 7))
    gamma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y = head(x, out, gamma)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.count_nonzero(y) == 0  # zero-initialised output conv: GENIE starts as DDIM
    _randomise(head)
    y = head(x, out, gamma)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    half = copy.deepcopy(head).to(torch.bfloat16)(x.to(torch.bfloat16), out, gamma)
    assert half.dtype == torch.float32  # combined and returned at the solver state's precision
    # the time embedding and the features are read
    assert not torch.equal(y, head(x, out._replace(temb=out.temb + 1), gamma))
    assert not torch.equal(y, head(x, out._replace(features=out.features + 1), gamma))


def test_own_embedding_makes_k_depend_on_gamma():
    head = _randomise(ConvHead(1, nf=8, groups=4))
    k = []
    head.conv_out.register_forward_hook(lambda module, args, output: k.append(output))
    x = torch.randn(1, 1, 4, 4)
    out = ModelOutput(torch.randn_like(x))
    head(x, out, torch.tensor([2.0]))
    head(x, out, torch.tensor([2.01]))
    assert not torch.allclose(k[0], k[1], rtol=1e-5, atol=0)


def test_mlp_head_on_2d_and_image_data():
    head = _randomise(MLPHead(2, hidden=16, num_layers=2))
    x = torch.randn(5, 2)
    y = head(x, ModelOutput(torch.randn_like(x)), torch.full((5,), 0.3))
    assert y.shape == (5, 2) and torch.isfinite(y).all()
    head = MLPHead(12, hidden=16)
    x = torch.randn(2, 3, 2, 2)
    assert head(x, ModelOutput(x), torch.ones(2)).shape == x.shape


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_config_round_trip_gives_the_same_function(kind):
    x = torch.randn(2, 2, 4, 4)
    out = ModelOutput(torch.randn_like(x), torch.randn(2, 3, 4, 4), torch.randn(2, 6))
    head = _randomise(head_for(out, x, kind, **({"nf": 8, "groups": 4} if kind == "conv" else {"hidden": 8})))
    clone = head_from_config(head.config())
    clone.load_state_dict(head.state_dict())
    assert clone.config() == head.config()
    gamma = torch.tensor([0.1, 10.0])
    assert torch.equal(clone(x, out, gamma), head(x, out, gamma))


@pytest.mark.parametrize(
    "head, x, out, message",
    [
        (ConvHead(3, nf=8, groups=4), torch.zeros(1, 1, 4, 4), ModelOutput(torch.zeros(1, 1, 4, 4)), "3 image channels"),
        (ConvHead(1, feature_channels=4, nf=8, groups=4), torch.zeros(1, 1, 4, 4), ModelOutput(torch.zeros(1, 1, 4, 4)),
         "returns no features"),
        (ConvHead(1, feature_channels=4, nf=8, groups=4), torch.zeros(1, 1, 4, 4),
         ModelOutput(torch.zeros(1, 1, 4, 4), torch.zeros(1, 6, 4, 4)), "4 feature channels"),
        (ConvHead(1, feature_channels=4, nf=8, groups=4), torch.zeros(1, 1, 4, 4),
         ModelOutput(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 2, 2)), "resolution"),
        (ConvHead(1, temb_channels=16, nf=8, groups=4), torch.zeros(1, 1, 4, 4),
         ModelOutput(torch.zeros(1, 1, 4, 4), None, torch.zeros(1, 12)), r"time embedding of shape \(1, 16\)"),
        (ConvHead(1, temb_channels=16, nf=8, groups=4), torch.zeros(1, 1, 4, 4), ModelOutput(torch.zeros(1, 1, 4, 4)),
         "returns none"),
        (MLPHead(2), torch.zeros(3, 3), ModelOutput(torch.zeros(3, 3)), "2 values per sample"),
        (MLPHead(2, feature_dim=5), torch.zeros(3, 2), ModelOutput(torch.zeros(3, 2), torch.zeros(3, 4)), "5 feature values"),
    ],
)
def test_head_model_mismatch_is_a_clear_error(head, x, out, message):
    with pytest.raises(ValueError, match=message):
        head(x, out, torch.ones(x.shape[0]))


@pytest.mark.parametrize("head, x", [(ConvHead(1, nf=8, groups=4), torch.zeros(3, 1, 4, 4)),
                                     (MLPHead(2), torch.zeros(3, 2))])
@pytest.mark.parametrize("gamma", [torch.ones(2), torch.ones(3, 1), torch.tensor(1.0)])
def test_a_gamma_of_another_length_than_the_batch_is_a_clear_error(head, x, gamma):
    with pytest.raises(ValueError, match=r"gamma must hold one value per sample, shape \(3,\)"):
        head(x, ModelOutput(torch.zeros_like(x)), gamma)


@pytest.mark.parametrize("options", [{"nf": 10, "groups": 4}, {"nf": 0}, {"num_blocks": -1}, {"channels": 1.5}])
def test_bad_hyper_parameters_are_rejected(options):
    kwargs = {"channels": 1, "nf": 8, "groups": 4, **options}
    with pytest.raises(ValueError):
        ConvHead(**kwargs)


def test_unknown_head_config_is_rejected():
    with pytest.raises(ValueError, match="unknown head type"):
        head_from_config({"type": "transformer"})
    with pytest.raises(ValueError, match="bad conv head config"):
        head_from_config({"type": "conv", "channels": 1, "colour": "red"})


def test_genie_with_a_zero_head_is_ddim_and_does_not_count_the_head(image_mix, image_noise):
    head = ConvHead(3, nf=8, groups=4).double()
    head.cost = RelativeCost(flops=0.25, time=0.3)
    x_genie, nfe = gk.sample(image_mix, image_noise, 4, solver="genie", head=head, return_nfe=True)
    x_ddim = gk.sample(image_mix, image_noise, 4, solver="ddim")
    torch.testing.assert_close(x_genie, x_ddim, rtol=0, atol=0)
    assert nfe == 4  # network calls; the head's cost is reported beside


def test_head_cost_counts_flops_of_the_head_against_the_network():
    """A conv head on a UNet: its FLOP ratio is what FlopCounterMode counts for each, and the
    time ratio is positive."""
    from torch.utils.flop_counter import FlopCounterMode

    model = gk.UNet(image_size=8, channels=8, channel_mults=(1, 2), attn_resolutions=(4,), norm_groups=4).eval()
    head = ConvHead(1, feature_channels=model.feature_channels, temb_channels=model.temb_dim, nf=8, groups=4)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    cost = head_cost(head, model, x, t, repeats=3)
    out = model.forward_features(x, t)
    with FlopCounterMode(display=False) as network:
        model.forward_features(x, t)
    with FlopCounterMode(display=False) as head_flops:
        head(x, out, model.schedule.gamma(t.double()))
    assert cost.flops == pytest.approx(head_flops.get_total_flops() / network.get_total_flops(), rel=1e-12)
    assert 0 < cost.flops < 2 and cost.time > 0


def test_relative_cost_is_median_time_over_network_time(monkeypatch):
    """On a fake clock where a network call takes 4 s and the other call 1 s, the ratio is 0.25."""
    import genie_kernels.cost as cost_module

    clock = [0.0]
    monkeypatch.setattr(cost_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class SlowNetwork(gk.EpsModel):
        def forward_features(self, x, t):
            clock[0] += 4.0
            return ModelOutput(x)

    class QuickHead(torch.nn.Module):
        def forward(self, x, out, gamma):
            clock[0] += 1.0
            return x

    head, network, x, t = QuickHead(), SlowNetwork(), torch.randn(2, 3), torch.full((2,), 0.5)
    out = network.forward_features(x, t)
    cost = relative_cost(lambda: head(x, out, t), lambda: network.forward_features(x, t), repeats=3)
    assert cost.time == 0.25 and cost.flops is None  # the network has no counted FLOPs
    assert RelativeCost.from_config(cost.config()) == cost


@pytest.mark.parametrize("bad", [None, [0.1, 0.2], {"flops": 0.1}, {"time": 0.1}, {"flops": -1.0, "time": 0.1},
                                 {"flops": float("nan"), "time": 0.1}, {"flops": True, "time": 0.1}])
def test_relative_cost_from_a_bad_config_is_refused(bad):
    with pytest.raises(ValueError, match="cost"):
        RelativeCost.from_config(bad)


def test_log_gamma_embedding_is_sin_and_cos_of_log_gamma_at_geometric_frequencies():
    from genie_kernels.heads.base import EMBED_MAX_FREQ, EMBED_MIN_FREQ, log_gamma_embedding

    gamma = torch.tensor([0.01, 1.0, 150.0], dtype=torch.float64)
    freqs = EMBED_MIN_FREQ * (EMBED_MAX_FREQ / EMBED_MIN_FREQ) ** (torch.arange(4, dtype=torch.float64) / 3)
    arg = gamma.log()[:, None] * freqs[None, :]
    torch.testing.assert_close(log_gamma_embedding(gamma, 8), torch.cat([arg.sin(), arg.cos()], dim=1),
                               rtol=1e-13, atol=1e-13)


def test_residual_block_is_the_scaled_sum_of_input_and_branch():
    from genie_kernels.heads.conv import ResidualBlock

    torch.manual_seed(0)
    block = _randomise(ResidualBlock(8, temb_dim=5, groups=4).double())
    x, temb = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    silu = torch.nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + block.temb_proj(silu(temb))[:, :, None, None]
    h = block.conv2(silu(block.norm2(h)))
    torch.testing.assert_close(block(x, temb), (x + h) / 2 ** 0.5, rtol=1e-14, atol=1e-14)
