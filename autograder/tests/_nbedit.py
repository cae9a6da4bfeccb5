"""Make student submissions by editing notebook JSON: replace the body of a solution cell.

An *exercise* is a solution cell (``### BEGIN SOLUTION`` ... ``### END SOLUTION``)
together with the graded test cells that follow it up to the next solution cell.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


@dataclass
class Exercise:
    cell: int  # index of the solution cell
    grade_id: str
    tests: list[str] = field(default_factory=list)  # grade ids of its test cells
    points: float = 0.0
    func: str | None = None  # the function whose body holds the solution region
    params: ast.arguments | None = None
    is_method: bool = False
    refs: list[str] = field(default_factory=list)  # what its hidden tests block


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def write(nb: nbformat.NotebookNode, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _enclosing_function(source: str):
    """The innermost def whose body contains the BEGIN SOLUTION line (and whether it is a method)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None, None, False
    line = next((i for i, ln in enumerate(source.splitlines(), 1) if BEGIN in ln), None)
    best, in_class = None, False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.lineno <= line <= (node.end_lineno or node.lineno):
                if best is None or node.lineno > best.lineno:
                    best = node
    if best is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and best in node.body:
                in_class = True
    return (best.name, best.args, in_class) if best is not None else (None, None, False)


def blocked_refs(tests_file: Path) -> dict[str, list[str]]:
    """Graded cell -> what its hidden tests block, as expressions a notebook cell can call
    (``__import__('transformer_lab.attention', fromlist=['_']).attention_scores``)."""
    if not Path(tests_file).is_file():
        return {}
    from autograder.hidden import blocked_names, load_tests

    found = {}
    for test in load_tests(Path(tests_file)):
        lib, other = blocked_names(test.blocked)
        exprs = []
        for name in lib + other:
            module, _, qual = name.partition(":")
            exprs.append(f"__import__({module!r}, fromlist=['_']).{qual}")
        found[test.cell] = exprs
    return found


def exercises(nb, tests_file: Path | None = None) -> list[Exercise]:
    """The exercises of a notebook; with ``tests_file`` (its hidden_tests.py), what each blocks."""
    refs = blocked_refs(tests_file) if tests_file is not None else {}
    found: list[Exercise] = []
    for i, cell in enumerate(nb.cells):
        meta = _meta(cell)
        if cell.cell_type == "code" and meta.get("solution") and BEGIN in cell.source:
            func, params, is_method = _enclosing_function(cell.source)
            found.append(Exercise(i, meta.get("grade_id", ""), func=func, params=params, is_method=is_method))
        elif meta.get("grade") and found:
            ex = found[-1]
            ex.tests.append(meta["grade_id"])
            ex.points += float(meta.get("points", 0))
            for ref in refs.get(meta["grade_id"], []):
                if ref not in ex.refs:
                    ex.refs.append(ref)
    return found


def graded_points(nb) -> dict[str, float]:
    return {
        _meta(c)["grade_id"]: float(_meta(c).get("points", 0)) for c in nb.cells if _meta(c).get("grade")
    }


def solution_lines(nb) -> list[str]:
    """Every line between BEGIN/END SOLUTION in a notebook's solution regions."""
    lines, inside = [], False
    for cell in nb.cells:
        for ln in cell.source.splitlines():
            if BEGIN in ln:
                inside = True
            elif END in ln:
                inside = False
            elif inside:
                lines.append(ln)
    return lines


def replace_region(nb, cell_index: int, body: str) -> None:
    """Put ``body`` (unindented text) in place of the solution region of one cell."""
    cell = nb.cells[cell_index]
    out, inside = [], False
    for ln in cell.source.splitlines():
        if BEGIN in ln:
            inside = True
            indent = ln[: len(ln) - len(ln.lstrip())]
            out += [indent + b if b.strip() else "" for b in body.splitlines()]
        elif END in ln:
            inside = False
        elif not inside:
            out.append(ln)
    cell.source = "\n".join(out)


def region(nb, cell_index: int) -> str:
    """The unindented text of one cell's solution region."""
    lines, inside = [], False
    for ln in nb.cells[cell_index].source.splitlines():
        if BEGIN in ln:
            inside, indent = True, len(ln) - len(ln.lstrip())
        elif END in ln:
            inside = False
        elif inside:
            lines.append(ln[indent:] if ln[:indent].strip() == "" else ln.lstrip())
    return "\n".join(lines)


def _call_args(params: ast.arguments, skip_self: bool) -> str:
    pos = [a.arg for a in params.posonlyargs + params.args]
    if skip_self and pos:
        pos = pos[1:]
    parts = list(pos)
    if params.vararg:
        parts.append("*" + params.vararg.arg)
    parts += [f"{a.arg}={a.arg}" for a in params.kwonlyargs]
    if params.kwarg:
        parts.append("**" + params.kwarg.arg)
    return ", ".join(parts)


def _is_function_ref(text: str) -> bool:
    last = re.split(r"[.\s]", text.strip())[-1]
    return bool(last) and last[0].islower()


def cheat_body(nb, ex: Exercise) -> tuple[str, str] | None:
    """An answer that leans on the exercise's blocked reference: (body, kind) or None.

    ``delegate``: the exercise function returns the reference of the same name,
    called with its own arguments (it passes the visible tests).
    ``calls``: the instructor's solution, preceded by a call to the first blocked
    function reference (a call that fails harmlessly while not blocked).
    """
    if ex.func is None or ex.params is None:
        return None
    if ex.is_method and ex.func not in ("forward", "__call__"):
        return None  # e.g. __init__: the tests may build the module before blocking
    args = _call_args(ex.params, ex.is_method)
    same = [r for r in ex.refs if r.split(".")[-1] == ex.func]
    if same and not ex.is_method:
        return f"return {same[0]}({args})  # calls the library instead of implementing", "delegate"
    funcs = [r for r in ex.refs if _is_function_ref(r)]
    if not funcs:
        return None
    body = (
        "try:  # leans on the library's reference\n"
        f"    {funcs[0]}({args})\n"
        "except __import__('transformer_lab.grading', fromlist=['_']).ReferenceBlocked:\n"
        "    raise\n"
        "except Exception:\n"
        "    pass\n" + region(nb, ex.cell)
    )
    return body, "calls"


def submission(source_nb, edits: dict[int, str]):
    nb = copy.deepcopy(source_nb)
    for index, body in edits.items():
        replace_region(nb, index, body)
    return nb
