"""Build the Transformer Lab website, offline, from the learner notebooks.

    .venv/bin/python jupyter_book/build.py                 # what `make book` runs
    .venv/bin/python jupyter_book/build.py --course DIR    # another folder of NN_topic/NN_topic.ipynb
    .venv/bin/python jupyter_book/build.py --execute cache # reuse outputs while editing the book

Steps:

1. Find the lectures: every ``course/NN_topic/NN_topic.ipynb`` (never ``solutions/``).
2. Stage them into ``jupyter_book/_work/`` (git-ignored) with the book's own pages. In the staged
   copy every nbgrader test cell (``metadata.nbgrader.grade == true``) is tagged
   ``raises-exception`` and ``remove-output``: in a learner notebook the exercises are stubs that
   raise ``NotImplementedError``, so their tests fail; the page shows the test code and no
   traceback. Any *other* failing cell stops the build (``nb_execution_raise_on_error``).
   Each staged lecture gets its overview boxes after its title (learning goals and prerequisites
   from the title cell, the time estimate and the exercises with points, the launch links of
   ``course.yml``), and a self-installing copy of it is written to ``notebooks/NN_topic.ipynb``.
3. Write ``_toc.yml`` from the lecture folders found, and the lecture list into ``intro.md``,
   so a new lecture appears without editing any configuration.
4. Install ``mathjax@3``, ``@jupyter-widgets/html-manager`` and ``requirejs`` from npm into
   ``jupyter_book/node_modules`` (once), and copy the files the site needs into
   ``_site_extra/vendor/``, which Sphinx copies to the site root (``html_extra_path``); the
   configuration points ``mathjax_path`` and ``nb_ipywidgets_js`` there. The site then loads
   nothing from a CDN, and the build checks that it doesn't.
5. Run ``jupyter-book build`` (Jupyter Book 1.x) with execution on and
   ``TRANSFORMER_LAB_GRADING`` removed from the environment (normal mode: full plots and widgets),
   then write ``_build/html/build-info.json`` (inputs digest, lectures, timings) which the tests
   use to decide whether the built site is fresh.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from html import escape as html_escape
from pathlib import Path
from urllib.parse import quote, urlencode

import nbformat
import yaml

BOOK = Path(__file__).resolve().parent  # jupyter_book/
ROOT = BOOK.parent  # the repository
WORK = BOOK / "_work"  # staged sources (git-ignored)
BUILD = BOOK / "_build"  # jupyter-book output; the site is _build/html
NODE_MODULES = BOOK / "node_modules"

#: Pages of the book itself, copied into the staging folder as they are.
BOOK_FILES = ("_config.yml", "course.yml", "intro.md", "notation.md", "logo.svg", "widgets-config.js", "nav-fix.js",
              "search-fix.js", "site.css")
#: Lecture folders look like ``01_attention``.
LECTURE_DIR = re.compile(r"^\d{2}_[A-Za-z0-9_]+$")
#: npm packages for the offline site, and what of each the site needs.
NPM_PACKAGES = ("mathjax@3", "@jupyter-widgets/html-manager@1", "requirejs@2")
#: Tags that let a test cell fail quietly in the staged learner notebook; "nbgrader-test" marks
#: it on the page (class ``tag_nbgrader-test``) for the tests.
TEST_CELL_TAGS = ("raises-exception", "remove-output", "nbgrader-test")
#: Script or stylesheet references that would load from the internet.
CDN_PATTERN = re.compile(
    r"""<(?:script|link)\b[^>]*(?:src|href)\s*=\s*["']?(?:https?:)?//[^"'\s>]*"""
    r"""(?:cdn|unpkg|jsdelivr|cloudflare|googleapis|gstatic)[^"'\s>]*""",
    re.IGNORECASE,
)
LECTURE_LIST_MARKER = re.compile(r"<!-- lecture-list:[^>]*-->")
#: How a lecture links the notation page: right in JupyterLab (course/NN_topic/ -> jupyter_book/);
#: the book stages the page at its root, two levels above the lecture (lectures/NN_topic/).
NOTATION_LINK = "../../jupyter_book/notation.md"
NOTATION_PAGE = "../../notation.md"
#: sphinx-thebe (a fixed part of Jupyter Book 1.x) writes its CDN address into every page even
#: with thebe switched off (``launch_buttons.thebe: false``); build.py removes its two scripts.
THEBE_SCRIPTS = re.compile(
    r"""\s*<script>const THEBE_JS_URL = [^<]*</script>"""
    r"""|\s*<script[^>]*src="[^"]*sphinx-thebe\.js[^"]*"[^>]*></script>"""
)


# --------------------------------------------------------------------------- lectures


def find_lectures(course: Path) -> list[Path]:
    """Every ``course/NN_topic/NN_topic.ipynb``, sorted by folder name."""
    if not course.is_dir():
        raise SystemExit(
            f"error: no course folder at {course}; generate it with `make release` "
            "(or pass --course DIR)"
        )
    found = []
    for folder in sorted(p for p in course.iterdir() if p.is_dir()):
        notebook = folder / f"{folder.name}.ipynb"
        if LECTURE_DIR.match(folder.name) and notebook.is_file():
            found.append(notebook)
    if not found:
        raise SystemExit(f"error: no lecture notebooks (NN_topic/NN_topic.ipynb) under {course}")
    return found


def is_test_cell(cell) -> bool:
    """An nbgrader autograder test cell: ``metadata.nbgrader.grade`` is true on a code cell."""
    nbgrader = cell.get("metadata", {}).get("nbgrader", {})
    return cell.get("cell_type") == "code" and bool(nbgrader.get("grade"))


def prepare_notebook(nb):
    """A copy of a learner notebook ready for the book: test cells tagged, outputs dropped."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and NOTATION_LINK in cell.source:
            cell.source = cell.source.replace(NOTATION_LINK, NOTATION_PAGE)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        if is_test_cell(cell):
            tags = list(cell.metadata.get("tags", []))
            for tag in TEST_CELL_TAGS:
                if tag not in tags:
                    tags.append(tag)
            cell.metadata["tags"] = tags
    return nb


def notebook_title(nb, fallback: str) -> str:
    """The first Markdown heading of a notebook (without '#'), or ``fallback``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                match = re.match(r"^#{1,6}\s+(.*\S)", line)
                if match:
                    return re.sub(r"[*_`]", "", match.group(1))
    return fallback


def page_source(name: str) -> str:
    """Where lecture ``name`` (e.g. ``01_attention``) is staged, without suffix."""
    return f"lectures/{name}/{name}"


def page_path(name: str) -> str:
    """The built page of lecture ``name``, relative to the site root."""
    return f"{page_source(name)}.html"


def short_title(title: str) -> str:
    """"Lecture 01 — Attention: queries" / "03 — Positions" -> the title without its number."""
    return re.sub(r"^(lecture\s+)?\d+\s*[—–:.\-]*\s*", "", title, flags=re.IGNORECASE) or title


def make_toc(lectures: list[tuple[str, str]]) -> dict:
    """The ``_toc.yml`` contents: intro page, then one chapter per (folder name, title) lecture,
    shown in the sidebar as "NN · title" whatever numbering the notebook's heading uses, then the
    notation page."""
    chapters = []
    for name, title in lectures:
        number = name.split("_", 1)[0]
        chapters.append({"file": page_source(name), "title": f"{number} · {short_title(title)}"})
    return {
        "format": "jb-book",
        "root": "intro",
        "parts": [{"caption": "Lectures", "chapters": chapters},
                  {"caption": "Reference", "chapters": [{"file": "notation", "title": "Notation"}]}],
    }


def lecture_table(lectures: list[tuple[str, str]], needs: dict[str, list[str]] | None = None) -> str:
    """Markdown table of (folder name, title) pairs, linking each lecture page, with the lectures
    each one builds on (``needs``: folder name -> numbers, from its prerequisites)."""
    needs = needs or {}
    by_number = {name.split("_", 1)[0]: name for name, _ in lectures}
    rows = ["| # | lecture | builds on |", "|---|---|---|"]
    for name, title in lectures:
        number = name.split("_", 1)[0]
        before = ", ".join(f"[{n}]({page_source(by_number[n])}.ipynb)" if n in by_number else n
                           for n in needs.get(name, [])) or "—"
        rows.append(
            f"| {number} | [{short_title(title)}]({page_source(name)}.ipynb) | {before} |"
        )
    return "\n".join(rows)


#: "Lecture 01", "lectures 05 and 06", "Lectures 01-02" in a lecture's prerequisites.
LECTURE_MENTION = re.compile(r"[Ll]ectures?\s+(\d{2}(?:\s*(?:,|and|-|–|to)\s*\d{2})*)")


def prerequisite_numbers(text: str, own: str) -> list[str]:
    """The earlier lectures a prerequisites paragraph names ("01-03" is 01, 02, 03), sorted."""
    found: set[int] = set()
    for group in LECTURE_MENTION.findall(text):
        for part in re.split(r"\s*(?:,|and)\s*", group):
            ends = [int(x) for x in re.split(r"\s*(?:-|–|to)\s*", part) if x]
            found.update(range(ends[0], ends[-1] + 1))
    return [f"{n:02d}" for n in sorted(found) if n < int(own)]


def course_map_svg(lectures: list[tuple[str, str]], needs: dict[str, list[str]], path: Path) -> str:
    """Draw which lecture builds on which (an arc from each prerequisite to the lecture that needs
    it, earlier lectures on the left) into ``path`` (SVG); return its alt text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Arc

    numbers = [name.split("_", 1)[0] for name, _ in lectures]
    x = {n: i for i, n in enumerate(numbers)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * len(numbers)), 3.0))
    tallest = 0.0
    for name, _ in lectures:
        to = name.split("_", 1)[0]
        for frm in needs.get(name, []):
            if frm in x:
                width = x[to] - x[frm]
                tallest = max(tallest, width / 2)
                # one colour for all arcs: the map reads by position, not by colour
                ax.add_patch(Arc(((x[frm] + x[to]) / 2, 0), width, width, theta1=0, theta2=180,
                                 color="#0072B2", lw=1.1, alpha=0.75))
    for name, title in lectures:
        n = name.split("_", 1)[0]
        ax.plot(x[n], 0, "o", ms=17, color="white", mec="#333333", mew=1.2, zorder=3)
        ax.text(x[n], 0, n, ha="center", va="center", fontsize=8, zorder=4)
        label = textwrap.shorten(short_title(title).split(":")[0], 36, placeholder="…")
        ax.text(x[n], -0.45, "\n".join(textwrap.wrap(label, 20)), rotation=40, ha="right", va="top", fontsize=7)
    ax.set_xlim(-1.0, len(numbers))
    ax.set_ylim(-3.2, tallest + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)
    parts = [f"{name.split('_', 1)[0]} builds on {', '.join(needs[name])}" for name, _ in lectures if needs.get(name)]
    return "Course map, an arc from each lecture to a later one that builds on it: " + "; ".join(parts) + "."


def course_map_markdown(lectures: list[tuple[str, str]], needs: dict[str, list[str]], work: Path) -> str:
    """The landing page's lecture table followed by the course map figure (written into ``work``)."""
    alt = course_map_svg(lectures, needs, work / "course-map.svg")
    return (lecture_table(lectures, needs) + "\n\n```{figure} course-map.svg\n:alt: " + alt
            + "\n:width: 100%\n\nThe course map: an arc joins a lecture (left) to a later one that builds on it "
            "(its prerequisites).\n```")


# --------------------------------------------------------------------------- lecture overview

#: The course's links (repository, Binder, Colab, JupyterHub, the library's pip requirement).
COURSE_LINKS = BOOK / "course.yml"
LINK_KEYS = ("repository_url", "branch", "binderhub_url", "site_branch", "jupyterhub_url", "library_pip")
#: The time estimate's rule, printed in every lecture's box.
READING_WORDS_PER_MINUTE = 150
MINUTES_PER_POINT = 5
#: Paragraphs of a lecture's title cell that move into the overview's boxes, in this order.
OVERVIEW_PARAGRAPHS = ("Learning goals", "Prerequisites")
BOLD_PARAGRAPH = re.compile(r"^\*\*([^*]+?)\.?\*\*\.?\s*(.*)$")
EXERCISE_HEADING = re.compile(r"^#{2,4}\s+Exercise\s+(\d+)\b[^:—–]*[:—–]\s*(.*\S)\s*$")


def load_links(path: Path = COURSE_LINKS) -> dict:
    """``course.yml`` checked: every key a string, URLs absolute, no unknown key."""
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SystemExit(f"error: {path} must map some of {list(LINK_KEYS)} to strings; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(LINK_KEYS))
    if unknown:
        raise SystemExit(f"error: {path}: unknown key(s) {unknown}; expected some of {list(LINK_KEYS)}")
    links = {}
    for key in LINK_KEYS:
        value = raw.get(key) or ""
        if not isinstance(value, str):
            raise SystemExit(f"error: {path}: {key} must be a string; got {value!r}")
        links[key] = value.strip().rstrip("/") if key.endswith("_url") else value.strip()
        if key.endswith("_url") and links[key] and not re.match(r"^https?://[^\s/]+", links[key]):
            raise SystemExit(f"error: {path}: {key} must be an http(s) address; got {value!r}")
    links["branch"] = links["branch"] or "main"
    return links


def library_requirement(links: dict) -> str:
    """What the downloaded notebook pip-installs when the library is missing ("" if nothing is set)."""
    if links["library_pip"]:
        return links["library_pip"]
    if links["repository_url"]:
        return f"transformer-lab @ git+{links['repository_url']}@{links['branch']}"
    return ""


def launch_links(name: str, links: dict) -> list[tuple[str, str]]:
    """(label, address) of lecture ``name``'s "Run this lecture" box, the download first (relative
    to the lecture's page; always there), then those ``course.yml`` sets."""
    out = [("Download the notebook", f"../../{download_path(name)}")]
    repo, branch = links["repository_url"], links["branch"]
    if not repo:
        return out
    path = f"course/{name}/{name}.ipynb"
    github = re.match(r"^https://github\.com/([^/]+)/([^/]+?)(?:\.git)?$", repo)
    if links["binderhub_url"]:
        provider = f"gh/{github[1]}/{github[2]}" if github else f"git/{quote(repo, safe='')}"
        out.append(("Binder", f"{links['binderhub_url']}/v2/{provider}/{branch}?urlpath="
                              + quote(f"lab/tree/{path}", safe="")))
    if github and links["site_branch"]:
        out.append(("Colab", f"https://colab.research.google.com/github/{github[1]}/{github[2]}/blob/"
                             f"{links['site_branch']}/{download_path(name)}"))
    if links["jupyterhub_url"]:
        folder = repo.rsplit("/", 1)[-1].removesuffix(".git")  # where nbgitpuller clones it
        query = urlencode({"repo": repo, "branch": branch, "urlpath": f"lab/tree/{folder}/{path}"})
        out.append(("JupyterHub", f"{links['jupyterhub_url']}/hub/user-redirect/git-pull?{query}"))
    out.append(("Repository", repo))
    return out


def download_path(name: str) -> str:
    """The self-installing copy of lecture ``name``, relative to the site root."""
    return f"notebooks/{name}.ipynb"


def split_title_cell(source: str, name: str) -> tuple[str, str, dict]:
    """The title cell cut around its OVERVIEW_PARAGRAPHS (``**Learning goals.** ...`` up to the next
    bold-led paragraph or heading): what comes before the first of them (the title and why the
    lecture matters), what comes after (notation, how the exercises work), and their text by name."""
    lines = source.splitlines()
    head: list[str] = []
    tail: list[str] = []
    found: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        starts_paragraph = i == 0 or not lines[i - 1].strip()
        match = BOLD_PARAGRAPH.match(line) if starts_paragraph else None
        if match or line.startswith("#"):
            current = match[1].strip() if match and match[1].strip() in OVERVIEW_PARAGRAPHS else None
            if current:
                found[current] = [match[2]] if match[2] else []
                continue
        (found[current] if current else tail if found else head).append(line)
    missing = [p for p in OVERVIEW_PARAGRAPHS if p not in found]
    if missing:
        raise SystemExit(f"error: {name}: the title cell has no {', '.join(f'**{p}.**' for p in missing)} "
                         f"paragraph; every lecture opens with {list(OVERVIEW_PARAGRAPHS)} (CONTRIBUTING.md)")
    return ("\n".join(head).strip(), "\n".join(tail).strip(),
            {k: "\n".join(v).strip() for k, v in found.items()})


def exercises(nb) -> list[dict]:
    """The autograded exercises in order: number, title (from the "### Exercise N ...: title"
    heading before the test cell) and points (summed over the exercise's test cells)."""
    out: list[dict] = []
    heading = None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                match = EXERCISE_HEADING.match(line)
                if match:
                    heading = (int(match[1]), match[2].strip())
        elif is_test_cell(cell):
            meta = cell.metadata["nbgrader"]
            number, title = heading if heading else (len(out) + 1, meta.get("grade_id", "?"))
            if out and out[-1]["number"] == number:
                out[-1]["points"] += meta.get("points", 0)
            else:
                out.append({"number": number, "title": title, "points": meta.get("points", 0)})
    return out


def time_estimate(nb) -> dict:
    """Minutes to read the lecture's prose and to do its exercises, by the rule printed in the box."""
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    points = sum(e["points"] for e in exercises(nb))
    reading = words / READING_WORDS_PER_MINUTE
    total = 5 * max(1, round((reading + points * MINUTES_PER_POINT) / 5))
    return {"words": words, "points": points, "reading_min": round(reading),
            "exercise_min": points * MINUTES_PER_POINT, "total_min": total}


def _duration(minutes: int) -> str:
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest:02d} min" if hours else f"{rest} min"


def overview_markdown(nb, name: str, goals: dict, links: dict) -> str:
    """Four boxes, the same on every lecture page: goals, prerequisites, time and exercises, run."""
    est = time_estimate(nb)
    table = ["| exercise | points |", "|---|---|"]
    table += [f"| {e['number']} · {e['title'].replace('|', '/')} | {e['points']} |" for e in exercises(nb)]
    table.append(f"| **total** | **{est['points']}** |")
    # raw HTML links: MyST would treat a relative ".ipynb" address as a reference to a document
    run = " · ".join(
        f'<a href="{html_escape(url)}" class="overview-link"{" download" if i == 0 else ""}>{label}</a>'
        for i, (label, url) in enumerate(launch_links(name, links)))
    boxes = [
        ("Learning goals", "tip overview-goals", goals["Learning goals"]),
        ("Prerequisites", "note overview-prerequisites", goals["Prerequisites"]),
        ("Time and exercises", "seealso overview-time",
         f"About **{_duration(est['total_min'])}**: {est['reading_min']} min of reading ({est['words']:,} words "
         f"at {READING_WORDS_PER_MINUTE} a minute) and {est['exercise_min']} min for the exercises "
         f"({MINUTES_PER_POINT} min a point).\n\n" + "\n".join(table)),
        ("Run this lecture", "important overview-run",
         run + "\n\n" + (f"The downloaded notebook runs on its own: its first cell installs the course's library "
                           f"(`{library_requirement(links)}`) when it is missing." if library_requirement(links) else
                           "The downloaded notebook's first cell checks for the course's library and says how to "
                           "install it when it is missing.")
         + " In the course's own JupyterLab (`make lab`) everything is already installed."),
    ]
    return "\n\n".join(f"::::{{admonition}} {title}\n:class: {cls}\n{body}\n::::" for title, cls, body in boxes)


def add_overview(nb, name: str, links: dict):
    """A copy of ``nb`` whose title cell is cut in two around the overview boxes: the title and why
    the lecture matters, then the boxes (goals and prerequisites taken from the title cell), then
    the rest of the title cell (notation, how the exercises work)."""
    nb = copy.deepcopy(nb)
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), None)
    if first is None:
        raise SystemExit(f"error: {name}: no Markdown title cell")
    head, tail, goals = split_title_cell(nb.cells[first].source, name)
    box = nbformat.v4.new_markdown_cell(overview_markdown(nb, name, goals, links))
    box.metadata["tags"] = ["lecture-overview"]
    nb.cells[first].source = head
    new = [box] + ([nbformat.v4.new_markdown_cell(tail)] if tail else [])
    nb.cells[first + 1:first + 1] = new
    return nb


INSTALL_CELL = """\
# Run this cell first. In the course's own environment (`make lab`, Binder, the class's JupyterHub)
# it changes nothing; anywhere else (Colab, a fresh Jupyter) it installs the course's library
# and writes the small data files this lecture reads beside the notebook.
import base64, importlib, importlib.util, pathlib, subprocess, sys, zlib

REQUIREMENT = {requirement!r}
DATA = {data!r}  # file name -> zlib-compressed, base64-encoded contents
if importlib.util.find_spec("transformer_lab") is None:
    if not REQUIREMENT:
        raise RuntimeError("This notebook needs the course's library `transformer_lab`: install it with "
                           "`pip install -e .` in a copy of the course's repository (the website that "
                           "served this notebook names no pip location: jupyter_book/course.yml).")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", REQUIREMENT])
    importlib.invalidate_caches()
for _name, _blob in DATA.items():
    if not pathlib.Path(_name).exists():
        pathlib.Path(_name).write_bytes(zlib.decompress(base64.b64decode(_blob)))
"""


def downloadable_notebook(nb, folder: Path, requirement: str):
    """The learner notebook with a first cell that installs the library when it is missing and
    carries the files of the lecture's folder (benchmark results it reads)."""
    nb = copy.deepcopy(nb)
    data = {f.name: base64.b64encode(zlib.compress(f.read_bytes(), 9)).decode()
            for f in sorted(folder.iterdir()) if f.is_file() and f.suffix != ".ipynb"}
    cell = nbformat.v4.new_code_cell(INSTALL_CELL.format(requirement=requirement, data=data))
    cell.metadata["tags"] = ["install-if-missing"]
    nb.cells.insert(0, cell)
    return nb


# --------------------------------------------------------------------------- assets


def npm_install(force: bool = False) -> None:
    """Install the site's JavaScript from npm into jupyter_book/node_modules (skipped if there)."""
    wanted = [
        NODE_MODULES / "mathjax" / "es5" / "tex-chtml.js",
        NODE_MODULES / "@jupyter-widgets" / "html-manager" / "dist" / "embed-amd.js",
        NODE_MODULES / "requirejs" / "require.js",
    ]
    if not force and all(p.is_file() for p in wanted):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "error: npm not found; the website's MathJax and widget manager come from npm "
            "(install Node.js, e.g. `apt-get install nodejs npm`)"
        )
    print(f"[book] npm install {' '.join(NPM_PACKAGES)} -> {NODE_MODULES}", flush=True)
    subprocess.run(
        [npm, "install", "--prefix", str(BOOK), "--no-save", "--no-package-lock",
         "--no-audit", "--no-fund", "--loglevel=error", *NPM_PACKAGES],
        check=True,
    )
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise SystemExit(f"error: npm install did not provide {missing}")


def stage_assets(extra: Path) -> None:
    """Copy MathJax, RequireJS and the widget manager into ``extra/vendor``.

    ``extra`` is the book's ``html_extra_path``: Sphinx copies it as is to the site root, so the
    pages reach the files at ``vendor/...`` (``_config.yml`` points there).
    """
    vendor = extra / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    shutil.copytree(NODE_MODULES / "mathjax" / "es5", vendor / "mathjax" / "es5")
    manager = vendor / "html-manager"
    manager.mkdir(parents=True)
    dist = NODE_MODULES / "@jupyter-widgets" / "html-manager" / "dist"
    for f in dist.iterdir():
        # embed-amd.js and the fonts its CSS refers to (by hashed file name)
        if f.name == "embed-amd.js" or f.suffix in {".woff", ".woff2", ".ttf", ".eot", ".svg"}:
            shutil.copy2(f, manager / f.name)
    shutil.copy2(BOOK / "widgets-config.js", vendor / "widgets-config.js")
    shutil.copy2(BOOK / "nav-fix.js", vendor / "nav-fix.js")  # the sidebar toggle (see the file)
    shutil.copy2(BOOK / "search-fix.js", vendor / "search-fix.js")  # search results without raw TeX
    shutil.copy2(BOOK / "site.css", vendor / "site.css")  # narrow screens, explorers' figures
    (vendor / "requirejs").mkdir(parents=True)
    shutil.copy2(NODE_MODULES / "requirejs" / "require.js", vendor / "requirejs" / "require.js")
    for package in ("mathjax", "requirejs", "@jupyter-widgets/html-manager"):
        license_file = NODE_MODULES / package / "LICENSE"
        if license_file.is_file():
            shutil.copy2(license_file, vendor / f"LICENSE.{package.split('/')[-1]}")


# --------------------------------------------------------------------------- digest / checks


def inputs_digest(course: Path) -> str:
    """A digest of everything the site is built from: the learner notebooks, the book's own
    files, this script and the library's sources (the notebooks import it)."""
    h = hashlib.sha256()
    files = [BOOK / name for name in BOOK_FILES] + [Path(__file__).resolve()]
    files += [nb for nb in find_lectures(course)]
    files += sorted((ROOT / "lib" / "transformer_lab").rglob("*.py"))
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def strip_thebe(html_dir: Path) -> int:
    """Remove sphinx-thebe's scripts (unused: thebe is off) from every page; count pages changed."""
    changed = 0
    for page in html_dir.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        new = THEBE_SCRIPTS.sub("", text)
        if new != text:
            page.write_text(new, encoding="utf-8")
            changed += 1
    return changed


#: An output figure's ``<img>`` as myst-nb writes it: the alt text is the file's path.
FIGURE_IMG = re.compile(r'<img alt="([^"]*?_images/([0-9a-f]{64})\.[a-z]+)"')
FIGURE_ALT_FALLBACK = "A figure drawn by the code cell above"


def figure_alt_texts(executed: Path) -> dict[str, str]:
    """{sha256 of an output image: its alt text} from the executed notebooks (myst-nb names each
    image file by that digest); the text is ``viz.core.describe_figure``'s, put in the output's
    metadata while the book runs the notebooks."""
    alts = {}
    for path in sorted(executed.rglob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                alt = output.get("metadata", {}).get("alt")
                if png and alt:
                    alts[hashlib.sha256(base64.b64decode(png)).hexdigest()] = alt
    return alts


def set_figure_alt_texts(html_dir: Path, alts: dict[str, str]) -> dict[str, int]:
    """Replace the file-path alt text of every output figure by its description (or a plain
    fallback); count both."""
    counts = {"described": 0, "fallback": 0}

    def replace(match) -> str:
        alt = alts.get(match[2])
        counts["described" if alt else "fallback"] += 1
        return f'<img alt="{html_escape(alt or FIGURE_ALT_FALLBACK)}"'

    for page in html_dir.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        new = FIGURE_IMG.sub(replace, text)
        if new != text:
            page.write_text(new, encoding="utf-8")
    return counts


def cdn_references(html_dir: Path) -> list[str]:
    """Every ``<script src>``/``<link href>`` in the site that points at a CDN."""
    hits = []
    for page in sorted(html_dir.rglob("*.html")):
        for match in CDN_PATTERN.finditer(page.read_text(encoding="utf-8", errors="replace")):
            hits.append(f"{page.relative_to(html_dir)}: {match.group(0)}")
    return hits


# --------------------------------------------------------------------------- main


def work_folder(out: Path) -> Path:
    """Where a build stages its sources: WORK for the default site, else beside ``out`` (two
    builds into different folders, e.g. a lecture author's and ``make test``'s, never share one)."""
    return WORK if out.resolve() == BUILD.resolve() else out.parent / "_work"


def stage(course: Path, execute: str, work: Path = WORK) -> list[tuple[str, str]]:
    """Fill ``work`` with the book's pages, the prepared lectures, _toc.yml and the vendor files."""
    WORK = work  # noqa: N806 - the module's default, or a build's own folder
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "lectures").mkdir(parents=True)
    lectures = []
    needs: dict[str, list[str]] = {}
    links = load_links()
    downloads = WORK / "_site_extra" / "notebooks"
    downloads.mkdir(parents=True)
    for path in find_lectures(course):
        # the lecture's whole folder (figures or small files next to the notebook keep working),
        # then the prepared notebook over the original
        target = WORK / "lectures" / path.stem
        shutil.copytree(path.parent, target, ignore=shutil.ignore_patterns(
            ".ipynb_checkpoints", "__pycache__", "*.pyc"))
        nb = nbformat.read(path, as_version=4)
        nbformat.write(add_overview(prepare_notebook(nb), path.stem, links), target / path.name)
        nbformat.write(downloadable_notebook(nb, path.parent, library_requirement(links)),
                       WORK / "_site_extra" / download_path(path.stem))
        lectures.append((path.stem, notebook_title(nb, path.stem)))
        needs[path.stem] = prerequisite_numbers(split_title_cell(nb.cells[0].source, path.stem)[2]["Prerequisites"],
                                                path.stem.split("_", 1)[0])

    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = execute
    (WORK / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (WORK / "_toc.yml").write_text(yaml.safe_dump(make_toc(lectures), sort_keys=False))
    intro = (BOOK / "intro.md").read_text()
    intro = LECTURE_LIST_MARKER.sub(lambda _: course_map_markdown(lectures, needs, WORK), intro)
    (WORK / "intro.md").write_text(intro)
    shutil.copy2(BOOK / "notation.md", WORK / "notation.md")
    shutil.copy2(BOOK / "logo.svg", WORK / "logo.svg")
    stage_assets(WORK / "_site_extra")
    return lectures


def build_env(environ) -> dict:
    """The environment the notebooks run in: normal mode (TRANSFORMER_LAB_GRADING removed, so
    claim checks and widgets run in full), explorers as static pages whose controls switch figures
    drawn in advance (a static site has no kernel) and the library importable from a plain checkout."""
    env = dict(environ)
    env.pop("TRANSFORMER_LAB_GRADING", None)
    env["TRANSFORMER_LAB_STATIC_WIDGETS"] = "1"  # explorers draw their figures in advance (viz.core)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "lib"), env.get("PYTHONPATH", "")) if p
    )
    return env


def jupyter_book_command() -> str:
    local = Path(sys.executable).parent / "jupyter-book"
    found = str(local) if local.is_file() else shutil.which("jupyter-book")
    if not found:
        raise SystemExit("error: jupyter-book not found; `pip install -e .` installs jupyter-book<2")
    return found


def build(course: Path = ROOT / "course", execute: str = "force", out: Path = BUILD) -> dict:
    """Stage, build and check the site; return the build info written next to it."""
    course = course.resolve()
    t0 = time.perf_counter()
    npm_install()
    t_npm = time.perf_counter() - t0
    if out.name != "_build":
        raise SystemExit("error: --out must be a folder named _build (jupyter-book's layout)")
    work = work_folder(out)
    lectures = stage(course, execute, work)
    print(f"[book] staged {len(lectures)} lecture(s) from {course}: "
          + ", ".join(name for name, _ in lectures), flush=True)

    env = build_env(os.environ)
    html = out / "html"
    if html.exists():  # no stale pages from lectures that are gone
        shutil.rmtree(html)
    t1 = time.perf_counter()
    cmd = [jupyter_book_command(), "build", str(work), "--path-output", str(out.parent),
           "--builder", "html"]
    result = subprocess.run(cmd, env=env)
    t_build = time.perf_counter() - t1
    if result.returncode != 0:
        raise SystemExit(f"error: jupyter-book build failed (exit {result.returncode})")
    missing = [n for n, _ in lectures if not (html / page_path(n)).is_file()]
    if missing:
        raise SystemExit(f"error: no page was built for {missing}")
    strip_thebe(html)
    alt_counts = set_figure_alt_texts(html, figure_alt_texts(out / "jupyter_execute"))
    hits = cdn_references(html)
    if hits:
        raise SystemExit("error: the site still loads from a CDN:\n  " + "\n  ".join(hits))

    info = {
        "course": str(course),
        "lectures": [{"name": n, "title": t} for n, t in lectures],
        "execute": execute,
        "inputs_digest": inputs_digest(course),
        "figure_alt_texts": alt_counts,
        "seconds": {"npm": round(t_npm, 1), "jupyter_book": round(t_build, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (html / "build-info.json").write_text(json.dumps(info, indent=2))
    print(f"[book] built {html / 'index.html'} in {info['seconds']['total']} s "
          f"(jupyter-book {info['seconds']['jupyter_book']} s)", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--course", type=Path, default=ROOT / "course",
                        help="folder of NN_topic/NN_topic.ipynb learner notebooks (default: course/)")
    parser.add_argument("--execute", choices=("force", "cache", "off"), default="force",
                        help="run the notebooks every build (force, default), only when their "
                             "code changed (cache), or not at all (off: no plots)")
    parser.add_argument("--out", type=Path, default=BUILD,
                        help="build folder (default: jupyter_book/_build)")
    parser.add_argument("--npm-only", action="store_true",
                        help="install the npm packages and stop")
    args = parser.parse_args(argv)
    if args.npm_only:
        npm_install()
        return 0
    build(args.course, args.execute, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
