"""What a head costs: its time against one network call, the fraction that ``genie`` adds
to the NFE for every head call (``head.nfe_overhead``)."""

from __future__ import annotations

import time

import torch
from torch import Tensor


@torch.no_grad()
def measure_nfe_overhead(head, model, x: Tensor, t: Tensor, gamma: Tensor, repeats: int = 5) -> float:
    """Time the head against one network call on ``(x, t)``; set and return ``head.nfe_overhead``.

    Wall-clock medians over ``repeats`` calls after a warm-up; on a GPU it synchronises.
    The ratio is what ``genie`` adds to the NFE count for each head call.
    """
    def median_seconds(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    out = model.forward_features(x, t)
    network = median_seconds(lambda: model.forward_features(x, t))
    overhead = median_seconds(lambda: head(x, out, gamma)) / max(network, 1e-12)
    head.nfe_overhead = float(overhead)
    return head.nfe_overhead
