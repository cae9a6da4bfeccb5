"""Memory beyond the context window: Transformer-XL, the Compressive Transformer, Memorizing attention.

Papers
------
* Dai et al. 2019, *Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context*,
  arXiv:1901.02860 (segment recurrence, section 3.2; relative positions, section 3.3).
* Rae et al. 2019, *Compressive Transformers for Long-Range Sequence Modelling*, arXiv:1911.05507
  (compressed memory, section 3.1; attention-reconstruction loss, section 3.3).
* Wu et al. 2022, *Memorizing Transformers*, arXiv:2203.08913 (kNN-augmented attention, section 3).

Equations
---------
Segment recurrence (one layer ``l``; ``X`` its input for the current segment, ``X_prev`` its memory: the
last ``L_mem`` inputs before the segment; ``SG`` = stop-gradient, ``[a; b]`` = concatenate along the
sequence; the notation of lecture 09, which writes no segment index)::

    X~ = [SG(X_prev); X]                          memory of length L_mem, then the segment (L)
    Q = X W^Q,   K = X~ W^K,   V = X~ W^V          queries of the segment only
    X_prev <- last L_mem rows of [X_prev; X]       for the next segment (a FIFO, :func:`update_memory`)

The ``L`` queries sit at the LAST ``L`` of the ``L_k = L_mem + L`` key positions, so query ``i`` (0-based in
the segment) is at absolute position ``L_mem + i`` and sees key ``j`` iff ``j <= L_mem + i``
(:func:`xl_mask`). Transformer-XL's relative score (lecture 03, ``positions.XLRelative``) is::

    s_ij = ((q_i + u) . k_j + (q_i + v) . W_R R_{i'-j}) / sqrt(D),   i' = L_mem + i

with ``R_r`` the sinusoid of the distance ``r = i' - j >= 0`` (:func:`xl_relative_attention`).
``positions.relative_positions`` already places queries at the last ``Lq`` keys, so
``XLRelative.score_bias`` gives the right distances with a memory (tested).

Compressive Transformer: the states evicted from the memory FIFO (``L_mem`` slots) are compressed by
a rate ``c`` (lecture 09's gamma; mean or max pooling over ``c`` consecutive states, or a 1-d
convolution with kernel and stride ``c``) and pushed into a second FIFO of ``L_cmem`` compressed slots
(:func:`compressive_update`). The compression is trained by the attention-reconstruction loss
``|| attn(X, old) - attn(X, f_c(old)) ||^2`` with the attention's weights frozen
(:func:`attention_reconstruction_loss`).

Memorizing Transformer: a FIFO of past (key, value) pairs per head (:class:`KNNMemory`); each query
retrieves its ``top_k`` keys by inner product, attends over them (:func:`knn_attention`), and a learned
per-head gate ``g_h = sigmoid(beta_h)`` mixes ``g_h o^mem + (1 - g_h) o^local`` (:func:`gated_combine`).

Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``.

Glossary (code -> paper)
------------------------
``mems[l]`` (B, L_mem, d_model)   X_prev of layer l: Transformer-XL's memory of layer l's input
``mem_len``                       L_mem, memory length (Transformer-XL's M, Compressive's n_m)
``cmem_len``                      L_cmem, compressed-memory length (Compressive's n_cm)
``rate``                          c, compression rate (Compressive's c)
``u``, ``v_pos``                  u, v: XL's content and position biases (H, D)
``rel`` (H, L_k, D)               W_R R_r for distances r = 0 .. L_k - 1, split into heads
``top_k``                         k of the kNN lookup (Memorizing's k)
``gate_bias`` (H,)                beta_h; g_h = sigmoid(beta_h)

Benchmark hooks (``benchmarks/memory.py``)
------------------------------------------
* :class:`XLLM` ``forward(idx, mems=None) -> (logits, new_mems)``; idx (B, L); mems a list with one
  (B, L_mem, d_model) tensor per layer, or None.
* :func:`eval_with_cache` ``(model, ids, seg_len) -> Tensor`` per-token NLL of a 1-d id sequence, segment
  by segment reusing the cache.
* :func:`eval_sliding_window` ``(model, ids, context) -> Tensor`` per-token NLL where each token is predicted
  from the ``context`` tokens before it, recomputed from scratch (mems=None).
Both score the targets ``ids[1:]`` and return ``len(ids) - 1`` numbers.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import fast_attention, merge_heads, split_heads
from .blocks import DecoderBlock
from .models import ModelConfig, _check_ids, _final_norm, _make_positions
from .positions import XLRelative, sinusoidal_encoding
from .retrieval import make_index

__all__ = [
    "update_memory",
    "xl_mask",
    "segment_mask",
    "xl_rel_table",
    "xl_relative_attention",
    "xl_self_attention",
    "XLBlock",
    "XLLM",
    "full_pass",
    "eval_with_cache",
    "eval_sliding_window",
    "COMPRESSIONS",
    "compress",
    "Compressor",
    "compressive_update",
    "attention_reconstruction_loss",
    "CompressiveLM",
    "KNNMemory",
    "knn_attention",
    "gated_combine",
    "knn_memory_attention",
    "MemorizingAttention",
]


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------

def _check_positive_int(value, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} ({what}) must be an int >= 1; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} ({what}) must be >= 1; got {value}")
    return value


def _check_states(t, name: str, d_model: Optional[int] = None) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor (batch, seq, d_model); got {got}")
    if d_model is not None and t.shape[-1] != d_model:
        raise ValueError(f"{name} must have last dim d_model={d_model}; got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------------------
# Transformer-XL
# --------------------------------------------------------------------------------------

def update_memory(mem: Optional[Tensor], h: Tensor, mem_len: int) -> Tensor:
    """The FIFO update with stop-gradient: the last ``mem_len`` rows of ``[mem; h]``, detached.

    mem (B, L_mem, d) or None (empty); h (B, L, d) -> (B, min(L_mem + L, mem_len), d).
    The newest states are kept (the oldest fall out first); no gradient flows into the result.
    """
    mem_len = _check_positive_int(mem_len, "mem_len", "the memory length L_mem")
    _check_states(h, "h")
    if mem is None:
        cat = h
    else:
        _check_states(mem, "mem", h.shape[-1])
        if mem.shape[0] != h.shape[0]:
            raise ValueError(f"mem and h must have the same batch size; got mem {tuple(mem.shape)}, "
                             f"h {tuple(h.shape)}")
        cat = torch.cat([mem, h], dim=1)  # (B, L_mem + L, d): oldest first
    return cat[:, -mem_len:].detach()  # SG(last L_mem rows)


def xl_mask(Lq: int, n_mem: int, device=None) -> Tensor:
    """Boolean (Lq, n_mem + Lq): query i (at absolute position n_mem + i) sees key j iff j <= n_mem + i."""
    if n_mem < 0 or Lq < 0:
        raise ValueError(f"Lq and n_mem must be >= 0; got Lq={Lq}, n_mem={n_mem}")
    i = torch.arange(Lq, device=device)[:, None] + n_mem  # absolute query positions
    j = torch.arange(n_mem + Lq, device=device)[None, :]
    return j <= i  # (Lq, Lk)


def segment_mask(total_len: int, seg_len: int, mem_len: int, device=None) -> Tensor:
    """The (T, T) mask of ONE pass that equals segment recurrence with a cache of ``mem_len``.

    Token i of segment s = i // seg_len sees key j iff ``s * seg_len - mem_len <= j <= i``: its own
    segment's past plus the ``mem_len`` positions before the segment (what the cache holds).
    """
    seg_len = _check_positive_int(seg_len, "seg_len", "the segment length L")
    if mem_len < 0:
        raise ValueError(f"mem_len must be >= 0 here (0 = no memory); got {mem_len}")
    i = torch.arange(total_len, device=device)[:, None]
    j = torch.arange(total_len, device=device)[None, :]
    start = (i // seg_len) * seg_len - mem_len  # first visible key of i's window
    return (j <= i) & (j >= start)


def xl_rel_table(positions: XLRelative, Lk: int, dtype=None, device=None) -> Tensor:
    """``W_R R_r`` for the distances r = 0 .. Lk-1, split into heads: (H, Lk, D).

    ``R_r`` is the sinusoid of lecture 03 (``sinusoidal_encoding``) with width H*D.
    """
    H, D = positions.n_heads, positions.head_dim
    dtype = positions.W_R.weight.dtype if dtype is None else dtype
    R = sinusoidal_encoding(Lk, H * D, base=positions.base, device=device, dtype=dtype)  # (Lk, H*D)
    WR = F.linear(R, positions.W_R.weight.to(device=device, dtype=dtype))  # (Lk, H*D): W_R R_r
    return WR.view(Lk, H, D).transpose(0, 1)  # (H, Lk, D)


def xl_relative_attention(q: Tensor, k: Tensor, v: Tensor, u: Tensor, v_pos: Tensor, rel: Tensor) -> Tensor:
    """Transformer-XL attention of a segment over ``[memory; segment]``, the readable way.

    q (B, H, Lq, D) the segment's queries; k, v (B, H, Lk, D) keys and values of [memory; segment],
    Lk = n_mem + Lq (n_mem >= 0); u, v_pos (H, D); rel (H, Lk, D): row r = W_R R_r, distance r.
    Query i sits at absolute position n_mem + i, sees key j iff j <= n_mem + i, with score
    ``((q_i + u) . k_j + (q_i + v_pos) . rel[n_mem + i - j]) / sqrt(D)``. Returns (B, H, Lq, Dv).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    if Lk < Lq:
        raise ValueError(f"keys are [memory; segment], so Lk >= Lq; got Lq={Lq}, Lk={Lk}")
    if rel.shape[-2] < Lk:
        raise ValueError(f"rel must have a row for every distance 0..Lk-1 = {Lk - 1}; got {tuple(rel.shape)}")
    n_mem = Lk - Lq
    content = (q + u[None, :, None, :]) @ k.transpose(-2, -1)  # (B, H, Lq, Lk): (q_i + u) . k_j
    pos_all = (q + v_pos[None, :, None, :]) @ rel.transpose(-2, -1)  # (B, H, Lq, R): (q_i + v) . rel_r
    i = torch.arange(Lq, device=q.device)[:, None] + n_mem
    j = torch.arange(Lk, device=q.device)[None, :]
    dist = i - j  # (Lq, Lk): distance i' - j
    visible = dist >= 0  # the causal mask with the memory offset
    idx = dist.clamp(min=0).expand(B, H, Lq, Lk)
    position = pos_all.gather(-1, idx)  # (B, H, Lq, Lk): (q_i + v) . rel[i' - j]
    scores = (content + position) / math.sqrt(D)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, Lq, Dv)


def xl_self_attention(attn, h: Tensor, mem_h: Optional[Tensor], positions=None) -> Tensor:
    """One self-attention sub-layer over ``[mem_h; h]`` with the library's ``MultiHeadAttention`` weights.

    h (B, L, d_model) (already normalised), mem_h (B, L_mem, d_model) or None; queries come from h only,
    keys and values from both; ``positions`` is a ``PositionScheme`` (``XLRelative`` for Transformer-XL)
    whose hooks see queries at the last L of the L_mem + L keys. Returns (B, L, d_model).
    """
    L = h.shape[1]
    ctx = h if mem_h is None else torch.cat([mem_h, h], dim=1)  # (B, Lk, d)
    q, k, v = (split_heads(t, attn.n_heads) for t in attn.qkv(ctx).chunk(3, dim=-1))  # (B, H, Lk, D)
    q = q[:, :, -L:]  # the segment's queries: (B, H, L, D)
    bias = None
    if positions is not None:
        q, k = positions.rotate(q, k)
        bias = positions.score_bias(q, k)
    mask = xl_mask(L, ctx.shape[1] - L, device=h.device)  # (L, Lk)
    p = attn.dropout if attn.training else 0.0
    out = fast_attention(q, k, v, mask=mask, bias=bias, dropout_p=p)  # (B, H, L, D)
    return attn.out(merge_heads(out))


class XLBlock(DecoderBlock):
    """A pre-norm GPT block whose self-attention also reads a memory of the previous segment's inputs.

    Same parameters (and names) as ``blocks.DecoderBlock(cross_attention=False)``, so a plain
    block's weights load into it. ``forward(x, mem=None, positions=None)``: x (B, L, d_model),
    mem (B, L_mem, d_model), the cached inputs of this block; returns (B, L, d_model).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__(d_model, n_heads, d_ff, dropout, activation, norm_first=True,
                         cross_attention=False)

    def forward(self, x: Tensor, mem: Optional[Tensor] = None, positions=None) -> Tensor:  # type: ignore[override]
        norm = self.res_attn.norm
        mem_h = None if mem is None or mem.shape[1] == 0 else norm(mem)  # LN is per position
        x = x + self.res_attn.branch(xl_self_attention(self.attn, norm(x), mem_h, positions))
        return self.res_ffn(x, self.ffn)  # (B, L, d_model)


class XLLM(nn.Module):
    """Transformer-XL language model: ``forward(idx, mems=None) -> (logits, new_mems)``.

    Built from a :class:`~transformer_lab.models.ModelConfig` (pre-norm; ``config.positions`` is
    normally ``"xl"``; an absolute scheme such as ``"sinusoidal"`` gives every segment positions
    0..L-1, the broken variant the lecture shows). idx (B, L); mems None or a list with one
    (B, L_mem, d_model) tensor per layer (the inputs of that layer in the previous segments);
    returns logits (B, L, vocab_size) and the new memories (detached, at most ``mem_len`` each).
    Same parameter names as ``models.TransformerLM``: its state dict loads into this model.
    """

    def __init__(self, config: ModelConfig, mem_len: int):
        super().__init__()
        if not config.norm_first or config.residual != "none":
            raise ValueError("XLLM is a pre-norm model: norm_first=True, residual='none'; "
                             f"got norm_first={config.norm_first}, residual={config.residual!r}")
        self.config = c = config
        self.mem_len = _check_positive_int(mem_len, "mem_len", "the memory length L_mem")
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.positions = _make_positions(c, causal=True)
        if getattr(self.positions, "needs_weights", False):
            raise ValueError(f"positions={c.positions!r} needs the attention weights; use 'xl', 'alibi', "
                             "'t5', 'rope', 'none' or an absolute scheme")
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(XLBlock(c.d_model, c.n_heads, c.d_ff, c.dropout, c.activation)
                                    for _ in range(c.n_layers))
        self.norm = _final_norm(c)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def _check_mems(self, mems, B: int):
        if mems is None:
            return [None] * len(self.blocks)
        if not isinstance(mems, (list, tuple)) or len(mems) != len(self.blocks):
            got = f"a {type(mems).__name__} of {len(mems)}" if isinstance(mems, (list, tuple)) else type(mems).__name__
            raise ValueError(f"mems must be None or a list of {len(self.blocks)} tensors (one per layer), "
                             f"each (B, L_mem, d_model); got {got}")
        for n, m in enumerate(mems):
            _check_states(m, f"mems[{n}]", self.config.d_model)
            if m.shape[0] != B:
                raise ValueError(f"mems[{n}] has batch {m.shape[0]}; idx has batch {B}")
        return list(mems)

    def forward(self, idx: Tensor, mems: Optional[Sequence[Tensor]] = None):
        _check_ids(idx, self.config.vocab_size)
        mems = self._check_mems(mems, idx.shape[0])
        x = self.drop(self.positions.embed(self.tok(idx)))  # (B, L, d); absolute schemes: 0..L-1 again
        new_mems = []
        for block, mem in zip(self.blocks, mems, strict=True):
            new_mems.append(update_memory(mem, x, self.mem_len))  # this layer's input joins the FIFO
            x = block(x, mem, positions=self.positions)
        return self.head(self.norm(x)), new_mems


def full_pass(model: XLLM, idx: Tensor, mask: Tensor) -> Tensor:
    """One pass of ``model``'s weights over the whole of ``idx`` (B, T) with a (T, T) mask: logits (B, T, V).

    With ``mask = segment_mask(T, L, L_mem)`` this equals segment-by-segment evaluation with the cache.
    """
    _check_ids(idx, model.config.vocab_size)
    x = model.drop(model.positions.embed(model.tok(idx)))
    for block in model.blocks:
        x = DecoderBlock.forward(block, x, mask=mask, positions=model.positions)
    return model.head(model.norm(x))


def _check_ids_1d(ids) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.long or ids.numel() < 2:
        got = (f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__)
        raise ValueError(f"ids must be a 1-d long tensor of at least 2 token ids; got {got}")


@torch.no_grad()
def eval_with_cache(model: XLLM, ids: Tensor, seg_len: int) -> Tensor:
    """Per-token NLL (nats) of ``ids[1:]``, segment by segment, each segment reusing the cache.

    ids (T,) long; returns (T - 1,) float. Each forward costs one segment: O(T/L) calls in all.
    """
    _check_ids_1d(ids)
    seg_len = _check_positive_int(seg_len, "seg_len", "the segment length L")
    was = model.training
    model.eval()
    x, y = ids[:-1], ids[1:]
    mems, out = None, []
    try:
        for s in range(0, x.numel(), seg_len):
            logits, mems = model(x[None, s:s + seg_len], mems)  # (1, L, V)
            out.append(F.cross_entropy(logits[0].float(), y[s:s + seg_len], reduction="none"))
    finally:
        model.train(was)
    return torch.cat(out)


@torch.no_grad()
def eval_sliding_window(model: XLLM, ids: Tensor, context: int, batch_size: int = 64) -> Tensor:
    """Per-token NLL of ``ids[1:]`` where token t+1 is predicted from the ``context`` tokens before it.

    Every window ``ids[t - context + 1 .. t]`` is recomputed from scratch (mems=None; fewer tokens at
    the start): the vanilla model's evaluation, one forward per token (batched ``batch_size`` at a time).
    Returns (T - 1,) float, comparable with :func:`eval_with_cache`.
    """
    _check_ids_1d(ids)
    context = _check_positive_int(context, "context", "the window length")
    was = model.training
    model.eval()
    x, y = ids[:-1], ids[1:]
    T = x.numel()
    out = torch.empty(T, dtype=torch.float32, device=ids.device)
    try:
        head = min(context, T)
        for t in range(head - 1):  # the first tokens: shorter windows, one by one
            logits, _ = model(x[None, : t + 1])
            out[t] = F.cross_entropy(logits[0, -1:].float(), y[t:t + 1])[()]
        windows = x.unfold(0, head, 1)  # (T - head + 1, head): the full-length windows
        for s in range(0, windows.shape[0], batch_size):
            w = windows[s:s + batch_size]
            logits, _ = model(w)
            t = torch.arange(s, s + w.shape[0], device=ids.device) + head - 1
            out[t] = F.cross_entropy(logits[:, -1].float(), y[t], reduction="none")
    finally:
        model.train(was)
    return out


# --------------------------------------------------------------------------------------
# Compressive Transformer
# --------------------------------------------------------------------------------------

COMPRESSIONS = ("mean", "max", "conv")


def _check_rate(rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise TypeError(f"rate (the compression rate c) must be an int >= 1; got {type(rate).__name__} {rate!r}")
    if rate < 1:
        raise ValueError(f"rate (the compression rate c) must be >= 1; got {rate}")
    return rate


def compress(old: Tensor, rate: int, kind: str = "mean", conv: Optional[nn.Conv1d] = None) -> Tensor:
    """Compress (B, n, d) states by ``rate`` c: (B, n // c, d), n divisible by c.

    kind "mean"/"max": pool over each run of c consecutive states (oldest run first);
    "conv": a 1-d convolution with kernel size and stride c (``conv`` an ``nn.Conv1d(d, d, c, stride=c)``).
    """
    rate = _check_rate(rate)
    if kind not in COMPRESSIONS:
        raise ValueError(f"kind must be one of {COMPRESSIONS}; got {kind!r}")
    _check_states(old, "old")
    n = old.shape[1]
    if n % rate:
        raise ValueError(f"the number of states to compress ({n}) must be a multiple of the rate c={rate}")
    if kind == "conv":
        if conv is None or conv.kernel_size[0] != rate or conv.stride[0] != rate:
            raise ValueError(f"kind='conv' needs conv = nn.Conv1d(d, d, kernel_size={rate}, stride={rate}); "
                             f"got {conv!r}")
        return conv(old.transpose(1, 2)).transpose(1, 2)  # (B, n // c, d)
    groups = old.reshape(old.shape[0], n // rate, rate, old.shape[2])  # (B, n/c, c, d)
    return groups.mean(2) if kind == "mean" else groups.amax(2)


class Compressor(nn.Module):
    """The compression function f_c as a module: ``Compressor(d_model, rate, kind)(old) -> compressed``."""

    def __init__(self, d_model: int, rate: int, kind: str = "conv"):
        super().__init__()
        self.rate = _check_rate(rate)
        if kind not in COMPRESSIONS:
            raise ValueError(f"kind must be one of {COMPRESSIONS}; got {kind!r}")
        self.kind = kind
        self.conv = nn.Conv1d(d_model, d_model, rate, stride=rate) if kind == "conv" else None
        if self.conv is not None:  # start as mean pooling: a sensible compression before training
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, :] += torch.eye(d_model)[:, :, None] / rate
                self.conv.bias.zero_()

    def forward(self, old: Tensor) -> Tensor:
        return compress(old, self.rate, self.kind, self.conv)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, kind={self.kind!r}"


def compressive_update(mem: Optional[Tensor], cmem: Optional[Tensor], h: Tensor, mem_len: int,
                       cmem_len: int, compress_fn: Callable[[Tensor], Tensor]):
    """One step of the two FIFOs: returns ``(new_mem, new_cmem, evicted)``.

    ``[mem; h]`` keeps its newest ``mem_len`` rows (detached); the rows that fall out (``evicted``,
    oldest first, (B, n_out, d)) are compressed by ``compress_fn`` and appended to ``cmem``, which keeps
    its newest ``cmem_len`` rows. The compressed rows keep their graph (the attention-reconstruction
    loss trains the compression through them); detach them before the next segment's forward.
    """
    mem_len = _check_positive_int(mem_len, "mem_len", "the memory length L_mem")
    cmem_len = _check_positive_int(cmem_len, "cmem_len", "the compressed-memory length L_cmem")
    _check_states(h, "h")
    cat = h if mem is None else torch.cat([mem, h], dim=1)
    n_out = max(cat.shape[1] - mem_len, 0)
    evicted = cat[:, :n_out].detach()
    new_mem = cat[:, n_out:].detach()
    if n_out == 0:
        return new_mem, cmem, evicted
    compressed = compress_fn(evicted)  # (B, n_out / c, d)
    new_cmem = compressed if cmem is None else torch.cat([cmem.detach(), compressed], dim=1)
    return new_mem, new_cmem[:, -cmem_len:], evicted


def _frozen_attention(attn, h: Tensor, ctx: Tensor) -> Tensor:
    """attn's output for queries h over keys/values ctx, with attn's weights detached (no positions)."""
    W, b = attn.qkv.weight.detach(), None if attn.qkv.bias is None else attn.qkv.bias.detach()
    d = attn.d_model
    q = F.linear(h, W[:d], None if b is None else b[:d])
    kv = F.linear(ctx, W[d:], None if b is None else b[d:])
    k, v = kv.chunk(2, dim=-1)
    q, k, v = (split_heads(t, attn.n_heads) for t in (q, k, v))
    out = merge_heads(fast_attention(q, k, v))  # (B, L, d): no mask, every old state visible
    Wo, bo = attn.out.weight.detach(), None if attn.out.bias is None else attn.out.bias.detach()
    return F.linear(out, Wo, bo)


def attention_reconstruction_loss(attn, h: Tensor, old: Tensor, compressed: Tensor) -> Tensor:
    """Rae et al.'s loss ``|| attn(h, old) - attn(h, compressed) ||^2`` (mean over elements).

    ``attn`` is a library ``MultiHeadAttention``; its weights are detached (only the compression
    learns), h and old are detached too. h (B, L, d), old (B, n, d), compressed (B, n / c, d).
    """
    h, old = h.detach(), old.detach()
    with torch.no_grad():
        target = _frozen_attention(attn, h, old)
    return F.mse_loss(_frozen_attention(attn, h, compressed), target)


class CompressiveLM(XLLM):
    """Compressive Transformer LM: ``forward(idx, state=None) -> (logits, new_state, recon_loss)``.

    state: None or a list with one ``(mem, cmem)`` pair per layer. Each layer attends over
    ``[cmem; mem; segment]`` (relative positions count a compressed slot as one position);
    ``recon_loss`` is the sum over layers of :func:`attention_reconstruction_loss` for the states
    compressed in this step (0 when nothing was evicted). ``mem_len`` must be a multiple of ``rate``
    and so must the segment length.
    """

    def __init__(self, config: ModelConfig, mem_len: int, cmem_len: int, rate: int, kind: str = "conv"):
        super().__init__(config, mem_len)
        self.cmem_len = _check_positive_int(cmem_len, "cmem_len", "the compressed-memory length L_cmem")
        self.rate = _check_rate(rate)
        if mem_len % rate:
            raise ValueError(f"mem_len={mem_len} must be a multiple of the rate c={rate}")
        self.compressors = nn.ModuleList(Compressor(config.d_model, rate, kind) for _ in self.blocks)

    def forward(self, idx: Tensor, state=None):  # type: ignore[override]
        _check_ids(idx, self.config.vocab_size)
        if idx.shape[1] % self.rate:
            raise ValueError(f"the segment length ({idx.shape[1]}) must be a multiple of the rate c={self.rate}")
        state = [(None, None)] * len(self.blocks) if state is None else list(state)
        if len(state) != len(self.blocks):
            raise ValueError(f"state must be None or a list of {len(self.blocks)} (mem, cmem) pairs, one per "
                             f"layer; got {len(state)}")
        x = self.drop(self.positions.embed(self.tok(idx)))
        new_state, recon = [], x.new_zeros(())
        for block, comp, (mem, cmem) in zip(self.blocks, self.compressors, state, strict=True):
            parts = [t for t in (cmem, mem) if t is not None]
            memory = torch.cat(parts, dim=1).detach() if parts else None
            new_mem, new_cmem, evicted = compressive_update(mem, cmem, x, self.mem_len, self.cmem_len, comp)
            if evicted.shape[1]:
                fresh = new_cmem[:, -(evicted.shape[1] // self.rate):]
                recon = recon + attention_reconstruction_loss(block.attn, block.res_attn.norm(x),
                                                              block.res_attn.norm(evicted),
                                                              block.res_attn.norm(fresh))
            new_state.append((new_mem, None if new_cmem is None else new_cmem.detach()))
            x = block(x, memory, positions=self.positions)
        return self.head(self.norm(x)), new_state, recon


# --------------------------------------------------------------------------------------
# Memorizing Transformer
# --------------------------------------------------------------------------------------

class KNNMemory:
    """Memorizing Transformer's FIFO of past (key, value) pairs, one per (batch row, head).

    ``KNNMemory(max_size)``; ``add(k, v)`` with k, v (B, H, L, D) appends (detached) and drops the
    oldest beyond ``max_size``; ``search(q (B, H, Lq, D), top_k)`` returns the retrieved keys and
    values (B, H, Lq, k, D) and a boolean ``valid`` (B, H, Lq, k) (False where the memory holds fewer
    than ``top_k`` pairs). ``index``: None for exact inner-product top-k in PyTorch (batched), or a
    kind for :func:`retrieval.make_index` ("torch", "faiss-flat", "faiss-ivf"): one index per (row, head),
    rebuilt from the FIFO at each search.
    """

    def __init__(self, max_size: int, index: Optional[str] = None):
        self.max_size = _check_positive_int(max_size, "max_size", "the memory size (pairs kept)")
        self.index = index
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def clear(self) -> None:
        self.keys = self.values = None

    def add(self, k: Tensor, v: Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must be (B, H, L, D) with the same B, H, L; got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        k, v = k.detach(), v.detach()  # no gradient into the memory
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k[:, :, -self.max_size:], v[:, :, -self.max_size:]

    def search(self, q: Tensor, top_k: int):
        top_k = _check_positive_int(top_k, "top_k", "the number of retrieved pairs per query")
        B, H, Lq, D = q.shape
        if len(self) == 0:
            shape = (B, H, Lq, top_k)
            return (q.new_zeros(*shape, D), q.new_zeros(*shape, self._dv(D)),
                    torch.zeros(shape, dtype=torch.bool, device=q.device))
        n = min(top_k, len(self))
        if self.index is None:
            idx = (q.detach() @ self.keys.transpose(-2, -1)).topk(n, dim=-1).indices  # (B, H, Lq, n)
        else:
            idx = torch.empty(B, H, Lq, n, dtype=torch.long, device=q.device)
            for b in range(B):
                for h in range(H):
                    index = make_index(self.index, D, metric="ip")
                    index.add(self.keys[b, h])
                    idx[b, h] = index.search(q[b, h].detach(), n)[1].to(q.device)
        kr = self.keys[:, :, None].expand(B, H, Lq, -1, D).gather(3, idx[..., None].expand(-1, -1, -1, -1, D))
        Dv = self.values.shape[-1]
        vr = self.values[:, :, None].expand(B, H, Lq, -1, Dv).gather(3, idx[..., None].expand(-1, -1, -1, -1, Dv))
        valid = torch.ones(B, H, Lq, n, dtype=torch.bool, device=q.device)
        if n < top_k:  # pad to top_k with invalid slots
            pad = top_k - n
            kr = torch.cat([kr, kr.new_zeros(B, H, Lq, pad, D)], dim=3)
            vr = torch.cat([vr, vr.new_zeros(B, H, Lq, pad, Dv)], dim=3)
            valid = torch.cat([valid, valid.new_zeros(B, H, Lq, pad)], dim=3)
        return kr.to(q.dtype), vr.to(q.dtype), valid

    def _dv(self, D: int) -> int:
        return D if self.values is None else self.values.shape[-1]


def knn_attention(q: Tensor, k_ret: Tensor, v_ret: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Attention of each query over its own retrieved pairs.

    q (B, H, Lq, D); k_ret (B, H, Lq, k, D); v_ret (B, H, Lq, k, Dv); valid (B, H, Lq, k) bool or None.
    ``o^mem_i = sum_r softmax_r(q_i . k_ir / sqrt(D)) v_ir``; a query with no valid pair gets 0.
    """
    D = q.shape[-1]
    scores = (q[..., None, :] * k_ret).sum(-1) / math.sqrt(D)  # (B, H, Lq, k)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-invalid rows: zero weights, not NaN
    return (w[..., None] * v_ret).sum(-2)  # (B, H, Lq, Dv)


def gated_combine(local: Tensor, mem: Tensor, gate_bias: Optional[Tensor] = None,
                  gate: Optional[Tensor] = None) -> Tensor:
    """``g_h o^mem + (1 - g_h) o^local`` per head; local, mem (B, H, L, D).

    ``g = sigmoid(gate_bias)`` (H,), or ``gate`` (H,) given directly (values in [0, 1]).
    """
    if gate is None:
        if gate_bias is None:
            raise ValueError("give gate_bias (H,) or gate (H,)")
        gate = torch.sigmoid(gate_bias)
    if gate.dim() != 1 or gate.shape[0] != local.shape[1]:
        raise ValueError(f"the gate must have one value per head (H={local.shape[1]},); got {tuple(gate.shape)}")
    g = gate.to(local.dtype)[None, :, None, None]  # (1, H, 1, 1)
    return g * mem + (1 - g) * local


def knn_memory_attention(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, top_k: int,
                         gate_bias: Tensor) -> Tensor:
    """The Memorizing Transformer's kNN-augmented attention for one segment, all in one function.

    q, k, v (B, H, L, D) the segment's own; mem_k, mem_v (B, H, N, D) the FIFO (N >= top_k >= 1);
    gate_bias (H,). Local: causal softmax attention over the segment. Memory: each query's ``top_k``
    keys by inner product q . k, softmax over them (scaled by 1/sqrt(D)), weighted values.
    Returns ``sigmoid(beta_h) o^mem + (1 - sigmoid(beta_h)) o^local`` (B, H, L, D).
    """
    top_k = _check_positive_int(top_k, "top_k", "the number of retrieved pairs per query")
    N = mem_k.shape[-2]
    if top_k > N:
        raise ValueError(f"top_k={top_k} is larger than the memory (N={N} pairs)")
    L, D = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    local = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v  # (B, H, L, D)
    idx = (q @ mem_k.transpose(-2, -1)).topk(top_k, dim=-1).indices  # (B, H, L, k)
    B, H = q.shape[:2]
    kr = mem_k[:, :, None].expand(B, H, L, N, D).gather(3, idx[..., None].expand(-1, -1, -1, -1, D))
    Dv = mem_v.shape[-1]
    vr = mem_v[:, :, None].expand(B, H, L, N, Dv).gather(3, idx[..., None].expand(-1, -1, -1, -1, Dv))
    mem = knn_attention(q, kr, vr)
    return gated_combine(local, mem, gate_bias)


class MemorizingAttention(nn.Module):
    """A kNN-augmented self-attention layer (Wu et al. 2022).

    ``MemorizingAttention(d_model, n_heads, top_k, mem_size)``; ``forward(x, gate=None) -> (B, L, d_model)``:
    local causal attention over the segment x (B, L, d_model) and kNN attention over the FIFO of
    past keys/values (searched before this segment's pairs are added), mixed per head by
    ``g_h = sigmoid(gate_bias_h)`` (``gate`` (H,) overrides it: 0 = local only, 1 = memory only).
    Then the segment's keys and values (detached) enter the memory. ``reset()`` empties it
    (a new document). ``index`` as in :class:`KNNMemory`.
    """

    def __init__(self, d_model: int, n_heads: int, top_k: int, mem_size: int, index: Optional[str] = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.top_k = _check_positive_int(top_k, "top_k", "the number of retrieved pairs per query")
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.gate_bias = nn.Parameter(torch.zeros(n_heads))  # beta_h; g_h = sigmoid(beta_h) = 0.5 at init
        self.memory = KNNMemory(mem_size, index)

    def reset(self) -> None:
        self.memory.clear()

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        _check_states(x, "x", self.d_model)
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, D)
        local = fast_attention(q, k, v, is_causal=True)  # (B, H, L, D)
        kr, vr, valid = self.memory.search(q, self.top_k)
        mem = knn_attention(q, kr, vr, valid)  # (B, H, L, D); 0 where nothing was retrieved
        out = gated_combine(local, mem, self.gate_bias, gate)
        self.memory.add(k, v)
        return self.out(merge_heads(out))
