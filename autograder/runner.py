"""Start worker processes for nbgrader tasks and collect their results.

Every task has its own root folder; a worker leaves ``result.json`` there (see
``worker.py``). If a worker dies or overruns its wall-clock budget, the task it
was on is recorded as an error and a fresh worker takes the remaining tasks, so
one submission can never stop the others.

The kernels of a worker run under the sandbox uid of that worker (see
``sandbox.py``: derived from its pid), so after a worker is killed every process
its student left behind can be found and killed too.
``limits`` (a :class:`Limits`) bound every submission; a task that runs past
``limits.notebook_timeout`` plus a grace period for nbgrader's own work is
stopped by killing its worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .course import REPO, tool_env
from .sandbox import Limits, kill_uid, sandbox_uid

__all__ = ["Limits", "run_tasks"]

#: Seconds a grade task may take beyond ``notebook_timeout`` (nbgrader's own work, feedback).
GRACE = 120


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_tasks(
    tasks: list[dict[str, Any]],
    *,
    grading: bool,
    wall_timeout: float | None = None,
    log_file: Path | None = None,
    workers: int = 1,
    limits: Limits | None = None,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` in ``workers`` worker processes; return one result dict per task, in order.

    Tasks are dealt round-robin to the workers, which run side by side (each task
    has its own root, so they share nothing). ``wall_timeout`` bounds one worker
    run over its remaining tasks; a grade task is also stopped once it has run
    ``limits.notebook_timeout + GRACE`` seconds. A worker that overruns is killed
    (with every process of its sandbox uid) and the task it was on becomes an
    error; a worker that dies is replaced for the rest. ``limits`` defaults to
    :meth:`Limits.from_env` (``AUTOGRADER_*`` variables); a grade task's own
    ``timeout`` still sets its per-cell limit. ``env``: variables added to the workers'
    environment (the course secret of a task run on a Dask worker: ``cluster.py``).
    """
    limits = limits if limits is not None else Limits.from_env()
    tasks = [
        dict(t, limits=dict(limits.to_dict(), **(t.get("limits") or {}))) if t.get("op") == "grade" else t
        for t in tasks
    ]
    workers = max(1, min(int(workers), len(tasks) or 1))
    extra_env = env or {}
    env = tool_env(grading=grading)
    env.update(extra_env)
    # the worker imports this package from the checkout, wherever it is run from
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    queues = [tasks[i::workers] for i in range(workers)]
    # the notebook, then its hidden tests outside the kernel (each exercise within the cell
    # limit, all of them within another notebook limit), then nbgrader's own work
    per_task = 2 * limits.notebook_timeout + GRACE
    log = open(log_file, "a") if log_file else None  # noqa: SIM115
    try:
        while any(queues):
            running = [(slot, q, *_start(q, env, log, slot)) for slot, q in enumerate(queues) if q]
            next_queues = []
            t_start = time.monotonic()
            pending = list(running)
            while pending:
                time.sleep(0.2)
                still = []
                for slot, queue, proc, spec in pending:
                    why = None
                    if proc.poll() is not None:
                        why = f"the grader process exited with status {proc.returncode} on this submission"
                    elif wall_timeout is not None and time.monotonic() - t_start > wall_timeout:
                        why = f"grading took longer than {wall_timeout:.0f} s and was stopped"
                    elif _task_overran(queue, per_task):
                        why = (f"grading this notebook took longer than {per_task:.0f} s "
                               f"(twice the {limits.notebook_timeout} s notebook limit, for the notebook "
                               f"and its hidden tests, plus {GRACE} s) and was stopped")
                    if why is None:
                        still.append((slot, queue, proc, spec))
                        continue
                    if proc.poll() is None:
                        _kill_group(proc)
                    proc.wait()
                    kill_uid(sandbox_uid(proc.pid))  # what its student left running
                    os.unlink(spec)
                    next_queues.append(_unfinished(queue, why))
                pending = still
            queues = next_queues
    finally:
        if log is not None:
            log.close()
    return [json.loads((Path(t["root"]) / "result.json").read_text()) for t in tasks]


def _task_overran(queue: list[dict[str, Any]], seconds: float) -> bool:
    """Whether the task the worker is on (started, no result yet) has run more than ``seconds``."""
    for task in queue:
        root = Path(task["root"])
        if (root / "result.json").exists():
            continue
        started = root / "started"
        if not started.exists():
            return False
        try:
            t0 = float(started.read_text() or 0)
        except (OSError, ValueError):
            return False
        return task.get("op") == "grade" and time.time() - t0 > seconds
    return False


def _start(queue: list[dict[str, Any]], env: dict[str, str], log, slot: int = 0) -> tuple[subprocess.Popen, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(queue, fh)
        spec = fh.name
    proc = subprocess.Popen(
        [sys.executable, "-m", "autograder.worker", spec],
        env=env,
        cwd=str(queue[0]["root"]),
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, spec


def _unfinished(queue: list[dict[str, Any]], why: str) -> list[dict[str, Any]]:
    """Record the task a dead worker was on as an error; return the tasks it never started."""
    still = []
    for task in queue:
        root = Path(task["root"])
        if (root / "result.json").exists():
            continue
        if (root / "started").exists():
            (root / "result.json").write_text(json.dumps({"status": "error", "message": why}))
        else:
            still.append(task)
    return still
