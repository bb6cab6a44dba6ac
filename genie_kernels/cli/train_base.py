"""Train the base ε-UNet on MNIST, or export a trained checkpoint as the shipped model.

Training: ``train-base --data FOLDER --out DIR`` trains on the 9,000-digit training
split of the MNIST idx files in FOLDER (read in place), writing DIR/checkpoint.safetensors
every --ckpt-every steps and DIR/samples_<step>.png (DDIM, 20 steps, EMA weights) every
--sample-every steps.  Repeat the same command with --resume to continue an interrupted
run exactly (--steps may be raised).

Export: ``train-base --out DIR --export`` writes the EMA weights of DIR's checkpoint,
their config, PROVENANCE.md and samples.png to genie_kernels/zoo/weights/mnist/
(or --export-to).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import CheckpointError
from ..models.unet import PRETRAINED_DIR, TIME_INPUTS
from ..zoo.mnist.data import MNISTError, load_mnist
from ..zoo.mnist.train_base import CHECKPOINT_NAME, TrainConfig, TrainingError, export_pretrained, train_base
from . import int_at_least

DEFAULTS = TrainConfig()
TIME_SCALES = {"log_gamma": 2.0, "t": 1000.0}  # log_gamma: see genie_kernels.unet's docstring


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    p.add_argument("--out", required=True, help="run folder for checkpoint and sample grids")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"total training steps (default {DEFAULTS.steps})")
    p.add_argument("--batch", type=int, default=DEFAULTS.batch, help=f"batch size (default {DEFAULTS.batch})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"Adam learning rate (default {DEFAULTS.lr})")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help=f"warmup steps (default {DEFAULTS.warmup})")
    p.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip, help="gradient norm clip (default 1.0)")
    p.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay, help="EMA decay (default 0.999)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default 0)")
    p.add_argument("--threads", type=int_at_least(0), default=1, help="torch CPU threads, 0 for torch's default (default 1)")
    p.add_argument("--ckpt-every", type=int_at_least(0), default=100,
                   help="steps between checkpoints, 0 for only at the end (default 100)")
    p.add_argument("--sample-every", type=int_at_least(0), default=500,
                   help="steps between sample grids, 0 for none (default 500)")
    p.add_argument("--pad", type=int, default=0, help="pixels of padding on each side of the 28×28 digits (default 0)")
    p.add_argument("--channels", type=int, default=32, help="UNet base width (default 32)")
    p.add_argument("--channel-mults", type=_ints, default=(1, 2, 2), help="width multipliers per level (default 1,2,2)")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per level (default 1)")
    p.add_argument("--time-input", choices=TIME_INPUTS, default="log_gamma",
                   help="what the time embedding sees: log_gamma (log noise-to-signal ratio, smooth in t; "
                        "default) or t (DDPM's 1000·t, the old bundled model's)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="factor on the time input before the sinusoidal embedding (default 2 for log_gamma, "
                        "1000 for t)")
    p.add_argument("--num-classes", type=int_at_least(0), default=10,
                   help="train class-conditional on the digit labels (default 10; 0: unconditional)")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of replacing a label by the null label (default 0.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", action="store_true", help="export OUT's checkpoint as the shipped model instead of training")
    p.add_argument("--export-to", default=str(PRETRAINED_DIR / "mnist"), help="export folder (default: the package's zoo/weights/mnist)")
    p.add_argument("--export-dtype", choices=("float32", "float16"), default="float32", help="dtype of exported weights")


def run(args) -> int:
    invoked = sys.argv[1:2] == ["train-base"]  # else called as a function (tests): nothing to record
    command = "python -m genie_kernels " + shlex.join(sys.argv[1:]) if invoked else None
    try:
        if args.export:
            path = export_pretrained(Path(args.out) / CHECKPOINT_NAME, args.export_to,
                                     dtype=getattr(torch, args.export_dtype), export_command=command)
            print(f"wrote {path}, {path.with_suffix('.json').name}, PROVENANCE.md and samples.png in {path.parent}")
            return 0
        if not args.data:
            print("error: --data is required for training", file=sys.stderr)
            return 2
        if args.threads:
            torch.set_num_threads(args.threads)
        images, labels = load_mnist(args.data, split="train", pad=args.pad)
        size = images.shape[-1]
        levels = len(args.channel_mults)
        time_scale = args.time_scale if args.time_scale is not None else TIME_SCALES[args.time_input]
        unet_config = {"image_size": size, "in_channels": 1, "channels": args.channels,
                       "channel_mults": list(args.channel_mults), "num_res_blocks": args.num_res_blocks,
                       "attn_resolutions": [size // 2 ** (levels - 1)], "norm_groups": 8, "time_scale": time_scale,
                       "time_input": args.time_input, "num_classes": args.num_classes}
        config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                             grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
                             label_dropout=args.label_dropout if args.num_classes else 0.0)
        # the folder as given (relative paths stay relative: provenance names no machine's paths)
        data_info = {"description": "MNIST test set (t10k idx files)", "source": str(args.data),
                     "split": "train", "count": int(images.shape[0]), "pad": args.pad}
        result = train_base(images, args.out, unet_config, config, resume=args.resume, ckpt_every=args.ckpt_every,
                            sample_every=args.sample_every, data_info=data_info, command=command,
                            progress=not args.no_progress, labels=labels if args.num_classes else None,
                            log=lambda line: tqdm.write(line, file=sys.stderr))
    except (CheckpointError, MNISTError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"trained to step {result.step}; checkpoint in {Path(args.out) / CHECKPOINT_NAME}")
    return 0
