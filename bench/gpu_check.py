"""One-shot GPU check for a lent GPU machine: tests, then a short table of timings.

    python bench/gpu_check.py                  # about 3-5 minutes on an H100
    python bench/gpu_check.py --out results/   # also keep the table and profiler tables

On a lent machine without diffusers, carry the wheels of diffusers, importlib_metadata and,
to run the tests in four processes, pytest-xdist and execnet (an untracked ``.whl/`` folder),
and run ``pip install -q --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
python bench/gpu_check.py --out $OUT/gpu``.

1. The GPU tests of the Triton kernels (tests/fast/) against their
   PyTorch references.
2. Device-to-device copy bandwidth (bytes read + written), the yardstick of (3).
3. The fused Taylor update (GENIE mode, fp16 ε/k/x, fp32 x̄) at ≥ 16 MB: time, achieved
   bandwidth as a fraction of the copy's, against the eager reference and
   torch.compile of the reference.
4. The head's heavier GroupNorm launch alone (bias and residual) at batch 256, C128,
   32×32, fp16: eager and fused in both layouts, the channels-last kernel under each of
   :data:`GROUP_NORM_SETTINGS`, and the fastest one's bandwidth against the copy's.
   Then the conv head's k (1 block, nf 128, 32 groups, features 128, temb 512) at batch 256,
   32×32, fp16: eager ``ConvHead.predict_k`` vs the fused head in both layouts (NCHW and
   channels-last, the latter also under each GroupNorm setting) vs torch.compile
   of ``predict_k``, and the number of kernel launches of each (profiler); the NHWC
   input alone (``channels_last_cat`` vs cat + copy vs compiled); eager and both
   fused layouts again at batch 1, 4, 16 and 64 (where channels-last starts to pay).  The
   combine into dε/dγ is part of the update kernel on the fused path.
5. Batch-1 host cost per GroupNorm launch: as the sampler calls it (direct Triton launch),
   through the torch.library dispatcher, and eager ``group_norm`` + ``silu``.
6. ``sample(..., backend="triton")`` vs ``backend="reference"`` for 10-step GENIE and
   DDIM at batch 1 and 256, fp16, on a random-weight UNet of this package (32×32×3), timed
   in turns (:func:`bench_interleaved`: synchronised wall time, median of 15 rounds); the
   batch-1 GENIE calls once more under the profiler (host vs GPU time, costliest host ops).
7. The whole loop in one CUDA graph (:class:`genie_kernels.GenieSampler`): 10-step GENIE
   latency at batch 1 and throughput at batch 256, fp16, for the bundled MNIST model and
   a diffusers ``UNet2DModel`` with the DDPM CIFAR-10 architecture (35.7 M parameters,
   random weights), against the eager reference loop, the Triton loop, a diffusers
   ``DDIMScheduler`` loop and the reference loop around a
   ``torch.compile(mode="reduce-overhead")`` network; the graphed DDIM loop with the same
   network (what head + update add); capture time, the first in the process (with the
   Triton kernels' JIT compilation) and again for a new sampler; how long the host waits
   in a replay.
8. The first capture as a user meets it, in a new process: with Triton's kernel cache
   empty, and again with it filled.

The C++ extension is built first (JIT, nvcc, sm_90 only).  Parts that would overrun the
time budget (``--budget`` seconds, default 420) are skipped and say so.

Times are medians of CUDA-event timings (triton.testing.do_bench); ratios are taken side
by side in this one process.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import importlib.util
import os
import pstats
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS: list[tuple[str, str]] = []
OUT_DIR: Path | None = None  # --out: profiler tables and the result table go here


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:60s} {value}", flush=True)
    if OUT_DIR is not None:  # kept row by row, so a run stopped by a time limit still leaves its rows
        with open(OUT_DIR / "rows.md", "a") as f:
            f.write(f"| {name} | {value} |\n")


def bench(fn, rep_ms: int = 200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def bench_interleaved(calls: dict, rounds: int = 15) -> dict:
    """Median synchronised wall time (ms) of each call, the calls taking turns round by round so
    that a noisy host's drift hits them alike: for eager loops bound by host time, whose
    ratios varied by ±20 % between back-to-back ``bench`` runs on the lent H100."""
    import statistics

    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


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
    if OUT_DIR is not None:
        (OUT_DIR / "tests.txt").write_text(run.stdout + run.stderr)
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


def count_launches(fn, label: str | None = None) -> int:
    """Kernel launches of one call (profiler); with ``--out`` and a label, also its kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if OUT_DIR is not None and label is not None:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
        (OUT_DIR / f"kernels_{label.replace(' ', '_').replace(',', '')}.txt").write_text(table)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


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


def profile_call(label: str, fn, out_dir: Path | None) -> None:
    """One call under the profiler: host wall time, GPU kernel time, the costliest host ops."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:4]
    row(f"{label}: profiled wall / GPU kernel time", f"{wall:.1f} / {device_us / 1e3:.1f} ms")
    row(f"{label}: top host ops (self ms, calls)",
        "; ".join(f"{e.key[:36]} {e.self_cpu_time_total / 1e3:.1f} ({e.count})" for e in top))
    python_profile = cProfile.Profile()  # the Python side: which functions the host time is spent in
    python_profile.runcall(fn)
    torch.cuda.synchronize()
    stats = pstats.Stats(python_profile)
    entries = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:4]  # by own time
    row(f"{label}: top Python functions (own ms, calls)",
        "; ".join(f"{Path(file).name}:{line}({name}) {own * 1e3:.1f} ({calls})"
                  for (file, line, name), (_, calls, own, _, _) in entries))
    if out_dir is not None:
        name = label.replace(" ", "_")
        (out_dir / f"profile_{name}.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=30))
        with open(out_dir / f"python_profile_{name}.txt", "w") as f:
            pstats.Stats(python_profile, stream=f).sort_stats("tottime").print_stats(30)


def sampler() -> None:
    from cases import unet_and_head

    import genie_kernels as gk

    model, head = unet_and_head()
    for batch in (1, 256):
        noise = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16)
        for solver, extra in (("ddim", {}), ("genie", {"head": head})):
            times = bench_interleaved({backend: functools.partial(gk.sample, model, noise, 10, solver=solver,
                                                                  backend=backend, **extra)
                                       for backend in ("reference", "triton")})
            ref = gk.sample(model, noise, 10, solver=solver, backend="reference", **extra).float()
            got = gk.sample(model, noise, 10, solver=solver, backend="triton", **extra).float()
            rel = float((got - ref).norm() / ref.norm())
            row(f"sample {solver} 10 steps b{batch} fp16: reference / triton",
                f"{times['reference']:.2f} / {times['triton']:.2f} ms ({times['reference'] / times['triton']:.2f}x), rel diff {rel:.1e}")
            if batch == 1 and solver == "genie":
                for backend in ("reference", "triton"):
                    run = lambda: gk.sample(model, noise, 10, solver=solver, backend=backend, **extra)  # noqa: E731
                    profile_call(f"b1 genie {backend}", run, OUT_DIR)


def cifar10_unet():
    """diffusers ``UNet2DModel`` with the DDPM CIFAR-10 architecture, random weights."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                       downsample_padding=0, attention_head_dim=None)


@functools.cache
def models_for_graphs():
    """``{name: (adapter, head, shape, diffusers unet or None)}``, fp16 on the GPU (built once)."""
    import genie_kernels as gk
    from genie_kernels.heads.conv import ConvHead

    mnist, mnist_head, _ = gk.load_pretrained("mnist")
    torch.manual_seed(0)
    unet = cifar10_unet().cuda().half().eval()
    cifar = gk.UNet2DAdapter(unet, jvp_safe=False)
    head = ConvHead(3, feature_channels=128, temb_channels=512, nf=128, num_blocks=1, groups=32)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return {
        "MNIST 1.1M": (mnist.cuda().half().eval(), mnist_head.cuda().half().eval(), (1, 28, 28), None),
        "CIFAR10 DDPM 35.7M": (cifar, head.cuda().half().eval(), (3, 32, 32), unet),
    }


def diffusers_ddim_loop(unet, noise, steps=10):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, return_dict=False)[0], t, x, return_dict=False)[0]
    return x


def host_wait_ms(sampler, noise) -> tuple[float, float]:
    """(host time of one call, device time of it): a call without host sync returns early."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    sampler(noise)
    end.record()
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return host, start.elapsed_time(end)


def whole_loop_graphs(deadline: float) -> None:
    import genie_kernels as gk
    from genie_kernels.fast.graph import GenieSampler

    for name, (model, head, shape, unet) in models_for_graphs().items():
        for batch in (1, 256):
            if time.perf_counter() > deadline:
                row(f"{name} b{batch}", "skipped: time budget")
                continue
            noise = torch.randn(batch, *shape, device="cuda", dtype=torch.float16)
            genie = GenieSampler(model, 10, solver="genie", head=head, check_finite=False)
            ddim = GenieSampler(model, 10, solver="ddim", check_finite=False)
            genie(noise), ddim(noise)
            rep = 300 if batch == 1 else 600
            times = {
                "reference": bench(lambda: gk.sample(model, noise, 10, solver="genie", head=head, backend="reference"), rep),
                "triton": bench(lambda: gk.sample(model, noise, 10, solver="genie", head=head, backend="triton"), rep),
                "graph": bench(lambda: genie(noise), rep),
                "graph ddim": bench(lambda: ddim(noise), rep),
            }
            if unet is not None:
                times["diffusers DDIM"] = bench(lambda: diffusers_ddim_loop(unet, noise), rep)
            unit = "ms" if batch == 1 else "samples/s"
            shown = {k: (f"{v:.2f}" if batch == 1 else f"{batch / v * 1e3:.0f}") for k, v in times.items()}
            row(f"{name} b{batch} 10-step GENIE ({unit}): " + " / ".join(shown), " / ".join(shown.values()))
            row(f"{name} b{batch}: head + update over graphed DDIM", f"+{100 * (times['graph'] / times['graph ddim'] - 1):.1f}%")
            again = GenieSampler(model, 10, solver="genie", head=head, check_finite=False)
            again(noise)
            row(f"{name} b{batch}: capture s: first (of it warm-up) / a new sampler, same shape",
                f"{genie.capture_seconds:.2f} ({genie.warmup_seconds:.2f}) / {again.capture_seconds:.2f} "
                f"({again.warmup_seconds:.2f})")
            del again
            host, device = host_wait_ms(genie, noise)
            row(f"{name} b{batch}: one call, host returns after / device runs", f"{host:.2f} / {device:.2f} ms")
            ref = gk.sample(model, noise, 10, solver="genie", head=head, backend="reference").float()
            rel = float((genie(noise).float() - ref).norm() / ref.norm())
            row(f"{name} b{batch}: graph vs reference rel. diff (fp16)", f"{rel:.1e}")
            # In a replay only GPU time counts, unlike the host-bound eager head rows at small batches.
            layouts = {layout: graph_with_head_layout(model, head, noise, channels_last)
                       for layout, channels_last in (("NCHW", False), ("NHWC", True))}
            layout_ms = {layout: bench(lambda: sampler(noise), rep) for layout, sampler in layouts.items()}
            del layouts
            row(f"{name} b{batch}: graph with the head in NCHW / NHWC (ms)",
                " / ".join(f"{v:.2f}" for v in layout_ms.values()))


def graph_with_head_layout(model, head, noise, channels_last: bool):
    """A GENIE sampler captured with the fused head in the given layout (fixed at capture)."""
    from genie_kernels.fast.graph import GenieSampler
    from genie_kernels.fast import head_blocks

    with mock.patch.object(head_blocks, "CHANNELS_LAST_MIN_BATCH", 1 if channels_last else sys.maxsize):
        sampler = GenieSampler(model, 10, solver="genie", head=head, check_finite=False)
        sampler(noise)
    return sampler


def capture_probe() -> None:
    """``--capture-probe`` (run by :func:`fresh_process_capture`): one first capture, then exit."""
    from genie_kernels.fast.graph import GenieSampler

    model, head, shape, _ = models_for_graphs()["CIFAR10 DDPM 35.7M"]
    sampler = GenieSampler(model, 10, solver="genie", head=head, check_finite=False)
    sampler(torch.randn(1, *shape, device="cuda", dtype=torch.float16))
    print(f"CAPTURE {sampler.capture_seconds:.3f} {sampler.warmup_seconds:.3f}")


def fresh_process_capture() -> None:
    """The first capture as a user meets it: in a new process (CUDA, cuDNN and cuBLAS set up
    for the first time), with Triton's kernel cache empty and then filled by the first run."""
    import subprocess
    import tempfile

    shown = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        for _ in ("empty", "filled"):
            start = time.perf_counter()
            run = subprocess.run([sys.executable, __file__, "--capture-probe"], env=env, capture_output=True,
                                 text=True, timeout=240)
            process = time.perf_counter() - start
            line = next((line for line in run.stdout.splitlines() if line.startswith("CAPTURE ")), None)
            if line is None:
                raise RuntimeError(f"the probe failed: {run.stderr.strip()[-300:]}")
            capture, warmup = map(float, line.split()[1:])
            shown.append(f"{capture:.2f} ({warmup:.2f}) of {process:.0f}")
    row("CIFAR10 DDPM 35.7M b1, first capture in a new process, s (of it warm-up) of the process's s: "
        "Triton cache empty / filled", " / ".join(shown))


def compiled_loops(deadline: float) -> None:
    """Batch 1, CIFAR-10 UNet: the graph with a compiled network vs reduce-overhead compile."""
    import genie_kernels as gk
    from genie_kernels.fast.graph import GenieSampler

    name = "CIFAR10 DDPM 35.7M"
    model, head, shape, _ = models_for_graphs()[name]
    noise = torch.randn(1, *shape, device="cuda", dtype=torch.float16)
    start = time.perf_counter()
    genie = GenieSampler(model, 10, solver="genie", head=head, compile_model=True, check_finite=False)
    genie(noise)
    row(f"{name} b1: compile + capture", f"{time.perf_counter() - start:.0f} s")
    graphed = bench(lambda: genie(noise), 300)
    if time.perf_counter() > deadline:
        row(f"{name} b1 10-step GENIE, graph + compiled network", f"{graphed:.2f} ms (reduce-overhead skipped: time budget)")
        return
    plain = gk.UNet2DAdapter(model.unet, jvp_safe=False)
    plain.forward_features = torch.compile(plain.forward_features, mode="reduce-overhead", dynamic=False)
    start = time.perf_counter()
    run = lambda: gk.sample(plain, noise, 10, solver="genie", head=head, backend="reference")  # noqa: E731
    run(), run(), run()
    row(f"{name} b1: reduce-overhead compile", f"{time.perf_counter() - start:.0f} s")
    reduce_overhead = bench(run, 300)
    row(f"{name} b1 10-step GENIE (ms): graph + compiled net / reference loop, reduce-overhead net",
        f"{graphed:.2f} / {reduce_overhead:.2f}")


def guarded(step, *args):
    """Run one part; a failure is reported as a row and must not hide the other parts."""
    try:
        return step(*args)
    except Exception as err:
        row(f"{step.__name__} FAILED", f"{type(err).__name__}: {err}"[:300])
        return None


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later parts are skipped past it")
    p.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="folder for the profiler tables and the result table")
    p.add_argument("--capture-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    parts = [build_extension, run_tests, copy_bandwidth, update_kernel, group_norm_kernel, head_forward, host_costs,
             sampler, whole_loop_graphs, fresh_process_capture, compiled_loops]
    wanted = set(filter(None, args.only.split(",")))
    unknown = sorted(wanted - {part.__name__ for part in parts})
    if unknown:  # before any device work: a typo must not cost a lent machine's minutes
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(f.__name__ for f in parts)}")
    if args.capture_probe:
        capture_probe()
        return 0
    global OUT_DIR
    OUT_DIR = args.out
    if OUT_DIR is not None:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 1
    os.chdir(ROOT)
    deadline = time.perf_counter() + args.budget
    row("device", f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    copy_gbps = float("nan")
    seconds = {}  # each part's wall time, to plan a rerun of some parts with --only
    for part in parts:
        if wanted and part.__name__ not in wanted:
            continue
        needs = {compiled_loops: 150, fresh_process_capture: 60}.get(part, 0)  # compiles; two new processes
        if time.perf_counter() + needs > deadline:
            row(part.__name__, "skipped: time budget")
            continue
        start = time.perf_counter()
        if part in (update_kernel, group_norm_kernel):
            guarded(part, copy_gbps)
        elif part in (whole_loop_graphs, compiled_loops):
            guarded(part, deadline)
        else:
            result = guarded(part)
            if part is copy_bandwidth and result:
                copy_gbps = result
        seconds[part.__name__] = time.perf_counter() - start
    row("seconds per part: " + " / ".join(seconds), " / ".join(f"{v:.0f}" for v in seconds.values()))
    table = "\n".join(["| check | result |", "|---|---|"] + [f"| {name} | {value} |" for name, value in ROWS])
    print("\n" + table)
    if OUT_DIR is not None:
        (OUT_DIR / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
