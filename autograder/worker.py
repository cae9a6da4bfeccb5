"""The process that runs nbgrader: ``python -m autograder.worker TASKS.json``.

The instructor's command never imports nbgrader itself. It writes a list of
tasks, each in its own scratch nbgrader root, and starts this worker with the
right environment (the interpreter's ``bin`` on PATH, because nbgrader runs
``alembic`` by name; ``TRANSFORMER_LAB_GRADING=1`` while grading). The worker
runs the tasks one after another and leaves, in each task's root:

* ``started``: written before the task runs (a root with ``started`` and no
  result means the worker died on that task);
* ``result.json``: what happened (``status`` "ok" or "error", scores, messages).

One worker grades a list of submissions sequentially; the parent can start
several workers on disjoint lists (one per core) because every task has its own
root and gradebook.

Task kinds:

``generate``: ``{"op": "generate", "root": R, "lecture": L}``. ``R/solutions/L``
    exists; runs ``generate_assignment`` into ``R/course/L`` and fills ``R/gradebook.db``.
``grade``: ``{"op": "grade", "root": R, "lecture": L, "student": S, "timeout": T}``.
    ``R/gradebook.db`` (from a ``generate`` task) and ``R/submitted/S/L/L.ipynb`` exist;
    runs ``autograde`` and ``generate_feedback``, and records per-cell scores
    and the errors the graded cells raised.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .course import COURSE_ID, config_file_text, nbgrader_config


def _api(root: Path, timeout: int | None = None):
    from nbgrader.apps.api import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    config = nbgrader_config(root, timeout)
    (root / "nbgrader_config.py").write_text(config_file_text(config))
    coursedir = CourseDirectory(config=config)
    return NbGraderAPI(coursedir=coursedir, config=config), config


def _log_tail(result: dict[str, Any], n: int = 20) -> str:
    text = (result.get("error") or "") + "\n" + (result.get("log") or "")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _generate(task: dict[str, Any]) -> dict[str, Any]:
    root = Path(task["root"])
    api, _ = _api(root)
    result = api.generate_assignment(task["lecture"], force=True, create=True)
    if not result.get("success"):
        return {
            "status": "error",
            "message": "generate_assignment failed: " + _error_line(result),
            "log": _log_tail(result, 60),
        }
    return {"status": "ok"}


_EXC_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b:?\s")


def _error_line(result: dict[str, Any]) -> str:
    """The most telling line of nbgrader's output: the first exception it logged
    (e.g. "ValidationError: Duplicate grade id: ex1"), else its last [ERROR] line."""
    lines = [ln.strip() for ln in (result.get("log") or "").splitlines() if ln.strip()]
    lines += [ln.strip() for ln in (result.get("error") or "").splitlines() if ln.strip()]
    generic = ("Please see the", "NbGraderException", "may be corrupted")
    named = [ln for ln in lines if _EXC_LINE.match(ln) and not any(g in ln for g in generic)]
    errors = [ln for ln in lines if ln.startswith("[ERROR]") and not any(g in ln for g in generic)]
    pick = (named or errors or lines or ["(nbgrader said nothing)"])[0 if named else -1]
    return pick if len(pick) <= 240 else pick[:237] + "..."


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _cell_errors(notebook_path: Path) -> list[dict[str, str]]:
    """The errors raised by the graded notebook's cells: grade id (or cell number), name, message."""
    import nbformat

    errors = []
    try:
        nb = nbformat.read(str(notebook_path), as_version=4)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        return [{"cell": "?", "ename": type(exc).__name__, "evalue": _first_line(exc)}]
    for i, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {})
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append(
                    {
                        "cell": meta.get("grade_id") or f"cell {i}",
                        "graded": bool(meta.get("grade")),
                        "ename": out.get("ename", ""),
                        "evalue": _first_line(out.get("evalue", "")),
                    }
                )
    return errors


def _grade(task: dict[str, Any]) -> dict[str, Any]:
    from nbgrader.api import Gradebook

    root = Path(task["root"])
    lecture, student = task["lecture"], task["student"]
    api, config = _api(root, task.get("timeout"))
    t0 = time.perf_counter()
    result = api.autograde(lecture, student, force=True, create=True)
    seconds = time.perf_counter() - t0
    if not result.get("success"):
        return {
            "status": "error",
            "message": "nbgrader autograde failed: " + _error_line(result),
            "log": _log_tail(result, 40),
            "seconds": seconds,
        }
    scores: dict[str, float] = {}
    max_scores: dict[str, float] = {}
    with Gradebook(config.CourseDirectory.db_url, COURSE_ID) as gb:
        submission = gb.find_submission(lecture, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                scores[grade.name] = float(grade.score or 0.0)
                max_scores[grade.name] = float(grade.max_score or 0.0)
    graded_nb = root / "autograded" / student / lecture / f"{lecture}.ipynb"
    errors = _cell_errors(graded_nb)
    feedback = api.generate_feedback(lecture, student, force=True)
    html = root / "feedback" / student / lecture / f"{lecture}.html"
    return {
        "status": "ok",
        "scores": scores,
        "max_scores": max_scores,
        "errors": errors,
        "feedback": str(html) if feedback.get("success") and html.exists() else None,
        "feedback_error": None if feedback.get("success") else _error_line(feedback),
        "seconds": seconds,
    }


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    root = Path(task["root"])
    (root / "started").write_text(str(time.time()))
    try:
        if task["op"] == "generate":
            result = _generate(task)
        elif task["op"] == "grade":
            result = _grade(task)
        else:
            result = {"status": "error", "message": f"unknown task {task['op']!r}"}
    except Exception as exc:  # noqa: BLE001 - one task's failure never stops the others
        result = {
            "status": "error",
            "message": f"{type(exc).__name__}: {_first_line(exc)}",
            "log": traceback.format_exc(),
        }
    (root / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m autograder.worker TASKS.json", file=sys.stderr)
        return 2
    tasks = json.loads(Path(argv[0]).read_text())
    for task in tasks:
        run_task(task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
