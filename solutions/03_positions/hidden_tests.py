"""Hidden tests of lecture 03, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with
the library's reference here, and runs the learner's function in a sandboxed process
where that reference (and the library's helpers for it) does not exist. See
``autograder/hidden.py``.
"""

import importlib.util
import math

import torch
from autograder.hidden import Case, HiddenTest

from transformer_lab import positions

# --------------------------------------------------------------------------- ex1: sinusoidal_encoding


def sinusoidal_reference(length, d_model, base=10000.0):
    return positions.sinusoidal_encoding(length, d_model, base=base, dtype=torch.float32)


def sinusoidal_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    for length, d_model, base in [(1, 2, 10000.0), (3, 4, 10000.0),
                                  (draw(60, 200), 2 * draw(4, 40), 10000.0),
                                  (draw(10, 40), 2 * draw(2, 10), 100.0)]:
        yield Case(f"length={length}, d_model={d_model}, base={base}", length, d_model, base=base)


def _angles(length, d_model, base, two_i=None):
    """(length, d_model/2) angles p * base**(-two_i / d_model), in float64."""
    p = torch.arange(length, dtype=torch.float64)[:, None]
    if two_i is None:
        two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    return p * base ** (-two_i[None, :] / d_model)


def _interleave(first, second):
    return torch.stack((first, second), dim=-1).flatten(-2).float()


def _sin_sines_first(length, d_model, base=10000.0):
    a = _angles(length, d_model, base)
    return torch.cat((a.sin(), a.cos()), dim=-1).float()


def _sin_cos_first(length, d_model, base=10000.0):
    a = _angles(length, d_model, base)
    return _interleave(a.cos(), a.sin())


def _sin_no_two(length, d_model, base=10000.0):
    a = _angles(length, d_model, base, two_i=torch.arange(d_model // 2, dtype=torch.float64))
    return _interleave(a.sin(), a.cos())


def _sin_column_exponent(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    a = p * base ** (-torch.arange(d_model, dtype=torch.float64)[None, :] / d_model)  # column j: base**(-j/d)
    return torch.where(torch.arange(d_model) % 2 == 0, a.sin(), a.cos()).float()


def _sin_ignores_base(length, d_model, base=10000.0):
    return sinusoidal_reference(length, d_model, 10000.0)


def _sin_float64(length, d_model, base=10000.0):
    return positions.sinusoidal_encoding(length, d_model, base=base, dtype=torch.float64)


# --------------------------------------------------------------------------- ex2: t5_bucket

# Hugging Face's T5 has the exercise as one static method: blocked where transformers is installed
# (it is not a course dependency; find_spec does not import it). Other HF models copy the function
# (mT5, LongT5, ...): not blocked.
HF_T5_BUCKET = (["transformers.models.t5.modeling_t5:T5Attention._relative_position_bucket"]
                if importlib.util.find_spec("transformers") is not None else [])


def t5_reference(rel, bidirectional=True, num_buckets=32, max_distance=128):
    return positions.t5_bucket(rel, bidirectional, num_buckets, max_distance)


def t5_cases(rng):
    L = int(torch.randint(40, 150, (1,), generator=rng))
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]            # (L, L): j - i
    far = torch.randint(-3000, 3001, (60,), generator=rng)              # offsets far in both directions
    # every setting below gives the same buckets whether the log is taken in float32 or float64
    yield Case(f"rel = j - i of a {L}-token sequence ({L}, {L}), bidirectional, 32 buckets, max_distance 128", rel)
    yield Case(f"rel = j - i ({L}, {L}), bidirectional=False (causal), 32 buckets, max_distance 128", rel,
               bidirectional=False)
    yield Case("60 offsets in [-3000, 3000], bidirectional, num_buckets=16, max_distance=50", far,
               bidirectional=True, num_buckets=16, max_distance=50)
    yield Case("60 offsets in [-3000, 3000], causal, num_buckets=64, max_distance=256", far,
               bidirectional=False, num_buckets=64, max_distance=256)
    yield Case("offsets -60 .. 60, bidirectional, num_buckets=24, max_distance=100", torch.arange(-60, 61),
               bidirectional=True, num_buckets=24, max_distance=100)


def _t5_with(rel, bidirectional=True, num_buckets=32, max_distance=128, *, flip=False, halve=True,
             future_offset=True, future_ge=False, flag_inverted=False, clamp=True, causal_abs=False,
             causal_no_clamp=False, exact_before_halving=False, n_e_quarter=False, no_exact=False,
             no_n_e=False, log_of_max_only=False, log_delta=False, span_minus1=False, rounding="floor",
             integer_ratio=False, as_float=False):
    """T5's bucket function with one step changed (what a learner's mistake computes)."""
    if flag_inverted:
        bidirectional = not bidirectional
    n = (rel if flip else -rel).long()  # i - j (flip: j - i)
    ret = torch.zeros_like(n)
    n_b = num_buckets
    if bidirectional:
        if halve:
            n_b //= 2
        if future_offset:
            ret = ret + ((n <= 0) if future_ge else (n < 0)).long() * n_b
        n = n.abs()
    elif causal_abs:
        n = n.abs()
    elif not causal_no_clamp:
        n = n.clamp(min=0)
    n_e = num_buckets // 2 if exact_before_halving else num_buckets // 4 if n_e_quarter else n_b // 2
    # below n_e the exact bucket is taken (unless the exact range is missing): the log is not read there
    ratio = (n if no_exact else n.clamp(min=n_e)).float() / (1 if log_delta else n_e)
    if integer_ratio:
        ratio = ratio.floor()
    den = math.log(max_distance) if log_of_max_only else math.log(max_distance / n_e)
    val = torch.log(ratio) / den * (n_b - n_e - (1 if span_minus1 else 0))
    val = {"floor": val, "round": val.round(), "ceil": val.ceil()}[rounding]
    large = (0 if no_n_e else n_e) + val.long()
    if clamp:
        large = large.clamp(max=n_b - 1)
    out = ret + (large if no_exact else torch.where(n < n_e, n, large))
    return out.float() if as_float else out


def _t5_mistake(**changed):
    def wrong(rel, bidirectional=True, num_buckets=32, max_distance=128):
        return _t5_with(rel, bidirectional, num_buckets, max_distance, **changed)
    return wrong


def _t5_defaults_only(rel, bidirectional=True, num_buckets=32, max_distance=128):
    return positions.t5_bucket(rel, bidirectional, 32, 128)


# --------------------------------------------------------------------------- ex3: apply_rope


def rope_cases(rng):
    x4 = torch.randn(2, 3, 7, 16, generator=rng, dtype=torch.float64)  # (B, H, L, D), float64
    offset = int(torch.randint(1, 200, (1,), generator=rng))
    x1 = torch.randn(1, 6, generator=rng)                               # L = 1
    x2 = torch.randn(4, 9, 2, generator=rng)                            # D = 2, a batch axis
    x5 = torch.randn(1, 5, 8, generator=rng)                            # a batch of one: x.shape[0] is not L
    # first a case where every listed mistake shows (an offset, another base, float64)
    yield Case(f"x (2, 3, 7, 16) (B, H, L, D), float64, offset={offset}, base=500.0", x4,
               offset=offset, base=500.0)
    yield Case(f"x (2, 3, 7, 16) (B, H, L, D), float64, offset={offset}", x4, offset=offset)
    yield Case("x (2, 3, 7, 16), float64, base=500.0", x4, base=500.0)
    yield Case("x (1, 6) (L = 1), float32, offset=5", x1, offset=5)
    yield Case("x (4, 9, 2) (D = 2, a batch axis), float32", x2)
    yield Case("x (1, 5, 8) (a batch of one), float32, offset=3", x5, offset=3)


def _rope_pairs(x, offset, base, pairs, sign=1.0, work=None):
    """RoPE with the given pair layout ("neighbours" or "halves"), rotation sign, angle dtype."""
    L, D = x.shape[-2], x.shape[-1]
    work = work or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    p = torch.arange(offset, offset + L, dtype=work)[:, None]
    angle = p * base ** (-torch.arange(0, D, 2, dtype=work)[None, :] / D)
    cos, sin = angle.cos(), sign * angle.sin()
    if x.dtype != torch.float64 or work == torch.float64:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if pairs == "halves":
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _rope_rotate_half(x, offset=0, base=10000.0):
    return _rope_pairs(x, offset, base, "halves")


def _rope_clockwise(x, offset=0, base=10000.0):
    return _rope_pairs(x, offset, base, "neighbours", sign=-1.0)


def _rope_no_offset(x, offset=0, base=10000.0):
    return positions.apply_rope(x, 0, base)


def _rope_ignores_base(x, offset=0, base=10000.0):
    return positions.apply_rope(x, offset, 10000.0)


def _rope_no_two(x, offset=0, base=10000.0):
    L, D = x.shape[-2], x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.arange(offset, offset + L, dtype=work)[:, None]
    angle = p * base ** (-torch.arange(D // 2, dtype=work)[None, :] / D)  # i, not 2i
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _rope_float32_angles(x, offset=0, base=10000.0):
    return _rope_pairs(x, offset, base, "neighbours", work=torch.float32)


def _rope_sin_cos_swapped(x, offset=0, base=10000.0):
    L, D = x.shape[-2], x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.arange(offset, offset + L, dtype=work)[:, None]
    angle = p * base ** (-torch.arange(0, D, 2, dtype=work)[None, :] / D)
    cos, sin = angle.sin().to(x.dtype), angle.cos().to(x.dtype)  # swapped
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# --------------------------------------------------------------------------- ex4: alibi_slopes


def alibi_slopes_reference(n_heads):
    return positions.alibi_slopes(n_heads, dtype=torch.float32)


def alibi_slopes_cases(rng):
    extra = [int(v) for v in torch.randint(9, 100, (3,), generator=rng)]
    for n in [2, 3, 5, 7, 12, 16, 24, 32, 48, *extra]:
        kind = "a power of two" if n & (n - 1) == 0 else "not a power of two"
        yield Case(f"n_heads={n} ({kind})", n)


def _pow2(n, first=1):
    start = 2.0 ** (-8.0 / n)
    return [start ** h for h in range(first, n + first)]


def _slopes_with(n, first=1, take=slice(0, None, 2), extras_first=False):
    """Press et al.'s recipe with one step changed."""
    if n & (n - 1) == 0:
        return _pow2(n, first)
    n0 = 2 ** int(math.floor(math.log2(n)))
    extra = _slopes_with(2 * n0, first, take, extras_first)[take][: n - n0]
    base = _slopes_with(n0, first, take, extras_first)
    return extra + base if extras_first else base + extra


def _slopes_h_from_0(n_heads):
    return torch.tensor(_slopes_with(n_heads, first=0), dtype=torch.float32)


def _slopes_odd_ones(n_heads):
    return torch.tensor(_slopes_with(n_heads, take=slice(1, None, 2)), dtype=torch.float32)


def _slopes_extras_first(n_heads):
    return torch.tensor(_slopes_with(n_heads, extras_first=True), dtype=torch.float32)


def _slopes_pow2_formula(n_heads):
    return torch.tensor(_pow2(n_heads), dtype=torch.float32)


def _slopes_truncated(n_heads):
    n1 = 1 << (n_heads - 1).bit_length()  # the power of two at or above n
    return torch.tensor(_pow2(n1)[:n_heads], dtype=torch.float32)


# --------------------------------------------------------------------------- ex5: alibi_bias


def alibi_bias_reference(n_heads, length, dtype=torch.float32):
    return positions.alibi_bias(n_heads, length, dtype=dtype)


def alibi_bias_cases(rng):
    H = int(torch.randint(9, 16, (1,), generator=rng))   # not a power of two
    L = int(torch.randint(20, 80, (1,), generator=rng))
    yield Case(f"n_heads={H} (not a power of two), length={L}, dtype=torch.float64", H, L,
               dtype=torch.float64)
    yield Case("n_heads=3, length=1", 3, 1)
    yield Case("n_heads=1, length=7", 1, 7)


def _bias_from(n_heads, length, dtype, dist, slopes=None):
    m = positions.alibi_slopes(n_heads, dtype=dtype) if slopes is None else slopes.to(dtype)
    return -m[:, None, None] * dist.to(dtype)[None]


def _signed(length, sign):
    pos = torch.arange(length)
    return sign * (pos[:, None] - pos[None, :])  # sign * (i - j)


def _bias_i_minus_j(n_heads, length, dtype=torch.float32):
    return _bias_from(n_heads, length, dtype, _signed(length, 1))


def _bias_j_minus_i(n_heads, length, dtype=torch.float32):
    return _bias_from(n_heads, length, dtype, _signed(length, -1))


def _bias_positive(n_heads, length, dtype=torch.float32):
    return -alibi_bias_reference(n_heads, length, dtype)


def _bias_pow2_slopes(n_heads, length, dtype=torch.float32):
    return _bias_from(n_heads, length, dtype, _signed(length, 1).abs(),
                      slopes=torch.tensor(_pow2(n_heads), dtype=torch.float64))


def _bias_float32(n_heads, length, dtype=torch.float32):
    return alibi_bias_reference(n_heads, length, torch.float32)


# --------------------------------------------------------------------------- more mistakes (issue 13's review)


def _sin_from_one(length, d_model, base=10000.0):
    a = _angles(length + 1, d_model, base)[1:]   # positions 1 .. length
    return _interleave(a.sin(), a.cos())


def _sin_positive_exponent(length, d_model, base=10000.0):
    a = _angles(length, d_model, 1.0 / base)     # p * base**(+2c/d_model)
    return _interleave(a.sin(), a.cos())


def _sin_half_width(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    a = p * base ** (-torch.arange(0, d_model, 2, dtype=torch.float64)[None, :] / (d_model // 2))
    return _interleave(a.sin(), a.cos())


def _rope_from_one(x, offset=0, base=10000.0):
    return positions.apply_rope(x, offset + 1, base)


def _rope_length_from_dim0(x, offset=0, base=10000.0):
    L, D = x.shape[0], x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.arange(offset, offset + L, dtype=work)[:, None]
    angle = p * base ** (-torch.arange(0, D, 2, dtype=work)[None, :] / D)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _slopes_ascending(n_heads):
    return torch.tensor(sorted(_slopes_with(n_heads)), dtype=torch.float32)


def _slopes_from_n0_again(n_heads):
    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(_pow2(n_heads), dtype=torch.float32)
    n0 = 2 ** int(math.floor(math.log2(n_heads)))
    return torch.tensor(_pow2(n0) + _pow2(n0)[0::2][: n_heads - n0], dtype=torch.float32)


def _slopes_continued(n_heads):
    n0 = 1 << (n_heads.bit_length() - 1)   # the power of two at or below n
    return torch.tensor([2.0 ** (-8.0 * h / n0) for h in range(1, n_heads + 1)], dtype=torch.float32)


def _bias_squared(n_heads, length, dtype=torch.float32):
    return _bias_from(n_heads, length, dtype, _signed(length, 1) ** 2)


def _bias_causal_inf(n_heads, length, dtype=torch.float32):
    pos = torch.arange(length)
    return alibi_bias_reference(n_heads, length, dtype).masked_fill(pos[None, :] > pos[:, None], float("-inf"))


def _bias_halving_slopes(n_heads, length, dtype=torch.float32):
    return _bias_from(n_heads, length, dtype, _signed(length, 1).abs(),
                      slopes=torch.tensor([2.0 ** -h for h in range(1, n_heads + 1)], dtype=torch.float64))


def _bias_key_position(n_heads, length, dtype=torch.float32):
    pos = torch.arange(length)
    return _bias_from(n_heads, length, dtype, pos[None, :].expand(length, length))


TESTS = [
    HiddenTest(
        cell="ex1_sinusoidal_test",
        function="sinusoidal_encoding",
        cases=sinusoidal_cases,
        reference=sinusoidal_reference,
        blocked=[positions.sinusoidal_encoding, positions.SinusoidalPositions,
                 positions._sinusoid, positions._inv_freq, positions.rope_angles],
        atol=5e-4, rtol=1e-3,
        mistakes={
            "sin and cos are interleaved (even columns sin, odd columns cos), not [all sines | all cosines]":
                _sin_sines_first,
            "sin and cos are swapped: column 2c holds the sine, column 2c+1 the cosine (row 0 is [0, 1, 0, 1, ...])":
                _sin_cos_first,
            "the exponent uses 2c, the even column index: omega_c = base**(-2c/d_model) for pair c, "
            "not base**(-c/d_model)":
                _sin_no_two,
            "both columns of a pair share one frequency: column 2c+1 (cos) uses the same omega_c = "
            "base**(-2c/d_model) as column 2c (sin), not base**(-(2c+1)/d_model)":
                _sin_column_exponent,
            "use the base argument instead of 10000":
                _sin_ignores_base,
            "return a float32 table (compute in float64 if you like, then .float())":
                _sin_float64,
            "row p is position p = 0, 1, ..., length - 1: the first row is position 0 (angles 0), not 1":
                _sin_from_one,
            "the exponent is negative: omega_c = base**(-2c/d_model), a frequency that falls with c (wavelengths "
            "from 2 pi up), not base**(+2c/d_model)":
                _sin_positive_exponent,
            "the exponent's denominator is d_model, the full width: omega_c = base**(-2c/d_model), not "
            "base**(-2c/(d_model/2))":
                _sin_half_width,
        },
        hint="PE[p, 2c] = sin(p * base**(-2c/d_model)), PE[p, 2c+1] = cos(the same angle): use the "
             "base argument, interleave sin (even columns) and cos (odd columns), return float32",
    ),
    HiddenTest(
        cell="ex2_t5_bucket_test",
        function="t5_bucket",
        cases=t5_cases,
        reference=t5_reference,
        blocked=[positions.t5_bucket, positions.T5Bias, *HF_T5_BUCKET],
        unchanged=True,
        mistakes={
            "the direction is reversed: rel = j - i, so a NEGATIVE rel is a key in the past (distance -rel, "
            "the lower half) and a positive one a key in the future":
                _t5_mistake(flip=True),
            "bidirectional: halve the buckets first (n_b = num_buckets // 2 per direction, n_e = n_b // 2)":
                _t5_mistake(halve=False),
            "bidirectional: a key in the future (rel > 0) gets n_b = num_buckets // 2 added to its bucket "
            "(the upper half)":
                _t5_mistake(future_offset=False),
            "the log bucket is not clamped: every distance from max_distance on lands in the last bucket, "
            "min(..., n_b - 1)":
                _t5_mistake(clamp=False),
            "causal: a key in the future counts as distance 0 (delta = max(-rel, 0)), not |rel|":
                _t5_mistake(causal_abs=True),
            "causal: clamp the distance at 0 (delta = max(-rel, 0)); a future key gave a negative bucket":
                _t5_mistake(causal_no_clamp=True),
            "n_e is half of n_b AFTER halving: n_e = (num_buckets // 2) // 2 when bidirectional":
                _t5_mistake(exact_before_halving=True),
            "the log's denominator is ln(max_distance / n_e), not ln(max_distance)":
                _t5_mistake(log_of_max_only=True),
            "the log bucket is rounded DOWN (.long() or floor), not to the nearest integer (round)":
                _t5_mistake(rounding="round"),
            "the log bucket is rounded DOWN (.long() or floor), not up (ceil)":
                _t5_mistake(rounding="ceil"),
            "divide in floating point: ln(delta / n_e) with delta.float() / n_e, not delta // n_e":
                _t5_mistake(integer_ratio=True),
            "use the num_buckets and max_distance arguments instead of 32 and 128":
                _t5_defaults_only,
            "bidirectional: offset 0 (the query itself) is in the lower half: only rel > 0 is a key in the "
            "future, so rel = 0 is bucket 0, not n_b":
                _t5_mistake(future_ge=True),
            "n_e = n_b // 2 with n_b the buckets of ONE direction: causal uses all num_buckets for the past, so "
            "n_e = num_buckets // 2 there, not num_buckets // 4":
                _t5_mistake(n_e_quarter=True),
            "the log range spreads over n_b - n_e buckets: n_e + floor(ln(delta / n_e) / ln(max_distance / n_e) "
            "* (n_b - n_e)), not * (n_b - n_e - 1)":
                _t5_mistake(span_minus1=True),
            "the log buckets come after the exact ones: add n_e, so distance n_e is bucket n_e "
            "(n_e + floor(...)), not 0":
                _t5_mistake(no_n_e=True),
            "distances below n_e are their own bucket (the exact range): torch.where(delta < n_e, delta, "
            "log bucket); the log formula is only for delta >= n_e":
                _t5_mistake(no_exact=True),
            "the bidirectional flag is read the wrong way round: bidirectional=True halves the buckets (upper "
            "half for the future), bidirectional=False (causal) gives all of them to the past":
                _t5_mistake(flag_inverted=True),
            "the log is of the ratio delta / n_e: ln(delta / n_e) / ln(max_distance / n_e), not ln(delta)":
                _t5_mistake(log_delta=True),
        },
        hint="direction (halves and + n_b for the future when bidirectional; delta = max(-rel, 0) when causal), "
             "exact buckets for delta < n_e = n_b // 2, then n_e + floor(ln(delta / n_e) / ln(max_distance / n_e) "
             "* (n_b - n_e)) at most n_b - 1; a long tensor",
    ),
    HiddenTest(
        cell="ex3_apply_rope_test",
        function="apply_rope",
        cases=rope_cases,
        reference=positions.apply_rope,
        blocked=[positions.apply_rope, positions.rope_angles, positions.RoPE],
        unchanged=True,
        mistakes={
            "pairs are NEIGHBOURS (x[..., 2c], x[..., 2c+1]), not x[..., c] and x[..., c + D/2] "
            "(that is GPT-NeoX's 'rotate-half' layout)":
                _rope_rotate_half,
            "the rotation turns the wrong way: (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a)":
                _rope_clockwise,
            "the offset is missing: row r of the sequence is at position offset + r":
                _rope_no_offset,
            "use the base argument instead of 10000":
                _rope_ignores_base,
            "the angle of pair c is p * base**(-2c/D), with 2c (the even column index), not c":
                _rope_no_two,
            "the angles were computed in float32: for a float64 x, build the positions and the "
            "frequencies in float64 (dtype=x.dtype) before cos and sin":
                _rope_float32_angles,
            "sin and cos are swapped: (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a)":
                _rope_sin_cos_swapped,
            "row r is at position offset + r: the first row is at position offset (0 by default, not "
            "rotated), not offset + 1":
                _rope_from_one,
            "x may have leading axes (B, H, L, D): the sequence length is x.shape[-2], not x.shape[0]":
                _rope_length_from_dim0,
        },
        hint="rotate the neighbour pairs (x[..., 2c], x[..., 2c+1]) counter-clockwise by the angle "
             "(offset + r) * base**(-2c/D) for row r; use the base argument, keep x's dtype (float64 "
             "angles for a float64 x), any leading axes",
    ),
    HiddenTest(
        cell="ex4_alibi_slopes_test",
        function="alibi_slopes",
        cases=alibi_slopes_cases,
        reference=alibi_slopes_reference,
        blocked=[positions.alibi_slopes, positions._alibi_slopes_list, positions.ALiBi,
                 positions.alibi_bias],
        atol=1e-7,
        mistakes={
            "h starts at 1: m_h = 2**(-8h/n) for h = 1..n (the first slope of 8 heads is 1/2, not 1)":
                _slopes_h_from_0,
            "the extra slopes are every other slope of the 2*n0 sequence starting with its FIRST "
            "([0::2]), not its second ([1::2])":
                _slopes_odd_ones,
            "keep the order: the n0 slopes of the power of two below n first, then the extra ones":
                _slopes_extras_first,
            "2**(-8h/n) is the recipe for n a power of two only; otherwise take the n0 slopes of the "
            "power of two n0 below n, then every other slope of the 2*n0 sequence":
                _slopes_pow2_formula,
            "not the first n slopes of the next power of two: take the n0 slopes of the power of two "
            "BELOW n, then every other slope of the 2*n0 sequence ([0::2]), as many as are missing":
                _slopes_truncated,
            "the slopes fall from head to head: the first head gets the steepest slope 2**(-8/n), the last "
            "the gentlest (keep the order, do not sort ascending)":
                _slopes_ascending,
            "the extra slopes come from the sequence of 2*n0 heads (the one between the slopes you have), not "
            "from the n0 heads again (that repeats slopes you already have)":
                _slopes_from_n0_again,
            "the extra slopes sit BETWEEN the ones you have (every other slope of the 2*n0 sequence), not past "
            "the gentlest one (continuing the n0 sequence: 2**(-8h/n0) for h > n0)":
                _slopes_continued,
        },
        hint="non-powers of two: the n0 slopes of the power of two n0 below n, then every other slope "
             "of the 2*n0 sequence starting with its first ([0::2]), as many as are missing; float32",
    ),
    HiddenTest(
        cell="ex5_alibi_bias_test",
        function="alibi_bias",
        cases=alibi_bias_cases,
        reference=alibi_bias_reference,
        blocked=[positions.alibi_bias, positions.relative_positions, positions.ALiBi],
        atol=1e-6, rtol=1e-4,
        mistakes={
            "the distance is |i - j|, not i - j: the bias is -m_h |i - j|, symmetric "
            "(bias[h, i, j] == bias[h, j, i]) and never positive":
                _bias_i_minus_j,
            "the distance is |i - j|, not j - i: the bias is -m_h |i - j|, symmetric "
            "(bias[h, i, j] == bias[h, j, i]) and never positive":
                _bias_j_minus_i,
            "the sign: the bias is -m_h |i - j| (a penalty), zero on the diagonal and negative elsewhere":
                _bias_positive,
            "the slopes for a head count that is not a power of two come from alibi_slopes "
            "(exercise 4), not from 2**(-8h/n)":
                _bias_pow2_slopes,
            "return the requested dtype: build the distances and the slopes in dtype (or .to(dtype) "
            "the result)":
                _bias_float32,
            "the penalty is linear in the distance: -m_h |i - j|, not -m_h (i - j)**2":
                _bias_squared,
            "the bias is symmetric, with no causal mask inside: -m_h |i - j| everywhere (the attention's "
            "causal mask removes j > i, not the bias)":
                _bias_causal_inf,
            "the slopes come from alibi_slopes (exercise 4): 1/2, 1/4, ... is only the 8-head sequence, "
            "2**(-8h/n) for n heads":
                _bias_halving_slopes,
            "the distance is |i - j|, between the query and the key, not the key's position j":
                _bias_key_position,
        },
        hint="bias[h, i, j] = -m_h |i - j| with m = alibi_slopes(n_heads) (exercise 4) along the first "
             "axis: slopes[:, None, None] * distance[None]; in the requested dtype",
    ),
]
