"""gpu_check parts 1-5: the GPU tests, copy bandwidth, the update kernel, the head and its
GroupNorm launches, host cost per launch (see bench/gpu_check.py)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import time
from unittest import mock

import torch

import gpu_common
from gpu_common import ROOT, bench, count_launches, row


def build_extension() -> None:
    from genie_kernels.fast import ext

    start = time.perf_counter()
    ext.load()
    row("C++/CUDA extension (JIT build)", f"{ext.status()[1]} in {time.perf_counter() - start:.0f} s")


def run_tests() -> None:
    """The GPU tests, in a child process: a crash there (a segfault in an extension) is
    reported as a row instead of ending this check."""
    import subprocess

    start = time.perf_counter()
    files = ["fast/test_update.py", "fast/test_head_blocks.py", "fast/test_channels_last_cat.py", "fast/test_ext.py",
             "fast/test_backends.py"]
    # Most of their time is Triton compiling kernel variants on the CPU: with pytest-xdist
    # (carried as a wheel, see above) four processes share the work.
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *workers,
                          *(str(ROOT / "tests" / f) for f in files)], capture_output=True, text=True, timeout=400)
    lines = run.stdout.strip().splitlines()
    if gpu_common.OUT_DIR is not None:
        (gpu_common.OUT_DIR / "tests.txt").write_text(run.stdout + run.stderr)
    if run.returncode < 0:
        outcome = f"CRASHED (signal {-run.returncode}) after: {' | '.join(lines[-3:])[-300:]}"
    else:
        failed = [line[len("FAILED "):][:120] for line in lines if line.startswith("FAILED ")]
        outcome = (lines[-1] if lines else "no output") + ("; " + "; ".join(failed[:5]) if failed else "")
    row("GPU tests (kernels, C++ op, CUDA graphs)", f"{outcome} ({time.perf_counter() - start:.0f} s)")


def copy_bandwidth() -> float:
    src = torch.randn(64 * 2**20, device="cuda")  # 256 MB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * 4 / ms / 1e6
    row("device copy bandwidth (read + write)", f"{gbps:.0f} GB/s")
    return gbps


def update_kernel(copy_gbps: float) -> None:
    from genie_kernels.fast.update import taylor_update, taylor_update_reference

    gammas = torch.tensor([152.2, 40.0, 3.0, 0.5, 0.01], dtype=torch.float64, device="cuda")
    compiled = torch.compile(taylor_update_reference)
    for mb in (16, 64, 256):
        n = mb * 2**20 // 2  # fp16 elements of ε in mb MB
        c = 4
        shape = (n // (c * 64 * 64), c, 64, 64)
        xbar = torch.randn(shape, device="cuda")
        eps = torch.randn(shape, device="cuda", dtype=torch.float16)
        k = torch.randn(shape[0], 3 * c, 64, 64, device="cuda", dtype=torch.float16)
        args = (xbar, eps, gammas, 2, "genie", k)
        fused = bench(lambda: taylor_update(*args))
        eager = bench(lambda: taylor_update_reference(*args))
        comp = bench(lambda: compiled(*args))
        moved = xbar.numel() * (4 + 2 + 6 + 4 + 2)  # x̄ r/w fp32, ε, k (3C), x out fp16
        gbps = moved / fused / 1e6
        row(f"update kernel {mb} MB ε: fused / eager / compiled", f"{fused:.3f} / {eager:.3f} / {comp:.3f} ms")
        row(f"update kernel {mb} MB ε: bandwidth", f"{gbps:.0f} GB/s = {100 * gbps / copy_gbps:.0f}% of copy")


def head_forward() -> None:
    from cases import head_case

    from genie_kernels.fast.channels_last_cat import channels_last_cat, channels_last_cat_reference
    from genie_kernels.fast.head_blocks import fused_head_k
    from genie_kernels.ode.protocol import ModelOutput

    head, x, out, gamma = head_case(256)
    compiled = torch.compile(head.predict_k)
    variants = {
        "eager": head.predict_k,
        "fused NCHW": lambda *a: fused_head_k(head, *a, channels_last=False),
        "fused NHWC": lambda *a: fused_head_k(head, *a, channels_last=True),
        "compiled": compiled,
    }
    with torch.no_grad():
        ref = head.predict_k(x, out, gamma).float()
        for name in ("fused NCHW", "fused NHWC"):
            rel = float((variants[name](x, out, gamma).float() - ref).norm() / ref.norm())
            row(f"head: {name} vs eager rel. diff (fp16)", f"{rel:.1e}")
        ms = {name: bench(lambda: f(x, out, gamma)) for name, f in variants.items()}
        launches = {name: count_launches(lambda: f(x, out, gamma), f"head b256 {name}") for name, f in variants.items()}
        settings_ms = bench_group_norm_settings(lambda: variants["fused NHWC"](x, out, gamma))
        parts = [x, out.eps, out.features]
        compiled_cat = torch.compile(channels_last_cat_reference)
        cat_ms = {name: bench(lambda: f(parts, 8)) for name, f in (
            ("channels_last_cat", channels_last_cat), ("cat + channels-last copy", channels_last_cat_reference),
            ("compiled", compiled_cat))}
    row("head b256 32x32 nf128 fp16 (ms): " + " / ".join(ms), " / ".join(f"{v:.3f}" for v in ms.values()))
    for name in ("fused NCHW", "fused NHWC"):
        row(f"head: {name} speed-up over eager; over compiled",
            f"{ms['eager'] / ms[name]:.2f}x; {ms['compiled'] / ms[name]:.2f}x")
    row("head: kernel launches " + " / ".join(launches), " / ".join(map(str, launches.values())))
    row("head b256 fused NHWC (ms) by GN setting: " + " / ".join(settings_ms),
        " / ".join(f"{v:.3f}" for v in settings_ms.values()))
    row("head's NHWC input b256, 134 -> 136 channels (ms): " + " / ".join(cat_ms),
        " / ".join(f"{v:.3f}" for v in cat_ms.values()))
    # Where NHWC starts to pay (head_blocks.CHANNELS_LAST_MIN_BATCH): at small batches the head
    # is bound by launches, and NHWC adds a few (the weights' and the output's conversions).
    for batch in (1, 4, 16, 64):
        part = (x[:batch], ModelOutput(out.eps[:batch], out.features[:batch], out.temb[:batch]), gamma[:batch])
        with torch.no_grad():
            small = {name: bench(lambda: variants[name](*part)) for name in ("eager", "fused NCHW", "fused NHWC")}
        row(f"head b{batch} (ms): " + " / ".join(small), " / ".join(f"{v:.3f}" for v in small.values()))


# Channels-last GroupNorm settings to compare (group_norm's module constants, each pinned so
# that a label stays true when the defaults move): channels per program, slab in registers
# (up to SLAB_ELEMENTS) or two passes over tiles, tile elements per thread.
GROUP_NORM_SETTINGS = {
    f"{channels}ch{' tiles' if slab == 0 else ''} {per_thread}/thread": {
        "ROW_CHANNELS": channels, "SLAB_ELEMENTS": slab, "ELEMENTS_PER_THREAD": per_thread}
    for channels, slab, per_thread in ((8, 16384, 16), (8, 16384, 32), (16, 16384, 16), (16, 16384, 32),
                                       (32, 32768, 32), (32, 0, 16))
}


@contextlib.contextmanager
def group_norm_settings(settings: dict):
    """``group_norm``'s module constants set to ``settings``, to compare launch configurations
    side by side; set around a whole timing, not inside the timed call."""
    from genie_kernels.fast import group_norm

    with mock.patch.multiple(group_norm, **settings):
        group_norm.launch_config.cache_clear()  # configurations are cached per shape
        try:
            yield
        finally:
            group_norm.launch_config.cache_clear()


def bench_group_norm_settings(call) -> dict:
    """``bench(call)`` (ms) under each of :data:`GROUP_NORM_SETTINGS`."""
    timings = {}
    for name, settings in GROUP_NORM_SETTINGS.items():
        with group_norm_settings(settings):
            timings[name] = bench(call)
    return timings


def group_norm_kernel(copy_gbps: float) -> None:
    """The head's heavier GroupNorm launch alone (bias + residual: reads h and the residual, writes
    y and out) at b256, C128, 32x32, fp16: by layout and channels-last setting, against eager."""
    import torch.nn.functional as F

    from genie_kernels.fast.group_norm import group_norm_silu

    h = torch.randn(256, 128, 32, 32, device="cuda", dtype=torch.float16)
    residual, bias = torch.randn_like(h), torch.randn_like(h[:, :, 0, 0])
    weight = torch.randn(128, device="cuda", dtype=h.dtype)

    def eager(h, residual):
        y = (residual + h + bias[:, :, None, None]) * 0.5
        return F.silu(F.group_norm(y, 32, weight, weight)), y

    us = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        args = (h.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt))
        us[f"eager {layout}"] = 1e3 * bench(lambda: eager(*args))
        fused = functools.partial(group_norm_silu, args[0], weight, weight, 32, bias=bias, residual=args[1],
                                  residual_scale=0.5)
        if layout == "NCHW":
            us["fused NCHW"] = 1e3 * bench(fused)
        else:
            us |= {f"fused NHWC {name}": 1e3 * ms for name, ms in bench_group_norm_settings(fused).items()}
    moved = 4 * h.numel() * h.element_size()
    row("GN+SiLU with residual b256 C128 32x32 fp16 (us): " + " / ".join(us),
        " / ".join(f"{v:.0f}" for v in us.values()))
    best = min((name for name in us if name.startswith("fused")), key=us.get)
    gbps = moved / us[best] / 1e3
    row("GN+SiLU: fastest fused, bandwidth", f"{best}: {gbps:.0f} GB/s = {100 * gbps / copy_gbps:.0f}% of copy")


def host_costs() -> None:
    """Batch-1 host time per call (no sync inside): the GN op as the sampler calls it (a direct
    Triton launch), through the torch.library dispatcher, and eager GroupNorm + SiLU."""
    import torch.nn.functional as F

    from genie_kernels.fast import group_norm as gn

    h = torch.randn(1, 64, 32, 32, device="cuda", dtype=torch.float16)
    w = torch.ones(64, device="cuda", dtype=torch.float16)
    calls = {
        "group_norm_silu (direct launch)": lambda: gn.group_norm_silu(h, w, w, 8),
        "through the custom op": lambda: torch.ops.genie_kernels.group_norm_silu(h, w, w, 8, 1e-5, None, None, 1.0),
        "eager GN + SiLU": lambda: F.silu(F.group_norm(h, 8, w, w)),
    }
    us = {}
    for name, call in calls.items():
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(1000):
            call()
        us[name] = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
    row("GN b1 host time per call (us): " + " / ".join(us), " / ".join(f"{v:.0f}" for v in us.values()))
