"""The convolutional head for images ``(B, C, H, W)``: ``concat(x, ε, features)`` →
conv3x3 → N BigGAN residual blocks (with the time embedding) → GroupNorm → SiLU →
conv3x3 to 3C channels → :func:`~genie_kernels.heads.base.combine_mixed`.

The fused Triton version of :meth:`ConvHead.predict_k` is
:func:`genie_kernels.fast.head_blocks.fused_head_k`; this one is its reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import check_int, check_parameter_count
from ..ode.protocol import ModelOutput, state_dtype
from .base import GammaEmbedding, _HeadBase, combine_mixed


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
        for name, value, low, high in (("channels", channels, 1, 2 ** 16), ("feature_channels", feature_channels, 0, 2 ** 16),
                                       ("temb_channels", temb_channels, 0, 2 ** 16), ("nf", nf, 1, 2 ** 16),
                                       ("num_blocks", num_blocks, 0, 1024), ("groups", groups, 1, None),
                                       ("embed_dim", embed_dim, 2, 2 ** 16)):
            check_int(name, value, low, high)
        if nf % groups:
            raise ValueError(f"groups ({groups}) must divide nf ({nf})")
        temb = temb_channels or 4 * nf
        check_parameter_count("ConvHead", 9 * nf * (2 * channels + feature_channels + 3 * channels)
                              + num_blocks * (18 * nf * nf + temb * nf) + (0 if temb_channels else embed_dim * temb))
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
        self._check_eps(x, out)
        if self.feature_channels:
            f = self._features(out, self.feature_channels, "channels", "feature_channels")
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
