"""Hidden tests decided where the learner's code cannot reach.

A lecture declares its hidden tests in ``solutions/NN_topic/hidden_tests.py``, one
:class:`HiddenTest` per graded test cell::

    from autograder.hidden import Case, HiddenTest
    from transformer_lab import attention as A
    import torch, torch.nn.functional as F

    def scores_cases(rng):                     # rng: seeded by the course secret
        for shape_q, shape_k, dtype in [((3, 5, 7, 6), (3, 5, 2, 6), torch.float64), ...]:
            q = torch.randn(*shape_q, generator=rng, dtype=dtype)
            k = torch.randn(*shape_k, generator=rng, dtype=dtype)
            yield Case(f"q {shape_q}, k {shape_k}, {dtype}", q, k)

    TESTS = [
        HiddenTest(
            cell="ex1_attention_scores_test",  # the graded cell whose points this decides
            function="attention_scores",       # the learner's name for the function
            cases=scores_cases,
            reference=A.attention_scores,      # expected = reference(*case.args, **case.kwargs)
            blocked=[A.attention_scores, A.scaled_dot_product_attention, F.scaled_dot_product_attention],
            mistakes={"forgot the 1/sqrt(D) scale": lambda q, k: q @ k.transpose(-2, -1)},
            hint="scale by 1/sqrt(D) with D = q.shape[-1]",
        ),
    ]

How a submission is graded (``run`` below, called by the worker after nbgrader has
run the notebook in the sandboxed kernel, which still runs the *visible* tests and
shows their teaching messages):

1. For every graded cell whose visible tests passed, the trusted grader draws the
   cases from :func:`transformer_lab.grading.hidden_rng` with the course secret and
   computes the expected values with the reference, here, in the worker.
2. The learner's setup and answer cells and the inputs (plain data) go to the
   fork server (``autograder/hidden_runner.py``), whose sandboxed child runs them
   with a view of the library in which the blocked references are stand-ins that
   raise ``ReferenceBlocked`` (their code and source are not in the child at all)
   and PyTorch's shortcuts are blocked for good.
3. What came back is read with ``torch.load(weights_only=True)``, must be plain
   tensors and numbers, and is compared here with the expected values; the message
   of a failure is written here with the course's checkers, naming the case, what
   was expected, what came, and the hint for the mistake the answer matches.
4. The verdict becomes an output of the graded cell (an error, or a line saying
   the hidden tests passed) before nbgrader saves the grades, so the gradebook,
   the CSV, the report, the feedback and nbgrader's own formgrader agree.
"""

from __future__ import annotations

import ast
import atexit
import copy
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .course import REPO

#: The file of a lecture's hidden tests, beside its notebook in solutions/.
TESTS_FILE = "hidden_tests.py"
#: The library whose references a view blocks.
PACKAGE = "transformer_lab"
#: How a hidden test's verdict starts in the notebook (the report tells hidden from visible by it).
PREFIX = "hidden test"
#: The last line of a failed hidden test's message.
WHERE = ("(hidden tests call your function on fresh inputs, in a separate process that runs only "
         "the setup cell and your answer cells)")
#: ename of a failure the instructor must look at (a hidden test that could not run).
GRADER_ERROR = "HiddenTestError"
#: The most bytes of one exercise's result the grader reads back.
MAX_RESULT = 64 << 20

__all__ = ["Case", "HiddenTest", "load_tests", "run", "TESTS_FILE", "HiddenTestSpecError"]


class HiddenTestSpecError(Exception):
    """A hidden-test file that cannot be used (the author's mistake, said in words)."""


# --------------------------------------------------------------------------- the spec


class Case:
    """One call of the learner's function: ``Case(label, *args, raises=None, **kwargs)``.

    ``label`` says in words what the case tries ("padding with an empty sequence,
    float64"); it is shown in the message when the case fails. ``args``/``kwargs`` are
    plain data (tensors, numbers, strings, ``None``, tuples, lists, dicts, dtypes):
    they cross into the learner's process. ``raises``: the exception class the call
    must raise (say ``ValueError`` for an input the exercise says to refuse).
    ``show``: the inputs as the message shows them (default: the arguments, named by
    the reference's signature).
    """

    def __init__(self, label: str, *args: Any, raises: type[BaseException] | None = None,
                 show: Mapping[str, Any] | None = None, **kwargs: Any):
        if not isinstance(label, str) or not label:
            raise HiddenTestSpecError(f"Case needs a label (str) first; got {label!r}")
        self.label, self.args, self.kwargs, self.raises, self.show = label, args, kwargs, raises, show

    def __repr__(self) -> str:
        return f"Case({self.label!r})"


@dataclass
class HiddenTest:
    """The hidden tests of one graded cell.

    cell
        grade id of the graded test cell whose points this decides (for an instructor's
        extra test, a new id: the cell is added to the lecture).
    function
        the learner's name for the function (or class) under test.
    cases
        ``cases(rng) -> iterable of Case``, run on the trusted side; ``rng`` is a
        ``torch.Generator`` seeded by the course secret and the cell's id.
    reference
        ``reference(*case.args, **case.kwargs)`` gives the expected value (default:
        nothing to compare, for cases that only ``raise``).
    blocked
        what does not exist while the learner's function runs: the library's functions,
        methods and classes (absent from the process: their body is a stand-in raising
        ``ReferenceBlocked``) and PyTorch's shortcuts (replaced for good).
    driver
        optional, for exercises that take something other than data (a callable, a
        module): a top-level ``def drive(fn, *args, **kwargs)`` of the tests file that
        builds those from data and calls ``fn``; it runs in the learner's process and
        must return data. ``reference`` then takes the same ``*args, **kwargs``.
    check
        optional ``check(got, expected, case)`` raising ``AssertionError`` (use the
        checkers of ``transformer_lab.grading``) instead of the default comparison.
    mistakes
        hint -> function with the reference's signature returning what that mistake
        gives; a wrong answer that matches one gets that hint.
    hint
        the hint when no mistake matches.
    outputs
        names of the outputs when the function returns a tuple (``("out", "weights")``).
    atol, rtol, check_dtype
        the comparison (defaults by dtype: float64 1e-9/1e-7, float32 1e-5/1e-4).
    unchanged
        also fail an answer that modifies its tensor inputs in place.
    points
        only for an instructor's extra tests: the points of the new cell.
    """

    cell: str
    function: str
    cases: Callable[[Any], Iterable[Case]]
    reference: Callable[..., Any] | None = None
    blocked: Sequence[Any] = ()
    driver: Callable[..., Any] | None = None
    check: Callable[[Any, Any, Case], None] | None = None
    mistakes: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    hint: str | None = None
    outputs: Sequence[str] | None = None
    atol: float | None = None
    rtol: float | None = None
    check_dtype: bool = True
    unchanged: bool = False
    points: float | None = None


def load_tests(path: Path, name: str | None = None) -> list[HiddenTest]:
    """The ``TESTS`` of a hidden-tests file, checked (author errors are raised in words)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    modname = name or f"_tl_hidden_{path.parent.name}_{path.stem}_{digest}"
    modname = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in modname)
    if modname in sys.modules:
        module = sys.modules[modname]
    else:  # compiled here rather than imported: no __pycache__ beside the lecture
        module = types.ModuleType(modname)
        module.__file__ = str(path)
        sys.modules[modname] = module
        try:
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)  # noqa: S102
        except Exception:
            sys.modules.pop(modname, None)
            raise
    tests = getattr(module, "TESTS", None)
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, HiddenTest) for t in tests):
        raise HiddenTestSpecError(f"{path}: expected a list TESTS of HiddenTest; got {type(tests).__name__}")
    seen: set[str] = set()
    for t in tests:
        if not isinstance(t.cell, str) or not t.cell or t.cell in seen:
            raise HiddenTestSpecError(f"{path}: cell {t.cell!r} is empty or used twice")
        seen.add(t.cell)
        if not (isinstance(t.function, str) and t.function.isidentifier()):
            raise HiddenTestSpecError(f"{path}: {t.cell}: function must be a name; got {t.function!r}")
        if not callable(t.cases):
            raise HiddenTestSpecError(f"{path}: {t.cell}: cases must be a function of the rng")
        blocked_names(t.blocked)  # raises for what cannot be blocked
        if t.driver is not None:
            driver_source(t.driver)
    return list(tests)


# --------------------------------------------------------------------------- what is blocked


def _public_name(obj: Any) -> tuple[str, str]:
    """(module, qualname) by which ``obj`` is importable, checked."""
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    candidates = []
    if module and qual:
        candidates.append((module, qual))
    owner = getattr(obj, "__objclass__", None)  # a method of a C type (torch.Tensor.softmax)
    if owner is not None and qual:
        candidates.append((owner.__module__, f"{owner.__qualname__}.{obj.__name__}"))
    short = getattr(obj, "__name__", "")
    for public in ("torch.nn.functional", "torch", "torch.linalg", "torch.special", "torch.fft"):
        candidates.append((public, short))
    for mod, name in candidates:
        try:
            found = _resolve(mod, name)
        except Exception:  # noqa: BLE001 - try the next spelling
            continue
        if found is obj or getattr(found, "__func__", None) is obj:
            return mod, name
    raise HiddenTestSpecError(f"cannot block {obj!r}: it is not importable by a module path")


def _resolve(module: str, qual: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def blocked_names(objs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """``module:qualname`` of what is blocked: (the library's, everything else's)."""
    lib, other = [], []
    for obj in objs:
        if isinstance(obj, str):
            module, _, qual = obj.partition(":")
            if not qual:
                raise HiddenTestSpecError(f"blocked name {obj!r}: expected 'module:qualname'")
        else:
            module, qual = _public_name(obj)
        name = f"{module}:{qual}"
        (lib if module == PACKAGE or module.startswith(PACKAGE + ".") else other).append(name)
    return sorted(set(lib)), sorted(set(other))


def driver_source(driver: Callable[..., Any]) -> str:
    """The source of a driver (a top-level def of the tests file), which runs in the learner's process."""
    if not isinstance(driver, types.FunctionType) or driver.__qualname__ != driver.__name__:
        raise HiddenTestSpecError(f"driver {driver!r}: expected a top-level def")
    if driver.__code__.co_freevars:
        raise HiddenTestSpecError(f"driver {driver.__name__}: must not use variables of an enclosing function")
    return textwrap.dedent(inspect.getsource(driver))


# --------------------------------------------------------------------------- the blocked view


def _stub(name: str) -> list[str]:
    from transformer_lab.grading import _message

    return [
        "from transformer_lab.grading import ReferenceBlocked as _ReferenceBlocked",
        f"raise _ReferenceBlocked({_message(name)!r})",
    ]


def _find(tree: ast.Module, qual: str) -> ast.AST | None:
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for part in qual.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node


def stub_source(source: str, quals: Sequence[str], module: str) -> str:
    """``source`` with the functions (all methods, for a class) named by ``quals`` replaced by
    ``def name(*args, **kwargs): raise ReferenceBlocked(...)``: their code is gone, and any call,
    whatever its arguments, says what is blocked."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    targets: dict[int, tuple[int, str, str, str]] = {}
    for qual in quals:
        node = _find(tree, qual)
        if node is None:
            raise HiddenTestSpecError(f"cannot block {module}.{qual}: no def or class of that name in {module}")
        funcs = [node] if not isinstance(node, ast.ClassDef) else [
            n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in funcs:
            head = lines[fn.lineno - 1]
            indent = head[: len(head) - len(head.lstrip())]
            kind = "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"
            label = f"{module}.{qual}" if fn is node else f"{module}.{qual} (its {fn.name})"
            new = [f"{indent}{kind} {fn.name}(*args, **kwargs):\n"]
            new += [indent + "    " + ln + "\n" for ln in _stub(label)]
            targets[fn.lineno] = (fn.end_lineno or fn.lineno, "".join(new), fn.name, label)
    for first in sorted(targets, reverse=True):  # decorators (above the def line) stay
        last, new, _, _ = targets[first]
        lines[first - 1:last] = [new]
    out = "".join(lines)
    compile(out, f"<view of {module}>", "exec")
    return out


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HiddenTestSpecError(f"cannot find the {PACKAGE} package")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def build_view(lib_names: Sequence[str], dest: Path) -> Path:
    """Write ``dest/transformer_lab/`` (every module of the package) with ``lib_names`` stubbed."""
    src = package_dir()
    by_module: dict[str, list[str]] = {}
    for name in lib_names:
        module, _, qual = name.partition(":")
        by_module.setdefault(module, []).append(qual)
    out = Path(dest) / PACKAGE
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        module = ".".join((PACKAGE, *rel.with_suffix("").parts))
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        text = path.read_text(encoding="utf-8")
        if module in by_module:
            text = stub_source(text, by_module.pop(module), module)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if by_module:
        raise HiddenTestSpecError(f"cannot block {sorted(by_module)}: no such module in {PACKAGE}")
    return out


# --------------------------------------------------------------------------- the fork server


class Runner:
    """The worker's fork server (``autograder/hidden_runner.py``), started on first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.views = Path(tempfile.mkdtemp(prefix="tlab-views-"))
        os.chmod(self.views, 0o700)
        self._made: dict[tuple[str, ...], Path] = {}
        atexit.register(self.close)
        atexit.register(shutil.rmtree, self.views, True)

    def view(self, lib_names: Sequence[str]) -> Path:
        """A view of the library with ``lib_names`` stubbed (one folder per set, reused)."""
        key = tuple(sorted(lib_names))
        if key not in self._made:
            dest = self.views / hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
            if dest.exists():
                shutil.rmtree(dest)
            build_view(key, dest)
            self._made[key] = dest / PACKAGE
        return self._made[key]

    def start(self) -> None:
        from .sandbox import scrubbed_env

        env = scrubbed_env()
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MPLBACKEND="Agg", TRANSFORMER_LAB_GRADING="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autograder.hidden_runner"], cwd=str(REPO), env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self._readline(180)
        if not line or "ready" not in line:
            self.close()
            raise RuntimeError("the hidden-test runner did not start")

    def _readline(self, timeout: float) -> str | None:
        import select

        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline()

    def run(self, job_file: Path, job: dict, timeout: float) -> list[dict] | None:
        """Send one job (the server gets its path and timeouts, nothing of the submission); the
        per-exercise replies, or None when the runner failed (it is restarted next time)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        request = {"job": str(job_file), "timeouts": [ex["timeout"] for ex in job["exercises"]],
                   "isolate": bool(job.get("isolate")), "uid": job.get("uid")}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self._readline(timeout)
        except (OSError, ValueError):
            line = None
        if not line:
            self.close()
            return None
        return json.loads(line)["results"]

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.proc = None


_RUNNER: Runner | None = None


def runner() -> Runner:
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = Runner()
    return _RUNNER


# --------------------------------------------------------------------------- one submission


@dataclass
class Verdict:
    """The hidden tests of one graded cell: passed, or why not (``ename``, ``message``)."""

    cell: str
    passed: bool
    ename: str = ""
    message: str = ""
    cases: int = 0

    def output(self) -> dict:
        """The notebook output that carries it (nbgrader scores an error output 0)."""
        if self.passed:
            return {"output_type": "stream", "name": "stdout",
                    "text": f"{PREFIX}s passed: {self.cases} fresh cases, run by the grader outside "
                            "your notebook\n"}
        text = f"{PREFIX}: {self.message}\n{WHERE}"
        return {"output_type": "error", "ename": self.ename, "evalue": text,
                "traceback": [f"{self.ename}: {text}"]}


def notebook_cells(nb) -> list[tuple[str, str]]:
    """(label, source) of the cells a hidden test runs: the setup cell, then every answer cell."""
    code = [c for c in nb.cells if c.get("cell_type") == "code"]
    meta = [(c.get("metadata", {}).get("nbgrader") or {}) for c in code]
    setup = [c for c, m in zip(code, meta, strict=True) if m.get("grade_id") == "setup"] or code[:1]
    cells = [("setup cell", setup[0].source)] if setup else []
    for c, m in zip(code, meta, strict=True):
        if m.get("solution") and not m.get("grade"):
            cells.append((f"answer cell {m.get('grade_id', '?')}", c.source))
    return cells


def _named_inputs(t: HiddenTest, case: Case) -> dict[str, Any]:
    if case.show is not None:
        return dict(case.show)
    try:
        bound = inspect.signature(t.reference).bind(*case.args, **case.kwargs)  # type: ignore[arg-type]
        return dict(bound.arguments)
    except (TypeError, ValueError):
        shown = {f"arg{i}": a for i, a in enumerate(case.args)}
        shown.update(case.kwargs)
        return shown


def _clone(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _plain(value: Any, depth: int = 0) -> str | None:
    """None when ``value`` is plain data (what a learner may send back), else what it is."""
    import torch

    if depth > 8:
        return "a structure nested too deep"
    kind = type(value)
    if kind is torch.Tensor:
        return None if value.device.type == "cpu" else f"a tensor on {value.device}"
    if kind in (int, float, bool, complex, str, torch.dtype) or value is None:
        return None
    if kind in (tuple, list):
        return next((w for w in (_plain(v, depth + 1) for v in value) if w), None)
    if kind is dict:
        if "__not_data__" in value:
            return "not_data"
        return next((w for w in (_plain(v, depth + 1) for v in value.values()) if w), None)
    return f"a {kind.__name__}"


def _tolerance(t: HiddenTest, expected: Any) -> tuple[float, float]:
    import torch

    dtype = expected.dtype if isinstance(expected, torch.Tensor) else None
    if dtype in (torch.float64, torch.complex128):
        atol, rtol = 1e-9, 1e-7
    elif dtype in (torch.float16, torch.bfloat16):
        atol, rtol = 1e-2, 1e-2
    elif dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        atol, rtol = 0.0, 0.0
    else:
        atol, rtol = 1e-5, 1e-4
    return (t.atol if t.atol is not None else atol), (t.rtol if t.rtol is not None else rtol)


def _close(got: Any, expected: Any, t: HiddenTest) -> bool:
    """Whether ``got`` matches ``expected`` (used to recognise a known mistake)."""
    try:
        compare(got, expected, t, "x", {}, None)
        return True
    except AssertionError:
        return False
    except Exception:  # noqa: BLE001 - a mistake function that does not apply to this input
        return False


def _not_data_words(value: Any) -> str | None:
    """A description of the first thing in ``value`` the learner's process could not send as data."""
    if isinstance(value, dict):
        if "__not_data__" in value:
            what = value["__not_data__"]
            if what == "tensor":
                return f"a tensor on {value.get('device')} (shape {tuple(value.get('shape', ()))}, {value.get('dtype')})"
            return str(what)
        return next((w for w in map(_not_data_words, value.values()) if w), None)
    if isinstance(value, (list, tuple)):
        return next((w for w in map(_not_data_words, value) if w), None)
    return None


def compare(got: Any, expected: Any, t: HiddenTest, name: str, inputs: Mapping[str, Any],
            hint: str | None) -> None:
    """The default comparison: raises ``AssertionError`` with a teaching message."""
    import torch

    from transformer_lab import grading

    if isinstance(expected, (tuple, list)):
        names = list(t.outputs or [f"output {i}" for i in range(len(expected))])
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            what = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else grading._describe(got)
            grading._fail(f"{name}: expected {len(expected)} results ({', '.join(names)}); got {what}",
                          grading._input_block(inputs), hint or grading._missing_return_hint(got))
        for part, g, e in zip(names, got, expected, strict=True):
            compare(g, e, t, f"{name}, {part}", inputs, hint)
        return
    if expected is None:
        grading.check_true(got is None, f"{name}: expected None; got {grading._describe(got)}", hint)
        return
    if isinstance(expected, torch.Tensor):
        if expected.dim() > 0 and isinstance(got, (list, tuple)):  # the visible tests ask for a tensor too
            grading._fail(f"{name}: expected {grading._describe(expected)}; got a {type(got).__name__} "
                          f"of {len(got)} items", grading._input_block(inputs),
                          "return a torch.Tensor (torch.tensor(...), torch.stack(...)), not a Python list")
        atol, rtol = _tolerance(t, expected)
        grading.check_close(got, expected, name, inputs=inputs, atol=atol, rtol=rtol, hint=hint,
                            check_dtype=t.check_dtype)
        return
    if isinstance(expected, (bool, int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (bool, int, float)):
            grading._fail(f"{name}: expected the number {expected!r}; got {grading._describe(got)}",
                          grading._input_block(inputs), hint or grading._missing_return_hint(got))
        atol, rtol = (t.atol or 0.0, t.rtol or 0.0) if isinstance(expected, (bool, int)) else _tolerance(t, None)
        if abs(float(got) - float(expected)) > atol + rtol * abs(float(expected)):
            grading._fail(f"{name}: wrong value", [*grading._input_block(inputs),
                          f"  expected: {expected!r}", f"  got:      {got!r}"], hint)
        return
    grading.check_true(got == expected, f"{name}: expected {expected!r}; got {grading._describe(got)}", hint)


def judge(t: HiddenTest, cases: list[Case], expected: list[Any], payload: Any) -> Verdict:
    """The verdict on what the learner's process sent back for one hidden test."""
    from transformer_lab import grading

    def fail(ename: str, message: str) -> Verdict:
        return Verdict(t.cell, False, ename, message, len(cases))

    if not isinstance(payload, dict):
        return fail("TypeError", "what came back from your code could not be read as data")
    if "setup_error" in payload:
        return fail(GRADER_ERROR, f"the grader could not start your code: {payload['setup_error']}")
    cell_errors = [e for e in payload.get("cells", []) if isinstance(e, dict)]
    told = "".join(
        f"\n  your {e.get('cell', '?')} raised {e.get('type', '?')}: {str(e.get('message', ''))[:300]}"
        for e in cell_errors[:5])
    if not payload.get("found"):
        return fail("NameError", (
            f"`{t.function}` was not defined after running the setup cell and your answer cells "
            f"in a fresh process.{told}\n  hint: the grader runs only the setup cell and the answer "
            "cells (### YOUR CODE HERE), in order: everything your function needs must be defined "
            "in its answer cell or an earlier one."))
    results = payload.get("results")
    if not isinstance(results, list) or len(results) != len(cases):
        return fail("TypeError", "what came back from your code could not be read")
    for i, (case, exp, res) in enumerate(zip(cases, expected, results, strict=True)):
        name = f"{t.function}, case {i + 1} of {len(cases)} ({case.label})"
        inputs = _named_inputs(t, case)
        block = "\n".join(grading._input_block(inputs))
        raised = res.get("raised") if isinstance(res, dict) else None
        if case.raises is not None:
            if raised and case.raises.__name__ in (raised.get("mro") or []):
                continue
            what = (f"raised {raised.get('type')}: {raised.get('message', '')[:300]}" if raised
                    else "returned without raising")
            return fail("AssertionError", f"{name}: expected a {case.raises.__name__}; {what}\n{block}"
                        + (f"\n  hint: {t.hint}" if t.hint else ""))
        if raised:
            ename = str(raised.get("type") or "Exception")
            ename = ename if ename.isidentifier() else "Exception"
            msg = str(raised.get("message", ""))[:600]
            if ename == "ReferenceBlocked":
                return fail(ename, f"{name}: {msg}")
            hint = _raising_mistake(t, cases, results, i, ename, msg) or t.hint
            extra = f"\n  hint: {hint}" if hint and ename not in ("NotImplementedError",) else ""
            if ename == "NameError":
                extra = ("\n  hint: the grader runs only the setup cell and the answer cells: define "
                         "what your function uses in an answer cell")
            return fail(ename, f"{name} raised {ename}: {msg}\n{block}{extra}{told}")
        if not isinstance(res, dict) or "ok" not in res:
            return fail("TypeError", f"{name}: no result came back")
        got = res["ok"]
        odd = _not_data_words(got)
        if odd is not None:
            if odd.startswith("a tensor on"):
                return fail("AssertionError", (
                    f"{name}: wrong device: expected a tensor on cpu, like the inputs; got {odd}\n{block}"
                    "\n  hint: create new tensors with device=x.device of an input x; never .cuda() or .to('meta')"))
            return fail("TypeError", (
                f"{name}: returned {odd}; the grader accepts plain torch.Tensor values and Python "
                f"numbers (in tuples, lists or dicts)\n{block}"))
        if _plain(got) is not None:
            return fail("TypeError", f"{name}: returned {_plain(got)}; expected plain tensors and numbers")
        if t.unchanged and not _same([list(case.args), dict(case.kwargs)], res.get("after")):
            # before the values: an answer that writes into its input usually also returns wrong
            # values, and "changed in place" is the mistake to name (not the nearest formula's)
            return fail("AssertionError", (
                f"{name}: your function changed its input in place\n{block}\n"
                "  hint: build new tensors (x * c, torch.cat, ...) instead of writing into the "
                "input (x[...] = ..., x.mul_(...), x += ...)"))
        hint = grading._missing_return_hint(got) if got is None and exp is not None else t.hint
        hint = _matching_mistake(t, cases, expected, results, i) or hint
        try:
            if t.check is not None:
                t.check(got, exp, case)
            else:
                compare(got, exp, t, name, inputs, hint)
        except AssertionError as err:
            return fail("AssertionError", str(err))
    return Verdict(t.cell, True, cases=len(cases))


def _matching_mistake(t: HiddenTest, cases: list[Case], expected: list[Any], results: list,
                      i: int) -> str | None:
    """The hint of the known mistake that case ``i``'s wrong result matches. Two mistakes can give the
    same values on one case (an ascending sort and no sort at all, on a case where both keep every
    token): then the one that also matches the answer's results on every other case is named."""
    got, exp = results[i].get("ok"), expected[i]
    candidates = []
    for text, mistake in t.mistakes.items():
        try:
            wrong = mistake(*_clone(cases[i].args), **_clone(cases[i].kwargs))
        except Exception:  # noqa: BLE001 - that mistake does not apply here
            continue
        if _close(got, wrong, t) and not _close(got, exp, t):
            candidates.append((text, mistake))
    return _pick(t, candidates, cases, results, i)


def _pick(t: HiddenTest, candidates: list, cases: list[Case], results: list, i: int) -> str | None:
    """Of the mistakes that explain case ``i``, the first that also agrees with every other case."""
    if len(candidates) > 1:
        for text, mistake in candidates:
            if all(_agrees(t, mistake, cases[j], results[j]) for j in range(len(cases)) if j != i):
                return text
    return candidates[0][0] if candidates else None


def _agrees(t: HiddenTest, mistake: Callable[..., Any], case: Case, res: Any) -> bool:
    """Whether an answer's result on ``case`` is what ``mistake`` gives (True where it cannot tell)."""
    if case.raises is not None or not isinstance(res, dict):
        return True
    raised = res.get("raised")
    if isinstance(raised, dict):  # the answer raised here: so must the mistake, the same way
        return _raises_like(mistake, case, str(raised.get("type")), str(raised.get("message", "")))
    if "ok" not in res:
        return True
    try:
        wrong = mistake(*_clone(case.args), **_clone(case.kwargs))
    except Exception:  # noqa: BLE001 - the mistake does not apply to this case
        return True
    return _close(res["ok"], wrong, t)


def _raising_mistake(t: HiddenTest, cases: list[Case], results: list, i: int, ename: str,
                     message: str) -> str | None:
    """The hint of the known mistake that raises what the learner's answer raised on case ``i`` (the
    same exception class and message): ``k.T`` on a 4-D tensor is named, not guessed. When two
    mistakes raise the same error there, the one that also agrees with the answer's other cases wins."""
    candidates = []
    for text, mistake in t.mistakes.items():
        if _raises_like(mistake, cases[i], ename, message):
            candidates.append((text, mistake))
    return _pick(t, candidates, cases, results, i)


def _raises_like(mistake: Callable[..., Any], case: Case, ename: str, message: str) -> bool:
    try:
        mistake(*_clone(case.args), **_clone(case.kwargs))
    except Exception as exc:  # noqa: BLE001 - the mistake's own error is what we compare
        return type(exc).__name__ == ename and str(exc)[:600] == message[:600]
    return False


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True  # numbers, strings, dtypes: passed by value


def _expected(t: HiddenTest, cases: list[Case]) -> list[Any]:
    import torch

    out = []
    for case in cases:
        if case.raises is not None or t.reference is None:
            out.append(None)
            continue
        with torch.no_grad():
            value = t.reference(*_clone(case.args), **_clone(case.kwargs))
        out.append(_clone(value))
    return out


def _load_result(path: Path) -> Any:
    import torch

    if not path.is_file() or path.stat().st_size > MAX_RESULT:
        return None
    try:
        return torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    except Exception:  # noqa: BLE001 - anything that is not plain data
        return "unreadable"


#: Cases and expected values already drawn in this worker: the same for every student of a class.
_PREPARED: dict[tuple[int, str, str, str | None], tuple[list[Case], list[Any]]] = {}


def prepare(tests: list[HiddenTest], lecture: str, secret: str | None) -> list[tuple[HiddenTest, list[Case], list[Any]]]:
    """Every test's cases (drawn with the course secret) and expected values, on the trusted side."""
    from transformer_lab.grading import hidden_rng

    prepared = []
    for t in tests:
        key = (id(t), t.cell, lecture, secret)
        if key not in _PREPARED:
            rng = hidden_rng(f"{lecture}/{t.cell}", secret=secret)
            cases = list(t.cases(rng))
            if not cases or not all(isinstance(c, Case) for c in cases):
                raise HiddenTestSpecError(f"{t.cell}: cases(rng) must give at least one Case")
            _PREPARED[key] = (cases, _expected(t, cases))
        cases, expected = _PREPARED[key]
        prepared.append((t, cases, expected))
    return prepared


def run(nb, tests: list[HiddenTest], lecture: str, workdir: Path, sandbox_spec: dict,
        timeout: float, secret: str | None, data_dir: str | None = None) -> list[Verdict]:
    """Run ``tests`` (those whose cells should be decided) on the learner's cells in ``nb``."""
    import torch

    if not tests:
        return []
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    verdicts: list[Verdict] = []
    runnable = []
    for t in tests:
        try:
            ((_, cases, expected),) = prepare([t], lecture, secret)
        except Exception as exc:  # noqa: BLE001 - the instructor's error, said on that cell
            verdicts.append(Verdict(t.cell, False, GRADER_ERROR,
                                    f"the hidden test itself failed (tell your instructor): "
                                    f"{type(exc).__name__}: {exc}"))
            continue
        runnable.append((t, cases, expected))
    if not runnable:
        return verdicts
    exercises = []
    for i, (t, cases, _) in enumerate(runnable):
        lib, other = blocked_names(t.blocked)
        inputs = workdir / f"inputs-{i}.pt"
        torch.save([(tuple(c.args), dict(c.kwargs)) for c in cases], inputs)
        ex = {"index": i, "function": t.function, "view": str(runner().view(lib)),
              "inputs": str(inputs), "output": str(workdir / f"result-{i}.pt"),
              "torch_blocked": other, "timeout": float(timeout), "unchanged": bool(t.unchanged)}
        if t.driver is not None:
            ex["driver"], ex["driver_name"] = driver_source(t.driver), t.driver.__name__
        Path(ex["output"]).unlink(missing_ok=True)
        exercises.append(ex)
    spec = dict(sandbox_spec)
    spec["hide"] = list(spec.get("hide", [])) + [str(package_dir())]
    pkg_parent = str(package_dir().parent)
    spec["keep"] = [k for k in spec.get("keep", []) if k != pkg_parent]
    job = {**{k: spec.get(k) for k in ("isolate", "uid", "limits", "repo", "keep", "hide")},
           "data_dir": data_dir, "cells": notebook_cells(nb), "exercises": exercises}
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    replies = runner().run(job_file, job, timeout * len(exercises) + 60)
    for i, (t, cases, expected) in enumerate(runnable):
        reply = replies[i] if replies and i < len(replies) else {"status": "died", "detail": "the runner failed"}
        status = reply.get("status")
        if status == "timeout":
            verdicts.append(Verdict(t.cell, False, "TimeoutError",
                                    f"{t.function}: stopped after the time limit ({timeout:g} s for all its "
                                    "hidden cases); an endless loop, or far too slow?", len(cases)))
            continue
        if status != "ok":
            verdicts.append(Verdict(t.cell, False, "KernelDied",
                                    f"{t.function}: the process running your code for the hidden tests "
                                    f"failed: {reply.get('detail', '')}", len(cases)))
            continue
        result = Path(exercises[i]["output"])
        if not result.is_file() or result.stat().st_size == 0:
            verdicts.append(Verdict(t.cell, False, "KernelDied", (
                f"{t.function}: the process running your code for the hidden tests ended before it had "
                "sent its results (os._exit, or a process killed from inside?)"), len(cases)))
            continue
        if result.stat().st_size > MAX_RESULT:
            verdicts.append(Verdict(t.cell, False, "TypeError",
                                    f"{t.function}: returned more than {MAX_RESULT >> 20} MiB of data",
                                    len(cases)))
            continue
        payload = _load_result(result)
        if payload == "unreadable":
            verdicts.append(Verdict(t.cell, False, "TypeError", (
                f"{t.function}: what came back could not be read as plain data (a torch.Tensor "
                "subclass, or an object of your own?); the grader accepts plain tensors and numbers"),
                len(cases)))
            continue
        verdicts.append(judge(t, cases, expected, payload))
    return verdicts


def lecture_tests(files: Sequence[Path]) -> list[HiddenTest]:
    """The hidden tests of a lecture and of the instructor's extra tests, from their files."""
    tests: list[HiddenTest] = []
    for path in files:
        if Path(path).is_file():
            tests += load_tests(Path(path))
    return tests


def decide(nb, files: Sequence[Path], lecture: str, workdir: Path, sandbox_spec: dict,
           timeout: float, secret: str | None, data_dir: str | None = None) -> list[Verdict]:
    """The worker's entry point: run the hidden tests of every graded cell of ``nb`` whose
    visible tests passed in the kernel, and put each verdict in its cell's outputs.

    Fails closed: when the hidden tests cannot run at all, every cell they should have
    decided gets an error (0 points) that says so, never the points unverified.
    """
    import nbformat

    by_cell = {}
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader") or {}
        if cell.get("cell_type") == "code" and meta.get("grade"):
            by_cell[meta.get("grade_id")] = cell

    def passed(cell) -> bool:  # a cell that already failed scores 0: nothing to decide
        return not any(o.get("output_type") == "error"
                       or (o.get("output_type") == "stream" and o.get("name") == "stderr")
                       for o in cell.get("outputs", []))

    t0 = time.perf_counter()
    try:
        tests = lecture_tests(files)
        todo = [t for t in tests if t.cell in by_cell and passed(by_cell[t.cell])]
        verdicts = run(nb, todo, lecture, workdir, sandbox_spec, timeout, secret, data_dir)
    except Exception as exc:  # noqa: BLE001 - fail closed, in words
        why = f"the hidden tests could not run (the grader's fault, tell your instructor): {type(exc).__name__}: {exc}"
        cells = [t.cell for t in todo] if "todo" in locals() else [g for g, c in by_cell.items() if passed(c)]
        verdicts = [Verdict(cell, False, GRADER_ERROR, why) for cell in cells]
    for v in verdicts:
        if v.cell in by_cell:
            by_cell[v.cell].outputs.append(nbformat.from_dict(v.output()))
    LAST_SECONDS[0] = time.perf_counter() - t0
    return verdicts


#: How long the last ``decide`` took (the worker reports it).
LAST_SECONDS = [0.0]
