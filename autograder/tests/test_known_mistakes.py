"""Each known wrong answer is told its own mistake, by the visible tests and by the hidden ones.

Two layers:

- every lecture's hidden ``mistakes={hint: function}``: the function's output, sent back as if a
  learner's answer had returned it, gets that hint and no other (a mistake listed after another
  one that gives the same values on every case would never be named);
- every lecture's corpus of learner-written wrong answers (``solutions/NN_topic/known_mistakes.py``,
  see ``autograder/mistakes.py``): run against the visible test cell and the hidden tests, each
  message holds the piece the corpus says it must.
"""

from __future__ import annotations

import pytest
from autograder import hidden, mistakes
from autograder.course import SOLUTIONS

LECTURES = sorted(p.name for p in SOLUTIONS.iterdir() if (p / hidden.TESTS_FILE).is_file())
CORPUS = [(lec, a) for lec in LECTURES for a in mistakes.load(lec)]


def _mistake_cases():
    for lec in LECTURES:
        for t in hidden.load_tests(SOLUTIONS / lec / hidden.TESTS_FILE):
            if t.check is None and t.mistakes:
                yield pytest.param(lec, t, id=f"{lec}-{t.cell}")


@pytest.mark.parametrize(("lecture", "test"), list(_mistake_cases()))
def test_each_hidden_mistake_is_named_by_its_own_hint(lecture, test):
    [(t, cases, expected)] = hidden.prepare([test], lecture, mistakes.SECRET)
    for text, mistake in t.mistakes.items():
        results, raised = [], []
        for case, exp in zip(cases, expected, strict=True):
            after = [list(case.args), dict(case.kwargs)]
            if case.raises is not None:
                results.append({"raised": {"type": case.raises.__name__, "mro": [case.raises.__name__], "message": ""}})
                continue
            try:
                results.append({"ok": hidden._clone(mistake(*hidden._clone(case.args), **hidden._clone(case.kwargs))),
                                "after": after})
            except Exception as exc:  # noqa: BLE001 - the mistake does not apply here, or it is an error
                names = [c.__name__ for c in type(exc).__mro__]
                raised.append((len(results), {"ok": hidden._clone(exp), "after": after}))
                results.append({"raised": {"type": names[0], "mro": names, "message": str(exc)[:2000]}})
        # a mistake that raises on a case is read both ways: as the error a learner's answer raises
        # there (a .float() clashing with float64 weights), or as "does not apply to this input"
        # (the right answer there); its hint must show in one of the two
        applicable = [dict(r) for r in results]
        for i, right in raised:
            applicable[i] = right
        verdicts = [hidden.judge(t, cases, expected, {"found": True, "cells": [], "results": r})
                    for r in (results, applicable)]
        messages = "\n---\n".join(v.message for v in verdicts)
        assert not all(v.passed for v in verdicts), f"{lecture} {t.cell}: the mistake {text!r} passes the hidden tests"
        assert any(f"hint: {text}" in v.message for v in verdicts if not v.passed), (
            f"{lecture} {t.cell}: the mistake {text!r} is told something else:\n{messages}")


def test_the_first_three_lectures_have_a_corpus_for_every_exercise():
    for lec in ("01_attention", "02_transformer_block", "03_positions"):
        nb = mistakes._notebook(lec, SOLUTIONS)
        _, answers, _ = mistakes._cells(nb)
        covered = {a.cell for a in mistakes.load(lec)}
        missing = [gid for gid, _ in answers if gid not in covered]
        assert not missing, f"{lec}: no known wrong answer for {missing} (solutions/{lec}/known_mistakes.py)"


@pytest.mark.parametrize(("lecture", "answer"), CORPUS,
                         ids=[f"{lec}-{a.cell}-{a.name[:40]}" for lec, a in CORPUS])
def test_each_known_wrong_answer_is_told_its_mistake(lecture, answer):
    outcome = mistakes.try_answer(lecture, answer)
    found = mistakes.problems(outcome)
    assert not found, f"{lecture} {answer.cell} ({answer.name}):\n" + "\n".join(found)
