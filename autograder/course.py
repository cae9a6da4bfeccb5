"""Where the course lives and how nbgrader is configured to see it.

nbgrader's vocabulary mapped onto this repository:

=====================  ==========================================  =============================
nbgrader step          CourseDirectory trait                       here
=====================  ==========================================  =============================
source (instructor)    ``CourseDirectory.source_directory``        ``solutions/``
release (learners)     ``CourseDirectory.release_directory``       ``course/``
submitted              ``CourseDirectory.submitted_directory``     ``submitted/`` (workspace)
autograded             ``CourseDirectory.autograded_directory``    ``autograded/`` (workspace)
feedback               ``CourseDirectory.feedback_directory``      ``feedback/`` (workspace)
=====================  ==========================================  =============================

An assignment is a lecture: ``solutions/NN_topic/NN_topic.ipynb`` is released as
``course/NN_topic/NN_topic.ipynb``. nbgrader itself only ever runs in a scratch
root (a temporary folder for a release, the grading workspace for grading), with
its own gradebook there, so the repository never gets a ``gradebook.db``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from traitlets.config import Config

#: The repository checkout this package sits in.
REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"
COURSE = REPO / "course"
#: Where `grade` writes unless told otherwise (git-ignored).
DEFAULT_OUT = REPO / "autograder" / "_work" / "grades"
#: Where a learner's ``grade my.ipynb`` writes unless told otherwise (git-ignored).
SELFCHECK_OUT = REPO / "autograder" / "_work" / "selfcheck"

COURSE_ID = "transformer-lab"
SOURCE_DIRNAME = "solutions"
RELEASE_DIRNAME = "course"
DEFAULT_TIMEOUT = 60  # seconds per notebook cell while grading
GRADING_ENV = "TRANSFORMER_LAB_GRADING"
#: The course secret that seeds the hidden tests' inputs (``grading.hidden_rng``).
SECRET_ENV = "TRANSFORMER_LAB_SECRET"
HIDDEN_BEGIN, HIDDEN_END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
#: What the feedback shows in place of a cell's hidden tests.
HIDDEN_PLACEHOLDER = "# (hidden tests ran here; their code is not shown)"

#: A lecture folder: two digits, underscore, lower-case topic (``01_attention``).
LECTURE_RE = re.compile(r"^\d\d_[a-z0-9][a-z0-9_]*$")

#: A lecture's hidden tests, beside its notebook in solutions/ (``autograder/hidden.py``):
#: read by the trusted grader only, never released.
HIDDEN_TESTS_FILE = "hidden_tests.py"
#: A lecture's corpus of known wrong answers and their hints (``autograder/mistakes.py``): for the
#: course's own tests, never released (a learner reads their hints one at a time, from the tests).
KNOWN_MISTAKES_FILE = "known_mistakes.py"
#: Files nbgrader and the release never carry over.
IGNORE = (".ipynb_checkpoints", "__pycache__", "*.pyc", ".DS_Store", "gradebook.db", ".nbgrader.log",
          HIDDEN_TESTS_FILE, KNOWN_MISTAKES_FILE)


class UsageError(Exception):
    """Bad input to the command: reported as one line, exit status 2."""


def lectures_in(solutions: Path) -> list[str]:
    """The lectures in ``solutions``: ``NN_topic`` folders holding ``NN_topic.ipynb``, sorted."""
    if not solutions.is_dir():
        return []
    return sorted(
        p.name
        for p in solutions.iterdir()
        if p.is_dir() and LECTURE_RE.match(p.name) and (p / f"{p.name}.ipynb").is_file()
    )


def resolve_lectures(choice: str | None, solutions: Path) -> list[str]:
    """``None``/``"all"`` → every lecture; ``"NN_topic"`` → that one, if it exists."""
    known = lectures_in(solutions)
    if not known:
        raise UsageError(
            f"no lectures found in {solutions}: expected folders NN_topic/NN_topic.ipynb"
        )
    if choice in (None, "", "all"):
        return known
    if choice not in known:
        raise UsageError(
            f"unknown lecture {choice!r}: expected 'all' or one of {', '.join(known)}"
        )
    return [choice]


def nbgrader_config(root: Path, timeout: int | None = None) -> Config:
    """The nbgrader configuration for a scratch course root (release or grading)."""
    root = Path(root).resolve()
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = COURSE_ID
    c.CourseDirectory.source_directory = SOURCE_DIRNAME
    c.CourseDirectory.release_directory = RELEASE_DIRNAME
    c.CourseDirectory.submitted_directory = "submitted"
    c.CourseDirectory.autograded_directory = "autograded"
    c.CourseDirectory.feedback_directory = "feedback"
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    c.CourseDirectory.ignore = list(IGNORE)
    # The release stub: defining the function works, calling it raises.
    c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
    # The feedback shows each test cell's pass/fail and error message, never the hidden tests' code.
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import GetGrades

    c.GenerateFeedback.preprocessors = [
        GetGrades,
        __getattr__("HideHiddenTests"),
        CSSHTMLHeaderPreprocessor,
    ]
    # The sandbox kills every process of the grading uid afterwards, so waiting for a
    # graceful kernel exit is idle time (0.5-2.6 s a submission, benchmarks/README.md).
    c.Execute.shutdown_kernel = "immediate"
    if timeout is not None:
        # per cell; nbgrader's Execute subclasses nbconvert's ExecutePreprocessor
        c.ExecutePreprocessor.timeout = int(timeout)
        c.Execute.timeout = int(timeout)
        c.Execute.interrupt_on_timeout = True
    return c


def _hide_hidden_region(source: str) -> tuple[str, bool]:
    lines, inside, found = [], False, False
    for line in source.split("\n"):
        if HIDDEN_BEGIN in line:
            inside, found = True, True
        elif HIDDEN_END in line:
            inside = False
            lines.append(line[: len(line) - len(line.lstrip())] + HIDDEN_PLACEHOLDER)
        elif not inside:
            lines.append(line)
    if inside:  # no END marker: hide to the end of the cell
        lines.append(HIDDEN_PLACEHOLDER)
    return "\n".join(lines), found


def _make_hide_hidden_tests():
    # built on first use, so that importing this module (the command's start-up) skips nbconvert
    from nbconvert.preprocessors import Preprocessor
    from traitlets import Bool

    class HideHiddenTests(Preprocessor):
        """Feedback preprocessor: drop the ``### BEGIN/END HIDDEN TESTS`` region of every code cell
        (a one-line placeholder stays) and shorten the traceback of a cell that had hidden tests
        to ``ErrorName: message``, so the student sees pass/fail and the error, not the test code."""

        enabled = Bool(True).tag(config=True)

        def preprocess_cell(self, cell, resources, index):
            if cell.get("cell_type") != "code":
                return cell, resources
            cell.source, found = _hide_hidden_region(cell.source)
            if found:
                for out in cell.get("outputs", []):
                    if out.get("output_type") == "error":
                        out["traceback"] = [f"{out.get('ename', '')}: {out.get('evalue', '')}"]
            return cell, resources

    HideHiddenTests.__module__ = __name__
    HideHiddenTests.__qualname__ = "HideHiddenTests"
    return HideHiddenTests


def __getattr__(name: str):
    if name == "HideHiddenTests":
        if "_HideHiddenTests" not in globals():
            globals()["_HideHiddenTests"] = _make_hide_hidden_tests()
        return globals()["_HideHiddenTests"]
    raise AttributeError(name)


def _py(value) -> str:
    """Python source for a config value (classes as imports, so the file can be loaded)."""
    if isinstance(value, type):
        return f"__import__('importlib').import_module({value.__module__!r}).{value.__qualname__}"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def config_file_text(config: Config) -> str:
    """``nbgrader_config.py`` text for a scratch root, so an instructor can rerun nbgrader there."""
    lines = ["# Written by `python -m autograder`; nbgrader reads it from its working directory.",
             "c = get_config()  # noqa: F821"]
    for section in sorted(config):
        for key in sorted(config[section]):
            lines.append(f"c.{section}.{key} = {_py(config[section][key])}")
    return "\n".join(lines) + "\n"


def tool_env(grading: bool = False) -> dict[str, str]:
    """Environment for nbgrader: this interpreter's ``bin`` first on PATH (nbgrader runs
    ``alembic`` by name), and grading mode on when grading."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if grading:
        env[GRADING_ENV] = "1"
        # one worker per core already fills the machine: a kernel's own thread pool would
        # oversubscribe it (measured in benchmarks/grading.py)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    else:
        env.pop(GRADING_ENV, None)
    env.setdefault("PYTHONHASHSEED", "0")
    return env
