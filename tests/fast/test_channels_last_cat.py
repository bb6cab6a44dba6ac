"""The fused head's channels-last input kernel equals cat + zero padding + channels-last copy."""

import pytest
import torch

from genie_kernels.fast import triton_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
usable, reason = triton_status(DEVICE)
if not usable:
    pytest.skip(reason, allow_module_level=True)

from genie_kernels.fast.channels_last_cat import channels_last_cat, channels_last_cat_reference  # noqa: E402

# (channels of the parts, H, W, batch): the head's x/ε/features split, a part wider than one
# 64-channel block, one part, one pixel, more pixels than one 64-pixel block.
CASES = [((3, 3, 21), 5, 7, 2), ((1, 1, 130), 9, 9, 1), ((67,), 3, 4, 3), ((2, 5), 1, 1, 2), ((3, 3, 8), 12, 11, 1)]


def parts_of(channels, height, width, batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, height, width, generator=gen).to(DEVICE, dtype) for c in channels]


@pytest.mark.parametrize("channels, height, width, batch", CASES)
@pytest.mark.parametrize("multiple", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_cat_pad_and_channels_last_copy(channels, height, width, batch, multiple, dtype):
    parts = parts_of(channels, height, width, batch, dtype)
    got = channels_last_cat(parts, multiple)
    want = channels_last_cat_reference(parts, multiple)
    assert got.shape == want.shape and got.shape[1] % multiple == 0
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # a copy: bit for bit
    assert not got[:, sum(channels):].any()  # the padding is zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casts_to_the_requested_dtype_rounding_to_nearest(dtype):
    """float32 parts stored in half precision equal the reference's cast (round to nearest
    even), bit for bit; except that the CPU interpreter truncates to bfloat16, so there
    one unit in the last place is allowed."""
    parts = parts_of((3, 3, 21), 5, 7, 2, torch.float32)
    got = channels_last_cat(parts, 8, dtype)
    want = channels_last_cat_reference(parts, 8, dtype)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    truncating = DEVICE == "cpu" and dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2.0 ** -7 if truncating else 0)
    exact = channels_last_cat_reference(parts, 8, torch.float32)
    assert (got.float() - exact).abs().max() > 0  # it did store in half precision


def test_an_empty_batch_gives_an_empty_output():
    got = channels_last_cat(parts_of((3, 3), 4, 4, 0, torch.float32), 8)
    assert got.shape == (0, 8, 4, 4)


def test_is_a_registered_custom_op_equal_to_the_direct_launch():
    a, b, c = parts_of((3, 3, 10), 5, 7, 2, torch.float16)
    through_op = torch.ops.genie_kernels.channels_last_cat(a, b, c, 8, torch.float16)
    torch.testing.assert_close(through_op, channels_last_cat([a, b, c], 8), atol=0, rtol=0)
    checks = ("test_schema", "test_faketensor") if DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(torch.ops.genie_kernels.channels_last_cat.default, (a, b, None, 8, torch.float16),
                          test_utils=checks)


def test_rejects_bad_input():
    a, b = parts_of((3, 3), 4, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="one batch size and one H×W"):
        channels_last_cat([a, b[:, :, :3]])
    with pytest.raises(ValueError, match="one batch size and one H×W"):
        channels_last_cat([a, b[:1]])
    with pytest.raises(ValueError, match="1 to 3 tensors"):
        channels_last_cat([a, a, a, a])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        channels_last_cat([a[0]])
    with pytest.raises(ValueError, match="contiguous"):
        channels_last_cat([a.transpose(2, 3)])
    with pytest.raises(ValueError, match="multiple"):
        channels_last_cat([a], 0)
    with pytest.raises(ValueError, match="one device"):
        channels_last_cat([a, b.to("meta")])


def test_the_op_called_directly_checks_its_input_too():
    a, b = parts_of((3, 3), 4, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="one batch size"):
        torch.ops.genie_kernels.channels_last_cat(a, b[:1], None, 8, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.genie_kernels.channels_last_cat(a, b.transpose(2, 3), None, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        torch.ops.genie_kernels.channels_last_cat(a, None, None, 0, torch.float32)
