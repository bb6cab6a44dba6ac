"""Distillation of the curvature head: teach k_ψ the exact dε/dγ of a frozen ε-network.

Each step draws a batch from the training data and noise levels, and regresses the
head onto the exact derivative (forward-mode AD through the frozen network, see
:mod:`.derivative`):

    t ~ U[t_eps, 1],   z ~ N(0, I),   x_t = α_t x_0 + σ_t z,   γ = σ_t / α_t,
    loss = mean over the batch of  γ² · Σ_pixels (k_ψ(x_t, ε, features, temb, γ) − dε/dγ)².

Adam with gradient-norm clipping and an optional exponential moving average (EMA)
of the weights.  Periodically the head is validated on held-out samples: the relative
L2 error ``‖k_ψ − dε/dγ‖ / ‖dε/dγ‖`` per bucket of t.

Checkpoints (:func:`genie_kernels.checkpoint.save_checkpoint`, atomic; format in
:mod:`.files`) hold the head,
its EMA, Adam's state, the random generator's state and the loss history; their config
holds the head's hyper-parameters, the schedule, the base model's identity and the
training settings.  ``resume=True`` continues from the checkpoint and reproduces the
uninterrupted run exactly: every random draw comes from one generator whose state is
saved.

Conditional models (``cond=``, one condition per training sample): each step's samples
carry their own conditions, replaced by the model's null condition with probability
``cond_drop``, so that one head serves both halves of classifier-free guidance
(:mod:`genie_kernels.ode.guidance`); validation reports both, on held-out samples with
their conditions and with the null condition.  A non-finite loss stops the run with :class:`NonFiniteLossError`, naming the
step; the last checkpoint written before it stays as it was.

Data parallel: inside a ``torch.distributed`` process group (``torchrun``; gloo on the
CPU, NCCL on GPUs) the head is wrapped in DistributedDataParallel.  Every rank draws
the same *global* batch from the same generator and keeps its own slice of it, so with
W processes each computes the targets of ``batch_size / W`` samples, and the averaged
gradient equals that of one process on the whole batch.  Rank 0 validates and writes
the checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, read_config, restore_training, save_checkpoint, training_tensors
from ..ode.derivative import exact_deps_dgamma
from ..ode.guidance import GuidedModel
from ..ode.protocol import as_model
from ..ode.schedules import VPSchedule, schedule_of
from .cost import head_cost
from .data import (check_conditions, data_sampler, format_validation, hold_out, noisy_batch, noisy_conditional_batch,
                   paired_sampler, probe_model, relative_errors, validation_set, weighted_loss)
from .storage import FORMAT, model_identity, stored_cost
from .recipe import LR_SCHEDULES, any_rank, check_new_output, check_settings, kept_checkpoint, learning_rate

LOGGER = logging.getLogger(__name__)  # where validation reports go without a bar or a log function

__all__ = ["LR_SCHEDULES", "DistillResult", "NonFiniteLossError", "check_new_output", "distill"]


class NonFiniteLossError(FloatingPointError):
    """The distillation loss became NaN or infinite."""


class DistillResult(NamedTuple):
    head: nn.Module          # the head to sample with: the EMA copy if ema_decay > 0
    losses: list             # loss of every step from step 1 (also those before a resume)
    validation: list         # [{"step", "buckets": [{"t_min", "t_max", "rel_err"} (+ "condition" with cond=)]}] (rank 0)
    step: int                # steps completed


def _run_state(head: nn.Module, ema_head: nn.Module | None) -> dict:
    """Where :func:`~genie_kernels.checkpoint.training_tensors` puts a distillation's state
    (the names existing checkpoints use)."""
    modules = {"head.": head} if ema_head is None else {"head.": head, "ema.": ema_head}
    return dict(modules=modules, optimizer_prefix="optim.", rng_key="rng")


def distill(
    model,
    head: nn.Module,
    data,
    schedule: VPSchedule | None = None,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    grad_clip: float = 1.0,
    t_eps: float = 1e-3,
    ema_decay: float = 0.0,
    seed: int = 0,
    out=None,
    checkpoint_every: int = 0,
    resume: bool = False,
    validate_every: int = 0,
    val_size: int = 64,
    val_buckets: int = 5,
    progress: bool = True,
    callback: Optional[Callable[[int, float], None]] = None,
    time_limit: float | None = None,
    cond=None,
    cond_drop: float = 0.1,
    head_eps: str = "model",
    log: Optional[Callable[[str], None]] = None,
) -> DistillResult:
    """Distil ``head`` onto the exact dε/dγ of the frozen ``model`` (see the module docstring).

    Args:
        model: ε-network (an :class:`~genie_kernels.ode.protocol.EpsModel` adapter or ``eps_fn``);
            never updated.
        head: the head to train, in place (its parameters' dtype and device are used).
        data: training data x_0 — a tensor ``(N, ...)``, an object with ``sample_data``,
            or ``fn(n, generator)``.  From a tensor the last ``val_size`` rows are held out.
        schedule: noise schedule; default ``model.schedule`` if it has one, else linear VP.
        steps: total optimizer steps (when resuming, the run continues up to this count).
        batch_size: global batch (split evenly across DDP processes).
        lr, grad_clip: Adam learning rate and gradient-norm clip (the published CIFAR-10
            recipe: lr 5e-5, clip 1, batch 16, 20k steps, one residual block, nf 128).
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` (decays to 0 at step
            ``steps + 1``; formulas in :mod:`.recipe`); a decaying schedule makes ``steps``
            part of the run's configuration.
        t_eps: smallest training time.
        ema_decay: EMA decay of the weights (0: no EMA).
        seed: seed of the one generator behind every training draw.
        out: checkpoint path (``.safetensors``), written every ``checkpoint_every`` steps
            and at the end.
        resume: continue from ``out`` if it exists (it must come from the same
            configuration).  Without ``resume`` an existing ``out`` is an error.
        validate_every: validate every so many steps (0: only at the end).
        val_size, val_buckets: held-out samples per t-bucket and number of buckets
            (``val_size=0``: no validation).
        progress: show a progress bar with the loss and the speed (rank 0).
        log: where the validation reports and the time-limit notice go (rank 0): this
            function, else beside the progress bar, else this module's logger at INFO.
        callback: ``callback(step, loss)`` after every step.
        time_limit: stop after this many seconds of training (checked after each step);
            the run then ends as if ``steps`` were reached — validation, the head's cost,
            the checkpoint — and ``resume=True`` continues it later.  With the cosine
            schedule the learning rate is where step ``s`` of ``steps`` puts it.
        cond: for a conditional model, one condition per row of the tensor ``data`` (class
            labels of shape (N,), embeddings (N, ...)); the last ``val_size`` are held out
            with their rows.  None: unconditional distillation, as before.
        cond_drop: probability with which a training sample's condition is replaced by the
            model's null condition (:meth:`EpsModel.null_cond`), so that the head learns the
            unconditional half of guidance too; validation then also reports the held-out
            samples under the null condition (rows with ``"condition"``).
        head_eps: the ε the head takes during training: ``"model"`` (the network's
            prediction, as when sampling) or ``"noise"`` (the noise that made x_t, as the
            published GENIE code trains; see :mod:`.recipe`).  Validation uses the network's.

    Returns:
        :class:`DistillResult`.  At the end the head's cost relative to one network call is
        measured (on a validation batch, or without validation on a batch of ``batch_size``)
        and stored as ``head.cost`` (a :class:`~genie_kernels.cost.RelativeCost`, FLOP and
        time ratios) and in the checkpoint, from which a resume restores it.  It is
        reported beside genie's NFE, not counted in it.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    check_settings(steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, grad_clip=grad_clip,
                    t_eps=t_eps, ema_decay=ema_decay, checkpoint_every=checkpoint_every, validate_every=validate_every,
                    val_size=val_size, val_buckets=val_buckets, out=out, resume=resume, world=world,
                    time_limit=time_limit, head_eps=head_eps, seed=seed)
    if not isinstance(head, nn.Module) or not hasattr(head, "config"):
        raise TypeError(f"head must be a head module with config(), got {type(head).__name__}")
    model = as_model(model)
    schedule = schedule_of(model, schedule)
    out = Path(out) if out is not None else None
    check_new_output(out, resume)

    param = next(head.parameters())
    dtype, device = param.dtype, param.device
    conditions = check_conditions(model, data, cond, cond_drop, val_size)
    if conditions is not None:
        cond, val_cond, null = conditions
        data, val_data = data[: data.shape[0] - val_size], data[data.shape[0] - val_size:]
        sample_pair = paired_sampler(data, cond)
    else:
        data, val_data = hold_out(data, val_size)
    sample_x0 = data_sampler(data)
    cond_model = model if conditions is None else GuidedModel(model, cond[:1], 2, device)
    probe, probe_out = probe_model(cond_model, sample_x0, dtype, device)
    if hasattr(head, "check_inputs"):
        head.check_inputs(probe, probe_out)

    training = {"batch_size": batch_size, "lr": float(lr), "grad_clip": float(grad_clip), "t_eps": float(t_eps),
                "ema_decay": float(ema_decay), "seed": seed, "dtype": str(dtype).replace("torch.", ""),
                "val_size": val_size, "val_buckets": val_buckets, "lr_schedule": lr_schedule}
    if lr_schedule != "constant":
        training["steps"] = steps
    if head_eps != "model":
        training["head_eps"] = head_eps
    if conditions is not None:
        training["cond_drop"] = float(cond_drop)
    expect = {"format": FORMAT, "head": head.config(), "schedule": schedule.config(),
              "base_model": model_identity(model), "training": training}

    params = [p for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    ema_head = copy.deepcopy(head).requires_grad_(False) if ema_decay else None
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    validation: list[dict] = []
    cost_record: dict | None = None  # head.cost as the checkpoint stores it, with the batch and device measured at
    start = 0

    if resume and out is not None and out.exists():
        stored = read_config(out).get("base_model")
        if isinstance(stored, dict) and "sha256" in stored and stored.items() <= expect["base_model"].items():
            expect["base_model"] = stored  # written before the rounded digests: the same exact weights
        tensors, config = load_checkpoint(out, expect=expect)
        start = int(config["step"])
        losses = restore_training(tensors, out, start, optimizer, gen, **_run_state(head, ema_head))
        validation = list(config.get("validation", []))
        head.cost = stored_cost(config, out)  # measured when that run finished
        if ema_head is not None:
            ema_head.cost = head.cost
        if head.cost is not None:
            cost_record = config.get("cost") or head.cost.config()

    def save(step: int) -> None:
        if out is None or rank != 0:
            return
        tensors = training_tensors(optimizer, gen, losses, **_run_state(head, ema_head))
        config = dict(expect, step=step, ema=ema_head is not None, validation=validation, cost=cost_record)
        save_checkpoint(out, tensors, config)

    val_buckets_data = None
    if val_size and rank == 0 and conditions is None:
        val_buckets_data = validation_set(model, val_data, schedule, val_size, val_buckets, t_eps,
                                          seed=seed + 1, dtype=dtype, device=device)
    elif val_size and rank == 0:
        val_sets = {name: validation_set(model, val_data, schedule, val_size, val_buckets, t_eps, seed=seed + 1,
                                         dtype=dtype, device=device, cond=c)
                    for name, c in (("conditional", val_cond), ("unconditional", null.expand_as(val_cond)))
                    if c is not None}
        val_buckets_data = val_sets["conditional"]

    def report(text: str, bar) -> None:
        if log is not None:
            log(text)
        elif progress:
            bar.write(text)
        else:
            LOGGER.info(text)

    def validate(step: int, bar) -> None:
        if val_buckets_data is None:
            return
        final = ema_head if ema_head is not None else head
        was_training = final.training
        if conditions is None:
            rows = relative_errors(final.eval(), val_buckets_data)
        else:
            rows = [dict(row, condition=name) for name, buckets in val_sets.items()
                    for row in relative_errors(final.eval(), buckets)]
        final.train(was_training)
        validation.append({"step": step, "buckets": rows})
        report(format_validation(step, rows), bar)

    def measure_cost() -> None:
        """Set ``head.cost`` to the head's cost relative to one network call (rank 0), on the
        first validation bucket or, without validation, on a batch of its own."""
        nonlocal cost_record
        if rank != 0:
            return
        if val_buckets_data is not None:
            x, gamma = val_buckets_data[0].x, val_buckets_data[0].gamma
        else:  # its own generator: the training draws stay as they were
            x, gamma, _, _ = noisy_batch(sample_x0, torch.Generator().manual_seed(seed + 2), batch_size, schedule,
                                         t_eps, 1.0)
            x, gamma = x.to(device, dtype), gamma.to(device)
        t = schedule.t_from_gamma(gamma.to(torch.float64)).to(x.dtype)
        final = ema_head if ema_head is not None else head
        cost_model = model if conditions is None else GuidedModel(model, cond[:1], x.shape[0], device)
        head.cost = final.cost = head_cost(final, cost_model, x, t)
        cost_record = dict(head.cost.config(), batch=x.shape[0], device=str(device))

    train_head = head
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_head = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    last = start
    head.train()
    bar = tqdm(total=steps, initial=start, desc="distill", unit="it", disable=not progress or rank != 0)
    try:
        for step in range(start + 1, steps + 1):
            step_model = model
            if conditions is None:
                x_t, gamma, noise, _ = noisy_batch(sample_x0, gen, batch_size, schedule, t_eps, 1.0)
            else:
                x_t, gamma, noise, c = noisy_conditional_batch(sample_pair, gen, batch_size, schedule, t_eps, 1.0,
                                                               null, cond_drop)
                step_model = GuidedModel(model, c[local], c[local].shape[0], device)
            x_t, gamma = x_t[local].to(device, dtype), gamma[local].to(device)
            with torch.no_grad():
                model_out, target = exact_deps_dgamma(step_model, x_t, gamma, schedule)
            if head_eps == "noise":
                model_out = model_out._replace(eps=noise[local].to(device, dtype))
            loss = weighted_loss(train_head(x_t, model_out, gamma), target, gamma)
            global_loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(global_loss)
                global_loss /= world
            value = float(global_loss)
            if not math.isfinite(value):
                raise NonFiniteLossError(f"distillation loss is {value} at step {step}; stopped, {kept_checkpoint(out)}")
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, lr_schedule, step, steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {step}; stopped, {kept_checkpoint(out)}")
            optimizer.step()
            if ema_head is not None:
                with torch.no_grad():
                    for e, p in zip(ema_head.parameters(), params):
                        e.mul_(ema_decay).add_(p, alpha=1.0 - ema_decay)
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            if validate_every and step % validate_every == 0 and step != steps:
                validate(step, bar)
            if checkpoint_every and step % checkpoint_every == 0 and step != steps:
                save(step)
            if callback is not None:
                callback(step, value)
            last = step
            if deadline is not None and step != steps and any_rank(time.monotonic() > deadline, device, world):
                report(f"time limit of {time_limit:.0f} s reached at step {step}; resume to continue", bar)
                break
        if start < last:
            validate(last, bar)
            measure_cost()
            save(last)
    finally:
        bar.close()
    if world > 1:
        dist.barrier()
    final = ema_head if ema_head is not None else head
    final.base_model = expect["base_model"]  # what save_pretrained records
    return DistillResult(final.eval(), losses, validation, last)
