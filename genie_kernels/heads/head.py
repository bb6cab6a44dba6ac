"""The curvature head k_ψ: a small network that predicts dε/dγ from one ε-network call.

GENIE's second-order step ``x̄ ← x̄ + h ε + ½ h² dε/dγ`` needs the total derivative of
ε along the ODE.  Computing it exactly costs a forward-mode pass (see
:mod:`.derivative`); the head predicts it from what the ε-network already computed:
the input ``x``, its output ``ε``, its last feature map and its time embedding.

The head outputs three maps ``k1, k2, k3`` (C channels each) combined by the *mixed
parametrisation*

    dε/dγ ≈ −k1/γ + k2·γ/(1+γ²) + k3/(γ(1+γ²)),

whose three terms carry the scalings of dε/dγ in γ (``∝ 1/γ`` as γ → 0 and as γ → ∞),
so the network itself only has to produce O(1) numbers.  It is trained with the loss
``γ² ‖pred − dε/dγ‖²`` (see :mod:`.distill`), i.e. on ``γ·dε/dγ``, which is O(1) at
every noise level.

Two heads follow the :class:`~genie_kernels.solvers.DerivativeHead` protocol
``head(x, model_output, gamma) -> dε/dγ`` with an ``nfe_overhead`` attribute; dε/dγ comes
back in x's dtype or float32 if that is wider (:func:`~genie_kernels.models.state_dtype`), what
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
import time

import torch
from torch import Tensor, nn

from ..checks import check_int
from ..ode.protocol import ModelOutput, state_dtype

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


class ResidualBlock(nn.Module):
    """BigGAN / DDPM residual block at constant width:

    ``h = conv1(SiLU(GN(x))) + proj(SiLU(temb))``, ``h = conv2(SiLU(GN(h)))``,
    ``out = (x + h) / √2``.
    """

    def __init__(self, channels: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return (x + h) * (1.0 / math.sqrt(2.0))


class _HeadBase(nn.Module):
    """Shared parts: config round trip, dtype handling, input checks, temb choice."""

    kind = ""
    nfe_overhead: float = 0.0

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


class ConvHead(_HeadBase):
    """Convolutional head for image data ``(B, C, H, W)`` (see the module docstring).

    Args:
        channels: C, the image channels (the head outputs 3C before the combine).
        feature_channels: channels of the network's feature map (0: features not used).
        temb_channels: size of the network's time embedding (0: use the head's own
            embedding of log γ).
        nf: width of the body.  num_blocks: residual blocks.  groups: GroupNorm groups.
        embed_dim: size of the sinusoidal log γ embedding (own embedding only).
    """

    kind = "conv"

    def __init__(self, channels: int, *, feature_channels: int = 0, temb_channels: int = 0, nf: int = 64,
                 num_blocks: int = 1, groups: int = 8, embed_dim: int = 64):
        super().__init__()
        for name, value, low in (("channels", channels, 1), ("feature_channels", feature_channels, 0),
                                 ("temb_channels", temb_channels, 0), ("nf", nf, 1), ("num_blocks", num_blocks, 0),
                                 ("groups", groups, 1), ("embed_dim", embed_dim, 2)):
            check_int(name, value, low)
        if nf % groups:
            raise ValueError(f"groups ({groups}) must divide nf ({nf})")
        self.channels, self.feature_channels, self.temb_channels = channels, feature_channels, temb_channels
        self.nf, self.num_blocks, self.groups, self.embed_dim = nf, num_blocks, groups, embed_dim
        temb_dim = temb_channels or 4 * nf
        if not temb_channels:
            self.embed = GammaEmbedding(embed_dim, temb_dim)
        self.conv_in = nn.Conv2d(2 * channels + feature_channels, nf, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(nf, temb_dim, groups) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(groups, nf)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(nf, 3 * channels, 3, padding=1)
        # Start at k = 0, i.e. GENIE starts out as DDIM.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def config(self) -> dict:
        return {"type": self.kind, "channels": self.channels, "feature_channels": self.feature_channels,
                "temb_channels": self.temb_channels, "nf": self.nf, "num_blocks": self.num_blocks,
                "groups": self.groups, "embed_dim": self.embed_dim}

    def check_inputs(self, x: Tensor, out: ModelOutput, gamma: Tensor | None = None) -> None:
        """Raise ValueError when the model's x / ε / features / temb (or γ) do not fit this head."""
        if x.dim() != 4:
            raise ValueError(f"ConvHead needs images shaped (B, C, H, W), got x of shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"the head was built for {self.channels} image channels, the model's input has {x.shape[1]}")
        if out.eps.shape != x.shape:
            raise ValueError(f"eps has shape {tuple(out.eps.shape)}, x has {tuple(x.shape)}")
        if self.feature_channels:
            f = out.features
            if f is None:
                raise ValueError(f"the head was built for {self.feature_channels} feature channels "
                                 "but the model returns no features; build it with feature_channels=0")
            if f.dim() != 4 or f.shape[1] != self.feature_channels:
                raise ValueError(f"the head was built for {self.feature_channels} feature channels, "
                                 f"the model's features have shape {tuple(f.shape)}")
            if f.shape[0] != x.shape[0] or f.shape[2:] != x.shape[2:]:
                raise ValueError(f"features of shape {tuple(f.shape)} are not at the resolution of x {tuple(x.shape)}")
        self._check_temb(out, x.shape[0])
        self._check_gamma(gamma, x.shape[0])

    def predict_k(self, x: Tensor, out: ModelOutput, gamma: Tensor) -> Tensor:
        """The raw output ``k = (k1, k2, k3)``, shape ``(B, 3C, H, W)``, before the combine."""
        self.check_inputs(x, out, gamma)
        dtype = self.dtype
        inputs = [x.to(dtype), out.eps.to(dtype)]
        if self.feature_channels:
            inputs.append(out.features.to(dtype))
        temb = self._time_embedding(out, gamma.to(x.device))
        h = self.conv_in(torch.cat(inputs, dim=1))
        for block in self.blocks:
            h = block(h, temb)
        return self.conv_out(self.act(self.norm_out(h)))

    def forward(self, x: Tensor, out: ModelOutput, gamma: Tensor) -> Tensor:
        return combine_mixed(self.predict_k(x, out, gamma), gamma.to(x.device)).to(state_dtype(x.dtype))


class MLPHead(_HeadBase):
    """MLP head for flat or small data: ``x`` of shape ``(B, ...)`` with ``dim`` entries per sample.

    Input ``concat(x, ε, features, temb)`` (all flattened) → ``num_layers`` SiLU layers of
    width ``hidden`` → linear to ``3·dim`` → :func:`combine_mixed`.
    """

    kind = "mlp"

    def __init__(self, dim: int, *, feature_dim: int = 0, temb_channels: int = 0, hidden: int = 256,
                 num_layers: int = 3, embed_dim: int = 64):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("feature_dim", feature_dim, 0), ("temb_channels", temb_channels, 0),
                                 ("hidden", hidden, 1), ("num_layers", num_layers, 1), ("embed_dim", embed_dim, 2)):
            check_int(name, value, low)
        self.dim, self.feature_dim, self.temb_channels = dim, feature_dim, temb_channels
        self.hidden, self.num_layers, self.embed_dim = hidden, num_layers, embed_dim
        if not temb_channels:
            self.embed = GammaEmbedding(embed_dim, hidden)
        width_in = 2 * dim + feature_dim + (temb_channels or hidden)
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.linear_out = nn.Linear(hidden, 3 * dim)
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    def config(self) -> dict:
        return {"type": self.kind, "dim": self.dim, "feature_dim": self.feature_dim,
                "temb_channels": self.temb_channels, "hidden": self.hidden, "num_layers": self.num_layers,
                "embed_dim": self.embed_dim}

    def check_inputs(self, x: Tensor, out: ModelOutput, gamma: Tensor | None = None) -> None:
        """Raise ValueError when the model's x / ε / features / temb (or γ) do not fit this head."""
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"the head was built for {self.dim} values per sample, got x of shape {tuple(x.shape)}")
        if out.eps.shape != x.shape:
            raise ValueError(f"eps has shape {tuple(out.eps.shape)}, x has {tuple(x.shape)}")
        if self.feature_dim:
            f = out.features
            if f is None:
                raise ValueError(f"the head was built for {self.feature_dim} feature values "
                                 "but the model returns no features; build it with feature_dim=0")
            if f.shape[0] != x.shape[0] or f[0].numel() != self.feature_dim:
                raise ValueError(f"the head was built for {self.feature_dim} feature values per sample, "
                                 f"the model's features have shape {tuple(f.shape)}")
        self._check_temb(out, x.shape[0])
        self._check_gamma(gamma, x.shape[0])

    def forward(self, x: Tensor, out: ModelOutput, gamma: Tensor) -> Tensor:
        self.check_inputs(x, out, gamma)
        dtype, batch, gamma = self.dtype, x.shape[0], gamma.to(x.device)
        inputs = [x.reshape(batch, -1).to(dtype), out.eps.reshape(batch, -1).to(dtype)]
        if self.feature_dim:
            inputs.append(out.features.reshape(batch, -1).to(dtype))
        inputs.append(self._time_embedding(out, gamma))
        k = self.linear_out(self.body(torch.cat(inputs, dim=1)))
        return combine_mixed(k, gamma).reshape(x.shape).to(state_dtype(x.dtype))


HEADS = {ConvHead.kind: ConvHead, MLPHead.kind: MLPHead}


def head_from_config(config: dict) -> _HeadBase:
    """Build an untrained head from its ``config()`` dict."""
    kind = config.get("type")
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; known: {tuple(HEADS)}")
    try:
        return HEADS[kind].from_config(config)
    except TypeError as err:  # unknown or missing keys
        raise ValueError(f"bad {kind} head config {config}: {err}") from err


def head_for(model_output: ModelOutput, x: Tensor, kind: str = "conv", **options) -> _HeadBase:
    """A head sized for what ``model`` returns on ``x`` (channels, features, temb)."""
    f, temb = model_output.features, model_output.temb
    temb_channels = options.pop("temb_channels", temb.shape[-1] if temb is not None else 0)
    if kind == "conv":
        feature_channels = options.pop("feature_channels", f.shape[1] if f is not None else 0)
        return ConvHead(x.shape[1], feature_channels=feature_channels, temb_channels=temb_channels, **options)
    if kind == "mlp":
        feature_dim = options.pop("feature_dim", f[0].numel() if f is not None else 0)
        return MLPHead(x[0].numel(), feature_dim=feature_dim, temb_channels=temb_channels, **options)
    raise ValueError(f"unknown head type {kind!r}; known: {tuple(HEADS)}")


@torch.no_grad()
def measure_nfe_overhead(head, model, x: Tensor, t: Tensor, gamma: Tensor, repeats: int = 5) -> float:
    """Time the head against one network call on ``(x, t)``; set and return ``head.nfe_overhead``.

    Wall-clock medians over ``repeats`` calls after a warm-up; on a GPU it synchronises.
    The ratio is what ``genie`` adds to the NFE count for each head call.
    """
    def median_seconds(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    out = model.forward_features(x, t)
    network = median_seconds(lambda: model.forward_features(x, t))
    overhead = median_seconds(lambda: head(x, out, gamma)) / max(network, 1e-12)
    head.nfe_overhead = float(overhead)
    return head.nfe_overhead
