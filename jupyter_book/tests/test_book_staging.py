"""Fast checks of the book's build script (no build): how lectures are found, how the learner
notebooks are prepared, the generated table of contents, the CDN and thebe filters."""

from __future__ import annotations

import re

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
    assert "| 07 | [Low-rank attention](lectures/07_low_rank/07_low_rank.ipynb) | — |" in table.splitlines()
    table = build_module.lecture_table([("01_a", "A"), ("07_low_rank", "B")], {"07_low_rank": ["01", "05"]})
    assert "| 07 | [B](lectures/07_low_rank/07_low_rank.ipynb) | [01](lectures/01_a/01_a.ipynb), 05 |" in table.splitlines()
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


# --------------------------------------------------------------------------- lecture overview


def test_every_lecture_has_goals_prerequisites_and_exercise_headings(build_module):
    """The overview boxes are built from every released lecture: its title cell's **Learning
    goals.** and **Prerequisites.** paragraphs, and one "### Exercise N (P points): title" heading
    per exercise whose points are the test cells' nbgrader points."""
    for path in build_module.find_lectures(build_module.ROOT / "course"):
        nb = nbformat.read(path, as_version=4)
        head, tail, goals = build_module.split_title_cell(nb.cells[0].source, path.stem)
        assert head.startswith("# ") and "**Why it matters.**" in head, path.stem
        assert "**Notation" in tail and "**How the exercises work.**" in tail, path.stem
        assert "**Learning goals" not in head + tail and "**Prerequisites" not in head + tail
        assert goals["Learning goals"].count("\n1. ") == 1, f"{path.stem}: the goals are a numbered list"
        assert len(goals["Prerequisites"]) > 20
        found = build_module.exercises(nb)
        assert len(found) >= 3 and [e["number"] for e in found] == list(range(1, len(found) + 1)), path.stem
        headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
                    if build_module.EXERCISE_HEADING.match(line)]
        for e, heading in zip(found, headings, strict=True):
            stated = re.search(r"\((\d+) points?\)", heading)
            assert stated and int(stated[1]) == e["points"], f"{path.stem}: {heading!r} vs {e['points']} points"
        est = build_module.time_estimate(nb)
        assert est["total_min"] % 5 == 0 and 30 <= est["total_min"] <= 240, (path.stem, est)


def test_title_cell_split_and_a_missing_paragraph(build_module):
    source = ("# Lecture 99 — X\n\n**Why it matters.** Because.\n\n**Learning goals.** After this you can\n\n"
              "1. a;\n2. b.\n\n**Prerequisites.** Lecture 01.\nPyTorch.\n\n**Notation.** $L$ length.\n\n"
              "## A heading\n\ntext")
    head, tail, goals = build_module.split_title_cell(source, "99_x")
    assert goals == {"Learning goals": "After this you can\n\n1. a;\n2. b.", "Prerequisites": "Lecture 01.\nPyTorch."}
    assert head == "# Lecture 99 — X\n\n**Why it matters.** Because."
    assert tail == "**Notation.** $L$ length.\n\n## A heading\n\ntext"
    with pytest.raises(SystemExit, match=r"99_x: the title cell has no \*\*Prerequisites\.\*\*"):
        build_module.split_title_cell("# T\n\n**Learning goals.** a", "99_x")


def test_overview_boxes_and_launch_links(build_module):
    nb = _notebook()
    nb.cells[0].source = "# Lecture 07: X\n\n**Learning goals.** You can\n\n1. a.\n\n**Prerequisites.** None."
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("### Exercise 1 (1 point): the thing"))
    links = {"repository_url": "https://github.com/org/tlab", "branch": "main", "site_branch": "gh-pages",
             "binderhub_url": "https://mybinder.org", "jupyterhub_url": "https://hub.example.edu", "library_pip": ""}
    staged = build_module.add_overview(nb, "07_x", links)
    assert staged.cells[0].source == "# Lecture 07: X"  # nothing after the boxes: no empty cell
    box = staged.cells[1].source
    assert staged.cells[2].source.startswith("### Exercise 1")
    for cls in ("overview-goals", "overview-prerequisites", "overview-time", "overview-run"):
        assert f"{cls}\n" in box
    assert "| 1 · the thing | 1 |" in box and "| **total** | **1** |" in box
    assert dict(build_module.launch_links("07_x", links)) == {
        "Download the notebook": "../../notebooks/07_x.ipynb",
        "Binder": "https://mybinder.org/v2/gh/org/tlab/main?urlpath=lab%2Ftree%2Fcourse%2F07_x%2F07_x.ipynb",
        "Colab": "https://colab.research.google.com/github/org/tlab/blob/gh-pages/notebooks/07_x.ipynb",
        "JupyterHub": "https://hub.example.edu/hub/user-redirect/git-pull?repo=https%3A%2F%2Fgithub.com%2Forg%2Ftlab"
                      "&branch=main&urlpath=lab%2Ftree%2Ftlab%2Fcourse%2F07_x%2F07_x.ipynb",
        "Repository": "https://github.com/org/tlab",
    }
    assert build_module.library_requirement(links) == "transformer-lab @ git+https://github.com/org/tlab@main"
    # nothing configured: the download only; a non-GitHub repository: Binder's git provider, no Colab
    bare = dict(links, repository_url="")
    assert [label for label, _ in build_module.launch_links("07_x", bare)] == ["Download the notebook"]
    gitlab = dict(links, repository_url="https://gitlab.com/org/tlab")
    labels = dict(build_module.launch_links("07_x", gitlab))
    assert "Colab" not in labels and labels["Binder"].startswith("https://mybinder.org/v2/git/https%3A%2F%2Fgitlab.com")


def test_course_links_file_is_checked(tmp_path, build_module):
    assert build_module.load_links()["branch"]  # the repository's own file loads
    bad = tmp_path / "course.yml"
    for text, message in (("repository: x\n", "unknown key"), ("branch: 3\n", "must be a string"),
                          ("jupyterhub_url: hub.example.edu\n", "must be an http")):
        bad.write_text(text)
        with pytest.raises(SystemExit, match=message):
            build_module.load_links(bad)


def test_downloaded_notebook_installs_the_library_only_when_missing(tmp_path, build_module, monkeypatch):
    folder = tmp_path / "07_x"
    folder.mkdir()
    (folder / "data.json").write_text('{"a": 1}')
    nb = build_module.downloadable_notebook(_notebook(), folder, "transformer-lab @ git+https://x/y@main")
    cell = nb.cells[0]
    assert cell.metadata["tags"] == ["install-if-missing"] and len(nb.cells) == len(_notebook().cells) + 1
    import importlib.util
    import subprocess
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    monkeypatch.chdir(tmp_path)
    exec(cell.source, {})  # the library is importable here: nothing is installed
    assert calls == [] and (tmp_path / "data.json").read_text() == '{"a": 1}'
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on Colab
    exec(cell.source, {})
    assert calls and calls[0][-1] == "transformer-lab @ git+https://x/y@main" and calls[0][1:4] == ["-m", "pip", "install"]
    nowhere = build_module.downloadable_notebook(_notebook(), folder, "")
    with pytest.raises(RuntimeError, match="pip install -e"):
        exec(nowhere.cells[0].source, {})


def test_prerequisites_become_the_course_map(tmp_path, build_module):
    text = "Lecture 01 (masks), lectures 05\nand 06, Lectures 02-03; lecture 09 (a later one) and lecture 14"
    assert build_module.prerequisite_numbers(text, "10") == ["01", "02", "03", "05", "06", "09"]
    assert build_module.prerequisite_numbers("No earlier lecture.", "01") == []
    lectures = [("01_a", "Lecture 01 — A"), ("02_b", "Lecture 02 — B: more"), ("03_c", "Lecture 03 — C")]
    needs = {"01_a": [], "02_b": ["01"], "03_c": ["01", "02"]}
    md = build_module.course_map_markdown(lectures, needs, tmp_path)
    svg = (tmp_path / "course-map.svg").read_text()
    (tmp_path / "none").mkdir()
    build_module.course_map_markdown(lectures, {}, tmp_path / "none")
    unlinked = (tmp_path / "none" / "course-map.svg").read_text()
    assert svg.count("<path") - unlinked.count("<path") == 3  # three arcs: 01-02, 01-03, 02-03
    assert ":alt: Course map, an arc from each lecture to a later one that builds on it: 02 builds on 01; 03 builds on 01, 02." in md
    # every released lecture's prerequisites name only earlier lectures that exist
    names = {p.stem[:2] for p in build_module.find_lectures(build_module.ROOT / "course")}
    for path in build_module.find_lectures(build_module.ROOT / "course"):
        nb = nbformat.read(path, as_version=4)
        found = build_module.prerequisite_numbers(build_module.split_title_cell(nb.cells[0].source, path.stem)[2]["Prerequisites"], path.stem[:2])
        assert set(found) <= names, (path.stem, found)
        assert found or path.stem.startswith("01"), f"{path.stem} names no earlier lecture in its prerequisites"


def test_every_lecture_links_the_one_notation_page(lectures, build_module):
    """Each lecture's first cell links jupyter_book/notation.md (right from course/NN_topic/ in
    JupyterLab); the book stages the page at its root and the link is rewritten to reach it."""
    page = build_module.BOOK / "notation.md"
    assert page.is_file() and "Vectors are rows" in page.read_text()
    assert (build_module.BOOK.parent / "course" / "01_attention" / build_module.NOTATION_LINK).resolve() == page
    for path in lectures:
        nb = nbformat.read(path, as_version=4)
        assert f"]({build_module.NOTATION_LINK})" in nb.cells[0].source, f"{path.name}: no link to the notation page"
        staged = build_module.prepare_notebook(nb)
        assert f"]({build_module.NOTATION_PAGE})" in staged.cells[0].source
        assert build_module.NOTATION_LINK not in staged.cells[0].source
    toc = build_module.make_toc([("01_attention", "Lecture 01")])
    assert {"file": "notation", "title": "Notation"} in toc["parts"][-1]["chapters"]
