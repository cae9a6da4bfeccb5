"""Start JupyterLab for a learner or for an instructor: ``make lab`` and ``make lab-instructor``.

    python jupyter/lab.py [--instructor] [FOLDER] [any jupyter lab option ...]

A learner's JupyterLab (the default; FOLDER defaults to ``course/``) runs with the config folder
``jupyter/learner/`` first on ``JUPYTER_CONFIG_PATH``: it turns nbgrader's server extensions and
its JupyterLab plugins off (Formgrader, Create Assignment, Course List, Assignment List and
Validate are an instructor's tools; for a learner they only showed "exchange directory does not
exist" and let a learner edit a cell's points; the notebooks' own visible tests are a learner's
check), turns off JupyterLab's news (a request to the internet and a pop-up), and reads notebooks
through ``learner_contents.LearnerContentsManager`` so that a notebook opened and not touched is
not marked as changed. ``--instructor`` (FOLDER defaults to the repository) leaves nbgrader as the install enabled
it (``make setup``). The browser test (``jupyter_book/tests/test_lab_browser.py``) starts
JupyterLab through :func:`command` and :func:`environment`, as ``make lab`` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEARNER_CONFIG = REPO / "jupyter" / "learner"


def environment(instructor: bool = False, base: dict | None = None) -> dict[str, str]:
    """The environment JupyterLab runs in: the learner's config folder first, the user's after."""
    env = dict(os.environ if base is None else base)
    if not instructor:
        for var, first in (("JUPYTER_CONFIG_PATH", LEARNER_CONFIG), ("PYTHONPATH", LEARNER_CONFIG.parent)):
            rest = env.get(var)  # ``learner_contents`` (the learner's contents manager) is in jupyter/
            env[var] = os.pathsep.join([str(first), *([rest] if rest else [])])
    return env


def command(folder: str | Path, extra: list[str] | None = None) -> list[str]:
    """``jupyter lab FOLDER`` with this interpreter's Jupyter; as root (containers, CI images)
    Jupyter refuses to start without ``--allow-root``."""
    jupyter = Path(sys.executable).with_name("jupyter")
    args = [str(jupyter), "lab", str(folder)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    return args + list(extra or [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    instructor = "--instructor" in argv
    argv = [a for a in argv if a != "--instructor"]
    folder = argv.pop(0) if argv and not argv[0].startswith("-") else str(REPO if instructor else REPO / "course")
    args = command(folder, argv)
    os.execve(args[0], args, environment(instructor))
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
