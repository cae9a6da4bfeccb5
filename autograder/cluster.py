"""Grading on a ``dask.distributed`` cluster: ``python -m autograder grade ... --scheduler ADDRESS``.

The instructor's side (this process) does everything it does for a local run: it reads
the submissions, checks the workspace, releases the gradebook template, prepares one
nbgrader root per submission in ``OUT/work/``, and at the end writes the feedback pages,
``state.json``, ``scores.csv`` and the report, each atomically. Only the middle step,
grading each root, goes to the cluster instead of local worker processes:

* **What a task carries.** Everything it needs, as bytes (:func:`pack`): the submission's
  prepared root (the lecture's gradebook, the notebook with any extra test cells, the
  lecture's data files), the lecture's hidden-test files, the limits, the course secret.
  A worker needs no shared folder and never sees ``solutions/`` or the workspace: only the
  course installed (the same commit: checked before anything is sent, :func:`check_workers`).
* **What a task does** (:func:`grade_remote`, on the worker): lays the root out in a
  scratch folder of its own and grades it with the local path's own code,
  :func:`autograder.runner.run_tasks` with one task: the same ``python -m autograder.worker``
  process, sandbox, limits and overrun handling. It returns the result and the files the
  instructor's side reads (the autograded notebook, the feedback page) as data, and
  removes its scratch folder.
* **What comes back** is written by the instructor's side only, into the submission's
  root in the workspace, each file atomically, ``result.json`` last; then grading goes on
  exactly as after a local run.
* **Faults.** Each submission is one task with a key of its own. A worker that dies in
  the middle of a grade (its process ended: killed, out of memory, its machine gone) loses
  its task; the scheduler gives it to another worker (up to
  ``distributed.scheduler.allowed-failures`` times, 3 by default). The grader process on
  the dead worker dies with it, and the student's kernel with the grader
  (``PR_SET_PDEATHSIG`` on both); what is left (a process of the sandbox uid, the scratch
  folder) goes at the start of the next task on that machine and at the end of the class
  (:func:`clean_left_behind`). Only the first result of a key is accepted, and
  results are written only here, so a retried task can never give a second grade. A
  submission the cluster could not grade at all (every retry's worker died, the scheduler
  went away) gets an ``error`` row that the next run grades again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .course import SECRET_ENV, UsageError

#: Seconds to wait for the scheduler to answer (and for a first worker); env overrides.
CONNECT_TIMEOUT_ENV = "AUTOGRADER_DASK_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds the run waits with no worker at all before the rest of the class is given up
#: (those submissions get an error row that the next run grades again).
NO_WORKERS_ENV = "AUTOGRADER_DASK_NO_WORKERS_TIMEOUT"
DEFAULT_NO_WORKERS_TIMEOUT = 300.0
#: Written into a result that the next run must grade again (the grader's own failure).
RETRY = "retry"
INSTALL_HINT = ("pip install 'dask[distributed]' (it comes with the course: "
                "pip install -e . in the checkout)")

_ADDRESS = re.compile(r"^(?:(tcp|tls)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_SCHEME = re.compile(r"^[a-z]+://")


def _timeout(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env) or default)
    except ValueError:
        raise UsageError(f"{env}={os.environ[env]!r}: expected a number of seconds") from None
    return value if value > 0 else default


def parse_address(value: str) -> tuple[str, str]:
    """``("address", "tcp://host:port")`` or ``("file", PATH)`` for a scheduler file; bad
    input raises :class:`UsageError`."""
    text = str(value).strip()
    m = _ADDRESS.match(text)
    if m:
        scheme = m.group(1) or "tcp"
        if not 0 < int(m.group(3)) < 65536:
            raise UsageError(f"--scheduler {value}: port {m.group(3)} is out of range: expected 1-65535")
        return "address", f"{scheme}://{m.group(2)}:{m.group(3)}"
    if _SCHEME.match(text) or not text:
        raise UsageError(
            f"--scheduler {value!r}: expected tcp://host:port or tls://host:port (the address "
            "`dask scheduler` prints), or the path of a scheduler file (--scheduler-file)"
        )
    path = Path(text)
    if not path.is_file():
        raise UsageError(
            f"--scheduler {value}: no such scheduler file and not an address: expected tcp://host:port "
            "(the address `dask scheduler` prints) or the JSON file of `dask scheduler --scheduler-file`"
        )
    try:
        if not isinstance(json.loads(path.read_text())["address"], str):
            raise TypeError("address")
    except Exception:  # noqa: BLE001 - the instructor's file: one line
        raise UsageError(
            f"--scheduler {value}: not a scheduler file: expected the JSON that "
            "`dask scheduler --scheduler-file` writes (with an \"address\")"
        ) from None
    return "file", str(path)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(exc, OSError) and exc.strerror and not text.startswith("Timed out"):
        text = exc.strerror.lower()
    return (text or type(exc).__name__)[:200]


def connect(value: str, timeout: float | None = None):
    """A :class:`distributed.Client` on the scheduler at ``value`` with at least one worker;
    :class:`UsageError` (one line) when dask is missing or the scheduler cannot be reached."""
    kind, target = parse_address(value)
    try:
        import dask
        from distributed import Client
    except ImportError:
        raise UsageError(f"--scheduler needs dask.distributed, which is not installed: {INSTALL_HINT}") from None
    timeout = timeout or _timeout(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT)
    shown = target
    if kind == "file":
        shown = json.loads(Path(target).read_text())["address"]
    m = re.match(r"^(tcp|tls)://\[?([^\]]+?)\]?:(\d+)$", shown)
    if m:  # a plain socket first: a refused connection says so at once, not after the timeout
        try:
            socket.create_connection((m.group(2), int(m.group(3))), timeout=timeout).close()
        except OSError as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {shown}: {_reason(exc)}") from None
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            if kind == "file":
                client = Client(scheduler_file=target, timeout=timeout, set_as_default=False)
            else:
                client = Client(target, timeout=timeout, set_as_default=False)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster: one line
        tls = ("; a tls:// scheduler needs dask's TLS settings here (distributed.comm.tls.ca-file, "
               "distributed.comm.tls.client.cert, distributed.comm.tls.client.key)") if shown.startswith("tls://") else ""
        raise UsageError(f"cannot reach the Dask scheduler at {shown}: {_reason(exc)}{tls}") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception:  # noqa: BLE001
        client.close()
        raise UsageError(
            f"the Dask scheduler at {shown} has no workers (waited {timeout:g} s): expected at least "
            f"one `dask worker {shown}` connected to it"
        ) from None
    return client


# --------------------------------------------------------------------------- the same code


def _package_files(package: str, recursive: bool) -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0])
    return sorted(
        p for p in (folder.rglob("*.py") if recursive else folder.glob("*.py"))
        if not any(part in ("tests", "_work", "__pycache__") for part in p.relative_to(folder).parts)
    )


def code_fingerprint() -> str:
    """SHA-256 of the grader's and the library's source (what decides a grade besides the
    submission: the grader's modules, and the library, where the hidden tests' references live)."""
    h = hashlib.sha256()
    for package, recursive in (("autograder", False), ("transformer_lab", True)):
        for path in _package_files(package, recursive):
            h.update(f"{package}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


#: This worker process's fingerprint, as checked by the instructor's side before a run (a
#: checkout edited during a run does not stop it; a worker that joins later is checked by
#: its first task).
_CHECKED: dict[str, str] = {}


def _worker_fingerprint() -> str:
    if "fingerprint" not in _CHECKED:
        _CHECKED["fingerprint"] = code_fingerprint()
    return _CHECKED["fingerprint"]


def worker_info() -> dict[str, Any]:
    """What a worker grades with (run on every worker before a class is sent)."""
    import importlib.metadata as md

    from .sandbox import available

    versions = {}
    for dist in ("torch", "nbgrader", "nbconvert", "ipykernel"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    _CHECKED["fingerprint"] = code_fingerprint()
    return {
        "fingerprint": _CHECKED["fingerprint"],
        "python": ".".join(map(str, sys.version_info[:2])),
        "versions": versions,
        "isolated": available()[0],
        "host": socket.gethostname(),
    }


def check_workers(client) -> str:
    """Every worker grades with this checkout's code and versions, else :class:`UsageError`;
    returns the code's fingerprint (each task carries it)."""
    here = worker_info()
    try:
        infos = client.run(worker_info, on_error="return")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"the Dask workers could not be asked what they run: {_reason(exc)}") from None
    for addr, info in sorted(infos.items()):
        if isinstance(info, BaseException):
            raise UsageError(
                f"Dask worker {addr} cannot run the grader ({type(info).__name__}: {_reason(info)}): "
                "expected the course installed on every worker (pip install -e . in a checkout of "
                "the same commit)"
            )
        differs = []
        if info["fingerprint"] != here["fingerprint"]:
            differs.append("the autograder's or transformer_lab's source")
        if info["python"] != here["python"]:
            differs.append(f"Python {info['python']} (here {here['python']})")
        for dist, version in here["versions"].items():
            if info["versions"].get(dist) != version:
                differs.append(f"{dist} {info['versions'].get(dist)} (here {version})")
        if differs:
            raise UsageError(
                f"Dask worker {addr} ({info['host']}) grades with other code than this checkout: "
                f"{', '.join(differs)} differ; expected every worker to run the same commit and "
                "environment (pip install -e . there)"
            )
    return here["fingerprint"]


# --------------------------------------------------------------------------- a task


def pack(tasks: list[dict], secret: str | None, limits: dict, wall_timeout: float, key: str,
         fingerprint: str) -> dict[str, Any]:
    """Everything the grades of some prepared roots need, as data (a file the roots share,
    such as the lecture's gradebook, travels once)."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs.setdefault(digest, data)
        return digest

    items = []
    for task in tasks:
        root = Path(task["root"])
        files = {p.relative_to(root).as_posix(): blob(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}
        hidden = {Path(p).name: blob(Path(p).read_bytes()) for p in task.get("hidden", [])}
        items.append({"task": dict(task), "files": files, "hidden": hidden})
    return {
        "key": key, "items": items, "blobs": blobs, "secret": secret,
        "limits": limits, "wall_timeout": float(wall_timeout), "fingerprint": fingerprint,
    }


def _safe(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


SCRATCH_PREFIX = "tlab-dask-"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by whoever inherited it) does not."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:  # no /proc (not Linux): a signal 0 tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runs_in(pid: int, folder: Path) -> bool:
    """Whether the live process ``pid`` works in ``folder`` (a grader's cwd is its first task's
    root): the dead worker's own grader, not a later process that got its pid."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def clean_left_behind(base: Path | None = None) -> int:
    """Remove the scratch folders of tasks whose Dask worker died, after killing what they left
    running: the grader, if it has not died with its worker yet (``PR_SET_PDEATHSIG`` is a
    signal, not a wait), and every process of its sandbox uid (the student's kernel, which
    outlives its grader). Returns how many folders were cleaned. Run by each task before it
    starts and on every worker at the end of a class (:func:`run_on_cluster`)."""
    import signal

    from .sandbox import kill_uid, sandbox_uid

    base = Path(base or tempfile.gettempdir())
    cleaned = 0
    for folder in base.glob(SCRATCH_PREFIX + "*"):
        try:
            owner = int((folder / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pid_file in folder.glob("work/*/*/grader.pid"):
            try:
                grader = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            if _pid_alive(grader):
                if not _runs_in(grader, folder):
                    continue  # the pid is another process's now: its uid is not ours to kill
                try:
                    os.kill(grader, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            kill_uid(sandbox_uid(grader))
        shutil.rmtree(folder, ignore_errors=True)
        cleaned += 1
    return cleaned


def grade_remote(payload: dict[str, Any]) -> dict[str, Any]:
    """Grade some submissions on this (Dask worker) machine, one after another in one grader
    process as a local worker does; return every result as data."""
    from .runner import run_tasks
    from .sandbox import Limits
    from .worker import PARENT_ENV

    try:
        from distributed import get_worker

        where = get_worker().address
    except Exception:  # noqa: BLE001 - not on a worker (called directly)
        where = None
    answer = {"key": payload["key"], "worker": where, "host": socket.gethostname(),
              "answers": [], "log": "", "received": time.time()}
    if payload.get("fingerprint") and payload["fingerprint"] != _worker_fingerprint():
        answer["answers"] = [{"result": {"status": "error", RETRY: True, "message": (
            f"Dask worker {where} ({answer['host']}) runs other grader code than the instructor's "
            "checkout: not graded there (grade again once every worker runs the same commit)")}}
            for _ in payload["items"]]
        return answer
    try:
        clean_left_behind()
    except Exception:  # noqa: BLE001 - housekeeping never stops a grade
        pass
    blobs = payload["blobs"]
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    try:
        (scratch / "owner").write_text(str(os.getpid()))
        local, roots = [], []
        for item in payload["items"]:
            task = item["task"]
            lecture, student = task["lecture"], task["student"]
            if not all(_safe(x) and "/" not in x for x in (lecture, student)):
                raise ValueError(f"unsafe lecture or student in the task: {lecture!r}, {student!r}")
            root = scratch / "work" / lecture / student
            for rel, digest in item["files"].items():
                if not _safe(rel):
                    raise ValueError(f"unsafe path in the task: {rel!r}")
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(blobs[digest])
            hidden_dir = scratch / "work" / lecture / "_release" / "hidden"
            hidden_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(hidden_dir, 0o700)
            for name, digest in item["hidden"].items():
                if not _safe(name) or "/" in name:
                    raise ValueError(f"unsafe hidden-test file name: {name!r}")
                (hidden_dir / name).write_bytes(blobs[digest])
            local.append(dict(task, root=str(root), hidden=[str(hidden_dir / n) for n in sorted(item["hidden"])]))
            roots.append(root)
        env = {PARENT_ENV: str(os.getpid())}
        if payload.get("secret") is not None:
            env[SECRET_ENV] = payload["secret"]
        log = scratch / "grading.log"
        results = run_tasks(local, grading=True, wall_timeout=payload["wall_timeout"], log_file=log,
                            workers=1, limits=Limits(**payload["limits"]), env=env)
        for root, result in zip(roots, results, strict=True):
            files = {}
            for sub in ("autograded", "feedback"):
                for p in sorted((root / sub).rglob("*")):
                    if p.is_file():
                        files[p.relative_to(root).as_posix()] = p.read_bytes()
            started = root / "started"
            if result.get("feedback"):
                result["feedback"] = Path(result["feedback"]).relative_to(root).as_posix()
            answer["answers"].append({"result": result, "files": files,
                                      "started": started.read_text() if started.is_file() else None})
        answer["log"] = log.read_text(errors="replace") if log.is_file() else ""
        answer["finished"] = time.time()
        return answer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- the instructor's side


def _write_back(task: dict, item: dict, answer: dict) -> dict:
    """Write what a worker sent for one submission into its root (atomically, result.json last)."""
    from .grade import _atomic_write

    root = Path(task["root"])
    result = dict(item["result"])
    if result.get("status") == "ok" and not item.get("started"):
        # a grade counts only if the grader ran the task (it stamps ``started`` first): anything
        # else is an inconsistency of the cluster's, graded again by the next run, never a score
        return _lost(task, f"Dask worker {answer.get('worker')} sent a grade without the grader's start stamp")
    for rel, data in item.get("files", {}).items():
        if _safe(rel):
            _atomic_write(root / rel, data)
    if item.get("started"):
        _atomic_write(root / "started", item["started"])
    if result.get("feedback"):
        rel = result["feedback"]
        result["feedback"] = str(root / rel) if _safe(rel) and (root / rel).is_file() else None
    # where and when (the worker's clock) it was graded: the task's span there
    result["dask"] = {k: answer.get(k) for k in ("worker", "host", "received", "finished")}
    _atomic_write(root / "result.json", json.dumps(result, indent=1))
    return result


def _lost(task: dict, why: str) -> dict:
    from .grade import _atomic_write

    result = {"status": "error", RETRY: True,
              "message": f"the Dask cluster could not grade this notebook ({why}); run the command "
                         "again to grade it"}
    _atomic_write(Path(task["root"]) / "result.json", json.dumps(result, indent=1))
    return result


#: Submissions one task grades in one grader process (its start, about 5-10 s of imports, is
#: paid once per task): about three tasks per worker thread, at most this many each.
MAX_CHUNK = 8
CHUNK_ENV = "AUTOGRADER_DASK_CHUNK"


def chunk_size(n_tasks: int, n_threads: int) -> int:
    raw = os.environ.get(CHUNK_ENV)
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise UsageError(f"{CHUNK_ENV}={raw!r}: expected a whole number of submissions per task") from None
    return max(1, min(MAX_CHUNK, -(-n_tasks // (3 * max(1, n_threads)))))


def run_on_cluster(client, tasks: list[dict], *, budgets: list[float], secret: str | None,
                   limits, log_file: Path | None = None, fingerprint: str | None = None) -> list[dict]:
    """Grade the prepared ``tasks`` on the cluster; one result per task, in order (like
    :func:`autograder.runner.run_tasks`), each also written to its root's ``result.json``."""
    from distributed import as_completed

    if limits is None:
        from .sandbox import Limits

        limits = Limits.from_env()
    limits_dict = dict(limits.to_dict())
    fingerprint = fingerprint or code_fingerprint()

    def threads() -> int:
        try:
            return sum(client.nthreads().values())
        except Exception:  # noqa: BLE001 - the scheduler went away
            return 0

    size = chunk_size(len(tasks), threads())
    chunks = [list(range(i, min(i + size, len(tasks)))) for i in range(0, len(tasks), size)]
    run = uuid.uuid4().hex[:12]
    keys = [f"autograder-grade-{tasks[c[0]]['lecture']}-{tasks[c[0]]['student']}-{len(c)}-{run}" for c in chunks]
    by_key = {k: c for k, c in zip(keys, chunks, strict=True)}
    results: dict[int, dict] = {}
    pending = list(range(len(chunks)))[::-1]

    def submit_one(ac) -> None:  # packed only when sent: the payloads in flight stay bounded
        j = pending.pop()
        payload = pack([tasks[i] for i in chunks[j]], secret, limits_dict,
                       sum(budgets[i] for i in chunks[j]), keys[j], fingerprint)
        ac.add(client.submit(grade_remote, payload, key=keys[j], pure=False, retries=1))

    ac = as_completed(loop=client.loop)
    for _ in range(min(max(2, 2 * threads()), len(pending))):
        submit_one(ac)
    no_workers_since = None
    give_up = _timeout(NO_WORKERS_ENV, DEFAULT_NO_WORKERS_TIMEOUT)
    while len(results) < len(tasks):
        batch = ac.next_batch(block=False) if ac.has_ready() else []
        if not batch:
            if ac.is_empty() and not pending:
                break
            time.sleep(0.2)
            if client.status == "running" and threads() > 0:
                no_workers_since = None
            else:
                no_workers_since = no_workers_since or time.monotonic()
                if time.monotonic() - no_workers_since > give_up:
                    break
            continue
        for future in batch:
            chunk = by_key.get(future.key, [])
            try:
                answer = future.result()
                items = answer["answers"]
                if answer.get("key") != future.key or len(items) != len(chunk):
                    raise ValueError("a result of another task came back")
            except Exception as exc:  # noqa: BLE001 - KilledWorker, cancelled, lost scheduler
                why = f"{type(exc).__name__}: {_reason(exc)}"
                for i in chunk:
                    if i not in results:
                        results[i] = _lost(tasks[i], why)
            else:
                for i, item in zip(chunk, items, strict=True):
                    if i not in results:  # the first result of a submission is its grade
                        results[i] = _write_back(tasks[i], item, answer)
                if log_file is not None and answer.get("log"):
                    with open(log_file, "a") as fh:
                        fh.write(f"[autograder] graded on Dask worker {answer.get('worker')} "
                                 f"({answer.get('host')}): "
                                 f"{', '.join(tasks[i]['lecture'] + '/' + tasks[i]['student'] for i in chunk)}\n"
                                 + answer["log"])
            future.release()
            if pending:
                submit_one(ac)
    for i in range(len(tasks)):
        if i not in results:
            results[i] = _lost(tasks[i], f"no Dask worker for {give_up:g} s")
    try:  # a worker that died late in the class: what it left running goes now, not next class
        client.run(clean_left_behind, on_error="ignore")
    except Exception:  # noqa: BLE001 - housekeeping never costs a grade
        pass
    return [results[i] for i in range(len(tasks))]


__all__ = ["connect", "check_workers", "run_on_cluster", "grade_remote", "parse_address", "code_fingerprint"]
