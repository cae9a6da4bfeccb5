"""Tests for transformer_lab.viz: plots draw what they are given, widgets react to controls."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import viz  # noqa: E402
from transformer_lab.positions import alibi_bias, sinusoidal_encoding  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def attn():
    return viz.attention_explorer()


@pytest.fixture(scope="module")
def norms():
    return viz.norm_gradient_explorer(max_depth=6, depth=4)


@pytest.fixture(scope="module")
def pos():
    return viz.position_explorer(length=12)


@pytest.fixture(scope="module")
def lora():
    return viz.lora_rank_explorer(rank=2)


@pytest.fixture(scope="module")
def sparse_ex():
    return viz.sparse_pattern_explorer(length=32, lengths=(32, 64, 128))


def _heatmap_values(ax):
    return np.asarray(ax.collections[0].get_array()).reshape(-1)


# ---------------------------------------------------------------- plots
def test_plot_attention_draws_the_weights_with_labels():
    w = torch.softmax(torch.randn(1, 1, 3, 4), dim=-1)
    ax = viz.plot_attention(w, x_labels=list("abcd"), y_labels=["x", "y", "z"], title="t")
    assert np.allclose(_heatmap_values(ax), w.reshape(-1).numpy(), atol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcd")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
    assert ax.get_title() == "t" and ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    fig, given = plt.subplots()
    assert viz.plot_attention(w[0, 0], ax=given) is given


def test_plot_attention_errors():
    with pytest.raises(ValueError, match=r"must be a 2-D map \(Lq, Lk\).*got shape \(2, 3, 4\)"):
        viz.plot_attention(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"x_labels must have one label per key \(4\); got 3"):
        viz.plot_attention(torch.rand(3, 4), x_labels=list("abc"))


def test_plot_heads_grid_and_shared_scale():
    w = torch.rand(1, 5, 4, 4)
    w[0, 2] *= 10  # one head with a much larger range
    fig = viz.plot_heads(w, ncols=3, shared_scale=True)
    maps = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in maps] == [f"head {h}" for h in range(5)]
    limits = {maps[h].collections[0].get_clim() for h in range(5)}
    assert len(limits) == 1  # one colour scale
    assert np.allclose(_heatmap_values(maps[2]), w[0, 2].reshape(-1).numpy(), atol=1e-6)
    fig2 = viz.plot_heads(w[0], titles=list("ABCDE"), shared_scale=False)
    maps2 = [ax for ax in fig2.axes if ax.get_title() in list("ABCDE")]
    assert len({ax.collections[0].get_clim() for ax in maps2}) == 5
    with pytest.raises(ValueError, match=r"titles must have one entry per head \(5\); got 2"):
        viz.plot_heads(w, titles=["a", "b"])
    with pytest.raises(ValueError, match=r"\(H, Lq, Lk\)"):
        viz.plot_heads(torch.rand(2, 2, 2, 3, 3))


def test_plot_history_one_run_and_several():
    h = {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "grad_norm": [1, 1, 1], "lr": [1, 1, 1],
         "eval": [2.5, 1.5], "eval_step": [2, 3]}
    ax = viz.plot_history(h)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [3.0, 2.0, 1.0]
    ax = viz.plot_history({"pre": h, "post": {**h, "loss": [3.0, 3.0, 3.0]}}, logy=True)
    assert [ln.get_label() for ln in ax.get_lines()] == ["pre", "post"]
    assert ax.get_yscale() == "log"
    ax = viz.plot_history(h, key="eval")
    assert list(ax.get_lines()[0].get_xdata()) == [2, 3]
    smooth = viz.plot_history(h, smooth=0.5).get_lines()[0].get_ydata()
    assert smooth[0] == pytest.approx(3.0) and 1.0 < smooth[-1] < 2.0
    with pytest.raises(ValueError, match="history 'a' has no 'loss'"):
        viz.plot_history({"a": {"x": 1}})


# ---------------------------------------------------------------- widget protocol
@pytest.mark.parametrize("name", ["attn", "norms", "pos", "lora", "sparse_ex"])
def test_explorer_protocol(name, request):
    ex = request.getfixturevalue(name)
    assert isinstance(ex, widgets.VBox) and isinstance(ex.output, widgets.Output)
    assert ex.output in ex.children
    assert ex.controls and all(isinstance(c, widgets.ValueWidget) for c in ex.controls.values())
    assert ex.state and isinstance(ex.figure, plt.Figure)
    before = ex.renders
    ex.render()
    assert ex.renders == before + 1


def test_figures_are_closed():
    open_before = set(plt.get_fignums())
    ex = viz.attention_explorer(length=4)
    ex.controls["temperature"].value = 2.0
    viz.position_explorer(length=6).controls["scheme"].value = "t5"
    assert set(plt.get_fignums()) == open_before


# ---------------------------------------------------------------- 01 attention
def test_attention_temperature_raises_entropy(attn):
    attn.controls["mask"].value = "none"
    attn.controls["scale"].value = "1/sqrt(d)"
    attn.controls["temperature"].value = 1.0
    w = attn.state["weights"]
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
    base = attn.state["mean_entropy"]
    attn.controls["temperature"].value = 5.0
    hot = attn.state["mean_entropy"]
    attn.controls["temperature"].value = 0.2
    cold = attn.state["mean_entropy"]
    assert cold < base < hot <= math.log(w.shape[1]) + 1e-6
    attn.controls["temperature"].value = 1.0


def test_attention_causal_and_padding_masks(attn):
    attn.controls["mask"].value = "causal"
    w = attn.state["weights"]
    assert torch.count_nonzero(torch.triu(w, diagonal=1)) == 0
    assert (torch.diagonal(w) > 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
    assert attn.state["entropy"][0] == 0  # the first query sees only itself
    assert attn.controls["valid_len"].disabled
    attn.controls["mask"].value = "padding"
    assert not attn.controls["valid_len"].disabled
    attn.controls["valid_len"].value = 3
    w = attn.state["weights"]
    assert torch.count_nonzero(w[:, 3:]) == 0 and (w[:, :3] > 0).all()
    assert torch.allclose(attn.state["max_entropy"], torch.full((w.shape[0],), math.log(3)))
    attn.controls["mask"].value = "none"


def test_attention_scale_one_saturates_as_head_dim_grows(attn):
    attn.controls["mask"].value = "none"
    attn.controls["scale"].value = "1"
    ent = {}
    for d in (4, 256):
        attn.controls["head_dim"].value = d
        ent[d] = attn.state["mean_entropy"]
    assert ent[256] < 0.5 * ent[4]  # scores of size ~sqrt(d): the softmax becomes one-hot
    attn.controls["scale"].value = "1/sqrt(d)"
    assert attn.state["mean_entropy"] > 2 * ent[256]
    assert attn.state["scale"] == pytest.approx(1 / 16)
    assert attn.controls["custom_scale"].disabled
    attn.controls["scale"].value = "custom"
    attn.controls["custom_scale"].value = 0.01
    assert not attn.controls["custom_scale"].disabled and attn.state["scale"] == pytest.approx(0.01)
    attn.controls["scale"].value = "1/sqrt(d)"
    attn.controls["head_dim"].value = 64


def test_attention_explorer_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    ex = viz.attention_explorer(q, k, tokens=list("abcde"))
    ex.controls["temperature"].value = 2.0
    expected = torch.softmax(q @ k.T / math.sqrt(8) / 2.0, dim=-1)
    assert torch.allclose(ex.state["weights"], expected, atol=1e-6)
    assert ex.controls["head_dim"].max == 8
    labels = [t.get_text() for t in ex.figure.axes[0].get_xticklabels()]
    assert labels == list("abcde")
    with pytest.raises(ValueError, match="same head_dim"):
        viz.attention_explorer(q, torch.randn(5, 4))
    with pytest.raises(TypeError, match="floating-point"):
        viz.attention_explorer(torch.ones(3, 4, dtype=torch.long))


def test_row_entropy():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(viz.row_entropy(w), torch.tensor([0.0, math.log(4)]))


# ---------------------------------------------------------------- 02 norms
def test_norm_explorer_pre_and_post_profiles_differ(norms):
    norms.controls["residual"].value = "none"
    norms.controls["norm"].value = "both"
    g = norms.state["grad_norms"]
    assert set(g) == {"pre", "post"} and len(g["pre"]) == len(g["post"]) == 4
    assert all(v > 0 and math.isfinite(v) for v in g["pre"] + g["post"])
    assert not np.allclose(g["pre"], g["post"], rtol=1e-3)
    # Xiong et al.: at init post-norm's gradients near the output are larger than pre-norm's
    assert g["post"][-1] > g["pre"][-1]
    assert g["pre"] == pytest.approx(viz.layer_grad_profile(4, True, "none"))
    ax = norms.figure.axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 2


def test_norm_explorer_controls_change_the_state(norms):
    norms.controls["norm"].value = "post"
    assert set(norms.state["grad_norms"]) == {"post"}
    norms.controls["depth"].value = 6
    post6 = norms.state["grad_norms"]["post"]
    assert len(post6) == 6 and norms.state["depth"] == 6
    norms.controls["residual"].value = "layerscale"
    assert not np.allclose(norms.state["grad_norms"]["post"], post6, rtol=1e-3)
    norms.controls["residual"].value = "none"
    norms.controls["depth"].value = 4
    norms.controls["norm"].value = "both"


# ---------------------------------------------------------------- 03 positions
def test_position_explorer_alibi_matrix_and_heads(pos):
    pos.controls["scheme"].value = "alibi"
    pos.controls["length"].value = 12
    pos.controls["head"].value = 0
    m0 = pos.state["matrix"]
    assert pos.state["kind"] == "bias" and m0.shape == (12, 12)
    assert torch.allclose(m0, alibi_bias(8, 12)[0])
    pos.controls["head"].value = 3
    assert torch.allclose(pos.state["matrix"], alibi_bias(8, 12)[3])
    assert not torch.allclose(pos.state["matrix"], m0)
    pos.controls["length"].value = 20
    assert pos.state["matrix"].shape == (20, 20)
    pos.controls["length"].value = 12
    pos.controls["head"].value = 0


def test_position_explorer_every_scheme_gives_its_own_picture(pos):
    seen = {}
    for name in ("sinusoidal", "learned", "shaw", "xl", "t5", "rope", "alibi"):
        pos.controls["scheme"].value = name
        assert pos.state["scheme"] == name and torch.isfinite(pos.state["matrix"]).all()
        assert pos.controls["head"].disabled == (name in ("sinusoidal", "learned"))
        seen[name] = pos.state["matrix"]
    assert seen["sinusoidal"].shape == (12, 64)
    assert torch.allclose(seen["sinusoidal"], sinusoidal_encoding(12, 64), atol=1e-6)
    for a in seen:
        for b in seen:
            if a < b and seen[a].shape == seen[b].shape:
                assert not torch.allclose(seen[a], seen[b]), (a, b)


def test_position_patterns_depend_on_offset_only():
    ex = viz.position_explorer(length=16, scheme="rope", shaw_k=3)
    rope = ex.state["matrix"]
    for delta in range(-15, 16):
        diag = torch.diagonal(rope, offset=delta)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)
    assert rope.diagonal().max() >= rope.max() - 1e-5  # offset 0: the vector with itself
    ex.controls["scheme"].value = "shaw"
    shaw = ex.state["matrix"]
    far = shaw[torch.arange(16)[:, None] - torch.arange(16)[None, :] > 3]  # j - i < -k: clipped
    assert torch.allclose(far, far[0].expand_as(far), atol=1e-6)
    assert len(torch.unique(shaw.round(decimals=6))) == 2 * 3 + 1


def test_position_explorer_bad_arguments():
    with pytest.raises(ValueError, match="unknown scheme 'abs'"):
        viz.position_explorer(scheme="abs")
    with pytest.raises(ValueError, match="d_model=30 must be divisible by n_heads=8"):
        viz.position_explorer(d_model=30)


# ---------------------------------------------------------------- 04 adapters
def test_low_rank_summary_is_eckart_young(gen):
    delta = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    s = viz.low_rank_summary(delta, 2)
    U, sv, Vh = torch.linalg.svd(delta)
    assert torch.allclose(s["singular_values"], sv)
    assert torch.linalg.matrix_rank(s["approx"]) == 2
    err = (delta - s["approx"]).norm() / delta.norm()
    assert s["relative_error"] == pytest.approx(float(err), rel=1e-9)
    assert s["energy"] == pytest.approx(float((sv[:2] ** 2).sum() / (sv ** 2).sum()), rel=1e-9)
    assert (s["lora_params"], s["full_params"]) == (2 * (9 + 6), 54)
    # no rank-2 matrix is closer: a random one, and the truncation of a perturbed SVD, are worse
    other = torch.randn(9, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, generator=gen, dtype=torch.float64)
    assert (delta - other).norm() > (delta - s["approx"]).norm()
    full = viz.low_rank_summary(delta, 6)
    assert full["relative_error"] == pytest.approx(0.0, abs=1e-7) and torch.allclose(full["approx"], delta)
    with pytest.raises(ValueError, match=r"r must be an int between 1 and min\(d_out, d_in\) = 6; got 7"):
        viz.low_rank_summary(delta, 7)
    with pytest.raises(ValueError, match="must be a non-empty floating-point matrix"):
        viz.low_rank_summary(torch.zeros(3), 1)


def test_lora_explorer_controls_change_the_state(lora):
    lora.controls["matrix"].value = "rank 3 + noise"
    lora.controls["rank"].value = 3
    delta = viz.example_updates()["rank 3 + noise"]
    direct = viz.low_rank_summary(delta, 3)
    assert lora.state["name"] == "rank 3 + noise" and lora.state["rank"] == 3
    assert torch.allclose(lora.state["approx"], direct["approx"])
    assert lora.state["energy"] == pytest.approx(direct["energy"])
    assert lora.state["energy"] > 0.9  # a rank-3 signal is almost all kept by rank 3
    lora.controls["matrix"].value = "random (no structure)"
    assert lora.state["energy"] < 0.5  # noise spreads its energy over every direction
    lora.controls["rank"].value = 1
    assert lora.state["energy"] < viz.low_rank_summary(viz.example_updates()["random (no structure)"], 3)["energy"]
    bars = lora.figure.axes[2].patches
    assert len(bars) == 32 and bars[0].get_height() == pytest.approx(float(lora.state["singular_values"][0]))
    lora.controls["rank"].value = 2
    lora.controls["matrix"].value = "rank 3 + noise"


def test_lora_explorer_takes_real_updates(gen):
    updates = {"a": torch.randn(5, 4, generator=gen), "b": torch.randn(8, 3, generator=gen)}
    ex = viz.lora_rank_explorer(updates, rank=1)
    assert ex.controls["rank"].max == 3  # the smallest matrix bounds the rank
    ex.controls["matrix"].value = "b"
    assert ex.state["delta"].shape == (8, 3)
    with pytest.raises(ValueError, match="rank must be between 1 and 3; got 4"):
        viz.lora_rank_explorer(updates, rank=4)
    ax = viz.plot_spectra(updates, ranks=(1, 2))
    curves = [ln for ln in ax.get_lines() if ln.get_label() in ("a", "b")]
    assert [ln.get_label() for ln in curves] == ["a", "b"]
    assert curves[0].get_ydata()[-1] == pytest.approx(1.0)  # all ranks: everything kept


# ---------------------------------------------------------------- 05 sparse attention
def test_sparse_explorer_state_is_the_library_pattern(sparse_ex):
    from transformer_lab import sparse as S

    c = sparse_ex.controls
    c["pattern"].value = "longformer"
    c["causal"].value = False
    c["window"].value = 6
    c["dilation"].value = 1
    c["n_global"].value = 2
    c["length"].value = 48
    mod = S.longformer(6, global_tokens=2)
    st = sparse_ex.state
    assert torch.equal(st["mask"], S.dense_mask(mod, 48))
    assert st["pairs"] == S.count_pairs(mod, 48) and st["density"] == pytest.approx(st["pairs"] / 48**2)
    assert torch.equal(st["hops"], S.hop_distances(mod, 48))
    assert st["diameter"] == S.diameter(mod, 48) == 2  # every pair through the global tokens
    assert st["lengths"] == [32, 64, 128]
    assert st["counts"] == [S.count_pairs(S.longformer(6, global_tokens=2), n) for n in (32, 64, 128)]
    assert st["dense_counts"] == [n * n for n in (32, 64, 128)]
    # the figure: the mask, the hop distances, and two curves + the slope-1 guide against L
    ax_mask, ax_hops, ax_pairs = sparse_ex.figure.axes[:3]  # then the hops' colour bar
    assert np.array_equal(ax_mask.images[0].get_array(), st["mask"].numpy().astype(float))
    assert f"{st['pairs']:,} pairs" in ax_mask.get_title() and "diameter 2" in ax_hops.get_title()
    assert [ln.get_ydata().tolist() for ln in ax_pairs.get_lines()[:2]] == [st["counts"], st["dense_counts"]]
    # without global tokens the window alone needs ceil((L - 1) / (w/2)) layers
    c["n_global"].value = 0
    assert sparse_ex.state["diameter"] == math.ceil(47 / 3)
    c["n_global"].value = 1


def test_sparse_explorer_controls_follow_the_pattern(sparse_ex):
    from transformer_lab import sparse as S

    c = sparse_ex.controls
    c["length"].value = 64
    c["pattern"].value = "bigbird"
    assert c["random_blocks"].disabled is False and c["window"].disabled is True
    c["block"].value, c["n_global"].value, c["random_blocks"].value, c["causal"].value = 8, 1, 2, False
    first = sparse_ex.state["mask"].clone()
    assert torch.equal(first, S.dense_mask(S.bigbird(64, 8, 3, 1, 2, seed=0), 64))
    c["seed"].value = 3  # another random draw, the same window and global blocks
    assert not torch.equal(sparse_ex.state["mask"], first)
    assert sparse_ex.state["mask"][:8].all() and sparse_ex.state["mask"][:, :8].all()
    c["seed"].value = 0
    c["pattern"].value = "strided"
    assert c["stride"].disabled is False and c["random_blocks"].disabled is True
    c["causal"].value = True
    st = sparse_ex.state
    assert not st["mask"].triu(1).any() and st["dense_counts"] == [n * (n + 1) // 2 for n in (32, 64, 128)]
    assert torch.equal(st["mask"], S.dense_mask(S.strided(c["stride"].value, causal=True), 64))
    c["causal"].value = False
    c["pattern"].value = "dense"
    assert sparse_ex.state["density"] == 1.0 and sparse_ex.state["diameter"] == 1


@pytest.mark.parametrize("name", viz.SPARSE_PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_pattern_fits_every_setting(name, causal):
    """Extreme knobs at short lengths are clipped so that every pattern draws something."""
    from transformer_lab import sparse as S

    for L in (16, 30):
        for window in (1, 7, 64):
            mod = viz.sparse_pattern(name, L, window=window, stride=32, dilation=8, n_global=8,
                                     random_blocks=6, block=32, causal=causal)
            m = S.dense_mask(mod, L)
            assert m.any(dim=1).sum() >= L - 8 and (not causal or name == "etc" or not m.triu(1).any())
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        viz.sparse_pattern("nope", 16)


def test_sparse_static_plots():
    from transformer_lab import sparse as S

    masks = {"window": S.dense_mask(S.sliding_window(4), 16), "dense": torch.ones(16, 16, dtype=torch.bool)}
    fig = viz.plot_patterns(masks, ncols=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["window\ndensity 0.29", "dense\ndensity 1.00"]  # |i - j| <= 2: (16 * 5 - 6) / 256
    ax = viz.plot_pair_counts([64, 128], {"a": [10, 20], "b": [100, 400]})
    assert [ln.get_label() for ln in ax.get_lines()] == ["a", "b", "slope 1 (linear)"]
    assert ax.get_lines()[2].get_ydata().tolist() == [10, 20]
    ax = viz.plot_pair_counts([64, 128], {"a": [10, 20], "b": [100, 400]}, guide="b")
    assert ax.get_lines()[2].get_ydata().tolist() == [100, 200]  # slope 1 through b's first point
    with pytest.raises(ValueError, match="guide must be one of the curves"):
        viz.plot_pair_counts([64], {"a": [1]}, guide="c")
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.plot_patterns({})
    with pytest.raises(ValueError, match="length must be between 16"):
        viz.sparse_pattern_explorer(length=8)


# ---------------------------------------------------------------- grading mode
@pytest.mark.parametrize("builder", [viz.attention_explorer, viz.norm_gradient_explorer,
                                     viz.position_explorer, viz.lora_rank_explorer,
                                     viz.sparse_pattern_explorer])
def test_grading_mode_gives_a_placeholder(builder, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    open_before = set(plt.get_fignums())
    w = builder()
    assert isinstance(w, viz.WidgetsOff) and isinstance(w, widgets.Label)
    assert "off while grading" in w.value
    assert w.controls == {} and w.state == {} and w.figure is None
    w.render()
    assert set(plt.get_fignums()) == open_before


# --------------------------------------------------------------------------- the website's explorers


def _tiny_explorer():
    controls = {
        "n": widgets.IntSlider(value=3, min=1, max=9, description="n"),
        "kind": widgets.Dropdown(options=["sin", "cos"], value="sin", description="kind"),
        "unused": widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.1, description="unused"),
        "flip": widgets.Checkbox(value=False, description="flip"),
    }

    def compute(v):
        y = np.sin(np.arange(v["n"])) if v["kind"] == "sin" else np.cos(np.arange(v["n"]))
        return {"y": -y if v["flip"] else y}  # "unused" changes nothing

    def draw(s):
        fig, ax = plt.subplots(figsize=(2, 1.5))
        ax.plot(s["y"], "o-")
        return fig

    return viz.Explorer(controls, compute, draw, title="tiny & <test>")


def _static_data(text: str) -> dict:
    import json
    import re

    return json.loads(re.search(r'<script type="application/json" class="tlx-data">(.*?)</script>', text).group(1))


def test_static_explorer_has_every_figure_of_its_grid(monkeypatch):
    """The website's copy: each control's values (slider ends, evenly between, and its start; every
    option; both states), one figure per distinct state, the start first; a control that changes
    nothing is disabled; the title is escaped."""
    ex = _tiny_explorer()
    grid = ex.static_grid(steps=5)
    assert grid["n"] == [1, 3, 5, 7, 9] and grid["kind"] == ["sin", "cos"] and grid["flip"] == [False, True]
    assert grid["unused"] == pytest.approx([0.0, 0.2, 0.5, 0.8, 1.0])  # rounded to the step, start kept
    text = ex.static_html(steps=5, dpi=20)
    data = _static_data(text)
    by_name = dict(zip(grid, data["controls"], strict=True))
    assert by_name["n"]["start"] == 1 and by_name["n"]["values"] == ["1", "3", "5", "7", "9"]
    assert len(set(by_name["n"]["figures"])) == 5 and len(set(by_name["unused"]["figures"])) == 1
    starts = {c["figures"][c["start"]] for c in data["controls"]}
    assert starts == {0}  # every control's start shows the same first figure
    # distinct states: n (4 more), kind (1 more), flip (1 more), unused (none)
    assert len(data["images"]) == 1 + 4 + 1 + 1
    assert text.count("<select") == 1 and text.count('type="range"') == 2  # n, unused
    assert text.count('type="checkbox"') == 1  # flip stays a checkbox, not a two-value slider
    assert by_name["flip"]["check"] == [by_name["flip"]["values"].index("False"), by_name["flip"]["values"].index("True")]
    assert by_name["n"]["check"] is None
    assert "tiny &amp; &lt;test&gt;" in text and "<test>" not in text
    assert text.count(" disabled") == 1  # "unused"
    monkeypatch.setenv(viz.core.STATIC_ENV, "1")
    assert "text/html" in ex._repr_mimebundle_() and "application/vnd.jupyter.widget-view+json" not in ex._repr_mimebundle_()
    monkeypatch.delenv(viz.core.STATIC_ENV)
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_static_explorer_draws_at_most_max_figures_taking_controls_in_turns():
    ex = _tiny_explorer()
    data = _static_data(ex.static_html(steps=5, dpi=20, max_figures=4))
    assert len(data["images"]) <= 4
    n, kind, unused, flip = data["controls"]
    # round 1: n's first end (1), kind's other option, unused (same state: free), flip -> 4 figures
    assert n["values"] == ["1", "3"] and kind["values"] == ["sin", "cos"] and flip["values"] == ["False", "True"]
    assert len(set(n["figures"])) == 2 and n["start"] == 1
    assert unused["values"] == ["0", "0.5"] and len(set(unused["figures"])) == 1  # one end (same state), disabled


def test_static_explorer_data_cannot_end_its_script_block():
    controls = {"kind": widgets.Dropdown(options=["a", "</script><b>x"], value="a", description="kind")}
    ex = viz.Explorer(controls, lambda v: {"k": v["kind"]},
                      lambda s: plt.subplots(figsize=(1, 1))[0], title="t")
    text = ex.static_html(dpi=10)
    assert text.count("</script>") == 2  # the data block's end and the code block's end
    assert _static_data(text)["controls"][0]["values"] == ["a", "</script><b>x"]


def test_describe_figure_gives_alt_text_from_the_figure_itself(monkeypatch):
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], [1, 2], label=r"$\sqrt{d_k}$ scale")
    a.plot([0, 1], [2, 1], label="_hidden")
    a.legend()
    a.set_title("softmax")
    a.set_xlabel("$d_k$")
    a.set_ylabel(r"max weight $\alpha$")
    b.imshow(np.eye(3))
    fig.colorbar(b.images[0], ax=b)
    fig.suptitle(r"Attention $\mathcal{A}$")
    text = viz.core.describe_figure(fig)
    plt.close(fig)
    assert text == ("Figure: Attention A. 2 panels: softmax: plot of max weight α against d_k (√d_k scale); "
                    "heat map.")
    fig, ax = plt.subplots()
    ax.bar([0, 1], [1, 2])
    assert viz.core.describe_figure(fig) == "Figure. Bar chart."
    # only while the website is built: the inline backend's figure metadata gains the alt text
    from matplotlib_inline import backend_inline

    original = backend_inline._fetch_figure_metadata
    monkeypatch.delenv(viz.core.STATIC_ENV, raising=False)
    assert viz.core.install_alt_text() is False and backend_inline._fetch_figure_metadata is original
    monkeypatch.setenv(viz.core.STATIC_ENV, "1")
    monkeypatch.setattr(backend_inline, "_fetch_figure_metadata", original)
    assert viz.core.install_alt_text() is True
    assert backend_inline._fetch_figure_metadata(fig)["alt"] == "Figure. Bar chart."
    plt.close(fig)


def test_default_colours_are_colour_blind_safe():
    """Importing the library's viz sets Okabe-Ito's palette as matplotlib's colour cycle."""
    import matplotlib

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    assert [c.upper() for c in colours] == [c.upper() for c in viz.core.COLORBLIND_CYCLE]
    fig, ax = plt.subplots()
    line, = ax.plot([0, 1])
    assert line.get_color().upper() == "#0072B2"
    plt.close(fig)
