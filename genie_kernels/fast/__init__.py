"""The fast layer: the same sampling as the reference, on fused kernels.

Every module here has a pure-PyTorch twin below it and a test that holds the two equal:
the Triton kernels ``update`` (the fused step; twin ``taylor_update_reference`` beside it,
which follows :mod:`genie_kernels.ode.solvers` and :func:`genie_kernels.heads.base.combine_mixed`),
``group_norm``, ``channels_last_cat`` and ``head_blocks`` (the fused conv head; twin
:meth:`genie_kernels.heads.conv.ConvHead.predict_k`); ``ext`` (the loader of the C++/CUDA
update op of ``csrc/``); ``sampler`` (the solver loop on these ops; twin
:mod:`genie_kernels.ode.solvers`) and ``graph`` (that loop as one CUDA graph).  Imports the
heads, ODE and helper layers only.

This module holds what the Triton kernels share.
Triton runs on CUDA devices, and on the CPU when ``TRITON_INTERPRET=1`` is set before
triton is imported (slow; used by the tests).  :func:`triton_status` says whether the
kernels can run on a given device and, if not, why.

Each op is a ``torch.library.triton_op``, which torch.compile, export and fake-tensor
tracing see through.  In plain eager calls the public wrappers launch the kernel
directly instead (:func:`launch_directly`): the custom-op dispatcher costs a few tens of
microseconds a call, which at batch 1 is more than the kernel runs.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def triton_status(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """``(usable, reason)`` for running the Triton kernels on ``device``."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not hasattr(torch.library, "triton_op"):  # arrived in torch 2.6, the oldest the package supports
        return False, f"torch {torch.__version__} has no torch.library.triton_op (torch 2.6 or newer needed)"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, "triton on CUDA"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter on the CPU (TRITON_INTERPRET=1)"
    return False, f"triton does not run on {device.type} (set TRITON_INTERPRET=1 to interpret it on the CPU)"


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter has no torch-function override


def launch_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether a Triton op may skip the torch.library dispatcher and launch its kernel directly.

    Only in plain eager execution: not while torch.compile traces, not under a dispatch or
    torch-function mode (fake tensors, functionalisation, make_fx, ``with torch.device``),
    only for plain tensors and parameters, and not when autograd would record the op (the
    op then reports that it has no backward, rather than outputs silently without gradients).
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._is_torch_function_mode_enabled():
        return False
    present = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def raw_kernel(kernel):
    """The launcher of a direct launch: the Triton kernel itself (``torch.library.wrap_triton`` otherwise)."""
    return kernel


# Host-side launch arithmetic in plain Python: triton.cdiv / triton.next_power_of_2 are
# constexpr functions in recent Triton, several microseconds a call from host code.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
