"""The nbgrader round trip on the real lectures in solutions/ (every NN_topic found there).

Two expensive things are shared by every test in this file (module-scoped):

* ``fresh``: one nbgrader release of every lecture into a temporary folder;
* ``graded``: one class, graded by the real command's code path with a short
  per-cell timeout, in which every student hands in every lecture:

  ===========  =============================================================
  instructor   the solutions notebook as it is (nested layout)
  untouched    the learner notebook as released (flat layout)
  hostile      the solutions, where every exercise but the last whose hidden
               tests block a reference leans on that reference (from
               ``solutions/NN_topic/hidden_tests.py``), and the last exercise's
               body is ``return None`` (a wrong answer), in the first lecture an
               infinite loop instead (flat layout)
  ===========  =============================================================

The learner notebooks' own run is checked on the ``untouched`` student's graded
copy; ``--runslow`` also executes them in normal mode (full claim checks).

Each exercise is graded on its own, so the hostile student's exercises are
checked one by one. The infinite loop is one lecture's only: stopping it is the
grader's doing, the same for every lecture, and each loop costs the cell limit
(20 s) of grading time. On a busy 2-core machine the file takes about 20 s per
lecture.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nbformat
import pytest
from _nbedit import (
    BEGIN,
    cheat_body,
    exercises,
    graded_points,
    read,
    solution_lines,
    submission,
    write,
)
from autograder.course import COURSE, SOLUTIONS, lectures_in
from autograder.grade import grade
from autograder.release import compare, generate
from nbclient import NotebookClient

LECTURES = lectures_in(SOLUTIONS)
TIMEOUT = 20  # seconds per cell while grading here: far above any lecture cell in grading mode
LOOP_LECTURE = LECTURES[0] if LECTURES else None  # the lecture whose last exercise never returns

pytestmark = pytest.mark.skipif(not LECTURES, reason="no lectures in solutions/ yet")


def _solution(lecture: str) -> Path:
    return SOLUTIONS / lecture / f"{lecture}.ipynb"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    """lecture → its freshly generated learner notebook folder."""
    return generate(LECTURES, SOLUTIONS, tmp_path_factory.mktemp("release"), workers=2)


@pytest.fixture(scope="module")
def plan() -> dict[str, dict]:
    """What each edited submission changes, per lecture."""
    out = {}
    for lecture in LECTURES:
        nb = read(_solution(lecture))
        exs = exercises(nb, SOLUTIONS / lecture / "hidden_tests.py")
        assert exs, f"{lecture} has no exercise (solution cell with {BEGIN})"
        cheats = {ex.grade_id: cheat_body(nb, ex) for ex in exs[:-1]}
        cheats = {k: v for k, v in cheats.items() if v is not None}
        out[lecture] = {"nb": nb, "exercises": exs, "last": exs[-1], "cheats": cheats}
    return out


@pytest.fixture(scope="module")
def graded(fresh, plan, tmp_path_factory):
    subs = tmp_path_factory.mktemp("submissions")
    for lecture in LECTURES:
        p = plan[lecture]
        nb, last = p["nb"], p["last"]
        write(nb, subs / "instructor" / lecture / f"{lecture}.ipynb")
        write(read(fresh[lecture] / f"{lecture}.ipynb"), subs / "untouched" / f"{lecture}.ipynb")
        by_id = {ex.grade_id: ex for ex in p["exercises"]}
        edits = {by_id[g].cell: body for g, (body, _) in p["cheats"].items()}
        edits[last.cell] = ("while True:  # never returns\n    pass" if lecture == LOOP_LECTURE
                            else "return None  # a wrong answer")
        write(submission(nb, edits), subs / "hostile" / f"{lecture}.ipynb")
    out = tmp_path_factory.mktemp("grades")
    return grade(subs, "all", out=out, timeout=TIMEOUT, workers=2)


def _public_lines(nb) -> list[str]:
    """Lines of the solutions notebook outside solution regions."""
    lines, inside = [], False
    for cell in nb.cells:
        for ln in cell.source.splitlines():
            if BEGIN in ln:
                inside = True
            elif "### END SOLUTION" in ln:
                inside = False
            elif not inside:
                lines.append(ln)
    return lines


def _autograded(report, student: str, lecture: str):
    work = report.out / "work" / lecture / student
    return read(work / "autograded" / student / lecture / f"{lecture}.ipynb")


def _errors(report, student: str, lecture: str) -> dict[str, set[str]]:
    """grade id → the error names its cell raised in the autograded notebook."""
    nb = _autograded(report, student, lecture)
    found: dict[str, set[str]] = {}
    for cell in nb.cells:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                found.setdefault(gid, set()).add(o["ename"])
    return found


# --------------------------------------------------------------------------- release


@pytest.mark.parametrize("lecture", LECTURES)
def test_committed_course_equals_a_fresh_release(lecture, fresh):
    problems = compare(fresh[lecture], COURSE / lecture)
    assert not problems, "course/ is not what `make release` generates:\n" + "\n".join(problems)


@pytest.mark.parametrize("lecture", LECTURES)
def test_no_solution_or_hidden_test_in_course(lecture, fresh):
    source = read(_solution(lecture))
    secret = [ln.split("#")[0].strip() for ln in solution_lines(source)]
    secret = {ln for ln in secret if len(ln) >= 12}  # non-trivial lines only
    assert secret, f"{lecture}: found no solution lines to look for"
    # Lines the instructor also shows outside any solution region (teaching code that
    # an exercise builds on) are public on purpose; everything else must not appear.
    shown = {ln.split("#")[0].strip() for ln in _public_lines(source)}
    secret = sorted(secret - shown)
    folders = [fresh[lecture]] + ([COURSE / lecture] if (COURSE / lecture).is_dir() else [])
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            text = path.read_text(errors="replace")
            assert path.name != "hidden_tests.py", f"{path}: the hidden tests were released"
            assert path.name != "known_mistakes.py", f"{path}: the corpus of wrong answers was released"
            for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "HiddenTest("):
                assert marker not in text, f"{path} contains {marker!r}"
            code = "\n".join(
                c.source for c in nbformat.reads(text, as_version=4).cells
            ) if path.suffix == ".ipynb" else text
            leaked = [ln for ln in secret if ln in code]
            assert not leaked, f"{path} contains solution lines: {leaked[:5]}"


@pytest.mark.parametrize("lecture", LECTURES)
def test_run_all_goes_on_past_every_exercise_test(lecture, fresh):
    """JupyterLab's Run All stops at the first cell that raises, unless the cell is tagged
    ``raises-exception`` (it is then sent with ``stop_on_error`` off). An unsolved exercise's test
    cell raises, so every graded test cell of the released notebook carries the tag, or a learner
    who skips an exercise never sees the widget and the claim check after it. (nbclient, which
    the other tests execute with, goes on past errors either way: only the tag tells.)"""
    for folder in (fresh[lecture], COURSE / lecture):
        nb = read(folder / f"{lecture}.ipynb")
        tests = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")
                 and not c.metadata["nbgrader"].get("solution")]
        assert tests, f"{lecture}: no graded test cells"
        untagged = [c.metadata["nbgrader"]["grade_id"] for c in tests
                    if "raises-exception" not in c.metadata.get("tags", [])]
        assert not untagged, (f"{folder / lecture}.ipynb: Run All would stop at these test cells; tag "
                              f"them raises-exception in solutions/ and release again: {untagged}")


def _execute(path: str) -> str:
    """Run a notebook as a learner would (normal mode, errors allowed); the executed JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMER_LAB_GRADING"}
    os.environ.clear()
    os.environ.update(env)  # this runs in a pool process: its environment is its own
    nb = read(Path(path))
    NotebookClient(
        nb, timeout=300, allow_errors=True, kernel_name="python3",
        resources={"metadata": {"path": str(Path(path).parent)}},
    ).execute()
    return nbformat.writes(nb)


@pytest.fixture(scope="module")
def executed(fresh) -> dict[str, nbformat.NotebookNode]:
    """Every learner notebook executed, two at a time (they are independent)."""
    paths = [str(fresh[lec] / f"{lec}.ipynb") for lec in LECTURES]
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        texts = list(pool.map(_execute, paths))
    return {lec: nbformat.reads(t, as_version=4) for lec, t in zip(LECTURES, texts, strict=True)}


def _check_runs_to_the_end(lecture: str, nb) -> None:
    """Every error is in a graded test cell and is the exercise's own NotImplementedError,
    every test cell failed so, and the last code cell ran."""
    test_cells = set(graded_points(nb))
    errors = []
    for cell in nb.cells:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                errors.append((gid, o["ename"], o.get("evalue", "")))
    wrong = [e for e in errors if e[0] not in test_cells or e[1] != "NotImplementedError"]
    assert not wrong, f"{lecture}: cells failed other than with the exercise stubs: {wrong}"
    failed_tests = {e[0] for e in errors}
    assert failed_tests == test_cells, f"exercise tests that did not fail: {test_cells - failed_tests}"
    last = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()][-1]
    assert last.get("execution_count") is not None, "the notebook did not run to its last cell"


@pytest.mark.parametrize("lecture", LECTURES)
def test_learner_notebook_runs_to_the_end_failing_only_in_exercise_tests(lecture, graded):
    """The learner notebook as nbgrader executed it for the ``untouched`` student
    (nbclient, errors allowed, grading mode)."""
    _check_runs_to_the_end(lecture, _autograded(graded, "untouched", lecture))


@pytest.mark.slow
@pytest.mark.parametrize("lecture", LECTURES)
def test_learner_notebook_runs_to_the_end_in_normal_mode(lecture, executed):
    """The same, executed as a learner runs it: normal mode, full claim checks and widgets."""
    _check_runs_to_the_end(lecture, executed[lecture])


# --------------------------------------------------------------------------- grading a class


@pytest.mark.parametrize("lecture", LECTURES)
def test_instructor_solutions_score_full_marks(lecture, graded):
    row = graded.row("instructor", lecture)
    assert row.status == "graded", row.notes
    assert row.max > 0 and row.total == row.max, (row.scores, row.notes)
    assert row.feedback is not None and row.feedback.exists()


@pytest.mark.parametrize("lecture", LECTURES)
def test_untouched_notebook_scores_zero_everywhere_and_grading_completes(lecture, graded):
    row = graded.row("untouched", lecture)
    assert row.status == "graded", row.notes
    assert set(row.scores) == set(graded_points(read(_solution(lecture))))
    assert all(v == 0 for v in row.scores.values()), row.scores
    errors = _errors(graded, "untouched", lecture)
    assert all(errors.get(g) == {"NotImplementedError"} for g in row.scores), errors


@pytest.mark.parametrize("lecture", LECTURES)
def test_hostile_loses_exactly_the_wrong_and_the_cheating_exercises(lecture, graded, plan):
    """Every other exercise keeps its full points: each is graded on its own."""
    p = plan[lecture]
    by_id = {ex.grade_id: ex for ex in p["exercises"]}
    lost = set(p["last"].tests).union(*(by_id[g].tests for g in p["cheats"]))
    row = graded.row("hostile", lecture)
    full = graded_points(p["nb"])
    assert row.scores == {g: (0.0 if g in lost else pts) for g, pts in full.items()}
    assert row.total == row.max - sum(full[g] for g in lost)


@pytest.mark.parametrize("lecture", LECTURES)
def test_calling_the_reference_scores_zero_on_hidden_tests(lecture, graded, plan):
    p = plan[lecture]
    assert p["cheats"], f"{lecture}: no exercise but the last blocks its reference in hidden tests"
    row = graded.row("hostile", lecture)
    errors = _errors(graded, "hostile", lecture)
    by_id = {ex.grade_id: ex for ex in p["exercises"]}
    for gid in p["cheats"]:
        for test in by_id[gid].tests:
            assert row.scores[test] == 0, f"{test}: an answer calling the reference got points"
            # the visible tests passed; the hidden tests refused the reference
            assert errors.get(test) == {"ReferenceBlocked"}, (test, errors.get(test))
    honest = [
        t for ex in p["exercises"][:-1] if ex.grade_id not in p["cheats"] for t in ex.tests
    ]
    assert all(row.scores[t] > 0 for t in honest), row.scores


@pytest.mark.skipif(not LECTURES, reason="no lectures")
def test_infinite_loop_is_stopped_and_graded_zero(graded, plan):
    lecture = LOOP_LECTURE
    last = plan[lecture]["last"]
    row = graded.row("hostile", lecture)
    assert row.status == "graded", row.notes
    assert all(row.scores[t] == 0 for t in last.tests)
    errors = _errors(graded, "hostile", lecture)
    assert "CellTimeoutError" in set().union(*(errors.get(t, set()) for t in last.tests))
    assert "time limit" in row.notes


def test_the_class_csv_has_every_student_and_lecture(graded):
    text = graded.csv_path.read_text().splitlines()
    header = text[0].split(",")
    assert header[:2] == ["student", "lecture"] and header[-4:] == ["total", "max", "status", "notes"]
    students = {"instructor", "untouched", "hostile"}
    assert {tuple(r.split(",")[:2]) for r in text[1:]} == {(s, lec) for s in students for lec in LECTURES}
