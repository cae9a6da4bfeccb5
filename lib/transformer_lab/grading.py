"""Checks with teaching messages, for the notebooks' exercise test cells.

A failed check should teach, not just say "False". Every checker raises an
``AssertionError`` whose message names the function under test, the input it was
given, what was expected and what came back (shape, dtype, a few values, the
largest error and where it is), plus a hint for the most common mistake::

    from transformer_lab import grading
    grading.check_close(my_scores(q, k), ref_scores, "attention_scores",
                        inputs={"q": q, "k": k}, hint="did you divide by sqrt(d_k)?")

The same checkers write the messages of the *hidden* tests, but those run on the
grader's side, never in the learner's kernel: ``autograder/hidden.py`` draws their
inputs from :func:`hidden_rng` (seeded by the course secret), runs the learner's
function in a separate sandboxed process where the reference does not exist, and
compares what came back with the reference outside it. See ``CONTRIBUTING.md``.

:func:`block` is what that process uses to take PyTorch's own shortcuts away
(``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, ...), aliases
included; :func:`blocked` does the same for the length of a ``with`` block and
restores everything afterwards (for tests and demonstrations):

* a Python function keeps its identity but gets a new ``__code__`` that raises,
  so every name bound to it raises;
* a class (``nn.MultiheadAttention``, ``nn.LayerNorm``) gets the same treatment for
  its ``forward``;
* a C builtin (``F.scaled_dot_product_attention``, ``torch.layer_norm``) cannot
  change its code, so every module attribute that holds it (PyTorch's own
  modules, the library, the notebook's ``__main__``) is swapped for a raising
  stand-in, and a ``TorchFunctionMode`` refuses the call wherever it comes from.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.overrides import TorchFunctionMode

from .device import grading_mode

__all__ = [
    "ReferenceBlocked",
    "block",
    "blocked",
    "check_close",
    "check_dtype",
    "check_shape",
    "check_true",
    "grading_mode",
    "hidden_rng",
    "SECRET_ENV",
    "PUBLIC_SECRET",
]

#: Environment variable holding the instructor's course secret.
SECRET_ENV = "TRANSFORMER_LAB_SECRET"
#: Used when the secret is unset: fine for self-checking, public for everyone.
PUBLIC_SECRET = "transformer-lab-public-seed"

_N_VALUES = 6  # how many values a message shows


# --------------------------------------------------------------------------- describing values


def _fmt_number(x: Any) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return repr(x)
    if math.isnan(f) or math.isinf(f):
        return str(f)
    return f"{f:.4g}"


def _first_values(t: torch.Tensor, n: int = _N_VALUES) -> str:
    flat = t.detach().reshape(-1)
    shown = ", ".join(_fmt_number(v) for v in flat[:n].cpu().tolist())
    more = ", ..." if flat.numel() > n else ""
    return f"[{shown}{more}]"


def _describe(value: Any) -> str:
    """One line: shape, dtype, device and the first few values of a tensor; repr otherwise."""
    if isinstance(value, torch.Tensor):
        dev = "" if value.device.type == "cpu" else f" on {value.device}"
        return (
            f"tensor of shape {tuple(value.shape)}, {value.dtype}{dev}, "
            f"values {_first_values(value)}"
        )
    if value is None:
        return "None"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _describe_inputs(inputs: Mapping[str, Any] | Sequence[Any] | None) -> list[str]:
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    else:
        items = [(f"arg{i}", v) for i, v in enumerate(inputs)]
    return [f"    {k} = {_describe(v)}" for k, v in items]


def _fail(title: str, lines: list[str], hint: str | None) -> None:
    body = [title, *lines]
    if hint:
        body.append(f"  hint: {hint}")
    raise AssertionError("\n".join(body))


# --------------------------------------------------------------------------- checkers


def check_true(cond: Any, message: str, hint: str | None = None) -> None:
    """Fail with ``message`` (and ``hint``) unless ``cond`` is true."""
    if not bool(cond):
        _fail(message, [], hint)


def check_shape(
    actual: Any,
    expected_shape: Sequence[int | None],
    name: str,
    inputs: Mapping[str, Any] | None = None,
    hint: str | None = None,
) -> None:
    """Fail unless ``actual`` is a tensor of ``expected_shape`` (``None`` matches any size)."""
    expected_shape = tuple(expected_shape)
    shown = "(" + ", ".join("*" if s is None else str(s) for s in expected_shape) + ")"
    if not isinstance(actual, torch.Tensor):
        _fail(
            f"{name}: expected a tensor of shape {shown}; got {_describe(actual)}",
            _input_block(inputs),
            hint or _missing_return_hint(actual),
        )
    got = tuple(actual.shape)
    ok = len(got) == len(expected_shape) and all(
        e is None or e == g for e, g in zip(expected_shape, got, strict=False)
    )
    if not ok:
        _fail(
            f"{name}: wrong shape",
            [*_input_block(inputs), f"  expected: shape {shown}", f"  got:      shape {got}"],
            hint,
        )


def check_dtype(
    actual: Any,
    expected_dtype: torch.dtype,
    name: str,
    inputs: Mapping[str, Any] | None = None,
    hint: str | None = None,
) -> None:
    """Fail unless ``actual`` is a tensor of ``expected_dtype``."""
    if not isinstance(actual, torch.Tensor):
        _fail(
            f"{name}: expected a tensor of dtype {expected_dtype}; got {_describe(actual)}",
            _input_block(inputs),
            hint or _missing_return_hint(actual),
        )
    if actual.dtype != expected_dtype:
        _fail(
            f"{name}: wrong dtype",
            [*_input_block(inputs), f"  expected: {expected_dtype}", f"  got:      {actual.dtype}"],
            hint or "create new tensors with dtype=x.dtype (and device=x.device) of the input x",
        )


def check_close(
    actual: Any,
    expected: Any,
    name: str,
    inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hint: str | None = None,
    check_dtype: bool = True,
    mistakes: Mapping[str, Any] | None = None,
) -> None:
    """Fail unless ``actual`` matches ``expected`` in shape, dtype, device and values.

    Values are compared elementwise as ``|actual - expected| <= atol + rtol * |expected|``;
    a NaN passes only where ``expected`` has a NaN too. The message shows the
    input, both tensors' shapes, dtypes and first values, the largest error and
    its index, how many entries differ, and ``hint``.

    ``mistakes``: hint -> what that mistake returns on the same input; when ``actual`` matches
    one of them (shape and values, same tolerances), its hint is given instead of ``hint``, so
    the message names the mistake the learner made.
    """
    hint = _matching_mistake(actual, mistakes, atol, rtol) or hint
    expected_t = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected)
    if actual is None or not isinstance(actual, (torch.Tensor, int, float, bool, list, tuple)):
        _fail(
            f"{name}: expected {_describe(expected_t)}; got {_describe(actual)}",
            _input_block(inputs),
            hint or _missing_return_hint(actual),
        )
    if not isinstance(actual, torch.Tensor):
        try:
            actual = torch.as_tensor(actual, dtype=expected_t.dtype)
        except (TypeError, ValueError, RuntimeError):
            _fail(
                f"{name}: expected {_describe(expected_t)}; got {_describe(actual)}",
                _input_block(inputs),
                hint,
            )
    head = _input_block(inputs)
    both = [f"  expected: {_describe(expected_t)}", f"  got:      {_describe(actual)}"]
    if tuple(actual.shape) != tuple(expected_t.shape):
        _fail(
            f"{name}: wrong shape: expected {tuple(expected_t.shape)}, got {tuple(actual.shape)}",
            head + both,
            hint,
        )
    if check_dtype and actual.dtype != expected_t.dtype:
        _fail(
            f"{name}: wrong dtype: expected {expected_t.dtype}, got {actual.dtype}",
            head + both,
            hint or "create new tensors with dtype=x.dtype (and device=x.device) of the input x",
        )
    if actual.device != expected_t.device:
        _fail(
            f"{name}: wrong device: expected {expected_t.device}, got {actual.device}",
            head + both,
            hint or "create new tensors with device=x.device; never call .cuda() or .cpu()",
        )
    # Compare in float64 on the CPU with plain arithmetic (no torch.allclose).
    wide = torch.complex128 if (actual.is_complex() or expected_t.is_complex()) else torch.float64
    a = actual.detach().to("cpu", wide)
    e = expected_t.detach().to("cpu", a.dtype)
    a_nan, e_nan = a != a, e != e
    diff = (a - e).abs()
    diff = torch.where(a_nan | e_nan, torch.full_like(diff, math.inf), diff)
    tol = atol + rtol * e.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    bad = (diff > tol) & ~(a_nan & e_nan)
    # infinities of the same sign are equal
    bad &= ~((a == e) & torch.isinf(e))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    masked = torch.where(bad, diff, torch.full_like(diff, -1.0))
    flat_idx = int(masked.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_idx), a.shape)) if a.dim() else ()
    worst = masked.reshape(-1)[flat_idx]
    lines = head + both + [
        f"  largest error {_fmt_number(worst)} at index {idx}: expected "
        f"{_fmt_number(e.reshape(-1)[flat_idx])}, got {_fmt_number(a.reshape(-1)[flat_idx])} "
        f"(atol={atol:g}, rtol={rtol:g})",
        f"  {n_bad} of {a.numel()} entries differ",
    ]
    if bool(a_nan.any()) and not bool(e_nan.any()):
        lines.append(f"  your result has {int(a_nan.sum())} NaN entries")
        hint = hint or "NaN usually comes from softmax over a row where everything is -inf (fully masked)"
    _fail(f"{name}: wrong values", lines, hint)


def _matching_mistake(actual: Any, mistakes: Mapping[str, Any] | None, atol: float,
                      rtol: float) -> str | None:
    """The hint of the first mistake whose value ``actual`` equals (within the tolerances)."""
    if not mistakes or not isinstance(actual, torch.Tensor):
        return None
    a = actual.detach().to("cpu", torch.float64)
    for hint, value in mistakes.items():
        v = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if tuple(v.shape) != tuple(a.shape):
            continue
        same_nan = (a != a) == (v != v)
        close = ((a - v).abs() <= atol + rtol * v.abs().nan_to_num(0.0, 0.0, 0.0)) | ((a != a) & (v != v))
        if bool(same_nan.all()) and bool(close.all()):
            return hint
    return None


def _input_block(inputs: Mapping[str, Any] | Sequence[Any] | None) -> list[str]:
    lines = _describe_inputs(inputs)
    return ["  input:", *lines] if lines else []


def _missing_return_hint(actual: Any) -> str | None:
    if actual is None:
        return "your function returned None: did you forget the `return` statement?"
    return None


# --------------------------------------------------------------------------- hidden inputs


def hidden_rng(
    name: str, device: torch.device | str | None = None, secret: str | None = None
) -> torch.Generator:
    """A ``torch.Generator`` for one hidden test, seeded from the course secret and ``name``.

    The seed is a hash of ``secret`` (default: env ``TRANSFORMER_LAB_SECRET``, else
    ``PUBLIC_SECRET``) and ``name``: the same secret and name give the same inputs,
    another secret (another course, another term) or another test name gives others.
    Only the trusted grader calls this; the learner's process never sees the secret.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"hidden_rng needs a non-empty test name (str); got {name!r}")
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or PUBLIC_SECRET
    digest = hashlib.sha256(f"{secret}\x00{name}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(seed)
    return gen


# --------------------------------------------------------------------------- blocking references


class ReferenceBlocked(RuntimeError):
    """Raised when an exercise's answer calls the reference it was asked to implement."""


def _ref_name(obj: Any) -> str:
    if _is_builtin(obj):
        # builtins: name them where learners meet them
        short = getattr(obj, "__name__", "")
        owner = getattr(obj, "__objclass__", None)
        if owner is not None and issubclass(torch.Tensor, owner):
            return f"torch.Tensor.{short}"
        for public in ("torch.nn.functional", "torch"):
            mod = sys.modules.get(public)
            if mod is not None and short and getattr(mod, short, None) is obj:
                return f"{public}.{short}"
    module = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{qual}" if module else qual


def _message(name: str) -> str:
    return (
        f"this exercise asks you to implement it yourself, so {name} is blocked "
        "while the hidden tests run. Write it from basic tensor operations "
        "(matmul, softmax, sum, ...), not by calling the library's reference or "
        "PyTorch's own shortcut."
    )


def _raising_code(func: types.FunctionType, message: str) -> types.CodeType:
    """A code object that raises ReferenceBlocked(message), with ``func``'s number of free variables.

    ``func.__code__`` can only be replaced by code with as many free variables as
    ``func`` has closure cells, so the stand-in declares the same number.
    """
    n_free = len(func.__code__.co_freevars)
    names = [f"_free{i}" for i in range(n_free)]
    lines = ["def _factory():"]
    lines += [f"    {n} = None" for n in names]
    lines.append("    def _blocked(*args, **kwargs):")
    if names:  # referenced (never run) so that they become free variables
        lines.append("        if False: print(" + ", ".join(names) + ")")
    lines.append("        from transformer_lab.grading import ReferenceBlocked")
    lines.append(f"        raise ReferenceBlocked({message!r})")
    lines.append("    return _blocked")
    src = "\n".join(lines) + "\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, "<transformer_lab.grading.blocked>", "exec"), namespace)
    code = namespace["_factory"]().__code__
    if len(code.co_freevars) != n_free:  # pragma: no cover - guards a CPython change
        raise RuntimeError("could not build a stand-in with the right number of free variables")
    return code.replace(co_name=func.__code__.co_name)


def _is_builtin(obj: Any) -> bool:
    return isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)) or (
        callable(obj) and not isinstance(obj, (types.FunctionType, type, types.MethodType))
    )


class _RefuseMode(TorchFunctionMode):
    """Refuses calls to the blocked torch functions, however they were reached."""

    def __init__(self, funcs: dict[int, str]):
        super().__init__()
        self._funcs = funcs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self._funcs.get(id(func))
        if name is not None:
            raise ReferenceBlocked(_message(name))
        return func(*args, **(kwargs or {}))


def _stand_in(name: str) -> Callable[..., Any]:
    def blocked_reference(*args: Any, **kwargs: Any) -> Any:
        raise ReferenceBlocked(_message(name))

    blocked_reference.__name__ = name.rsplit(".", 1)[-1]
    blocked_reference.__qualname__ = name
    return blocked_reference


def _apply(refs: Sequence[Any], undo: list[Callable[[], None]] | None) -> _RefuseMode:
    """Block ``refs``; record how to restore each in ``undo`` (None: for good, keep nothing)."""
    torch_funcs: dict[int, str] = {}
    for ref in refs:
        if isinstance(ref, types.MethodType):
            ref = ref.__func__
        if isinstance(ref, type):
            _block_class(ref, undo)
        elif isinstance(ref, types.FunctionType):
            _block_function(ref, _ref_name(ref), undo)
            torch_funcs[id(ref)] = _ref_name(ref)
        elif _is_builtin(ref):
            name = _ref_name(ref)
            _block_builtin(ref, name, undo)
            torch_funcs[id(ref)] = name
        else:
            raise TypeError(
                "blocked() takes functions, classes or torch builtins; "
                f"got {type(ref).__name__} {ref!r}"
            )
    return _RefuseMode(torch_funcs)


@contextlib.contextmanager
def blocked(*refs: Any) -> Iterator[None]:
    """Make ``refs`` raise :class:`ReferenceBlocked` for the duration, aliases included.

    ``refs`` may be Python functions (``F.layer_norm``, a library function), classes
    (``nn.MultiheadAttention``, ``nn.LayerNorm``: their ``forward`` is blocked) and C
    builtins (``F.scaled_dot_product_attention``, ``torch.layer_norm``). Everything is
    restored on exit, also on exceptions. (Hidden tests do not use this: they run the
    learner's code in a process where the reference is absent; see :func:`block`.)
    """
    undo: list[Callable[[], None]] = []
    try:
        mode = _apply(refs, undo)
        mode.__enter__()
        undo.append(lambda: mode.__exit__(None, None, None))
        yield
    finally:
        for step in reversed(undo):
            step()


def block(*refs: Any) -> None:
    """Make ``refs`` raise :class:`ReferenceBlocked` for the rest of this process, for good.

    The same replacements as :func:`blocked`, but nothing is kept to undo them: a
    replaced ``__code__`` is dropped, so no object in the process leads back to it.
    The hidden-test runner calls this in the sandboxed process that runs the
    learner's code, before that code runs.
    """
    _apply(refs, None).__enter__()


def _block_function(func: types.FunctionType, name: str, undo: list[Callable[[], None]] | None) -> None:
    original = func.__code__
    func.__code__ = _raising_code(func, _message(name))
    if undo is None:
        return

    def restore() -> None:
        func.__code__ = original

    undo.append(restore)


def _block_class(cls: type, undo: list[Callable[[], None]] | None) -> None:
    name = f"{cls.__module__}.{cls.__qualname__}"
    own = cls.__dict__.get("forward")
    if isinstance(own, types.FunctionType):
        _block_function(own, f"{name} (its forward)", undo)
        return
    # forward inherited (or not a plain function): shadow it on this class only
    had = "forward" in cls.__dict__
    cls.forward = _stand_in(f"{name}.forward")
    if undo is None:
        return

    def restore() -> None:
        if had:
            cls.forward = own
        else:
            delattr(cls, "forward")

    undo.append(restore)


def _block_builtin(func: Any, name: str, undo: list[Callable[[], None]] | None) -> None:
    """Swap every module attribute that holds ``func`` (PyTorch's, the library's, ``__main__``)."""
    stand_in = _stand_in(name)
    holders: list[tuple[Any, str]] = []
    modules = list(sys.modules.values())
    for extra in ("_nn", "_VariableFunctions", "_linalg", "_special", "_fft"):
        sub = getattr(torch._C, extra, None)
        if sub is not None:
            modules.append(sub)
    seen: set[int] = set()
    for mod in modules:
        if mod is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        try:
            items = list(vars(mod).items())
        except Exception:  # noqa: BLE001 - not a module-like object: nothing to patch
            continue
        for attr, value in items:
            if value is func:
                holders.append((mod, attr))
    for mod, attr in holders:
        try:
            setattr(mod, attr, stand_in)
        except Exception:  # noqa: BLE001 - read-only holder: the TorchFunctionMode still refuses
            continue
        if undo is None:
            continue

        def restore(mod: Any = mod, attr: str = attr) -> None:
            setattr(mod, attr, func)

        undo.append(restore)
