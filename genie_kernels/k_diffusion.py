"""The package's solvers with k-diffusion's calling conventions (k-diffusion is not needed).

k-diffusion samples a **denoiser** ``D(x, σ)`` (the model's estimate of the clean sample)
in the variance-exploding parametrisation ``x = x₀ + σ z`` on decreasing noise levels
``sigmas``, which may end with 0.  A VP model ``x_t = α x₀ + σ_t z`` is the same ODE in
other units: with ``γ = σ_t / α_t``,

    x_VE = x_VP / α = x_VP √(1 + γ²) = x̄,   σ_VE = γ,   D(x̄, γ) = x̄ − γ ε(x̄ / √(1 + γ²), t(γ)),

so k-diffusion's state *is* the DDIM ODE's x̄, and ``ε = (x̄ − D) / γ``.  The samplers here
take those ε through :class:`~genie_kernels.ode.steps.StepRule`, the updates of
:func:`genie_kernels.sample`; the step to σ = 0 returns the denoised ``D`` (the DDIM step
to γ = 0, ``sample(..., denoise=True)``'s last call).  On the same grid
(``sigmas = γ(ts)``) and the same start (``x = noise · √(1 + γ_0²)``; k-diffusion's own
``noise · σ_max`` is that to within a factor ``1 + 1/(2γ_0²)``) they give ``sample()``'s samples.

:class:`VPDenoiser` turns any ε-model of the package (an adapter, the mixture, an
``eps_fn(x, t)``) into such a denoiser.  The callback gets k-diffusion's
``{"x", "i", "sigma", "sigma_hat", "denoised"}`` before each step (``sigma_hat = sigma``:
no churn), and ``disable`` turns off the tqdm bar.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from .checks import check_noise
from .heads.base import check_head_needs_no_features
from .ode.protocol import ModelOutput, as_model, checked_call, state_dtype
from .ode.schedules import VPSchedule, schedule_of
from .ode.steps import StepRule, unscaled_state


class VPDenoiser(nn.Module):
    """A VP ε-model as k-diffusion's denoiser: ``D(x, σ) = x − σ ε(x / √(1 + σ²), t(σ))``.

    ``model`` is anything :func:`genie_kernels.sample` takes; ``schedule`` (default: the
    model's own, else the linear VP schedule) maps σ = γ to t.  ``cond`` (an extra_args
    key) is the model's condition."""

    def __init__(self, model, schedule: VPSchedule | None = None):
        super().__init__()
        self.model = as_model(model)
        self.schedule = schedule_of(model, schedule)

    def eps(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        """ε of the VP model at the VE state ``x`` and noise level ``sigma`` (shape (B,))."""
        sigma64 = sigma.to(torch.float64).reshape(-1)
        t = self.schedule.t_from_gamma(sigma64).to(x.device, x.dtype).expand(x.shape[0])
        scale = torch.rsqrt(1.0 + sigma64.square()).to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return checked_call(self.model, (x * scale).to(x.dtype), t, cond).eps

    def forward(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x - sigma.to(x.dtype).reshape(shape) * self.eps(x, sigma, cond)


def checked_sigmas(sigmas) -> Tensor:
    """``sigmas`` as float64 on the CPU: at least two, strictly decreasing, positive but for a
    final 0."""
    values = torch.as_tensor(sigmas).detach().cpu().to(torch.float64)
    ok = values.dim() == 1 and values.numel() >= 2 and bool(torch.isfinite(values).all())
    ok = ok and bool((values[1:] < values[:-1]).all()) and bool((values[:-1] > 0).all()) and float(values[-1]) >= 0
    if not ok:
        raise ValueError("sigmas must be a strictly decreasing sequence of at least 2 noise levels, positive but for a "
                         f"final 0, got {values.tolist()}")
    return values


def _solve(solver: str, model, x: Tensor, sigmas, extra_args, callback, disable, head=None) -> Tensor:
    """The loop every sampler below runs (see the module docstring)."""
    check_noise(x)
    if not callable(model):
        raise TypeError(f"model must be a denoiser callable as model(x, sigma, **extra_args), got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(info), got {type(callback).__name__}")
    extra_args = {} if extra_args is None else dict(extra_args)
    gammas = checked_sigmas(sigmas)
    sigmas = torch.as_tensor(sigmas).to(x.device)
    rule = StepRule(solver, gammas)
    wide = state_dtype(x.dtype)
    xbar, s_in = x.to(wide), x.new_ones([x.shape[0]])
    for i in trange(len(gammas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if not isinstance(denoised, Tensor) or denoised.shape != x.shape:
            raise ValueError(f"the denoiser must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{getattr(denoised, 'shape', type(denoised).__name__)}")
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if float(gammas[i + 1]) == 0.0:  # the DDIM step to γ = 0 lands on the denoised sample
            xbar = denoised.to(wide)
        else:
            eps = (xbar - denoised.to(wide)) / float(gammas[i])
            deps = None
            if solver == "genie":
                x_vp = unscaled_state(xbar, gammas[i], x.dtype)
                deps = head(x_vp, ModelOutput(eps.to(x.dtype)), gammas[i].to(x.device).expand(x.shape[0]))
                if not isinstance(deps, Tensor) or deps.shape != x.shape:
                    raise ValueError(f"the head must return dε/dγ shaped like x {tuple(x.shape)}, got "
                                     f"{getattr(deps, 'shape', type(deps).__name__)}")
                deps = deps.to(wide)
            xbar = xbar + rule.increment(i, eps, deps)
        x = xbar.to(x.dtype)
    return x


@torch.no_grad()
def sample_ddim(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:
    """DDIM (Euler in σ = γ): ``x ← x + (σ_{i+1} − σ_i) (x − D(x, σ_i)) / σ_i``."""
    return _solve("ddim", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_ab2(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:
    """Variable-step Adams–Bashforth 2 in σ on ``ε = (x − D)/σ``."""
    return _solve("ab2", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_ab3(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:
    """Variable-step Adams–Bashforth 3 in σ on ``ε = (x − D)/σ``."""
    return _solve("ab3", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_genie(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None, head=None) -> Tensor:
    """GENIE: ``x ← x + h ε + ½ h² k``, ``h = σ_{i+1} − σ_i``, ``ε = (x − D)/σ_i`` and
    ``k = head(x / √(1 + σ_i²), ModelOutput(ε), σ_i)`` ≈ dε/dγ.

    The head sees only x, ε and γ: one built with ``feature_channels=0`` (``feature_dim=0``)
    and ``temb_channels=0``, or any callable of that signature."""
    if head is None or not callable(head):
        raise ValueError("sample_genie needs a head (head=...), callable as head(x, ModelOutput(eps), gamma); "
                         "use sample_ab2 without one")
    check_head_needs_no_features(head, "a k-diffusion denoiser")
    return _solve("genie", model, x, sigmas, extra_args, callback, disable, head)
