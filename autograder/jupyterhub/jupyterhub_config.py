"""JupyterHub for the course on one host: local Unix users, nbgrader's exchange (nbgrader 0.9).

Run it as root from the course's environment (autograder/jupyterhub/README.md)::

    cd /srv/jupyterhub      # the hub's state (jupyterhub.sqlite, cookie secret) goes here
    TLAB_INSTRUCTORS=teacher TLAB_STUDENTS=ann,bob \\
        /opt/transformer-lab/.venv/bin/jupyterhub -f /opt/transformer-lab/autograder/jupyterhub/jupyterhub_config.py

Settings (environment variables, read when the hub starts):

``TLAB_INSTRUCTORS``, ``TLAB_STUDENTS``
    comma-separated Unix user names. Instructors go in the JupyterHub group
    ``formgrade-<course>``, students in ``nbgrader-<course>``: nbgrader's ``JupyterHubAuthPlugin``
    (set in this folder's nbgrader_config.py) reads these groups to know who takes which course.
    Only these users can log in (PAM: their Unix password).
``TLAB_COURSE_ID``
    nbgrader's course id (default ``transformer-lab``, the autograder's).
``TLAB_EXCHANGE``
    nbgrader's exchange folder (default ``/srv/nbgrader/exchange``; created mode 0777 here, as
    nbgrader wants it: students write their submissions into ``<course>/inbound``, which they
    cannot list).

Every user's server is ``jupyterhub-singleuser`` from the environment this hub runs from (the
course's ``.venv``: PyTorch, the library, nbgrader's extensions), started by
``LocalProcessSpawner`` as that Unix user in their home folder, with this folder's
nbgrader_config.py as the global nbgrader configuration (``JUPYTER_CONFIG_PATH``).
"""

import ctypes
import importlib.util
import os
import pwd
import sys
import tempfile
from pathlib import Path

from autograder import sandbox as sb  # mount(2) helpers, the same as the grader's sandbox
from jupyterhub.spawner import LocalProcessSpawner

c = get_config()  # noqa: F821 - provided by traitlets when JupyterHub loads this file

HERE = Path(__file__).resolve().parent
COURSE_ID = os.environ.get("TLAB_COURSE_ID", "transformer-lab")
EXCHANGE = os.environ.get("TLAB_EXCHANGE", "/srv/nbgrader/exchange")


def _names(variable: str) -> list[str]:
    return [n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()]


INSTRUCTORS, STUDENTS = _names("TLAB_INSTRUCTORS"), _names("TLAB_STUDENTS")
if not INSTRUCTORS:
    raise SystemExit("jupyterhub_config.py: TLAB_INSTRUCTORS is empty: expected the instructors' "
                     "Unix user names, comma-separated (and TLAB_STUDENTS the students')")
for _name in INSTRUCTORS + STUDENTS:
    try:
        pwd.getpwnam(_name)
    except KeyError:
        raise SystemExit(f"jupyterhub_config.py: '{_name}' is not a user on this host: expected "
                         "existing Unix accounts in TLAB_INSTRUCTORS and TLAB_STUDENTS "
                         "(useradd -m -K HOME_MODE=0700 NAME)") from None
both = sorted(set(INSTRUCTORS) & set(STUDENTS))
if both:
    raise SystemExit(f"jupyterhub_config.py: {', '.join(both)} in both TLAB_INSTRUCTORS and "
                     "TLAB_STUDENTS: expected each user in one of them")

# ------------------------------------------------------------------ who: users, groups, roles
c.Authenticator.allowed_users = set(INSTRUCTORS + STUDENTS)
c.JupyterHub.load_groups = {
    f"formgrade-{COURSE_ID}": {"users": INSTRUCTORS},
    f"nbgrader-{COURSE_ID}": {"users": STUDENTS},
}
c.JupyterHub.load_roles = [
    # A user's server token may do what its owner may: nbgrader's JupyterHubAuthPlugin reads the
    # owner's groups through the hub's API with it (nbgrader 0.9's demos do the same).
    {"name": "server", "scopes": ["inherit"]},
    # The course's groups see the hub's services (a shared grader account, if you add one as the
    # service named like the course: nbgrader's "multiple graders" set-up).
    {"name": f"formgrade-{COURSE_ID}", "groups": [f"formgrade-{COURSE_ID}"],
     "scopes": [f"access:services!service={COURSE_ID}", "list:services"]},
    {"name": f"nbgrader-{COURSE_ID}", "groups": [f"nbgrader-{COURSE_ID}"],
     "scopes": ["list:services", f"read:services!service={COURSE_ID}"]},
]

# ------------------------------------------------------------------ the exchange
if not os.path.isdir(EXCHANGE):
    os.makedirs(EXCHANGE)
os.chmod(EXCHANGE, 0o777)  # nbgrader's ExchangeReleaseAssignment insists on exactly 0777

# ------------------------------------------------------------------ the single-user servers
ENV_BIN = Path(sys.executable).parent  # the course's .venv/bin: this hub runs from it


_closed_ancestor = sb._closed_ancestor  # the topmost folder above a path others cannot enter


def _library() -> str:
    """The folder the course's library is imported from (lib/ of an editable install)."""
    spec = importlib.util.find_spec("transformer_lab")
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else sys.prefix


#: The environment (its Python, the library) where users cannot reach it: pyenv's Python under
#: /root, as on this project's CI machines, or a checkout in a closed folder. Empty on an
#: ordinary host (Python under /usr or /opt, the checkout in /opt).
HIDDEN_PYTHON = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, _library())
                        if _closed_ancestor(os.path.realpath(p))})


def _show_hidden_python() -> None:
    """In the child, before it becomes the user: a private mount namespace in which the folder
    that hides the Python (/root) is an empty tmpfs with only the Python bound back.
    Nothing else of that folder is visible, and the host's mounts are untouched."""
    libc = sb._c()
    if libc.unshare(sb.CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    sb._mount("none", "/", None, sb.MS_REC | sb.MS_PRIVATE)
    for top in sorted({_closed_ancestor(p) for p in HIDDEN_PYTHON}):
        paths = [p for p in HIDDEN_PYTHON if p.startswith(top + os.sep)]
        staged = []
        for path in paths:
            stage = tempfile.mkdtemp(prefix=".tlhub-stage-")
            sb._mount(path, stage, None, sb.MS_BIND | sb.MS_REC)
            staged.append((stage, path))
        sb._mount("tlhub", top, "tmpfs", sb.MS_NOSUID | sb.MS_NODEV, "size=64k,mode=0755")
        for stage, path in staged:
            os.makedirs(path, exist_ok=True)
            sb._mount(stage, path, None, sb.MS_BIND | sb.MS_REC)
            libc.umount2(stage.encode(), 2)  # MNT_DETACH
            os.rmdir(stage)


class CourseSpawner(LocalProcessSpawner):
    """LocalProcessSpawner that, where the environment's Python sits in a folder users cannot
    enter, shows them that Python (and nothing else of the folder) before dropping to the user."""

    def make_preexec_fn(self, name):
        become_user = super().make_preexec_fn(name)
        if not HIDDEN_PYTHON:
            return become_user

        def preexec():
            _show_hidden_python()
            become_user()

        return preexec


c.JupyterHub.spawner_class = CourseSpawner
c.Spawner.cmd = [str(ENV_BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    # nbgrader calls `alembic` by name; the course's commands first
    "PATH": f"{ENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    # this folder's nbgrader_config.py is every user's global nbgrader configuration
    "JUPYTER_CONFIG_PATH": str(HERE),
    "TLAB_COURSE_ID": COURSE_ID,
    "TLAB_EXCHANGE": EXCHANGE,
}
# JupyterLab with nbgrader's extensions takes a while to import on a busy machine
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180

# ------------------------------------------------------------------ the proxy
# configurable-http-proxy from npm, installed here by `make hub-setup` (else the one on PATH)
_chp = HERE / "node_modules" / ".bin" / "configurable-http-proxy"
if _chp.exists():
    c.ConfigurableHTTPProxy.command = [str(_chp)]
