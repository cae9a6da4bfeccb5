"""Where a learner's function runs for the hidden tests: ``python -m autograder.hidden_runner``.

The trusted grader (``autograder/hidden.py``, in the worker) starts this process once
per worker, with a scrubbed environment (no course secret), and sends it jobs, one
JSON line each, on its stdin. The process is a *fork server*: it imports PyTorch and
the usual notebook imports once, never runs a line of learner code itself, and for
every exercise of a job forks a child that

1. reads, while still root and outside any sandbox, only what that exercise needs:
   its blocked view of the library (``transformer_lab`` with the reference's body
   replaced by a stand-in that raises ``ReferenceBlocked``), its inputs (plain data),
   and the lecture's data files;
2. enters the sandbox (``autograder.sandbox.enter``: private mounts in which the real
   library, the repository, the workspace and other checkouts are out of sight;
   the blocked view is written into its private ``/tmp``), drops to the sandbox uid,
   and installs a seccomp filter so that neither it nor anything it forks can start
   a fresh program (a Python with an unblocked library);
3. replaces PyTorch's own shortcuts for the reference, for good
   (``transformer_lab.grading.block``);
4. runs the notebook's setup cell and the learner's answer cells, calls the
   learner's function on every input, and writes what came back as plain data
   (``torch.save`` of tensors and numbers, read on the trusted side with
   ``torch.load(weights_only=True)``), or the exception it raised, to its result
   file, opened before the uid drop: its only open file.

The expected values, the verdict and the course secret never exist here. The fork
server itself never reads a job, a submission's code or a result (its children
inherit its memory: it must hold nothing of another student's). A child that runs
past its time is killed with everything of its uid. The reply to a request is one
JSON line: per exercise, ``status`` (``ok``, ``timeout``, ``died``) and a word of
detail.

This module imports nothing from ``transformer_lab``: the children import the
blocked view, and the fork server must hold no copy of the real library.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import sandbox

#: The library package the views replace.
PACKAGE = "transformer_lab"
#: Where a sandboxed child finds its view of the library.
VIEW_ROOT = "/tmp/tlview"
#: The most characters of a learner's exception message that are kept.
MAX_MESSAGE = 2000
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- the fork server


def _preimport() -> None:
    """What every lecture's setup cell imports, loaded once so that children start warm."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import math  # noqa: F401

    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch.nn  # noqa: F401
    import torch.nn.functional  # noqa: F401

    try:
        import matplotlib.pyplot  # noqa: F401
        from IPython.display import display  # noqa: F401
    except ImportError:  # pragma: no cover - the course installs both
        pass
    if PACKAGE in sys.modules:  # pragma: no cover - a bug: the real library is in memory
        raise RuntimeError("the hidden-test runner must not import transformer_lab itself")


def _stop(pid: int, request: dict) -> None:
    """Kill a child and everything it forked."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    if request.get("isolate"):
        sandbox.kill_uid(int(request["uid"]))


def _exit_words(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = {9: "SIGKILL (killed, e.g. out of memory)", 11: "SIGSEGV (segmentation fault)",
                6: "SIGABRT (aborted)"}.get(sig, f"signal {sig}")
        return f"it was killed by {name}"
    return f"it exited with status {os.WEXITSTATUS(status)} before it had sent its results"


def run_exercise(request: dict, index: int, timeout: float) -> dict:
    """Fork a child for exercise ``index`` of the job, wait for it at most ``timeout`` seconds.

    The child reads the job and writes its result file itself: this process never holds a
    submission's code, inputs or results, so no later child (which inherits its memory) can
    find another student's answers in it.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            _child(request["job"], index)
        finally:
            os._exit(70)
    deadline = time.monotonic() + timeout
    status, pause = None, 0.002
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            _stop(pid, request)
            os.waitpid(pid, 0)
            _stop(pid, request)
            return {"status": "timeout", "detail": f"stopped after {timeout:g} s"}
        else:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    _stop(pid, request)  # whatever it forked and left running
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return {"status": "ok", "detail": ""}
    return {"status": "died", "detail": _exit_words(status)}


def serve(stdin=None, stdout=None) -> int:
    """Answer requests until stdin closes. A request is one JSON line naming the job file and
    how to run its exercises: ``{"job": PATH, "timeouts": [s, ...], "isolate": bool, "uid": n}``
    (no code, no data); the reply is one JSON line ``{"results": [{"status", "detail"}, ...]}``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    _preimport()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the worker
    print(json.dumps({"ready": os.getpid()}), file=stdout, flush=True)
    for line in stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        replies = []
        for i, timeout in enumerate(request["timeouts"]):
            try:
                replies.append(run_exercise(request, i, float(timeout)))
            except Exception as exc:  # noqa: BLE001 - the fork server keeps serving
                replies.append({"status": "died", "detail": f"{type(exc).__name__}: {exc}"})
        print(json.dumps({"results": replies}), file=stdout, flush=True)
    return 0


# --------------------------------------------------------------------------- the child


def _only_the_result_file(keep: int) -> None:
    """stdin/stdout/stderr to /dev/null, every other descriptor but ``keep`` (the result file)
    closed, so the learner's code cannot write to the fork server's replies."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_view(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*.py"))
    }


def _send(fd: int, payload: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    view = memoryview(buf.getvalue())
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.close(fd)


def _child(job_path: str, index: int) -> None:
    """One exercise: read (as root) what it needs, enter the sandbox, run the learner's code."""
    job = json.loads(Path(job_path).read_text())
    ex = job["exercises"][index]
    out = os.open(ex["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # opened before the uid drop
    _only_the_result_file(out)
    try:
        os.setsid()  # its own process group: killed as one
        view = _read_view(Path(ex["view"]))
        inputs = Path(ex["inputs"]).read_bytes()
        data = sandbox.read_data_files(job["data_dir"]) if job.get("data_dir") else {}
        spec = {k: job[k] for k in ("isolate", "uid", "limits", "repo", "keep", "hide")}
        if job.get("isolate"):
            files = {f"{VIEW_ROOT}/{PACKAGE}/{rel}": blob for rel, blob in view.items()}
            env = sandbox.enter(spec, data, files)
            root = VIEW_ROOT
        else:
            env = sandbox.scrubbed_env()
            os.chdir(job.get("data_dir") or os.getcwd())
            root = str(Path(ex["view"]).parent)
        sandbox.drop(spec)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        no_exec = sandbox.forbid_exec()
        os.environ.clear()
        os.environ.update(env)
        os.environ["TRANSFORMER_LAB_GRADING"] = "1"
        _use_view(root)
        del view, data
    except BaseException as exc:  # noqa: BLE001 - reported, then the child ends
        _send(out, {"setup_error": f"{type(exc).__name__}: {exc}"})
        os._exit(0)
    payload = _run(job, ex, inputs)
    if no_exec:
        payload["notes"].append(no_exec)
    _send(out, payload)
    os._exit(0)


def _use_view(root: str) -> None:
    """Make ``import transformer_lab`` load the blocked view under ``root``, whatever else
    (an editable install's finder, ``sys.path``) points at the real one."""
    import importlib.abc
    import importlib.machinery

    class ViewFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == PACKAGE:
                return importlib.machinery.PathFinder.find_spec(name, [root])
            if name.startswith(PACKAGE + "."):
                return importlib.machinery.PathFinder.find_spec(name, path)
            return None

    sys.meta_path.insert(0, ViewFinder())
    sys.path_importer_cache.clear()


def _python(source: str) -> str:
    """A notebook cell as plain Python: IPython's ``%magic`` and ``!shell`` lines dropped."""
    lines = source.splitlines()
    if lines and lines[0].lstrip().startswith("%%"):
        return ""  # a cell magic: the whole cell is not Python
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in lines)


def _words(exc: BaseException) -> dict:
    """An exception as data: its class name, the names of its classes, its message."""
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a learner's __str__ may raise
        message = "(its message could not be read)"
    names = [c.__name__ for c in type(exc).__mro__][:12]
    return {"type": names[0][:80], "mro": [n[:80] for n in names], "message": message[:MAX_MESSAGE]}


def _blocked_objects(names: list[str]) -> list:
    """PyTorch objects named ``module:qualname`` (the library's own are absent from the view)."""
    import functools
    import importlib

    found = []
    for name in names:
        module, _, qual = name.partition(":")
        obj = functools.reduce(getattr, qual.split("."), importlib.import_module(module))
        found.append(obj)
    return found


def _run(job: dict, ex: dict, inputs: bytes) -> dict:
    """Everything that runs the learner's code; returns the payload (plain data only)."""
    import math

    import torch

    torch.set_num_threads(1)
    from transformer_lab import grading as view_grading  # the view's (nothing is blocked in it)

    notes: list[str] = []
    view_grading.block(*_blocked_objects(ex["torch_blocked"]))
    cases = torch.load(io.BytesIO(inputs), weights_only=True)
    ns: dict = {"__name__": "__main__", "__builtins__": builtins}
    for label, source in job["cells"]:
        try:
            exec(compile(_python(source), f"<{label}>", "exec"), ns)  # noqa: S102 - the learner's cells
        except BaseException as exc:  # noqa: BLE001 - one cell's error does not stop the others
            notes.append({"cell": label, **_words(exc)})
    fn = ns.get(ex["function"])
    if fn is None:
        return {"found": False, "cells": notes, "notes": [], "results": []}
    call = fn
    if ex.get("driver"):
        dns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math}
        exec(compile(ex["driver"], "<driver>", "exec"), dns)  # noqa: S102 - the test author's driver
        driver = dns[ex["driver_name"]]

        def call(*args, **kwargs):
            return driver(fn, *args, **kwargs)

    results = []
    for args, kwargs in cases:
        try:
            out = call(*args, **kwargs)
            entry = {"ok": _data(out)}
            if ex.get("unchanged"):
                entry["after"] = _data([args, kwargs])
        except BaseException as exc:  # noqa: BLE001 - reported as data
            entry = {"raised": _words(exc)}
        results.append(entry)
    return {"found": True, "kind": type(fn).__name__[:80], "cells": notes, "notes": [],
            "results": results}


def _data(value, depth: int = 0):
    """What the learner's function returned, as plain data; anything else becomes a description
    (``{"__not_data__": ...}``) that the trusted side turns into a message."""
    import torch

    if depth > 8:
        return {"__not_data__": "a structure nested more than 8 deep"}
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if value.device.type != "cpu":
            return {"__not_data__": "tensor", "device": str(value.device),
                    "shape": list(value.shape), "dtype": str(value.dtype)}
        return value.detach().contiguous().clone()
    if isinstance(value, torch.Tensor):
        return {"__not_data__": f"a {kind.__name__} (a subclass of torch.Tensor)"}
    if kind in (int, float, bool, complex, str) or value is None:
        return value
    if kind is torch.Size:
        return tuple(int(v) for v in value)
    if kind is torch.dtype:
        return value
    if kind in (tuple, list):
        if len(value) > 1000:
            return {"__not_data__": f"a {kind.__name__} of {len(value)} items"}
        items = [_data(v, depth + 1) for v in value]
        return tuple(items) if kind is tuple else items
    if kind is dict and all(type(k) is str for k in value) and len(value) <= 1000:
        return {k: _data(v, depth + 1) for k, v in value.items()}
    return {"__not_data__": f"a {kind.__module__}.{kind.__qualname__}"[:120]}


def main() -> int:
    return serve()


if __name__ == "__main__":
    # run as the importable module so that children see the same module objects
    from autograder.hidden_runner import main as _main

    sys.exit(_main())
