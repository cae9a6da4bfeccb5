"""The process that runs nbgrader: ``python -m autograder.worker TASKS.json``.

The instructor's command never imports nbgrader itself. It writes a list of
tasks, each in its own scratch nbgrader root, and starts this worker with the
right environment (the interpreter's ``bin`` on PATH, because nbgrader runs
``alembic`` by name; ``TRANSFORMER_LAB_GRADING=1`` while grading). The worker
runs the tasks one after another and leaves, in each task's root:

* ``started``: written before the task runs (a root with ``started`` and no
  result means the worker died on that task);
* ``result.json``: what happened (``status`` "ok" or "error", scores, messages).

One worker grades a list of submissions sequentially; the parent can start
several workers on disjoint lists (one per core) because every task has its own
root and gradebook.

Task kinds:

``generate``: ``{"op": "generate", "root": R, "lecture": L}``. ``R/solutions/L``
    exists; runs ``generate_assignment`` into ``R/course/L`` and fills ``R/gradebook.db``.
``grade``: ``{"op": "grade", "root": R, "lecture": L, "student": S, "timeout": T, "hidden": [F, ...]}``.
    ``R/gradebook.db`` (from a ``generate`` task) and ``R/submitted/S/L/L.ipynb`` exist;
    runs ``autograde`` and ``generate_feedback``, and records per-cell scores
    and the errors the graded cells raised. ``hidden``: the hidden-test files of the
    lecture (``autograder/hidden.py``); after the notebook has run in the kernel they
    decide the graded cells whose visible tests passed, outside the kernel, before
    nbgrader saves the grades.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import kernel_wakeup
from .course import COURSE_ID, REPO, config_file_text, nbgrader_config
from .sandbox import Limits, available, kill_uid, sandbox_uid

# What the current grade task runs under (set by ``_grade``; one task at a time per worker).
_LIMITS = Limits()
_SPEC: dict[str, Any] = {}
#: The current grade task's hidden-test files and scratch root (set by ``_grade``).
_HIDDEN: dict[str, Any] = {}
#: Things that went wrong in the current notebook, in words (become the result's notes).
_EVENTS: list[str] = []

def autograde_preprocessors() -> list[str]:
    """nbgrader's own autograde steps, with its Execute replaced by :class:`SandboxExecute`."""
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute

    steps = Autograde.class_traits()["autograde_preprocessors"].default()
    return [
        "autograder.worker.SandboxExecute" if pp is Execute else f"{pp.__module__}.{pp.__name__}"
        for pp in steps
    ]


def _note(text: str) -> None:
    if text not in _EVENTS:
        _EVENTS.append(text)


_SIGNALS = {
    6: "SIGABRT (aborted, e.g. out of memory in C++)",
    9: "SIGKILL (killed, e.g. out of memory)",
    11: "SIGSEGV (segmentation fault)",
    7: "SIGBUS (bus error)",
    15: "SIGTERM",
}


def _exit_words(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        return "killed by signal " + _SIGNALS.get(-code, str(-code))
    return f"it exited with status {code} (os._exit or similar)"


#: What a graded cell relies on; a notebook that replaces any of them before a graded
#: cell (monkeypatching a check to always agree) gets that cell refused.
GUARDED = [
    *(f"transformer_lab.grading:{n}" for n in (
        "check_close", "check_shape", "check_dtype", "check_true", "blocked", "hidden_rng",
        "ReferenceBlocked", "_fail", "_describe")),
    *(f"torch:{n}" for n in (
        "allclose", "isclose", "equal", "where", "full_like", "isinf", "as_tensor", "testing.assert_close",
        "Tensor.allclose", "Tensor.equal", "Tensor.any", "Tensor.all", "Tensor.abs", "Tensor.to",
        "Tensor.__eq__", "Tensor.__ne__", "Tensor.__gt__", "Tensor.__and__", "Tensor.__invert__")),
    *(f"builtins:{n}" for n in (
        "isinstance", "bool", "float", "len", "abs", "all", "any", "max", "min", "AssertionError",
        "tuple", "zip", "__import__")),
]
# Names every lecture binds the same way (a lecture may use any other name, ``A`` included, for
# its own objects: the points are decided by the hidden tests, outside the kernel).
_MAIN_NAMES = (("grading", "transformer_lab.grading"), ("torch", "torch"))

#: Evaluated in the kernel (as a user expression, so nothing is left behind): the
#: identity of every guarded object, and whether the notebook's names still point at them.
FINGERPRINT = (
    "(lambda sys, ft: [[__import__(m) for m in ('builtins', 'torch', 'torch.testing', "
    "'transformer_lab.grading')], "
    "repr(([(p, (lambda o: (id(o), id(getattr(o, '__code__', None))))("
    "ft.reduce(getattr, p.split(':')[1].split('.'), sys.modules[p.split(':')[0]]))) "
    "for p in %r], "
    "[(n, getattr(sys.modules['__main__'], n, sys.modules.get(m)) is sys.modules.get(m)) "
    "for n, m in %r]))][1])(__import__('sys'), __import__('functools'))"
) % (GUARDED, _MAIN_NAMES)


_BROKEN = "<the fingerprint expression failed>"


def _changed(baseline: str, now: str | None) -> list[str]:
    """Names of the guarded objects that differ between two fingerprints."""
    import ast

    if now is None or now == _BROKEN:
        return ["the grading helpers (they could not be inspected)"]
    def parse(text: str):
        value = ast.literal_eval(text)  # the text/plain of a str is its repr
        return ast.literal_eval(value) if isinstance(value, str) else value

    (b_ids, _), (n_ids, n_names) = parse(baseline), parse(now)
    old = dict(b_ids)
    changed = [p.replace(":", ".").replace("builtins.", "") for p, v in n_ids if old.get(p) != v]
    changed += [f"the name {n!r}" for n, ok in n_names if not ok]
    return changed


def _load_sandbox_classes():
    """Defined lazily: nbgrader and jupyter_client are only imported in the worker."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbformat.notebooknode import NotebookNode
    from nbgrader.preprocessors import Execute

    class SandboxKernelManager(AsyncKernelManager):
        """Starts the kernel through ``python -m autograder.sandbox`` (see sandbox.py)."""

        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            spec = json.dumps(_SPEC or {"limits": _LIMITS.to_dict(), "isolate": False})
            return [sys.executable, "-m", "autograder.sandbox", spec, "--", *cmd]

    def _error(ename: str, evalue: str) -> NotebookNode:
        return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                            traceback=[f"{ename}: {evalue}"])

    class SandboxExecute(Execute):
        """nbgrader's Execute with the grader's limits: a wall clock for the whole
        notebook, output kept per cell capped, a dead kernel recorded on its cell
        (the cells after it are not run: 0 points) instead of failing the notebook,
        and every process of the sandbox uid killed afterwards."""

        def __init__(self, **kw):
            kw["kernel_manager_class"] = SandboxKernelManager
            super().__init__(**kw)

        def preprocess(self, nb, resources=None, km=None):
            self.kernel_manager_class = SandboxKernelManager
            self._deadline = time.monotonic() + _LIMITS.notebook_timeout
            self._dead: str | None = None
            self._out_bytes: dict[int, int] = {}
            self._cut: set[int] = set()
            self.__dict__.pop("_baseline", None)
            try:
                nb, resources = super().preprocess(nb, resources, km)
            finally:
                _cleanup_processes(self)
            _hidden_tests(self, nb, resources)
            return nb, resources

        def _get_timeout(self, cell):
            timeout = super()._get_timeout(cell)
            remaining = max(1, int(self._deadline - time.monotonic()))
            return min(timeout, remaining) if timeout else remaining

        def _fingerprint(self) -> str | None:
            try:
                msg_id = self.kc.execute("", silent=True, store_history=False,
                                         user_expressions={"fp": FINGERPRINT})
                reply = self.wait_for_reply(msg_id)
                fp = reply["content"]["user_expressions"]["fp"]
                # an expression that fails in the kernel: something it relies on is broken
                return fp["data"]["text/plain"] if fp.get("status") == "ok" else _BROKEN
            except Exception:  # noqa: BLE001 - a kernel that does not answer: no check
                return None

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type != "code" or not cell.source.strip():
                return cell, self.resources
            if not hasattr(self, "_baseline"):
                self._baseline = self._fingerprint()  # before any of the notebook's code
                if self._baseline == _BROKEN:  # e.g. no transformer_lab in this kernel: no check
                    self._baseline = None
            graded = cell.metadata.get("nbgrader", {}).get("grade")
            if graded and self._dead is None and self._baseline is not None:
                now = self._fingerprint()
                try:
                    changed = _changed(self._baseline, now) if now is not None else []
                except (ValueError, SyntaxError, TypeError):  # an answer we cannot read
                    changed = ["the grading helpers (they could not be inspected)"]
                if changed and time.monotonic() < self._deadline:
                    name = cell.metadata["nbgrader"].get("grade_id", f"cell {index}")
                    shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
                    cell.outputs = [_error("GradingTampered", "not run: the notebook replaced what "
                                           f"the tests rely on ({shown})")]
                    _note(f"{name}: not run, the notebook tampered with the grading "
                          f"(it replaced {shown})")
                    return cell, self.resources
            if self._dead is not None:
                cell.outputs = [_error("KernelDied", f"not run: the kernel died or hung in an earlier cell ({self._dead})")]
                return cell, self.resources
            if time.monotonic() >= self._deadline:
                cell.outputs = [_error("NotebookTimeLimit", "not run: the notebook used up its "
                                       f"{_LIMITS.notebook_timeout} s time limit")]
                _note(f"the notebook ran out of its {_LIMITS.notebook_timeout} s time limit; "
                      "later cells were not run")
                return cell, self.resources
            try:
                return super().preprocess_cell(cell, resources, index)
            except CellTimeoutError:
                # the interrupt did not stop it (SIGINT ignored, stuck in C): the kernel is
                # still busy, so nothing after this cell can run
                name = cell.metadata.get("nbgrader", {}).get("grade_id") or f"cell {index}"
                self._dead = name
                cell.outputs.append(_error("CellTimeoutError", "stopped after the time limit; "
                                           "the kernel ignored the interrupt"))
                _note(f"{name} was stopped after the time limit and the kernel ignored the "
                      "interrupt; the cells after it were not run")
                return cell, self.resources
            except DeadKernelError:
                code = None
                try:
                    code = self.km.provisioner.process.poll()
                except Exception:  # noqa: BLE001
                    pass
                name = cell.metadata.get("nbgrader", {}).get("grade_id") or f"cell {index}"
                self._dead = name
                words = _exit_words(code)
                cell.outputs.append(_error("KernelDied", f"the kernel died in this cell: {words}"))
                _note(f"the kernel died in {name}: {words}; the cells after it were not run")
                return cell, self.resources

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            size = len(content.get("text", "") or "") + sum(
                len(v) if isinstance(v, str) else len(json.dumps(v)) for v in (content.get("data") or {}).values()
            ) + sum(len(t) for t in content.get("traceback", []) or [])
            used = self._out_bytes.get(cell_index, 0) + size
            self._out_bytes[cell_index] = used
            if used > _LIMITS.output_bytes:
                if cell_index not in self._cut:
                    self._cut.add(cell_index)
                    outs.append(NotebookNode(output_type="stream", name="stderr", text=(
                        f"\n[output cut: this cell printed more than {_LIMITS.output_bytes} bytes, "
                        "the grader's limit]\n")))
                    _note(f"output over the {_LIMITS.output_bytes // 1024} KiB per-cell limit was cut")
                if msg.get("msg_type") == "error":  # keep the error itself: it decides the grade
                    content = dict(content, traceback=(content.get("traceback") or [])[-3:])
                    outs.append(NotebookNode(output_type="error", ename=content.get("ename", ""),
                                             evalue=str(content.get("evalue", ""))[:1000],
                                             traceback=[str(t)[:1000] for t in content["traceback"]]))
                return None
            return super().output(outs, msg, display_id, cell_index)

    return SandboxKernelManager, SandboxExecute


def _hidden_tests(execute, nb, resources) -> None:
    """Decide the graded cells' hidden tests outside the kernel (``autograder/hidden.py``)."""
    import os
    import tempfile

    from . import hidden
    from .course import SECRET_ENV

    info = (resources or {}).get("nbgrader", {})
    lecture = info.get("assignment", "")
    files = [Path(f) for f in _HIDDEN.get("files", [])]
    root = _HIDDEN.get("root")
    if not _HIDDEN:  # nbgrader's own tools with autograder/nbgrader_config.py
        from nbgrader.coursedir import CourseDirectory

        cd = CourseDirectory(config=execute.config)
        files = [Path(cd.format_path(cd.source_directory, ".", lecture)) / hidden.TESTS_FILE]
        root = tempfile.mkdtemp(prefix="tlab-hidden-")
    if not any(f.is_file() for f in files):
        return
    spec = _SPEC or {"isolate": False, "uid": sandbox_uid(), "limits": _LIMITS.to_dict(),
                     "repo": str(REPO), "keep": [], "hide": []}
    student = info.get("student", "")
    data_dir = Path(root) / "submitted" / student / lecture
    verdicts = hidden.decide(
        nb, files, lecture, Path(root) / "hidden", spec, _LIMITS.cell_timeout,
        os.environ.get(SECRET_ENV) or None, str(data_dir) if data_dir.is_dir() else None,
    )
    _cleanup_processes()
    broken = [v for v in verdicts if v.ename == hidden.GRADER_ERROR]
    if broken:
        _note(f"{broken[0].cell}: {broken[0].message[:300]}")


def _cleanup_processes(client=None) -> None:
    """Kill what the notebook left running: every process of the sandbox uid, or
    (not isolated) the kernel's process group."""
    if _SPEC.get("isolate"):
        n = kill_uid(int(_SPEC["uid"]))
        if n:
            _note(f"{n} process(es) the notebook started were still running after it and were killed")
    elif client is not None:
        try:
            pid = client.km.provisioner.process.pid
            import os
            import signal

            os.killpg(pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass


def __getattr__(name: str):
    if name in ("SandboxExecute", "SandboxKernelManager"):
        km, ex = _load_sandbox_classes()
        globals().update(SandboxKernelManager=km, SandboxExecute=ex)
        return globals()[name]
    raise AttributeError(name)


def _api(root: Path, timeout: int | None = None):
    from nbgrader.apps.api import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    config = nbgrader_config(root, timeout)
    config.Autograde.autograde_preprocessors = autograde_preprocessors()
    (root / "nbgrader_config.py").write_text(config_file_text(config))
    coursedir = CourseDirectory(config=config)
    return NbGraderAPI(coursedir=coursedir, config=config), config


def _log_tail(result: dict[str, Any], n: int = 20) -> str:
    text = (result.get("error") or "") + "\n" + (result.get("log") or "")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _generate(task: dict[str, Any]) -> dict[str, Any]:
    root = Path(task["root"])
    api, _ = _api(root)
    result = api.generate_assignment(task["lecture"], force=True, create=True)
    if not result.get("success"):
        return {
            "status": "error",
            "message": "generate_assignment failed: " + _error_line(result),
            "log": _log_tail(result, 60),
        }
    return {"status": "ok"}


_EXC_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b:?\s")


def _error_line(result: dict[str, Any]) -> str:
    """The most telling line of nbgrader's output: the first exception it logged
    (e.g. "ValidationError: Duplicate grade id: ex1"), else its last [ERROR] line."""
    lines = [ln.strip() for ln in (result.get("log") or "").splitlines() if ln.strip()]
    lines += [ln.strip() for ln in (result.get("error") or "").splitlines() if ln.strip()]
    generic = ("Please see the", "NbGraderException", "may be corrupted")
    named = [ln for ln in lines if _EXC_LINE.match(ln) and not any(g in ln for g in generic)]
    errors = [ln for ln in lines if ln.startswith("[ERROR]") and not any(g in ln for g in generic)]
    pick = (named or errors or lines or ["(nbgrader said nothing)"])[0 if named else -1]
    return pick if len(pick) <= 240 else pick[:237] + "..."


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _cell_errors(notebook_path: Path) -> list[dict[str, str]]:
    """The errors raised by the graded notebook's cells: grade id (or cell number), name, message."""
    import nbformat

    errors = []
    try:
        nb = nbformat.read(str(notebook_path), as_version=4)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        return [{"cell": "?", "ename": type(exc).__name__, "evalue": _first_line(exc)}]
    for i, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {})
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append(
                    {
                        "cell": meta.get("grade_id") or f"cell {i}",
                        "graded": bool(meta.get("grade")),
                        "ename": out.get("ename", ""),
                        "evalue": _first_line(out.get("evalue", "")),
                    }
                )
    return errors


#: nbgrader's words when the kernel died or stayed silent before running any cell. The kernel
#: is the course's, not the learner's (no cell has run yet), so this is the machine's fault:
#: measured in CI, once in ~30 class runs on a loaded 2-core machine. Grading is retried.
_KERNEL_START_FAILED = ("Kernel died before replying to kernel_info", "Kernel didn't respond")
KERNEL_START_ATTEMPTS = 3


def _autograde(api, lecture: str, student: str, attempts: int = KERNEL_START_ATTEMPTS) -> dict[str, Any]:
    """``api.autograde``, run again (up to ``attempts`` times in all) while its kernel fails to
    start, so that a busy machine never costs a learner a grade. Each retry is logged; a
    notebook that fails in any other way is not retried (its error is the learner's to see)."""
    events = list(_EVENTS)
    for attempt in range(1, attempts + 1):
        _EVENTS[:] = events  # what a failed start noted is not this notebook's
        result = api.autograde(lecture, student, force=True, create=True)
        _cleanup_processes()
        failed_to_start = not result.get("success") and any(
            words in (result.get("log") or "") + (result.get("error") or "") for words in _KERNEL_START_FAILED)
        if not failed_to_start or attempt == attempts:
            if failed_to_start:
                _note(f"the kernel failed to start {attempts} times; grade this notebook again")
            return result
        print(f"[autograder] {lecture}/{student}: the kernel failed to start (attempt {attempt} of "
              f"{attempts}); grading it again", file=sys.stderr, flush=True)
        time.sleep(1.0 * attempt)
    raise AssertionError("unreachable")


def _grade(task: dict[str, Any]) -> dict[str, Any]:
    from nbgrader.api import Gradebook

    global _LIMITS, _SPEC
    root = Path(task["root"])
    lecture, student = task["lecture"], task["student"]
    limits = dict(task.get("limits") or {})
    if task.get("timeout"):
        limits["cell_timeout"] = int(task["timeout"])
    _LIMITS = Limits.from_env(**limits)
    _SPEC = sandbox_spec(root, _LIMITS)
    _HIDDEN.clear()
    _HIDDEN.update(files=list(task.get("hidden") or []), root=str(root))
    _cleanup_processes()  # anything a previous task left behind
    _EVENTS.clear()
    if not _SPEC["isolate"]:
        _note(available()[1])
    gradebook = root / "gradebook.db"
    if gradebook.exists():
        gradebook.chmod(0o600)  # the hidden tests: root only, whatever else happens
    api, config = _api(root, _LIMITS.cell_timeout)
    t0 = time.perf_counter()
    result = _autograde(api, lecture, student)
    seconds = time.perf_counter() - t0
    if not result.get("success"):
        why = _explain(root / "submitted" / student / lecture / f"{lecture}.ipynb", lecture,
                       config, _error_line(result))
        return {
            "status": "error",
            "message": why + "nbgrader autograde failed: " + _error_line(result),
            "log": _log_tail(result, 40),
            "seconds": seconds,
            "notes": list(_EVENTS),
            "isolated": bool(_SPEC["isolate"]),
        }
    scores: dict[str, float] = {}
    max_scores: dict[str, float] = {}
    with Gradebook(config.CourseDirectory.db_url, COURSE_ID) as gb:
        submission = gb.find_submission(lecture, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                scores[grade.name] = float(grade.score or 0.0)
                max_scores[grade.name] = float(grade.max_score or 0.0)
    graded_nb = root / "autograded" / student / lecture / f"{lecture}.ipynb"
    errors = _cell_errors(graded_nb)
    feedback = api.generate_feedback(lecture, student, force=True)
    html = root / "feedback" / student / lecture / f"{lecture}.html"
    return {
        "status": "ok",
        "scores": scores,
        "max_scores": max_scores,
        "errors": errors,
        "feedback": str(html) if feedback.get("success") and html.exists() else None,
        "feedback_error": None if feedback.get("success") else _error_line(feedback),
        "seconds": seconds,
        "notes": list(_EVENTS),
        "isolated": bool(_SPEC["isolate"]),
        "limits": _LIMITS.to_dict(),
    }


def _explain(notebook: Path, lecture: str, config, error: str) -> str:
    """Why nbgrader could not grade a submission, in an instructor's words (ends with "; ")."""
    try:
        raw = notebook.read_bytes()
    except OSError:
        return "the notebook could not be read; "
    if not raw.strip():
        return "the notebook file is empty; "
    try:
        data = json.loads(raw)
    except ValueError:
        return "the file is not a valid notebook (broken JSON: cut short or not a notebook); "
    ids = {
        ((c.get("metadata") or {}).get("nbgrader") or {}).get("grade_id")
        for c in (data.get("cells") or []) if isinstance(c, dict)
    }
    try:
        from nbgrader.api import Gradebook

        with Gradebook(config.CourseDirectory.db_url, COURSE_ID) as gb:
            expected = {c.name for nb in gb.find_assignment(lecture).notebooks for c in nb.grade_cells}
    except Exception:  # noqa: BLE001
        expected = set()
    if expected and not (expected & ids):
        return f"this is not a notebook of {lecture}: none of its graded cells is in it; "
    if "ValidationError" in error or "grade_id" in error or "checksum" in error.lower():
        return "the notebook's grading metadata was edited (a locked or graded cell was changed), so nbgrader refused it; "
    if "Kernel died" in error or "kernel_info" in error:
        return "the notebook's kernel could not start; "
    return ""


def sandbox_spec(root: Path, limits: Limits) -> dict[str, Any]:
    """What ``python -m autograder.sandbox`` needs to start this task's kernel."""
    import importlib.util

    isolate = available()[0]
    keep = [sys.prefix, sys.base_prefix]
    found = importlib.util.find_spec("transformer_lab")
    if found is not None and found.submodule_search_locations:
        keep.append(str(Path(list(found.submodule_search_locations)[0]).parent))
    keep = [str(Path(k).resolve()) for k in keep]
    hide = []
    workspace = Path(root).resolve().parents[2]  # OUT/work/<lecture>/<student>
    if not any(k == str(workspace) or k.startswith(str(workspace) + "/") for k in keep):
        hide.append(str(workspace))
    return {
        "isolate": isolate,
        "uid": sandbox_uid(),
        "limits": limits.to_dict(),
        "repo": str(REPO),
        "keep": keep,
        "hide": hide,
    }


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    root = Path(task["root"])
    (root / "started").write_text(str(time.time()))
    try:
        if task["op"] == "generate":
            result = _generate(task)
        elif task["op"] == "grade":
            result = _grade(task)
        else:
            result = {"status": "error", "message": f"unknown task {task['op']!r}"}
    except Exception as exc:  # noqa: BLE001 - one task's failure never stops the others
        result = {
            "status": "error",
            "message": f"{type(exc).__name__}: {_first_line(exc)}",
            "log": traceback.format_exc(),
        }
    (root / "result.json").write_text(json.dumps(result, indent=1))
    return result


#: Set by a task run on a Dask worker (``cluster.py``) to that worker's pid: the grader then
#: dies with it (a Dask worker killed mid-grade leaves no grader running; the task is retried
#: elsewhere), and writes its own pid to ``grader.pid`` so the next task there can clean up
#: after it (its sandbox uid's processes).
PARENT_ENV = "AUTOGRADER_DIE_WITH_PARENT"


def _die_with_parent() -> None:
    import os

    parent = os.environ.get(PARENT_ENV)
    if not parent or sys.platform != "linux":
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the line above
        os._exit(1)
    try:
        Path("grader.pid").write_text(str(os.getpid()))  # the cwd: the task's root
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m autograder.worker TASKS.json", file=sys.stderr)
        return 2
    tasks = json.loads(Path(argv[0]).read_text())
    _die_with_parent()
    kernel_wakeup.install()  # nbclient's wait for a cell's reply cannot stall (see the module)
    for task in tasks:
        run_task(task)
    return 0


if __name__ == "__main__":
    # Run as the importable module, not as __main__: nbgrader imports
    # "autograder.worker.SandboxExecute", which must see this task's limits.
    from autograder.worker import main as _main

    sys.exit(_main())
