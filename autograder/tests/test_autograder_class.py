"""The instructor's command on a class: layouts (LMS downloads, zip, one notebook), resumable
grading, the class report, feedback without hidden-test code, extra tests, the course secret,
and bad input that leaves an existing workspace byte-for-byte as it was.

Real nbgrader runs on the fixture lecture (autograder/tests/fixtures/solutions/00_fixture),
plus one self-check of a real lecture's solutions."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _nbedit import exercises, read, submission, write
from autograder.cli import main
from autograder.course import REPO, SECRET_ENV, SOLUTIONS, UsageError
from autograder.grade import grade, load_extra_tests
from autograder.submissions import extract_zip, find_submissions, lecture_cell_ids

FIXTURE = Path(__file__).parent / "fixtures" / "solutions"
LECTURE = "00_fixture"
SECRET_A, SECRET_B = "course secret A (tests)", "another secret B"

EXTRA = '''\
# Instructor's own hidden tests for 00_fixture, decided outside the learner's kernel.
import torch

from autograder.hidden import Case, HiddenTest


def probe_cases(rng):
    q = torch.randn(3, 9, 4, generator=rng)
    yield Case("q = k (3, 9, 4)", q, q)


TESTS = [HiddenTest(cell="extra_scores_probe", points=1, function="scores", cases=probe_cases,
                    reference=lambda q, k: q @ k.transpose(-2, -1) / 2)]
'''


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autograder", "--solutions", str(FIXTURE), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as fh:
        return {r["student"]: r for r in csv.DictReader(fh)}


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every result file of a workspace (not the scratch work/ folder), by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "work" not in p.relative_to(out).parts[:1]
    }


@pytest.fixture(scope="module")
def notebooks():
    """The fixture's solutions and three variants: untouched, ex2 calls the reference, ex1 wrong too."""
    sol = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
    ex1, ex2 = exercises(sol)
    untouched = submission(sol, {ex1.cell: "raise NotImplementedError()", ex2.cell: "raise NotImplementedError()"})
    cheat = submission(sol, {ex2.cell: "return F.layer_norm(x, x.shape[-1:], eps=eps)"})
    wrong = submission(cheat, {ex1.cell: "return q @ k.transpose(-2, -1)"})
    return {"solution": sol, "untouched": untouched, "cheat": cheat, "wrong": wrong}


# --------------------------------------------------------------------------- layouts (no nbgrader)


def test_lms_downloads_and_folders_are_recognised(tmp_path, notebooks):
    sol = notebooks["solution"]
    for rel in [
        "ann/00_fixture/00_fixture.ipynb",  # nbgrader submitted/
        "bea/00_fixture.ipynb",  # per-student folder
        "cy/my homework (2).ipynb",  # per-student folder, lecture told by its cells
        "Bo Li_1001_assignsubmission_file_00_fixture.ipynb",  # Moodle, flat
        "Di Wu_1002_assignsubmission_file_/whatever.ipynb",  # Moodle, in folders
        "cyw_late_2002_777_00_fixture-1.ipynb",  # Canvas (late)
        "smithj_2003_778_00_fixture.ipynb",  # Canvas
        "s123_00_fixture.ipynb",  # <student>_<NN_topic>
        "dana_homework.ipynb",  # <student>_<anything>: lecture told by its cells
        "__MACOSX/._x.ipynb",
    ]:
        write(sol, tmp_path / rel)
    (tmp_path / "00_fixture.ipynb").write_text("{}")  # no student id: skipped with a warning
    (tmp_path / "eve_notes.ipynb").write_text("{}")  # not this lecture: skipped
    warnings: list[str] = []
    found = find_submissions(tmp_path, [LECTURE], warnings, lecture_cell_ids(FIXTURE, [LECTURE]))
    got = {s.student: s.notebook.relative_to(tmp_path).as_posix() for s in found}
    assert got == {
        "1001": "Bo Li_1001_assignsubmission_file_00_fixture.ipynb",
        "1002": "Di Wu_1002_assignsubmission_file_/whatever.ipynb",
        "2002": "cyw_late_2002_777_00_fixture-1.ipynb",
        "2003": "smithj_2003_778_00_fixture.ipynb",
        "ann": "ann/00_fixture/00_fixture.ipynb",
        "bea": "bea/00_fixture.ipynb",
        "cy": "cy/my homework (2).ipynb",
        "dana": "dana_homework.ipynb",
        "s123": "s123_00_fixture.ipynb",
    }
    assert any("00_fixture.ipynb: no student id" in w for w in warnings), warnings
    assert any("eve_notes.ipynb" in w for w in warnings), warnings


def test_single_notebook_lecture_by_name_or_cells(tmp_path, notebooks):
    ids = lecture_cell_ids(FIXTURE, [LECTURE])
    by_name = write(notebooks["untouched"], tmp_path / "00_fixture (3).ipynb")
    by_cells = write(notebooks["untouched"], tmp_path / "mine.ipynb")
    for path in (by_name, by_cells):
        [sub] = find_submissions(path, [LECTURE], [], ids)
        assert (sub.student, sub.lecture, sub.notebook) == ("self", LECTURE, path)
    (tmp_path / "other.ipynb").write_text("{}")
    with pytest.raises(UsageError, match="cannot tell which lecture other.ipynb is: expected a file name containing 00_fixture"):
        find_submissions(tmp_path / "other.ipynb", [LECTURE], [], ids)


def _zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_zip_is_extracted_safely(tmp_path):
    ok = _zip(tmp_path / "ok.zip", {"downloads/ann_00_fixture.ipynb": b"{}", "downloads/bo/00_fixture.ipynb": b"{}"})
    root = extract_zip(ok, tmp_path / "x")
    assert root == tmp_path / "x" / "downloads"  # a zip of one folder is entered
    assert sorted(p.name for p in root.iterdir()) == ["ann_00_fixture.ipynb", "bo"]
    for name, entries, symlink, expected in [
        ("up.zip", {"../evil.ipynb": b"{}"}, None, "unsafe entry '../evil.ipynb'"),
        ("abs.zip", {"/tmp/evil.ipynb": b"{}"}, None, "unsafe entry '/tmp/evil.ipynb'"),
        ("link.zip", {}, "ann_00_fixture.ipynb", "symbolic link"),
        ("big.zip", {"a.ipynb": b"x" * 5000}, None, "unpacks to more than 1000 bytes"),
    ]:
        dest = tmp_path / name
        with pytest.raises(UsageError, match=expected):
            extract_zip(_zip(tmp_path / name, entries, symlink), dest, max_bytes=1000)
        assert not dest.exists() or not any(dest.rglob("*.ipynb"))
    assert not (tmp_path / "evil.ipynb").exists()
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable zip"):
        extract_zip(tmp_path / "bad.zip", tmp_path / "y")


def test_duplicate_student_ids_are_refused(tmp_path, notebooks):
    write(notebooks["solution"], tmp_path / "ann" / "00_fixture.ipynb")
    write(notebooks["solution"], tmp_path / "ann_00_fixture.ipynb")
    with pytest.raises(UsageError) as info:
        find_submissions(tmp_path, [LECTURE], [], lecture_cell_ids(FIXTURE, [LECTURE]))
    assert str(info.value) == (
        "student id 'ann' appears twice for 00_fixture: ann/00_fixture.ipynb and ann_00_fixture.ipynb; "
        "expected one notebook per student and lecture"
    )


def test_extra_tests_file_format(tmp_path):
    two = EXTRA + (
        "TESTS.append(HiddenTest(cell='extra_two', points=2.5, function='layer_norm', cases=probe_cases,\n"
        "                        reference=lambda x, y: x))\n")
    (tmp_path / "00_fixture.py").write_text(two)
    tests = load_extra_tests(tmp_path, [LECTURE])[LECTURE]
    assert [(t["grade_id"], t["points"]) for t in tests] == [("extra_scores_probe", 1.0), ("extra_two", 2.5)]
    assert "`layer_norm`" in tests[1]["source"] and "outside your notebook" in tests[1]["source"]
    assert tests[0]["path"] == str(tmp_path / "00_fixture.py")
    bad = {
        "# %% t1\nassert True\n": "in the learner's kernel, where they can be gamed",
        "TESTS = 3\n": "expected a list TESTS of HiddenTest",
        EXTRA.replace("points=1, ", ""): "expected points=N",
        EXTRA.replace('cell="extra_scores_probe"', 'cell="bad id"'): "expected a grade id",
        "import no_such_module\n": "could not be loaded: ModuleNotFoundError",
    }
    for text, expected in bad.items():
        (tmp_path / "00_fixture.py").write_text(text)
        with pytest.raises(UsageError, match=expected):
            load_extra_tests(tmp_path, [LECTURE])
    (tmp_path / "00_fixture.py").unlink()
    (tmp_path / "07_nothing.py").write_text(EXTRA)
    with pytest.raises(UsageError, match="07_nothing.py names no lecture"):
        load_extra_tests(tmp_path, [LECTURE])


def test_interrupted_run_leaves_results_intact(graded_class, tmp_path, monkeypatch, notebooks):
    """A run stopped while grading (Ctrl-C) changes no score, state or feedback file."""
    import autograder.grade as grade_mod

    out = tmp_path / "out"
    shutil.copytree(graded_class["out"], out, symlinks=True)
    before = _snapshot(out)
    subs = tmp_path / "subs"
    write(notebooks["untouched"], subs / "ann" / f"{LECTURE}.ipynb")  # ann changed: to be regraded

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grade_mod, "run_tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grade(subs, LECTURE, out=out, solutions=FIXTURE, timeout=20, extra_tests=graded_class["extra"],
              secret=SECRET_A)
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- a class, graded for real


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory, notebooks):
    """A zip of LMS downloads in mixed layouts, graded with a secret file and extra tests."""
    tmp = tmp_path_factory.mktemp("class")
    folder = tmp / "downloads"
    layout = {
        "ann/00_fixture/00_fixture.ipynb": "solution",
        "Bo Li_1001_assignsubmission_file_00_fixture.ipynb": "cheat",
        "cyw_late_2002_777_00_fixture-1.ipynb": "untouched",
        "dana_homework.ipynb": "wrong",
    }
    for rel, kind in layout.items():
        write(notebooks[kind], folder / rel)
    archive = tmp / "class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.ipynb")):
            zf.write(path, path.relative_to(tmp).as_posix())
    extra = tmp / "extra"
    extra.mkdir()
    (extra / "00_fixture.py").write_text(EXTRA)
    secret_file = tmp / "secret.txt"
    secret_file.write_text(SECRET_A + "\n")
    out = tmp / "out"
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    done = _cli("grade", str(archive), "--lecture", LECTURE, "--out", str(out), "--timeout", "20",
                "--workers", "2", "--secret-file", str(secret_file), "--extra-tests", str(extra), env=env)
    assert done.returncode == 0, done.stderr
    return {"out": out, "done": done, "folder": folder, "extra": extra, "secret_file": secret_file,
            "layout": layout, "snapshot": _snapshot(out)}


def test_class_scores_csv(graded_class):
    rows = _csv(graded_class["out"] / "scores.csv")
    assert list(next(iter(rows.values()))) == [
        "student", "lecture", "ex1_scores_test", "ex2_layer_norm_test", "extra_scores_probe",
        "total", "max", "status", "notes",
    ]
    got = {s: (r["ex1_scores_test"], r["ex2_layer_norm_test"], r["extra_scores_probe"], r["total"], r["max"])
           for s, r in rows.items()}
    assert got == {
        "1001": ("1", "0", "1", "2", "4"),  # calls F.layer_norm: the hidden tests block it
        "2002": ("0", "0", "0", "0", "4"),  # untouched
        "ann": ("1", "2", "1", "4", "4"),  # the solutions
        "dana": ("0", "0", "0", "0", "4"),  # ex1 wrong, ex2 calls the reference
    }
    assert "ReferenceBlocked" in rows["1001"]["notes"]
    assert "graded 4 notebook(s), 0 unchanged" in graded_class["done"].stdout


def test_feedback_shows_no_hidden_test_code(graded_class):
    """The hidden tests' code lives in files the grader reads (the lecture's and the extra
    ones); the feedback shows each verdict, never a line of those files."""
    spec_lines = (FIXTURE / LECTURE / "hidden_tests.py").read_text().splitlines() + EXTRA.splitlines()
    spec_lines = [ln.strip() for ln in spec_lines if len(ln.strip()) > 12
                  and not ln.strip().startswith(("#", "import ", "from "))]  # imports: the notebook has them too
    import html as html_lib
    import re

    for student in ("1001", "2002", "ann", "dana"):
        html = (graded_class["out"] / "feedback" / student / f"{LECTURE}.html").read_text()
        text = html_lib.unescape(re.sub(r"<[^>]+>", "", html))
        assert "HIDDEN TESTS" not in text and "HiddenTest" not in text
        for line in spec_lines:
            assert line not in text, (student, line)
    ann = html_lib.unescape((graded_class["out"] / "feedback" / "ann" / f"{LECTURE}.html").read_text())
    assert ann.count("hidden tests passed") == 3  # ex1, ex2 and the extra test
    dana = (graded_class["out"] / "feedback" / "dana" / f"{LECTURE}.html").read_text()
    assert "ReferenceBlocked" in dana and "AssertionError" in dana  # pass/fail and the error stay
    assert "hidden test: layer_norm, case 1 of 2" in html_lib.unescape(dana)


def test_report_matches_the_csv(graded_class):
    out = graded_class["out"]
    report = out / "report"
    assert {p.name for p in report.iterdir()} >= {"report.md", "summary.json", "score_distribution.png", "pass_rates.png"}
    summary = json.loads((report / "summary.json").read_text())["lectures"][LECTURE]
    rows = _csv(out / "scores.csv")
    points = {"ex1_scores_test": 1, "ex2_layer_norm_test": 2, "extra_scores_probe": 1}
    for cell in summary["cells"]:
        passed = sum(float(r[cell["cell"]]) >= points[cell["cell"]] for r in rows.values())
        assert (cell["passed"], cell["graded"]) == (passed, len(rows)), cell
    percents = sorted(100 * float(r["total"]) / float(r["max"]) for r in rows.values())
    assert sorted(summary["percents"]) == percents
    # the test that failed most: ex2's hidden tests, the answer called the reference (1001, dana)
    top = summary["failed_most"][0]
    assert (top["cell"], top["part"], top["error"], top["students"]) == (
        "ex2_layer_norm_test", "hidden", "ReferenceBlocked", 2)
    fails = {(f["cell"], f["part"], f["error"]): f["students"] for f in summary["failed_most"]}
    assert fails[("ex1_scores_test", "visible", "AssertionError")] == 1  # dana's missing scale
    assert fails[("ex1_scores_test", "visible", "NotImplementedError")] == 1  # 2002
    text = (report / "report.md").read_text()
    assert "| ex2_layer_norm_test | hidden | ReferenceBlocked | 2 |" in text
    assert "| ex1_scores_test | 1 | 2/4 | 50% |" in text


def test_secret_seeds_the_hidden_inputs_and_stays_out_of_the_workspace(graded_class):
    """The inputs the grader sent to ann's process are the ones SECRET_A draws (another secret,
    or none, draws others); the secret itself is written nowhere."""
    import torch
    from autograder.hidden import load_tests, prepare

    tests = load_tests(graded_class["extra"] / "00_fixture.py")

    def drawn(secret):
        ((_, cases, _),) = prepare(tests, LECTURE, secret)
        return cases[0].args[0]

    root = graded_class["out"] / "work" / LECTURE / "ann" / "hidden"
    sent = [torch.load(p, weights_only=True) for p in sorted(root.glob("inputs-*.pt"))]
    probes = [args[0] for cases in sent for args, _ in cases if args[0].shape == (3, 9, 4)]
    assert len(probes) == 1 and torch.equal(probes[0], drawn(SECRET_A))
    assert not torch.equal(drawn(SECRET_A), drawn(SECRET_B))
    assert not torch.equal(drawn(SECRET_A), drawn(None))
    for path in graded_class["out"].rglob("*"):
        if path.is_file() and path.suffix in {".json", ".csv", ".md", ".html", ".py", ".log", ".ipynb"}:
            assert SECRET_A not in path.read_text(errors="replace"), path


def test_second_run_grades_nothing_then_exactly_the_changed_student(graded_class, tmp_path, notebooks):
    out = graded_class["out"]
    common = ["--lecture", LECTURE, "--out", str(out), "--timeout", "20",
              "--secret-file", str(graded_class["secret_file"]), "--extra-tests", str(graded_class["extra"])]
    again = _cli("grade", str(graded_class["folder"]), *common)  # the unzipped folder: same notebooks
    assert again.returncode == 0, again.stderr
    assert "graded 0 notebook(s), 4 unchanged" in again.stdout
    assert _snapshot(out) == graded_class["snapshot"]  # not a byte changed
    # dana fixes both exercises; 2002 is not in this download; the others are unchanged
    subs = tmp_path / "subs"
    shutil.copytree(graded_class["folder"], subs)
    (subs / "cyw_late_2002_777_00_fixture-1.ipynb").unlink()
    write(notebooks["solution"], subs / "dana_homework.ipynb")
    third = _cli("grade", str(subs), *common)
    assert third.returncode == 0, third.stderr
    assert "graded 1 notebook(s), 3 unchanged" in third.stdout
    rows = _csv(out / "scores.csv")
    assert rows["dana"]["total"] == "4" and rows["2002"]["total"] == "0"  # 2002's row is kept
    before = graded_class["snapshot"]
    after = _snapshot(out)
    for student in ("1001", "2002", "ann"):
        page = f"feedback/{student}/{LECTURE}.html"
        assert after[page] == before[page]
    assert after["feedback/dana/00_fixture.html"] != before["feedback/dana/00_fixture.html"]
    old_rows = _csv_text(before["scores.csv"])
    new_rows = _csv_text(after["scores.csv"])
    assert {k: v for k, v in new_rows.items() if k != "dana"} == {k: v for k, v in old_rows.items() if k != "dana"}


def _csv_text(data: bytes) -> dict[str, str]:
    lines = data.decode().splitlines()
    return {ln.split(",")[0]: ln for ln in lines[1:]}


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def workspace(graded_class, tmp_path):
    """A copy of the graded class's workspace, to aim bad calls at."""
    out = tmp_path / "out"
    shutil.copytree(graded_class["out"], out, symlinks=True)
    return out


def _bad_cases(tmp_path: Path, workspace: Path, graded_class, notebooks):
    good = graded_class["folder"]
    dup = tmp_path / "dup"
    shutil.copytree(good, dup)
    write(notebooks["solution"], dup / "ann_00_fixture.ipynb")  # ann also as an LMS file
    other_course = tmp_path / "other_course"
    shutil.copytree(workspace, other_course)
    (other_course / ".autograder-workspace.json").write_text(json.dumps({"course": "deep-rl-101", "lectures": [LECTURE]}))
    other_lectures = tmp_path / "other_lectures"
    shutil.copytree(workspace, other_lectures)
    (other_lectures / ".autograder-workspace.json").write_text(
        json.dumps({"course": "transformer-lab", "lectures": ["01_attention", LECTURE]}))
    nbgrader_course = tmp_path / "nbgrader_course"  # somebody's nbgrader course folder with its gradebook
    nbgrader_course.mkdir()
    (nbgrader_course / "gradebook.db").write_bytes(b"SQLite format 3\0")
    inside_repo_secret = REPO / "autograder" / "_work" / "secret-test.txt"
    evil_zip = _zip(tmp_path / "evil.zip", {"../../evil.ipynb": b"{}"})
    ws = str(workspace)
    return {
        "missing folder": ([str(tmp_path / "nope"), "--out", ws], "does not exist: expected a folder"),
        "unknown lecture": ([str(good), "--lecture", "04_x", "--out", ws], "unknown lecture '04_x': expected 'all' or one of 00_fixture"),
        "student twice": ([str(dup), "--out", ws], "student id 'ann' appears twice for 00_fixture"),
        "workspace of another course": ([str(good), "--out", str(other_course)], "is a workspace of course 'deep-rl-101': expected one of 'transformer-lab'"),
        "workspace of other lectures": ([str(good), "--out", str(other_lectures)], "holds grades of lectures 01_attention: expected a workspace of 00_fixture"),
        "gradebook of an nbgrader course": ([str(good), "--out", str(nbgrader_course)], "is not empty and is not an autograder workspace"),
        "secret file missing": ([str(good), "--out", ws, "--secret-file", str(tmp_path / "nosecret")], "does not exist: expected a file holding the course secret"),
        "secret in the repository": ([str(good), "--out", ws, "--secret-file", str(inside_repo_secret)], "is inside the repository"),
        "extra tests missing": ([str(good), "--out", ws, "--extra-tests", str(tmp_path / "noextra")], "is not a folder: expected a folder of <NN_topic>.py files"),
        "zip escaping": ([str(evil_zip), "--out", ws], "unsafe entry '../../evil.ipynb'"),
        "zero workers": ([str(good), "--out", ws, "--workers", "0"], "--workers must be at least 1; got 0"),
        "zero memory": ([str(good), "--out", ws, "--memory", "0"], "--memory must be a positive number; got 0"),
    }, inside_repo_secret


def test_bad_input_touches_nothing_already_graded(workspace, graded_class, tmp_path, capsys, notebooks):
    cases, repo_secret = _bad_cases(tmp_path, workspace, graded_class, notebooks)
    repo_secret.parent.mkdir(parents=True, exist_ok=True)
    repo_secret.write_text("s3cret\n")
    try:
        for name, (argv, expected) in cases.items():
            target = Path(argv[argv.index("--out") + 1])
            before = _snapshot(target), sorted(p.relative_to(target) for p in target.rglob("*"))
            code = main(["--solutions", str(FIXTURE), "grade", *argv])
            err = capsys.readouterr().err.strip()
            assert code == 2, (name, err)
            assert len(err.splitlines()) == 1 and err.startswith("autograder: error: "), (name, err)
            assert expected in err, (name, err)
            assert (_snapshot(target), sorted(p.relative_to(target) for p in target.rglob("*"))) == before, name
    finally:
        repo_secret.unlink()
    assert not (tmp_path.parent / "evil.ipynb").exists()


# --------------------------------------------------------------------------- a real lecture


def test_real_lecture_self_check_full_marks_without_hidden_code(tmp_path):
    """A learner self-checks one notebook of a real lecture (named freely: the lecture is told by
    its cells): the score and the feedback page are printed, the solutions get full marks (the
    hidden tests run outside the kernel, as in a class), the README's extra-test example
    passes, and the feedback shows verdicts, not the hidden tests."""
    lecture = "01_attention"
    nb = tmp_path / "my work.ipynb"
    shutil.copyfile(SOLUTIONS / lecture / f"{lecture}.ipynb", nb)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET_B)
    extra = Path(__file__).parent / "fixtures" / "extra_tests"  # the README's extra-test example
    done = subprocess.run(
        [sys.executable, "-m", "autograder", "grade", str(nb), "--out", str(tmp_path / "out"),
         "--workers", "1", "--secret-file", str(secret), "--extra-tests", str(extra)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "score:    10/10 (graded)" in lines, done.stdout
    assert any(ln.split() == ["my_scores_long_sequence", "2/2"] for ln in lines), done.stdout
    feedback = tmp_path / "out" / "feedback" / "self" / f"{lecture}.html"
    assert f"feedback: {feedback}" in lines
    html = feedback.read_text()
    assert html.count("hidden tests passed") == 5 and "HiddenTest" not in html and "hidden_rng" not in html
