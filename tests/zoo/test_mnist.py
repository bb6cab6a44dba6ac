"""MNIST idx reader: the real files (if present), the fixed split, and clear errors on bad files."""

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from genie_kernels.zoo.mnist.data import (IMAGES_FILE, IMAGES_MAGIC, LABELS_FILE, LABELS_MAGIC, MNISTError, load_mnist,
                                 read_idx, split_indices)

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GENIE_MNIST") or REPO.parent / "shared" / "data" / "mnist")
needs_data = pytest.mark.skipif(not (DATA / IMAGES_FILE).is_file(),
                                reason=f"MNIST idx files not found in {DATA} (set GENIE_MNIST to their folder)")


@pytest.fixture(scope="module")
def all_digits():
    return load_mnist(DATA, split="all")


@needs_data
def test_real_files_shapes_range_labels(all_digits):
    x, y = all_digits
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    assert (x == -1.0).float().mean() > 0.7  # mostly background


@needs_data
def test_real_split_sizes_and_contents(all_digits):
    x, y = all_digits
    train_idx, eval_idx = split_indices()
    xt, yt = load_mnist(DATA, split="train")
    xe, ye = load_mnist(DATA, split="eval")
    assert xt.shape[0] == yt.shape[0] == 9_000 and xe.shape[0] == ye.shape[0] == 1_000
    assert torch.equal(xt, x[train_idx]) and torch.equal(ye, y[eval_idx])
    assert len(set(ye.tolist())) == 10  # every class is held out


@needs_data
def test_padding_to_32(all_digits):
    x, _ = all_digits
    xp, _ = load_mnist(DATA, split="eval", pad=2)
    assert xp.shape == (1_000, 1, 32, 32)
    assert torch.equal(xp[:, :, 2:-2, 2:-2], x[split_indices()[1]])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert (xp[:, :, border] == -1.0).all()


def test_split_is_fixed_disjoint_and_complete():
    train_idx, eval_idx = split_indices()
    assert train_idx.numel() == 9_000 and eval_idx.numel() == 1_000
    assert torch.equal(torch.sort(torch.cat([train_idx, eval_idx])).values, torch.arange(10_000))
    again = split_indices()
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], eval_idx)
    # Pinned: the held-out digits must never change (the shipped model was trained without them).
    assert eval_idx[:5].tolist() == [3, 7, 18, 23, 24] and int(eval_idx.sum()) == 5_006_842
    assert not torch.equal(split_indices(seed=1)[1], eval_idx)


def idx_bytes(magic, shape, payload_len=None, fill=0):
    n = 1
    for s in shape:
        n *= s
    return struct.pack(f">{1 + len(shape)}I", magic, *shape) + bytes([fill]) * (n if payload_len is None else payload_len)


def write(path, data, compress=True):
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    return path


def test_read_idx_plain_and_gzip(tmp_path):
    data = idx_bytes(IMAGES_MAGIC, (2, 3, 4), fill=7)
    for compress in (True, False):
        x = read_idx(write(tmp_path / f"f{compress}", data, compress), IMAGES_MAGIC, 3)
        assert x.shape == (2, 3, 4) and x.dtype == torch.uint8 and (x == 7).all()


@pytest.mark.parametrize("name, data, message", [
    ("wrong magic", idx_bytes(LABELS_MAGIC, (2, 3, 4)), "magic number 0x00000801, expected 0x00000803"),
    ("truncated payload", idx_bytes(IMAGES_MAGIC, (2, 3, 4), payload_len=20), "truncated"),
    ("trailing bytes", idx_bytes(IMAGES_MAGIC, (2, 3, 4), payload_len=30), "truncated or corrupt"),
    ("short header", b"\x00\x00\x08\x03\x00", "too short"),
])
def test_read_idx_errors(tmp_path, name, data, message):
    with pytest.raises(MNISTError, match=message):
        read_idx(write(tmp_path / "f.gz", data), IMAGES_MAGIC, 3)


def test_truncated_gzip_and_missing_files(tmp_path):
    blob = gzip.compress(idx_bytes(IMAGES_MAGIC, (2, 28, 28), fill=3))
    (tmp_path / IMAGES_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MNISTError, match="gzip"):
        read_idx(tmp_path / IMAGES_FILE, IMAGES_MAGIC, 3)
    with pytest.raises(MNISTError, match="folder not found"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(MNISTError, match="not found"):
        read_idx(tmp_path / "missing.gz", IMAGES_MAGIC, 3)


def test_load_mnist_checks_counts_and_labels(tmp_path):
    write(tmp_path / IMAGES_FILE, idx_bytes(IMAGES_MAGIC, (5, 28, 28)))
    write(tmp_path / LABELS_FILE, idx_bytes(LABELS_MAGIC, (5,)))
    with pytest.raises(MNISTError, match=r"expected \(10000, 28, 28\)"):
        load_mnist(tmp_path)
    write(tmp_path / IMAGES_FILE, idx_bytes(IMAGES_MAGIC, (10_000, 28, 28)))
    with pytest.raises(MNISTError, match="5 labels, expected 10000"):
        load_mnist(tmp_path)
    write(tmp_path / LABELS_FILE, idx_bytes(LABELS_MAGIC, (10_000,), fill=12))
    with pytest.raises(MNISTError, match="label 12"):
        load_mnist(tmp_path)
    write(tmp_path / LABELS_FILE, idx_bytes(LABELS_MAGIC, (10_000,), fill=4))
    x, y = load_mnist(tmp_path, split="eval")
    assert x.shape == (1_000, 1, 28, 28) and (x == -1).all() and (y == 4).all()
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist(tmp_path, split="test")
    with pytest.raises(ValueError, match="pad"):
        load_mnist(tmp_path, pad=-1)
