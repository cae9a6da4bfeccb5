"""Fast checks of the book's build script (no build): how lectures are found, how the learner
notebooks are prepared, the generated table of contents, the CDN and thebe filters."""

from __future__ import annotations

import nbformat
import pytest
from bs4 import BeautifulSoup
from test_book import page_text, secret_needles, squash


def _notebook(test_cell_source="assert f(1) == 2"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Lecture 07: *Low-rank* attention\n\nText."),
        nbformat.v4.new_code_cell("def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"),
        nbformat.v4.new_code_cell(test_cell_source),
        nbformat.v4.new_code_cell("print(1)"),
    ]
    nb.cells[1].metadata["nbgrader"] = {"grade": False, "solution": True, "grade_id": "ex"}
    nb.cells[2].metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "ex_test", "points": 1}
    nb.cells[2].metadata["tags"] = ["keep-me"]
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="stale\n")]
    nb.cells[3].execution_count = 4
    return nb


def test_only_nbgrader_test_cells_are_tagged(build_module):
    nb = _notebook()
    prepared = build_module.prepare_notebook(nb)
    tags = [c.metadata.get("tags", []) for c in prepared.cells]
    assert tags[2] == ["keep-me", "raises-exception", "remove-output", "nbgrader-test"]
    assert tags[0] == tags[1] == tags[3] == []
    assert prepared.cells[3].outputs == [] and prepared.cells[3].execution_count is None
    assert nb.cells[3].outputs, "prepare_notebook must not change its input"


def test_lectures_are_found_by_folder_and_listed_in_order(tmp_path, build_module):
    for name in ("02_blocks", "01_attention", "notes", "03_missing_notebook", "solutions_extra"):
        (tmp_path / name).mkdir()
    for name in ("02_blocks", "01_attention", "notes"):
        nbformat.write(_notebook(), tmp_path / name / f"{name}.ipynb")
    (tmp_path / "03_missing_notebook" / "other.ipynb").write_text("{}")
    found = build_module.find_lectures(tmp_path)
    assert [p.stem for p in found] == ["01_attention", "02_blocks"]
    toc = build_module.make_toc([(p.stem, "Lecture 07: Low-rank attention") for p in found])
    assert toc["root"] == "intro"
    assert toc["parts"][0]["chapters"] == [
        {"file": "lectures/01_attention/01_attention", "title": "01 · Low-rank attention"},
        {"file": "lectures/02_blocks/02_blocks", "title": "02 · Low-rank attention"},
    ]
    with pytest.raises(SystemExit, match="no lecture notebooks"):
        build_module.find_lectures(tmp_path / "notes")
    with pytest.raises(SystemExit, match="make release"):
        build_module.find_lectures(tmp_path / "absent")


def test_title_and_lecture_table(build_module):
    assert build_module.notebook_title(_notebook(), "x") == "Lecture 07: Low-rank attention"
    assert build_module.notebook_title(nbformat.v4.new_notebook(), "fallback") == "fallback"
    for title in ("Lecture 07 — Low-rank attention", "07 — Low-rank attention",
                  "Lecture 7: Low-rank attention", "Low-rank attention"):
        assert build_module.short_title(title) == "Low-rank attention"
    table = build_module.lecture_table([("07_low_rank", "Lecture 07 — Low-rank attention")])
    assert "| 07 | [Low-rank attention](lectures/07_low_rank/07_low_rank.ipynb) |" in table
    assert build_module.page_path("07_low_rank") == "lectures/07_low_rank/07_low_rank.html"


def test_cdn_filter_and_thebe_removal(tmp_path, build_module):
    page = tmp_path / "p.html"
    page.write_text(
        '<script src="../_static/x.js"></script>\n'
        '<script src="../_static/../vendor/mathjax/es5/tex-chtml.js?v=1"></script>\n'
        '<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/a.css">\n'
        '<script src="//unpkg.com/b.js"></script>\n'
        '<script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"; const a = 1</script>\n'
        '<script async="async" src="../_static/sphinx-thebe.js?v=c100c467"></script>\n'
    )
    hits = build_module.cdn_references(tmp_path)
    assert len(hits) == 2 and "jsdelivr" in hits[0] and "unpkg" in hits[1]
    assert build_module.strip_thebe(tmp_path) == 1
    text = page.read_text()
    assert "THEBE_JS_URL" not in text and "sphinx-thebe.js" not in text
    assert "vendor/mathjax" in text


def test_leak_search_sees_through_syntax_highlighting(tmp_path):
    """The needles of the leak test are found in highlighted HTML (one <span> per token)."""
    sol = tmp_path / "01_x"
    sol.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "def f(q, k):\n    ### BEGIN SOLUTION\n    return q @ k.transpose(-2, -1)\n"
            "    ### END SOLUTION\n"
        ),
        nbformat.v4.new_code_cell(
            "assert f(1, 2) is not None\n### BEGIN HIDDEN TESTS\n"
            "secret = torch.randn(3, generator=g)\n### END HIDDEN TESTS\n"
        ),
        nbformat.v4.new_code_cell("out = attention(q, k, v)  # appears outside too\n"),
    ]
    nbformat.write(nb, sol / "01_x.ipynb")
    needles = secret_needles(tmp_path)
    assert [(kind, line) for _, kind, line in needles] == [
        ("solution", squash("return q @ k.transpose(-2, -1)")),
        ("hidden test", squash("secret = torch.randn(3, generator=g)")),
    ]
    page = tmp_path / "page.html"
    page.write_text(
        '<pre><span class="k">return</span> <span class="n">q</span> <span class="o">@</span> '
        '<span class="n">k</span><span class="o">.</span><span class="n">transpose</span>'
        '<span class="p">(</span><span class="o">-</span><span class="mi">2</span>'
        '<span class="p">,</span> <span class="o">-</span><span class="mi">1</span>'
        '<span class="p">)</span></pre>'
    )
    assert needles[0][2] in page_text(page)
    assert needles[1][2] not in page_text(page)
    assert BeautifulSoup("<p>x</p>", "html.parser").get_text() == "x"


def test_notebooks_run_in_normal_mode(build_module):
    env = build_module.build_env({"TRANSFORMER_LAB_GRADING": "1", "PATH": "/usr/bin"})
    assert "TRANSFORMER_LAB_GRADING" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONPATH"].split(":")[0].endswith("lib")
