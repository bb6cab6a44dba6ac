"""Build script.  Metadata lives in pyproject.toml; this file exists so that the optional
C++/CUDA extension of csrc/ can be added as ``ext_modules`` (the package imports and
works without it)."""

from setuptools import setup

setup()
