"""The instructor's command: ``python -m autograder`` (console script ``autograder``).

    python -m autograder release [--lecture NN_topic] [--check]
    python -m autograder grade SUBMISSIONS [--lecture NN_topic|all] [--out DIR] [--workers N]
        [--timeout SECONDS] [--notebook-timeout SECONDS] [--memory GB] [--max-output MB]
        [--secret-file PATH] [--extra-tests DIR] [--scheduler ADDRESS] [--force] [--no-progress]

SUBMISSIONS: a folder (per-student folders, nbgrader's submitted/, LMS downloads),
a .zip of one, or a single notebook (a learner's self-check).

Bad input (a missing folder, an unknown lecture, a student id twice, a workspace
of another course) is reported in one line naming what was expected and what
came, with exit status 2, before anything is graded or written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .course import (
    COURSE,
    DEFAULT_OUT,
    DEFAULT_TIMEOUT,
    SELFCHECK_OUT,
    SOLUTIONS,
    UsageError,
    lectures_in,
    resolve_lectures,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autograder",
        description="Release the learner notebooks and autograde a class (nbgrader).",
    )
    p.add_argument("--solutions", type=Path, default=SOLUTIONS, help=argparse.SUPPRESS)
    p.add_argument("--course", type=Path, default=COURSE, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="{release,grade}")

    r = sub.add_parser("release", help="regenerate course/ from solutions/")
    r.add_argument("--lecture", default="all", help="NN_topic, or all (default)")
    r.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if course/ differs from a fresh release",
    )

    g = sub.add_parser("grade", help="autograde a folder of submissions")
    g.add_argument(
        "submissions",
        type=Path,
        help="a folder of submissions (<student>/<NN_topic>.ipynb, nbgrader's submitted/, "
        "LMS downloads <id>_..._<NN_topic>.ipynb), a .zip of one, or one notebook",
    )
    g.add_argument("--lecture", default="all", help="NN_topic, or all (default)")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="grading workspace: scores.csv, feedback/, report/, work/ (default: "
        "autograder/_work/grades, or autograder/_work/selfcheck for one notebook; git-ignored)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="notebooks graded side by side (default: one per CPU core)",
    )
    g.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        help="file whose first line is the course secret seeding the hidden tests "
        "(default: env TRANSFORMER_LAB_SECRET); keep it outside the repository",
    )
    g.add_argument(
        "--extra-tests",
        type=Path,
        default=None,
        help="folder of <NN_topic>.py files with your own hidden tests (TESTS = [HiddenTest(cell=..., points=..., ...)])",
    )
    g.add_argument("--notebook-timeout", type=int, default=None,
                   help="seconds a whole notebook may run (default 600, or AUTOGRADER_NOTEBOOK_TIMEOUT)")
    g.add_argument("--memory", type=float, default=None, metavar="GB",
                   help="memory a student's kernel may use, in GiB (default 4, or AUTOGRADER_MEMORY_BYTES)")
    g.add_argument("--max-output", type=float, default=None, metavar="MB",
                   help="output kept per cell, in MiB (default 1, or AUTOGRADER_OUTPUT_BYTES)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="grade on the workers of a dask.distributed cluster: its scheduler's address "
                   "(tcp://host:port) or scheduler file (see the README, 'Grading on a Dask cluster')")
    g.add_argument("--force", action="store_true", help="grade every notebook again, changed or not")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--timeout",
        type=int,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a notebook cell may run before it is stopped (default {DEFAULT_TIMEOUT})",
    )
    return p


def _release(args) -> int:
    from .release import differences, release

    lectures = resolve_lectures(args.lecture, args.solutions)
    if args.check:
        problems = differences(lectures, args.solutions, args.course)
        for line in problems:
            print(line)
        if problems:
            print("course/ is out of date: run `make release`", file=sys.stderr)
            return 1
        print(f"course/ matches a fresh release of {', '.join(lectures)}")
        return 0
    t0 = time.perf_counter()
    written = release(lectures, args.solutions, args.course)
    for folder in written:
        print(f"released {folder}")
    stale = set(lectures_in_course(args.course)) - set(lectures_in(args.solutions))
    for name in sorted(stale):
        print(f"warning: {args.course / name} has no source in {args.solutions}", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def lectures_in_course(course: Path) -> list[str]:
    from .course import LECTURE_RE

    if not course.is_dir():
        return []
    return sorted(p.name for p in course.iterdir() if p.is_dir() and LECTURE_RE.match(p.name))


def _grade(args) -> int:
    from .grade import grade, make_limits, read_secret

    t0 = time.perf_counter()
    single = args.submissions.suffix == ".ipynb" and args.submissions.is_file()
    out = args.out if args.out is not None else (SELFCHECK_OUT if single else DEFAULT_OUT)
    report = grade(
        args.submissions,
        args.lecture,
        out=out,
        timeout=args.timeout,
        solutions=args.solutions,
        course=args.course,
        workers=args.workers,
        secret=read_secret(args.secret_file),
        extra_tests=args.extra_tests,
        force=args.force,
        limits=make_limits(args.timeout, args.notebook_timeout, args.memory, args.max_output),
        progress=False if args.no_progress else None,
        scheduler=args.scheduler,
    )
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if single:
        ((student, lecture),) = report.found
        r = report.row(student, lecture)
        for ex in report.exercises[lecture]:
            print(f"  {ex.grade_id:<40} {r.scores.get(ex.grade_id, 0):g}/{ex.points:g}")
        print(f"score:    {r.total:g}/{r.max:g} ({r.status}{', ' + r.notes if r.notes else ''})")
        for line in _failed_cells(report.out, student, lecture):
            print(line)
        print(f"feedback: {r.feedback or '(none written)'}")
        if not report.graded:
            print("(unchanged since the last check: not graded again)")
        return 0
    graded = set(report.graded)
    width = max(len(r.student) for r in report.rows)
    for r in report.rows:
        notes = f"  ({r.notes})" if r.notes else ""
        mark = "" if (r.student, r.lecture) in graded else "  [unchanged]"
        print(f"{r.student:<{width}}  {r.lecture}  {r.total:g}/{r.max:g}  {r.status}{notes}{mark}")
    print(f"scores:   {report.csv_path}")
    print(f"feedback: {report.out / 'feedback'}")
    if report.report_path:
        print(f"report:   {report.report_path}")
    print(
        f"graded {len(graded)} notebook(s), {len(report.rows) - len(graded)} unchanged, "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def _failed_cells(out: Path, student: str, lecture: str) -> list[str]:
    """The full message of every failed graded cell of a self-checked notebook (the hidden
    tests' included: the learner sees what a class's feedback page would show)."""
    import re

    import nbformat

    path = out / "work" / lecture / student / "autograded" / student / lecture / f"{lecture}.ipynb"
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception:  # noqa: BLE001 - not graded: nothing to show
        return []
    lines: list[str] = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not meta.get("grade"):
            continue
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(o.get("evalue", "")))
                lines += ["", f"{meta.get('grade_id')}: {o.get('ename', '')}"]
                lines += ["  " + ln for ln in text.splitlines()[:40]]
    return lines + ([""] if lines else [])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "release":
            return _release(args)
        return _grade(args)
    except UsageError as exc:
        print(f"autograder: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # release failures etc.: one line, not a traceback
        from .release import ReleaseError

        if isinstance(exc, ReleaseError):
            print(f"autograder: error: {exc}".splitlines()[0], file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
