"""Build the hostile class from lecture 01 (``solutions/01_attention``) at test time.

Each submission in ``manifest.json`` is an edit of the instructor's notebook (or
of the released learner notebook, or raw bytes), made by the recipe of the same
name below; the manifest says what it does and the score it must get. Only the
recipes live in the repository, so the corpus stays a few kilobytes.

Lecture 01's exercises (points): ex1_attention_scores (1), ex2_masked_softmax (2),
ex3_attention (2), ex4_multi_head_attention (3); each is self-contained.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
LECTURE = "01_attention"
OTHER_LECTURE = "02_transformer_block"
#: A number that appears in the command line of the background processes a hostile
#: submission starts, so a test can look for survivors.
BACKGROUND_TAG = "987654321"
#: Files a hostile submission tries to create outside its folder (must never exist).
MARKER = "tl-hostile-marker"


def manifest() -> list[dict]:
    return json.loads((HERE / "manifest.json").read_text())["submissions"]


# --------------------------------------------------------------------------- notebook edits

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def _index(nb, grade_id: str) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return i
    raise KeyError(grade_id)


def body(nb, grade_id: str, code: str, keep: bool = False) -> None:
    """Replace (or with ``keep``, prefix) the solution region of exercise ``grade_id``."""
    cell = nb.cells[_index(nb, grade_id)]
    out, inside, region = [], False, []
    for ln in cell.source.splitlines():
        if BEGIN in ln:
            inside, indent = True, ln[: len(ln) - len(ln.lstrip())]
        elif END in ln:
            inside = False
            new = code.splitlines() + (region if keep else [])
            out += [indent + b if b.strip() else "" for b in new]
        elif inside:
            region.append(ln[len(indent):] if ln.startswith(indent) else ln.strip())
        else:
            out.append(ln)
    cell.source = "\n".join(out)


def insert_after(nb, grade_id: str, code: str) -> None:
    """A cell of the student's own after the cell ``grade_id`` (no nbgrader metadata)."""
    nb.cells.insert(_index(nb, grade_id) + 1, nbformat.v4.new_code_cell(code))


# --------------------------------------------------------------------------- recipes

MEMORY_HOG = """\
hoard = []
while True:                       # far more than the machine has (24 GiB)
    hoard.append(bytearray(512 << 20))
"""

FLOOD = """\
import os, sys
chunk = "x" * (1 << 20)
for _ in range(200):              # 200 MB through the notebook's output
    print(chunk)
try:                              # and 200 MB more straight to the kernel's own stdout
    for _ in range(200):
        os.write(1, chunk.encode())
except OSError as exc:
    print("raw write stopped:", exc)
"""

MONKEYPATCH = """\
import contextlib, torch, torch.testing
from transformer_lab import grading as _g
for _name in ("check_close", "check_shape", "check_dtype", "check_true"):
    setattr(_g, _name, lambda *a, **k: None)          # every check agrees
_g.blocked = lambda *a, **k: contextlib.nullcontext()
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
"""

READ_ANSWERS = """\
import ast, glob, json, pathlib, transformer_lab
repo = pathlib.Path(transformer_lab.__file__).resolve().parents[2]
found = sorted(glob.glob(str(repo / "solutions" / "*" / "*.ipynb")))
found += sorted(glob.glob("/tmp/**/gradebook.db", recursive=True))
found += sorted(glob.glob("/work/**/autograded/**/*.ipynb", recursive=True))[:5]
nb = json.loads(pathlib.Path(found[0]).read_text())   # IndexError when nothing is readable
for cell in nb["cells"]:
    src = "".join(cell["source"])
    if "def {name}(" in src:
        exec(src, globals())
return globals()["{name}"](*args)
"""

WRITES = f"""\
import os, pathlib, transformer_lab
repo = pathlib.Path(transformer_lab.__file__).resolve().parents[2]
for target in [repo / "{MARKER}", repo / "solutions" / "{MARKER}", repo / "lib" / "{MARKER}",
               pathlib.Path("/tmp/{MARKER}"), pathlib.Path("/var/tmp/{MARKER}"),
               pathlib.Path("/dev/shm/{MARKER}"), pathlib.Path.home() / "{MARKER}",
               pathlib.Path("/root/{MARKER}"), pathlib.Path("../../{MARKER}")]:
    try:
        target.write_text("pwned")
        print("wrote", target)
    except OSError as exc:
        print("could not write", target, type(exc).__name__)
try:
    (repo / "README.md").write_text("pwned")
except OSError as exc:
    print("README:", type(exc).__name__)
"""

BACKGROUND = f"""\
import subprocess, sys
# a daemon that double-forks into its own session, and a plain child, both long-lived
subprocess.Popen(["sleep", "{BACKGROUND_TAG}"], start_new_session=True)
subprocess.Popen([sys.executable, "-c",
                  "import os, time\\nif os.fork(): os._exit(0)\\nos.setsid()\\n"
                  "while True: time.sleep(1)  # {BACKGROUND_TAG}"], start_new_session=True)
print("started background processes")
"""


def _solution(solutions: Path, lecture: str = LECTURE):
    return nbformat.read(str(solutions / lecture / f"{lecture}.ipynb"), as_version=4)


def make(entry: dict, solutions: Path, learner: Path) -> bytes | None:
    """The bytes of one submission (None: the recipe writes no notebook)."""
    recipe = entry["recipe"]
    nb = _solution(solutions)
    if recipe == "solution":
        pass
    elif recipe == "learner":
        nb = nbformat.read(str(learner), as_version=4)
    elif recipe == "wrong_last":
        body(nb, "ex4_multi_head_attention", "return None  # not done")
    elif recipe == "infinite_loop":
        body(nb, "ex4_multi_head_attention", "while True:  # never returns\n    pass")
    elif recipe == "sleep_hour":
        body(nb, "ex2_masked_softmax", "import time\ntime.sleep(3600)", keep=True)
    elif recipe == "sleep_ignoring_interrupt":
        insert_after(nb, "ex1_attention_scores_test",
                     "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "time.sleep(3600)  # the interrupt is ignored")
    elif recipe == "sys_exit":
        body(nb, "ex3_attention", "import sys\nsys.exit()", keep=True)
    elif recipe == "os_exit":
        insert_after(nb, "ex2_masked_softmax_test", "import os\nos._exit(3)")
    elif recipe == "segfault":
        insert_after(nb, "ex1_attention_scores_test", "import ctypes\nctypes.string_at(0)")
    elif recipe == "memory_hog":
        body(nb, "ex1_attention_scores", MEMORY_HOG, keep=True)
    elif recipe == "print_flood":
        insert_after(nb, "ex1_attention_scores_test", FLOOD)
    elif recipe == "exercise_deleted":
        del nb.cells[_index(nb, "ex3_attention")]
    elif recipe == "test_edited_to_pass":
        body(nb, "ex4_multi_head_attention", "return None  # not done")
        nb.cells[_index(nb, "ex4_multi_head_attention_test")].source = "pass"
    elif recipe == "locked_cell_changed":
        body(nb, "ex1_attention_scores", "return None  # not done")
        cell = nb.cells[_index(nb, "ex1_attention_scores_test")]
        cell.source = "pass"
        cell.id = "my-own-id"
        cell.metadata["nbgrader"].update(points=100, locked=False)
        cell.metadata["nbgrader"]["grade_id"] = "ex1_renamed"
    elif recipe == "corrupt_json":
        text = nbformat.writes(nb)
        return text[: len(text) // 2].encode()
    elif recipe == "empty_file":
        return b""
    elif recipe == "other_lecture":
        nb = _solution(solutions, OTHER_LECTURE)
    elif recipe == "monkeypatch_checks":
        insert_after(nb, "ex1_attention_scores", MONKEYPATCH)
        for ex in ("ex1_attention_scores", "ex2_masked_softmax", "ex3_attention",
                   "ex4_multi_head_attention"):
            body(nb, ex, "return None  # the checks were told to agree")
    elif recipe == "reads_answers":
        for ex, name, args in (("ex1_attention_scores", "attention_scores", "q, k"),
                               ("ex2_masked_softmax", "masked_softmax", "scores, mask"),
                               ("ex3_attention", "attention", "q, k, v, mask"),
                               ("ex4_multi_head_attention", "multi_head_attention",
                                "x, w_qkv, b_qkv, w_out, b_out, n_heads, mask")):
            code = READ_ANSWERS.replace("{name}", name).replace("*args", args)
            body(nb, ex, code)
    elif recipe == "calls_reference":
        body(nb, "ex1_attention_scores", "return A.attention_scores(q, k)")
        body(nb, "ex2_masked_softmax", "return A.masked_softmax(scores, mask)")
        body(nb, "ex3_attention",
             "return A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)")
    elif recipe == "wrong_dtype_device_shape":
        body(nb, "ex1_attention_scores", "return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).double()")
        body(nb, "ex2_masked_softmax", "return A.masked_softmax(scores, mask).unsqueeze(0)  # extra axis")
        body(nb, "ex3_attention",
             "out, w = A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)\n"
             "return out.to('meta'), w.to('meta')  # right values, another device")
    elif recipe == "nans":
        body(nb, "ex2_masked_softmax",
             "w = torch.softmax(scores if mask is None else scores.masked_fill(~mask, float('-inf')), -1)\n"
             "return w  # fully masked rows: NaN")
        body(nb, "ex3_attention",
             "w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)\n"
             "w = w * float('nan')\nreturn w @ v, w")
    elif recipe == "writes_outside":
        insert_after(nb, "ex1_attention_scores_test", WRITES)
    elif recipe == "background_process":
        insert_after(nb, "ex1_attention_scores_test", BACKGROUND)
    elif recipe == "extra_non_utf8_file":
        pass  # the notebook is honest; write_class adds a file with a non-UTF-8 name
    else:
        raise ValueError(f"unknown recipe {recipe!r}")
    nb = copy.deepcopy(nb)
    return nbformat.writes(nb).encode()


def write_class(folder: Path, solutions: Path, learner: Path) -> list[dict]:
    """Write every submission of the manifest under ``folder`` (one subfolder per student)."""
    entries = manifest()
    for entry in entries:
        student = entry["id"]
        if entry["recipe"] == "non_utf8_student":
            # a folder whose name is not valid UTF-8: cannot be a student id
            raw = os.fsencode(str(folder)) + b"/stud\xff\xfe"
            os.makedirs(raw, exist_ok=True)
            with open(raw + f"/{LECTURE}.ipynb".encode(), "wb") as fh:
                fh.write(make({"recipe": "solution"}, solutions, learner))
            continue
        data = make(entry, solutions, learner)
        nested = folder / student / LECTURE
        nested.mkdir(parents=True, exist_ok=True)
        (nested / f"{LECTURE}.ipynb").write_bytes(data)
        if entry["recipe"] == "extra_non_utf8_file":
            with open(os.fsencode(str(nested)) + b"/notes-\xff\xfe.txt", "wb") as fh:
                fh.write(b"\xff\xfe not utf-8 either")
    return entries
