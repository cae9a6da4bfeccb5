"""Hidden tests of lecture 12, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's functions and classes that contain it) does not exist. See
``autograder/hidden.py``. The cases vary what the exercises state and the visible tests check:
shapes, dtypes, all-zero weights, values on the rounding and clip boundaries, integer
activations, leading axes, rows without +-1, an initial state, the empty sequence; the
multiplications of the addition-only layer are counted in the learner's process.
"""

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import ssm
from transformer_lab import ternary as T

# --------------------------------------------------------------------------- ex1: absmean_quantize


def absmean_reference(w):
    return T.weight_quant(w)


def absmean_cases(rng):
    w = torch.randn(9, 13, generator=rng) * 0.05
    yield Case("(9, 13) float32, N(0, 0.05^2)", w)
    w = torch.randn(32, 8, generator=rng, dtype=torch.float64)
    w[0, :4] *= 40  # a few outliers: the mean barely moves, the max would
    yield Case("(32, 8) float64 with four large outliers in row 0", w)
    w = torch.rand(4, 6, generator=rng) * 2 - 1
    w[2] *= 0.01  # a row of tiny weights: per-row scales would blow it up
    yield Case("(4, 6) uniform in [-1, 1), row 2 a hundred times smaller", w)
    yield Case("all zeros (5, 3): scale 1e-5, zeros, no NaN", torch.zeros(5, 3))
    yield Case("(1, 1) one weight -0.3", torch.tensor([[-0.3]], dtype=torch.float64))
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [1.0, -1.0, 0.75, 1.25]])  # mean |W| = 1 exactly
    yield Case("weights exactly at +-Gamma_W / 2 and +-1.5 Gamma_W (torch.round: half to even)", w)
    w = torch.randn(2, 3, 4, generator=rng)
    yield Case("a 3-D weight (2, 3, 4): the scale is still one per tensor", w)


def _abs_absmax(w):
    s = w.abs().max().clamp(min=1e-5)
    return torch.round(w / s).clamp(-1, 1), s


def _abs_per_row(w):
    s = w.abs().mean(dim=-1, keepdim=True).clamp(min=1e-5)
    return torch.round(w / s).clamp(-1, 1), s


def _abs_no_clip(w):
    s = w.abs().mean().clamp(min=1e-5)
    return torch.round(w / s), s


def _abs_sign(w):
    return torch.sign(w), w.abs().mean().clamp(min=1e-5)


def _abs_trunc(w):
    s = w.abs().mean().clamp(min=1e-5)
    return torch.trunc(w / s).clamp(-1, 1), s


def _abs_half_up(w):
    s = w.abs().mean().clamp(min=1e-5)
    return torch.floor(w / s + 0.5).clamp(-1, 1), s


def _abs_plus_eps(w):
    s = w.abs().mean() + 1e-5
    return torch.round(w / s).clamp(-1, 1), s


def _abs_no_floor(w):
    s = w.abs().mean()
    return torch.round(w / s).clamp(-1, 1), s


# --------------------------------------------------------------------------- ex2: round_clip_ste


def drive_ste(fn, v, lo, hi, upstream):
    leaf = v.clone().requires_grad_(True)
    out = fn(leaf, lo, hi)
    if out.requires_grad:
        out.backward(upstream)
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(v)
    return out.detach(), grad


def ste_reference(v, lo, hi, upstream):
    value = torch.round(v).clamp(lo, hi)
    inside = ((v >= lo) & (v <= hi)).to(v.dtype)
    return value, upstream * inside


def ste_cases(rng):
    v = torch.tensor([-3.0, -2.0, -1.5, -0.5, 0.5, 1.49, 2.0, 2.5, 7.0])
    up = torch.rand(9, generator=rng) + 0.5
    yield Case("boundaries and halves, lo = -2, hi = 2 (2.0 and -2.0 are inside)", v, -2, 2, up,
               show={"v": v, "lo": -2, "hi": 2})
    v = torch.randn(4, 6, generator=rng, dtype=torch.float64) * 3
    up = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    yield Case("(4, 6) float64, lo = -1, hi = 1, random upstream gradient", v, -1, 1, up)
    v = torch.rand(3, 5, generator=rng) * 300 - 150
    up = torch.randn(3, 5, generator=rng)
    yield Case("(3, 5) float32, the 8-bit range lo = -128, hi = 127", v, -128, 127, up)
    v = torch.randn(7, generator=rng) * 4
    yield Case("lo = 0, hi = 3 (not symmetric)", v, 0, 3, torch.ones(7))
    yield Case("lo = hi = 1 must raise ValueError", torch.randn(3, generator=rng), 1, 1, torch.ones(3),
               raises=ValueError)
    yield Case("lo = 2 > hi = -2 must raise ValueError", torch.randn(3, generator=rng), 2, -2, torch.ones(3),
               raises=ValueError)


def _ste_none(v, lo, hi, upstream):
    return torch.round(v).clamp(lo, hi), torch.zeros_like(v)


def _ste_unclipped(v, lo, hi, upstream):
    return torch.round(v).clamp(lo, hi), upstream.clone()


def _ste_clip_after_round(v, lo, hi, upstream):
    r = torch.round(v)
    return r.clamp(lo, hi), upstream * ((r >= lo) & (r <= hi)).to(v.dtype)


def _ste_no_round(v, lo, hi, upstream):
    return v.clamp(lo, hi), upstream * ((v >= lo) & (v <= hi)).to(v.dtype)


def _ste_exclusive(v, lo, hi, upstream):
    return torch.round(v).clamp(lo, hi), upstream * ((v > lo) & (v < hi)).to(v.dtype)


# --------------------------------------------------------------------------- ex3: addition_only_linear


def drive_additions(fn, x, w_ternary):
    import math

    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear",
               "_int_mm", "einsum", "tensordot", "_sparse_mm", "_sparse_addmm"}
    convolutions = {"convolution", "_convolution", "convolution_overrideable", "conv1d", "conv2d", "conv3d",
                    "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution",
                    "_slow_conv2d_forward", "slow_conv3d_forward", "thnn_conv2d"}
    elementwise = {"mul", "div", "pow", "addcmul", "addcdiv", "mean", "prod", "cumprod", "floor_divide",
                   "true_divide", "multiply", "divide", "square", "xlogy", "lerp", "addr", "remainder", "fmod"}

    class Count(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls):
            return False  # no torch._disable_dynamo wrapper: its first call imports torch._dynamo (seconds)

        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in matmuls:
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1]
                k = mats[-2].shape[-1] if len(mats) >= 2 else 1
                self.n += int(out.numel()) * int(k) if isinstance(out, torch.Tensor) else 1
            elif name in convolutions:
                self.n += int(out.numel()) * int(args[1][0].numel())
            elif name == "_trilinear":  # F.bilinear
                self.n += 2 * math.prod(max(a.numel(), 1) for a in args[:3])
            elif name in ("_embedding_bag", "_embedding_bag_forward_only"):
                weights = args[6] if len(args) > 6 else kwargs.get("per_sample_weights")
                if isinstance(weights, torch.Tensor):
                    self.n += int(weights.numel()) * int(args[0].shape[-1])
            elif name in elementwise:
                self.n += int(out.numel()) if isinstance(out, torch.Tensor) else 1
            return out

    counter = Count()
    with counter:
        y = fn(x, w_ternary)
    return y, counter.n


def additions_reference(x, w_ternary):
    if x.is_floating_point():
        return x @ w_ternary.to(x.dtype).T, 0
    return x.long() @ w_ternary.long().T, 0


def additions_cases(rng):
    w = torch.randint(-1, 2, (10, 17), generator=rng).float()
    w[4] = 0
    x = torch.randn(2, 3, 17, generator=rng)
    yield Case("x (2, 3, 17) float32, w (10, 17) float with an all-zero row 4", x, w)
    w = torch.randint(-1, 2, (5, 33), generator=rng, dtype=torch.int8)
    x = torch.randint(-128, 128, (6, 33), generator=rng, dtype=torch.int8)
    yield Case("int8 x (6, 33) over the full int8 range, int8 w: int64 and exact", x, w)
    w = torch.randint(-1, 2, (7, 12), generator=rng).double()
    w[0] = 1
    w[1] = -1
    x = torch.randn(4, 12, generator=rng, dtype=torch.float64) * 10
    yield Case("float64 x (4, 12), w with an all +1 row 0 and an all -1 row 1", x, w)
    w = torch.randint(-1, 2, (3, 8), generator=rng).long()
    x = torch.randint(-1000, 1000, (8,), generator=rng)
    yield Case("a single int64 token x (8,) (no batch axis), int64 w (3, 8)", x, w)
    yield Case("x (2, 5) with w (3, 6) must raise ValueError", torch.randn(2, 5, generator=rng),
               torch.zeros(3, 6), raises=ValueError)


def _add_matmul(x, w_ternary):
    y, _ = additions_reference(x, w_ternary)
    return y, x[..., :1].numel() * w_ternary.numel()


def _add_swapped(x, w_ternary):
    y, n = additions_reference(x, w_ternary)
    return -y, n


def _add_plus_only(x, w_ternary):
    return additions_reference(x, (w_ternary == 1).to(w_ternary.dtype))


def _add_both_added(x, w_ternary):
    return additions_reference(x, (w_ternary != 0).to(w_ternary.dtype))


def _add_int8_wrap(x, w_ternary):
    y, n = additions_reference(x, w_ternary)
    return (y.to(x.dtype) if x.dtype == torch.int8 else y), n


def _add_float_for_ints(x, w_ternary):
    y, n = additions_reference(x, w_ternary)
    return (y.float() if not x.is_floating_point() else y), n


# --------------------------------------------------------------------------- ex4: mlgru_recurrence


def mlgru_reference(f_pre, c_pre, g_pre, h0=None):
    f = torch.sigmoid(f_pre)
    B, L, d = f_pre.shape
    h = torch.zeros(B, d, dtype=f_pre.dtype) if h0 is None else h0
    if L == 0:
        return torch.zeros_like(f_pre), h
    hs = ssm.sequential_scan(f, (1 - f) * F.silu(c_pre), h)
    return torch.sigmoid(g_pre) * hs, hs[:, -1]


def mlgru_cases(rng):
    f, c, g = (torch.randn(2, 6, 4, generator=rng) for _ in range(3))
    yield Case("(B, L, d_model) = (2, 6, 4) float32, h0 None", f, c, g)
    f, c, g = (torch.randn(3, 5, 7, generator=rng, dtype=torch.float64) * 2 for _ in range(3))
    h0 = torch.randn(3, 7, generator=rng, dtype=torch.float64)
    yield Case("(3, 5, 7) float64 with h0", f, c, g, h0)
    f = torch.full((1, 8, 2), 6.0)  # forget gate ~1: the state barely moves from h0
    c, g = torch.randn(1, 8, 2, generator=rng), torch.randn(1, 8, 2, generator=rng)
    yield Case("forget gate near 1 (f_pre = 6) with h0 = [3, -2]: the state stays near h0", f, c, g,
               torch.tensor([[3.0, -2.0]]))
    f, c, g = (torch.randn(2, 1, 3, generator=rng) for _ in range(3))
    yield Case("L = 1", f, c, g, torch.randn(2, 3, generator=rng))
    f = torch.full((2, 40, 3), -20.0)  # forget gate ~2e-9: the state follows the candidate
    c, g = torch.randn(2, 40, 3, generator=rng), torch.randn(2, 40, 3, generator=rng)
    yield Case("forget gate near 0 (f_pre = -20) over L = 40: a closed form dividing by the product of the gates "
               "overflows; the loop does not", f, c, g)
    yield Case("L = 0 with h0: y empty (2, 0, 3), h_last = h0", torch.zeros(2, 0, 3), torch.zeros(2, 0, 3),
               torch.zeros(2, 0, 3), torch.randn(2, 3, generator=rng))


def _mlgru_from(f, c, g, h0, update, cand=F.silu, gate_out=True, last_y=False):
    B, L, d = f.shape
    h = torch.zeros(B, d, dtype=f.dtype) if h0 is None else h0
    fs, cs, gs = torch.sigmoid(f), cand(c), torch.sigmoid(g)
    ys = []
    for t in range(L):
        h = update(fs[:, t], h, cs[:, t])
        ys.append(gs[:, t] * h if gate_out else h)
    y = torch.stack(ys, 1) if ys else torch.zeros_like(f)
    return y, (y[:, -1] if last_y and L else h)


def _mlgru_correct(ft, h, ct):
    return ft * h + (1 - ft) * ct


def _mlgru_swapped(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, lambda ft, h, ct: (1 - ft) * h + ft * ct)


def _mlgru_no_one_minus(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, lambda ft, h, ct: ft * h + ct)


def _mlgru_tanh(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, _mlgru_correct, cand=torch.tanh)


def _mlgru_sigmoid_cand(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, _mlgru_correct, cand=torch.sigmoid)


def _mlgru_no_gate(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, _mlgru_correct, gate_out=False)


def _mlgru_last_is_y(f_pre, c_pre, g_pre, h0=None):
    return _mlgru_from(f_pre, c_pre, g_pre, h0, _mlgru_correct, last_y=True)


def _mlgru_y_before_update(f_pre, c_pre, g_pre, h0=None):
    B, L, d = f_pre.shape
    h = torch.zeros(B, d, dtype=f_pre.dtype) if h0 is None else h0
    fs, cs, gs = torch.sigmoid(f_pre), F.silu(c_pre), torch.sigmoid(g_pre)
    ys = []
    for t in range(L):
        ys.append(gs[:, t] * h)
        h = fs[:, t] * h + (1 - fs[:, t]) * cs[:, t]
    return (torch.stack(ys, 1) if ys else torch.zeros_like(f_pre)), h


def _mlgru_raw(f_pre, c_pre, g_pre, h0=None):
    B, L, d = f_pre.shape
    h = torch.zeros(B, d, dtype=f_pre.dtype) if h0 is None else h0
    cs, gs = F.silu(c_pre), torch.sigmoid(g_pre)
    ys = []
    for t in range(L):
        h = f_pre[:, t] * h + (1 - f_pre[:, t]) * cs[:, t]
        ys.append(gs[:, t] * h)
    return (torch.stack(ys, 1) if ys else torch.zeros_like(f_pre)), h


def _mlgru_ignores_h0(f_pre, c_pre, g_pre, h0=None):
    y, h = _mlgru_from(f_pre, c_pre, g_pre, None, _mlgru_correct)
    return y, h


TESTS = [
    HiddenTest(
        cell="ex1_absmean_quantize_test",
        function="absmean_quantize",
        cases=absmean_cases,
        reference=absmean_reference,
        outputs=("w_ternary", "scale"),
        blocked=[T.weight_quant, T.BitLinear, T.round_clip, T.round_clip_ste, T.RoundClipSTE],
        unchanged=True,
        mistakes={
            "the absmax scale: Gamma_W is the MEAN of |W| (absmean), not its maximum":
                _abs_absmax,
            "one scale per row: Gamma_W is one number for the whole tensor, w.abs().mean()":
                _abs_per_row,
            "no clip: round(W / Gamma_W) can be 2 or more; clamp it to [-1, 1]":
                _abs_no_clip,
            "sign(W) has no zeros: weights with |W| < Gamma_W / 2 must round to 0":
                _abs_sign,
            "truncation instead of rounding: use torch.round (0.7 rounds to 1)":
                _abs_trunc,
            "an all-zero weight divides 0 by 0: floor the scale with clamp(min=1e-5)":
                _abs_no_floor,
            "rounded half up (floor(v + 0.5)): torch.round rounds half to even, so W / Gamma_W = 0.5 gives 0":
                _abs_half_up,
            "1e-5 was added to the scale: floor it with clamp(min=1e-5) instead (it only matters for an all-zero weight)":
                _abs_plus_eps,
        },
        hint="Gamma_W = w.abs().mean().clamp(min=1e-5) (0-d), W^ = round(W / Gamma_W).clamp(-1, 1) in w's dtype",
    ),
    HiddenTest(
        cell="ex2_round_clip_ste_test",
        function="round_clip_ste",
        cases=ste_cases,
        reference=ste_reference,
        driver=drive_ste,
        outputs=("value", "gradient"),
        blocked=[T.round_clip_ste, T.RoundClipSTE, T.ste, T.round_clip, T.weight_quant, T.activation_quant],
        unchanged=True,
        mistakes={
            "no straight-through estimator: round() has zero gradient, so v gets none; "
            "return clipped + (round(clipped) - clipped).detach()":
                _ste_none,
            "the gradient is 1 everywhere (the plain STE): clamp v first, so that values outside [lo, hi] "
            "get gradient 0":
                _ste_unclipped,
            "clipped after rounding: the gradient must be 0 where v itself is outside [lo, hi], "
            "even when round(v) is inside; clamp v first, then round":
                _ste_clip_after_round,
            "the value is not rounded: the forward must give round(clip(v)), integers":
                _ste_no_round,
            "the boundaries lo and hi are inside the range: gradient 1 where lo <= v <= hi":
                _ste_exclusive,
        },
        hint="value round(v) clipped to [lo, hi]; gradient 1 where lo <= v <= hi, 0 outside; ValueError if lo >= hi",
    ),
    HiddenTest(
        cell="ex3_addition_only_linear_test",
        function="addition_only_linear",
        cases=additions_cases,
        reference=additions_reference,
        driver=drive_additions,
        outputs=("y", "multiplications"),
        blocked=[T.addition_only_linear, T.bitlinear_inference, T.ternary_indices, T.BitLinear],
        unchanged=True,
        atol=1e-5, rtol=1e-5,
        mistakes={
            "the result is right but your code multiplies (a matmul, F.linear, einsum or *): "
            "select the inputs with torch.where or indexing and add them":
                _add_matmul,
            "the signs are swapped: add the inputs where the weight is +1, subtract where it is -1":
                _add_swapped,
            "the -1 entries were ignored: subtract the sum of the inputs where the weight is -1":
                _add_plus_only,
            "the -1 entries were added: subtract them":
                _add_both_added,
            "integer x must give an int64 result (sum the integers; do not convert to float; a float fill value, "
            "torch.where(mask, x, 0.), also turns integer x into float: fill with 0 or torch.zeros((), dtype=x.dtype))":
                _add_float_for_ints,
            "the sums were kept in int8 and wrapped around: .sum() without dtype= returns int64":
                _add_int8_wrap,
        },
        hint="y_j = sum of x_i where w[j, i] = 1 minus sum where w[j, i] = -1, over the last axis of x, "
             "with no multiplication; int64 for integer x, x's dtype otherwise",
    ),
    HiddenTest(
        cell="ex4_mlgru_recurrence_test",
        function="mlgru_recurrence",
        cases=mlgru_cases,
        reference=mlgru_reference,
        outputs=("y", "h_last"),
        blocked=[T.MLGRU, T.MatMulFreeBlock, T.MatMulFreeLM, ssm.sequential_scan, ssm.parallel_scan,
                 ssm.selective_scan, ssm.selective_scan_step, torch.cumprod, torch.cumsum, torch.logcumsumexp,
                 torch.Tensor.cumprod, torch.Tensor.cumsum, torch.Tensor.logcumsumexp],
        unchanged=True,
        mistakes={
            "swapped gates: h_t = f_t h_{t-1} + (1 - f_t) c_t (the forget gate keeps the old state)":
                _mlgru_swapped,
            "the (1 - f_t) factor on the candidate is missing":
                _mlgru_no_one_minus,
            "the candidate is SiLU(c_pre) (F.silu), not tanh (the classic GRU's)":
                _mlgru_tanh,
            "the candidate is SiLU(c_pre) (F.silu), not sigmoid":
                _mlgru_sigmoid_cand,
            "y_t = g_t * h_t: the output gate sigmoid(g_pre) is missing":
                _mlgru_no_gate,
            "h_last is the state h_L, not the last output g_L * h_L":
                _mlgru_last_is_y,
            "h0 was ignored: start the recurrence from h0 when it is given":
                _mlgru_ignores_h0,
            "y_t = g_t h_t uses the state after this step's update; you used h_{t-1} (update h first, then y_t)":
                _mlgru_y_before_update,
            "the forget gate is f_t = sigmoid(f_pre), not f_pre itself":
                _mlgru_raw,
        },
        hint="f = sigmoid(f_pre), c = SiLU(c_pre), g = sigmoid(g_pre); h_t = f_t h_{t-1} + (1 - f_t) c_t from h0 "
             "(zeros if None); return (g * h for every t, h_L)",
    ),
]
