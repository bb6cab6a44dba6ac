"""The conv head's forward with its normalisation work fused into Triton launches.

Same maths as :meth:`genie_kernels.heads.conv.ConvHead.predict_k` (the head before the
mixed-parametrisation combine, which the fused update kernel applies).  Per residual
block the work is its two convolutions (cuDNN, run without their biases), the tiny
time-embedding projection (a GEMM) and two :func:`group_norm_silu` launches:

    a  = SiLU(GN1((x + h_prev + b2_prev)/√2))   ← launch 1 also finishes the previous block
    h1 = conv1(a)
    a2 = SiLU(GN2(h1 + b1 + proj(SiLU(temb))))  ← launch 2
    h_prev = conv2(a2)

and the output norm ``SiLU(GN_out((x + h_prev + b2_prev)/√2))`` finishes the last block.
Each convolution's bias is added inside the launch that reads its output (the stream's
first value ``conv_in(·)`` carries ``conv_in``'s bias into the first block's launches), so
no launch only adds a bias.

On CUDA, from batch :data:`CHANNELS_LAST_MIN_BATCH` on, the head runs channels-last (NHWC):
cuDNN's half-precision convolutions work in that layout, and a (B, C, H, W)-contiguous
input is transposed before and after every convolution.  Below it the step is bound by
kernel launches, and NHWC would add a few (the input's and weights' conversions).  In
NHWC the concatenated input (x, ε, features: 2C + F channels, e.g. 134) is written by one
:func:`channels_last_cat` launch, zero-padded to a multiple of :data:`CONV_CHANNEL_MULTIPLE`
channels, with zero input channels appended to ``conv_in``'s weight: the same sum, but
rows of whole 16-byte vectors, which tensor-core convolutions want.  The returned k is
contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..heads.conv import ConvHead
from ..ode.protocol import ModelOutput
from .channels_last_cat import channels_last_cat
from .group_norm import RESIDUAL_SCALE, group_norm_silu

# Not settled.  H100, the fp16 head alone (gpu_check, before channels_last_cat): batch 256 NHWC 1.37 ms,
# NCHW 1.39; batch 64 NCHW faster in both runs (1.07 vs 1.24, 1.21 vs 1.61 ms); batches 1-16 mixed.  Below
# 256 the eager head is bound by its host time, which a CUDA-graph replay does not pay: gpu_check's
# "graph with the head in NCHW / NHWC" rows are the ones to set this by.
CHANNELS_LAST_MIN_BATCH = 16
CONV_CHANNEL_MULTIPLE = 8  # NHWC: the head's input is zero-padded to a multiple of this many channels (16 B in fp16)


def _conv_without_bias(conv: torch.nn.Conv2d, a: Tensor, weight: Tensor | None = None) -> Tensor:
    weight = conv.weight if weight is None else weight
    return F.conv2d(a, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _sum(*vectors: Tensor | None) -> Tensor | None:
    present = [v for v in vectors if v is not None]
    return sum(present[1:], present[0]) if present else None


def _norm_silu(norm: torch.nn.GroupNorm, h: Tensor, bias: Tensor | None, residual: Tensor | None = None):
    return group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, bias=bias, residual=residual,
                           residual_scale=RESIDUAL_SCALE if residual is not None else 1.0)


def fused_head_k(head: ConvHead, x: Tensor, out: ModelOutput, gamma: Tensor,
                 channels_last: bool | None = None) -> Tensor:
    """The head's raw output ``k = (k1, k2, k3)`` (3C channels, contiguous), with fused GroupNorm blocks.

    ``channels_last``: run the convolutions and launches in NHWC (default: on CUDA from
    batch :data:`CHANNELS_LAST_MIN_BATCH` on).
    """
    if not isinstance(head, ConvHead):
        raise TypeError(f"the fused head path needs a ConvHead, got {type(head).__name__}")
    head.check_inputs(x, out, gamma)
    if channels_last is None:
        channels_last = x.is_cuda and x.shape[0] >= CHANNELS_LAST_MIN_BATCH
    dtype = head.dtype
    parts = [x, out.eps] + ([out.features] if head.feature_channels else [])
    conv_in_weight = head.conv_in.weight
    if channels_last:
        inputs = channels_last_cat([p.contiguous() for p in parts], CONV_CHANNEL_MULTIPLE, dtype)
        pad = inputs.shape[1] - conv_in_weight.shape[1]
        if pad:
            conv_in_weight = F.pad(conv_in_weight, (0, 0, 0, 0, 0, pad))  # zero weights for the zero channels
    else:
        inputs = torch.cat([p.to(dtype) for p in parts], dim=1)
    temb_act = F.silu(head._time_embedding(out, gamma))
    # The residual stream is stream + stream_bias; pending is the last conv2's output and bias.
    stream, stream_bias = _conv_without_bias(head.conv_in, inputs, conv_in_weight), head.conv_in.bias
    pending = None
    for block in head.blocks:
        a, stream, stream_bias = _finish_block_and_norm(block.norm1, stream, stream_bias, pending)
        h1 = _conv_without_bias(block.conv1, a)
        temb_bias = F.linear(temb_act, block.temb_proj.weight, _sum(block.temb_proj.bias, block.conv1.bias))
        a2, _ = _norm_silu(block.norm2, h1, temb_bias.contiguous())
        pending = (_conv_without_bias(block.conv2, a2), block.conv2.bias)
    a, _, _ = _finish_block_and_norm(head.norm_out, stream, stream_bias, pending)
    return head.conv_out(a).contiguous()


def _finish_block_and_norm(norm, stream: Tensor, stream_bias: Tensor | None, pending):
    """``SiLU(norm(next stream))`` and the next stream (its bias now inside) for one launch."""
    if pending is None:
        a, _ = _norm_silu(norm, stream, stream_bias)
        return a, stream, stream_bias
    h, h_bias = pending
    a, stream = _norm_silu(norm, h, _sum(h_bias, stream_bias), residual=stream)
    return a, stream, None
