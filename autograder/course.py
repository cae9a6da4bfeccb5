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

COURSE_ID = "transformer-lab"
SOURCE_DIRNAME = "solutions"
RELEASE_DIRNAME = "course"
DEFAULT_TIMEOUT = 60  # seconds per notebook cell while grading
GRADING_ENV = "TRANSFORMER_LAB_GRADING"

#: A lecture folder: two digits, underscore, lower-case topic (``01_attention``).
LECTURE_RE = re.compile(r"^\d\d_[a-z0-9][a-z0-9_]*$")

#: Files nbgrader and the release never carry over.
IGNORE = (".ipynb_checkpoints", "__pycache__", "*.pyc", ".DS_Store", "gradebook.db", ".nbgrader.log")


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
    if timeout is not None:
        # per cell; nbgrader's Execute subclasses nbconvert's ExecutePreprocessor
        c.ExecutePreprocessor.timeout = int(timeout)
        c.Execute.timeout = int(timeout)
        c.Execute.interrupt_on_timeout = True
    return c


def config_file_text(config: Config) -> str:
    """``nbgrader_config.py`` text for a scratch root, so an instructor can rerun nbgrader there."""
    lines = ["# Written by `python -m autograder`; nbgrader reads it from its working directory.",
             "c = get_config()  # noqa: F821"]
    for section in sorted(config):
        for key in sorted(config[section]):
            lines.append(f"c.{section}.{key} = {config[section][key]!r}")
    return "\n".join(lines) + "\n"


def tool_env(grading: bool = False) -> dict[str, str]:
    """Environment for nbgrader: this interpreter's ``bin`` first on PATH (nbgrader runs
    ``alembic`` by name), and grading mode on when grading."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if grading:
        env[GRADING_ENV] = "1"
    else:
        env.pop(GRADING_ENV, None)
    env.setdefault("PYTHONHASHSEED", "0")
    return env
