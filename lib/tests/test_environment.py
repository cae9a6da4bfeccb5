"""The environment `make lab` builds: widgets and nbgrader work in JupyterLab out of the box."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(*args):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    return out.stdout + out.stderr


def test_ipywidgets_8_with_its_lab_manager():
    import ipywidgets

    assert int(ipywidgets.__version__.split(".")[0]) == 8, ipywidgets.__version__
    listing = _run(str(BIN / "jupyter"), "labextension", "list")
    line = next((ln for ln in listing.splitlines() if "@jupyter-widgets/jupyterlab-manager" in ln), "")
    assert "enabled" in line and "OK" in line, f"widget manager not enabled in JupyterLab:\n{listing}"


def test_nbgrader_extensions_enabled():
    lab = _run(str(BIN / "jupyter"), "labextension", "list")
    line = next((ln for ln in lab.splitlines() if "nbgrader" in ln), "")
    assert "enabled" in line and "OK" in line, f"nbgrader lab extension not enabled:\n{lab}"
    server = _run(str(BIN / "jupyter"), "server", "extension", "list")
    for ext in ("formgrader", "validate_assignment"):
        assert f"nbgrader.server_extensions.{ext} \x1b[32menabled" in server or (
            f"nbgrader.server_extensions.{ext} enabled" in server
        ), f"nbgrader server extension {ext} not enabled:\n{server}"


def test_alembic_reachable_from_environment_bin():
    # nbgrader runs `alembic` by name; the Makefile puts this bin first on PATH.
    assert (BIN / "alembic").exists(), f"alembic missing from {BIN}"


def test_torch_is_the_pinned_build():
    import torch

    pinned = json.dumps("torch==2.13.0")
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert pinned in pyproject, "pyproject.toml must pin torch==2.13.0 for CI"
    if not torch.cuda.is_available():
        assert torch.__version__.startswith("2.13.0"), torch.__version__
    else:  # a CUDA build of the same release is the documented GPU set-up
        pytest.skip("CUDA build installed")
