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
* :class:`UNet2DConditionAdapter` does the same for a diffusers ``UNet2DConditionModel``,
  whose condition is ``encoder_hidden_states`` (text embeddings).
* The analytic :class:`~genie_kernels.models.mixture.GaussianMixture` is its own adapter
  (no features, no temb).

A network that predicts v or x₀ (``prediction_type="v_prediction"`` / ``"sample"``) is
turned into ε exactly, with α_t and σ_t of the adapter's schedule
(:mod:`genie_kernels.ode.predictions`); the conversion is differentiable in x and t, so
the exact derivative differentiates the ε it gives.

A conditional network takes its condition as a keyword (``cond_arg``: ``class_labels`` for
a class-conditional ``UNet2DModel``, ``encoder_hidden_states`` for a
``UNet2DConditionModel``); ``forward_features(x, t, cond)`` passes it on, and the
adapter's ``null_cond`` (given by the user: the label or empty-prompt embedding the
network was trained with as "no condition") is what guidance and ``cond=None`` use.

Adapters keep no per-call state on ``self``: the hooks write into a dictionary owned by
the call, found by the calling thread's id, so one adapter may serve several threads at
once (and nested calls in one thread).

Forward-mode AD (``torch.func.jvp``, used for the exact derivative and distillation)
fails on two things found in diffusers UNets on the CPU (docs/design.md, "The total
derivative"): the fused scaled-dot-product attention kernels have no forward-mode
formula, and GroupNorm's forward-mode formula needs contiguous inputs.  With ``jvp_safe=True`` (the default) an
adapter therefore runs the network under the math attention backend and makes every
GroupNorm input contiguous (a no-op when it already is) through pre-hooks.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ode.predictions import check_prediction_type, eps_at_t
from ..ode.protocol import EpsModel, ModelOutput, broadcast_cond, check_takes_x_and_t
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


def uncompiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)`` wraps (its ``_orig_mod``), else ``module``.

    A compiled module (an ``OptimizedModule``) shares its original's parameters, layers and
    hooks, and calls them through the compiled code: hooks and configs are looked up on
    the original, calls go through the compiled one."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


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
        cond_arg: the keyword under which the network takes a condition
            (``network(x, time, **{cond_arg: cond})``); ``None``: an unconditional network.
        null_cond: the condition that means "none" for a conditional network (a label, an
            empty-prompt embedding, of batch 1 or B); used for ``cond=None`` and by guidance.
        prediction_type: what the network predicts: ``"epsilon"`` (default),
            ``"v_prediction"`` (``ε = α v + σ x``) or ``"sample"`` (x₀: ``ε = (x − α x₀)/σ``);
            the latter two need ``schedule``.
    """

    prepares_jvp = True  # see jvp_safe

    def __init__(self, network: nn.Module, feature_layer: Optional[str] = None, temb_layer: Optional[str] = None,
                 time_input: Optional[Callable[[Tensor], Tensor]] = None, feature_from: str = "output",
                 jvp_safe: bool = True, schedule: VPSchedule | None = None, cond_arg: Optional[str] = None,
                 null_cond: Optional[Tensor] = None, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = check_prediction_type(prediction_type)
        if prediction_type != "epsilon" and schedule is None:
            raise ValueError(f"prediction_type={prediction_type!r} is turned into ε with the network's α_t and σ_t: "
                             "pass schedule=... (the schedule it was trained with)")
        if cond_arg is not None and not isinstance(cond_arg, str):
            raise TypeError(f"cond_arg must be the name of the network's condition keyword, got {cond_arg!r}")
        if null_cond is not None and (cond_arg is None or not isinstance(null_cond, Tensor)):
            raise ValueError("null_cond must be a tensor, and is only for a conditional network (cond_arg=...)")
        self.cond_arg, self._null_cond = cond_arg, null_cond
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        check_takes_x_and_t(network, "network", cond_arg)
        if schedule is not None:
            check_schedule(schedule)
            self.schedule = schedule
        if feature_from not in ("output", "input"):
            raise ValueError(f"feature_from must be 'output' or 'input', got {feature_from!r}")
        self.network = network
        self.time_input = time_input or (lambda t: t)
        self.jvp_safe = jvp_safe
        self._captures: dict[int, dict] = {}  # thread id -> what the hooks caught in that thread's call
        self._handles = []
        layers = dict(uncompiled(network).named_modules())  # a compiled network's layers are its original's
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
            for module in uncompiled(network).modules():
                if isinstance(module, nn.GroupNorm):
                    self._handles.append(module.register_forward_pre_hook(_contiguous_input))
        self.feature_layer, self.temb_layer = feature_layer, temb_layer

    @property
    def _captured(self) -> Optional[dict]:
        """What the hooks caught in this thread's running call (None outside a call)."""
        return self._captures.get(threading.get_ident())

    def _capture(self, key: str, value) -> None:
        captured = self._captures.get(threading.get_ident())
        if captured is not None:
            captured[key] = _first_tensor(value)

    @property
    def conditional(self) -> bool:
        return self.cond_arg is not None

    def null_cond(self, batch: int, device) -> Tensor:
        if self._null_cond is None:
            what = "is unconditional" if self.cond_arg is None else "was given no null_cond"
            raise ValueError(f"{type(self).__name__} {what}, so it has no null condition; pass uncond=... to sample() "
                             f"or null_cond=... to the adapter")
        return broadcast_cond(self._null_cond, batch, device)

    def remove_hooks(self) -> None:
        """Detach the adapter's hooks from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def call_network(self, x: Tensor, t: Tensor, cond=None):
        if self.cond_arg is None:
            return self.network(x, self.time_input(t))
        return self.network(x, self.time_input(t), **{self.cond_arg: cond})

    def forward_features(self, x: Tensor, t: Tensor, cond=None) -> ModelOutput:
        if cond is None and self.cond_arg is not None and self._null_cond is not None:
            cond = self.null_cond(x.shape[0], x.device)
        elif cond is not None:
            cond = self.check_cond(cond, x.shape[0], x.device)
        thread = threading.get_ident()
        outer = self._captures.get(thread)  # a call of this adapter inside another one, in this thread
        captured = self._captures[thread] = {}
        try:
            if self.jvp_safe:
                with sdpa_kernel(SDPBackend.MATH):
                    result = self.call_network(x, t, cond)
            else:
                result = self.call_network(x, t, cond)
        finally:
            if outer is None:
                del self._captures[thread]
            else:
                self._captures[thread] = outer
        if self.feature_layer is not None and "features" not in captured:
            raise RuntimeError(f"layer {self.feature_layer!r} was not called in the forward pass")
        if self.temb_layer is not None and "temb" not in captured:
            raise RuntimeError(f"layer {self.temb_layer!r} was not called in the forward pass")
        for key in ("features", "temb"):
            value = captured.get(key)
            if value is not None and value.shape[0] != x.shape[0]:
                raise RuntimeError(f"the hooked {key} have batch {value.shape[0]} for x of batch {x.shape[0]}: the network "
                                   "changes the batch inside (a classifier-free guidance wrapper?); wrap the plain "
                                   "network and pass cond=, guidance_scale= to sample() instead")
        eps = eps_at_t(self.prediction_type, _first_tensor(result), x, t, getattr(self, "schedule", None))
        return ModelOutput(eps, captured.get("features"), captured.get("temb"))


def ddpm_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """``ᾱ_i = Π_{j≤i} (1 − β_j)`` with DDPM's linear betas (float64)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class UNet2DAdapter(HookedModel):
    """Adapter for a diffusers ``UNet2DModel`` (ε-, v- or x₀-prediction).

    The schedule that maps continuous t to the UNet's discrete timestep comes from, in
    order: ``scheduler.alphas_cumprod`` (a diffusers scheduler), ``schedule`` (a
    :class:`DiscreteVPSchedule`, or a continuous one discretised into
    ``num_timesteps``), or DDPM's linear betas (1e-4 → 0.02 over ``num_timesteps``).
    Sample with the same schedule: ``sample(adapter, noise, steps, schedule=adapter.schedule)``.
    What the UNet predicts is ``prediction_type`` if given, else the scheduler's
    ``config.prediction_type``, else ``"epsilon"``; v and x₀ are turned into ε (see
    :class:`HookedModel`).

    ``features`` is the input of ``conv_out`` (``block_out_channels[0]`` channels at full
    resolution) and ``temb`` the output of ``time_embedding``.

    A class-conditional UNet (``num_class_embeds`` or ``class_embed_type``) takes its
    condition as ``class_labels``: with ``num_class_embeds`` and no ``class_embed_type``,
    integer labels in ``0 … num_class_embeds − 1``, checked here.  diffusers has no null
    label of its own: pass ``null_cond`` (the label trained as "no condition") for guidance
    without an explicit ``uncond``.
    """

    cond_kind = "class_labels"

    def __init__(self, unet: nn.Module, scheduler=None, schedule: VPSchedule | None = None,
                 num_timesteps: int = 1000, jvp_safe: bool = True, null_cond=None, prediction_type: str | None = None):
        for attr in ("conv_out", "time_embedding", "config"):
            if not hasattr(unet, attr):
                raise TypeError(f"expected a diffusers {self._expected}, got {type(unet).__name__} without {attr!r}")
        self._check_kind(unet)
        if scheduler is not None:
            if not isinstance(getattr(scheduler, "alphas_cumprod", None), Tensor):
                raise TypeError(f"scheduler must be a diffusers scheduler instance (with alphas_cumprod), got {scheduler!r}")
            told = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
            if prediction_type is not None and prediction_type != told:
                raise ValueError(f"prediction_type={prediction_type!r} but the scheduler's config says {told!r}; "
                                 "give one of them")
            prediction_type = told
            schedule = DiscreteVPSchedule(scheduler.alphas_cumprod)
        elif schedule is None:
            schedule = DiscreteVPSchedule(ddpm_alphas_cumprod(num_timesteps))
        elif not isinstance(schedule, DiscreteVPSchedule):
            check_schedule(schedule)
            schedule = DiscreteVPSchedule.from_continuous(schedule, num_timesteps)
        cond_arg = self.cond_kind if self._takes_condition(unet) else None
        if isinstance(null_cond, int) and not isinstance(null_cond, bool):
            null_cond = torch.tensor(null_cond)
        super().__init__(unet, feature_layer="conv_out", temb_layer="time_embedding",
                         time_input=schedule.timestep_from_t, feature_from="input", jvp_safe=jvp_safe, schedule=schedule,
                         cond_arg=cond_arg, null_cond=null_cond, prediction_type=prediction_type or "epsilon")
        if null_cond is not None:
            self.check_cond(null_cond, 1, null_cond.device)

    _expected = "UNet2DModel"

    @staticmethod
    def _check_kind(unet) -> None:
        if hasattr(unet.config, "cross_attention_dim"):
            raise TypeError(f"{type(unet).__name__} takes encoder_hidden_states; wrap it in gk.UNet2DConditionAdapter")

    @staticmethod
    def _takes_condition(unet) -> bool:
        return getattr(unet.config, "class_embed_type", None) is not None or bool(getattr(unet.config, "num_class_embeds", None))

    @property
    def num_classes(self) -> Optional[int]:
        """The number of class labels of a UNet with a plain label embedding, else None."""
        config = self.network.config
        if getattr(config, "class_embed_type", None) is None and getattr(config, "num_class_embeds", None):
            return int(config.num_class_embeds)
        return None

    def check_cond(self, cond, batch: int, device) -> Tensor:
        if not self.conditional:
            raise ValueError(f"this {type(self.network).__name__} is unconditional (no num_class_embeds or "
                             "class_embed_type): it takes no condition (cond=None)")
        if self.num_classes is None:
            return super().check_cond(cond, batch, device)
        if not isinstance(cond, Tensor):
            cond = torch.as_tensor(cond)
        if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
            raise TypeError(f"class labels must be an integer tensor, got dtype {cond.dtype}")
        if cond.dim() > 1:
            raise ValueError(f"class labels must have shape ({batch},) or be one label, got {tuple(cond.shape)}")
        capturing = cond.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1} (num_class_embeds="
                             f"{self.num_classes}), got values from {int(cond.min())} to {int(cond.max())}")
        return broadcast_cond(cond.long(), batch, device)

    @property
    def unet(self) -> nn.Module:
        return self.network

    def call_network(self, x: Tensor, t: Tensor, cond=None):
        if self.cond_arg is None:
            return self.network(x, self.time_input(t), return_dict=False)
        return self.network(x, self.time_input(t), **{self.cond_arg: cond}, return_dict=False)


class UNet2DConditionAdapter(UNet2DAdapter):
    """Adapter for a diffusers ``UNet2DConditionModel`` (ε-, v- or x₀-prediction): the condition is
    ``encoder_hidden_states``, text embeddings of shape ``(B or 1, L, cross_attention_dim)``.

    The schedule, ``features`` and ``temb`` are as in :class:`UNet2DAdapter`.  The network
    cannot run without a condition: ``null_cond`` (the embedding of the empty prompt, shape
    ``(1, L, D)``) is what ``cond=None`` and guidance without ``uncond`` use.  With
    ``jvp_safe=True`` (the default) the adapter sets diffusers' plain ``AttnProcessor()`` on
    the UNet, whose attention is ordinary tensor operations that forward-mode AD runs on
    every device (fused or xformers kernels have no forward-mode formula).
    """

    cond_kind = "encoder_hidden_states"
    _expected = "UNet2DConditionModel"

    def __init__(self, unet: nn.Module, scheduler=None, schedule: VPSchedule | None = None,
                 num_timesteps: int = 1000, jvp_safe: bool = True, null_cond: Optional[Tensor] = None,
                 prediction_type: str | None = None):
        super().__init__(unet, scheduler, schedule, num_timesteps, jvp_safe, null_cond, prediction_type)
        if jvp_safe:
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())

    @staticmethod
    def _check_kind(unet) -> None:
        if not hasattr(unet.config, "cross_attention_dim"):
            raise TypeError(f"{type(unet).__name__} takes no encoder_hidden_states; wrap it in gk.UNet2DAdapter")

    @staticmethod
    def _takes_condition(unet) -> bool:
        return True

    @property
    def num_classes(self) -> Optional[int]:
        return None

    def check_cond(self, cond, batch: int, device) -> Tensor:
        if not isinstance(cond, Tensor) or not cond.is_floating_point() or cond.dim() != 3:
            shape = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"encoder_hidden_states must be a float tensor of shape (B, L, "
                             f"{self.network.config.cross_attention_dim}), got {shape}")
        if cond.shape[2] != self.network.config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must have {self.network.config.cross_attention_dim} features "
                             f"(cross_attention_dim), got shape {tuple(cond.shape)}")
        return broadcast_cond(cond, batch, device)

    def forward_features(self, x: Tensor, t: Tensor, cond=None) -> ModelOutput:
        if cond is None and self._null_cond is None:
            raise ValueError("a UNet2DConditionModel needs encoder_hidden_states: pass cond=... or give the adapter "
                             "null_cond=... (the empty prompt's embedding)")
        return super().forward_features(x, t, cond)
