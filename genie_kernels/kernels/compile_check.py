"""Compile the Triton kernels for an NVIDIA GPU without one, and report their register use.

    python -m genie_kernels.kernels.compile_check            # sm_90 (H100), a table
    python -m genie_kernels.kernels.compile_check --arch 80  # A100

Triton compiles ahead of time for any target: source → TTIR → PTX → cubin (with the ptxas
shipped in the triton wheel), no driver needed.  For every kernel variant the sampler and
the head launch (modes, dtypes, both GroupNorm layouts, the folds) this builds the cubin
and reads its resource usage with the wheel's ``cuobjdump``: registers per thread and
local memory, which is non-zero when registers spill.  The tests run it on machines with
no GPU, so a kernel that would not compile (or would spill) for the H100 fails in CI.

It cannot run under ``TRITON_INTERPRET=1`` (the kernels are then interpreter objects);
the tests start it in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HEAD_SHAPES = [(128, 32, 32 * 32), (64, 8, 32 * 32), (32, 8, 28 * 28)]  # (channels, groups, pixels)
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass
class Variant:
    kernel: str
    config: str
    registers: int
    local_bytes: int


def _tools() -> Path:
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent / "bin"


def available() -> tuple[bool, str]:
    """Whether the kernels can be compiled here (triton with its NVIDIA backend and tools;
    in a process without ``TRITON_INTERPRET=1``)."""
    try:
        tools = _tools()
    except ImportError as err:
        return False, f"triton's NVIDIA backend is not installed ({err})"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (tools / tool).exists()]
    if missing:
        return False, f"triton's wheel lacks {', '.join(missing)} in {tools}"
    return True, f"triton's NVIDIA tools in {tools}"


def _compile(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int) -> tuple[int, int]:
    """(registers, local memory bytes) of one variant compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {name: ("constexpr" if name in constexprs else signature[name]) for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, full, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_tools() / "cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    registers, local = re.search(r"REG:(\d+).*LOCAL:(\d+)", usage).groups()
    return int(registers), int(local)


def group_norm_variants(arch: int):
    from .group_norm import _group_norm_silu_kernel, launch_config

    scalars = {"channels": "i32", "spatial": "i32", "channels_per_group": "i32", "channels_per_program": "i32",
               "bias_batch_stride": "i32", "eps": "fp32", "residual_scale": "fp32"}
    cases = [(shape, dtype, channels_last, fold) for shape in HEAD_SHAPES for channels_last in (False, True)
             for fold in ("bias", "bias+residual") for dtype in ("float16",)]
    cases += [(HEAD_SHAPES[0], dtype, True, "bias+residual") for dtype in ("float32", "bfloat16")]
    cases += [(HEAD_SHAPES[0], "float16", channels_last, "none") for channels_last in (False, True)]
    for (channels, groups, pixels), dtype, channels_last, fold in cases:
        config = launch_config(channels, groups, pixels, channels_last)
        config.pop("channels_per_program")
        num_warps = config.pop("num_warps")
        pointer = "*" + TYPES[dtype]
        signature = dict(scalars, **{name: pointer for name in _group_norm_silu_kernel.arg_names if name.endswith("_ptr")})
        constexprs = dict(config, CHANNELS_LAST=channels_last, HAS_BIAS="bias" in fold, HAS_RESIDUAL="residual" in fold)
        registers, local = _compile(_group_norm_silu_kernel, signature, constexprs, arch, num_warps)
        layout = "NHWC" if channels_last else "NCHW"
        label = f"C{channels} G{groups} {pixels}px {dtype} {layout} {fold}, tile {config['BLOCK_P']}x{config['BLOCK_C']}"
        yield Variant("group_norm_silu", f"{label}, {num_warps} warps", registers, local)


def update_variants(arch: int):
    import triton.language as tl

    from .update import MODES, _taylor_update_kernel

    for xbar_dtype, eps_dtype in (("float32", "float16"), ("float32", "bfloat16"), ("float32", "float32"),
                                  ("float64", "float64")):
        for mode in MODES:
            signature = {"xbar_ptr": "*" + TYPES[xbar_dtype], "new_xbar_ptr": "*" + TYPES[xbar_dtype],
                         "eps_ptr": "*" + TYPES[eps_dtype], "aux_ptr": "*" + TYPES[eps_dtype],
                         "new_x_ptr": "*" + TYPES[eps_dtype], "gammas_ptr": "*fp64",
                         "step": "i32", "numel": "i32", "per_sample": "i32"}
            compute = tl.float64 if xbar_dtype == "float64" else tl.float32
            constexprs = {"MODE": MODES.index(mode), "COMPUTE": compute, "BLOCK": 1024}
            registers, local = _compile(_taylor_update_kernel, signature, constexprs, arch, num_warps=4)
            yield Variant("taylor_update", f"{mode}, x̄ {xbar_dtype}, ε {eps_dtype}, block 1024", registers, local)


def compile_all(arch: int = 90) -> list[Variant]:
    usable, reason = available()
    if os.environ.get("TRITON_INTERPRET") == "1":
        usable, reason = False, "TRITON_INTERPRET=1 is set: the kernels are interpreter objects"
    if not usable:
        raise RuntimeError(f"cannot compile the Triton kernels here: {reason}")
    return [*group_norm_variants(arch), *update_variants(arch)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    args = parser.parse_args(argv)
    try:
        variants = compile_all(args.arch)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"| kernel | variant (sm_{args.arch}) | registers | local memory (spills) |\n|---|---|---|---|")
    for v in variants:
        print(f"| {v.kernel} | {v.config} | {v.registers} | {v.local_bytes} B |")
    spilled = [v for v in variants if v.local_bytes]
    print(f"{len(variants)} variants compiled, {len(spilled)} with local memory")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
