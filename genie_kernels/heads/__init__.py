"""The heads layer: the curvature head k_ψ that predicts dε/dγ, and its distillation.

Imports the ODE layer and the shared helpers only; the fast paths above reuse its
:class:`~genie_kernels.heads.head.ConvHead` and :func:`~genie_kernels.heads.head.combine_mixed`
as the reference twins of their fused kernels.
"""
