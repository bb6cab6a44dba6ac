"""Calibrated time grids: the steps placed where the sampler's own error is, measured once.

For a model, a one-step solver (``ddim``, ``genie`` with its head, ``genie_exact``) and a
budget of N steps, :func:`calibrated_grid` chooses N + 1 of the M + 1 times of a fine
candidate grid (quadratic striding, M = ``resolution``) so that every step makes about the
same local error, measured on a calibration batch:

1. **Reference states** ``X_j = x(t_j)`` at every candidate time, from the float64 RK4
   solution of the calibration noise (:func:`.ground_truth.ode_solution`).
2. **Local errors.**  For a grid ``0 = i_0 < i_1 < … < i_N = M`` the local error of step n
   is ``e_n = RMS(Φ(X_{i_n}) − X_{i_{n+1}})``: one solver step from the exact state (the
   analytic first step for ``afs``) against the exact state where it lands.
3. **Equidistribution.**  An order-q step makes ``e ≈ (ρ |Δγ|)^q`` with an error density
   ρ(γ); step n's interval thus has ``ρ_n = e_n^{1/q} / |Δγ_n|``, and the next grid splits
   ``∫ ρ dγ`` into N equal parts (snapped to candidate times, one apart at least): equal
   predicted local errors.  ``q = 2`` for ``ddim`` and, where the head's error dominates its
   Taylor term, for ``genie``; ``exponent`` overrides it.
4. **Selection.**  Repeated ``iterations`` times from the quadratic grid; of those grids and
   the standard stridings the one whose whole N-step solve from the calibration noise lands
   closest (RMS) to the reference at ``t_end`` is returned, so the calibrated grid is never
   worse there than the best standard one.

The result is a fixed grid: pass it as ``sample(..., timesteps=grid.ts)`` to any backend
that takes a grid.  Calibrate on noise other than the noise you evaluate on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import check_bool, check_int, check_noise
from .ground_truth import ode_solution, rmse
from .schedules import STRIDINGS, VPSchedule, check_steps, check_t_end, schedule_of, time_grid

CALIBRATED_SOLVERS = ("ddim", "genie", "genie_exact")


class CalibratedGrid(NamedTuple):
    ts: Tensor                  # the chosen decreasing float64 grid, N + 1 times
    rmse: float                 # its whole-solve RMS error on the calibration batch
    local_errors: list          # e_n of its steps on the calibration batch
    candidates: dict            # name -> whole-solve RMS error of every grid tried


def _one_step(solve, model, x: Tensor, t_from: float, t_to: float, schedule: VPSchedule, afs: bool) -> Tensor:
    ts = torch.tensor([t_from, t_to], dtype=torch.float64)
    return solve(model, x, ts, schedule, afs=afs).sample


def _solver(solver: str, head):
    from . import solvers

    if solver not in CALIBRATED_SOLVERS:
        raise ValueError(f"calibrated_grid takes the one-step solvers {CALIBRATED_SOLVERS}, not {solver!r} (a "
                         "multistep solver's local error depends on its history)")
    if (solver == "genie") != (head is not None):
        raise ValueError("solver='genie' needs head=..., and the other solvers take none")
    fn = solvers.SOLVERS[solver]
    if head is None:
        return fn
    return lambda model, x, ts, schedule, afs: fn(model, x, ts, schedule, head, afs=afs)


def equidistribute(idx: list[int], errors: list[float], gammas: Tensor, q: float) -> list[int]:
    """The grid (indices into the candidate γ values ``gammas``) that splits the error
    integral ``∫ρ dγ`` into equal parts, ``ρ = e_n^{1/q} / |Δγ_n|`` on the steps of grid
    ``idx`` with local errors ``errors``; same number of steps, same first and last index,
    strictly increasing."""
    steps, last = len(idx) - 1, gammas.numel() - 1
    weight = torch.zeros(last, dtype=torch.float64)  # ∫ρ dγ over each candidate interval
    for (i, j), e in zip(zip(idx[:-1], idx[1:]), errors):
        weight[i:j] = max(e, 1e-300) ** (1.0 / q) * (gammas[i:j] - gammas[i + 1:j + 1]) / (gammas[i] - gammas[j])
    cumulative = torch.cat([weight.new_zeros(1), weight.cumsum(0)])
    quantiles = torch.linspace(0.0, float(cumulative[-1]), steps + 1, dtype=torch.float64)
    above = torch.searchsorted(cumulative, quantiles).clamp(1, last)  # the candidate nearest each quantile
    nearer_below = (quantiles - cumulative[above - 1]) < (cumulative[above] - quantiles)
    chosen = torch.where(nearer_below, above - 1, above).tolist()
    chosen[0], chosen[-1] = idx[0], idx[-1]
    for n in range(1, steps):  # strictly increasing, leaving room for the steps after
        chosen[n] = min(max(chosen[n], chosen[n - 1] + 1), last - (steps - n))
    return chosen


@torch.no_grad()
def calibrated_grid(model, noise: Tensor, steps: int, *, solver: str = "genie", head=None,
                    schedule: VPSchedule | None = None, t_end: float = 1e-3, afs: bool = False,
                    resolution: int = 200, iterations: int = 4, exponent: float | None = None,
                    steps_per_unit: float = 25.0) -> CalibratedGrid:
    """A grid of ``steps`` steps for ``solver`` that equalises its measured local errors
    (module docstring); ``noise`` is the calibration batch (e.g. 64 draws of N(0, I))."""
    check_noise(noise)
    check_steps(steps)
    check_t_end(t_end)
    check_bool("afs", afs)
    check_int("resolution", resolution, steps + 1, 100_000)
    check_int("iterations", iterations, 0, 100)
    solve = _solver(solver, head)
    schedule = schedule_of(model, schedule)
    q = float(exponent) if exponent is not None else 2.0
    fine = time_grid(schedule, resolution, t_end, "quadratic")
    gammas = schedule.gamma(fine)
    states = ode_solution(model, noise, fine, schedule, steps_per_unit=steps_per_unit).to(noise.dtype)
    target = states[-1]

    measured: dict[tuple, list[float]] = {}  # grid indices -> local errors: each grid's steps run once

    def local_errors(idx: list[int]) -> list[float]:
        if tuple(idx) not in measured:
            measured[tuple(idx)] = [
                rmse(_one_step(solve, model, states[i], float(fine[i]), float(fine[j]), schedule, afs and i == 0),
                     states[j]) for i, j in zip(idx[:-1], idx[1:])]
        return measured[tuple(idx)]

    def whole_solve(ts: Tensor) -> float:
        out = solve(model, noise, ts, schedule, afs=afs).sample
        return rmse(out, target) if torch.isfinite(out).all() else float("inf")

    candidates: dict[str, float] = {}
    grids: dict[str, Tensor] = {}
    for striding in STRIDINGS:
        grids[striding] = time_grid(schedule, steps, t_end, striding)
        candidates[striding] = whole_solve(grids[striding])
    idx = [round(resolution * n / steps) for n in range(steps + 1)]  # the quadratic grid, on candidates
    for k in range(iterations):
        idx = equidistribute(idx, local_errors(idx), gammas, q)
        grids[f"equidistributed {k + 1}"] = fine[idx]
        candidates[f"equidistributed {k + 1}"] = whole_solve(fine[idx])
    best = min(candidates, key=candidates.get)
    ts = grids[best]
    chosen = [int(torch.argmin((fine - t).abs())) for t in ts]
    on_candidates = all(abs(float(fine[i] - t)) < 1e-12 for i, t in zip(chosen, ts))
    errors = local_errors(chosen) if on_candidates else []
    return CalibratedGrid(ts, candidates[best], errors, candidates)
