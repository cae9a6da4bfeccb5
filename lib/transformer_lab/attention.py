r"""Scaled dot-product attention and multi-head attention.

Paper: Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762 (sections 3.2.1, 3.2.2).

Equations
---------
Scaled dot-product attention (eq. 1)::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

where ``M`` is 0 where a query may look at a key and ``-inf`` where it may not.

Multi-head attention (section 3.2.2)::

    MultiHead(X) = Concat(head_1, ..., head_h) W^O
    head_i       = Attention(X W_i^Q, X W_i^K, X W_i^V)

The h projections of size d_model -> d_k are stored side by side in one
``nn.Linear(d_model, 3 * d_model)`` whose weight rows are ``[W^Q; W^K; W^V]``,
the same layout as ``nn.MultiheadAttention.in_proj_weight``.

Shapes
------
Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``.

Glossary (variable -> paper symbol)
-----------------------------------
======================  ==============================================
``q, k, v``             Q, K, V, each ``(B, H, L, D)``
``B``                   batch size
``H`` / ``n_heads``     h, the number of heads
``Lq``, ``Lk``          number of queries, number of keys (= values)
``D`` / ``head_dim``    d_k = d_v = d_model / h
``d_model``             d_model
``scale``               1 / sqrt(d_k)
``scores``              Q K^T / sqrt(d_k), ``(B, H, Lq, Lk)``
``weights``             softmax(scores), each row sums to 1 (or is all 0)
``mask``                M: see "Masks" below
``bias``                an extra additive term on the scores (relative positions)
``qkv`` / ``out``       [W^Q; W^K; W^V] and W^O
======================  ==============================================

Masks: one convention in the whole library
------------------------------------------
* A **boolean** mask is ``True`` where attention is **allowed** ("keep"), exactly
  as in ``F.scaled_dot_product_attention``. (``nn.MultiheadAttention``'s boolean
  masks mean the opposite: True = hide. Convert with ``~mask``.)
* A **float** mask is **additive**: it is added to the scaled scores, and ``-inf``
  hides a key.
* A mask must broadcast to ``(B, H, Lq, Lk)``: ``(Lq, Lk)`` for a causal mask,
  ``(B, 1, 1, Lk)`` for padding (see :func:`causal_mask`, :func:`padding_mask`).
* A query row in which every key is hidden gets all-zero weights and a zero
  output, never NaN.

Key/value prefixes (prefix tuning)
----------------------------------
``MultiHeadAttention(x, kv_prefix=(prefix_k, prefix_v))`` puts ``P`` extra keys and
values in front of the ones projected from the input (Li & Liang 2021, "Prefix-Tuning",
arXiv:2101.00190)::

    K' = [K_p; X W^K],   V' = [V_p; X W^V]        (P + Lk rows; lecture 04 writes P as L_p)

Every query may attend to every prefix position: :func:`prepend_kv_prefix` widens the
mask with ``True`` (bool) or ``0`` (additive) columns and a position bias with zeros,
so a prefix carries no position and a causal or padding mask still applies to the real
keys. Rotary positions rotate the real queries and keys before the prefix is put in
front (a prefix key is used as it is, like a key at position 0).

Additive (Bahdanau) attention
-----------------------------
Bahdanau, Cho & Bengio 2014, "Neural Machine Translation by Jointly Learning to Align and
Translate", arXiv:1409.0473 (appendix A.1.2), scores a query against a key with a one-layer
network instead of a dot product (vectors are rows, as everywhere here)::

    score(q_i, k_j) = tanh(q_i W_a^q + k_j W_a^k) w_a        W_a^q: (D_q, d_a), W_a^k: (D_k, d_a), w_a: (d_a,)

:func:`additive_scores` computes these ``(B, H, Lq, Lk)`` scores and
:func:`additive_attention` puts them through the same :func:`masked_softmax` and
weighted sum as dot-product attention. ``D_q`` may differ from ``D_k``; the price is a
``(B, H, Lq, Lk, d_a)`` intermediate and a ``tanh`` per entry instead of one matrix product.

Two implementations side by side
--------------------------------
:func:`scaled_dot_product_attention` is the readable version: every step is a
line you can print. :func:`fast_attention` computes the same thing with
PyTorch's fused ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels where available). The tests check that they agree.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "attention_scores",
    "masked_softmax",
    "scaled_dot_product_attention",
    "fast_attention",
    "causal_mask",
    "padding_mask",
    "split_heads",
    "merge_heads",
    "prepend_kv_prefix",
    "additive_scores",
    "additive_attention",
    "MultiHeadAttention",
]


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t, rank: Optional[int] = None, layout: str = "") -> None:
    """Raise TypeError/ValueError unless ``t`` is a floating-point tensor of the given rank."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}; got shape {_shape(t)}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    layout = "(batch, heads, seq, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, layout)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim (last dim); got q {_shape(q)} and k {_shape(k)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            "k and v must agree in (batch, heads, seq); "
            f"got k {_shape(k)} and v {_shape(v)}"
        )
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            "q and k must agree in (batch, heads); "
            f"got q {_shape(q)} and k {_shape(k)}"
        )


def _check_mask(name: str, mask: Tensor, target: Sequence[int]) -> None:
    """A mask must be bool or float and broadcast to ``target`` = (B, H, Lq, Lk)."""
    target = tuple(target)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} must be boolean (True = attend) or floating-point (additive); got {mask.dtype}"
        )
    # broadcasting to target, written out: torch.broadcast_shapes would import sympy on its first
    # call (about 1 s, once per process: every notebook and every grading process paid it)
    shape = tuple(mask.shape)
    ok = len(shape) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(shape), reversed(target), strict=False))
    if not ok:
        raise ValueError(f"{name} must broadcast to {target}; got {_shape(mask)}")


def _check_scale(scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None; got {type(scale).__name__}")


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def causal_mask(Lq: int, Lk: Optional[int] = None, device=None) -> Tensor:
    """Boolean ``(Lq, Lk)`` mask, True where key j may be seen by query i: ``j <= i + (Lk - Lq)``.

    With ``Lk > Lq`` the queries are taken to be the *last* Lq positions of the
    key sequence (a query block at the end of a longer context, as with a cache).
    """
    Lk = Lq if Lk is None else Lk
    if Lq < 0 or Lk < 0:
        raise ValueError(f"lengths must be non-negative; got Lq={Lq}, Lk={Lk}")
    i = torch.arange(Lq, device=device)[:, None]  # (Lq, 1) query positions
    j = torch.arange(Lk, device=device)[None, :]  # (1, Lk) key positions
    return j <= i + (Lk - Lq)  # (Lq, Lk)


def padding_mask(lengths: Union[Tensor, Sequence[int]], max_len: Optional[int] = None) -> Tensor:
    """Boolean ``(B, 1, 1, Lk)`` mask, True on the first ``lengths[b]`` (real) tokens of row b."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor (batch,); got shape {_shape(lengths)}, "
            f"dtype {lengths.dtype}"
        )
    longest = int(lengths.max()) if lengths.numel() else 0
    max_len = longest if max_len is None else max_len
    if longest > max_len or (lengths.numel() and int(lengths.min()) < 0):
        raise ValueError(
            f"lengths must lie in [0, max_len={max_len}]; got min {int(lengths.min())}, max {longest}"
        )
    positions = torch.arange(max_len, device=lengths.device)  # (Lk,)
    keep = positions[None, :] < lengths[:, None]  # (B, Lk)
    return keep[:, None, None, :]  # (B, 1, 1, Lk)


# ----------------------------------------------------------------------------
# Readable attention, one step per function
# ----------------------------------------------------------------------------

def attention_scores(q: Tensor, k: Tensor, scale: Optional[float] = None) -> Tensor:
    """Scaled scores ``q @ k^T * scale``: (B, H, Lq, D), (B, H, Lk, D) -> (B, H, Lq, Lk).

    ``scale`` defaults to ``1 / sqrt(D)`` (Vaswani et al. section 3.2.1: without it
    the dot products grow like sqrt(D) and the softmax saturates).
    """
    _check_qkv(q, k, k)
    _check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1)) * scale  # Q K^T / sqrt(d_k): (B, H, Lq, Lk)


def masked_softmax(scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Softmax over the last dim (keys) with a mask; fully masked rows give all-zero weights.

    ``mask``: boolean (True = keep) or additive float, broadcastable to ``scores``.
    A boolean mask is the same as an additive one with 0 where True, -inf where False.
    """
    _check_tensor("scores", scores)
    if mask is not None:
        _check_mask("mask", mask, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # hide: score -> -inf
        else:
            scores = scores + mask.to(scores.dtype)  # additive mask
    # A row whose keys are all hidden would be softmax([-inf, ..., -inf]) = 0/0 = NaN.
    # Give it zeros instead, and keep NaN out of the backward pass too.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., Lq, 1)
    scores = scores.masked_fill(empty, 0.0)
    weights = torch.softmax(scores, dim=-1)  # exp(s_ij) / sum_j exp(s_ij)
    return weights.masked_fill(empty, 0.0)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    bias: Optional[Tensor] = None,
):
    """The readable attention: ``softmax(q k^T * scale + bias, mask) @ v``.

    Args:
        q: (B, H, Lq, D) queries. k: (B, H, Lk, D) keys. v: (B, H, Lk, Dv) values.
        mask: boolean (True = attend) or additive float, broadcastable to (B, H, Lq, Lk).
        scale: multiplies the dot products; default 1/sqrt(D).
        dropout_p: dropout on the attention weights (applied whenever > 0, like
            ``F.scaled_dot_product_attention``; modules pass 0 in eval mode).
        need_weights: also return the attention weights (before dropout).
        bias: extra additive float term on the scaled scores, broadcastable to
            (B, H, Lq, Lk) (relative position schemes).

    Returns:
        out (B, H, Lq, Dv), or ``(out, weights (B, H, Lq, Lk))`` when ``need_weights``.
    """
    _check_qkv(q, k, v)
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # (B, H, Lq, Lk)
    if bias is not None:
        _check_tensor("bias", bias)
        _check_mask("bias", bias, target)
    scores = attention_scores(q, k, scale)  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)  # + positional bias
    weights = masked_softmax(scores, mask)  # (B, H, Lq, Lk)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ v  # sum_j w_ij v_j: (B, H, Lq, Dv)
    return (out, weights) if need_weights else out


# ----------------------------------------------------------------------------
# Additive (Bahdanau) attention
# ----------------------------------------------------------------------------

def _check_additive(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, w_a: Tensor) -> None:
    layout = "(batch, heads, seq, dim)"
    for name, t in (("q", q), ("k", k)):
        _check_tensor(name, t, 4, layout)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must agree in (batch, heads); got q {_shape(q)} and k {_shape(k)}")
    _check_tensor("w_a", w_a, 1, "(d_a,)")
    d_a = w_a.shape[0]
    for name, w, t in (("w_q", w_q, q), ("w_k", w_k, k)):
        _check_tensor(name, w, 2, "(in, d_a)")
        if w.shape != (t.shape[-1], d_a):
            raise ValueError(
                f"{name} must be ({name[-1]}.shape[-1]={t.shape[-1]}, d_a={d_a}) (rows: x @ {name}); "
                f"got {_shape(w)}")


def additive_scores(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, w_a: Tensor) -> Tensor:
    """Additive (Bahdanau) scores ``tanh(q_i W_a^q + k_j W_a^k) w_a``.

    Args:
        q: (B, H, Lq, D_q) queries. k: (B, H, Lk, D_k) keys; D_k may differ from D_q.
        w_q: (D_q, d_a) = W_a^q. w_k: (D_k, d_a) = W_a^k. w_a: (d_a,) = w_a.
            Row convention: ``q @ w_q``; an ``nn.Linear``'s weight is the transpose.

    Returns:
        scores (B, H, Lq, Lk). No 1/sqrt scale: tanh bounds every feature to [-1, 1],
        so ``|score| <= ||w_a||_1`` whatever the widths.
    """
    _check_additive(q, k, w_q, w_k, w_a)
    qa = q @ w_q.to(q.dtype)  # q_i W_a^q: (B, H, Lq, d_a)
    ka = k @ w_k.to(k.dtype)  # k_j W_a^k: (B, H, Lk, d_a)
    features = torch.tanh(qa.unsqueeze(-2) + ka.unsqueeze(-3))  # (B, H, Lq, Lk, d_a)
    return features @ w_a.to(features.dtype)  # tanh(...) w_a: (B, H, Lq, Lk)


def additive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_a: Tensor,
    mask: Optional[Tensor] = None,
    need_weights: bool = False,
):
    """Additive attention: ``softmax(additive_scores(q, k), mask) @ v``.

    Args:
        q: (B, H, Lq, D_q), k: (B, H, Lk, D_k), v: (B, H, Lk, Dv).
        w_q, w_k, w_a: as in :func:`additive_scores`.
        mask: boolean (True = attend) or additive float, broadcastable to (B, H, Lq, Lk);
            a row with no visible key gets zero weights and a zero output.
        need_weights: also return the weights.

    Returns:
        out (B, H, Lq, Dv), or ``(out, weights (B, H, Lq, Lk))`` when ``need_weights``.
    """
    _check_tensor("v", v, 4, "(batch, heads, seq, dim)")
    if k.dim() == 4 and k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree in (batch, heads, seq); got k {_shape(k)} and v {_shape(v)}")
    scores = additive_scores(q, k, w_q, w_k, w_a)  # (B, H, Lq, Lk)
    if mask is not None:
        _check_mask("mask", mask, scores.shape)
    weights = masked_softmax(scores, mask)  # (B, H, Lq, Lk)
    out = weights @ v  # sum_j w_ij v_j: (B, H, Lq, Dv)
    return (out, weights) if need_weights else out


# ----------------------------------------------------------------------------
# Fast attention on PyTorch's fused kernel
# ----------------------------------------------------------------------------

def _merge_bias_and_mask(bias: Optional[Tensor], mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    """One mask for ``F.scaled_dot_product_attention``: bool if possible, else additive float."""
    if bias is None:
        return mask
    merged = bias.to(dtype)
    if mask is None:
        return merged
    if mask.dtype == torch.bool:
        return merged.masked_fill(~mask, float("-inf"))
    return merged + mask.to(dtype)


def fast_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """The same attention as :func:`scaled_dot_product_attention`, on ``F.scaled_dot_product_attention``.

    ``bias`` and ``mask`` are merged into one additive float mask (a boolean mask
    alone is passed through unchanged). ``is_causal=True`` adds :func:`causal_mask`;
    when ``Lq != Lk`` it is aligned to the *last* keys, like ``causal_mask`` (PyTorch's
    own ``is_causal`` aligns to the first), so both paths agree for every shape.

    Returns out (B, H, Lq, Dv). There are no weights: the fused kernel never stores them.
    """
    _check_qkv(q, k, v)
    _check_scale(scale)
    Lq, Lk = q.shape[2], k.shape[2]
    target = (q.shape[0], q.shape[1], Lq, Lk)
    if mask is not None:
        _check_mask("mask", mask, target)
    if bias is not None:
        _check_tensor("bias", bias)
        _check_mask("bias", bias, target)
    attn_mask = _merge_bias_and_mask(bias, mask, q.dtype)
    if is_causal and (attn_mask is not None or Lq != Lk):
        causal = causal_mask(Lq, Lk, device=q.device)  # (Lq, Lk)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


# ----------------------------------------------------------------------------
# Key/value prefixes
# ----------------------------------------------------------------------------

def _widen(extra: Optional[Tensor], n_prefix: int, Lk: int, fill) -> Optional[Tensor]:
    """A mask or bias broadcastable to (..., Lq, Lk) -> (..., Lq, P + Lk), ``fill`` in front."""
    if extra is None:
        return None
    extra = extra.expand(*extra.shape[:-1], Lk)  # a last dim of 1 would not stretch to P + Lk
    front = torch.full((*extra.shape[:-1], n_prefix), fill, dtype=extra.dtype, device=extra.device)
    return torch.cat([front, extra], dim=-1)


def prepend_kv_prefix(
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
):
    """Put learned keys and values in front of the real ones (prefix tuning).

    Args:
        k, v: (B, H, Lk, D) keys and (B, H, Lk, Dv) values projected from the input.
        prefix_k, prefix_v: (H, P, D) and (H, P, Dv), shared by the batch, or (B, H, P, .).
        mask: boolean (True = attend) or additive, broadcastable to (B, H, Lq, Lk), for
            the real keys. bias: additive, broadcastable to (B, H, Lq, Lk), or None.

    Returns:
        ``(k', v', mask', bias')``: k' (B, H, P + Lk, D) = [prefix_k; k], v' likewise;
        mask' and bias' widened to (..., Lq, P + Lk) so that every query sees every prefix
        key (True / 0 in front); ``None`` stays ``None``.
    """
    _check_qkv(k, k, v)
    B, H, Lk = k.shape[0], k.shape[1], k.shape[2]
    for name, p, t in (("prefix_k", prefix_k, k), ("prefix_v", prefix_v, v)):
        _check_tensor(name, p)
        if p.dim() == 3:
            p = p.unsqueeze(0)
        if p.dim() != 4 or p.shape[0] not in (1, B) or p.shape[1] != H or p.shape[3] != t.shape[3]:
            raise ValueError(
                f"{name} must be (heads={H}, P, {t.shape[3]}) or (batch={B}, heads={H}, P, "
                f"{t.shape[3]}) to go in front of {'k' if t is k else 'v'} {_shape(t)}; got {_shape(p)}")
    if prefix_k.shape[-2] != prefix_v.shape[-2]:
        raise ValueError(f"prefix_k and prefix_v must have the same length P; got "
                         f"{_shape(prefix_k)} and {_shape(prefix_v)}")
    n_prefix = prefix_k.shape[-2]
    if n_prefix < 1:
        raise ValueError(f"a prefix needs at least one position (P >= 1); got P = {n_prefix}")
    pk = prefix_k.to(k.dtype).expand(B, H, n_prefix, k.shape[3])  # (B, H, P, D)
    pv = prefix_v.to(v.dtype).expand(B, H, n_prefix, v.shape[3])  # (B, H, P, Dv)
    k = torch.cat([pk, k], dim=2)  # K' = [K_p; K]: (B, H, P + Lk, D)
    v = torch.cat([pv, v], dim=2)  # V' = [V_p; V]: (B, H, P + Lk, Dv)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
        fill = True if mask.dtype == torch.bool else 0.0
        mask = _widen(mask, n_prefix, Lk, fill)  # every query sees the prefix
    if bias is not None:
        bias = _widen(bias, n_prefix, Lk, 0.0)  # a prefix key has no position: bias 0
    return k, v, mask, bias


# ----------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------

def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, L, d_model) -> (B, H, L, D) with D = d_model / H."""
    _check_tensor("x", x, 3, "(batch, seq, d_model)")
    B, L, d_model = x.shape
    if d_model % n_heads != 0:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    return x.view(B, L, n_heads, d_model // n_heads).transpose(1, 2)  # (B, H, L, D)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H * D): the inverse of :func:`split_heads` (the Concat in MultiHead)."""
    _check_tensor("x", x, 4, "(batch, heads, seq, head_dim)")
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)  # (B, L, d_model)


# ----------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused Q/K/V projection (Vaswani et al. 2017, section 3.2.2).

    Args:
        d_model: model width; n_heads must divide it.
        n_heads: number of heads h; head_dim = d_model / h.
        dropout: dropout on the attention weights (training mode only).
        bias: whether the projections have biases.
        fast: use :func:`fast_attention` whenever no weights are needed.
        cross: cross-attention (queries from ``x``, keys and values from ``context``):
            then the projections are ``self.q`` (d -> d) and ``self.kv`` (d -> 2d);
            otherwise one ``self.qkv`` (d -> 3d), weight rows [W^Q; W^K; W^V].

    ``forward(x, context=None, mask=None, positions=None, need_weights=False, kv_prefix=None)``:
        x (B, Lq, d_model); context (B, Lk, d_model) for cross-attention;
        mask boolean (True = attend) or additive, broadcastable to (B, H, Lq, Lk);
        positions: a ``PositionScheme`` (see positions.py) whose ``rotate``,
        ``score_bias`` and ``value_term`` hooks are applied here;
        kv_prefix: ``(prefix_k, prefix_v)``, each (P, d_model) or (B, P, d_model): keys and
        values (already projected) put in front of the real ones, visible to every query
        (prefix tuning; see :func:`prepend_kv_prefix`).
        Returns out (B, Lq, d_model), or ``(out, weights (B, H, Lq, Lk))``, the
        per-head softmax weights before dropout (``nn.MultiheadAttention`` with
        ``average_attn_weights=False`` gives the same when dropout is 0); with a
        prefix the weights are (B, H, Lq, P + Lk), the prefix's columns first.

    Path: the fused :func:`fast_attention` unless ``fast=False``, ``need_weights=True``
    or ``positions.needs_weights`` (Shaw's value term needs the weights); then the
    readable steps of :meth:`_readable`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        fast: bool = True,
        cross: bool = False,
    ):
        super().__init__()
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive; got d_model={d_model}, n_heads={n_heads}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = d_model // n_heads
        self.dropout, self.fast, self.cross = dropout, fast, cross
        if cross:
            self.q = nn.Linear(d_model, d_model, bias=bias)  # W^Q
            self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)  # [W^K; W^V]
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # [W^Q; W^K; W^V]
        self.out = nn.Linear(d_model, d_model, bias=bias)  # W^O

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, fast={self.fast}, cross={self.cross}"

    def project(self, x: Tensor, context: Optional[Tensor] = None):
        """Queries, keys and values, each split into heads: (B, H, L, D)."""
        if self.cross:
            q = self.q(x)  # (B, Lq, d)
            k, v = self.kv(context).chunk(2, dim=-1)  # (B, Lk, d) each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, L, d) each
        return tuple(split_heads(t, self.n_heads) for t in (q, k, v))

    def _check_inputs(self, x: Tensor, context: Optional[Tensor]) -> None:
        layout = "(batch, seq, d_model)"
        _check_tensor("x", x, 3, layout)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}; got shape {_shape(x)}")
        if self.cross and context is None:
            raise ValueError("cross-attention needs a context (B, Lk, d_model); got None")
        if not self.cross and context is not None:
            raise ValueError("this is self-attention (cross=False); build it with cross=True to pass a context")
        if context is not None:
            _check_tensor("context", context, 3, layout)
            if context.shape[0] != x.shape[0] or context.shape[-1] != self.d_model:
                raise ValueError(
                    f"context must be (batch={x.shape[0]}, seq, d_model={self.d_model}); "
                    f"got shape {_shape(context)}"
                )

    def _prefix_heads(self, kv_prefix, B: int):
        """``(prefix_k, prefix_v)``, each (P, d) or (B, P, d) -> two (1 or B, H, P, D) tensors."""
        if not isinstance(kv_prefix, (tuple, list)) or len(kv_prefix) != 2:
            raise TypeError("kv_prefix must be a pair (prefix_k, prefix_v), each (P, d_model) or "
                            f"(batch, P, d_model); got {type(kv_prefix).__name__}")
        heads = []
        for name, p in zip(("prefix_k", "prefix_v"), kv_prefix, strict=True):
            _check_tensor(name, p)
            given = _shape(p)
            if p.dim() == 2:
                p = p.unsqueeze(0)  # (1, P, d): one prefix for the whole batch
            if p.dim() != 3 or p.shape[0] not in (1, B) or p.shape[-1] != self.d_model:
                raise ValueError(f"{name} must be (P, d_model={self.d_model}) or (batch={B}, P, "
                                 f"d_model={self.d_model}); got {given}")
            if p.shape[1] < 1:
                raise ValueError(f"{name} has length P = 0: a prefix needs at least one position")
            heads.append(split_heads(p, self.n_heads))  # (1 or B, H, P, D)
        return heads

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        positions=None,
        need_weights: bool = False,
        kv_prefix=None,
    ):
        self._check_inputs(x, context)
        q, k, v = self.project(x, context)  # (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)
        bias = None
        if positions is not None:
            q, k = positions.rotate(q, k)  # RoPE rotates; others return them unchanged
            bias = positions.score_bias(q, k)  # None or additive, (.., H, Lq, Lk)
        n_prefix = 0
        if kv_prefix is not None:  # prefix tuning: P learned keys/values in front of the real ones
            target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # (B, H, Lq, Lk)
            if mask is not None:
                _check_mask("mask", mask, target)
            if bias is not None:
                _check_mask("bias", bias, target)
            prefix_k, prefix_v = self._prefix_heads(kv_prefix, x.shape[0])
            n_prefix = prefix_k.shape[2]
            k, v, mask, bias = prepend_kv_prefix(k, v, prefix_k, prefix_v, mask, bias)  # P + Lk keys
        needs_weights = positions is not None and getattr(positions, "needs_weights", False)
        p = self.dropout if self.training else 0.0
        weights = None
        if self.fast and not need_weights and not needs_weights:
            out = fast_attention(q, k, v, mask=mask, dropout_p=p, bias=bias)  # (B, H, Lq, D)
        else:
            out, weights = self._readable(q, k, v, mask, bias, p, positions, n_prefix)
        out = self.out(merge_heads(out))  # Concat(heads) W^O: (B, Lq, d_model)
        return (out, weights) if need_weights else out

    def _readable(self, q, k, v, mask, bias, p, positions, n_prefix=0):
        """Step by step, so a position scheme can add a term that uses the weights (Shaw).

        With a prefix (``n_prefix`` > 0) the keys start with it; Shaw's value term belongs
        to the real keys only, so it gets the weights of those columns."""
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # (B, H, Lq, Lk)
        if bias is not None:
            _check_mask("bias", bias, target)
        scores = attention_scores(q, k)  # Q K^T / sqrt(D): (B, H, Lq, Lk)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        weights = masked_softmax(scores, mask)  # (B, H, Lq, Lk)
        dropped = F.dropout(weights, p=p) if p > 0 else weights
        out = dropped @ v  # (B, H, Lq, D)
        if positions is not None:
            extra = positions.value_term(dropped[..., n_prefix:])  # Shaw: sum_j w_ij a^V_ij, or None
            if extra is not None:
                out = out + extra
        return out, weights
