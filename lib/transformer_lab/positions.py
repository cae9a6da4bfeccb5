"""Position information for attention: seven schemes behind one small protocol.

Self-attention is permutation-equivariant: shuffle the tokens and the outputs are
shuffled the same way. Word order has to be injected. This module implements the
main ways of doing it, in the order lecture 03 teaches them.

Papers and the equation each scheme implements
-----------------------------------------------
* Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, sec. 3.5.
  Sinusoidal (absolute, added to the token embeddings)::

      PE[p, 2c]   = sin(p / base^(2c/d_model))
      PE[p, 2c+1] = cos(p / base^(2c/d_model))          base = 10000

  and learned absolute embeddings (one trained vector per position, also sec. 3.5).
* Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position
  Representations", arXiv:1803.02155, eqs. (3)-(5)::

      e_ij = x_i W^Q (x_j W^K + a^K_ij)^T / sqrt(d_z)
      z_i  = sum_j alpha_ij (x_j W^V + a^V_ij)
      a^K_ij = w^K_clip(j-i, k),  clip(x, k) = max(-k, min(k, x))   (2k+1 learned rows)

* Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
  Context", arXiv:1901.02860, sec. 3.3::

      A^rel_ij = q_i.k_j  (a)  +  q_i.W_R R_{i-j}  (b)  +  u.k_j  (c)  +  v.W_R R_{i-j}  (d)

  with R a sinusoid table (not learned), W_R, u, v learned.
* Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer" (T5), arXiv:1910.10683, sec. 2.1: one learned scalar per
  (bucket of j-i, head), added to the logits; buckets are exact for small offsets
  and logarithmically spaced up to ``max_distance``.
* Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
  arXiv:2104.09864, eqs. (14)-(16), (34)::

      f(x, m) = R_{Theta,m} x,  R rotates each pair (x_2i, x_2i+1) by m * theta_i,
      theta_i = base^(-2i/d)  so  <f(q, m), f(k, n)> = q^T R_{Theta,n-m} k

* Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear Biases
  Enables Input Length Extrapolation" (ALiBi), arXiv:2108.12409, sec. 3::

      softmax(q_i K^T + m_h * [-(i-1), ..., -2, -1, 0]),   m_h = 2^(-8h/n), h = 1..n

* Wu, Wu & Huang 2021, "DA-Transformer: Distance-aware Transformer",
  arXiv:2010.06925, eqs. (7)-(10): the distance *multiplies* rectified scores::

      R^h_ij = w_h |i - j|,   f(x; v) = (1 + exp(v)) / (1 + exp(v - x))   (learnable sigmoid)
      A^h = ReLU(Q K^T) * f(R^h; v_h) / sqrt(d),   then softmax

Shapes and the protocol
-----------------------
Between blocks a sequence is ``(B, L, d_model)``; inside attention tensors are
``(B, H, L, D)`` = (batch, heads, seq, head_dim). Every scheme is a
:class:`PositionScheme` and the attention code calls, in this order::

    x = scheme.embed(x)                  # (B, L, d_model) -> same; absolute schemes add here
    q, k = scheme.rotate(q, k)           # (B, H, Lq, D), (B, H, Lk, D); RoPE rotates here
    bias = scheme.score_bias(q, k)       # None or float, broadcastable to (B, H, Lq, Lk),
                                         # added to the already-scaled scores q.k/sqrt(D)
    extra = scheme.value_term(weights)   # None or (B, H, Lq, D), added to weights @ v
    scheme.needs_weights                 # True when value_term needs the weights (Shaw)

When ``Lq < Lk`` the queries are the *last* ``Lq`` positions of the key sequence
(a query block at the end, or a decoder step with a key/value cache), so query row
``i`` sits at absolute position ``i + (Lk - Lq)``. Bias-based schemes never mask:
the model adds the causal mask itself.

Conventions chosen where sources differ
---------------------------------------
* Sinusoidal tables are *interleaved* (even columns sin, odd columns cos), exactly
  as Vaswani et al. write it. Many codebases (tensor2tensor, Transformer-XL's code)
  concatenate ``[sin | cos]`` instead; the two differ by a fixed permutation of
  the columns, which a following linear layer absorbs.
* RoPE rotates *interleaved* pairs ``(x[2c], x[2c+1])``, as RoFormer's eq. (34) and
  its reference code do. GPT-NeoX / LLaMA (Hugging Face) use "rotate-half", pairing
  ``x[i]`` with ``x[i + D/2]``. Both are the same rotation up to a permutation of
  the feature dimensions, so the relative-position property is identical; weights
  trained with one convention need their q/k projection rows permuted to be used
  with the other. We follow the paper because learners read it side by side.
* Transformer-XL's code computes term (b)+(d) for all offsets and realigns them
  with a "relative shift" (pad-and-reshape trick). Here we compute the score for each
  distinct offset once and gather it by an index table instead: the same numbers,
  and easier to read.
* ALiBi uses ``|i - j|`` (symmetric), so it also works for bidirectional encoders;
  in a causal model only ``j <= i`` survives the mask and this is the paper's bias.
* T5 adds its bias to logits that are *not* divided by sqrt(D) (T5 folds the scale
  into the initialisation). Here the bias is added to the scaled scores; since the
  bias is a free learned scalar the difference is only a re-parameterisation.

Glossary (variable -> paper symbol)
-----------------------------------
==================  ==============================================================
``p``               absolute position (Vaswani: pos; RoFormer: m, n)
``i``, ``j``        query row, key column (Shaw, XL, ALiBi: i, j)
``rel``             j - i, the signed offset of the key from the query
                    (T5 code: relative_position = memory_position - query_position)
``d_model``         model width (Vaswani: d_model)
``D``, head_dim     per-head width (Shaw: d_z; RoFormer: d)
``base``            10000 in Vaswani and RoFormer
``inv_freq``        base^(-2c/d): Vaswani's 1/10000^(2c/d_model); RoFormer's theta_i (the course's theta_c)
``k`` (Shaw)        clipping distance k (Shaw sec. 3.2); NOT the key tensor
``a_K``, ``a_V``    Shaw's w^K, w^V tables, shape (2k+1, D); a^K_ij = a_K[clip(j-i)+k]
``R``               Transformer-XL's sinusoid matrix R, row R_{i-j}
``W_R``             Transformer-XL's W_{k,R}
``u``, ``v``        Transformer-XL's global content / position biases u, v (per head);
                    lecture 03 writes them b^c, b^p (v is the values there)
``w``, ``v`` (DA)   DA-Transformer's per-head distance scale w_h and sigmoid parameter v_h
``slopes``          ALiBi's head-specific slopes m
``bucket``          T5's relative_position_bucket output
==================  ==============================================================
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

__all__ = [
    "sinusoidal_encoding",
    "alibi_slopes",
    "alibi_bias",
    "rope_angles",
    "apply_rope",
    "relative_positions",
    "shaw_clip",
    "t5_bucket",
    "da_scale",
    "da_scores",
    "PositionScheme",
    "NoPositions",
    "SinusoidalPositions",
    "LearnedPositions",
    "ShawRelative",
    "XLRelative",
    "T5Bias",
    "RoPE",
    "ALiBi",
    "make_positions",
    "POSITION_SCHEMES",
]


# --------------------------------------------------------------------------------------
# small input checks (clear messages: what was expected, what came)
# --------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # accept 0-d integer tensors / numpy ints by converting through operator.index
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _check_float_tensor(x, name: str, rank: int | None = None, rank_text: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {rank_text}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")


def _check_qk(q, k, head_dim: int | None = None, n_heads: int | None = None) -> None:
    """q: (B, H, Lq, D), k: (B, H, Lk, D), both floating point, same D."""
    _check_float_tensor(q, "q", 4, "(batch, heads, seq, head_dim)")
    _check_float_tensor(k, "k", 4, "(batch, heads, seq, head_dim)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if head_dim is not None and q.shape[-1] != head_dim:
        raise ValueError(
            f"q must have head_dim={head_dim} in its last dimension; got shape {tuple(q.shape)}"
        )
    if n_heads is not None and q.shape[1] != n_heads:
        raise ValueError(
            f"q must have n_heads={n_heads} in dimension 1 (batch, heads, seq, head_dim); "
            f"got shape {tuple(q.shape)}"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Trig tables are computed in float64 if asked for, else float32, then cast.

    Computing sin/cos in float16/bfloat16 directly would lose most digits of p * theta.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_freq(dim: int, base: float, device, dtype) -> torch.Tensor:
    """base^(-2c/dim) for c = 0 .. ceil(dim/2)-1.  Shape (ceil(dim/2),)."""
    two_c = torch.arange(0, dim, 2, device=device, dtype=dtype)  # 2c
    return base ** (-two_c / dim)  # 1 / base^(2c/d)   (Vaswani sec. 3.5; RoFormer's theta_i, the course's theta_c)


def _sinusoid(pos: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """Interleaved sinusoid rows for arbitrary (even negative, fractional) positions.

    pos: (N,) float tensor -> (N, dim); column 2c = sin(p w_c), column 2c+1 = cos(p w_c).
    """
    inv_freq = _inv_freq(dim, base, pos.device, pos.dtype)  # (ceil(dim/2),)
    angle = pos[:, None] * inv_freq[None, :]  # (N, ceil(dim/2)):  p / base^(2c/d)
    table = torch.stack((angle.sin(), angle.cos()), dim=-1)  # (N, ceil(dim/2), 2)
    return table.flatten(-2)[:, :dim]  # (N, dim), interleaved sin, cos, sin, cos, ...


# --------------------------------------------------------------------------------------
# functions (each is the reference for an exercise in lecture 03)
# --------------------------------------------------------------------------------------

def sinusoidal_encoding(length, d_model, base=10000.0, device=None, dtype=None) -> torch.Tensor:
    """Vaswani et al.'s fixed table, shape ``(length, d_model)``.

    ``PE[p, 2c] = sin(p / base^(2c/d_model))``, ``PE[p, 2c+1] = cos(p / base^(2c/d_model))``.
    Interleaved: even columns hold sines, odd columns cosines. An odd ``d_model``
    keeps the last sine column and drops its cosine.

    Because each (sin, cos) pair is a point on a circle turning at its own speed,
    ``PE[p + k]`` is a fixed rotation of ``PE[p]`` pair by pair: relative offsets are
    linear functions of the absolute code.
    """
    length = _check_int(length, "length", 0)
    d_model = _check_int(d_model, "d_model", 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    work = _work_dtype(dtype)
    p = torch.arange(length, device=device, dtype=work)  # (length,) positions 0..L-1
    return _sinusoid(p, d_model, float(base)).to(dtype)  # (length, d_model)


def _alibi_slopes_list(n: int) -> list[float]:
    """The ALiBi paper's recipe, as plain Python floats (see :func:`alibi_slopes`)."""
    if n & (n - 1) == 0:  # n is a power of two
        start = 2.0 ** (-8.0 / n)  # 2^(-8/n)
        return [start ** h for h in range(1, n + 1)]  # m_h = (2^(-8/n))^h,  h = 1..n
    n0 = 2 ** int(math.floor(math.log2(n)))  # closest power of two below n
    # every other slope of the 2*n0 sequence (its 1st, 3rd, 5th, ...): these fall
    # geometrically halfway between the n0 slopes already taken
    extra = _alibi_slopes_list(2 * n0)[0::2][: n - n0]
    return _alibi_slopes_list(n0) + extra


def alibi_slopes(n_heads, *, device=None, dtype=None) -> torch.Tensor:
    """ALiBi's head-specific slopes ``m``, shape ``(n_heads,)``.

    For ``n`` a power of two: ``start = 2^(-8/n)`` and ``m = start^1, start^2, ..., start^n``
    (n=8: 1/2, 1/4, ..., 1/256; n=16: 2^-0.5, 2^-1, ..., 2^-8).
    Otherwise (Press et al.'s code, sec. 3): take the ``n0`` slopes of the closest power
    of two below ``n``, then append the 1st, 3rd, 5th, ... slopes of the ``2*n0``
    sequence (``(2^(-8/(2 n0)))^h`` for odd ``h``) until there are ``n``.
    """
    n_heads = _check_int(n_heads, "n_heads", 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return torch.tensor(_alibi_slopes_list(n_heads), device=device, dtype=dtype)  # (H,)


def relative_positions(Lq, Lk=None, device=None) -> torch.Tensor:
    """Signed offsets ``rel[i, j] = j - i``, long tensor ``(Lq, Lk)``.

    Query row ``i`` is at absolute position ``i + (Lk - Lq)`` (queries are the last
    ``Lq`` positions), so the last query lines up with the last key: ``rel[-1, -1] = 0``.
    Negative ``rel`` = key in the past, positive = key in the future.
    """
    Lq = _check_int(Lq, "Lq", 0)
    Lk = Lq if Lk is None else _check_int(Lk, "Lk", 0)
    i = torch.arange(Lq, device=device) + (Lk - Lq)  # (Lq,) absolute query positions
    j = torch.arange(Lk, device=device)  # (Lk,) key positions
    return j[None, :] - i[:, None]  # (Lq, Lk): j - i


def _check_rel(rel) -> None:
    if not isinstance(rel, torch.Tensor):
        raise TypeError(f"rel must be a torch.Tensor of integer offsets; got {type(rel).__name__}")
    if rel.is_floating_point() or rel.is_complex() or rel.dtype == torch.bool:
        raise TypeError(f"rel must be an integer tensor (e.g. torch.long); got {rel.dtype}")


def shaw_clip(rel, k) -> torch.Tensor:
    """Shaw et al.'s clipped offset as a table index: ``clip(rel, k) + k`` in ``[0, 2k]``.

    All offsets beyond ``±k`` share a row, so only ``2k + 1`` rows are ever needed and
    any sequence length can be handled.
    """
    _check_rel(rel)
    k = _check_int(k, "k", 0)
    return rel.clamp(-k, k).long() + k  # clip(j - i, k) = max(-k, min(k, j - i)), shifted to >= 0


def t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128) -> torch.Tensor:
    """T5's ``relative_position_bucket``: map offsets ``rel = j - i`` to bucket ids (long).

    Mirrors mesh-tensorflow's ``_relative_position_bucket`` (used by T5):

    * bidirectional: half the buckets for keys in the past/present (``rel <= 0``), half,
      offset by ``num_buckets // 2``, for keys in the future (``rel > 0``);
      causal (``bidirectional=False``): future keys all go to bucket 0 (they are masked
      anyway) and every bucket serves the past;
    * within a half of ``nb`` buckets, distances ``n < nb // 2`` get their own bucket
      (exact), larger ones are log-spaced up to ``max_distance``; everything at or beyond
      ``max_distance`` shares the last bucket ``nb - 1``.

    Result in ``[0, num_buckets)``, same shape as ``rel``.
    """
    _check_rel(rel)
    num_buckets = _check_int(num_buckets, "num_buckets", 4 if bidirectional else 2)
    max_distance = _check_int(max_distance, "max_distance", 1)
    n = -rel.long()  # n = i - j: distance into the past
    ret = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets  # future keys use the upper half
        n = n.abs()
    else:
        n = n.clamp(min=0)  # future keys -> distance 0
    max_exact = num_buckets // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must exceed the exact range num_buckets//{4 if bidirectional else 2}"
            f"={max_exact}; got max_distance={max_distance}"
        )
    is_small = n < max_exact
    # log-spaced buckets: max_exact + log(n/max_exact) / log(max_distance/max_exact) * (nb - max_exact)
    # (float32, as in the official code; n clamped so log never sees 0)
    n_f = n.clamp(min=max_exact).float()
    large = max_exact + (
        torch.log(n_f / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)  # saturate at max_distance
    return ret + torch.where(is_small, n, large)


def rope_angles(length, head_dim, base=10000.0, offset=0, device=None, dtype=None):
    """``(cos, sin)`` of RoPE's angles, each ``(length, head_dim // 2)``.

    Row ``r`` is position ``p = offset + r``; column ``c`` is the angle ``p * theta_c``
    with ``theta_c = base^(-2c/head_dim)`` (RoFormer eq. 15).
    """
    length = _check_int(length, "length", 0)
    head_dim = _check_int(head_dim, "head_dim", 2)
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim must be even; got {head_dim}")
    offset = _check_int(offset, "offset", -(2**62))
    dtype = torch.get_default_dtype() if dtype is None else dtype
    work = _work_dtype(dtype)
    p = torch.arange(offset, offset + length, device=device, dtype=work)  # (length,) positions m
    theta = _inv_freq(head_dim, float(base), device, work)  # (D/2,) theta_c = base^(-2c/D)
    angle = p[:, None] * theta[None, :]  # (length, D/2): p * theta_c
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x, offset=0, base=10000.0) -> torch.Tensor:
    """Rotate each interleaved pair ``(x[..., 2c], x[..., 2c+1])`` by ``p * base^(-2c/D)``.

    ``x``: ``(..., L, D)`` with ``D`` even; row ``r`` of the sequence is at position
    ``p = offset + r``. Returns the same shape, dtype and device. This is RoFormer's
    eq. (34) (interleaved pairs), not GPT-NeoX's rotate-half layout (see the module doc).
    A rotation preserves norms, and ``<apply_rope(q)[m], apply_rope(k)[n]>`` depends
    on ``m - n`` only.
    """
    _check_float_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., seq, head_dim); got shape {tuple(x.shape)}")
    L, D = x.shape[-2], x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim must be even; got x of shape {tuple(x.shape)}")
    cos, sin = rope_angles(L, D, base, offset, device=x.device, dtype=x.dtype)  # (L, D/2) each
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., L, D/2): the pair (x_2c, x_2c+1)
    out1 = x1 * cos - x2 * sin  # x_2c'   = x_2c cos(p theta_c) - x_2c+1 sin(p theta_c)
    out2 = x1 * sin + x2 * cos  # x_2c+1' = x_2c sin(p theta_c) + x_2c+1 cos(p theta_c)
    return torch.stack((out1, out2), dim=-1).flatten(-2)  # (..., L, D), re-interleaved


def alibi_bias(n_heads, Lq, Lk=None, device=None, dtype=None) -> torch.Tensor:
    """ALiBi's additive bias ``-m_h * |i - j|``, shape ``(n_heads, Lq, Lk)``.

    Query row ``i`` sits at position ``i + (Lk - Lq)``, so the last query aligns with
    the last key. Zero on that diagonal; the further the key, the more negative.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    slopes = alibi_slopes(n_heads, device=device, dtype=dtype)  # (H,)  m_h
    dist = relative_positions(Lq, Lk, device=device).abs().to(dtype)  # (Lq, Lk)  |i - j|
    return -slopes[:, None, None] * dist[None, :, :]  # (H, Lq, Lk):  -m_h |i - j|


def da_scale(w, Lq, Lk=None, v=1.0) -> torch.Tensor:
    """DA-Transformer's distance factor ``f(w_h |i - j|; v_h)``, shape ``(H, Lq, Lk)``.

    ``f(x; v) = (1 + exp(v)) / (1 + exp(v - x))`` (Wu et al. 2021, eq. 8): 1 at distance 0,
    rising towards ``1 + exp(v)`` far away when ``w_h > 0`` (a head that prefers far keys),
    falling towards 0 when ``w_h < 0`` (a head that prefers near keys). ``w``: ``(H,)``
    float tensor of per-head scales; ``v``: a number or an ``(H,)`` tensor. Query row ``i``
    sits at position ``i + (Lk - Lq)``, as everywhere in this module.
    """
    _check_float_tensor(w, "w", 1, "(n_heads,)")
    dist = relative_positions(Lq, Lk, device=w.device).abs().to(w.dtype)  # (Lq, Lk): |i - j|
    v = torch.as_tensor(v, dtype=w.dtype, device=w.device).reshape(-1)[:, None, None]  # (H or 1, 1, 1)
    x = w[:, None, None] * dist  # (H, Lq, Lk): R^h = w_h |i - j|
    return (1 + v.exp()) / (1 + (v - x).exp())  # f(R^h; v_h)


def da_scores(scores, w, v=1.0) -> torch.Tensor:
    """DA-Transformer's re-weighted scores ``ReLU(scores) * f(w_h |i - j|; v_h)``.

    ``scores``: the scaled scores ``q k^T / sqrt(D)``, ``(B, H, Lq, Lk)``; the softmax comes
    after, as for any score (a positive factor commutes with the 1/sqrt(D) scale). Unlike
    ALiBi's ``-m_h |i - j|``, which is *added*, the distance here *multiplies*, so a
    score of 0 stays 0 at every distance.
    """
    _check_float_tensor(scores, "scores", 4, "(batch, heads, Lq, Lk)")
    if w.shape != (scores.shape[1],):
        raise ValueError(f"w must have one scale per head, shape ({scores.shape[1]},); got {tuple(w.shape)}")
    factor = da_scale(w.to(scores.dtype), scores.shape[-2], scores.shape[-1], v)  # (H, Lq, Lk)
    return torch.relu(scores) * factor[None]  # (B, H, Lq, Lk)


# --------------------------------------------------------------------------------------
# the protocol and the schemes
# --------------------------------------------------------------------------------------

class PositionScheme(nn.Module):
    """Base class: a scheme that does nothing. Subclasses override what they need.

    * ``embed(x)``: x ``(B, L, d_model)`` token embeddings -> same shape.
    * ``rotate(q, k)``: ``(B, H, Lq, D)``, ``(B, H, Lk, D)`` -> the same two.
    * ``score_bias(q, k)``: ``None`` or a float tensor broadcastable to ``(B, H, Lq, Lk)``,
      on the scale of the already-scaled scores ``q.k / sqrt(D)``.
    * ``value_term(weights)``: ``None`` or ``(B, H, Lq, D)`` added to ``weights @ v``.
    * ``needs_weights``: True when ``value_term`` needs the attention weights, which
      forces the readable (non-fused) attention path.
    """

    name = "base"
    needs_weights = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor):
        return q, k

    def score_bias(self, q: torch.Tensor, k: torch.Tensor):
        return None

    def value_term(self, weights: torch.Tensor):
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # nn.Module convenience: scheme(x)
        return self.embed(x)


class NoPositions(PositionScheme):
    """No position information at all: a bag of tokens (the baseline)."""

    name = "none"


class _AbsoluteScheme(PositionScheme):
    """Shared input check for the schemes that add a vector to each token."""

    def _check_x(self, x):
        _check_float_tensor(x, "x", 3, "(batch, seq, d_model)")
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have d_model={self.d_model} in its last dimension; got shape {tuple(x.shape)}"
            )


class SinusoidalPositions(_AbsoluteScheme):
    """Vaswani et al.'s fixed sinusoids added to the embeddings; any length works."""

    name = "sinusoidal"

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        self.d_model = _check_int(d_model, "d_model", 1)
        self.base = float(base)

    def embed(self, x):
        self._check_x(x)
        L = x.shape[1]
        pe = sinusoidal_encoding(L, self.d_model, self.base, device=x.device, dtype=x.dtype)  # (L, d)
        return x + pe  # (B, L, d_model):  x_p + PE[p]

    def extra_repr(self):
        return f"d_model={self.d_model}, base={self.base}"


class LearnedPositions(_AbsoluteScheme):
    """One learned vector per absolute position (BERT/GPT-2 style), ``(max_len, d_model)``.

    Positions past ``max_len - 1`` were never trained; rather than crash, they reuse
    the last learned row (``table[min(p, max_len - 1)]``). That is a documented
    stop-gap, and lecture 03 shows how badly it extrapolates.
    """

    name = "learned"

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = _check_int(max_len, "max_len", 1)
        self.d_model = _check_int(d_model, "d_model", 1)
        self.table = nn.Parameter(torch.empty(self.max_len, self.d_model))
        nn.init.normal_(self.table, std=0.02)  # GPT-2's initialisation

    def embed(self, x):
        self._check_x(x)
        L = x.shape[1]
        p = torch.arange(L, device=x.device).clamp(max=self.max_len - 1)  # (L,) past the end: last row
        return x + self.table[p].to(x.dtype)  # (B, L, d_model):  x_p + P[p]

    def extra_repr(self):
        return f"max_len={self.max_len}, d_model={self.d_model}"


class ShawRelative(PositionScheme):
    """Shaw et al. 2018: learned relative embeddings in the keys (and values), clipped at k.

    ``a_K``, ``a_V``: ``(2k+1, head_dim)``, shared by all heads (as in the paper).
    ``score_bias[b,h,i,j] = q_i . a_K[clip(j-i, k) + k] / sqrt(D)``;
    ``value_term[b,h,i] = sum_j w_ij a_V[clip(j-i, k) + k]``.
    Instead of materialising an (Lq, Lk, D) tensor of embeddings, both terms go through
    the 2k+1 table rows: ``q @ a_K^T`` then a gather (keys), a scatter-add of the weights
    into the 2k+1 slots then ``@ a_V`` (values).
    """

    name = "shaw"

    def __init__(self, n_heads: int, head_dim: int, k: int = 16, values: bool = True):
        super().__init__()
        self.n_heads = _check_int(n_heads, "n_heads", 1)
        self.head_dim = _check_int(head_dim, "head_dim", 1)
        self.k = _check_int(k, "k", 0)
        self.values = bool(values)
        self.needs_weights = self.values
        self.a_K = nn.Parameter(torch.randn(2 * self.k + 1, self.head_dim) * 0.02)  # w^K
        self.a_V = nn.Parameter(torch.randn(2 * self.k + 1, self.head_dim) * 0.02) if self.values else None

    def _index(self, Lq, Lk, device):
        return shaw_clip(relative_positions(Lq, Lk, device=device), self.k)  # (Lq, Lk) in [0, 2k]

    def score_bias(self, q, k):
        _check_qk(q, k, head_dim=self.head_dim)
        B, H, Lq, D = q.shape
        Lk = k.shape[-2]
        idx = self._index(Lq, Lk, q.device)  # (Lq, Lk)
        qa = q @ self.a_K.to(q.dtype).T  # (B, H, Lq, 2k+1): q_i . w^K_r for every row r
        bias = qa.gather(-1, idx.expand(B, H, Lq, Lk))  # (B, H, Lq, Lk): q_i . a^K_ij
        return bias / math.sqrt(D)  # e_ij's relative part: q_i a^K_ij^T / sqrt(d_z)

    def value_term(self, weights):
        if not self.values:
            return None
        _check_float_tensor(weights, "weights", 4, "(batch, heads, Lq, Lk)")
        B, H, Lq, Lk = weights.shape
        idx = self._index(Lq, Lk, weights.device).expand(B, H, Lq, Lk)
        slots = weights.new_zeros(B, H, Lq, 2 * self.k + 1)
        slots = slots.scatter_add(-1, idx, weights)  # (B, H, Lq, 2k+1): total weight per clipped offset
        return slots @ self.a_V.to(weights.dtype)  # (B, H, Lq, D): sum_j alpha_ij a^V_ij

    def extra_repr(self):
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, k={self.k}, values={self.values}"


class XLRelative(PositionScheme):
    """Transformer-XL's relative attention, terms (b), (c), (d) as a score bias.

    ``score_bias[b,h,i,j] = (u_h . k_j + (q_i + v_h) . W_R R_{i-j}) / sqrt(D)``, where
    ``R_{i-j}`` is the (interleaved) sinusoid of the signed distance ``i - j`` with width
    ``n_heads * head_dim`` and ``W_R`` maps it to every head's ``D`` features. Term (a),
    ``q_i . k_j``, is the ordinary attention score. ``u``, ``v``: ``(n_heads, head_dim)``.
    """

    name = "xl"

    def __init__(self, n_heads: int, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.n_heads = _check_int(n_heads, "n_heads", 1)
        self.head_dim = _check_int(head_dim, "head_dim", 1)
        self.base = float(base)
        d = self.n_heads * self.head_dim
        self.W_R = nn.Linear(d, d, bias=False)  # W_{k,R}
        self.u = nn.Parameter(torch.randn(self.n_heads, self.head_dim) * 0.02)  # u (content bias)
        self.v = nn.Parameter(torch.randn(self.n_heads, self.head_dim) * 0.02)  # v (position bias)

    def score_bias(self, q, k):
        _check_qk(q, k, head_dim=self.head_dim, n_heads=self.n_heads)
        B, H, Lq, D = q.shape
        Lk = k.shape[-2]
        dist = -relative_positions(Lq, Lk, device=q.device)  # (Lq, Lk): i - j
        if dist.numel() == 0:  # an empty query or key block: nothing to bias
            return q.new_zeros(B, H, Lq, Lk)
        lo, hi = int(dist.min()), int(dist.max())
        work = _work_dtype(q.dtype)
        offsets = torch.arange(lo, hi + 1, device=q.device, dtype=work)  # (n_off,) each distinct i - j
        R = _sinusoid(offsets, H * D, self.base).to(q.dtype)  # (n_off, H*D): R_{i-j}
        WR = nn.functional.linear(R, self.W_R.weight.to(q.dtype))  # (n_off, H*D): W_R R
        WR = WR.view(-1, H, D).transpose(0, 1)  # (H, n_off, D)
        u = self.u.to(q.dtype)[None, :, None, :]  # (1, H, 1, D)
        v = self.v.to(q.dtype)[None, :, None, :]  # (1, H, 1, D)
        content = (k * u).sum(-1)[:, :, None, :]  # (B, H, 1, Lk): term (c) u . k_j
        pos_all = (q + v) @ WR.transpose(-1, -2)  # (B, H, Lq, n_off): (q_i + v) . W_R R_r
        idx = (dist - lo).expand(B, H, Lq, Lk)  # which offset column each (i, j) uses
        position = pos_all.gather(-1, idx)  # (B, H, Lq, Lk): terms (b) + (d)
        return (content + position) / math.sqrt(D)  # on the scaled-score scale

    def extra_repr(self):
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, base={self.base}"


class T5Bias(PositionScheme):
    """T5's learned scalar bias per (relative-position bucket, head).

    ``score_bias = table[t5_bucket(j - i)]`` arranged as ``(1, H, Lq, Lk)``.

    ``bucket_fn``: the bucket function, called as ``bucket_fn(rel, bidirectional,
    num_buckets, max_distance)``; ``None`` (the default) means :func:`t5_bucket`. Set it
    on a built model (``model.positions.bucket_fn = my_bucket``) to train with your own
    (lecture 03 does, with the learner's exercise).
    """

    name = "t5"

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        super().__init__()
        self.n_heads = _check_int(n_heads, "n_heads", 1)
        self.num_buckets = _check_int(num_buckets, "num_buckets", 4 if bidirectional else 2)
        self.max_distance = _check_int(max_distance, "max_distance", 1)
        self.bidirectional = bool(bidirectional)
        t5_bucket(torch.zeros(1, dtype=torch.long), self.bidirectional, self.num_buckets,
                  self.max_distance)  # validate the combination now, not at first use
        self.table = nn.Embedding(self.num_buckets, self.n_heads)  # (num_buckets, H)
        nn.init.normal_(self.table.weight, std=0.02)
        self.bucket_fn = None  # None: t5_bucket (looked up at call time, so a blocked view imports)

    def score_bias(self, q, k):
        _check_qk(q, k, n_heads=self.n_heads)
        Lq, Lk = q.shape[-2], k.shape[-2]
        rel = relative_positions(Lq, Lk, device=q.device)  # (Lq, Lk): j - i
        fn = t5_bucket if self.bucket_fn is None else self.bucket_fn
        bucket = fn(rel, self.bidirectional, self.num_buckets, self.max_distance)  # (Lq, Lk)
        if not isinstance(bucket, torch.Tensor) or bucket.shape != rel.shape or bucket.dtype != torch.long:
            raise TypeError(f"the bucket function must return a long tensor of shape {tuple(rel.shape)}; "
                            f"got {getattr(bucket, 'dtype', type(bucket).__name__)} "
                            f"{tuple(getattr(bucket, 'shape', ()))}")
        bias = self.table.weight.to(q.dtype)[bucket]  # (Lq, Lk, H): b_h(bucket(j - i))
        return bias.permute(2, 0, 1)[None]  # (1, H, Lq, Lk)

    def extra_repr(self):
        return (f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")


class RoPE(PositionScheme):
    """RoFormer's rotary embedding: rotate q and k by their positions, nothing else.

    Keys are at positions ``0 .. Lk-1``, queries at the last ``Lq`` of them
    (offset ``Lk - Lq``). Interleaved pairs, as in the paper.
    """

    name = "rope"

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = _check_int(head_dim, "head_dim", 2)
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of features: head_dim must be even; got {head_dim}")
        self.base = float(base)

    def rotate(self, q, k):
        _check_qk(q, k, head_dim=self.head_dim)
        Lq, Lk = q.shape[-2], k.shape[-2]
        q = apply_rope(q, offset=Lk - Lq, base=self.base)  # R_{Theta,m} q_m
        k = apply_rope(k, offset=0, base=self.base)  # R_{Theta,n} k_n
        return q, k

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base}"


class ALiBi(PositionScheme):
    """Press et al.'s linear biases: ``score_bias = -m_h |i - j|``, fixed slopes, no parameters."""

    name = "alibi"

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = _check_int(n_heads, "n_heads", 1)
        self.register_buffer("slopes", alibi_slopes(self.n_heads))  # (H,) m_h, not learned

    def score_bias(self, q, k):
        _check_qk(q, k, n_heads=self.n_heads)
        Lq, Lk = q.shape[-2], k.shape[-2]
        dist = relative_positions(Lq, Lk, device=q.device).abs().to(q.dtype)  # (Lq, Lk): |i - j|
        m = self.slopes.to(device=q.device, dtype=q.dtype)[:, None, None]  # (H, 1, 1)
        return (-m * dist)[None]  # (1, H, Lq, Lk):  -m_h |i - j|

    def extra_repr(self):
        return f"n_heads={self.n_heads}"


POSITION_SCHEMES = ("none", "sinusoidal", "learned", "shaw", "xl", "t5", "rope", "alibi")


def make_positions(name, d_model, n_heads, max_len=512, **kw) -> PositionScheme:
    """Build a scheme by name (one of ``POSITION_SCHEMES``).

    ``d_model`` must be divisible by ``n_heads``; ``head_dim = d_model // n_heads``.
    Extra keyword arguments go to the scheme's constructor (e.g. ``k=4`` for "shaw",
    ``base=`` for "sinusoidal"/"xl"/"rope", ``num_buckets=`` for "t5").
    ``max_len`` is only used by "learned".
    """
    if not isinstance(name, str) or name.lower() not in POSITION_SCHEMES:
        raise ValueError(
            f"unknown position scheme {name!r}; expected one of: {', '.join(POSITION_SCHEMES)}"
        )
    name = name.lower()
    d_model = _check_int(d_model, "d_model", 1)
    n_heads = _check_int(n_heads, "n_heads", 1)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    head_dim = d_model // n_heads
    if name == "none":
        return NoPositions(**kw)
    if name == "sinusoidal":
        return SinusoidalPositions(d_model, **kw)
    if name == "learned":
        return LearnedPositions(max_len, d_model, **kw)
    if name == "shaw":
        return ShawRelative(n_heads, head_dim, **kw)
    if name == "xl":
        return XLRelative(n_heads, head_dim, **kw)
    if name == "t5":
        return T5Bias(n_heads, **kw)
    if name == "rope":
        return RoPE(head_dim, **kw)
    return ALiBi(n_heads, **kw)  # "alibi"
