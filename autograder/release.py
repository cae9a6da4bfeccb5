"""``python -m autograder release``: regenerate ``course/`` from ``solutions/``.

For each lecture, nbgrader's ``generate_assignment`` runs in a temporary course
root with a temporary gradebook (the repository never gets one). Only what it
generates is copied back: the learner notebook(s), with solutions replaced by
``raise NotImplementedError()``, hidden tests removed, outputs cleared, and the
lecture's non-notebook files. Notebooks are written in one canonical form, so
two releases of the same ``solutions/`` are byte-identical and ``course/`` can
be checked against a fresh generation (``release --check``).
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import nbformat

from .course import COURSE, IGNORE, RELEASE_DIRNAME, SOLUTIONS, SOURCE_DIRNAME
from .runner import run_tasks


class ReleaseError(Exception):
    """nbgrader could not generate a lecture (e.g. bad cell metadata)."""


def canonical_notebook(path: Path) -> None:
    """Rewrite a notebook without outputs or execution counts, in nbformat's canonical JSON."""
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, str(path))


def generate(
    lectures: list[str],
    solutions: Path,
    workdir: Path,
    workers: int = 1,
    extra: dict[str, list[dict]] | None = None,
) -> dict[str, Path]:
    """Generate the learner version of ``lectures`` under ``workdir``; lecture → its release folder.

    ``extra`` (lecture → instructor's extra tests, see ``grade.load_extra_tests``) appends
    graded cells to the scratch copy of the source, so the gradebook knows them.
    """
    tasks = []
    for lecture in lectures:
        root = Path(workdir) / lecture
        shutil.copytree(
            Path(solutions) / lecture,
            root / SOURCE_DIRNAME / lecture,
            ignore=shutil.ignore_patterns(*IGNORE),
        )
        if extra and extra.get(lecture):
            from .grade import append_extra_cells

            append_extra_cells(root / SOURCE_DIRNAME / lecture / f"{lecture}.ipynb", extra[lecture])
        tasks.append({"op": "generate", "root": str(root), "lecture": lecture})
    results = run_tasks(tasks, grading=False, wall_timeout=300, workers=workers)
    out = {}
    for lecture, task, result in zip(lectures, tasks, results, strict=True):
        if result.get("status") != "ok":
            raise ReleaseError(f"release of {lecture} failed: {result.get('message', '?')}")
        released = Path(task["root"]) / RELEASE_DIRNAME / lecture
        for nb in released.rglob("*.ipynb"):
            canonical_notebook(nb)
        out[lecture] = released
    return out


def release(lectures: list[str], solutions: Path = SOLUTIONS, course: Path = COURSE) -> list[Path]:
    """Regenerate ``course/<lecture>`` for each lecture; returns the folders written."""
    written = []
    with tempfile.TemporaryDirectory(prefix="tlab-release-") as tmp:
        generated = generate(lectures, solutions, Path(tmp))
        for lecture, src in generated.items():
            dest = Path(course) / lecture
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*IGNORE))
            written.append(dest)
    return written


def _tree(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    skip = shutil.ignore_patterns(*IGNORE)
    files = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(skip(str(p.parent), [p.name]) for p in [folder / part for part in rel.parts]):
            continue
        if path.is_file():
            files.add(str(rel))
    return files


def compare(fresh: Path, committed: Path) -> list[str]:
    """How ``committed`` (a lecture folder of course/) differs from ``fresh`` (its new release)."""
    if not committed.is_dir():
        return [f"{committed} is missing (run `make release`)"]
    a, b = _tree(fresh), _tree(committed)
    problems = [f"{committed / f} is missing" for f in sorted(a - b)]
    problems += [f"{committed / f} is not generated from solutions/" for f in sorted(b - a)]
    for f in sorted(a & b):
        if not filecmp.cmp(fresh / f, committed / f, shallow=False):
            problems.append(f"{committed / f} differs from a fresh release")
    return problems


def differences(lectures: list[str], solutions: Path = SOLUTIONS, course: Path = COURSE) -> list[str]:
    """How the committed ``course/`` differs from a fresh release (empty when it is up to date)."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="tlab-check-") as tmp:
        generated = generate(lectures, solutions, Path(tmp))
        for lecture, fresh in generated.items():
            problems += compare(fresh, Path(course) / lecture)
    return problems
