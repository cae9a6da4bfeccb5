"""``python -m autograder grade``: autograde a class, write feedback, a CSV of scores and a report.

The grading workspace (``--out``, never inside ``solutions/`` or ``course/``)::

    OUT/
      .autograder-workspace.json        marker: course id and lectures (checked on every run)
      state.json                        every grade so far, with the hash of the notebook it graded
      scores.csv                        one row per (student, lecture), rendered from state.json
      feedback/<student>/<NN_topic>.html
      report/                           class report (report.md, PNGs, summary.json)
      grading.log                       what nbgrader said
      work/<NN_topic>/_release/         generate_assignment ran here (its gradebook
                                        is the template for every submission)
      work/<NN_topic>/<student>/        one nbgrader root per submission: its own
                                        gradebook copy, submitted/, autograded/,
                                        feedback/, result.json

Resumable: a submission is graded again only when its notebook's bytes changed, or
when what grades it changed (the lecture's source, ``--extra-tests``, the secret,
the limits). Grades are never dropped: rows of students absent from this run stay.
``state.json``, ``scores.csv`` and each feedback page are replaced atomically at the
end, so an interrupted run leaves the previous results as they were.

Each submission is graded in its own root, so submissions cannot disturb each
other and workers can run side by side. Notebooks run with
``TRANSFORMER_LAB_GRADING=1`` (claim checks and widgets shrink, exercise tests
run in full) and a per-cell timeout (``ExecutePreprocessor.timeout``).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from .course import (
    COURSE,
    COURSE_ID,
    DEFAULT_OUT,
    DEFAULT_TIMEOUT,
    HIDDEN_TESTS_FILE,
    IGNORE,
    SECRET_ENV,
    SOLUTIONS,
    UsageError,
    lectures_in,
    resolve_lectures,
)
from .release import generate
from .runner import run_tasks
from .submissions import Submission, extract_zip, find_submissions, lecture_cell_ids

MARKER = ".autograder-workspace.json"
STATE = "state.json"
#: Bump when grading itself changes, so every workspace regrades once.
GRADER_VERSION = 3


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
    failures: list[dict] = field(default_factory=list)  # failed test cells (for the report)


@dataclass
class Report:
    rows: list[Row]
    exercises: dict[str, list[Exercise]]  # lecture → graded cells in notebook order
    csv_path: Path
    out: Path
    warnings: list[str] = field(default_factory=list)
    graded: list[tuple[str, str]] = field(default_factory=list)  # (student, lecture) graded this run
    found: list[tuple[str, str]] = field(default_factory=list)  # (student, lecture) handed in this run
    report_path: Path | None = None

    def row(self, student: str, lecture: str) -> Row:
        return next(r for r in self.rows if r.student == student and r.lecture == lecture)


# --------------------------------------------------------------------------- small helpers


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


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the usual file mode instead
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _folder_hash(folder: Path) -> str:
    skip = shutil.ignore_patterns(*IGNORE)
    parts: list[bytes | str] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(skip("", [p]) for p in rel.parts):
            parts += [rel.as_posix(), path.read_bytes()]
    return _sha(*parts)


def read_secret(secret_file: Path | None) -> str | None:
    """The course secret: ``--secret-file`` (first line), else env ``TRANSFORMER_LAB_SECRET``."""
    if secret_file is None:
        return os.environ.get(SECRET_ENV) or None
    path = Path(secret_file)
    if not path.is_file():
        raise UsageError(f"--secret-file {path} does not exist: expected a file holding the course secret")
    from .course import REPO

    if _inside(path, REPO):
        raise UsageError(
            f"--secret-file {path} is inside the repository {REPO}: expected a file outside it "
            "(the repository is public)"
        )
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    if not lines or not lines[0].strip():
        raise UsageError(f"--secret-file {path} is empty: expected the course secret on its first line")
    return lines[0].strip()


# --------------------------------------------------------------------------- extra tests

GRADE_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
#: The source of an extra test's cell: the test itself runs outside the kernel.
EXTRA_SOURCE = ("# An extra hidden test of your instructor's: the grader runs `{function}` on fresh\n"
                "# inputs outside your notebook; its result appears below when graded.")


def load_extra_tests(folder: Path | None, known: list[str]) -> dict[str, list[dict]]:
    """``DIR/<NN_topic>.py`` files → lecture → extra graded cells
    (``{"grade_id", "points", "source", "path"}``).

    Each file is a hidden-tests file (``autograder/hidden.py``, like a lecture's own
    ``solutions/NN_topic/hidden_tests.py``) whose tests name new cells and their points:
    ``HiddenTest(cell="my_scores_long", points=2, function="attention_scores", ...)``.
    Each becomes a locked graded cell at the end of the lecture, decided outside the
    learner's kernel like every hidden test.
    """
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(
            f"--extra-tests {folder} is not a folder: expected a folder of <NN_topic>.py files"
        )
    from .hidden import HiddenTestSpecError, load_tests

    extras: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.py")):
        lecture = path.stem
        if lecture not in known:
            raise UsageError(
                f"--extra-tests file {path.name} names no lecture: expected <NN_topic>.py with "
                f"NN_topic one of {', '.join(known)}"
            )
        if re.search(r"^# %%", path.read_text(encoding="utf-8"), re.MULTILINE):
            raise UsageError(
                f"{path}: '# %% <grade_id>' cells ran in the learner's kernel, where they can be "
                "gamed: expected a hidden-tests file (TESTS = [HiddenTest(cell=..., points=..., ...)]; "
                "see autograder/README.md, section 5)"
            )
        try:
            tests = load_tests(path)
        except HiddenTestSpecError as exc:
            raise UsageError(f"--extra-tests {path.name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the instructor's file: one line
            raise UsageError(f"--extra-tests {path.name} could not be loaded: {type(exc).__name__}: {exc}") from None
        cells = []
        for t in tests:
            if not GRADE_ID_RE.match(t.cell):
                raise UsageError(f"{path}: cell {t.cell!r}: expected a grade id of letters, digits, _ and -")
            if t.points is None or t.points <= 0:
                raise UsageError(f"{path}: {t.cell}: expected points=N (N > 0) for an extra test")
            cells.append({"grade_id": t.cell, "points": float(t.points), "path": str(path),
                          "source": EXTRA_SOURCE.format(function=t.function)})
        if cells:
            extras[lecture] = cells
    if not extras:
        raise UsageError(f"--extra-tests {folder} holds no tests: expected <NN_topic>.py files with TESTS")
    return extras


def extra_cell(test: dict) -> nbformat.NotebookNode:
    """An nbgrader test cell (locked, graded) for one extra test."""
    cell = nbformat.v4.new_code_cell(test["source"])
    cell.id = re.sub(r"[^A-Za-z0-9-]", "-", test["grade_id"])[:64]
    cell.metadata["nbgrader"] = {
        "grade": True,
        "grade_id": test["grade_id"],
        "locked": True,
        "points": test["points"],
        "schema_version": 3,
        "solution": False,
        "task": False,
    }
    return cell


def append_extra_cells(notebook: Path, tests: list[dict]) -> None:
    """Append the extra test cells to a notebook (replacing cells with the same grade ids)."""
    nb = nbformat.read(str(notebook), as_version=4)
    ids = {t["grade_id"] for t in tests}
    nb.cells = [
        c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") not in ids
    ]
    nb.cells += [extra_cell(t) for t in tests]
    nbformat.write(nb, str(notebook))


# --------------------------------------------------------------------------- the workspace


def check_workspace(out: Path, known: list[str]) -> dict:
    """Refuse an ``--out`` that is not this course's workspace; return its state (empty if new)."""
    marker = out / MARKER
    if not out.exists():
        return {}
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file: expected a grading workspace folder")
    if not marker.is_file():
        if any(out.iterdir()):
            raise UsageError(
                f"--out {out} is not empty and is not an autograder workspace (no {MARKER}): "
                "expected a new or empty folder, or the --out of an earlier run"
            )
        return {}
    try:
        info = json.loads(marker.read_text())
        course, lectures = info["course"], list(info["lectures"])
    except Exception:  # noqa: BLE001
        raise UsageError(f"--out {out}: {MARKER} is unreadable: expected a workspace written by autograder") from None
    if course != COURSE_ID:
        raise UsageError(
            f"--out {out} is a workspace of course {course!r}: expected one of {COURSE_ID!r} (use another --out)"
        )
    foreign = [lec for lec in lectures if lec not in known]
    if foreign:
        raise UsageError(
            f"--out {out} holds grades of lectures {', '.join(foreign)}: expected a workspace of "
            f"{', '.join(known)} (another course's solutions? use another --out)"
        )
    state_file = out / STATE
    if not state_file.is_file():
        return {}
    try:
        return json.loads(state_file.read_text())
    except Exception:  # noqa: BLE001
        raise UsageError(f"--out {out}: {STATE} is unreadable: expected the state of an earlier run") from None


def _row_to_json(row: Row) -> dict:
    d = asdict(row)
    d["feedback"] = str(row.feedback) if row.feedback else None
    return d


def _row_from_json(d: dict) -> Row:
    d = dict(d)
    d["feedback"] = Path(d["feedback"]) if d.get("feedback") else None
    return Row(**d)


# --------------------------------------------------------------------------- grading


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
            first = str(err.get("evalue", "")).strip().splitlines()[:1]
            note = f"{err['cell']}: {err['ename']}" + (f" ({first[0][:160]})" if first else "")
        else:
            continue
        if note not in parts:
            parts.append(note)
    for note in result.get("notes", []):  # the sandbox's words: killed processes, cut output, tampering
        if note not in parts:
            parts.append(note)
    if result.get("feedback_error"):
        parts.append(f"feedback not written: {result['feedback_error']}")
    return "; ".join(parts)


#: How the hidden tests' verdict starts (autograder.hidden.PREFIX; not imported: it pulls in torch).
HIDDEN_PREFIX = "hidden test"


def _failures(autograded: Path) -> list[dict]:
    """The failed graded cells of an autograded notebook: cell, error kind, message, and
    whether the error came from the hidden tests (their verdict) or the visible ones."""
    try:
        nb = nbformat.read(str(autograded), as_version=4)
    except Exception:  # noqa: BLE001
        return []
    found = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.get("cell_type") != "code" or not meta.get("grade"):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") != "error":
                continue
            # the hidden tests' verdict is an output of its own (autograder/hidden.py)
            part = "hidden" if str(out.get("evalue", "")).startswith(HIDDEN_PREFIX) else "visible"
            evalue = str(out.get("evalue", "")).strip().splitlines()
            found.append(
                {
                    "cell": meta.get("grade_id", "?"),
                    "ename": out.get("ename", "") or "Error",
                    "evalue": (evalue[0] if evalue else "")[:200],
                    "part": part,
                }
            )
    return found


def _prepare(sub: Submission, work: Path, timeout: int, extra: list[dict]) -> dict:
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
    notebook = dest / f"{sub.lecture}.ipynb"
    shutil.copyfile(sub.notebook, notebook)
    if extra:
        try:
            append_extra_cells(notebook, extra)
        except Exception:  # noqa: BLE001 - not a notebook: nbgrader reports it
            pass
    return {
        "op": "grade",
        "root": str(root),
        "lecture": sub.lecture,
        "student": sub.student,
        "timeout": int(timeout),
        "hidden": [str(p) for p in sorted((template / "hidden").glob("*.py"))],
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
    return Row(
        student, lecture, scores, sum(scores.values()), max_total, "graded", _notes(result), feedback
    )


def _progress(roots: list[Path], stop: threading.Event, enabled: bool | None) -> None:
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled  # None: only on a terminal
    with tqdm(total=len(roots), desc="grading", unit="notebook", disable=disable) as bar:
        done = 0
        while True:
            now = sum((r / "result.json").exists() for r in roots)
            if now > done:
                bar.update(now - done)
                done = now
            if stop.wait(0.5):
                now = sum((r / "result.json").exists() for r in roots)
                bar.update(now - done)
                return


def _run(tasks, *, wall_timeout, log_file, workers, secret, limits, progress, cluster=None, budgets=None):
    """run_tasks with the course secret in the environment the workers inherit, and a progress bar;
    with ``cluster`` (``--scheduler``: its client and code fingerprint), the tasks are graded on
    that Dask cluster instead (``autograder/cluster.py``), the secret travelling in each task."""
    kwargs = {}
    if limits is not None and "limits" in inspect.signature(run_tasks).parameters:
        kwargs["limits"] = limits
    saved = os.environ.get(SECRET_ENV)
    if secret is not None:
        os.environ[SECRET_ENV] = secret
    stop = threading.Event()
    bar = threading.Thread(
        target=_progress, args=([Path(t["root"]) for t in tasks], stop, progress), daemon=True
    )
    bar.start()
    try:
        if cluster is not None:
            from .cluster import run_on_cluster

            return run_on_cluster(cluster["client"], tasks, budgets=budgets, secret=secret, limits=limits,
                                  log_file=log_file, fingerprint=cluster.get("fingerprint"))
        return run_tasks(
            tasks, grading=True, wall_timeout=wall_timeout, log_file=log_file, workers=workers, **kwargs
        )
    finally:
        stop.set()
        bar.join()
        if saved is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = saved


def make_limits(timeout: int, notebook_timeout: int | None = None, memory_gb: float | None = None,
                output_mb: float | None = None):
    """The isolation's :class:`autograder.sandbox.Limits` (defaults, then ``AUTOGRADER_*`` variables,
    then these options), or None where this checkout has no sandbox."""
    for name, value in (("--notebook-timeout", notebook_timeout), ("--memory", memory_gb), ("--max-output", output_mb)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be a positive number; got {value:g}")
    try:
        from .sandbox import Limits
    except ImportError:
        return None
    return Limits.from_env(
        cell_timeout=int(timeout),
        notebook_timeout=notebook_timeout,
        memory_bytes=int(memory_gb * 1024**3) if memory_gb else None,
        output_bytes=int(output_mb * 1024**2) if output_mb else None,
    )


def grade(
    submissions: Path,
    lecture: str | None = "all",
    out: Path | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    solutions: Path = SOLUTIONS,
    course: Path = COURSE,
    workers: int | None = None,
    secret: str | None = None,
    extra_tests: Path | None = None,
    limits=None,
    force: bool = False,
    progress: bool | None = False,
    report: bool = True,
    scheduler: str | None = None,
) -> Report:
    """Grade the class in ``submissions`` (folder, .zip or one notebook) into the workspace ``out``.

    Returns the report of the whole workspace (rows of earlier runs included);
    ``Report.graded`` lists what this run graded. Everything is checked before
    the workspace is touched; bad input raises :class:`UsageError`. ``scheduler``: the
    address (or scheduler file) of a ``dask.distributed`` cluster whose workers grade the
    submissions (``autograder/cluster.py``); it is reached before anything is written.
    """
    if timeout is None or timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds; got {timeout}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers must be at least 1; got {workers}")
    limits = make_limits(timeout) if limits is None else limits
    solutions = Path(solutions)
    known = lectures_in(solutions)
    lectures = resolve_lectures(lecture, solutions)
    out = Path(out) if out is not None else DEFAULT_OUT
    for protected in (solutions, Path(course)):
        if _inside(out, protected):
            raise UsageError(f"--out must be outside {protected}; got {out}")
    out = out.resolve()
    state = check_workspace(out, known)
    extras = load_extra_tests(extra_tests, known)
    for lec, tests in extras.items():
        have = lecture_cell_ids(solutions, [lec])[lec]
        seen: set[str] = set()
        for t in tests:
            if t["grade_id"] in have or t["grade_id"] in seen:
                raise UsageError(
                    f"--extra-tests {lec}.py: grade id {t['grade_id']!r} is already used: expected new ids"
                )
            seen.add(t["grade_id"])
    warnings: list[str] = []
    submissions = Path(submissions)
    with tempfile.TemporaryDirectory(prefix="tlab-subs-") as unzip:
        if submissions.is_file() and submissions.suffix.lower() == ".zip":
            folder = extract_zip(submissions, Path(unzip))
        else:
            folder = submissions
        ids = lecture_cell_ids(solutions, lectures)
        subs = find_submissions(folder, lectures, warnings, ids)
        cluster = None
        if scheduler is not None:  # reached (with workers running this code) before any write
            from .cluster import check_workers, connect

            cluster = {"client": connect(scheduler)}
        try:
            if cluster is not None:
                cluster["fingerprint"] = check_workers(cluster["client"])
            return _grade(
                subs, lecture, lectures, known, out, state, timeout, solutions, workers, secret,
                extras, limits, force, progress, report, warnings, cluster,
            )
        finally:
            if cluster is not None:
                cluster["client"].close()


def _grade(subs, lecture, lectures, known, out, state, timeout, solutions, workers, secret,
           extras, limits, force, progress, report, warnings, cluster=None) -> Report:
    if lecture in (None, "", "all"):  # only the lectures somebody handed in
        lectures = [lec for lec in lectures if any(s.lecture == lec for s in subs)]
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    old_lectures = state.get("lectures", {})
    marker_lectures = sorted(set(old_lectures) | set(lectures))
    _atomic_write(out / MARKER, json.dumps({"course": COURSE_ID, "lectures": marker_lectures}, indent=1))
    log_file = out / "grading.log"

    # what grades a lecture: its source, its extra tests, the secret, the limits
    secret_digest = _sha("tlab-secret", secret) if secret else "public"
    keys = {
        lec: _sha(
            str(GRADER_VERSION), _folder_hash(solutions / lec), _hidden_files_hash(solutions / lec, extras.get(lec)),
            json.dumps(extras.get(lec, [])), secret_digest, str(timeout), repr(limits),
        )
        for lec in lectures
    }

    # 1. the gradebook template of each lecture whose key changed (or that has none yet)
    stale = [
        lec for lec in lectures
        if force or old_lectures.get(lec, {}).get("key") != keys[lec]
        or not (work / lec / "_release" / "gradebook.db").is_file()
    ]
    shutil.rmtree(work / "_release_tmp", ignore_errors=True)  # left by an interrupted run
    exercises = {lec: [Exercise(*e) for e in info["exercises"]] for lec, info in old_lectures.items()}
    if stale:
        released = generate(stale, solutions, work / "_release_tmp", workers, extra=extras)
        for lec, release_dir in released.items():
            template = work / lec / "_release"
            if template.exists():
                shutil.rmtree(template)
            shutil.move(str(release_dir.parent.parent), str(template))
            shutil.rmtree(template / "solutions")  # the gradebook holds what grading needs
            _copy_hidden_files(solutions / lec, extras.get(lec), template / "hidden")
            exercises[lec] = graded_cells(template / "course" / lec / f"{lec}.ipynb")
        shutil.rmtree(work / "_release_tmp", ignore_errors=True)

    # 2. one nbgrader root per submission that changed
    records = dict(state.get("graded", {}))
    todo = []
    hashes = {}
    for sub in subs:
        h = _sha(sub.notebook.read_bytes())
        hashes[(sub.student, sub.lecture)] = h
        old = records.get(f"{sub.lecture}/{sub.student}")
        if force or sub.lecture in stale or old is None or old.get("hash") != h or old.get("key") != keys[sub.lecture]:
            todo.append(sub)
    tasks = [_prepare(sub, work, timeout, extras.get(sub.lecture, [])) for sub in todo]
    results = []
    if tasks:
        n_cells = {lec: _n_code_cells(work / lec / "_release" / "course" / lec) for lec in lectures}
        # every cell, and as much again for the hidden tests (one per graded cell at most)
        budgets = [timeout * (2 * n_cells[s.lecture] + 2) + 120 for s in todo]
        results = _run(
            tasks, wall_timeout=sum(budgets), log_file=log_file, workers=workers, secret=secret,
            limits=limits, progress=progress, cluster=cluster, budgets=budgets,
        )

    # 3. rows and feedback of what was graded; "missing" only where there is no grade yet
    feedback_files = {}
    for sub, result in zip(todo, results, strict=True):
        row = _row(sub.student, sub.lecture, exercises[sub.lecture], result, out)
        if result.get("status") == "ok":
            root = work / sub.lecture / sub.student
            row.failures = _failures(root / "autograded" / sub.student / sub.lecture / f"{sub.lecture}.ipynb")
        if row.feedback is not None:
            feedback_files[row.feedback] = Path(result["feedback"]).read_bytes()
        records[f"{sub.lecture}/{sub.student}"] = {
            # a grade the grader itself could not give (a Dask cluster that lost it): no hash,
            # so the next run grades it again
            "hash": None if result.get("retry") else hashes[(sub.student, sub.lecture)],
            "key": keys[sub.lecture], "row": _row_to_json(row),
        }
    students = sorted({s.student for s in subs})
    for student in students:
        for lec in lectures:
            name = f"{lec}/{student}"
            if name not in records:
                row = _row(student, lec, exercises[lec], None, out)
                records[name] = {"hash": None, "key": keys[lec], "row": _row_to_json(row)}

    # 4. write: feedback pages, then the state, then the CSV and report (each atomically)
    for path, data in feedback_files.items():
        _atomic_write(path, data)
    all_lectures = [lec for lec in known if lec in exercises]
    new_state = {
        "course": COURSE_ID,
        "lectures": {
            lec: {"key": keys.get(lec, old_lectures.get(lec, {}).get("key")),
                  "exercises": [[e.grade_id, e.points] for e in exercises[lec]]}
            for lec in all_lectures
        },
        "graded": records,
    }
    _atomic_write(out / STATE, json.dumps(new_state, indent=1, sort_keys=True))
    rows = [_row_from_json(r["row"]) for r in records.values()]
    rows.sort(key=lambda r: (r.student, all_lectures.index(r.lecture) if r.lecture in all_lectures else 99))
    ordered = {lec: exercises[lec] for lec in all_lectures}
    csv_path = out / "scores.csv"
    write_csv(rows, ordered, csv_path)
    result = Report(rows, ordered, csv_path, out, warnings, [(s.student, s.lecture) for s in todo],
                    [(s.student, s.lecture) for s in subs])
    if report:
        from .report import write_report

        result.report_path = write_report(result, out / "report")
    return result


def _hidden_files(source: Path, extra: list[dict] | None) -> list[tuple[str, Path]]:
    """(name in the template, path) of a lecture's hidden-test files: its own, then the extra ones."""
    files = [("hidden_tests.py", source / HIDDEN_TESTS_FILE)] if (source / HIDDEN_TESTS_FILE).is_file() else []
    paths = sorted({t["path"] for t in extra or [] if t.get("path")})
    files += [(f"extra_tests_{i}.py", Path(p)) for i, p in enumerate(paths)]
    return files


def _hidden_files_hash(source: Path, extra: list[dict] | None) -> str:
    return _sha(*[part for name, path in _hidden_files(source, extra) for part in (name, path.read_bytes())])


def _copy_hidden_files(source: Path, extra: list[dict] | None, dest: Path) -> None:
    """Put the hidden-test files where the workers read them (the workspace: no kernel sees it)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    os.chmod(dest, 0o700)
    for name, path in _hidden_files(source, extra):
        shutil.copyfile(path, dest / name)


def _n_code_cells(folder: Path) -> int:
    return sum(
        sum(1 for c in nbformat.read(str(nb), as_version=4).cells if c.cell_type == "code")
        for nb in folder.glob("*.ipynb")
    )


def write_csv(rows: list[Row], exercises: dict[str, list[Exercise]], path: Path) -> None:
    """``student, lecture, <one column per graded cell>, total, max, status, notes`` (atomically)."""
    columns = [e.grade_id for lec in exercises for e in exercises[lec]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["student", "lecture", *columns, "total", "max", "status", "notes"])
    for r in rows:
        cells = [_num(r.scores[c]) if c in r.scores else "" for c in columns]
        writer.writerow([r.student, r.lecture, *cells, _num(r.total), _num(r.max), r.status, r.notes])
    _atomic_write(Path(path), buf.getvalue())


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


__all__ = ["grade", "graded_cells", "write_csv", "read_secret", "load_extra_tests", "Report", "Row", "Exercise", "IGNORE"]
