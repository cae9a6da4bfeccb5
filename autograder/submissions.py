"""Find the students' notebooks in a folder of submissions.

Accepted layouts (one subfolder per student; the folder name is the student id):

* ``SUBMISSIONS/<student>/<NN_topic>/<NN_topic>.ipynb`` (nbgrader's ``submitted/`` layout)
* ``SUBMISSIONS/<student>/<NN_topic>.ipynb``

A student id is letters, digits and ``. _ - @`` (so it can name a folder and a CSV
row); folders starting with ``.`` or ``_`` are ignored. When a student has both
layouts for a lecture, the nested one wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .course import UsageError

STUDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")

LAYOUTS = ("<student>/<NN_topic>/<NN_topic>.ipynb", "<student>/<NN_topic>.ipynb")


@dataclass(frozen=True)
class Submission:
    student: str
    lecture: str
    notebook: Path


def find_submissions(
    folder: Path, lectures: list[str], warnings: list[str] | None = None
) -> list[Submission]:
    """Every (student, lecture) notebook in ``folder`` for ``lectures``, sorted by student then lecture.

    Raises :class:`UsageError` when ``folder`` is not a folder or holds no notebook
    of these lectures in an accepted layout. Folders that cannot be a student id
    are skipped with a line in ``warnings``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(
            f"submissions folder {folder} does not exist: expected a folder with one "
            "subfolder per student"
        )
    if not folder.is_dir():
        raise UsageError(
            f"submissions must be a folder with one subfolder per student; got the file {folder}"
        )
    found: list[Submission] = []
    seen_entries = []
    for child in sorted(folder.iterdir()):
        seen_entries.append(child.name + ("/" if child.is_dir() else ""))
        if not child.is_dir() or child.name.startswith((".", "_")):
            continue
        if not STUDENT_RE.match(child.name):
            if warnings is not None:
                warnings.append(
                    f"skipped {child}: a student id is letters, digits and . _ - @"
                )
            continue
        for lecture in lectures:
            nested = child / lecture / f"{lecture}.ipynb"
            flat = child / f"{lecture}.ipynb"
            path = nested if nested.is_file() else flat if flat.is_file() else None
            if path is not None:
                found.append(Submission(child.name, lecture, path))
    if not found:
        shown = ", ".join(seen_entries[:5]) + (", ..." if len(seen_entries) > 5 else "")
        raise UsageError(
            f"no notebooks of {', '.join(lectures)} in {folder}: expected "
            f"{' or '.join(LAYOUTS)}; found {shown or 'an empty folder'}"
        )
    return found
