"""One-shot GPU check for a lent GPU machine: tests, then a short table of timings.

    python bench/gpu_check.py            # about 2-4 minutes on an H100

1. The GPU tests of the Triton kernels (tests/test_kernels_*.py) against their
   PyTorch references.
2. Device-to-device copy bandwidth (bytes read + written), the yardstick of (3).
3. The fused Taylor update (GENIE mode, fp16 ε/k/x, fp32 x̄) at ≥ 16 MB: time, achieved
   bandwidth as a fraction of the copy's, against the eager reference and
   torch.compile of the reference.
4. The conv head's k (1 block, nf 128, 32 groups, features 128, temb 512) at batch 256,
   32×32, fp16: eager ``ConvHead.predict_k`` vs the fused head vs torch.compile of
   ``predict_k``, and the number of kernel launches of each (profiler).  The combine into
   dε/dγ is part of the update kernel on the fused path.
5. ``sample(..., backend="triton")`` vs ``backend="reference"`` for 10-step GENIE and
   DDIM at batch 1 and 256, fp16, on a random-weight UNet of this package (32×32×3).

Times are medians of CUDA-event timings (triton.testing.do_bench); ratios are taken side
by side in this one process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:60s} {value}", flush=True)


def bench(fn, rep_ms: int = 200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def run_tests() -> None:
    import pytest

    start = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_kernels_update.py"),
                        str(ROOT / "tests/test_kernels_head.py")])
    row("GPU kernel tests", f"{'passed' if code == 0 else f'FAILED (pytest exit {int(code)})'} in {time.perf_counter() - start:.0f} s")


def copy_bandwidth() -> float:
    src = torch.randn(64 * 2**20, device="cuda")  # 256 MB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * 4 / ms / 1e6
    row("device copy bandwidth (read + write)", f"{gbps:.0f} GB/s")
    return gbps


def update_kernel(copy_gbps: float) -> None:
    from genie_kernels.kernels.update import taylor_update, taylor_update_reference

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


def count_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def head_forward() -> None:
    from genie_kernels.head import ConvHead
    from genie_kernels.kernels.head_blocks import fused_head_k
    from genie_kernels.models import ModelOutput

    head = ConvHead(3, feature_channels=128, temb_channels=512, nf=128, num_blocks=1, groups=32)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    head = head.cuda().half().eval()
    b = 256
    x, eps = (torch.randn(b, 3, 32, 32, device="cuda", dtype=torch.float16) for _ in range(2))
    out = ModelOutput(eps, torch.randn(b, 128, 32, 32, device="cuda", dtype=torch.float16),
                      torch.randn(b, 512, device="cuda", dtype=torch.float16))
    gamma = torch.full((b,), 0.7, device="cuda")
    compiled = torch.compile(head.predict_k)
    with torch.no_grad():
        eager = bench(lambda: head.predict_k(x, out, gamma))
        fused = bench(lambda: fused_head_k(head, x, out, gamma))
        comp = bench(lambda: compiled(x, out, gamma))
        launches = [count_launches(lambda: f(x, out, gamma)) for f in (head.predict_k, lambda *a: fused_head_k(head, *a), compiled)]
    row("head b256 32x32 nf128 fp16: eager / fused / compiled", f"{eager:.3f} / {fused:.3f} / {comp:.3f} ms")
    row("head: fused speed-up over eager; over compiled", f"{eager / fused:.2f}x; {comp / fused:.2f}x")
    row("head: kernel launches eager / fused / compiled", " / ".join(map(str, launches)))


def sampler() -> None:
    import genie_kernels as gk
    from genie_kernels.head import ConvHead
    from genie_kernels.unet import UNet

    model = UNet(image_size=32, in_channels=3, channels=64, channel_mults=(1, 2, 2), attn_resolutions=(8,))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.cuda().half().eval()
    head = ConvHead(3, feature_channels=model.feature_channels, temb_channels=model.temb_dim, nf=64, groups=8)
    head = head.cuda().half().eval()
    for batch in (1, 256):
        noise = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16)
        for solver, extra in (("ddim", {}), ("genie", {"head": head})):
            times = {}
            for backend in ("reference", "triton"):
                times[backend] = bench(lambda: gk.sample(model, noise, 10, solver=solver, backend=backend, **extra), rep_ms=500)
            ref = gk.sample(model, noise, 10, solver=solver, backend="reference", **extra).float()
            got = gk.sample(model, noise, 10, solver=solver, backend="triton", **extra).float()
            rel = float((got - ref).norm() / ref.norm())
            row(f"sample {solver} 10 steps b{batch} fp16: reference / triton",
                f"{times['reference']:.2f} / {times['triton']:.2f} ms ({times['reference'] / times['triton']:.2f}x), rel diff {rel:.1e}")


def guarded(step, *args):
    """Run one part; a failure is reported as a row and must not hide the other parts."""
    try:
        return step(*args)
    except Exception as err:
        row(f"{step.__name__} FAILED", f"{type(err).__name__}: {err}"[:200])
        return None


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 1
    os.chdir(ROOT)
    row("device", f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    guarded(run_tests)
    copy_gbps = guarded(copy_bandwidth) or float("nan")
    guarded(update_kernel, copy_gbps)
    guarded(head_forward)
    guarded(sampler)
    print("\n| check | result |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
