"""The exported sampler run by the C++ runner against ``gk.sample()`` in Python, on the CPU.

Exports the bundled MNIST model's sampler (GENIE with its head, AFS, the uniform grid:
``python -m genie_kernels export``'s defaults) at ``--steps`` for batch 1, builds
examples/cpp with CMake, and times on the same noise, one after the other in this run:

* ``gk.sample()`` (the reference backend, the CPU's default), median of ``--calls`` calls;
* the package loaded in Python (``gk.load_exported``), median of ``--calls`` calls;
* the C++ runner (``genie_runner --iters``), median of ``--calls`` calls, after one warm-up.

All with ``--threads`` threads (default 1: the development machines have 2 shared cores).
It checks that the C++ sample equals the Python-loaded one and prints the maximum
difference to ``sample()``.  Build outputs go to a temporary folder (``--work`` to keep them).

    python bench/export_cpp.py                 # export (minutes), build, time; prints the ratios
    python bench/export_cpp.py --work /tmp/x   # the second run reuses /tmp/x's package and runner
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import genie_kernels as gk

REPO = Path(__file__).resolve().parents[1]


def median_ms(call, calls: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def build_runner(work: Path) -> Path:
    build = work / "cpp_build"
    runner = build / "genie_runner"
    if not runner.is_file():
        subprocess.run(["cmake", "-S", str(REPO / "examples/cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="folder for the package and the build (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="genie_export_"))
    work.mkdir(parents=True, exist_ok=True)

    model, head, schedule = gk.load_pretrained("mnist")
    settings = dict(solver="genie", head=head, schedule=schedule, afs=True, striding="uniform")
    package = work / f"mnist_genie_{args.steps}.pt2"
    if not package.is_file():
        start = time.perf_counter()
        gk.export(model, args.steps, **settings, batch=1, out=package)
        print(f"export: {time.perf_counter() - start:.0f} s -> {package}")
    runner = build_runner(work)

    noise = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noise.numpy().tofile(work / "noise.bin")
    loaded = gk.load_exported(package)
    with torch.no_grad():
        reference = gk.sample(model, noise, args.steps, **settings)
        python_ms = median_ms(lambda: gk.sample(model, noise, args.steps, **settings), args.calls)
        loaded_ms = median_ms(lambda: loaded(noise), args.calls)
        from_package = loaded(noise)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([str(runner), str(package), "--noise", str(work / "noise.bin"), "--out",
                           str(work / "sample.bin"), "--pgm", str(work / "sample.pgm"), "--iters", str(args.calls)],
                          check=True, capture_output=True, text=True, env=env)
    cpp_ms = float(done.stdout.split("median_ms=")[1].split()[0])
    cpp_sample = torch.from_numpy(np.fromfile(work / "sample.bin", dtype=np.float32)).reshape(noise.shape)
    assert torch.equal(cpp_sample, from_package), "the C++ runner's sample differs from the Python-loaded package's"

    print(f"bundled MNIST, GENIE {args.steps} steps (AFS, uniform), batch 1, float32, {args.threads} thread(s), "
          f"medians of {args.calls} calls, torch {torch.__version__}")
    print(f"  gk.sample() (reference)     {python_ms:8.2f} ms")
    print(f"  package loaded in Python    {loaded_ms:8.2f} ms   ({python_ms / loaded_ms:.2f}x faster than sample())")
    print(f"  C++ runner (genie_runner)   {cpp_ms:8.2f} ms   ({python_ms / cpp_ms:.2f}x faster than sample())")
    print(f"  C++ sample == Python-loaded package: exact; max |package - sample()| = "
          f"{(from_package - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
