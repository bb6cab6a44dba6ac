"""Distil a curvature head k_ψ onto the exact dε/dγ of a frozen ε-network.

The head learns dε/dγ (the second-order term of the GENIE step) from what one network
call gives: x, ε, the network's last feature map and its time embedding.  The run
writes an atomic checkpoint (safetensors + JSON config) to --out every
--checkpoint-every steps and at the end; --resume continues it exactly.  Sample with
the result through ``genie_kernels.heads.files.load_head(path)`` and
``sample(model, noise, steps, solver="genie", head=head)``.

Model kinds (--model):
  mixture        an analytic image-shaped Gaussian mixture (--shape, --components,
                 --mixture-seed); exact ε, so no trained network is needed
  toy2d          the 2-D toy mixture of 25 narrow modes
  PATH           a trained model checkpoint (.safetensors), loaded by
                 ``genie_kernels.models.unet.load_unet`` — the hook for trained networks
                 (see ``load_model`` in this module to add other kinds)

Data (--data):
  model          sample x_0 from the model's own data distribution (mixtures only)
  mnist[:DIR]    the MNIST training split (``genie_kernels.zoo.mnist.data.load_mnist``); DIR
                 defaults to ../shared/data/mnist or $GENIE_MNIST
  PATH           a tensor file: .pt (a tensor), .npy, or .safetensors (key "data"),
                 shaped (N, ...) like the model's input

--conditional distils for a class-conditional model (guided sampling): every sample with
its label (MNIST's digits, or the key "labels" of a .safetensors file), dropped to the
model's null label with probability --cond-drop, and validation per t-bucket with the
held-out labels and with the null label.

Several processes: ``torchrun --nproc_per_node=2 -m genie_kernels distill ...``
(gloo on the CPU, NCCL on GPUs); --batch-size is the global batch.

Example:
  python -m genie_kernels distill --model mixture --shape 1,8,8 --data model \\
      --out head.safetensors --steps 2000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..heads.build import head_for
from ..heads.data import data_sampler, format_validation, probe_model
from ..heads.distill import LR_SCHEDULES, check_new_output, distill
from ..models.mixture import image_mixture, toy_2d
from ..ode.schedules import LinearVPSchedule, schedule_from_config
from . import device_from_option, int_at_least, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="'mixture', 'toy2d', or the path of a trained model checkpoint (see above)")
    g.add_argument("--data", default="model",
                   help="'model' (sample the mixture), 'mnist[:DIR]', or a tensor file .pt/.npy/.safetensors (default model)")
    g.add_argument("--shape", default="1,8,8", help="image shape C,H,W of --model mixture (default 1,8,8)")
    g.add_argument("--components", type=int, default=4, help="components of --model mixture (default 4)")
    g.add_argument("--mixture-seed", type=int, default=0, help="seed fixing --model mixture (default 0)")
    g.add_argument("--conditional", action="store_true",
                   help="distil for a class-conditional model with the data's labels (--data mnist or a .safetensors "
                        "file with 'labels'); see above")
    g.add_argument("--cond-drop", type=float, default=0.1,
                   help="with --conditional: probability that a sample's label is replaced by the null label (default 0.1)")
    g.add_argument("--out", required=True, type=output_file({".safetensors"}),
                   help="checkpoint path, ending in .safetensors (a .json copy of the config is written beside it)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved at --out (same settings required); without it an existing --out is an error")

    g = p.add_argument_group("head")
    g.add_argument("--head", choices=("auto", "conv", "mlp"), default="auto",
                   help="conv for images, mlp for flat data; auto picks by the data shape (default auto)")
    g.add_argument("--nf", type=int, default=64, help="conv head width (default 64)")
    g.add_argument("--blocks", type=int, default=1, help="conv head residual blocks (default 1)")
    g.add_argument("--groups", type=int, default=8, help="conv head GroupNorm groups, must divide --nf (default 8)")
    g.add_argument("--hidden", type=int, default=256, help="mlp head width (default 256)")
    g.add_argument("--layers", type=int, default=3, help="mlp head hidden layers (default 3)")
    g.add_argument("--no-features", action="store_true", help="do not feed the network's feature map to the head")
    g.add_argument("--own-temb", action="store_true",
                   help="use the head's own embedding of log γ even if the network has a time embedding")

    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=2000, help="total optimizer steps (default 2000)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="learning rate over the run: constant, or cosine or linear decay from --lr towards 0 over "
                        "--steps (linear is the published GENIE recipe's; default constant)")
    g.add_argument("--head-eps", choices=("model", "noise"), default="model",
                   help="the ε the head takes in training: the network's prediction (as when sampling) or the noise "
                        "that made x_t (as the published GENIE code trains); default model")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    g.add_argument("--t-eps", type=float, default=1e-3, help="smallest training time t (default 1e-3)")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the head's weights, 0 for none (default 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and of every draw (default 0)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="head and data dtype (default float32)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training wall time, validate and save; --resume continues (default: no limit)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps, 0 for only at the end (default 500)")
    g.add_argument("--validate-every", type=int, default=500, help="validate every N steps, 0 for only at the end (default 500)")
    g.add_argument("--val-size", type=int, default=64, help="held-out samples per t-bucket, 0 for no validation (default 64)")
    g.add_argument("--val-buckets", type=int, default=5, help="t-buckets of the validation report (default 5)")
    g.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK under torchrun with GPUs, else cpu)")
    g.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads, 0 to leave torch's default (default 0)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_model(spec: str, args):
    """``(model, schedule, data_from_model)`` for ``--model``.  Add new model kinds here.

    A checkpoint path goes to ``genie_kernels.models.unet.load_unet(path, return_config=True)``,
    which must return the model and a config whose optional ``"schedule"`` entry is a
    schedule config (:func:`~genie_kernels.ode.schedules.schedule_from_config`).
    """
    if spec == "mixture":
        shape = tuple(int(s) for s in args.shape.split(","))
        model = image_mixture(shape, components=args.components, seed=args.mixture_seed)
        return model, model.schedule, model
    if spec == "toy2d":
        model = toy_2d()
        return model, model.schedule, model
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model must be 'mixture', 'toy2d' or an existing checkpoint file, got {spec!r}")
    try:
        from ..models.unet import load_unet
    except ImportError as err:
        raise ValueError(f"cannot load {path}: no model loader is installed (genie_kernels.models.unet.load_unet): {err}") from err
    model, config = load_unet(path, return_config=True)
    schedule = schedule_from_config(config["schedule"]) if "schedule" in config else LinearVPSchedule()
    return model, schedule, None


def load_data(spec: str, model_data, conditional: bool = False):
    """Training data for ``--data`` (see the module docstring); with ``conditional``
    ``(data, labels)``."""
    if conditional:
        return _labelled_data(spec)
    if spec == "model":
        if model_data is None:
            raise ValueError("--data model needs a model with its own data distribution (mixture, toy2d)")
        return model_data
    if spec == "mnist" or spec.startswith("mnist:"):
        from ..zoo.mnist.data import default_data_dir, load_mnist
        root = spec.split(":", 1)[1] if ":" in spec else default_data_dir()
        return load_mnist(root, split="train")[0]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data file {path} does not exist")
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".npy":
        import numpy as np
        data = torch.from_numpy(np.load(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        if "data" not in tensors:
            raise ValueError(f"{path} has no tensor named 'data' (found {sorted(tensors)[:5]})")
        data = tensors["data"]
    else:
        raise ValueError(f"unsupported data file {path}; use .pt, .npy or .safetensors")
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path} does not hold a tensor")
    return data.float()


def _labelled_data(spec: str):
    """``(images, labels)`` for ``--conditional``: MNIST, or a .safetensors file with 'data' and 'labels'."""
    if spec == "mnist" or spec.startswith("mnist:"):
        from ..zoo.mnist.data import default_data_dir, load_mnist
        return load_mnist(spec.split(":", 1)[1] if ":" in spec else default_data_dir(), split="train")
    path = Path(spec)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"--conditional needs labelled data: --data mnist[:DIR] or an existing .safetensors file "
                         f"with tensors 'data' and 'labels', got {spec!r}")
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    missing = sorted({"data", "labels"} - set(tensors))
    if missing:
        raise ValueError(f"{path} has no tensor named {missing[0]!r} (found {sorted(tensors)[:5]})")
    return tensors["data"].float(), tensors["labels"].long()


def _init_distributed():
    """Join the torchrun process group if there is one; return the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.cuda.is_available() and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    dtype = getattr(torch, args.dtype)
    try:
        check_new_output(args.out, args.resume, resume_option="--resume")  # before the model and data load
        if args.device:
            device = device_from_option(args.device)
        model, schedule, model_data = load_model(args.model, args)
        labels = None
        if args.conditional:
            data, labels = load_data(args.data, model_data, conditional=True)
        else:
            data = load_data(args.data, model_data)
        if isinstance(model, torch.nn.Module):
            # Networks run in --dtype; the analytic mixtures (buffers only) keep their float64 constants.
            has_weights = any(p.is_floating_point() for p in model.parameters())
            model = model.to(device=device, dtype=dtype) if has_weights else model.to(device)
        probe, out = probe_model(model, data_sampler(data), dtype, device)
        kind = args.head if args.head != "auto" else ("conv" if probe.dim() == 4 else "mlp")
        options = {"nf": args.nf, "num_blocks": args.blocks, "groups": args.groups} if kind == "conv" \
            else {"hidden": args.hidden, "num_layers": args.layers}
        if args.no_features:
            options["feature_channels" if kind == "conv" else "feature_dim"] = 0
        if args.own_temb:
            options["temb_channels"] = 0
        torch.manual_seed(args.seed)
        head = head_for(out, probe, kind, **options).to(device=device, dtype=dtype)
        result = distill(model, head, data, schedule, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         lr_schedule=args.lr_schedule, grad_clip=args.grad_clip, t_eps=args.t_eps,
                         ema_decay=args.ema, seed=args.seed, out=args.out,
                         checkpoint_every=args.checkpoint_every, resume=args.resume,
                         validate_every=args.validate_every, val_size=args.val_size, val_buckets=args.val_buckets,
                         time_limit=None if args.max_minutes is None else 60.0 * args.max_minutes,
                         progress=not args.no_progress, cond=labels, cond_drop=args.cond_drop,
                         head_eps=args.head_eps, log=(lambda line: print(line, flush=True)) if args.no_progress else None)
    except (ValueError, TypeError, OSError, FloatingPointError) as err:  # OSError: unreadable data, a full disk
        kind = "checkpoint error" if isinstance(err, CheckpointError) else "error"
        print(f"distill: {kind}: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    if result.losses:
        tail = result.losses[-min(100, len(result.losses)):]
        print(f"step {result.step}: mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4g}")
    if result.validation and args.no_progress:  # with the progress bar it was printed already
        print(format_validation(result.validation[-1]["step"], result.validation[-1]["buckets"]))
    print(f"head cost (reported beside genie's NFE, not counted in it): {result.head.cost}")
    print(f"head written to {args.out}")
    return 0
