"""Checkpoints: safetensors files with their JSON config inside, written atomically.

A checkpoint is one ``.safetensors`` file whose header metadata holds the JSON config
under the key ``"config"`` (the authoritative copy), plus a ``.json`` copy beside it for
people to read.  Each file is written to a temporary name in the same folder, flushed
and fsynced, then renamed over the target, so a crash never leaves a partial checkpoint
and the previous one stays valid until the new one is complete.

Integrity: the metadata also holds ``"sha256"``, a SHA-256 over the config text and every
tensor's name, dtype, shape and bytes (:func:`tensor_digest`), checked by
:func:`load_checkpoint`; a file whose digest does not match is a :class:`CheckpointError`
naming it.  Files written before the digest existed (no ``"sha256"`` key) still load.

Links: a target that is a symbolic link is written through — the file the link points to
is replaced (atomically, in that file's folder) and the link stays; a dangling link is
refused.  A temporary file left by a killed writer (``.<name>.<pid>.*.tmp``, its process
gone) is removed by the next write to the same target, or by :func:`remove_stale_temporaries`.

A training run (:func:`~genie_kernels.heads.distill.distill`, :func:`~genie_kernels.zoo.mnist.train_base.train_base`)
stores its whole state with :func:`training_tensors` — each module's weights under its own
prefix, the optimizer's per-parameter state, the generator behind every random draw and
the loss history — and :func:`restore_training` puts it back, so a resumed run continues
exactly where the saved one stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not match what was asked for."""


def tensor_digest(tensors: dict[str, torch.Tensor], config_text: str) -> str:
    """SHA-256 (hex) over ``config_text`` and each tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_file(tensors: dict[str, torch.Tensor], filename, metadata: dict | None = None) -> None:
    """safetensors' format, written by Python: safetensors' own writer goes through a
    ``.tmpXXXXXX`` file of its own, which a kill leaves behind."""
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def write_target(path) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or the file a symbolic link
    there points to.  A dangling link is a :class:`CheckpointError` (writing would either
    replace the link or create a file somewhere unexpected)."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise CheckpointError(f"{path} is a link to {os.readlink(path)}, which does not exist; "
                                  "remove the link or give another path")
        return path.resolve()
    return path


def unwritable_reason(path) -> str | None:
    """Why ``path`` could not be written by :func:`save_checkpoint` or an image writer, or None.

    Checked before any work is done: a folder, a dangling link, an existing file that is not
    writable, a folder on the way that is a file, or a folder in which no file can be
    created (tried: ``os.access`` says yes for root on read-only or virtual file systems).
    Missing folders above ``path`` are created when it is written, so the nearest existing
    one must take a new file.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"it is a link to {os.readlink(path)}, which does not exist"
    if path.is_dir():
        return "it is a folder; give a file name"
    path = write_target(path)
    if path.exists():
        return None if os.access(path, os.W_OK) else "the file is not writable"
    existing = path.absolute().parent
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a broken link"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as err:
        return f"no file can be created in the folder {existing} ({err.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary files that an atomic write to ``path`` (or to its ``.json``
    copy) left when its process was killed; files of a process still alive stay.
    Returns the removed paths."""
    path = write_target(path)
    if not path.parent.is_dir():
        return []
    names = {path.name, path.with_suffix(".json").name}
    removed = []
    for candidate in path.parent.iterdir():
        match = _TEMPORARY.fullmatch(candidate.name)
        if match and match["name"] in names and not _process_alive(int(match["pid"])):
            try:
                candidate.unlink()
                removed.append(candidate)
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path, write) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file in ``path``'s folder
    (created if missing), which is fsynced and renamed over ``path``.  Readers see the old
    file or the whole new one, never a part; temporaries of killed writers are removed
    first (:func:`remove_stale_temporaries`).  Returns the path written."""
    path = write_target(_as_path(path))
    remove_stale_temporaries(path)
    _atomic_write(path, write)
    return path


def _atomic_write(path: Path, write) -> None:
    path = write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` and ``config`` to ``path`` (``.safetensors``) and its ``.json`` copy,
    atomically, with the SHA-256 of both in the metadata.  A link at ``path`` is written
    through (the ``.json`` copy goes beside the file it points to)."""
    path = _as_path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    path = write_target(path)
    remove_stale_temporaries(path)
    text = json.dumps(config, indent=2, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"config": text, "sha256": tensor_digest(tensors, text)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def write_json(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    _atomic_write(path.with_suffix(".json"), write_json)
    return path


def read_config(path) -> dict:
    """The config stored inside a checkpoint, without loading its tensors."""
    return json.loads(_read_metadata(path)["config"])


def _as_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__} {path!r:.60}")
    return Path(path)


def _read_metadata(path) -> dict:
    """The checkpoint's metadata, its config checked to be readable JSON."""
    path = _as_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.suffix == ".json":
        raise CheckpointError(f"{path} is the readable copy of a checkpoint's config; pass the .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    if "config" not in metadata:
        raise CheckpointError(f"checkpoint {path} has no config in its metadata; it was not written by genie_kernels")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable config: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} has a config that is a JSON {type(config).__name__}, not an object")
    return metadata


_ABSENT = object()
_short = reprlib.Repr()
_short.maxlist = _short.maxtuple = _short.maxdict = 4
_short.maxstring = _short.maxother = 60


def _difference(key: str, found, expected) -> str:
    """``"a.b is X, expected Y"`` for the first differing entry of two configs, values shortened
    (a schedule's 1,000 ``alphas_cumprod`` would otherwise fill the screen)."""
    if isinstance(found, dict) and isinstance(expected, dict):
        for name in list(expected) + [k for k in found if k not in expected]:
            if found.get(name, _ABSENT) != expected.get(name, _ABSENT):
                return _difference(f"{key}.{name}", found.get(name, _ABSENT), expected.get(name, _ABSENT))
    if isinstance(found, list) and isinstance(expected, list):
        if len(found) != len(expected):
            return f"{key} has {len(found)} entries, expected {len(expected)}"
        index = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        return _difference(f"{key}[{index}]", found[index], expected[index])
    shown = ["absent" if v is _ABSENT else _short.repr(v) for v in (found, expected)]
    return f"{key} is {shown[0]}, expected {shown[1]}"


def load_checkpoint(path, expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, config)``; with ``expect``, every given config key must match.

    The stored SHA-256 (where the file has one) must match the tensors and config read."""
    metadata = _read_metadata(path)
    config = json.loads(metadata["config"])
    for key, value in (expect or {}).items():
        if config.get(key) != value:
            raise CheckpointError(f"checkpoint {path} does not match: {_difference(key, config.get(key), value)}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    stored = metadata.get("sha256")
    if stored is not None and stored != tensor_digest(tensors, metadata["config"]):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the SHA-256 stored in it")
    return tensors, config


# -- a training run's state ----------------------------------------------------------------


def load_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path) -> None:
    """Load the tensors named ``prefix + key`` into ``module``: every entry of its state dict,
    nothing else, in its shapes (cast to its dtypes).  A mismatch is a :class:`CheckpointError`
    naming the first few missing, unexpected and misshapen entries."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshapen:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        parts = [f"{name} {items[:5]}{' …' if len(items) > 5 else ''}" for name, items in found if items]
        which = f" (its {prefix}* tensors)" if prefix else ""
        raise CheckpointError(f"checkpoint {path}{which} does not fit the {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def training_tensors(optimizer: torch.optim.Optimizer, generator: torch.Generator, losses: list[float], *,
                     modules: dict[str, torch.nn.Module], optimizer_prefix: str,
                     rng_key: str) -> dict[str, torch.Tensor]:
    """A run's state as named tensors: ``{prefix}{key}`` for each module's state dict,
    ``{optimizer_prefix}{i}.{key}`` for the optimizer's state of its i-th parameter,
    ``rng_key`` for the generator and ``"losses"`` (float64) for the history."""
    tensors = {f"{prefix}{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"{optimizer_prefix}{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors[rng_key] = generator.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    return tensors


def restore_training(tensors: dict[str, torch.Tensor], path, step: int, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, *, modules: dict[str, torch.nn.Module], optimizer_prefix: str,
                     rng_key: str) -> list[float]:
    """Put the state that :func:`training_tensors` stored at ``step`` back; return the losses.

    Raises :class:`CheckpointError` when a module does not fit, when the optimizer state is
    absent after step 0, names a parameter the optimizer lacks or has another shape than
    it, when the generator state is absent, or when the history does not hold ``step`` losses.
    """
    for prefix, module in modules.items():
        load_module_tensors(module, tensors, prefix, path)
    _load_optimizer_tensors(optimizer, tensors, optimizer_prefix, step, path)
    if rng_key not in tensors or "losses" not in tensors:
        raise CheckpointError(f"checkpoint {path} lacks its generator state or loss history")
    try:
        generator.set_state(tensors[rng_key])
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} holds an unusable generator state: {err}") from err
    losses = tensors["losses"].tolist()
    if len(losses) != step:
        raise CheckpointError(f"checkpoint {path} is inconsistent: step {step} but {len(losses)} losses")
    return losses


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str,
                            step: int, path) -> None:
    state_dict = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, name = key[len(prefix):].partition(".")
            if not index.isdigit() or not name:
                raise CheckpointError(f"checkpoint {path} holds {key!r}, not named {prefix}<parameter>.<state>")
            state.setdefault(int(index), {})[name] = value
    if step > 0 and not state:
        raise CheckpointError(f"checkpoint {path} is at step {step} but holds no optimizer state")
    for index, entries in state.items():
        if not 0 <= index < len(params):
            raise CheckpointError(f"checkpoint {path} holds optimizer state for parameter {index}; "
                                  f"the optimizer has {len(params)}")
        for name, value in entries.items():
            if value.dim() and value.shape != params[index].shape:
                raise CheckpointError(f"checkpoint {path}: optimizer state {prefix}{index}.{name} has shape "
                                      f"{tuple(value.shape)}, its parameter {tuple(params[index].shape)}")
    state_dict["state"] = state
    try:
        optimizer.load_state_dict(state_dict)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} holds an unusable optimizer state: {err}") from err
