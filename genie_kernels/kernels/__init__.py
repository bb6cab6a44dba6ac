"""Fused Triton kernels, each with a pure-PyTorch reference twin in the same module.

Triton runs on CUDA devices, and on the CPU when ``TRITON_INTERPRET=1`` is set before
triton is imported (slow; used by the tests).  :func:`triton_status` says whether the
kernels can run on a given device and, if not, why.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_status(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """``(usable, reason)`` for running the Triton kernels on ``device``."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, "triton on CUDA"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter on the CPU (TRITON_INTERPRET=1)"
    return False, f"triton does not run on {device.type} (set TRITON_INTERPRET=1 to interpret it on the CPU)"
