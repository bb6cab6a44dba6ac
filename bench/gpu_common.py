"""What the parts of bench/gpu_check.py share: the result rows, the timers, the profiler helpers."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT))

ROWS: list[tuple[str, str]] = []
OUT_DIR: Path | None = None  # --out: profiler tables and the result table go here (gpu_check.main sets it)


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


def guarded(step, *args):
    """Run one part; a failure is reported as a row and must not hide the other parts."""
    try:
        return step(*args)
    except Exception as err:
        row(f"{step.__name__} FAILED", f"{type(err).__name__}: {err}"[:300])
        return None
