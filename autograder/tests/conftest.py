"""pytest set-up for the autograder tests: ``--runslow`` also runs the tests marked ``slow``
(skipped by default), the same switch as lib/tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_addoption(parser):
    try:
        parser.addoption("--runslow", action="store_true", default=False,
                         help="also run tests marked slow")
    except ValueError:  # another conftest already added it
        pass


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if HERE in Path(str(item.fspath)).parents and "slow" in item.keywords:
            item.add_marker(skip_slow)
