"""An instructor's ``~/.jupyter/nbgrader_config.py`` on the hub: the course is their clone of the
repository at ``~/transformer-lab`` (nbgrader's source is its ``solutions/``, the release its
``course/``, collected submissions go to ``autograder/_work/submitted/``).

    git clone <the course repository> ~/transformer-lab
    mkdir -p ~/.jupyter && cp ~/transformer-lab/autograder/jupyterhub/instructor_nbgrader_config.py ~/.jupyter/nbgrader_config.py

The formgrader (nbgrader's tab in JupyterLab) and ``nbgrader release_assignment`` /
``nbgrader collect`` in a terminal then work on that clone with the hub's exchange and course id
(this folder's nbgrader_config.py, loaded before this file).
"""

import os

c = get_config()  # noqa: F821 - provided by traitlets

_course = os.path.join(os.path.expanduser("~"), "transformer-lab")
load_subconfig(os.path.join(_course, "autograder", "nbgrader_config.py"))  # noqa: F821
c.CourseDirectory.root = _course
# the gradebook and collected submissions go here (git-ignored, so not in a fresh clone)
os.makedirs(os.path.join(_course, "autograder", "_work"), exist_ok=True)
c.CourseDirectory.course_id = os.environ.get("TLAB_COURSE_ID", "transformer-lab")
