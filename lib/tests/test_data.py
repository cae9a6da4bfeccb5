"""Tests for transformer_lab.data: task layouts, seeding, the offline corpus, the tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from transformer_lab import data
from transformer_lab.data import (
    IGNORE,
    SEP,
    CharTokenizer,
    associative_recall,
    char_corpus,
    copy_task,
    lm_batches,
    make_task,
    reverse_task,
    sequence_length,
    sort_task,
    stdlib_files,
    task_batches,
)

M, V = 6, 11  # payload length, vocabulary size


def _split(x, y, m):
    """payload, separator column, answer targets, unscored targets."""
    return x[:, :m], x[:, m], y[:, m:], y[:, :m]


@pytest.mark.parametrize("fn", [copy_task, reverse_task, sort_task])
def test_payload_tasks_layout(fn):
    x, y = fn(64, M, V, generator=0)
    assert x.shape == y.shape == (64, 2 * M) and x.dtype == y.dtype == torch.long
    payload, sep, answer, unscored = _split(x, y, M)
    assert (sep == SEP).all()
    assert (unscored == IGNORE).all()
    assert ((payload >= 1) & (payload < V)).all()
    expected = {copy_task: payload, reverse_task: payload.flip(1),
                sort_task: payload.sort(dim=1).values}[fn]
    assert torch.equal(answer, expected)
    # y is x shifted by one inside the answer: the model reads answer token t and predicts t+1
    assert torch.equal(x[:, M + 1:], answer[:, :-1])


def test_sort_targets_are_sorted_and_a_permutation():
    x, y = sort_task(32, 9, 7, generator=1)
    ans = y[:, 9:]
    assert (ans[:, 1:] >= ans[:, :-1]).all()
    assert torch.equal(ans.sort(1).values, x[:, :9].sort(1).values)
    assert not torch.equal(ans, x[:, :9])  # some payload was not already sorted


def test_associative_recall_layout():
    n, m, vocab = 128, 4, 13
    x, y = associative_recall(n, m, vocab, generator=3)
    assert x.shape == y.shape == (n, 2 * m + 2)
    assert (y[:, :-1] == IGNORE).all()
    keys, values = x[:, 0:2 * m:2], x[:, 1:2 * m:2]
    n_keys = (vocab - 1) // 2
    assert ((keys >= 1) & (keys <= n_keys)).all() and (values > n_keys).all()
    for row in keys:  # keys of one sequence are distinct
        assert len(set(row.tolist())) == m
    assert (x[:, 2 * m] == SEP).all()
    query = x[:, -1]
    hit = keys == query[:, None]  # (n, m), exactly one True per row
    assert (hit.sum(1) == 1).all()
    assert torch.equal(y[:, -1], values[hit])
    # the queried pair is not always the same one
    assert len(set(hit.float().argmax(1).tolist())) > 1


@pytest.mark.parametrize("name", ["copy", "reverse", "sort", "associative_recall"])
def test_seeded_and_dispatched(name):
    a = make_task(name, 8, 5, 12, generator=7)
    b = make_task(name, 8, 5, 12, generator=torch.Generator().manual_seed(7))
    c = make_task(name, 8, 5, 12, generator=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape[1] == sequence_length(name, 5)
    torch.manual_seed(0)
    d = make_task(name, 8, 5, 12)  # None -> global RNG
    torch.manual_seed(0)
    assert torch.equal(d[0], make_task(name, 8, 5, 12)[0])


def test_make_task_accepts_function_names_and_rejects_unknown():
    assert torch.equal(make_task("copy_task", 2, 3, 5, 0)[0], copy_task(2, 3, 5, 0)[0])
    with pytest.raises(ValueError, match="unknown task 'shuffle'.*copy"):
        make_task("shuffle", 2, 3, 5)


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="length must be >= 1; got length=0"):
        copy_task(4, 0, 10)
    with pytest.raises(ValueError, match="vocab_size=2 is too small for reverse_task"):
        reverse_task(4, 3, 2)
    with pytest.raises(ValueError, match="vocab_size=8 is too small for associative_recall.*at least 13"):
        associative_recall(4, 6, 8)
    with pytest.raises(ValueError, match="n must be >= 1"):
        sort_task(0, 3, 10)
    with pytest.raises(TypeError, match="generator must be None, an int seed or a torch.Generator"):
        copy_task(2, 3, 10, generator="seed")
    with pytest.raises(TypeError, match="length must be an int"):
        copy_task(2, 3.0, 10)


def test_task_batches_follow_the_train_contract():
    get = task_batches("reverse", 16, 4, 9)
    x1, y1 = get(torch.Generator().manual_seed(5))
    x2, _ = get(torch.Generator().manual_seed(5))
    assert x1.shape == (16, 8) and torch.equal(x1, x2)
    assert torch.equal(y1[:, 4:], x1[:, :4].flip(1))
    with pytest.raises(ValueError, match="too small"):
        task_batches("copy", 16, 4, 2)


# ---------------------------------------------------------------- corpus
def test_corpus_is_deterministic_offline_and_capped(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("char_corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    data._corpus.cache_clear()
    a = char_corpus(max_chars=50_000, seed=0)
    data._corpus.cache_clear()
    b = char_corpus(max_chars=50_000, seed=0)
    assert a == b and len(a) == 50_000
    assert a.startswith("# file: ") and "def " in a and "import " in a
    assert set(a) <= set(chr(c) for c in range(32, 127)) | {"\n", "\t"}
    other = char_corpus(max_chars=50_000, seed=1)
    assert other != a  # the seed picks other files
    assert char_corpus(max_chars=1000, seed=0) == a[:1000]


def test_stdlib_file_list_is_sorted_and_skips_tests():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert "argparse.py" in files
    assert not any(f.startswith(("test/", "site-packages/")) or "/tests/" in f for f in files)


def test_corpus_skips_unreadable_files(tmp_path):
    (tmp_path / "a_good.py").write_text("x = 1\n")
    (tmp_path / "b_bad.py").write_bytes(b"\xff\xfe not utf-8 \xff")
    os.symlink(tmp_path / "missing.py", tmp_path / "c_broken.py")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "d_good.py").write_text("y = 2\n")
    text = char_corpus(max_chars=10_000, root=tmp_path)
    assert "x = 1" in text and "y = 2" in text
    assert "# file: pkg/d_good.py" in text and "b_bad" not in text and "c_broken" not in text
    (tmp_path / "a_good.py").unlink()
    (tmp_path / "pkg" / "d_good.py").unlink()
    with pytest.raises(ValueError, match="no readable .py files"):
        char_corpus(max_chars=10_000, root=tmp_path)


def test_corpus_bad_arguments():
    with pytest.raises(ValueError, match="max_chars must be >= 1"):
        char_corpus(max_chars=0)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_on_corpus():
    text = char_corpus(max_chars=20_000)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert int(ids.max()) == tok.vocab_size - 1 and int(ids.min()) == 0
    assert tok.decode(ids) == text
    assert tok.decode(ids[:10].tolist()) == text[:10]
    assert tok.chars == sorted(set(text)) and len(tok) == tok.vocab_size
    assert tok.decode(tok.encode("")) == ""


def test_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"not in the tokenizer's vocabulary.*\['z'\].*index 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 3])
    with pytest.raises(TypeError, match="integer tensor"):
        tok.decode(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="must be a str"):
        CharTokenizer.from_text(["a"])


# ---------------------------------------------------------------- lm_batches
def test_lm_batches_windows_are_shifted_and_seeded():
    ids = torch.arange(100)
    get = lm_batches(ids, block_size=8, batch_size=5, generator=0)
    x, y = get()
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)  # arange data: the next token is x + 1
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.long))
    assert int(y.max()) <= 99
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(get(g1)[0], get(g2)[0])
    assert not torch.equal(get(torch.Generator().manual_seed(4))[0], get(torch.Generator().manual_seed(3))[0])


def test_lm_batches_errors():
    with pytest.raises(ValueError, match="data has 8 tokens; block_size=8 needs at least 9"):
        lm_batches(torch.arange(8), 8, 2)
    with pytest.raises(ValueError, match="1-D"):
        lm_batches(torch.zeros(2, 20, dtype=torch.long), 4, 2)
    with pytest.raises(TypeError, match="integer tensor"):
        lm_batches(torch.zeros(20), 4, 2)
