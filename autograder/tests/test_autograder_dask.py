"""Grading on a Dask cluster (``python -m autograder grade ... --scheduler ADDRESS``), on a
``LocalCluster`` of two worker processes on this machine: the same CSV as the local path,
resumable, a worker killed in the middle of a grade (the task is graded again elsewhere, every
student once with the right score, nothing of the dead worker left running), and a scheduler
that cannot be reached (one line, nothing written). The fixture lecture
(``fixtures/solutions/00_fixture``) keeps it inside CI's budget (about a minute)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from _nbedit import exercises, read, submission, write  # noqa: E402
from autograder.cli import main  # noqa: E402
from autograder.course import REPO, UsageError  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "solutions"
LECTURE = "00_fixture"
#: a cell that sleeps in the student's kernel only (not in the hidden tests' runner): a grade
#: long enough to kill its worker in the middle of it
SLEEPY = 'import sys as _s, time as _t\nif "ipykernel" in _s.modules:\n    _t.sleep({})\n'


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc:
        with Client(lc, set_as_default=False) as client:
            yield lc, client


def _class(folder: Path, sleepy: dict[str, float] | None = None) -> dict[str, tuple[str, str]]:
    """A small class of the fixture lecture; returns student -> (total, status) expected."""
    nb = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
    ex1, ex2 = exercises(nb)
    write(nb, folder / "alice" / f"{LECTURE}.ipynb")
    write(submission(nb, {ex2.cell: "return F.layer_norm(x, x.shape[-1:], eps=eps)"}),
          folder / "carol" / f"{LECTURE}.ipynb")
    (folder / "erin").mkdir(parents=True)
    (folder / "erin" / f"{LECTURE}.ipynb").write_text("{ this is not json")
    expected = {"alice": ("3", "graded"), "carol": ("1", "graded"), "erin": ("0", "error")}
    for student, seconds in (sleepy or {}).items():
        slow = read(FIXTURE / LECTURE / f"{LECTURE}.ipynb")
        slow.cells[ex1.cell].source = SLEEPY.format(seconds) + slow.cells[ex1.cell].source
        write(slow, folder / student / f"{LECTURE}.ipynb")
        expected[student] = ("3", "graded")
    return expected


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autograder", "--solutions", str(FIXTURE), "grade", *args,
         "--lecture", LECTURE, "--timeout", "20", "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _rows(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _executing(client) -> dict[str, list[str]]:
    def keys(dask_worker):
        return [str(k) for k in dask_worker.state.executing]

    return client.run(keys)


def _tree(pid: int) -> list[str]:
    import psutil

    lines = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            lines.append(f"{child.pid} (parent {child.ppid()}): {' '.join(child.cmdline())[:120]}")
        except psutil.Error:  # gone meanwhile
            pass
    return lines


def _kill_while_grading(client, student: str, proc: subprocess.Popen) -> dict:
    """SIGKILL the worker process grading ``student`` while its notebook runs: once its grader
    (``python -m autograder.worker``) has a kernel (``ipykernel_launcher``) as a child, and the
    task still runs. Returns what was killed."""
    import psutil

    victim = grader = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for addr, keys in _executing(client).items():
            if any(f"-{student}-" in k for k in keys):
                victim = addr
        time.sleep(0.3)
    assert victim is not None, f"the task of {student} never ran"
    pid = client.run(os.getpid, workers=[victim])[victim]
    running = True
    while grader is None and running and time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                parent = child.parent()
                if ("ipykernel_launcher" in " ".join(child.cmdline()) and parent is not None
                        and "autograder.worker" in " ".join(parent.cmdline())):
                    grader = parent.pid
            except psutil.Error:  # a short-lived process gone meanwhile
                pass
        running = any(f"-{student}-" in k for k in _executing(client).get(victim, []))
        time.sleep(0.3)
    # the notebook of the task sleeps 10 s in its first exercise: while it runs, the grader has
    # exactly one kernel child (the hidden tests' runner comes after it)
    assert grader is not None, (f"the grader of {student} never started its kernel (task still running: "
                                f"{running}); the worker's processes:\n" + "\n".join(_tree(pid)))
    time.sleep(1.0)
    assert any(f"-{student}-" in k for k in _executing(client).get(victim, [])), "too late: the grade had ended"
    os.kill(pid, signal.SIGKILL)
    return {"worker": victim, "pid": pid, "grader": grader}


@pytest.fixture(scope="module")
def graded(cluster, tmp_path_factory):
    """One class graded twice side by side: on this machine (--workers 2), and on the cluster
    (--scheduler), where the worker grading 'slow' is killed in the middle of its grade."""
    lc, client = cluster
    tmp = tmp_path_factory.mktemp("dask")
    subs = tmp / "subs"
    expected = _class(subs, sleepy={"slow": 10})
    local = _cli(str(subs), "--out", str(tmp / "local"), "--workers", "2")
    remote = _cli(str(subs), "--out", str(tmp / "dask"), "--scheduler", lc.scheduler_address)
    killed = _kill_while_grading(client, "slow", remote)
    done = {}
    for name, proc in (("local", local), ("dask", remote)):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        done[name] = stdout
    return {"tmp": tmp, "subs": subs, "expected": expected, "killed": killed, "stdout": done,
            "address": lc.scheduler_address, "workers": set(lc.scheduler_info["workers"])}


def test_a_class_on_the_cluster_is_graded_as_on_one_machine(graded):
    tmp = graded["tmp"]
    assert "graded 4 notebook(s)" in graded["stdout"]["dask"]
    # the same CSV, byte for byte: every score, status and note (a worker died on the way)
    assert (tmp / "dask" / "scores.csv").read_text() == (tmp / "local" / "scores.csv").read_text()
    rows = _rows(tmp / "dask")
    assert sorted(r["student"] for r in rows) == sorted(graded["expected"])  # each student once
    assert {r["student"]: (r["total"], r["status"]) for r in rows} == graded["expected"]
    assert "ReferenceBlocked" in next(r for r in rows if r["student"] == "carol")["notes"]  # hidden tests ran
    # graded on the workers, written here: feedback pages, the autograded notebooks, the state
    for student in ("alice", "carol", "slow"):
        assert "ex2_layer_norm_test" in (tmp / "dask" / "feedback" / student / f"{LECTURE}.html").read_text()
        root = tmp / "dask" / "work" / LECTURE / student
        assert (root / "autograded" / student / LECTURE / f"{LECTURE}.ipynb").is_file()
        assert json.loads((root / "result.json").read_text())["dask"]["worker"].startswith("tcp://")
    state = json.loads((tmp / "dask" / "state.json").read_text())
    assert len(state["graded"]) == 4 and all(rec["hash"] for rec in state["graded"].values())


def test_a_worker_killed_in_the_middle_of_a_grade(graded):
    """The worker grading 'slow' was killed (SIGKILL) while its notebook ran: the scheduler gave
    the task to another worker, the student has one row with full marks, and the dead worker's
    grader and kernel did not outlive it."""
    import psutil
    from autograder.sandbox import sandbox_uid

    killed = graded["killed"]
    slow = json.loads((graded["tmp"] / "dask" / "work" / LECTURE / "slow" / "result.json").read_text())
    assert slow["status"] == "ok" and slow["dask"]["worker"] != killed["worker"]  # graded elsewhere
    assert [r["total"] for r in _rows(graded["tmp"] / "dask") if r["student"] == "slow"] == ["3"]
    # the grader died with its worker (PR_SET_PDEATHSIG); the next task killed its kernel
    assert not psutil.pid_exists(killed["grader"]) or psutil.Process(killed["grader"]).ppid() != killed["pid"]
    uid = sandbox_uid(killed["grader"])
    assert not [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def test_resumable_on_the_cluster(graded):
    """Run again: nothing changed, nothing graded again, the CSV byte-identical."""
    out = graded["tmp"] / "dask"
    before = (out / "scores.csv").read_bytes()
    again = _cli(str(graded["subs"]), "--out", str(out), "--scheduler", graded["address"])
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-3000:]
    assert "graded 0 notebook(s), 4 unchanged" in stdout
    assert (out / "scores.csv").read_bytes() == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_and_nothing_is_written(tmp_path, capsys):
    subs = tmp_path / "subs"
    _class(subs)
    out = tmp_path / "out"
    address = f"tcp://127.0.0.1:{_free_port()}"
    assert main(["--solutions", str(FIXTURE), "grade", str(subs), "--lecture", LECTURE,
                 "--out", str(out), "--scheduler", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"autograder: error: cannot reach the Dask scheduler at {address}: connection refused", err
    assert not out.exists()
    # an existing workspace stays byte for byte as it was
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for bad, words in ((address, "cannot reach the Dask scheduler"),
                       ("http://127.0.0.1:8786", "expected tcp://host:port"),
                       (str(tmp_path / "nothing.json"), "no such scheduler file")):
        assert main(["--solutions", str(FIXTURE), "grade", str(subs), "--lecture", LECTURE,
                     "--out", str(tmp_path / "new"), "--scheduler", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "new").exists()


def test_a_scheduler_without_workers_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    from distributed import LocalCluster

    subs = tmp_path / "subs"
    _class(subs)
    monkeypatch.setenv("AUTOGRADER_DASK_TIMEOUT", "1")
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=":0") as empty:
        address = empty.scheduler_address
        assert main(["--solutions", str(FIXTURE), "grade", str(subs), "--lecture", LECTURE,
                     "--out", str(tmp_path / "out"), "--scheduler", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"autograder: error: the Dask scheduler at {address} has no workers (waited 1 s): "
                   f"expected at least one `dask worker {address}` connected to it"), err
    assert not (tmp_path / "out").exists()


def test_without_dask_the_error_says_how_to_install(monkeypatch):
    from autograder.cluster import connect

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(UsageError, match=r"not installed: pip install 'dask\[distributed\]'"):
        connect("tcp://127.0.0.1:8786")


def test_a_worker_with_other_code_does_not_grade(tmp_path):
    """A task carries the instructor's code fingerprint; a worker whose checkout differs
    refuses it with a result that the next run grades again (no hash in the state)."""
    from autograder.cluster import grade_remote

    answer = grade_remote({"key": "k", "items": [{"task": {"lecture": LECTURE, "student": "ann"}}],
                           "fingerprint": "0" * 64, "blobs": {}})
    (item,) = answer["answers"]
    assert item["result"]["status"] == "error" and item["result"]["retry"]
    assert "other grader code" in item["result"]["message"]


@pytest.mark.parametrize("value, expected", [
    ("tcp://10.0.0.5:8786", ("address", "tcp://10.0.0.5:8786")),
    ("10.0.0.5:8786", ("address", "tcp://10.0.0.5:8786")),
    ("tls://sched.example.org:8786", ("address", "tls://sched.example.org:8786")),
    ("tcp://[::1]:8786", ("address", "tcp://[::1]:8786")),
])
def test_scheduler_addresses(value, expected):
    from autograder.cluster import parse_address

    assert parse_address(value) == expected


def test_a_scheduler_file(tmp_path):
    from autograder.cluster import parse_address

    good = tmp_path / "scheduler.json"
    good.write_text(json.dumps({"type": "Scheduler", "address": "tcp://10.0.0.5:8786"}))
    assert parse_address(str(good)) == ("file", str(good))
    bad = tmp_path / "notes.json"
    bad.write_text("[]")
    with pytest.raises(UsageError, match="not a scheduler file"):
        parse_address(str(bad))
    with pytest.raises(UsageError, match="port 99999 is out of range"):
        parse_address("tcp://10.0.0.5:99999")


def test_submissions_per_task(monkeypatch):
    """About three tasks per worker thread, at most 8 submissions each (a task pays one grader start)."""
    from autograder.cluster import chunk_size

    monkeypatch.delenv("AUTOGRADER_DASK_CHUNK", raising=False)
    assert [chunk_size(n, 2) for n in (1, 4, 6, 7, 60, 7500)] == [1, 1, 1, 2, 8, 8]
    assert chunk_size(7500, 400) == 7
    monkeypatch.setenv("AUTOGRADER_DASK_CHUNK", "1")
    assert chunk_size(60, 2) == 1


@pytest.fixture()
def in_process_cluster():
    """A scheduler and one worker thread in this process (``grade_remote`` can be replaced)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                      dashboard_address=":0") as lc:
        yield lc


def _grade_in_process(subs: Path, out: Path, address: str) -> int:
    return main(["--solutions", str(FIXTURE), "grade", str(subs), "--lecture", LECTURE, "--out", str(out),
                 "--scheduler", address, "--timeout", "20", "--no-progress"])


def test_a_grade_that_fails_on_every_try_is_an_error_the_next_run_grades(tmp_path, monkeypatch,
                                                                          in_process_cluster):
    """A task that fails on each of its tries (here: raises; on a real cluster, a submission whose
    workers keep dying ends as KilledWorker the same way) gives its student an error row that says
    so, is not remembered as graded, and the next run grades it, and only it."""
    import autograder.cluster as cluster_mod

    real = cluster_mod.grade_remote
    tries = tmp_path / "tries"  # the task travels pickled (a copy of this function): count in a file

    def fails_for_alice(payload):
        if any(item["task"]["student"] == "alice" for item in payload["items"]):
            with open(tries, "a") as fh:
                fh.write(payload["key"] + "\n")
            raise RuntimeError("the machine of this worker lost its disk")
        return real(payload)

    subs, out = tmp_path / "subs", tmp_path / "out"
    expected = _class(subs)
    monkeypatch.setattr(cluster_mod, "grade_remote", fails_for_alice)
    assert _grade_in_process(subs, out, in_process_cluster.scheduler_address) == 0
    keys = tries.read_text().split()
    assert len(keys) == 2 and len(set(keys)) == 1  # the first try and its one retry (retries=1)
    rows = {r["student"]: r for r in _rows(out)}
    assert (rows["alice"]["total"], rows["alice"]["status"]) == ("0", "error")
    assert "could not grade this notebook (RuntimeError: the machine of this worker lost its disk)" in rows["alice"]["notes"]
    assert "run the command again" in rows["alice"]["notes"]
    assert {s: (r["total"], r["status"]) for s, r in rows.items() if s != "alice"} == {
        s: v for s, v in expected.items() if s != "alice"}
    state = json.loads((out / "state.json").read_text())
    assert not state["graded"].get(f"{LECTURE}/alice", {}).get("hash")
    assert state["graded"][f"{LECTURE}/carol"]["hash"]  # a graded one is remembered
    # the fault is gone: the next run grades alice, and nobody else
    monkeypatch.setattr(cluster_mod, "grade_remote", real)
    assert _grade_in_process(subs, out, in_process_cluster.scheduler_address) == 0
    rows = {r["student"]: (r["total"], r["status"]) for r in _rows(out)}
    assert rows == expected


def test_a_cluster_whose_workers_all_leave_gives_up_after_the_timeout(tmp_path, monkeypatch, in_process_cluster):
    """Every worker leaves in the middle of a class (and none comes back): after
    AUTOGRADER_DASK_NO_WORKERS_TIMEOUT seconds the run stops waiting; what was not graded gets an
    error row saying why, not remembered as graded."""
    import threading

    import autograder.cluster as cluster_mod

    # the task travels pickled (a copy of this function): it signals through files
    started, release = tmp_path / "started", tmp_path / "release"

    def hangs(payload):
        started.touch()
        for _ in range(600):
            if release.exists():
                break
            time.sleep(0.1)
        raise RuntimeError("released")

    subs, out = tmp_path / "subs", tmp_path / "out"
    expected = _class(subs)
    monkeypatch.setattr(cluster_mod, "grade_remote", hangs)
    monkeypatch.setenv("AUTOGRADER_DASK_NO_WORKERS_TIMEOUT", "2")
    address = in_process_cluster.scheduler_address
    codes = []
    run = threading.Thread(target=lambda: codes.append(_grade_in_process(subs, out, address)))
    t0 = time.monotonic()
    run.start()
    try:
        while not started.exists() and run.is_alive() and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        assert started.exists(), "no task reached the worker"
        in_process_cluster.scale(0)  # the only worker leaves with a task in its hands
        run.join(120)
        assert not run.is_alive() and codes == [0]
    finally:
        release.touch()
    assert time.monotonic() - t0 < 100
    rows = {r["student"]: r for r in _rows(out)}
    assert sorted(rows) == sorted(expected)
    for student in expected:  # erin's broken notebook too: the grader never saw it
        assert rows[student]["status"] == "error" and "no Dask worker for 2 s" in rows[student]["notes"], rows[student]
    # not remembered as graded: the next run grades them (as the test above shows for the same row)
    state = json.loads((out / "state.json").read_text())
    assert not any(state["graded"].get(f"{LECTURE}/{s}", {}).get("hash") for s in expected)


def test_a_grade_without_the_graders_start_stamp_does_not_count(tmp_path):
    """The instructor's side accepts an 'ok' result only with the start stamp the grader writes
    before a task (a grade the grader did not give could otherwise be a silent score)."""
    from autograder.cluster import _write_back

    task = {"root": str(tmp_path / "root"), "lecture": LECTURE, "student": "ann"}
    (tmp_path / "root").mkdir()
    ok = {"status": "ok", "scores": {"ex1_scores_test": 1.0}}
    result = _write_back(task, {"result": ok, "files": {}, "started": None}, {"worker": "tcp://w:1"})
    assert result["status"] == "error" and result["retry"]
    assert "tcp://w:1 sent a grade without the grader's start stamp" in result["message"]
    assert json.loads((tmp_path / "root" / "result.json").read_text()) == result
    result = _write_back(task, {"result": ok, "files": {}, "started": "1764500000.0"}, {"worker": "tcp://w:1"})
    assert result["status"] == "ok" and result["scores"] == {"ex1_scores_test": 1.0}
    assert (tmp_path / "root" / "started").read_text() == "1764500000.0"


def test_a_tls_scheduler_with_dask_s_tls_configuration(tmp_path, capsys):
    """The secret travels in the tasks: on an untrusted network the cluster runs on tls://. With
    dask's TLS settings (here in dask.config; on a cluster ~/.config/dask/*.yaml or
    DASK_DISTRIBUTED__COMM__TLS__* variables) a class is graded through tls://; without them the
    command says what it needs, in one line, and writes nothing."""
    pytest.importorskip("cryptography")
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()  # a CA and a certificate for all, in memory
    pem = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        pem[name] = tmp_path / f"{name}.pem"
        pem[name].write_text(getattr(security, name))
    subs = tmp_path / "subs"
    expected = _class(subs)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      security=security, dashboard_address=":0") as lc:
        address = lc.scheduler_address
        assert address.startswith("tls://")
        with dask.config.set({"distributed.comm.require-encryption": True,
                              "distributed.comm.tls.ca-file": str(pem["tls_ca_file"]),
                              "distributed.comm.tls.client.cert": str(pem["tls_client_cert"]),
                              "distributed.comm.tls.client.key": str(pem["tls_client_key"])}):
            assert _grade_in_process(subs, tmp_path / "out", address) == 0
        assert {r["student"]: (r["total"], r["status"]) for r in _rows(tmp_path / "out")} == expected
        # no TLS settings here: one line naming them, before anything is written
        with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
            code = main(["--solutions", str(FIXTURE), "grade", str(subs), "--lecture", LECTURE,
                         "--out", str(tmp_path / "refused"), "--scheduler", address])
        assert code == 2 and not (tmp_path / "refused").exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"autograder: error: cannot reach the Dask scheduler at {address}: "), err
        assert err.endswith("a tls:// scheduler needs dask's TLS settings here (distributed.comm.tls.ca-file, "
                            "distributed.comm.tls.client.cert, distributed.comm.tls.client.key)"), err
