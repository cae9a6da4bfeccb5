"""Every hub user's global nbgrader configuration (nbgrader 0.9), students and instructors.

jupyterhub_config.py puts this folder on each single-user server's ``JUPYTER_CONFIG_PATH``, so
nbgrader's Assignments tab, its formgrader and the ``nbgrader`` commands in a user's terminal all
read it (Zero to JupyterHub: copy it to ``/etc/jupyter/nbgrader_config.py`` in the image, see
README.md). An instructor's own ``~/.jupyter/nbgrader_config.py`` (instructor_nbgrader_config.py)
comes on top of it.
"""

import os

from nbgrader.auth import JupyterHubAuthPlugin

c = get_config()  # noqa: F821 - provided by traitlets

c.CourseDirectory.course_id = os.environ.get("TLAB_COURSE_ID", "transformer-lab")
c.Exchange.root = os.environ.get("TLAB_EXCHANGE", "/srv/nbgrader/exchange")
# Who takes which course comes from the hub's groups nbgrader-<course> / formgrade-<course>,
# and a fetched lecture lands in ~/<course>/<NN_topic>/ (several courses side by side).
c.Authenticator.plugin_class = JupyterHubAuthPlugin
c.Exchange.path_includes_course = True
