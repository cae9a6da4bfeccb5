"""The instructor's command on a tiny fixture lecture (autograder/tests/fixtures/solutions/00_fixture):
bad input, submission layouts, nbgrader's configuration names, and one real end-to-end
run of ``python -m autograder release`` and ``grade`` as an instructor types them."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _nbedit import exercises, read, submission, write
from autograder.cli import main
from autograder.course import REPO, UsageError, nbgrader_config, resolve_lectures
from autograder.release import compare
from autograder.submissions import find_submissions
from nbgrader.coursedir import CourseDirectory

FIXTURE = Path(__file__).parent / "fixtures" / "solutions"
LECTURE = "00_fixture"


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autograder", "--solutions", str(FIXTURE), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


# --------------------------------------------------------------------------- no nbgrader run


def test_nbgrader_config_names_exist_in_nbgrader():
    """Every CourseDirectory setting we write is a real trait of nbgrader's CourseDirectory."""
    config = nbgrader_config(Path("/tmp/root"), timeout=7)
    traits = set(CourseDirectory.class_trait_names())
    for name in config.CourseDirectory:
        assert name in traits, f"CourseDirectory.{name} is not an nbgrader setting"
    cd = CourseDirectory(config=config)
    assert (cd.source_directory, cd.release_directory) == ("solutions", "course")
    assert cd.format_path(cd.source_directory, ".", LECTURE) == f"/tmp/root/solutions/./{LECTURE}"
    assert cd.db_url == "sqlite:////tmp/root/gradebook.db"
    from nbgrader.preprocessors import Execute

    assert Execute(config=config).timeout == 7


def test_repository_nbgrader_config_file():
    """autograder/nbgrader_config.py (for nbgrader's own tools) maps solutions/ and course/."""
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(REPO / "autograder")).load_config()
    cd = CourseDirectory(config=config)
    assert cd.root == str(REPO)
    assert cd.format_path(cd.source_directory, ".", "01_x") == f"{REPO}/solutions/./01_x"
    assert cd.format_path(cd.release_directory, ".", "01_x") == f"{REPO}/course/./01_x"
    assert cd.db_url.endswith("autograder/_work/gradebook.db")
    for step in (cd.submitted_directory, cd.autograded_directory, cd.feedback_directory):
        assert step.startswith("autograder/_work/")  # git-ignored
    # nbgrader's own autograde runs the hidden tests the same way (outside the kernel)
    steps = [str(s) for s in config.Autograde.autograde_preprocessors]
    assert "autograder.worker.SandboxExecute" in steps and not any(s.endswith(".Execute") for s in steps)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["grade", "/nonexistent/subs", "--lecture", LECTURE], "does not exist"),
        (["grade", "{subs}", "--lecture", "99_nothing"], "unknown lecture '99_nothing'"),
        (["grade", "{empty}", "--lecture", LECTURE], "no notebooks of 00_fixture"),
        (["grade", "{subs}", "--lecture", LECTURE, "--timeout", "0"], "--timeout must be a positive"),
        (["grade", "{subs}", "--lecture", LECTURE, "--out", str(FIXTURE / LECTURE)], "--out must be outside"),
        (["release", "--lecture", "01_nothing"], "expected 'all' or one of 00_fixture"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(argv, expected, tmp_path, capsys):
    subs = tmp_path / "subs"
    (subs / "ann").mkdir(parents=True)
    write(read(FIXTURE / LECTURE / f"{LECTURE}.ipynb"), subs / "ann" / f"{LECTURE}.ipynb")
    (tmp_path / "empty" / "bob").mkdir(parents=True)
    argv = [a.format(subs=subs, empty=tmp_path / "empty") for a in argv]
    assert main(["--solutions", str(FIXTURE), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("autograder: error: "), err
    assert expected in err, err


def test_no_notebooks_error_names_the_layouts_and_what_came(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "homework.ipynb").write_text("{}")
    with pytest.raises(UsageError) as info:
        find_submissions(tmp_path, [LECTURE])
    msg = str(info.value)
    assert "<student>/<NN_topic>/<NN_topic>.ipynb" in msg and "<student>/<NN_topic>.ipynb" in msg
    assert "ann/" in msg


def test_submission_layouts(tmp_path):
    for path in [
        "ann/00_fixture/00_fixture.ipynb",  # nbgrader's submitted/ layout
        "bob/00_fixture.ipynb",  # flat
        "cy/00_fixture.ipynb",  # both: the nested one wins
        "cy/00_fixture/00_fixture.ipynb",
        "dee/other.ipynb",  # nothing for this lecture
        ".hidden/00_fixture.ipynb",
        "bad name/00_fixture.ipynb",
    ]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    warnings: list[str] = []
    found = find_submissions(tmp_path, [LECTURE], warnings)
    assert [(s.student, s.notebook.relative_to(tmp_path).as_posix()) for s in found] == [
        ("ann", "ann/00_fixture/00_fixture.ipynb"),
        ("bob", "bob/00_fixture.ipynb"),
        ("cy", "cy/00_fixture/00_fixture.ipynb"),
    ]
    assert len(warnings) == 1 and "bad name" in warnings[0]


def test_lectures_resolve():
    assert resolve_lectures("all", FIXTURE) == [LECTURE]
    assert resolve_lectures(LECTURE, FIXTURE) == [LECTURE]
    with pytest.raises(UsageError, match="no lectures found"):
        resolve_lectures("all", FIXTURE / "nothing")


# --------------------------------------------------------------------------- real nbgrader runs


@pytest.fixture(scope="module")
def fixture_course(tmp_path_factory) -> Path:
    """``python -m autograder release`` of the fixture lecture into a scratch course/."""
    course = tmp_path_factory.mktemp("course")
    done = _cli("--course", str(course), "release")
    assert done.returncode == 0, done.stderr
    return course


def test_release_writes_learner_notebook_and_is_deterministic(fixture_course, tmp_path):
    released = fixture_course / LECTURE / f"{LECTURE}.ipynb"
    assert sorted(p.name for p in (fixture_course / LECTURE).iterdir()) == [f"{LECTURE}.ipynb"]
    text = released.read_text()
    assert "raise NotImplementedError()" in text and "BEGIN SOLUTION" not in text
    assert "hidden_rng" not in text and "HiddenTest" not in text  # no hidden test in the release
    assert '"outputs": []' in text and '"execution_count": null' in text
    # a fresh generation gives the same bytes (deterministic), so --check passes
    check = _cli("--course", str(fixture_course), "release", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "matches a fresh release" in check.stdout
    # a hand edit of course/ and a stray file are caught
    edited = tmp_path / LECTURE
    shutil.copytree(fixture_course / LECTURE, edited)
    (edited / f"{LECTURE}.ipynb").write_text(text.replace("raise NotImplementedError()", "pass"))
    (edited / "stray.txt").write_text("not from solutions/")
    problems = compare(fixture_course / LECTURE, edited)
    assert problems == [
        f"{edited / 'stray.txt'} is not generated from solutions/",
        f"{edited / (LECTURE + '.ipynb')} differs from a fresh release",
    ]
    assert compare(fixture_course / LECTURE, tmp_path / "absent") == [
        f"{tmp_path / 'absent'} is missing (run `make release`)"
    ]


@pytest.fixture(scope="module")
def fixture_class(fixture_course, tmp_path_factory):
    """A class graded by the command line: (completed process, out folder)."""
    solutions_nb = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
    ex1, ex2 = exercises(solutions_nb)
    subs = tmp_path_factory.mktemp("subs")
    write(solutions_nb, subs / "alice" / f"{LECTURE}.ipynb")
    write(read(fixture_course / LECTURE / f"{LECTURE}.ipynb"), subs / "bob" / LECTURE / f"{LECTURE}.ipynb")
    cheat = submission(solutions_nb, {ex2.cell: "return F.layer_norm(x, x.shape[-1:], eps=eps)"})
    write(cheat, subs / "carol" / f"{LECTURE}.ipynb")
    looping = submission(solutions_nb, {ex1.cell: "while True:\n    pass"})
    write(looping, subs / "dave" / f"{LECTURE}.ipynb")
    (subs / "erin").mkdir()
    (subs / "erin" / f"{LECTURE}.ipynb").write_text("{ this is not json")
    out = tmp_path_factory.mktemp("out")
    done = _cli("grade", str(subs), "--lecture", LECTURE, "--out", str(out), "--timeout", "12")
    return done, out


def test_class_graded_from_the_command_line(fixture_class):
    done, out = fixture_class
    assert done.returncode == 0, done.stderr
    with open(out / "scores.csv") as fh:
        rows = {r["student"]: r for r in csv.DictReader(fh)}
    assert list(next(iter(rows.values()))) == [
        "student", "lecture", "ex1_scores_test", "ex2_layer_norm_test", "total", "max", "status", "notes",
    ]
    got = {s: (r["ex1_scores_test"], r["ex2_layer_norm_test"], r["total"], r["max"], r["status"]) for s, r in rows.items()}
    assert got == {
        "alice": ("1", "2", "3", "3", "graded"),  # the solutions
        "bob": ("0", "0", "0", "3", "graded"),  # untouched
        "carol": ("1", "0", "1", "3", "graded"),  # ex2 calls F.layer_norm: blocked in hidden tests
        "dave": ("0", "2", "2", "3", "graded"),  # ex1 loops forever: stopped, graded 0
        "erin": ("0", "0", "0", "3", "error"),  # not a notebook: 0, and the class goes on
    }
    assert "ReferenceBlocked" in rows["carol"]["notes"]
    assert "time limit" in rows["dave"]["notes"]
    assert rows["erin"]["notes"]
    for student in ("alice", "bob", "carol", "dave"):
        html = out / "feedback" / student / f"{LECTURE}.html"
        assert html.exists() and "ex2_layer_norm_test" in html.read_text()
    assert "ReferenceBlocked" in (out / "feedback" / "carol" / f"{LECTURE}.html").read_text()
    assert "alice  00_fixture  3/3  graded" in done.stdout


def test_grading_mode_is_on_while_grading(fixture_class):
    _, out = fixture_class
    nb = read(out / "work" / LECTURE / "alice" / "autograded" / "alice" / LECTURE / f"{LECTURE}.ipynb")
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert printed.startswith("grading"), printed


def test_workspace_outside_the_repository(fixture_class):
    _, out = fixture_class
    assert REPO not in out.parents
    assert not list(REPO.glob("gradebook.db")) and not (FIXTURE / LECTURE / "gradebook.db").exists()
    assert sorted(p.name for p in (FIXTURE / LECTURE).iterdir()) == [f"{LECTURE}.ipynb", "hidden_tests.py"]


def test_release_failure_is_one_line_naming_nbgrader_s_complaint(tmp_path):
    nb = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
    ex1, _ = exercises(nb)
    nb.cells[ex1.cell + 1].metadata["nbgrader"]["grade_id"] = ex1.grade_id  # duplicate id
    write(nb, tmp_path / "sol" / "00_bad" / "00_bad.ipynb")
    done = subprocess.run(
        [sys.executable, "-m", "autograder", "--solutions", str(tmp_path / "sol"),
         "--course", str(tmp_path / "course"), "release"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "autograder: error: release of 00_bad failed: generate_assignment failed: "
        "jsonschema.exceptions.ValidationError: Duplicate grade id: ex1_scores"
    )
    assert not (tmp_path / "course").exists()


def test_missing_lecture_gets_a_zero_row(tmp_path):
    from autograder.grade import Exercise, _row, write_csv

    exs = {"01_a": [Exercise("t1", 1.0), Exercise("t2", 2.0)], "02_b": [Exercise("u1", 4.0)]}
    rows = [
        _row("ann", "01_a", exs["01_a"], {"status": "ok", "scores": {"t1": 1.0, "t2": 0.5}, "errors": []}, tmp_path),
        _row("ann", "02_b", exs["02_b"], None, tmp_path),
        _row("bo", "01_a", exs["01_a"], {"status": "error", "message": "grading took too long"}, tmp_path),
    ]
    write_csv(rows, exs, tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "student,lecture,t1,t2,u1,total,max,status,notes",
        "ann,01_a,1,0.50,,1.50,3,graded,",
        "ann,02_b,,,0,0,4,missing,no notebook handed in",
        "bo,01_a,0,0,,0,3,error,grading took too long",
    ]


def test_nbgrader_own_autograde_decides_the_hidden_tests_too(tmp_path):
    """nbgrader's own tools with autograder/nbgrader_config.py grade like the command: a
    cheat that passes the visible tests loses the exercise on the hidden tests."""
    import os

    from nbgrader.api import Gradebook

    nb = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
    _, ex2 = exercises(nb)
    cheat = submission(nb, {ex2.cell: "return F.layer_norm(x, x.shape[-1:], eps=eps)"})
    write(cheat, tmp_path / "autograder" / "_work" / "submitted" / "ann" / LECTURE / f"{LECTURE}.ipynb")
    common = [f"--NbGrader.config_file={REPO / 'autograder' / 'nbgrader_config.py'}",
              f"--CourseDirectory.root={tmp_path}", f"--CourseDirectory.source_directory={FIXTURE}",
              f"--CourseDirectory.db_url=sqlite:///{tmp_path / 'gradebook.db'}"]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for step in (["generate_assignment", LECTURE, f"--CourseDirectory.release_directory={tmp_path / 'release'}"],
                 ["autograde", LECTURE]):
        done = subprocess.run([str(Path(sys.executable).parent / "nbgrader"), *step, *common, "--force"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        grades = {g.name: g.score for n in gb.find_submission(LECTURE, "ann").notebooks for g in n.grades}
    assert grades == {"ex1_scores_test": 1.0, "ex2_layer_norm_test": 0.0}


class _FlakyAPI:
    """nbgrader's API whose kernel fails to start the first ``failures`` times."""

    def __init__(self, failures: int, other_error: str | None = None):
        self.failures, self.other_error, self.calls = failures, other_error, 0

    def autograde(self, lecture, student, force=True, create=True):
        self.calls += 1
        if self.other_error:
            return {"success": False, "log": self.other_error, "error": ""}
        if self.calls <= self.failures:
            return {"success": False, "error": "", "log": "[ERROR] RuntimeError: Kernel died before replying to kernel_info"}
        return {"success": True, "log": ""}


def test_a_kernel_that_fails_to_start_is_retried_not_graded_zero(monkeypatch, capsys):
    """Measured in CI: on a loaded machine the course's kernel once died before running a cell,
    and the student got an "error" row and no feedback. That is never the learner's doing."""
    from autograder import worker

    monkeypatch.setattr(worker, "_cleanup_processes", lambda client=None: None)
    monkeypatch.setattr(worker.time, "sleep", lambda s: None)
    worker._EVENTS[:] = ["sandbox note"]
    api = _FlakyAPI(failures=2)
    assert worker._autograde(api, "00_fixture", "ann", attempts=3)["success"] and api.calls == 3
    assert worker._EVENTS == ["sandbox note"]  # the failed starts left no note
    assert capsys.readouterr().err.count("the kernel failed to start") == 2
    api = _FlakyAPI(failures=5)
    assert not worker._autograde(api, "00_fixture", "ann", attempts=3)["success"] and api.calls == 3
    assert any("failed to start 3 times" in e for e in worker._EVENTS)
    api = _FlakyAPI(failures=0, other_error="[ERROR] ValidationError: Duplicate grade id: ex1")
    assert not worker._autograde(api, "00_fixture", "ann", attempts=3)["success"] and api.calls == 1  # learner's error: once
    worker._EVENTS.clear()
