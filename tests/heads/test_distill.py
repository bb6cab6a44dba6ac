"""Distillation: the loss falls, checkpoints reload bit-identically, resume is exact, DDP
matches one process, bad input is refused without leaving a partial checkpoint, and a
briefly distilled head already beats DDIM."""

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import genie_kernels as gk
from genie_kernels.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from genie_kernels.heads.conv import ConvHead
from genie_kernels.heads.data import ValidationBucket, noisy_batch, relative_errors, validation_set, weighted_loss
from genie_kernels.heads.distill import NonFiniteLossError, distill
from genie_kernels.heads.recipe import check_settings
from genie_kernels.heads.files import load_head, model_identity
from genie_kernels.heads.mlp import MLPHead
from genie_kernels.ode.protocol import ModelOutput

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster and steadier


def small_mixture():
    return gk.image_mixture((1, 4, 4), components=3, seed=3)


def small_head(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ConvHead(1, nf=8, num_blocks=1, groups=4).to(dtype)


def run(head, mixture, **options):
    settings = dict(steps=6, batch_size=8, lr=3e-3, val_size=0, progress=False)
    settings.update(options)
    return distill(mixture, head, mixture, **settings)


class Interrupt(Exception):
    pass


def run_interrupted(head, mixture, at_step: int, **options) -> None:
    """Run until an exception stops it after step ``at_step``, as a killed process would stop."""
    def stop(step, loss):
        if step == at_step:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(head, mixture, callback=stop, **options)


def files_in(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_loss_falls_and_validation_improves():
    mixture = gk.image_mixture((1, 8, 8), components=4, seed=0)
    torch.manual_seed(0)
    head = MLPHead(64, hidden=128, num_layers=2)
    result = run(head, mixture, steps=300, batch_size=128, lr=3e-3, val_size=32, val_buckets=3, validate_every=150)
    first, last = sum(result.losses[:30]) / 30, sum(result.losses[-30:]) / 30
    assert last < 0.8 * first, (first, last)
    errors = [[b["rel_err"] for b in v["buckets"]] for v in result.validation]
    assert len(errors) == 2 and len(errors[0]) == 3
    # an untrained head (zero output) has relative error 1; the smallest-t bucket learns first
    assert errors[-1][0] < errors[0][0] and errors[-1][0] < 0.8


def test_saved_and_reloaded_head_is_bit_identical(tmp_path):
    mixture = small_mixture()
    out = tmp_path / "head.safetensors"
    result = run(small_head(), mixture, out=out, ema_decay=0.9)
    assert (tmp_path / "head.json").is_file()
    loaded = load_head(out, model=mixture)
    assert loaded.config() == result.head.config()
    x = torch.randn(3, 1, 4, 4)
    out_eps = ModelOutput(torch.randn_like(x))
    gamma = torch.tensor([0.02, 1.0, 80.0])
    assert torch.equal(loaded(x, out_eps, gamma), result.head(x, out_eps, gamma))
    # the EMA weights are what load_head returns by default, and they differ from the raw ones
    raw = load_head(out, use_ema=False)
    assert not torch.equal(raw(x, out_eps, gamma), loaded(x, out_eps, gamma))


def test_head_cost_is_measured_without_validation_and_kept_by_a_resume(tmp_path):
    path = tmp_path / "h.safetensors"
    finished = run(small_head(), small_mixture(), steps=3, val_size=0, out=path)
    cost = finished.head.cost
    assert cost.flops is None and cost.time > 0  # the analytic mixture has no counted FLOPs
    assert load_head(path).cost == cost
    assert read_config(path)["cost"]["batch"] == 8  # batch_size: the batch it was measured at, beside the ratios
    again = run(small_head(seed=1), small_mixture(), steps=3, val_size=0, out=path, resume=True)  # nothing to train
    assert again.step == 3 and again.head.cost == cost


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    mixture = small_mixture()
    full = run(small_head(), mixture, steps=8, ema_decay=0.5, out=tmp_path / "full.safetensors", checkpoint_every=3)

    path = tmp_path / "cut.safetensors"
    run_interrupted(small_head(), mixture, 5, steps=8, ema_decay=0.5, out=path, checkpoint_every=3)
    assert read_config(path)["step"] == 3
    resumed = run(small_head(seed=123), mixture, steps=8, ema_decay=0.5, out=path, checkpoint_every=3, resume=True)
    assert len(full.losses) == 8 and resumed.losses == full.losses
    for a, b in zip(resumed.head.parameters(), full.head.parameters()):
        assert torch.equal(a, b)


def test_time_limit_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    from types import SimpleNamespace

    distill_module = sys.modules["genie_kernels.heads.distill"]
    mixture = small_mixture()
    full = run(small_head(), mixture, steps=8, ema_decay=0.5)
    clock = iter(range(1000))  # one "second" per reading: the deadline (3 s) passes at step 3
    monkeypatch.setattr(distill_module, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    path = tmp_path / "timed.safetensors"
    cut = run(small_head(), mixture, steps=8, ema_decay=0.5, out=path, time_limit=2.5)
    monkeypatch.undo()
    assert cut.step == read_config(path)["step"] == len(cut.losses) == 3
    assert cut.losses == full.losses[:cut.step]
    resumed = run(small_head(seed=7), mixture, steps=8, ema_decay=0.5, out=path, resume=True)
    assert resumed.step == 8 and resumed.losses == full.losses
    with pytest.raises(ValueError, match="time_limit"):
        run(small_head(), mixture, time_limit=0)


def _ddp_problem():
    mixture = small_mixture()
    return mixture, small_head(torch.float64)


def _ddp_worker(rank, world, port, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mixture, head = _ddp_problem()
        local_batches = []
        def record_training_batch(module, args):  # the cost measurement at the end runs without grad
            if torch.is_grad_enabled():
                local_batches.append(args[0].shape[0])

        head.register_forward_pre_hook(record_training_batch)
        result = run(head, mixture, steps=2, batch_size=8, lr=1e-2)
        if rank == 0:
            torch.save({"params": dict(head.state_dict()), "losses": result.losses, "local_batches": local_batches},
                       result_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    mixture, head = _ddp_problem()
    start = {k: v.clone() for k, v in head.state_dict().items()}
    single = run(head, mixture, steps=2, batch_size=8, lr=1e-2)
    path = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(path)), nprocs=2, join=True)
    ddp = torch.load(path)
    moved = 0.0
    for name, value in head.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-12, atol=1e-14)
        moved += float((value - start[name]).abs().max())
    assert moved > 1e-3  # the two steps changed the head
    assert ddp["losses"] == pytest.approx(single.losses, rel=1e-12)
    assert ddp["local_batches"] == [4, 4]  # each rank computed its half of the global batch of 8


def test_channel_mismatch_is_refused_before_any_checkpoint(tmp_path):
    mixture = small_mixture()  # one channel
    head = ConvHead(3, nf=8, groups=4)
    with pytest.raises(ValueError, match="3 image channels"):
        run(head, mixture, out=tmp_path / "head.safetensors", checkpoint_every=1)
    assert files_in(tmp_path) == []


def test_resume_from_another_configuration_is_refused_and_leaves_the_checkpoint(tmp_path):
    mixture = small_mixture()
    path = tmp_path / "head.safetensors"
    run(small_head(), mixture, steps=2, out=path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"does not match: training\.lr is 0\.003, expected 0\.0001$"):
        run(small_head(), mixture, steps=4, out=path, resume=True, lr=1e-4)
    with pytest.raises(CheckpointError, match=r"does not match: head\.nf is 8, expected 16$"):
        run(ConvHead(1, nf=16, groups=4), mixture, steps=4, out=path, resume=True)
    with pytest.raises(CheckpointError, match="does not match: base_model"):
        run(small_head(), gk.image_mixture((1, 4, 4), components=3, seed=4), steps=4, out=path, resume=True)
    schedule = gk.DiscreteVPSchedule(torch.linspace(0.999, 0.001, 1000, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="does not match: schedule") as refused, \
            pytest.warns(UserWarning, match="differs from the model's own schedule"):
        run(small_head(), mixture, steps=4, out=path, resume=True, schedule=schedule)
    assert len(str(refused.value)) < 400, str(refused.value)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["head.json", "head.safetensors"]


def test_a_mismatch_inside_a_list_names_its_index():
    from genie_kernels.checkpoint import _difference

    found, expected = {"alphas_cumprod": [0.5] * 6 + [0.1]}, {"alphas_cumprod": [0.5] * 6 + [0.2]}
    assert _difference("schedule", found, expected) == "schedule.alphas_cumprod[6] is 0.1, expected 0.2"
    assert _difference("schedule", {"a": [1, 2]}, {"a": [1, 2, 3]}) == "schedule.a has 2 entries, expected 3"


def test_existing_checkpoint_without_resume_is_refused(tmp_path):
    mixture = small_mixture()
    path = tmp_path / "head.safetensors"
    run(small_head(), mixture, steps=1, out=path)
    with pytest.raises(FileExistsError, match="resume=True"):
        run(small_head(), mixture, steps=1, out=path)


def test_loading_the_readable_json_copy_points_at_the_checkpoint(tmp_path):
    path = tmp_path / "head.safetensors"
    run(small_head(), small_mixture(), steps=1, out=path)
    with pytest.raises(CheckpointError, match="readable copy of a checkpoint's config; pass the .safetensors file"):
        load_head(path.with_suffix(".json"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_header"])
def test_corrupt_or_truncated_checkpoint_is_a_checkpoint_error(tmp_path, damage):
    mixture = small_mixture()
    path = tmp_path / "head.safetensors"
    run(small_head(), mixture, steps=2, out=path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 10)
    else:
        path.write_bytes(data[:8] + b"}" + data[9:])
    with pytest.raises(CheckpointError):
        load_head(path)
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError):
        run(small_head(), mixture, steps=4, out=path, resume=True)
    assert path.read_bytes() == damaged and files_in(tmp_path) == ["head.json", "head.safetensors"]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_head(tmp_path / "missing.safetensors")


def test_load_head_for_another_model_is_refused(tmp_path):
    mixture = small_mixture()
    path = tmp_path / "head.safetensors"
    run(small_head(), mixture, steps=1, out=path)
    other = gk.image_mixture((1, 4, 4), components=3, seed=5)
    assert model_identity(other) != model_identity(mixture)
    with pytest.raises(CheckpointError, match="distilled for the model"):
        load_head(path, model=other)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    mixture = small_mixture()
    calls = []

    def data(n, gen):  # the fifth training batch (of 8; the up-front check draws 2) turns to NaN
        calls.append(n)
        x = mixture.sample_data(n, gen)
        return x * float("nan") if calls.count(8) >= 5 else x

    path = tmp_path / "head.safetensors"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5\b.*step 4"):
        distill(mixture, small_head(), data, steps=8, batch_size=8, out=path, checkpoint_every=2, val_size=0,
                progress=False)
    assert read_config(path)["step"] == 4
    assert files_in(tmp_path) == ["head.json", "head.safetensors"]
    head = load_head(path)
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_cosine_learning_rate_and_ema_follow_their_formulas(recorded_adam):
    """lr_s = lr · ½(1 + cos(π (s−1)/steps)) at step s, and the returned head is the EMA
    e_s = d · e_{s−1} + (1 − d) · w_s of the weights after each step, from the initial ones."""
    head = small_head()
    result = run(head, small_mixture(), steps=4, lr=1e-2, lr_schedule="cosine", ema_decay=0.6)
    assert recorded_adam.lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)],
                                              rel=1e-12)
    ema = recorded_adam.weights[0]
    for after_step in recorded_adam.weights[1:]:
        ema = [0.6 * e + 0.4 * w for e, w in zip(ema, after_step)]
    for got, expected in zip(result.head.parameters(), ema):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert any((e - p).abs().max() > 1e-4 for e, p in zip(ema, head.parameters()))  # the EMA is not the last weights


def test_linear_learning_rate_decays_to_zero_after_the_last_step(recorded_adam):
    """The published recipe's decay: lr_s = lr · (1 − (s−1)/steps)."""
    run(small_head(), small_mixture(), steps=4, lr=1e-2, lr_schedule="linear")
    assert recorded_adam.lrs == pytest.approx([1e-2 * (1 - s / 4) for s in range(4)], rel=1e-12)


@pytest.mark.parametrize("head_eps", ["model", "noise"])
def test_head_eps_chooses_what_the_head_sees_in_training_and_validation_sees_the_model(head_eps):
    """With head_eps="noise" the head takes the noise z that made x_t (the published training
    code's choice): x_t = α x_0 + σ z holds for what it got; with "model" it takes ε(x_t, t).
    Validation always passes the network's ε."""
    schedule = gk.LinearVPSchedule()
    mixture = small_mixture()
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_head()
            self.config = self.inner.config

        def forward(self, x, out, gamma):
            seen.append((self.training, x.detach().clone(), out.eps.detach().clone(), gamma.detach().clone()))
            return self.inner(x, out, gamma)

    data = mixture.sample_data(200, torch.Generator().manual_seed(1)).double()
    distill(mixture, Recording().double(), data, schedule, steps=2, batch_size=8, val_size=16, val_buckets=1,
            progress=False, head_eps=head_eps)
    train_calls, validation_call = seen[:2], seen[2]  # then the head's cost is timed
    assert [c[0] for c in seen[:3]] == [True, True, False]
    for _, x, eps, gamma in train_calls:
        t = schedule.t_from_gamma(gamma)
        predicted = mixture(x, t)
        if head_eps == "model":
            torch.testing.assert_close(eps, predicted)
        else:  # the noise that made x_t: it maps x_t back onto training rows exactly
            assert (eps - predicted).abs().max() > 1e-3
            x0 = (x - schedule.sigma(t).view(-1, 1, 1, 1) * eps) / schedule.alpha(t).view(-1, 1, 1, 1)
            distance = (x0.flatten(1)[:, None] - data[:-16].flatten(1)[None]).abs().amax(-1).amin(-1)
            assert float(distance.max()) < 1e-9
    _, x, eps, gamma = validation_call
    torch.testing.assert_close(eps, mixture(x, schedule.t_from_gamma(gamma)))


def test_an_unknown_head_eps_is_named():
    with pytest.raises(ValueError, match="head_eps"):
        distill(small_mixture(), small_head(), torch.zeros(100, 2), steps=1, head_eps="truth", progress=False)


def test_a_briefly_distilled_head_beats_ddim():
    """About 20 s: GENIE with the head has a lower RMSE than DDIM at NFE 5 (AFS, 6 steps)."""
    mixture = gk.image_mixture((1, 4, 4), components=3, seed=0)
    torch.manual_seed(0)
    head = MLPHead(16, hidden=128, num_layers=2)
    result = run(head, mixture, steps=500, batch_size=256, lr=2e-3, ema_decay=0.99)
    noise = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = gk.ground_truth(mixture, noise, mixture.schedule, steps_per_unit=100.0)
    errors = {}
    for solver in ("ddim", "genie"):
        extra = {"head": result.head} if solver == "genie" else {}
        errors[solver] = gk.rmse(gk.sample(mixture, noise, 6, solver=solver, afs=True, **extra), truth)
    assert errors["genie"] < errors["ddim"], errors


def test_cli_distill_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "genie_kernels", "distill", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--data", "--out", "--resume", "--head", "--nf", "--blocks", "--groups", "--hidden",
                   "--layers", "--steps", "--batch-size", "--lr", "--lr-schedule", "--grad-clip", "--t-eps", "--ema", "--seed",
                   "--head-eps", "--checkpoint-every", "--validate-every", "--val-size", "--val-buckets", "--dtype", "--device"):
        assert option in proc.stdout, option
    assert "torchrun" in proc.stdout


def test_cli_distill_runs_resumes_and_refuses_an_existing_output(tmp_path, capsys):
    from genie_kernels.cli import main

    out = tmp_path / "toy.safetensors"
    base = ["distill", "--model", "toy2d", "--out", str(out), "--hidden", "16", "--layers", "1", "--batch-size", "8",
            "--val-size", "8", "--checkpoint-every", "2", "--no-progress"]
    assert main(base + ["--steps", "2"]) == 0
    assert read_config(out)["step"] == 2 and read_config(out)["head"]["type"] == "mlp"
    assert main(base + ["--steps", "3"]) == 2            # exists, no --resume
    assert "exists; pass --resume to continue that run" in capsys.readouterr().err
    assert main(base + ["--steps", "3", "--resume"]) == 0
    assert read_config(out)["step"] == 3
    assert load_head(out, model=gk.toy_2d()).dim == 2


def test_validation_reports_reach_a_log_without_a_bar(tmp_path, capsys, caplog):
    """A headless run (--no-progress, e.g. under nohup) still prints every validation report;
    from Python without a bar or log function they go to the module's logger."""
    from genie_kernels.cli import main

    out = tmp_path / "toy.safetensors"
    assert main(["distill", "--model", "toy2d", "--out", str(out), "--hidden", "16", "--layers", "1",
                 "--batch-size", "8", "--val-size", "8", "--steps", "4", "--validate-every", "2",
                 "--no-progress"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "relative error of dε/dγ" in line]
    assert [line.split()[1] for line in printed][:2] == ["2", "4"]  # the command then repeats the last
    with caplog.at_level("INFO", logger="genie_kernels.heads.distill"):
        run(small_head(), small_mixture(), steps=2, val_size=8, val_buckets=1)
    assert any("relative error of dε/dγ" in r.getMessage() for r in caplog.records)


def test_cli_distill_records_the_published_recipe_options(tmp_path):
    """--head-eps noise and --lr-schedule linear reach the run's configuration, so that a
    resume with other options is refused as another run."""
    from genie_kernels.cli import main

    out = tmp_path / "toy.safetensors"
    base = ["distill", "--model", "toy2d", "--out", str(out), "--hidden", "16", "--layers", "1", "--batch-size", "8",
            "--val-size", "0", "--no-progress", "--steps", "2"]
    assert main(base + ["--head-eps", "noise", "--lr-schedule", "linear"]) == 0
    training = read_config(out)["training"]
    assert training["head_eps"] == "noise" and training["lr_schedule"] == "linear" and training["steps"] == 2
    assert main(base + ["--resume", "--lr-schedule", "linear"]) == 2  # head_eps model: another run


@pytest.mark.parametrize("out, message", [("head.pt", "must end in .safetensors"),
                                          ("a_file/head.safetensors", "a_file is a file, not a folder")])
def test_cli_distill_checks_the_output_path_first(out, message, tmp_path, capsys):
    from genie_kernels.cli import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["distill", "--model", "toy2d", "--out", str(tmp_path / out)])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_cli_distill_refuses_a_device_it_cannot_use(tmp_path, capsys):
    from genie_kernels.cli import main

    out = tmp_path / "toy.safetensors"
    assert main(["distill", "--model", "toy2d", "--out", str(out), "--device", "nonsense", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "distill: error: --device 'nonsense' is not a torch device" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("data, error, message", [
    (torch.randn(16, 3, 4, 4), ValueError, r"the model cannot take the training data \(samples shaped \(3, 4, 4\)\)"),
    (torch.full((16, 1, 4, 4), float("nan")), ValueError, "training data contains NaN or inf"),
])
def test_training_data_the_model_cannot_take_is_refused_before_any_checkpoint(tmp_path, data, error, message):
    out = tmp_path / "head.safetensors"
    with pytest.raises(error, match=message):
        distill(small_mixture(), small_head(), data, steps=2, batch_size=4, val_size=0, progress=False, out=out)
    assert not out.exists()


def test_cli_distill_names_training_data_the_model_cannot_take(tmp_path, capsys):
    from genie_kernels.cli import main

    data, out = tmp_path / "data.pt", tmp_path / "head.safetensors"
    torch.save(torch.randn(16, 3, 4, 4), data)  # images, for the 2-D toy model
    assert main(["distill", "--model", "toy2d", "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "distill: error: the model cannot take the training data (samples shaped (3, 4, 4))" in err
    assert "Traceback" not in err and not out.exists()


def test_weighted_loss_is_the_batch_mean_of_gamma_squared_times_the_pixel_sum_of_squared_errors():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    target = torch.zeros_like(pred)
    gamma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    # mean(0.25 · (1 + 4 + 9 + 16), 9 · 4): every value is exact in binary
    assert float(weighted_loss(pred, target, gamma)) == (0.25 * 30 + 9 * 4) / 2


def test_noisy_batch_draws_t_in_its_interval_and_mixes_x0_and_noise_by_alpha_and_sigma():
    schedule = gk.LinearVPSchedule()
    x0 = torch.linspace(-1, 1, 64 * 4, dtype=torch.float64).reshape(64, 1, 2, 2)
    x_t, gamma, noise, _ = noisy_batch(lambda n, gen: x0[:n], torch.Generator().manual_seed(0), 64, schedule, 0.2, 0.4)
    t = schedule.t_from_gamma(gamma)
    assert 0.2 - 1e-12 <= float(t.min()) and float(t.max()) <= 0.4 + 1e-12 and float(t.max() - t.min()) > 0.15
    gen = torch.Generator().manual_seed(0)  # the same draws by hand: t first, then z
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t_hand = (0.2 + 0.2 * u).view(-1, 1, 1, 1)
    torch.testing.assert_close(t, t_hand.flatten(), rtol=0, atol=1e-12)  # only the γ -> t round trip rounds
    torch.testing.assert_close(x_t, schedule.alpha(t_hand) * x0 + schedule.sigma(t_hand) * z, rtol=0, atol=1e-12)
    assert torch.equal(noise, z)


def test_relative_errors_are_the_l2_norm_of_the_error_over_that_of_the_target():
    target = torch.tensor([[3.0, -4.0], [1.0, 2.0]], dtype=torch.float64)
    buckets = [ValidationBucket(0.1, 0.5, 0.5 * target, None, torch.ones(2), target),  # the head returns x
               ValidationBucket(0.5, 1.0, 3.0 * target, None, torch.ones(2), target)]
    rows = relative_errors(lambda x, out, gamma: x, buckets)
    assert rows == [{"t_min": 0.1, "t_max": 0.5, "rel_err": pytest.approx(0.5, rel=1e-15)},
                    {"t_min": 0.5, "t_max": 1.0, "rel_err": pytest.approx(2.0, rel=1e-15)}]


def test_gradients_are_clipped_to_grad_clip(monkeypatch):
    original, seen = torch.nn.utils.clip_grad_norm_, []

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        before = original(params, max_norm, *args, **kwargs)
        after = torch.sqrt(sum(p.grad.square().sum() for p in params))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    run(small_head(), small_mixture(), steps=3, grad_clip=1e-3)
    assert [max_norm for max_norm, _, _ in seen] == [1e-3] * 3
    for _, before, after in seen:
        assert before > 1e-2 and after == pytest.approx(1e-3, rel=1e-4)  # float32 gradients, clip's own 1e-6


@pytest.mark.parametrize("option, value", [("t_eps", 0.0), ("t_eps", 1.0), ("ema_decay", 1.0)])
def test_t_eps_and_ema_decay_outside_their_ranges_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"^{option} must lie in"):
        run(small_head(), small_mixture(), **{option: value})


def test_a_batch_that_the_processes_cannot_share_evenly_is_refused():
    settings = dict(steps=1, batch_size=8, lr=1e-3, lr_schedule="constant", grad_clip=1.0, t_eps=1e-3, ema_decay=0.0,
                    checkpoint_every=0, validate_every=0, val_size=0, val_buckets=1, out=None, resume=False, world=3,
                    time_limit=None)
    with pytest.raises(ValueError, match="batch_size 8 must be divisible by the number of processes 3"):
        check_settings(**settings)
    check_settings(**dict(settings, world=2))


def test_an_output_path_without_the_safetensors_suffix_is_refused_before_training(tmp_path):
    steps = []
    with pytest.raises(ValueError, match=r"^the checkpoint path must end in \.safetensors"):
        run(small_head(), small_mixture(), out=tmp_path / "head.pt", callback=lambda step, loss: steps.append(step))
    assert steps == [] and files_in(tmp_path) == []


@pytest.mark.parametrize("out, message", [
    ("/proc/head.safetensors", r"out: cannot write /proc/head\.safetensors: no file can be created in the folder /proc"),
    ("{tmp}/dangling.safetensors", r"out: cannot write .*dangling\.safetensors: it is a link to .*nowhere"),
])
def test_distill_from_python_checks_that_out_can_be_written_before_training(out, message, tmp_path):
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    steps = []
    with pytest.raises(ValueError, match=message):
        run(small_head(), small_mixture(), out=out.format(tmp=tmp_path), callback=lambda step, loss: steps.append(step))
    assert steps == []


def test_training_never_draws_the_rows_held_out_for_validation(monkeypatch):
    distill_module = sys.modules["genie_kernels.heads.distill"]
    original, draws = distill_module.data_sampler, []

    def recording_sampler(data):
        sample = original(data)

        def draw(n, gen):
            draws.append(sample(n, gen))
            return draws[-1]

        return draw

    data = 0.5 * torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    data[-4:] = 7.0  # the held-out rows, recognisable
    for module in (distill_module, sys.modules["genie_kernels.heads.data"]):  # training draws, validation draws
        monkeypatch.setattr(module, "data_sampler", recording_sampler)
    distill(small_mixture(), small_head(), data, steps=6, batch_size=8, val_size=4, val_buckets=2, progress=False)
    training = [x for x in draws if x.shape[0] != 4]  # the up-front probe (2) and the batches (8)
    validation = [x for x in draws if x.shape[0] == 4]
    assert len(training) == 1 + 6 and len(validation) == 2
    assert all((x != 7.0).all() for x in training) and all((x == 7.0).all() for x in validation)


def test_a_float64_head_reloads_in_float64_bit_identically(tmp_path):
    path = tmp_path / "head.safetensors"
    result = run(small_head(torch.float64), small_mixture(), steps=2, out=path)
    loaded = load_head(path)
    for got, expected in zip(loaded.parameters(), result.head.parameters()):
        assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_validation_measures_the_returned_ema_head_on_held_out_draws_of_seed_plus_one():
    mixture, head = small_mixture(), small_head()
    result = run(head, mixture, ema_decay=0.5, val_size=8, val_buckets=2, seed=5)
    buckets = validation_set(mixture, mixture, mixture.schedule, 8, 2, t_eps=1e-3, seed=6)
    assert result.validation == [{"step": 6, "buckets": relative_errors(result.head, buckets)}]
    assert relative_errors(head.eval(), buckets) != result.validation[0]["buckets"]  # the raw weights differ


def test_validation_samples_are_drawn_apart_from_the_training_batches():
    """With val_size == batch_size, a validation set drawn with the training seed would repeat its first batch."""
    mixture, draws = small_mixture(), []

    def data(n, gen):
        draws.append(mixture.sample_data(n, gen))
        return draws[-1]

    distill(mixture, small_head(), data, steps=2, batch_size=8, val_size=8, val_buckets=2, progress=False)
    batches = [x for x in draws if x.shape[0] == 8]
    assert len(batches) == 4  # two validation buckets, two training steps
    assert not any(torch.equal(a, b) for i, a in enumerate(batches) for b in batches[:i])


def test_a_resumed_run_keeps_the_earlier_validation_history(tmp_path):
    mixture = small_mixture()
    settings = dict(steps=6, val_size=8, val_buckets=2, validate_every=2, checkpoint_every=2)
    full = run(small_head(), mixture, out=tmp_path / "full.safetensors", **settings)

    path = tmp_path / "cut.safetensors"
    run_interrupted(small_head(), mixture, 5, out=path, **settings)
    resumed = run(small_head(seed=3), mixture, out=path, resume=True, **settings)
    assert [v["step"] for v in full.validation] == [2, 4, 6]
    assert resumed.validation == full.validation


def test_a_checkpoint_whose_step_disagrees_with_its_losses_is_refused(tmp_path):
    mixture = small_mixture()
    path = tmp_path / "head.safetensors"
    run(small_head(), mixture, steps=2, out=path)
    tensors, config = load_checkpoint(path)
    save_checkpoint(path, tensors, dict(config, step=3))
    with pytest.raises(CheckpointError, match="is inconsistent: step 3 but 2 losses"):
        run(small_head(), mixture, steps=4, out=path, resume=True)
    assert read_config(path)["step"] == 3


def test_load_head_refuses_a_checkpoint_of_another_format(tmp_path):
    path = tmp_path / "head.safetensors"
    run(small_head(), small_mixture(), steps=1, out=path)
    tensors, config = load_checkpoint(path)
    save_checkpoint(path, tensors, dict(config, format="someone_else/1"))
    with pytest.raises(CheckpointError, match=r"is not a head checkpoint \(format 'someone_else/1'"):
        load_head(path)


def test_a_numpy_learning_rate_is_taken_and_a_bad_one_named():
    """Issue 22 item 10: lr=np.float32(1e-3) was refused."""
    import numpy as np


    settings = dict(steps=1, batch_size=8, lr=np.float32(1e-3), lr_schedule="constant", grad_clip=1.0, t_eps=1e-3,
                    ema_decay=0.0, checkpoint_every=0, validate_every=0, val_size=0, val_buckets=1, out=None,
                    resume=False, world=1, time_limit=None)
    check_settings(**settings)
    for bad, error in ((math.nan, ValueError), (-1.0, ValueError), ("1e-3", TypeError), (True, TypeError)):
        with pytest.raises(error, match="lr must be a"):
            check_settings(**dict(settings, lr=bad))
