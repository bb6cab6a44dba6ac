"""Everyday conventions: a progress bar on request, py.typed shipped, logging instead of
print in the library, and a torch requirement the code really needs."""

import ast
import logging
import re
import tomllib
from pathlib import Path

import pytest
import torch

import genie_kernels as gk

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "genie_kernels"


def test_sample_and_encode_show_a_progress_bar_only_when_asked(capsys):
    mix = gk.image_mixture((1, 4, 4))
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    quiet = gk.sample(mix, noise, 7, solver="ddim")
    assert capsys.readouterr().err == ""
    seen = []
    loud = gk.sample(mix, noise, 7, solver="ddim", progress=True, callback=lambda info: seen.append(info["i"]))
    err = capsys.readouterr().err
    assert "sample:" in err and "/7 " in err and seen == list(range(7))  # the bar of 7 steps; the callback still runs
    assert torch.equal(quiet, loud)
    gk.encode(mix, loud, 5, solver="ab2", progress=True)
    assert "encode" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be True or False"):
        gk.sample(mix, noise, 3, solver="ddim", progress="yes")


def test_py_typed_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["genie_kernels"]


def test_the_library_does_not_print():
    """print() belongs to the command line (cli/); the library logs."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Name) and node.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_the_c_extension_build_notice_is_logged(monkeypatch, caplog):
    from genie_kernels.fast import ext

    assert ext.LOGGER.name == "genie_kernels.fast.ext"
    with caplog.at_level(logging.WARNING, logger="genie_kernels.fast.ext"):
        ext.LOGGER.warning("probe")
    assert caplog.records[-1].name == "genie_kernels.fast.ext"


def test_the_torch_requirement_is_the_one_the_triton_ops_need():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    (pin,) = [d for d in config["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert pin == "torch>=2.6"  # torch.library.triton_op arrived in torch 2.6
    assert hasattr(torch.library, "triton_op")  # the torch these tests run on meets it
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 6)
    readme = (REPO / "README.md").read_text()
    assert "torch 2.6 or newer" in readme and "torch ≥ 2.4" not in readme and "any torch ≥ 2.6" in readme


def test_triton_status_names_a_torch_without_triton_op(monkeypatch):
    from genie_kernels import fast

    monkeypatch.delattr(torch.library, "triton_op")
    monkeypatch.setattr(fast.importlib.util, "find_spec", lambda name: object())
    usable, reason = fast.triton_status("cuda")
    assert not usable and "torch 2.6 or newer" in reason
