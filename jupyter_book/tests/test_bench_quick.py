"""Smoke tests of the benchmark scripts (benchmarks/ is not part of `make test`, but its scripts
must keep running): attention.py --quick and notebooks.py on a two-cell notebook, a few seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"transformer_lab_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_benchmark_quick(tmp_path):
    attention = _load("attention")
    assert attention.main(["--quick", "--silent", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "attention.json").read_text())
    rows = report["results"]
    impls = {r["impl"] for r in rows}
    assert impls == {"sdpa", "fast", "readable", "torch_mha", "mha_fast", "mha_readable"}
    assert {r["causal"] for r in rows} == {False, True}
    for r in rows:
        assert r["time_ms"] > 0
        if r["impl"] == "sdpa":
            assert r["time_vs_sdpa"] == 1.0
    # the readable and fast paths computed the same thing as PyTorch before being timed
    assert max(report["agreement_max_abs_diff"].values()) < 1e-4
    assert (tmp_path / "attention.csv").read_text().startswith("impl,level,L,causal,time_ms")
    assert (tmp_path / "attention.png").stat().st_size > 10_000

    # the attention family (lectures 05-08): every variant, its error against its exact reference
    family = json.loads((tmp_path / "attention_family.json").read_text())
    rows = family["rows"]
    assert {r["variant"] for r in rows if not r["causal"]} == {
        "sdpa", "readable", "flash", "lsh_1", "lsh_2", "lsh_4", "linformer", "performer"}
    assert {r["variant"] for r in rows if r["causal"]} == {
        "sdpa", "readable", "flash", "linear_causal", "mamba_scan", "mamba_block"}
    for r in rows:
        assert r["time_ms"] > 0 and r["time_ratio"] > 0
        if r["kind"] in ("exact", "recurrent"):  # the same function as its reference: rounding only
            assert r["max_error"] < 1e-4, r
    # an approximation is measured against softmax attention, not against itself
    assert all(r["max_error"] > 1e-3 for r in rows if r["kind"] == "approx"), rows
    assert set(family["verdict"]) == {"linear_causal"}  # flash's target is read at L = 8192 only


def test_recorded_attention_family_is_what_the_lectures_read():
    """Lectures 07 and 08 read their copy of the recorded run; it must be the recorded run."""
    recorded = BENCH / "results" / "attention_family.json"
    report = json.loads(recorded.read_text())
    assert not report["setup"]["quick"]
    assert {r["L"] for r in report["rows"]} >= {512, 8192}
    for lecture in ("07_low_rank_attention", "08_flash_attention"):
        for side in ("solutions", "course"):
            copy = BENCH.parent / side / lecture / "attention_family.json"
            assert copy.read_bytes() == recorded.read_bytes(), f"{copy} differs from {recorded}: copy it again"


def test_notebook_benchmark_on_a_tiny_learner_notebook(tmp_path):
    notebooks = _load("notebooks")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nmode = os.environ.get('TRANSFORMER_LAB_GRADING')"),
        nbformat.v4.new_code_cell("def f():\n    raise NotImplementedError()"),
        nbformat.v4.new_code_cell("f()"),
        nbformat.v4.new_code_cell("print('still running', mode)"),
    ]
    nb.cells[1].metadata["nbgrader"] = {"solution": True, "grade": False, "grade_id": "ex"}
    nb.cells[2].metadata["nbgrader"] = {"solution": False, "grade": True, "grade_id": "ex_test"}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "00_tiny.ipynb"
    nbformat.write(nb, path)
    out = tmp_path / "notebooks.json"
    code = notebooks.main(["--notebooks", str(path), "--mode", "grading", "--out", str(out)])
    assert code == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["mode"] == "grading" and row["errors"] == 1 and row["errors_outside_exercises"] == []
    assert row["code_cells"] == 4 and row["seconds"] > 0


def test_inference_benchmark_quick(tmp_path):
    """benchmarks/inference.py (lectures 09-10): XL cache against sliding windows, exact against
    faiss search, early exit against the full model, each measured in one run."""
    inference = _load("inference")
    assert inference.main(["--quick", "--silent", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "inference.json").read_text())
    xl = {r["name"]: r for r in report["xl"]["rows"]}
    assert set(xl) == {"sliding", "cached"} and xl["sliding"]["ratio"] == 1.0
    assert xl["cached"]["tokens"] == xl["sliding"]["tokens"]  # the same tokens were scored
    knn = {r["name"]: r for r in report["knn"]["rows"]}
    assert knn["torch"]["recall"] == 1.0 and knn["faiss_flat"]["recall"] == 1.0  # both exact
    assert knn["faiss_ivf_16"]["recall"] == 1.0  # every list probed: exact again
    assert 0 < knn["faiss_ivf_1"]["recall"] < 1  # one list of 16: approximate, and measured as such
    exit_ = report["exit"]
    assert {r["name"] for r in exit_["rows"]} == {"full", "early_exit"}
    fractions = [c["layers_fraction"] for c in exit_["curve"]]
    assert fractions[0] == 1.0 and all(0 < f <= 1 for f in fractions)  # threshold 1: every layer
    assert exit_["curve"][0]["agreement"] == 1.0  # and exactly the full model's predictions
    assert (tmp_path / "inference.csv").read_text().startswith("section,name,time_ms")
    assert (tmp_path / "inference.png").stat().st_size > 10_000


def test_recurrent_benchmark_quick(tmp_path):
    """benchmarks/recurrent.py (lectures 11-12): the parallel scan against the loop, one more
    token from Mamba's state against recomputation, a ternary layer's paths, in one run."""
    recurrent = _load("recurrent")
    assert recurrent.main(["--quick", "--silent", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "recurrent.json").read_text())
    scan = report["scan"]["rows"]
    assert {(r["name"], r["L"], r["width"]) for r in scan} == {
        (n, L, w) for n in ("sequential", "parallel") for L in (64, 128) for w in (4, 32)}
    assert all(r["max_error"] < 1e-5 for r in scan)  # both scans agree with float64
    gen = {(r["name"], r["L"]): r for r in report["generate"]["rows"]}
    for t in (8, 32):
        assert gen[("mamba_step", t)]["max_error"] < 1e-4  # the step continues the full forward
        assert gen[("mamba_step", t)]["bytes"] == gen[("mamba_step", 8)]["bytes"]  # constant state
    assert gen[("transformer", 32)]["bytes"] == 4 * gen[("transformer", 8)]["bytes"]  # the KV cache grows
    tern = report["ternary"]
    v = tern["verdict"]
    assert v["additions_vs_bitlinear_error"] < 1e-4 and 0.8 < v["multiplications_removed"] < 1
    assert tern["weight_bytes"]["packed_2bit"] == 32 * 8 + 4  # 32 rows of 32 weights at 2 bits, + scale
    assert (tmp_path / "recurrent.csv").read_text().startswith("section,name,L,width")
    assert (tmp_path / "recurrent.png").stat().st_size > 10_000


def test_decoding_benchmark_quick(tmp_path):
    """benchmarks/decoding.py (lecture 13): the next token from a KV cache against recomputation,
    whole greedy generations both ways, speculative sampling's target calls per token."""
    bench = _load("decoding")
    assert bench.main(["--quick", "--silent", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "decoding.json").read_text())
    kv = report["kvcache"]
    steps = {(r["name"], r["L"]): r for r in kv["rows"] if r["section"] == "step"}
    assert set(steps) == {(n, t) for n in ("recompute", "cached") for t in (8, 32)}
    for t in (8, 32):
        assert steps[("cached", t)]["max_error"] < 1e-5  # the cached step equals recomputation
        # the cache holds K and V of every layer for every earlier token: 2 layers x 2 x 32 x 4 bytes
        assert steps[("cached", t)]["bytes"] == t * 2 * 2 * 32 * 4
    assert kv["verdict"]["same_tokens"] is True  # greedy with and without the cache agree
    assert {r["L"] for r in kv["rows"] if r["section"] == "generate"} == {16 + 8, 16 + 16}
    spec = report["speculative"]
    calls = [r for r in spec["rows"] if r["name"] == "calls"]
    assert [r["n_draft"] for r in calls] == [1, 3]
    for r in calls:
        # at least one token per target call and at most n_draft + 1 (plus the last round's cut)
        assert 1 / (r["n_draft"] + 1) <= r["calls_per_token"] <= 1.0, r
        assert 0 <= r["alpha"] <= 1
    assert {r["name"] for r in spec["rows"]} == {"calls", "target_only", "speculative_1", "speculative_3"}
    assert (tmp_path / "decoding.csv").read_text().startswith("section,name,L,n_draft")
    assert (tmp_path / "decoding.png").stat().st_size > 10_000
