r"""Ternary weights and matmul-free language models: BitNet b1.58 and the MatMul-free LM.

Papers
------
* Ma, Wang, Ma, Wang, Wang, Huang, Dong, Wang, Xue, Wei 2024, "The Era of 1-bit LLMs: All
  Large Language Models are in 1.58 Bits", arXiv:2402.17764: sec. 2 (absmean quantisation of
  the weights to {-1, 0, +1}, 8-bit absmax activations), and its companion note "The Era of
  1-bit LLMs: Training Tips, Code and FAQ" (the reference ``BitLinear`` with the detach trick).
* Wang, Ma, Dong, Huang, Wang, Ma, Yang, Wang, Wu, Wei 2023, "BitNet: Scaling 1-bit
  Transformers for Large Language Models", arXiv:2310.11453: sec. 2 (BitLinear, latent
  full-precision weights, the straight-through estimator, absmax activations).
* Bengio, Léonard, Courville 2013, "Estimating or Propagating Gradients Through Stochastic
  Neurons for Conditional Computation", arXiv:1308.3432: the straight-through estimator.
* Zhu, Zhang, Sifferman, Sheaves, Wang, Richmond, Zhou, Eshraghian 2024, "Scalable MatMul-free
  Language Modeling", arXiv:2406.02528: sec. 3 (MatMul-free dense layers with ternary weights,
  the MLGRU token mixer that replaces self-attention, the GLU channel mixer, the block).

Ternary weights (absmean)
-------------------------
A BitLinear layer keeps a *latent* full-precision weight ``W`` of shape ``(d_out, d_in)``
(``nn.Linear``'s layout: the layer computes :math:`x W^\top`) and uses, in its forward pass,
the ternary weight

.. math::

    \Gamma_W = \frac{1}{d_\text{out} d_\text{in}} \sum_{ij} |W_{ij}|, \qquad
    \hat W = \operatorname{RoundClip}\!\left(\frac{W}{\Gamma_W}, -1, 1\right) \in \{-1, 0, 1\}^{d_\text{out}\times d_\text{in}},

with :math:`\operatorname{RoundClip}(v, lo, hi) = \max(lo, \min(hi, \operatorname{round}(v)))`;
the weight it multiplies by is :math:`\Gamma_W \hat W` (:func:`weight_quant`). :math:`\Gamma_W`
is clamped below at ``1e-5`` so that an all-zero weight does not divide by zero. About a third
of a Gaussian weight matrix's entries land on 0 (those with :math:`|W_{ij}| < \Gamma_W/2`).
log2(3) = 1.58 bits of information per weight: hence the name.

Activations (absmax, per token)
-------------------------------
Each token's activation row ``x`` (``d_in`` numbers) is scaled by its own largest magnitude
:math:`\Gamma_x = \|x\|_\infty` to integers of ``n_bits`` bits (:func:`activation_quant`):

.. math::

    \mathcal Q = 2^{n_\text{bits}-1} - 1 \;(=127 \text{ at 8 bits}), \qquad
    \hat x = \operatorname{RoundClip}\!\left(x \frac{\mathcal Q}{\Gamma_x}, -\mathcal Q - 1, \mathcal Q\right),

and :math:`x \approx \hat x\, \Gamma_x / \mathcal Q`. So a BitLinear output is one integer
product and one rescaling per output:

.. math::

    y = (\hat x \hat W^\top) \, \frac{\Gamma_W \Gamma_x}{\mathcal Q}.

With :math:`\hat W` ternary, each entry of :math:`\hat x \hat W^\top` is a signed *sum*:

.. math::

    (\hat x \hat W^\top)_j = \sum_{i \in \mathcal I^+_j} \hat x_i - \sum_{i \in \mathcal I^-_j} \hat x_i,
    \qquad \mathcal I^\pm_j = \{ i : \hat W_{ji} = \pm 1 \},

additions and subtractions only (:func:`addition_only_linear`); the only multiplications left
are the one rescaling per output (and the quantisation of the input, one per input number).
:func:`count_multiplications` counts them on the operations actually run.

Why the straight-through estimator
----------------------------------
``round`` is a step function: its derivative is 0 almost everywhere, so the gradient of the
loss with respect to ``W`` through :math:`\hat W` is zero and the latent weights would never
move. The straight-through estimator (STE) uses the rounding in the forward pass and the
identity in the backward pass. Written with the stop-gradient :math:`\operatorname{SG}`
(lecture 09's; ``.detach()``):

.. math::

    \tilde q(v) = v + \operatorname{SG}(q(v) - v) \qquad
    (\text{value } q(v), \text{ gradient } \partial \tilde q / \partial v = 1),

as in the reference BitLinear (:func:`ste`). The *clipped* STE (:class:`RoundClipSTE`, an
``autograd.Function``) passes the gradient only inside the clip range ``[lo, hi]`` and zero
outside, as the derivative of ``clamp`` would. Training keeps the latent ``W`` in full
precision (the optimiser's small steps accumulate there) and re-quantises it at every forward.

Memory: 2 bits per weight
-------------------------
Three values need 2 bits; :func:`pack_ternary` stores ``w + 1 in {0, 1, 2}`` four to a byte
(``uint8``; weight ``4 k + r`` of a row in bits ``2 r, 2 r + 1`` of byte ``k``), rows padded to a
multiple of 4. :func:`weight_bytes` compares 2-bit packing (plus one float32 scale) with fp32
(4 bytes per weight, 16x more) and bf16 (2 bytes, 8x more).

The MatMul-free LM (Zhu et al. 2024)
------------------------------------
Every dense layer is a ternary BitLinear; attention, whose :math:`Q K^\top` multiplies two
activations (no ternary weight there to exploit), is replaced by the MLGRU, a recurrence whose
state is updated element by element. For the mixer's input row :math:`x_t` at position ``t``
(:class:`MLGRU`; bold letters are the paper's unbolded ones, bold because the plain letters
have other meanings in this course; sigmoid is the paper's :math:`\sigma`, SiLU its :math:`\tau`):

.. math::

    \mathbf f_t &= \operatorname{sigmoid}(x_t \hat W_{\mathbf f}^\top + b_{\mathbf f})       \quad&\text{forget gate}\\
    \mathbf c_t &= \operatorname{SiLU}(x_t \hat W_{\mathbf c}^\top + b_{\mathbf c}) &\text{candidate}\\
    \mathbf h_t &= \mathbf f_t \odot \mathbf h_{t-1} + (1 - \mathbf f_t) \odot \mathbf c_t  &\text{state}\\
    \mathbf g_t &= \operatorname{sigmoid}(x_t \hat W_{\mathbf g}^\top + b_{\mathbf g})       &\text{output gate}\\
    \mathbf o_t &= (\mathbf g_t \odot \mathbf h_t)\, \hat W_{\mathbf o}^\top + b_{\mathbf o}. &

The state :math:`\mathbf h_t` has ``d_model`` numbers whatever the length, so generation is
O(1) per token (:meth:`MLGRU.step`); the full-sequence forward computes the four projections of
all positions at once and runs only the element-wise recurrence in a loop (lecture 11 shows how
a parallel scan removes that loop). The official code (``matmulfreellm``) differs in details:
a lower bound on the forget gate, and an RMSNorm with a SiLU output gate; here the paper's
equations. The channel mixer is a GLU (:class:`GLU`):

.. math::

    \operatorname{GLU}(x) = \bigl(\operatorname{SiLU}(x \hat W_\text{gate}^\top) \odot x \hat W_\text{up}^\top\bigr)\, \hat W_\text{down}^\top,

with hidden width :math:`d_\text{ff}`. A block (:class:`MatMulFreeBlock`) is pre-norm:
``x + MLGRU(RMSNorm(x))``, then ``x + GLU(RMSNorm(x))``; :class:`MatMulFreeLM` stacks them between
an embedding and a full-precision output head (the embedding is a table look-up, no matmul; the
head is kept in full precision as in the official code, ``ternary_head=True`` makes it ternary;
the full-precision head is the one matmul left, ``d_model x vocab_size`` per token).
``ternary=False`` builds the full-precision twin: the same layers, each RMSNorm included, with
float weights and activations (``BitLinear(..., ternary=False)``), so that the comparison of
:func:`train_twins` measures the quantisation and nothing else.

A common mistake: integers stored as float parameters
-----------------------------------------------------
A widely shared "ternary layer" initialises ``nn.Parameter(torch.randint(-1, 2, (d_out, d_in)).float())``
and returns ``x @ self.weight.T`` (:class:`NaiveTernaryLinear`). No scale, no quantisation in the
forward, no straight-through estimator: the optimiser updates the weights like any float
weights, so after one step they are no longer in {-1, 0, 1}; the layer is a float32 matmul
(32 bits per weight, every multiplication still done). The fix is :class:`BitLinear`: latent
float weights, :math:`\Gamma_W \hat W` in the forward, STE in the backward.

Shapes
------
Between blocks ``(B, L, d_model)``; a linear layer maps ``(..., d_in) -> (..., d_out)`` with the
weight stored ``(d_out, d_in)``; a packed weight is ``uint8 (d_out, ceil(d_in / 4))``; the MLGRU
state is ``(B, d_model)``.

Glossary (code -> symbol)
-------------------------
==========================  =============================================================
``weight``, ``w``           W, the latent full-precision weight (d_out, d_in)
``w_scale``                 Gamma_W = mean |W| (the paper's gamma; Gamma because lecture 09's
                            gamma is a compression rate)
``w_q``, ``w_ternary``      W^ in {-1, 0, 1} (the paper's W~)
``x_scale``                 Gamma_x = ||x||_inf per token (the paper's gamma for activations)
``x_q``                     x^, integers in [-Q - 1, Q] (the paper's x~)
``n_bits``, ``q_max``       n_bits and Q = 2^(n_bits - 1) - 1 (the paper's Q_b = 2^(b - 1))
``pos``, ``neg``            I+_j, I-_j: inputs where W^_ji = +1, -1
``f``, ``c``, ``h``, ``g``  bold f_t, c_t, h_t, g_t: the MLGRU's forget gate, candidate, state,
                            output gate (the paper's f_t, c_t, h_t, g_t)
``o``                       bold o_t, the MLGRU's output (the paper's o_t)
``d_ff``                    d_ff, the GLU's hidden width
==========================  =============================================================
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ._checks import check_int

__all__ = [
    # quantisation and the STE
    "SUPPORTED_BITS",
    "round_clip",
    "weight_quant",
    "activation_quant",
    "ste",
    "RoundClipSTE",
    "round_clip_ste",
    "rms_norm",
    # layers
    "BitLinear",
    "NaiveTernaryLinear",
    "is_ternary",
    # additions only; counting
    "ternary_indices",
    "addition_only_linear",
    "bitlinear_inference",
    "count_multiplications",
    "multiplication_table",
    # packing
    "pack_ternary",
    "unpack_ternary",
    "weight_bytes",
    # the MatMul-free LM
    "MLGRU",
    "GLU",
    "MatMulFreeBlock",
    "MatMulFreeLM",
    "train_twins",
]

#: Activation bit widths :func:`activation_quant` supports (integers stored in int8).
SUPPORTED_BITS = tuple(range(2, 9))
_EPS = 1e-5  # the floor of the scales Gamma_W and Gamma_x (the reference code's clamp)


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_float(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    return t


def _check_weight_2d(name: str, w) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D weight (d_out, d_in); got shape {_shape(w)} ({w.dim()}-D)")
    return w


def _check_bits(n_bits) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int):
        raise TypeError(f"n_bits must be an int in {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}; "
                        f"got {type(n_bits).__name__} {n_bits!r}")
    if n_bits not in SUPPORTED_BITS:
        raise ValueError(f"n_bits must be an int in {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]} "
                         f"(activations are stored as int8; weights are ternary, 1.58 bits); got {n_bits}")
    return n_bits


_check_size = check_int  # the shared check (_checks.py)


def _check_last_dim(name: str, x: Tensor, d: int) -> None:
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} must have last dimension d_in = {d}; got shape {_shape(x)}")


def _check_ternary_values(name: str, w: Tensor) -> None:
    if not is_ternary(w):
        bad = w[(w != -1) & (w != 0) & (w != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must hold only -1, 0 and 1 (a ternary weight, e.g. "
                         f"weight_quant(w)[0]); got values such as {bad}")


# ----------------------------------------------------------------------------
# Quantisation and the straight-through estimator
# ----------------------------------------------------------------------------

def round_clip(v: Tensor, lo: float, hi: float) -> Tensor:
    """RoundClip(v, lo, hi) = max(lo, min(hi, round(v))), element-wise (no gradient)."""
    return torch.clamp(torch.round(v), lo, hi)


def weight_quant(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Absmean ternary quantisation (BitNet b1.58, eq. 1-3).

    Args: w: (d_out, d_in) float (any shape works; the scale is per tensor).
    Returns ``(w_ternary, w_scale)``: w_ternary in {-1, 0, 1}, same shape and dtype as ``w``;
    w_scale = Gamma_W = mean |W| (0-d, floored at 1e-5). The layer uses ``w_scale * w_ternary``.
    No gradient flows (see :func:`ste`).
    """
    _check_float("w", w)
    w = w.detach()
    w_scale = w.abs().mean().clamp(min=_EPS)  # Gamma_W = mean |W_ij|
    w_ternary = round_clip(w / w_scale, -1, 1)  # RoundClip(W / Gamma_W, -1, 1)
    return w_ternary, w_scale


def activation_quant(x: Tensor, n_bits: int = 8) -> Tuple[Tensor, Tensor]:
    """Absmax quantisation of each token (row along the last dimension) to ``n_bits`` integers.

    Args: x: (..., d_in) float; n_bits in 2..8.
    Returns ``(x_q, x_scale)``: x_q (..., d_in) integer-valued in [-Q - 1, Q] with
    Q = 2^(n_bits - 1) - 1, in x's dtype; x_scale = Gamma_x = max_i |x_i| (..., 1), floored at
    1e-5. ``x ~= x_q * x_scale / Q``. No gradient flows (see :func:`ste`).
    """
    _check_float("x", x)
    q_max = 2 ** (_check_bits(n_bits) - 1) - 1  # Q
    x = x.detach()
    x_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)  # Gamma_x = ||x||_inf, (..., 1)
    x_q = round_clip(x * (q_max / x_scale), -q_max - 1, q_max)  # RoundClip(x Q / Gamma_x, -Q-1, Q)
    return x_q, x_scale


def ste(v: Tensor, v_quantised: Tensor) -> Tensor:
    """Straight-through estimator, the detach trick: ``v + SG(v_quantised - v)``.

    The value is ``v_quantised``; the gradient with respect to ``v`` is the identity
    (everywhere: no clip range). ``v_quantised`` gets no gradient.
    """
    return v + (v_quantised - v).detach()


class RoundClipSTE(torch.autograd.Function):
    """RoundClip with the *clipped* straight-through estimator.

    ``RoundClipSTE.apply(v, lo, hi)``: forward ``RoundClip(v, lo, hi)``; backward passes the
    incoming gradient where ``lo <= v <= hi`` and 0 outside (the derivative of clamp; the
    derivative of round, 0 almost everywhere, is replaced by 1).
    """

    @staticmethod
    def forward(ctx, v, lo, hi):
        ctx.save_for_backward(v)
        ctx.lo, ctx.hi = lo, hi
        return round_clip(v, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        inside = (v >= ctx.lo) & (v <= ctx.hi)
        return grad * inside.to(grad.dtype), None, None  # 1 inside [lo, hi], 0 outside


def round_clip_ste(v: Tensor, lo: float, hi: float) -> Tensor:
    """:class:`RoundClipSTE` with checks: ``lo < hi``, ``v`` floating point."""
    _check_float("v", v)
    if not lo < hi:
        raise ValueError(f"the clip range needs lo < hi; got lo={lo}, hi={hi}")
    return RoundClipSTE.apply(v, float(lo), float(hi))


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Parameter-free RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def is_ternary(w: Tensor) -> bool:
    """True if every entry of ``w`` is -1, 0 or 1."""
    return bool(((w == -1) | (w == 0) | (w == 1)).all())


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

class BitLinear(nn.Module):
    """BitNet b1.58's linear layer: latent float weights, ternary weights and 8-bit activations
    in the forward, the straight-through estimator in the backward.

    ``forward(x)``: (..., d_in) -> (..., d_out)::

        x = rms_norm(x)                              (if norm; parameter-free, as the reference code)
        x_q, Gamma_x = activation_quant(x)           (if n_bits is not None)
        W^, Gamma_W = weight_quant(W)
        y = STE(x_q Gamma_x / Q) STE(Gamma_W W^)^T + b

    The values are those of the quantised layer; the gradients reach the latent ``weight``
    (and ``x``) as if no rounding had happened. :meth:`quantized_weight` gives (W^, Gamma_W);
    :func:`bitlinear_inference` computes the same output with additions only.

    Args: d_in, d_out; bias (default False, as in BitNet); n_bits: activation bits
    (``None``: keep activations in float); norm: RMSNorm the input first; ternary: ``False``
    gives the full-precision twin (the same RMSNorm, then ``F.linear`` with the float weight and
    float activations: only the quantisation differs).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False, n_bits: Optional[int] = 8,
                 norm: bool = True, ternary: bool = True, device=None, dtype=None):
        super().__init__()
        self.ternary = bool(ternary)
        if not self.ternary:
            n_bits = None  # the full-precision twin: no quantisation at all
        self.d_in, self.d_out = _check_size("d_in", d_in), _check_size("d_out", d_out)
        self.n_bits = None if n_bits is None else _check_bits(n_bits)
        self.norm = bool(norm)
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))  # W, latent
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def quantized_weight(self) -> Tuple[Tensor, Tensor]:
        """(W^ (d_out, d_in) in {-1, 0, 1}, Gamma_W): what the forward multiplies by."""
        return weight_quant(self.weight)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the forward uses it: normed, then quantised-dequantised (with STE)."""
        if self.norm:
            x = rms_norm(x)
        if self.n_bits is not None:
            x_q, x_scale = activation_quant(x, self.n_bits)
            x = ste(x, x_q * x_scale / (2 ** (self.n_bits - 1) - 1))  # value x_q Gamma_x / Q
        return x

    def forward(self, x: Tensor) -> Tensor:
        _check_float("x", x)
        _check_last_dim("x", x, self.d_in)
        if not self.ternary:
            return F.linear(self.quantize_input(x), self.weight, self.bias)  # the float twin
        w_ternary, w_scale = self.quantized_weight()
        w = ste(self.weight, w_ternary * w_scale)  # value Gamma_W W^, gradient to the latent W
        return F.linear(self.quantize_input(x), w, self.bias)  # (..., d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}, "
                f"n_bits={self.n_bits}, norm={self.norm}, ternary={self.ternary}")


class NaiveTernaryLinear(nn.Module):
    """WRONG: the widely shared "ternary layer", kept for the lecture's common mistake.

    Stores random integers in {-1, 0, 1} as a float ``nn.Parameter`` and calls a float matmul:
    no scale, no quantisation in the forward, no straight-through estimator. The first
    optimiser step moves the weights off {-1, 0, 1} (:func:`is_ternary` turns False), and every
    multiplication of the matmul is still done, in float32. The fix: :class:`BitLinear`.
    """

    def __init__(self, d_in: int, d_out: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.d_in, self.d_out = _check_size("d_in", d_in), _check_size("d_out", d_out)
        w = torch.randint(-1, 2, (d_out, d_in), generator=generator).float()  # integers ... as floats
        self.weight = nn.Parameter(w)  # ... that the optimiser will update like any float

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # a plain float matmul: nothing ternary happens here


# ----------------------------------------------------------------------------
# The addition-only path, and counting multiplications
# ----------------------------------------------------------------------------

def ternary_indices(w_ternary: Tensor) -> Tuple[Tensor, Tensor]:
    """Index lists of a ternary (d_out, d_in) weight, padded to a rectangle.

    Returns ``(pos, neg)``, long tensors (d_out, n_pos) and (d_out, n_neg): row j lists the
    inputs i with W^_ji = +1 (I+_j), resp. -1 (I-_j), padded with the index d_in (which
    :func:`addition_only_linear` points at a zero). Built once per weight, like packing.
    """
    _check_weight_2d("w_ternary", w_ternary)
    _check_ternary_values("w_ternary", w_ternary)
    d_out, d_in = w_ternary.shape

    def lists(mask: Tensor) -> Tensor:  # (d_out, d_in) bool -> (d_out, max count) indices
        width = int(mask.sum(1).max()) if d_out > 0 else 0
        cols = torch.arange(d_in, device=mask.device).expand(d_out, d_in)
        padded = torch.where(mask, cols, torch.full_like(cols, d_in))  # d_in = the zero slot
        return padded.sort(dim=1).values[:, :width]  # real indices first, padding last

    return lists(w_ternary == 1), lists(w_ternary == -1)


def addition_only_linear(x: Tensor, w_ternary: Tensor, indices: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """x W^T for a ternary W^, with additions and subtractions only.

    ``y_j = sum_{i in I+_j} x_i - sum_{i in I-_j} x_i``: gather the inputs where W^_ji = +1
    and sum them, gather those where W^_ji = -1 and subtract their sum. No multiplication.

    Args: x: (..., d_in) (float or integer-valued); w_ternary: (d_out, d_in) in {-1, 0, 1};
    indices: :func:`ternary_indices` of w_ternary, if already built.
    Returns (..., d_out): in x's dtype for floating-point x; int64 for integer x (``sum``
    promotes, so int8 activations cannot overflow). Equal to ``x @ w_ternary.T``, exactly on
    integers.
    """
    _check_weight_2d("w_ternary", w_ternary)
    _check_last_dim("x", x, w_ternary.shape[1])
    pos, neg = ternary_indices(w_ternary) if indices is None else indices
    x_pad = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)  # (..., d_in + 1): a zero at d_in
    plus = x_pad[..., pos].sum(dim=-1)  # (..., d_out): sum of x_i over I+_j
    minus = x_pad[..., neg].sum(dim=-1)  # (..., d_out): sum of x_i over I-_j
    return plus - minus  # (..., d_out)


def bitlinear_inference(layer: BitLinear, x: Tensor, indices: Optional[Tuple[Tensor, Tensor]] = None,
                        weights: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """A :class:`BitLinear`'s forward at inference, with additions for the matrix product.

    ``y = addition_only_linear(x_q, W^) * (Gamma_W Gamma_x / Q) + b``: the integer activations
    summed and subtracted, then **one** multiplication per output by the combined scale.
    Equal to ``layer(x)`` up to float rounding. (The RMSNorm and the activation quantisation
    before it still multiply once per input number; :func:`count_multiplications` counts all.)
    Args: x (..., d_in); indices: :func:`ternary_indices`; weights: ``(W^, Gamma_W)`` as stored
    for inference (default: quantised from ``layer.weight`` now). Returns (..., d_out).
    """
    if not isinstance(layer, BitLinear):
        raise TypeError(f"layer must be a BitLinear; got {type(layer).__name__}")
    _check_float("x", x)
    _check_last_dim("x", x, layer.d_in)
    w_ternary, w_scale = layer.quantized_weight() if weights is None else weights
    if layer.norm:
        x = rms_norm(x)
    if layer.n_bits is None:
        x_q, scale = x, w_scale  # float activations: the scale is Gamma_W alone
    else:
        x_q, x_scale = activation_quant(x, layer.n_bits)
        w_scale = w_scale / (2 ** (layer.n_bits - 1) - 1)  # Gamma_W / Q: once per layer
        scale = x_scale * w_scale  # Gamma_W Gamma_x / Q, (..., 1): one multiplication per token
    acc = addition_only_linear(x_q, w_ternary, indices)  # (..., d_out): additions only
    y = acc * scale  # one multiplication per output
    return y if layer.bias is None else y + layer.bias


_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear",
            "_int_mm", "_sparse_mm", "_sparse_addmm"}
_CONVOLUTIONS = {"convolution", "_convolution", "convolution_overrideable", "conv1d", "conv2d", "conv3d",
                 "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution",
                 "_slow_conv2d_forward", "slow_conv3d_forward", "thnn_conv2d"}
_ELEMENTWISE_MULS = {"mul", "div", "pow", "rsqrt", "reciprocal", "addcmul", "addcdiv", "mean",
                     "lerp", "xlogy", "addr", "prod", "cumprod", "floor_divide", "true_divide", "remainder", "fmod"}


class _MultiplicationCounter(TorchDispatchMode):
    """Counts scalar multiplications (and divisions) in the aten operations run under it:
    ``m k n`` for an (m, k) x (k, n) product (a convolution: one weight slice per output entry,
    ``F.bilinear``'s ``_trilinear``: two per broadcast term), one per output element for
    mul/div and the other element-wise products (``lerp`` and ``xlogy`` hide one too)."""

    def __init__(self):
        super().__init__()
        self.matmul = 0
        self.elementwise = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # False: TorchDispatchMode leaves __torch_dispatch__ unwrapped. The default (True) wraps
        # it in torch._disable_dynamo, whose first call imports torch._dynamo (about 800 modules,
        # sympy among them; seconds). Nothing here is compiled, so the wrapper buys nothing.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _MATMULS:
            mats = [a for a in args if isinstance(a, Tensor) and a.dim() >= 1]
            k = mats[-2].shape[-1]  # (m, k) x (k, n); addmm/baddbmm's args are (bias, a, b)
            self.matmul += int(out.numel()) * int(k)  # each output entry: k products
        elif name in _CONVOLUTIONS:
            weight = args[1]  # (C_out, C_in / groups, *kernel): one slice per output entry
            self.matmul += int(out.numel()) * int(weight[0].numel())
        elif name == "_trilinear":  # F.bilinear: i1 * i2 * i3 over their broadcast shape, summed
            shapes = []
            for a, expand in zip(args[:3], args[3:6], strict=True):  # each operand with 1s at its expanded axes
                dims = iter(a.shape)
                shapes.append([1 if d in expand else next(dims) for d in range(a.dim() + len(expand))])
            self.matmul += 2 * math.prod(torch.broadcast_shapes(*shapes))
        elif name in ("_embedding_bag", "_embedding_bag_forward_only"):  # weighted bags multiply
            weights = args[6] if len(args) > 6 else kwargs.get("per_sample_weights")
            if isinstance(weights, Tensor):
                self.elementwise += int(weights.numel()) * int(args[0].shape[-1])
        elif name in _ELEMENTWISE_MULS:
            self.elementwise += int(out.numel()) if isinstance(out, Tensor) else 0
        return out


def count_multiplications(fn) -> Dict[str, int]:
    """Run ``fn()`` and count the multiplications its tensor operations perform.

    Returns ``{"matmul": ..., "elementwise": ..., "total": ...}``: products inside matrix
    multiplications (``d_in`` per output entry; convolutions and ``F.bilinear`` too) and
    element-wise multiplications, divisions, powers, reciprocal square roots, means, products and
    the operations that hide a product (``lerp``, ``xlogy``, ``addr``, weighted embedding bags;
    one per output element). Additions, gathers, sums, comparisons and rounding are not counted. Run it under ``torch.no_grad()`` to count a forward only.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments; got {type(fn).__name__}")
    with _MultiplicationCounter() as counter:
        fn()
    return {"matmul": counter.matmul, "elementwise": counter.elementwise,
            "total": counter.matmul + counter.elementwise}


def multiplication_table(layer: BitLinear, x: Tensor) -> Dict[str, Dict[str, int]]:
    """Multiplications and additions of one BitLinear forward on ``x``, path by path.

    ``n = x.numel() // d_in`` tokens. Formulas (checked against :func:`count_multiplications`
    by the tests):

    * ``"matmul"`` (dense ``F.linear``, the matrix product alone): ``n d_in d_out``
      multiplications and as many additions;
    * ``"additions"`` (:func:`addition_only_linear` then the rescaling, as in
      :func:`bitlinear_inference`): ``n d_out + n + 1`` multiplications (one per output, one
      per token to combine Gamma_x with Gamma_W / Q, one per layer for Gamma_W / Q) and
      ``n nnz(W^)`` additions or subtractions (``n d_out`` multiplications with float activations);
    * ``"input"`` (the work both paths share before the product: RMSNorm ``n (2 d_in + 2)``
      if ``layer.norm``, activation quantisation ``n (d_in + 2)`` if ``layer.n_bits``). The
      weights' quantisation is done once, offline, and not counted.

    Returns ``{path: {"multiplications": ..., "additions": ...}}`` (``"input"``: multiplications only).
    """
    if not isinstance(layer, BitLinear):
        raise TypeError(f"layer must be a BitLinear; got {type(layer).__name__}")
    _check_last_dim("x", x, layer.d_in)
    n = x.numel() // layer.d_in
    w_ternary, _ = layer.quantized_weight()
    nnz = int((w_ternary != 0).sum())
    return {"matmul": {"multiplications": n * layer.d_in * layer.d_out,
                       "additions": n * layer.d_in * layer.d_out},
            "additions": {"multiplications": n * layer.d_out + (n + 1) * (layer.n_bits is not None),
                          "additions": n * nnz},
            "input": {"multiplications": n * ((2 * layer.d_in + 2) * layer.norm
                                              + (layer.d_in + 2) * (layer.n_bits is not None))}}


# ----------------------------------------------------------------------------
# 2-bit packing
# ----------------------------------------------------------------------------

def pack_ternary(w_ternary: Tensor) -> Tensor:
    """Pack a ternary (d_out, d_in) weight at 2 bits: uint8 (d_out, ceil(d_in / 4)).

    Code ``c = w + 1 in {0, 1, 2}``; weight ``4 k + r`` of a row goes to bits ``2r, 2r+1`` of
    byte ``k``; a row is padded with zeros (code 1) to a multiple of 4. :func:`unpack_ternary`
    inverts it.
    """
    _check_weight_2d("w_ternary", w_ternary)
    _check_ternary_values("w_ternary", w_ternary)
    d_out, d_in = w_ternary.shape
    n_bytes = -(-d_in // 4)
    codes = torch.ones(d_out, 4 * n_bytes, dtype=torch.uint8, device=w_ternary.device)  # 1 = weight 0
    codes[:, :d_in] = (w_ternary + 1).to(torch.uint8)  # {-1, 0, 1} -> {0, 1, 2}
    codes = codes.view(d_out, n_bytes, 4)  # (d_out, n_bytes, 4): four weights per byte
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed  # (d_out, ceil(d_in / 4)) uint8


def unpack_ternary(packed: Tensor, d_in: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Invert :func:`pack_ternary`: uint8 (d_out, ceil(d_in / 4)) -> (d_out, d_in) in {-1, 0, 1}."""
    _check_weight_2d("packed", packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor (from pack_ternary); got {packed.dtype}")
    d_in = _check_size("d_in", d_in, 0)
    if packed.shape[1] != -(-d_in // 4):
        raise ValueError(f"packed must have ceil(d_in / 4) = {-(-d_in // 4)} bytes per row for "
                         f"d_in = {d_in}; got shape {_shape(packed)}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # (d_out, n_bytes, 4) codes in {0, 1, 2}
    if bool((codes == 3).any()):
        raise ValueError("packed holds the code 3, which pack_ternary never writes: not a packed ternary weight")
    w = codes.reshape(packed.shape[0], -1)[:, :d_in].to(torch.int16) - 1  # {0, 1, 2} -> {-1, 0, 1}
    return w.to(dtype)


def weight_bytes(d_out: int, d_in: int) -> Dict[str, int]:
    """Bytes to store a (d_out, d_in) weight: fp32, bf16, int8 (one ternary value per byte) and
    2-bit packing (:func:`pack_ternary`) plus its float32 scale Gamma_W."""
    d_out, d_in = _check_size("d_out", d_out), _check_size("d_in", d_in)
    n = d_out * d_in
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n, "packed_2bit": d_out * -(-d_in // 4) + 4}


# ----------------------------------------------------------------------------
# The MatMul-free LM: MLGRU token mixer, GLU channel mixer
# ----------------------------------------------------------------------------

def _dense(d_in: int, d_out: int, ternary: bool, bias: bool = False) -> BitLinear:
    """A ternary BitLinear, or for the full-precision twin the same layer unquantised."""
    return BitLinear(d_in, d_out, bias=bias, ternary=ternary)


class MLGRU(nn.Module):
    """The MatMul-free linear GRU token mixer (Zhu et al. 2024, sec. 3.3.1).

    ``forward(x, state=None) -> (o, h_last)``: x (B, L, d_model), state (B, d_model) or None
    (zeros); o (B, L, d_model), h_last (B, d_model). ``step(x_t, state) -> (o_t, h_t)`` with
    x_t (B, d_model): the same computation one position at a time, constant-size state.
    Equations in the module docstring; ``ternary=False``: unquantised layers (the twin).
    """

    def __init__(self, d_model: int, ternary: bool = True):
        super().__init__()
        self.d_model = _check_size("d_model", d_model)
        self.proj = _dense(d_model, 3 * d_model, ternary, bias=True)  # W_f, W_c, W_g stacked
        self.out = _dense(d_model, d_model, ternary, bias=True)  # W_o

    def _gates(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        f, c, g = self.proj(x).chunk(3, dim=-1)
        return torch.sigmoid(f), F.silu(c), torch.sigmoid(g)  # forget gate, candidate, output gate

    def _check_state(self, x: Tensor, state: Optional[Tensor]) -> Tensor:
        B = x.shape[0]
        if state is None:
            return x.new_zeros(B, self.d_model)
        if not isinstance(state, Tensor) or _shape(state) != (B, self.d_model):
            got = _shape(state) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"state must have shape (B, d_model) = {(B, self.d_model)}; got {got}")
        return state

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_float("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, d_model) with d_model = {self.d_model}; got shape {_shape(x)}")
        h = self._check_state(x, state)  # (B, d_model)
        f, c, g = self._gates(x)  # each (B, L, d_model): all positions at once
        fc = (1 - f) * c  # (1 - f_t) c_t
        hs = []
        for t in range(x.shape[1]):  # the element-wise recurrence
            h = f[:, t] * h + fc[:, t]  # h_t = f_t h_{t-1} + (1 - f_t) c_t
            hs.append(h)
        hs = torch.stack(hs, dim=1) if hs else x.new_zeros(x.shape)  # (B, L, d_model)
        return self.out(g * hs), h  # o_t = (g_t h_t) W_o^T + b_o

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_float("x_t", x_t)
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must be (B, d_model) with d_model = {self.d_model}; got shape {_shape(x_t)}")
        h = self._check_state(x_t, state)
        f, c, g = self._gates(x_t)  # (B, d_model) each
        h = f * h + (1 - f) * c  # h_t
        return self.out(g * h), h


class GLU(nn.Module):
    """The GLU channel mixer: ``(SiLU(x W_gate^T) * x W_up^T) W_down^T``, (..., d_model) -> same."""

    def __init__(self, d_model: int, d_ff: int, ternary: bool = True):
        super().__init__()
        self.d_model, self.d_ff = _check_size("d_model", d_model), _check_size("d_ff", d_ff)
        self.gate_up = _dense(d_model, 2 * d_ff, ternary)  # W_gate, W_up stacked
        self.down = _dense(d_ff, d_model, ternary)  # W_down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., d_ff) each
        return self.down(F.silu(gate) * up)  # (..., d_model)


class MatMulFreeBlock(nn.Module):
    """Pre-norm block: ``x + MLGRU(RMSNorm(x))``, then ``x + GLU(RMSNorm(x))``; (B, L, d_model)."""

    def __init__(self, d_model: int, d_ff: int, ternary: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixer = MLGRU(d_model, ternary)
        self.mlp = GLU(d_model, d_ff, ternary)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        o, h = self.mixer(self.norm1(x), state)
        x = x + o
        return x + self.mlp(self.norm2(x)), h

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        o, h = self.mixer.step(self.norm1(x_t), state)
        x_t = x_t + o
        return x_t + self.mlp(self.norm2(x_t)), h


class MatMulFreeLM(nn.Module):
    """A small MatMul-free language model: embedding, ``n_layers`` :class:`MatMulFreeBlock`,
    RMSNorm, output head.

    ``forward(idx) -> logits``: idx (B, L) long -> (B, L, vocab_size) (so it trains with
    :func:`transformer_lab.train.train`). ``forward_with_state(idx, states)`` also returns the
    per-layer states; ``step(token, states) -> (logits (B, vocab_size), states)`` generates one
    token at a time with a state of n_layers x (B, d_model) numbers, whatever the length.
    ``ternary=False``: the full-precision twin (every BitLinear with ``ternary=False``).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, d_ff: Optional[int] = None,
                 ternary: bool = True, ternary_head: bool = False):
        super().__init__()
        self.vocab_size = _check_size("vocab_size", vocab_size)
        self.d_model = _check_size("d_model", d_model)
        self.n_layers = _check_size("n_layers", n_layers)
        d_ff = 2 * d_model if d_ff is None else _check_size("d_ff", d_ff)
        self.ternary = bool(ternary)
        self.embed = nn.Embedding(vocab_size, d_model)  # a table look-up
        self.blocks = nn.ModuleList(MatMulFreeBlock(d_model, d_ff, ternary) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = _dense(d_model, vocab_size, ternary and ternary_head)

    def _check_idx(self, idx: Tensor, dims: int) -> None:
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != dims:
            got = f"{idx.dtype} {_shape(idx)}" if isinstance(idx, Tensor) else type(idx).__name__
            want = "(B, L)" if dims == 2 else "(B,)"
            raise ValueError(f"token ids must be a long tensor {want}; got {got}")

    def forward_with_state(self, idx: Tensor, states: Optional[List[Tensor]] = None):
        self._check_idx(idx, 2)
        states = [None] * self.n_layers if states is None else list(states)
        x = self.embed(idx)  # (B, L, d_model)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, h = block(x, s)
            new.append(h)
        return self.head(self.norm(x)), new  # (B, L, vocab_size), n_layers x (B, d_model)

    def forward(self, idx: Tensor) -> Tensor:
        return self.forward_with_state(idx)[0]

    def step(self, token: Tensor, states: Optional[List[Tensor]] = None):
        self._check_idx(token, 1)
        states = [None] * self.n_layers if states is None else list(states)
        x = self.embed(token)  # (B, d_model)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, h = block.step(x, s)
            new.append(h)
        return self.head(self.norm(x)), new


# ----------------------------------------------------------------------------
# The lecture's claim: ternary vs its full-precision twin
# ----------------------------------------------------------------------------

def train_twins(task: str = "char", steps: int = 200, seed: int = 0, d_model: int = 64, n_layers: int = 2,
                batch_size: int = 32, block_size: int = 32, lr: float = 1e-2, length: int = 6,
                vocab_size: int = 10, max_chars: int = 100_000, progress: bool = False) -> Dict[str, dict]:
    """Train a ternary :class:`MatMulFreeLM` and its full-precision twin on the same batches.

    ``task="char"``: next-character prediction on ``data.char_corpus(max_chars)`` in windows of
    ``block_size``; any task name of :func:`transformer_lab.data.make_task` (``"copy"``, ...)
    uses ``length`` and ``vocab_size``. Both models are built after ``seed_everything(seed)``
    (same embedding initialisation) and trained by :func:`transformer_lab.train.train` with the
    same seed, learning rate, ``steps//10`` warm-up and cosine decay. The default ``lr = 1e-2``
    suits both; the ternary model gains most from it (measured on a 2-core CPU, 300 steps,
    d_model 64, 2 layers, seeds 0-2: char LM eval loss ternary 1.38-1.40 vs full 1.22-1.23 at
    1e-2, 1.58-1.59 vs 1.37-1.38 at 3e-3; the gap shrinks with width, 0.08 at d_model 128).
    About 15-30 s for both models at 300 steps on a shared 2-core CPU. Lecture 12 uses
    ``d_model=48, n_layers=1, batch_size=16, block_size=32, max_chars=50_000``, 300 steps: 7-11 s
    for the pair, eval gap +0.14..+0.16 nats over seeds 0-3 (1.68-1.69 vs 1.53-1.54).

    Returns ``{"ternary": {...}, "full": {...}}``, each with ``"history"`` (train's), ``"final"``
    (mean training loss over the last 10% of steps), ``"eval"`` (evaluate's mean loss over 10
    fresh batches) and ``"model"``.
    """
    from . import data
    from .device import seed_everything
    from .train import evaluate, train

    steps = _check_size("steps", steps)
    if task == "char":
        text = data.char_corpus(max_chars)
        tok = data.CharTokenizer.from_text(text)
        get_batch = data.lm_batches(tok.encode(text), block_size, batch_size)
        vocab = tok.vocab_size
    else:
        get_batch = data.task_batches(task, batch_size, length, vocab_size)
        vocab = vocab_size
    out = {}
    for name, ternary in (("ternary", True), ("full", False)):
        seed_everything(seed)
        model = MatMulFreeLM(vocab, d_model=d_model, n_layers=n_layers, ternary=ternary)
        hist = train(model, get_batch, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                     schedule="cosine", progress=progress, desc=name)
        tail = hist["loss"][-max(1, steps // 10):]
        out[name] = {"history": hist, "final": sum(tail) / len(tail),
                     "eval": evaluate(model, get_batch), "model": model}
    return out
