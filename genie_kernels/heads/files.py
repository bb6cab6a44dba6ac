"""A distilled head on disk: :func:`load_head`, for a checkpoint written by
:func:`~.distill.distill` or a folder written by ``head.save_pretrained``.

The format, the identity of the model a head belongs to and the reading and writing
themselves live in :mod:`.storage` (which knows no head class); here they meet the
builder of every head type, :func:`~.build.head_from_config`.
"""

from __future__ import annotations

from torch import nn

from .build import head_from_config
from .storage import (FORMAT, IDENTITY_MODULES, identity_matches, model_identity, read_head,  # noqa: F401 (re-exported)
                      stored_cost)


def load_head(path, model=None, use_ema: bool = True, device=None) -> nn.Module:
    """Load a distilled head from a checkpoint written by :func:`distill`, or from a folder
    written by ``head.save_pretrained(folder)``.

    The head is rebuilt from the stored config (and takes the stored weights' dtype).
    With ``model``, the checkpoint's base-model identity must match it
    (:func:`~.storage.identity_matches`: the same weights, also in a float16 or bfloat16
    copy or compiled).  ``use_ema`` picks the EMA weights when the run kept them.  Raises
    :class:`~genie_kernels.checkpoint.CheckpointError` for a missing, corrupt, truncated or
    foreign file, or one made for another model.
    """
    return read_head(path, head_from_config, model=model, use_ema=use_ema, device=device)
