r"""Retrieval from a datastore: nearest-neighbour search and the kNN language model (kNN-LM).

Papers
------
* Khandelwal, Levy, Jurafsky, Zettlemoyer, Lewis 2020, "Generalization through Memorization:
  Nearest Neighbor Language Models", arXiv:1911.00172: sec. 2 (the datastore, eq. 1; the
  neighbour distribution, eq. 2; the interpolation with lambda, eq. 3), sec. 3 (faiss, an IVF
  index over the datastore's keys), sec. 5 (why it helps: rare patterns and repeated text).
* Johnson, Douze, Jégou 2017, "Billion-scale similarity search with GPUs", arXiv:1702.08734
  (faiss: flat and inverted-file indexes).
* Yogatama, de Masson d'Autume, Kong 2021, "Adaptive Semiparametric Language Models",
  arXiv:2102.02557 (SPALM: a Transformer-XL short-term memory plus a kNN long-term store,
  combined by a learned gate; taught in lecture 09 in words and a diagram, not built here).

The datastore (eq. 1)
---------------------
Run a trained language model over a text ``w_1 .. w_n``. At every position ``t`` it computes a
context vector ``f(c_t)`` (here: the input of the output layer, the final hidden state after
the last LayerNorm) from which it predicts the next token ``w_{t+1}`` (lecture 09 writes ``x_t``
for ``f(c_t)`` and ``y_t`` for ``w_t``). The datastore keeps all the pairs::

    (K, V) = { (f(c_t), w_{t+1})  for every position t of the text }      keys (N, d), values (N,)

The neighbour distribution (eq. 2)
----------------------------------
For a new context ``c`` with vector ``q = f(c)``, find its ``k`` nearest keys ``k_1 .. k_k`` by
squared Euclidean distance ``d_i = ||q - k_i||^2`` and turn them into a distribution over the
vocabulary: a softmax over ``-d_i / T`` (``T`` a temperature), each weight added to the token
that followed that key; tokens that appear several times among the neighbours add up, tokens
that never appear get 0::

    p_kNN(y | c)  =  sum_i 1[v_i = y] exp(-d_i / T)  /  sum_i exp(-d_i / T)

(:func:`knn_distribution`).

The interpolation (eq. 3)
-------------------------
The kNN-LM mixes the two distributions with a fixed weight ``lambda`` in [0, 1] (the paper's
symbol; lecture 06 used lambda for a k-means decay)::

    p(y | c)  =  lambda p_kNN(y | c)  +  (1 - lambda) p_LM(y | c)

(:func:`interpolate`). ``lambda = 0`` is the LM alone, ``lambda = 1`` the neighbours alone;
the best lambda is found on held-out text (:func:`knn_lm_perplexity` sweeps it).

Nearest-neighbour search behind one interface
---------------------------------------------
:func:`make_index` ``(kind, dim, metric="l2", **options)`` returns an index with ``.add(keys)``
(a ``(N, dim)`` float tensor), ``.search(queries, k) -> (distances, indices)`` (``(M, k)``
float and int64 tensors, nearest first; ``distances`` are squared L2 distances for ``"l2"``,
inner products, largest first, for ``"ip"``) and ``len(index)``:

=============  =====================================================================
kind           what it is
=============  =====================================================================
``torch``      exact top-k in PyTorch (:func:`exact_topk`): ``||q||^2 - 2 q.k + ||k||^2``
               for a chunk of keys at a time, the running top-k merged chunk by chunk,
               so memory stays ``O(M (chunk + k))`` however large the datastore. Runs on
               the device and in the dtype of the keys (CPU, CUDA, ...).
``faiss-flat`` faiss's exact ``IndexFlatL2`` / ``IndexFlatIP`` (float32, CPU).
``faiss-ivf``  faiss's ``IndexIVFFlat``: the keys are clustered into ``n_lists`` cells by
               k-means (trained on the first keys added, or by an explicit ``.train(keys)``;
               seeded, so deterministic); a query scans only the ``n_probe`` cells whose
               centroids are nearest. Approximate: a true neighbour in an unvisited cell
               is missed. ``n_probe = n_lists`` scans everything (exact).
=============  =====================================================================

:func:`recall_at_k` measures an approximate search against exact search: the mean fraction
of the exact top-k indices that the approximate search found.

Glossary (variable -> symbol)
-----------------------------
==========================  ========================================================
``keys``                    K, the context vectors f(c_t) (lecture 09's x_t), (N, d)
``values``                  V, the next tokens w_{t+1}, (N,) int64
``queries``                 q = f(c), (M, d)
``k``                       the number of neighbours (top-k)
``distances``               d_i = ||q - k_i||^2 (squared L2), (M, k)
``neighbour_tokens``        v_i, the values of the neighbours, (M, k)
``temperature``             T, the softmax temperature of eq. 2
``lam``                     lambda, the interpolation weight of eq. 3
``n_lists``, ``n_probe``    IVF cells, and cells scanned per query
``context``, ``stride``     the LM's window, and how far it moves (new positions scored)
==========================  ========================================================

Shapes: keys, queries ``(N, d)``, ``(M, d)``; distributions ``(M, vocab_size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "make_index",
    "TorchIndex",
    "FaissIndex",
    "exact_topk",
    "recall_at_k",
    "lm_outputs",
    "Datastore",
    "build_datastore",
    "knn_distribution",
    "interpolate",
    "knn_lm_perplexity",
]

INDEX_KINDS = ("torch", "faiss-flat", "faiss-ivf")
METRICS = ("l2", "ip")


# --------------------------------------------------------------------------- checks
def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _check_metric(metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")


def _check_vectors(x, dim: int, name: str) -> None:
    """A (n, dim) floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, {dim}); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, dim={dim}); got {tuple(x.shape)}")


def _check_k(k, size: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int; got {type(k).__name__}")
    if size == 0:
        raise ValueError("the index is empty: add keys before searching")
    if not 1 <= k <= size:
        raise ValueError(f"k must lie in [1, number of keys = {size}]; got k={k}")


# --------------------------------------------------------------------------- exact search in PyTorch
def exact_topk(queries: Tensor, keys: Tensor, k: int, metric: str = "l2",
               chunk_size: int = 4096, query_chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Exact k nearest keys of every query, chunked so memory stays bounded.

    ``queries`` (M, d), ``keys`` (N, d) on the same device and dtype. Returns
    ``(distances, indices)``, (M, k) each, nearest first: squared L2 distances
    ``||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2`` (clamped at 0) for ``"l2"``, inner products
    (largest first) for ``"ip"``. The keys are read ``chunk_size`` at a time and the running
    top-k is merged with each chunk's top-k, the queries ``query_chunk`` at a time, so no
    tensor is larger than ``query_chunk x (chunk_size + k)``.
    """
    _check_metric(metric)
    if not isinstance(queries, Tensor) or not isinstance(keys, Tensor):
        raise TypeError("queries and keys must be torch tensors")
    if keys.dim() != 2:
        raise ValueError(f"keys must have shape (N, d); got {tuple(keys.shape)}")
    _check_vectors(queries, keys.shape[1], "queries")
    _check_k(k, keys.shape[0])
    _check_positive_int("chunk_size", chunk_size)
    _check_positive_int("query_chunk", query_chunk)
    largest = metric == "ip"
    key_norms = keys.pow(2).sum(-1) if metric == "l2" else None            # ||k||^2: (N,)
    out_d, out_i = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk].to(keys.dtype)                    # (m, d)
        q_norms = q.pow(2).sum(-1, keepdim=True) if metric == "l2" else None
        best_d = best_i = None
        for c0 in range(0, keys.shape[0], chunk_size):
            kc = keys[c0:c0 + chunk_size]                                   # (c, d)
            if metric == "l2":
                # ||k||^2 - 2 q.k in one fused matmul; ||q||^2 is the same for every key of a row, so
                # it cannot change the ranking: it is added to the k winners only (3x faster on CPU)
                s = torch.addmm(key_norms[c0:c0 + chunk_size], q, kc.T, alpha=-2)   # (m, c)
            else:
                s = q @ kc.T                                                # q.k: (m, c)
            kk = min(k, kc.shape[0])
            d_c, i_c = torch.topk(s, kk, dim=-1, largest=largest, sorted=False)
            i_c = i_c + c0
            if best_d is not None:                                          # merge with the running top-k
                d_c, i_c = torch.cat([best_d, d_c], -1), torch.cat([best_i, i_c], -1)
            kk = min(k, d_c.shape[-1])
            best_d, pos = torch.topk(d_c, kk, dim=-1, largest=largest, sorted=False)
            best_i = i_c.gather(-1, pos)
        if metric == "l2":
            best_d = (best_d + q_norms).clamp_min_(0)                      # ||q - k||^2
        order = torch.sort(best_d, dim=-1, descending=largest, stable=True).indices   # nearest first
        out_d.append(best_d.gather(-1, order))
        out_i.append(best_i.gather(-1, order))
    return torch.cat(out_d), torch.cat(out_i)


class TorchIndex:
    """Exact search in PyTorch (:func:`exact_topk`), on the device and dtype of the keys added."""

    kind = "torch"

    def __init__(self, dim: int, metric: str = "l2", chunk_size: int = 4096, query_chunk: int = 1024):
        _check_positive_int("dim", dim)
        _check_metric(metric)
        _check_positive_int("chunk_size", chunk_size)
        _check_positive_int("query_chunk", query_chunk)
        self.dim, self.metric = dim, metric
        self.chunk_size, self.query_chunk = chunk_size, query_chunk
        self._parts: list[Tensor] = []
        self._keys: Optional[Tensor] = None

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    def __repr__(self) -> str:
        return f"TorchIndex(dim={self.dim}, metric={self.metric!r}, n={len(self)})"

    def add(self, keys: Tensor) -> None:
        """Append keys (N, dim); later keys get the next indices."""
        _check_vectors(keys, self.dim, "keys")
        if self._parts and (keys.device != self._parts[0].device or keys.dtype != self._parts[0].dtype):
            keys = keys.to(self._parts[0])
        self._parts.append(keys.detach())
        self._keys = None

    @property
    def keys(self) -> Tensor:
        """All keys added, (N, dim)."""
        if self._keys is None:
            self._keys = (torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]) if self._parts \
                else torch.empty(0, self.dim)
        return self._keys

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(distances, indices), (M, k) each, nearest first, on the device of the queries."""
        _check_vectors(queries, self.dim, "queries")
        _check_k(k, len(self))
        keys = self.keys
        d, i = exact_topk(queries.to(keys.device), keys, k, self.metric, self.chunk_size, self.query_chunk)
        return d.to(queries.device), i.to(queries.device)


class FaissIndex:
    """faiss's flat (exact) or IVF (approximate) index behind the same interface.

    faiss works in float32 on the CPU: keys and queries are copied there; results come back
    as torch tensors on the queries' device (distances float32, indices int64). An IVF search
    that finds fewer than ``k`` keys in its ``n_probe`` cells returns index -1 (distance
    ``inf`` for ``"l2"``, ``-inf`` for ``"ip"``) in the missing places.
    """

    def __init__(self, dim: int, metric: str = "l2", kind: str = "faiss-flat",
                 n_lists: int = 64, n_probe: int = 8, seed: int = 0):
        import faiss  # a real dependency (pyproject); imported here to keep `import retrieval` light

        _check_positive_int("dim", dim)
        _check_metric(metric)
        if kind not in ("faiss-flat", "faiss-ivf"):
            raise ValueError(f"kind must be 'faiss-flat' or 'faiss-ivf'; got {kind!r}")
        self.dim, self.metric, self.kind = dim, metric, kind
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        flat = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        if kind == "faiss-flat":
            self.index = flat
            self.n_lists = self.n_probe = None
        else:
            _check_positive_int("n_lists", n_lists)
            _check_positive_int("n_probe", n_probe)
            if n_probe > n_lists:
                raise ValueError(f"n_probe must lie in [1, n_lists = {n_lists}]; got n_probe={n_probe}")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"seed must be an int; got {type(seed).__name__}")
            self._quantizer = flat                        # keep it alive: the IVF index points at it
            self.index = faiss.IndexIVFFlat(flat, dim, n_lists, faiss_metric)
            self.index.cp.seed = seed                     # k-means initialisation: deterministic
            self.index.nprobe = n_probe
            self.n_lists = n_lists

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        extra = f", n_lists={self.n_lists}, n_probe={self.n_probe}" if self.kind == "faiss-ivf" else ""
        return f"FaissIndex(kind={self.kind!r}, dim={self.dim}, metric={self.metric!r}{extra}, n={len(self)})"

    @property
    def n_probe(self) -> Optional[int]:
        return int(self.index.nprobe) if self.kind == "faiss-ivf" else None

    @n_probe.setter
    def n_probe(self, value) -> None:
        if self.kind != "faiss-ivf":
            if value is not None:
                raise ValueError("n_probe applies to 'faiss-ivf' indexes only")
            return
        _check_positive_int("n_probe", value)
        if value > self.n_lists:
            raise ValueError(f"n_probe must lie in [1, n_lists = {self.n_lists}]; got n_probe={value}")
        self.index.nprobe = value

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @staticmethod
    def _numpy(x: Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())

    def train(self, keys: Tensor) -> None:
        """IVF: cluster ``keys`` (N, dim) into ``n_lists`` cells (k-means, seeded). Flat: nothing to do."""
        _check_vectors(keys, self.dim, "keys")
        if self.kind == "faiss-ivf":
            if keys.shape[0] < self.n_lists:
                raise ValueError(f"training an IVF index with n_lists={self.n_lists} needs at least "
                                 f"{self.n_lists} keys; got {keys.shape[0]}")
            self.index.train(self._numpy(keys))

    def add(self, keys: Tensor) -> None:
        """Append keys (N, dim); an untrained IVF index is trained on them first."""
        _check_vectors(keys, self.dim, "keys")
        if not self.index.is_trained:
            self.train(keys)
        self.index.add(self._numpy(keys))

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(distances, indices), (M, k) each, nearest first, on the device of the queries."""
        _check_vectors(queries, self.dim, "queries")
        _check_k(k, len(self))
        d, i = self.index.search(self._numpy(queries), k)
        d, i = torch.from_numpy(d), torch.from_numpy(i).long()
        missing = i < 0
        if missing.any():
            d = d.masked_fill(missing, math.inf if self.metric == "l2" else -math.inf)
        return d.to(queries.device), i.to(queries.device)


def make_index(kind: str, dim: int, metric: str = "l2", **options):
    """A nearest-neighbour index: ``kind`` in ``INDEX_KINDS``, keys of ``dim`` numbers.

    Options: ``"torch"``: ``chunk_size`` (keys per chunk, 4096), ``query_chunk`` (1024);
    ``"faiss-ivf"``: ``n_lists`` (64), ``n_probe`` (8), ``seed`` (0); ``"faiss-flat"``: none.
    The object has ``.add(keys)``, ``.search(queries, k) -> (distances, indices)`` and ``len()``
    (see the module docstring); faiss indexes also ``.train(keys)``.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"kind must be one of {INDEX_KINDS}; got {kind!r}")
    allowed = {"torch": {"chunk_size", "query_chunk"}, "faiss-flat": set(),
               "faiss-ivf": {"n_lists", "n_probe", "seed"}}[kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"make_index({kind!r}) takes the options {sorted(allowed)}; got unknown {unknown}")
    if kind == "torch":
        return TorchIndex(dim, metric, **options)
    return FaissIndex(dim, metric, kind=kind, **options)


def recall_at_k(found: Tensor, exact: Tensor) -> float:
    """Mean fraction of the exact top-k indices that ``found`` contains, row by row.

    ``found`` (M, k') and ``exact`` (M, k) int tensors of indices (order does not matter;
    -1 in ``found`` counts as a miss). 1.0 means every true neighbour was found.
    """
    if not isinstance(found, Tensor) or not isinstance(exact, Tensor):
        raise TypeError("found and exact must be torch tensors of indices")
    if found.dim() != 2 or exact.dim() != 2 or found.shape[0] != exact.shape[0]:
        raise ValueError(f"found and exact must be (M, k) with the same M; got {tuple(found.shape)} "
                         f"and {tuple(exact.shape)}")
    if exact.shape[1] == 0 or exact.shape[0] == 0:
        raise ValueError(f"exact must hold at least one neighbour per query; got shape {tuple(exact.shape)}")
    hit = (exact[:, :, None] == found.to(exact.device)[:, None, :]).any(-1)    # (M, k)
    return float(hit.float().mean())


# --------------------------------------------------------------------------- kNN-LM
def knn_distribution(distances: Tensor, neighbour_tokens: Tensor, vocab_size: int,
                     temperature: float = 1.0) -> Tensor:
    """The neighbours' distribution over the vocabulary (kNN-LM, eq. 2).

    ``distances`` (..., k): squared L2 distances of the k neighbours (smaller is closer);
    ``neighbour_tokens`` (..., k) int64: the token that followed each neighbour. Returns
    ``(..., vocab_size)``: ``softmax(-distances / temperature)`` over the k neighbours, each
    weight added onto its token (duplicates add up; other tokens get 0). Rows sum to 1.
    An infinite distance (a missing neighbour) gets weight 0. Keeps the distances' dtype.
    """
    if not isinstance(distances, Tensor) or not distances.is_floating_point():
        raise TypeError("distances must be a floating-point tensor (..., k)")
    if not isinstance(neighbour_tokens, Tensor) or neighbour_tokens.is_floating_point() \
            or neighbour_tokens.dtype == torch.bool:
        raise TypeError("neighbour_tokens must be an integer tensor (..., k) of token ids")
    if distances.shape != neighbour_tokens.shape:
        raise ValueError(f"distances and neighbour_tokens must have the same shape (..., k); got "
                         f"{tuple(distances.shape)} and {tuple(neighbour_tokens.shape)}")
    if distances.dim() == 0 or distances.shape[-1] == 0:
        raise ValueError(f"need at least one neighbour (k >= 1); got shape {tuple(distances.shape)}")
    _check_positive_int("vocab_size", vocab_size)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")
    if neighbour_tokens.numel() and (int(neighbour_tokens.min()) < 0 or int(neighbour_tokens.max()) >= vocab_size):
        raise ValueError(f"neighbour_tokens must lie in [0, vocab_size={vocab_size}); got min "
                         f"{int(neighbour_tokens.min())}, max {int(neighbour_tokens.max())}")
    weights = torch.softmax(-distances / temperature, dim=-1)                  # exp(-d_i/T) / sum: (..., k)
    out = torch.zeros(*distances.shape[:-1], vocab_size, dtype=distances.dtype, device=distances.device)
    return out.scatter_add_(-1, neighbour_tokens.long(), weights)            # sum_i 1[v_i = y] w_i


def interpolate(p_lm: Tensor, p_knn: Tensor, lam: float) -> Tensor:
    """kNN-LM's mixture (eq. 3): ``lam * p_knn + (1 - lam) * p_lm``, lam in [0, 1].

    ``lam = 0`` returns ``p_lm``, ``lam = 1`` returns ``p_knn`` (exactly). Shapes must match.
    """
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be one number in [0, 1]; got a tensor of shape {tuple(lam.shape)}")
        lam = float(lam)
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (lambda, the weight of p_kNN) must lie in [0, 1]; got {lam!r}")
    if not isinstance(p_lm, Tensor) or not isinstance(p_knn, Tensor):
        raise TypeError("p_lm and p_knn must be torch tensors of probabilities")
    if p_lm.shape != p_knn.shape:
        raise ValueError(f"p_lm and p_knn must have the same shape; got {tuple(p_lm.shape)} and {tuple(p_knn.shape)}")
    if lam == 0.0:
        return p_lm.clone()
    if lam == 1.0:
        return p_knn.clone()
    return lam * p_knn + (1.0 - lam) * p_lm


def _windows(T: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, end) windows over T positions: every position scored exactly once."""
    out, end = [], min(context, T)
    out.append((0, 0, end))
    while end < T:
        new_end = min(end + stride, T)
        start = max(0, new_end - context)
        out.append((start, end, new_end))
        end = new_end
    return out


@torch.no_grad()
def lm_outputs(model: nn.Module, ids: Tensor, context: int, stride: Optional[int] = None,
               batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Context vectors and next-token log-probabilities at every position of a 1-d sequence.

    ``ids`` (n,) int64. For every ``t`` in ``0 .. n-2`` the model reads ``ids[:t+1]`` (at most
    the last ``context`` tokens) and predicts ``ids[t+1]``. Returns ``(vectors (n-1, d),
    log_probs (n-1, V))``: the input of the model's output layer ``model.head`` (kNN-LM's key
    f(c_t)) and ``log_softmax`` of its logits. Windows of ``context`` tokens move by ``stride``
    (default ``context // 2``); each position is taken from the first window in which it is
    new, so it sees at least ``context - stride`` earlier tokens (fewer only at the start).
    ``model(idx)`` may return the logits or a tuple whose first item they are (a memory model's
    ``(logits, new_mems)``, called without memory). The model runs in eval mode; its mode is restored.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"ids must be a 1-d integer tensor of token ids; got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    if ids.numel() < 2:
        raise ValueError(f"ids needs at least 2 tokens (one position and its next token); got {ids.numel()}")
    _check_positive_int("context", context)
    stride = max(1, context // 2) if stride is None else stride
    _check_positive_int("stride", stride)
    if stride > context:
        raise ValueError(f"stride must lie in [1, context = {context}]; got stride={stride}")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise TypeError("model must have an output layer `head` (its input is the context vector)")
    device = next(model.parameters()).device
    x = ids[:-1].to(device)
    T = x.numel()
    wins = _windows(T, context, stride)
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    was_training = model.training
    model.eval()
    vecs, logps = [], []
    try:
        by_len: dict[int, list] = {}
        for w in wins:
            by_len.setdefault(w[2] - w[0], []).append(w)
        results = {}
        for group in by_len.values():
            for b0 in range(0, len(group), batch_size):
                chunk = group[b0:b0 + batch_size]
                batch = torch.stack([x[s:e] for s, _, e in chunk])               # (b, length)
                captured.clear()
                logits = model(batch)                                            # (b, length, V)
                if isinstance(logits, (tuple, list)):                            # e.g. (logits, new_mems)
                    logits = logits[0]
                h = captured[-1]                                                 # (b, length, d)
                for j, (s, keep, e) in enumerate(chunk):
                    results[s, keep, e] = (h[j, keep - s:], torch.log_softmax(logits[j, keep - s:].float(), -1))
        for w in wins:
            v, lp = results[w]
            vecs.append(v)
            logps.append(lp)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(vecs), torch.cat(logps)


@dataclass
class Datastore:
    """kNN-LM's datastore: keys f(c_t) (N, d) in a nearest-neighbour index, values w_{t+1} (N,)."""

    index: object
    values: Tensor

    def __len__(self) -> int:
        return int(self.values.numel())

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(distances (M, k), neighbour_tokens (M, k)): squared L2 distances and the tokens that followed.

        With an inner-product index the "distances" are the negated inner products (smaller is
        closer, as :func:`knn_distribution` expects). A neighbour an IVF search did not find
        gets distance ``inf`` and token 0 (weight 0 in :func:`knn_distribution`).
        """
        d, i = self.index.search(queries, k)
        if getattr(self.index, "metric", "l2") == "ip":
            d = -d
        tokens = self.values.to(i.device)[i.clamp_min(0)]
        return d, tokens


def build_datastore(model: nn.Module, ids: Tensor, context: int, kind: str = "torch",
                    metric: str = "l2", stride: Optional[int] = None, **index_options) -> Datastore:
    """Run ``model`` over ``ids`` (n,) and store (f(c_t), w_{t+1}) for every position (eq. 1).

    ``context``/``stride`` as in :func:`lm_outputs`; ``kind``, ``metric``, ``index_options`` as in
    :func:`make_index`. Returns a :class:`Datastore` of n - 1 entries.
    """
    keys, _ = lm_outputs(model, ids, context, stride)
    index = make_index(kind, keys.shape[1], metric, **index_options)
    index.add(keys)
    return Datastore(index=index, values=ids[1:].long().to(keys.device))


@torch.no_grad()
def knn_lm_perplexity(model: nn.Module, datastore: Datastore, ids: Tensor, context: int, k: int = 16,
                      lams: Sequence[float] = (0.0, 0.25, 0.5, 0.75), temperature: float = 1.0,
                      stride: Optional[int] = None) -> dict:
    """Perplexity of the LM and of the kNN-LM on held-out ``ids`` (n,), for every lambda in ``lams``.

    Every position's target probability is ``lam p_kNN(w_{t+1}) + (1 - lam) p_LM(w_{t+1})``
    (eq. 3) with ``p_kNN`` from its ``k`` nearest keys in ``datastore`` (eq. 2). Returns a dict:
    ``"lams"`` (list), ``"ppl"`` (list, one per lambda), ``"ppl_lm"`` (the LM alone = lambda 0),
    ``"best_lam"``, ``"best_ppl"``, ``"nll_lm"`` (n-1,) and ``"nll"`` (len(lams), n-1) per token
    (natural log). The datastore must not contain the held-out positions themselves.
    """
    lams = [float(lam) for lam in lams]
    if not lams:
        raise ValueError("lams must hold at least one lambda")
    for lam in lams:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"every lambda must lie in [0, 1]; got {lam}")
    vectors, log_probs = lm_outputs(model, ids, context, stride)
    targets = ids[1:].long().to(log_probs.device)
    d, tokens = datastore.search(vectors, k)
    p_knn = knn_distribution(d.to(torch.float64), tokens.to(log_probs.device), log_probs.shape[-1],
                             temperature)                                          # (T, V)
    p_lm_y = log_probs.double().gather(-1, targets[:, None]).squeeze(-1).exp()     # p_LM(w_{t+1})
    p_knn_y = p_knn.gather(-1, targets[:, None]).squeeze(-1)                       # p_kNN(w_{t+1})
    nll = torch.stack([-torch.log(lam * p_knn_y + (1 - lam) * p_lm_y) for lam in lams])   # (n_lams, T)
    nll_lm = -torch.log(p_lm_y)
    ppl = [math.exp(float(row.mean())) for row in nll]
    best = min(range(len(lams)), key=lambda j: ppl[j])
    return {"lams": lams, "ppl": ppl, "ppl_lm": math.exp(float(nll_lm.mean())), "best_lam": lams[best],
            "best_ppl": ppl[best], "nll_lm": nll_lm, "nll": nll}
