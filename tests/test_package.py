import importlib.metadata
import pathlib
import re

import pytest
import torch

import pyro_ext


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", pyro_ext.__version__)


def test_version_matches_installed_metadata():
    try:
        installed = importlib.metadata.version("pyro_ext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyro_ext is not pip-installed here (running from a bare source tree)")
    assert installed == pyro_ext.__version__


def test_default_dtype_is_float64_in_tests():
    assert torch.get_default_dtype() == torch.float64


@pytest.mark.parametrize("package", ["testing", "datasets"])
def test_shared_pieces_import_no_part(package):
    root = pathlib.Path(pyro_ext.__file__).parent
    files = sorted((root / package).rglob("*.py")) if (root / package).is_dir() else [root / f"{package}.py"]
    assert files
    for path in files:
        source = path.read_text()
        for part in ("kernels", "gp", "flows", "infer", "diffusion", "exploration", "learning", "demo"):
            assert not re.search(rf"pyro_ext\.{part}\b", source), f"{path.name} imports pyro_ext.{part}"
