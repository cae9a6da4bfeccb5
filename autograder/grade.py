"""``python -m autograder grade``: autograde a class, write feedback and a CSV of scores.

The grading workspace (``--out``, never inside ``solutions/`` or ``course/``)::

    OUT/
      scores.csv                        one row per (student, lecture)
      feedback/<student>/<NN_topic>.html
      grading.log                       what nbgrader said
      work/<NN_topic>/_release/         generate_assignment ran here (its gradebook
                                        is the template for every submission)
      work/<NN_topic>/<student>/        one nbgrader root per submission: its own
                                        gradebook copy, submitted/, autograded/,
                                        feedback/, result.json

Each submission is graded in its own root, so submissions cannot disturb each
other and workers can run side by side. Notebooks run with
``TRANSFORMER_LAB_GRADING=1`` (claim checks and widgets shrink, exercise tests
run in full) and a per-cell timeout (``ExecutePreprocessor.timeout``): a cell
that overruns is interrupted, counts as failed, and the notebook goes on.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .course import (
    COURSE,
    DEFAULT_OUT,
    DEFAULT_TIMEOUT,
    IGNORE,
    SOLUTIONS,
    UsageError,
    resolve_lectures,
)
from .release import generate
from .runner import run_tasks
from .submissions import Submission, find_submissions


@dataclass
class Exercise:
    grade_id: str
    points: float


@dataclass
class Row:
    """One (student, lecture) line of the scores CSV."""

    student: str
    lecture: str
    scores: dict[str, float]
    total: float
    max: float
    status: str  # "graded", "error", "missing"
    notes: str = ""
    feedback: Path | None = None


@dataclass
class Report:
    rows: list[Row]
    exercises: dict[str, list[Exercise]]  # lecture → graded cells in notebook order
    csv_path: Path
    out: Path
    warnings: list[str] = field(default_factory=list)

    def row(self, student: str, lecture: str) -> Row:
        return next(r for r in self.rows if r.student == student and r.lecture == lecture)


def graded_cells(notebook: Path) -> list[Exercise]:
    """The graded (test) cells of a notebook, in order, with their points."""
    nb = nbformat.read(str(notebook), as_version=4)
    cells = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade"):
            cells.append(Exercise(meta["grade_id"], float(meta.get("points", 0))))
    return cells


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _notes(result: dict) -> str:
    if result.get("status") != "ok":
        return result.get("message", "grading failed")
    parts: list[str] = []
    errors = result.get("errors", [])
    timed_out = {e["cell"] for e in errors if e["ename"] == "CellTimeoutError"}
    for err in errors:
        if err["cell"] in timed_out:
            note = f"{err['cell']}: stopped after the per-cell time limit"
        elif err.get("graded"):
            note = f"{err['cell']}: {err['ename']}"
        else:
            continue
        if note not in parts:
            parts.append(note)
    if result.get("feedback_error"):
        parts.append(f"feedback not written: {result['feedback_error']}")
    return "; ".join(parts)


def grade(
    submissions: Path,
    lecture: str | None = "all",
    out: Path | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    solutions: Path = SOLUTIONS,
    course: Path = COURSE,
    workers: int = 1,
) -> Report:
    """Grade every student's notebook(s) in ``submissions``; returns the report (CSV written)."""
    if timeout is None or timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds; got {timeout}")
    lectures = resolve_lectures(lecture, Path(solutions))
    warnings: list[str] = []
    subs = find_submissions(Path(submissions), lectures, warnings)
    if lecture in (None, "", "all"):  # only the lectures somebody handed in
        lectures = [lec for lec in lectures if any(s.lecture == lec for s in subs)]
    out = Path(out) if out is not None else DEFAULT_OUT
    for protected in (Path(solutions), Path(course)):
        if _inside(out, protected):
            raise UsageError(f"--out must be outside {protected}; got {out}")
    out = out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log_file = out / "grading.log"

    # 1. the gradebook template of each lecture (generate_assignment in a scratch root)
    shutil.rmtree(work / "_release_tmp", ignore_errors=True)  # left by an interrupted run
    released = generate(lectures, Path(solutions), work / "_release_tmp", workers) if lectures else {}
    exercises = {}
    for lec, release_dir in released.items():
        template = work / lec / "_release"
        if template.exists():
            shutil.rmtree(template)
        shutil.move(str(release_dir.parent.parent), str(template))
        shutil.rmtree(template / "solutions")  # the gradebook holds what grading needs
        exercises[lec] = graded_cells(template / "course" / lec / f"{lec}.ipynb")
    shutil.rmtree(work / "_release_tmp", ignore_errors=True)

    # 2. one nbgrader root per submission
    tasks, task_subs = [], []
    for sub in subs:
        tasks.append(_prepare(sub, work, timeout))
        task_subs.append(sub)
    n_cells = {lec: _n_code_cells(work / lec / "_release" / "course" / lec) for lec in lectures}
    budget = sum(timeout * (n_cells[s.lecture] + 2) + 120 for s in task_subs)
    results = run_tasks(
        tasks, grading=True, wall_timeout=budget, log_file=log_file, workers=workers
    )

    # 3. rows, feedback, CSV
    rows = []
    by_key = {(s.student, s.lecture): r for s, r in zip(task_subs, results, strict=True)}
    students = sorted({s.student for s in subs})
    for student in students:
        for lec in lectures:
            rows.append(_row(student, lec, exercises[lec], by_key.get((student, lec)), out))
    csv_path = out / "scores.csv"
    write_csv(rows, exercises, csv_path)
    return Report(rows, exercises, csv_path, out, warnings)


def _n_code_cells(folder: Path) -> int:
    return sum(
        sum(1 for c in nbformat.read(str(nb), as_version=4).cells if c.cell_type == "code")
        for nb in folder.glob("*.ipynb")
    )


def _prepare(sub: Submission, work: Path, timeout: int) -> dict:
    template = work / sub.lecture / "_release"
    root = work / sub.lecture / sub.student
    if root.exists():
        shutil.rmtree(root)
    dest = root / "submitted" / sub.student / sub.lecture
    dest.mkdir(parents=True)
    shutil.copy2(template / "gradebook.db", root / "gradebook.db")
    # the lecture's own non-notebook files, as released (nbgrader would copy them from source)
    released = template / "course" / sub.lecture
    for path in released.rglob("*"):
        if path.is_file() and path.suffix != ".ipynb":
            target = dest / path.relative_to(released)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    shutil.copyfile(sub.notebook, dest / f"{sub.lecture}.ipynb")
    return {
        "op": "grade",
        "root": str(root),
        "lecture": sub.lecture,
        "student": sub.student,
        "timeout": int(timeout),
    }


def _row(student: str, lecture: str, exercises: list[Exercise], result: dict | None, out: Path) -> Row:
    max_total = sum(e.points for e in exercises)
    zeros = {e.grade_id: 0.0 for e in exercises}
    if result is None:
        return Row(student, lecture, zeros, 0.0, max_total, "missing", "no notebook handed in")
    if result.get("status") != "ok":
        return Row(student, lecture, zeros, 0.0, max_total, "error", _notes(result))
    scores = {e.grade_id: float(result["scores"].get(e.grade_id, 0.0)) for e in exercises}
    feedback = None
    if result.get("feedback"):
        feedback = out / "feedback" / student / f"{lecture}.html"
        feedback.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["feedback"], feedback)
    return Row(
        student, lecture, scores, sum(scores.values()), max_total, "graded", _notes(result), feedback
    )


def write_csv(rows: list[Row], exercises: dict[str, list[Exercise]], path: Path) -> None:
    """``student, lecture, <one column per graded cell>, total, max, status, notes``."""
    columns = [e.grade_id for lec in exercises for e in exercises[lec]]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["student", "lecture", *columns, "total", "max", "status", "notes"])
        for r in rows:
            cells = [_num(r.scores[c]) if c in r.scores else "" for c in columns]
            writer.writerow(
                [r.student, r.lecture, *cells, _num(r.total), _num(r.max), r.status, r.notes]
            )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def load_results(out: Path) -> dict[tuple[str, str], dict]:
    """The raw worker results of a grading workspace, keyed by (student, lecture) (for reports)."""
    found = {}
    for result in Path(out, "work").glob("*/*/result.json"):
        student, lecture = result.parent.name, result.parent.parent.name
        if student != "_release":
            found[(student, lecture)] = json.loads(result.read_text())
    return found


__all__ = ["grade", "graded_cells", "write_csv", "Report", "Row", "Exercise", "IGNORE"]
