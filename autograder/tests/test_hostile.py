"""A class of hostile and broken submissions, graded in ONE run by the real command's code.

The corpus is ``hostile/manifest.json`` (38 students: a few honest ones, the rest
written to break the grader, eleven of them to cheat on the hidden tests), built from
lecture 01 at test time by ``hostile/build.py``. Limits are short here (10 s per cell, 45 s per notebook,
2 GiB of address space, 64 MiB of scratch) so the whole class grades in a few
minutes on 2 cores. What must hold:

* the run completes and every student in the manifest has a row;
* each gets exactly the expected total (and per-exercise scores where listed);
* what the report says about it (CSV notes, plus the worker's notes and the
  failed cells' messages) names what went wrong, in words;
* nothing outside the grading workspace changed: the repository (hashes of every
  file git knows, plus untracked ones) and the places a kernel could write;
* no process the submissions started is still running;
* every cheat on the hidden tests passed its visible tests in the kernel and lost the
  exercise on the hidden tests, and the course secret reached no student's process.

The kernel sandbox (own uid, private mounts) needs root on Linux; without it the
isolation checks are skipped and the rest still runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "hostile"))

import build  # noqa: E402
from autograder.course import REPO, SOLUTIONS, lectures_in  # noqa: E402
from autograder.grade import grade, load_results  # noqa: E402
from autograder.release import generate  # noqa: E402
from autograder.sandbox import SANDBOX_UID_BASE, GiB, MiB, available  # noqa: E402

pytestmark = pytest.mark.skipif(
    not {build.LECTURE, build.OTHER_LECTURE} <= set(lectures_in(SOLUTIONS)),
    reason="needs lectures 01 and 02 in solutions/",
)

LIMITS = {
    "AUTOGRADER_NOTEBOOK_TIMEOUT": "45",
    "AUTOGRADER_MEMORY_BYTES": str(2 * GiB),
    "AUTOGRADER_SCRATCH_BYTES": str(64 * MiB),
    "AUTOGRADER_OUTPUT_BYTES": str(1 * MiB),
}
CELL_TIMEOUT = 10
WATCHED = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home()]


def _repo_snapshot() -> dict[str, str]:
    """sha1 of every file in the checkout that git tracks or would track (not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")
    snap = {}
    for name in filter(None, listed):
        path = REPO / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            snap[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return snap


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _markers() -> list[str]:
    found = []
    for folder in [REPO, REPO / "solutions", REPO / "lib", *WATCHED]:
        if (folder / build.MARKER).exists():
            found.append(str(folder / build.MARKER))
    return found


def _survivors() -> list[str]:
    """Processes whose command line carries the background tag."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(ln for ln in Path(f"/proc/{entry}/status").read_text().splitlines()
                         if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if build.BACKGROUND_TAG in cmd and " Z " not in state + " ":
            alive.append(f"{entry}: {cmd.strip()}")
    return alive


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    learner = generate([build.LECTURE], SOLUTIONS, base / "release", 1)[build.LECTURE]
    subs = base / "submissions"
    entries = build.write_class(subs, SOLUTIONS, learner / f"{build.LECTURE}.ipynb")
    if not available()[0]:  # unsandboxed, the writer would really overwrite files (and the
        # library's source file is readable): leave those out
        left_out = {"writer"} | {e["id"] for e in entries if e.get("needs_isolation")}
        for student in left_out:
            shutil.rmtree(subs / student)
        entries = [e for e in entries if e["id"] not in left_out]
    clean = not _git("status", "--porcelain")
    head = _git("rev-parse", "HEAD")
    before, markers_before, survivors_before = _repo_snapshot(), _markers(), _survivors()
    saved = {k: os.environ.get(k) for k in LIMITS}
    os.environ.update(LIMITS)
    try:
        report = grade(subs, build.LECTURE, out=base / "out", timeout=CELL_TIMEOUT, workers=2,
                       secret=build.SECRET)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = load_results(base / "out")
    return {
        "report": report, "results": results, "entries": entries, "out": base / "out",
        "before": before, "after": _repo_snapshot(), "markers_before": markers_before,
        # strict only on a checkout nobody else touched meanwhile (a clean clone, as in CI)
        "clean": clean and _git("rev-parse", "HEAD") == head and not _git("status", "--porcelain"),
        "survivors_before": survivors_before,
    }


def _said(graded, student: str) -> str:
    """Everything the report says about one student, lower-cased."""
    row = graded["report"].row(student, build.LECTURE)
    result = graded["results"].get((student, build.LECTURE), {})
    words = [row.notes, result.get("message", ""), *result.get("notes", [])]
    words += [f"{e['cell']}: {e['ename']}: {e['evalue']}" for e in result.get("errors", [])]
    return " | ".join(words).lower()


def test_corpus_is_big_enough():
    entries = build.manifest()
    assert len([e for e in entries if not e["id"].startswith("honest")]) >= 20
    assert len({e["id"] for e in entries}) == len(entries)


def test_corpus_cheats_on_the_hidden_tests_in_at_least_eight_ways():
    cheats = [e for e in build.manifest() if e["recipe"] in build.HIDDEN_CHEATS]
    assert len(cheats) >= 8 and {e["recipe"] for e in cheats} == set(build.HIDDEN_CHEATS)


def test_every_student_has_the_expected_score(graded):
    report, failures = graded["report"], []
    for entry in graded["entries"]:
        if entry["expected"] is None:
            continue
        row = report.row(entry["id"], build.LECTURE)
        if row.total != entry["expected"]:
            failures.append(f"{entry['id']} ({entry['what']}): total {row.total}, "
                            f"expected {entry['expected']}; notes: {_said(graded, entry['id'])[:300]}")
        for grade_id, points in entry.get("scores", {}).items():
            if row.scores.get(grade_id) != points:
                failures.append(f"{entry['id']}: {grade_id} = {row.scores.get(grade_id)}, expected {points}")
        if entry.get("status") and row.status != entry["status"]:
            failures.append(f"{entry['id']}: status {row.status}, expected {entry['status']}")
    assert not failures, "\n".join(failures)


def test_honest_students_are_graded_exactly(graded):
    for entry in graded["entries"]:
        if entry["id"].startswith("honest"):
            row = graded["report"].row(entry["id"], build.LECTURE)
            assert row.status == "graded", (entry["id"], row.notes)
            assert row.total == entry["expected"]
            assert row.max == 8


def test_the_report_says_what_went_wrong(graded):
    failures = []
    for entry in graded["entries"]:
        if entry["expected"] is None:
            continue
        said = _said(graded, entry["id"])
        for alternatives in entry["notes"]:
            if not any(word.lower() in said for word in alternatives):
                failures.append(f"{entry['id']}: none of {alternatives} in: {said[:400]}")
    assert not failures, "\n".join(failures)


def test_a_folder_that_cannot_be_a_student_is_skipped_with_a_warning(graded):
    report = graded["report"]
    assert any("stud" in w and "student id" in w for w in report.warnings), report.warnings
    graded_students = {r.student for r in report.rows}
    assert {e["id"] for e in graded["entries"] if e["expected"] is not None} <= graded_students


def _by_a_kernel(path: str) -> bool:
    """Whether a file looks written by a graded notebook: a sandbox uid owns it, or it
    holds the writer's payload."""
    try:
        st = os.stat(path)
        return st.st_uid >= SANDBOX_UID_BASE or b"pwned" in Path(path).read_bytes()
    except OSError:
        return False


def test_nothing_outside_the_workspace_changed(graded):
    before, after = graded["before"], graded["after"]
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if not graded["clean"]:
        # a shared checkout where other people edit files meanwhile: judge only what a
        # notebook could have written (on a clean clone, as in CI, every change counts)
        changed = [p for p in changed if _by_a_kernel(p)]
    assert not changed, changed
    assert _markers() == graded["markers_before"]


def test_no_process_outlives_the_grading(graded):
    assert set(_survivors()) <= set(graded["survivors_before"])


@pytest.mark.skipif(not available()[0], reason="kernel sandbox needs root and mount namespaces")
def test_kernels_were_isolated(graded):
    results = graded["results"]
    ran = [r for r in results.values() if r.get("status") == "ok"]
    assert ran and all(r.get("isolated") for r in ran)
    # the snooping student found nothing to read: no solutions, no gradebook, no other notebooks
    snoop = results[("snoop", build.LECTURE)]
    assert {e["ename"] for e in snoop["errors"]} == {"IndexError"}, snoop["errors"]
    # the background processes were found and killed after the notebook
    assert any("killed" in n for n in results[("daemon", build.LECTURE)]["notes"])
    # the gradebook (hidden tests) is readable by root only
    for gradebook in Path(graded["out"], "work", build.LECTURE).glob("*/gradebook.db"):
        if gradebook.parent.name != "_release":
            assert gradebook.stat().st_mode & 0o077 == 0, gradebook


def _autograded(graded, student: str):
    import nbformat

    path = Path(graded["out"], "work", build.LECTURE, student, "autograded", student, build.LECTURE,
                f"{build.LECTURE}.ipynb")
    return nbformat.read(str(path), as_version=4)


def test_each_cheat_passed_the_visible_tests_and_lost_on_the_hidden_ones(graded):
    """What makes each of these a cheat: in the kernel its visible tests passed (it would have
    kept the points if the hidden tests could be gamed); the hidden tests took them."""
    failures = []
    for entry in graded["entries"]:
        if entry["recipe"] not in build.HIDDEN_CHEATS:
            continue
        nb = _autograded(graded, entry["id"])
        cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells}
        for grade_id, points in entry["scores"].items():
            if points:
                continue
            outs = cells[grade_id].outputs
            visible = any("visible tests passed" in o.get("text", "") for o in outs)
            hidden = [o for o in outs if o.get("output_type") == "error"]
            if not visible or len(hidden) != 1 or not hidden[0]["evalue"].startswith("hidden test"):
                failures.append(f"{entry['id']} {grade_id}: visible passed={visible}, errors={[o.get('ename') for o in hidden]}")
    assert not failures, "\n".join(failures)


def test_the_course_secret_reaches_no_student_process(graded):
    nb = _autograded(graded, "secretive")
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "secret in the kernel: None" in printed and "secret anywhere: []" in printed, printed
    for path in Path(graded["out"]).rglob("*"):
        if path.is_file() and path.suffix in {".ipynb", ".html", ".json", ".csv", ".md", ".log", ".py"}:
            assert build.SECRET not in path.read_text(errors="replace"), path
