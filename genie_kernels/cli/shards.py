"""Sharded generation for ``sample --num-samples N --out-dir DIR``, in one process or many.

Sample ``i`` (``0 ≤ i < N``) starts from its own noise, drawn by a generator seeded with
:func:`sample_seed` ``(seed, i)``, so which samples a run makes does not depend on how many
processes make them.  The samples are cut into shards of ``--shard-size``; shard ``k``
holds samples ``k·S … min((k+1)·S, N) − 1`` and is made by rank ``k mod W`` of ``W``
processes (``torchrun --nproc-per-node W``; rendezvous, ranks and world size come from
torchrun's environment; gloo on the CPU, NCCL on CUDA devices, rank ``r`` on
``cuda:LOCAL_RANK``).  Within a shard the samples go to ``sample()`` in batches of
``--batch``, so the same settings give the same batches whatever ``W`` is.

Files in DIR:

* ``run.json``: the settings.  A rerun with other settings is refused once a shard is
  there, one with the same settings resumes;
* ``shard_00012.npz``: ``images`` (uint8, ``(n, H, W, C)``, from [−1, 1]), ``labels``
  (int64, −1 for unconditional samples), ``seeds`` (uint64, each sample's noise seed) and
  ``indices`` (int64, the sample numbers), written atomically
  (:func:`genie_kernels.checkpoint.atomic_write`): a shard on disk is complete, and a
  rerun skips it, so a killed run resumes without duplicates;
* ``manifest.json``: written last by rank 0 once every shard is there: the settings and
  each shard's file, first sample, count and SHA-256.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..plotting import uint8_images

RUN_FORMAT = "genie_kernels.samples/1"
BARRIER_TIMEOUT = datetime.timedelta(hours=12)  # the last rank may finish its shards long after the first


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of a run seeded ``seed``: the first 8 bytes of
    SHA-256 of ``"genie_kernels.sample <seed> <index>"``, an integer in [0, 2^64)."""
    digest = hashlib.sha256(f"genie_kernels.sample {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_noise(seed: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 noise of samples ``indices``, each drawn by its own seeded generator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in indices])


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    return [range(first, min(first + shard_size, num_samples)) for first in range(0, num_samples, shard_size)]


def check_out_dir(out_dir: str) -> Path:
    """``--out-dir`` as a folder that exists or can be made; ValueError when it is a file."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {out_dir}: cannot make the folder ({err.strerror})") from None
    return path


class Ranks:
    """This process's rank and the world size under torchrun (one process without it), with
    the process group torchrun's environment describes."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, timeout=BARRIER_TIMEOUT)

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank got this far without an error (a barrier that also carries failures)."""
        if self.world == 1:
            return ok
        failed = torch.tensor([0 if ok else 1], device=self.device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        return int(failed.item()) == 0

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()


def check_run_record(out_dir: Path, settings: dict, write: bool) -> None:
    """Compare ``settings`` with DIR/run.json and refuse a difference while DIR holds shards;
    ``write``: write it when absent or when no shard was made under the old settings."""
    record = {"format": RUN_FORMAT, **settings}
    path = out_dir / "run.json"
    if path.is_file() and any(out_dir.glob("shard_*.npz")):
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} cannot be read ({err}); remove it or give another --out-dir") from None
        different = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
        if different:
            shown = ", ".join(f"{k}: {found.get(k)!r} there, {record.get(k)!r} now" for k in different)
            raise ValueError(f"--out-dir {out_dir} holds samples of a run with other settings ({shown}); "
                             "rerun with those settings to resume, or give another --out-dir")
    elif write and not (path.is_file() and path.read_text() == _json_text(record)):
        _write_json(path, record)


def _json_text(value: dict) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def _write_json(path: Path, value: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(_json_text(value))
    atomic_write(path, write)


def shard_is_complete(path: Path, indices: range) -> bool:
    """Whether ``path`` is a readable shard holding exactly the samples ``indices``."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return (data["indices"].tolist() == list(indices) and data["images"].shape[0] == len(indices)
                    and data["labels"].shape[0] == len(indices) and data["seeds"].shape[0] == len(indices))
    except (OSError, ValueError, KeyError):
        return False


def write_shard(path: Path, images: torch.Tensor, labels: torch.Tensor, seeds: list[int], indices: range) -> None:
    arrays = {"images": uint8_images(images).permute(0, 2, 3, 1).numpy(),
              "labels": labels.cpu().to(torch.int64).numpy(),
              "seeds": np.array(seeds, dtype=np.uint64), "indices": np.arange(indices.start, indices.stop)}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    atomic_write(path, write)


def generate(out_dir: Path, settings: dict, ranks: Ranks, draw: Callable, shape: tuple[int, ...],
             labels_of: Callable[[range], torch.Tensor | None], log: Callable[[str], None]) -> dict:
    """Make this rank's missing shards; returns ``{"made", "skipped"}`` counts.

    ``draw(noise, labels) -> images`` samples one batch (noise float32 on the CPU);
    ``labels_of(indices)`` gives the class labels of those samples, or None.
    """
    check_run_record(out_dir, settings, write=ranks.rank == 0)
    made = skipped = 0
    for shard, indices in enumerate(shard_ranges(settings["num_samples"], settings["shard_size"])):
        if shard % ranks.world != ranks.rank:
            continue
        path = shard_path(out_dir, shard)
        if shard_is_complete(path, indices):
            skipped += 1
            continue
        parts, all_labels = [], []
        for first in range(indices.start, indices.stop, settings["batch"]):
            batch = range(first, min(first + settings["batch"], indices.stop))
            labels = labels_of(batch)
            parts.append(draw(sample_noise(settings["seed"], batch, shape), labels).cpu())
            all_labels.append(torch.full((len(batch),), -1, dtype=torch.int64) if labels is None else labels.cpu())
        write_shard(path, torch.cat(parts), torch.cat(all_labels), [sample_seed(settings["seed"], i) for i in indices],
                    indices)
        made += 1
        log(f"rank {ranks.rank}: wrote {path.name} (samples {indices.start}..{indices.stop - 1})")
    return {"made": made, "skipped": skipped}


def write_manifest(out_dir: Path, settings: dict) -> Path:
    """DIR/manifest.json, once every shard is complete (rank 0, after all ranks are done)."""
    shards = []
    for shard, indices in enumerate(shard_ranges(settings["num_samples"], settings["shard_size"])):
        path = shard_path(out_dir, shard)
        if not shard_is_complete(path, indices):
            raise ValueError(f"{path} is missing or incomplete after every rank finished; rerun to make it")
        shards.append({"file": path.name, "first": indices.start, "count": len(indices),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    path = out_dir / "manifest.json"
    _write_json(path, {"format": RUN_FORMAT, "settings": settings, "shards": shards})
    return path
