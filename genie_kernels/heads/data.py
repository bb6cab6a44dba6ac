"""What the distillation trains and validates on.

Training data x_0 as a draw function (:func:`data_sampler`), the held-out split
(:func:`hold_out`), noisy inputs ``x_t = α_t x_0 + σ_t z`` with their γ
(:func:`noisy_batch`), the γ²-weighted loss (:func:`weighted_loss`), and the validation
buckets: held-out ``(x_t, model output, γ, exact dε/dγ)`` per interval of t, and the head's
relative error on them (:func:`relative_errors`).

For a conditional model the data come with one condition per sample
(:func:`paired_sampler`); :func:`noisy_conditional_batch` drops conditions to the null
condition with a given probability, so that one head learns both halves of guidance.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..ode.derivative import exact_deps_dgamma
from ..ode.guidance import GuidedModel
from ..ode.protocol import ModelOutput, as_model, checked_call
from ..ode.schedules import VPSchedule


Sampler = Callable[[int, torch.Generator], Tensor]


def data_sampler(data) -> Sampler:
    """``data`` as a function ``(n, generator) -> x_0``.

    Accepts a tensor of training samples ``(N, ...)`` (drawn with replacement), an object
    with ``sample_data(n, generator)`` (e.g. a :class:`~genie_kernels.models.mixture.GaussianMixture`)
    or such a function itself.
    """
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] < 1:
            raise ValueError(f"training data must be shaped (N, ...) with N >= 1, got {tuple(data.shape)}")
        if not data.is_floating_point():
            raise TypeError(f"training data must be floating point, got {data.dtype}")
        if not torch.isfinite(data).all():
            raise ValueError("training data contains NaN or inf")
        return lambda n, gen: data[torch.randint(data.shape[0], (n,), generator=gen).to(data.device)]
    if hasattr(data, "sample_data"):
        return data.sample_data
    if callable(data):
        return data
    raise TypeError(f"data must be a tensor, have sample_data(n, generator), or be callable, got {type(data).__name__}")


def paired_sampler(data: Tensor, cond: Tensor, replace: bool = True) -> Callable[[int, torch.Generator], tuple]:
    """``(n, generator) -> (x_0, cond)``: rows of ``data`` with their conditions, drawn with
    replacement (or without, ``replace=False``)."""
    if cond.shape[0] != data.shape[0]:
        raise ValueError(f"cond must have one row per training sample ({data.shape[0]}), got {tuple(cond.shape)}")

    def draw(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if replace:
            idx = torch.randint(data.shape[0], (n,), generator=gen)
        else:
            idx = torch.randperm(data.shape[0], generator=gen)[:n]
        return data[idx.to(data.device)], cond[idx.to(cond.device)]

    return draw


def check_conditions(model, data, cond, cond_drop, val_size: int):
    """``(training conditions, held-out conditions or None, null condition (1, ...) or None)``
    for ``distill(cond=...)``, checked against the model before any work; None without ``cond``."""
    if isinstance(cond_drop, bool) or not isinstance(cond_drop, (int, float)) or not 0.0 <= cond_drop <= 1.0:
        raise ValueError(f"cond_drop must be a probability in [0, 1], got {cond_drop!r}")
    if cond is None:
        return None
    if not isinstance(data, Tensor):
        raise TypeError(f"distill(cond=...) needs the training data as a tensor (N, ...) with one condition per row, "
                        f"got {type(data).__name__}")
    if not isinstance(cond, Tensor) or cond.dim() == 0 or cond.shape[0] != data.shape[0]:
        shape = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"cond must be a tensor with one condition per training sample ({data.shape[0]}), got {shape}")
    if not model.conditional:
        raise ValueError(f"{type(model).__name__} is unconditional: it takes no condition (cond=None)")
    if data.shape[0] <= val_size:
        raise ValueError(f"{data.shape[0]} training samples cannot spare {val_size} for validation")
    model.check_cond(cond, cond.shape[0], cond.device)  # labels in range, embedding shapes
    null = model.null_cond(1, cond.device).to(cond.dtype) if cond_drop or val_size else None
    split = cond.shape[0] - val_size
    return cond[:split], (cond[split:] if val_size else None), null


def noisy_conditional_batch(sample_pair, gen: torch.Generator, batch: int, schedule: VPSchedule, t_min: float,
                            t_max: float, null: Tensor | None = None, drop: float = 0.0) -> NoisyBatch:
    """:func:`noisy_batch` with each sample's condition (``cond``), replaced by
    ``null`` (one null condition, shape (1, ...)) with probability ``drop``; the drop mask is
    drawn from ``gen`` after the rest."""
    drawn = []

    def x0_only(n: int, g: torch.Generator) -> Tensor:
        x0, cond = sample_pair(n, g)
        drawn.append(cond)
        return x0

    draw = noisy_batch(x0_only, gen, batch, schedule, t_min, t_max)
    cond = drawn[0]
    if drop:
        dropped = (torch.rand(batch, generator=gen, dtype=torch.float64) < drop).to(cond.device)
        cond = torch.where(dropped.view(-1, *([1] * (cond.dim() - 1))), null.to(cond.device, cond.dtype), cond)
    return draw._replace(cond=cond)


def hold_out(data, val_size: int):
    """``(training data, validation data)``: from a tensor its last ``val_size`` rows are held
    out (validation draws them without replacement); other data serves both."""
    if not isinstance(data, Tensor) or not val_size:
        return data, data
    if data.shape[0] <= val_size:
        raise ValueError(f"{data.shape[0]} training samples cannot spare {val_size} for validation")
    held_out = data[-val_size:]

    def draw_held_out(n: int, gen: torch.Generator) -> Tensor:
        return held_out[torch.randperm(held_out.shape[0], generator=gen)[:n].to(held_out.device)]

    return data[:-val_size], draw_held_out


def probe_model(model, sample_x0: Sampler, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ModelOutput]:
    """Two training samples and the model's output on them at t = 0.5, drawn with their own
    generator (the training draws are unchanged): data the model cannot take is named here,
    before any checkpoint, instead of failing inside the first step."""
    x0 = sample_x0(2, torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.full((2,), 0.5, dtype=dtype, device=device)
    try:
        with torch.no_grad():
            return x0, checked_call(model, x0, t)
    except (RuntimeError, ValueError) as err:  # a network's shape error, or a model's own check
        raise ValueError(f"the model cannot take the training data (samples shaped {tuple(x0.shape[1:])}): "
                         f"{str(err).splitlines()[0]}") from err


class NoisyBatch(NamedTuple):
    """One draw of noisy training inputs: ``x = α_t x_0 + σ_t noise`` at ``γ = σ_t / α_t``
    (float64), with the samples' conditions (``None`` for an unconditional draw)."""
    x: Tensor
    gamma: Tensor
    noise: Tensor
    cond: Tensor | None = None


def noisy_batch(sample_x0: Sampler, gen: torch.Generator, batch: int, schedule: VPSchedule,
                t_min: float, t_max: float) -> NoisyBatch:
    """``x_t`` with ``t ~ U[t_min, t_max]`` and ``z ~ N(0, I)``, all drawn from ``gen``."""
    x0 = sample_x0(batch, gen).to("cpu", torch.float64)
    t = t_min + (t_max - t_min) * torch.rand(batch, generator=gen, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x_t = schedule.alpha(t).view(shape) * x0 + schedule.sigma(t).view(shape) * z
    return NoisyBatch(x_t, schedule.gamma(t), z)


def weighted_loss(pred: Tensor, target: Tensor, gamma: Tensor) -> Tensor:
    """``mean_b γ_b² Σ_pixels (pred − target)²``."""
    g2 = gamma.to(pred.dtype).square()
    return (g2 * (pred - target).square().reshape(pred.shape[0], -1).sum(1)).mean()


class ValidationBucket(NamedTuple):
    t_min: float
    t_max: float
    x: Tensor
    out: object   # ModelOutput
    gamma: Tensor
    target: Tensor


def validation_set(model, data, schedule: VPSchedule, size: int = 64, buckets: int = 5, t_eps: float = 1e-3,
                   seed: int = 0, dtype=torch.float32, device="cpu", cond: Tensor | None = None) -> list[ValidationBucket]:
    """Held-out ``(x_t, model output, γ, exact dε/dγ)`` for ``buckets`` equal intervals of t in [t_eps, 1].

    With ``cond`` (one condition per row of the tensor ``data``) each sample is
    conditioned on its own; its rows are drawn without replacement."""
    model = as_model(model)
    sample = data_sampler(data) if cond is None else paired_sampler(data, cond, replace=False)
    gen = torch.Generator().manual_seed(seed)
    edges = torch.linspace(t_eps, 1.0, buckets + 1, dtype=torch.float64).tolist()
    result = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        bucket_model = model
        if cond is None:
            x, gamma, _, _ = noisy_batch(sample, gen, size, schedule, lo, hi)
        else:
            x, gamma, _, c = noisy_conditional_batch(sample, gen, size, schedule, lo, hi)
            bucket_model = GuidedModel(model, c, x.shape[0], device)
        x = x.to(device, dtype)
        with torch.no_grad():
            out, target = exact_deps_dgamma(bucket_model, x, gamma.to(device), schedule)
        result.append(ValidationBucket(lo, hi, x, out, gamma.to(device), target))
    return result


@torch.no_grad()
def relative_errors(head, buckets: list[ValidationBucket]) -> list[dict]:
    """Per bucket, ``sqrt(Σ ‖k_ψ − dε/dγ‖² / Σ ‖dε/dγ‖²)`` over its samples."""
    rows = []
    for b in buckets:
        pred = head(b.x, b.out, b.gamma).to(torch.float64)
        target = b.target.to(torch.float64)
        err = float((pred - target).square().sum().sqrt() / target.square().sum().sqrt().clamp_min(1e-300))
        rows.append({"t_min": b.t_min, "t_max": b.t_max, "rel_err": err})
    return rows


def format_validation(step: int, rows: list[dict]) -> str:
    cells = "  ".join(f"{r['condition'] + ' ' if 'condition' in r else ''}t∈[{r['t_min']:.3f},{r['t_max']:.3f}]: "
                      f"{r['rel_err']:.4f}" for r in rows)
    return f"step {step} relative error of dε/dγ  {cells}"
