"""Start worker processes for nbgrader tasks and collect their results.

Every task has its own root folder; a worker leaves ``result.json`` there (see
``worker.py``). If a worker dies or overruns its wall-clock budget, the task it
was on is recorded as an error and a fresh worker takes the remaining tasks, so
one submission can never stop the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .course import REPO, tool_env


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
    wall_timeout: float,
    log_file: Path | None = None,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Run ``tasks`` in ``workers`` worker processes; return one result dict per task, in order.

    Tasks are dealt round-robin to the workers, which run side by side (each task
    has its own root, so they share nothing). ``wall_timeout`` bounds one worker
    run over its remaining tasks; a worker that overruns is killed and the task
    it was on becomes an error; a worker that dies is replaced for the rest.
    """
    workers = max(1, min(int(workers), len(tasks) or 1))
    env = tool_env(grading=grading)
    # the worker imports this package from the checkout, wherever it is run from
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    queues = [tasks[i::workers] for i in range(workers)]
    log = open(log_file, "a") if log_file else None  # noqa: SIM115
    try:
        while any(queues):
            running = [(q, _start(q, env, log)) for q in queues if q]
            next_queues = []
            for queue, (proc, spec) in running:
                try:
                    proc.wait(timeout=wall_timeout)
                    why = f"the grader process exited with status {proc.returncode} on this submission"
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    why = f"grading took longer than {wall_timeout:.0f} s and was stopped"
                os.unlink(spec)
                next_queues.append(_unfinished(queue, why))
            queues = next_queues
    finally:
        if log is not None:
            log.close()
    return [json.loads((Path(t["root"]) / "result.json").read_text()) for t in tasks]


def _start(queue: list[dict[str, Any]], env: dict[str, str], log) -> tuple[subprocess.Popen, str]:
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
