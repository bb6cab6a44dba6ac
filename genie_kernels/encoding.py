"""Encoding data into noise with the DDIM ODE, and spherical interpolation between encodings.

The ODE ``dx̄/dγ = ε(x, t)`` is deterministic, so it maps data to noise as well as noise to
data: :func:`encode` integrates it forwards, from ``t_end`` up to ``t = 1``, on the same
grid :func:`~genie_kernels.sample` uses, taken in reverse.  The solvers of
:mod:`genie_kernels.ode.solvers` take an increasing grid for this (their steps
``h_n = γ_{n+1} − γ_n`` are then positive; the Taylor updates of ``StepRule`` hold in either
direction), so ``sample(model, encode(model, x0, N, **s), N, **s)`` gives ``x0`` back up to
the solver's error in both directions.  :func:`slerp` interpolates between two encodings
along the sphere, where Gaussian noise lives.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .checks import check_bool, check_noise, check_number, names_out_of_memory
from .ode import solvers
from .ode.guidance import check_guidance_options
from .ode.schedules import DEFAULT_STRIDING, STRIDINGS, VPSchedule, check_steps, check_t_end, schedule_of, time_grid
from .ode.solvers import HEAD_SOLVERS, check_model_and_head
from .sampling import DEFAULT_T_END, ProgressBar

DEFAULT_ENCODE_SOLVER = "ab3"


@names_out_of_memory
def encode(
    model,
    x0: Tensor,
    steps: int | None = None,
    *,
    timesteps=None,
    solver: str = DEFAULT_ENCODE_SOLVER,
    head=None,
    t_end: float = DEFAULT_T_END,
    striding: str = DEFAULT_STRIDING,
    schedule: VPSchedule | None = None,
    cond=None,
    callback=None,
    return_nfe: bool = False,
    progress: bool = False,
):
    """Encode data into noise: solve the DDIM ODE forwards, from ``t_end`` up to ``t = 1``.

    The grid is :func:`~genie_kernels.time_grid`'s for the same ``steps``, ``t_end`` and
    ``striding``, in increasing order, ``t_end = t_N < … < t_0 = 1``, and the solver steps
    ``x̄ ← x̄ + h ε + …`` with ``h = γ_{n−1} − γ_n > 0``.  :func:`~genie_kernels.sample` with
    the same settings goes back down the same grid, so::

        z = gk.encode(model, x0, 100, solver="ab3")
        x = gk.sample(model, z, 100, solver="ab3")      # x ≈ x0

    Args:
        model: an ε-function ``eps_fn(x, t)`` or an :class:`~genie_kernels.EpsModel` adapter.
        x0: the data, shaped ``(B, ...)``, taken as the state at ``t_end``.
        steps: number of solver steps; or give ``timesteps`` instead.
        timesteps: the whole grid instead of ``steps``, ``striding`` and ``t_end``: a strictly
            *increasing* sequence of continuous times in (0, 1] (the reverse of a grid
            :func:`~genie_kernels.sample` takes).
        solver: ``"ab3"`` (default), ``"ab2"``, ``"ddim"``, ``"genie_exact"`` or ``"genie"``
            (with ``head``).
        head: the distilled derivative head for ``solver="genie"``.
        t_end: the time the data sits at, in (0, 1).
        striding: ``"quadratic"`` (default), ``"logsnr"``, ``"uniform"`` or ``"karras"``.
        schedule: noise schedule; ``None`` is the model's own, else the linear VP schedule.
        cond: the condition of a conditional model (class labels, embeddings); None:
            unconditional.  Decode with the same ``cond``.
        callback: called after every step with ``{"i", "t", "x", "eps"}``.
        return_nfe: also return the number of network evaluations.
        progress: show a tqdm progress bar of the steps (off by default).

    Returns:
        the encoding ``x(t = 1)`` shaped like ``x0``; with ``return_nfe`` a
        :class:`~genie_kernels.SolverOutput` ``(encoding, nfe)``.
    """
    check_noise(x0)
    check_bool("return_nfe", return_nfe)
    check_bool("progress", progress)
    if (steps is None) == (timesteps is None):
        raise ValueError("encode: give either steps (with striding and t_end) or timesteps (the whole increasing "
                         f"grid), {'not both' if steps is not None else 'got neither'}")
    if striding not in STRIDINGS:
        raise ValueError(f"unknown striding {striding!r}; choose one of {STRIDINGS}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(info), got {type(callback).__name__}")
    check_model_and_head(model, solver, head)
    schedule = schedule_of(model, schedule)
    if timesteps is None:
        check_steps(steps)
        check_t_end(t_end)
        ts = time_grid(schedule, steps, t_end, striding).flip(0)
    else:
        if t_end != DEFAULT_T_END or striding != DEFAULT_STRIDING:
            raise ValueError("timesteps= is the whole time grid: do not also pass t_end or striding")
        ts = increasing_grid(timesteps)
    guidance = check_guidance_options(cond, 1.0, None, None)
    extra = {"head": head} if solver in HEAD_SOLVERS else {}
    if guidance is not None:
        extra["guidance"] = guidance
    with torch.no_grad(), ProgressBar(progress, ts.numel() - 1, "encode") as bar:  # jvp needs no autograd
        out = solvers.SOLVERS[solver](model, x0, ts, schedule, **extra, callback=bar.wrap(callback))
    return out if return_nfe else out.sample


def increasing_grid(timesteps) -> Tensor:
    """``timesteps`` as a float64 grid, checked to increase strictly within (0, 1]."""
    if isinstance(timesteps, Tensor):
        if not timesteps.is_floating_point() or timesteps.dim() != 1:
            raise ValueError(f"encode: timesteps must be a 1-D floating tensor of continuous times in (0, 1], got "
                             f"{timesteps.dtype} of shape {tuple(timesteps.shape)}")
        values = timesteps.detach().cpu().to(torch.float64)
    else:
        try:
            items = list(timesteps)
        except TypeError:
            raise TypeError(f"encode: timesteps must be a sequence of times, got {type(timesteps).__name__}") from None
        values = torch.tensor([check_number("timesteps[i]", v) for v in items], dtype=torch.float64)
    if values.numel() < 2 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"encode: timesteps must hold at least 2 finite times, got {values.tolist()}")
    if not bool((values[1:] > values[:-1]).all()):
        raise ValueError(f"encode: timesteps must increase strictly, from the data towards the noise (t = 1); got "
                         f"{values.tolist()} (a decreasing grid is sample()'s direction)")
    if not (float(values[0]) > 0.0 and float(values[-1]) <= 1.0):
        raise ValueError(f"encode: timesteps must lie in (0, 1], got {values.tolist()}")
    return values


PARALLEL_COSINE = 1.0 - 1e-12  # above this the angle is too small for sin θ: slerp is lerp there


def slerp(z0: Tensor, z1: Tensor, alpha) -> Tensor:
    """Spherical linear interpolation between two batches of encodings, per sample.

    With ``θ`` the angle between samples ``z0[b]`` and ``z1[b]`` (flattened),
    ``cos θ = ⟨z0, z1⟩ / (‖z0‖ ‖z1‖)``:

        slerp(z0, z1; α) = sin((1 − α) θ) / sin θ · z0 + sin(α θ) / sin θ · z1,

    which runs along the great circle from ``z0`` (α = 0) to ``z1`` (α = 1).  For two
    vectors of equal norm its norm stays that norm; independent Gaussian noise in many
    dimensions has nearly equal norms ``≈ √d`` and nearly orthogonal directions, so the
    interpolants look like noise of the same scale, where a straight line
    ``(1 − α) z0 + α z1`` would shrink towards ``√(d/2)`` at α = ½.  Parallel samples
    (θ ≈ 0, where ``sin θ`` vanishes) take the limit of the formula, the straight line;
    opposite ones (θ = π) have no single great circle and are refused.

    Args:
        z0, z1: tensors of the same shape ``(B, ...)`` and floating dtype.
        alpha: a number in [0, 1], or a tensor of one per sample, shape (B,).

    Returns:
        the interpolants, shaped and typed like ``z0`` (computed in float64 at least).
    """
    for name, z in (("z0", z0), ("z1", z1)):
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1:
            raise TypeError(f"slerp: {name} must be a floating tensor shaped (B, ...), got "
                            f"{getattr(z, 'dtype', type(z).__name__)}")
    if z0.shape != z1.shape:
        raise ValueError(f"slerp: z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    wide = torch.promote_types(z0.dtype, torch.float64)
    a, b = z0.reshape(z0.shape[0], -1).to(wide), z1.reshape(z1.shape[0], -1).to(wide)
    alpha = _alphas(alpha, z0.shape[0], wide, z0.device)
    norms = a.norm(dim=1) * b.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("slerp: a sample of z0 or z1 is zero, which has no direction")
    cos = ((a * b).sum(dim=1) / norms).clamp(-1.0, 1.0)
    if bool((cos <= -PARALLEL_COSINE).any()):
        raise ValueError("slerp: a sample of z1 points opposite to its sample of z0 (θ = π): no single great circle "
                         "joins them")
    theta = torch.arccos(cos)
    parallel = cos >= PARALLEL_COSINE
    sin = torch.where(parallel, torch.ones_like(theta), theta.sin())
    w0 = torch.where(parallel, 1.0 - alpha, ((1.0 - alpha) * theta).sin() / sin)
    w1 = torch.where(parallel, alpha, (alpha * theta).sin() / sin)
    return (w0[:, None] * a + w1[:, None] * b).reshape(z0.shape).to(z0.dtype)


def _alphas(alpha, batch: int, dtype: torch.dtype, device) -> Tensor:
    """``alpha`` as a (B,) tensor, checked to be finite and within [0, 1]."""
    if isinstance(alpha, Tensor):
        if alpha.dim() == 0:
            alpha = alpha.reshape(1)
        if alpha.dim() != 1 or alpha.shape[0] not in (1, batch) or alpha.dtype == torch.bool:
            raise ValueError(f"slerp: alpha must be a number or a tensor of shape ({batch},), got "
                             f"{alpha.dtype} of shape {tuple(alpha.shape)}")
        values = alpha.detach().to(device, dtype)
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        values = torch.full((1,), float(alpha), dtype=dtype, device=device)
    else:
        raise TypeError(f"slerp: alpha must be a number in [0, 1] or a tensor of them, got {type(alpha).__name__}")
    if not bool(torch.isfinite(values).all()) or bool(((values < 0) | (values > 1)).any()):
        shown = values.tolist() if values.numel() <= 8 else f"{values.numel()} values"
        raise ValueError(f"slerp: alpha must be finite and lie in [0, 1], got {shown}")
    return values.expand(batch)

