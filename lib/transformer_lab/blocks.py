r"""Transformer blocks: LayerNorm, the position-wise feed-forward network, residual scaling,
encoder and decoder blocks.

Papers
------
* Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762 (section 3.1, 3.3).
* Ba, Kiros, Hinton 2016, "Layer Normalization", arXiv:1607.06450.
* Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202 (SwiGLU).
* Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture",
  arXiv:2002.04745 (pre-norm vs post-norm).
* Touvron et al. 2021, "Going deeper with Image Transformers" (CaiT), arXiv:2103.17239 (LayerScale).
* Bachlechner et al. 2020, "ReZero is All You Need", arXiv:2003.04887.
* Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", arXiv:2203.00555 (DeepNorm).

Equations
---------
LayerNorm over the feature dim::

    LN(x) = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta       (biased variance)

Feed-forward network (applied to each position separately)::

    FFN(x)        = W_2 act(W_1 x + b_1) + b_2                       act = ReLU or GELU
    FFN_SwiGLU(x) = W_2 (SiLU(W_1 x) * W_3 x)                        (Shazeer: W, V, W_2)

One residual sub-layer f (attention or FFN), by ``residual`` and ``norm_first``::

    post-norm (Vaswani):    x <- LN(x + f(x))
    pre-norm  (Xiong):      x <- x + f(LN(x))
    LayerScale (CaiT):      x <- x + diag(lambda) f(LN(x))          lambda init 1e-4 per channel
    ReZero:                 x <- x + alpha f(x)                     alpha init 0, no LayerNorm
    DeepNorm (DeepNet):     x <- LN(a x + f(x))                     a = (2N)^(1/4), post-norm
                            and W of the FFN, the value and output projections
                            initialised with Xavier gain b = (8N)^(-1/4)

(a and b are DeepNet's values for an encoder-only or decoder-only stack of N
layers; the paper's encoder-decoder values differ and are not used here.)
Dropout is applied to f's output before the residual add, as in Vaswani et al.
and ``nn.TransformerEncoderLayer``.

Shapes: between blocks ``(B, L, d_model)``; inside attention ``(B, H, L, D)``.

Glossary (variable -> paper symbol)
-----------------------------------
=================  ===========================================================
``d_model``        d_model
``d_ff``           d_ff, the FFN's hidden width (4 d_model; 8/3 d_model for SwiGLU)
``w1, w2, w3``     W_1, W_2 (and W_3 = Shazeer's V for SwiGLU)
``norm``           LN, with ``weight`` = gamma, ``bias`` = beta
``gain``           LayerScale's lambda (per channel) or ReZero's alpha (scalar)
``alpha``          DeepNorm's a, the constant that up-weights the residual x
``beta``           DeepNorm's b, the Xavier gain at initialisation
``n_layers``       N, the number of blocks in the stack (DeepNorm only)
=================  ===========================================================
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention

__all__ = [
    "layer_norm",
    "FeedForward",
    "Residual",
    "deepnorm_constants",
    "EncoderBlock",
    "DecoderBlock",
    "ACTIVATIONS",
    "RESIDUALS",
]

ACTIVATIONS = ("relu", "gelu", "swiglu")
RESIDUALS = ("none", "layerscale", "rezero", "deepnorm")

#: LayerScale's initial lambda (CaiT uses 1e-1 .. 1e-6 by depth; 1e-4 is a middle value).
LAYERSCALE_INIT = 1e-4


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (Ba et al. 2016): (..., d) -> (..., d). Same as ``F.layer_norm``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor; got {got}")
    mean = x.mean(dim=-1, keepdim=True)  # mu: (..., 1)
    var = x.var(dim=-1, keepdim=True, unbiased=False)  # sigma^2 (biased, as in the paper)
    y = (x - mean) / torch.sqrt(var + eps)  # (x - mu) / sqrt(sigma^2 + eps)
    if weight is not None:
        y = y * weight  # gamma
    if bias is not None:
        y = y + bias  # beta
    return y


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


class FeedForward(nn.Module):
    """Position-wise FFN: ``W_2 act(W_1 x)``, or SwiGLU ``W_2 (SiLU(W_1 x) * W_3 x)``.

    ``d_ff`` defaults to ``4 * d_model``, and for SwiGLU to ``int(8 * d_model / 3)`` so that
    its three matrices hold about as many parameters as the two of a 4x FFN.
    """

    def __init__(self, d_model: int, d_ff: Optional[int] = None, activation: str = "gelu",
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        if d_ff is None:
            d_ff = int(8 * d_model / 3) if activation == "swiglu" else 4 * d_model
        self.activation, self.d_model, self.d_ff = activation, d_model, d_ff
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)  # W_1 (SwiGLU: the gate W)
        if activation == "swiglu":
            self.w3 = nn.Linear(d_model, d_ff, bias=bias)  # W_3 (Shazeer's V)
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)  # W_2
        self.drop = nn.Dropout(dropout)

    def hidden(self, x: Tensor) -> Tensor:
        """The activation in the middle: (B, L, d_model) -> (B, L, d_ff)."""
        if self.activation == "relu":
            return F.relu(self.w1(x))  # max(0, x W_1 + b_1)
        if self.activation == "gelu":
            return F.gelu(self.w1(x))  # x Phi(x), exact GELU
        return F.silu(self.w1(x)) * self.w3(x)  # SiLU(x W) * (x V)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.drop(self.hidden(x)))  # (B, L, d_model)


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """DeepNet's (alpha, beta) for an encoder-only or decoder-only stack of N layers.

    alpha = (2N)^(1/4) up-weights the residual; beta = (8N)^(-1/4) is the init gain.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1 for DeepNorm; got {n_layers}")
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


class Residual(nn.Module):
    """One residual sub-layer around a function ``f``: norm placement and residual scaling.

    ``Residual(d_model, norm_first, kind, n_layers, dropout)(x, f)`` computes, for
    ``kind`` = "none": ``x + f(LN(x))`` (pre-norm) or ``LN(x + f(x))`` (post-norm);
    "layerscale": the same with ``f`` multiplied by a per-channel ``gain`` (init 1e-4);
    "rezero": ``x + gain * f(x)`` with a scalar ``gain`` (init 0) and no LayerNorm;
    "deepnorm": ``LN(alpha * x + f(x))`` (always post-norm).
    Dropout is applied to ``f``'s output before the add.
    """

    def __init__(self, d_model: int, norm_first: bool = True, kind: str = "none",
                 n_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        _check_choice("residual", kind, RESIDUALS)
        self.kind = kind
        self.norm_first = norm_first and kind != "deepnorm"  # DeepNorm is post-norm
        self.alpha = deepnorm_constants(n_layers)[0] if kind == "deepnorm" else 1.0
        self.norm = nn.Identity() if kind == "rezero" else nn.LayerNorm(d_model)
        if kind == "layerscale":
            self.gain = nn.Parameter(torch.full((d_model,), LAYERSCALE_INIT))  # diag(lambda)
        elif kind == "rezero":
            self.gain = nn.Parameter(torch.zeros(1))  # alpha, starts at 0: identity block
        else:
            self.gain = None
        self.drop = nn.Dropout(dropout)

    def branch(self, fx: Tensor) -> Tensor:
        fx = self.drop(fx)
        return fx if self.gain is None else self.gain * fx

    def forward(self, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        if self.kind == "rezero":
            return x + self.branch(f(x))  # x + alpha f(x)
        if self.norm_first:
            return x + self.branch(f(self.norm(x)))  # x + f(LN(x))
        return self.norm(self.alpha * x + self.branch(f(x)))  # LN(alpha x + f(x)), alpha = 1 unless DeepNorm


def _deepnorm_init(attn: MultiHeadAttention, ffn: Optional[FeedForward], beta: float) -> None:
    """DeepNet init: Xavier-normal, gain beta for FFN, W^V and W^O; gain 1 for W^Q and W^K."""
    d = attn.d_model
    with torch.no_grad():
        if attn.cross:
            nn.init.xavier_normal_(attn.q.weight, gain=1.0)
            nn.init.xavier_normal_(attn.kv.weight[:d], gain=1.0)  # W^K
            nn.init.xavier_normal_(attn.kv.weight[d:], gain=beta)  # W^V
        else:
            w = attn.qkv.weight  # rows [W^Q; W^K; W^V], each (d, d)
            nn.init.xavier_normal_(w[:d], gain=1.0)
            nn.init.xavier_normal_(w[d:2 * d], gain=1.0)
            nn.init.xavier_normal_(w[2 * d:], gain=beta)
        nn.init.xavier_normal_(attn.out.weight, gain=beta)
        for name in ("w1", "w2", "w3"):
            if ffn is not None and hasattr(ffn, name):
                nn.init.xavier_normal_(getattr(ffn, name).weight, gain=beta)


def _check_x(x, d_model: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor (batch, seq, d_model); got {got}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"x must be a 3-D tensor (batch, seq, d_model={d_model}); got shape {tuple(x.shape)}"
        )


def _keeping_weights(attn, kept: dict, mask, positions, need_weights: bool, kv_prefix=None):
    """Self-attention as a sublayer ``f(h)`` for :class:`Residual`; when ``need_weights``
    it stores the attention weights in ``kept["weights"]`` and returns only the output.
    ``kv_prefix`` (prefix tuning) is passed on only when given, so any attention module
    with the library's signature can stand in for ``attn``."""
    extra = {} if kv_prefix is None else {"kv_prefix": kv_prefix}

    def self_attention(h: Tensor) -> Tensor:
        out = attn(h, mask=mask, positions=positions, need_weights=need_weights, **extra)
        if need_weights:
            out, kept["weights"] = out
        return out

    return self_attention


class EncoderBlock(nn.Module):
    """Self-attention then FFN, each in a :class:`Residual` (Vaswani et al. section 3.1).

    With ``norm_first=False``, ``residual="none"`` and dropout 0 this computes exactly
    ``nn.TransformerEncoderLayer(d_model, n_heads, d_ff, activation=..., batch_first=True)``:
    copy ``self_attn.in_proj_*`` to ``attn.qkv``, ``self_attn.out_proj`` to ``attn.out``,
    ``linear1/linear2`` to ``ffn.w1/w2``, ``norm1/norm2`` to ``res_attn.norm/res_ffn.norm``.

    ``forward(x, mask=None, positions=None, need_weights=False, kv_prefix=None)``: x (B, L,
    d_model), mask broadcastable to (B, H, L, L) (True = attend); kv_prefix: keys and values
    put in front of the self-attention's own (prefix tuning, see
    ``MultiHeadAttention``). Returns x, or (x, weights (B, H, L, L)).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 activation: str = "gelu", norm_first: bool = True, residual: str = "none",
                 n_layers: int = 1, fast: bool = True):
        super().__init__()
        self.d_model = d_model
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, fast=fast)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.res_attn = Residual(d_model, norm_first, residual, n_layers, dropout)
        self.res_ffn = Residual(d_model, norm_first, residual, n_layers, dropout)
        self.norm_first = self.res_attn.norm_first
        if residual == "deepnorm":
            _deepnorm_init(self.attn, self.ffn, deepnorm_constants(n_layers)[1])

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, positions=None,
                need_weights: bool = False, kv_prefix=None):
        _check_x(x, self.d_model)
        kept = {}
        self_attention = _keeping_weights(self.attn, kept, mask, positions, need_weights, kv_prefix)

        x = self.res_attn(x, self_attention)  # (B, L, d_model)
        x = self.res_ffn(x, self.ffn)  # (B, L, d_model)
        return (x, kept["weights"]) if need_weights else x


class DecoderBlock(nn.Module):
    """Masked self-attention, cross-attention to the encoder's memory, FFN (Vaswani section 3.1).

    With ``cross_attention=False`` there is no cross-attention: a GPT block.
    The caller passes the causal mask (see ``attention.causal_mask``).

    ``forward(x, memory=None, mask=None, memory_mask=None, positions=None, need_weights=False,
    kv_prefix=None, need_cross_weights=False)``: x (B, Lt, d_model); memory (B, Ls, d_model);
    mask broadcastable to (B, H, Lt, Lt); memory_mask broadcastable to (B, H, Lt, Ls);
    kv_prefix: keys and values put in front of the self-attention's own (prefix tuning).
    Returns x, or (x, self-attention weights (B, H, Lt, Lt)) with ``need_weights``, or
    (x, self-attention weights, cross-attention weights (B, H, Lt, Ls)) with
    ``need_cross_weights`` (a block with cross-attention only).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 activation: str = "gelu", norm_first: bool = True, residual: str = "none",
                 n_layers: int = 1, fast: bool = True, cross_attention: bool = True):
        super().__init__()
        self.d_model, self.cross_attention = d_model, cross_attention
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, fast=fast)
        self.res_attn = Residual(d_model, norm_first, residual, n_layers, dropout)
        if cross_attention:
            self.cross = MultiHeadAttention(d_model, n_heads, dropout=dropout, fast=fast, cross=True)
            self.res_cross = Residual(d_model, norm_first, residual, n_layers, dropout)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.res_ffn = Residual(d_model, norm_first, residual, n_layers, dropout)
        self.norm_first = self.res_attn.norm_first
        if residual == "deepnorm":
            beta = deepnorm_constants(n_layers)[1]
            _deepnorm_init(self.attn, self.ffn, beta)
            if cross_attention:
                _deepnorm_init(self.cross, None, beta)

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, positions=None, need_weights: bool = False,
                kv_prefix=None, need_cross_weights: bool = False):
        _check_x(x, self.d_model)
        if self.cross_attention and memory is None:
            raise ValueError("this DecoderBlock has cross-attention: pass memory (B, Ls, d_model)")
        if not self.cross_attention and memory is not None:
            raise ValueError("this DecoderBlock has no cross-attention (cross_attention=False); "
                             "got a memory tensor")
        if need_cross_weights and not self.cross_attention:
            raise ValueError("need_cross_weights: this DecoderBlock has no cross-attention")
        kept = {}
        need_self = need_weights or need_cross_weights
        self_attention = _keeping_weights(self.attn, kept, mask, positions, need_self, kv_prefix)

        def cross_attention(h: Tensor) -> Tensor:
            out = self.cross(h, context=memory, mask=memory_mask, need_weights=need_cross_weights)
            if need_cross_weights:
                out, kept["cross"] = out  # (B, H, Lt, Ls)
            return out

        x = self.res_attn(x, self_attention)  # (B, Lt, d_model)
        if self.cross_attention:
            x = self.res_cross(x, cross_attention)  # (B, Lt, d_model)
        x = self.res_ffn(x, self.ffn)  # (B, Lt, d_model)
        if need_cross_weights:
            return x, kept["weights"], kept["cross"]
        return (x, kept["weights"]) if need_weights else x
