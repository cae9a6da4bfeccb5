"""Hidden tests decided outside the learner's kernel (autograder/hidden.py, hidden_runner.py).

* every lecture's ``solutions/NN_topic/hidden_tests.py``: one test per graded cell, each
  function defined by an answer cell, hints that name real mistakes, the solutions pass;
* the blocked view: the reference's code is gone from the module the learner imports;
* what may come back: plain data only, read without running code;
* the verdicts' messages, and failing closed when the hidden tests cannot run;
* the fork server: a child that loops, dies or writes to the server's pipe; the secret
  never reaches it. (With root, the children are sandboxed as the graded kernels are; the
  hostile corpus, test_hostile.py, tries the cheats through the whole grader.)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _nbedit import exercises, read, submission
from autograder import hidden
from autograder.course import REPO, SECRET_ENV, SOLUTIONS, lectures_in
from autograder.hidden import Case, HiddenTest, HiddenTestSpecError
from autograder.sandbox import Limits, available, sandbox_uid

LECTURES = lectures_in(SOLUTIONS)
FIXTURE = Path(__file__).parent / "fixtures" / "solutions" / "00_fixture"


def _spec(timeout_memory: int = 4 << 30) -> dict:
    return {"isolate": available()[0], "uid": sandbox_uid(),
            "limits": Limits(memory_bytes=timeout_memory).to_dict(), "repo": str(REPO),
            "keep": [sys.prefix, sys.base_prefix], "hide": []}


def _graded_ids(nb) -> set[str]:
    return {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.get("metadata", {}).get("nbgrader", {}).get("grade")}


def _answer_names(nb) -> set[str]:
    names = set()
    for label, source in hidden.notebook_cells(nb):
        if label.startswith("answer cell"):
            tree = ast.parse(source)
            names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


# --------------------------------------------------------------------------- the lectures' specs


@pytest.mark.parametrize("lecture", LECTURES)
def test_every_graded_cell_has_one_hidden_test_of_an_answer_cell_function(lecture):
    nb = read(SOLUTIONS / lecture / f"{lecture}.ipynb")
    tests = hidden.load_tests(SOLUTIONS / lecture / hidden.TESTS_FILE)
    assert sorted(t.cell for t in tests) == sorted(_graded_ids(nb))
    missing = [t.function for t in tests if t.function not in _answer_names(nb)]
    assert not missing, f"{lecture}: not defined by an answer cell: {missing}"
    # no test left in the kernel, and the setup cell is the locked one the grader runs
    assert not [c for c in nb.cells if "BEGIN HIDDEN TESTS" in c.source]
    setup = next(c for c in nb.cells if c.cell_type == "code")
    assert setup.metadata.get("nbgrader", {}).get("grade_id") == "setup"
    assert setup.metadata["nbgrader"].get("locked") is True
    assert all(t.points is None for t in tests)  # points live in the notebook


def _payload(results: list) -> dict:
    return {"found": True, "kind": "function", "cells": [], "notes": [], "results": results}


@pytest.mark.parametrize("lecture", LECTURES)
def test_each_hint_names_a_mistake_the_cases_tell_apart(lecture):
    """A mistake's output must differ from the reference on some case (else its hint could
    never be right), and an answer that makes it gets exactly that hint."""
    for t in hidden.load_tests(SOLUTIONS / lecture / hidden.TESTS_FILE):
        ((_, cases, expected),) = hidden.prepare([t], lecture, "a secret for this test")
        for text, mistake in t.mistakes.items():
            outs, differs = [], False
            for case, exp in zip(cases, expected, strict=True):
                try:
                    wrong = mistake(*hidden._clone(case.args), **hidden._clone(case.kwargs))
                except Exception:  # noqa: BLE001 - that mistake does not apply to this case
                    wrong = exp
                if case.raises is None and not hidden._close(wrong, exp, t):
                    differs = True
                if case.raises is None:  # the mistake ran on copies: the caller's inputs are as they were
                    outs.append({"ok": wrong, "after": [list(hidden._clone(case.args)), dict(hidden._clone(case.kwargs))]})
                else:
                    outs.append({"raised": {"type": case.raises.__name__, "mro": [case.raises.__name__], "message": ""}})
            assert differs, f"{lecture} {t.cell}: the mistake {text!r} gives the reference's values on every case"
            verdict = hidden.judge(t, cases, expected, _payload(outs))
            assert not verdict.passed and f"hint: {text}" in verdict.message, (t.cell, text, verdict.message)


@pytest.mark.parametrize("lecture", LECTURES)
def test_instructor_solutions_pass_their_hidden_tests(lecture):
    nb = read(SOLUTIONS / lecture / f"{lecture}.ipynb")
    tests = hidden.load_tests(SOLUTIONS / lecture / hidden.TESTS_FILE)
    verdicts = hidden.run(nb, tests, lecture, Path(f"/tmp/tlab-test-hidden-{os.getpid()}") / lecture,
                          _spec(), timeout=60, secret="another secret")
    assert [(v.cell, v.passed) for v in verdicts] == [(t.cell, True) for t in tests], \
        [v.message for v in verdicts if not v.passed]


# --------------------------------------------------------------------------- the blocked view

TOY = '''\
"""A toy module."""
import math


def keep(x):
    return x + 1


def secret_formula(x):
    """Docstring."""
    y = x * 42  # the answer
    return math.sqrt(y)


class Block:
    size = 3

    def __init__(self):
        self.w = 7

    def forward(self, x):
        return x * self.w


class Other:
    def pool(self, h):
        return h.mean(0)  # pooling body

    def keep(self):
        return 1
'''


def test_stub_source_removes_the_bodies_it_blocks():
    out = hidden.stub_source(TOY, ["secret_formula", "Block", "Other.pool"], "toy")
    assert "x * 42" not in out and "self.w = 7" not in out and "x * self.w" not in out
    assert "h.mean(0)" not in out and "return x + 1" in out and "size = 3" in out
    ns: dict = {}
    exec(compile(out, "toy", "exec"), ns)  # noqa: S102 - the test's own toy module
    from transformer_lab.grading import ReferenceBlocked

    assert ns["keep"](1) == 2 and ns["Other"]().keep() == 1
    for call in (lambda: ns["secret_formula"](1), lambda: ns["Block"](), lambda: ns["Other"]().pool(1)):
        with pytest.raises(ReferenceBlocked, match="implement it yourself"):
            call()
    with pytest.raises(HiddenTestSpecError, match="no def or class of that name"):
        hidden.stub_source(TOY, ["nothing_here"], "toy")


def test_view_of_the_library_imports_with_the_reference_absent(tmp_path):
    from transformer_lab import attention as A

    lib, other = hidden.blocked_names([A.attention_scores, A.MultiHeadAttention, torch.nn.functional.layer_norm])
    assert lib == ["transformer_lab.attention:MultiHeadAttention", "transformer_lab.attention:attention_scores"]
    assert other == ["torch.nn.functional:layer_norm"]
    view = hidden.build_view(lib, tmp_path)
    text = (view / "attention.py").read_text()
    assert "(q @ k.transpose(-2, -1)) * scale" not in text  # the reference's body is gone
    assert sorted(p.name for p in view.glob("*.py")) == sorted(p.name for p in hidden.package_dir().glob("*.py"))
    probe = (
        "import transformer_lab.attention as A, torch\n"
        "print(A.causal_mask(2).tolist())\n"
        "try:\n    A.attention_scores(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
        "import transformer_lab.blocks, transformer_lab.models  # modules that use it still import\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); exec(sys.argv[2])",
                           str(tmp_path), probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[[True, False], [True, True]]", "ReferenceBlocked"]


def test_a_spec_that_cannot_work_is_refused_in_words(tmp_path):
    bad = {
        "TESTS = [HiddenTest(cell='a', function='f', cases=lambda rng: [], blocked=[lambda x: x])]":
            "not importable by a module path",
        "TESTS = [HiddenTest(cell='a', function='f g', cases=lambda rng: [])]": "function must be a name",
        "TESTS = [HiddenTest(cell='a', function='f', cases=lambda rng: []), "
        "HiddenTest(cell='a', function='g', cases=lambda rng: [])]": "used twice",
        "def outer():\n    y = 1\n    def drive(fn):\n        return y\n    return drive\n"
        "TESTS = [HiddenTest(cell='a', function='f', cases=lambda rng: [], driver=outer())]": "top-level def",
    }
    for body, expected in bad.items():
        path = tmp_path / f"t{abs(hash(body))}.py"
        path.write_text("from autograder.hidden import HiddenTest\n" + body + "\n")
        with pytest.raises(HiddenTestSpecError, match=expected):
            hidden.load_tests(path)


# --------------------------------------------------------------------------- what may come back


class Agree(torch.Tensor):
    """A tensor subclass a learner might send back (defined at module level so pickle finds it)."""


def test_only_plain_data_comes_back():
    from autograder.hidden_runner import _data

    class Sneaky(torch.Tensor):
        pass

    t = torch.arange(6.0).reshape(2, 3).t().requires_grad_()
    out = _data((t, [1, 2.5, True, None, "s"], {"a": torch.nn.Parameter(torch.ones(2))}, torch.Size([2])))
    assert type(out[0]) is torch.Tensor and not out[0].requires_grad and out[0].is_contiguous()
    assert out[1] == [1, 2.5, True, None, "s"] and type(out[2]["a"]) is torch.Tensor and out[3] == (2,)
    assert _data(torch.ones(2).as_subclass(Sneaky)) == {"__not_data__": "a Sneaky (a subclass of torch.Tensor)"}
    assert _data(torch.ones(2, device="meta"))["device"] == "meta"
    assert _data(len)["__not_data__"] == "a builtins.builtin_function_or_method"
    deep = _data([[[[[[[[[[1]]]]]]]]]])
    for _ in range(9):
        deep = deep[0]
    assert "nested" in deep["__not_data__"]


def test_a_tensor_subclass_sent_past_the_runner_is_unreadable(tmp_path):
    """Even a learner who rewrites the runner's conversion cannot send an object: the
    grader reads results with weights_only=True."""
    path = tmp_path / "r.pt"
    torch.save(_payload([{"ok": torch.ones(2).as_subclass(Agree)}]), path)
    assert hidden._load_result(path) == "unreadable"
    torch.save(_payload([{"ok": torch.ones(2)}]), path)
    assert torch.equal(hidden._load_result(path)["results"][0]["ok"], torch.ones(2))


# --------------------------------------------------------------------------- verdicts


def _toy_test(**kw) -> HiddenTest:
    args = dict(cell="c", function="double", cases=lambda rng: [Case("x (3,)", torch.ones(3))],
                reference=lambda x: 2 * x, hint="multiply by 2")
    args.update(kw)
    return HiddenTest(**args)


def _judge(test: HiddenTest, results: list, **payload):
    cases = list(test.cases(None))
    expected = hidden._expected(test, cases)
    return hidden.judge(test, cases, expected, {**_payload(results), **payload})


def test_verdict_messages_teach():
    t = _toy_test()
    assert _judge(t, [{"ok": 2 * torch.ones(3)}]).passed
    v = _judge(t, [{"ok": torch.ones(3)}])
    assert v.ename == "AssertionError" and "double, case 1 of 1 (x (3,)): wrong values" in v.message
    assert "x = tensor of shape (3,)" in v.message and "hint: multiply by 2" in v.message
    v = _judge(t, [{"ok": None}])
    assert "did you forget the `return`" in v.message
    v = _judge(t, [{"ok": [2.0, 2.0, 2.0]}])  # the right numbers in a list: not a tensor
    assert not v.passed and "got a list of 3 items" in v.message and "not a Python list" in v.message
    v = _judge(t, [{"ok": {"__not_data__": "tensor", "device": "meta", "shape": [3], "dtype": "torch.float32"}}])
    assert "wrong device" in v.message and "meta" in v.message
    v = _judge(t, [{"ok": {"__not_data__": "a Sneaky (a subclass of torch.Tensor)"}}])
    assert v.ename == "TypeError" and "returned a Sneaky" in v.message and "plain torch.Tensor" in v.message
    v = _judge(t, [{"raised": {"type": "ReferenceBlocked", "mro": ["ReferenceBlocked"], "message": "blocked x"}}])
    assert (v.ename, v.message) == ("ReferenceBlocked", "double, case 1 of 1 (x (3,)): blocked x")
    v = _judge(t, [], found=False, cells=[{"cell": "answer cell ex1", "type": "NameError", "message": "name 'helper' is not defined"}])
    assert v.ename == "NameError" and "`double` was not defined" in v.message
    assert "your answer cell ex1 raised NameError: name 'helper' is not defined" in v.message
    assert "everything your function needs" in v.message
    out = hidden.Verdict("c", False, "AssertionError", "msg").output()
    assert out["output_type"] == "error" and out["evalue"].startswith(hidden.PREFIX + ": msg")


def test_mistakes_expected_exceptions_outputs_and_inputs_changed_in_place():
    t = _toy_test(mistakes={"added instead of multiplying": lambda x: x + 2})
    assert "hint: added instead of multiplying" in _judge(t, [{"ok": 3 * torch.ones(3)}]).message
    assert "hint: multiply by 2" in _judge(t, [{"ok": 5 * torch.ones(3)}]).message
    refuse = _toy_test(cases=lambda rng: [Case("negative n", -1, raises=ValueError)], reference=None)
    assert _judge(refuse, [{"raised": {"type": "ValueError", "mro": ["ValueError", "Exception"], "message": "no"}}]).passed
    v = _judge(refuse, [{"ok": 1}])
    assert not v.passed and "expected a ValueError; returned without raising" in v.message
    pair = _toy_test(reference=lambda x: (x, 2 * x), outputs=("out", "weights"))
    v = _judge(pair, [{"ok": torch.ones(3)}])
    assert "expected 2 results (out, weights)" in v.message
    v = _judge(pair, [{"ok": (torch.ones(3), torch.ones(3))}])
    assert "double, case 1 of 1 (x (3,)), weights: wrong values" in v.message
    inplace = _toy_test(unchanged=True)
    v = _judge(inplace, [{"ok": 2 * torch.ones(3), "after": [[2 * torch.ones(3)], {}]}])
    assert "changed its input in place" in v.message
    assert _judge(inplace, [{"ok": 2 * torch.ones(3), "after": [[torch.ones(3)], {}]}]).passed
    # written into its input AND wrong: the in-place edit is the mistake named, not the values
    v = _judge(_toy_test(unchanged=True, mistakes={"added instead of multiplying": lambda x: x + 2}),
               [{"ok": 3 * torch.ones(3), "after": [[3 * torch.ones(3)], {}]}])
    assert "changed its input in place" in v.message and "added instead" not in v.message


def test_an_error_a_known_mistake_raises_gets_that_mistakes_hint():
    def transposed_all(x):
        return x.T @ x.new_ones(5)  # (3,) has no .T matmul with (5,): raises like the learner's k.T

    t = _toy_test(mistakes={"added instead of multiplying": lambda x: x + 2,
                            "reversed every axis with .T": transposed_all})
    try:
        transposed_all(torch.ones(3))
    except RuntimeError as exc:
        message = str(exc)
    v = _judge(t, [{"raised": {"type": "RuntimeError", "mro": ["RuntimeError"], "message": message}}])
    assert v.ename == "RuntimeError" and "hint: reversed every axis with .T" in v.message
    v = _judge(t, [{"raised": {"type": "RuntimeError", "mro": ["RuntimeError"], "message": "another error"}}])
    assert "hint: multiply by 2" in v.message  # no mistake raises that: the general hint


def test_hidden_tests_fail_closed_when_they_cannot_run(tmp_path):
    nb = read(FIXTURE / "00_fixture.ipynb")
    broken = tmp_path / "hidden_tests.py"
    broken.write_text("raise RuntimeError('a broken spec')\n")
    verdicts = hidden.decide(nb, [broken], "00_fixture", tmp_path / "w", _spec(), 30, None)
    assert {v.cell for v in verdicts} == _graded_ids(nb)
    assert all(v.ename == hidden.GRADER_ERROR and "a broken spec" in v.message for v in verdicts)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert len(errors) == 2  # each graded cell scores 0, with the reason


# --------------------------------------------------------------------------- the fork server


def _fixture_with(body: str, grade_id: str = "ex2_layer_norm"):
    nb = read(FIXTURE / "00_fixture.ipynb")
    [ex] = [e for e in exercises(nb) if e.grade_id == grade_id]
    return submission(nb, {ex.cell: body})


def _run(nb, tmp_path, timeout=20, **kw):
    tests = hidden.load_tests(FIXTURE / hidden.TESTS_FILE)
    return {v.cell: v for v in hidden.run(nb, tests, "00_fixture", tmp_path, _spec(**kw), timeout, None)}


def test_runner_survives_loops_deaths_and_forged_replies(tmp_path):
    looping = _run(_fixture_with("while True:\n    pass"), tmp_path / "a", timeout=3)
    assert looping["ex2_layer_norm_test"].ename == "TimeoutError" and looping["ex1_scores_test"].passed
    dying = _run(_fixture_with("import os\nos._exit(0)"), tmp_path / "b")
    assert dying["ex2_layer_norm_test"].ename == "KernelDied"
    assert "ended before it had sent its results" in dying["ex2_layer_norm_test"].message
    crashing = _run(_fixture_with("import ctypes\nctypes.string_at(0)"), tmp_path / "b2")
    assert crashing["ex2_layer_norm_test"].ename == "KernelDied"
    assert "SIGSEGV" in crashing["ex2_layer_norm_test"].message
    forged = ('import os, json\n'
              'for fd in range(20):\n'
              '    try:\n'
              '        os.write(fd, (json.dumps({"results": [{"status": "ok"}] * 9}) + "\\n").encode())\n'
              '    except OSError:\n'
              '        pass\n'
              'return x')
    v = _run(_fixture_with(forged), tmp_path / "c")["ex2_layer_norm_test"]
    # its bytes went to the only descriptor it has, the result pipe: nothing readable came back
    assert not v.passed and v.ename == "TypeError" and "could not be read as plain data" in v.message
    assert all(v.passed for v in _run(read(FIXTURE / "00_fixture.ipynb"), tmp_path / "d").values())


SCAN_OWN_MEMORY = """\
import ctypes
marker = b"tl-other-" + b"student-7731"   # split, so this code does not contain it
found = 0
for line in open("/proc/self/maps"):
    parts = line.split()
    if "r" not in parts[1] or "w" not in parts[1]:
        continue
    start, end = (int(x, 16) for x in parts[0].split("-"))
    if end - start > 1 << 30:
        continue
    found += ctypes.string_at(start, end - start).count(marker)
raise RuntimeError(f"found {found} copies")
"""


def test_a_child_finds_nothing_of_an_earlier_student_in_its_memory(tmp_path):
    """The fork server never holds a submission's code or results, so a child (which inherits its
    memory) cannot dig an earlier student's answers out of it."""
    earlier = "marker = 'tl-other-student-7731' * 1000  # in this student's code\n"
    solved = ("m = x.mean(-1, keepdim=True)\n"
              "return (x - m) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)")
    assert _run(_fixture_with(earlier + solved), tmp_path / "a")["ex2_layer_norm_test"].passed

    def copies(body, where):
        v = _run(_fixture_with(body), tmp_path / where)["ex2_layer_norm_test"]
        return int(v.message.split("raised RuntimeError: found ")[1].split(" ")[0])

    assert copies(earlier + SCAN_OWN_MEMORY, "b") >= 100  # the scan finds what its own process holds
    assert copies(SCAN_OWN_MEMORY, "c") <= 1  # the next student's process: only its own needle


def test_learner_process_has_no_secret_no_programs_and_no_reference(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "do-not-leak-this")
    hidden.runner().close()  # a fresh fork server, started from this environment
    body = ("import os, sys, subprocess\n"
            "found = [k for k, v in os.environ.items() if 'do-not-leak' in v]\n"
            "try:\n    subprocess.run([sys.executable, '-c', 'pass'])\n    ran = 'ran'\n"
            "except OSError as e:\n    ran = type(e).__name__\n"
            "raise RuntimeError(f'secret in {found}; a new program: {ran}')")
    v = _run(_fixture_with(body), tmp_path)["ex2_layer_norm_test"]
    assert "secret in []; a new program: PermissionError" in v.message, v.message
    hidden.runner().close()


@pytest.mark.skipif(not available()[0], reason="the sandbox needs root and mount namespaces")
def test_isolated_learner_process_cannot_read_the_library_or_the_repository(tmp_path):
    body = ("import pathlib, sys, transformer_lab\n"
            "seen = [p for p in sys.path if (pathlib.Path(p) / 'transformer_lab' / 'grading.py').exists()]\n"
            f"lib = len(list(pathlib.Path({str(REPO / 'lib')!r}).glob('**/*.py')))\n"
            f"sol = len(list(pathlib.Path({str(SOLUTIONS)!r}).glob('**/*.*')))\n"
            "raise RuntimeError(f'{transformer_lab.__file__} | {seen} | {lib} | {sol}')")
    v = _run(_fixture_with(body), tmp_path)["ex2_layer_norm_test"]
    message = v.message.split("raised RuntimeError: ")[1].split("\n")[0]
    assert message == "/tmp/tlview/transformer_lab/__init__.py | [] | 0 | 0", message


def test_copying_the_reference_copies_a_stand_in(tmp_path):
    """The lecture-01 cheats, run against a real lecture's hidden tests: a copy of the
    reference's code, its source recompiled, the notebook's globals."""
    lecture = "01_attention"
    if lecture not in LECTURES:
        pytest.skip("needs lecture 01")
    nb = read(SOLUTIONS / lecture / f"{lecture}.ipynb")
    by_id = {e.grade_id: e for e in exercises(nb)}
    edits = {
        by_id["ex1_attention_scores"].cell:
            "import types\n"
            "ref = A.attention_scores\n"
            "f = types.FunctionType(ref.__code__, ref.__globals__, None, ref.__defaults__)\n"
            "return f(q, k)",
        by_id["ex2_masked_softmax"].cell:
            "import inspect\nns = dict(vars(A))\n"
            "exec(inspect.getsource(A.masked_softmax), ns)\n"
            "return ns['masked_softmax'](scores, mask)",
        by_id["ex3_attention"].cell:
            "try:\n    return A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)\n"
            "except Exception:\n    return globals()['e_out'], globals()['e_w']",
    }
    tests = hidden.load_tests(SOLUTIONS / lecture / hidden.TESTS_FILE)
    verdicts = {v.cell: v for v in hidden.run(submission(nb, edits), tests, lecture, tmp_path, _spec(), 60, None)}
    assert verdicts["ex1_attention_scores_test"].ename == "ReferenceBlocked"
    assert verdicts["ex2_masked_softmax_test"].ename == "ReferenceBlocked"
    assert verdicts["ex3_attention_test"].ename == "KeyError"
    assert verdicts["ex4_multi_head_attention_test"].passed


def test_released_notebooks_carry_no_hidden_test():
    for lecture in LECTURES:
        assert not (REPO / "course" / lecture / hidden.TESTS_FILE).exists()
