"""Is a network smooth enough in t for a Taylor step?  Secants against pointwise derivatives.

GENIE's second-order term ``½ h² dε/dγ`` and the head's distillation target both use the
*pointwise* derivative of ε along the ODE.  That only helps if ε changes smoothly at the
scale of a sampling step: a network whose time embedding holds frequencies far above what
training tamed ripples in t, and its pointwise ``∂ε/∂t`` then describes the ripple, not
the trend a step of size ``Δt ≈ 0.1`` follows.

:func:`smoothness_report` measures this along float64 ODE solutions ``x(t)`` from the
given noises.  At each probe time ``t`` and secant width ``Δt`` it compares

* ``∂ε/∂t`` at fixed ``x`` (a forward-mode JVP in ``t``) with the central secant
  ``(ε(x, t+Δt) − ε(x, t−Δt)) / 2Δt``, and
* the total ``dε/dγ`` along the solution (:func:`~genie_kernels.derivative.exact_deps_dgamma`)
  with ``(ε(x(t+Δt), t+Δt) − ε(x(t−Δt), t−Δt)) / (γ(t+Δt) − γ(t−Δt))``,

as the relative difference ``‖secant − jvp‖ / ‖jvp‖`` over the batch (the secant's own
truncation error is ``O(Δt²)``: on a smooth network these are small and shrink with Δt).
It also takes one DDIM step and one exact TTM2 step from the true state at each point of
a solver grid and reports their errors to the true next state: TTM2 should be the
smaller if the premise holds.  And it reports how far ``ε(x, 1)`` is from ``σ_1 x``, the
analytic first step's stand-in for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .derivative import exact_deps_dgamma
from .ground_truth import ode_solution, rmse
from .protocol import as_model, checked_call
from .schedules import VPSchedule, schedule_of, time_grid
from .solvers import ddim, genie_exact
from .steps import analytic_eps

PROBE_TIMES = (0.9, 0.5, 0.2, 0.1, 0.02)
SECANT_WIDTHS = (1e-3, 3e-3, 1e-2)


@dataclass
class SmoothnessReport:
    """Relative secant-vs-JVP differences, one-step errors and the AFS gap.

    ``partial_t[(t, dt)]`` and ``total[(t, dt)]``: relative differences for ``∂ε/∂t`` and
    ``dε/dγ``.  ``steps``: ``(t_n, t_{n+1}, ddim_error, ttm2_error)`` per step of the grid,
    RMSE to the true state at ``t_{n+1}``.  ``afs_gap``: ``‖ε(x, 1) − σ_1 x‖ / ‖ε(x, 1)‖``
    at the noise.
    """

    partial_t: dict[tuple[float, float], float]
    total: dict[tuple[float, float], float]
    steps: list[tuple[float, float, float, float]]
    afs_gap: float

    def markdown(self) -> str:
        """The three tables as markdown."""
        times = sorted({t for t, _ in self.partial_t}, reverse=True)
        widths = sorted({dt for _, dt in self.partial_t})
        lines = ["| t | " + " | ".join(f"∂ε/∂t, Δt={dt:g}" for dt in widths) + " | "
                 + " | ".join(f"dε/dγ, Δt={dt:g}" for dt in widths) + " |",
                 "|---" * (1 + 2 * len(widths)) + "|"]
        for t in times:
            cells = [f"{self.partial_t[t, dt]:.3g}" for dt in widths] + [f"{self.total[t, dt]:.3g}" for dt in widths]
            lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
        lines += ["", "| step | t → t' | DDIM error | TTM2 error | TTM2 / DDIM |", "|---|---|---|---|---|"]
        for n, (t0, t1, e1, e2) in enumerate(self.steps):
            lines.append(f"| {n} | {t0:.4g} → {t1:.4g} | {e1:.3g} | {e2:.3g} | {e2 / e1:.2f} |")
        lines += ["", f"AFS gap ‖ε(x, 1) − σ₁x‖ / ‖ε(x, 1)‖ at the noise: {self.afs_gap:.3g}"]
        return "\n".join(lines)


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def smoothness_report(model, noise: Tensor, schedule: VPSchedule | None = None, *, times=PROBE_TIMES,
                      widths=SECANT_WIDTHS, grid_steps: int = 10, striding: str = "uniform", t_end: float = 1e-3,
                      steps_per_unit: float = 100.0) -> SmoothnessReport:
    """Measure a model's smoothness in t along its own ODE solutions (see the module docstring).

    Everything runs in ``noise``'s dtype: pass float64 noise and a float64 model for
    differences that are not round-off.  ``grid_steps`` and ``striding`` pick the solver
    grid of the one-step errors.
    """
    schedule = schedule_of(model, schedule)
    model = as_model(model)
    widths = sorted(float(dt) for dt in widths)
    times = [float(t) for t in times]
    for t in times:
        if not (t - max(widths) > 0 and t + max(widths) <= 1.0):
            raise ValueError(f"probe time {t} ± {max(widths)} leaves (0, 1]")
    grid = time_grid(schedule, grid_steps, t_end, striding)
    probes = {t + s * dt for t in times for dt in widths for s in (-1, 1)} | set(times) | set(grid.tolist())
    ts = torch.tensor(sorted(probes | {1.0}, reverse=True), dtype=torch.float64)
    states = dict(zip(ts.tolist(), ode_solution(model, noise, ts, schedule, steps_per_unit=steps_per_unit)))
    batch = noise.shape[0]

    def at(t: float) -> Tensor:
        return torch.full((batch,), t, dtype=torch.float64).to(noise.device, noise.dtype)

    def eps(t: float, x: Tensor | None = None) -> Tensor:
        return checked_call(model, (states[t] if x is None else x).to(noise.dtype), at(t)).eps.to(torch.float64)

    partial_t, total = {}, {}
    for t in times:
        x = states[t].to(noise.dtype)
        _, dedt = torch.func.jvp(lambda t_: model(x, t_), (at(t),), (torch.ones_like(at(t)),))
        gamma = schedule.gamma(torch.tensor(t, dtype=torch.float64)).expand(batch)
        _, dedg = exact_deps_dgamma(model, x, gamma, schedule)
        for dt in widths:
            secant_t = (eps(t + dt, x) - eps(t - dt, x)) / (2 * dt)
            partial_t[t, dt] = _relative(secant_t, dedt.to(torch.float64))
            g = schedule.gamma(torch.tensor([t + dt, t - dt], dtype=torch.float64))
            secant_g = (eps(t + dt) - eps(t - dt)) / float(g[0] - g[1])
            total[t, dt] = _relative(secant_g, dedg.to(torch.float64))

    steps = []
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x0 = states[t0].to(noise.dtype)
        pair = torch.tensor([t0, t1], dtype=torch.float64)
        one_ddim = ddim(model, x0, pair, schedule).sample
        one_ttm2 = genie_exact(model, x0, pair, schedule).sample
        steps.append((t0, t1, rmse(one_ddim, states[t1]), rmse(one_ttm2, states[t1])))

    return SmoothnessReport(partial_t, total, steps, afs_gap(model, noise, schedule))


def afs_gap(model, noise: Tensor, schedule: VPSchedule) -> float:
    """``‖ε(x, 1) − σ₁x‖ / ‖ε(x, 1)‖`` at ``x = noise``: how far the analytic first step's
    stand-in for ε is from the model's own (inf where the model's ε is zero)."""
    model = as_model(model)
    gamma1 = schedule.gamma(torch.tensor(1.0, dtype=torch.float64))
    ones = torch.ones(noise.shape[0], dtype=noise.dtype, device=noise.device)
    model_eps = checked_call(model, noise, ones).eps.to(torch.float64)
    if not model_eps.norm() > 0:
        return float("inf")
    return _relative(analytic_eps(noise.to(torch.float64), gamma1), model_eps)
