"""Test-suite defaults: float64, a fixed seed per test, a clean Pyro param store, validation on.

``slow`` tests (long experiments) are deselected unless ``--runslow`` or ``-m slow`` is given.
"""

from __future__ import annotations

import os
import zlib

import pyro
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_default_dtype(torch.float64)
    # Matplotlib must never try to open a window from a test or a smoke-run notebook.
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip_slow = pytest.mark.skip(reason="slow experiment: run with --runslow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _reproducible_state(request: pytest.FixtureRequest):
    """Seed every test from its own id, so tests do not depend on the order they run in."""
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    dtype = torch.get_default_dtype()
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()
