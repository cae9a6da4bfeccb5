"""Known wrong answers, and the hint each must get: ``python -m autograder.mistakes NN_topic``.

A lecture lists the wrong answers learners write in ``solutions/NN_topic/known_mistakes.py``::

    from autograder.mistakes import WrongAnswer

    WRONG_ANSWERS = [
        WrongAnswer(
            cell="ex1_attention_scores",            # grade id of the answer cell it replaces
            name="forgot the scale",                # what the learner did, in words
            code='''
    def attention_scores(q, k):
        return q @ k.transpose(-2, -1)
    ''',
            visible="sqrt(D)",          # a piece of the visible test's failure message
            hidden="forgot the scale",  # a piece of the hidden tests' verdict
        ),
    ]

For each wrong answer, :func:`try_answer` runs, in this process and one namespace, the notebook's
setup cell, every answer cell of the instructor notebook with that one replaced by ``code``, then
the exercise's visible test cell (grade id ``<cell>_test``), and keeps what it raised; then it runs
that cell's hidden tests on the same function, on the trusted side (cases drawn with a fixed secret,
the references blocked for the duration of the calls, :func:`autograder.hidden.judge` for the
verdict). ``autograder/tests/test_known_mistakes.py`` asserts that each message holds its piece:
the learner who made that mistake is told that mistake, not another one.

``visible=None`` says the answer passes the visible tests (the exercise's text does not state the
requirement it breaks); then ``hidden`` must be given. ``hidden=None`` leaves the hidden verdict
unasked (it is still printed).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .course import KNOWN_MISTAKES_FILE as MISTAKES_FILE
from .course import SOLUTIONS

#: The secret the hidden cases are drawn with here (any fixed string: no grade depends on it).
SECRET = "known-mistakes"

__all__ = ["WrongAnswer", "Outcome", "load", "try_answer", "problems", "MISTAKES_FILE"]


@dataclass(frozen=True)
class WrongAnswer:
    """One wrong answer to one exercise, and the pieces of the two messages it must get."""

    cell: str
    name: str
    code: str
    visible: str | None
    hidden: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("cell", "name", "code"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"WrongAnswer.{field_name} must be a non-empty str; got {value!r}")
        if self.visible is None and self.hidden is None:
            raise ValueError(f"WrongAnswer {self.name!r}: give visible= or hidden= (what must it be told?)")


@dataclass
class Outcome:
    """What one wrong answer was told: the visible test's error (None: it passed), the hidden verdict."""

    answer: WrongAnswer
    visible: str | None
    hidden: str | None
    hidden_passed: bool


def load(lecture: str, solutions: Path = SOLUTIONS) -> list[WrongAnswer]:
    """The ``WRONG_ANSWERS`` of a lecture (an empty list when it has no corpus)."""
    path = Path(solutions) / lecture / MISTAKES_FILE
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location(f"_known_mistakes_{lecture}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    answers = getattr(module, "WRONG_ANSWERS", None)
    if not isinstance(answers, list) or not all(isinstance(a, WrongAnswer) for a in answers):
        raise ValueError(f"{path}: WRONG_ANSWERS must be a list of WrongAnswer")
    return answers


def _notebook(lecture: str, solutions: Path):
    import nbformat

    return nbformat.read(Path(solutions) / lecture / f"{lecture}.ipynb", as_version=4)


def _cells(nb) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """The setup cell's source, the answer cells (grade id, source) in order, the test cells by id."""
    from .hidden_runner import _python

    setup, answers, tests = "", [], {}
    for c in nb.cells:
        if c.get("cell_type") != "code":
            continue
        meta = c.get("metadata", {}).get("nbgrader") or {}
        gid = meta.get("grade_id", "")
        if gid == "setup":
            setup = _python(c.source)
        elif meta.get("solution") and not meta.get("grade"):
            answers.append((gid, _python(c.source)))
        elif meta.get("grade"):
            tests[gid] = _python(c.source)
    return setup, answers, tests


def _words(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _quiet():
    """Figures and prints of the cells go nowhere (the message is what counts)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _namespace(setup: str, answers: list[tuple[str, str]], answer: WrongAnswer) -> dict:
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(setup, "<setup cell>", "exec"), ns)  # noqa: S102 - the course's own cells
    for gid, source in answers:
        code = answer.code if gid == answer.cell else source
        try:
            exec(compile(code, f"<answer cell {gid}>", "exec"), ns)  # noqa: S102
        except Exception as exc:  # noqa: BLE001 - a wrong answer may not even define its function
            if gid == answer.cell:
                ns["__answer_error__"] = _words(exc)
            else:
                raise
    return ns


def _hidden(lecture: str, answer: WrongAnswer, ns: dict, solutions: Path) -> tuple[str | None, bool]:
    """The hidden verdict's message on the function ``ns`` defines (None: no hidden test for the cell)."""
    from transformer_lab import grading

    from . import hidden
    from .hidden_runner import _data
    from .hidden_runner import _words as _exc_data

    path = Path(solutions) / lecture / hidden.TESTS_FILE
    if not path.is_file():
        return None, False
    tests = [t for t in hidden.load_tests(path) if t.cell == f"{answer.cell}_test"]
    if not tests:
        return None, False
    blocks = {t.cell: _blocked_objects(t.blocked) for t in tests}
    messages, passed = [], True
    for t, cases, expected in hidden.prepare(tests, lecture, SECRET):
        fn = ns.get(t.function)
        if fn is None:
            payload: dict[str, Any] = {"found": False, "cells": [], "results": []}
        else:
            def call(*args, fn=fn, t=t, **kwargs):
                return t.driver(fn, *args, **kwargs) if t.driver is not None else fn(*args, **kwargs)

            results = []
            for case in cases:
                args, kwargs = hidden._clone(list(case.args)), hidden._clone(dict(case.kwargs))
                try:
                    with grading.blocked(*blocks[t.cell]), _quiet():
                        out = call(*args, **kwargs)
                    entry = {"ok": _data(out)}
                    if t.unchanged:
                        entry["after"] = _data([args, kwargs])
                except Exception as exc:  # noqa: BLE001 - reported as the runner reports it
                    entry = {"raised": _exc_data(exc)}
                results.append(entry)
            payload = {"found": True, "cells": [], "results": results}
        verdict = hidden.judge(t, cases, expected, payload)
        passed = passed and verdict.passed
        messages.append(verdict.output()["text"] if verdict.passed else f"{verdict.ename}: {verdict.message}")
    return "\n".join(messages), passed


def _blocked_objects(blocked) -> list:
    """What a hidden test blocks, as objects: ``"module:qualname"`` names (a shortcut outside the course's
    dependencies, e.g. Hugging Face's) are imported and resolved, as the grader's runner does."""
    from .hidden_runner import _blocked_objects as resolve

    found = []
    for ref in blocked:
        if isinstance(ref, str):
            try:
                found.extend(resolve([ref]))
            except (ImportError, AttributeError):  # not installed here: nothing a learner could call
                continue
        else:
            found.append(ref)
    return found


def try_answer(lecture: str, answer: WrongAnswer, solutions: Path = SOLUTIONS, nb=None) -> Outcome:
    """What the visible test cell and the hidden tests tell one wrong answer."""
    nb = nb if nb is not None else _notebook(lecture, solutions)
    setup, answers, tests = _cells(nb)
    if answer.cell not in {gid for gid, _ in answers}:
        raise ValueError(f"{lecture}: no answer cell with grade id {answer.cell!r} (wrong answer {answer.name!r}); "
                         f"answer cells: {', '.join(gid for gid, _ in answers)}")
    test_id = f"{answer.cell}_test"
    if test_id not in tests:
        raise ValueError(f"{lecture}: no graded test cell {test_id!r} for wrong answer {answer.name!r}")
    with _quiet():
        ns = _namespace(setup, answers, answer)
    visible = ns.pop("__answer_error__", None)
    if visible is None:
        try:
            with _quiet():
                exec(compile(tests[test_id], f"<test cell {test_id}>", "exec"), ns)  # noqa: S102
        except Exception as exc:  # noqa: BLE001 - the visible test's verdict
            visible = _words(exc)
    hidden_text, hidden_passed = _hidden(lecture, answer, ns, solutions)
    return Outcome(answer, visible, hidden_text, hidden_passed)


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with the messages one wrong answer got (an empty list: each names its mistake)."""
    a, found = outcome.answer, []
    if a.visible is None:
        if outcome.visible is not None:
            found.append(f"expected to pass the visible tests; they said: {outcome.visible[:600]}")
    elif outcome.visible is None:
        found.append(f"passed the visible tests; expected a failure saying {a.visible!r}")
    elif a.visible not in outcome.visible:
        found.append(f"the visible test said something else than {a.visible!r}:\n{outcome.visible[:1200]}")
    if a.hidden is not None:
        if outcome.hidden is None:
            found.append(f"no hidden test decides {a.cell}_test; expected a verdict saying {a.hidden!r}")
        elif outcome.hidden_passed:
            found.append(f"PASSED the hidden tests; expected a failure saying {a.hidden!r}")
        elif a.hidden not in outcome.hidden:
            found.append(f"the hidden tests said something else than {a.hidden!r}:\n{outcome.hidden[:1200]}")
    if a.visible is None and outcome.visible is None and outcome.hidden_passed:
        found.append("this wrong answer passes both the visible and the hidden tests")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autograder.mistakes",
                                description="What each known wrong answer of a lecture is told.")
    p.add_argument("lecture", help="NN_topic (a folder of solutions/ with known_mistakes.py)")
    p.add_argument("--cell", help="only the wrong answers to this answer cell (grade id)")
    args = p.parse_args(argv)
    if not (SOLUTIONS / args.lecture).is_dir():
        print(f"error: no lecture folder solutions/{args.lecture}", file=sys.stderr)
        return 2
    answers = [a for a in load(args.lecture) if args.cell in (None, a.cell)]
    if not answers:
        print(f"error: solutions/{args.lecture}/{MISTAKES_FILE} lists no wrong answer"
              + (f" to {args.cell}" if args.cell else ""), file=sys.stderr)
        return 2
    nb = _notebook(args.lecture, SOLUTIONS)
    bad = 0
    for a in answers:
        out = try_answer(args.lecture, a, nb=nb)
        wrong = problems(out)
        bad += bool(wrong)
        print(f"=== {a.cell}: {a.name}  [{'OK' if not wrong else 'PROBLEM'}]")
        print(f"--- visible: {out.visible if out.visible is not None else '(passed)'}")
        print(f"--- hidden:  {out.hidden if out.hidden is not None else '(no hidden test)'}")
        for w in wrong:
            print(f"!!! {w}")
        print()
    print(f"{len(answers) - bad} of {len(answers)} wrong answers get the message they must get")
    return 1 if bad else 0


if __name__ == "__main__":
    # run as the importable module: the corpora's WrongAnswer is autograder.mistakes.WrongAnswer,
    # not this __main__ copy's
    from autograder.mistakes import main as _main

    sys.exit(_main())
