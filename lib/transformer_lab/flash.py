r"""FlashAttention: exact attention computed in tiles, with memory linear in the sequence length.

Papers
------
* Dao, Fu, Ermon, Rudra, Ré 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
  with IO-Awareness", arXiv:2205.14135: sec. 2.1 (the memory hierarchy), sec. 3.1 and
  Algorithm 1 (tiling, the online softmax, the forward pass), Algorithm 4 / appendix B.4
  (the backward pass that recomputes the scores), Theorem 2 (how much memory traffic).
* Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning", arXiv:2307.08691: sec. 3.1 (fewer non-matmul operations: rescale the output
  once at the end, keep only the log-sum-exp), Algorithms 1 and 2 (loop order: query blocks
  outside, key blocks inside), sec. 3.2 (parallelism over query blocks), causal block skipping.
* Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", arXiv:1805.02867:
  the one-pass softmax (running max and running sum).
* Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory", arXiv:2112.05682: the
  same chunked computation, derived independently, with O(sqrt(n)) memory.

Why tiles: the memory hierarchy
-------------------------------
A GPU has a large, slow memory (HBM: 40-80 GB at 1.5-2 TB/s on an A100) and a small, fast
one on the chip (SRAM: 192 KB per streaming multiprocessor, about 20 MB in all, at some
19 TB/s). A CPU has the same shape: DRAM, then 32 MiB of L3, 1 MiB of L2 per core. A matrix
product does about 2 D flops per number it reads, but a softmax or a mask does about one,
so *standard attention* is limited by the traffic, not by the flops: it writes the
``(Lq, Lk)`` scores ``S`` to HBM, reads them back for the softmax, writes ``P``, reads
``P`` again for ``P V`` (Algorithm 0 of the paper)::

    standard:        (Lq + Lk) D + Lk Dv + Lq Dv + 4 Lq Lk     elements to and from HBM

FlashAttention never writes ``S`` or ``P``: it loads a block of queries ``Q_i`` and a block
of keys and values ``K_j, V_j`` into fast memory, computes that tile of scores there, folds
it into a running softmax, and moves on (:func:`memory_traffic` counts both; Theorem 2:
``Theta(Lq Lk D^2 / M)`` for fast memory of M elements, against ``Theta(L D + L^2)``).

The online softmax (derived step by step)
-----------------------------------------
For one query row with scores ``s_1 .. s_Lk`` split into blocks, keep three running
quantities (what has been seen so far):

    m   the running max of the scores                         (a number per row)
    l   the running sum  sum_j exp(s_j - m)                   (a number per row)
    o   the running, *unnormalised* output  sum_j exp(s_j - m) v_j   (a row of Dv numbers)

Folding in the next block ``s^(t)`` with values ``V^(t)`` (:func:`online_softmax_update`)::

    m'  = max(m, rowmax(s^(t)))                 the new max
    P~  = exp(s^(t) - m')                       this block's weights, shifted by the new max
    l'  = exp(m - m') l + rowsum(P~)            old terms rescaled from exp(s - m) to exp(s - m')
    o'  = exp(m - m') o + P~ V^(t)

``exp(m - m') <= 1`` is the *rescaling*: every old term ``exp(s_j - m)`` times it becomes
``exp(s_j - m')``, so after the last block ``l = sum_j exp(s_j - m)`` with the true max
``m``, exactly as in the two-pass softmax. Finalise (:func:`online_softmax_finalize`)::

    O   = o / l                                 softmax(s) V, exactly
    lse = m + log(l)                            log sum_j exp(s_j), kept for the backward

No value is an approximation: tiling changes the order of the additions, nothing else
(results agree with ``F.scaled_dot_product_attention`` to float rounding, ~1e-7 in float32).
:func:`online_softmax_1d` is the same recurrence on one row of numbers, for reading.

The forward pass (FlashAttention-2, Algorithm 1)
------------------------------------------------
:func:`flash_attention_forward`::

    for each query block Q_i   (Br = block_q rows):           outer loop
        m_i = -inf, l_i = 0, o_i = 0                           (state, in fast memory)
        for each key block K_j, V_j   (Bc = block_k rows):     inner loop
            S_ij = scale Q_i K_j^T        (+ mask)             one (Br, Bc) tile
            fold S_ij, V_j into (m_i, l_i, o_i)                online softmax
        O_i = o_i / l_i,   lse_i = m_i + log l_i               written once

Tiles are computed in one preallocated ``(B H, Br, Bc)`` buffer and the state is updated in
place (``torch.baddbmm(..., out=)``, ``exp2_``, ``mul_``), so nothing of size
``(Lq, Lk)`` ever exists and nothing is allocated per tile: peak memory is the output plus a
constant. As in the papers' CUDA kernels the exponentials are taken in base 2
(``exp(x) = 2^(x log2 e)``, the factor folded into the scale of ``Q K^T``): the same numbers
up to rounding, and ``exp2`` is about 3x cheaper than ``exp`` on a CPU with AVX-512. On a
2-core CPU (B=1, H=8, D=64, float32, 2 threads) this runs within 1.1-1.2x the time of
``F.scaled_dot_product_attention`` (PyTorch's own fused C++ flash kernel) at L = 2048-8192.

**Parallel over query blocks** (FA-2 sec. 3.2). Each query block has its own state and its own
output rows, so the blocks are independent jobs. With ``torch.get_num_threads() > 1`` they are
dealt in turn to that many Python threads, each running its tiles with one intra-op thread
(PyTorch releases the GIL inside its operations): one parallel section per call instead of a
fork-join in each of the ~10 operations of every tile, which on a shared machine stall whenever
one thread is preempted (measured on a loaded 2-core machine, L = 4096: 7x SDPA's time with
per-operation threads, 0.9-1.2x with query blocks per thread). Under a ``TorchDispatchMode``
(``FlopCounterMode``, :func:`peak_memory`) the loop stays in the calling thread, since modes
are per thread.

**Causal block skipping.** With a causal mask a tile whose keys all lie in every query's
future is skipped entirely (never computed, never loaded); a tile wholly in the past is
computed without a mask; only the tiles crossing the diagonal get the triangle mask
(:func:`tile_plan`: about half the tiles are skipped at long lengths).

**FlashAttention-1's loop order** (:func:`flash_attention_forward_fa1`, Algorithm 1 of the first
paper) puts the key blocks outside and the query blocks inside. Then the state of *every*
query block must go back to HBM after each key block, and FA-1 keeps the output normalised
at every step (``O_i <- diag(l_new)^-1 (diag(l_i) e^{m_i - m_new} O_i + e^{m~ - m_new} P~ V_j)``).
FlashAttention-2 swaps the loops: a query block's state stays on chip for the whole inner loop,
the output is divided by ``l`` once at the end, and only ``lse`` is stored for the backward.
That removes non-matmul flops (which run ~16x slower than matmul flops on tensor cores),
cuts the traffic (:func:`memory_traffic` ``"fa1"`` vs ``"fa2"``) and lets each query block
be an independent job (parallelism over the sequence, not only over batch and heads).

The backward pass (recompute from the log-sum-exp)
--------------------------------------------------
:func:`flash_attention_backward` (FA-2 Algorithm 2). Nothing of size ``(Lq, Lk)`` was saved:
only ``O`` and ``lse``. The tile ``P_ij`` is recomputed from the inputs::

    D_i   = rowsum(dO_i * O_i)                 (= rowsum(P_i * dP_i), see below)
    S_ij  = scale Q_i K_j^T  (+ mask)
    P_ij  = exp(S_ij - lse_i)                  exactly the forward's softmax weights
    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)               the softmax's Jacobian, row by row
    dQ_i += scale dS_ij K_j
    dK_j += scale dS_ij^T Q_i

Why ``D``: for ``p = softmax(s)``, ``ds = p * (dp - <p, dp>)``, and
``<p_i, dp_i> = sum_j p_ij (dO_i . v_j) = dO_i . (sum_j p_ij v_j) = dO_i . O_i``: one dot
product per row instead of a pass over the row. Recomputing ``S`` costs one more matmul
per tile but saves storing ``(Lq, Lk)`` numbers; on a GPU it is faster than reading them.
:class:`FlashAttention` (a ``torch.autograd.Function``) ties both together, and
:func:`flash_attention` is the call to use.

"FlashAttention makes attention O(n)": no
-----------------------------------------
Its *memory* is linear in L (the output, the log-sum-exp and a fixed number of tiles). Its
*compute* is the same quadratic count of multiply-adds as dense attention, every score is
still computed (:func:`attention_flops`, :func:`flash_flops`; ``FlopCounterMode`` agrees).
It is faster because it moves fewer bytes, not because it does less arithmetic.

A common mistake: block-diagonal "flash" attention
--------------------------------------------------
A widely shared tutorial loops ``for i in blocks: softmax(Q_i K_i^T) V_i``: query block i
sees key block i only. That is block-diagonal local attention (:func:`block_diagonal_attention`,
:func:`block_diagonal_mask`), not exact attention; its error against exact attention is large
(a query near a block boundary loses almost all of its context). Exact tiling must visit
every key block for every query block, carrying the online softmax state across them.

Measuring memory
----------------
:func:`peak_memory` runs a function and reports the peak bytes it held. The default
``method="tensors"`` counts the live tensor storages that the function's operations create
(a ``TorchDispatchMode`` sees every allocation, a weak reference to each storage tells when it
is freed): deterministic, the same on every machine and every device, and blind to what else
runs on a shared CPU. It does not see scratch space that a fused kernel allocates inside itself
(SDPA's CPU kernel keeps a few per-thread tiles, under 2 MiB here). ``method="rss"`` is the
benchmark's measurement (``benchmarks/attention.py``): growth of the process's resident set
(``VmHWM`` after resetting it), which counts every page touched, kernel scratch included, at
page granularity and with some allocator noise. ``method="cuda"`` uses
``torch.cuda.max_memory_allocated``.

Shapes
------
Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``. Here:
q ``(B, H, Lq, D)``, k ``(B, H, Lk, D)``, v ``(B, H, Lk, Dv)``, out ``(B, H, Lq, Dv)``,
lse ``(B, H, Lq)``. Internally batch and heads are flattened to ``B H`` so each tile is one
batched matrix product; a tile of scores is ``(B H, Br, Bc)``.

Masks follow the library's one convention (:mod:`transformer_lab.attention`): a boolean mask
is True where attention is allowed, a float mask is added to the scaled scores; it
broadcasts to ``(B, H, Lq, Lk)``. ``causal=True`` means key ``j`` is visible to query ``i``
iff ``j <= i + (Lk - Lq)`` (queries are the *last* Lq positions, as in
:func:`~transformer_lab.attention.causal_mask`). A query with no visible key gets a zero
output, a zero gradient and ``lse = -inf``, never NaN. The mask gets no gradient.

Glossary (variable -> paper symbol)
-----------------------------------
========================  =====================================================
``q, k, v``               Q, K, V
``Lq``, ``Lk``            N (the papers use one length N)
``D``, ``Dv``             d (head dimension of queries/keys and of values)
``scale``                 the softmax scale, 1/sqrt(d) by default (tau in FA-1)
``block_q``               B_r, rows of a query block (FA-2); T_r = ceil(Lq / B_r) blocks
``block_k``               B_c, rows of a key/value block; T_c = ceil(Lk / B_c) blocks
``q_i``, ``k_j``, ``v_j``  Q_i, K_j, V_j: the blocks
``scores``, ``s``         S_ij = tau Q_i K_j^T, one (B_r, B_c) tile
``m``                     m_i: running row max (m^(j) in FA-2)
``l``                     l_i: running row sum of exp(S - m) (l^(j) in FA-2)
``acc``, ``o``            O~_i: the unnormalised output, diag(l)^-1 applied at the end
``p``                     P~_ij = exp(S_ij - m_i) (forward); P_ij = exp(S_ij - L_i) (backward)
``lse``                   L_i = m_i + log(l_i), the log-sum-exp (logsumexp in FA-2)
``dout``, ``delta``       dO and D_i = rowsum(dO_i o O_i)
``dq, dk, dv``            dQ, dK, dV
========================  =====================================================

A GPU kernel
------------
The loops here run in Python over tiles; every tile is a batched PyTorch call, so the same
code runs on CPU, CUDA and MPS. A Triton kernel of the forward (one program per query block,
the inner loop in registers) would be the GPU version. It is not included: this library is
tested on CPU-only machines, and untested GPU code is not shipped. ``F.scaled_dot_product_attention``
already dispatches to the FlashAttention-2 CUDA kernels on a GPU.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode

from .attention import _check_mask, _check_qkv, _check_scale, _shape

__all__ = [
    # online softmax
    "SoftmaxState",
    "online_softmax_1d",
    "online_softmax_init",
    "online_softmax_update",
    "online_softmax_finalize",
    # tiles
    "SKIPPED",
    "MASKED",
    "FULL",
    "tile_plan",
    "auto_block_q",
    # attention
    "flash_attention_forward",
    "flash_attention_forward_fa1",
    "flash_attention_backward",
    "backward_tile",
    "FlashAttention",
    "flash_attention",
    # the common mistake
    "block_diagonal_attention",
    "block_diagonal_mask",
    # counting
    "attention_flops",
    "flash_flops",
    "memory_traffic",
    "peak_memory",
    "largest_allocation",
]

#: Default tile sizes: measured fastest on a 2-core CPU at L = 1024-8192 (B=1, H=8, D=64).
#: ``block_q=None`` in the attention functions means DEFAULT_BLOCK_Q, halved (down to 16) while
#: the tile of scores would hold more numbers than the output, so that at short lengths the
#: fixed tile does not dominate the memory (:func:`auto_block_q`).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512

#: What :func:`tile_plan` says about a (query block, key block) tile.
SKIPPED, MASKED, FULL = 0, 1, 2

_NEG_INF = float("-inf")
_LOG2E = 1.0 / math.log(2.0)  # log2(e): exp(x) = 2^(x log2 e)
_LN2 = math.log(2.0)  # ln 2: log(x) = log2(x) ln 2


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _check_block(name: str, value) -> int:
    """A block size: an int >= 1 (a tile has at least one row)."""
    if isinstance(value, (bool, float)) or (isinstance(value, Tensor) and (
            value.is_floating_point() or value.dtype == torch.bool)):
        raise TypeError(f"{name} must be a positive int (rows per tile); "
                        f"got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(f"{name} must be a positive int (rows per tile); "
                        f"got {type(value).__name__} {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, at least 1 row per tile; got {value}")
    return value


def _check_length(name: str, value) -> int:
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def auto_block_q(Lq: int, Dv: int, block_k: int = DEFAULT_BLOCK_K) -> int:
    """The query block that ``block_q=None`` picks: DEFAULT_BLOCK_Q, halved down to 16 while
    a ``(block_q, min(block_k, Lq))`` tile of scores holds more numbers than the ``(Lq, Dv)``
    output of one head (so the tile never costs more memory than the output)."""
    Lq, Dv = _check_length("Lq", Lq), _check_length("Dv", Dv)
    bk = min(_check_block("block_k", block_k), max(Lq, 1))
    bq = DEFAULT_BLOCK_Q
    while bq > 16 and bq * bk > Lq * Dv:
        bq //= 2
    return bq


def _prepare(q, k, v, block_q, block_k, causal, scale, mask):
    """Check the inputs of an attention call; return block sizes, scale and a 4-D mask."""
    _check_qkv(q, k, v)
    block_k = _check_block("block_k", block_k)
    if block_q is None:
        block_q = auto_block_q(q.shape[2], v.shape[3], block_k)
    block_q = _check_block("block_q", block_q)
    causal = _check_bool("causal", causal)
    _check_scale(scale)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if mask is not None:
        _check_mask("mask", mask, (B, H, Lq, Lk))
        if mask.device != q.device:
            raise ValueError(f"mask must be on the device of q ({q.device}); got {mask.device}")
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("flash attention treats the mask as a constant (it gets no "
                             "gradient); got a mask that requires grad: pass mask.detach(), "
                             "or use attention.scaled_dot_product_attention for a learned bias")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, lq, lk)
        if mask.is_floating_point():
            mask = mask.to(torch.promote_types(q.dtype, torch.float32))
    return block_q, block_k, causal, scale, mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision inputs are computed in float32 (as the papers' kernels keep m, l, O~)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, L, X) -> (B H, L, X): a view for contiguous inputs, a copy otherwise."""
    return t.to(dtype).reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


# ----------------------------------------------------------------------------
# The online softmax
# ----------------------------------------------------------------------------

def online_softmax_1d(x: Tensor, block_size: int, trace: bool = False):
    """Softmax of one row, reading it block by block: the running max and sum of the papers.

    The teaching version of the recurrence (Milakov & Gimelshein 2018): one pass over the
    blocks keeps ``m`` (the max so far) and ``l`` (``sum exp(x - m)`` so far), rescaling
    ``l`` by ``exp(m_old - m_new)`` whenever the max grows; a last elementwise step
    divides. Equal to ``torch.softmax(x, 0)`` for every ``block_size``.

    Args:
        x: (L,) one row of scores. block_size: numbers per block (>= 1).
        trace: also return ``[(m, l), ...]``, the state after each block (Python floats).

    Returns:
        (L,) the softmax (all zeros when every score is -inf), or ``(softmax, trace)``.
    """
    if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
        raise ValueError(f"x must be a 1-D floating-point tensor (one row of scores); got "
                         f"{type(x).__name__} {_shape(x) if isinstance(x, Tensor) else ''}")
    block_size = _check_block("block_size", block_size)
    m = x.new_tensor(_NEG_INF)  # running max
    l = x.new_zeros(())  # running sum of exp(x - m)
    steps = []
    for start in range(0, x.shape[0], block_size):
        block = x[start:start + block_size]
        m_new = torch.maximum(m, block.max())  # m' = max(m, max(block))
        shift = m_new if math.isfinite(m_new) else x.new_zeros(())  # nothing seen yet: no shift
        l = l * torch.exp(m - shift) + torch.exp(block - shift).sum()  # l' = e^(m - m') l + sum e^(x - m')
        m = m_new
        steps.append((float(m), float(l)))
    shift = m if math.isfinite(m) else x.new_zeros(())
    out = torch.exp(x - shift) / l if float(l) > 0 else torch.zeros_like(x)  # e^(x - m) / l
    return (out, steps) if trace else out


class SoftmaxState(NamedTuple):
    """The running state of the online softmax for a block of query rows.

    m: (..., n, 1) running row max. l: (..., n, 1) running sum of exp(s - m).
    acc: (..., n, Dv) running unnormalised output sum_j exp(s_j - m) v_j.
    """

    m: Tensor
    l: Tensor
    acc: Tensor


def online_softmax_init(rows: Tuple[int, ...], Dv: int, *, dtype=torch.float32,
                        device=None) -> SoftmaxState:
    """The empty state for query rows of shape ``rows`` (e.g. ``(B, H, n)``): m = -inf, l = 0, acc = 0."""
    rows = tuple(rows)
    m = torch.full((*rows, 1), _NEG_INF, dtype=dtype, device=device)  # nothing seen: max -inf
    l = torch.zeros((*rows, 1), dtype=dtype, device=device)
    acc = torch.zeros((*rows, Dv), dtype=dtype, device=device)  # (..., n, Dv)
    return SoftmaxState(m, l, acc)


def online_softmax_update(state: SoftmaxState, scores: Tensor, v: Tensor) -> SoftmaxState:
    """Fold one block of scores (and its values) into the running state (the readable version).

    Args:
        state: :class:`SoftmaxState` for n query rows.
        scores: (..., n, nk) scaled scores of this key block, hidden keys at -inf.
        v: (..., nk, Dv) the values of this key block.

    Returns a new :class:`SoftmaxState` (the arguments are left alone)::

        m' = max(m, rowmax(s)),  P~ = exp(s - m'),  l' = e^(m - m') l + rowsum(P~),
        acc' = e^(m - m') acc + P~ v

    :func:`flash_attention_forward` does the same in place, in base 2 (see its docstring).
    """
    m, l, acc = state
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))  # m' = max(m, rowmax(S)): (..., n, 1)
    # A row that has seen no visible key yet has m' = -inf; shift it by 0 instead, so that
    # exp(-inf - (-inf)) = NaN never happens (its P~ and alpha are then exactly 0).
    shift = m_new.masked_fill(m_new == _NEG_INF, 0.0)  # (..., n, 1)
    alpha = torch.exp(m - shift)  # e^(m - m'): rescales what was summed so far
    p = torch.exp(scores - shift)  # P~ = exp(S - m'): (..., n, nk)
    l_new = alpha * l + p.sum(dim=-1, keepdim=True)  # l' = e^(m - m') l + rowsum(P~)
    acc_new = alpha * acc + p @ v  # acc' = e^(m - m') acc + P~ V: (..., n, Dv)
    return SoftmaxState(m_new, l_new, acc_new)


def online_softmax_finalize(state: SoftmaxState, out: Optional[Tensor] = None,
                            lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Normalise once at the end: ``O = acc / l`` and ``lse = m + log l``.

    A row that saw no visible key (l = 0) gets a zero output and ``lse = -inf``.
    ``out`` (..., n, Dv) and ``lse`` (..., n), when given, are written in place.

    Returns ``(out (..., n, Dv), lse (..., n))``.
    """
    m, l, acc = state
    safe_l = l.masked_fill(l == 0, 1.0)  # 0 / 1 = 0 for empty rows, never 0 / 0
    out = torch.div(acc, safe_l, out=out) if out is not None else acc / safe_l  # O = diag(l)^-1 acc
    log_l = torch.log(l)  # log 0 = -inf, so an empty row's lse is -inf
    lse_value = (m + log_l).squeeze(-1)  # L = m + log(l)
    if lse is not None:
        lse.copy_(lse_value)
        return out, lse
    return out, lse_value


# ----------------------------------------------------------------------------
# Tiles and causal skipping
# ----------------------------------------------------------------------------

def _tile_kind(i0: int, i1: int, j0: int, j1: int, causal: bool, offset: int) -> int:
    """SKIPPED, MASKED or FULL for queries [i0, i1) x keys [j0, j1); key j is visible to query
    i iff j <= i + offset (offset = Lk - Lq)."""
    if not causal:
        return FULL
    if j0 > (i1 - 1) + offset:  # even the last query cannot see the first key
        return SKIPPED
    if (j1 - 1) <= i0 + offset:  # even the first query sees the last key
        return FULL
    return MASKED


def tile_plan(Lq: int, Lk: Optional[int] = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, causal: bool = False) -> Tensor:
    """The (T_r, T_c) grid of tiles the forward visits: SKIPPED (0), MASKED (1) or FULL (2).

    ``T_r = ceil(Lq / block_q)`` query blocks by ``T_c = ceil(Lk / block_k)`` key blocks.
    Without ``causal`` every tile is FULL. With it, tiles above the diagonal are SKIPPED
    (never computed), tiles crossing it get the triangle mask (MASKED), the rest are FULL.
    """
    Lq = _check_length("Lq", Lq)
    Lk = Lq if Lk is None else _check_length("Lk", Lk)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    causal = _check_bool("causal", causal)
    rows = [[_tile_kind(i0, min(i0 + block_q, Lq), j0, min(j0 + block_k, Lk), causal, Lk - Lq)
             for j0 in range(0, Lk, block_k)] for i0 in range(0, Lq, block_q)]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -(-Lk // block_k))


class _Tiles:
    """Per-call helpers for the tile loops: a flat scratch buffer viewed as contiguous tiles,
    the causal triangles of the diagonal tiles (made once per distinct offset, then reused)
    and the user's mask, inverted once when boolean."""

    def __init__(self, like: Tensor, BH: int, bq: int, bk: int, offset: int,
                 mask: Optional[Tensor], B: int, H: int, n_buffers: int = 1):
        self.bufs = [like.new_empty(BH * bq * bk) for _ in range(n_buffers)]  # (B H, B_r, B_c) each
        self.BH, self.offset, self.B, self.H = BH, offset, B, H
        self.triangles = {}
        self.hide = None if mask is None or mask.dtype != torch.bool else ~mask  # True = hidden
        self.add = None if mask is None or mask.dtype == torch.bool else mask  # additive

    def view(self, index: int, n: int, nk: int) -> Tensor:
        """Buffer ``index`` as a contiguous (B H, n, nk) tile (the last tiles are smaller)."""
        return self.bufs[index][: self.BH * n * nk].view(self.BH, n, nk)

    def triangle(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """(n, nk) boolean, True where key j is in query i's future (j > i + offset)."""
        key = (i0 - j0, i1 - i0, j1 - j0)  # the triangle depends on i0 - j0 and the tile's size
        tri = self.triangles.get(key)
        if tri is None:
            i = torch.arange(i0, i1, device=self.bufs[0].device)[:, None]  # (n, 1) query positions
            j = torch.arange(j0, j1, device=self.bufs[0].device)[None, :]  # (1, nk) key positions
            tri = self.triangles[key] = j > i + self.offset  # (n, nk)
        return tri

    def scores(self, s: Tensor, q_i: Tensor, kT_j: Tensor, alpha: float, kind: int,
               i0: int, i1: int, j0: int, j1: int, mask_factor: float = 1.0) -> Tensor:
        """``s = alpha Q_i K_j^T`` into the tile ``s`` (B H, n, nk), then the causal triangle and
        the user's mask (an additive mask is multiplied by ``mask_factor``)."""
        torch.baddbmm(s, q_i, kT_j, beta=0.0, alpha=alpha, out=s)  # S_ij = alpha Q_i K_j^T
        if kind == MASKED:
            s.masked_fill_(self.triangle(i0, i1, j0, j1), _NEG_INF)  # the future: -inf
        if self.hide is not None or self.add is not None:
            s4 = s.view(self.B, self.H, i1 - i0, j1 - j0)
            if self.hide is not None:
                s4.masked_fill_(_mask_tile(self.hide, i0, i1, j0, j1), _NEG_INF)  # hidden: -inf
            else:
                s4.add_(_mask_tile(self.add, i0, i1, j0, j1), alpha=mask_factor)  # + mask
        return s


def _mask_tile(mask: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Queries [i0, i1) x keys [j0, j1) of a 4-D mask; a dimension of size 1 stays broadcast."""
    rows = slice(None) if mask.shape[2] == 1 else slice(i0, i1)
    cols = slice(None) if mask.shape[3] == 1 else slice(j0, j1)
    return mask[:, :, rows, cols]  # (b, h, n or 1, nk or 1)


# ----------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------

def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, block_q: Optional[int] = None,
                            block_k: int = DEFAULT_BLOCK_K, causal: bool = False,
                            scale: Optional[float] = None,
                            mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact attention in tiles, FlashAttention-2's loop order (query blocks outside).

    Args:
        q: (B, H, Lq, D). k: (B, H, Lk, D). v: (B, H, Lk, Dv).
        block_q: B_r, query rows per tile (>= 1); None picks :func:`auto_block_q` (256 at
            long lengths). block_k: B_c, key rows per tile (>= 1). Lengths need not be
            multiples of them (the last tile is smaller).
        causal: hide the future (key j visible to query i iff j <= i + Lk - Lq); tiles
            entirely in the future are skipped, tiles on the diagonal are masked.
        scale: multiplies the dot products; default 1/sqrt(D).
        mask: boolean (True = attend) or additive float, broadcastable to (B, H, Lq, Lk).

    Returns:
        ``(out (B, H, Lq, Dv), lse (B, H, Lq))``: the attention output and the natural
        log-sum-exp of each row's scaled scores (``-inf`` for a row with no visible key).
        No autograd history: :func:`flash_attention` is the differentiable call.

    The inner loop is :func:`online_softmax_update` done in place in **base 2**, as the
    papers' CUDA kernels do it: ``exp(x) = 2^(x log2 e)``, so the scores are computed as
    ``(scale log2 e) Q_i K_j^T`` (the factor folded into the matrix product) and every
    ``exp`` becomes ``exp2``, which is about 3x cheaper on a CPU with AVX-512. The running
    max ``m`` is then in base-2 units; ``lse = (m + log2 l) ln 2`` at the end. The result is
    the same function; only float rounding differs (about 1e-7 in float32).

    Per tile, nothing is allocated: the tile of scores lives in one reused buffer, the row
    statistics in preallocated (B H, B_r, 1) buffers, and ``P~ V`` is accumulated with
    ``torch.baddbmm(acc, P~, V_j, out=acc)`` (an ``out=`` call, not ``baddbmm_``, so that
    ``FlopCounterMode`` counts it). Memory: the output, the log-sum-exp, one (B H, B_r, B_c)
    tile and the state of one query block: linear in Lq, constant in Lk. float16/bfloat16
    inputs are computed in float32 (the state of the papers' kernels is float32 too) and
    returned in their dtype.
    """
    block_q, block_k, causal, scale, mask = _prepare(q, k, v, block_q, block_k, causal, scale, mask)
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    dtype = _compute_dtype(q.dtype)
    if Lq == 0 or Lk == 0:  # nothing to attend to: zeros and lse = -inf
        return (q.new_zeros(B, H, Lq, Dv), q.new_full((B, H, Lq), _NEG_INF, dtype=dtype))
    with torch.no_grad():
        big = q.device.type == "cpu" and B * H * Lq * Lk >= _PARALLEL_SCORES  # threads: CPU only
        workers = _workers(-(-Lq // min(block_q, Lq))) if big else 1
        if workers > 1:
            out, lse = _forward_fa2_parallel(q, k, v, block_q, block_k, causal, scale, mask, dtype, workers)
        else:
            out, lse = _forward_fa2(q, k, v, block_q, block_k, causal, scale, mask, dtype)
    return out.view(B, H, Lq, Dv).to(q.dtype), lse.view(B, H, Lq)


#: Below this many scores (B H Lq Lk) the forward stays in the calling thread: starting threads
#: costs about 0.1 ms, a tenth of SDPA's time at L = 256 (B=1, H=8, D=64).
_PARALLEL_SCORES = 2**22


def _workers(n_blocks: int) -> int:
    """How many threads share the query blocks: torch.get_num_threads(), at most one per block,
    and 1 while a TorchDispatchMode or TorchFunctionMode is active (modes are per thread, so
    FlopCounterMode or :func:`peak_memory` would not see the work of other threads)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return 1
    return max(1, min(torch.get_num_threads(), n_blocks))


def _forward_fa2_parallel(q, k, v, block_q, block_k, causal, scale, mask, dtype, workers):
    """FlashAttention-2's parallelism over query blocks, on a CPU: deal the query blocks to
    ``workers`` threads in turn (0, w, 2w, ... to the first; interleaved, so causal rows of
    different lengths balance out), each running its tiles with one intra-op thread.

    Each query block has its own state and writes its own rows of the output, so the threads
    share nothing but the inputs. PyTorch operations release the GIL, so the threads run in
    parallel. Why not let every operation use all threads? Then every one of the ~10 operations
    per tile is a fork-join across the threads: on a shared machine, one preempted thread stalls
    each of them, while here it only slows its own blocks (measured on a loaded 2-core machine at
    L = 4096: 7x SDPA's time with per-operation threads, 1.2x with this).
    """
    import threading

    B, H, Lq, _ = q.shape
    Dv = v.shape[3]
    out = q.new_empty(B * H, Lq, Dv, dtype=dtype)  # every thread writes its own query blocks
    lse = q.new_empty(B * H, Lq, 1, dtype=dtype)
    starts = list(range(0, Lq, min(block_q, Lq)))
    inference = torch.is_inference_mode_enabled()  # grad and inference modes are per thread
    threads_before = torch.get_num_threads()
    errors = []

    def work(w):
        try:
            torch.set_num_threads(1)  # this thread only: its operations run single-threaded
            with torch.inference_mode(inference), torch.no_grad():
                _forward_fa2(q, k, v, block_q, block_k, causal, scale, mask, dtype,
                             starts=starts[w::workers], out=out, lse=lse)
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(threads_before)  # the setting new threads inherit
    if errors:
        raise errors[0]
    return out, lse


def _forward_fa2(q, k, v, block_q, block_k, causal, scale, mask, dtype, starts=None, out=None,
                 lse=None):
    """The loops of :func:`flash_attention_forward` (checked inputs, no autograd); ``starts``:
    only the query blocks starting there (into the given ``out`` and ``lse``)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    q3, k3, v3 = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)  # (BH, L, D)
    kT = k3.transpose(1, 2)  # (BH, D, Lk): K^T, a view
    BH, offset = B * H, Lk - Lq
    bq, bk = min(block_q, Lq), min(block_k, Lk)
    tiles = _Tiles(q3, BH, bq, bk, offset, mask, B, H)  # the one (B_r, B_c) tile, reused
    out = q3.new_empty(BH, Lq, Dv) if out is None else out  # O, written once per query block
    lse = q3.new_empty(BH, Lq, 1) if lse is None else lse  # L = m + log l, kept for the backward
    # The state of one query block, in fast memory for the whole inner loop; the row
    # statistics get two buffers each so that old and new values can be swapped, not copied.
    acc_buf = q3.new_empty(BH * bq * Dv)  # O~_i, unnormalised
    rows = [q3.new_empty(BH * bq) for _ in range(5)]  # m, m', shift, alpha, rowsum
    l_buf = q3.new_empty(BH * bq)
    alpha_s = scale * _LOG2E  # scores in base 2: S2 = (scale log2 e) Q K^T
    for i0 in range(0, Lq, bq) if starts is None else starts:  # outer loop: query blocks Q_i
        i1 = min(i0 + bq, Lq)
        n = i1 - i0
        q_i = q3[:, i0:i1]  # (BH, n, D)
        m, m_new, shift, alpha, rowsum = (r[: BH * n].view(BH, n, 1) for r in rows)
        l = l_buf[: BH * n].view(BH, n, 1).zero_()  # l_i = 0
        acc = acc_buf[: BH * n * Dv].view(BH, n, Dv).zero_()  # O~_i = 0
        m.fill_(_NEG_INF)  # m_i = -inf
        for j0 in range(0, Lk, bk):  # inner loop: key blocks K_j, V_j
            j1 = min(j0 + bk, Lk)
            kind = _tile_kind(i0, i1, j0, j1, causal, offset)
            if kind == SKIPPED:  # causal: this and every later key block is in the future
                break
            s = tiles.scores(tiles.view(0, n, j1 - j0), q_i, kT[:, :, j0:j1], alpha_s, kind,
                             i0, i1, j0, j1, mask_factor=_LOG2E)  # S_ij log2 e: (BH, n, nk)
            torch.amax(s, dim=-1, keepdim=True, out=m_new)  # rowmax(S_ij)
            torch.maximum(m_new, m, out=m_new)  # m' = max(m, rowmax(S_ij))
            torch.nan_to_num(m_new, neginf=0.0, out=shift)  # no key seen yet: shift by 0, not -inf
            torch.sub(m, shift, out=alpha).exp2_()  # alpha = 2^(m - m'): rescales the past
            m, m_new = m_new, m  # m <- m' (swap the buffers)
            p = s.sub_(shift).exp2_()  # P~ = 2^(S - m'), written over the scores
            torch.sum(p, dim=-1, keepdim=True, out=rowsum)
            torch.addcmul(rowsum, l, alpha, out=l)  # l' = alpha l + rowsum(P~)
            acc.mul_(alpha)  # alpha O~ ...
            torch.baddbmm(acc, p, v3[:, j0:j1], out=acc)  # ... + P~ V_j: O~' in place
        # Finalise once per query block (FA-2): O_i = O~ / l, L_i = (m + log2 l) ln 2.
        empty = l == 0  # rows that saw no visible key: output 0, lse -inf
        torch.div(acc, l.masked_fill(empty, 1.0), out=out[:, i0:i1])
        torch.mul(m.add(torch.log2(l)), _LN2, out=lse[:, i0:i1])  # log 0 = -inf for empty rows
    return out, lse


def flash_attention_forward_fa1(q: Tensor, k: Tensor, v: Tensor, block_q: Optional[int] = None,
                                block_k: int = DEFAULT_BLOCK_K, causal: bool = False,
                                scale: Optional[float] = None,
                                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The same attention in FlashAttention-1's loop order (Algorithm 1 of arXiv:2205.14135).

    Key blocks outside, query blocks inside: the state ``(O, l, m)`` of *all* queries lives in
    full-length buffers (HBM) and is read and written back for every key block, and ``O`` is
    kept normalised at every step::

        m~ = rowmax(S_ij), P~ = exp(S_ij - m~), l~ = rowsum(P~)
        m_new = max(m_i, m~),  l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~
        O_i  <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j)

    Same arguments and result as :func:`flash_attention_forward`; more non-matmul work per
    tile (the lecture times both).
    """
    block_q, block_k, causal, scale, mask = _prepare(q, k, v, block_q, block_k, causal, scale, mask)
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    dtype = _compute_dtype(q.dtype)
    if Lq == 0 or Lk == 0:
        return (q.new_zeros(B, H, Lq, Dv), q.new_full((B, H, Lq), _NEG_INF, dtype=dtype))
    with torch.no_grad():
        out, lse = _forward_fa1(q, k, v, block_q, block_k, causal, scale, mask, dtype)
    return out.view(B, H, Lq, Dv).to(q.dtype), lse.view(B, H, Lq)


def _forward_fa1(q, k, v, block_q, block_k, causal, scale, mask, dtype):
    """The loops of :func:`flash_attention_forward_fa1` (checked inputs, no autograd)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    q3, k3, v3 = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    kT = k3.transpose(1, 2)  # (BH, D, Lk)
    BH, offset = B * H, Lk - Lq
    bq, bk = min(block_q, Lq), min(block_k, Lk)
    out = q3.new_zeros(BH, Lq, Dv)  # O = 0 (in HBM)
    l_all = q3.new_zeros(BH, Lq, 1)  # l = 0
    m_all = q3.new_full((BH, Lq, 1), _NEG_INF)  # m = -inf
    tiles = _Tiles(q3, BH, bq, bk, offset, mask, B, H)
    for j0 in range(0, Lk, bk):  # outer loop: key blocks K_j, V_j (loaded once)
        j1 = min(j0 + bk, Lk)
        kT_j, v_j = kT[:, :, j0:j1], v3[:, j0:j1]
        for i0 in range(0, Lq, bq):  # inner loop: query blocks, state read from and written to HBM
            i1 = min(i0 + bq, Lq)
            kind = _tile_kind(i0, i1, j0, j1, causal, offset)
            if kind == SKIPPED:
                continue
            o_i, l_i, m_i = out[:, i0:i1], l_all[:, i0:i1], m_all[:, i0:i1]
            s = tiles.scores(tiles.view(0, i1 - i0, j1 - j0), q3[:, i0:i1], kT_j, scale, kind,
                             i0, i1, j0, j1)  # S_ij: (BH, n, nk)
            m_t = s.amax(dim=-1, keepdim=True)  # m~ = rowmax(S_ij)
            p = s.sub_(m_t.masked_fill(m_t == _NEG_INF, 0.0)).exp_()  # P~ = exp(S - m~)
            l_t = p.sum(dim=-1, keepdim=True)  # l~ = rowsum(P~)
            m_new = torch.maximum(m_i, m_t)
            shift = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            a = torch.exp(m_i - shift)  # e^(m_i - m_new)
            b = torch.exp(m_t - shift)  # e^(m~ - m_new)
            l_new = a * l_i + b * l_t  # l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~
            new_o = (l_i * a) * o_i + b * (p @ v_j)  # diag(l_i) e^(..) O_i + e^(..) P~ V_j
            o_i.copy_(new_o / l_new.masked_fill(l_new == 0, 1.0))  # diag(l_new)^-1 (...): to HBM
            l_i.copy_(l_new)
            m_i.copy_(m_new)
    return out, m_all + torch.log(l_all)  # O and L = m + log l


# ----------------------------------------------------------------------------
# Backward pass
# ----------------------------------------------------------------------------

def flash_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             dout: Tensor, block_q: Optional[int] = None,
                             block_k: int = DEFAULT_BLOCK_K, causal: bool = False,
                             scale: Optional[float] = None,
                             mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention, recomputing each tile of P from the saved log-sum-exp.

    FlashAttention-2's Algorithm 2: key blocks outside (dK_j and dV_j accumulate in fast
    memory), query blocks inside (dQ_i accumulates in place). Nothing of size (Lq, Lk) is
    stored or was saved by the forward.

    Args:
        q, k, v: the forward's inputs, (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv).
        out: (B, H, Lq, Dv) and lse: (B, H, Lq), the forward's results.
        dout: (B, H, Lq, Dv), the gradient of the loss with respect to ``out``.
        block_q, block_k, causal, scale, mask: as in the forward.

    Returns ``(dq, dk, dv)`` shaped like q, k, v.
    """
    block_q, block_k, causal, scale, mask = _prepare(q, k, v, block_q, block_k, causal, scale, mask)
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    for name, t, shape in (("out", out, (B, H, Lq, Dv)), ("dout", dout, (B, H, Lq, Dv)),
                           ("lse", lse, (B, H, Lq))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match q {_shape(q)} and v "
                             f"{_shape(v)}; got {_shape(t) if isinstance(t, Tensor) else t!r}")
    dtype = _compute_dtype(q.dtype)
    if Lq == 0 or Lk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.no_grad():
        dq, dk, dv = _backward(q, k, v, out, lse, dout, block_q, block_k, causal, scale, mask, dtype)
    return (dq.view(B, H, Lq, D).to(q.dtype), dk.view(B, H, Lk, D).to(k.dtype),
            dv.view(B, H, Lk, Dv).to(v.dtype))


def _backward(q, k, v, out, lse, dout, block_q, block_k, causal, scale, mask, dtype):
    """The loops of :func:`flash_attention_backward` (checked inputs, no autograd)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    q3, k3, v3 = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    o3, do3 = _flat(out, dtype), _flat(dout, dtype)  # (BH, Lq, Dv)
    BH, offset = B * H, Lk - Lq
    # P is recomputed in base 2 like the forward: P = 2^(S log2 e - L log2 e).
    # A row with no visible key has lse = -inf; use +inf so that P = 0 there.
    lse2 = lse.to(dtype).reshape(BH, Lq, 1) * _LOG2E
    lse2 = lse2.masked_fill(lse2 == _NEG_INF, float("inf"))  # (BH, Lq, 1)
    delta = (do3 * o3).sum(dim=-1, keepdim=True)  # D_i = rowsum(dO_i * O_i): (BH, Lq, 1)
    bq, bk = min(block_q, Lq), min(block_k, Lk)
    dq = torch.zeros_like(q3)  # (BH, Lq, D), accumulated over key blocks
    dk = q3.new_empty(BH, Lk, D)
    dv = q3.new_empty(BH, Lk, Dv)
    tiles = _Tiles(q3, BH, bq, bk, offset, mask, B, H, n_buffers=2)  # P_ij and dP_ij / dS_ij
    dk_acc = q3.new_empty(BH * bk * D)  # dK_j, in fast memory for the whole inner loop
    dv_acc = q3.new_empty(BH * bk * Dv)  # dV_j
    kT = k3.transpose(1, 2)  # (BH, D, Lk)
    for j0 in range(0, Lk, bk):  # outer loop: key blocks
        j1 = min(j0 + bk, Lk)
        nk = j1 - j0
        k_j, v_j = k3[:, j0:j1], v3[:, j0:j1]  # (BH, nk, D), (BH, nk, Dv)
        dk_j = dk_acc[: BH * nk * D].view(BH, nk, D).zero_()
        dv_j = dv_acc[: BH * nk * Dv].view(BH, nk, Dv).zero_()
        for i0 in range(0, Lq, bq):  # inner loop: query blocks
            i1 = min(i0 + bq, Lq)
            n = i1 - i0
            kind = _tile_kind(i0, i1, j0, j1, causal, offset)
            if kind == SKIPPED:
                continue
            q_i, do_i = q3[:, i0:i1], do3[:, i0:i1]  # (BH, n, D), (BH, n, Dv)
            p = tiles.scores(tiles.view(0, n, nk), q_i, kT[:, :, j0:j1], scale * _LOG2E, kind,
                             i0, i1, j0, j1, mask_factor=_LOG2E)  # S_ij log2 e
            p.sub_(lse2[:, i0:i1]).exp2_()  # P_ij = exp(S_ij - L_i): recomputed, not stored
            torch.baddbmm(dv_j, p.transpose(1, 2), do_i, out=dv_j)  # dV_j += P_ij^T dO_i
            dp = torch.bmm(do_i, v_j.transpose(1, 2), out=tiles.view(1, n, nk))  # dP_ij = dO_i V_j^T
            ds = dp.sub_(delta[:, i0:i1]).mul_(p)  # dS_ij = P_ij * (dP_ij - D_i)
            dq_i = dq[:, i0:i1]
            torch.baddbmm(dq_i, ds, k_j, alpha=scale, out=dq_i)  # dQ_i += scale dS_ij K_j
            torch.baddbmm(dk_j, ds.transpose(1, 2), q_i, alpha=scale, out=dk_j)  # dK_j += scale dS_ij^T Q_i
        dk[:, j0:j1] = dk_j
        dv[:, j0:j1] = dv_j
    return dq, dk, dv


def backward_tile(q_i: Tensor, k_j: Tensor, v_j: Tensor, dout_i: Tensor, lse_i: Tensor,
                  delta_i: Tensor, scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradient contributions of one (query block i, key block j) tile, recomputed from lse.

    The body of :func:`flash_attention_backward`'s inner loop, readable and without a mask::

        P_ij  = exp(scale Q_i K_j^T - L_i)      the forward's weights, recomputed
        dV_j += P_ij^T dO_i
        dP_ij = dO_i V_j^T
        dS_ij = P_ij * (dP_ij - D_i)            D_i = rowsum(dO_i * O_i), computed once
        dQ_i += scale dS_ij K_j
        dK_j += scale dS_ij^T Q_i

    Args:
        q_i: (..., n, D). k_j: (..., nk, D). v_j: (..., nk, Dv). dout_i: (..., n, Dv).
        lse_i, delta_i: (..., n), the forward's log-sum-exp and rowsum(dO_i * O_i).
        scale: default 1/sqrt(D).

    Returns ``(dq_i (..., n, D), dk_j (..., nk, D), dv_j (..., nk, Dv))``: this tile's terms
    of the sums; the gradients are their sums over the other index.
    """
    scale = 1.0 / math.sqrt(q_i.shape[-1]) if scale is None else float(scale)
    p = torch.exp(scale * q_i @ k_j.transpose(-2, -1) - lse_i[..., None])  # P_ij: (..., n, nk)
    dv = p.transpose(-2, -1) @ dout_i  # P_ij^T dO_i: (..., nk, Dv)
    dp = dout_i @ v_j.transpose(-2, -1)  # dP_ij = dO_i V_j^T: (..., n, nk)
    ds = p * (dp - delta_i[..., None])  # dS_ij = P_ij * (dP_ij - D_i)
    return scale * ds @ k_j, scale * ds.transpose(-2, -1) @ q_i, dv  # dQ_i, dK_j, dV_j terms


class FlashAttention(torch.autograd.Function):
    """Exact attention with FlashAttention's forward and recomputing backward.

    ``FlashAttention.apply(q, k, v, mask, causal, scale, block_q, block_k) -> (out, lse)``.
    Saves q, k, v, out and lse (linear in L) for the backward, never the (Lq, Lk) weights.
    ``lse`` is not differentiable. Use :func:`flash_attention` for keyword arguments.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block_q, block_k):
        out, lse = flash_attention_forward(q, k, v, block_q, block_k, causal, scale, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.block_q, ctx.block_k = causal, scale, block_q, block_k
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, dout, ctx.block_q, ctx.block_k,
                                              ctx.causal, ctx.scale, mask)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    block_q: Optional[int] = None, block_k: int = DEFAULT_BLOCK_K,
                    scale: Optional[float] = None, mask: Optional[Tensor] = None,
                    return_lse: bool = False):
    """Exact attention, FlashAttention-style: tiled forward, recomputing backward.

    The same result as ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
    is_causal=causal, scale=scale)`` (for ``Lq != Lk`` the causal mask is aligned to the last
    keys, like :func:`~transformer_lab.attention.causal_mask`), with gradients.

    Args:
        q: (B, H, Lq, D). k: (B, H, Lk, D). v: (B, H, Lk, Dv).
        causal, block_q, block_k, scale, mask: see :func:`flash_attention_forward`.
        return_lse: also return the log-sum-exp (B, H, Lq) (no gradient).

    Returns out (B, H, Lq, Dv), or ``(out, lse)``.
    """
    return_lse = _check_bool("return_lse", return_lse)
    _prepare(q, k, v, block_q, block_k, causal, scale, mask)  # errors before autograd sees them
    out, lse = FlashAttention.apply(q, k, v, mask, causal, scale, block_q, block_k)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------
# The common mistake: query block i sees key block i only
# ----------------------------------------------------------------------------

def block_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int,
                             scale: Optional[float] = None) -> Tensor:
    """WRONG as FlashAttention: the loop of a widely shared tutorial, kept for the lecture.

    ``for i in blocks: out_i = softmax(scale Q_i K_i^T) V_i``: query block i attends to key
    block i only, with an ordinary softmax and no state carried across blocks. That is exact
    attention under :func:`block_diagonal_mask` (block-diagonal local attention), not exact
    attention; compare it with :func:`flash_attention` to measure the error.

    Args: q, k: (B, H, L, D), v: (B, H, L, Dv) with one length L; block_size >= 1.
    Returns (B, H, L, Dv).
    """
    _check_qkv(q, k, v)
    block_size = _check_block("block_size", block_size)
    _check_scale(scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError("block-diagonal attention cuts queries and keys at the same places, so "
                         f"it needs Lq == Lk; got q {_shape(q)} and k {_shape(k)}")
    L = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])  # (B, H, L, Dv)
    for i0 in range(0, L, block_size):  # one block of queries ...
        i1 = min(i0 + block_size, L)
        scores = q[:, :, i0:i1] @ k[:, :, i0:i1].transpose(-2, -1) * scale  # ... and ONLY key block i
        out[:, :, i0:i1] = torch.softmax(scores, dim=-1) @ v[:, :, i0:i1]  # no state carried over
    return out


def block_diagonal_mask(L: int, block_size: int, device=None) -> Tensor:
    """Boolean (L, L) mask, True where query i and key j lie in the same block of ``block_size``."""
    L = _check_length("L", L)
    block_size = _check_block("block_size", block_size)
    blocks = torch.arange(L, device=device) // block_size  # (L,) block of each position
    return blocks[:, None] == blocks[None, :]  # (L, L)


# ----------------------------------------------------------------------------
# Counting: FLOPs and memory traffic
# ----------------------------------------------------------------------------

def _visible_pairs(Lq: int, Lk: int, causal: bool) -> int:
    """Number of (query, key) pairs attended: Lq Lk, or with causal (j <= i + Lk - Lq)
    the last min(Lq, Lk) queries see Lk - n + 1, ..., Lk keys."""
    if not causal:
        return Lq * Lk
    n = min(Lq, Lk)
    return n * (Lk - n) + n * (n + 1) // 2


def attention_flops(Lq: int, D: int, Lk: Optional[int] = None, Dv: Optional[int] = None,
                    causal: bool = False, B: int = 1, H: int = 1) -> int:
    """Matrix-multiply FLOPs of exact attention: ``2 D`` for ``q . k`` plus ``2 Dv`` for
    ``p v``, per visible (query, key) pair, times B H.

    Dense attention: ``2 B H Lq Lk (D + Dv)``: quadratic in the length, whatever the
    implementation (FlashAttention computes every one of them, see :func:`flash_flops`).
    With ``causal`` only the visible pairs are counted (about half). The softmax's
    exponentials and sums (a few per pair) are not counted, as ``FlopCounterMode`` does not.
    """
    Lq, D = _check_length("Lq", Lq), _check_length("D", D)
    Lk = Lq if Lk is None else _check_length("Lk", Lk)
    Dv = D if Dv is None else _check_length("Dv", Dv)
    causal = _check_bool("causal", causal)
    B, H = _check_length("B", B), _check_length("H", H)
    return 2 * B * H * _visible_pairs(Lq, Lk, causal) * (D + Dv)


def flash_flops(Lq: int, D: int, Lk: Optional[int] = None, Dv: Optional[int] = None,
                causal: bool = False, block_q: int = DEFAULT_BLOCK_Q,
                block_k: int = DEFAULT_BLOCK_K, B: int = 1, H: int = 1) -> int:
    """Matrix-multiply FLOPs that :func:`flash_attention_forward` performs: ``2 n nk (D + Dv)``
    for every tile it visits (``B H`` times). Equal to :func:`attention_flops` without a
    causal mask; with one, the skipped tiles cost nothing and the diagonal tiles are computed
    whole (so slightly more than the visible pairs, much less than dense)."""
    Lq, D = _check_length("Lq", Lq), _check_length("D", D)
    Lk = Lq if Lk is None else _check_length("Lk", Lk)
    Dv = D if Dv is None else _check_length("Dv", Dv)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    causal = _check_bool("causal", causal)
    B, H = _check_length("B", B), _check_length("H", H)
    if Lq == 0 or Lk == 0:
        return 0
    bq, bk = min(block_q, Lq), min(block_k, Lk)
    pairs = 0
    for i0 in range(0, Lq, bq):
        i1 = min(i0 + bq, Lq)
        for j0 in range(0, Lk, bk):
            j1 = min(j0 + bk, Lk)
            if _tile_kind(i0, i1, j0, j1, causal, Lk - Lq) != SKIPPED:
                pairs += (i1 - i0) * (j1 - j0)
    return 2 * B * H * pairs * (D + Dv)


def memory_traffic(Lq: int, D: int, Lk: Optional[int] = None, Dv: Optional[int] = None,
                   block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                   algorithm: str = "fa2") -> int:
    """Elements moved between slow memory (HBM) and fast memory (SRAM) for one head.

    A counting model of the papers' algorithms (multiply by the element size for bytes,
    by B H for a batch). With ``T_r = ceil(Lq / block_q)`` and ``T_c = ceil(Lk / block_k)``:

    ``"standard"`` (Algorithm 0: S and P go through HBM)::

        (Lq + Lk) D + Lk Dv + Lq Dv + 4 Lq Lk       read Q, K; write S; read S, write P;
                                                     read P, V; write O
    ``"fa1"`` (key blocks outside; each query block's O, l, m read and written per key block)::

        Lk (D + Dv) + T_c Lq (D + 2 Dv + 4)
    ``"fa2"`` (query blocks outside; K, V streamed once per query block; O, lse written once)::

        Lq (D + Dv + 1) + T_r Lk (D + Dv)

    The standard count grows like Lq Lk whatever D is; the tiled ones like Lq Lk D / block.
    """
    Lq, D = _check_length("Lq", Lq), _check_length("D", D)
    Lk = Lq if Lk is None else _check_length("Lk", Lk)
    Dv = D if Dv is None else _check_length("Dv", Dv)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    Tr, Tc = -(-Lq // block_q), -(-Lk // block_k)
    if algorithm == "standard":
        return (Lq + Lk) * D + Lk * Dv + Lq * Dv + 4 * Lq * Lk
    if algorithm == "fa1":
        return Lk * (D + Dv) + Tc * Lq * (D + 2 * Dv + 4)
    if algorithm == "fa2":
        return Lq * (D + Dv + 1) + Tr * Lk * (D + Dv)
    raise ValueError(f"algorithm must be 'standard', 'fa1' or 'fa2'; got {algorithm!r}")


# ----------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------

class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created by the operations run under it, and
    the peak of their sum while they are alive (a weak reference tells when one is freed)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # unwrapped: the default wraps __torch_dispatch__ in torch._disable_dynamo, whose first
        # call imports torch._dynamo (~800 modules, seconds); nothing here is compiled
        return False

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref = StorageWeakRef
        self.live = {}  # data_ptr -> (weak ref to the storage, bytes)
        self.current = 0
        self.peak = 0

    def _sweep(self):
        dead = [ptr for ptr, (ref, _) in self.live.items() if ref.expired()]
        for ptr in dead:
            del self.live[ptr]
        self.current = sum(size for _, size in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        seen = set()
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor):
                seen.add(t.untyped_storage().data_ptr())  # inputs, out= buffers: not new
        self._sweep()
        for t in torch.utils._pytree.tree_leaves(result):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in seen or ptr in self.live:  # a view or an in-place result
                continue
            self.live[ptr] = (self._ref(storage), size)
            self.current += size
        self.peak = max(self.peak, self.current)
        return result


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor storage (in elements) created by the operations run under it."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # unwrapped: the default wraps __torch_dispatch__ in torch._disable_dynamo, whose first
        # call imports torch._dynamo (~800 modules, seconds); nothing here is compiled
        return False

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.shape = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, Tensor)}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)  # a view counts its storage
                if n > self.elements:
                    self.elements, self.shape = n, tuple(t.shape)
        return result


def largest_allocation(fn: Callable[[], object]) -> Tuple[object, int, tuple]:
    """Run ``fn()``; return ``(its result, the elements of the largest tensor it created, that
    tensor's shape)``. Views and in-place results create nothing. A tiled attention never
    creates an (Lq, Lk) tensor; dense attention does (the scores and the weights)."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments; got {type(fn).__name__}")
    with _LargestTensor() as mode:
        result = fn()
    return result, int(mode.elements), mode.shape


def _rss_status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024  # kB -> bytes
    return values


def peak_memory(fn: Callable[[], object], method: str = "tensors") -> int:
    """Peak bytes that ``fn()`` needs beyond what existed before it (its result included).

    Methods (see the module docstring, "Measuring memory"):

    * ``"tensors"`` (default, any device): the peak of the live tensor storages created by
      the operations inside ``fn``; deterministic, unaffected by other processes; does not
      see scratch space allocated inside a fused kernel.
    * ``"rss"`` (Linux, CPU): growth of the process's resident set at its high-water mark,
      as ``benchmarks/attention.py`` measures it: every page touched, with allocator noise.
    * ``"cuda"``: ``torch.cuda.max_memory_allocated()`` minus what was allocated before.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments; got {type(fn).__name__}")
    if method == "tensors":
        with _LiveTensorBytes() as counter:
            result = fn()
        del result
        return int(counter.peak)
    if method == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("method='cuda' needs a CUDA device; torch.cuda.is_available() is False")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return int(peak)
    if method == "rss":
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"method='rss' reads /proc/self/status (Linux); this is {sys.platform}")
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
        except (OSError, AttributeError):
            pass
        before = _rss_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark: VmHWM := VmRSS
        result = fn()
        peak = _rss_status()["VmHWM"] - before
        del result
        return max(int(peak), 0)
    raise ValueError(f"method must be 'tensors', 'rss' or 'cuda'; got {method!r}")

