"""Distillation for a conditional model: samples carry their labels, dropped to the null
label with probability cond_drop, and validation reports conditional and unconditional
errors.  A tiny random class-conditional UNet."""

import pytest
import torch

import genie_kernels as gk
from genie_kernels.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

COND = {"image_size": 8, "in_channels": 1, "channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
        "attn_resolutions": [4], "norm_groups": 4, "time_input": "log_gamma", "time_scale": 2.0, "num_classes": 10}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = UNet.from_config(COND).eval()
    with torch.no_grad():  # random weights (the output layer starts at zero), labels that change ε visibly
        for p in model.parameters():
            p.normal_(0, 0.1)
        model.class_emb.weight.normal_(0, 1)
    return model


def head():
    torch.manual_seed(1)
    return gk.ConvHead(1, feature_channels=8, temb_channels=32, nf=8, groups=4)


DATA = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
LABELS = torch.arange(24) % 10


def run(model, labels, **options):
    options = {"steps": 3, "batch_size": 4, "val_size": 6, "val_buckets": 2, "progress": False, **options}
    return gk.distill(model, head(), DATA, cond=labels, **options)


def test_conditional_distillation_validates_both_halves(model):
    result = run(model, LABELS)
    rows = result.validation[-1]["buckets"]
    assert [r["condition"] for r in rows] == ["conditional"] * 2 + ["unconditional"] * 2
    assert all(r["rel_err"] > 0 for r in rows)
    # the conditional and unconditional targets differ, so do the errors
    assert rows[0]["rel_err"] != rows[2]["rel_err"]
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_cond_drop_replaces_the_labels_by_the_null_label(model):
    other = (LABELS + 3) % 10
    # every label dropped: which labels the data had does not matter
    assert run(model, LABELS, cond_drop=1.0, val_size=0).losses == run(model, other, cond_drop=1.0, val_size=0).losses
    # none dropped: it does
    assert run(model, LABELS, cond_drop=0.0, val_size=0).losses != run(model, other, cond_drop=0.0, val_size=0).losses
    # all dropped equals training on the null label throughout (the first step: later draws differ by the drop mask)
    null = torch.full((24,), model.null_label)
    assert run(model, LABELS, cond_drop=1.0, val_size=0).losses[0] == run(model, null, cond_drop=0.0, val_size=0).losses[0]


def test_bad_conditions_are_refused_before_training(model):
    unconditional = UNet.from_config({**COND, "num_classes": 0})
    with pytest.raises(ValueError, match="is unconditional"):
        gk.distill(unconditional, head(), DATA, cond=LABELS, steps=1, progress=False, val_size=6)
    with pytest.raises(ValueError, match="one condition per training sample"):
        run(model, LABELS[:10])
    with pytest.raises(ValueError, match="class labels must lie in 0..9"):
        run(model, LABELS + 5)
    with pytest.raises(ValueError, match="cond_drop must be a probability"):
        run(model, LABELS, cond_drop=1.5)
    with pytest.raises(TypeError, match="needs the training data as a tensor"):
        gk.distill(model, head(), lambda n, g: DATA[:n], cond=LABELS, steps=1, progress=False)


def test_a_resumed_conditional_run_repeats_the_uninterrupted_one(model, tmp_path):
    whole = run(model, LABELS, steps=4, val_size=0, cond_drop=0.5)
    run(model, LABELS, steps=2, val_size=0, cond_drop=0.5, out=tmp_path / "h.safetensors")
    resumed = run(model, LABELS, steps=4, val_size=0, cond_drop=0.5, out=tmp_path / "h.safetensors", resume=True)
    assert resumed.losses == whole.losses


def test_cli_distill_conditional(model, tmp_path, capsys):
    from safetensors.torch import save_file

    from genie_kernels.checkpoint import read_config, save_checkpoint
    from genie_kernels.cli import main
    from genie_kernels.models.unet import UNET_KIND

    # model.config() names the schedule, which a UNet file must
    unet = save_checkpoint(tmp_path / "unet.safetensors", model.state_dict(), {"kind": UNET_KIND, "unet": model.config()})
    data = tmp_path / "digits.safetensors"
    save_file({"data": DATA.contiguous(), "labels": LABELS.contiguous()}, str(data))
    out = tmp_path / "head.safetensors"

    def command(data, out):
        return ["distill", "--model", str(unet), "--data", str(data), "--out", str(out), "--nf", "8", "--groups", "4",
                "--batch-size", "4", "--steps", "2", "--val-size", "6", "--val-buckets", "2", "--no-progress",
                "--conditional"]

    assert main(command(data, out) + ["--cond-drop", "0.3"]) == 0
    config = read_config(out)
    assert config["training"]["cond_drop"] == 0.3
    assert [r["condition"] for r in config["validation"][-1]["buckets"]] == ["conditional"] * 2 + ["unconditional"] * 2
    assert "unconditional t∈" in capsys.readouterr().out
    unlabelled = tmp_path / "images.safetensors"
    save_file({"data": DATA.contiguous()}, str(unlabelled))
    assert main(command(unlabelled, tmp_path / "h2.safetensors")) == 2
    assert "no tensor named 'labels'" in capsys.readouterr().err
