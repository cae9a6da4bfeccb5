r"""State space models: from a continuous linear system to Mamba's selective scan.

Papers
------
* Gu, Goel, Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces"
  (S4), arXiv:2111.00396: sec. 2 (the continuous SSM, its discretisation, the recurrent and
  the convolutional view, the kernel K).
* Gu, Gupta, Goel, Ré 2022, "On the Parameterization and Initialization of Diagonal State
  Space Models" (S4D), arXiv:2206.11893: a diagonal A, its Vandermonde kernel, the
  initialisations S4D-Lin and S4D-Real (sec. 4), ZOH against bilinear discretisation.
* Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
  arXiv:2312.00752: sec. 3.1 (selective copying; why time invariance fails), sec. 3.2 and
  Algorithm 2 (delta, B, C functions of the input), sec. 3.3 (the scan), sec. 3.4 and Fig. 3
  (the block), sec. 3.5 / appendix (softplus, A = -exp(A_log), the S4D-Real init).
* Blelloch 1990, "Prefix Sums and Their Applications" (CMU-CS-90-190): the work-efficient
  up-sweep / down-sweep scan; sec. 1.4 there: first-order linear recurrences as a scan.
* Martin & Cundy 2018, "Parallelizing Linear Recurrent Neural Nets Over Sequence Length",
  arXiv:1709.04057: the same scan for RNNs.  Heinsen 2023, "Efficient Parallelization of a
  Ubiquitous Sequential Computation", arXiv:2311.06281: the log-space scan
  (:func:`scan_logcumsumexp`, shown here losing accuracy).

Notation (lecture 11's symbols are set in sans-serif)
-----------------------------------------------------
The course's B, C, D, K, N, Δ, x, y, h, u, z already mean other things (batch size, a chunk
length, the head dimension, keys, layers, FlashAttention-2's rowsum, ...). The state-space
quantities are therefore written in sans-serif, each named after its symbol in the papers:

  u_t (sans-serif)  the input at step t                   (Mamba's x_t, S4's u)
  h_t               the state, d_state numbers per channel (the papers' h_t, S4's x)
  y_t               the output                            (the papers' y_t)
  A, B, C, D        the SSM's matrices and skip           (the papers' A, B, C, D)
  Abar, Bbar        discretised A and B                   (the papers' A-bar, B-bar)
  K                 the convolution kernel                (the papers' K-bar)
  a_t, b_t          the coefficients of h_t = a_t h_{t-1} + b_t, scanned by :func:`parallel_scan`
  z_t               the gate branch of the Mamba block    (the paper's z)
  Δ, Δ_t            the step size, code ``delta``          (the papers' Δ, set in sans-serif
                    like every SSM symbol: lecture 08's Δ is FlashAttention-2's row sum)
  d_state           state size per channel                 (the papers' N)
  d_inner           the block's inner width, expand * d_model (the paper's E D, E = 2)
  d_conv            width of the causal depthwise convolution (4 in the paper)
  d_delta           rank of the projection that makes Δ_t  (the paper's R, ``dt_rank``)
  N                 blocks stacked, as in lecture 05
  i, k              a channel (0 .. d_inner-1) and a state (0 .. d_state-1; the papers' n)

1. The continuous SSM and its discretisation
-------------------------------------------
A linear time-invariant system maps an input signal u(t) to an output y(t) through a state::

    h'(t) = A h(t) + B u(t),        y(t) = C h(t) + D u(t)

Sampling with step delta turns it into a recurrence ``h_t = Abar h_{t-1} + Bbar u_t``.
**Zero-order hold** (:func:`discretize_zoh`) holds u constant over each step and solves
the ODE exactly::

    Abar = exp(delta A),      Bbar = (delta A)^{-1} (exp(delta A) - I) delta B

(for a diagonal A, one number A_k per state k: ``Bbar_k = (exp(delta A_k) - 1) / A_k * B_k``). **Euler**
(:func:`discretize_euler`) takes one straight step: ``Abar = I + delta A``, ``Bbar = delta B``.
Why ZOH: for a stable system (Re A_k < 0) ``|exp(delta A_k)| < 1`` for *every* delta, so the
discrete state decays as the continuous one does; Euler's ``|1 + delta A_k|`` exceeds 1 once
``delta > 2 / |A_k|`` (real A_k), and the discrete state explodes where the true one decays.
ZOH is also exact for piecewise-constant inputs, and it makes delta a *timescale*: a large
delta forgets the state (Abar -> 0) and lets the input in, a small delta keeps the state.
Mamba uses ZOH for A and the Euler-like ``Bbar = delta B`` for B (sec. 3.5 and the code).

2. Two views of a time-invariant SSM
------------------------------------
With Abar, Bbar, C fixed over time, unrolling the recurrence (h_{-1} = 0) gives::

    y_t = sum_{j=0..t} C Abar^j Bbar u_{t-j}  =  (K * u)_t,     K = (C Bbar, C Abar Bbar, C Abar^2 Bbar, ...)

so the same model is an RNN (:func:`ssm_recurrence`, O(L) sequential steps, O(1) state) and
a causal convolution (:func:`ssm_kernel` + :func:`ssm_convolution`, parallel over L, by FFT in
O(L log L)). Training uses the convolution, generation the recurrence. For a diagonal A the
kernel is a Vandermonde product, ``K_j = sum_k C_k Abar_k^j Bbar_k`` (S4D; the papers index
the states by n, the course by k because n and N are taken).

**S4D's initialisation** (:func:`s4d_init`): S4D-Lin ``A_k = -1/2 + i pi k`` (complex, the
imaginary parts spread like Fourier frequencies; a complex state stands for a conjugate
pair, so the output is ``2 Re(C h)``), S4D-Real ``A_k = -(k + 1)`` (real; Mamba's
default, stored as ``A_log = log(k + 1)`` and used as ``A = -exp(A_log)`` so A stays
negative whatever the gradient does); B = 1, C ~ N(0, 1), delta log-uniform in
[0.001, 0.1] (:func:`init_delta`).

3. Selection (Mamba)
--------------------
A time-invariant SSM treats every token alike: its kernel K cannot depend on what a token
*is*, so it cannot decide to remember a word and ignore a filler (selective copying,
:func:`selective_copying`). Mamba makes delta, B and C functions of the input (Algorithm 2)::

    B_t = u_t W_B,   C_t = u_t W_C,   delta_t = softplus(u_t W_1 W_2 + bias)    (rank d_delta)
    Abar_t = exp(delta_t A),   Bbar_t u_t = delta_t B_t u_t
    h_t = Abar_t h_{t-1} + Bbar_t u_t,       y_t = C_t h_t + D u_t

softplus keeps delta_t > 0. A large delta_t resets the state to the current token (remember
it), a small delta_t lets the token pass unnoticed (ignore it): content-based forgetting and
remembering. The price: K now depends on t, the convolution view is gone, and training
needs a **scan** (:func:`selective_scan`).

4. The scan
-----------
``h_t = a_t h_{t-1} + b_t`` (elementwise, here a_t = Abar_t, b_t = Bbar_t u_t) is a prefix
"sum" for the operator on pairs::

    (a, b) . (a', b') = (a a', a' b + b')        (first apply (a, b), then (a', b'))

which is associative, so the prefixes can be combined in any bracketing: in a tree.
:func:`parallel_scan` is Blelloch's work-efficient scan written recursively: the
**up-sweep** combines neighbours (t, t+1), t even, into one pair (length L/2), recurses
(its scan gives the odd states h_1, h_3, ...), and the **down-sweep** fills in the even
positions, ``h_t = a_t h_{t-1} + b_t`` for every even t >= 2 and ``h_0 = b_0``: about 2L
operator applications in log2 L levels of recursion (each level one up-sweep and one
down-sweep step, each a batch of tensor operations). It only multiplies a's and adds, exactly as the sequential loop
(:func:`sequential_scan`) does, so it is as stable: products of |a| <= 1 can only shrink
towards 0, which is the right answer. It is made of plain differentiable PyTorch operations,
so autograd gives its gradient.

Two shortcuts that look parallel and are **not** stable, kept to be shown failing:

* :func:`scan_cumprod`: ``h_t = P_t sum_{s<=t} b_s / P_s`` with ``P_t = a_0 ... a_t``
  (cumprod and cumsum). P_t underflows (float32: below 1e-38, at t = 88 / |log a|, e.g.
  L ~ 850 for a = 0.9), 1 / P_t overflows, and the result is inf or NaN.
* :func:`scan_logcumsumexp`: the same in log space with complex logarithms (for b < 0),
  ``h_t = exp(log P_t + logcumsumexp(log b_s - log P_s))``. No overflow, but the exponent
  is the difference of two numbers that grow like |log P_t|; their rounding error,
  eps |log P_t|, becomes a *relative* error of the result, growing linearly with L. In
  float32, with a Mamba-like decay (log a uniform in [-1, 0]), it is ~3e-5 at L = 1024
  (30x the stable scan's 1e-6) and passes 1e-4 by L = 4096; in float64 it stays below ~1e-12.

5. The Mamba block and recurrent inference
------------------------------------------
:class:`MambaBlock` (Fig. 3): ``[u, z] = x W_in`` (two branches of width d_inner), a causal
depthwise convolution of width d_conv over time on u, SiLU, the selective SSM, the gate
``y * SiLU(z)``, ``W_out`` back to d_model. :meth:`MambaBlock.step` runs one token with a
state of fixed size: the last d_conv - 1 inputs of the convolution and h
(d_inner x d_state numbers), so generation costs O(1) time and memory per token, where
attention's KV cache grows by 2 d_model numbers per layer and token
(:func:`state_bytes`, :func:`kv_cache_bytes`, :func:`memory_per_token`).
:class:`MambaLM` stacks N blocks (pre-norm, residual) under an embedding and a head.
``selective=False`` gives the same block with delta, B, C learned constants: a time-invariant
SSM (S4D-like) computed by FFT convolution, for the selective-copying comparison.

Shapes
------
Between blocks ``(B, L, d_model)`` as everywhere (B the batch size). Inside the SSM:
u, delta (code ``delta``) ``(B, L, d_inner)``; A ``(d_inner, d_state)``; the selective B, C
``(B, L, d_state)``; D ``(d_inner,)``; the state ``(B, L, d_inner, d_state)`` when all of it
is kept, ``(B, d_inner, d_state)`` for one step. The scans take a, b of any shape
``(B, L, ...)`` and scan over dim 1.

Glossary (code -> symbol)
-------------------------
==========================  ============================================================
``u``                       u_t (Mamba's x), the SSM's input
``h``, ``state.h``          h_t, the SSM state
``y``                       y_t
``A``, ``B``, ``C``, ``D``  A, B, C, D (sans-serif; the argument ``B`` of the SSM
                            functions is the matrix B, never the batch size)
``A_log``                   log(-A), so that A = -exp(A_log)
``A_bar``, ``B_bar``        Abar, Bbar
``K``                       K, the kernel (C Bbar, C Abar Bbar, ...)
``delta``, ``dt``           delta_t (the papers' Δ)
``a``, ``b``                a_t, b_t of the scan
``z``                       z_t, the gate branch
``d_state``, ``d_inner``    d_state (N in the paper), d_inner (E D)
``d_conv``, ``dt_rank``     d_conv, d_delta (R)
``conv``                    the d_conv - 1 last convolution inputs kept by ``step``
==========================  ============================================================
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data import IGNORE, _generator

__all__ = [
    # discretisation and the time-invariant SSM
    "discretize_zoh",
    "discretize_euler",
    "ssm_recurrence",
    "ssm_kernel",
    "ssm_convolution",
    "s4d_init",
    "init_delta",
    # scans
    "sequential_scan",
    "parallel_scan",
    "scan_cumprod",
    "scan_logcumsumexp",
    "selective_scan",
    "selective_scan_step",
    # the block and the model
    "MambaState",
    "MambaBlock",
    "MambaLM",
    "state_bytes",
    "kv_cache_bytes",
    "memory_per_token",
    # the task
    "NOISE",
    "CUE",
    "selective_copying",
]

#: Selective copying's reserved tokens: the filler between the tokens to remember, and the
#: cue asking for the next remembered token. Data tokens are 2 .. vocab_size - 1.
NOISE, CUE = 0, 1


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_float(name: str, t, rank: Optional[int] = None, min_rank: Optional[int] = None,
                 layout: str = "") -> None:
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be a floating-point tensor {layout}; got "
                        f"{type(t).__name__}{' ' + str(t.dtype) if isinstance(t, Tensor) else ''}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {layout}; got shape {_shape(t)}")
    if min_rank is not None and t.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dims {layout}; got shape {_shape(t)}")


def _check_int(name: str, value, minimum: int, what: str = "") -> int:
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be an int{what}; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{what}; got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{what}; got {value}")
    return value


def _check_positive(name: str, t: Tensor) -> None:
    """A step size must be > 0 (Mamba makes it with softplus)."""
    if isinstance(t, Tensor):
        bad = ~(t.real > 0) if t.is_complex() else ~(t > 0)
        if bool(bad.any()):
            raise ValueError(f"{name} (the step size delta) must be positive everywhere (Mamba makes it "
                             f"with softplus); got min {float(t.min()):.4g}")
    elif not float(t) > 0:
        raise ValueError(f"{name} (the step size delta) must be positive; got {t!r}")


def _check_scan(a, b) -> None:
    _check_float("a", a, min_rank=2, layout="(B, L, ...)")
    _check_float("b", b, min_rank=2, layout="(B, L, ...)")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape (B, L, ...); got a {_shape(a)}, b {_shape(b)}")
    if a.shape[1] == 0:
        raise ValueError(f"cannot scan an empty sequence: expected L >= 1 along dim 1; got shape {_shape(a)}")


def _check_state_size(name: str, t: Tensor, d_state: int, dim: int = -1) -> None:
    if t.shape[dim] != d_state:
        raise ValueError(f"{name} must have d_state = {d_state} (the size of A's last dim) on dim "
                         f"{dim}; got {t.shape[dim]} (shape {_shape(t)})")


def _check_h0(h0, shape) -> None:
    if h0 is None:
        return
    _check_float("h0", h0, layout="(B, d_inner, d_state)")
    if tuple(h0.shape) != tuple(shape):
        raise ValueError(f"h0 must have shape (B, d_inner, d_state) = {tuple(shape)}; got {_shape(h0)}")


def _readout(h: Tensor, C: Tensor) -> Tensor:
    """y = C h over the last dim; a complex state stands for a conjugate pair: 2 Re(C h)."""
    y = (h * C).sum(-1)
    return 2 * y.real if y.is_complex() else y


# ----------------------------------------------------------------------------
# 1. Discretisation
# ----------------------------------------------------------------------------

def _check_AB(A, B, delta):
    _check_float("A", A, layout="(..., d_state) diagonal or (d_state, d_state)")
    _check_float("B", B, layout="(..., d_state)")
    d_state = A.shape[-1]
    _check_state_size("B", B, d_state)
    if A.dim() >= 2 and A.shape[-2] == A.shape[-1] and B.dim() == 1:
        full = True
    else:
        full = False
    _check_positive("delta", delta)
    return full


def discretize_zoh(A: Tensor, B: Tensor, delta, full: Optional[bool] = None):
    """Zero-order hold: ``Abar = exp(delta A)``, ``Bbar = (delta A)^-1 (exp(delta A) - I) delta B``.

    Args:
        A: ``(..., d_state)`` the diagonal of A (real or complex; one row per channel), or a
            full ``(d_state, d_state)`` matrix (then B is ``(d_state,)``).
        B: ``(..., d_state)``. delta: a positive number or tensor broadcasting to A's diagonal
            (``(..., 1)`` for one step per channel).
        full: force the matrix reading (default: a square A with a 1-D B is a matrix).

    Returns ``(A_bar, B_bar)`` shaped like A and B. A must be invertible (no zero entry).
    """
    detected = _check_AB(A, B, delta)
    full = detected if full is None else bool(full)
    if full:
        eA = torch.linalg.matrix_exp(delta * A)  # Abar = exp(delta A)             (d_state, d_state)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        B_bar = torch.linalg.solve(delta * A, (eA - eye) @ (delta * B))  # (delta A)^-1 (e^{delta A} - I) delta B
        return eA, B_bar
    A_bar = torch.exp(delta * A)  # (..., d_state)
    B_bar = (A_bar - 1) / A * B  # diagonal: (e^{delta A_k} - 1) / A_k B_k
    return A_bar, B_bar


def discretize_euler(A: Tensor, B: Tensor, delta, full: Optional[bool] = None):
    """Euler's step: ``Abar = I + delta A``, ``Bbar = delta B`` (same arguments as
    :func:`discretize_zoh`). Unstable once ``|1 + delta A_k| > 1`` (delta > 2 / |A_k|)."""
    detected = _check_AB(A, B, delta)
    full = detected if full is None else bool(full)
    if full:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return eye + delta * A, delta * B  # (d_state, d_state), (d_state,)
    return 1 + delta * A, delta * B  # (..., d_state)


# ----------------------------------------------------------------------------
# 2. The time-invariant SSM: recurrence and convolution
# ----------------------------------------------------------------------------

def _check_lti(u, A_bar, B_bar, C):
    _check_float("u", u, rank=3, layout="(B, L, d_inner)")
    _check_float("A_bar", A_bar, layout="(d_inner, d_state) diagonal or (d_inner, d_state, d_state)")
    full = A_bar.dim() == 3
    d_inner = u.shape[-1]
    d_state = A_bar.shape[-1]
    for name, t in (("B_bar", B_bar), ("C", C)):
        _check_float(name, t, rank=2, layout="(d_inner, d_state)")
        _check_state_size(name, t, d_state)
    for name, t in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C)):
        if t.shape[0] != d_inner:
            raise ValueError(f"{name} must have d_inner = {d_inner} rows (u's last dim); got shape {_shape(t)}")
    if full and A_bar.shape[-2] != d_state:
        raise ValueError(f"a full A_bar must be square (d_inner, d_state, d_state); got {_shape(A_bar)}")
    return full


def ssm_recurrence(u: Tensor, A_bar: Tensor, B_bar: Tensor, C: Tensor, h0: Optional[Tensor] = None):
    """The time-invariant SSM as an RNN: ``h_t = Abar h_{t-1} + Bbar u_t``, ``y_t = C h_t``.

    Args:
        u: ``(B, L, d_inner)``, one scalar input per channel and step.
        A_bar: ``(d_inner, d_state)`` diagonal, or ``(d_inner, d_state, d_state)`` full.
        B_bar, C: ``(d_inner, d_state)``. h0: ``(B, d_inner, d_state)`` or None (zeros).

    Returns ``(y, h)``: y ``(B, L, d_inner)`` (real: ``2 Re(C h)`` for complex parameters),
    h ``(B, d_inner, d_state)`` the last state.
    """
    full = _check_lti(u, A_bar, B_bar, C)
    Bsz, L, d_inner = u.shape
    dtype = torch.promote_types(u.dtype, A_bar.dtype)
    _check_h0(h0, (Bsz, d_inner, A_bar.shape[-1]))
    h = (torch.zeros(Bsz, d_inner, A_bar.shape[-1], dtype=dtype, device=u.device)
         if h0 is None else h0.to(dtype))  # (B, d_inner, d_state)
    ys = []
    for t in range(L):
        Ah = (A_bar @ h.unsqueeze(-1)).squeeze(-1) if full else A_bar * h  # Abar h_{t-1}
        h = Ah + B_bar * u[:, t, :, None]  # h_t = Abar h_{t-1} + Bbar u_t     (B, d_inner, d_state)
        ys.append(_readout(h, C))  # y_t = C h_t                                (B, d_inner)
    y = torch.stack(ys, 1) if ys else u.new_zeros(Bsz, 0, d_inner)  # (B, L, d_inner)
    return y, h


def ssm_kernel(A_bar: Tensor, B_bar: Tensor, C: Tensor, L: int) -> Tensor:
    """The convolution kernel ``K_j = C Abar^j Bbar``, j = 0 .. L-1.

    A_bar ``(d_inner, d_state)`` diagonal (the Vandermonde form of S4D,
    ``K_j = sum_k C_k Abar_k^j Bbar_k``) or ``(d_inner, d_state, d_state)`` full (L matrix
    products). B_bar, C ``(d_inner, d_state)``. Returns K ``(d_inner, L)``, real.
    """
    L = _check_int("L", L, 0)
    _check_float("A_bar", A_bar, layout="(d_inner, d_state) diagonal or (d_inner, d_state, d_state)")
    _check_lti(torch.zeros(1, 0, A_bar.shape[0], dtype=torch.float32), A_bar, B_bar, C)
    if A_bar.dim() == 2:
        j = torch.arange(L, device=A_bar.device, dtype=A_bar.real.dtype)  # 0 .. L-1
        powers = A_bar.unsqueeze(-1) ** j  # Abar_k^j                           (d_inner, d_state, L)
        K = ((C * B_bar).unsqueeze(-1) * powers).sum(1)  # sum_k C_k Bbar_k Abar_k^j  (d_inner, L)
        return 2 * K.real if K.is_complex() else K
    ks, v = [], B_bar  # v = Abar^j Bbar                                        (d_inner, d_state)
    for _ in range(L):
        ks.append(_readout(v, C))  # K_j = C Abar^j Bbar                          (d_inner,)
        v = (A_bar @ v.unsqueeze(-1)).squeeze(-1)
    return torch.stack(ks, -1) if ks else C.new_zeros(C.shape[0], 0).real  # (d_inner, L)


def ssm_convolution(u: Tensor, K: Tensor, method: str = "fft") -> Tensor:
    """The causal convolution ``y_t = sum_{j=0..t} K_j u_{t-j}``, channel by channel.

    Args:
        u: ``(B, L, d_inner)``. K: ``(d_inner, L_K)`` with L_K >= 1 (taps beyond L unused).
        method: ``"fft"`` (zero-pad to 2L so the circular convolution is the linear one,
            O(L log L)) or ``"direct"`` (a depthwise ``F.conv1d`` with K flipped, O(L L_K)).

    Returns y ``(B, L, d_inner)``.
    """
    _check_float("u", u, rank=3, layout="(B, L, d_inner)")
    _check_float("K", K, rank=2, layout="(d_inner, L_K)")
    Bsz, L, d_inner = u.shape
    if K.shape[0] != d_inner:
        raise ValueError(f"K must have d_inner = {d_inner} rows (u's last dim); got shape {_shape(K)}")
    if K.shape[1] < 1:
        raise ValueError(f"K must have at least 1 tap (a convolution of width >= 1); got shape {_shape(K)}")
    if L == 0:
        return u.clone()
    K = K[:, :L].to(u.dtype)  # taps 0 .. L-1 are all a causal output can use
    if method == "fft":
        n = 2 * L  # padding: no wrap-around
        uf = torch.fft.rfft(u.transpose(1, 2), n=n)  # (B, d_inner, n/2+1)
        kf = torch.fft.rfft(K, n=n)  # (d_inner, n/2+1)
        return torch.fft.irfft(uf * kf, n=n)[..., :L].transpose(1, 2)  # (B, L, d_inner)
    if method == "direct":
        w = K.flip(-1).unsqueeze(1)  # conv1d correlates: flip to convolve     (d_inner, 1, L_K)
        x = F.pad(u.transpose(1, 2), (w.shape[-1] - 1, 0))  # causal: pad the past  (B, d_inner, L + L_K - 1)
        return F.conv1d(x, w, groups=d_inner).transpose(1, 2)  # (B, L, d_inner)
    raise ValueError(f"method must be 'fft' or 'direct'; got {method!r}")


def s4d_init(d_inner: int, d_state: int, kind: str = "real", dtype=torch.float32, device=None) -> Tensor:
    """S4D's initial A, one row per channel: ``(d_inner, d_state)``.

    ``"lin"``: S4D-Lin, ``A_k = -1/2 + i pi k`` (complex; each mode stands for a conjugate pair).
    ``"real"``: S4D-Real, ``A_k = -(k + 1)`` (Mamba's init; store ``A_log = log(-A)``).
    """
    d_inner = _check_int("d_inner", d_inner, 1)
    d_state = _check_int("d_state", d_state, 1)
    k = torch.arange(d_state, dtype=dtype, device=device)  # the state index k (the papers' n)
    if kind == "lin":
        A = torch.complex(torch.full_like(k, -0.5), math.pi * k)  # -1/2 + i pi k
    elif kind == "real":
        A = -(k + 1)  # -(k + 1)
    else:
        raise ValueError(f"kind must be 'lin' (S4D-Lin) or 'real' (S4D-Real); got {kind!r}")
    return A.expand(d_inner, d_state).clone()  # (d_inner, d_state)


def init_delta(d_inner: int, delta_min: float = 1e-3, delta_max: float = 0.1, generator=None,
             dtype=torch.float32) -> Tensor:
    """Step sizes log-uniform in ``[delta_min, delta_max]`` (S4D, Mamba): ``(d_inner,)``."""
    d_inner = _check_int("d_inner", d_inner, 1)
    if not 0 < delta_min <= delta_max:
        raise ValueError(f"need 0 < delta_min <= delta_max; got delta_min={delta_min}, delta_max={delta_max}")
    r = torch.rand(d_inner, generator=_generator(generator), dtype=torch.float64)
    return torch.exp(math.log(delta_min) + r * (math.log(delta_max) - math.log(delta_min))).to(dtype)


# ----------------------------------------------------------------------------
# 4. Scans: h_t = a_t h_{t-1} + b_t over dim 1
# ----------------------------------------------------------------------------

def sequential_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """The reference: a Python loop over t, ``h_t = a_t * h_{t-1} + b_t`` (h_{-1} = h0 or 0).

    Benchmark hook (``benchmarks/``): a, b ``(B, L, ...)`` of one shape, L >= 1; h0 ``(B, ...)``.
    Returns all states ``(B, L, ...)``.
    """
    _check_scan(a, b)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0  # (B, ...)
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]  # h_t = a_t h_{t-1} + b_t
        hs.append(h)
    return torch.stack(hs, 1)  # (B, L, ...)


def _blelloch(a: Tensor, b: Tensor) -> Tensor:
    """Inclusive scan over dim 1 of the pairs (a_t, b_t); returns the b-part, i.e. h_t."""
    L = a.shape[1]
    if L == 1:
        return b
    # up-sweep: combine neighbours (t, t+1), t even: (a, b) . (a', b') = (a a', a' b + b')
    a_r, b_r = a[:, 1::2], b[:, 1::2]  # odd positions                  (B, L//2, ...)
    n = a_r.shape[1]
    a_l, b_l = a[:, 0:2 * n:2], b[:, 0:2 * n:2]  # their left neighbours
    h_odd = _blelloch(a_l * a_r, torch.addcmul(b_r, a_r, b_l))  # h_1, h_3, ... (B, L//2, ...)
    # down-sweep: h_t = a_t h_{t-1} + b_t for even t >= 2, and h_0 = b_0
    h = torch.empty_like(b)  # (B, L, ...), filled by slices (autograd records the copies)
    h[:, 1::2] = h_odd
    h[:, :1] = b[:, :1]
    a_e = a[:, 2::2]  # even positions 2, 4, ...
    h[:, 2::2] = torch.addcmul(b[:, 2::2], a_e, h_odd[:, :a_e.shape[1]])
    return h


def parallel_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for all t by Blelloch's up-sweep / down-sweep.

    Benchmark hook (``benchmarks/``): same arguments and result as :func:`sequential_scan`
    (a, b ``(B, L, ...)``, any L >= 1, h0 ``(B, ...)`` folded into ``b_0 += a_0 h0``).
    2 log2 L levels of batched tensor operations, about 2L applications of
    ``(a, b) . (a', b') = (a a', a' b + b')``; only multiplications and additions, so as stable as
    the loop (no division, no logarithm). Differentiable by autograd.

    Speed (2-core CPU, float32, L = 4096, one intra-op thread): ~150x the loop with 16 numbers
    per step, ~5x with 256, 2-3x with 1024 or more (then memory-bound: each level reads and
    writes whole tensors). With two threads on a loaded machine its many short parallel
    sections can make it slower than the loop: measure with ``torch.set_num_threads(1)``.
    """
    _check_scan(a, b)
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.unsqueeze(1), b[:, 1:]], 1)  # b_0 + a_0 h0
    return _blelloch(a, b)


def scan_cumprod(a: Tensor, b: Tensor) -> Tensor:
    """UNSTABLE shortcut, kept to show it failing: ``h_t = P_t cumsum(b / P)_t``, ``P = cumprod(a)``.

    Exact in real arithmetic; in floating point P_t underflows (float32: once
    ``sum |log a| > ~88``, e.g. L ~ 850 for a = 0.9), 1 / P_t overflows, and h is inf or NaN.
    """
    _check_scan(a, b)
    P = torch.cumprod(a, 1)  # P_t = a_0 a_1 ... a_t
    return P * torch.cumsum(b / P, 1)  # h_t = P_t sum_{s<=t} b_s / P_s


def scan_logcumsumexp(a: Tensor, b: Tensor) -> Tensor:
    """UNSTABLE shortcut (Heinsen 2023), kept to show it losing accuracy:
    ``h_t = exp(log P_t + logcumsumexp_s(log b_s - log P_s))`` with complex logs (negative
    a or b get ``log|x| + i pi``).

    Nothing overflows, but ``log P_t`` and the logcumsumexp both grow like ``sum |log a|``
    and cancel: their rounding error (eps times that size) becomes a relative error of h.
    In float32 (log a uniform in [-1, 0]) the error is ~3e-5 at L = 1024, above 1e-4 at
    L = 4096, where :func:`parallel_scan` stays at ~1e-6.
    """
    _check_scan(a, b)
    cdtype = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    log_a = torch.log(a.to(cdtype))  # complex: log|a| + i pi [a < 0]
    log_b = torch.log(b.to(cdtype))
    a_star = torch.cumsum(log_a, 1)  # log P_t
    h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, 1))  # P_t sum_s b_s / P_s
    return h.real.to(b.dtype)


def _scan(method: str):
    if method == "parallel":
        return parallel_scan
    if method == "sequential":
        return sequential_scan
    raise ValueError(f"method must be 'parallel' or 'sequential'; got {method!r}")


def _check_selective(u, delta, A, B, C, D):
    _check_float("u", u, rank=3, layout="(B, L, d_inner)")
    _check_float("delta", delta, rank=3, layout="(B, L, d_inner)")
    _check_float("A", A, rank=2, layout="(d_inner, d_state)")
    Bsz, L, d_inner = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape (B, L, d_inner) = {_shape(u)}; got {_shape(delta)}")
    if A.shape[0] != d_inner:
        raise ValueError(f"A must have d_inner = {d_inner} rows (u's last dim); got shape {_shape(A)}")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        _check_float(name, t, rank=3, layout="(B, L, d_state)")
        if t.shape[:2] != u.shape[:2]:
            raise ValueError(f"{name} must have shape (B, L, d_state) = {(Bsz, L, d_state)}; got {_shape(t)}")
        _check_state_size(name, t, d_state)
    if D is not None:
        _check_float("D", D, rank=1, layout="(d_inner,)")
        if D.shape[0] != d_inner:
            raise ValueError(f"D must have shape (d_inner,) = ({d_inner},); got {_shape(D)}")
    if L == 0:
        raise ValueError(f"cannot scan an empty sequence: expected L >= 1; got u of shape {_shape(u)}")
    _check_positive("delta", delta)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, method: str = "parallel", h0: Optional[Tensor] = None,
                   return_state: bool = False):
    """Mamba's selective SSM (Algorithm 2): delta, B, C change at every step.

    Benchmark hook (``benchmarks/``). Computes, per channel i and state n::

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,      y_t = C_t h_t + D u_t

    Args:
        u: ``(B, L, d_inner)`` input. delta: ``(B, L, d_inner)`` step sizes delta_t, all > 0
            (softplus already applied). A: ``(d_inner, d_state)``, negative for a stable SSM.
        B, C: ``(B, L, d_state)``, shared by the channels (the matrices, not the batch size).
        D: ``(d_inner,)`` skip, or None. method: ``"parallel"`` (:func:`parallel_scan`) or
            ``"sequential"`` (:func:`sequential_scan`). h0: ``(B, d_inner, d_state)`` or None.
        return_state: also return the last state ``(B, d_inner, d_state)``.

    Returns y ``(B, L, d_inner)`` (and h_L).
    """
    _check_selective(u, delta, A, B, C, D)
    _check_h0(h0, (u.shape[0], *A.shape))
    scan = _scan(method)
    if u.dtype in (torch.float16, torch.bfloat16):  # half precision: scan in float32, as Mamba does
        out = selective_scan(*(t if t is None else t.float() for t in (u, delta, A, B, C, D)), method=method,
                             h0=None if h0 is None else h0.float(), return_state=return_state)
        return tuple(o.to(u.dtype) for o in out) if return_state else out.to(u.dtype)
    dA = delta.unsqueeze(-1) * A  # delta_t A                           (B, L, d_inner, d_state)
    a = torch.exp(dA)  # Abar_t = exp(delta_t A)                        (B, L, d_inner, d_state)
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # Bbar_t u_t = delta_t B_t u_t   (B, L, d_inner, d_state)
    h = scan(a, b, h0)  # h_t = a_t h_{t-1} + b_t                     (B, L, d_inner, d_state)
    y = torch.einsum("blin,bln->bli", h, C)  # y_t = C_t h_t          (B, L, d_inner)
    if D is not None:
        y = y + D * u  # + D u_t
    return (y, h[:, -1]) if return_state else y


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Optional[Tensor], h: Tensor):
    """One step of :func:`selective_scan`: u, delta ``(B, d_inner)``, B, C ``(B, d_state)``,
    h ``(B, d_inner, d_state)``. Returns ``(y_t (B, d_inner), h_t)``."""
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        _check_float(name, t, rank=2, layout="(B, d_inner) or (B, d_state)")
    _check_selective(u.unsqueeze(1), delta.unsqueeze(1), A, B.unsqueeze(1), C.unsqueeze(1), D)
    if h.shape != (u.shape[0], *A.shape):
        raise ValueError(f"h must have shape (B, d_inner, d_state) = {(u.shape[0], *A.shape)}; got {_shape(h)}")
    a = torch.exp(delta.unsqueeze(-1) * A)  # Abar_t                  (B, d_inner, d_state)
    h = a * h + (delta * u).unsqueeze(-1) * B.unsqueeze(1)  # h_t = Abar_t h_{t-1} + delta_t B_t u_t
    y = (h * C.unsqueeze(1)).sum(-1)  # y_t = C_t h_t                 (B, d_inner)
    if D is not None:
        y = y + D * u
    return y, h


# ----------------------------------------------------------------------------
# 5. The Mamba block
# ----------------------------------------------------------------------------

class MambaState(NamedTuple):
    """A block's recurrent state, of fixed size whatever the length generated so far.

    conv: ``(B, d_inner, d_conv - 1)`` the last inputs of the causal convolution.
    h: ``(B, d_inner, d_state)`` the SSM state.
    """

    conv: Tensor
    h: Tensor


class MambaBlock(nn.Module):
    """The Mamba block (Gu & Dao 2023, Fig. 3), ``(B, L, d_model) -> (B, L, d_model)``.

    ``[u, z] = x W_in``; ``u = SiLU(causal depthwise conv_{d_conv}(u))``; delta, B, C from u
    (``selective=True``) or learned constants (``selective=False``, a time-invariant SSM
    computed as an FFT convolution); ``y = SSM(u) * SiLU(z)``; out ``= y W_out``.

    Args:
        d_model: width between blocks. d_state: state size per channel (16).
        d_conv: width of the causal convolution (>= 1; 4). expand: d_inner = expand d_model.
        dt_rank: d_delta, rank of delta's projection (default ceil(d_model / 16)).
        dt_min, dt_max: delta's initial range (log-uniform, stored through softplus's inverse).
        selective: input-dependent delta, B, C (Mamba) or constants (LTI).
        scan: ``"parallel"`` or ``"sequential"`` for the selective forward.
        generator: seeds delta's initial values (and C's when not selective); the linear layers
            and the convolution use the global RNG (``seed_everything``).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 selective: bool = True, scan: str = "parallel", generator=None):
        super().__init__()
        d_model = _check_int("d_model", d_model, 1)
        self.d_state = _check_int("d_state", d_state, 1)
        self.d_conv = _check_int("d_conv", d_conv, 1, " (the convolution width)")
        expand = _check_int("expand", expand, 1)
        self.d_model, self.d_inner = d_model, expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else _check_int("dt_rank", dt_rank, 1)
        self.selective = bool(selective)
        _scan(scan)
        self.scan = scan
        di, ds = self.d_inner, self.d_state
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)  # W_in: x -> [u, z]
        self.conv1d = nn.Conv1d(di, di, self.d_conv, groups=di, padding=self.d_conv - 1)  # depthwise
        if self.selective:
            self.x_proj = nn.Linear(di, self.dt_rank + 2 * ds, bias=False)  # u -> [delta low-rank, B, C]
            self.dt_proj = nn.Linear(self.dt_rank, di)  # W_2 and the bias of delta
            std = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            self.B_param = nn.Parameter(torch.ones(di, ds))  # B = 1 (S4D)
            self.C_param = nn.Parameter(torch.randn(di, ds, generator=_generator(generator)) * ds ** -0.5)
            self.dt_bias = nn.Parameter(torch.zeros(di))
        delta = init_delta(di, dt_min, dt_max, generator=generator).clamp(min=1e-4)
        inv_softplus = delta + torch.log(-torch.expm1(-delta))  # softplus(inv_softplus) = delta
        with torch.no_grad():
            (self.dt_proj.bias if self.selective else self.dt_bias).copy_(inv_softplus)
        self.A_log = nn.Parameter(torch.log(-s4d_init(di, ds, "real")))  # A = -exp(A_log), S4D-Real
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)  # W_out

    def _ssm_params(self, u: Tensor):
        """delta ``(..., d_inner)``, B and C ``(..., d_state)`` (selective) or constants."""
        if self.selective:
            dbc = self.x_proj(u)  # (..., dt_rank + 2 d_state)
            dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], -1)
            delta = F.softplus(self.dt_proj(dt))  # delta_t = softplus(u W_1 W_2 + bias)   (..., d_inner)
            return delta, B, C
        delta = F.softplus(self.dt_bias)  # delta, one per channel                      (d_inner,)
        return delta, self.B_param, self.C_param

    def _check_x(self, x: Tensor, rank: int, layout: str) -> None:
        _check_float("x", x, rank=rank, layout=layout)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have d_model = {self.d_model} on its last dim; got shape {_shape(x)}")

    def forward(self, x: Tensor, return_state: bool = False):
        """x ``(B, L, d_model)`` -> ``(B, L, d_model)`` (and the :class:`MambaState` after the
        last token, to continue with :meth:`step`)."""
        self._check_x(x, 3, "(B, L, d_model)")
        Bsz, L, _ = x.shape
        u, z = self.in_proj(x).chunk(2, -1)  # (B, L, d_inner) each
        u_c = u.transpose(1, 2)  # (B, d_inner, L)
        u = F.silu(self.conv1d(u_c)[..., :L]).transpose(1, 2)  # causal conv: drop the look-ahead  (B, L, d_inner)
        A = -torch.exp(self.A_log)  # A = -exp(A_log) < 0                  (d_inner, d_state)
        delta, B, C = self._ssm_params(u)
        if self.selective:
            y, h = selective_scan(u, delta, A, B, C, self.D, method=self.scan, return_state=True)
        else:
            A_bar = torch.exp(delta.unsqueeze(-1) * A)  # Abar = exp(delta A)      (d_inner, d_state)
            B_bar = delta.unsqueeze(-1) * B  # Bbar = delta B, as Mamba's selective path
            K = ssm_kernel(A_bar, B_bar, C, L)  # (d_inner, L)
            y = ssm_convolution(u, K, "fft") + self.D * u  # y = K * u + D u    (B, L, d_inner)
            h = None
            if return_state:
                _, h = ssm_recurrence(u, A_bar, B_bar, C)
        out = self.out_proj(y * F.silu(z))  # gate, then W_out           (B, L, d_model)
        if not return_state:
            return out
        k = self.d_conv - 1
        conv = F.pad(u_c, (k, 0))[..., -k:] if k else u_c[..., :0]  # the last d_conv - 1 inputs
        return out, MambaState(conv, h)  # conv (B, d_inner, d_conv - 1)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> MambaState:
        """The zero state for ``batch`` sequences (what the full forward starts from)."""
        batch = _check_int("batch", batch, 1)
        return MambaState(torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype))

    def step(self, x_t: Tensor, state: Optional[MambaState] = None):
        """One token: x_t ``(B, d_model)`` -> ``(y_t (B, d_model), new state)``; O(1) in the
        length so far. Equal to :meth:`forward` run on the whole prefix."""
        self._check_x(x_t, 2, "(B, d_model)")
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device, x_t.dtype)
        expected = ((x_t.shape[0], self.d_inner, self.d_conv - 1), (x_t.shape[0], self.d_inner, self.d_state))
        if not isinstance(state, tuple) or len(state) != 2 or _shape(state[0]) != str(expected[0]) \
                or _shape(state[1]) != str(expected[1]):
            got = (f"conv {_shape(state[0])}, h {_shape(state[1])}"
                   if isinstance(state, tuple) and len(state) == 2 else type(state).__name__)
            raise ValueError(f"state must be MambaState(conv {expected[0]}, h {expected[1]}) "
                             f"(d_state = {self.d_state}); got {got}")
        conv, h = state
        u, z = self.in_proj(x_t).chunk(2, -1)  # (B, d_inner) each
        window = torch.cat([conv, u.unsqueeze(-1)], -1)  # last d_conv inputs   (B, d_inner, d_conv)
        u = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (B, d_inner)
        A = -torch.exp(self.A_log)  # (d_inner, d_state)
        delta, B, C = self._ssm_params(u)
        if self.selective:
            y, h = selective_scan_step(u, delta, A, B, C, self.D, h)
        else:
            a = torch.exp(delta.unsqueeze(-1) * A)  # Abar                      (d_inner, d_state)
            h = a * h + (delta.unsqueeze(-1) * B) * u.unsqueeze(-1)  # h_t = Abar h_{t-1} + Bbar u_t
            y = (h * C).sum(-1) + self.D * u  # (B, d_inner)
        out = self.out_proj(y * F.silu(z))  # (B, d_model)
        return out, MambaState(window[..., 1:], h)


class MambaLM(nn.Module):
    """A small Mamba language model: embedding, N pre-norm residual blocks
    (``x + block(RMSNorm(x))``), a final RMSNorm and a linear head.

    ``forward(idx (B, L)) -> logits (B, L, vocab_size)``; ``step(idx_t (B,), states)`` ->
    ``(logits (B, vocab_size), states)`` with one :class:`MambaState` per block.
    Keyword arguments beyond the listed ones go to every :class:`MambaBlock`.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, **block_kwargs):
        super().__init__()
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        n_layers = _check_int("n_layers", n_layers, 1)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MambaBlock(d_model, **block_kwargs) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(n_layers))
        self.norm_f = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def _check_idx(self, idx, rank):
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != rank:
            raise ValueError(f"idx must be a LongTensor of {rank} dims ({'(B, L)' if rank == 2 else '(B,)'}); "
                             f"got {type(idx).__name__} {getattr(idx, 'dtype', '')} {_shape(idx)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"idx must lie in [0, {self.vocab_size}); got min {int(idx.min())}, "
                             f"max {int(idx.max())}")

    def forward(self, idx: Tensor) -> Tensor:
        self._check_idx(idx, 2)
        x = self.embed(idx)  # (B, L, d_model)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))  # pre-norm residual
        return self.head(self.norm_f(x))  # (B, L, vocab_size)

    def init_states(self, batch: int, device=None, dtype=torch.float32):
        return [b.init_state(batch, device, dtype) for b in self.blocks]

    def step(self, idx_t: Tensor, states=None):
        self._check_idx(idx_t, 1)
        x = self.embed(idx_t)  # (B, d_model)
        if states is None:
            states = self.init_states(idx_t.shape[0], x.device, x.dtype)
        new = []
        for norm, block, s in zip(self.norms, self.blocks, states, strict=True):
            y, s = block.step(norm(x), s)
            x = x + y
            new.append(s)
        return self.head(self.norm_f(x)), new  # (B, vocab_size)


# ----------------------------------------------------------------------------
# Memory per generated token
# ----------------------------------------------------------------------------

def _bytes(dtype) -> int:
    if isinstance(dtype, int):
        return _check_int("bytes_per_number", dtype, 1)
    return torch.empty((), dtype=dtype).element_size()


def state_bytes(n_layers: int, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                batch: int = 1, dtype=torch.float32) -> int:
    """Bytes of a Mamba LM's recurrent state: per layer ``d_inner (d_conv - 1 + d_state)``
    numbers, whatever the length. ``dtype``: a torch dtype or bytes per number."""
    d_inner = expand * _check_int("d_model", d_model, 1)
    n = _check_int("n_layers", n_layers, 1) * _check_int("batch", batch, 1) * d_inner * (
        _check_int("d_conv", d_conv, 1, " (the convolution width)") - 1 + _check_int("d_state", d_state, 1))
    return n * _bytes(dtype)


def kv_cache_bytes(n_layers: int, d_model: int, L: int, batch: int = 1, dtype=torch.float32) -> int:
    """Bytes of a transformer's KV cache after L tokens: ``2 L d_model`` numbers per layer
    (keys and values of all heads, ``H D = d_model``); grows linearly with L."""
    L = _check_int("L", L, 0)
    return 2 * _check_int("n_layers", n_layers, 1) * _check_int("batch", batch, 1) * L * \
        _check_int("d_model", d_model, 1) * _bytes(dtype)


def memory_per_token(model: MambaLM, L: int, batch: int = 1, dtype=torch.float32) -> dict:
    """The state that generation carries after L tokens, measured on ``model``'s real state
    tensors, against the KV cache of a transformer of the same ``n_layers`` and ``d_model``.

    Returns ``{"mamba": bytes, "kv_cache": bytes, "ratio": kv / mamba}``.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"model must be a MambaLM; got {type(model).__name__}")
    states = model.init_states(batch, dtype=dtype)
    mamba = sum(t.numel() * t.element_size() for s in states for t in s)
    kv = kv_cache_bytes(len(model.blocks), model.blocks[0].d_model, L, batch, dtype)
    return {"mamba": mamba, "kv_cache": kv, "ratio": kv / mamba}


# ----------------------------------------------------------------------------
# The task: selective copying
# ----------------------------------------------------------------------------

def selective_copying(n: int, length: int = 32, n_memorize: int = 4, vocab_size: int = 10,
                      generator=None):
    """Selective copying (Mamba sec. 3.1, Fig. 2): remember the data tokens scattered among
    NOISE tokens, then give them back in order, one per CUE.

    A sequence is ``length`` context positions (``n_memorize`` random data tokens in
    ``[2, vocab_size)`` at random positions, NOISE = 0 elsewhere) followed by
    ``n_memorize`` CUE = 1 tokens. The target at the i-th cue is the i-th data token; every
    other target is ``data.IGNORE``. Because the spacing is random, a fixed kernel (a
    time-invariant SSM) cannot know where to look; a selective one can.

    Returns ``(x, y)``, LongTensors ``(n, length + n_memorize)``.
    """
    n = _check_int("n", n, 1)
    length = _check_int("length", length, 1)
    n_memorize = _check_int("n_memorize", n_memorize, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 3, " (NOISE, CUE and at least one data token)")
    if n_memorize > length:
        raise ValueError(f"n_memorize must be <= length (the tokens must fit in the context); "
                         f"got n_memorize={n_memorize}, length={length}")
    g = _generator(generator)
    data = torch.randint(2, vocab_size, (n, n_memorize), generator=g)  # (n, k)
    pos = torch.rand(n, length, generator=g).argsort(1)[:, :n_memorize].sort(1).values  # (n, k)
    ctx = torch.full((n, length), NOISE, dtype=torch.long)
    ctx.scatter_(1, pos, data)
    x = torch.cat([ctx, torch.full((n, n_memorize), CUE, dtype=torch.long)], 1)  # (n, length + k)
    y = torch.full_like(x, IGNORE)
    y[:, length:] = data
    return x, y
