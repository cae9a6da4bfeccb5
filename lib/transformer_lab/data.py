"""Data for the course: synthetic sequence tasks and an offline character corpus.

Nothing here downloads anything. Every lecture trains on one of two kinds of data:

1. **Synthetic tasks** whose answer is known exactly, so a claim can be checked in
   seconds: copying, reversing and sorting a sequence, and associative recall
   (the task used to probe in-context retrieval, e.g. Ba et al. 2016 "Using Fast
   Weights to Attend to the Recent Past", arXiv:1610.06258, and the induction-head /
   "Zoology" line of work, Arora et al. 2023, arXiv:2312.04927).
2. **A character-level corpus** made of the Python standard library's own source
   files, which every machine with Python has.

Language-model layout
---------------------
Every task is written as one token sequence ``s`` and returned LM-style, the way a
decoder-only model (GPT) is trained on it::

    x = s[:-1]          # what the model reads,           LongTensor (n, T)
    y = s[1:]           # the next token at each position, LongTensor (n, T)

with ``y = IGNORE (-100)`` wherever the next token is not part of the answer, so the
cross-entropy (``ignore_index=-100``) scores only the answer. Token ``SEP = 0`` is
reserved; the task's symbols are drawn from ``1 .. vocab_size - 1``.

==================  =================================================  ===========
task                sequence ``s`` (``m = length``)                    T = len(x)
==================  =================================================  ===========
copy_task           ``p1 .. pm SEP p1 .. pm``                          ``2m``
reverse_task        ``p1 .. pm SEP pm .. p1``                          ``2m``
sort_task           ``p1 .. pm SEP sorted(p)``                         ``2m``
associative_recall  ``k1 v1 .. km vm SEP kq vq``  (``kq`` one of keys)  ``2m + 2``
==================  =================================================  ===========

For copy/reverse/sort the answer occupies ``y[:, m:]`` (the model sees ``SEP`` at
``x[:, m]`` and must emit the first answer token there); ``y[:, :m]`` is ``IGNORE``.
For associative recall only the last position is scored: ``y[:, -1]`` is the value
bound to the queried key. Keys come from the lower half of the symbols and values
from the upper half, so a key is never confused with a value; the ``m`` keys of one
sequence are distinct. :func:`sequence_length` gives ``T`` for a task.

Randomness: every task takes ``generator`` = ``None`` (PyTorch's global RNG, seeded by
``seed_everything``), an ``int`` seed, or a ``torch.Generator``. The same seed gives
the same batch. Data are created on the CPU; move them with ``.to(device)``.

Glossary
--------
``n``: number of sequences (batch); ``m``/``length``: payload length (pairs for
recall); ``T``: model sequence length; ``V``/``vocab_size``: number of token ids.
"""

from __future__ import annotations

import functools
import os
import random
import sysconfig
from typing import Callable, Iterable

import torch

__all__ = [
    "IGNORE",
    "SEP",
    "N_SPECIAL",
    "TASKS",
    "copy_task",
    "reverse_task",
    "sort_task",
    "associative_recall",
    "make_task",
    "sequence_length",
    "task_batches",
    "char_corpus",
    "stdlib_files",
    "CharTokenizer",
    "lm_batches",
]

#: Target value that the loss ignores (``F.cross_entropy(..., ignore_index=-100)``).
IGNORE = -100
#: Separator token between the question and the answer.
SEP = 0
#: Number of reserved token ids at the bottom of the vocabulary (just ``SEP``).
N_SPECIAL = 1



# --------------------------------------------------------------------------- helpers
def _generator(generator) -> torch.Generator | None:
    """None -> global RNG; int -> a fresh generator seeded with it; Generator -> as is."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"generator must be None, an int seed or a torch.Generator; got {type(generator).__name__}"
    )


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {name}={value}")


def _check_common(task: str, n: int, length: int, vocab_size: int, min_vocab: int) -> None:
    _check_int("n", n, 1)
    _check_int("length", length, 1)
    _check_int("vocab_size", vocab_size, 1)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {task} with length={length}: it needs at "
            f"least {min_vocab} ({N_SPECIAL} special token SEP=0 plus {min_vocab - N_SPECIAL} symbols)"
        )


def _symbols(n: int, length: int, vocab_size: int, g) -> torch.Tensor:
    """(n, length) random symbols in [N_SPECIAL, vocab_size)."""
    return torch.randint(N_SPECIAL, vocab_size, (n, length), generator=g)


def _lm_pair(seq: torch.Tensor, answer_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn full sequences (n, T+1) into (x, y) with y = IGNORE before ``answer_start``.

    ``answer_start`` indexes ``y``: the first position whose next token is scored.
    """
    x = seq[:, :-1].clone()  # (n, T)
    y = seq[:, 1:].clone()  # (n, T)  next-token targets
    y[:, :answer_start] = IGNORE
    return x, y


def _sep(n: int) -> torch.Tensor:
    return torch.full((n, 1), SEP, dtype=torch.long)


# --------------------------------------------------------------------------- tasks
def copy_task(n: int, length: int, vocab_size: int, generator=None):
    """Copy: ``p1..pm SEP p1..pm``. Returns ``(x, y)``, each LongTensor ``(n, 2*length)``.

    ``y[:, length:]`` equals the payload ``x[:, :length]``; the rest of ``y`` is ``IGNORE``.
    """
    _check_common("copy_task", n, length, vocab_size, N_SPECIAL + 2)
    g = _generator(generator)
    p = _symbols(n, length, vocab_size, g)  # (n, m)
    seq = torch.cat([p, _sep(n), p], dim=1)  # (n, 2m+1)
    return _lm_pair(seq, length)


def reverse_task(n: int, length: int, vocab_size: int, generator=None):
    """Reverse: ``p1..pm SEP pm..p1``. Returns ``(x, y)``, each ``(n, 2*length)``.

    ``y[:, length:]`` equals ``x[:, :length].flip(1)``; the rest of ``y`` is ``IGNORE``.
    """
    _check_common("reverse_task", n, length, vocab_size, N_SPECIAL + 2)
    g = _generator(generator)
    p = _symbols(n, length, vocab_size, g)
    seq = torch.cat([p, _sep(n), p.flip(1)], dim=1)  # (n, 2m+1)
    return _lm_pair(seq, length)


def sort_task(n: int, length: int, vocab_size: int, generator=None):
    """Sort: ``p1..pm SEP sorted(p)`` (ascending, repeats allowed). ``(x, y)``, each ``(n, 2*length)``.

    ``y[:, length:]`` equals ``x[:, :length].sort(1).values``; the rest is ``IGNORE``.
    """
    _check_common("sort_task", n, length, vocab_size, N_SPECIAL + 2)
    g = _generator(generator)
    p = _symbols(n, length, vocab_size, g)
    seq = torch.cat([p, _sep(n), p.sort(dim=1).values], dim=1)  # (n, 2m+1)
    return _lm_pair(seq, length)


def associative_recall(n: int, length: int, vocab_size: int, generator=None):
    """Associative recall: ``k1 v1 .. km vm SEP kq vq``; ``length`` = number of pairs ``m``.

    Keys are distinct symbols from the lower half ``[1, 1 + n_keys)``, values are drawn
    (with repeats) from the upper half ``[1 + n_keys, vocab_size)``, where
    ``n_keys = (vocab_size - 1) // 2``. The query ``kq`` is one of the ``m`` keys.
    Returns ``(x, y)``, each ``(n, 2*length + 2)``; only ``y[:, -1]`` (the value bound to
    ``kq``) is scored, the rest is ``IGNORE``.
    """
    _check_int("length", length, 1)
    _check_int("vocab_size", vocab_size, 1)
    n_keys = (vocab_size - N_SPECIAL) // 2
    if n_keys < length or vocab_size - N_SPECIAL - n_keys < 1:
        need = N_SPECIAL + 2 * length
        raise ValueError(
            f"vocab_size={vocab_size} is too small for associative_recall with length={length} "
            f"pairs: the keys of one sequence must be distinct, so it needs at least {need} "
            f"(SEP, {length} key symbols and at least {length} value symbols)"
        )
    _check_int("n", n, 1)
    g = _generator(generator)
    # distinct keys per row: the first m of a random permutation of the key symbols
    keys = torch.rand(n, n_keys, generator=g).argsort(dim=1)[:, :length] + N_SPECIAL  # (n, m)
    values = torch.randint(N_SPECIAL + n_keys, vocab_size, (n, length), generator=g)  # (n, m)
    pairs = torch.stack([keys, values], dim=2).reshape(n, 2 * length)  # k1 v1 k2 v2 ...
    which = torch.randint(0, length, (n, 1), generator=g)  # (n, 1) index of the queried pair
    kq = keys.gather(1, which)
    vq = values.gather(1, which)
    seq = torch.cat([pairs, _sep(n), kq, vq], dim=1)  # (n, 2m+3)
    return _lm_pair(seq, 2 * length + 1)


#: Task name -> function, as used by :func:`make_task`.
TASKS: dict[str, Callable] = {
    "copy": copy_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "associative_recall": associative_recall,
}


def _task_fn(name: str) -> Callable:
    key = name[: -len("_task")] if isinstance(name, str) and name.endswith("_task") else name
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[key]


def make_task(name: str, n: int, length: int, vocab_size: int, generator=None):
    """Dispatch by name (``"copy"``, ``"reverse"``, ``"sort"``, ``"associative_recall"``;
    a ``"_task"`` suffix is accepted). Returns ``(x, y)`` as the task function does."""
    return _task_fn(name)(n, length, vocab_size, generator)


def sequence_length(name: str, length: int) -> int:
    """The model's sequence length ``T`` (= ``x.shape[1]``) for task ``name`` at ``length``."""
    fn = _task_fn(name)
    return 2 * length + 2 if fn is associative_recall else 2 * length


def task_batches(name: str, batch_size: int, length: int, vocab_size: int):
    """A ``get_batch(generator=None) -> (x, y)`` drawing fresh task batches, for ``train``.

    Example: ``train(model, task_batches("copy", 32, 8, 16), steps=200)``.
    """
    fn = _task_fn(name)
    fn(1, length, vocab_size, 0)  # validate the arguments now, not at the first step

    def get_batch(generator=None):
        return fn(batch_size, length, vocab_size, generator)

    return get_batch


# --------------------------------------------------------------------------- corpus
_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "encodings",  # codec tables: mostly \uXXXX escapes, poor text
    "pydoc_data",  # one huge generated string
}


def stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted relative paths (with ``/``) of the ``.py`` files under the standard library.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Test suites, installed
    third-party packages (``site-packages``), ``__pycache__`` and the platform-specific
    ``_sysconfigdata*`` files are left out, and so are ``encodings/`` (codec tables)
    and ``pydoc_data/`` (one generated string): they are poor text to learn from.
    """
    root = os.fspath(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise ValueError(f"root must be a directory with Python files; got {root!r}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _clean(text: str, ascii_only: bool) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if ascii_only:
        text = "".join(c for c in text if c == "\n" or c == "\t" or " " <= c <= "~")
    return text


def _build_corpus(max_chars: int, seed: int, base: str, ascii_only: bool) -> str:
    files = stdlib_files(base)
    random.Random(seed).shuffle(files)  # sorted first, so the order is the same everywhere
    parts: list[str] = []
    total = 0
    for rel in files:
        try:
            with open(os.path.join(base, rel), encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):  # unreadable, broken link, not UTF-8: skip it
            continue
        piece = f"# file: {rel}\n" + _clean(text, ascii_only) + "\n"
        parts.append(piece)
        total += len(piece)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if not corpus:
        raise ValueError(f"no readable .py files found under {base!r}")
    return corpus


@functools.lru_cache(maxsize=8)
def _corpus(max_chars: int, seed: int, ascii_only: bool) -> str:
    """The standard library's corpus, cached (it does not change while Python runs)."""
    return _build_corpus(max_chars, seed, sysconfig.get_paths()["stdlib"], ascii_only)


def char_corpus(
    max_chars: int = 200_000,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    ascii_only: bool = True,
) -> str:
    """Text of the Python standard library's own ``.py`` files, built offline.

    The file list (:func:`stdlib_files`) is sorted, then shuffled by ``seed`` so a
    different seed gives different files; files are concatenated, each after a
    ``# file: path`` line, until ``max_chars`` characters (the result is cut to exactly
    ``max_chars`` when there is enough text). Files that cannot be read or decoded are
    skipped. With ``ascii_only`` (default) characters outside printable ASCII, tab and
    newline are dropped, which keeps the vocabulary at about 100 characters.
    Deterministic for a given Python version (the standard library differs between
    versions). ``root`` points at another folder of ``.py`` files (for tests).
    """
    _check_int("max_chars", max_chars, 1)
    _check_int("seed", seed, 0)
    if root is None:
        return _corpus(max_chars, seed, bool(ascii_only))
    return _build_corpus(max_chars, seed, os.fspath(root), bool(ascii_only))


# --------------------------------------------------------------------------- tokenizer
class CharTokenizer:
    """Character-level tokenizer: one id per distinct character, ids in sorted order.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.decode(tok.encode("hell"))
    'hell'
    """

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; got none")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"chars must be single characters; got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self.itos: dict[int, str] = dict(enumerate(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted set of characters in ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> torch.Tensor:
        """``str`` -> LongTensor ``(len(text),)``. Unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            first = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(
                f"text contains {len(unknown)} character(s) not in the tokenizer's vocabulary "
                f"({self.vocab_size} characters): {unknown[:10]!r}, first at index {first}; "
                f"build the tokenizer from text that contains them"
            ) from None

    def decode(self, ids) -> str:
        """LongTensor (any shape, read in order) or list of ints -> ``str``."""
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex():
                raise TypeError(f"ids must be an integer tensor; got {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if i not in self.itos:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
            out.append(self.itos[i])
        return "".join(out)


# --------------------------------------------------------------------------- LM batches
def lm_batches(data, block_size: int, batch_size: int, generator=None):
    """Random windows of a long token sequence, for next-token prediction.

    ``data``: 1-D LongTensor of token ids (e.g. ``tok.encode(char_corpus())``), or a list.
    Returns ``get_batch(generator=None) -> (x, y)``, each LongTensor ``(batch_size,
    block_size)``, with ``y[:, t] = x[:, t+1]`` inside a window (``y`` is ``x`` shifted by
    one). The windows' start offsets are drawn from the generator passed to
    ``get_batch`` if given (``train`` passes one), else from the ``generator`` bound
    here (``None`` -> PyTorch's global RNG; an int -> a generator seeded with it).
    """
    if not isinstance(data, torch.Tensor):
        data = torch.as_tensor(data, dtype=torch.long)
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D tensor of token ids; got shape {tuple(data.shape)}")
    if data.is_floating_point():
        raise TypeError(f"data must be an integer tensor of token ids; got {data.dtype}")
    _check_int("block_size", block_size, 1)
    _check_int("batch_size", batch_size, 1)
    if data.numel() < block_size + 1:
        raise ValueError(
            f"data has {data.numel()} tokens; block_size={block_size} needs at least {block_size + 1}"
        )
    data = data.long()
    bound = _generator(generator)
    offsets = torch.arange(block_size)  # (block_size,)

    def get_batch(generator=None):
        g = bound if generator is None else _generator(generator)
        start = torch.randint(0, data.numel() - block_size, (batch_size, 1), generator=g)
        idx = start + offsets  # (batch_size, block_size)
        return data[idx], data[idx + 1]

    return get_batch
