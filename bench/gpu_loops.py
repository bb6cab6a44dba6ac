"""gpu_check parts 6-8: sample() on the Triton backend, the whole loop in one CUDA graph, the
first capture in a new process, compiled networks (see bench/gpu_check.py)."""

from __future__ import annotations

import functools
import os
import sys
import time
from unittest import mock

import torch

import gpu_common
from gpu_common import SCRIPT, bench, bench_interleaved, profile_call, row


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
                    profile_call(f"b1 genie {backend}", run, gpu_common.OUT_DIR)


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
            run = subprocess.run([sys.executable, str(SCRIPT), "--capture-probe"], env=env, capture_output=True,
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
