"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: every variant the
sampler launches, specialised as the JIT would, with 16-byte loads and no register spills; a
first loop compiles few variants, and the graph runner's warm-up compiles all of them.

Triton compiles ahead of time with the ptxas in its wheel; the check runs in a subprocess
because this test session interprets the kernels (``TRITON_INTERPRET=1``).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from genie_kernels.cli import compile_check  # noqa: E402

usable, reason = compile_check.available()
if not usable:
    pytest.skip(reason, allow_module_level=True)


def test_every_kernel_variant_compiles_for_sm90_with_vector_loads_and_no_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "genie_kernels.cli.compile_check", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kernels = ("group_norm_silu", "taylor_update", "channels_last_cat")
    rows = [line for line in run.stdout.splitlines() if line.startswith(tuple(f"| {k} |" for k in kernels))]
    assert all(any(row.startswith(f"| {k} |") for row in rows) for k in kernels), run.stdout
    assert len(rows) >= 20 and f"{len(rows)} variants compiled, 0 with problems" in run.stdout, run.stdout
    # a first GENIE loop with AFS compiles one update per mode (ddim for the analytic step, genie),
    # not one per step value the JIT would specialise on, and the two GroupNorm folds of the head
    first_use = next(line for line in run.stdout.splitlines() if line.startswith("first use"))
    assert first_use.endswith("_group_norm_silu_kernel 2, _taylor_update_kernel 2"), first_use
    # the CUDA-graph runner's short warm-up launches every variant its whole loop launches
    assert "the graph runner's warm-up compiles every variant of the loop: yes" in run.stdout, run.stdout


def test_compile_check_refuses_to_run_on_interpreted_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.compile_all()
