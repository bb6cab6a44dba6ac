"""GroupNorm + affine + SiLU in one launch, with the residual block's extra work folded in.

For input ``h`` of shape ``(B, C, *spatial)`` the kernel computes, per sample and group,

    y   = h + bias[b, c]                       (optional; per channel ``(C,)`` or per sample
                                                and channel ``(B, C)``: a convolution's bias,
                                                the time-embedding projection, or their sum)
    y   = (residual + y) · residual_scale      (optional; the block's ``(x + h)/√2``, and
                                                then y itself is returned too)
    out = SiLU((y − mean_g) / sqrt(var_g + eps) · weight[c] + shift[c])

with the group statistics in float32 and never as E[y²] − E[y]²: from a slab held in
registers as the mean and then the mean squared deviation; from a slab too large for
that by Welford's update at each tile position, the positions then merged by Chan et
al.'s formula  M2 = Σᵢ M2ᵢ + Σᵢ nᵢ (meanᵢ − mean)².

In a head's residual block the chain ``GN → SiLU → conv1 → +temb → GN → SiLU → conv2 →
(x + ·)/√2`` then needs two launches beside the two convolutions: one with ``bias``
after conv1, and one with ``residual`` that finishes the block and normalises the next
block's input.  Folding the convolutions' own biases into ``bias`` saves their separate
add passes.

Both memory layouts run without a copy: contiguous ``(B, C, ...)`` and, for 4-D input,
``torch.channels_last`` (what cuDNN's half-precision convolutions prefer); ``out`` and
``y`` take the input's layout.  A program owns whole groups of one sample: in
channels-last several groups at once, so that each pixel's row of channels is at least
one 16-byte vector (the programs sharing a pixel's 32-byte sectors run side by side).
A slab of up to :data:`SLAB_ELEMENTS` values is read once and kept in registers (one
read of ``h``, one write of ``out``); a larger one is read twice, statistics first, in
tiles of ``[pixels, channels]``, and ``out`` normalises y recomputed from ``h`` and
``residual`` rather than the stored y, which is rounded to the storage dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int
from . import cdiv, launch_directly, next_power_of_2, raw_kernel


def group_norm_silu_reference(
    h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float = 1e-5,
    bias: Tensor | None = None, residual: Tensor | None = None, residual_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Pure-PyTorch twin of :func:`group_norm_silu`: returns ``(out, y if residual else None)``."""
    _check(h, weight, shift, groups, bias, residual)
    y = h.float()
    if bias is not None:
        y = y + bias.float().expand(h.shape[:2]).reshape(*h.shape[:2], *([1] * (h.dim() - 2)))
    if residual is not None:
        y = (residual.float() + y) * residual_scale
    out = F.silu(F.group_norm(y, groups, weight.float(), shift.float(), eps))
    return out.to(h.dtype), (y.to(h.dtype) if residual is not None else None)


def _check(h, weight, shift, groups, bias, residual) -> None:
    check_int("groups", groups, 1)
    for name, value in (("h", h), ("weight", weight), ("shift", shift), ("bias", bias), ("residual", residual)):
        if value is not None and (not isinstance(value, Tensor) or not value.is_floating_point()):
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"group_norm_silu: {name} must be a real floating tensor, got {what}")
    if h.dim() < 2:
        raise ValueError(f"group_norm_silu needs (B, C, ...) input, got shape {tuple(h.shape)}")
    b, c = h.shape[:2]
    if c % groups:
        raise ValueError(f"channels {c} are not divisible by groups {groups}")
    if c // groups * math.prod(h.shape[2:]) < 2 and h.numel():
        raise ValueError(f"each of the {groups} groups of input shape {tuple(h.shape)} holds one value; "
                         "group norm needs more than one")
    if weight.shape != (c,) or shift.shape != (c,):
        raise ValueError(f"weight and shift must have shape ({c},)")
    if bias is not None and bias.shape not in ((c,), (b, c)):
        raise ValueError(f"bias must have shape ({c},) or ({b}, {c}), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual must be shaped like the input {tuple(h.shape)}, got {tuple(residual.shape)}")


def is_channels_last(h: Tensor) -> bool:
    """Whether ``h`` is a 4-D channels-last tensor that is not also plainly contiguous."""
    return h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _group_norm_silu_kernel(
        h_ptr, weight_ptr, shift_ptr, bias_ptr, residual_ptr, out_ptr, y_ptr,
        channels, spatial, channels_per_group, channel_blocks, bias_batch_stride, eps, residual_scale,
        CHANNELS_PER_PROGRAM: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, ONE_GROUP: tl.constexpr, SINGLE_TILE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (sample, channel block): whole groups, read in [BLOCK_P, BLOCK_C] tiles.

        The channel block varies fastest over the programs, so the programs that share a
        sample's pixel rows (channels-last) or its neighbouring groups run side by side.
        ``CHANNELS_PER_PROGRAM`` is a constant so that the compiler sees a channels-last row's
        alignment (16-byte loads from a block of 8 half-precision channels).
        """
        sample = tl.program_id(0) // channel_blocks
        lane = tl.arange(0, BLOCK_C)
        channel = (tl.program_id(0) % channel_blocks) * CHANNELS_PER_PROGRAM + lane
        channel_ok = (lane < CHANNELS_PER_PROGRAM) & (channel < channels)
        sample_base = sample.to(tl.int64) * channels * spatial
        # tile offsets = sample_base + pixel * pixel_stride + channel * channel_stride
        if CHANNELS_LAST:
            channel_offset = channel
        else:
            channel_offset = channel.to(tl.int64) * spatial
        count = channels_per_group * spatial
        if HAS_BIAS:
            bias = tl.load(bias_ptr + sample * bias_batch_stride + channel, mask=channel_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        w = tl.load(weight_ptr + channel, mask=channel_ok, other=1.0).to(tl.float32)
        s = tl.load(shift_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)

        if SINGLE_TILE:
            # the whole slab in registers: one read, exact two-pass statistics, one write
            pixel = tl.arange(0, BLOCK_P)
            offsets, mask = _tile(sample_base, pixel, channel_offset, channel_ok, channels, spatial, CHANNELS_LAST)
            y = _read_y(h_ptr, residual_ptr, y_ptr, offsets, mask, bias, residual_scale, HAS_RESIDUAL, HAS_RESIDUAL)
            mean = _group_sum(tl.sum(tl.where(mask, y, 0.0), axis=0), lane, channels_per_group, ONE_GROUP) / count
            deviation = tl.where(mask, y - mean[None, :], 0.0)
            variance = _group_sum(tl.sum(deviation * deviation, axis=0), lane, channels_per_group, ONE_GROUP) / count
            _store_silu(out_ptr, offsets, mask, deviation, w / tl.sqrt(variance + eps), s)
        else:
            # pass 1: Welford's running mean and sum of squared deviations at each tile position
            # (a position has seen one value per tile so far, or is masked), then Chan et al.'s
            # merge of the positions into group statistics (no E[y²] − E[y]²)
            running_mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            squared = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            tiles = 0.0
            for start in range(0, spatial, BLOCK_P):
                pixel = start + tl.arange(0, BLOCK_P)
                offsets, mask = _tile(sample_base, pixel, channel_offset, channel_ok, channels, spatial, CHANNELS_LAST)
                y = _read_y(h_ptr, residual_ptr, y_ptr, offsets, mask, bias, residual_scale, HAS_RESIDUAL, HAS_RESIDUAL)
                tiles += 1.0
                delta = tl.where(mask, y - running_mean, 0.0)
                running_mean += delta / tiles
                squared += delta * tl.where(mask, y - running_mean, 0.0)
            position = tl.arange(0, BLOCK_P)  # only the last tile is partial: values seen per position
            seen = tl.where(position < spatial, (spatial - position + BLOCK_P - 1) // BLOCK_P, 0).to(tl.float32)
            seen = tl.where(channel_ok[None, :], seen[:, None], 0.0)
            mean = _group_sum(tl.sum(seen * running_mean, axis=0), lane, channels_per_group, ONE_GROUP) / count
            spread = running_mean - mean[None, :]
            squared += seen * spread * spread
            variance = _group_sum(tl.sum(squared, axis=0), lane, channels_per_group, ONE_GROUP) / count
            scale = w / tl.sqrt(variance + eps)

            # pass 2: normalise, affine, SiLU, with y computed again as in pass 1 (the stored y is
            # rounded to the storage dtype, and normalising that would add its rounding error)
            for start in range(0, spatial, BLOCK_P):
                pixel = start + tl.arange(0, BLOCK_P)
                offsets, mask = _tile(sample_base, pixel, channel_offset, channel_ok, channels, spatial, CHANNELS_LAST)
                y = _read_y(h_ptr, residual_ptr, y_ptr, offsets, mask, bias, residual_scale, HAS_RESIDUAL, False)
                _store_silu(out_ptr, offsets, mask, tl.where(mask, y - mean[None, :], 0.0), scale, s)

    @triton.jit
    def _tile(sample_base, pixel, channel_offset, channel_ok, channels, spatial, CHANNELS_LAST: tl.constexpr):
        """Offsets and mask of the [pixels, channels] tile in either layout."""
        if CHANNELS_LAST:
            pixel_offset = pixel.to(tl.int64) * channels
        else:
            pixel_offset = pixel
        offsets = sample_base + pixel_offset[:, None] + channel_offset[None, :]
        return offsets, (pixel < spatial)[:, None] & channel_ok[None, :]

    @triton.jit
    def _group_sum(per_channel, lane, channels_per_group, ONE_GROUP: tl.constexpr):
        """Each lane's group total, from per-channel totals (masked lanes hold 0)."""
        if ONE_GROUP:
            return tl.zeros_like(per_channel) + tl.sum(per_channel, axis=0)
        group = lane // channels_per_group
        same_group = group[:, None] == group[None, :]
        return tl.sum(tl.where(same_group, per_channel[None, :], 0.0), axis=1)

    @triton.jit
    def _read_y(h_ptr, residual_ptr, y_ptr, offsets, mask, bias, residual_scale, HAS_RESIDUAL: tl.constexpr,
                STORE_Y: tl.constexpr):
        """y of one tile in float32, from h, bias and the residual; ``STORE_Y``: also store it
        (the block's output, with a residual)."""
        y = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        if HAS_RESIDUAL:
            y = (tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + y) * residual_scale
        if STORE_Y:
            tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
        return y

    @triton.jit
    def _store_silu(out_ptr, offsets, mask, centred, scale, shift):
        """out = SiLU(centred · scale + shift), with per-channel scale = weight / std."""
        z = centred * scale[None, :] + shift[None, :]
        tl.store(out_ptr + offsets, (z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=mask)


SLAB_ELEMENTS = 16384  # a program's whole [pixels, channels] slab up to this size is read once, into registers
TILE_ELEMENTS = 4096  # larger slabs are walked twice in tiles of this many elements
ROW_CHANNELS = 8  # channels-last: at least this many channels per program (16-byte rows in half precision)
ELEMENTS_PER_THREAD = 16  # of a tile: sets the warps per program (at most 32)


class LaunchConfig(NamedTuple):
    CHANNELS_PER_PROGRAM: int
    BLOCK_P: int
    BLOCK_C: int
    ONE_GROUP: bool
    SINGLE_TILE: bool
    num_warps: int


@functools.lru_cache(maxsize=256)
def launch_config(channels: int, groups: int, spatial: int, channels_last: bool) -> LaunchConfig:
    """Channels per program, tile shape and warps: one group per program in (B, C, ...) layout,
    where a group is contiguous; in channels-last as many groups as make a row of ``ROW_CHANNELS``.
    A slab of up to ``SLAB_ELEMENTS`` is one tile, larger ones are tiles of ``TILE_ELEMENTS``."""
    per_group = channels // groups
    per_program = per_group * (min(groups, cdiv(ROW_CHANNELS, per_group)) if channels_last else 1)
    block_c, all_pixels = next_power_of_2(per_program), next_power_of_2(spatial)
    single_tile = block_c * all_pixels <= SLAB_ELEMENTS
    block_p = all_pixels if single_tile else max(1, min(all_pixels, TILE_ELEMENTS // block_c))
    num_warps = min(max(block_p * block_c // (32 * ELEMENTS_PER_THREAD), 1), 32)
    return LaunchConfig(per_program, block_p, block_c, per_program == per_group, single_tile, num_warps)


def _launch(h, weight, shift, groups, eps, bias, residual, residual_scale, launcher):
    out = torch.empty_like(h)
    y = torch.empty_like(h) if residual is not None else h.new_empty(0)
    batch, channels = int(h.shape[0]), int(h.shape[1])  # int(): concrete sizes under dynamic shapes
    spatial = int(math.prod(h.shape[2:]))
    if batch * channels * spatial == 0:
        return out, y
    channels_last = is_channels_last(h)
    config = launch_config(channels, groups, spatial, channels_last)
    channel_blocks = cdiv(channels, config.CHANNELS_PER_PROGRAM)
    launcher(_group_norm_silu_kernel)[(batch * channel_blocks,)](
        h, weight, shift, h if bias is None else bias, h if residual is None else residual, out,
        out if residual is None else y,  # y is neither stored nor read without a residual
        channels, spatial, channels // groups, channel_blocks,
        0 if bias is None or bias.dim() == 1 else channels, eps, residual_scale,
        CHANNELS_LAST=channels_last, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        **config._asdict(),
    )
    return out, y


def _check_for_kernel(h, weight, shift, groups, bias, residual) -> None:
    """What the reference needs (:func:`_check`), and the layouts and device the kernel needs."""
    _check(h, weight, shift, groups, bias, residual)
    if not (h.is_contiguous() or is_channels_last(h)):
        raise ValueError(f"group_norm_silu needs h contiguous or channels-last, got strides {h.stride()}")
    if residual is not None and not (residual.is_contiguous() if h.is_contiguous() else is_channels_last(residual)):
        raise ValueError(f"residual must have h's memory layout (strides {h.stride()}), got {residual.stride()}")
    vectors = [weight, shift] + ([bias] if bias is not None else [])
    if not all(t.is_contiguous() for t in vectors):
        raise ValueError("group_norm_silu needs contiguous weight, shift and bias")
    if any(t.device != h.device for t in vectors + ([residual] if residual is not None else [])):
        raise ValueError("group_norm_silu needs all tensors on one device")


if triton is not None:

    @torch.library.triton_op("genie_kernels::group_norm_silu", mutates_args=())
    def _group_norm_silu_op(
        h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float,
        bias: Tensor | None, residual: Tensor | None, residual_scale: float,
    ) -> tuple[Tensor, Tensor]:
        _check_for_kernel(h, weight, shift, groups, bias, residual)  # also when called as torch.ops.…
        return _launch(h, weight, shift, groups, eps, bias, residual, residual_scale, torch.library.wrap_triton)


def group_norm_silu(
    h: Tensor, weight: Tensor, shift: Tensor, groups: int, eps: float = 1e-5,
    bias: Tensor | None = None, residual: Tensor | None = None, residual_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Fused ``SiLU(GroupNorm(y))`` (see the module docstring); returns ``(out, y or None)``.

    Registered as ``torch.ops.genie_kernels.group_norm_silu`` (plain eager calls launch the
    kernel directly, see :func:`~genie_kernels.fast.launch_directly`).  ``h`` (and ``residual``,
    in the same layout) must be contiguous or 4-D channels-last, the other tensors
    contiguous, all on one device; statistics are float32 whatever the storage dtype.
    """
    if triton is None:
        raise RuntimeError("group_norm_silu needs triton; use group_norm_silu_reference")
    _check_for_kernel(h, weight, shift, groups, bias, residual)
    if launch_directly(h, weight, shift, bias, residual):
        out, y = _launch(h, weight, shift, groups, float(eps), bias, residual, float(residual_scale), raw_kernel)
    else:
        out, y = _group_norm_silu_op(h, weight, shift, groups, float(eps), bias, residual, float(residual_scale))
    return out, (y if residual is not None else None)


RESIDUAL_SCALE = 1.0 / math.sqrt(2.0)
