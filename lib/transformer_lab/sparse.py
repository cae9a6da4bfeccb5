r"""Sparse attention patterns: who attends to whom, as FlexAttention ``mask_mod`` functions.

Dense attention lets each of the L queries look at each of the L keys: L^2 pairs, so time
and memory grow quadratically. A sparse pattern keeps a set of allowed pairs that grows
linearly (or like L sqrt(L)) and relies on depth to move information further: a pair that
one layer does not connect may be connected through an intermediate token in the next.

Papers and the pattern each function builds
-------------------------------------------
Write ``A_i`` for the set of keys that query ``i`` may attend to (positions 0 .. L-1).

* Parmar et al. 2018, "Image Transformer", arXiv:1802.05751, sec. 3.2 (1D local attention).
  :func:`local_blocks`: the sequence is cut into query blocks of length ``l_q``; a block
  attends to itself and to the ``l_m`` positions before it (causal in the decoder)::

      A_i = { j : start(i) - l_m <= j < start(i) + l_q },   start(i) = l_q * floor(i / l_q)

  :func:`sliding_window`, the token-centred version used by Longformer and ETC::

      causal:         A_i = { j : 0 <= i - j <= w }         (w keys back, and i itself)
      bidirectional:  A_i = { j : |i - j| <= w / 2 }        (w/2 on each side)

* Child et al. 2019, "Generating Long Sequences with Sparse Transformers",
  arXiv:1904.10509, sec. 4.2-4.3: factorised attention. Two heads (or two layers, or one
  head that takes the union) whose *composition* connects every pair ``j <= i``.
  :func:`strided` / :func:`strided_factors`, with stride ``l`` (about sqrt(L))::

      A(1)_i = { j : 0 <= i - j <= l }                   the previous l positions
      A(2)_i = { j : (i - j) mod l = 0, j <= i }         every l-th position back

  :func:`fixed` / :func:`fixed_factors`, with ``c`` summary cells per block::

      A(1)_i = { j : floor(j / l) = floor(i / l), j <= i }   the own block
      A(2)_i = { j : j mod l >= l - c,            j <= i }   the last c cells of every block

  Why two hops reach every ``j <= i`` (one hop = one attention layer; the residual stream
  keeps a token's own state from layer to layer):
  *strided*: among any l consecutive positions exactly one, k, has ``k = i (mod l)``; take
  the one in ``[j, j + l - 1]``. Then ``k`` sees ``j`` through A(1) (``0 <= k - j < l``) and
  ``i`` sees ``k`` through A(2) (``i - k`` is a multiple of l, and ``k <= i``).
  *fixed*: take ``k`` = the last cell of j's block. ``k`` sees ``j`` through A(1) (same
  block) and ``i`` sees the summary cell ``k`` through A(2). Here the order matters: A(1)
  then A(2) connects every pair, A(2) then A(1) does not (an ordinary cell is never read
  by A(2)). Each query reads O(l) = O(sqrt(L)) keys per head: O(L sqrt(L)) in all.

* Qiu et al. 2019, "Blockwise Self-Attention for Long Document Understanding" (BlockBERT),
  arXiv:1911.02972, sec. 3. :func:`blockwise`: the L x L matrix is cut into n x n blocks of
  size (L/n) x (L/n), and a permutation pi of the n blocks decides which block a query
  block reads::

      M[i, j] = 1  iff  pi(floor(i / (L/n))) = floor(j / (L/n))
      M = P_pi  (kron)  ones(L/n, L/n),    P_pi[a, b] = [pi(a) = b]   the block permutation matrix

  Each head gets its own permutation (identity = block-diagonal, shifts let blocks read
  their neighbours): :func:`block_permutation_matrix`, :func:`shifted_permutation`.

* Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers",
  arXiv:2004.08483, sec. 3.2. :func:`etc`: ``n_g`` global tokens placed first, then the long
  input. Global-to-global, global-to-long and long-to-global attention are full; long-to-long
  is local with radius ``r`` (here ``window = 2 r``)::

      A_i = all j                          if i < n_g   (g2g, g2l)
          = { j < n_g } U { j >= n_g : |i - j| <= r }   otherwise  (l2g, l2l)

* Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150,
  sec. 3.1 and 4.1. :func:`longformer`: sliding window ``w`` with dilation ``d`` (gaps of d,
  per head if you like), plus symmetric global attention on chosen positions G::

      A_i = { j : (i - j) mod d = 0, |i - j| <= d w / 2 }  U  G,     and A_g = all j for g in G

  Receptive field after n layers: ``n w`` (``n d w`` dilated). Per-layer schedule
  (:func:`longformer_windows`): small windows at the bottom, larger at the top (their
  ablation, Table 4: increasing 32 -> 512 beats decreasing or a fixed 230), no dilation in
  the lower layers.

* Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", arXiv:2007.14062,
  sec. 2 and appendix D. :func:`bigbird`: in blocks of ``b`` tokens, every query block reads
  ``window_blocks`` neighbouring blocks, ``global_blocks`` global blocks (which read and are
  read by everything) and ``random_blocks`` random blocks, chosen once from a seeded
  generator (:func:`bigbird_layout` is the (n_blocks, n_blocks) picture). The random edges
  make the pattern an expander-like graph: short paths between all pairs even without the
  global tokens.

* Dong et al. 2024, "Flex Attention: A Programming Model for Generating Optimized
  Attention Kernels", arXiv:2412.05496: the ``mask_mod`` / ``BlockMask`` interface used here.

FlexAttention and mask_mod
--------------------------
A **mask_mod** is a function ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: True where
query ``q_idx`` of batch ``b`` and head ``h`` may attend to key ``kv_idx`` (the library's
one mask convention, as in ``F.scaled_dot_product_attention``). FlexAttention calls it on
index tensors under ``torch.vmap`` and ``torch.compile``, so it must be *pure tensor ops*:
comparisons, ``&``, ``|``, ``~``, arithmetic, indexing a captured tensor; no Python ``if``
on a tensor, no ``.item()``. Every pattern here is such a function, and the same function
also evaluates on broadcast index grids, which is how :func:`dense_mask` draws the whole
(Lq, Lk) picture at once.

``create_block_mask`` cuts the (Lq, Lk) plane into tiles of ``block_size`` x ``block_size``
(128 by default) and records, for each query tile, which key tiles are *full* (every pair
allowed: no mask needed), *partial* (the mask_mod is applied inside) or *empty* (skipped).
The compiled kernel only visits non-empty tiles: that, not the mask itself, is where the
speed comes from; so patterns aligned to tiles (blocks, windows of a few tiles) are cheap.
Lengths need not be multiples of the block size (the last tile is partial).

Two implementations side by side
--------------------------------
:func:`sparse_attention` runs FlexAttention (eager by default, which materialises the
scores: the teaching path; ``compiled=True`` for the fused kernel, ~15 s to compile the
first time on a CPU, a second or two with a warm ``TORCHINDUCTOR_CACHE_DIR``).
:func:`dense_attention` builds the boolean (Lq, Lk) mask with :func:`dense_mask` and runs
the library's readable attention (or SDPA with ``fast=True``). The tests check that both
give the same outputs and gradients for every pattern.

**Fully masked rows.** A query with no allowed key gets a zero output and zero gradients,
never NaN, in all of them: the library's ``masked_softmax`` gives zero weights; FlexAttention
(eager and compiled) returns 0 for such a row (its logsumexp is -inf) and zero gradients;
PyTorch 2.13's SDPA on the CPU also returns 0. (Example: the A(2) head of the causal
``fixed`` pattern has no key for the first ``l - c`` queries.)

**Gradients on the CPU.** PyTorch 2.13's FlexAttention refuses inputs that require grad on
the CPU ("does not support backward on CPU"), eager or compiled. :func:`sparse_attention`
says so clearly; train on the CPU with :func:`dense_attention` (same result), or on CUDA.

Graph view
----------
A pattern is a directed graph: an edge ``j -> i`` when query i attends to key j. One hop =
one attention layer; with the residual stream a token keeps what it had, so after n layers
token i has seen token j iff there is a path of length <= n. :func:`hop_distances` runs a
breadth-first search from every position at once (level by level: one boolean matrix
product per layer), :func:`diameter` is the longest shortest path, :func:`receptive_field`
counts the positions a token has seen after n layers, :func:`path` returns one shortest
path (the picture of "two hops"). :func:`count_pairs` and :func:`density` count edges.

Shapes
------
Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``. Masks are
``(Lq, Lk)`` (or ``(B, H, Lq, Lk)`` when asked for a batch and heads), True = may attend.

Glossary (variable -> paper symbol)
-----------------------------------
=========================  =====================================================
``q_idx`` / ``i``          query position (row of the mask)
``kv_idx`` / ``j``         key position (column of the mask)
``b``, ``h``               batch index, head index
``window``                 w: keys back (causal) or w/2 on each side (Longformer's w;
                           ETC's radius r = w/2; Sparse Transformer's A(1) uses l)
``stride``                 l in the Sparse Transformer (about sqrt(L))
``c``                      number of summary cells per block (fixed pattern)
``query_block``, ``memory``  l_q and l_m of the Image Transformer
``permutation``            pi of BlockBERT (one per head: shape (H, n))
``block_len``              L / n of BlockBERT
``n_global``               n_g of ETC (global tokens first)
``dilation``               d of Longformer (an int, or one per head)
``global_tokens``          Longformer's pre-selected positions G (an int n: the first n)
``block_size``             b of BigBird; also FlexAttention's tile size (a different thing)
``window_blocks``          w of BigBird (3: the own block and one on each side)
``global_blocks``          g of BigBird (global blocks come first)
``random_blocks``          r of BigBird (random key blocks per query block)
``layout``                 BigBird's (n_blocks, n_blocks) block adjacency
=========================  =====================================================
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.attention.flex_attention as flex_module
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .attention import _check_qkv, _shape, fast_attention, scaled_dot_product_attention

__all__ = [
    # patterns
    "full",
    "sliding_window",
    "local_blocks",
    "strided",
    "strided_factors",
    "fixed",
    "fixed_factors",
    "blockwise",
    "block_permutation_matrix",
    "shifted_permutation",
    "etc",
    "longformer",
    "longformer_windows",
    "bigbird",
    "bigbird_layout",
    "union",
    "intersection",
    "describe",
    # masks and attention
    "check_mask_mod",
    "dense_mask",
    "block_mask",
    "block_counts",
    "sparse_attention",
    "dense_attention",
    "compiled_flex_attention",
    # graph view
    "count_pairs",
    "density",
    "reachability",
    "hop_distances",
    "diameter",
    "receptive_field",
    "path",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Layers = Union[MaskMod, Sequence[MaskMod]]

#: FlexAttention's default tile size (``create_block_mask(BLOCK_SIZE=128)``).
DEFAULT_BLOCK_SIZE = 128


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _check_int(name: str, value, minimum: Optional[int] = None) -> int:
    if isinstance(value, (bool, float)) or (isinstance(value, Tensor) and (
            value.is_floating_point() or value.dtype == torch.bool)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def _check_lengths(Lq, Lk) -> tuple[int, int]:
    Lq = _check_int("Lq", Lq, 1)
    Lk = Lq if Lk is None else _check_int("Lk", Lk, 1)
    return Lq, Lk


def _tag(mod: MaskMod, name: str, check=None, **params) -> MaskMod:
    """Give a pattern's mask_mod a readable name, its parameters and a length check.

    ``check(Lq, Lk, H, device)`` raises a clear error when the pattern does not fit the
    sequence it is applied to (a window longer than L, a table on another device, ...).
    """
    mod.__name__ = mod.__qualname__ = name
    mod.params = params
    mod.check = check
    return mod


def describe(mask_mod: MaskMod) -> str:
    """``'sliding_window(window=4, causal=True)'`` for a pattern of this module, else its name."""
    params = getattr(mask_mod, "params", None)
    name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
    if params is None:
        return name
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"


def check_mask_mod(mask_mod, device=None, size: int = 2) -> None:
    """Raise a clear error unless ``mask_mod(b, h, q_idx, kv_idx)`` is a usable mask_mod.

    It must take four arguments and return a bool tensor, computed elementwise: the check
    calls it with 0-d int64 index tensors (as FlexAttention's vmap does, one pair at a time)
    and on a ``size`` x ``size`` grid of (q_idx, kv_idx) (as :func:`dense_mask` does, all
    pairs at once), and the two must agree.
    """
    expected = ("a mask_mod is a function mask_mod(b, h, q_idx, kv_idx) -> bool tensor "
                "(True = may attend), as for FlexAttention")
    if not callable(mask_mod):
        raise TypeError(f"{expected}; got {type(mask_mod).__name__} {mask_mod!r}")
    try:
        sig = inspect.signature(mask_mod)
    except (TypeError, ValueError):  # a builtin without a signature: just try it
        sig = None
    if sig is not None:
        try:
            sig.bind(0, 0, 0, 0)
        except TypeError:
            n = len(sig.parameters)
            hint = (" (five parameters: that is a score_mod(score, b, h, q_idx, kv_idx); "
                    "a mask_mod has no score)") if n == 5 else ""
            raise TypeError(f"{expected}; got a callable with signature {sig}{hint}") from None
    z = torch.zeros((), dtype=torch.int64, device=device)
    try:
        out = mask_mod(z, z, z, z)
    except Exception as e:  # noqa: BLE001 - re-raised with what was expected
        raise TypeError(
            f"{expected}, written with tensor operations (comparisons, &, |, ~, indexing); "
            f"calling {describe(mask_mod)} with four 0-d int64 index tensors raised "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{expected}; {describe(mask_mod)} returned a {type(out).__name__}, not a tensor "
            "(use tensor comparisons such as q_idx >= kv_idx, not Python if/and/or)"
        )
    if out.dtype != torch.bool:
        raise TypeError(
            f"{expected}; {describe(mask_mod)} returned a {out.dtype} tensor (build it from "
            "comparisons combined with &, |, ~)"
        )
    if out.dim() != 0:
        raise ValueError(
            f"{expected}; for 0-d index tensors it must return a 0-d tensor (one answer per "
            f"(b, h, q_idx, kv_idx)); {describe(mask_mod)} returned shape {_shape(out)}"
        )
    # The same function on a 2 x 2 grid of (q_idx, kv_idx) must give the four single answers:
    # this catches a Python `if` on a tensor and reductions such as .any() without a dim.
    n = max(1, min(2, size))
    i = torch.arange(n, device=device)
    try:
        grid = mask_mod(z.view(1, 1, 1, 1), z.view(1, 1, 1, 1), i.view(1, 1, n, 1),
                        i.view(1, 1, 1, n))
        grid = torch.broadcast_to(grid, (1, 1, n, n))
    except Exception as e:  # noqa: BLE001 - re-raised with what was expected
        raise TypeError(
            f"{expected}, written with elementwise tensor operations only (no Python if/and/or "
            f"on a tensor, no .item(), no reduction): on a {n} x {n} grid of index tensors "
            f"{describe(mask_mod)} raised {type(e).__name__}: {e}"
        ) from e
    single = torch.stack([torch.stack([mask_mod(z, z, a, c).reshape(()) for c in i]) for a in i])
    if grid.dtype != torch.bool or not torch.equal(grid.reshape(n, n), single):
        raise ValueError(
            f"{expected}, written with elementwise tensor operations only: on a {n} x {n} grid "
            f"of (q_idx, kv_idx) {describe(mask_mod)} gave {grid.reshape(n, n).tolist()}, one "
            f"index pair at a time {single.tolist()} (a reduction such as .any() without a dim?)"
        )


def _check_pattern(mask_mod: MaskMod, Lq: int, Lk: int, H: Optional[int] = None,
                   device=None) -> None:
    """The pattern's own check against these lengths (if it has one), then the signature check."""
    check = getattr(mask_mod, "check", None)
    if callable(check):
        check(Lq, Lk, H, torch.device(device) if device is not None else torch.device("cpu"))
    check_mask_mod(mask_mod, device, size=min(Lq, Lk))


def _check_window(window: int, span: int, Lq: int, Lk: int, what: str) -> None:
    if span > max(Lq, Lk):
        raise ValueError(
            f"{what} spans {span} positions, more than the sequence (Lq={Lq}, Lk={Lk}); "
            f"expected window <= L (got window={window})"
        )


def _check_table_device(table: Tensor, device: torch.device, name: str) -> None:
    if table.device.type != device.type:
        raise ValueError(
            f"{name} lives on {table.device}, the attention on {device}: build the pattern "
            f"with device={device.type!r}"
        )


# ----------------------------------------------------------------------------
# Patterns: each returns a mask_mod(b, h, q_idx, kv_idx) -> bool
# ----------------------------------------------------------------------------

def full(causal: bool = False) -> MaskMod:
    """Dense attention: every pair (``causal``: every ``j <= i``). L^2 (or L(L+1)/2) pairs."""
    causal = _check_bool("causal", causal)

    def mask_mod(b, h, q_idx, kv_idx):
        if causal:
            return q_idx >= kv_idx  # j <= i
        return (q_idx >= 0) & (kv_idx >= 0)  # every pair

    return _tag(mask_mod, "full", causal=causal)


def sliding_window(window: int, causal: bool = False) -> MaskMod:
    """Local attention around each token (Image Transformer's local attention, Longformer's window).

    ``causal``: ``0 <= i - j <= window`` (the ``window`` previous tokens and i itself);
    bidirectional: ``|i - j| <= window / 2`` (``window`` must be even). About
    ``L (window + 1)`` pairs: linear in L. After n layers a token has seen ``n * window``
    others (:func:`receptive_field`).
    """
    window = _check_int("window", window, 1)
    causal = _check_bool("causal", causal)
    if not causal and window % 2:
        raise ValueError(
            f"a bidirectional window covers window/2 tokens on each side, so it must be even; "
            f"got window={window} (use {window + 1} or {window - 1}, or causal=True)"
        )
    half = window // 2

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx  # i - j
        if causal:
            return (d >= 0) & (d <= window)  # 0 <= i - j <= w
        return (d <= half) & (d >= -half)  # |i - j| <= w/2

    def check(Lq, Lk, H, device):
        _check_window(window, window, Lq, Lk, f"sliding_window(window={window})")

    return _tag(mask_mod, "sliding_window", check, window=window, causal=causal)


def local_blocks(query_block: int, memory: int = 0, causal: bool = True) -> MaskMod:
    """Image Transformer 1D local attention (Parmar et al. 2018, sec. 3.2).

    Queries are cut into blocks of ``query_block`` (l_q) positions; a block reads its own
    positions and the ``memory`` (l_m) positions before it (``causal``: and nothing after
    the query itself; bidirectional: also ``memory`` positions after the block). Unlike
    :func:`sliding_window` every query of a block shares one key range, so the pattern is
    made of dense tiles: what block-sparse kernels like best.
    """
    query_block = _check_int("query_block", query_block, 1)
    memory = _check_int("memory", memory, 0)
    causal = _check_bool("causal", causal)

    def mask_mod(b, h, q_idx, kv_idx):
        start = (q_idx // query_block) * query_block  # first position of i's query block
        keep = (kv_idx >= start - memory) & (kv_idx < start + query_block)
        if causal:
            return keep & (kv_idx <= q_idx)
        return (kv_idx >= start - memory) & (kv_idx < start + query_block + memory)

    def check(Lq, Lk, H, device):
        _check_window(query_block, query_block, Lq, Lk, f"local_blocks(query_block={query_block})")

    return _tag(mask_mod, "local_blocks", check, query_block=query_block, memory=memory,
                causal=causal)


def strided_factors(stride: int, causal: bool = True) -> tuple[MaskMod, MaskMod]:
    """The two heads (or two layers) of the Sparse Transformer's strided pattern: (A(1), A(2)).

    ``A(1)``: the previous ``stride`` positions (``0 <= i - j <= stride``; bidirectional
    ``|i - j| <= stride // 2``); ``A(2)``: every ``stride``-th position
    (``(i - j) mod stride == 0``, and ``j <= i`` if causal). Two hops, in either order,
    connect every ``j <= i`` (module docstring). Child et al. 2019, sec. 4.3, Fig. 3(b).
    """
    stride = _check_int("stride", stride, 1)
    causal = _check_bool("causal", causal)
    half = stride // 2

    def local(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        if causal:
            return (d >= 0) & (d <= stride)  # A(1): 0 <= i - j <= l
        return (d <= half) & (d >= -half)

    def every_stride(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        keep = (d % stride) == 0  # A(2): (i - j) mod l = 0
        return keep & (d >= 0) if causal else keep

    def check(Lq, Lk, H, device):
        _check_window(stride, stride, Lq, Lk, f"strided(stride={stride})")

    return (_tag(local, "strided_A1", check, stride=stride, causal=causal),
            _tag(every_stride, "strided_A2", check, stride=stride, causal=causal))


def strided(stride: int, causal: bool = True) -> MaskMod:
    """The Sparse Transformer's strided pattern as one head: ``A(1) | A(2)`` (:func:`strided_factors`)."""
    a1, a2 = strided_factors(stride, causal)

    def mask_mod(b, h, q_idx, kv_idx):
        return a1(b, h, q_idx, kv_idx) | a2(b, h, q_idx, kv_idx)

    return _tag(mask_mod, "strided", a1.check, stride=stride, causal=causal)


def fixed_factors(stride: int, c: int = 1, causal: bool = True) -> tuple[MaskMod, MaskMod]:
    """The two heads (or layers) of the Sparse Transformer's fixed pattern: (A(1), A(2)).

    ``A(1)``: the own block of ``stride`` positions (``floor(j/l) == floor(i/l)``);
    ``A(2)``: the last ``c`` cells of every block, the "summary" cells
    (``j mod l >= l - c``); causal: both only ``j <= i``. A(1) then A(2) connects every
    ``j <= i`` in two layers; A(2) then A(1) does not. In the causal A(2) the first
    ``l - c`` queries have no key at all (a fully masked row: zero output).
    Child et al. 2019, sec. 4.3, Fig. 3(c). Bidirectional use needs ``stride`` to divide
    L, so that the last block has its summary cells (checked).
    """
    stride = _check_int("stride", stride, 1)
    c = _check_int("c", c, 1)
    causal = _check_bool("causal", causal)
    if c > stride:
        raise ValueError(f"c (summary cells per block) must be <= stride={stride}; got c={c}")

    def own_block(b, h, q_idx, kv_idx):
        keep = (q_idx // stride) == (kv_idx // stride)  # A(1): same block
        return keep & (kv_idx <= q_idx) if causal else keep

    def summaries(b, h, q_idx, kv_idx):
        keep = (kv_idx % stride) >= (stride - c)  # A(2): j mod l in {l-c, ..., l-1}
        return keep & (kv_idx <= q_idx) if causal else keep

    def check(Lq, Lk, H, device):
        _check_window(stride, stride, Lq, Lk, f"fixed(stride={stride})")
        if not causal and Lk % stride:
            raise ValueError(
                f"bidirectional fixed attention needs stride={stride} to divide the length so "
                f"that every block has its {c} summary cell(s); got Lk={Lk} "
                f"(Lk % stride = {Lk % stride})"
            )

    return (_tag(own_block, "fixed_A1", check, stride=stride, c=c, causal=causal),
            _tag(summaries, "fixed_A2", check, stride=stride, c=c, causal=causal))


def fixed(stride: int, c: int = 1, causal: bool = True) -> MaskMod:
    """The Sparse Transformer's fixed pattern as one head: ``A(1) | A(2)`` (:func:`fixed_factors`)."""
    a1, a2 = fixed_factors(stride, c, causal)

    def mask_mod(b, h, q_idx, kv_idx):
        return a1(b, h, q_idx, kv_idx) | a2(b, h, q_idx, kv_idx)

    return _tag(mask_mod, "fixed", a1.check, stride=stride, c=c, causal=causal)


def _as_index_table(name: str, values, device, dims: tuple[int, ...] = (1,)) -> Tensor:
    t = torch.as_tensor(values, device=device)
    if t.dim() not in dims or t.is_floating_point() or t.dtype == torch.bool or t.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty integer sequence with {' or '.join(map(str, dims))} "
            f"dimension(s); got {values!r}"
        )
    return t.to(torch.int64)


def shifted_permutation(n_blocks: int, shift: int = 0) -> list[int]:
    """BlockBERT's permutations: block a reads block ``(a + shift) mod n`` (shift 0 = identity)."""
    n_blocks = _check_int("n_blocks", n_blocks, 1)
    shift = _check_int("shift", shift)
    return [(a + shift) % n_blocks for a in range(n_blocks)]


def block_permutation_matrix(permutation) -> Tensor:
    """The (n, n) bool matrix ``P[a, b] = (pi(a) == b)``: which key block query block a reads.

    ``permutation`` of shape (n,) gives (n, n); one per head, shape (H, n), gives (H, n, n).
    The token-level mask of :func:`blockwise` is ``P`` with each entry blown up to a
    ``block_len`` x ``block_len`` tile (a Kronecker product with a block of ones).
    """
    perm = _as_index_table("permutation", permutation, None, dims=(1, 2))
    _check_permutation(perm)
    n = perm.shape[-1]
    return perm[..., :, None] == torch.arange(n, device=perm.device)  # (..., n, n)


def _check_permutation(perm: Tensor) -> None:
    n = perm.shape[-1]
    rows = perm.reshape(-1, n)
    for r, row in enumerate(rows):
        if sorted(row.tolist()) != list(range(n)):
            where = f" (head {r})" if perm.dim() == 2 else ""
            raise ValueError(
                f"permutation{where} must contain each block 0..{n - 1} exactly once; "
                f"got {row.tolist()}"
            )


def blockwise(permutation, block_len: int, device=None) -> MaskMod:
    """BlockBERT's blockwise attention (Qiu et al. 2019): query block a reads key block pi(a).

    ``permutation``: a permutation of the n blocks, shape (n,), or one per head, shape
    (H, n). The sequence must be exactly ``n * block_len`` long (checked: the paper splits
    L into n equal blocks). Each query reads ``block_len`` keys: ``L * L / n`` pairs.
    """
    block_len = _check_int("block_len", block_len, 1)
    perm = _as_index_table("permutation", permutation, device, dims=(1, 2))
    _check_permutation(perm)
    per_head = perm.dim() == 2
    n = perm.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // block_len, kv_idx // block_len  # block indices
        target = perm[h, qb] if per_head else perm[qb]  # pi(block of i)
        return target == kb

    def check(Lq, Lk, H, device):
        for name, L in (("Lq", Lq), ("Lk", Lk)):
            if L != n * block_len:
                raise ValueError(
                    f"blockwise attention cuts the sequence into n={n} blocks of block_len="
                    f"{block_len}, so it needs length {n * block_len}; got {name}={L} "
                    f"(block_len must divide L into exactly n blocks)"
                )
        if per_head and H is not None and H != perm.shape[0]:
            raise ValueError(
                f"blockwise got one permutation per head for {perm.shape[0]} heads; "
                f"the attention has H={H}"
            )
        _check_table_device(perm, device, "the permutation")

    return _tag(mask_mod, "blockwise", check, permutation=perm.tolist(), block_len=block_len)


def etc(n_global: int, window: int, segment_len: Optional[int] = None) -> MaskMod:
    """ETC's global-local attention (Ainslie et al. 2020, sec. 3.2), in one sequence.

    Positions ``0 .. n_global-1`` are the global tokens, the rest the long input.
    g2g, g2l and l2g are full; l2l is a window of radius ``window // 2`` (``window`` even).
    ``segment_len``: the structured variant (one global token per segment of the long
    input, e.g. a sentence): global token g and long token t are connected (both ways)
    only when t lies in segment g; g2g stays full.
    """
    n_global = _check_int("n_global", n_global, 0)
    window = _check_int("window", window, 1)
    if window % 2:
        raise ValueError(f"ETC's local radius is window/2, so window must be even; got {window}")
    half = window // 2
    if segment_len is not None:
        segment_len = _check_int("segment_len", segment_len, 1)

    def mask_mod(b, h, q_idx, kv_idx):
        q_global, k_global = q_idx < n_global, kv_idx < n_global
        d = q_idx - kv_idx
        l2l = ~q_global & ~k_global & (d <= half) & (d >= -half)  # long-to-long: |i-j| <= r
        if segment_len is None:
            return q_global | k_global | l2l  # g2g, g2l, l2g full
        g2g = q_global & k_global
        g2l = q_global & ~k_global & ((kv_idx - n_global) // segment_len == q_idx)
        l2g = ~q_global & k_global & ((q_idx - n_global) // segment_len == kv_idx)
        return g2g | g2l | l2g | l2l

    def check(Lq, Lk, H, device):
        if n_global >= min(Lq, Lk):
            raise ValueError(
                f"ETC needs fewer global tokens than positions; got n_global={n_global} "
                f"for Lq={Lq}, Lk={Lk}"
            )
        _check_window(window, window, Lq - n_global, Lk - n_global, f"etc(window={window})")
        if segment_len is not None and n_global * segment_len < Lk - n_global:
            raise ValueError(
                f"etc with segment_len={segment_len} and n_global={n_global} covers "
                f"{n_global * segment_len} long tokens; the long input has {Lk - n_global}"
            )

    return _tag(mask_mod, "etc", check, n_global=n_global, window=window,
                segment_len=segment_len)


def longformer(window: int, dilation: Union[int, Sequence[int]] = 1,
               global_tokens: Union[int, Sequence[int]] = 0, causal: bool = False,
               device=None) -> MaskMod:
    """Longformer attention (Beltagy et al. 2020, sec. 3.1): sliding + dilated + global.

    ``window`` w: each token reads w/2 tokens on each side (causal: w back), every
    ``dilation``-th position (d = 1: the plain sliding window; an int, or one per head).
    ``global_tokens``: an int n (the first n positions, e.g. [CLS]) or a list of positions;
    global attention is symmetric: a global token reads everything and everything reads
    it (causal: only ``j <= i`` still). Pairs: about ``L (w + 1) + 2 n L``: linear in L.
    """
    window = _check_int("window", window, 1)
    causal = _check_bool("causal", causal)
    if not causal and window % 2:
        raise ValueError(
            f"a bidirectional window covers window/2 tokens on each side, so it must be even; "
            f"got window={window}"
        )
    half = window if causal else window // 2
    if isinstance(dilation, int) and not isinstance(dilation, bool):
        dil = _check_int("dilation", dilation, 1)
        per_head = False
        dil_max = dil
    else:
        dil = _as_index_table("dilation (one per head)", dilation, device)
        if int(dil.min()) < 1:
            raise ValueError(f"every dilation must be >= 1; got {dil.tolist()}")
        per_head = True
        dil_max = int(dil.max())
    if isinstance(global_tokens, int) and not isinstance(global_tokens, bool):
        n_first = _check_int("global_tokens", global_tokens, 0)
        positions = None
    else:
        positions = torch.as_tensor(global_tokens, dtype=torch.int64, device=device)
        if positions.dim() != 1 or (positions.numel() and int(positions.min()) < 0):
            raise ValueError(
                "global_tokens must be an int (the first n positions) or a 1-D list of "
                f"non-negative positions; got {global_tokens!r}"
            )
        n_first = 0

    def is_global(idx):
        if positions is None:
            return idx < n_first
        return (idx[..., None] == positions).any(-1)  # idx in G

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        dd = dil[h] if per_head else dil  # dilation of this head
        reach = dd * half  # d * w/2 (causal: d * w)
        band = (d <= reach) & (d >= (0 if causal else -reach))
        local = band & ((d % dd) == 0)  # every d-th position within the window
        keep = local | is_global(q_idx) | is_global(kv_idx)  # symmetric global attention
        return keep & (d >= 0) if causal else keep

    def check(Lq, Lk, H, device):
        span = dil_max * window
        _check_window(window, span, Lq, Lk, f"longformer(window={window}, dilation={dil_max})")
        if positions is None and n_first >= max(Lq, Lk):
            raise ValueError(
                f"global_tokens={n_first} leaves no ordinary token; expected fewer than "
                f"L={max(Lq, Lk)}"
            )
        if positions is not None and positions.numel() and int(positions.max()) >= max(Lq, Lk):
            raise ValueError(
                f"global token position {int(positions.max())} is outside the sequence "
                f"(Lq={Lq}, Lk={Lk})"
            )
        if per_head:
            if H is not None and H != dil.numel():
                raise ValueError(
                    f"longformer got one dilation per head for {dil.numel()} heads; "
                    f"the attention has H={H}"
                )
            _check_table_device(dil, device, "the per-head dilation")
        if positions is not None:
            _check_table_device(positions, device, "the global positions")

    return _tag(mask_mod, "longformer", check, window=window,
                dilation=dil.tolist() if per_head else dil,
                global_tokens=positions.tolist() if positions is not None else n_first,
                causal=causal)


def longformer_windows(n_layers: int, first: int = 32, last: int = 512) -> list[int]:
    """Longformer's per-layer window schedule: from ``first`` (bottom) to ``last`` (top), linear.

    Beltagy et al. 2020, sec. 4.1: small windows in the lower layers (local context), larger
    in the upper ones (the ablation, Table 4: increasing 32 -> 512 beats decreasing and a
    fixed window of about the same average). Windows are rounded to even numbers (w/2 per
    side). Use with :func:`longformer`, dilation only in the upper layers (``[1] * H`` below).
    """
    n_layers = _check_int("n_layers", n_layers, 1)
    first = _check_int("first", first, 2)
    last = _check_int("last", last, 2)
    if n_layers == 1:
        return [2 * round(first / 2)]
    step = (last - first) / (n_layers - 1)
    return [2 * round((first + k * step) / 2) for k in range(n_layers)]


def bigbird_layout(n_blocks: int, window_blocks: int = 3, global_blocks: int = 1,
                   random_blocks: int = 1, generator: Optional[torch.Generator] = None,
                   seed: int = 0, causal: bool = False) -> Tensor:
    """BigBird's block adjacency: (n_blocks, n_blocks) bool, True = query block reads key block.

    Window: the own block and ``(window_blocks - 1) / 2`` on each side (causal: before it).
    Global: the first ``global_blocks`` blocks read every block and are read by every block.
    Random: each other query block reads ``random_blocks`` key blocks drawn without
    replacement from those not already in its window or global (fewer if fewer are left;
    causal: only earlier blocks), from ``generator`` (or a fresh one seeded with ``seed``),
    once: the layout is fixed afterwards, as in BigBird.
    """
    n_blocks = _check_int("n_blocks", n_blocks, 1)
    window_blocks = _check_int("window_blocks", window_blocks, 1)
    global_blocks = _check_int("global_blocks", global_blocks, 0)
    random_blocks = _check_int("random_blocks", random_blocks, 0)
    causal = _check_bool("causal", causal)
    if window_blocks % 2 == 0:
        raise ValueError(
            f"window_blocks counts the own block and as many on each side: it must be odd; "
            f"got {window_blocks}"
        )
    if global_blocks > n_blocks:
        raise ValueError(f"global_blocks={global_blocks} exceeds the number of blocks {n_blocks}")
    if generator is None:
        generator = torch.Generator().manual_seed(_check_int("seed", seed))
    a = torch.arange(n_blocks)
    offset = a[:, None] - a[None, :]  # query block - key block
    side = (window_blocks - 1) // 2
    layout = (offset >= 0) & (offset <= side) if causal else offset.abs() <= side  # window
    layout[:global_blocks, :] = True  # global rows read everything
    layout[:, :global_blocks] = True  # everyone reads the global blocks
    if causal:
        layout &= offset >= 0
    for row in range(global_blocks, n_blocks):
        free = ~layout[row]
        if causal:
            free &= a <= row
        candidates = free.nonzero().flatten()
        take = min(random_blocks, candidates.numel())
        if take:
            pick = torch.randperm(candidates.numel(), generator=generator)[:take]
            layout[row, candidates[pick]] = True  # random key blocks for this query block
    return layout


def bigbird(seq_len: int, block_size: int, window_blocks: int = 3, global_blocks: int = 1,
            random_blocks: int = 1, seed: int = 0, generator: Optional[torch.Generator] = None,
            causal: bool = False, device=None) -> MaskMod:
    """BigBird attention (Zaheer et al. 2020): window + global + random, in blocks of ``block_size``.

    The random blocks depend on how many blocks there are, so the pattern is built for one
    ``seq_len`` (checked at use; the last block may be partial). The choice is drawn once
    from ``generator`` (or ``seed``) into :func:`bigbird_layout`, which the mask_mod indexes:
    ``layout[i // block_size, j // block_size]``. Pairs: at most
    ``L * block_size * (window_blocks + global_blocks + random_blocks) + global rows``: linear.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    block_size = _check_int("block_size", block_size, 1)
    if block_size > seq_len:
        raise ValueError(f"block_size={block_size} is larger than the sequence (seq_len={seq_len})")
    n_blocks = -(-seq_len // block_size)  # ceil
    layout = bigbird_layout(n_blocks, window_blocks, global_blocks, random_blocks, generator,
                            seed, causal)
    if device is not None:
        layout = layout.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = layout[q_idx // block_size, kv_idx // block_size]  # block adjacency
        return keep & (kv_idx <= q_idx) if causal else keep

    def check(Lq, Lk, H, device):
        if Lq != seq_len or Lk != seq_len:
            raise ValueError(
                f"this bigbird pattern was drawn for seq_len={seq_len} ({n_blocks} blocks of "
                f"{block_size}); got Lq={Lq}, Lk={Lk}: build one for this length"
            )
        _check_table_device(layout, device, "the bigbird layout")

    mask_mod.layout = layout
    return _tag(mask_mod, "bigbird", check, seq_len=seq_len, block_size=block_size,
                window_blocks=window_blocks, global_blocks=global_blocks,
                random_blocks=random_blocks, causal=causal)


def _combine(mods: Sequence[MaskMod], name: str, op) -> MaskMod:
    if not mods:
        raise ValueError(f"{name} needs at least one mask_mod; got none")
    for m in mods:
        check_mask_mod(m)

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = op(out, m(b, h, q_idx, kv_idx))
        return out

    def check(Lq, Lk, H, device):
        for m in mods:
            c = getattr(m, "check", None)
            if c is not None:
                c(Lq, Lk, H, device)

    return _tag(mask_mod, name, check, of=[describe(m) for m in mods])


def union(*mask_mods: MaskMod) -> MaskMod:
    """A pair is allowed if any pattern allows it (several heads merged into one, Longformer's parts)."""
    return _combine(mask_mods, "union", torch.logical_or)


def intersection(*mask_mods: MaskMod) -> MaskMod:
    """A pair is allowed if every pattern allows it (e.g. a pattern ``&`` causal)."""
    return _combine(mask_mods, "intersection", torch.logical_and)


# ----------------------------------------------------------------------------
# From a mask_mod to masks
# ----------------------------------------------------------------------------

def _grid_mask(mask_mod: MaskMod, rows: Tensor, Lk: int, B: int, H: int, device) -> Tensor:
    """Evaluate ``mask_mod`` on broadcast index grids: (B, H, len(rows), Lk) bool."""
    b = torch.arange(B, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    h = torch.arange(H, device=device)[None, :, None, None]  # (1, H, 1, 1)
    i = rows.to(device)[None, None, :, None]  # (1, 1, Lq, 1) query positions
    j = torch.arange(Lk, device=device)[None, None, None, :]  # (1, 1, 1, Lk) key positions
    m = mask_mod(b, h, i, j)
    target = (B, H, rows.numel(), Lk)
    if not isinstance(m, Tensor) or m.dtype != torch.bool:
        raise TypeError(f"{describe(mask_mod)} must return a bool tensor on index grids; got "
                        f"{getattr(m, 'dtype', type(m).__name__)}")
    try:
        return torch.broadcast_to(m, target)
    except RuntimeError:
        raise ValueError(
            f"{describe(mask_mod)} evaluated on broadcast index grids b {_shape(b)}, h {_shape(h)}, "
            f"q_idx {_shape(i)}, kv_idx {_shape(j)} gave shape {_shape(m)}, which does not "
            f"broadcast to {target}: write it with elementwise operations only"
        ) from None


def dense_mask(mask_mod: MaskMod, Lq: int, Lk: Optional[int] = None, B: Optional[int] = None,
               H: Optional[int] = None, device=None) -> Tensor:
    """The boolean mask of a pattern: ``(Lq, Lk)``, or ``(B or 1, H or 1, Lq, Lk)`` if B or H is given.

    ``mask[i, j] = mask_mod(b, h, i, j)``, evaluated on every pair at once with broadcast
    index tensors (rows = queries, columns = keys; True = may attend). Without B and H it
    is the mask of batch 0, head 0, as ``create_block_mask(mask_mod, None, None, ...)`` uses.
    """
    Lq, Lk = _check_lengths(Lq, Lk)
    Bn = 1 if B is None else _check_int("B", B, 1)
    Hn = 1 if H is None else _check_int("H", H, 1)
    _check_pattern(mask_mod, Lq, Lk, H, device)
    m = _grid_mask(mask_mod, torch.arange(Lq), Lk, Bn, Hn, device).clone()  # (B, H, Lq, Lk)
    return m[0, 0] if B is None and H is None else m


def _uses_batch_and_head(mask_mod: MaskMod, B: int, H: int, device) -> tuple[bool, bool]:
    """Does the mask depend on b, on h? Read off the shape of one evaluation on index grids.

    A mask_mod that fails on these grids (a per-head table shorter than H) counts as
    depending on both: its own check or create_block_mask then says what is wrong.
    """
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.arange(H, device=device)[None, :, None, None]
    z = torch.zeros((1, 1, 1, 1), dtype=torch.int64, device=device)
    try:
        shape = mask_mod(b, h, z, z).shape
    except Exception:  # noqa: BLE001 - an answer, not an error: "it uses them"
        return B > 1, H > 1
    pad = (1,) * (4 - len(shape)) + tuple(shape)
    return pad[0] > 1, pad[1] > 1


def block_mask(mask_mod: MaskMod, Lq: int, Lk: Optional[int] = None, B: Optional[int] = None,
               H: Optional[int] = None, block_size: int = DEFAULT_BLOCK_SIZE,
               device=None) -> BlockMask:
    """FlexAttention's ``BlockMask`` for a pattern (``create_block_mask``), after the checks.

    B and H: None broadcasts over the batch / heads (the mask is evaluated at b = 0 / h = 0),
    which is right for every pattern that ignores them; a pattern that depends on the head
    (per-head permutations or dilations) needs ``H`` (checked). Lengths need not be
    multiples of ``block_size`` (the tile size, 128 by default).
    """
    Lq, Lk = _check_lengths(Lq, Lk)
    block_size = _check_int("block_size", block_size, 1)
    Bn = None if B is None else _check_int("B", B, 1)
    Hn = None if H is None else _check_int("H", H, 1)
    _check_pattern(mask_mod, Lq, Lk, Hn, device)
    uses_b, uses_h = _uses_batch_and_head(mask_mod, Bn or 2, Hn or 2, device)
    for name, given, uses in (("B", Bn, uses_b), ("H", Hn, uses_h)):
        if given is None and uses:
            what = "batch index b" if name == "B" else "head index h"
            raise ValueError(
                f"{describe(mask_mod)} depends on the {what}: pass {name}= (the number of "
                f"{'sequences' if name == 'B' else 'heads'}) so each gets its own tiles; "
                f"got {name}=None, which would use {name.lower()} = 0 everywhere"
            )
    return create_block_mask(mask_mod, Bn, Hn, Lq, Lk, device=device or "cpu",
                             BLOCK_SIZE=block_size)


def block_counts(bm: BlockMask) -> dict[str, int]:
    """How many (query tile, key tile) pairs a BlockMask computes: full, partial, empty, total.

    Full tiles need no mask at all, partial tiles apply the mask_mod inside, empty tiles are
    skipped. Summed over the block mask's batch and head dimensions.
    """
    if not isinstance(bm, BlockMask):
        raise TypeError(f"expected a FlexAttention BlockMask; got {type(bm).__name__}")
    partial = int(bm.kv_num_blocks.sum())
    full_ = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
    Lq, Lk = bm.seq_lengths
    bq, bk = bm.BLOCK_SIZE
    n_q, n_k = -(-Lq // bq), -(-Lk // bk)
    total = n_q * n_k * int(bm.kv_num_blocks.shape[0]) * int(bm.kv_num_blocks.shape[1])
    return {"full": full_, "partial": partial, "empty": total - full_ - partial, "total": total}


# ----------------------------------------------------------------------------
# Attention through a pattern
# ----------------------------------------------------------------------------

_COMPILED: dict = {}


def compiled_flex_attention():
    """The process-wide ``torch.compile(flex_attention)`` (compiled lazily, on first use).

    On a CPU the first call compiles (about 15 s cold; a second or two when
    ``TORCHINDUCTOR_CACHE_DIR`` holds an earlier compile); later calls reuse the kernel.
    """
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["flex"]


def _check_block_mask(bm, Lq: int, Lk: int, B: int, H: int) -> None:
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a FlexAttention BlockMask (see block_mask()); "
                        f"got {type(bm).__name__}")
    if tuple(bm.seq_lengths) != (Lq, Lk):
        raise ValueError(
            f"block_mask was built for (Lq, Lk) = {tuple(bm.seq_lengths)}, "
            f"but q and k have Lq={Lq}, Lk={Lk}: build it for these lengths"
        )
    bB, bH = int(bm.kv_num_blocks.shape[0]), int(bm.kv_num_blocks.shape[1])
    if bB not in (1, B) or bH not in (1, H):
        raise ValueError(
            f"block_mask has (batch, heads) = ({bB}, {bH}); q has ({B}, {H}): "
            "expected 1 (broadcast) or equal"
        )


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask_mod: Optional[MaskMod] = None, *,
                     block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                     compiled: bool = False, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """Attention restricted to a pattern, on FlexAttention: ``softmax(q k^T * scale, mask) v``.

    Args:
        q: (B, H, Lq, D) queries. k: (B, H, Lk, D) keys. v: (B, H, Lk, Dv) values.
        mask_mod: the pattern (a function of this module, or your own
            ``mask_mod(b, h, q_idx, kv_idx) -> bool``). The BlockMask is built from it with
            tiles of ``block_size``, per head only if the pattern depends on the head.
        block_mask: a BlockMask built beforehand (:func:`block_mask`): pass it to reuse it
            across calls (building it costs a pass over the (Lq, Lk) plane). Give
            ``mask_mod`` or ``block_mask``.
        scale: multiplies the dot products; default 1/sqrt(D).
        compiled: ``False`` (default) runs FlexAttention eagerly: it materialises the
            scores, fine for teaching sizes. ``True`` uses :func:`compiled_flex_attention`,
            the fused kernel that skips empty tiles (a compile the first time).

    Returns out (B, H, Lq, Dv); a query with no allowed key gets zeros.

    On the CPU, PyTorch 2.13's FlexAttention has no backward pass: inputs that require grad
    are refused here with a clear error (use :func:`dense_attention` to train on a CPU).
    """
    _check_qkv(q, k, v)
    compiled = _check_bool("compiled", compiled)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if (mask_mod is None) == (block_mask is None):
        raise ValueError("give exactly one of mask_mod (a pattern) or block_mask (a BlockMask); "
                         f"got mask_mod={'set' if mask_mod is not None else None}, "
                         f"block_mask={'set' if block_mask is not None else None}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None; got {type(scale).__name__}")
    if mask_mod is not None:
        _check_pattern(mask_mod, Lq, Lk, H, q.device)
        uses_b, uses_h = _uses_batch_and_head(mask_mod, B, H, q.device)
        block_mask = create_block_mask(mask_mod, B if uses_b else None, H if uses_h else None,
                                       Lq, Lk, device=q.device,
                                       BLOCK_SIZE=_check_int("block_size", block_size, 1))
    else:
        _check_block_mask(block_mask, Lq, Lk, B, H)
    if not torch.is_grad_enabled():  # nothing to differentiate: let leaves through
        q, k, v = q.detach(), k.detach(), v.detach()
    validate = getattr(flex_module, "_validate_device", None)  # PyTorch's own device check
    if validate is not None:
        try:
            validate(q, k, v)
        except NotImplementedError as e:  # 2.13: "does not support backward on CPU"
            raise NotImplementedError(
                f"FlexAttention has no backward pass on {q.device.type} in this PyTorch "
                f"({torch.__version__}): it refuses inputs that require grad. Use "
                "dense_attention(q, k, v, mask_mod), the same attention with the pattern's "
                "boolean mask, to train there, call this under torch.no_grad(), or run on "
                f"CUDA. (PyTorch says: {e})"
            ) from e
    scale = None if scale is None else float(scale)
    if compiled:
        if q.device.type == "cpu" and q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                "the compiled CPU FlexAttention kernel supports float32, bfloat16 and float16; "
                f"got {q.dtype}: use compiled=False (eager works in {q.dtype}) or q.float()"
            )
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        # eager FlexAttention warns that it materialises the scores: that is the point here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask_mod: MaskMod, *,
                    scale: Optional[float] = None, fast: bool = False,
                    need_weights: bool = False):
    """The same attention as :func:`sparse_attention`, with the pattern's dense boolean mask.

    The readable reference: :func:`dense_mask` (per batch and head where the pattern
    depends on them), then the library's ``scaled_dot_product_attention`` (every step
    printable, ``need_weights=True`` returns the weights too), or with ``fast=True``
    ``F.scaled_dot_product_attention`` through ``fast_attention``. Costs O(Lq Lk) time and
    memory whatever the pattern: the baseline sparse kernels are measured against.
    Fully masked rows give zeros (and zero gradients), in both paths.
    """
    _check_qkv(q, k, v)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    _check_pattern(mask_mod, Lq, Lk, H, q.device)
    mask = _grid_mask(mask_mod, torch.arange(Lq), Lk, B, H, q.device)  # (B, H, Lq, Lk)
    if not fast:
        return scaled_dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            need_weights=need_weights)
    if need_weights:
        raise ValueError("the fused kernel stores no weights: use fast=False with need_weights=True")
    out = fast_attention(q, k, v, mask=mask, scale=scale)  # (B, H, Lq, Dv)
    empty = ~mask.any(dim=-1, keepdim=True)  # (B, H, Lq, 1): rows with no key
    return out.masked_fill(empty, 0.0)  # zeros on every backend, as masked_softmax


# ----------------------------------------------------------------------------
# The graph view: pairs, hops, diameter, receptive field
# ----------------------------------------------------------------------------

def count_pairs(mask_mod: MaskMod, Lq: int, Lk: Optional[int] = None, chunk: int = 1024) -> int:
    """Number of allowed (query, key) pairs (batch 0, head 0): the attention's cost in pairs.

    Counted ``chunk`` query rows at a time, so long sequences never need the whole
    (Lq, Lk) mask in memory.
    """
    Lq, Lk = _check_lengths(Lq, Lk)
    chunk = _check_int("chunk", chunk, 1)
    _check_pattern(mask_mod, Lq, Lk)
    total = 0
    for start in range(0, Lq, chunk):
        rows = torch.arange(start, min(start + chunk, Lq))
        total += int(_grid_mask(mask_mod, rows, Lk, 1, 1, None).sum())
    return total


def density(mask_mod: MaskMod, Lq: int, Lk: Optional[int] = None) -> float:
    """Fraction of the Lq * Lk pairs that are allowed (1.0 for dense, about 0.5 for causal)."""
    Lq, Lk = _check_lengths(Lq, Lk)
    return count_pairs(mask_mod, Lq, Lk) / (Lq * Lk)


def _layer_list(layers: Layers) -> list:
    mods = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not mods:
        raise ValueError("layers must be a mask_mod or a non-empty list of mask_mods (one per layer)")
    return mods


def _hop_matrices(layers: Layers, L: int) -> list[Tensor]:
    """For each layer, (M | I) as float32 (sparse when that is cheaper): one hop."""
    L = _check_int("L", L, 1)
    eye = torch.eye(L, dtype=torch.bool)
    out = []
    for m in _layer_list(layers):
        step = (dense_mask(m, L, L) | eye).float()  # residual stream: a token keeps its state
        out.append(step.to_sparse() if step.mean() < 0.1 else step)  # sparse: O(pairs L) a hop
    return out


def _is_causal(layers: Layers, L: int) -> bool:
    return all(not dense_mask(m, L, L).triu(1).any() for m in _layer_list(layers))


def reachability(layers: Layers, L: int, n_layers: int) -> Tensor:
    """(L, L) bool: ``R[i, j]`` True when token i has seen token j after ``n_layers`` layers.

    ``layers``: one mask_mod used in every layer, or a list of them used in turn (layer t
    uses ``layers[t % len(layers)]``: Sparse Transformer's alternating heads, Longformer's
    per-layer windows). With the residual stream: ``R_t = (M_t | I) R_(t-1)``, ``R_0 = I``.
    """
    n_layers = _check_int("n_layers", n_layers, 0)
    steps = _hop_matrices(layers, L)
    R = torch.eye(L)
    for t in range(n_layers):
        R = ((steps[t % len(steps)] @ R) > 0).float()  # paths one layer longer
    return R > 0


def hop_distances(layers: Layers, L: int, max_hops: Optional[int] = None) -> Tensor:
    """(L, L) int64: ``dist[i, j]`` = fewest layers before token i has seen token j (-1: never).

    Breadth-first search from every position at once: level t is ``R_t = (M_t | I) R_(t-1)``,
    and a pair first reached at level t is t hops apart. Stops when nothing new is reached
    in a whole cycle of ``layers`` or after ``max_hops`` levels (default ``L * len(layers)``:
    a shortest route takes at most L - 1 useful layers, and with a cycle of N layer patterns
    each may have to wait up to N levels for the pattern it needs).
    """
    steps = _hop_matrices(layers, L)
    max_hops = L * len(steps) if max_hops is None else _check_int("max_hops", max_hops, 0)
    R = torch.eye(L)
    dist = torch.full((L, L), -1, dtype=torch.int64)
    dist.fill_diagonal_(0)
    quiet = 0  # levels in a row with nothing new
    for t in range(1, max_hops + 1):
        new = (steps[(t - 1) % len(steps)] @ R) > 0
        fresh = new & (dist < 0)
        dist[fresh] = t
        quiet = 0 if fresh.any() else quiet + 1
        R = new.float()
        if quiet >= len(steps):
            break
    return dist


def diameter(layers: Layers, L: int, causal: Optional[bool] = None,
             max_hops: Optional[int] = None) -> Union[int, float]:
    """The largest number of layers any pair needs: max of :func:`hop_distances`.

    Over all pairs, or for a causal pattern (``causal=None``: none of ``layers`` ever looks
    ahead) over the pairs ``j <= i`` only. ``math.inf`` when some such pair is never connected.
    """
    dist = hop_distances(layers, L, max_hops)
    causal = _is_causal(layers, L) if causal is None else _check_bool("causal", causal)
    pairs = torch.ones(L, L, dtype=torch.bool)
    if causal:
        pairs = pairs.tril()  # j <= i
    d = dist[pairs]
    return math.inf if bool((d < 0).any()) else int(d.max())


def receptive_field(layers: Layers, L: int, n_layers: int, query: Optional[int] = None,
                    span: bool = False) -> int:
    """How many *other* positions token ``query`` has seen after ``n_layers`` layers.

    Default query: the last position for a causal pattern, the middle one otherwise (far
    from both ends, so the edges of the sequence do not cut the field). For a sliding
    window of ``w``: ``n_layers * w`` while it fits (Longformer sec. 3.1: ``l x w``).
    ``span=True``: the distance from the first to the last position seen instead. The two
    agree for a window without holes; a dilated window (d) spans ``n_layers * d * w``
    (Longformer's ``l x d x w``) while it has seen only ``n_layers * w`` of those positions.
    """
    L = _check_int("L", L, 1)
    if query is None:
        query = L - 1 if _is_causal(layers, L) else L // 2
    query = _check_int("query", query, 0)
    if query >= L:
        raise ValueError(f"query must be a position in 0..{L - 1}; got {query}")
    seen = reachability(layers, L, n_layers)[query]  # (L,) positions query has seen
    if _check_bool("span", span):
        where = seen.nonzero().flatten()
        return int(where.max() - where.min())
    return int(seen.sum()) - 1


def path(layers: Layers, L: int, source: int, target: int,
         max_hops: Optional[int] = None) -> Optional[list[int]]:
    """One shortest route of information from ``source`` to ``target``: the positions it sits at.

    ``[source, k, target]`` means: layer 1 moves it from ``source`` to ``k`` (query k
    attends to key ``source``), layer 2 from ``k`` to ``target``. A repeated position is a
    layer where it stays put (the residual stream). None if not reached within ``max_hops``
    (default ``L * len(layers)``, as in :func:`hop_distances`).
    """
    L = _check_int("L", L, 1)
    for name, p in (("source", source), ("target", target)):
        if _check_int(name, p, 0) >= L:
            raise ValueError(f"{name} must be a position in 0..{L - 1}; got {p}")
    masks = [dense_mask(m, L, L) | torch.eye(L, dtype=torch.bool) for m in _layer_list(layers)]
    max_hops = L * len(masks) if max_hops is None else _check_int("max_hops", max_hops, 0)
    seen = torch.zeros(L, dtype=torch.bool)
    seen[source] = True
    parents = []  # parents[t][i]: where the information came from at layer t + 1
    for t in range(max_hops + 1):
        if seen[target]:
            route = [target]
            for par in reversed(parents):
                route.append(int(par[route[-1]]))
            return route[::-1]
        if t == max_hops:
            break
        step = masks[t % len(masks)]  # step[i, k]: i reads k in this layer
        via = step & seen[None, :]  # (L, L): i reads a position k that has it
        reached = via.any(dim=1)
        parent = torch.where(seen, torch.arange(L), via.float().argmax(dim=1))  # stay, else first k
        parents.append(parent)
        seen = seen | reached
    return None
