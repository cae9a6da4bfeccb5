"""Hidden tests of lecture 05, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's helpers for it, and PyTorch's shortcut) does not exist. See
``autograder/hidden.py``.

Three of the four exercises take or return functions, so they go through a driver (a
top-level ``def`` that runs in the learner's process): ``drive_dense_mask`` builds a
``mask_mod`` from data and hands it to the learner's ``dense_mask``; ``drive_mask_mod`` calls
the learner's factory and evaluates the ``mask_mod`` it returns on broadcast index grids (and
one pair at a time, as FlexAttention's vmap does), giving back the boolean mask. Each
mistake is written as the wrong answer a learner types, run through the same driver.
"""

import torch
from autograder.hidden import Case, HiddenTest

from transformer_lab import sparse as S

# --------------------------------------------------------------------------- ex1: dense_mask


def drive_dense_mask(fn, kind, Lq, Lk=None, B=None, H=None, param=None):
    """Runs in the learner's process: a mask_mod of the given kind, built from data, given to fn."""
    if kind == "band":          # |i - j| <= param
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= param
    elif kind == "ahead":       # j <= i + param (not symmetric)
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + param
    elif kind == "rows":        # the first `param` queries read everything (ignores kv_idx)
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx < param
    elif kind == "heads":       # head h: |i - j| <= h * param
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= h * param
    elif kind == "padding":     # sequence b has param[b] real keys
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < param[b]
    else:                       # "table": any per-head pattern, looked up
        def mask_mod(b, h, q_idx, kv_idx):
            return param[h, q_idx, kv_idx]
    return fn(mask_mod, Lq, Lk, B=B, H=H)


def dense_mask_reference(kind, Lq, Lk=None, B=None, H=None, param=None):
    return drive_dense_mask(S.dense_mask, kind, Lq, Lk, B=B, H=H, param=param)


def dense_mask_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    L = draw(6, 12)
    yield Case(f"band |i - j| <= 2, Lq = {L}", "band", L, param=2,
               show={"mask_mod": "|q_idx - kv_idx| <= 2", "Lq": L})
    Lq, Lk = draw(3, 6), draw(7, 10)
    yield Case(f"j <= i + 1, Lq = {Lq} queries, Lk = {Lk} keys", "ahead", Lq, Lk, param=1,
               show={"mask_mod": "kv_idx <= q_idx + 1", "Lq": Lq, "Lk": Lk})
    Lq, Lk = draw(5, 9), draw(3, 5)
    yield Case(f"q_idx < 3 (ignores kv_idx), Lq = {Lq}, Lk = {Lk}", "rows", Lq, Lk, param=3,
               show={"mask_mod": "q_idx < 3", "Lq": Lq, "Lk": Lk})
    L, H = draw(5, 9), draw(2, 5)
    yield Case(f"per head |i - j| <= h, Lq = {L}, H = {H}", "heads", L, H=H, param=1,
               show={"mask_mod": "|q_idx - kv_idx| <= h", "Lq": L, "H": H})
    L, B = draw(5, 9), draw(2, 4)
    lengths = torch.randperm(L, generator=rng)[:B] + 1          # distinct lengths in 1 .. L
    yield Case(f"padding, lengths {lengths.tolist()}, Lq = {L}, B = {B}", "padding", L, B=B, param=lengths,
               show={"mask_mod": "kv_idx < lengths[b]", "lengths": lengths, "Lq": L, "B": B})
    Lq, Lk, H = draw(4, 7), draw(7, 10), 2
    table = torch.rand(H, Lq, Lk, generator=rng) < 0.4
    yield Case(f"a random per-head table, Lq = {Lq}, Lk = {Lk}, B = 2, H = {H}", "table", Lq, Lk, B=2, H=H,
               param=table, show={"mask_mod": "table[h, q_idx, kv_idx]", "table": table, "Lq": Lq, "Lk": Lk,
                                  "B": 2, "H": H})


def _grids(Lq, Lk, B, H):
    Lk = Lq if Lk is None else Lk
    nb, nh = B or 1, H or 1
    return (torch.arange(nb).view(-1, 1, 1, 1), torch.arange(nh).view(1, -1, 1, 1),
            torch.arange(Lq).view(1, 1, -1, 1), torch.arange(Lk).view(1, 1, 1, -1), (nb, nh, Lq, Lk))


def _finish(m, shape, B, H):
    m = torch.broadcast_to(m, shape)
    return m[0, 0] if B is None and H is None else m


def _dense_swapped(mask_mod, Lq, Lk=None, B=None, H=None):
    b, h, i, j, shape = _grids(Lq, Lk, B, H)
    return _finish(mask_mod(b, h, j, i), shape, B, H)  # kv_idx and q_idx passed in the wrong order


def _dense_not_broadcast(mask_mod, Lq, Lk=None, B=None, H=None):
    b, h, i, j, shape = _grids(Lq, Lk, B, H)
    m = mask_mod(b, h, i, j)
    return m.reshape(m.shape[-2:]) if B is None and H is None else m


def _dense_head_zero(mask_mod, Lq, Lk=None, B=None, H=None):
    b, h, i, j, shape = _grids(Lq, Lk, B, H)
    return _finish(mask_mod(b, torch.zeros_like(h), i, j), shape, B, H)


def _dense_batch_zero(mask_mod, Lq, Lk=None, B=None, H=None):
    b, h, i, j, shape = _grids(Lq, Lk, B, H)
    return _finish(mask_mod(torch.zeros_like(b), h, i, j), shape, B, H)


def _dense_keys_are_queries(mask_mod, Lq, Lk=None, B=None, H=None):
    return S.dense_mask(mask_mod, Lq, Lq, B=B, H=H)


def _dense_float(mask_mod, Lq, Lk=None, B=None, H=None):
    return S.dense_mask(mask_mod, Lq, Lk, B=B, H=H).float()


def _dense_always_4d(mask_mod, Lq, Lk=None, B=None, H=None):
    b, h, i, j, shape = _grids(Lq, Lk, B, H)
    return torch.broadcast_to(mask_mod(b, h, i, j), shape)


def _wrong_dense(wrong):
    def mistake(kind, Lq, Lk=None, B=None, H=None, param=None):
        return drive_dense_mask(wrong, kind, Lq, Lk, B=B, H=H, param=param)
    return mistake


# --------------------------------------------------------------------------- ex2 and ex3: mask_mod factories


def drive_mask_mod(fn, args, L, H=None):
    """Runs in the learner's process: calls the factory fn(*args) and evaluates the mask_mod it returns
    on broadcast index grids, (L, L) bool (or (H, L, L)); one pair at a time it must agree (vmap's way)."""
    mask_mod = fn(*args)
    if not callable(mask_mod):
        raise TypeError(f"{fn.__name__}{tuple(args)} returned a {type(mask_mod).__name__}; expected a "
                        "mask_mod, a function mask_mod(b, h, q_idx, kv_idx) -> bool tensor")
    nh = H or 1
    b = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    h = torch.arange(nh).view(1, nh, 1, 1)
    q = torch.arange(L).view(1, 1, L, 1)
    kv = torch.arange(L).view(1, 1, 1, L)
    try:
        m = mask_mod(b, h, q, kv)
    except NotImplementedError:
        raise
    except RuntimeError as err:
        if "Boolean value of Tensor" not in str(err):
            raise
        raise TypeError("the mask_mod branches on an index tensor (a Python if, and, or on q_idx or kv_idx): on "
                        "a grid of index tensors that has no single truth value. Combine tensor comparisons with "
                        "&, | and ~ instead (a Python if on the factory's own arguments, such as causal, is fine)"
                        ) from None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"the mask_mod returned a {type(m).__name__}, not a tensor: build it from tensor "
                        "comparisons (q_idx - kv_idx <= w) combined with & and |, not Python if/and/or")
    m = torch.broadcast_to(m, (1, nh, L, L))
    zero = torch.zeros((), dtype=torch.int64)
    for i in range(min(L, 6)):
        for j in range(min(L, 6)):
            one = mask_mod(zero, zero, torch.tensor(i), torch.tensor(j))
            if not isinstance(one, torch.Tensor) or one.numel() != 1 or bool(one) != bool(m[0, 0, i, j]):
                raise ValueError(f"the mask_mod gives {one!r} for the single pair (q_idx={i}, kv_idx={j}) but "
                                 f"{bool(m[0, 0, i, j])} for that pair on a grid of all pairs: write it with "
                                 "elementwise tensor operations only (no reduction such as .any() over the inputs)")
    return m[0, 0] if H is None else m[0]


def sliding_window_reference(args, L):
    return S.dense_mask(S.sliding_window(*args), L)


def sliding_window_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    w, L = draw(2, 6), draw(14, 24)
    yield Case(f"window={w}, causal=True, L = {L}", (w, True), L, show={"window": w, "causal": True, "L": L})
    w, L = 2 * draw(1, 5), draw(18, 30)
    yield Case(f"window={w}, causal=False, L = {L}", (w, False), L, show={"window": w, "causal": False, "L": L})
    yield Case("window=1, causal=True, L = 6", (1, True), 6, show={"window": 1, "causal": True, "L": 6})
    L = draw(8, 12)
    yield Case(f"window={L - 1}, causal=True, L = {L} (the window reaches the first token)", (L - 1, True), L,
               show={"window": L - 1, "causal": True, "L": L})
    yield Case("window=2, causal=False, L = 5", (2,), 5, show={"window": 2, "causal": "(default) False", "L": 5})
    w = 2 * draw(1, 4) + 1
    yield Case(f"window={w} (odd), causal=False: ValueError", (w, False), 12, raises=ValueError,
               show={"window": w, "causal": False})
    yield Case("window=0, causal=True: ValueError", (0, True), 12, raises=ValueError, show={"window": 0, "causal": True})


def _window_factory(rule):
    """A wrong sliding_window: the same argument checks, ``rule(offset, window, causal)`` as the mask."""
    def sliding_window(window, causal=False):
        if window < 1 or (not causal and window % 2):
            raise ValueError("bad window")

        def mask_mod(b, h, q_idx, kv_idx):
            return rule(q_idx - kv_idx, window, causal)
        return mask_mod
    return sliding_window


def _correct_window(d, w, causal):
    return (d >= 0) & (d <= w) if causal else d.abs() <= w // 2


_WINDOW_MISTAKES = {
    "off by one: the causal window is the w keys before i AND i itself, 0 <= i - j <= w (not i - j < w)":
        lambda d, w, c: ((d >= 0) & (d < w)) if c else _correct_window(d, w, c),
    "a causal window never looks ahead: 0 <= i - j <= w, not |i - j| <= w":
        lambda d, w, c: (d.abs() <= w) if c else _correct_window(d, w, c),
    "i - j, not j - i: the causal window reads the past, keys j <= i":
        lambda d, w, c: ((d <= 0) & (d >= -w)) if c else _correct_window(d, w, c),
    "the query attends to itself too: 0 <= i - j, not 0 < i - j":
        lambda d, w, c: ((d > 0) & (d <= w)) if c else _correct_window(d, w, c),
    "causal=True was ignored: the causal window is 0 <= i - j <= w":
        lambda d, w, c: d.abs() <= w // 2,
    "the bidirectional window is w/2 on each side: |i - j| <= w/2, not |i - j| <= w":
        lambda d, w, c: _correct_window(d, w, c) if c else d.abs() <= w,
    "off by one: |i - j| <= w/2 includes the keys exactly w/2 away":
        lambda d, w, c: _correct_window(d, w, c) if c else d.abs() < w // 2,
    "causal=False was ignored: a bidirectional window reads both sides, |i - j| <= w/2":
        lambda d, w, c: (d >= 0) & (d <= w),
    "a mask_mod returns a bool tensor: comparisons combined with & and |, without .int() or .float()":
        lambda d, w, c: _correct_window(d, w, c).int(),
}


def _wrong_window(rule):
    factory = _window_factory(rule)

    def mistake(args, L):
        return drive_mask_mod(factory, args, L)
    return mistake


def longformer_reference(args, L):
    window, dilation, n_global, causal = args
    return S.dense_mask(S.longformer(window, dilation, global_tokens=n_global, causal=causal), L)


def longformer_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    def case(w, d, g, c, L, note=""):
        return Case(f"window={w}, dilation={d}, n_global={g}, causal={c}, L = {L}{note}", (w, d, g, c), L,
                    show={"window": w, "dilation": d, "n_global": g, "causal": c, "L": L})

    yield case(4, 1, 1, False, draw(20, 28), " (one global token)")
    yield case(2 * draw(1, 3), draw(2, 4), 0, False, draw(30, 50), " (dilated)")
    yield case(draw(2, 5), 2, 2, True, draw(30, 50), " (causal, dilated, global)")
    yield case(6, 1, 3, False, 16)
    yield case(1, 1, 0, True, 7, " (a plain causal window)")
    for _ in range(2):
        c = bool(torch.rand(1, generator=rng) < 0.5)
        w = draw(1, 5) * (1 if c else 2)
        yield case(w, draw(1, 4), draw(0, 4), c, draw(40, 64))


def _longformer_factory(local_rule=None, global_rule=None, causal_everywhere=True):
    """A wrong longformer: ``local_rule(offset, q, kv, w, d, causal)`` and ``global_rule(q, kv, g)``."""
    def correct_local(off, q, kv, w, d, c):
        reach = d * (w if c else w // 2)
        band = (off >= 0) & (off <= reach) if c else off.abs() <= reach
        return band & (off % d == 0)

    def correct_global(q, kv, g):
        return (q < g) | (kv < g)

    local, glob = local_rule or correct_local, global_rule or correct_global

    def longformer(window, dilation=1, n_global=0, causal=False):
        def mask_mod(b, h, q_idx, kv_idx):
            off = q_idx - kv_idx
            lo = local(off, q_idx, kv_idx, window, dilation, causal)
            if causal and not causal_everywhere:
                lo = lo & (off >= 0)
                return lo | glob(q_idx, kv_idx, n_global)
            keep = lo | glob(q_idx, kv_idx, n_global)
            return keep & (off >= 0) if causal else keep
        return mask_mod
    return longformer


def _band(off, reach, c):
    return (off >= 0) & (off <= reach) if c else off.abs() <= reach


_LONGFORMER_MISTAKES = {
    "every query reads the global tokens too (global attention is symmetric): ... | (kv_idx < n_global)":
        {"global_rule": lambda q, kv, g: q < g},
    "the global tokens are positions 0 .. n_global - 1: q_idx < n_global and kv_idx < n_global, not <=":
        {"global_rule": lambda q, kv, g: (q <= g) | (kv <= g)},
    "a global token also reads every key (global attention is symmetric): ... | (q_idx < n_global)":
        {"global_rule": lambda q, kv, g: kv < g},
    "dilate the offset, not the position: (q_idx - kv_idx) % dilation == 0, not kv_idx % dilation == 0":
        {"local_rule": lambda off, q, kv, w, d, c: _band(off, d * (w if c else w // 2), c) & (kv % d == 0)},
    "the dilated window reaches dilation * w/2 on each side (dilation * w back if causal): its w keys spread "
    "over dilation * w positions":
        {"local_rule": lambda off, q, kv, w, d, c: _band(off, w if c else w // 2, c) & (off % d == 0)},
    "the dilation is missing: keep only the offsets i - j that are multiples of the dilation":
        {"local_rule": lambda off, q, kv, w, d, c: _band(off, d * (w if c else w // 2), c)},
    "causal means nothing reads the future, global tokens included: apply & (kv_idx <= q_idx) to the whole mask":
        {"causal_everywhere": False},
    "off by one: the window includes the keys exactly dilation * w/2 away (dilation * w if causal)":
        {"local_rule": lambda off, q, kv, w, d, c: ((off >= 0) & (off < d * w) if c else off.abs() < d * (w // 2))
         & (off % d == 0)},
}


def _wrong_longformer(spec):
    factory = _longformer_factory(**spec)

    def mistake(args, L):
        return drive_mask_mod(factory, args, L)
    return mistake


# --------------------------------------------------------------------------- ex4: hop_distances


def hop_distances_reference(masks, max_hops=None):
    layers = list(masks) if masks.dim() == 3 else [masks]
    mods = [lambda b, h, q_idx, kv_idx, t=t: t[q_idx, kv_idx] for t in layers]  # a table per layer
    return S.hop_distances(mods, masks.shape[-1], max_hops)


def hop_distances_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    L = draw(12, 20)
    yield Case(f"a causal window of 2, L = {L}", S.dense_mask(S.sliding_window(2, causal=True), L),
               show={"masks": f"sliding_window(2, causal=True), L = {L}"})
    L = draw(24, 36)
    yield Case(f"Longformer window 4 + 1 global token, L = {L}", S.dense_mask(S.longformer(4, global_tokens=1), L),
               show={"masks": f"longformer(4, global_tokens=1), L = {L}"})
    L = 4 * draw(4, 7)
    f1, f2 = (S.dense_mask(m, L) for m in S.fixed_factors(4, c=1))
    yield Case(f"fixed factors [A(1), A(2)], l = 4, L = {L}", torch.stack([f1, f2]),
               show={"masks": f"fixed_factors(4, c=1) as [A(1), A(2)], L = {L}"})
    yield Case(f"fixed factors [A(2), A(1)], l = 4, L = {L}", torch.stack([f2, f1]),
               show={"masks": f"fixed_factors(4, c=1) as [A(2), A(1)], L = {L}"})
    L = draw(5, 8)
    nothing = torch.zeros(L, L, dtype=torch.bool)
    previous = torch.diag(torch.ones(L - 1, dtype=torch.bool), -1)
    yield Case(f"[itself only, previous token only], L = {L}", torch.stack([torch.eye(L, dtype=torch.bool), previous]),
               show={"masks": f"[M[i, i] only, M[i, i-1] only], L = {L}"})
    yield Case(f"[attends to nothing, previous token only], L = {L}", torch.stack([nothing, previous]),
               show={"masks": f"[nothing, M[i, i-1] only], L = {L}"})
    L = draw(20, 30)
    graph = torch.rand(L, L, generator=rng) < 0.08
    graph.fill_diagonal_(False)
    yield Case(f"a random graph without self-loops, L = {L}", graph, show={"masks": graph})
    L, hops = draw(12, 18), draw(2, 5)
    yield Case(f"a causal window of 1, L = {L}, max_hops={hops}", S.dense_mask(S.sliding_window(1, causal=True), L),
               max_hops=hops, show={"masks": f"sliding_window(1, causal=True), L = {L}", "max_hops": hops})
    yield Case("one token, L = 1", torch.ones(1, 1, dtype=torch.bool), show={"masks": [[True]]})


def _bfs(masks, max_hops=None, residual=True, right=False, patience=None, unreached=-1, ignore_max=False,
         overwrite=False, default_hops=None, first_layer=0):
    """The BFS with one step changed (the mistakes below)."""
    layers = masks if masks.dim() == 3 else masks[None]
    N, L = layers.shape[0], layers.shape[-1]
    default = L * N if default_hops is None else default_hops(L, N)
    max_hops = default if max_hops is None or ignore_max else max_hops
    eye = torch.eye(L, dtype=torch.bool)
    steps = (layers | eye).float() if residual else layers.float()
    seen = eye.float()
    dist = torch.full((L, L), -1, dtype=torch.int64)
    dist[eye] = 0
    quiet = 0
    for t in range(1, max_hops + 1):
        step = steps[(t - 1 + first_layer) % N]
        before = seen
        seen = ((seen @ step if right else step @ seen) > 0).float()
        fresh = (seen > 0) & (dist < 0)
        if overwrite:                                   # no visited set: every pair seen gets the latest level
            fresh = (seen > 0) & (before == 0)
            dist[seen > 0] = t
        else:
            dist[fresh] = t
        quiet = 0 if fresh.any() else quiet + 1
        if quiet >= (patience or N):
            break
    return dist.masked_fill(dist < 0, unreached)


_HOP_MISTAKES = {
    "dist[i, j] is how long before QUERY i has seen KEY j: information flows from j to i where M[i, j] is True, "
    "so the new layer multiplies from the left, (M | I) @ R; you have the transpose":
        lambda masks, max_hops=None: _bfs(masks, max_hops).T.contiguous(),
    "a pair that is never reached gets -1, not 0":
        lambda masks, max_hops=None: _bfs(masks, max_hops, unreached=0),
    "the residual stream is missing: use M_t | I for every layer, so a token keeps what it has seen even "
    "when its layer's mask has no diagonal":
        lambda masks, max_hops=None: _bfs(masks, max_hops, residual=False),
    "the layers are applied in the wrong order: R_t = (M_t | I) @ R_(t-1), the new layer on the LEFT "
    "(R_(t-1) @ M_t applies the first layer last)":
        lambda masks, max_hops=None: _bfs(masks, max_hops, right=True),
    "you stopped after one quiet level: stop only after N levels in a row (a whole cycle of layers) reach "
    "nothing new, since a layer that adds nothing can be followed by one that does":
        lambda masks, max_hops=None: _bfs(masks, max_hops, patience=1),
    "run at most max_hops levels: what is not reached by then stays -1":
        lambda masks, max_hops=None: _bfs(masks, max_hops, ignore_max=True),
    "keep the FIRST level at which a pair is reached: write dist only where it is still -1 (dist < 0), and the "
    "diagonal stays 0; you overwrote it at later levels":
        lambda masks, max_hops=None: _bfs(masks, max_hops, overwrite=True),
    "max_hops defaults to L * N, not L: with a cycle of N layer patterns each hop may wait up to N levels for "
    "the pattern it needs":
        lambda masks, max_hops=None: _bfs(masks, max_hops, default_hops=lambda L, N: L),
    "layer t = 1, 2, 3, ... uses masks[(t - 1) % N]: the first layer is masks[0]":
        lambda masks, max_hops=None: _bfs(masks, max_hops, first_layer=1),
    "return int64 distances: torch.full((L, L), -1, dtype=torch.int64)":
        lambda masks, max_hops=None: _bfs(masks, max_hops).float(),
}


TESTS = [
    HiddenTest(
        cell="ex1_dense_mask_test",
        function="dense_mask",
        cases=dense_mask_cases,
        driver=drive_dense_mask,
        reference=dense_mask_reference,
        blocked=[S.dense_mask, S._grid_mask, S.block_mask,
                 "torch.nn.attention.flex_attention:create_mask",
                 "torch.nn.attention.flex_attention:create_block_mask"],
        mistakes={
            "Lk=None only means Lk = Lq: take Lk key positions (columns) when it is given":
                _wrong_dense(_dense_keys_are_queries),
            "q_idx and kv_idx went in swapped: call mask_mod(b, h, q_idx, kv_idx) with the queries as rows (Lq, 1) "
            "and the keys as columns (1, Lk)":
                _wrong_dense(_dense_swapped),
            "without B and H return a 2-D (Lq, Lk) mask (batch 0, head 0), not (1, 1, Lq, Lk)":
                _wrong_dense(_dense_always_4d),
            "a mask_mod that ignores an index returns a smaller shape: broadcast the result to the full shape "
            "(torch.broadcast_to or .expand)":
                _wrong_dense(_dense_not_broadcast),
            "h must hold the head indices, torch.arange(H) shaped (1, H, 1, 1): every head has its own mask":
                _wrong_dense(_dense_head_zero),
            "b must hold the batch indices, torch.arange(B) shaped (B, 1, 1, 1): every sequence has its own mask":
                _wrong_dense(_dense_batch_zero),
            "return the mask_mod's boolean values as they are (dtype torch.bool): no .float() or .int()":
                _wrong_dense(_dense_float),
        },
        hint="evaluate mask_mod once on int64 index grids b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, Lq, 1), "
             "kv_idx (1, 1, 1, Lk), broadcast to (B, H, Lq, Lk) and return [0, 0] when B and H are None",
    ),
    HiddenTest(
        cell="ex2_sliding_window_test",
        function="sliding_window",
        cases=sliding_window_cases,
        driver=drive_mask_mod,
        reference=sliding_window_reference,
        blocked=[S.sliding_window, S.local_blocks, S.longformer, S.etc, S.strided, S.strided_factors],
        mistakes={text: _wrong_window(rule) for text, rule in _WINDOW_MISTAKES.items()},
        hint="causal: (i - j >= 0) & (i - j <= window); bidirectional: |i - j| <= window // 2; raise ValueError "
             "in the factory for window < 1 or an odd bidirectional window",
    ),
    HiddenTest(
        cell="ex3_longformer_test",
        function="longformer",
        cases=longformer_cases,
        driver=drive_mask_mod,
        reference=longformer_reference,
        blocked=[S.longformer, S.sliding_window, S.etc, S.bigbird, S.strided, S.strided_factors, S.union,
                 S.intersection],
        mistakes={text: _wrong_longformer(spec) for text, spec in _LONGFORMER_MISTAKES.items()},
        hint="local: |i - j| <= dilation * window // 2 (causal: 0 <= i - j <= dilation * window) and "
             "(i - j) % dilation == 0; global: (q_idx < n_global) | (kv_idx < n_global); causal: & (kv_idx <= q_idx) "
             "on everything",
    ),
    HiddenTest(
        cell="ex4_hop_distances_test",
        function="hop_distances",
        cases=hop_distances_cases,
        reference=hop_distances_reference,
        blocked=[S.hop_distances, S.reachability, S.diameter, S.receptive_field, S.path, S._hop_matrices],
        mistakes=_HOP_MISTAKES,
        hint="R_0 = I; R_t = ((M_t | I) @ R_(t-1)) > 0 with M_t = masks[(t - 1) % N]; dist = the first t where "
             "R_t[i, j] is True, 0 on the diagonal, -1 if never within max_hops (default L * N); stop after N "
             "quiet levels in a row; int64",
    ),
]
