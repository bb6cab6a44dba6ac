"""Training of the base ε-network (the UNet) and export of the shipped weights.

Objective (DDPM's "simple" loss in continuous time): with the model's VP schedule,

    t ~ U[t_min, 1],  z ~ N(0, I),  x_t = α_t x_0 + σ_t z,
    L(θ) = mean over batch and pixels of (ε_θ(x_t, t, y) − z)².

A class-conditional model (``num_classes > 0``) is trained on the digit labels ``y``,
each replaced by the null label with probability ``label_dropout`` (0.1 for the bundled
model), so that one network learns both ε(x, t, y) and the unconditional ε(x, t) that
classifier-free guidance mixes.

Optimiser: Adam, learning rate warmed up linearly over ``warmup`` steps then constant,
gradient norm clipped to ``grad_clip``.  An exponential moving average of the weights
(``decay_n = min(ema_decay, (1 + n) / (10 + n))`` after n steps) is what gets shipped.

Every random draw of training (batch indices, t, z) comes from one seeded
``torch.Generator`` whose state is saved in the checkpoint with the weights, the EMA, the
Adam state and the loss history, so ``resume=True`` continues exactly: the losses of an
interrupted-and-resumed run equal those of an uninterrupted one (same thread count).
Checkpoints are written atomically (:func:`~genie_kernels.checkpoint.save_checkpoint`);
a non-finite loss or gradient stops training with an error naming the step, leaving the
last good checkpoint in place.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from ...checkpoint import (CheckpointError, load_checkpoint, load_module_tensors, restore_training, save_checkpoint,
                           training_tensors)
from ...checks import check_int
from ...models.unet import PRETRAINED_DIR, TRAIN_KIND, UNET_KIND, UNet
from ...ode.schedules import schedule_from_config
from ...plotting import image_grid
from ...sampling import sample

LOGGER = logging.getLogger(__name__)  # the default log of train_base; the command line writes beside its bar

CHECKPOINT_NAME = "checkpoint.safetensors"
MAX_SHIPPED_BYTES = 10 * 1024 * 1024
GRID_SIZE = 64
GRID_STEPS = 20
FINAL_LOSS_WINDOW = 500


class TrainingError(RuntimeError):
    """Training diverged (non-finite loss or gradient) or cannot start."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters that decide the training trajectory (``steps`` may grow on resume)."""

    steps: int = 3600
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_min: float = 1e-3
    seed: int = 0
    label_dropout: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.warmup >= 0):
            raise ValueError("lr and grad_clip must be > 0 and warmup >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 < self.t_min < 1.0:
            raise ValueError("ema_decay must lie in [0, 1) and t_min in (0, 1)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")

    def matching_part(self) -> dict:
        """Everything but ``steps``: what a resumed run must share with its checkpoint."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "steps"}


class TrainResult(NamedTuple):
    model: UNet
    ema: UNet
    losses: list[float]
    step: int


def data_fingerprint(images: Tensor, labels: Tensor | None = None) -> str:
    """SHA-256 of the training images (shape, dtype and bytes) and of the labels when given,
    to refuse resuming on other data."""
    h = hashlib.sha256(f"{tuple(images.shape)}{images.dtype}".encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(b"labels")
        h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup ``lr · min(1, (step + 1) / warmup)``, then constant."""
    return config.lr * min(1.0, (step + 1) / config.warmup) if config.warmup else config.lr


def ema_decay(config: TrainConfig, step: int) -> float:
    return min(config.ema_decay, (1.0 + step) / (10.0 + step))


def diffusion_loss(model: UNet, x0: Tensor, schedule, t_min: float, generator: torch.Generator,
                   labels: Tensor | None = None, label_dropout: float = 0.0) -> Tensor:
    """ε-MSE at ``t ~ U[t_min, 1]``: ``mean((ε_θ(α_t x_0 + σ_t z, t, y) − z)²)``, each label
    ``y`` replaced by the model's null label with probability ``label_dropout``."""
    b = x0.shape[0]
    t = t_min + (1.0 - t_min) * torch.rand(b, generator=generator, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    alpha = schedule.alpha(t).to(x0.dtype).view(b, 1, 1, 1)
    sigma = schedule.sigma(t).to(x0.dtype).view(b, 1, 1, 1)
    if labels is None:
        return (model(alpha * x0 + sigma * z, t.to(x0.dtype)) - z).square().mean()
    dropped = torch.rand(b, generator=generator) < label_dropout
    labels = torch.where(dropped, torch.full_like(labels, model.null_label), labels)
    return (model(alpha * x0 + sigma * z, t.to(x0.dtype), labels) - z).square().mean()


def _run_state(model: UNet, ema: UNet) -> dict:
    """Where :func:`training_tensors` puts this run's state (the names existing checkpoints use)."""
    return dict(modules={"model.": model, "ema.": ema}, optimizer_prefix="adam.", rng_key="rng.batches")


def train_base(
    images: Tensor,
    out_dir,
    unet_config: dict,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    ckpt_every: int = 100,
    sample_every: int = 500,
    data_info: dict | None = None,
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    labels: Tensor | None = None,
) -> TrainResult:
    """Train a :class:`UNet` on ``images`` ((N, C, H, W) in [−1, 1]), checkpointing to ``out_dir``.

    A class-conditional ``unet_config`` (``num_classes > 0``) needs ``labels``, one integer
    in ``[0, num_classes)`` per image; an unconditional one takes none.

    ``out_dir/checkpoint.safetensors`` is written every ``ckpt_every`` steps (0: never) and at the end;
    ``out_dir/samples_<step>.png`` (64 digits, DDIM 20 steps, EMA weights, fixed noise)
    every ``sample_every`` steps and at the end (0 disables them).  With ``resume`` the run
    continues from that checkpoint, whose config must match (only ``steps`` may differ);
    without it an existing checkpoint is never overwritten.  ``log(line)`` receives the
    progress lines (default: this module's ``logging`` logger at INFO).
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    log = log or LOGGER.info
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty float tensor (N, C, H, W), got {tuple(images.shape)} {images.dtype}")
    check_int("ckpt_every", ckpt_every, 0)
    check_int("sample_every", sample_every, 0)
    torch.manual_seed(config.seed)
    model = UNet.from_config(unet_config)
    check_labels(labels, images.shape[0], model.num_classes)
    schedule = model.schedule
    fingerprint = data_fingerprint(images, labels)
    match = {"kind": TRAIN_KIND, "unet": model.config(), "schedule": schedule.config(),
             "train": config.matching_part(), "data_sha256": fingerprint}

    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    commands, wall_before = [], 0.0
    if resume:
        tensors, saved = load_checkpoint(ckpt_path, expect={"kind": TRAIN_KIND})
        for key, value in match.items():
            if saved.get(key) != value:
                raise CheckpointError(f"cannot resume from {ckpt_path}: its {key} is {saved.get(key)!r}, "
                                      f"this run has {value!r}")
        losses = restore_training(tensors, ckpt_path, saved["step"], opt, generator, **_run_state(model, ema))
        commands, wall_before = list(saved.get("commands", [])), float(saved.get("wall_seconds", 0.0))
        log(f"resumed from {ckpt_path} at step {len(losses)}")
    elif ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} already exists; pass --resume to continue it or choose another --out")
    if command:
        commands.append(command)
    out_dir.mkdir(parents=True, exist_ok=True)

    start_step, session_start = len(losses), time.perf_counter()
    grid_noise = torch.randn(GRID_SIZE, *images.shape[1:], generator=torch.Generator().manual_seed(config.seed + 1))

    def checkpoint(step: int) -> None:
        meta = dict(match, step=step, steps=config.steps, data=data_info or {}, commands=commands,
                    wall_seconds=wall_before + time.perf_counter() - session_start,
                    threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version())
        save_checkpoint(ckpt_path, training_tensors(opt, generator, losses, **_run_state(model, ema)), meta)

    def sample_grid(step: int) -> Path:
        with torch.no_grad():
            x = sample(ema, grid_noise, GRID_STEPS, solver="ddim", schedule=schedule)
        return image_grid(x, out_dir / f"samples_{step:06d}.png", nrow=8)

    model.train()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 60.0, file=sys.stderr)
    smooth = None
    for step in range(start_step, config.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        idx = torch.randint(images.shape[0], (config.batch,), generator=generator)
        loss = diffusion_loss(model, images[idx], schedule, config.t_min, generator,
                              None if labels is None else labels[idx], config.label_dropout)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingError(f"loss is {loss.item()} at step {step + 1}; training stopped, "
                                f"the last good checkpoint ({ckpt_path}) is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(grad_norm):
            bar.close()
            raise TrainingError(f"gradient norm is {grad_norm.item()} at step {step + 1}; training stopped, "
                                f"the last good checkpoint ({ckpt_path}) is kept")
        opt.step()
        with torch.no_grad():
            decay = ema_decay(config, step)
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        losses.append(loss.item())
        smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
        bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        bar.update(1)
        done = step + 1
        if sample_every and (done % sample_every == 0 or done == config.steps):
            log(f"step {done}: wrote {sample_grid(done)}")
        if (ckpt_every and done % ckpt_every == 0) or done == config.steps:
            checkpoint(done)
            rate = (done - start_step) / (time.perf_counter() - session_start)
            log(f"step {done}/{config.steps} loss {smooth:.4f} ({rate:.3f} it/s) checkpoint {ckpt_path}")
    bar.close()
    if start_step == config.steps:
        log(f"{ckpt_path} is already at step {config.steps}; nothing to do")
    return TrainResult(model, ema, losses, len(losses))


def check_labels(labels: Tensor | None, count: int, num_classes: int) -> None:
    """Labels for a class-conditional model: an integer tensor ``(count,)`` in ``[0, num_classes)``;
    none for an unconditional one."""
    if not num_classes:
        if labels is not None:
            raise ValueError("the UNet config is unconditional (num_classes=0) but labels were given")
        return
    if labels is None:
        raise ValueError(f"the UNet is class-conditional (num_classes={num_classes}): pass labels, one per image")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), one per image, got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")


def final_loss(losses: list[float], window: int = FINAL_LOSS_WINDOW) -> float:
    """Mean of the last ``window`` training losses."""
    tail = losses[-window:]
    return sum(tail) / len(tail) if tail else math.nan


def export_pretrained(checkpoint, out_dir=PRETRAINED_DIR / "mnist", dtype: torch.dtype = torch.float32,
                      export_command: str | None = None) -> Path:
    """Write the shipped model from a training checkpoint: EMA weights, config, provenance, samples.

    Creates ``out_dir/unet.safetensors`` (+ ``unet.json``, the config), ``PROVENANCE.md``
    (data, steps, commands, wall time, final loss) and ``samples.png`` (64 digits, DDIM 20
    steps).  Raises :class:`CheckpointError` for a bad checkpoint and ``ValueError`` if
    the weights would exceed 10 MB (use ``dtype=torch.float16`` then).
    """
    tensors, config = load_checkpoint(checkpoint, expect={"kind": TRAIN_KIND})
    ema = UNet.from_config(config["unet"])
    load_module_tensors(ema, tensors, "ema.", checkpoint)
    weights = {k: v.to(dtype) for k, v in ema.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in weights.values())
    if size > MAX_SHIPPED_BYTES:
        raise ValueError(f"the weights take {size / 1e6:.1f} MB in {dtype}, over the 10 MB limit; export as float16")
    losses = tensors["losses"].tolist()
    params = sum(v.numel() for v in weights.values())
    train = config["train"]
    shipped = {
        "kind": UNET_KIND, "unet": config["unet"], "schedule": config["schedule"], "dtype": str(dtype).split(".")[-1],
        "data": config.get("data", {}), "data_sha256": config["data_sha256"], "steps": config["step"],
        "train": train, "final_loss": final_loss(losses), "wall_seconds": config.get("wall_seconds"),
        "commands": config.get("commands", []), "threads": config.get("threads"), "torch": config.get("torch"),
    }
    out_dir = Path(out_dir)
    path = save_checkpoint(out_dir / "unet.safetensors", weights, shipped)

    with torch.no_grad():
        noise = torch.randn(GRID_SIZE, ema.in_channels, ema.image_size, ema.image_size,
                            generator=torch.Generator().manual_seed(0))
        grid = sample(ema.eval(), noise, GRID_STEPS, solver="ddim", schedule=schedule_from_config(config["schedule"]))
    image_grid(grid, out_dir / "samples.png", nrow=8)

    data = config.get("data", {})
    hours = (config.get("wall_seconds") or 0.0) / 3600
    commands = "\n".join(config.get("commands", [])) or "(not recorded)"
    lines = [
        "# Pretrained MNIST ε-UNet: provenance",
        "",
        f"- **Weights**: `unet.safetensors`, EMA weights (decay {train['ema_decay']}) in {shipped['dtype']}, "
        f"{params:,} parameters, {size / 1e6:.2f} MB of tensors; config in `unet.json` and in the file's metadata.",
        f"- **Model**: `genie_kernels.models.unet.UNet` with {json_inline(config['unet'])}.",
        f"- **Data**: {data.get('description', 'MNIST')}: {data.get('count', '?')} training digits "
        f"(split `{data.get('split', '?')}` of `genie_kernels.mnist`, 1,000 held out), "
        f"pad {data.get('pad', '?')}, pixels scaled to [-1, 1]; read from `{data.get('source', '?')}`; "
        f"SHA-256 of the training tensor `{config['data_sha256'][:16]}…`.",
        f"- **Objective**: ε-MSE, VP schedule {json_inline(config['schedule'])}, t ~ U[{train['t_min']}, 1].",
        f"- **Training**: {config['step']} steps, batch {train['batch']}, Adam lr {train['lr']} "
        f"(linear warmup {train['warmup']} steps), grad clip {train['grad_clip']}, seed {train['seed']}"
        f"{labels_note(config['unet'], train)}.",
        f"- **Wall time**: {hours:.2f} h on {config.get('threads', '?')} CPU thread(s), torch {config.get('torch', '?')}, "
        f"Python {config.get('python', '?')}.",
        f"- **Final loss**: {shipped['final_loss']:.4f} (mean of the last {min(len(losses), FINAL_LOSS_WINDOW)} steps).",
        "- **Samples**: `samples.png`, 64 digits with DDIM, 20 steps, fixed noise (seed 0).",
        "",
        "Training command(s), in order (a resume repeats the command with `--resume`):",
        "",
        "```",
        commands,
        "```",
        "",
        "Exported with:",
        "",
        "```",
        export_command or "genie_kernels.train_base.export_pretrained(...)",
        "```",
        "",
    ]
    (out_dir / "PROVENANCE.md").write_text("\n".join(lines))
    return path


def labels_note(unet_config: dict, train: dict) -> str:
    if not unet_config.get("num_classes"):
        return ""
    return (f", conditioned on the {unet_config['num_classes']} digit labels with label dropout "
            f"{train.get('label_dropout', 0.0)} (the null label is label {unet_config['num_classes']})")


def json_inline(d: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in d.items())
