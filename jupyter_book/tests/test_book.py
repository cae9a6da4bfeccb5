"""The built website: every lecture is there, nothing of the solutions leaked, no traceback,
nothing loaded from a CDN. Built from the learner notebooks (``course/``) by ``make book``."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup

pytestmark = pytest.mark.book

REGIONS = {
    "solution": ("### BEGIN SOLUTION", "### END SOLUTION"),
    "hidden test": ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"),
}
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
#: Lines shorter than this, blanks removed (``return out``, ``pass``), are too common to prove a leak.
MIN_NEEDLE = 12


def squash(text: str) -> str:
    """Whitespace-free form used on both sides of a search: syntax highlighting splits a line of
    code into many <span>s and re-spaces nothing, but text extraction may add or drop blanks."""
    return re.sub(r"\s+", "", text)


def element_text(element) -> str:
    return squash(element.get_text(""))


def page_text(html_file: Path) -> str:
    """Everything a reader (or a view-source) can read on a page, tags removed, entities decoded."""
    return element_text(BeautifulSoup(html_file.read_text(encoding="utf-8"), "html.parser"))


def site_text_files(html: Path) -> list[Path]:
    """The site's own text files (pages, sources, search index), without the vendored JS."""
    keep = {".html", ".ipynb", ".txt", ".js", ".json", ".md"}
    return [
        p for p in html.rglob("*")
        if p.is_file() and p.suffix in keep and "vendor" not in p.relative_to(html).parts
    ]


def region_lines(notebook: Path) -> tuple[dict[str, list[str]], set[str]]:
    """Lines inside solution / hidden-test regions of an instructor notebook, and every line
    outside them (those are public: the lecture shows them anyway)."""
    inside: dict[str, list[str]] = {kind: [] for kind in REGIONS}
    outside: set[str] = set()
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        current = None
        for line in cell.source.splitlines():
            stripped = line.strip()
            for kind, (begin, end) in REGIONS.items():
                if stripped.startswith(begin):
                    current = kind
                    break
                if stripped.startswith(end):
                    current = None
                    break
            else:
                if current is None:
                    outside.add(squash(line))
                else:
                    inside[current].append(squash(line))
    return inside, outside


def secret_needles(solutions: Path) -> list[tuple[str, str, str]]:
    """(notebook, kind, line) for every non-trivial line that only a solution or hidden test has:
    a line that the lectures also show elsewhere (in any cell, outside the regions, even as part
    of a longer line) is public and proves nothing."""
    inside_by_nb, public = {}, []
    for notebook in sorted(solutions.glob("*/*.ipynb")):
        inside, outside = region_lines(notebook)
        inside_by_nb[notebook.name] = inside
        public.extend(outside)
    public_text = "\n".join(public)
    needles = []
    for name, inside in inside_by_nb.items():
        for kind, lines in inside.items():
            for line in lines:
                if len(line) >= MIN_NEEDLE and not line.startswith("#") and line not in public_text:
                    needles.append((name, kind, line))
    return needles


def test_every_lecture_has_a_page_in_the_toc(built_site, lectures, build_module):
    intro = (built_site / "intro.html").read_text(encoding="utf-8")
    for notebook in lectures:
        page = built_site / build_module.page_path(notebook.stem)
        assert page.is_file(), f"no page for {notebook.stem}"
        assert build_module.page_path(notebook.stem) in intro, (
            f"{notebook.stem} is missing from the table of contents / lecture list of intro.html"
        )


def test_no_solution_and_no_hidden_test_in_the_site(built_site, solutions_dir):
    if not any(solutions_dir.glob("*/*.ipynb")):
        pytest.skip(f"no instructor notebooks under {solutions_dir}")
    needles = secret_needles(solutions_dir)
    assert needles, "found no solution lines to look for: is the region parser broken?"
    files = site_text_files(built_site)
    assert files, "the site has no text files"
    texts = {}
    for f in files:
        if f.suffix == ".html":
            texts[f] = page_text(f)
        elif f.suffix == ".ipynb":  # the page's download copy: search its cells, not its JSON
            nb = nbformat.read(f, as_version=4)
            texts[f] = squash("\n".join(c.source for c in nb.cells))
        else:
            texts[f] = squash(f.read_text(errors="replace"))
    leaks = [
        f"{kind} line of {nb} in {f.relative_to(built_site)}: {line!r}"
        for nb, kind, line in needles
        for f, text in texts.items()
        if line in text
    ]
    assert not leaks, "the website shows code it must not:\n" + "\n".join(leaks[:20])

    raw = {f: f.read_text(errors="replace") for f in files}
    markers = [f"{m!r} in {f.relative_to(built_site)}" for f, t in raw.items() for m in MARKERS if m in t]
    assert not markers, "nbgrader region markers in the website:\n" + "\n".join(markers)


def test_test_cells_show_their_code_but_no_output(built_site, lectures, build_module):
    for notebook in lectures:
        nb = nbformat.read(notebook, as_version=4)
        tests = [c for c in nb.cells if build_module.is_test_cell(c)]
        soup = BeautifulSoup(
            (built_site / build_module.page_path(notebook.stem)).read_text(encoding="utf-8"),
            "html.parser",
        )
        tagged = soup.select("div.cell.tag_nbgrader-test")
        assert len(tagged) == len(tests), (
            f"{notebook.stem}: {len(tests)} nbgrader test cells, {len(tagged)} tagged cells on the page"
        )
        for cell_div, cell in zip(tagged, tests, strict=True):
            # the code of the test is on the page (a learner sees what will be checked) ...
            first = next((ln for ln in cell.source.splitlines() if len(ln.strip()) > 8), None)
            if first:
                assert squash(first) in element_text(cell_div), (
                    f"{notebook.stem}: test cell {cell.metadata['nbgrader'].get('grade_id')} "
                    "is not shown on the page"
                )
            # ... but not what it printed when it failed on the stub
            assert not cell_div.select(".cell_output"), (
                f"{notebook.stem}: test cell {cell.metadata['nbgrader'].get('grade_id')} shows output"
            )


def test_no_traceback_in_any_output(built_site, lectures, build_module):
    for notebook in lectures:
        soup = BeautifulSoup(
            (built_site / build_module.page_path(notebook.stem)).read_text(encoding="utf-8"),
            "html.parser",
        )
        outputs = soup.select(".cell_output")
        assert outputs, f"{notebook.stem}: no cell output at all: was it executed?"
        for out in outputs:
            text = out.get_text(" ")
            cell = out.find_parent("div", class_="cell")
            classes = cell.get("class", []) if cell else []
            # a cell the author tagged raises-exception (a "common mistake" shown failing) may
            # show its traceback; an exercise stub's NotImplementedError never shows
            demo = "tag_raises-exception" in classes and "tag_nbgrader-test" not in classes
            for bad in ("NotImplementedError",) if demo else ("Traceback", "NotImplementedError"):
                assert bad not in text, f"{notebook.stem}: an output shows {bad!r}:\n{text[:500]}"


def test_lectures_were_executed_with_plots(built_site, lectures, build_module):
    for notebook in lectures:
        soup = BeautifulSoup(
            (built_site / build_module.page_path(notebook.stem)).read_text(encoding="utf-8"),
            "html.parser",
        )
        nb = nbformat.read(notebook, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        if re.search(r"\b(plt\.|plot_\w+\(|sns\.|imshow)", code):
            assert soup.select(".cell_output img"), f"{notebook.stem}: draws plots but no image is on the page"


def test_site_loads_nothing_from_a_cdn(built_site, build_module):
    assert build_module.cdn_references(built_site) == []
    offenders = []
    for page in built_site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for pattern in ("https://cdn", "//cdn.", "unpkg", "jsdelivr", "cdnjs"):
            if pattern in text:
                offenders.append(f"{page.relative_to(built_site)}: {pattern}")
    assert not offenders, "CDN references in the site:\n" + "\n".join(offenders)
    assert (built_site / "vendor" / "mathjax" / "es5" / "tex-chtml.js").is_file()
    assert (built_site / "vendor" / "html-manager" / "embed-amd.js").is_file()
    assert (built_site / "vendor" / "requirejs" / "require.js").is_file()


def test_pages_use_the_local_mathjax(built_site, lectures, build_module):
    for notebook in lectures:
        text = (built_site / build_module.page_path(notebook.stem)).read_text(encoding="utf-8")
        assert re.search(r'<script[^>]*src="[^"]*vendor/mathjax/es5/tex-chtml\.js', text), (
            f"{notebook.stem}: MathJax is not loaded from vendor/"
        )
        if "application/vnd.jupyter.widget-state+json" in text:
            assert re.search(r'<script[^>]*src="[^"]*vendor/html-manager/embed-amd\.js', text)


PAGE_BUDGET_MIB = 4.0  # a lecture page with its images; the explorers' figures are inline PNGs


def test_lecture_pages_stay_light(built_site, lectures, build_module):
    """The weight of each lecture page: its HTML (with the explorers' figures drawn in advance,
    inline) and the images it loads from _images/. Printed for the record (pytest -s)."""
    heavy = []
    for notebook in lectures:
        page = built_site / build_module.page_path(notebook.stem)
        text = page.read_text(encoding="utf-8")
        images = {m for m in re.findall(r'src="((?:\.\./)+_images/[^"]+)"', text)}
        size = page.stat().st_size + sum((page.parent / m).resolve().stat().st_size for m in images)
        explorers = text.count('class="tl-static-explorer"')
        print(f"{notebook.stem}: {size / 2**20:.2f} MiB ({len(images)} images, {explorers} explorer(s))")
        if size > PAGE_BUDGET_MIB * 2**20:
            heavy.append(f"{notebook.stem}: {size / 2**20:.2f} MiB")
    assert not heavy, f"lecture pages over {PAGE_BUDGET_MIB} MiB: {heavy}"


def test_every_lecture_opens_with_the_same_four_boxes_and_a_working_download(built_site, lectures, build_module):
    """Goals, prerequisites, time and exercises with points, and "Run this lecture", in that order
    right after the title; the download is the learner notebook behind a first cell that installs
    the library when it is missing."""
    classes = ["overview-goals", "overview-prerequisites", "overview-time", "overview-run"]
    for notebook in lectures:
        page = built_site / build_module.page_path(notebook.stem)
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        boxes = soup.select("div.admonition")
        found = [c for box in boxes[:4] for c in box.get("class", []) if c.startswith("overview-")]
        assert found == classes, f"{notebook.stem}: the first boxes are {found}"
        nb = nbformat.read(notebook, as_version=4)
        rows = boxes[2].select("tbody tr")
        assert len(rows) == len(build_module.exercises(nb)) + 1, f"{notebook.stem}: one row per exercise and a total"
        link = boxes[3].select_one("a[download]")
        assert link is not None and link.get_text() == "Download the notebook"
        download = (page.parent / link["href"]).resolve()
        assert download == (built_site / build_module.download_path(notebook.stem)).resolve() and download.is_file()
        copy = nbformat.read(download, as_version=4)
        assert copy.cells[0].metadata["tags"] == ["install-if-missing"]
        assert [c.source for c in copy.cells[1:]] == [c.source for c in nb.cells], notebook.stem


def test_landing_page_has_the_course_map(built_site, lectures):
    """The lecture table says which lecture builds on which, and the course map draws it with alt text."""
    soup = BeautifulSoup((built_site / "intro.html").read_text(encoding="utf-8"), "html.parser")
    img = soup.select_one("figure img[src*='course-map']")
    assert img is not None and img["alt"].startswith("Course map"), "no course map figure on the landing page"
    assert (built_site / "intro.html").parent.joinpath(img["src"]).is_file()
    headers = [th.get_text(strip=True) for th in soup.select("table thead th")][:3]
    assert headers == ["#", "lecture", "builds on"]
    if len(lectures) > 1:
        assert " builds on " in img["alt"]


def test_every_figure_has_alt_text(built_site, lectures, build_module):
    """Output figures carry a description of themselves (title, kind, axes, legend:
    viz.core.describe_figure) instead of myst-nb's file path."""
    described = 0
    for notebook in lectures:
        soup = BeautifulSoup((built_site / build_module.page_path(notebook.stem)).read_text(encoding="utf-8"),
                             "html.parser")
        for img in soup.select("img"):
            alt = img.get("alt", "")
            assert alt and "_images/" not in alt, f"{notebook.stem}: an image without alt text: {img.get('src', '')[:80]}"
            described += alt.startswith("Figure")
    counts = __import__("json").loads((built_site / "build-info.json").read_text())["figure_alt_texts"]
    assert described == counts["described"] > 0 and counts["fallback"] <= counts["described"] // 10, counts
