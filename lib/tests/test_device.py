"""device.py and the package's top level: device choice, seeding, grading mode, lazy imports."""

from __future__ import annotations

import importlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import transformer_lab as tl

# the function transformer_lab.device shadows the submodule's name: fetch the module itself
dev_module = importlib.import_module("transformer_lab.device")


def test_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    d = tl.device()
    assert isinstance(d, torch.device) and d.type in ("cuda", "mps", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tl.device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert tl.device() == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert tl.device() == torch.device("cpu")


def draw():
    return random.random(), np.random.rand(), torch.rand(3)


def test_seed_everything_is_reproducible():
    g = tl.seed_everything(123)
    first, from_gen = draw(), torch.rand(3, generator=g)
    g = tl.seed_everything(123)
    second = draw()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    assert torch.equal(torch.rand(3, generator=g), from_gen)
    assert torch.equal(from_gen, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    tl.seed_everything(124)
    assert draw()[0] != first[0]
    with pytest.raises(TypeError, match="seed must be an int; got float"):
        tl.seed_everything(1.5)


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("TRUE", True), ("0", False), ("", False), ("no", False),
])
def test_grading_mode_and_budget(monkeypatch, value, expected):
    monkeypatch.setenv(dev_module.GRADING_ENV, value)
    assert tl.grading_mode() is expected
    assert tl.budget(600, 20) == (20 if expected else 600)


def test_grading_mode_off_when_unset(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    assert tl.grading_mode() is False and tl.budget("full", "small") == "full"


def test_top_level_names():
    for name in ("device", "seed_everything", "grading_mode", "budget"):
        assert callable(getattr(tl, name))
    assert tl.attention.MultiHeadAttention is not None  # submodule imported on first use
    assert tl.models.TransformerLM is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl.nope  # noqa: B018


def test_import_is_lazy():
    """``import transformer_lab`` must not pull in the heavy submodules (viz: matplotlib)."""
    code = ("import sys, transformer_lab; "
            "print(any(m.startswith('transformer_lab.') and m != 'transformer_lab.device' "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
