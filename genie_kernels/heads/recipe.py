"""The distillation's settings: their checks, the learning-rate schedules, the output path.

Learning rate of (1-based) step s of ``steps``:

    constant   lr
    cosine     lr · ½(1 + cos(π (s−1)/steps))      (reaches 0 at s = steps + 1)
    linear     lr · (1 − (s−1)/steps)               (the published GENIE recipe's decay)

Head inputs during training (``head_eps``): the head takes ε beside x_t and the network's
features.  ``"model"`` gives it the network's ε(x_t, t), what it sees when sampling;
``"noise"`` gives it the noise z that made ``x_t = α_t x_0 + σ_t z``, as the published
GENIE training code does.  Validation always uses the network's ε.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, read_config, unwritable_reason
from ..checks import check_int, check_number, check_seed

LR_SCHEDULES = ("constant", "cosine", "linear")
HEAD_EPS = ("model", "noise")


def learning_rate(lr: float, lr_schedule: str, step: int, steps: int) -> float:
    """The learning rate of (1-based) ``step`` under ``lr_schedule`` (module docstring)."""
    if lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
    if lr_schedule == "linear":
        return lr * (1.0 - (step - 1) / steps)
    return lr


def check_settings(*, steps, batch_size, lr, lr_schedule, grad_clip, t_eps, ema_decay, checkpoint_every,
                   validate_every, val_size, val_buckets, out, resume, world, time_limit, head_eps="model",
                   seed=0) -> None:
    """Raise a ValueError naming the first bad setting of :func:`~genie_kernels.heads.distill.distill`."""
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("checkpoint_every", checkpoint_every, 0),
                             ("validate_every", validate_every, 0), ("val_size", val_size, 0),
                             ("val_buckets", val_buckets, 1)):
        check_int(name, value, low)
    check_seed("seed", seed)
    check_number("lr", lr, above=0.0)  # a numpy float too: it is stored as float(lr)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
    if head_eps not in HEAD_EPS:
        raise ValueError(f"unknown head_eps {head_eps!r}; choose one of {HEAD_EPS}")
    if not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise ValueError(f"grad_clip must be a positive number, got {grad_clip!r}")
    if not (isinstance(t_eps, (int, float)) and 0.0 < t_eps < 1.0):
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps!r}")
    if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
    if checkpoint_every and out is None:
        raise ValueError("checkpoint_every needs an output path (out=...)")
    if resume and out is None:
        raise ValueError("resume=True needs the checkpoint path (out=...)")
    if out is not None and Path(out).suffix != ".safetensors":
        raise ValueError(f"the checkpoint path must end in .safetensors, got {out}")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")


def check_new_output(out, resume: bool, *, resume_option: str = "resume=True") -> None:
    """Refuse to train over an existing checkpoint unless resuming it; ``resume_option`` is
    how the caller spells the way to resume (the command line says ``--resume``)."""
    if out is not None and Path(out).exists() and not resume:
        raise FileExistsError(f"{out} exists; pass {resume_option} to continue that run, or choose another path")
    problem = None if out is None else unwritable_reason(out)
    if problem:
        raise ValueError(f"out: cannot write {out}: {problem}")


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """``flag`` or-ed over the DDP ranks, so that they all stop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def kept_checkpoint(path: Path | None) -> str:
    """Where the last good checkpoint is, for error messages."""
    if path is None or not path.exists():
        return "no checkpoint was written"
    try:
        step = int(read_config(path)["step"])
    except (CheckpointError, KeyError, ValueError):
        step = "unknown"
    return f"the last good checkpoint (step {step}) is kept at {path}"
