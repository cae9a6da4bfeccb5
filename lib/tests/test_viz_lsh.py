"""viz/lsh.py (lecture 06): the LSH explorer's state is the library's LSH attention, its
pictures show what the state says, and grading mode draws nothing."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import lsh as S  # noqa: E402
from transformer_lab.viz import lsh as vz  # noqa: E402


@pytest.fixture(scope="module")
def ex():
    return vz.lsh_explorer(n_buckets=4, n_rounds=2, chunk_len=8, length=32, max_rounds=4)


def test_explorer_protocol(ex):
    assert isinstance(ex, widgets.VBox) and ex.output in ex.children
    assert set(ex.controls) == {"n_buckets", "n_rounds", "chunk_len", "length", "causal", "seed"}
    assert isinstance(ex.figure, plt.Figure) and len(ex.figure.axes) == 4
    before = ex.renders
    ex.render()
    assert ex.renders == before + 1


def test_state_is_the_library_lsh_attention(ex):
    c = ex.controls
    c["n_buckets"].value, c["n_rounds"].value, c["chunk_len"].value = 6, 3, 4
    c["length"].value, c["causal"].value, c["seed"].value = 48, True, 2
    st = ex.state
    qk, v = vz.clustered_qk(48, seed=2)
    out, d = S.lsh_attention(qk, v, 6, 3, 4, True, generator=2, return_details=True)
    full = S.shared_qk_attention(qk, v, causal=True)
    assert torch.equal(st["buckets"], d.buckets[0, 0]) and st["buckets"].shape == (3, 48)
    assert torch.equal(st["visited"], d.visited[0, 0])
    assert st["error"] == pytest.approx(float((out - full).norm() / full.norm()))
    assert st["errors"][2] == pytest.approx(st["error"], rel=1e-6)  # 3 rounds = the first 3 of max_rounds
    assert len(st["errors"]) == 4
    # the sorted picture: buckets ascend along the slots, and every attended pair is inside a window,
    # in the same bucket, not on the diagonal, and (causal) not in the future
    order = st["order"]
    assert torch.equal(st["sorted_buckets"], d.buckets[0, 0, 0][order])
    assert (st["sorted_buckets"][1:] >= st["sorted_buckets"][:-1]).all()
    m = st["sorted_mask"]
    assert not (m & ~st["window"]).any()
    same = st["sorted_buckets"][:, None] == st["sorted_buckets"][None, :]
    assert not (m & ~same).any() and not m.diagonal().any()
    assert not (m & (order[None, :] > order[:, None])).any()
    assert 0.0 < st["covered"] <= 1.0
    # the third panel marks exactly the visited pairs
    offsets = ex.figure.axes[2].collections[0].get_offsets()
    assert len(offsets) == int(st["visited"].sum()) == st["pairs"]


def test_more_buckets_fewer_pairs_and_chunk_clipped(ex):
    c = ex.controls
    c["causal"].value, c["n_rounds"].value, c["length"].value, c["chunk_len"].value = False, 1, 32, 64
    assert ex.state["chunk_len"] == 32 and ex.state["n_chunks"] == 1  # clipped to L
    c["chunk_len"].value = 8
    c["n_buckets"].value = 2
    few = ex.state["pairs"]
    c["n_buckets"].value = 16
    assert ex.state["pairs"] < few


def test_static_helpers_draw_what_they_are_given():
    b = torch.tensor([[0, 1, 1, 3], [2, 2, 0, 1]])
    ax = vz.plot_buckets(b, 4)
    assert np.array_equal(np.asarray(ax.images[0].get_array()), b.numpy())
    plt.close(ax.figure)
    ax = vz.plot_rounds_error([0.5, 0.3, 0.2], current=2)
    assert list(ax.get_lines()[0].get_ydata()) == [0.5, 0.3, 0.2]
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="length must be between 16 and max_length=128; got 8"):
        vz.lsh_explorer(length=8)


def test_grading_mode_draws_nothing(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    off = vz.lsh_explorer()
    assert off.controls == {} and off.state == {}
