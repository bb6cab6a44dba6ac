"""The heads layer: the curvature head k_ψ that predicts dε/dγ, and its distillation.

``base`` (the mixed parametrisation :func:`~.base.combine_mixed`, the log γ embedding, what
both heads share), ``conv`` (:class:`~.conv.ConvHead`, for images), ``mlp``
(:class:`~.mlp.MLPHead`, for flat data), ``build`` (a head from its config or sized for a
model), ``cost`` (its cost against one network call); ``distill`` (the training loop),
``data`` (training draws, the loss, validation) and ``files`` (the checkpoint format, the
identity of the base model, :func:`~.files.load_head`).

Imports the ODE layer and the shared helpers only; the fast paths above use ``ConvHead``
and ``combine_mixed`` as the reference twins of their fused kernels.
"""
