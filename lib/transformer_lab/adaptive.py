r"""Adaptive computation: depth that adapts per position, attention span that adapts per head.

Papers
------
* Dehghani, Gouws, Vinyals, Uszkoreit, Kaiser 2019, "Universal Transformers",
  arXiv:1807.03819: sec. 2.1 (one shared layer applied recurrently, a coordinate embedding of
  position and step added before every step), sec. 2.2 (ACT per position).
* Graves 2016, "Adaptive Computation Time for Recurrent Neural Networks", arXiv:1603.08983:
  eq. 5-13 (halting probabilities, the remainder, the halting-weighted mean of the states,
  the ponder cost and its weight in the loss).
* Banino, Balaguer, Blundell 2021, "PonderNet: Learning to Ponder", arXiv:2107.05407
  (probabilistic halting; taught in words in the lecture).
* Sukhbaatar, Grave, Bojanowski, Joulin 2019, "Adaptive Attention Span in Transformers",
  arXiv:1905.07799: sec. 3 (the soft ramp mask, a learned span per head, the L1 penalty).
* Elbayad, Gu, Grave, Auli 2020, "Depth-Adaptive Transformer", arXiv:1910.10073
  (a classifier after every layer, trained on all exits, confidence-based exit).
* Schuster, Fisch, Gupta, Dehghani, Bahri, Tran, Tay, Metzler 2022, "Confident Adaptive
  Language Modeling" (CALM), arXiv:2207.07061: sec. 3 (consistency with the full model),
  sec. 4 (softmax-margin and state-saturation confidence, copying the states of skipped
  layers), sec. 5 (calibration with Learn-then-Test, Angelopoulos et al. 2021,
  arXiv:2110.01052).

Equations (the course's symbols; the papers' in brackets)
---------------------------------------------------------
ACT, per position i, with halting probabilities psi_i^(t) in [0, 1] for steps t = 1..N::

    N_i   = min{ t : psi_i^(1) + ... + psi_i^(t) >= 1 - iota }, or N if never   [N(t)]
    R_i   = 1 - (psi_i^(1) + ... + psi_i^(N_i - 1))                              [R(t)] remainder
    p_i^(t) = psi_i^(t) for t < N_i,  R_i for t = N_i,  0 after                  [p_t^n]
    xbar_i = sum_t p_i^(t) x_i^(t)                                               the mean state
    P_i   = N_i + R_i          ponder cost, added to the loss with weight tau     [rho_t, tau]

Adaptive span (head a has span zeta_a, every head the ramp nu)::

    chi_zeta(i - j) = clamp((nu + zeta - (i - j)) / nu, 0, 1)   for keys j <= i   [m_z(x), R]
    P_ij = chi(i - j) exp(s_ij) / sum_{j' <= i} chi(i - j') exp(s_ij');  penalty tau * sum_a zeta_a

Early exit (CALM): token i leaves after the first layer l whose confidence exceeds Lambda
(CALM's lambda); its state is copied to layers l+1..N, so later tokens attend to it there.
Learn-then-Test: thresholds from the most conservative down; each is tested with a p-value of
"disagreement rate > xi" (the paper's delta) on n calibration sequences and kept while the
p-value is <= upsilon (the paper's epsilon); the last kept one is returned.

Shapes: inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``;
halting probabilities ``(B, L, N)``.

Glossary (code -> symbol)
-------------------------
``halt_probs`` psi (B, L, N); ``threshold`` of ACT 1 - iota; ``n_steps`` N_i; ``remainder``
R_i (calligraphic R in the lecture); ``ponder`` P_i (calligraphic P); ``weights`` p_i^(t);
``spans`` zeta (H,); ``ramp`` nu; ``threshold`` of an exit Lambda; ``tolerance`` xi;
``failure_prob`` upsilon.

Benchmark hooks: :func:`early_exit_forward` ``(model, idx, threshold, measure="softmax") ->
(logits (B, L, vocab_size), layers_used (B, L) int64)`` and :func:`calibrate_threshold`
``(model, idx, tolerance, failure_prob=0.1, thresholds=None, measure="softmax",
method="binomial", generator=None) -> float``. A threshold of 1 reproduces the full model exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import causal_mask
from .blocks import DecoderBlock, EncoderBlock

__all__ = [
    "step_encoding", "UniversalTransformer", "unrolled_stack", "run_stack",
    "act_weights", "ACTUniversalTransformer",
    "span_mask", "span_attention", "span_penalty", "AdaptiveSpanAttention", "SpanModel",
    "EarlyExitLM", "exit_confidence", "early_exit_forward", "early_exit_forward_tokenwise",
    "binomial_pvalue", "hoeffding_pvalue", "learn_then_test", "exit_disagreements",
    "calibrate_threshold", "marker_task", "window_mask",
]


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------

def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _check_halting_threshold(threshold) -> float:
    t = float(threshold)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"the halting threshold 1 - iota must lie in (0, 1]; got {threshold}")
    return t


def _check_ramp(ramp) -> float:
    r = float(ramp)
    if not r > 0:
        raise ValueError(f"the span ramp nu must be > 0 (a ramp of 0 has no gradient for the span); got {ramp}")
    return r


def _check_open_unit(name: str, value) -> float:
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {value}")
    return v


def _check_exit_threshold(threshold) -> float:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the exit threshold Lambda must lie in [0, 1] (1 = never exit); got {threshold}")
    return t


# ----------------------------------------------------------------------------
# Universal Transformer
# ----------------------------------------------------------------------------

def step_encoding(n_steps: int, d_model: int, dtype=None, device=None) -> Tensor:
    """Sinusoidal encodings of the step t = 1..n_steps: (n_steps, d_model).

    The same formula as the sinusoidal position encoding (lecture 03), with the step in place
    of the position (UT sec. 2.1 adds both: the "coordinate embedding")."""
    _check_positive_int("n_steps", n_steps)
    _check_positive_int("d_model", d_model)
    t = torch.arange(1, n_steps + 1, dtype=torch.float64, device=device)[:, None]  # (N, 1)
    i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = t / (10000.0 ** (i / d_model))  # t / 10000^(2k/d_model)
    enc = torch.zeros(n_steps, d_model, dtype=torch.float64, device=device)
    enc[:, 0::2] = torch.sin(angle)
    enc[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return enc.to(dtype or torch.get_default_dtype())


class UniversalTransformer(nn.Module):
    """One shared block applied ``n_steps`` times, a step encoding added before every step.

    ``forward(x, mask=None, n_steps=None)``: x (B, L, d_model) -> (B, L, d_model). With a fixed
    number of steps this is exactly a stack of N identical blocks (:func:`unrolled_stack`): a
    weight-shared deep Transformer with N times fewer parameters than an unshared one.
    """

    def __init__(self, d_model: int, n_heads: int, n_steps: int, d_ff: Optional[int] = None,
                 activation: str = "gelu", norm_first: bool = True):
        super().__init__()
        _check_positive_int("n_steps (max steps)", n_steps)
        self.d_model, self.n_steps = d_model, n_steps
        self.block = EncoderBlock(d_model, n_heads, d_ff, activation=activation, norm_first=norm_first)
        self.register_buffer("steps", step_encoding(n_steps, d_model), persistent=False)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, n_steps: Optional[int] = None) -> Tensor:
        n = self.n_steps if n_steps is None else _check_positive_int("n_steps", n_steps)
        if n > self.n_steps:
            raise ValueError(f"n_steps must be <= {self.n_steps} (the step encodings made); got {n}")
        for t in range(n):
            x = self.block(x + self.steps[t].to(x.dtype), mask=mask)  # x^(t) = layer(x^(t-1) + step_t)
        return x


def unrolled_stack(ut: UniversalTransformer, n_steps: Optional[int] = None) -> nn.ModuleList:
    """N separate copies of the UT's block (equal weights, not tied): the deep Transformer it equals."""
    n = ut.n_steps if n_steps is None else n_steps
    return nn.ModuleList(copy.deepcopy(ut.block) for _ in range(n))


def run_stack(blocks: Sequence[nn.Module], x: Tensor, steps: Optional[Tensor] = None,
              mask: Optional[Tensor] = None) -> Tensor:
    """An ordinary stack: block l after block l-1, ``steps[l]`` added before block l if given."""
    for i, block in enumerate(blocks):
        x = block(x if steps is None else x + steps[i].to(x.dtype), mask=mask)
    return x


# ----------------------------------------------------------------------------
# Adaptive Computation Time
# ----------------------------------------------------------------------------

def act_weights(halt_probs: Tensor, threshold: float = 0.99):
    """ACT's halting weights from halting probabilities (Graves 2016, eq. 5-13).

    Args:
        halt_probs: (..., N) psi_i^(t) in [0, 1] for the steps t = 1..N of each position.
        threshold: 1 - iota in (0, 1]: a position halts at the first step whose cumulative
            halting probability reaches it, or at step N (forced) if none does.

    Returns:
        ``(weights, n_steps, remainder, ponder)``: weights (..., N) p_i^(t), which sum to 1 over
        t (psi before the halting step, the remainder at it, 0 after); n_steps (...) int64 N_i
        in 1..N; remainder (...) R_i = 1 - sum_{t < N_i} psi^(t); ponder (...) P_i = N_i + R_i.
    """
    if not isinstance(halt_probs, Tensor) or not halt_probs.is_floating_point() or halt_probs.dim() < 1:
        raise TypeError("halt_probs must be a floating-point tensor (..., N); got "
                        f"{halt_probs.dtype if isinstance(halt_probs, Tensor) else type(halt_probs).__name__}")
    if halt_probs.shape[-1] < 1:
        raise ValueError(f"max steps N must be >= 1; got halt_probs of shape {tuple(halt_probs.shape)}")
    threshold = _check_halting_threshold(threshold)
    N = halt_probs.shape[-1]
    cum = halt_probs.cumsum(-1)  # sum_{t' <= t} psi^(t')
    reached = cum >= threshold  # (..., N)
    reached = torch.cat([reached[..., :-1], torch.ones_like(reached[..., -1:])], -1)  # forced halt at N
    n_steps = reached.to(torch.int64).argmax(-1) + 1  # N_i: the first step that reaches it
    t = torch.arange(1, N + 1, device=halt_probs.device)
    before = t < n_steps[..., None]  # steps t < N_i
    remainder = 1 - (halt_probs * before).sum(-1)  # R_i = 1 - sum_{t < N_i} psi^(t)
    at = (t == n_steps[..., None]).to(halt_probs.dtype)
    weights = halt_probs * before + remainder[..., None] * at  # p^(t)
    ponder = n_steps.to(halt_probs.dtype) + remainder  # P_i = N_i + R_i
    return weights, n_steps, remainder, ponder


class ACTUniversalTransformer(nn.Module):
    """A Universal Transformer with ACT per position (UT sec. 2.2), on token ids.

    Every step applies the shared block to all positions (as the UT's reference code does on
    TPUs: the compute is the full N steps; what ACT decides is the weighting of the states, and
    a ragged implementation could skip the halted positions). After step t a linear halting
    unit gives psi_i^(t) = sigmoid(x_i^(t) w + b); :func:`act_weights` turns them into p_i^(t)
    and the output is the mean state sum_t p_i^(t) x_i^(t), read by a linear classifier.

    ``forward(idx, mask=None) -> dict`` with ``logits`` (B, L, n_classes), ``n_steps`` (B, L),
    ``ponder`` (B, L), ``weights`` (B, L, N), ``halt_probs`` (B, L, N). ``act_fn`` may be set to a
    function with :func:`act_weights`' signature (a learner's version).
    """

    def __init__(self, vocab_size: int, n_classes: int, d_model: int = 32, n_heads: int = 2,
                 max_steps: int = 8, max_len: int = 64, threshold: float = 0.99, d_ff: Optional[int] = None,
                 halt_bias: float = -1.0):
        super().__init__()
        _check_positive_int("max_steps", max_steps)
        self.threshold = _check_halting_threshold(threshold)
        self.max_steps = max_steps
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.block = EncoderBlock(d_model, n_heads, d_ff)
        self.register_buffer("steps", step_encoding(max_steps, d_model), persistent=False)
        self.halt = nn.Linear(d_model, 1)
        nn.init.constant_(self.halt.bias, halt_bias)  # start by pondering a few steps
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self.act_fn = act_weights

    def forward(self, idx: Tensor, mask: Optional[Tensor] = None) -> dict:
        L = idx.shape[1]
        x = self.embed(idx) + self.pos(torch.arange(L, device=idx.device))  # (B, L, d_model)
        states, psis = [], []
        for t in range(self.max_steps):
            x = self.block(x + self.steps[t].to(x.dtype), mask=mask)  # x^(t)
            states.append(x)
            psis.append(torch.sigmoid(self.halt(x)).squeeze(-1))  # psi^(t): (B, L)
        halt_probs = torch.stack(psis, -1)  # (B, L, N)
        weights, n_steps, remainder, ponder = self.act_fn(halt_probs, self.threshold)
        mean_state = (torch.stack(states, -2) * weights[..., None]).sum(-2)  # sum_t p^(t) x^(t)
        return {"logits": self.head(self.norm(mean_state)), "n_steps": n_steps, "ponder": ponder,
                "weights": weights, "halt_probs": halt_probs, "remainder": remainder}


# ----------------------------------------------------------------------------
# Adaptive attention span
# ----------------------------------------------------------------------------

def span_mask(spans: Tensor, ramp: float, Lq: int, Lk: Optional[int] = None) -> Tensor:
    """The soft span mask chi_zeta(i - j) = clamp((nu + zeta - (i - j)) / nu, 0, 1), causal.

    Args:
        spans: (H,) zeta per head (float; gradients flow to it).
        ramp: nu > 0, the width over which the mask falls from 1 to 0.
        Lq, Lk: queries and keys; the queries are the last Lq of the Lk positions (Lk >= Lq).

    Returns:
        (H, Lq, Lk) in [0, 1], in the spans' dtype; 0 for future keys (j > i).
    """
    ramp = _check_ramp(ramp)
    if not isinstance(spans, Tensor) or not spans.is_floating_point() or spans.dim() != 1:
        raise TypeError("spans must be a 1-D floating-point tensor (H,) of spans zeta")
    Lk = Lq if Lk is None else Lk
    i = torch.arange(Lk - Lq, Lk, device=spans.device)[:, None]  # query positions
    j = torch.arange(Lk, device=spans.device)[None, :]
    dist = (i - j).to(spans.dtype)  # i - j: (Lq, Lk)
    chi = ((ramp + spans[:, None, None] - dist) / ramp).clamp(0, 1)  # (H, Lq, Lk)
    return chi * (dist >= 0)  # no future keys


def span_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, need_weights: bool = False):
    """Attention with a soft mask on the weights: a_ij = chi_ij e^(s_ij) / sum_k chi_ik e^(s_ik).

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); mask (H, Lq, Lk) or broadcastable, in
    [0, 1], with at least one positive entry per row (the span mask's diagonal is 1). Computed
    as softmax(S) * chi, renormalised: equal to softmax(S + log chi) (which is ``F.scaled_dot_
    product_attention`` with the float mask log chi), but differentiable where chi = 0.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    scores = scores.masked_fill(mask <= 0, float("-inf"))
    w = torch.softmax(scores, -1) * mask  # chi_ij e^(s_ij) / sum_k e^(s_ik)
    w = w / w.sum(-1, keepdim=True)  # renormalise over the span
    out = w @ v  # (B, H, Lq, Dv)
    return (out, w) if need_weights else out


def span_penalty(spans: Tensor, tau: float) -> Tensor:
    """The L1 penalty tau * sum_a zeta_a (spans are >= 0, so it is their sum)."""
    return tau * spans.clamp(min=0).sum()


class AdaptiveSpanAttention(nn.Module):
    """Causal multi-head attention whose heads each learn a span zeta_a (Sukhbaatar et al. 2019).

    A learned relative-position bias per head and offset (lecture 03's idea, clipped at
    ``max_span``) lets a head look at a fixed distance; the soft mask then decides how far back
    it may look at all. ``spans`` are kept in [0, max_span]; ``forward(x, need_weights=False)``.
    """

    def __init__(self, d_model: int, n_heads: int, max_span: int, ramp: float = 4.0, init_span: float | None = None):
        super().__init__()
        self.ramp = _check_ramp(ramp)
        _check_positive_int("max_span", max_span)
        self.H, self.D, self.max_span = n_heads, d_model // n_heads, max_span
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.rel_bias = nn.Parameter(torch.zeros(n_heads, max_span + 1))  # bias per head and offset
        init = max_span if init_span is None else init_span
        self.spans = nn.Parameter(torch.full((n_heads,), float(init)))  # zeta_a

    def clamp_spans(self) -> None:
        with torch.no_grad():
            self.spans.clamp_(0, self.max_span)

    def forward(self, x: Tensor, need_weights: bool = False):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, self.D).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        chi = span_mask(self.spans.clamp(0, self.max_span), self.ramp, L)  # (H, L, L)
        dist = (torch.arange(L, device=x.device)[:, None] - torch.arange(L, device=x.device)[None]).clamp(0, self.max_span)
        bias = self.rel_bias[:, dist]  # (H, L, L)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.D) + bias
        scores = scores.masked_fill(chi <= 0, float("-inf"))
        w = torch.softmax(scores, -1) * chi
        w = w / w.sum(-1, keepdim=True)
        out = self.out((w @ v).transpose(1, 2).reshape(B, L, d))
        return (out, w) if need_weights else out


class SpanModel(nn.Module):
    """A one-layer causal model on ids with :class:`AdaptiveSpanAttention` and an FFN."""

    def __init__(self, vocab_size: int, d_model: int = 32, n_heads: int = 4, max_span: int = 16,
                 ramp: float = 4.0, init_span: float | None = None, out_size: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.attn = AdaptiveSpanAttention(d_model, n_heads, max_span, ramp, init_span)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.head = nn.Linear(d_model, out_size or vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        return self.head(x)  # (B, L, vocab_size)


# ----------------------------------------------------------------------------
# Depth-adaptive / early-exit language model (Elbayad et al. 2020, CALM)
# ----------------------------------------------------------------------------

class EarlyExitLM(nn.Module):
    """A causal LM with an exit after every layer: one shared LayerNorm and output head.

    ``forward(idx) -> (N, B, L, vocab_size)``: the logits of every exit (exit l reads the state
    after layer l). Train on all exits (``exit_loss``); ``early_exit_forward`` decides per token.
    """

    def __init__(self, vocab_size: int, d_model: int = 48, n_heads: int = 4, n_layers: int = 4,
                 max_len: int = 128, d_ff: Optional[int] = None):
        super().__init__()
        _check_positive_int("n_layers", n_layers)
        self.vocab_size, self.n_layers = vocab_size, n_layers
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, cross_attention=False)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def embed_ids(self, idx: Tensor) -> Tensor:
        return self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # x^(0)

    def exit_logits(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))  # the shared classifier

    def hidden_states(self, idx: Tensor) -> list[Tensor]:
        """[x^(0), x^(1), ..., x^(N)], each (B, L, d_model)."""
        mask = causal_mask(idx.shape[1], device=idx.device)
        xs = [self.embed_ids(idx)]
        for block in self.blocks:
            xs.append(block(xs[-1], mask=mask))
        return xs

    def forward(self, idx: Tensor) -> Tensor:
        return torch.stack([self.exit_logits(x) for x in self.hidden_states(idx)[1:]])  # (N, B, L, V)

    def exit_loss(self, idx: Tensor, targets: Tensor, weights: Optional[Sequence[float]] = None) -> Tensor:
        """Cross-entropy averaged over all exits (uniform, or ``weights`` per layer)."""
        logits = self(idx)
        losses = torch.stack([F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1)) for lg in logits])
        w = torch.full_like(losses, 1 / len(losses)) if weights is None else torch.tensor(weights, dtype=losses.dtype)
        return (losses * w / w.sum()).sum()


def exit_confidence(logits: Tensor, state: Tensor, prev_state: Tensor, measure: str = "softmax") -> Tensor:
    """CALM's confidence of an exit: (..., vocab), (..., d), (..., d) -> (...) in [0, 1].

    ``"softmax"``: the margin p_top1 - p_top2 of the exit's softmax. ``"state"``: saturation,
    the cosine of the states after and before the layer, clamped to [0, 1]."""
    if measure == "softmax":
        top2 = torch.softmax(logits.float(), -1).topk(2, dim=-1).values
        return (top2[..., 0] - top2[..., 1]).to(logits.dtype)  # p_1 - p_2
    if measure == "state":
        return F.cosine_similarity(state, prev_state, dim=-1).clamp(0, 1)  # cos(x^(l), x^(l-1))
    raise ValueError(f"measure must be 'softmax' or 'state'; got {measure!r}")


@torch.no_grad()
def early_exit_forward(model: EarlyExitLM, idx: Tensor, threshold: float, measure: str = "softmax"):
    """Per-token early exit with the states of skipped layers copied (CALM sec. 4).

    Layer by layer over the whole sequence: a token that exited at layer l' keeps its state
    x^(l') at layers l'+1..N (copied), so later tokens' keys and values at those layers exist;
    the others go through the layer, and exit after it when their confidence exceeds
    ``threshold`` (Lambda). Token i's layers depend only on tokens j <= i, so this equals
    generating token by token (:func:`early_exit_forward_tokenwise`).

    Returns ``(logits (B, L, vocab_size), layers_used (B, L) int64)``; ``threshold=1`` never
    exits and reproduces ``model(idx)[-1]`` exactly.
    """
    threshold = _check_exit_threshold(threshold)
    mask = causal_mask(idx.shape[1], device=idx.device)
    x = model.embed_ids(idx)  # x^(0)
    done = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    used = torch.full(idx.shape, model.n_layers, dtype=torch.int64, device=idx.device)
    logits = None
    for l, block in enumerate(model.blocks, start=1):
        if bool(done.all()):
            break  # every token has exited: nothing left to compute
        new = block(x, mask=mask)  # the layer on every state, copied ones included (they are keys/values)
        new = torch.where(done[..., None], x, new)  # exited tokens: x^(l) = x^(l-1) (copied)
        lg = model.exit_logits(new)
        logits = lg if logits is None else torch.where(done[..., None], logits, lg)
        if l < model.n_layers and threshold < 1:
            conf = exit_confidence(lg, new, x, measure)
            leave = ~done & (conf > threshold)
            used = torch.where(leave, torch.full_like(used, l), used)
            done = done | leave
        x = new
    return logits, used


@torch.no_grad()
def early_exit_forward_tokenwise(model: EarlyExitLM, idx: Tensor, threshold: float, measure: str = "softmax"):
    """The same as :func:`early_exit_forward`, one token at a time, as decoding would run.

    A per-layer cache of states (B, L, d_model) for layers 0..N: token i at layer l attends to
    the cached states of tokens 0..i at layer l-1; when it exits at layer k its state is
    written into the caches of layers k+1..N (the copy). Slower (L passes); for teaching/tests."""
    threshold = _check_exit_threshold(threshold)
    B, L = idx.shape
    x0 = model.embed_ids(idx)
    cache = [x0] + [torch.zeros_like(x0) for _ in range(model.n_layers)]  # states per layer
    out = torch.zeros(B, L, model.vocab_size, dtype=x0.dtype, device=idx.device)
    used = torch.full((B, L), model.n_layers, dtype=torch.int64, device=idx.device)
    for i in range(L):
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for l, block in enumerate(model.blocks, start=1):
            prev = cache[l - 1][:, : i + 1]
            h = block(prev)[:, -1]  # token i sees tokens 0..i of layer l-1 (no mask: all are past)
            h = torch.where(done[:, None], cache[l - 1][:, i], h)  # copied after its exit
            cache[l][:, i] = h
            lg = model.exit_logits(h)
            out[:, i] = torch.where(done[:, None], out[:, i], lg)
            if l < model.n_layers and threshold < 1:
                leave = ~done & (exit_confidence(lg, h, cache[l - 1][:, i], measure) > threshold)
                used[:, i] = torch.where(leave, torch.full_like(used[:, i], l), used[:, i])
                done = done | leave
    return out, used


# ----------------------------------------------------------------------------
# Learn-then-Test calibration (CALM sec. 5)
# ----------------------------------------------------------------------------

def binomial_pvalue(n_bad: int, n: int, tolerance: float) -> float:
    """P(Bin(n, xi) <= n_bad): the p-value of "disagreement rate > xi" after n_bad of n disagreed."""
    tolerance = _check_open_unit("tolerance xi", tolerance)
    n = int(n)
    log_xi, log_1m_xi, log_n_fact = math.log(tolerance), math.log1p(-tolerance), math.lgamma(n + 1)
    logp = [log_n_fact - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_xi + (n - k) * log_1m_xi
            for k in range(min(int(n_bad), n) + 1)]  # log C(n,k) xi^k (1-xi)^(n-k); plain floats: fast for one call
    top = max(logp)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logp))  # log-sum-exp


def hoeffding_pvalue(mean_loss: float, n: int, tolerance: float) -> float:
    """exp(-2 n (xi - mean)_+^2): Hoeffding's p-value for a loss in [0, 1]."""
    tolerance = _check_open_unit("tolerance xi", tolerance)
    return math.exp(-2 * n * max(tolerance - float(mean_loss), 0.0) ** 2)


def learn_then_test(losses: Tensor, thresholds: Sequence[float], tolerance: float, failure_prob: float,
                    method: str = "binomial") -> float:
    """Fixed-sequence testing over thresholds, from the most conservative (first) down.

    losses: (n_thresholds, n) per calibration example, 0/1 disagreements for "binomial", values
    in [0, 1] for "hoeffding". A threshold is certified while its p-value is <= failure_prob
    (upsilon); the first that is not stops the walk. Returns the last certified threshold, or
    1.0 (never exit: always consistent) when the first is not certified.
    """
    tolerance = _check_open_unit("tolerance xi", tolerance)
    failure_prob = _check_open_unit("failure_prob upsilon", failure_prob)
    chosen = 1.0
    n = losses.shape[-1]
    if len(thresholds) != losses.shape[0]:
        raise ValueError(f"one row of losses per threshold: {len(thresholds)} thresholds, {losses.shape[0]} rows")
    for lam, row in zip(thresholds, losses, strict=True):
        if method == "binomial":
            p = binomial_pvalue(int(row.sum()), n, tolerance)
        elif method == "hoeffding":
            p = hoeffding_pvalue(float(row.mean()), n, tolerance)
        else:
            raise ValueError(f"method must be 'binomial' or 'hoeffding'; got {method!r}")
        if p > failure_prob:
            break
        chosen = float(lam)
    return chosen


@torch.no_grad()
def exit_disagreements(model: EarlyExitLM, idx: Tensor, thresholds: Sequence[float], measure: str = "softmax",
                       per: str = "sequence") -> Tensor:
    """For each threshold, per sequence of ``idx`` (B, L): the fraction of tokens whose early-exit
    prediction differs from the full model's (``per="sequence"``, values in [0, 1]), or whether
    any differs (``per="any"``, 0/1). Returns (n_thresholds, B)."""
    full = model(idx)[-1].argmax(-1)
    rows = []
    for lam in thresholds:
        early = early_exit_forward(model, idx, lam, measure)[0].argmax(-1)
        bad = (early != full).to(torch.float64)
        rows.append(bad.mean(-1) if per == "sequence" else bad.amax(-1))
    return torch.stack(rows)


def calibrate_threshold(model: EarlyExitLM, idx: Tensor, tolerance: float, failure_prob: float = 0.1,
                        thresholds: Optional[Sequence[float]] = None, measure: str = "softmax",
                        method: str = "binomial", generator: Optional[torch.Generator] = None) -> float:
    """Learn-then-Test on calibration sequences ``idx`` (n, L), drawn independently.

    ``method="binomial"``: one token per sequence, at a random position (``generator``), so the
    n losses (1 if its early-exit prediction differs from the full model's) are i.i.d. 0/1 and
    their count is binomial; the guarantee is on the per-token disagreement rate.
    ``"hoeffding"``: the fraction of each sequence's tokens that disagree, a loss in [0, 1].
    Thresholds default to 1.0, 0.95, ..., 0.0 and are walked from the most conservative; each
    is certified while its p-value of "risk > tolerance" (xi) is <= failure_prob (upsilon).
    Returns the last certified threshold Lambda (1.0 if none): with probability >= 1 - upsilon
    over the calibration draw, its expected disagreement with the full model is <= xi."""
    tolerance = _check_open_unit("tolerance xi", tolerance)
    failure_prob = _check_open_unit("failure_prob upsilon", failure_prob)
    if method not in ("binomial", "hoeffding"):
        raise ValueError(f"method must be 'binomial' or 'hoeffding'; got {method!r}")
    if thresholds is None:
        thresholds = [round(1 - 0.05 * i, 2) for i in range(21)]
    thresholds = sorted((float(t) for t in thresholds), reverse=True)
    n, L = idx.shape
    pos = torch.randint(0, L, (n,), generator=generator).to(idx.device)  # one token per sequence
    full = model(idx)[-1].argmax(-1)
    chosen = 1.0
    for lam in thresholds:  # from the most conservative; stop at the first not certified
        early = early_exit_forward(model, idx, lam, measure)[0].argmax(-1)
        bad = (early != full).to(torch.float64)  # (n, L)
        if method == "binomial":
            k = int(bad.gather(1, pos[:, None]).sum())
            p = binomial_pvalue(k, n, tolerance)  # P(Bin(n, xi) <= k)
        else:
            p = hoeffding_pvalue(float(bad.mean()), n, tolerance)  # mean of the per-sequence fractions
        if p > failure_prob:
            break
        chosen = lam
    return chosen


# ----------------------------------------------------------------------------
# A task whose difficulty is controlled per position
# ----------------------------------------------------------------------------

def marker_task(n: int, L: int, max_gap: int, generator: Optional[torch.Generator] = None):
    """Label propagation: each position must output the label of the nearest marker at or before it.

    Tokens: 0 blank, 1 and 2 markers with labels 0 and 1; position 0 is always a marker and
    markers are never more than ``max_gap`` apart. With attention limited to the previous
    position (a window of 1, lecture 05), a label travels one position per step, so a position
    ``k`` places after its marker needs ``max(k, 1)`` steps (the label moves one position per step,
    and the output reads the states after step 1 on): its difficulty.

    Returns ``(idx (n, L), targets (n, L), distance (n, L))`` int64, distance = k."""
    _check_positive_int("n", n)
    _check_positive_int("L", L)
    _check_positive_int("max_gap", max_gap)
    g = generator
    labels = torch.randint(1, 3, (n, L), generator=g)
    marker = torch.rand(n, L, generator=g) < 1.0 / (0.5 * (max_gap + 1))  # mean gap ~ (max_gap + 1) / 2
    marker[:, 0] = True
    idx = torch.zeros(n, L, dtype=torch.int64)
    targets = torch.zeros(n, L, dtype=torch.int64)
    distance = torch.zeros(n, L, dtype=torch.int64)
    for i in range(L):
        if i > 0:
            marker[:, i] |= distance[:, i - 1] + 1 >= max_gap  # force a marker after max_gap - 1 blanks
        idx[:, i] = torch.where(marker[:, i], labels[:, i], 0)
        targets[:, i] = torch.where(marker[:, i], labels[:, i] - 1, targets[:, i - 1] if i else 0)
        distance[:, i] = torch.where(marker[:, i], 0, distance[:, i - 1] + 1 if i else 0)
    return idx, targets, distance


def window_mask(L: int, w: int = 1, device=None) -> Tensor:
    """Causal local mask (L, L): query i sees keys i - w .. i (True = attend)."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (j <= i) & (j >= i - w)
