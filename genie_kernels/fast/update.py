"""The fused Taylor update of one solver step (TTM1, GENIE's TTM2, AB2) in one launch.

Given the state ``x̄_n``, the network output ``ε_n`` and the γ grid on the device, one
step writes both the new state and the next network input:

    x̄_{n+1} = x̄_n + h ε_n + ½ h² D_n,        x_{n+1} = x̄_{n+1} / sqrt(1 + γ_{n+1}²),
    h = γ_{n+1} − γ_n,

with the derivative estimate ``D_n`` chosen by ``mode``:

* ``"ddim"``:  ``D = 0`` (TTM1);
* ``"genie"``: the head's raw output ``k = (k1, k2, k3)`` (3C channels), combined as
  ``D = −k1/γ + k2 γ/(1+γ²) + k3/(γ(1+γ²))`` at ``γ = γ_n``;
* ``"ab2"``:   ``D = (ε_n − ε_{n−1}) / (γ_n − γ_{n−1})``.

γ values are read from a device tensor at index ``step``, so no value crosses to the
host and the launch can be captured in a CUDA graph.  Arithmetic is float32 for
float16/bfloat16/float32 storage (float64 for float64); ``x̄`` keeps its own dtype, ``x``
takes ε's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..heads.base import combine_mixed
from . import cdiv, launch_directly, next_power_of_2, raw_kernel

MODES = ("ddim", "genie", "ab2")


XBAR_DTYPES = (torch.float32, torch.float64)
EPS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GAMMA_DTYPES = (torch.float64, torch.float32)


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_update_types(xbar, eps, aux, gammas, step, mode) -> None:
    """Argument types of a fused update, as the C++ op (``csrc/taylor_update.cpp``) checks
    them: tensors of the storage dtypes the kernels are built for, an int ``step``."""
    for name, value in (("xbar", xbar), ("eps", eps), ("gammas", gammas)) + ((("aux", aux),) if aux is not None else ()):
        if not isinstance(value, Tensor):
            raise TypeError(f"taylor_update: {name} must be a torch.Tensor, got {type(value).__name__}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"taylor_update: step must be an int, got {type(step).__name__} {step!r}")
    if not isinstance(mode, str):
        raise TypeError(f"taylor_update: mode must be a str, got {type(mode).__name__}")
    for name, value, allowed in (("x̄", xbar, XBAR_DTYPES), ("eps", eps, EPS_DTYPES), ("gammas", gammas, GAMMA_DTYPES)):
        if value.dtype not in allowed:
            raise TypeError(f"taylor_update: {name} must be {_names(allowed)}, got {str(value.dtype).removeprefix('torch.')}")
    if aux is not None and mode != "ddim" and aux.dtype != eps.dtype:
        raise TypeError(f"taylor_update: aux must have eps's dtype {eps.dtype}, got {aux.dtype}")


def _check(xbar: Tensor, eps: Tensor, aux: Tensor | None, gammas: Tensor, step: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown update mode {mode!r}; choose one of {MODES}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"taylor_update: step must be an int, got {type(step).__name__} {step!r}")
    for name, value in (("x̄", xbar), ("eps", eps), ("gammas", gammas), ("aux", aux)):
        if value is not None and (not isinstance(value, Tensor) or not value.is_floating_point()):
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"taylor_update: {name} must be a real floating tensor, got {what}")
    if mode == "genie" and xbar.dim() < 2:
        raise ValueError(f"taylor_update: mode 'genie' needs x̄ shaped (B, C, ...) with a channel dimension, "
                         f"got shape {tuple(xbar.shape)}")
    if eps.shape != xbar.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}, x̄ has {tuple(xbar.shape)}")
    if gammas.dim() != 1 or not 0 <= step < gammas.numel() - 1:
        raise ValueError(f"step {step} is outside the γ grid of {gammas.numel()} points")
    if mode == "genie":
        expected = (xbar.shape[0], 3 * xbar.shape[1], *xbar.shape[2:])
        if aux is None or tuple(aux.shape) != expected:
            raise ValueError(f"mode 'genie' needs the head output k of shape {expected}, got {None if aux is None else tuple(aux.shape)}")
    if mode == "ab2":
        if aux is None or aux.shape != xbar.shape:
            raise ValueError("mode 'ab2' needs the previous eps, shaped like x̄")
        if step < 1:
            raise ValueError("mode 'ab2' needs a previous step (step >= 1)")


def taylor_update_reference(
    xbar: Tensor, eps: Tensor, gammas: Tensor, step: int, mode: str = "genie", aux: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch twin of :func:`taylor_update` (``aux`` is k for genie, ε_{n−1} for ab2)."""
    _check(xbar, eps, aux, gammas, step, mode)
    compute = torch.float64 if xbar.dtype == torch.float64 else torch.float32
    g = gammas.to(torch.float64)
    g0, g1 = g[step], g[step + 1]
    h = (g1 - g0).to(compute)
    e = eps.to(compute)
    increment = h * e
    if mode == "genie":
        increment = increment + 0.5 * h * h * combine_mixed(aux.to(compute), g0.to(compute).expand(xbar.shape[0]))
    elif mode == "ab2":
        increment = increment + 0.5 * h * h * (e - aux.to(compute)) / (g0 - g[step - 1]).to(compute)
    new_xbar = xbar.to(compute) + increment
    new_x = new_xbar * torch.rsqrt(1.0 + g1 * g1).to(compute)
    return new_xbar.to(xbar.dtype), new_x.to(eps.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path works without triton
    triton = None

if triton is not None:

    # ``step`` only indexes the γ grid: left unspecialised, one compiled variant serves every
    # step (the JIT would otherwise build separate ones for step 1 and for multiples of 16).
    @triton.jit(do_not_specialize=["step"])
    def _taylor_update_kernel(
        xbar_ptr, eps_ptr, aux_ptr, gammas_ptr, new_xbar_ptr, new_x_ptr,
        step, numel, per_sample,
        MODE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        compute = COMPUTE
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g0 = tl.load(gammas_ptr + step).to(tl.float64)
        g1 = tl.load(gammas_ptr + step + 1).to(tl.float64)
        h = (g1 - g0).to(compute)
        eps = tl.load(eps_ptr + offsets, mask=mask).to(compute)
        increment = h * eps
        if MODE == 1:  # genie: k1, k2, k3 are channel blocks of 3C channels per sample
            sample = offsets // per_sample
            k_offsets = offsets + 2 * sample * per_sample
            k1 = tl.load(aux_ptr + k_offsets, mask=mask).to(compute)
            k2 = tl.load(aux_ptr + k_offsets + per_sample, mask=mask).to(compute)
            k3 = tl.load(aux_ptr + k_offsets + 2 * per_sample, mask=mask).to(compute)
            g = g0.to(compute)
            one_plus_g2 = 1.0 + g * g
            derivative = -k1 / g + k2 * (g / one_plus_g2) + k3 / (g * one_plus_g2)
            increment += 0.5 * h * h * derivative
        if MODE == 2:  # ab2: finite difference with the previous eps
            g_prev = tl.load(gammas_ptr + step - 1).to(tl.float64)
            eps_prev = tl.load(aux_ptr + offsets, mask=mask).to(compute)
            increment += 0.5 * h * h * (eps - eps_prev) / (g0 - g_prev).to(compute)
        new_xbar = tl.load(xbar_ptr + offsets, mask=mask).to(compute) + increment
        scale = (1.0 / tl.sqrt(1.0 + g1 * g1)).to(compute)
        tl.store(new_xbar_ptr + offsets, new_xbar.to(new_xbar_ptr.dtype.element_ty), mask=mask)
        tl.store(new_x_ptr + offsets, (new_xbar * scale).to(new_x_ptr.dtype.element_ty), mask=mask)


def _launch(xbar: Tensor, eps: Tensor, aux: Tensor | None, gammas: Tensor, step: int, mode: str, launcher):
    """Allocate the outputs and launch the kernel (``launcher`` wraps it for torch.library, or
    is :func:`raw_kernel` for a direct launch)."""
    new_xbar, new_x = torch.empty_like(xbar), torch.empty_like(eps)
    numel = int(xbar.numel())  # int(): a concrete size under torch.compile's dynamic shapes
    if numel == 0:
        return new_xbar, new_x
    block = 1024 if numel >= 1024 else next_power_of_2(max(numel, 16))
    launcher(_taylor_update_kernel)[(cdiv(numel, block),)](
        xbar, eps, eps if aux is None else aux, gammas, new_xbar, new_x,
        step, numel, numel // int(xbar.shape[0]) if xbar.dim() else numel,  # a 0-D x̄ is one sample
        MODE=MODES.index(mode), COMPUTE=tl.float64 if xbar.dtype == torch.float64 else tl.float32, BLOCK=block,
    )
    return new_xbar, new_x


def _check_for_kernel(xbar, eps, aux, gammas, step, mode) -> None:
    """What the reference needs (:func:`_check`), and the dtypes, device and layout the kernel needs."""
    _check(xbar, eps, aux, gammas, step, mode)
    check_update_types(xbar, eps, aux, gammas, step, mode)
    tensors = [xbar, eps, gammas] + ([aux] if aux is not None else [])
    if any(t.device != xbar.device for t in tensors):
        raise ValueError("x̄, eps, aux and gammas must be on one device")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("taylor_update needs contiguous tensors")


if triton is not None:

    @torch.library.triton_op("genie_kernels::taylor_update", mutates_args=())
    def _taylor_update_op(
        xbar: Tensor, eps: Tensor, aux: Tensor | None, gammas: Tensor, step: int, mode: str
    ) -> tuple[Tensor, Tensor]:
        _check_for_kernel(xbar, eps, aux, gammas, step, mode)  # also when called as torch.ops.…
        return _launch(xbar, eps, aux, gammas, step, mode, torch.library.wrap_triton)


def taylor_update(
    xbar: Tensor, eps: Tensor, gammas: Tensor, step: int, mode: str = "genie", aux: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One fused solver step; returns ``(x̄_{n+1}, x_{n+1})``.  See the module docstring.

    ``aux`` is the head output k (3C channels) for ``"genie"`` and ε_{n−1} for ``"ab2"``.
    All tensors must be contiguous and on one device; ``gammas`` is the γ grid (float64
    recommended).  Registered as the custom op ``torch.ops.genie_kernels.taylor_update``;
    plain eager calls launch the kernel directly (see :func:`~genie_kernels.fast.launch_directly`).
    """
    if triton is None:
        raise RuntimeError("taylor_update needs triton; use taylor_update_reference")
    _check_for_kernel(xbar, eps, aux, gammas, step, mode)
    if launch_directly(xbar, eps, gammas, aux):
        return _launch(xbar, eps, aux, gammas, step, mode, raw_kernel)
    return _taylor_update_op(xbar, eps, aux, gammas, step, mode)
