"""The course on a real JupyterHub (autograder/jupyterhub/), one whole round of lecture 01.

A JupyterHub from the course's environment starts on 127.0.0.1 with
autograder/jupyterhub/jupyterhub_config.py (loaded unchanged; the test's own config only adds
ports, a state folder and an API token for itself), behind configurable-http-proxy from npm
(``make hub-setup``). Three real Unix users are created: an instructor and two students. The
round goes through the hub's REST API and each user's own single-user server, as the
JupyterLab UI does it:

* the instructor's server: nbgrader's formgrader API (``/formgrader/api/assignment/<id>/release``
  and ``/collect``), the handlers behind the formgrader's Release and Collect buttons, working on
  the instructor's clone of the course in their home (instructor_nbgrader_config.py);
* each student's server: nbgrader's assignment-list API (``/assignments``,
  ``/assignments/fetch``, ``/assignments/submit``), the handlers behind the Assignments tab, and
  the Jupyter contents API to read and save the notebook (one student copies the solutions'
  answer cells in, the other hands in the notebook untouched).

nbgrader runs in those servers as the user, with the hub's groups (``JupyterHubAuthPlugin``), so
the exchange's permissions are the real ones. The collected submissions are then graded with
``python -m autograder grade`` (as root, with the sandbox) and the CSV must say 8/8 and 0/8.
Finally, as the second student (a process with their uid), reading the other student's work, the
exchange's inbound folder and the instructor's solutions/ must each be refused.

Needs root (to create users and run the hub), Linux, and ``make hub-setup`` (the proxy; ``make
test`` runs it); it skips, saying which, otherwise. About 1-2 minutes; alone: ``make test-hub``.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from autograder.course import REPO

HUB_DIR = REPO / "autograder" / "jupyterhub"
CHP = HUB_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
BIN = Path(sys.executable).parent
LECTURE = "01_attention"
COURSE = "transformer-lab"


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "JupyterHub with local users: Linux only"
    if os.geteuid() != 0:
        return "needs root: creates Unix users and runs JupyterHub's LocalProcessSpawner"
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        return "useradd/userdel not found: cannot create the course's users"
    if not (BIN / "jupyterhub").exists():
        return "jupyterhub is not installed in the environment: pip install -e '.[hub]'"
    if not CHP.exists():
        return f"configurable-http-proxy is not installed ({CHP}): run `make hub-setup`"
    from autograder import sandbox

    closed = [p for p in (sys.prefix, sys.base_prefix)
              if sandbox._closed_ancestor(os.path.realpath(p))]
    ok, why = sandbox.available()
    if closed and not ok:
        return (f"the environment's Python ({', '.join(closed)}) is in a folder other users cannot "
                f"enter and mount namespaces are refused here, so users' servers cannot run it ({why})")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(name: str, *cmd: str) -> subprocess.CompletedProcess:
    """``cmd`` run by a process with ``name``'s uid, gid and groups (coreutils, no Python)."""
    return subprocess.run(list(cmd), user=name, group=name, extra_groups=[], capture_output=True,
                          text=True, cwd="/", timeout=60, env={"PATH": "/usr/bin:/bin"})


def _server_uids(user: str) -> set[int]:
    """The uids of the processes running ``user``'s jupyterhub-singleuser."""
    uids = set()
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
            if any(a.endswith(b"jupyterhub-singleuser") for a in cmd) and \
                    f"JUPYTERHUB_USER={user}".encode() in env:
                uids.add(proc.stat().st_uid)
        except OSError:
            continue
    return uids


def _refused(name: str, *cmd: str) -> str:
    r = _as_user(name, *cmd)
    assert r.returncode != 0 and "Permission denied" in r.stderr, (
        f"{name} could run {' '.join(cmd)}: rc {r.returncode}, {r.stdout[:200]!r} {r.stderr!r}")
    return r.stderr.strip()


def _load_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Load jupyterhub_config.py as JupyterHub does (traitlets), print what it set as JSON."""
    code = (
        "import json, sys\n"
        "from traitlets.config.loader import PyFileConfigLoader\n"
        f"c = PyFileConfigLoader('jupyterhub_config.py', path={str(HUB_DIR)!r}).load_config()\n"
        "print(json.dumps({'groups': c.JupyterHub.load_groups, 'roles': c.JupyterHub.load_roles,\n"
        "  'users': sorted(c.Authenticator.allowed_users), 'cmd': c.Spawner.cmd,\n"
        "  'env': c.Spawner.environment, 'proxy': c.ConfigurableHTTPProxy.command}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "TLAB_EXCHANGE": str(tmp_path / "exchange"), **env},
                          timeout=120)


def test_hub_config_sets_the_course_groups_roles_and_environment(tmp_path):
    root = pwd.getpwuid(0).pw_name  # a user that exists everywhere
    r = _load_config(tmp_path, TLAB_INSTRUCTORS=root, TLAB_STUDENTS="")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["groups"] == {f"formgrade-{COURSE}": {"users": [root]}, f"nbgrader-{COURSE}": {"users": []}}
    roles = {role["name"]: role for role in got["roles"]}
    assert roles["server"]["scopes"] == ["inherit"]
    assert roles[f"nbgrader-{COURSE}"]["groups"] == [f"nbgrader-{COURSE}"]
    assert got["users"] == [root]
    assert got["cmd"] == [str(BIN / "jupyterhub-singleuser")] and (BIN / "jupyterhub-singleuser").exists()
    assert got["env"]["JUPYTER_CONFIG_PATH"] == str(HUB_DIR)
    assert (HUB_DIR / "nbgrader_config.py").is_file()
    assert got["env"]["TLAB_EXCHANGE"] == str(tmp_path / "exchange")
    assert (tmp_path / "exchange").stat().st_mode & 0o777 == 0o777
    if CHP.exists():
        assert got["proxy"] == [str(CHP)]


@pytest.mark.parametrize("env, expected", [
    ({"TLAB_INSTRUCTORS": ""}, "TLAB_INSTRUCTORS is empty: expected the instructors' Unix user names"),
    ({"TLAB_INSTRUCTORS": "root", "TLAB_STUDENTS": "no-such-user-tlh"},
     "'no-such-user-tlh' is not a user on this host: expected existing Unix accounts"),
    ({"TLAB_INSTRUCTORS": "root", "TLAB_STUDENTS": "root"},
     "root in both TLAB_INSTRUCTORS and TLAB_STUDENTS: expected each user in one of them"),
])
def test_hub_config_refuses_bad_input_in_one_line(tmp_path, env, expected):
    env = {k: v.replace("root", pwd.getpwuid(0).pw_name) for k, v in env.items()}
    r = _load_config(tmp_path, **env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "exchange").exists()  # nothing made


class Hub:
    """A running JupyterHub, its admin token, and helpers to reach the hub and users' servers."""

    def __init__(self, root: Path, instructors: list[str], students: list[str], exchange: Path):
        import requests

        self.requests = requests
        self.root = root
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.token = secrets.token_hex(24)
        self.tokens: dict[str, str] = {}
        config = root / "test_jupyterhub_config.py"
        config.write_text(
            "c = get_config()\n"
            f"load_subconfig({str(HUB_DIR / 'jupyterhub_config.py')!r})\n"
            f"c.JupyterHub.bind_url = {self.url!r}\n"
            f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{_free_port()}'\n"
            f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{_free_port()}'\n"
            f"c.JupyterHub.db_url = 'sqlite:///{root / 'jupyterhub.sqlite'}'\n"
            f"c.JupyterHub.cookie_secret_file = {str(root / 'jupyterhub_cookie_secret')!r}\n"
            f"c.ConfigurableHTTPProxy.pid_file = {str(root / 'proxy.pid')!r}\n"
            "c.JupyterHub.services = [{'name': 'round-test', 'api_token': "
            f"{self.token!r}}}]\n"
            "c.JupyterHub.load_roles.append({'name': 'round-test', 'services': ['round-test'], "
            "'scopes': ['admin:users', 'admin:servers', 'tokens', 'list:groups', 'read:groups']})\n"
        )
        env = dict(os.environ, TLAB_INSTRUCTORS=",".join(instructors),
                   TLAB_STUDENTS=",".join(students), TLAB_EXCHANGE=str(exchange),
                   PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        env.pop("TRANSFORMER_LAB_SECRET", None)
        self.log = root / "jupyterhub.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "jupyterhub"), "-f", str(config)], cwd=root, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(lambda: self.api("GET", "/").ok, 120, "the hub's API")

    # -- plumbing
    def _wait(self, ok, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"JupyterHub exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if ok():
                    return
            except self.requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out after {seconds} s waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def api(self, method: str, path: str, **kw):
        return self.requests.request(method, f"{self.url}/hub/api{path}", timeout=60,
                                     headers={"Authorization": f"token {self.token}"}, **kw)

    def user(self, name: str, method: str, path: str, **kw):
        """A request to ``name``'s own server, with a token of ``name``'s (as their browser)."""
        r = self.requests.request(method, f"{self.url}/user/{name}{path}", timeout=120,
                                  headers={"Authorization": f"token {self.tokens[name]}"}, **kw)
        assert r.ok, f"{method} /user/{name}{path}: {r.status_code} {r.text[:500]}\n{self.tail()}"
        return r

    def run_code(self, name: str, code: str) -> str:
        """Run ``code`` in a new Python kernel of ``name``'s server (the notebook's channels
        websocket, as JupyterLab does) and return its stdout."""
        import asyncio
        import uuid

        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        kernel = self.user(name, "POST", "/api/kernels", json={"name": "python3"}).json()["id"]
        msg_id = uuid.uuid4().hex
        request = {
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex,
                       "username": name, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }

        async def talk() -> str:
            ws = await websocket_connect(HTTPRequest(
                f"{self.url.replace('http', 'ws', 1)}/user/{name}/api/kernels/{kernel}/channels",
                headers={"Authorization": f"token {self.tokens[name]}"}, request_timeout=120))
            await ws.write_message(json.dumps(request))
            out, status = [], None
            while status is None:
                msg = json.loads(await asyncio.wait_for(ws.read_message(), 180))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    out.append("\n".join(msg["content"]["traceback"]))
                elif kind == "execute_reply":
                    status = msg["content"]["status"]
            ws.close()
            assert status == "ok", "".join(out)
            return "".join(out)

        try:
            return asyncio.run(talk())
        finally:
            self.user(name, "DELETE", f"/api/kernels/{kernel}")

    # -- the hub's REST API
    def start_servers(self, names: list[str]):
        for name in names:
            r = self.api("POST", f"/users/{name}/tokens", json={"note": "round test", "expires_in": 3600})
            assert r.ok, f"token for {name}: {r.status_code} {r.text}"
            self.tokens[name] = r.json()["token"]
            r = self.api("POST", f"/users/{name}/server")
            assert r.status_code in (201, 202), f"start {name}'s server: {r.status_code} {r.text}"

        def ready():
            return all(self.api("GET", f"/users/{n}").json()["servers"].get("", {}).get("ready")
                       for n in names)

        self._wait(ready, 240, f"the servers of {', '.join(names)}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the hub stops the users' servers and the proxy
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        pid_file = self.root / "proxy.pid"  # the proxy, if the hub did not stop it
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


@pytest.fixture
def course_users():
    """An instructor and two students: real Unix users with 0700 homes under a fresh folder."""
    why = _why_not()
    if why:
        pytest.skip(why)
    from autograder.sandbox import kill_uid

    base = Path(tempfile.mkdtemp(prefix="tlhub-"))
    base.chmod(0o755)
    tag = f"{os.getpid() % 100000}"
    names = {"instructor": f"tlh{tag}teach", "solver": f"tlh{tag}ann", "idle": f"tlh{tag}bob"}
    made = []
    try:
        for name in names.values():
            home = base / "home" / name
            subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                            "/bin/bash", "--user-group", name], check=True, capture_output=True)
            made.append(name)
            home.mkdir(parents=True)
            pw = pwd.getpwnam(name)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            home.chmod(0o700)
        (base / "home").chmod(0o755)
        yield base, names
    finally:
        for name in made:
            kill_uid(pwd.getpwnam(name).pw_uid)
            subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def closed_solutions():
    """The hub's checkout (here this one) with solutions/ closed to other users, as README.md
    says to deploy it: the environment and lib/ stay readable, the answers and hidden tests not.
    The mode is put back afterwards (git does not track it)."""
    solutions = REPO / "solutions"
    mode = solutions.stat().st_mode & 0o7777
    solutions.chmod(0o700)
    try:
        yield solutions
    finally:
        solutions.chmod(mode)


def _instructor_clone(home: Path, uid: int, gid: int) -> Path:
    """The instructor's clone of the course in their home (what `git clone` would give, the
    parts nbgrader and the formgrader use) and their ~/.jupyter/nbgrader_config.py."""
    clone = home / "transformer-lab"
    ignore = shutil.ignore_patterns("_work", "tests", "__pycache__", "node_modules", "*.pyc")
    shutil.copytree(REPO / "autograder", clone / "autograder", ignore=ignore)
    shutil.copytree(REPO / "solutions" / LECTURE, clone / "solutions" / LECTURE)
    shutil.copytree(REPO / "course" / LECTURE, clone / "course" / LECTURE)
    (home / ".jupyter").mkdir()
    shutil.copy2(HUB_DIR / "instructor_nbgrader_config.py", home / ".jupyter" / "nbgrader_config.py")
    for path in [home / ".jupyter", *home.joinpath(".jupyter").rglob("*"), clone, *clone.rglob("*")]:
        os.chown(path, uid, gid)
    return clone


def _solved(released: dict, solutions: Path) -> dict:
    """The released notebook with every answer cell replaced by the solutions' cell."""
    answers = {c.metadata.nbgrader.grade_id: c.source
               for c in nbformat.read(str(solutions), as_version=4).cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.from_dict(released)
    filled = 0
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and meta.get("grade_id") in answers:
            cell.source = answers[meta["grade_id"]]
            filled += 1
    assert filled == 4, f"expected lecture 01's 4 answer cells, filled {filled}"
    return nb


def test_a_round_of_lecture_01_on_jupyterhub(course_users, closed_solutions):
    base, names = course_users
    teacher, ann, bob = names["instructor"], names["solver"], names["idle"]
    homes = {n: base / "home" / n for n in names.values()}
    exchange = base / "exchange"
    pw = pwd.getpwnam(teacher)
    clone = _instructor_clone(homes[teacher], pw.pw_uid, pw.pw_gid)
    t0 = time.monotonic()
    hub = Hub(base, [teacher], [ann, bob], exchange)
    try:
        # the hub's groups, as nbgrader's JupyterHubAuthPlugin reads them
        r = hub.api("GET", "/groups")
        assert r.ok, f"GET /hub/api/groups: {r.status_code} {r.text}"
        groups = {g["name"]: set(g["users"]) for g in r.json()}
        assert groups[f"formgrade-{COURSE}"] == {teacher}
        assert groups[f"nbgrader-{COURSE}"] == {ann, bob}

        hub.start_servers([teacher, ann, bob])
        t_up = time.monotonic()
        for name in names.values():  # each server runs as its user
            assert _server_uids(name) == {pwd.getpwnam(name).pw_uid}, name

        # the course's environment works in a student's server: a kernel, as the student, with
        # the library and PyTorch (the notebooks' setup cell imports them)
        out = hub.run_code(ann, "import os, torch, transformer_lab; "
                                "print(os.getuid(), os.getcwd(), transformer_lab.__name__)")
        assert out.split() == [str(pwd.getpwnam(ann).pw_uid), str(homes[ann]), "transformer_lab"], out

        # 1. the instructor releases lecture 01 (formgrader's Release button)
        r = hub.user(teacher, "POST", f"/formgrader/api/assignment/{LECTURE}/release").json()
        assert r["success"], r
        outbound = exchange / COURSE / "outbound" / LECTURE / f"{LECTURE}.ipynb"
        assert outbound.read_bytes() == (REPO / "course" / LECTURE / f"{LECTURE}.ipynb").read_bytes()
        assert not (exchange / COURSE / "outbound" / LECTURE / "hidden_tests.py").exists()

        # 2. each student fetches it through their own server (the Assignments tab)
        path = f"{COURSE}/{LECTURE}/{LECTURE}.ipynb"
        for s in (ann, bob):
            listed = hub.user(s, "GET", "/assignments", params={"course_id": COURSE}).json()
            assert listed["success"], listed
            assert [(a["assignment_id"], a["status"]) for a in listed["value"]] == [(LECTURE, "released")]
            fetched = hub.user(s, "POST", "/assignments/fetch",
                               data={"course_id": COURSE, "assignment_id": LECTURE}).json()
            assert [(a["assignment_id"], a["status"]) for a in fetched["value"]] == [(LECTURE, "fetched")]
            assert os.stat(homes[s] / path).st_uid == pwd.getpwnam(s).pw_uid

        # 3. ann solves it (contents API, as the notebook editor saves), bob does not
        model = hub.user(ann, "GET", f"/api/contents/{path}", params={"content": "1"}).json()
        nb = _solved(model["content"], REPO / "solutions" / LECTURE / f"{LECTURE}.ipynb")
        hub.user(ann, "PUT", f"/api/contents/{path}",
                 json={"type": "notebook", "format": "json", "content": nb})

        # 4. both submit (the Assignments tab's Submit)
        for s in (ann, bob):
            out = hub.user(s, "POST", "/assignments/submit",
                           data={"course_id": COURSE, "assignment_id": LECTURE}).json()
            assert out["success"], out
            statuses = {a["status"] for a in out["value"]}
            assert "submitted" in statuses, out
        inbound = exchange / COURSE / "inbound"
        assert sorted(p.name.split("+")[0] for p in inbound.iterdir()) == sorted([ann, bob])

        # 5. the instructor collects (formgrader's Collect button)
        r = hub.user(teacher, "POST", f"/formgrader/api/assignment/{LECTURE}/collect").json()
        assert r["success"], r
        submitted = clone / "autograder" / "_work" / "submitted"
        for s in (ann, bob):
            assert (submitted / s / LECTURE / f"{LECTURE}.ipynb").is_file()
        t_round = time.monotonic()

        # 6. a student cannot read the other's work, the exchange's inbound, nor the solutions
        ann_sub = next(p for p in inbound.iterdir() if p.name.startswith(ann + "+"))
        refusals = [
            _refused(bob, "ls", str(inbound)),                                  # cannot list it
            _refused(bob, "cat", str(homes[ann] / path)),                       # ann's copy
            _refused(bob, "ls", str(homes[ann])),
            _refused(bob, "cat", str(clone / "solutions" / LECTURE / f"{LECTURE}.ipynb")),
            _refused(bob, "cat", str(clone / "solutions" / LECTURE / "hidden_tests.py")),
            _refused(bob, "cat", str(submitted / ann / LECTURE / f"{LECTURE}.ipynb")),
            _refused(bob, "touch", str(outbound.parent / "planted.ipynb")),     # nor release
            _refused(bob, "cat", str(closed_solutions / LECTURE / "hidden_tests.py")),  # the hub's
        ]
        assert all("Permission denied" in r for r in refusals)
        # nbgrader's design: a submission in inbound/ is world-readable, but its name ends in 12
        # random bytes and nobody but the instructor can list inbound/ (README.md)
        assert len(ann_sub.name.rsplit("+", 1)[1]) == 12
    finally:
        hub.stop()

    # 7. grade what was collected: the autograder's <student>/<NN_topic>/<NN_topic>.ipynb layout
    out = base / "grades"
    r = subprocess.run(
        [sys.executable, "-m", "autograder", "grade", str(submitted), "--lecture", LECTURE,
         "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "TRANSFORMER_LAB_SECRET"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t_graded = time.monotonic()
    with open(out / "scores.csv", newline="") as fh:
        rows = {row["student"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {ann, bob}
    assert (rows[ann]["status"], float(rows[ann]["total"]), float(rows[ann]["max"])) == ("graded", 8, 8), rows[ann]
    assert (rows[bob]["status"], float(rows[bob]["total"]), float(rows[bob]["max"])) == ("graded", 0, 8), rows[bob]
    print(json.dumps({"hub_and_servers_up_s": round(t_up - t0, 1),
                      "release_fetch_submit_collect_s": round(t_round - t_up, 1),
                      "grading_s": round(t_graded - t_round, 1),
                      "total_s": round(t_graded - t0, 1)}))
