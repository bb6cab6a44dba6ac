"""The exact total derivative dε/dγ along the DDIM ODE, by forward-mode AD.

Along ``dx̄/dγ = ε(x, t)`` with ``x = x̄ / sqrt(1+γ²)`` and ``t = t(γ)``:

    dε/dγ = ∂ε/∂x · dx/dγ + ∂ε/∂t · dt/dγ,
    dx/dγ = ε / sqrt(1+γ²) − x γ / (1+γ²).

Both Jacobian-vector products come from one ``torch.func.jvp`` call with tangents
``(dx/dγ, dt/dγ)``.  ``dx/dγ`` needs ε first, so the exact derivative costs one forward
pass plus one forward-mode pass (primal and tangent; :func:`jvp_cost` measures what that
pass costs next to a forward pass).  It is the "exact GENIE" oracle and the distillation
target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cost import RelativeCost, relative_cost
from .protocol import ModelOutput, as_model, checked_call
from .schedules import VPSchedule


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """Broadcast a (B,) tensor against x of shape (B, ...)."""
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def dx_dgamma(x: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """``dx/dγ = ε / sqrt(1+γ²) − x γ / (1+γ²)`` with ``gamma`` of shape (B,)."""
    g = _per_sample(gamma.to(x.dtype), x)
    return eps * torch.rsqrt(1.0 + g.square()) - x * g / (1.0 + g.square())


def exact_deps_dgamma(
    model, x: Tensor, gamma: Tensor, schedule: VPSchedule, out: ModelOutput | None = None
) -> tuple[ModelOutput, Tensor]:
    """Return ``(model output at (x, t(γ)), dε/dγ)`` computed exactly with ``torch.func.jvp``.

    ``gamma`` has shape (B,) (any float dtype; time maths run in float64, the model sees
    ``x.dtype``).  Pass ``out`` when the model output at ``x`` is already known.
    """
    model = as_model(model)
    gamma64 = gamma.to(torch.float64)
    t = schedule.t_from_gamma(gamma64).to(x.dtype)
    dt = schedule.dt_dgamma(gamma64).to(x.dtype)
    if out is None:
        out = checked_call(model, x, t)
    tangent_x = dx_dgamma(x, out.eps, gamma64)
    try:
        _, deps = torch.func.jvp(lambda x_, t_: model(x_, t_), (x, t), (tangent_x, dt))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as err:
        advice = "keep its forward in torch operations (no .numpy())"
        if not model.prepares_jvp:
            advice = ("wrap the network in gk.HookedModel or gk.UNet2DAdapter (jvp_safe=True, the default, avoids "
                      "fused attention and strided GroupNorm inputs) and " + advice)
        raise RuntimeError("the exact dε/dγ differentiates the model in forward mode (torch.func.jvp), and its "
                           f"forward failed under it: {str(err).splitlines()[0]}. To fix it, {advice}") from err
    return out, deps


def jvp_cost(model, x: Tensor, schedule: VPSchedule, gamma: Tensor | None = None, *, repeats: int = 9) -> RelativeCost:
    """Cost of the forward-mode pass of :func:`exact_deps_dgamma` relative to one forward
    pass of ``model`` at ``x`` (default γ = 1, t ≈ 0.35 on the default schedule)."""
    model = as_model(model)
    if gamma is None:
        gamma = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    t = schedule.t_from_gamma(gamma.to(torch.float64)).to(x.dtype)
    with torch.no_grad():
        out = checked_call(model, x, t)
    return relative_cost(lambda: exact_deps_dgamma(model, x, gamma, schedule, out),
                         lambda: model.forward_features(x, t), repeats=repeats, device=x.device)
