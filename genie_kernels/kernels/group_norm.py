"""GroupNorm + affine + SiLU in one launch, with the residual block's extra work folded in.

For input ``h`` of shape ``(B, C, *spatial)`` the kernel computes, per sample and group,

    y   = h + bias[b, c]                       (optional per-sample channel bias, e.g. the
                                                time-embedding projection added after conv1)
    y   = (residual + y) · residual_scale      (optional; the block's ``(x + h)/√2``, and
                                                then y itself is returned too)
    out = SiLU((y − mean_g) / sqrt(var_g + eps) · weight[c] + shift[c])

with the group statistics taken in two passes (mean first, then the mean of squared
deviations) in float32, never as E[y²] − E[y]².  In a head's residual block the chain
``GN → SiLU → conv1 → +temb → GN → SiLU → conv2 → (x + ·)/√2`` then needs two launches
beside the two convolutions: one with ``bias`` after conv1, and one with ``residual``
that finishes the block and normalises the next block's input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_silu_reference(
    h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float = 1e-5,
    bias: Tensor | None = None, residual: Tensor | None = None, residual_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Pure-PyTorch twin of :func:`group_norm_silu`: returns ``(out, y if residual else None)``."""
    _check(h, weight, shift, groups, bias, residual)
    y = h.float()
    if bias is not None:
        y = y + bias.float().reshape(*bias.shape, *([1] * (h.dim() - 2)))
    if residual is not None:
        y = (residual.float() + y) * residual_scale
    out = F.silu(F.group_norm(y, groups, weight.float(), shift.float(), eps))
    return out.to(h.dtype), (y.to(h.dtype) if residual is not None else None)


def _check(h, weight, shift, groups, bias, residual) -> None:
    if h.dim() < 2:
        raise ValueError(f"group_norm_silu needs (B, C, ...) input, got shape {tuple(h.shape)}")
    b, c = h.shape[:2]
    if c % groups:
        raise ValueError(f"channels {c} are not divisible by groups {groups}")
    if weight.shape != (c,) or shift.shape != (c,):
        raise ValueError(f"weight and shift must have shape ({c},)")
    if bias is not None and bias.shape != (b, c):
        raise ValueError(f"bias must have shape ({b}, {c}), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual must be shaped like the input {tuple(h.shape)}, got {tuple(residual.shape)}")


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _group_norm_silu_kernel(
        h_ptr, weight_ptr, shift_ptr, bias_ptr, residual_ptr, out_ptr, y_ptr,
        channels, spatial, channels_per_group, groups, eps, residual_scale,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per (sample, group); the group is read in BLOCK-sized chunks."""
        pid = tl.program_id(0)
        sample = pid // groups
        group = pid - sample * groups
        group_size = channels_per_group * spatial
        base = (sample * channels + group * channels_per_group).to(tl.int64) * spatial
        first_channel = group * channels_per_group

        # pass 1: mean of y over the group
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, group_size, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < group_size
            y = tl.load(h_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + sample * channels + first_channel + idx // spatial, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                y = (tl.load(residual_ptr + base + idx, mask=mask, other=0.0).to(tl.float32) + y) * residual_scale
                tl.store(y_ptr + base + idx, y.to(y_ptr.dtype.element_ty), mask=mask)
            total += tl.where(mask, y, 0.0)
        mean = tl.sum(total, axis=0) / group_size
        tl.debug_barrier()  # make pass 1's stores of y visible to every thread of the program

        # pass 2: variance as the mean squared deviation (re-reads y, no E[y²] − E[y]²)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, group_size, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < group_size
            y = _load_y(h_ptr, bias_ptr, residual_ptr, y_ptr, base, idx, mask, sample, channels, first_channel,
                        spatial, residual_scale, HAS_BIAS, HAS_RESIDUAL)
            deviation = tl.where(mask, y - mean, 0.0)
            total += deviation * deviation
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / group_size + eps)

        # pass 3: normalise, affine, SiLU
        for start in range(0, group_size, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < group_size
            y = _load_y(h_ptr, bias_ptr, residual_ptr, y_ptr, base, idx, mask, sample, channels, first_channel,
                        spatial, residual_scale, HAS_BIAS, HAS_RESIDUAL)
            channel = first_channel + idx // spatial
            w = tl.load(weight_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            s = tl.load(shift_ptr + channel, mask=mask, other=0.0).to(tl.float32)
            z = (y - mean) * rstd * w + s
            tl.store(out_ptr + base + idx, (z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_y(h_ptr, bias_ptr, residual_ptr, y_ptr, base, idx, mask, sample, channels, first_channel,
                spatial, residual_scale, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """y of pass 1 again: the stored sum when there is a residual, else h (+ bias)."""
        if HAS_RESIDUAL:
            return tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(h_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias_ptr + sample * channels + first_channel + idx // spatial, mask=mask, other=0.0).to(tl.float32)
        return y


def _launch(h, weight, shift, groups, eps, bias, residual, residual_scale, launcher):
    out = torch.empty_like(h)
    y = torch.empty_like(h) if residual is not None else h.new_empty(0)
    batch, channels = h.shape[:2]
    spatial = h[0, 0].numel()
    group_size = channels // groups * spatial
    block = min(4096, triton.next_power_of_2(group_size))
    launcher(_group_norm_silu_kernel)[(batch * groups,)](
        h, weight, shift, h if bias is None else bias, h if residual is None else residual, out,
        out if residual is None else y,  # y is neither stored nor read without a residual
        channels, spatial, channels // groups, groups, eps, residual_scale,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=block,
    )
    return out, y


if triton is not None:

    @torch.library.triton_op("genie_kernels::group_norm_silu", mutates_args=())
    def _group_norm_silu_op(
        h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float,
        bias: Tensor | None, residual: Tensor | None, residual_scale: float,
    ) -> tuple[Tensor, Tensor]:
        return _launch(h, weight, shift, groups, eps, bias, residual, residual_scale, torch.library.wrap_triton)


def group_norm_silu(
    h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float = 1e-5,
    bias: Tensor | None = None, residual: Tensor | None = None, residual_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Fused ``SiLU(GroupNorm(y))`` (see the module docstring); returns ``(out, y or None)``.

    Registered as ``torch.ops.genie_kernels.group_norm_silu``.  Inputs must be contiguous
    and on one device; statistics are float32 whatever the storage dtype.
    """
    if triton is None:
        raise RuntimeError("group_norm_silu needs triton; use group_norm_silu_reference")
    _check(h, weight, shift, groups, bias, residual)
    tensors = [h, weight, shift] + [t for t in (bias, residual) if t is not None]
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("group_norm_silu needs contiguous tensors")
    if any(t.device != h.device for t in tensors):
        raise ValueError("group_norm_silu needs all tensors on one device")
    out, y = _group_norm_silu_op(h, weight, shift, groups, float(eps), bias, residual, float(residual_scale))
    return out, (y if residual is not None else None)


RESIDUAL_SCALE = 1.0 / math.sqrt(2.0)
