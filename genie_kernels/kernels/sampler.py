"""The solver loop on the fused kernels: ``sample(..., backend="triton")``.

Same trajectory as the reference solvers in :mod:`genie_kernels.solvers`; each step is
one network call, (for GENIE) the fused head, and one :func:`taylor_update` launch that
writes both x̄ and the next network input.  The γ grid and the model's times live on
the device, so the loop never reads a value back to the host.  The state x̄ is kept in
float32 (float64 for float64 noise) whatever the network's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import as_model, checked_call
from ..schedules import VPSchedule
from ..solvers import SolverOutput
from .head_blocks import fused_head_k
from .update import taylor_update

SOLVERS = ("ddim", "ab2", "genie")


def triton_solve(
    solver: str, model, noise: Tensor, ts: Tensor, schedule: VPSchedule, head=None,
    *, afs: bool = False, denoise: bool = False, callback=None,
) -> SolverOutput:
    if solver not in SOLVERS:
        raise ValueError(f"backend='triton' runs the solvers {SOLVERS}, not {solver!r}; use backend='reference'")
    model = as_model(model)
    device, batch = noise.device, noise.shape[0]
    gammas = schedule.gamma(ts.to(torch.float64)).to(device)
    times = ts.to(device=device, dtype=noise.dtype)
    state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    xbar = (noise.to(state_dtype) * torch.sqrt(1.0 + gammas[0] ** 2).to(state_dtype)).contiguous()
    x, eps_prev, nfe = noise.contiguous(), None, 0.0
    steps = ts.numel() - 1
    for n in range(steps):
        aux, mode = None, "ddim"
        if afs and n == 0:
            eps = (x * (gammas[0] * torch.rsqrt(1.0 + gammas[0] ** 2)).to(x.dtype)).contiguous()
        else:
            out = checked_call(model, x, times[n].expand(batch))
            eps, nfe = out.eps.contiguous(), nfe + 1
            if solver == "genie":
                aux, mode = fused_head_k(head, x, out, gammas[n].expand(batch)).to(eps.dtype).contiguous(), "genie"
                nfe += float(getattr(head, "nfe_overhead", 0.0))
        if solver == "ab2" and eps_prev is not None:
            aux, mode = eps_prev, "ab2"
        xbar, x = taylor_update(xbar, eps, gammas, n, mode, aux)
        eps_prev = eps
        if callback is not None:
            callback({"i": n, "t": float(ts[n + 1]), "x": x, "eps": eps})
    if denoise:
        eps = checked_call(model, x, times[steps].expand(batch)).eps
        return SolverOutput((xbar - gammas[steps].to(state_dtype) * eps.to(state_dtype)).to(noise.dtype), nfe + 1)
    return SolverOutput(x, nfe)
