"""The models layer: ε-networks that follow the protocol of :mod:`genie_kernels.ode.protocol`.

``adapters`` (any ``nn.Module`` through hooks, a diffusers ``UNet2DModel``), ``mixture``
(the analytic Gaussian mixture: ε and dε/dγ in closed form) and ``unet`` (the compact
ε-UNet of the bundled model, and its loaders).  Imports the ODE layer and the shared
helpers only.
"""
