"""What an extra computation costs next to one network call, measured two ways.

* ``flops``: the ratio of floating-point operations counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions,
  forward-mode tangents included).  It does not depend on the machine or its load, so it
  is the figure to compare methods by.
* ``time``: the ratio of median wall times over interleaved repeats (CUDA synchronised),
  at the batch, dtype and device measured.  It includes what FLOPs miss (normalisations,
  launches, memory traffic) and varies with the machine and its load.

Neither is folded into an NFE count: NFE counts network calls, and a head's or a JVP's
cost is reported beside it.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode


class RelativeCost(NamedTuple):
    """Cost of a computation relative to one network call (1.0 = as much as the call);
    ``flops`` is None where the network call has no counted FLOPs (an analytic model)."""

    flops: float | None
    time: float

    def config(self) -> dict:
        return {"flops": self.flops, "time": self.time}

    @classmethod
    def from_config(cls, config) -> "RelativeCost":
        """From ``config()``; a missing, negative or non-finite entry is an error (``flops``
        may be None)."""
        if not isinstance(config, dict) or "time" not in config or "flops" not in config:
            raise ValueError(f"a cost must be a dict with 'flops' and 'time', got {config!r}")
        values = {"flops": None}
        for key in cls._fields:
            value = config[key]
            if key == "flops" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost entry {key!r} must be a finite number >= 0, got {value!r}")
            values[key] = float(value)
        return cls(**values)

    def __str__(self) -> str:
        if self.flops is None:
            return f"{self.time:.3f} of a network call by time (FLOPs not counted)"
        return f"{self.flops:.3f} of a network call by FLOPs, {self.time:.3f} by time"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fns: list[Callable[[], object]], repeats: int, device: torch.device | None = None) -> list[float]:
    """Median wall time of each of ``fns``, their calls interleaved so that they share the
    machine's load, after one warm-up call each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return [sorted(spent)[len(spent) // 2] for spent in times]


@torch.no_grad()
def relative_cost(fn: Callable[[], object], network_call: Callable[[], object], *, repeats: int = 9,
                  device: torch.device | None = None) -> RelativeCost:
    """Cost of ``fn`` relative to ``network_call`` (see the module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    network_flops = count_flops(network_call)
    flops = count_flops(fn) / network_flops if network_flops else None
    fn_time, network_time = median_seconds([fn, network_call], repeats, device)
    return RelativeCost(flops=flops, time=float(fn_time / max(network_time, 1e-12)))
