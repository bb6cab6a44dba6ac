"""One wording for a bad integer setting, wherever it is given (heads, distillation, data)."""

import re

import numpy as np
import pytest

import genie_kernels as gk
from genie_kernels.checks import check_int
from genie_kernels.zoo.mnist.data import load_mnist


@pytest.mark.parametrize("value", [0, 1, 7])
def test_an_int_at_or_above_the_bound_passes(value):
    check_int("n", value, 0)


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, np.int64(3), -1])
def test_anything_else_is_named_with_the_bound(value):
    with pytest.raises(ValueError, match=f"^{re.escape(f'n must be an int >= 0, got {value!r}')}$"):
        check_int("n", value, 0)


@pytest.mark.parametrize("make, message", [
    (lambda: gk.ConvHead(1, nf=8, groups=4, num_blocks=True), r"num_blocks must be an int in \[0, 1024\], got True"),
    (lambda: gk.MLPHead(2, hidden=0), r"hidden must be an int in \[1, 65536\], got 0"),
    (lambda: gk.distill(gk.toy_2d(), gk.MLPHead(2), gk.toy_2d(), steps=5, val_buckets=0, progress=False),
     "val_buckets must be an int >= 1, got 0"),
    (lambda: load_mnist(".", pad=1.5), "pad must be an int >= 0, got 1.5"),
])
def test_each_entry_point_uses_it(make, message):
    with pytest.raises(ValueError, match=message):
        make()
