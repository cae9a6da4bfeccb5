"""Shared set-up for the website's tests.

The ``built_site`` fixture gives the folder of the built site (``jupyter_book/_build/html``).
It reuses the site that ``make book`` just built when it is fresh (its ``build-info.json``
records a digest of the learner notebooks, the book's files, the build script and the library;
``make test`` builds the book first), and otherwise builds it once per session.

Environment variables, for developing the book before ``course/`` exists:
``TRANSFORMER_LAB_BOOK_COURSE`` (default ``course/``) and ``TRANSFORMER_LAB_BOOK_SOLUTIONS``
(default ``solutions/``); ``TRANSFORMER_LAB_BOOK_HTML`` tests a site already built elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1]
ROOT = BOOK.parent


def _load_build_module():
    spec = importlib.util.spec_from_file_location("transformer_lab_book_build", BOOK / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


book_build = _load_build_module()


@pytest.fixture(scope="session")
def build_module():
    return book_build


@pytest.fixture(scope="session")
def course_dir() -> Path:
    return Path(os.environ.get("TRANSFORMER_LAB_BOOK_COURSE", ROOT / "course")).resolve()


@pytest.fixture(scope="session")
def solutions_dir() -> Path:
    return Path(os.environ.get("TRANSFORMER_LAB_BOOK_SOLUTIONS", ROOT / "solutions")).resolve()


@pytest.fixture(scope="session")
def lectures(course_dir) -> list[Path]:
    """The learner notebooks the site is built from (skips when course/ is not generated yet)."""
    if not course_dir.is_dir():
        pytest.skip(f"no learner notebooks: {course_dir} does not exist yet (run `make release`)")
    try:
        return book_build.find_lectures(course_dir)
    except SystemExit as exc:
        pytest.skip(str(exc))


def _is_fresh(html: Path, course: Path) -> bool:
    info_file = html / "build-info.json"
    if not info_file.is_file():
        return False
    try:
        info = json.loads(info_file.read_text())
    except ValueError:
        return False
    return (
        info.get("course") == str(course)
        and info.get("execute") != "off"
        and info.get("inputs_digest") == book_build.inputs_digest(course)
    )


@pytest.fixture(scope="session")
def built_site(lectures, course_dir) -> Path:
    """The built site's folder, built now unless a fresh one is there (or the folder named by
    ``TRANSFORMER_LAB_BOOK_HTML``, as it is: to test a site built elsewhere with ``--out``)."""
    if os.environ.get("TRANSFORMER_LAB_BOOK_HTML"):
        return Path(os.environ["TRANSFORMER_LAB_BOOK_HTML"]).resolve()
    html = book_build.BUILD / "html"
    if not _is_fresh(html, course_dir):
        try:
            book_build.build(course_dir)
        except SystemExit as exc:
            pytest.fail(f"the book did not build: {exc}")
    assert _is_fresh(html, course_dir), "the book built, but its build-info.json is not fresh"
    return html
