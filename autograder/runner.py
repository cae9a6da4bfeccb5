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
) -> list[dict[str, Any]]:
    """Run ``tasks`` in worker processes; return one result dict per task, in order.

    ``wall_timeout`` bounds one worker run over all its remaining tasks; a worker
    that overruns is killed and the task it was on becomes an error.
    """
    remaining = list(tasks)
    env = tool_env(grading=grading)
    # the worker imports this package from the checkout, wherever it is run from
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    while remaining:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(remaining, fh)
            spec = fh.name
        log = open(log_file, "a") if log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autograder.worker", spec],
                env=env,
                cwd=str(remaining[0]["root"]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=wall_timeout)
                why = f"the grader process exited with status {proc.returncode} on this submission"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                why = f"grading took longer than {wall_timeout:.0f} s and was stopped"
        finally:
            if log_file:
                log.close()
            os.unlink(spec)
        still = []
        for task in remaining:
            root = Path(task["root"])
            if (root / "result.json").exists():
                continue
            if (root / "started").exists():  # the worker died (or was killed) on this one
                (root / "result.json").write_text(json.dumps({"status": "error", "message": why}))
            else:
                still.append(task)
        remaining = still
    return [json.loads((Path(t["root"]) / "result.json").read_text()) for t in tasks]
