"""nbgrader's configuration for this repository, for nbgrader's own tools (nbgrader 0.9).

`python -m autograder` does not need this file: it builds the same configuration
(autograder/course.py) in a scratch root for every run. Use this one to drive
nbgrader directly on the repository, e.g. from the repository root::

    nbgrader generate_assignment 01_attention --NbGrader.config_file=autograder/nbgrader_config.py
    nbgrader autograde 01_attention --NbGrader.config_file=autograder/nbgrader_config.py

or copy it to ./nbgrader_config.py at the repository root, where you start
JupyterLab, to use the formgrader. solutions/ is nbgrader's source directory and course/ its release
directory; submitted/, autograded/, feedback/ and the gradebook live in the
git-ignored autograder/_work/. ``nbgrader autograde`` runs the notebook with the
autograder's Execute step, which also decides the hidden tests
(solutions/NN_topic/hidden_tests.py) outside the student's kernel, so its scores are
the ones ``python -m autograder grade`` gives.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
# autograder/nbgrader_config.py, or a copy of it at the repository root
_root = _here if os.path.isdir(os.path.join(_here, "autograder")) else os.path.dirname(_here)
if _root not in sys.path:
    sys.path.insert(0, _root)

from autograder.course import nbgrader_config  # noqa: E402
from autograder.worker import autograde_preprocessors  # noqa: E402

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file
c.merge(nbgrader_config(_root))
_work = os.path.join("autograder", "_work")
c.CourseDirectory.submitted_directory = os.path.join(_work, "submitted")
c.CourseDirectory.autograded_directory = os.path.join(_work, "autograded")
c.CourseDirectory.feedback_directory = os.path.join(_work, "feedback")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(_root, _work, "gradebook.db")
c.Autograde.autograde_preprocessors = autograde_preprocessors()
