r"""Content-based sparse attention and memory savings: LSH attention (Reformer), reversible
residual layers, chunked feed-forward, routing (k-means) attention.

After the softmax only the largest scores of a row matter, and the keys with the largest
``q . k`` are the nearest neighbours of ``q`` (in angle, when keys have unit length). Content-based
sparse attention finds those neighbours cheaply and attends to them only: by hashing (Reformer)
or by clustering (Routing Transformer). Reformer's second idea removes the other memory cost of
training, the activations every layer keeps for the backward pass.

Papers
------
* Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451
  (section 2: LSH attention, shared-QK, chunking, multi-round hashing, causal masking;
  section 3: reversible layers and chunked feed-forward).
* Andoni, Indyk, Laarhoven, Razenshteyn, Schmidt 2015, "Practical and Optimal LSH for Angular
  Distance", arXiv:1509.02897 (the angular hash Reformer uses: a random rotation, then the
  nearest signed axis).
* Gomez, Ren, Urtasun, Grosse 2017, "The Reversible Residual Network: Backpropagation Without
  Storing Activations", arXiv:1707.04585 (section 3, Algorithm 1: the backward pass).
* Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse Attention with Routing
  Transformers", arXiv:2003.05997 (section 4: online k-means routing).

1. Angular LSH (Reformer section 2; Andoni et al.)
-------------------------------------------------
With ``b`` buckets (``n_buckets``, even) and a random matrix ``R`` of shape ``(D, b/2)``
(Gaussian entries: a random rotation followed by a projection)::

    h(x) = argmax([x R ; -x R])          an integer in 0 .. b-1         (:func:`lsh_hash`)

``[u ; w]`` is concatenation: the hash is the nearest of the b signed axes ``+-e_1 .. +-e_{b/2}``
after the rotation. Only the direction of ``x`` matters: ``h(c x) = h(x)`` for every ``c > 0``.
Two vectors at angle ``theta`` share a bucket with a probability that depends on ``theta`` and
``b`` only, and falls as the angle grows (:func:`collision_probability`); for ``b = 2`` (one
random hyperplane) it is ``1 - theta / pi``. ``n_rounds`` independent rotations ``R^(r)`` give
``n_rounds`` hashes; two vectors meet in at least one with probability ``1 - (1 - p)^n_rounds``.

2. Shared-QK attention
----------------------
Queries and keys come from one projection, and keys are normalised::

    k_j = q_j / |q_j|,     s_ij = q_i . k_j / sqrt(D)                   (:func:`shared_qk_attention`)

so one hash puts a query and its own key in the same bucket, and every bucket holds as many
queries as keys. A query never attends to itself unless it has no other key: ``q_i . k_i =
|q_i|`` is the largest ``q_i . k_j`` can be, so self-attention would dominate every row.
(Whenever a query is alone, the first token under a causal mask for instance, it attends to
itself with weight 1, so no row is ever empty.)

3. Sort, chunk, look one chunk back (:func:`lsh_attention`)
----------------------------------------------------------
In each round, positions are sorted by ``(bucket, position)`` (:func:`sort_by_bucket`); the
sorted sequence is cut into chunks of ``m`` = ``chunk_len`` consecutive entries (the last chunk is
padded when ``m`` does not divide ``L``); chunk ``c`` attends to chunks ``c`` and ``c - 1``
(:func:`look_one_back`; chunk 0 looks back at the last chunk, as in the reference
implementations, which matters only with two chunks or when one bucket spans the whole sorted
sequence). Within
that window a query keeps only keys of its own bucket, and under ``causal`` only keys at
positions ``j <= i`` (positions, not sorted slots). With ``s_i`` the slot of ``i`` after sorting,
the keys query ``i`` attends to in round ``r`` are::

    A_i^(r) = { j != i : h^(r)(q_j) = h^(r)(q_i),  floor(s_j/m) in {floor(s_i/m), floor(s_i/m) - 1},
                         (j <= i if causal) }

Cost per round: ``L / m`` chunks of ``m x 2m`` scores, ``2 m L D`` multiply-adds instead of ``L^2 D``.

4. Several rounds, combined by their log-sum-exp (Reformer, multi-round LSH attention)
--------------------------------------------------------------------------------------
Each round gives an output and the log of its softmax normaliser::

    lse_i^(r) = logsumexp_{j in A_i^(r)} (s_ij - log N_ij)
    o_i^(r) = sum_{j in A_i^(r)} exp(s_ij - log N_ij - lse_i^(r)) v_j
    o_i     = sum_r exp(lse_i^(r) - lse_i) o_i^(r),        lse_i = logsumexp_r lse_i^(r)

``N_ij`` counts the rounds in which ``i`` attends to ``j``; subtracting ``log N_ij`` stops a key
found in several rounds from counting several times. Then ``o_i`` is exactly softmax attention
over the union ``A_i = U_r A_i^(r)``, each key once (:func:`lsh_mask` gives that union, and the
tests check ``lsh_attention == shared_qk_attention(mask=lsh_mask(...))``). More rounds, larger
unions, closer to full attention. The paper writes the same correction as a mask term ``m_ij``
(``log N_ij``, and ``10^5`` for ``i = j``); here ``N_ij`` counts the rounds in which ``j`` is really
attended (same bucket *and* inside the chunk window), and ``i = j`` is excluded exactly, so the
union is exact. A query with no key in any round is alone and gets ``v_i``.

5. Reversible residual layers (Gomez et al. 2017; Reformer section 3)
--------------------------------------------------------------------
The width is split into two halves ``(x1, x2)``; a block with sub-layers F (attention) and G
(feed-forward) computes::

    y1 = x1 + F(x2)          y2 = x2 + G(y1)                             (:class:`ReversibleBlock`)
    x2 = y2 - G(y1)          x1 = y1 - F(x2)                             (its inverse)

so a stack's inputs can be recomputed from its outputs, layer by layer, during the backward
pass (Gomez et al. Algorithm 1), given the gradients ``dy1, dy2`` of the outputs::

    recompute g = G(y1), x2 = y2 - g;   dy1 <- dy1 + (dG/dy1)^T dy2;   grads of G's weights
    recompute f = F(x2), x1 = y1 - f;   dx2 = dy2 + (dF/dx2)^T dy1;    dx1 = dy1; grads of F's

:func:`reversible_sequence` runs a stack this way (a ``torch.autograd.Function``): only the last
block's outputs are kept, so the activation memory does not grow with depth
(:func:`saved_activation_memory` measures it), at the price of one more forward pass. Random
sub-layers (dropout, LSH's rotations) replay the RNG state of the forward pass.

6. Chunked feed-forward (Reformer section 3)
-------------------------------------------
The feed-forward network acts on each position alone, so
``FFN(X) = [FFN(X_1); ...; FFN(X_c)]`` for ``c`` chunks of positions: only ``(B, L/c, d_ff)`` of
the wide hidden layer exists at once (:func:`chunked_feed_forward`,
``ReversibleBlock(..., chunks=c)`` also in the backward pass; :func:`largest_intermediate`
measures it).

7. Routing attention (Roy et al. 2021)
--------------------------------------
``C`` centroids ``mu_1 .. mu_C`` (unit vectors, one set per head) cluster queries and keys by
cosine similarity; query ``i`` attends to the keys of its own cluster::

    c(x) = argmax_c  (x / |x|) . mu_c                                     (:func:`cluster_assign`)
    X_i  = { j : c(k_j) = c(q_i) }   (and j <= i if causal)              (:func:`routing_attention`)

The centroids follow the data by online (mini-batch, spherical) k-means with a decay ``lambda``
(:func:`kmeans_update`)::

    mu_c <- normalise(lambda mu_c + (1 - lambda) mean{ x / |x| : x in Q or K, c(x) = c })

(the paper writes the step with the sums of the assigned queries and keys, each half weighted
``(1 - lambda) / 2``, ``lambda = 0.999``; the mean makes the step independent of the batch size).
For balanced work each centroid takes its ``w`` nearest queries and ``w`` nearest keys
(``window=w``, top-w by similarity): ``C`` groups of ``w x w`` scores, ``O(L^2 / C)`` with
``w = L / C``, ``O(L^1.5)`` with ``C ~ sqrt(L)``. A query picked by several centroids combines
them like LSH rounds (log-sum-exp weights, each key once); a query no centroid picks, or one
with no visible key, gets a zero output (the library's rule for an empty row).

Shapes and masks
----------------
Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``. Buckets are
``(B, H, n_rounds, L)`` integers. A boolean mask is ``True`` where attention is **allowed**, as
everywhere in the library.

Glossary (variable -> paper symbol)
-----------------------------------
=========================  ==================================================================
``qk``                     the shared queries/keys Q = K before normalising, ``(B, H, L, D)``
``k`` (shared-QK)          k_j = q_j / |q_j|
``v``                      V, ``(B, H, L, Dv)``
``n_buckets``              n_buckets = b (even); the rotation R is ``(D, b/2)``
``n_rounds``               n_rounds (the paper's number of hash functions h^(1) .. h^(n_rounds))
``rotations``              R^(r): ``(H, n_rounds, D, b/2)`` or ``(n_rounds, D, b/2)``
``buckets``                h^(r)(q_i), ``(B, H, n_rounds, L)``
``order`` / ``rank``       the sort: ``order[s]`` is the position in slot s; ``rank[i]`` = s_i
``chunk_len``              m, the chunk length (the paper suggests about 2 L / n_buckets)
``counts``                 N_ij, the number of rounds in which i attends to j
``round_lse``              lse_i^(r) = z(i, P_i^(r)) of the paper, ``(B, H, n_rounds, L)``
``round_weights``          exp(lse_i^(r) - lse_i), the weight of round r for query i
``x1, x2`` / ``y1, y2``    the two halves of a reversible block's input / output
``F``, ``G``               the reversible block's sub-layers (attention, feed-forward)
``chunks``                 c, the number of position chunks of the feed-forward network
``centroids``              mu_1 .. mu_C, ``(H, C, D)`` or ``(C, D)``, unit length
``decay``                  lambda of the k-means update
``window``                 w, queries and keys per centroid in balanced routing
=========================  ==================================================================

Every function is device- and dtype-agnostic, and random draws come from an explicit
``torch.Generator`` (or an int seed) when one is given, else from the global RNG
(``seed_everything``). Nothing loops over positions: batch, heads, rounds and chunks are
tensor dimensions.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import _check_qkv, _check_tensor, _shape, causal_mask, merge_heads, split_heads
from .attention import scaled_dot_product_attention as _readable_attention

__all__ = [
    # hashing
    "lsh_rotations",
    "lsh_hash",
    "collision_probability",
    "collision_probability_mc",
    # shared-QK and LSH attention
    "shared_qk_keys",
    "shared_qk_attention",
    "sort_by_bucket",
    "look_one_back",
    "lsh_mask",
    "LSHDetails",
    "combine_rounds",
    "lsh_attention",
    "LSHSelfAttention",
    # reversible layers and chunking
    "chunked_feed_forward",
    "ReversibleBlock",
    "reversible_sequence",
    "ReversibleSequence",
    "ActivationMemory",
    "saved_activation_memory",
    "largest_intermediate",
    # routing attention
    "init_centroids",
    "cluster_assign",
    "kmeans_update",
    "routing_attention",
]

Generatorish = Union[torch.Generator, int, None]


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _check_int(name: str, value, minimum: Optional[int] = None, what: str = "") -> int:
    if isinstance(value, (bool, float)) or (isinstance(value, Tensor) and (
            value.is_floating_point() or value.dtype == torch.bool)):
        raise TypeError(f"{name} must be an int{what}; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(f"{name} must be an int{what}; got {type(value).__name__} {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{what}; got {name}={value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def _check_buckets(n_buckets) -> int:
    """The angular hash takes the argmax over [xR; -xR]: b/2 directions and their negatives."""
    what = " (the hash picks one of n_b/2 rotated axes or its negative: n_b must be even and >= 2)"
    n_buckets = _check_int("n_buckets", n_buckets, what=what)
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even number >= 2{what}; got n_buckets={n_buckets}")
    return n_buckets


def _check_chunk_len(chunk_len, L: int) -> int:
    chunk_len = _check_int("chunk_len", chunk_len)
    if not 1 <= chunk_len <= L:
        raise ValueError(
            f"chunk_len must be between 1 and the sequence length L={L} (a chunk is a run of "
            f"the sorted sequence, so it cannot be longer than the sequence); got chunk_len={chunk_len}")
    return chunk_len


def _generator(generator: Generatorish) -> Optional[torch.Generator]:
    """None (the global RNG), a torch.Generator, or an int seed for a fresh CPU generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError("generator must be a torch.Generator, an int seed or None (the global RNG); "
                    f"got {type(generator).__name__}")


def _randn(shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """Gaussian draws from ``generator`` (made on its device, in float32), then moved and cast.

    Drawing in float32 whatever the input's dtype gives float32 and float64 inputs the same
    rotations (and so the same buckets)."""
    where = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _check_halves(x1, x2) -> None:
    _check_tensor("x1", x1)
    _check_tensor("x2", x2)
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(
            "a reversible block's two halves must be equally wide (x1 and x2 have the same last "
            f"dimension, d_model / 2 each); got x1 {_shape(x1)} (width {x1.shape[-1]}) and "
            f"x2 {_shape(x2)} (width {x2.shape[-1]})")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape (batch, seq, width); got x1 "
                         f"{_shape(x1)} and x2 {_shape(x2)}")


# ----------------------------------------------------------------------------
# 1. Angular LSH
# ----------------------------------------------------------------------------

def lsh_rotations(dim: int, n_buckets: int, n_rounds: int = 1, n_heads: Optional[int] = None,
                  generator: Generatorish = None, device=None, dtype=None) -> Tensor:
    """Random matrices R^(r) for the angular hash: ``(n_rounds, D, b/2)``, or ``(H, n_rounds, D, b/2)``.

    Gaussian entries (the reference implementations' choice: a random rotation followed by a
    projection onto b/2 axes). One independent R per round, and per head when ``n_heads`` is
    given; shared by the batch, as in Reformer.
    """
    dim = _check_int("dim", dim, 1)
    n_buckets = _check_buckets(n_buckets)
    n_rounds = _check_int("n_rounds", n_rounds, 1)
    lead = () if n_heads is None else (_check_int("n_heads", n_heads, 1),)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return _randn((*lead, n_rounds, dim, n_buckets // 2), _generator(generator), device, dtype)


def lsh_hash(x: Tensor, n_buckets: int, n_rounds: int = 1, generator: Generatorish = None,
             rotations: Optional[Tensor] = None) -> Tensor:
    """Angular LSH buckets ``h(x) = argmax([x R; -x R])``: (..., L, D) -> (..., n_rounds, L) int64.

    Args:
        x: ``(B, H, L, D)`` (one rotation per head and round, shared by the batch), or any
            ``(..., L, D)`` (one rotation per round, shared by everything).
        n_buckets: b, even and >= 2. n_rounds: independent hashes.
        generator: a ``torch.Generator`` or an int seed for the rotations; None: global RNG.
        rotations: R instead of fresh draws, ``(..., n_rounds, D, b/2)`` broadcastable against
            x's leading dims (``(H, n_rounds, D, b/2)`` for a (B, H, L, D) input).

    The hash sees the direction of x only: scaling a vector by ``c > 0`` keeps its bucket.
    """
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (..., L, D) with at least 2 dims; got shape {_shape(x)}")
    n_buckets = _check_buckets(n_buckets)
    n_rounds = _check_int("n_rounds", n_rounds, 1)
    D = x.shape[-1]
    if rotations is None:
        n_heads = x.shape[1] if x.dim() == 4 else None
        rotations = lsh_rotations(D, n_buckets, n_rounds, n_heads, generator, x.device, x.dtype)
    else:
        _check_tensor("rotations", rotations)
        if rotations.dim() < 3 or tuple(rotations.shape[-3:]) != (n_rounds, D, n_buckets // 2):
            raise ValueError(
                f"rotations must end in (n_rounds={n_rounds}, D={D}, n_buckets/2={n_buckets // 2}); "
                f"got shape {_shape(rotations)}")
    x = x.detach()
    rotated = x.unsqueeze(-3) @ rotations.to(x.dtype)  # x R: (..., n_rounds, L, b/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # argmax [xR; -xR]: (..., n_rounds, L)


def _gauss_legendre(n: int, a, b, dtype=torch.float64):
    """Gauss-Legendre nodes and weights on [a, b] (a, b: tensors broadcast against the nodes)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    nodes = torch.as_tensor(nodes, dtype=dtype)
    weights = torch.as_tensor(weights, dtype=dtype)
    half = (b - a) / 2
    return half * nodes + (a + b) / 2, half * weights


def collision_probability(angle, n_buckets: int, n_rounds: int = 1, n_points: int = 64) -> Tensor:
    """Theory: the probability that two vectors at ``angle`` (radians) share an angular-LSH bucket.

    With ``n_rounds`` independent hashes, the probability that they share a bucket in at least
    one round: ``1 - (1 - p)^n_rounds``. Returns float64 with the shape of ``angle``.

    How it is computed. Only the projections of the two vectors on the plane they span matter,
    so take ``x = e_1``, ``y = cos(t) e_1 + sin(t) e_2`` and ``k = b/2`` Gaussian columns of R:
    the pairs ``(u_c, w_c) = (x.R_c, y.R_c)`` are independent, standard normal with correlation
    ``rho = cos t``. By symmetry (b equally likely buckets)::

        p = b * P(u_1 > 0, w_1 > 0, |u_c| <= u_1 and |w_c| <= w_1 for c = 2..k)
          = b * E[ 1{u_1 > 0, w_1 > 0} G(u_1, w_1)^(k-1) ],   G(a, c) = P(|u| <= a, |w| <= c)

    The outer expectation is a 2-D integral over (u_1, z) with w_1 = rho u_1 + sin(t) z, written
    in polar coordinates (the region is the wedge of angles (t - pi/2, pi/2)); G is a 1-D
    integral. Gauss-Legendre quadrature with ``n_points`` nodes per dimension is accurate to
    about 1e-5. For b = 2 it is exactly ``1 - t / pi`` (Charikar's hyperplane hash).
    """
    n_buckets = _check_buckets(n_buckets)
    n_rounds = _check_int("n_rounds", n_rounds, 1)
    n_points = _check_int("n_points", n_points, 4)
    angle = torch.as_tensor(angle, dtype=torch.float64)
    if ((angle < -1e-6) | (angle > math.pi + 1e-6)).any() or angle.isnan().any():
        raise ValueError(f"angle must be in [0, pi] radians; got values in "
                         f"[{float(angle.min()):.4g}, {float(angle.max()):.4g}]")
    angle = angle.clamp(0.0, math.pi)  # float32 pi rounds up past math.pi
    k = n_buckets // 2
    flat = angle.detach().cpu().reshape(-1)
    out = torch.empty_like(flat)
    phi = torch.distributions.Normal(0.0, 1.0)
    for n, t in enumerate(flat.tolist()):  # one 3-D quadrature per angle (not a loop over positions)
        if t <= 0.0 or t >= math.pi:
            out[n] = 1.0 if t <= 0.0 else 0.0  # the same direction / the opposite direction
            continue
        if k == 1:
            out[n] = 1.0 - t / math.pi
            continue
        rho, s = math.cos(t), math.sin(t)
        ang, w_ang = _gauss_legendre(n_points, torch.tensor(t - math.pi / 2), torch.tensor(math.pi / 2))
        r, w_r = _gauss_legendre(n_points, torch.tensor(0.0), torch.tensor(9.0))
        a = r[None, :] * torch.cos(ang)[:, None]  # u_1 = r cos(phi): (n_ang, n_r)
        c = r[None, :] * torch.cos(ang - t)[:, None]  # w_1 = rho u_1 + s z = r cos(phi - t)
        nodes, w_u = _gauss_legendre(n_points, torch.tensor(-1.0), torch.tensor(1.0))
        u = a[..., None] * nodes  # u in [-a, a]: (n_ang, n_r, n_u)
        inside = phi.cdf((c[..., None] - rho * u) / s) - phi.cdf((-c[..., None] - rho * u) / s)
        G = (a[..., None] * w_u * phi.log_prob(u).exp() * inside).sum(-1).clamp(0.0, 1.0)
        density = r * torch.exp(-r * r / 2) / (2 * math.pi)  # polar Gaussian density, r dr dphi
        out[n] = n_buckets * ((density * G ** (k - 1)) @ w_r) @ w_ang
    p = out.clamp(0.0, 1.0).reshape(angle.shape)
    return 1.0 - (1.0 - p) ** n_rounds  # at least one round in common


def collision_probability_mc(angle, n_buckets: int, n_rounds: int = 1, n_trials: int = 4000,
                             dim: int = 16, generator: Generatorish = None) -> Tensor:
    """Monte-Carlo estimate of :func:`collision_probability`, with :func:`lsh_hash` itself.

    For each trial: a random unit vector x in ``dim`` dimensions, a vector y at ``angle`` from it,
    fresh rotations; the fraction of trials in which x and y share a bucket (in at least one of
    ``n_rounds`` rounds). The same trials serve every angle (a smooth curve). float64, the shape
    of ``angle``; its standard error is ``sqrt(p (1 - p) / n_trials)``.
    """
    n_buckets = _check_buckets(n_buckets)
    n_rounds = _check_int("n_rounds", n_rounds, 1)
    n_trials = _check_int("n_trials", n_trials, 1)
    dim = _check_int("dim", dim, 2, " (two vectors at an angle need a plane)")
    g = _generator(generator)
    angle = torch.as_tensor(angle, dtype=torch.float64)
    x = F.normalize(_randn((n_trials, dim), g, "cpu", torch.float64), dim=-1)  # (T, D) unit
    u = _randn((n_trials, dim), g, "cpu", torch.float64)
    u = F.normalize(u - (u * x).sum(-1, keepdim=True) * x, dim=-1)  # orthogonal to x, unit
    t = angle.reshape(-1, 1, 1)  # (A, 1, 1)
    y = torch.cos(t) * x + torch.sin(t) * u  # (A, T, D), at angle t from x
    pairs = torch.stack([x.expand_as(y), y], dim=-2)  # (A, T, 2, D)
    R = lsh_rotations(dim, n_buckets, n_rounds, n_trials, g, "cpu", torch.float64)  # (T, R, D, b/2)
    buckets = lsh_hash(pairs, n_buckets, n_rounds, rotations=R)  # (A, T, R, 2)
    meet = (buckets[..., 0] == buckets[..., 1]).any(dim=-1)  # (A, T): same bucket in some round
    return meet.double().mean(dim=-1).reshape(angle.shape)


# ----------------------------------------------------------------------------
# 2. Shared-QK attention: the full reference
# ----------------------------------------------------------------------------

def shared_qk_keys(qk: Tensor) -> Tensor:
    """Keys of shared-QK attention, ``k_j = q_j / |q_j|`` (a zero vector stays zero): same shape."""
    _check_tensor("qk", qk)
    return F.normalize(qk, dim=-1)  # q_j / |q_j|


def _self_unless_alone(allowed: Tensor) -> Tensor:
    """(..., L, L) boolean -> the same without the diagonal, except rows left empty get it."""
    L = allowed.shape[-1]
    eye = torch.eye(L, dtype=torch.bool, device=allowed.device)
    others = allowed & ~eye  # j != i
    alone = ~others.any(dim=-1, keepdim=True)  # no other key: (..., L, 1)
    return others | (eye & alone)


def shared_qk_attention(qk: Tensor, v: Tensor, causal: bool = False, mask: Optional[Tensor] = None,
                        scale: Optional[float] = None, need_weights: bool = False):
    """Full shared-QK attention, the reference LSH attention approximates.

    Args:
        qk: (B, H, L, D) shared queries/keys; the keys are ``qk / |qk|``.
        v: (B, H, L, Dv) values.
        causal: query i sees keys j <= i only.
        mask: optional boolean (True = attend), broadcastable to (B, H, L, L); e.g. the pairs
            :func:`lsh_mask` returns.
        scale: multiplies the dot products; default 1/sqrt(D).
        need_weights: also return the (B, H, L, L) weights.

    A query never attends to itself unless no other key is allowed; then it attends to itself
    alone (weight 1), so every row has a key. Returns out (B, H, L, Dv) (and the weights).
    """
    _check_qkv(qk, qk, v)
    _check_bool("causal", causal)
    B, H, L, _ = qk.shape
    allowed = torch.ones(L, L, dtype=torch.bool, device=qk.device)  # (L, L)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a boolean tensor (True = attend); got {got}")
        try:
            allowed = torch.broadcast_to(mask, (B, H, L, L))
        except RuntimeError:
            raise ValueError(f"mask must broadcast to {(B, H, L, L)}; got {_shape(mask)}") from None
    if causal:
        allowed = allowed & causal_mask(L, device=qk.device)  # j <= i
    keep = _self_unless_alone(allowed)  # no self unless alone
    k = shared_qk_keys(qk)  # k_j = q_j / |q_j|: (B, H, L, D)
    return _readable_attention(qk, k, v, mask=keep, scale=scale, need_weights=need_weights)


# ----------------------------------------------------------------------------
# 3-4. LSH attention: sort, chunk, look back, rounds
# ----------------------------------------------------------------------------

def sort_by_bucket(buckets: Tensor):
    """Sort positions by ``(bucket, position)`` in each round: buckets (..., L) -> ``(order, rank)``.

    ``order[..., s]`` is the position in sorted slot s; ``rank[..., i]`` is the slot of position i
    (the inverse permutation, ``order[rank[i]] = i``). Within a bucket, positions keep their order.
    """
    if not isinstance(buckets, Tensor) or buckets.is_floating_point() or buckets.dtype == torch.bool:
        raise TypeError("buckets must be an integer tensor (..., L); got "
                        f"{type(buckets).__name__ if not isinstance(buckets, Tensor) else buckets.dtype}")
    L = buckets.shape[-1]
    pos = torch.arange(L, device=buckets.device)  # (L,)
    order = (buckets.long() * L + pos).argsort(dim=-1)  # distinct keys: bucket first, then position
    rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))  # inverse permutation
    return order, rank


def look_one_back(x: Tensor, chunk_dim: int = 3) -> Tensor:
    """Each chunk followed by the chunk before it: (..., n_chunks, m, *) -> (..., n_chunks, 2m, *).

    Chunk 0 gets the last chunk (wrap-around). With a single chunk there is nothing before it
    and ``x`` comes back unchanged (no key twice).
    """
    chunk_dim = chunk_dim % x.dim()
    if x.shape[chunk_dim] == 1:
        return x
    return torch.cat([x, x.roll(1, dims=chunk_dim)], dim=chunk_dim + 1)  # [chunk c; chunk c-1]


@dataclass
class _Windows:
    """Where every sorted query slot looks, per round (internal to lsh_attention / lsh_mask)."""

    order: Tensor  # (B, H, R, L) position in each sorted slot
    rank: Tensor  # (B, H, R, L) slot of each position
    slots: Tensor  # (B, H, R, Lp) order padded to n_chunks * m (padding repeats position 0)
    pos_q: Tensor  # (B, H, R, nc, m) query positions per chunk
    pos_k: Tensor  # (B, H, R, nc, 2m) key positions per window (own chunk + previous)
    visible: Tensor  # (B, H, R, nc, m, 2m) j attended by i in this round
    counts: Optional[Tensor]  # (B, H, R, nc, m, 2m) N_ij (>= 1); None when no key can repeat
    n_chunks: int
    chunk_len: int


def _windows(buckets: Tensor, chunk_len: int, causal: bool, attend_across_buckets: bool,
             dedupe: bool) -> _Windows:
    B, H, R, L = buckets.shape
    m = chunk_len
    nc = -(-L // m)  # ceil(L / m) chunks
    pad = nc * m - L
    order, rank = sort_by_bucket(buckets)  # (B, H, R, L) each
    slots = F.pad(order, (0, pad)) if pad else order  # (B, H, R, Lp); padded slots hold position 0

    def chunked(t):  # (..., Lp) -> (..., nc, m)
        return t.reshape(*t.shape[:-1], nc, m)

    pos_q = chunked(slots)  # (B, H, R, nc, m)
    pos_k = look_one_back(pos_q)  # (B, H, R, nc, 2m) (or m with one chunk)
    visible = pos_k[..., None, :] != pos_q[..., :, None]  # j != i: (B, H, R, nc, m, 2m)
    if not attend_across_buckets:
        bkt_q = chunked(buckets.gather(-1, slots))  # bucket of each sorted slot
        visible &= look_one_back(bkt_q)[..., None, :] == bkt_q[..., :, None]  # same bucket
    if causal:
        visible &= pos_k[..., None, :] <= pos_q[..., :, None]  # j <= i (positions, not slots)
    if pad:
        real = chunked(torch.arange(nc * m, device=buckets.device) < L)  # (nc, m) real slots
        visible &= real[:, :, None] & look_one_back(real[None], chunk_dim=1)[0][:, None, :]

    counts = None
    if dedupe and R > 1:
        # N_ij = number of rounds r' in which i attends to j: same bucket in r' and j's chunk is
        # i's chunk or the one before. One code per position and round, bucket * (nc + 1) +
        # chunk, turns that into two equality tests. Causality and j != i hold in every round
        # alike. A loop over rounds (not positions) keeps memory at one set of windows.
        chunk_of = rank // m  # (B, H, R, L) chunk of each position in each round
        prev_of = (chunk_of - 1) % nc  # the chunk it looks back at
        if not attend_across_buckets:
            chunk_of = chunk_of + buckets * (nc + 1)
            prev_of = prev_of + buckets * (nc + 1)
        counts = torch.zeros(visible.shape, dtype=torch.int16, device=buckets.device)
        for rp in range(R):
            own = chunked(chunk_of[:, :, rp:rp + 1].expand(B, H, R, L).gather(-1, slots))
            back = chunked(prev_of[:, :, rp:rp + 1].expand(B, H, R, L).gather(-1, slots))
            key = look_one_back(own)[..., None, :]  # the key's code in round r'
            counts += (key == own[..., :, None]) | (key == back[..., :, None])
        counts.clamp_(min=1)  # >= 1 wherever visible (round r itself); padding rows are 0
    return _Windows(order, rank, slots, pos_q, pos_k, visible, counts, nc, m)


def _check_bucket_tensor(buckets, shape, n_buckets: int) -> Tensor:
    if not isinstance(buckets, Tensor) or buckets.is_floating_point() or buckets.dtype == torch.bool:
        got = buckets.dtype if isinstance(buckets, Tensor) else type(buckets).__name__
        raise TypeError(f"buckets must be an integer tensor (B, H, n_rounds, L); got {got}")
    if tuple(buckets.shape) != tuple(shape):
        raise ValueError(f"buckets must have shape (B, H, n_rounds, L) = {tuple(shape)}; got "
                         f"{_shape(buckets)}")
    if buckets.numel() and (int(buckets.min()) < 0 or int(buckets.max()) >= n_buckets):
        raise ValueError(f"buckets must lie in [0, n_buckets={n_buckets}); got values in "
                         f"[{int(buckets.min())}, {int(buckets.max())}]")
    return buckets.long()


def _default_chunk_len(L: int, n_buckets: int) -> int:
    return min(L, max(1, -(-2 * L // n_buckets)))  # about 2 L / n_buckets (twice a mean bucket)


def lsh_mask(buckets: Tensor, chunk_len: int, causal: bool = False,
             attend_across_buckets: bool = False) -> Tensor:
    """The pairs LSH attention compares, as a dense boolean mask: buckets (B, H, R, L) -> (B, H, L, L).

    True where query i attends to key j in at least one round (the union ``U_r A_i^(r)``);
    the diagonal is never set (a query alone attends to itself, which
    :func:`shared_qk_attention` adds by itself). For pictures and tests: it is O(L^2).
    """
    if not isinstance(buckets, Tensor) or buckets.is_floating_point() or buckets.dtype == torch.bool:
        got = buckets.dtype if isinstance(buckets, Tensor) else type(buckets).__name__
        raise TypeError(f"buckets must be an integer tensor (B, H, n_rounds, L); got {got}")
    if buckets.dim() != 4 or buckets.shape[-1] == 0:
        raise ValueError(f"buckets must be (B, H, n_rounds, L) with L >= 1; got shape {_shape(buckets)}")
    buckets = buckets.long()
    B, H, R, L = buckets.shape
    chunk_len = _check_chunk_len(chunk_len, L)
    w = _windows(buckets, chunk_len, _check_bool("causal", causal),
                 _check_bool("attend_across_buckets", attend_across_buckets), dedupe=False)
    index = (w.pos_q[..., :, None] * L + w.pos_k[..., None, :]).expand_as(w.visible)  # i * L + j
    dense = torch.zeros(B, H, L * L, dtype=torch.int64, device=buckets.device)
    dense.scatter_add_(-1, index.reshape(B, H, -1), w.visible.reshape(B, H, -1).long())
    return dense.reshape(B, H, L, L) > 0


@dataclass
class LSHDetails:
    """What :func:`lsh_attention` did, for pictures and tests (all detached).

    Attributes:
        buckets: (B, H, n_rounds, L) the hash of every position in every round.
        order: (B, H, n_rounds, L) the position in each sorted slot; ``rank`` its inverse.
        chunk_len: m. n_chunks: ceil(L / m).
        counts_max: the largest N_ij seen (1 means no key was found twice).
        round_lse: (B, H, n_rounds, L) lse_i^(r), -inf where round r found no key for i.
        round_weights: (B, H, n_rounds, L) exp(lse_i^(r) - lse_i); each row sums to 1 over rounds
            (all 0 for a query that is alone).
        round_outputs: (B, H, n_rounds, L, Dv) o_i^(r).
        weights: (B, H, L, L) the effective attention matrix: out = weights @ v.
        visited: (B, H, L, L) boolean, the pairs compared in some round (the union; with the
            diagonal of the queries that were alone).
        alone: (B, H, L) boolean, queries with no key in any round (they attend to themselves).
    """

    buckets: Tensor
    order: Tensor
    rank: Tensor
    chunk_len: int
    n_chunks: int
    counts_max: int
    round_lse: Tensor
    round_weights: Tensor
    round_outputs: Tensor
    weights: Tensor
    visited: Tensor
    alone: Tensor


def combine_rounds(outs: Tensor, lses: Tensor) -> Tensor:
    """Combine hash rounds by their log-sum-exp weights: ``o_i = sum_r exp(lse_i^(r) - lse_i) o_i^(r)``.

    Args:
        outs: (B, H, R, L, Dv) the rounds' outputs o_i^(r).
        lses: (B, H, R, L) their log normalisers lse_i^(r) (``-inf`` for a round with no key).

    ``lse_i = logsumexp_r lse_i^(r)``: round r weighs ``sum_{j in A_i^(r)} exp(s_ij) / sum_r' ...``, its
    share of the softmax mass, so the result is one softmax over all the rounds' keys (each key
    once per round that found it; :func:`lsh_attention` also subtracts ``log N_ij``). A query
    whose every round is ``-inf`` gets ``outs[:, :, 0]``. Stable for large ``z``. Returns
    (B, H, L, Dv).
    """
    _check_tensor("outs", outs, 5, "(B, H, R, L, Dv)")
    _check_tensor("lses", lses, 4, "(B, H, R, L)")
    if tuple(lses.shape) != tuple(outs.shape[:4]):
        raise ValueError(f"lses must be (B, H, R, L) = {tuple(outs.shape[:4])} to match outs "
                         f"{_shape(outs)}; got {_shape(lses)}")
    found = torch.isfinite(lses).any(dim=2, keepdim=True)  # (B, H, 1, L): some round has a key
    safe = lses.masked_fill(~found, 0.0)  # all -inf: equal weights, then replaced below
    weights = torch.softmax(safe, dim=2)  # exp(lse^(r) - logsumexp_r lse^(r)): (B, H, R, L)
    out = (weights[..., None] * outs).sum(dim=2)  # (B, H, L, Dv)
    return torch.where(found[:, :, 0, :, None], out, outs[:, :, 0])


def lsh_attention(qk: Tensor, v: Tensor, n_buckets: int, n_rounds: int = 1,
                  chunk_len: Optional[int] = None, causal: bool = False,
                  generator: Generatorish = None, return_details: bool = False, *,
                  scale: Optional[float] = None, rotations: Optional[Tensor] = None,
                  buckets: Optional[Tensor] = None, dedupe: bool = True,
                  attend_across_buckets: bool = False):
    """Reformer's LSH attention with shared QK: hash, sort, chunk, attend, combine the rounds.

    Args:
        qk: (B, H, L, D) shared queries/keys (keys are ``qk / |qk|``). v: (B, H, L, Dv).
        n_buckets: b, even and >= 2. n_rounds: independent hashes, combined by their
            log-sum-exp weights.
        chunk_len: m, 1 <= m <= L; default ``ceil(2 L / n_buckets)`` (capped at L). When m does
            not divide L the last chunk is padded (padding is never attended).
        causal: query i attends to positions j <= i only (within its bucket).
        generator: a ``torch.Generator`` or an int seed for the rotations; None: global RNG.
        return_details: also return an :class:`LSHDetails` (dense (L, L) pictures included).
        scale: multiplies the dot products; default 1/sqrt(D).
        rotations: use these R (see :func:`lsh_hash`) instead of fresh draws.
        buckets: use these (B, H, n_rounds, L) bucket ids instead of hashing (e.g. all zeros:
            one bucket).
        dedupe: subtract log N_ij so that a key found in several rounds counts once (the
            paper's correction). False: a key counts once per round that finds it.
        attend_across_buckets: attend to every key of the two chunks, whatever its bucket (what
            the trax and Hugging Face implementations do); default False: the paper's rule.

    Returns:
        out (B, H, L, Dv), or ``(out, LSHDetails)``. A query with no other key in any round
        (alone in its bucket, or the first position under ``causal``) gets ``v_i``: it attends
        to itself. Never NaN.
    """
    _check_qkv(qk, qk, v)
    B, H, L, D = qk.shape
    n_buckets = _check_buckets(n_buckets)
    n_rounds = _check_int("n_rounds", n_rounds, 1)
    causal = _check_bool("causal", causal)
    _check_bool("return_details", return_details)
    _check_bool("dedupe", dedupe)
    _check_bool("attend_across_buckets", attend_across_buckets)
    if L == 0:
        raise ValueError(f"qk must hold at least one position (L >= 1); got shape {_shape(qk)}")
    chunk_len = _default_chunk_len(L, n_buckets) if chunk_len is None else _check_chunk_len(chunk_len, L)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None; got {type(scale).__name__}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    R = n_rounds
    if buckets is None:
        buckets = lsh_hash(qk, n_buckets, R, generator, rotations)  # h^(r)(q_i): (B, H, R, L)
    else:
        buckets = _check_bucket_tensor(buckets, (B, H, R, L), n_buckets)

    w = _windows(buckets, chunk_len, causal, attend_across_buckets, dedupe)
    nc, m = w.n_chunks, w.chunk_len
    Dv = v.shape[-1]
    k = shared_qk_keys(qk)  # k_j = q_j / |q_j|: (B, H, L, D)

    def gather(t):  # (B, H, L, E) -> (B, H, R, nc, m, E): the rows of each sorted slot
        idx = w.slots[..., None].expand(B, H, R, nc * m, t.shape[-1])
        return t[:, :, None].expand(B, H, R, L, t.shape[-1]).gather(3, idx).reshape(B, H, R, nc, m, -1)

    q_c = gather(qk)  # queries, sorted and chunked: (B, H, R, nc, m, D)
    k_w = look_one_back(gather(k))  # keys of own + previous chunk: (B, H, R, nc, 2m, D)
    v_w = look_one_back(gather(v))  # (B, H, R, nc, 2m, Dv)
    scores = (q_c * scale) @ k_w.transpose(-2, -1)  # s_ij = q_i . k_j / sqrt(D): (B, H, R, nc, m, 2m)
    if w.counts is not None:
        scores = scores - w.counts.to(scores.dtype).log()  # - log N_ij (0 when found once)
    scores = scores.masked_fill(~w.visible, float("-inf"))  # other buckets, future, self, padding
    has_key = w.visible.any(dim=-1)  # (B, H, R, nc, m)
    lse = torch.logsumexp(scores, dim=-1)  # lse_i^(r): (B, H, R, nc, m); -inf for a row with no key
    # exp(-inf - 0) = 0 in an empty row; its NaN gradient inside logsumexp is zeroed by masked_fill
    probs = torch.exp(scores - lse.masked_fill(~has_key, 0.0)[..., None])  # (B, H, R, nc, m, 2m)
    out_sorted = probs @ v_w  # o_i^(r) in sorted order: (B, H, R, nc, m, Dv)

    # Undo the sort: slot rank[i] of round r holds position i (padding slots come last).
    out_r = out_sorted.reshape(B, H, R, nc * m, Dv)[:, :, :, :L]
    out_r = out_r.gather(3, w.rank[..., None].expand(B, H, R, L, Dv))  # (B, H, R, L, Dv)
    lse_r = lse.reshape(B, H, R, nc * m)[..., :L].gather(-1, w.rank)  # (B, H, R, L)
    has_r = has_key.reshape(B, H, R, nc * m)[..., :L].gather(-1, w.rank)  # (B, H, R, L)

    # Combine the rounds: o_i = sum_r exp(lse_i^(r) - lse_i) o_i^(r), lse_i = logsumexp_r lse_i^(r).
    found = has_r.any(dim=2)  # (B, H, L): some key in some round
    lse_r = lse_r.masked_fill(~has_r, float("-inf"))  # a round with no key weighs 0
    lse_safe = lse_r.masked_fill(~found[:, :, None], 0.0)  # alone: no -inf - (-inf)
    total = torch.logsumexp(lse_safe, dim=2)  # lse_i: (B, H, L)
    round_w = torch.exp(lse_safe - total[:, :, None]).masked_fill(~has_r, 0.0)  # (B, H, R, L)
    out = (round_w[..., None] * out_r).sum(dim=2)  # (B, H, L, Dv)
    out = torch.where(found[..., None], out, v)  # alone: attend to oneself, o_i = v_i
    if not return_details:
        return out

    with torch.no_grad():
        rw_sorted = round_w.gather(-1, w.order)  # round weight of the query in each slot
        rw_sorted = F.pad(rw_sorted, (0, nc * m - L)).reshape(B, H, R, nc, m)
        contrib = probs.detach() * rw_sorted[..., None]  # (B, H, R, nc, m, 2m)
        index = (w.pos_q[..., :, None] * L + w.pos_k[..., None, :]).expand_as(contrib)  # i L + j
        dense = torch.zeros(B, H, L * L, dtype=contrib.dtype, device=qk.device)
        dense.scatter_add_(-1, index.reshape(B, H, -1), contrib.reshape(B, H, -1))
        seen = torch.zeros(B, H, L * L, dtype=torch.int64, device=qk.device)
        seen.scatter_add_(-1, index.reshape(B, H, -1), w.visible.reshape(B, H, -1).long())
        eye = torch.eye(L, dtype=torch.bool, device=qk.device)
        alone = ~found
        weights = dense.reshape(B, H, L, L) + (eye & alone[..., None]).to(contrib.dtype)
        visited = (seen.reshape(B, H, L, L) > 0) | (eye & alone[..., None])
        details = LSHDetails(
            buckets=buckets, order=w.order, rank=w.rank, chunk_len=m, n_chunks=nc,
            counts_max=int(w.counts.max()) if w.counts is not None else 1,
            round_lse=lse_r.detach(), round_weights=round_w.detach(),
            round_outputs=out_r.detach(), weights=weights, visited=visited, alone=alone)
    return out, details


class LSHSelfAttention(nn.Module):
    """Multi-head LSH self-attention with one shared query/key projection (Reformer).

    ``qk = x W^{QK}`` (one matrix where ordinary attention has W^Q and W^K), ``v = x W^V``, heads
    split as in ``attention.MultiHeadAttention``, :func:`lsh_attention` per head (fresh random
    rotations on every call, from ``generator`` or the global RNG), then ``W^O``.
    ``full=True`` runs :func:`shared_qk_attention` instead (the exact reference).

    Inside a :class:`ReversibleBlock` leave ``generator`` None: the block replays the global RNG
    state in the backward pass, so the recomputation hashes with the same rotations.

    ``forward(x, generator=None)``: x (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(self, d_model: int, n_heads: int, n_buckets: int, n_rounds: int = 1,
                 chunk_len: Optional[int] = None, causal: bool = False, bias: bool = False,
                 full: bool = False):
        super().__init__()
        d_model = _check_int("d_model", d_model, 1)
        n_heads = _check_int("n_heads", n_heads, 1)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.n_buckets = _check_buckets(n_buckets)
        self.n_rounds = _check_int("n_rounds", n_rounds, 1)
        self.chunk_len = None if chunk_len is None else _check_int("chunk_len", chunk_len, 1)
        self.causal, self.full = _check_bool("causal", causal), _check_bool("full", full)
        self.qk = nn.Linear(d_model, d_model, bias=bias)  # W^{QK}: queries = keys
        self.v = nn.Linear(d_model, d_model, bias=bias)  # W^V
        self.out = nn.Linear(d_model, d_model, bias=bias)  # W^O

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_buckets={self.n_buckets}, "
                f"n_rounds={self.n_rounds}, chunk_len={self.chunk_len}, causal={self.causal}, "
                f"full={self.full}")

    def forward(self, x: Tensor, generator: Generatorish = None) -> Tensor:
        _check_tensor("x", x, 3, "(batch, seq, d_model)")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}; got shape {_shape(x)}")
        qk = split_heads(self.qk(x), self.n_heads)  # (B, H, L, D)
        v = split_heads(self.v(x), self.n_heads)  # (B, H, L, D)
        if self.full:
            o = shared_qk_attention(qk, v, causal=self.causal)
        else:
            o = lsh_attention(qk, v, self.n_buckets, self.n_rounds, self.chunk_len, self.causal,
                              generator)
        return self.out(merge_heads(o))  # (B, L, d_model)


# ----------------------------------------------------------------------------
# 5-6. Reversible layers and chunked feed-forward
# ----------------------------------------------------------------------------

def chunked_feed_forward(ffn: Callable[[Tensor], Tensor], x: Tensor, chunks: int,
                         dim: int = -2) -> Tensor:
    """``ffn`` applied to ``chunks`` slices of positions in turn, concatenated: equal to ``ffn(x)``.

    ``x`` (B, L, d_model), cut along ``dim`` (the positions). Valid for position-wise networks
    only (the FFN of a block); only a (B, L / chunks, d_ff) slice of the hidden layer exists at
    a time. ``chunks`` may exceed L (then one position per chunk).
    """
    _check_tensor("x", x)
    chunks = _check_int("chunks", chunks, 1)
    if not callable(ffn):
        raise TypeError(f"ffn must be callable (a module or function); got {type(ffn).__name__}")
    if chunks == 1:
        return ffn(x)
    return torch.cat([ffn(part) for part in x.chunk(chunks, dim=dim)], dim=dim)  # [FFN(X_1); ...]


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replaying(state, device: torch.device):
    """Run the body with the RNG as it was at ``state`` (None: as it is); restore it after."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _grads(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor):
    """torch.autograd.grad with zeros (not None) for inputs the outputs do not depend on."""
    if not outputs.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    got = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got, strict=True)]


class ReversibleBlock(nn.Module):
    """A reversible residual block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` (Gomez et al. 2017).

    Args:
        F: the first sub-layer, (B, L, w) -> (B, L, w) (attention in Reformer).
        G: the second, position-wise sub-layer (the feed-forward network).
        chunks: run G on this many chunks of positions (:func:`chunked_feed_forward`), in the
            forward pass and in the recomputation of the backward pass.

    ``forward(x1, x2) -> (y1, y2)`` is an ordinary residual block under autograd (it stores its
    activations); ``inverse(y1, y2) -> (x1, x2)`` recovers the inputs; :func:`reversible_sequence`
    runs a stack of these blocks without storing activations. x1 and x2 must have the same
    shape: the model width is split into two equal halves.
    """

    def __init__(self, F: nn.Module, G: nn.Module, chunks: int = 1):
        super().__init__()
        for name, f in (("F", F), ("G", G)):
            if not callable(f):
                raise TypeError(f"{name} must be callable (an nn.Module); got {type(f).__name__}")
        self.F, self.G = F, G
        self.chunks = _check_int("chunks", chunks, 1)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"

    def _f(self, x2: Tensor, like: Tensor) -> Tensor:
        f = self.F(x2)
        if not isinstance(f, Tensor) or f.shape != like.shape:
            raise ValueError(f"F(x2) must have the shape of x1 {_shape(like)}; got "
                             f"{_shape(f) if isinstance(f, Tensor) else type(f).__name__}")
        return f

    def _g(self, y1: Tensor) -> Tensor:
        g = chunked_feed_forward(self.G, y1, self.chunks)
        if g.shape != y1.shape:
            raise ValueError(f"G(y1) must have the shape of y1 {_shape(y1)}; got {_shape(g)}")
        return g

    def forward(self, x1: Tensor, x2: Tensor):
        _check_halves(x1, x2)
        y1 = x1 + self._f(x2, x1)  # y1 = x1 + F(x2)
        y2 = x2 + self._g(y1)  # y2 = x2 + G(y1)
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor):
        """The inputs from the outputs: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``.

        Exact up to rounding when F and G are deterministic (eval mode, or the RNG replayed)."""
        _check_halves(y1, y2)
        x2 = y2 - self._g(y1)  # x2 = y2 - G(y1)
        x1 = y1 - self._f(x2, y1)  # x1 = y1 - F(x2)
        return x1, x2

    def _forward_recording(self, x1: Tensor, x2: Tensor, preserve_rng_state: bool):
        """Forward pass that also records the RNG state before F and before G."""
        state_f = _rng_state(x1.device) if preserve_rng_state else None
        y1 = x1 + self._f(x2, x1)
        state_g = _rng_state(x1.device) if preserve_rng_state else None
        y2 = x2 + self._g(y1)
        return y1, y2, (state_f, state_g)

    def _backward_step(self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor, states):
        """Gomez et al. Algorithm 1: the inputs and their gradients from the outputs and theirs.

        Returns ``(x1, x2, dx1, dx2, [(parameter, gradient), ...])``.
        """
        state_f, state_g = states if states is not None else (None, None)
        device = y1.device
        g_params = [p for p in self.G.parameters() if p.requires_grad]
        f_params = [p for p in self.F.parameters() if p.requires_grad]
        g_param_grads = [torch.zeros_like(p) for p in g_params]
        g_parts, dy1_parts = [], []
        # G, chunk by chunk of positions, so only one chunk of its hidden layer exists at a time
        with _replaying(state_g, device):
            for y1_part, dy2_part in zip(y1.chunk(self.chunks, dim=-2), dy2.chunk(self.chunks, dim=-2),
                                         strict=True):
                with torch.enable_grad():
                    y1_leaf = y1_part.detach().requires_grad_(True)
                    g = self.G(y1_leaf)  # recompute G(y1)
                grads = _grads(g, [y1_leaf, *g_params], dy2_part)
                g_parts.append(g.detach())
                dy1_parts.append(grads[0])
                for acc, gr in zip(g_param_grads, grads[1:], strict=True):
                    acc += gr
        x2 = y2 - torch.cat(g_parts, dim=-2)  # x2 = y2 - G(y1)
        dy1 = dy1 + torch.cat(dy1_parts, dim=-2)  # dL/dy1 through y1 and through G(y1)
        with _replaying(state_f, device):
            with torch.enable_grad():
                x2_leaf = x2.detach().requires_grad_(True)
                f = self.F(x2_leaf)  # recompute F(x2)
            grads = _grads(f, [x2_leaf, *f_params], dy1)
        x1 = y1 - f.detach()  # x1 = y1 - F(x2)
        dx2 = dy2 + grads[0]  # dL/dx2 through y2 and through F(x2)
        dx1 = dy1
        pairs = list(zip(g_params, g_param_grads, strict=True))
        pairs += list(zip(f_params, grads[1:], strict=True))
        return x1, x2, dx1, dx2, pairs


class _ReversibleFunction(torch.autograd.Function):
    """A stack of ReversibleBlocks whose backward pass recomputes activations from the outputs."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, preserve_rng_state, *params):
        states = []
        with torch.no_grad():
            for block in blocks:
                x1, x2, state = block._forward_recording(x1, x2, preserve_rng_state)
                states.append(state if preserve_rng_state else None)
        ctx.blocks, ctx.states, ctx.params = blocks, states, params
        y1, y2 = x1.detach(), x2.detach()
        ctx.save_for_backward(y1, y2)  # the only activations kept: the last block's outputs
        return y1, y2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        grads = {id(p): torch.zeros_like(p) for p in ctx.params}
        for block, state in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            y1, y2, dy1, dy2, pairs = block._backward_step(y1, y2, dy1, dy2, state)
            for p, g in pairs:
                grads[id(p)] += g  # a parameter shared by several blocks gets every share
        return (dy1, dy2, None, None, *(grads[id(p)] for p in ctx.params))


def reversible_sequence(blocks: Sequence[ReversibleBlock], x1: Tensor, x2: Tensor,
                        preserve_rng_state: bool = True):
    """Run ``blocks`` on ``(x1, x2)``, keeping only the last outputs for the backward pass.

    The backward pass walks the stack from the top, recovering each block's inputs from its
    outputs (``ReversibleBlock.inverse``) and recomputing F and G to get the gradients
    (Gomez et al. Algorithm 1), so activation memory does not grow with depth. The gradients
    equal those of the ordinary stack (``for b in blocks: x1, x2 = b(x1, x2)``) up to rounding.

    ``preserve_rng_state``: record the RNG state before each F and G and replay it in the
    backward pass, so dropout or LSH's random rotations draw the same numbers again (a few
    kilobytes per block, independent of the batch and the length).

    Returns ``(y1, y2)``, each of x1's shape.
    """
    blocks = list(blocks)
    for n, block in enumerate(blocks):
        if not isinstance(block, ReversibleBlock):
            raise TypeError(f"blocks[{n}] must be a ReversibleBlock; got {type(block).__name__}")
    _check_halves(x1, x2)
    _check_bool("preserve_rng_state", preserve_rng_state)
    if not blocks:
        return x1, x2
    params, seen = [], set()
    for block in blocks:
        for p in block.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not torch.is_grad_enabled() or not (x1.requires_grad or x2.requires_grad or params):
        with torch.no_grad():  # nothing to differentiate: a plain forward pass
            for block in blocks:
                x1, x2 = block(x1, x2)
        return x1, x2
    return _ReversibleFunction.apply(x1, x2, blocks, preserve_rng_state, *params)


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReversibleBlock`; ``reversible=False`` runs it as an ordinary stack.

    ``forward(x1, x2) -> (y1, y2)``. Reformer feeds the same input to both halves
    (``x1 = x2 = x``) and joins the outputs at the end (concatenated, or averaged).
    """

    def __init__(self, blocks: Sequence[ReversibleBlock], reversible: bool = True,
                 preserve_rng_state: bool = True):
        super().__init__()
        blocks = list(blocks)
        for n, block in enumerate(blocks):
            if not isinstance(block, ReversibleBlock):
                raise TypeError(f"blocks[{n}] must be a ReversibleBlock; got {type(block).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.reversible = _check_bool("reversible", reversible)
        self.preserve_rng_state = _check_bool("preserve_rng_state", preserve_rng_state)

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"

    def forward(self, x1: Tensor, x2: Tensor):
        if self.reversible:
            return reversible_sequence(self.blocks, x1, x2, self.preserve_rng_state)
        _check_halves(x1, x2)
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return x1, x2


@dataclass(frozen=True)
class ActivationMemory:
    """What autograd keeps for the backward pass: ``bytes`` in ``tensors`` distinct storages."""

    bytes: int
    tensors: int


def saved_activation_memory(fn: Callable, *args, exclude: Sequence[Tensor] = (),
                            **kwargs) -> ActivationMemory:
    """Run ``fn(*args, **kwargs)`` and measure the activations autograd saves for backward.

    Every tensor that an operation saves for its backward pass goes through
    ``torch.autograd.graph.saved_tensors_hooks``; this counts the distinct storages among them
    and their bytes. Parameters (of ``fn`` if it is an ``nn.Module``, and any in ``exclude``) are
    not activations and are left out. Deterministic and machine-independent, unlike the
    process's memory: it is the part of the peak that grows with depth (the peak adds one
    layer's temporary workspace on top).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    if isinstance(fn, nn.Module):
        skip |= {p.untyped_storage().data_ptr() for p in fn.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip:
            kept[ptr] = storage  # holding the storage keeps its address from being reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    result = ActivationMemory(sum(s.nbytes() for s in kept.values()), len(kept))
    kept.clear()
    del out
    return result


def largest_intermediate(fn: Callable, *args, **kwargs) -> int:
    """Bytes of the largest tensor any operation creates while ``fn(*args, **kwargs)`` runs.

    Measured with a ``TorchDispatchMode`` (every ATen operation's outputs are seen); shows, for
    example, that :func:`chunked_feed_forward` never makes the full (B, L, d_ff) hidden layer.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    largest = [0]

    class _Widest(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # unwrapped: the default wraps __torch_dispatch__ in torch._disable_dynamo, whose first
            # call imports torch._dynamo (~800 modules, seconds); nothing here is compiled
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    largest[0] = max(largest[0], t.numel() * t.element_size())
            return out

    with _Widest():
        fn(*args, **kwargs)
    return largest[0]


# ----------------------------------------------------------------------------
# 7. Routing attention: online k-means
# ----------------------------------------------------------------------------

def init_centroids(n_clusters: int, dim: int, n_heads: Optional[int] = None,
                   generator: Generatorish = None, device=None, dtype=None) -> Tensor:
    """Random unit centroids: ``(C, D)``, or ``(H, C, D)`` with ``n_heads``."""
    n_clusters = _check_int("n_clusters", n_clusters, 1)
    dim = _check_int("dim", dim, 1)
    lead = () if n_heads is None else (_check_int("n_heads", n_heads, 1),)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    mu = _randn((*lead, n_clusters, dim), _generator(generator), device, dtype)
    return F.normalize(mu, dim=-1)


def _centroids_for(x: Tensor, centroids: Tensor, name: str = "x") -> Tensor:
    """Check centroids against x and return them shaped to broadcast: (H, C, D) or (C, D)."""
    _check_tensor("centroids", centroids)
    D = x.shape[-1]
    if centroids.dim() == 2 and centroids.shape[-1] == D:
        return centroids.to(x.dtype)
    if centroids.dim() == 3 and x.dim() == 4 and centroids.shape[0] == x.shape[1] and centroids.shape[-1] == D:
        return centroids.to(x.dtype)
    heads = f"(H={x.shape[1]}, C, D={D}) or " if x.dim() == 4 else ""
    raise ValueError(f"centroids must be {heads}(C, D={D}) to cluster {name} {_shape(x)}; got "
                     f"{_shape(centroids)}")


def cluster_assign(x: Tensor, centroids: Tensor) -> Tensor:
    """The nearest centroid in angle: ``argmax_c (x / |x|) . mu_c``: (..., L, D) -> (..., L) int64.

    ``centroids``: (C, D), or (H, C, D) for x (B, H, L, D) (one set per head).
    """
    _check_tensor("x", x)
    mu = _centroids_for(x, centroids)
    sim = F.normalize(x, dim=-1) @ mu.transpose(-2, -1)  # cosine similarity: (..., L, C)
    return sim.argmax(dim=-1)


def kmeans_update(centroids: Tensor, x: Tensor, k: Optional[Tensor] = None,
                  decay: float = 0.999) -> Tensor:
    """One online (mini-batch) spherical k-means step; returns new centroids (the input is kept).

    ``mu_c <- normalise(decay mu_c + (1 - decay) mean{ x / |x| : x assigned to c })``, over the
    batch (and every position); a centroid that got no vector stays where it is.

    Args:
        centroids: (C, D), or (H, C, D) for inputs (B, H, L, D).
        x: the vectors to cluster, (..., D) with (C, D) centroids, (B, H, L, D) with per-head ones;
            in the Routing Transformer the queries.
        k: optional second set clustered with the same centroids (the keys), same layout as x.
        decay: lambda in [0, 1]; 0 jumps to the batch means, 1 never moves.
    """
    _check_tensor("x", x)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1]; got {decay!r}")
    mu = _centroids_for(x, centroids)
    vecs = [x] if k is None else [x, k]
    if k is not None:
        _check_tensor("k", k)
        _centroids_for(k, centroids, "k")
    with torch.no_grad():
        if mu.dim() == 2:  # one set: every vector of every position
            flat = [F.normalize(t.reshape(-1, t.shape[-1]), dim=-1)[None] for t in vecs]  # (1, N, D)
            mu3 = mu[None]  # (1, C, D)
        else:  # per head: (B, H, L, D) -> (H, B L, D)
            flat = [F.normalize(t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1]), dim=-1)
                    for t in vecs]
            mu3 = mu
        xs = torch.cat(flat, dim=1)  # (H or 1, N, D) unit vectors
        assign = (xs @ mu3.transpose(-2, -1)).argmax(dim=-1)  # nearest centroid: (H, N)
        onehot = F.one_hot(assign, mu3.shape[-2]).to(xs.dtype)  # (H, N, C)
        sums = onehot.transpose(-2, -1) @ xs  # (H, C, D)
        counts = onehot.sum(dim=-2)  # (H, C)
        means = sums / counts.clamp_min(1.0)[..., None]  # the batch mean of each cluster
        moved = F.normalize(decay * mu3 + (1.0 - decay) * means, dim=-1)
        new = torch.where(counts[..., None] > 0, moved, mu3)  # empty clusters stay
    return new.reshape(mu.shape).to(centroids.dtype)


def routing_attention(q: Tensor, k: Tensor, v: Tensor, centroids: Tensor,
                      window: Optional[int] = None, causal: bool = False,
                      scale: Optional[float] = None, need_weights: bool = False):
    """Routing attention: each query attends to the keys routed to its own centroid.

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv).
        centroids: (H, C, D) or (C, D) unit vectors (:func:`init_centroids`,
            :func:`kmeans_update`); not differentiated.
        window: None: exact clusters, ``c(k_j) = c(q_i)`` (dense (Lq, Lk) mask: the readable
            path). An int w (1 <= w <= min(Lq, Lk)): balanced clusters, each centroid takes its
            w nearest queries and w nearest keys and attends within that group (``C w^2``
            scores); a query in several groups combines them by log-sum-exp weights, each key
            once; a query in none gets zeros.
        causal: key j visible to query i only if ``j <= i + (Lk - Lq)`` (as ``causal_mask``).
        scale: default 1/sqrt(D). need_weights: also return the dense (B, H, Lq, Lk) weights.

    Rows with no visible key give zeros, never NaN. Returns out (B, H, Lq, Dv) (and weights).
    """
    _check_qkv(q, k, v)
    _check_bool("causal", causal)
    _check_bool("need_weights", need_weights)
    mu = _centroids_for(q, centroids, "q").detach()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None; got {type(scale).__name__}")
    if window is None:
        same = cluster_assign(q, mu)[..., :, None] == cluster_assign(k, mu)[..., None, :]  # (B, H, Lq, Lk)
        if causal:
            same = same & causal_mask(Lq, Lk, device=q.device)
        return _readable_attention(q, k, v, mask=same, scale=scale, need_weights=need_weights)

    w = _check_int("window", window, 1)
    if w > min(Lq, Lk):
        raise ValueError(f"window must be between 1 and min(Lq, Lk)={min(Lq, Lk)} (each centroid "
                         f"takes w queries and w keys); got window={w}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mu_t = mu.transpose(-2, -1)  # (H, D, C) or (D, C)
    C = mu.shape[-2]
    with torch.no_grad():
        top_q = (F.normalize(q, dim=-1) @ mu_t).topk(w, dim=-2).indices  # (B, H, w, C)
        top_k = (F.normalize(k, dim=-1) @ mu_t).topk(w, dim=-2).indices
        top_q = top_q.transpose(-2, -1).sort(dim=-1).values  # (B, H, C, w), in position order
        top_k = top_k.transpose(-2, -1).sort(dim=-1).values
        member_q = torch.zeros(B, H, C, Lq, dtype=q.dtype, device=q.device).scatter_(-1, top_q, 1.0)
        member_k = torch.zeros(B, H, C, Lk, dtype=q.dtype, device=q.device).scatter_(-1, top_k, 1.0)
        # N_ij: in how many groups query i meets key j (each group's pairs are counted once)
        in_q = member_q.transpose(-2, -1).gather(2, top_q.reshape(B, H, C * w, 1).expand(-1, -1, -1, C))
        in_k = member_k.transpose(-2, -1).gather(2, top_k.reshape(B, H, C * w, 1).expand(-1, -1, -1, C))
        counts = in_q.reshape(B, H, C, w, C) @ in_k.reshape(B, H, C, w, C).transpose(-2, -1)  # (B, H, C, w, w)

    def gather(t, idx):  # (B, H, L, E), (B, H, C, w) -> (B, H, C, w, E)
        flat = idx.reshape(B, H, C * w, 1).expand(-1, -1, -1, t.shape[-1])
        return t.gather(2, flat).reshape(B, H, C, w, t.shape[-1])

    q_g, k_g, v_g = gather(q, top_q), gather(k, top_k), gather(v, top_k)
    scores = (q_g @ k_g.transpose(-2, -1)) * scale  # (B, H, C, w, w)
    scores = scores - counts.log()  # each key once over the groups
    visible = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        visible = top_k[..., None, :] <= top_q[..., :, None] + (Lk - Lq)  # (B, H, C, w, w)
    scores = scores.masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=-1)  # (B, H, C, w)
    safe = scores.masked_fill(~has_key[..., None], 0.0)
    lse = torch.logsumexp(safe, dim=-1).masked_fill(~has_key, float("-inf"))  # per group
    probs = torch.exp(safe - lse.masked_fill(~has_key, 0.0)[..., None]).masked_fill(~visible, 0.0)
    out_g = probs @ v_g  # (B, H, C, w, Dv)

    # Combine the groups of each query: weights exp(lse_g - logsumexp over its groups).
    idx = top_q.reshape(B, H, C * w)  # query position of every group slot
    lse_flat = lse.reshape(B, H, C * w)
    peak = torch.full((B, H, Lq), float("-inf"), dtype=q.dtype, device=q.device)
    peak = peak.scatter_reduce(-1, idx, lse_flat.detach(), reduce="amax")  # a stabiliser only
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = torch.exp(lse_flat - peak.gather(-1, idx))  # 0 for groups with no key
    denom = torch.zeros(B, H, Lq, dtype=q.dtype, device=q.device).scatter_add(-1, idx, e)
    group_w = e / denom.gather(-1, idx).clamp_min(torch.finfo(q.dtype).tiny)  # (B, H, C w)
    Dv = v.shape[-1]
    out = torch.zeros(B, H, Lq, Dv, dtype=v.dtype, device=v.device)
    out = out.scatter_add(2, idx[..., None].expand(-1, -1, -1, Dv),
                          group_w[..., None] * out_g.reshape(B, H, C * w, Dv))  # (B, H, Lq, Dv)
    if not need_weights:
        return out
    with torch.no_grad():
        contrib = probs * group_w.reshape(B, H, C, w)[..., None]  # (B, H, C, w, w)
        pair = (top_q[..., :, None] * Lk + top_k[..., None, :]).reshape(B, H, -1)
        weights = torch.zeros(B, H, Lq * Lk, dtype=q.dtype, device=q.device)
        weights = weights.scatter_add(-1, pair, contrib.reshape(B, H, -1)).reshape(B, H, Lq, Lk)
    return out, weights
