"""The MLP head for flat or small data (the 2-D toy, the mixtures): every input flattened,
a few SiLU layers, then :func:`~genie_kernels.heads.base.combine_mixed`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_int, check_parameter_count
from ..ode.protocol import ModelOutput, state_dtype
from .base import GammaEmbedding, _HeadBase, combine_mixed


class MLPHead(_HeadBase):
    """MLP head for flat or small data: ``x`` of shape ``(B, ...)`` with ``dim`` entries per sample.

    Input ``concat(x, ε, features, temb)`` (all flattened) → ``num_layers`` SiLU layers of
    width ``hidden`` → linear to ``3·dim`` → :func:`combine_mixed`.
    """

    kind = "mlp"

    def __init__(self, dim: int, *, feature_dim: int = 0, temb_channels: int = 0, hidden: int = 256,
                 num_layers: int = 3, embed_dim: int = 64):
        super().__init__()
        for name, value, low, high in (("dim", dim, 1, 2 ** 28), ("feature_dim", feature_dim, 0, 2 ** 28),
                                       ("temb_channels", temb_channels, 0, 2 ** 16), ("hidden", hidden, 1, 2 ** 16),
                                       ("num_layers", num_layers, 1, 1024), ("embed_dim", embed_dim, 2, 2 ** 16)):
            check_int(name, value, low, high)
        check_parameter_count("MLPHead", hidden * (2 * dim + feature_dim + (temb_channels or hidden))
                              + (num_layers - 1) * hidden * hidden + 3 * dim * hidden)
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
        self._check_eps(x, out)
        if self.feature_dim:
            f = self._features(out, self.feature_dim, "values", "feature_dim")
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
