"""viz/decoding.py: the explorers' states against direct computations; the controls drive them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import decoding as Dc  # noqa: E402
from transformer_lab.viz import decoding as vz  # noqa: E402


def test_sampling_state_matches_the_library():
    s = vz.sampling_state(temperature=0.7, top_k=0, top_p=0.8)
    z = vz.zipf_logits()
    torch.testing.assert_close(s["base"], torch.softmax(z / 0.7, -1))
    torch.testing.assert_close(s["final"], Dc.sampling_probs(z, 0.7, top_p=0.8))
    # the nucleus: the smallest prefix of ranks whose mass reaches 0.8 (the Zipf row is sorted)
    n = int((s["base"].cumsum(0) < 0.8).sum()) + 1
    assert s["n_kept"] == n and s["kept"][:n].all() and not s["kept"][n:].any()
    assert s["mass_kept"] == pytest.approx(float(s["base"][:n].sum())) and s["mass_kept"] >= 0.8
    assert vz.sampling_state(top_k=3)["n_kept"] == 3
    # a lower temperature concentrates the mass: fewer tokens reach 0.9 and the entropy drops
    cold, hot = vz.sampling_state(0.3, top_p=0.9), vz.sampling_state(2.0, top_p=0.9)
    assert cold["n_kept"] < hot["n_kept"] and cold["entropy"] < hot["entropy"]


def test_speculative_state_sums_to_one_and_matches_the_formula():
    s = vz.speculative_state(0.6, 3)
    assert sum(s["probs"]) == pytest.approx(1.0)
    assert s["mean"] == pytest.approx(Dc.expected_tokens_per_call(0.6, 3)) == pytest.approx(s["e_tok"])
    assert s["curve"][2] == pytest.approx(s["e_tok"]) and s["limit"] == pytest.approx(2.5)
    assert all(b > a for a, b in zip(s["curve"], s["curve"][1:], strict=False))  # grows towards the limit
    assert vz.speculative_state(1.0, 4)["probs"] == [0, 0, 0, 0, 1.0]


def test_explorers_controls_drive_state(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.sampling_explorer()
    ex.controls["top_k"].value = 5
    assert ex.state["n_kept"] == 5 and ex.figure is not None and ex.renders == 2
    sp = vz.speculative_explorer()
    sp.controls["n_draft"].value = 2
    assert sp.state["tokens"] == [1, 2, 3] and sp.renders == 2


def test_grading_mode_turns_them_off(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    assert vz.sampling_explorer().controls == {} and vz.speculative_explorer().figure is None
