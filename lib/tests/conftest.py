"""Shared pytest set-up for the library tests.

* ``--runslow``: run the tests marked ``@pytest.mark.slow`` (skipped by default).
* ``@pytest.mark.cuda``: skipped unless ``torch.cuda.is_available()``.
* PyTorch runs on one CPU thread here (tiny tensors; see below).

The markers themselves are declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

# The library tests use tiny tensors: one thread is faster than two (no OpenMP
# hand-off) and keeps the run quick when other jobs share the CPU.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def not_grading(monkeypatch):
    """Library tests run in normal mode, whatever the calling shell set."""
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)


def pytest_addoption(parser):
    try:
        parser.addoption("--runslow", action="store_true", default=False,
                         help="also run tests marked slow")
    except ValueError:  # another conftest already added it
        pass


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow", default=False)
    has_cuda = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if HERE not in Path(str(item.fspath)).parents:
            continue
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture
def gen():
    """A seeded CPU generator, fresh for each test."""
    return torch.Generator().manual_seed(0)
