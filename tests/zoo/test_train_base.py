"""Base-model training: loss falls, checkpoints are atomic, resume is exact, bad checkpoints and NaN fail clearly."""

import json

import pytest
import torch

import genie_kernels.checkpoint as checkpoint_module
import genie_kernels.zoo.mnist.train_base as train_module
from genie_kernels.checkpoint import CheckpointError, load_checkpoint, read_config
from genie_kernels.zoo.mnist.train_base import CHECKPOINT_NAME, TrainConfig, TrainingError, export_pretrained, train_base
from genie_kernels.models.unet import UNet, load_pretrained_unet, load_unet

TINY_UNET = {"image_size": 8, "in_channels": 1, "channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
             "attn_resolutions": [4], "norm_groups": 4, "time_scale": 1000.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster and steadier


def tiny_images(n=16, seed=0):
    """Random 8×8 'digits' in [−1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def run(tmp_path, steps, images=None, name="run", **kw):
    config = TrainConfig(steps=steps, batch=kw.pop("batch", 4), lr=kw.pop("lr", 1e-3), warmup=kw.pop("warmup", 2))
    kw.setdefault("sample_every", 0)
    return train_base(tiny_images() if images is None else images, tmp_path / name, TINY_UNET, config,
                      progress=False, log=lambda msg: None, **kw)


def test_loss_is_finite_and_falls_on_one_image(tmp_path):
    # One training image: the optimal ε is (x_t − α x0)/σ, easy to learn; the zero-initialised
    # output starts at loss ≈ E[z²] = 1.
    images = tiny_images(1).expand(8, -1, -1, -1).contiguous()
    losses = run(tmp_path, 60, images, batch=32, lr=3e-3, warmup=5).losses
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.8
    assert last < 0.6 * first, (first, last)


def test_warmup_learning_rate_and_ema_follow_their_formulas(tmp_path, recorded_adam):
    """lr · min(1, (n + 1)/warmup) at step n, and an EMA of the weights after each step with
    decay min(ema_decay, (1 + n)/(10 + n)), starting from the initial weights."""
    result = run(tmp_path, 4, lr=1e-3, warmup=3)
    assert recorded_adam.lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-12)
    ema = recorded_adam.weights[0]
    for n, after_step in enumerate(recorded_adam.weights[1:]):
        decay = min(0.999, (1 + n) / (10 + n))
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, after_step)]
    for got, expected in zip(result.ema.parameters(), ema):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert any((e - w).abs().max() > 1e-5 for e, w in zip(ema, recorded_adam.weights[-1]))  # not the last weights


def test_checkpoint_contents_and_sample_grid(tmp_path):
    result = run(tmp_path, 4, ckpt_every=2, sample_every=4)
    out = tmp_path / "run"
    tensors, config = load_checkpoint(out / CHECKPOINT_NAME)
    assert config["kind"] == train_module.TRAIN_KIND and config["step"] == 4 and config["unet"] == UNet.from_config(TINY_UNET).config()
    assert json.loads((out / "checkpoint.json").read_text()) == config
    assert tensors["losses"].tolist() == result.losses
    assert {"rng.batches", "adam.0.exp_avg", "adam.0.exp_avg_sq", "adam.0.step"} <= set(tensors)
    assert (out / "samples_000004.png").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # The EMA weights load as a UNet straight from the training checkpoint.
    ema = load_unet(out / CHECKPOINT_NAME)
    for (name, p), q in zip(ema.state_dict().items(), result.ema.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = run(tmp_path, 6, name="full")
    run(tmp_path, 3, name="split")
    resumed = run(tmp_path, 6, name="split", resume=True)
    assert resumed.losses == full.losses
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.ema.parameters(), full.ema.parameters()):
        assert torch.equal(a, b)
    assert read_config(tmp_path / "split" / CHECKPOINT_NAME)["step"] == 6


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run(tmp_path, 2)
    path = tmp_path / "run" / CHECKPOINT_NAME
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, 4, resume=True)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = train_module.diffusion_loss, []

    def loss_nan_at_step_5(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", loss_nan_at_step_5)
    with pytest.raises(TrainingError, match="step 5"):
        run(tmp_path, 6, ckpt_every=2)
    path = tmp_path / "run" / CHECKPOINT_NAME
    assert read_config(path)["step"] == 4
    monkeypatch.setattr(train_module, "diffusion_loss", real_loss)
    assert run(tmp_path, 6, resume=True).step == 6


def test_resume_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path, 2, resume=True)
    run(tmp_path, 2)
    with pytest.raises(TrainingError, match="already exists"):
        run(tmp_path, 2)
    with pytest.raises(CheckpointError, match="train"):
        run(tmp_path, 4, resume=True, lr=5e-3)
    with pytest.raises(CheckpointError, match="data_sha256"):
        run(tmp_path, 4, tiny_images(seed=1), resume=True)


def test_truncated_and_mismatched_checkpoints(tmp_path):
    run(tmp_path, 2)
    path = tmp_path / "run" / CHECKPOINT_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run(tmp_path, 4, resume=True)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_unet(path)
    with pytest.raises(CheckpointError, match="no pretrained UNet"):
        load_pretrained_unet(tmp_path / "nowhere")
    # A checkpoint whose tensors do not fit its config.
    bad = tmp_path / "bad.safetensors"
    model = UNet.from_config(TINY_UNET)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conv_out")}
    checkpoint_module.save_checkpoint(bad, state, {"kind": "genie_kernels.unet", "unet": TINY_UNET,
                                                   "schedule": model.schedule.config()})
    with pytest.raises(CheckpointError, match="missing.*conv_out"):
        load_unet(bad)
    checkpoint_module.save_checkpoint(bad, model.state_dict(), {"kind": "something.else"})
    with pytest.raises(CheckpointError, match="kind"):
        load_unet(bad)


def test_export_writes_shipped_model(tmp_path):
    result = run(tmp_path, 4)
    out = tmp_path / "pretrained"
    path = export_pretrained(tmp_path / "run" / CHECKPOINT_NAME, out, export_command="python -m genie_kernels x")
    assert {p.name for p in out.iterdir()} >= {"unet.safetensors", "unet.json", "PROVENANCE.md", "samples.png"}
    model, config = load_pretrained_unet(out, return_config=True)
    assert config["steps"] == 4 and config["schedule"]["type"] == "linear"
    for p, q in zip(model.parameters(), result.ema.parameters()):
        assert torch.equal(p, q)
    provenance = (out / "PROVENANCE.md").read_text()
    assert "4 steps" in provenance and "Final loss" in provenance and "python -m genie_kernels x" in provenance
    half = export_pretrained(tmp_path / "run" / CHECKPOINT_NAME, tmp_path / "half", dtype=torch.float16)
    assert half.stat().st_size < path.stat().st_size
    assert load_unet(half).conv_in.weight.dtype == torch.float32


def test_cli_train_resume_export(tmp_path):
    from genie_kernels.cli import main
    from genie_kernels.zoo.mnist.data import default_data_dir

    data = default_data_dir()
    if not (data / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST idx files not found in {data} (set GENIE_MNIST to their folder)")
    out = tmp_path / "cli"
    args = ["train-base", "--data", str(data), "--out", str(out), "--channels", "8", "--channel-mults", "1,2",
            "--batch", "4", "--sample-every", "0", "--no-progress"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "2"]) == 1  # refuses to overwrite without --resume
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert main(args + ["--steps", "3", "--resume", "--lr", "0.1"]) == 1  # mismatched config
    assert main(["train-base", "--out", str(out), "--export", "--export-to", str(tmp_path / "ship")]) == 0
    model, config = load_pretrained_unet(tmp_path / "ship", return_config=True)
    assert config["steps"] == 3 and config["data"]["count"] == 9_000 and model.image_size == 28
    assert main(["train-base", "--out", str(tmp_path / "none")]) == 2  # --data missing
    assert main(["train-base", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 1  # no MNIST files


def test_ckpt_every_zero_writes_the_checkpoint_only_at_the_end(tmp_path, monkeypatch):
    steps_saved = []
    save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, tensors, meta: steps_saved.append(meta["step"]) or save(path, tensors, meta))
    run(tmp_path, 3, ckpt_every=0)
    assert steps_saved == [3]
    with pytest.raises(ValueError, match="ckpt_every must be an int >= 0, got -1"):
        run(tmp_path, 3, name="negative", ckpt_every=-1)
