"""Model adapters: any ε-network as an :class:`~genie_kernels.ode.protocol.EpsModel`.

An adapter's ``forward_features(x, t)`` returns ``ModelOutput(eps, features, temb)`` from
one forward pass, where ``t`` is continuous time in (0, 1] of shape (B,).  The head
reads ``features`` (the network's last feature map before its output layer) and
``temb`` (its time embedding).

* :class:`HookedModel` wraps any ``nn.Module`` and picks ``features`` and ``temb`` up with
  forward hooks on the named layers, so the network's code stays as it is.
* :class:`UNet2DAdapter` does this for a diffusers ``UNet2DModel``: continuous ``t`` is
  mapped to its discrete timestep ``i = t·N − 1`` through a
  :class:`~genie_kernels.ode.schedules.DiscreteVPSchedule`, ``features`` is the input of
  ``conv_out`` (after the last GroupNorm and SiLU) and ``temb`` the output of
  ``time_embedding``.
* The analytic :class:`~genie_kernels.models.mixture.GaussianMixture` is its own adapter
  (no features, no temb).

Forward-mode AD (``torch.func.jvp``, used for the exact derivative and distillation)
fails on two things found in diffusers UNets on the CPU (docs/design.md, "The total
derivative"): the fused scaled-dot-product attention kernels have no forward-mode
formula, and GroupNorm's forward-mode formula needs contiguous inputs.  With ``jvp_safe=True`` (the default) an
adapter therefore runs the network under the math attention backend and makes every
GroupNorm input contiguous (a no-op when it already is) through pre-hooks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ode.protocol import EpsModel, ModelOutput, check_takes_x_and_t
from ..ode.schedules import DiscreteVPSchedule, VPSchedule, check_schedule


def _first_tensor(result) -> Tensor:
    """ε from a network's return value: a tensor, a ``.sample`` attribute or a tuple's first item."""
    if isinstance(result, Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], Tensor):
        return result[0]
    raise TypeError(f"cannot find eps in the network's output of type {type(result).__name__}")


def _contiguous_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


class HookedModel(EpsModel):
    """Generic adapter: ``network(x, time_input(t))`` is ε; hooks collect features and temb.

    Args:
        network: the ε-network, called as ``network(x, time_input(t))``; its return value
            may be a tensor, have a ``.sample`` attribute, or be a tuple starting with ε.
        feature_layer: dotted name (as in ``named_modules()``) of the layer whose output
            (or input, with ``feature_from="input"``) is the feature map; ``None``: no features.
        temb_layer: dotted name of the layer whose output is the time embedding; ``None``: none.
        time_input: maps continuous t of shape (B,) to the network's time input (default: t).
        feature_from: ``"output"`` or ``"input"`` of ``feature_layer``.
        jvp_safe: make the network usable under ``torch.func.jvp`` (see the module docstring).
        schedule: the schedule the network was trained with; ``sample`` and ``distill`` use
            it when given none (without it they fall back to :class:`LinearVPSchedule`).
            For a DDPM-style network with ``schedule=DiscreteVPSchedule(alphas_cumprod)``, pass
            ``time_input=schedule.timestep_from_t``: its continuous timestep ``t N − 1``.
    """

    prepares_jvp = True  # see jvp_safe

    def __init__(self, network: nn.Module, feature_layer: Optional[str] = None, temb_layer: Optional[str] = None,
                 time_input: Optional[Callable[[Tensor], Tensor]] = None, feature_from: str = "output",
                 jvp_safe: bool = True, schedule: VPSchedule | None = None):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        check_takes_x_and_t(network, "network")
        if schedule is not None:
            check_schedule(schedule)
            self.schedule = schedule
        if feature_from not in ("output", "input"):
            raise ValueError(f"feature_from must be 'output' or 'input', got {feature_from!r}")
        self.network = network
        self.time_input = time_input or (lambda t: t)
        self.jvp_safe = jvp_safe
        self._captured: Optional[dict] = None
        self._handles = []
        layers = dict(network.named_modules())
        for role, name in (("feature_layer", feature_layer), ("temb_layer", temb_layer)):
            if name is not None and name not in layers:
                raise ValueError(f"{role} {name!r} is not a layer of {type(network).__name__}; "
                                 f"some layers: {[n for n in layers if n][:12]}")
        if feature_layer is not None:
            layer = layers[feature_layer]
            if feature_from == "input":
                self._handles.append(layer.register_forward_pre_hook(lambda m, args: self._capture("features", args[0])))
            else:
                self._handles.append(layer.register_forward_hook(lambda m, args, out: self._capture("features", out)))
        if temb_layer is not None:
            self._handles.append(layers[temb_layer].register_forward_hook(lambda m, args, out: self._capture("temb", out)))
        if jvp_safe:
            for module in network.modules():
                if isinstance(module, nn.GroupNorm):
                    self._handles.append(module.register_forward_pre_hook(_contiguous_input))
        self.feature_layer, self.temb_layer = feature_layer, temb_layer

    def _capture(self, key: str, value) -> None:
        if self._captured is not None:
            self._captured[key] = _first_tensor(value)

    def remove_hooks(self) -> None:
        """Detach the adapter's hooks from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def call_network(self, x: Tensor, t: Tensor):
        return self.network(x, self.time_input(t))

    def forward_features(self, x: Tensor, t: Tensor) -> ModelOutput:
        self._captured = {}
        try:
            if self.jvp_safe:
                with sdpa_kernel(SDPBackend.MATH):
                    result = self.call_network(x, t)
            else:
                result = self.call_network(x, t)
            captured = self._captured
        finally:
            self._captured = None
        if self.feature_layer is not None and "features" not in captured:
            raise RuntimeError(f"layer {self.feature_layer!r} was not called in the forward pass")
        if self.temb_layer is not None and "temb" not in captured:
            raise RuntimeError(f"layer {self.temb_layer!r} was not called in the forward pass")
        return ModelOutput(_first_tensor(result), captured.get("features"), captured.get("temb"))


def ddpm_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """``ᾱ_i = Π_{j≤i} (1 − β_j)`` with DDPM's linear betas (float64)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class UNet2DAdapter(HookedModel):
    """Adapter for a diffusers ``UNet2DModel`` that predicts ε.

    The schedule that maps continuous t to the UNet's discrete timestep comes from, in
    order: ``scheduler.alphas_cumprod`` (a diffusers scheduler), ``schedule`` (a
    :class:`DiscreteVPSchedule`, or a continuous one discretised into
    ``num_timesteps``), or DDPM's linear betas (1e-4 → 0.02 over ``num_timesteps``).
    Sample with the same schedule: ``sample(adapter, noise, steps, schedule=adapter.schedule)``.

    ``features`` is the input of ``conv_out`` (``block_out_channels[0]`` channels at full
    resolution) and ``temb`` the output of ``time_embedding``.
    """

    def __init__(self, unet: nn.Module, scheduler=None, schedule: VPSchedule | None = None,
                 num_timesteps: int = 1000, jvp_safe: bool = True):
        for attr in ("conv_out", "time_embedding", "config"):
            if not hasattr(unet, attr):
                raise TypeError(f"expected a diffusers UNet2DModel, got {type(unet).__name__} without {attr!r}")
        if getattr(unet.config, "class_embed_type", None) is not None or getattr(unet.config, "num_class_embeds", None):
            raise ValueError("class-conditional UNets are not supported by this adapter")
        if scheduler is not None:
            if not isinstance(getattr(scheduler, "alphas_cumprod", None), Tensor):
                raise TypeError(f"scheduler must be a diffusers scheduler instance (with alphas_cumprod), got {scheduler!r}")
            prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
            if prediction != "epsilon":
                raise ValueError(f"the scheduler says the model predicts {prediction!r}; GENIE needs an ε-prediction model")
            schedule = DiscreteVPSchedule(scheduler.alphas_cumprod)
        elif schedule is None:
            schedule = DiscreteVPSchedule(ddpm_alphas_cumprod(num_timesteps))
        elif not isinstance(schedule, DiscreteVPSchedule):
            check_schedule(schedule)
            schedule = DiscreteVPSchedule.from_continuous(schedule, num_timesteps)
        super().__init__(unet, feature_layer="conv_out", temb_layer="time_embedding",
                         time_input=schedule.timestep_from_t, feature_from="input", jvp_safe=jvp_safe, schedule=schedule)

    @property
    def unet(self) -> nn.Module:
        return self.network

    def call_network(self, x: Tensor, t: Tensor):
        return self.network(x, self.time_input(t), return_dict=False)
