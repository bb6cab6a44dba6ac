"""The conv head's forward with its normalisation work fused into Triton launches.

Same maths as :meth:`genie_kernels.head.ConvHead.predict_k` (the head before the
mixed-parametrisation combine, which the fused update kernel applies).  Per residual
block the work is its two convolutions (cuDNN), the tiny time-embedding projection
(a GEMM) and two :func:`group_norm_silu` launches:

    a  = SiLU(GN1((x + h_prev)/√2))    ← launch 1 also finishes the previous block
    h1 = conv1(a)
    a2 = SiLU(GN2(h1 + proj(SiLU(temb))))   ← launch 2
    h_prev = conv2(a2)

and the output norm ``SiLU(GN_out((x + h_prev)/√2))`` finishes the last block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..head import ConvHead
from ..models import ModelOutput
from .group_norm import RESIDUAL_SCALE, group_norm_silu


def _norm_silu(norm: torch.nn.GroupNorm, h: Tensor, **fold) -> tuple[Tensor, Tensor | None]:
    return group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, **fold)


def fused_head_k(head: ConvHead, x: Tensor, out: ModelOutput, gamma: Tensor) -> Tensor:
    """The head's raw output ``k = (k1, k2, k3)`` (3C channels), with fused GroupNorm blocks."""
    if not isinstance(head, ConvHead):
        raise TypeError(f"the fused head path needs a ConvHead, got {type(head).__name__}")
    head.check_inputs(x, out)
    dtype = head.dtype
    inputs = [x.to(dtype), out.eps.to(dtype)] + ([out.features.to(dtype)] if head.feature_channels else [])
    temb_act = F.silu(head._time_embedding(out, gamma))
    residual = head.conv_in(torch.cat(inputs, dim=1))
    pending = None  # conv2 output of the previous block, waiting for its residual add
    for block in head.blocks:
        if pending is None:
            a, _ = _norm_silu(block.norm1, residual)
        else:
            a, residual = _norm_silu(block.norm1, pending, residual=residual, residual_scale=RESIDUAL_SCALE)
        h1 = block.conv1(a)
        a2, _ = _norm_silu(block.norm2, h1, bias=block.temb_proj(temb_act).contiguous())
        pending = block.conv2(a2)
    if pending is None:
        a, _ = _norm_silu(head.norm_out, residual)
    else:
        a, _ = _norm_silu(head.norm_out, pending, residual=residual, residual_scale=RESIDUAL_SCALE)
    return head.conv_out(a)
