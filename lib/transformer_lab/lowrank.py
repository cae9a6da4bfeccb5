r"""Low-rank and kernel attention: Linformer, random features, Performer (FAVOR+), linear attention.

Dense attention forms the L x L matrix ``softmax(Q K^T / sqrt(D))``: time and memory grow like
L^2. The methods here never form it. Linformer makes it L x k by projecting the keys and values
to k << L rows; random-feature and linear attention replace ``exp(q . k)`` by a dot product of
feature vectors ``phi(q) . phi(k)``, so that the product can be re-associated,
``(phi(Q) phi(K)^T) V = phi(Q) (phi(K)^T V)``, and cost O(L m D) instead of O(L^2 D).

Papers
------
* Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768
  (sec. 3: the spectrum of trained attention, Theorem 1; sec. 4: the model, eq. 7, and the
  sharing options; the "additional efficiency techniques": k per layer, pooling and
  convolution instead of a learned projection).
* Rahimi & Recht 2007, "Random Features for Large-Scale Kernel Machines", NeurIPS 2007
  (random Fourier features: a shift-invariant kernel as an average of cosines).
* Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv:2009.14794
  (sec. 2.2-2.4: the softmax kernel, trigonometric vs positive random features, Lemma 1 and 2;
  orthogonal random features and FAVOR+, Theorem 2; sec. 2.8 and appendix: prefix sums for
  causal attention; redrawing the features during training).
* Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
  Linear Attention", arXiv:2006.16236 (eq. 4-6: kernel attention; eq. 7: phi = elu + 1;
  sec. 3.3-3.4, eq. 16-20: causal attention as prefix sums and as an RNN).

Equations (vectors are rows: ``q_i`` is row i of Q)
----------------------------------------------------
**Linformer** (eq. 7). E, F project the L keys and values (n = L in the paper) to k rows::

    head = softmax( Q (E K)^T / sqrt(D) ) (F V),     E, F in R^{k x L}
    P_bar = softmax( Q (E K)^T / sqrt(D) )           (Lq x k): O(L k) instead of O(L^2)

Its motivation (sec. 3): the L x L attention matrix P of a trained model has a fast-decaying
singular-value spectrum; most of its "energy" sits in the first few singular values
(:func:`attention_spectrum`, :func:`effective_rank`). Sharing (sec. 4): one (E, F) per head,
one pair shared by the heads ("headwise"), E = F ("key-value"), and one E for every layer
("layerwise"). E mixes *all* L positions, the future included: **Linformer is not causal**,
and :func:`linformer_attention` refuses ``causal=True``. Padding: padded keys and values are
set to zero *before* the projection, so they add nothing to the k mixtures; the k projected
rows themselves are visible to every query (there is no per-key mask after E).

**The softmax kernel and random features.** ``SM(x, y) = exp(x . y)``; attention is
``D^-1 A V`` with ``A_ij = SM(q_i / D^(1/4), k_j / D^(1/4))`` and ``D = diag(A 1)``.
With ``omega ~ N(0, I_D)`` (the rows omega_1 .. omega_m of W)::

    Gaussian kernel (Rahimi & Recht):  exp(-|x - y|^2 / 2) = E[ cos(omega . (x - y)) ]
    SM(x, y) = exp(|x|^2/2) exp(-|x - y|^2/2) exp(|y|^2/2)
    trigonometric:  phi_trig(x) = exp(|x|^2/2) / sqrt(m) [cos(W x), sin(W x)]     (2m entries)
    positive:       phi_+(x)    = exp(-|x|^2/2) / sqrt(m) exp(W x)                 (m entries)
                    since E[exp(omega . (x + y))] = exp(|x + y|^2 / 2)             (Lemma 1)

Both give ``E[phi(x) . phi(y)] = SM(x, y)``. Their variances (Lemma 2; m i.i.d. features;
:func:`kernel_estimate_variance`)::

    Var_trig = exp(|x|^2 + |y|^2) (1 - exp(-|x - y|^2))^2 / (2m)
    Var_+    = SM(x, y)^2 (exp(|x + y|^2) - 1) / m

As SM(x, y) -> 0 (x . y very negative) Var_+ -> 0 while Var_trig does not: the trigonometric
estimate has a huge *relative* error exactly where most attention entries live (small
weights), and it can be negative, so a row's normaliser can be 0 or negative. Positive
features are positive: the estimated weights are always a proper average.

**FAVOR+** (sec. 2.4): draw the omegas in blocks of D *orthogonal* directions (a random
rotation), each row rescaled to a chi_D-distributed length, so every row is still marginally
N(0, I): the estimate stays unbiased, and its variance is lower than with i.i.d. rows
(Theorem 2). :func:`gaussian_features` with ``orthogonal=True``. The paper redraws the
features periodically during training (:class:`PerformerSelfAttention`, ``redraw_interval``).

**Kernel (linear) attention** (Katharopoulos eq. 4-6), any feature map phi >= 0::

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)
          = [phi(Q) (phi(K)^T V)]_i / [phi(Q) (phi(K)^T 1)]_i            non-causal: O(L m Dv)
    phi(x) = elu(x) + 1                                                   (eq. 7)

Causal (eq. 16-20): the sums run over j <= i only; they are prefix sums, i.e. an RNN whose
state has a constant size (m x Dv and m) however long the sequence::

    S_t = S_{t-1} + phi(k_t)^T v_t          (m, Dv)
    z_t = z_{t-1} + phi(k_t)                (m,)
    out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)

:func:`linear_attention_recurrent` (and one step, :func:`linear_attention_step`) is this RNN;
:func:`linear_attention` computes the same in parallel.

Causal prefix sums in chunks
----------------------------
``torch.cumsum`` over the outer products ``phi(k_j)^T v_j`` needs an (L, m, Dv) tensor per
head (``chunk_size=None``, the textbook path). The default cuts the sequence into chunks of C
positions: inside a chunk a small masked C x C product (``j <= i``), across chunks the
states ``S`` of the chunks before (one cumulative sum over L / C chunk states). Memory
O(L (C + m Dv / C)), the same numbers.

Numerical stability of the positive features
---------------------------------------------
``exp(omega . x - |x|^2/2)`` overflows for large inputs. As in the paper's implementation, a
maximum is subtracted before ``exp``; every shift below is a common factor of a query's
numerator and denominator, so it cancels exactly:

* a query's features: its own maximum over the m features (it scales the query's whole row);
* the keys, non-causal: the maximum over all keys and features of the (batch, head);
* the keys, causal: the paper's implementation also takes the maximum over *all* keys, future
  ones included. It cancels in exact arithmetic, but a large future key can make the past
  ones underflow to 0: a future token then changes a past output. Here the causal path uses
  a *running* maximum ``c_i = max_{j <= i, r} (omega_r . k_j - |k_j|^2/2)`` instead: chunk
  states are rescaled by ``exp(c_old - c_new)`` as the maximum grows (as an online softmax
  does), so no output ever depends on a future token, and every exponent is <= 0.

Shapes
------
Inside attention tensors are ``(B, H, L, D)``; between blocks ``(B, L, d_model)``.
Features are ``(B, H, L, m)``, the recurrent state ``S`` is ``(B, H, m, Dv)`` and ``z`` is
``(B, H, m)``. Masks follow the library's convention (boolean True = attend); kernel and
Linformer attention can only hide *keys* (a padding mask ``(B, 1, 1, Lk)``): a general
(Lq, Lk) mask would need the L x L matrix these methods avoid.

Glossary (variable -> paper symbol)
-----------------------------------
=======================  ======================================================================
``q, k, v``              Q, K, V: ``(B, H, Lq, D)``, ``(B, H, Lk, D)``, ``(B, H, Lk, Dv)``
``E``, ``F``             Linformer's E_i, F_i in R^{k x n}: ``(proj_len, Lk)``, or one per head
                         ``(H, proj_len, Lk)``; F defaults to E (key-value sharing)
``proj_len``             Linformer's k, the projected length (never ``k``: that is the keys)
``seq_len``              Linformer's n, the longest sequence a projection was built for
``P_bar`` / weights      Linformer's context mapping matrix P_bar, ``(B, H, Lq, proj_len)``
``W``                    the random matrix whose rows are omega_1 .. omega_m: ``(m, D)``
``n_features``           m, the number of random features (trigonometric: 2m entries)
``phi``                  the feature map phi: ``(.., L, D) -> (.., L, m)``
``feature_map``          Katharopoulos' phi: ``"elu+1"`` (eq. 7), ``"relu"``, or a callable
``scale``                1/sqrt(D); Performer rescales q and k by sqrt(scale) = D^(-1/4) each
``S``, ``z``             the RNN state: S_t = sum_{j<=t} phi(k_j)^T v_j, z_t = sum_{j<=t} phi(k_j)
``eps``                  epsilon added to the denominator (Katharopoulos et al.'s code)
``chunk_size``           C, positions handled together by the causal prefix sums
``redraw_interval``      Performer's feature redraw interval (forward calls in training mode)
=======================  ======================================================================
"""

from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as nnf  # not "F": F is Linformer's value projection here
from torch import Tensor, nn

from .attention import (
    MultiHeadAttention,
    _check_qkv,
    _check_tensor,
    _shape,
    causal_mask,
    fast_attention,
    merge_heads,
    scaled_dot_product_attention,
)

__all__ = [
    # Linformer
    "linformer_attention",
    "LinformerProjection",
    "LinformerSelfAttention",
    "attention_spectrum",
    "effective_rank",
    # random features
    "gaussian_features",
    "trig_features",
    "positive_features",
    "softmax_kernel",
    "softmax_kernel_estimate",
    "kernel_estimate_variance",
    "performer_attention",
    "PerformerSelfAttention",
    # linear attention
    "FEATURE_MAPS",
    "elu_plus_one",
    "linear_attention",
    "LinearAttentionState",
    "linear_attention_step",
    "linear_attention_recurrent",
    "LinearSelfAttention",
    # error against exact attention
    "exact_attention",
    "attention_error",
    "feature_error_curve",
    "largest_tensor",
]

FeatureMap = Union[str, Callable[[Tensor], Tensor]]

SHARING = ("none", "headwise", "key-value", "layerwise")
PROJECTION_KINDS = ("linear", "mean", "max", "conv")
FEATURE_KINDS = ("positive", "trig")

LINFORMER_NOT_CAUSAL = (
    "Linformer is not causal: each projected key E K mixes all L positions, the future "
    "included, so no mask can keep a query from seeing later tokens (Wang et al. 2020 use it "
    "in encoders). For causal attention in linear time use linear_attention(..., causal=True) "
    "or performer_attention(..., causal=True)"
)


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int = 1, what: str = "") -> int:
    if isinstance(value, (bool, float)) or (isinstance(value, Tensor) and (
            value.is_floating_point() or value.dtype == torch.bool)):
        raise TypeError(f"{name}{what} must be an int; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}{what} must be an int; got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name}{what} must be >= {minimum}; got {name}={value}")
    return value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def _check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    return float(eps)


def _check_chunk_size(chunk_size, allow_none: bool) -> Optional[int]:
    if chunk_size is None and allow_none:
        return None
    what = " (positions per chunk of the causal prefix sums" + (", or None)" if allow_none else ")")
    return _check_int("chunk_size", chunk_size, 1, what)


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 or float64: half precision is computed in float32 (exp and long sums)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_causal_lengths(q: Tensor, k: Tensor, what: str) -> None:
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal {what} needs as many queries as keys (query i sees keys 0..i); got "
            f"Lq={q.shape[2]} and Lk={k.shape[2]}"
        )


def _key_keep(mask: Optional[Tensor], B: int, H: int, Lk: int, what: str) -> Optional[Tensor]:
    """A boolean key-padding mask broadcastable to (B, H, 1, Lk) -> (B, H, Lk) True = real key.

    Low-rank and kernel attention never build the (Lq, Lk) matrix, so a mask may only hide
    keys; a mask with a query dimension is refused with an explanation.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{what} takes a boolean key-padding mask (True = real token), e.g. "
            f"attention.padding_mask(lengths), shape (B, 1, 1, Lk); got dtype {mask.dtype}"
        )
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        raise ValueError(
            f"{what} can only hide keys: a mask must broadcast to (B, H, 1, Lk) (padding, "
            f"e.g. attention.padding_mask(lengths)); got shape {_shape(mask)}. A mask with "
            "a query dimension needs the Lq x Lk matrix that this attention never forms; "
            "for the causal mask pass causal=True (Linformer cannot be causal)"
        )
    try:
        keep = torch.broadcast_to(mask, (B, H, 1, Lk))
    except RuntimeError:
        raise ValueError(
            f"mask must broadcast to (B={B}, H={H}, 1, Lk={Lk}); got shape {_shape(mask)}"
        ) from None
    return keep[:, :, 0, :]  # (B, H, Lk)


def _check_W(W, D: int, name: str = "W") -> int:
    """W: (..., m, D) with m >= 1. Returns m."""
    _check_tensor(name, W)
    if W.dim() < 2 or W.shape[-1] != D:
        raise ValueError(
            f"{name} must be (m, D={D}) (one random direction omega_r per row, D = the "
            f"head dim of the inputs), or (..., m, D); got shape {_shape(W)}"
        )
    m = W.shape[-2]
    if m < 1:
        raise ValueError(
            f"{name} has m=0 rows: the estimate needs at least one random feature "
            f"(expected m >= 1); got shape {_shape(W)}"
        )
    return m


# ----------------------------------------------------------------------------
# Exact attention and the error of an approximation
# ----------------------------------------------------------------------------

def exact_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Exact softmax attention on PyTorch's fused kernel (:func:`attention.fast_attention`).

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv). The reference
    that every approximation here is measured against.
    """
    return fast_attention(q, k, v, mask=mask, scale=scale, is_causal=_check_bool("causal", causal))


def attention_error(approx: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    mask: Optional[Tensor] = None, scale: Optional[float] = None,
                    reduction: str = "mean") -> Tensor:
    """Relative error of an approximate attention output against exact softmax attention.

    ``||approx - exact||_F / ||exact||_F`` over each (batch, head)'s (Lq, Dv) output, then
    averaged (``reduction="mean"``: a 0-d tensor) or kept (``"none"``: (B, H)). ``exact`` is
    :func:`exact_attention` of the same q, k, v, ``causal``, ``mask`` and ``scale``.
    """
    _check_choice("reduction", reduction, ("mean", "none"))
    exact = exact_attention(q, k, v, causal, mask, scale)  # (B, H, Lq, Dv)
    _check_tensor("approx", approx)
    if approx.shape != exact.shape:
        raise ValueError(
            f"approx must have the shape of the attention output {_shape(exact)} "
            f"(B, H, Lq, Dv); got {_shape(approx)}"
        )
    dtype = _work_dtype(approx, exact)
    diff = (approx.to(dtype) - exact.to(dtype)).flatten(-2).norm(dim=-1)  # (B, H)
    ref = exact.to(dtype).flatten(-2).norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    err = diff / ref  # (B, H)
    return err.mean() if reduction == "mean" else err


# ----------------------------------------------------------------------------
# Linformer
# ----------------------------------------------------------------------------

def _check_projection(name: str, P, H: int, Lk: int) -> int:
    """E or F: (proj_len, Lk) or (H, proj_len, Lk); 1 <= proj_len <= Lk. Returns proj_len."""
    _check_tensor(name, P)
    if P.dim() not in (2, 3) or P.shape[-1] != Lk or (P.dim() == 3 and P.shape[0] not in (1, H)):
        raise ValueError(
            f"{name} must be (proj_len, Lk={Lk}) (it maps the Lk keys to proj_len rows), or one "
            f"per head (heads={H}, proj_len, Lk={Lk}); got shape {_shape(P)}"
        )
    proj_len = P.shape[-2]
    if proj_len < 1 or proj_len > Lk:
        raise ValueError(
            f"{name} projects Lk={Lk} positions to proj_len rows (the paper's k), so expected "
            f"1 <= proj_len <= Lk={Lk}; got proj_len={proj_len} (shape {_shape(P)}). A "
            "projection longer than the sequence saves nothing"
        )
    return proj_len


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None, scale: Optional[float] = None,
                        causal: bool = False, dropout_p: float = 0.0, need_weights: bool = False):
    """Linformer attention (Wang et al. 2020, eq. 7): ``softmax(Q (E K)^T * scale) (F V)``.

    Args:
        q: (B, H, Lq, D). k: (B, H, Lk, D). v: (B, H, Lk, Dv).
        E: (proj_len, Lk), or one per head (H, proj_len, Lk), with 1 <= proj_len <= Lk.
        F: the value projection, same rules; ``None`` uses E (key-value sharing).
        mask: boolean key-padding mask broadcastable to (B, H, 1, Lk), True = real token.
            Padded keys and values are zeroed before the projection (module docstring).
        scale: multiplies the scores; default 1/sqrt(D).
        causal: must be False: Linformer is not causal (a clear error says why).
        dropout_p, need_weights: as in :func:`attention.scaled_dot_product_attention`.

    Returns:
        out (B, H, Lq, Dv), or ``(out, P_bar (B, H, Lq, proj_len))`` with ``need_weights``.
    With ``E = F = I`` (proj_len = Lk) this is exactly full attention.
    """
    if _check_bool("causal", causal):
        raise ValueError(LINFORMER_NOT_CAUSAL)
    _check_qkv(q, k, v)
    B, H, Lk = k.shape[0], k.shape[1], k.shape[2]
    _check_projection("E", E, H, Lk)
    F = E if F is None else F
    _check_projection("F", F, H, Lk)
    keep = _key_keep(mask, B, H, Lk, "linformer_attention")
    if keep is not None:  # padded keys and values contribute nothing to the mixtures
        k = k.masked_fill(~keep[..., None], 0.0)
        v = v.masked_fill(~keep[..., None], 0.0)
    k_proj = E.to(k.dtype) @ k  # E K: (B, H, proj_len, D)
    v_proj = F.to(v.dtype) @ v  # F V: (B, H, proj_len, Dv)
    if need_weights:
        return scaled_dot_product_attention(q, k_proj, v_proj, scale=scale, dropout_p=dropout_p,
                                            need_weights=True)  # (out, P_bar)
    return fast_attention(q, k_proj, v_proj, scale=scale, dropout_p=dropout_p)  # (B, H, Lq, Dv)


class LinformerProjection(nn.Module):
    """One Linformer projection (E or F): (B, H, L, D) -> (B, H, proj_len, D), for L <= seq_len.

    ``kind`` (the paper's sec. 4, "additional efficiency techniques"):

    * ``"linear"``: a learned (proj_len, seq_len) matrix E (or one per head), initialised
      N(0, 1/proj_len) as a Johnson-Lindenstrauss projection; a shorter input of length L
      uses its first L columns (the same as padding the input with zeros to seq_len).
    * ``"mean"`` / ``"max"``: average or max pooling of the L positions into proj_len windows
      (``adaptive_*_pool1d``); no parameters.
    * ``"conv"``: a learned 1-D convolution along the sequence with kernel = stride =
      ceil(seq_len / proj_len), shared by the D channels (initialised to mean pooling).

    ``n_heads``: one projection per head (weight (H, proj_len, seq_len)); None: shared.
    ``matrix(L)`` returns E as a (.., proj_len, L) matrix for the linear kinds.
    """

    def __init__(self, seq_len: int, proj_len: int, n_heads: Optional[int] = None,
                 kind: str = "linear"):
        super().__init__()
        seq_len = _check_int("seq_len", seq_len, 1, " (n, the longest sequence)")
        proj_len = _check_int("proj_len", proj_len, 1, " (the paper's k, the projected length)")
        _check_choice("kind", kind, PROJECTION_KINDS)
        if n_heads is not None:
            n_heads = _check_int("n_heads", n_heads, 1)
        if proj_len > seq_len:
            raise ValueError(
                f"proj_len (the paper's k) projects seq_len={seq_len} positions to fewer rows, so "
                f"expected proj_len <= seq_len={seq_len}; got proj_len={proj_len}"
            )
        self.seq_len, self.proj_len, self.n_heads, self.kind = seq_len, proj_len, n_heads, kind
        heads = () if n_heads is None else (n_heads,)
        if kind == "linear":
            self.weight = nn.Parameter(torch.randn(*heads, proj_len, seq_len) / math.sqrt(proj_len))
        elif kind == "conv":
            self.kernel = -(-seq_len // proj_len)  # ceil(n / k)
            self.weight = nn.Parameter(torch.full((*heads, self.kernel), 1.0 / self.kernel))
        else:
            self.register_parameter("weight", None)

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, proj_len={self.proj_len}, kind={self.kind!r}, "
                f"n_heads={self.n_heads}")

    def _check_length(self, L: int) -> None:
        if L > self.seq_len:
            raise ValueError(
                f"this Linformer projection was built for sequences of at most seq_len="
                f"{self.seq_len} positions; got L={L}"
            )
        if L < self.proj_len:
            raise ValueError(
                f"Linformer projects L positions to proj_len={self.proj_len} rows (the paper's "
                f"k), so expected L >= proj_len={self.proj_len}; got L={L}. Pad the input to "
                "at least proj_len positions (padded keys are zeroed) or use a smaller proj_len"
            )

    def matrix(self, L: Optional[int] = None, device=None, dtype=None) -> Tensor:
        """E as a matrix (.., proj_len, L): ``E @ x`` projects x (.., L, D). Not for ``"max"``."""
        L = self.seq_len if L is None else _check_int("L", L, 1)
        self._check_length(L)
        if self.kind == "max":
            raise ValueError("max pooling is not linear: it has no matrix E (use forward)")
        if self.kind == "linear":
            return self.weight[..., :L]  # first L columns: (.., proj_len, L)
        if self.kind == "mean":
            eye = torch.eye(L, device=device, dtype=dtype or torch.get_default_dtype())
            return nnf.adaptive_avg_pool1d(eye[None], self.proj_len)[0].T  # (proj_len, L)
        # conv: row r holds the kernel on positions r*kernel .. r*kernel + kernel - 1
        w = self.weight  # (.., kernel)
        rows = torch.arange(self.proj_len, device=w.device)[:, None]  # (proj_len, 1)
        cols = torch.arange(L, device=w.device)[None, :]  # (1, L)
        offset = cols - rows * self.kernel  # position inside row r's window
        inside = (offset >= 0) & (offset < self.kernel)  # (proj_len, L)
        taps = w[..., offset.clamp(0, self.kernel - 1)]  # (.., proj_len, L)
        return taps * inside.to(w.dtype)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """x (B, H, L, D) -> (B, H, proj_len, D); ``keep`` (B, H, L) True = real position."""
        _check_tensor("x", x, 4, "(batch, heads, seq, head_dim)")
        B, H, L, D = x.shape
        self._check_length(L)
        if self.n_heads is not None and H != self.n_heads:
            raise ValueError(f"this projection has one matrix per head for {self.n_heads} heads; "
                             f"the input has H={H}")
        if self.kind == "max":
            if keep is not None:  # a padded position never wins the max
                x = x.masked_fill(~keep[..., None], float("-inf"))
            pooled = nnf.adaptive_max_pool1d(x.transpose(-2, -1).reshape(B * H, D, L), self.proj_len)
            pooled = pooled.reshape(B, H, D, self.proj_len).transpose(-2, -1)  # (B, H, proj_len, D)
            return pooled.masked_fill(torch.isneginf(pooled), 0.0)  # an all-padding window -> 0
        if keep is not None:
            x = x.masked_fill(~keep[..., None], 0.0)  # padded rows add nothing
        E = self.matrix(L, device=x.device, dtype=x.dtype).to(x.dtype)  # (.., proj_len, L)
        return E @ x  # E X: (B, H, proj_len, D)


# ----------------------------------------------------------------------------
# Self-attention modules: MultiHeadAttention's projections, another attention inside
# ----------------------------------------------------------------------------

class _KernelSelfAttentionBase(MultiHeadAttention):
    """Self-attention with MultiHeadAttention's ``qkv`` and ``out`` projections (so a dense
    model's weights load into it) and a different attention in :meth:`attend`.

    ``forward(x, mask=None, positions=None, need_weights=False)`` has the library's signature,
    so the module can replace ``block.attn`` in the library's blocks. ``mask``: a boolean
    key-padding mask (B, 1, 1, L); a causal (L, L) mask is accepted only when the module was
    built with ``causal=True`` (it says nothing more). ``positions``: schemes that act on the
    input or rotate q and k (sinusoidal, learned, RoPE) work; a score bias (ALiBi, T5, Shaw,
    XL) needs the L x L scores and is refused.
    """

    causal = False

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias, fast=True, cross=False)

    def _key_mask(self, mask: Optional[Tensor], L: int) -> Optional[Tensor]:
        if mask is None or not isinstance(mask, Tensor) or mask.dim() < 2 or mask.shape[-2] == 1:
            return mask  # None, or padding: checked by the attention function
        name = type(self).__name__
        is_causal = (mask.dtype == torch.bool and mask.shape[-2:] == (L, L) and torch.equal(
            mask, causal_mask(L, device=mask.device).expand(mask.shape)))
        if is_causal and self.causal:
            return None  # the causal mask says nothing more than causal=True
        if is_causal:
            hint = (LINFORMER_NOT_CAUSAL if isinstance(self, LinformerSelfAttention)
                    else f"build {name}(..., causal=True) for causal attention")
            raise ValueError(f"{name} got a causal (L, L) mask but was built with causal=False. {hint}")
        raise ValueError(
            f"{name} can only hide keys (a padding mask (B, 1, 1, L), True = real token)"
            f"{' or take the causal mask' if self.causal else ''}: it never forms the L x L "
            f"scores that a general mask acts on; got a mask of shape {_shape(mask)}"
        )

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, positions=None,
                need_weights: bool = False):
        self._check_inputs(x, None)
        q, k, v = self.project(x)  # (B, H, L, D) each
        if positions is not None:
            q, k = positions.rotate(q, k)  # RoPE rotates; others return them unchanged
            if getattr(positions, "needs_weights", False) or positions.score_bias(q, k) is not None:
                raise ValueError(
                    f"{type(self).__name__} cannot add a position bias to its scores (it never "
                    "forms the L x L scores); use positions that act on the input (sinusoidal, "
                    f"learned) or rotate q and k (rope); got {getattr(positions, 'name', positions)!r}"
                )
        out, weights = self.attend(q, k, v, self._key_mask(mask, x.shape[1]), need_weights)
        out = self.out(merge_heads(out))  # Concat(heads) W^O: (B, L, d_model)
        return (out, weights) if need_weights else out

    def attend(self, q, k, v, mask, need_weights):  # pragma: no cover - abstract
        raise NotImplementedError


class LinformerSelfAttention(_KernelSelfAttentionBase):
    """Linformer multi-head self-attention (Wang et al. 2020, sec. 4), non-causal.

    Args:
        d_model, n_heads, dropout, bias: as :class:`attention.MultiHeadAttention`.
        seq_len: n, the longest sequence (a shorter one uses the first L columns of E).
        proj_len: k, the projected length (<= seq_len; the input must have L >= proj_len).
        sharing: ``"none"`` (E_i, F_i per head), ``"headwise"`` (one E and one F for all
            heads), ``"key-value"`` (one E = F for all heads), ``"layerwise"`` (the
            ``projection`` you pass, the same object in every layer, as E = F).
        kind: ``"linear"``, ``"mean"``, ``"max"`` or ``"conv"`` (:class:`LinformerProjection`).
        projection: a :class:`LinformerProjection` to share across layers (``sharing=
            "layerwise"``); pass the same object to every layer.
        causal: must be False (Linformer is not causal; the error says what to use instead).

    ``forward(x (B, L, d_model), mask=None, positions=None, need_weights=False)`` returns
    (B, L, d_model), or ``(out, P_bar (B, H, L, proj_len))``.
    """

    def __init__(self, d_model: int, n_heads: int, seq_len: int, proj_len: int,
                 sharing: str = "headwise", kind: str = "linear",
                 projection: Optional[LinformerProjection] = None, dropout: float = 0.0,
                 bias: bool = True, causal: bool = False):
        if _check_bool("causal", causal):
            raise ValueError(LINFORMER_NOT_CAUSAL)
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias)
        _check_choice("sharing", sharing, SHARING)
        self.sharing = sharing
        if sharing == "layerwise":
            if not isinstance(projection, LinformerProjection):
                raise ValueError(
                    "sharing='layerwise' shares one projection across layers: build one "
                    "LinformerProjection(seq_len, proj_len) and pass it as projection= to every "
                    f"layer; got projection={type(projection).__name__}"
                )
            if (projection.seq_len, projection.proj_len) != (seq_len, proj_len):
                raise ValueError(
                    f"the shared projection maps seq_len={projection.seq_len} to proj_len="
                    f"{projection.proj_len}; this layer was asked for seq_len={seq_len}, "
                    f"proj_len={proj_len}"
                )
            self.E = self.F = projection
        elif projection is not None:
            raise ValueError(f"projection= is for sharing='layerwise'; got sharing={sharing!r}")
        else:
            heads = n_heads if sharing == "none" else None
            self.E = LinformerProjection(seq_len, proj_len, heads, kind)  # keys
            self.F = self.E if sharing == "key-value" else LinformerProjection(
                seq_len, proj_len, heads, kind)  # values
        self.seq_len, self.proj_len = seq_len, proj_len

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, seq_len={self.seq_len}, proj_len={self.proj_len}, "
                f"sharing={self.sharing!r}")

    def attend(self, q, k, v, mask, need_weights):
        B, H, L = k.shape[0], k.shape[1], k.shape[2]
        keep = _key_keep(mask, B, H, L, type(self).__name__)
        k_proj = self.E(k, keep)  # E K: (B, H, proj_len, D)
        v_proj = self.F(v, keep)  # F V: (B, H, proj_len, D)
        p = self.dropout if self.training else 0.0
        if need_weights:
            return scaled_dot_product_attention(q, k_proj, v_proj, dropout_p=p, need_weights=True)
        return fast_attention(q, k_proj, v_proj, dropout_p=p), None


def attention_spectrum(weights: Tensor, squared: bool = False):
    """Singular values of attention matrices and their normalised cumulative sum.

    weights (..., Lq, Lk) -> ``(sigma, cumulative)``, each (..., min(Lq, Lk)): sigma sorted
    in decreasing order; ``cumulative[..., i] = sum_{r <= i} sigma_r / sum_r sigma_r`` (the
    "normalized cumulative singular value" of Linformer's Fig. 1), or of sigma^2 (the energy)
    with ``squared=True``. A curve that reaches 0.9 after a few values says the matrix is
    close to low rank.
    """
    _check_tensor("weights", weights)
    if weights.dim() < 2:
        raise ValueError(f"weights must be (..., Lq, Lk) attention matrices; got shape {_shape(weights)}")
    dtype = _work_dtype(weights)
    sigma = torch.linalg.svdvals(weights.to(dtype))  # (..., min(Lq, Lk)), decreasing
    mass = sigma.square() if squared else sigma
    total = mass.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return sigma.to(weights.dtype), (mass.cumsum(-1) / total).to(weights.dtype)


def effective_rank(weights: Tensor, threshold: float = 0.9, squared: bool = False) -> Tensor:
    """How many singular values it takes to reach ``threshold`` of the cumulative spectrum.

    weights (..., Lq, Lk) -> int64 (...,). Linformer's observation: this is small for
    trained attention, and smaller in the higher layers (so they can use a smaller k).
    """
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a fraction in (0, 1]; got {threshold!r}")
    _, cumulative = attention_spectrum(weights, squared)
    reached = cumulative >= threshold - 1e-6  # tolerate rounding of the last partial sum
    return reached.to(torch.int64).argmax(-1) + 1


# ----------------------------------------------------------------------------
# Random features for the softmax kernel
# ----------------------------------------------------------------------------

def gaussian_features(m: int, d: int, generator: Optional[torch.Generator] = None,
                      orthogonal: bool = False, *, batch_shape: Sequence[int] = (),
                      dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
    """Random directions omega_1 .. omega_m ~ N(0, I_d), as the rows of W (*batch_shape, m, d).

    ``orthogonal=False``: i.i.d. Gaussian rows. ``orthogonal=True`` (FAVOR+): blocks of d rows
    that are exactly orthogonal (a Haar-random rotation: QR of a Gaussian matrix with the
    signs of R's diagonal fixed), each row rescaled to the length of an independent N(0, I_d)
    vector (chi_d distributed), so every row is still marginally N(0, I_d) and the estimates
    stay unbiased; ceil(m / d) independent blocks, the last one cut to the rows needed.

    Randomness comes from ``generator`` (drawn on its device, then moved to ``device``), or
    PyTorch's global generator when None (seeded by ``seed_everything``). ``batch_shape``
    draws independent matrices at once, e.g. ``(H,)`` for one per head or ``(n_draws,)``.
    """
    m = _check_int("m", m, 1, " (the number of random features)")
    d = _check_int("d", d, 1, " (the dimension of q and k)")
    _check_bool("orthogonal", orthogonal)
    batch_shape = tuple(_check_int("batch_shape entry", b, 1) for b in batch_shape)
    dtype = dtype or torch.get_default_dtype()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else (device or "cpu")
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    device = device if device is not None else draw_device

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=draw_dtype, device=draw_device)

    if not orthogonal:
        W = randn(*batch_shape, m, d)  # (..., m, d), rows i.i.d. N(0, I)
    else:
        n_blocks = -(-m // d)  # ceil(m / d)
        G = randn(*batch_shape, n_blocks, d, d)
        Q, R = torch.linalg.qr(G)  # G = Q R, Q orthogonal
        Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-distributed
        rows = Q.transpose(-2, -1).reshape(*batch_shape, n_blocks * d, d)[..., :m, :]  # unit rows
        norms = randn(*batch_shape, m, d).norm(dim=-1, keepdim=True)  # chi_d lengths
        W = rows * norms  # (..., m, d)
    return W.to(device=device, dtype=dtype)


def trig_features(x: Tensor, W: Tensor) -> Tensor:
    """Trigonometric random features: ``exp(|x|^2/2) / sqrt(m) [cos(x W^T), sin(x W^T)]``.

    x (..., L, D), W (m, D) or (..., m, D) broadcastable against x -> (..., L, 2m).
    ``phi(q) . phi(k) = exp((|q|^2 + |k|^2)/2) mean_r cos(omega_r . (q - k))``, an unbiased
    estimate of ``exp(q . k)`` (Rahimi & Recht's Gaussian-kernel features times
    exp(|x|^2/2)). Can be negative; no stabilisation (see :func:`performer_attention`).
    """
    _check_tensor("x", x)
    m = _check_W(W, x.shape[-1])
    proj = x @ W.to(x.dtype).transpose(-2, -1)  # omega_r . x: (..., L, m)
    scale = torch.exp(x.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)  # exp(|x|^2/2)/sqrt(m)
    return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1) * scale  # (..., L, 2m)


def positive_features(x: Tensor, W: Tensor) -> Tensor:
    """Positive random features (Performer Lemma 1): ``exp(x W^T - |x|^2/2) / sqrt(m)``.

    x (..., L, D), W (m, D) or (..., m, D) broadcastable against x -> (..., L, m), all > 0.
    ``phi(q) . phi(k) = mean_r exp(omega_r . (q + k) - (|q|^2 + |k|^2)/2)``, an unbiased
    estimate of ``exp(q . k)``. This is the plain formula (it overflows for large inputs);
    :func:`performer_attention` subtracts maxima before the exp.
    """
    _check_tensor("x", x)
    m = _check_W(W, x.shape[-1])
    proj = x @ W.to(x.dtype).transpose(-2, -1)  # omega_r . x: (..., L, m)
    return torch.exp(proj - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)


def softmax_kernel(q: Tensor, k: Tensor) -> Tensor:
    """The softmax kernel ``SM(q, k) = exp(q . k)``: (..., Lq, D), (..., Lk, D) -> (..., Lq, Lk).

    No 1/sqrt(D) here: attention's kernel is SM(q / D^(1/4), k / D^(1/4)).
    """
    _check_tensor("q", q)
    _check_tensor("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dim; got q {_shape(q)} and k {_shape(k)}")
    return torch.exp(q @ k.transpose(-2, -1))  # exp(q_i . k_j)


def _feature_fn(features: str) -> Callable[[Tensor, Tensor], Tensor]:
    _check_choice("features", features, FEATURE_KINDS)
    return positive_features if features == "positive" else trig_features


def softmax_kernel_estimate(q: Tensor, k: Tensor, W: Tensor, features: str = "positive") -> Tensor:
    """The random-feature estimate ``phi(q) phi(k)^T`` of ``exp(q k^T)``: -> (..., Lq, Lk).

    q (..., Lq, D), k (..., Lk, D), W (m, D) or (..., m, D) (one draw, or a batch of draws
    that broadcasts against q and k). ``features``: ``"positive"`` (:func:`positive_features`)
    or ``"trig"`` (:func:`trig_features`). Unbiased for W from :func:`gaussian_features`.
    """
    phi = _feature_fn(features)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dim; got q {_shape(q)} and k {_shape(k)}")
    return phi(q, W) @ phi(k, W).transpose(-2, -1)  # phi(q_i) . phi(k_j)


def kernel_estimate_variance(q: Tensor, k: Tensor, n_features: int,
                             features: str = "positive") -> Tensor:
    """The variance of the estimate of exp(q . k) with m i.i.d. features (Performer Lemma 2).

    q (..., Lq, D), k (..., Lk, D) -> (..., Lq, Lk)::

        positive:  SM^2 (exp(|q + k|^2) - 1) / m
        trig:      exp(|q|^2 + |k|^2) (1 - exp(-|q - k|^2))^2 / (2m)

    Orthogonal features (FAVOR+) have a lower variance than this (Theorem 2).
    """
    m = _check_int("n_features", n_features, 1, " (n_f, the number of random features; the paper's m)")
    _check_choice("features", features, FEATURE_KINDS)
    _check_tensor("q", q)
    _check_tensor("k", k)
    qk = q @ k.transpose(-2, -1)  # q . k: (..., Lq, Lk)
    qq = q.square().sum(-1)[..., :, None]  # |q|^2: (..., Lq, 1)
    kk = k.square().sum(-1)[..., None, :]  # |k|^2: (..., 1, Lk)
    if features == "positive":
        plus = (qq + kk + 2 * qk).clamp_min(0)  # |q + k|^2 (>= 0 despite rounding at k = -q)
        return torch.exp(2 * qk) * torch.expm1(plus) / m  # SM^2 (e^{|q+k|^2} - 1) / m
    minus = (qq + kk - 2 * qk).clamp_min(0)  # |q - k|^2
    return torch.exp(qq + kk) * (-torch.expm1(-minus)).square() / (2 * m)


# ----------------------------------------------------------------------------
# The shared core: numerator and denominator of kernel attention, causal or not
# ----------------------------------------------------------------------------

def _finite_or_zero(c: Tensor) -> Tensor:
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _kernel_attention(fq: Tensor, fk: Tensor, v: Tensor, causal: bool,
                      key_shift: Optional[Tensor] = None, chunk_size: Optional[int] = 64):
    """``(num, den)`` of kernel attention: num (B, H, Lq, Dv), den (B, H, Lq).

    fq (B, H, Lq, m) query features, fk (B, H, Lk, m) key features, v (B, H, Lk, Dv).
    ``key_shift`` (B, H, Lk), optional: key j's true features are ``fk_j * exp(key_shift_j)``
    (Performer keeps the log-scale apart so that no exp can overflow; -inf = a hidden key).
    num_i = sum_j (fq_i . fk_j) v_j and den_i = sum_j fq_i . fk_j over all j (non-causal) or
    j <= i (causal), each up to a positive factor common to num_i and den_i.
    """
    if not causal:
        if key_shift is not None:
            c = _finite_or_zero(key_shift.amax(-1, keepdim=True))  # (B, H, 1) max over keys
            fk = fk * torch.exp(key_shift - c)[..., None]  # (B, H, Lk, m)
        kv = fk.transpose(-2, -1) @ v  # sum_j phi(k_j)^T v_j: (B, H, m, Dv)
        z = fk.sum(-2)  # sum_j phi(k_j): (B, H, m)
        return fq @ kv, (fq @ z[..., None]).squeeze(-1)  # (B, H, Lq, Dv), (B, H, Lq)
    if chunk_size is None:  # the textbook prefix sums: an (L, m, Dv) tensor per head
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [v, 1]: den rides along
        S = torch.cumsum(fk[..., :, None] * v1[..., None, :], dim=-3)  # S_i: (B, H, L, m, Dv + 1)
        out = (fq[..., None, :] @ S).squeeze(-2)  # phi(q_i) S_i: (B, H, L, Dv + 1)
        return out[..., :-1], out[..., -1]
    if key_shift is None:
        return _chunked_causal_plain(fq, fk, v, chunk_size)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [v, 1]: den rides along
    return _chunked_causal(fq, fk, v1, key_shift, chunk_size)


def _chunked_causal_plain(fq: Tensor, fk: Tensor, v: Tensor, C: int):
    """Causal prefix sums chunk by chunk, features without a log-scale; returns (num, den).

    Chunk n holds positions nC .. nC + C - 1. Inside it: the masked C x C product
    ``tril(phi(Q_n) phi(K_n)^T) V_n``; from the chunks before: ``phi(Q_n) S_{<n}`` with the
    state ``S_{<n} = sum_{chunks r < n} phi(K_r)^T V_r`` (an exclusive cumulative sum over the
    L / C chunk states, never over the L positions). Every product is a batched matmul.
    """
    B, H, L, m = fq.shape
    Dv = v.shape[-1]
    C = min(C, L)
    N = -(-L // C)  # number of chunks
    pad = N * C - L
    if pad:  # zero features: padded keys add nothing, padded queries are dropped at the end
        fq, fk, v = nnf.pad(fq, (0, 0, 0, pad)), nnf.pad(fk, (0, 0, 0, pad)), nnf.pad(v, (0, 0, 0, pad))
    G = B * H
    fq = fq.reshape(G * N, C, m)
    fk = fk.reshape(G * N, C, m)
    v = v.reshape(G * N, C, Dv)
    scores = torch.bmm(fq, fk.transpose(1, 2)).tril_()  # phi(q_i) . phi(k_j), j <= i: (GN, C, C)
    den = scores.sum(-1)  # inside the chunk: (GN, C)
    T = torch.bmm(fk.transpose(1, 2), v).reshape(G, N, m, Dv)  # each chunk's phi(K_n)^T V_n
    z = fk.reshape(G, N, C, m).sum(2)  # each chunk's sum of phi(k_j): (G, N, m)
    S_before = torch.cumsum(T, dim=1) - T  # exclusive prefix sum: the chunks before n
    z_before = torch.cumsum(z, dim=1) - z
    num = torch.bmm(scores, v).baddbmm_(fq, S_before.reshape(G * N, m, Dv))  # + phi(Q_n) S_{<n}
    den = den + torch.bmm(fq, z_before.reshape(G * N, m, 1)).squeeze(-1)  # + phi(q_i) . z_{<n}
    return num.reshape(B, H, N * C, Dv)[:, :, :L], den.reshape(B, H, N * C)[:, :, :L]


def _chunked_causal(fq: Tensor, fk: Tensor, v1: Tensor, key_shift: Tensor, C: int):
    """Causal prefix sums chunk by chunk for features with a log-scale ``key_shift`` (Performer).

    As :func:`_chunked_causal_plain`, with a running maximum of the keys' log-scales (module
    docstring): ``v1 = [v, 1]`` carries the denominator as a last column; returns (num, den).
    """
    B, H, L, m = fq.shape
    Dv1 = v1.shape[-1]
    C = min(C, L)
    N = -(-L // C)  # number of chunks
    pad = N * C - L
    if pad:  # pad with hidden keys (zero features, shift -inf) and dummy queries, dropped later
        fq = nnf.pad(fq, (0, 0, 0, pad))
        fk = nnf.pad(fk, (0, 0, 0, pad))
        v1 = nnf.pad(v1, (0, 0, 0, pad))
        key_shift = nnf.pad(key_shift, (0, pad), value=float("-inf"))
    fq = fq.reshape(B, H, N, C, m)
    fk = fk.reshape(B, H, N, C, m)
    v1 = v1.reshape(B, H, N, C, Dv1)
    tri = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()  # j <= i inside a chunk
    scores = fq @ fk.transpose(-2, -1)  # phi(q_i) . phi(k_j): (B, H, N, C, C)
    s = key_shift.reshape(B, H, N, C)
    chunk_max = s.amax(-1)  # (B, H, N): each chunk's largest key log-scale
    run = torch.cummax(chunk_max, dim=-1).values  # running max after each chunk
    before = torch.cat([torch.full_like(run[..., :1], float("-inf")), run[..., :-1]], dim=-1)
    c = torch.maximum(torch.cummax(s, dim=-1).values, before[..., None])  # c_i: (B, H, N, C)
    c0 = _finite_or_zero(c)
    expo = (s[..., None, :] - c0[..., :, None]).masked_fill(~tri, float("-inf"))  # s_j - c_i
    scores = scores * torch.exp(expo)  # (B, H, N, C, C), every factor <= 1
    m0 = _finite_or_zero(chunk_max)
    T = (fk * torch.exp(s - m0[..., None])[..., None]).transpose(-2, -1) @ v1  # at m_n
    # The state before chunk n, at the scale of the running max `before[n]`: one small
    # step per chunk, S <- S exp(c_old - c_new) + T_n exp(m_n - c_new).
    states = []
    state = torch.zeros_like(T[:, :, 0])  # (B, H, m, Dv1)
    for n in range(N):
        states.append(state)
        new = _finite_or_zero(run[..., n])[..., None, None]  # (B, H, 1, 1)
        state = (state * torch.exp(before[..., n, None, None] - new)
                 + T[:, :, n] * torch.exp(chunk_max[..., n, None, None] - new))
    S_before = torch.stack(states, dim=2)  # (B, H, N, m, Dv1)
    rescale = torch.exp(before[..., None] - c0)[..., None]  # exp(c_before - c_i): (B, H, N, C, 1)
    out = scores @ v1 + (fq @ S_before) * rescale
    out = out.reshape(B, H, N * C, Dv1)[:, :, :L]
    return out[..., :-1], out[..., -1]


def _dense_weights(fq: Tensor, fk: Tensor, causal: bool, key_shift: Optional[Tensor],
                   signed: bool) -> Tensor:
    """The attention matrix a feature map implies, normalised per row: (B, H, Lq, Lk).

    For pictures and tests only: it is the L x L matrix the fast paths never build.
    """
    if key_shift is not None:
        c = _finite_or_zero(key_shift.amax(-1, keepdim=True))
        fk = fk * torch.exp(key_shift - c)[..., None]
    A = fq @ fk.transpose(-2, -1)  # (B, H, Lq, Lk)
    if causal:
        A = A.masked_fill(~causal_mask(A.shape[-2], A.shape[-1], device=A.device), 0.0)
    den = A.sum(-1, keepdim=True)
    if not signed:
        den = den.clamp_min(torch.finfo(A.dtype).tiny)
    return A / den


# ----------------------------------------------------------------------------
# Performer (FAVOR+)
# ----------------------------------------------------------------------------

def _draw_or_check_features(n_features, features, D, H, generator, orthogonal, dtype, device):
    if features is None:
        if n_features is None:
            raise ValueError(
                "give n_features (m: draw m new random features, i.e. redraw at every call) "
                "or features (W (m, D) from gaussian_features: reuse one draw); got neither"
            )
        m = _check_int("n_features", n_features, 1, " (n_f, the number of random features; the paper's m)")
        with torch.no_grad():
            return gaussian_features(m, D, generator, orthogonal, dtype=dtype, device=device)
    m = _check_W(features, D, "features")
    if features.dim() > 2 and (features.dim() != 3 or features.shape[0] not in (1, H)):
        raise ValueError(
            f"features must be (m, D={D}) shared by the heads or (heads={H}, m, D={D}); "
            f"got shape {_shape(features)}"
        )
    if n_features is not None and _check_int("n_features", n_features, 1) != m:
        raise ValueError(f"n_features={n_features} but features has m={m} rows; give one of them")
    return features.to(device=device, dtype=dtype)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, n_features: Optional[int] = None,
                        causal: bool = False, *, features: Optional[Tensor] = None,
                        generator: Optional[torch.Generator] = None, orthogonal: bool = True,
                        kind: str = "positive", mask: Optional[Tensor] = None,
                        scale: Optional[float] = None, chunk_size: int = 64,
                        need_weights: bool = False):
    """Performer attention, FAVOR+ (Choromanski et al. 2021): softmax attention via random features.

    ``out = D^-1 (phi(Q') (phi(K')^T V))`` with ``Q' = Q sqrt(scale)``, ``K' = K sqrt(scale)``
    (scale = 1/sqrt(D), so exp(q' . k') = exp(q . k / sqrt(D))), ``D = diag(phi(Q') phi(K')^T 1)``.

    Args:
        q: (B, H, Lq, D). k: (B, H, Lk, D). v: (B, H, Lk, Dv).
        n_features: m; draws a fresh W from ``generator`` at every call (a redraw per call).
        causal: attend to keys j <= i only (prefix sums; needs Lq == Lk).
        features: a W (m, D) or (H, m, D) to reuse (no redraw): give this or n_features.
        generator, orthogonal: for the draw (:func:`gaussian_features`; FAVOR+ is orthogonal).
        kind: ``"positive"`` (FAVOR+) or ``"trig"`` (the trigonometric features, for
            comparison: their normaliser can be 0 or negative, so outputs can blow up).
        mask: boolean key-padding mask broadcastable to (B, H, 1, Lk), True = real token.
        chunk_size: C for the causal prefix sums (1 = the token-by-token RNN).
        need_weights: also return the (B, H, Lq, Lk) attention matrix the features imply
            (built densely: for pictures, not for long sequences).

    Returns out (B, H, Lq, Dv) in q's dtype, or ``(out, weights)``. Numerically stable: see
    the module docstring (maxima subtracted before exp; a running maximum when causal, so
    no output depends on a future token). An unbiased estimate of exp(q . k) per pair; the
    normalised output is close to, not exactly, softmax attention.
    """
    _check_qkv(q, k, v)
    _check_bool("causal", causal)
    _check_choice("kind", kind, FEATURE_KINDS)
    chunk_size = _check_chunk_size(chunk_size, allow_none=False)
    if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None; got {scale!r}")
    if causal:
        _check_causal_lengths(q, k, "performer_attention")
    B, H, Lk, D = k.shape
    keep = _key_keep(mask, B, H, Lk, "performer_attention")
    dtype = _work_dtype(q, k, v)
    W = _draw_or_check_features(n_features, features, D, H, generator, orthogonal, dtype, q.device)
    root = math.sqrt(1.0 / math.sqrt(D) if scale is None else scale)  # D^(-1/4)
    qs, ks = q.to(dtype) * root, k.to(dtype) * root  # q', k': exp(q' . k') = exp(q . k / sqrt(D))
    Wt = W.transpose(-2, -1)  # (.., D, m)
    q_proj, k_proj = qs @ Wt, ks @ Wt  # omega_r . q', omega_r . k': (B, H, L, m)
    if kind == "positive":
        # log phi(x) = omega . x - |x|^2/2 (the 1/sqrt(m) cancels in the ratio). A query's
        # exp(-|q'|^2/2) and its own maximum are common to its numerator and denominator:
        # both cancel, so phi(q) is computed as exp(omega . q' - max_r omega_r . q').
        fq = torch.exp(q_proj - q_proj.amax(-1, keepdim=True).detach())  # (B, H, Lq, m), max 1 per row
        k_half = ks.square().sum(-1) / 2  # |k'|^2 / 2: (B, H, Lk)
        if causal:  # each key's own max kept apart, for the running maximum of the prefix sums
            k_log = k_proj - k_half[..., None]  # log phi(k): (B, H, Lk, m)
            shift = k_log.amax(-1).detach()  # (B, H, Lk): each key's own max
            if keep is not None:
                shift = shift.masked_fill(~keep, float("-inf"))  # a hidden key: exp(-inf) = 0
            fk = torch.exp(k_log - _finite_or_zero(shift)[..., None])  # (B, H, Lk, m), max 1 per row
        else:  # one maximum over all keys and features, folded into the exponent
            k_log_max = (k_proj.amax(-1) - k_half).detach()  # (B, H, Lk)
            if keep is not None:
                k_half = k_half.masked_fill(~keep, float("inf"))  # a hidden key: exp(-inf) = 0
                k_log_max = k_log_max.masked_fill(~keep, float("-inf"))
            c = _finite_or_zero(k_log_max.amax(-1, keepdim=True))  # (B, H, 1)
            fk = torch.exp(k_proj - (k_half + c)[..., None])  # exp(omega . k' - |k'|^2/2 - c) <= 1
            shift = None
    else:
        # phi_trig(x) = exp(|x|^2/2)/sqrt(m) [cos, sin]: the query's exp(|q|^2/2) cancels
        fq = torch.cat([torch.cos(q_proj), torch.sin(q_proj)], dim=-1)  # (B, H, Lq, 2m)
        fk = torch.cat([torch.cos(k_proj), torch.sin(k_proj)], dim=-1)  # (B, H, Lk, 2m)
        shift = ks.square().sum(-1) / 2  # log exp(|k|^2/2): (B, H, Lk)
        if keep is not None:
            shift = shift.masked_fill(~keep, float("-inf"))
            fk = fk.masked_fill(~keep[..., None], 0.0)
    num, den = _kernel_attention(fq, fk, v.to(dtype), causal, shift, chunk_size)
    if kind == "positive":
        den = den.clamp_min(torch.finfo(dtype).tiny)  # > 0 unless every key is hidden: out 0
    out = (num / den[..., None]).to(q.dtype)  # D^-1 (..): (B, H, Lq, Dv)
    if need_weights:
        weights = _dense_weights(fq, fk, causal, shift, signed=kind == "trig")
        return out, weights.to(q.dtype)
    return out


class PerformerSelfAttention(_KernelSelfAttentionBase):
    """Performer multi-head self-attention (FAVOR+) with feature redrawing.

    Args:
        d_model, n_heads, bias: as :class:`attention.MultiHeadAttention`.
        n_features: m, shared by the heads; default ``round(D ln D)`` (D = head dim; the
            paper's m = Theta(D log D)).
        causal: causal attention by prefix sums (then a causal (L, L) mask is also accepted).
        orthogonal: FAVOR+'s orthogonal features (default) or i.i.d. ones.
        redraw_interval: in training mode, draw new features every ``redraw_interval``
            forward calls (the paper redraws periodically); None: keep one draw.
        seed: seeds the module's own generator, so redraws are reproducible.
        kind, chunk_size: as :func:`performer_attention`.

    The features live in the buffer ``features`` (m, D) (saved with the state dict);
    :meth:`redraw` draws new ones.
    """

    def __init__(self, d_model: int, n_heads: int, n_features: Optional[int] = None,
                 causal: bool = False, orthogonal: bool = True,
                 redraw_interval: Optional[int] = None, seed: int = 0, kind: str = "positive",
                 chunk_size: int = 64, bias: bool = True):
        super().__init__(d_model, n_heads, bias=bias)
        D = self.head_dim
        if n_features is None:
            n_features = max(1, round(D * math.log(D))) if D > 1 else 1
        self.n_features = _check_int("n_features", n_features, 1, " (n_f, the number of random features; the paper's m)")
        self.causal = _check_bool("causal", causal)
        self.orthogonal = _check_bool("orthogonal", orthogonal)
        if redraw_interval is not None:
            redraw_interval = _check_int("redraw_interval", redraw_interval, 1)
        self.redraw_interval = redraw_interval
        _check_choice("kind", kind, FEATURE_KINDS)
        self.kind = kind
        self.chunk_size = _check_chunk_size(chunk_size, allow_none=False)
        self.seed = _check_int("seed", seed, 0)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.calls = 0
        self.register_buffer("features", self._draw(torch.device("cpu"), torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_features={self.n_features}, causal={self.causal}, "
                f"orthogonal={self.orthogonal}, redraw_interval={self.redraw_interval}")

    def _draw(self, device, dtype) -> Tensor:
        return gaussian_features(self.n_features, self.head_dim, self._generator, self.orthogonal,
                                 dtype=dtype, device=device)

    @torch.no_grad()
    def redraw(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw new features (from ``generator``, else the module's own seeded one)."""
        if generator is not None:
            W = gaussian_features(self.n_features, self.head_dim, generator, self.orthogonal,
                                  dtype=self.features.dtype, device=self.features.device)
        else:
            W = self._draw(self.features.device, self.features.dtype)
        self.features.copy_(W)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, positions=None,
                need_weights: bool = False):
        if self.training and self.redraw_interval is not None:
            if self.calls > 0 and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        return super().forward(x, mask, positions, need_weights)

    def attend(self, q, k, v, mask, need_weights):
        result = performer_attention(q, k, v, causal=self.causal, features=self.features,
                                     kind=self.kind, mask=mask, chunk_size=self.chunk_size,
                                     need_weights=need_weights)
        return result if need_weights else (result, None)


# ----------------------------------------------------------------------------
# Linear attention (Katharopoulos et al. 2020)
# ----------------------------------------------------------------------------

def elu_plus_one(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1``: positive, = x + 1 for x > 0 and exp(x) for x <= 0 (eq. 7)."""
    return torch.exp(x.clamp(max=0.0)) + x.clamp(min=0.0)  # one pass cheaper than nnf.elu(x) + 1


FEATURE_MAPS = {"elu+1": elu_plus_one, "relu": nnf.relu}


def _feature_map(feature_map: FeatureMap) -> Callable[[Tensor], Tensor]:
    if callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"feature_map must be one of {tuple(FEATURE_MAPS)} or a callable phi(x) -> features "
            f"(.., L, m) >= 0; got {feature_map!r}"
        )
    return FEATURE_MAPS[feature_map]


def _apply_feature_map(phi, x: Tensor, name: str) -> Tensor:
    out = phi(x)
    if not isinstance(out, Tensor) or out.shape[:-1] != x.shape[:-1]:
        got = f"shape {_shape(out)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"feature_map must map {name} {_shape(x)} to features {_shape(x)[:-1] + ('m',)} "
                         f"(every dim but the last kept); got {got}")
    return out


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                     feature_map: FeatureMap = "elu+1", eps: float = 1e-6,
                     mask: Optional[Tensor] = None, chunk_size: Optional[int] = 64,
                     need_weights: bool = False):
    """Linear attention (Katharopoulos et al. 2020), the parallel form.

    ``out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)``, the sums
    over all keys (non-causal: ``phi(Q) (phi(K)^T V)``, O(L m Dv)) or over j <= i (causal:
    prefix sums). No 1/sqrt(D): phi replaces the softmax kernel altogether.

    Args:
        q: (B, H, Lq, D). k: (B, H, Lk, D). v: (B, H, Lk, Dv). Causal needs Lq == Lk.
        feature_map: ``"elu+1"`` (the paper's), ``"relu"``, or a callable phi (.., L, D) ->
            (.., L, m) with non-negative values.
        eps: added to the denominator (as in the paper's code; it keeps 0/0 away).
        mask: boolean key-padding mask broadcastable to (B, H, 1, Lk): a padded key's
            features are set to 0, which is exactly hiding it.
        chunk_size: causal only: C positions per chunk (module docstring); None computes the
            textbook prefix sums with one (L, m, Dv) cumulative sum per head.
        need_weights: also return the implied (B, H, Lq, Lk) weights (built densely).

    Returns out (B, H, Lq, Dv), or ``(out, weights)``. It equals
    :func:`linear_attention_recurrent` (causal) to rounding.
    """
    _check_qkv(q, k, v)
    _check_bool("causal", causal)
    eps = _check_eps(eps)
    chunk_size = _check_chunk_size(chunk_size, allow_none=True)
    if causal:
        _check_causal_lengths(q, k, "linear_attention")
    phi = _feature_map(feature_map)
    B, H, Lk = k.shape[0], k.shape[1], k.shape[2]
    keep = _key_keep(mask, B, H, Lk, "linear_attention")
    fq = _apply_feature_map(phi, q, "q")  # phi(Q): (B, H, Lq, m)
    fk = _apply_feature_map(phi, k, "k")  # phi(K): (B, H, Lk, m)
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gave q {fq.shape[-1]} and k {fk.shape[-1]} features; they must match")
    if keep is not None:
        fk = fk.masked_fill(~keep[..., None], 0.0)  # a hidden key contributes nothing
    num, den = _kernel_attention(fq, fk, v, causal, None, chunk_size)
    out = num / (den + eps)[..., None]  # (B, H, Lq, Dv)
    if need_weights:
        A = fq @ fk.transpose(-2, -1)  # phi(q_i) . phi(k_j): (B, H, Lq, Lk)
        if causal:
            A = A.masked_fill(~causal_mask(A.shape[-2], A.shape[-1], device=A.device), 0.0)
        return out, A / (A.sum(-1, keepdim=True) + eps)
    return out


class LinearAttentionState(NamedTuple):
    """The RNN state of causal linear attention; its size does not grow with the sequence.

    ``S`` (B, H, m, Dv) = sum_{j<=t} phi(k_j)^T v_j; ``z`` (B, H, m) = sum_{j<=t} phi(k_j).
    """

    S: Tensor
    z: Tensor


def linear_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor,
                          state: Optional[LinearAttentionState] = None,
                          feature_map: FeatureMap = "elu+1", eps: float = 1e-6):
    """One token of causal linear attention as an RNN (Katharopoulos et al. eq. 18-20).

    q_t, k_t (B, H, D), v_t (B, H, Dv); ``state`` from the previous step (None: zeros)::

        S_t = S_{t-1} + phi(k_t)^T v_t,   z_t = z_{t-1} + phi(k_t)
        out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)

    Returns ``(out_t (B, H, Dv), LinearAttentionState(S_t, z_t))``.
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _check_tensor(name, t, 3, "(batch, heads, head_dim): one token")
    if q_t.shape != k_t.shape or k_t.shape[:2] != v_t.shape[:2]:
        raise ValueError(f"q_t and k_t must be (B, H, D) and v_t (B, H, Dv) with the same B, H; "
                         f"got q_t {_shape(q_t)}, k_t {_shape(k_t)}, v_t {_shape(v_t)}")
    eps = _check_eps(eps)
    phi = _feature_map(feature_map)
    fq = _apply_feature_map(phi, q_t, "q_t")  # phi(q_t): (B, H, m)
    fk = _apply_feature_map(phi, k_t, "k_t")  # phi(k_t): (B, H, m)
    if state is None:
        B, H, m = fk.shape
        state = LinearAttentionState(fk.new_zeros(B, H, m, v_t.shape[-1]), fk.new_zeros(B, H, m))
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState (S, z) or None; got {type(state).__name__}")
    if state.S.shape != (*fk.shape, v_t.shape[-1]) or state.z.shape != fk.shape:
        raise ValueError(f"state must have S {(*fk.shape, v_t.shape[-1])} and z {tuple(fk.shape)}; "
                         f"got S {_shape(state.S)} and z {_shape(state.z)}")
    S = state.S + fk[..., :, None] * v_t[..., None, :]  # S_t = S_{t-1} + phi(k_t)^T v_t
    z = state.z + fk  # z_t = z_{t-1} + phi(k_t)
    num = (fq[..., None, :] @ S).squeeze(-2)  # phi(q_t) S_t: (B, H, Dv)
    den = (fq * z).sum(-1, keepdim=True)  # phi(q_t) . z_t: (B, H, 1)
    return num / (den + eps), LinearAttentionState(S, z)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, feature_map: FeatureMap = "elu+1",
                               eps: float = 1e-6, state: Optional[LinearAttentionState] = None,
                               return_state: bool = False):
    """Causal linear attention token by token: a loop of :func:`linear_attention_step`.

    q, k (B, H, L, D), v (B, H, L, Dv) -> out (B, H, L, Dv), or ``(out, final state)`` with
    ``return_state``. ``state`` continues from an earlier call (generation with a constant-
    size memory). Slow (one step per token) but the clearest statement of the RNN.
    """
    _check_qkv(q, k, v)
    _check_causal_lengths(q, k, "linear_attention_recurrent")
    if q.shape[2] == 0:
        raise ValueError("linear_attention_recurrent needs at least one token; got L=0")
    outs = []
    for t in range(q.shape[2]):
        out_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state,
                                             feature_map, eps)
        outs.append(out_t)
    out = torch.stack(outs, dim=2)  # (B, H, L, Dv)
    return (out, state) if return_state else out


class LinearSelfAttention(_KernelSelfAttentionBase):
    """Linear-attention multi-head self-attention (Katharopoulos et al. 2020).

    Args: d_model, n_heads, bias as :class:`attention.MultiHeadAttention`; ``causal``,
    ``feature_map``, ``eps``, ``chunk_size`` as :func:`linear_attention`.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False,
                 feature_map: FeatureMap = "elu+1", eps: float = 1e-6,
                 chunk_size: Optional[int] = 64, bias: bool = True):
        super().__init__(d_model, n_heads, bias=bias)
        self.causal = _check_bool("causal", causal)
        self.feature_map = feature_map
        _feature_map(feature_map)
        self.eps = _check_eps(eps)
        self.chunk_size = _check_chunk_size(chunk_size, allow_none=True)

    def extra_repr(self) -> str:
        fm = self.feature_map if isinstance(self.feature_map, str) else getattr(
            self.feature_map, "__name__", "callable")
        return f"{super().extra_repr()}, causal={self.causal}, feature_map={fm!r}"

    def attend(self, q, k, v, mask, need_weights):
        result = linear_attention(q, k, v, self.causal, self.feature_map, self.eps, mask,
                                  self.chunk_size, need_weights)
        return result if need_weights else (result, None)


# ----------------------------------------------------------------------------
# Error as the number of features grows (the lecture's claim)
# ----------------------------------------------------------------------------

def feature_error_curve(q: Tensor, k: Tensor, v: Tensor, feature_counts: Sequence[int],
                        n_draws: int = 5, generator: Optional[torch.Generator] = None,
                        causal: bool = False, orthogonal: bool = True,
                        kind: str = "positive") -> Tensor:
    """Performer's error against exact attention for each feature count, over fresh draws.

    Returns (len(feature_counts), n_draws): :func:`attention_error` of
    :func:`performer_attention` with m = each count, a new draw of W each time. The mean
    over draws should fall like 1/sqrt(m).
    """
    counts = [_check_int("feature count", m, 1, " (n_f, the number of random features; the paper's m)")
              for m in feature_counts]
    if not counts:
        raise ValueError("feature_counts must name at least one feature count; got none")
    n_draws = _check_int("n_draws", n_draws, 1)
    errors = torch.empty(len(counts), n_draws, dtype=torch.float64)
    for a, m in enumerate(counts):
        for b in range(n_draws):
            out = performer_attention(q, k, v, m, causal, generator=generator,
                                      orthogonal=orthogonal, kind=kind)
            errors[a, b] = float(attention_error(out, q, k, v, causal))
    return errors


def largest_tensor(fn: Callable, *args, **kwargs):
    """The largest tensor any PyTorch operation creates while ``fn(*args, **kwargs)`` runs.

    Returns ``(numel, shape)`` of the output with the most elements, seen by a
    ``TorchDispatchMode`` (every ATen operation's outputs; the inputs themselves do not count).
    It shows that an attention never forms the Lq x Lk matrix: for dense attention the
    largest tensor has Lq * Lk elements per (batch, head); for kernel attention it stays
    near L m or m Dv. A count of elements, not a timing: deterministic.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    largest = [0, ()]

    class _Largest(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # unwrapped: the default wraps __torch_dispatch__ in torch._disable_dynamo, whose first
            # call imports torch._dynamo (~800 modules, seconds); nothing here is compiled
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.numel() > largest[0]:
                    largest[0], largest[1] = t.numel(), tuple(t.shape)
            return out

    with _Largest():
        fn(*args, **kwargs)
    return largest[0], largest[1]
