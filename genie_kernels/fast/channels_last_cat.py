"""Concatenate (B, Cᵢ, H, W) tensors along channels into one channels-last tensor, zero-padded.

The fused head's input in channels-last (NHWC) is ``cat(x, ε, features)`` with zero channels
appended up to a multiple of ``multiple``:

    out[b, c, h, w] = parts[i][b, c − offset_i, h, w]   for c in part i's channels,
    out[b, c, h, w] = 0                                  in the padding,

cast to ``dtype``.  ``torch.cat`` straight into a channels-last output writes with strides
that defeat coalescing (1.0 ms of the head's 2.0 ms on an H100 at batch 256), and a
(B, C, H, W) cat followed by ``.contiguous(memory_format=torch.channels_last)`` goes
through memory twice.  One launch here is a tiled transpose: a program takes a block of
pixels of one sample, reads each part's channels along the pixels (contiguous in the
parts) and writes each pixel's row of channels (contiguous in the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cdiv, launch_directly, next_power_of_2, raw_kernel

MAX_PARTS = 3  # x, ε and the network's features


def padded_channels(channels: int, multiple: int) -> int:
    """``channels`` rounded up to a multiple of ``multiple``."""
    return channels + (-channels % multiple)


def channels_last_cat_reference(parts: list[Tensor], multiple: int = 1, dtype: torch.dtype | None = None) -> Tensor:
    """Pure-PyTorch twin of :func:`channels_last_cat`."""
    _check(parts, multiple)
    dtype = parts[0].dtype if dtype is None else dtype
    joined = torch.cat([p.to(dtype) for p in parts], dim=1)
    pad = padded_channels(joined.shape[1], multiple) - joined.shape[1]
    return F.pad(joined, (0, 0, 0, 0, 0, pad)).contiguous(memory_format=torch.channels_last)


def _check(parts: list[Tensor], multiple: int) -> None:
    """What the reference needs; the kernel also needs :func:`_check_for_kernel`."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"channels_last_cat joins 1 to {MAX_PARTS} tensors, got {len(parts)}")
    if any(p.dim() != 4 for p in parts):
        raise ValueError(f"channels_last_cat needs (B, C, H, W) tensors, got shapes {[tuple(p.shape) for p in parts]}")
    first = parts[0]
    if any(p.shape[0] != first.shape[0] or p.shape[2:] != first.shape[2:] for p in parts):
        raise ValueError(f"channels_last_cat needs one batch size and one H×W, got shapes "
                         f"{[tuple(p.shape) for p in parts]}")
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")


def _check_for_kernel(parts: list[Tensor], multiple: int) -> None:
    _check(parts, multiple)
    if not all(p.is_contiguous() for p in parts):
        raise ValueError("channels_last_cat needs contiguous (B, C, H, W) tensors")
    if any(p.device != parts[0].device for p in parts):
        raise ValueError("channels_last_cat needs all tensors on one device")


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _channels_last_cat_kernel(
        a_ptr, b_ptr, c_ptr, out_ptr, spatial,
        A_CHANNELS: tl.constexpr, B_CHANNELS: tl.constexpr, C_CHANNELS: tl.constexpr, OUT_CHANNELS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (pixel block, sample), looping over the output's channels BLOCK_C at a time:
        each output channel is read from the part that holds it (0 in the padding).  The channel
        counts are compile-time constants, so each row's 16-byte alignment is known and its stores
        are whole vectors."""
        pixel = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # axis 0: up to 2³¹ − 1 blocks
        sample = tl.program_id(1).to(tl.int64)
        pixel_ok = (pixel < spatial)[:, None]
        out_rows = out_ptr + (sample * spatial + pixel) * OUT_CHANNELS
        a_rows = a_ptr + sample * A_CHANNELS * spatial + pixel
        b_rows = b_ptr + sample * B_CHANNELS * spatial + pixel
        c_rows = c_ptr + sample * C_CHANNELS * spatial + pixel
        dtype = out_ptr.dtype.element_ty
        for start in range(0, OUT_CHANNELS, BLOCK_C):
            channel = (start + tl.arange(0, BLOCK_C))[None, :]
            b_channel = channel - A_CHANNELS  # the channel's index in part b, c
            c_channel = b_channel - B_CHANNELS
            in_a = channel < A_CHANNELS
            in_b = (b_channel >= 0) & (b_channel < B_CHANNELS)
            in_c = (c_channel >= 0) & (c_channel < C_CHANNELS)
            a = tl.load(a_rows[:, None] + channel.to(tl.int64) * spatial, mask=pixel_ok & in_a, other=0.0)
            b = tl.load(b_rows[:, None] + b_channel.to(tl.int64) * spatial, mask=pixel_ok & in_b, other=0.0)
            c = tl.load(c_rows[:, None] + c_channel.to(tl.int64) * spatial, mask=pixel_ok & in_c, other=0.0)
            value = tl.where(in_a, a.to(dtype), tl.where(in_b, b.to(dtype), tl.where(in_c, c.to(dtype), 0.0)))
            tl.store(out_rows[:, None] + channel, value, mask=pixel_ok & (channel < OUT_CHANNELS))


BLOCK_PIXELS = 64  # a tile is 64 pixels × up to 64 channels: 128-byte reads and writes in half precision
BLOCK_CHANNELS = 64


def _launch(parts: list[Tensor | None], multiple: int, dtype: torch.dtype, launcher) -> Tensor:
    present = [p for p in parts if p is not None]
    batch, _, height, width = (int(s) for s in present[0].shape)  # int(): concrete under dynamic shapes
    channels = [int(p.shape[1]) if p is not None else 0 for p in parts]
    out_channels = padded_channels(sum(channels), multiple)
    out = torch.empty((batch, out_channels, height, width), dtype=dtype, device=present[0].device,
                      memory_format=torch.channels_last)
    spatial = height * width
    if batch * spatial == 0 or out_channels == 0:
        return out
    a, b, c = (p if p is not None else present[0] for p in parts)
    launcher(_channels_last_cat_kernel)[(cdiv(spatial, BLOCK_PIXELS), batch)](
        a, b, c, out, spatial, A_CHANNELS=channels[0], B_CHANNELS=channels[1], C_CHANNELS=channels[2],
        OUT_CHANNELS=out_channels, BLOCK_P=BLOCK_PIXELS, BLOCK_C=min(next_power_of_2(out_channels), BLOCK_CHANNELS),
        num_warps=4,
    )
    return out


if triton is not None:

    @torch.library.triton_op("genie_kernels::channels_last_cat", mutates_args=())
    def _channels_last_cat_op(a: Tensor, b: Tensor | None, c: Tensor | None, multiple: int,
                              dtype: torch.dtype) -> Tensor:
        _check_for_kernel([p for p in (a, b, c) if p is not None], multiple)  # also when called as torch.ops.…
        return _launch([a, b, c], multiple, dtype, torch.library.wrap_triton)


def channels_last_cat(parts: list[Tensor], multiple: int = 1, dtype: torch.dtype | None = None) -> Tensor:
    """``cat(parts, dim=1)``, cast to ``dtype`` (default: the first part's) and zero-padded to a
    multiple of ``multiple`` channels, as one channels-last tensor (see the module docstring).

    The parts must be contiguous (B, Cᵢ, H, W) tensors with one batch size, H×W and device.
    Registered as ``torch.ops.genie_kernels.channels_last_cat``; plain eager calls launch
    the kernel directly (see :func:`~genie_kernels.fast.launch_directly`).
    """
    if triton is None:
        raise RuntimeError("channels_last_cat needs triton; use channels_last_cat_reference")
    _check_for_kernel(parts, multiple)
    dtype = parts[0].dtype if dtype is None else dtype
    padded = list(parts) + [None] * (MAX_PARTS - len(parts))
    if launch_directly(*parts):
        return _launch(padded, multiple, dtype, raw_kernel)
    return _channels_last_cat_op(*padded, multiple, dtype)
