"""What a head costs next to one call of its network (:class:`~genie_kernels.cost.RelativeCost`).

``genie`` makes one network call and one head call per step; its NFE counts the network
calls, and the head's cost is reported beside it (``head.cost``, measured when
distillation ends and stored in the checkpoint; :func:`head_cost` measures it anew at the
batch and device you sample with).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cost import RelativeCost, relative_cost
from ..ode.protocol import as_model
from ..ode.schedules import schedule_of


@torch.no_grad()
def head_cost(head, model, x: Tensor, t: Tensor | None = None, *, repeats: int = 9) -> RelativeCost:
    """FLOP and time ratio of ``head`` to one call of ``model`` at ``(x, t)`` (default t = 0.5).

    The time ratio is a median over ``repeats`` interleaved calls; on a loaded machine it
    varies, the FLOP ratio does not.
    """
    model = as_model(model)
    if t is None:
        t = torch.full((x.shape[0],), 0.5, dtype=x.dtype, device=x.device)
    gamma = schedule_of(model).gamma(t.to(torch.float64)).to(x.device)
    out = model.forward_features(x, t)
    return relative_cost(lambda: head(x, out, gamma), lambda: model.forward_features(x, t), repeats=repeats,
                         device=x.device)
