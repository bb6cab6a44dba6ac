"""The UNet's log-γ time input and class conditioning, and training with labels."""

import math

import pytest
import torch

from genie_kernels import LinearVPSchedule, sample
from genie_kernels.checkpoint import CheckpointError, save_checkpoint
from genie_kernels.zoo.mnist.train_base import TrainConfig, diffusion_loss, train_base
from genie_kernels.models.unet import UNET_KIND, UNet, load_unet

TINY = {"image_size": 8, "in_channels": 1, "channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
        "attn_resolutions": [4], "norm_groups": 4}
COND = {**TINY, "time_input": "log_gamma", "time_scale": 2.0, "num_classes": 10}

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def test_log_gamma_time_input_is_log_of_sigma_over_alpha():
    schedule = LinearVPSchedule(0.1, 20.0)
    model = UNet.from_config(COND)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    expected = torch.log(schedule.sigma(t) / schedule.alpha(t))
    torch.testing.assert_close(model.time_features(t), expected, rtol=1e-10, atol=0)
    # the ends of the default range, as the docstring says
    assert model.time_features(t)[0].item() == pytest.approx(-4.56, abs=0.01)
    assert model.time_features(t)[-1].item() == pytest.approx(5.03, abs=0.01)


def test_model_carries_its_schedule_and_sample_uses_it():
    beta = {"type": "linear", "beta_min": 0.2, "beta_max": 10.0}
    model = randomized(UNet.from_config({**COND, "schedule": beta}))
    assert model.schedule.config() == beta and model.config()["schedule"] == beta
    noise = torch.randn(2, 1, 8, 8)
    own = sample(model, noise, 3, solver="ddim")
    explicit = sample(model, noise, 3, solver="ddim", schedule=LinearVPSchedule(0.2, 10.0))
    assert torch.equal(own, explicit)


def test_no_label_is_the_null_label_and_labels_change_eps():
    model = randomized(UNet.from_config(COND))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    null = torch.full((3,), model.null_label)
    assert model.null_label == 10
    assert torch.equal(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2])), model(x, t))
    # one label broadcasts to the batch
    assert torch.equal(model(x, t, torch.tensor(4)), model(x, t, torch.tensor([4, 4, 4])))
    # each sample's ε depends on its own label only
    mixed = model(x, t, torch.tensor([0, 5, 0]))
    assert torch.equal(mixed[0], model(x, t, torch.tensor([0, 0, 0]))[0])


def test_eps_is_smooth_in_t_with_log_gamma_input():
    """The forward-mode ∂ε/∂t agrees with a central secant over a step-sized Δt far better
    for the log-γ input than for the 1000·t input of the same random weights."""
    def secant_error(config):
        model = randomized(UNet.from_config(config), scale=0.3).double()
        x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
        _, jvp = torch.func.jvp(lambda t_: model(x, t_), (t,), (torch.ones_like(t),))
        dt = 1e-2
        secant = (model(x, t + dt) - model(x, t - dt)) / (2 * dt)
        return ((secant - jvp).norm() / jvp.norm()).item()

    smooth = secant_error(COND)
    rough = secant_error({**TINY, "time_scale": 1000.0})
    assert smooth < 0.05 and rough > 10 * smooth, (smooth, rough)


@pytest.mark.parametrize("cond, error, match", [
    (torch.tensor([0, 11, 2]), ValueError, r"0\.\.9 \(10: no condition\)"),
    (torch.tensor([-1, 0, 0]), ValueError, "must lie in"),
    (torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
    (torch.zeros(3, 1, dtype=torch.long), ValueError, r"shape \(3,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer tensor"),
])
def test_bad_labels_are_named(cond, error, match):
    model = UNet.from_config(COND)
    with pytest.raises(error, match=match):
        model(torch.randn(3, 1, 8, 8), torch.rand(3), cond)


def test_unconditional_unet_refuses_labels_and_bad_configs():
    with pytest.raises(ValueError, match="unconditional"):
        UNet.from_config(TINY)(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="time_input"):
        UNet.from_config({**TINY, "time_input": "sigma"})
    with pytest.raises(ValueError, match="num_classes"):
        UNet.from_config({**TINY, "num_classes": -1})
    with pytest.raises(ValueError, match="num_classes"):
        UNet.from_config({**TINY, "num_classes": 10**9})
    with pytest.raises(ValueError, match="time_scale"):
        UNet.from_config({**TINY, "time_scale": math.nan})
    with pytest.raises(ValueError, match="must be a dict"):
        UNet.from_config([1, 2])


def test_checkpoint_of_the_old_architecture_given_as_the_new_is_refused(tmp_path):
    old = UNet.from_config({**TINY, "time_scale": 1000.0})
    config = {"kind": UNET_KIND, "unet": COND, "schedule": LinearVPSchedule().config()}
    path = save_checkpoint(tmp_path / "unet.safetensors", old.state_dict(), config)
    with pytest.raises(CheckpointError, match=r"missing \['class_emb.weight'\]"):
        load_unet(path)


def test_label_dropout_replaces_labels_with_the_null_label():
    model = UNet.from_config(COND)
    seen = []
    original = model.forward

    def spy(x, t, cond=None):
        seen.append(cond.clone())
        return original(x, t, cond)

    model.forward = spy
    labels = torch.arange(10).repeat(100)
    diffusion_loss(model, torch.zeros(1000, 1, 8, 8), model.schedule, 1e-3, torch.Generator().manual_seed(0),
                   labels, label_dropout=0.1)
    dropped = (seen[0] == model.null_label)
    assert 0.07 < dropped.float().mean().item() < 0.13
    assert torch.equal(seen[0][~dropped], labels[~dropped])


def test_training_with_labels_checks_them_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.arange(16) % 10
    config = TrainConfig(steps=3, batch=4, warmup=1, label_dropout=0.1)
    quiet = dict(progress=False, log=lambda msg: None, sample_every=0)
    with pytest.raises(ValueError, match="pass labels"):
        train_base(images, tmp_path / "a", COND, config, **quiet)
    with pytest.raises(ValueError, match=r"lie in 0\.\.9"):
        train_base(images, tmp_path / "a", COND, config, labels=labels + 1, **quiet)
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        train_base(images, tmp_path / "a", COND, config, labels=labels[:8], **quiet)
    with pytest.raises(ValueError, match="unconditional"):
        train_base(images, tmp_path / "a", TINY, config, labels=labels, **quiet)
    full = train_base(images, tmp_path / "full", COND, TrainConfig(steps=6, batch=4, warmup=1, label_dropout=0.1),
                      labels=labels, **quiet)
    train_base(images, tmp_path / "part", COND, config, labels=labels, **quiet)
    resumed = train_base(images, tmp_path / "part", COND, TrainConfig(steps=6, batch=4, warmup=1, label_dropout=0.1),
                         labels=labels, resume=True, **quiet)
    assert resumed.losses == full.losses
    with pytest.raises(CheckpointError, match="data_sha256"):  # other labels are other data
        train_base(images, tmp_path / "part", COND, TrainConfig(steps=7, batch=4, warmup=1, label_dropout=0.1),
                   labels=(labels + 1) % 10, resume=True, **quiet)
