"""Gaussian mixture data with a closed-form ε at every noise level.

Data ``x_0 ~ Σ_k w_k N(μ_k, diag(s_k²))``.  Under the VP process
``x_t = α x_0 + σ z`` the marginal is again a mixture,
``Σ_k w_k N(α μ_k, diag(v_k))`` with ``v_k = α² s_k² + σ²``, so

    ε(x, t) = −σ ∇ log p_t(x) = σ Σ_k r_k(x) (x − α μ_k) / v_k,

with posterior responsibilities ``r_k ∝ w_k N(x; α μ_k, v_k)``.  ε depends on t only
through ``γ = σ/α`` (``α = 1/sqrt(1+γ²)``, ``σ = γ α``), which is why the analytic
derivative below is written in γ.  Everything is plain differentiable torch code, so
``torch.func.jvp`` through it is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_seed
from ..ode.protocol import EpsModel, ModelOutput
from ..ode.schedules import LinearVPSchedule, VPSchedule


class GaussianMixture(EpsModel):
    """Analytic ε-model of a Gaussian mixture of any data shape.

    Args:
        weights: ``(K,)`` mixture weights (normalised here).
        means: ``(K, *data_shape)`` component means.
        variances: ``(K,)`` for isotropic components or ``(K, *data_shape)`` for diagonal ones.
        schedule: the noise schedule mapping t to γ (default :class:`LinearVPSchedule`).
    """

    def __init__(self, weights, means, variances, schedule: VPSchedule | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if means.dim() < 2 or means.shape[0] == 0 or means[0].numel() == 0:
            raise ValueError(f"means must be shaped (K, *data) with K >= 1 and non-empty data, got {tuple(means.shape)}")
        for name, value in (("weights", weights), ("means", means), ("variances", variances)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite, got NaN or inf in {name}")
        k = means.shape[0]
        if weights.shape != (k,) or (weights <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers, got shape {tuple(weights.shape)}")
        if variances.shape == (k,):
            variances = variances.view(k, *([1] * (means.dim() - 1))).expand_as(means)
        if variances.shape != means.shape or (variances <= 0).any():
            raise ValueError("variances must be positive, shaped (K,) or like means")
        self.data_shape = tuple(means.shape[1:])
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("means", means.reshape(k, -1))
        self.register_buffer("variances", variances.reshape(k, -1).clone())
        self.schedule = schedule or LinearVPSchedule()

    # -- the ε-model -------------------------------------------------------------------

    def forward_features(self, x: Tensor, t: Tensor) -> ModelOutput:
        return ModelOutput(self.eps_from_gamma(x, self.schedule.gamma(t)))

    def _components(self, x: Tensor, gamma: Tensor):
        """Per-component ``(diff = x − αμ, v, r, alpha, sigma)``, flattened to (B, K, D)."""
        if x.dim() < 1 or math.prod(x.shape[1:]) != self.means.shape[1]:
            raise ValueError(f"the mixture's data have {self.means.shape[1]} values per sample, "
                             f"got x of shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], 1, -1)
        gamma = gamma.to(x.dtype).reshape(-1, 1, 1)
        alpha = torch.rsqrt(1.0 + gamma.square())
        sigma = gamma * alpha
        means, variances = self.means.to(x.dtype), self.variances.to(x.dtype)
        diff = flat - alpha * means
        v = alpha.square() * variances + sigma.square()
        log_p = self.log_weights.to(x.dtype) - 0.5 * (diff.square() / v + v.log()).sum(-1)
        r = torch.softmax(log_p, dim=-1).unsqueeze(-1)
        return diff, v, r, alpha, sigma

    def eps_from_gamma(self, x: Tensor, gamma: Tensor) -> Tensor:
        """ε(x, γ) = σ Σ_k r_k (x − α μ_k) / v_k."""
        diff, v, r, _, sigma = self._components(x, gamma)
        return (sigma * (r * diff / v).sum(1, keepdim=True)).reshape(x.shape)

    def deps_dgamma(self, x: Tensor, gamma: Tensor) -> Tensor:
        """Analytic total derivative dε/dγ along the DDIM ODE, written out by hand.

        With ``ẋ = dx/dγ = α ε − γ α² x``, ``α̇ = −γ α³``, ``σ̇ = α³``,
        ``e_k = (x − α μ_k)/v_k``, ``v̇_k = 2 α α̇ s_k² + 2 σ σ̇``:

            ė_k = (ẋ − α̇ μ_k)/v_k − (x − α μ_k) v̇_k / v_k²
            ℓ̇_k = −Σ_d [ (x − αμ_k)(ẋ − α̇μ_k)/v_k − ½ (x − αμ_k)² v̇_k/v_k² + ½ v̇_k/v_k ]
            ṙ_k = r_k (ℓ̇_k − Σ_j r_j ℓ̇_j)
            ε̇  = σ̇ Σ_k r_k e_k + σ Σ_k (ṙ_k e_k + r_k ė_k)

        Used to cross-check the forward-mode AD derivative.
        """
        diff, v, r, alpha, sigma = self._components(x, gamma)
        means, variances = self.means.to(x.dtype), self.variances.to(x.dtype)
        g = gamma.to(x.dtype).reshape(-1, 1, 1)
        e = diff / v
        eps = sigma * (r * e).sum(1, keepdim=True)
        x_dot = alpha * eps - g * alpha.square() * x.reshape(x.shape[0], 1, -1)
        alpha_dot, sigma_dot = -g * alpha**3, alpha**3
        diff_dot = x_dot - alpha_dot * means
        v_dot = 2.0 * alpha * alpha_dot * variances + 2.0 * sigma * sigma_dot
        e_dot = diff_dot / v - diff * v_dot / v.square()
        l_dot = -(diff * diff_dot / v - 0.5 * diff.square() * v_dot / v.square() + 0.5 * v_dot / v).sum(-1, keepdim=True)
        r_dot = r * (l_dot - (r * l_dot).sum(1, keepdim=True))
        eps_dot = sigma_dot * (r * e).sum(1, keepdim=True) + sigma * (r_dot * e + r * e_dot).sum(1, keepdim=True)
        return eps_dot.reshape(x.shape)

    # -- data ----------------------------------------------------------------------------

    def sample_data(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """Draw ``n`` samples of the data distribution."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[k] + self.variances[k].sqrt() * z
        return x.reshape(n, *self.data_shape).to(dtype)

    def log_density(self, x: Tensor) -> Tensor:
        """``log p_0(x)`` of the clean data, per sample."""
        flat = x.to(torch.float64).reshape(x.shape[0], 1, -1)
        v = self.variances
        log_n = -0.5 * ((flat - self.means).square() / v + v.log() + math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(self.log_weights + log_n, dim=-1)

    def off_mode_fraction(self, x: Tensor, n_std: float = 4.0) -> float:
        """Fraction of samples farther than ``n_std`` standard deviations from every mode.

        The distance to component k is the Mahalanobis distance
        ``sqrt(Σ_d (x_d − μ_kd)² / s_kd²)``; for 2-D data beyond 4 such deviations a point
        lies where the data density is below e⁻⁸ of its mode's peak.
        """
        flat = x.to(torch.float64).reshape(x.shape[0], 1, -1)
        distance = ((flat - self.means).square() / self.variances).sum(-1).sqrt()
        return float((distance.min(dim=1).values > n_std).double().mean())


def toy_2d(schedule: VPSchedule | None = None, grid: int = 5, spacing: float = 0.75, std: float = 0.05) -> GaussianMixture:
    """The 2-D toy setting: ``grid × grid`` narrow modes on a square lattice, equal weights."""
    coords = (torch.arange(grid, dtype=torch.float64) - (grid - 1) / 2) * spacing
    means = torch.cartesian_prod(coords, coords)
    return GaussianMixture(torch.ones(grid * grid), means, torch.full((grid * grid,), std**2), schedule)


def image_mixture(
    shape=(3, 8, 8), components: int = 4, seed: int = 0, schedule: VPSchedule | None = None
) -> GaussianMixture:
    """A random image-shaped mixture (means in [−1, 1], diagonal std in [0.05, 0.3]), fixed by ``seed``."""
    check_seed("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(components, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    stds = 0.05 + 0.25 * torch.rand(components, *shape, generator=gen, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=gen, dtype=torch.float64)
    return GaussianMixture(weights, means, stds.square(), schedule)
