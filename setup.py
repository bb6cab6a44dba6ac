"""Build script.  Metadata lives in pyproject.toml; this file exists so that the optional
C++/CUDA extension of csrc/ can be added as ``ext_modules`` (the package imports and
works without it).

The extension ``genie_kernels._C`` (the op ``torch.ops.genie_cpp.taylor_update``) is built
only when torch can be imported at build time, i.e. with ``pip install
--no-build-isolation``; pip's default isolated build has no torch, builds none, and
genie_kernels.ext JIT-builds it on first use instead.  With nvcc (CUDA_HOME) and a CUDA
torch it includes the CUDA kernel, else the CPU kernel only.  A failed build warns and
does not fail the install.  ``GENIE_KERNELS_BUILD_EXT=0`` turns it off.
"""

import os

from setuptools import setup


def _extension_args() -> dict:
    if os.environ.get("GENIE_KERNELS_BUILD_EXT") == "0":
        print("genie_kernels: GENIE_KERNELS_BUILD_EXT=0, not building the C++ extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("genie_kernels: torch is not importable at build time (pip's isolated build?), so the optional "
              "C++ extension is not built; it is JIT-built on first use, or reinstall with --no-build-isolation")
        return {}

    # No fast math and no FMA contraction: the kernels match taylor_update_reference exactly
    # (the same flags as the JIT build in genie_kernels/fast/ext.py).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    macros = [("GENIE_CPP_PYTHON_MODULE", None)]  # defines PyInit__C, so `import genie_kernels._C` works
    sources = ["csrc/taylor_update.cpp"]  # relative to this file, as setuptools wants
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        extension = cpp_extension.CUDAExtension(
            "genie_kernels._C", sources + ["csrc/taylor_update_cuda.cu"], define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"], optional=True,
        )
    else:
        extension = cpp_extension.CppExtension(
            "genie_kernels._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"], optional=True,
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """Turns a failed build of an optional extension into a warning.

        setuptools only forgives compiler errors of its own types; torch's ninja builds
        raise RuntimeError.
        """

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not getattr(ext, "optional", False):
                    raise
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                self.warn(f"genie_kernels: the optional C++ extension was not built ({first}); "
                          "genie_kernels.ext JIT-builds it on first use if it can")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_args())
