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

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_common, gpu_kernels, gpu_loops beside it

import gpu_common  # noqa: E402
from gpu_common import ROOT, ROWS, guarded, row  # noqa: E402
from gpu_kernels import (build_extension, copy_bandwidth, group_norm_kernel, head_forward, host_costs,  # noqa: E402
                         run_tests, update_kernel)
from gpu_loops import capture_probe, compiled_loops, fresh_process_capture, sampler, whole_loop_graphs  # noqa: E402


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
    gpu_common.OUT_DIR = out_dir = args.out
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
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
    if out_dir is not None:
        (out_dir / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
