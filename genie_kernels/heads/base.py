"""The curvature head k_ψ: a small network that predicts dε/dγ from one ε-network call.

This module holds what every head shares: the mixed parametrisation, the log γ
embedding and the base class; the heads themselves are in :mod:`.conv` and :mod:`.mlp`.

GENIE's second-order step ``x̄ ← x̄ + h ε + ½ h² dε/dγ`` needs the total derivative of
ε along the ODE.  Computing it exactly costs a forward-mode pass (see
:mod:`genie_kernels.ode.derivative`); the head predicts it from what the ε-network already computed:
the input ``x``, its output ``ε``, its last feature map and its time embedding.

The head outputs three maps ``k1, k2, k3`` (C channels each) combined by the *mixed
parametrisation*

    dε/dγ ≈ −k1/γ + k2·γ/(1+γ²) + k3/(γ(1+γ²)),

whose three terms carry the scalings of dε/dγ in γ (``∝ 1/γ`` as γ → 0 and as γ → ∞),
so the network itself only has to produce O(1) numbers.  It is trained with the loss
``γ² ‖pred − dε/dγ‖²`` (see :mod:`.distill`), i.e. on ``γ·dε/dγ``, which is O(1) at
every noise level.

Two heads follow the :class:`~genie_kernels.ode.solvers.DerivativeHead` protocol
``head(x, model_output, gamma) -> dε/dγ`` and carry their measured ``cost``; dε/dγ comes
back in x's dtype or float32 if that is wider (:func:`~genie_kernels.ode.protocol.state_dtype`), what
the solver adds it to:

* :class:`ConvHead` for images ``(B, C, H, W)``:
  ``concat(x, ε, features)`` → conv3x3 → N BigGAN residual blocks → GroupNorm → SiLU
  → conv3x3 to 3C → :func:`combine_mixed`;
* :class:`MLPHead` for flat data ``(B, D)`` (e.g. the 2-D toy) or any small shape,
  which it flattens.

Both use the ε-network's time embedding when it provides one (``temb_channels > 0``)
and otherwise their own: a sinusoidal embedding of ``log γ`` through a small MLP.  The
head embeds ``log γ`` rather than ``t`` because γ is what the solver passes it, and
``log γ`` spreads the noise levels evenly (about −4.6 … 5 for the default schedule).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..cost import RelativeCost
from ..ode.protocol import ModelOutput, state_dtype
from .storage import read_head, write_head_folder


# Frequencies of the sinusoidal log γ embedding: geometric between these (radians per
# unit of log γ), so the slowest varies over the whole range and the fastest over ~0.3.
EMBED_MIN_FREQ = 0.1
EMBED_MAX_FREQ = 20.0


def combine_mixed(k: Tensor, gamma: Tensor) -> Tensor:
    """Mixed parametrisation ``dε/dγ = −k1/γ + k2·γ/(1+γ²) + k3/(γ(1+γ²))``.

    ``k`` has shape ``(B, 3C, ...)`` and is split into ``k1, k2, k3`` along dim 1;
    ``gamma`` has shape ``(B,)``.  Returns ``(B, C, ...)`` in float32, or in ``k.dtype`` if
    that is wider: γ reaches ~150 and the terms partly cancel, which half precision does not
    carry.  That is the precision of the solver's state x̄, and the fused update kernels
    combine in it too, so reference and fused GENIE steps agree bit for bit on the CPU.
    """
    if k.shape[1] % 3:
        raise ValueError(f"k must have 3C channels along dim 1, got {k.shape[1]}")
    compute = state_dtype(k.dtype)
    k1, k2, k3 = k.to(compute).chunk(3, dim=1)
    g = gamma.to(device=k.device, dtype=compute).reshape(-1, *([1] * (k.dim() - 1)))
    one_plus_g2 = 1.0 + g * g
    return -k1 / g + k2 * (g / one_plus_g2) + k3 / (g * one_plus_g2)


def log_gamma_embedding(gamma: Tensor, dim: int) -> Tensor:
    """``[sin(f_i log γ), cos(f_i log γ)]`` with ``dim/2`` geometric frequencies f_i."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(EMBED_MIN_FREQ), math.log(EMBED_MAX_FREQ), half,
                                     dtype=torch.float64, device=gamma.device))
    arg = gamma.to(torch.float64).log()[:, None] * freqs[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class GammaEmbedding(nn.Module):
    """The head's own time embedding: ``MLP(sinusoid(log γ))`` → ``(B, out_dim)``."""

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be an even number >= 2, got {embed_dim}")
        self.embed_dim = embed_dim
        self.linear_1 = nn.Linear(embed_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, gamma: Tensor) -> Tensor:
        weight = self.linear_1.weight
        emb = log_gamma_embedding(gamma.to(weight.device), self.embed_dim).to(weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class _HeadBase(nn.Module):
    """Shared parts: config round trip, dtype handling, input checks, temb choice."""

    kind = ""
    cost: RelativeCost | None = None  # next to one network call; measured when distillation ends

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> "_HeadBase":
        config = dict(config)
        kind = config.pop("type", None)
        if kind != cls.kind:
            raise ValueError(f"config is for a {kind!r} head, not {cls.kind!r}")
        return cls(**config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def save_pretrained(self, folder, model=None):
        """Save the head as a folder, ``head.safetensors`` and its config ``head.json`` (each
        written atomically), tied to ``model`` (else to the model it was loaded or distilled
        for); load it with :meth:`from_pretrained` or :func:`genie_kernels.load_head`.
        Returns the folder's path."""
        return write_head_folder(self, folder, model)

    @classmethod
    def from_pretrained(cls, folder, model=None, device=None) -> "_HeadBase":
        """A head of this class saved by :meth:`save_pretrained` (or a distilled checkpoint);
        with ``model``, refused unless it was saved for that model (or a half-precision or
        compiled copy of it)."""
        return read_head(folder, cls.from_config, model=model, device=device)

    @staticmethod
    def _check_eps(x: Tensor, out: ModelOutput) -> None:
        if out.eps.shape != x.shape:
            raise ValueError(f"eps has shape {tuple(out.eps.shape)}, x has {tuple(x.shape)}")

    @staticmethod
    def _features(out: ModelOutput, count: int, unit: str, option: str) -> Tensor:
        """The model's features, which a head built for ``count`` feature ``unit`` needs."""
        if out.features is None:
            raise ValueError(f"the head was built for {count} feature {unit} "
                             f"but the model returns no features; build it with {option}=0")
        return out.features

    @staticmethod
    def _check_gamma(gamma: Tensor | None, batch: int) -> None:
        if gamma is not None and gamma.shape != (batch,):
            raise ValueError(f"gamma must hold one value per sample, shape ({batch},), got {tuple(gamma.shape)}")

    def _check_temb(self, out: ModelOutput, batch: int) -> None:
        if not self.temb_channels:
            return
        if out.temb is None:
            raise ValueError(
                f"the head was built for the network's time embedding ({self.temb_channels} channels) "
                "but the model returns none; build the head with temb_channels=0 to use its own")
        if out.temb.dim() != 2 or out.temb.shape != (batch, self.temb_channels):
            raise ValueError(
                f"the head expects a time embedding of shape ({batch}, {self.temb_channels}), "
                f"the model returns {tuple(out.temb.shape)}")

    def _time_embedding(self, out: ModelOutput, gamma: Tensor) -> Tensor:
        if self.temb_channels:
            return out.temb.to(self.dtype)
        return self.embed(gamma)


def check_head_needs_no_features(head, where: str) -> None:
    """Refuse a head that reads the network's feature map or time embedding in ``where`` (a
    diffusers scheduler, a k-diffusion denoiser), which sees only x, ε and γ.  A bundled head
    qualifies when built with ``feature_channels=0`` (``feature_dim=0`` for an MLP head) and
    ``temb_channels=0``; any other callable ``head(x, ModelOutput(eps), gamma)`` is taken."""
    if not callable(head):
        raise TypeError(f"head must be callable as head(x, ModelOutput(eps), gamma), got {type(head).__name__}")
    reads = [name for name in ("feature_channels", "feature_dim", "temb_channels") if getattr(head, name, 0)]
    if reads:
        raise ValueError(f"this head reads the network's {' and '.join(reads)}, which {where} never sees (only the "
                         "network's output); sample with gk.sample and the adapter, or use a head built with "
                         "feature_channels=0 (feature_dim=0) and temb_channels=0")
