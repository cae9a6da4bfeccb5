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
#: The course secret the hostile class is graded with (it must reach no student's process).
SECRET = "tl-hostile-secret-4f1c9e"


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


def prefix(nb, grade_id: str, code: str) -> None:
    """Code of the student's own at the top of the answer cell ``grade_id`` (runs when the cell runs)."""
    cell = nb.cells[_index(nb, grade_id)]
    cell.source = code.rstrip("\n") + "\n\n" + cell.source


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


# --------------------------------------------------------------------------- cheats on the hidden tests
# Each passes the visible tests in the kernel by calling the library's reference, and tries
# to pass the hidden tests some other way. In the kernel the hidden tests used to run in,
# every one of these earned the exercise's points.

#: The recipes that cheat on the hidden tests (visible tests pass, hidden ones must not).
HIDDEN_CHEATS = ("globals_fallback", "copy_of_reference", "caller_frame", "gc_scan", "thread_overwrite",
                 "patch_reference_and_randn", "agreeing_subclass", "recompile_source", "library_file",
                 "new_python", "torch_multi_head")

#: Exercises 1-3 with what their reference call is, and the names the old hidden tests used.
REFERENCE_CALLS = {
    "ex1_attention_scores": ("A.attention_scores(q, k)", ("expected",)),
    "ex2_masked_softmax": ("A.masked_softmax(scores, mask)", ("expected",)),
    "ex3_attention": ("A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)", ("e_out", "e_w")),
}

GLOBALS_FALLBACK = """\
try:
    return {call}
except Exception:   # blocked: the expected value is sitting in the notebook's globals
    found = tuple(globals()[name] for name in {names!r})
    return found if len(found) > 1 else found[0]
"""

CALLER_FRAME = """\
import sys
try:
    return {call}
except Exception:   # blocked: read the hidden test's variables from the calling frames
    frame = sys._getframe(1)
    while frame is not None:
        scope = {{**frame.f_globals, **frame.f_locals}}
        if all(name in scope for name in {names!r}):
            found = tuple(scope[name] for name in {names!r})
            return found if len(found) > 1 else found[0]
        frame = frame.f_back
    raise
"""

GC_SCAN = """\
import gc
try:
    return {call}
except Exception:   # blocked: find a tensor of the answer's shape anywhere in memory
    want = {shape}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and tuple(obj.shape) == tuple(want) and obj is not {first}:
            return obj
    raise
"""

THREAD_OVERWRITE = """\
import gc, threading, time

def _overwrite_forever(shape, value):   # a thread that writes my answer into every tensor of its shape
    while True:
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and tuple(obj.shape) == shape and obj is not value:
                    obj.copy_(value)
            except Exception:
                pass
        time.sleep(0.001)
"""

THREAD_BODY = """\
try:
    return A.attention_scores(q, k)
except Exception:   # blocked: answer zeros and make every other tensor of that shape zeros too
    mine = torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)
    threading.Thread(target=_overwrite_forever, args=(tuple(mine.shape), mine), daemon=True).start()
    time.sleep(0.2)
    return mine
"""

PATCH_REFERENCE = """\
_real_scores = A.attention_scores
_real_randn = torch.randn
torch.randn = lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype"))  # every input zero ...
A.attention_scores = lambda q, k, scale=None: torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)
"""

PATCH_BODY = """\
try:
    return _real_scores(q, k)
except Exception:   # ... so "expected" would be zeros, like my answer
    return torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)
"""

AGREEING_SUBCLASS = """\
class _Agree(torch.Tensor):
    \"\"\"A tensor that says yes to every comparison.\"\"\"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        out = super().__torch_function__(func, types, args, kwargs or {})
        if name in ("sub", "__sub__", "abs", "__abs__", "isnan", "isinf"):
            return torch.zeros_like(out.as_subclass(torch.Tensor)).as_subclass(cls)
        if name in ("eq", "__eq__", "allclose", "equal", "isclose"):
            return True if name in ("allclose", "equal") else torch.ones_like(out.as_subclass(torch.Tensor), dtype=torch.bool)
        return out
"""

SUBCLASS_BODY = """\
try:
    return A.attention_scores(q, k).as_subclass(_Agree)
except Exception:
    return torch.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype).as_subclass(_Agree)
"""

RECOMPILE = """\
import inspect
_ns = dict(vars(A))
exec(inspect.getsource(A.masked_softmax), _ns)   # the reference, recompiled from its source
_my_masked_softmax = _ns["masked_softmax"]
"""

LIBRARY_FILE = """\
import glob, importlib.util, sys
_candidates = [p + "/transformer_lab/attention.py" for p in sys.path]
for _pattern in ("/*/*/lib/transformer_lab/attention.py", "/*/*/*/lib/transformer_lab/attention.py",
                 "/tmp/*/lib/transformer_lab/attention.py", "/tmp/*/*/lib/transformer_lab/attention.py"):
    _candidates += glob.glob(_pattern)
_mine = None
for _path in _candidates:            # the library's source file, loaded under another name
    try:
        _spec = importlib.util.spec_from_file_location("my_attention", _path)
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
        _module.attention_scores(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))  # a copy that works?
        _mine = _module
        break
    except Exception:
        continue
"""

LIBRARY_BODY = """\
return (_mine or A).scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
"""

NEW_PYTHON = """\
import pickle, subprocess, sys
try:
    return A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
except Exception:   # blocked here: compute it in a fresh Python, where nothing is blocked
    code = ("import pickle, sys, torch.nn.functional as F, torch; q, k, v, m = pickle.load(sys.stdin.buffer); "
            "w = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1); "
            "pickle.dump((F.scaled_dot_product_attention(q, k, v, attn_mask=m), w), sys.stdout.buffer)")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((q, k, v, mask)),
                          capture_output=True, check=True)
    return pickle.loads(done.stdout)
"""

TORCH_MHA = """\
B, L, d_model = x.shape
if d_model % n_heads:                     # the exercise's stated check, so the visible tests pass
    raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
out, _ = F.multi_head_attention_forward(   # PyTorch's own multi-head attention
    x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), d_model, n_heads, w_qkv, b_qkv,
    None, None, False, 0.0, w_out, b_out, need_weights=False,
    attn_mask=None if mask is None else ~mask.expand(B, n_heads, L, L).reshape(B * n_heads, L, L))
return out.transpose(0, 1)
"""

PRINT_SECRET = """\
import os
print("secret in the kernel:", os.environ.get("TRANSFORMER_LAB_SECRET"))
print("secret anywhere:", [k for k, v in os.environ.items() if "tl-hostile-secret" in v])
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
    elif recipe == "globals_fallback":
        for ex, (call, names) in REFERENCE_CALLS.items():
            body(nb, ex, GLOBALS_FALLBACK.format(call=call, names=names))
    elif recipe == "copy_of_reference":
        prefix(nb, "ex1_attention_scores",
               "import types\n_ref = A.attention_scores   # a copy of the reference, taken before any block\n"
               "_copy = types.FunctionType(_ref.__code__, _ref.__globals__, 'copy', _ref.__defaults__, _ref.__closure__)")
        body(nb, "ex1_attention_scores", "return _copy(q, k)")
    elif recipe == "caller_frame":
        for ex, (call, names) in REFERENCE_CALLS.items():
            body(nb, ex, CALLER_FRAME.format(call=call, names=names))
    elif recipe == "gc_scan":
        body(nb, "ex1_attention_scores", GC_SCAN.format(
            call=REFERENCE_CALLS["ex1_attention_scores"][0], shape="q.shape[:-1] + (k.shape[-2],)", first="q"))
        body(nb, "ex2_masked_softmax", GC_SCAN.format(
            call=REFERENCE_CALLS["ex2_masked_softmax"][0], shape="scores.shape", first="scores"))
    elif recipe == "thread_overwrite":
        prefix(nb, "ex1_attention_scores", THREAD_OVERWRITE)
        body(nb, "ex1_attention_scores", THREAD_BODY)
    elif recipe == "patch_reference_and_randn":
        prefix(nb, "ex1_attention_scores", PATCH_REFERENCE)
        body(nb, "ex1_attention_scores", PATCH_BODY)
    elif recipe == "agreeing_subclass":
        prefix(nb, "ex1_attention_scores", AGREEING_SUBCLASS)
        body(nb, "ex1_attention_scores", SUBCLASS_BODY)
    elif recipe == "recompile_source":
        prefix(nb, "ex2_masked_softmax", RECOMPILE)
        body(nb, "ex2_masked_softmax", "return _my_masked_softmax(scores, mask)")
    elif recipe == "library_file":
        prefix(nb, "ex3_attention", LIBRARY_FILE)
        body(nb, "ex3_attention", LIBRARY_BODY)
    elif recipe == "new_python":
        body(nb, "ex3_attention", NEW_PYTHON)
    elif recipe == "torch_multi_head":
        body(nb, "ex4_multi_head_attention", TORCH_MHA)
    elif recipe == "prints_secret":
        insert_after(nb, "ex1_attention_scores_test", PRINT_SECRET)
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
