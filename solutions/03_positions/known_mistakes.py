"""Wrong answers learners write in lecture 03, each with the hint it must get (CONTRIBUTING §6)."""
from autograder.mistakes import WrongAnswer

# ---------------------------------------------------------------------------------------------- exercise 1

_SIN = '''
def sinusoidal_encoding(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)[None, :]
    angle = p * base ** (-two_i / d_model)
    pe = torch.empty(length, d_model, dtype=torch.float64)
    {body}
    return pe.float()
'''

WRONG_ANSWERS = [
    WrongAnswer(
        cell="ex1_sinusoidal", name="all sines first, then all cosines",
        code='''
def sinusoidal_encoding(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    angle = p * base ** (-torch.arange(0, d_model, 2, dtype=torch.float64)[None, :] / d_model)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()
''',
        visible="not [all sines | all cosines]", hidden="not [all sines | all cosines]"),
    WrongAnswer(
        cell="ex1_sinusoidal", name="sin and cos swapped",
        code=_SIN.format(body="pe[:, 0::2] = torch.cos(angle)\n    pe[:, 1::2] = torch.sin(angle)"),
        visible="sin and cos are swapped", hidden="sin and cos are swapped"),
    WrongAnswer(
        cell="ex1_sinusoidal", name="exponent c instead of 2c",
        code='''
def sinusoidal_encoding(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    i = torch.arange(d_model // 2, dtype=torch.float64)[None, :]
    angle = p * base ** (-i / d_model)
    pe = torch.empty(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.float()
''',
        visible="the exponent uses 2c", hidden="the exponent uses 2c"),
    WrongAnswer(
        cell="ex1_sinusoidal", name="each column its own exponent j/d_model",
        code='''
def sinusoidal_encoding(length, d_model, base=10000.0):
    p = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(d_model, dtype=torch.float64)[None, :]
    angle = p * base ** (-j / d_model)
    even = (torch.arange(d_model) % 2 == 0)
    return torch.where(even, angle.sin(), angle.cos()).float()
''',
        visible="both columns of a pair share one frequency", hidden="both columns of a pair share one frequency"),
    WrongAnswer(
        cell="ex1_sinusoidal", name="10000 hard-coded",
        code=_SIN.format(body="angle = p * 10000.0 ** (-two_i / d_model)\n"
                              "    pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)"),
        visible="use the base argument", hidden="use the base argument"),
    WrongAnswer(
        cell="ex1_sinusoidal", name="returns float64",
        code=_SIN.format(body="pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)\n    return pe"),
        visible="float32", hidden="return a float32 table"),
]

# ---------------------------------------------------------------------------------------------- exercise 2: T5

_T5 = '''
def t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128):
    n_b = num_buckets
    ret = torch.zeros_like(rel)
    if bidirectional:
        n_b = num_buckets // 2
        ret = ret + {future}
        delta = {dist_b}
    else:
        delta = {dist_c}
    n_e = {n_e}
    is_small = delta < n_e
    log_ratio = torch.log({ratio}) / {den}
    large = n_e + {round_}(log_ratio * (n_b - n_e)){long}
    large = {clamp}
    return {result}
'''
_T5_OK = dict(future="(rel > 0).long() * n_b", dist_b="rel.abs()", dist_c="(-rel).clamp(min=0)", n_e="n_b // 2",
              ratio="delta.float() / n_e", den="math.log(max_distance / n_e)", round_="", long=".long()",
              clamp="large.clamp(max=n_b - 1)", result="ret + torch.where(is_small, delta, large)")


def _t5(**changed):
    return _T5.format(**{**_T5_OK, **changed})


WRONG_ANSWERS += [
    WrongAnswer(cell="ex2_t5_bucket", name="i - j instead of j - i (past and future swapped)",
                code=_t5(future="(rel < 0).long() * n_b", dist_c="rel.clamp(min=0)"),
                visible="the direction is reversed", hidden="the direction is reversed"),
    WrongAnswer(cell="ex2_t5_bucket", name="bidirectional: buckets not halved",
                code=_t5(future="(rel > 0).long() * num_buckets", n_e="num_buckets // 2").replace(
                    "        n_b = num_buckets // 2\n", ""),
                visible="halve the buckets first", hidden="halve the buckets first"),
    WrongAnswer(cell="ex2_t5_bucket", name="bidirectional: future keys not offset by n_b",
                code=_t5(future="0"),
                visible="gets n_b added to its bucket", hidden="gets n_b = num_buckets // 2 added"),
    WrongAnswer(cell="ex2_t5_bucket", name="log bucket not clamped to n_b - 1",
                code=_t5(clamp="large"),
                visible="the log bucket is not clamped", hidden="the log bucket is not clamped"),
    WrongAnswer(cell="ex2_t5_bucket", name="causal distance |rel| (future keys not zeroed)",
                code=_t5(dist_c="rel.abs()"),
                visible="a key in the future counts as distance 0", hidden="a key in the future counts as distance 0"),
    WrongAnswer(cell="ex2_t5_bucket", name="causal distance -rel not clamped at 0",
                code=_t5(dist_c="-rel"),
                visible="clamp the distance at 0", hidden="clamp the distance at 0"),
    WrongAnswer(cell="ex2_t5_bucket", name="n_e from num_buckets before halving",
                code=_t5(n_e="num_buckets // 2"),
                visible="n_e is half of n_b AFTER halving", hidden="n_e is half of n_b AFTER halving"),
    WrongAnswer(cell="ex2_t5_bucket", name="log denominator ln(max_distance)",
                code=_t5(den="math.log(max_distance)"),
                visible="ln(max_distance / n_e), not ln(max_distance)",
                hidden="ln(max_distance / n_e), not ln(max_distance)"),
    WrongAnswer(cell="ex2_t5_bucket", name="log bucket rounded to nearest",
                code=_t5(round_="torch.round"),
                visible="not to the nearest integer (round)", hidden="not to the nearest integer (round)"),
    WrongAnswer(cell="ex2_t5_bucket", name="log bucket rounded up",
                code=_t5(round_="torch.ceil"),
                visible="not up (ceil)", hidden="not up (ceil)"),
    WrongAnswer(cell="ex2_t5_bucket", name="integer division inside the log",
                code=_t5(ratio="(delta // n_e).float()"),
                visible="not an integer division", hidden="not delta // n_e"),
    WrongAnswer(cell="ex2_t5_bucket", name="float result (bucket ids left as floats)",
                code=_t5(long="", result="(ret + torch.where(is_small, delta, large)).float()"),
                visible="return a long tensor", hidden="dtype"),
    WrongAnswer(cell="ex2_t5_bucket", name="32 and 128 hard-coded",
                code=_t5().replace("n_b = num_buckets", "n_b = 32").replace(
                    "math.log(max_distance / n_e)", "math.log(128 / n_e)"),
                visible="use the num_buckets and max_distance arguments",
                hidden="use the num_buckets and max_distance arguments"),
]

# ---------------------------------------------------------------------------------------------- exercise 3: RoPE

_ROPE = '''
def apply_rope(x, offset=0, base=10000.0):
    L, D = x.shape[-2], x.shape[-1]
    work = {work}
    p = torch.arange({start}, {start} + L, device=x.device, dtype=work)[:, None]
    theta = {base} ** (-torch.arange({i_range}, device=x.device, dtype=work) / D)[None, :]
    angle = p * theta
    cos, sin = angle.{cos}().to(x.dtype), angle.{sin}().to(x.dtype)
    {body}
'''
_ROPE_OK = dict(work="torch.float64 if x.dtype == torch.float64 else torch.float32", start="offset", base="base",
                i_range="0, D, 2", cos="cos", sin="sin",
                body="x1, x2 = x[..., 0::2], x[..., 1::2]\n"
                     "    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)")


def _rope(**changed):
    return _ROPE.format(**{**_ROPE_OK, **changed})


WRONG_ANSWERS += [
    WrongAnswer(cell="ex3_apply_rope", name="rotate-half layout (x_c with x_{c+D/2})",
                code=_rope(body="x1, x2 = x[..., : D // 2], x[..., D // 2:]\n"
                                "    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)"),
                visible="'rotate-half'", hidden="'rotate-half'"),
    WrongAnswer(cell="ex3_apply_rope", name="rotation the wrong way (clockwise)",
                code=_rope(body="x1, x2 = x[..., 0::2], x[..., 1::2]\n"
                                "    return torch.stack([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).flatten(-2)"),
                visible="the rotation turns the wrong way", hidden="the rotation turns the wrong way"),
    WrongAnswer(cell="ex3_apply_rope", name="offset ignored",
                code=_rope(start="0"),
                visible="the offset was ignored", hidden="the offset is missing"),
    WrongAnswer(cell="ex3_apply_rope", name="10000 hard-coded",
                code=_rope(base="10000.0"),
                visible="use the base argument instead of 10000", hidden="use the base argument instead of 10000"),
    WrongAnswer(cell="ex3_apply_rope", name="exponent c instead of 2c",
                code=_rope(i_range="0, D // 2"),
                visible="with 2c (the even column index), not c", hidden="with 2c (the even column index), not c"),
    WrongAnswer(cell="ex3_apply_rope", name="angles in float32 for a float64 x",
                code=_rope(work="torch.float32"),
                visible="the angles were computed in float32", hidden="the angles were computed in float32"),
    WrongAnswer(cell="ex3_apply_rope", name="sin and cos swapped",
                code=_rope(cos="sin", sin="cos"),
                visible="sin and cos are swapped", hidden="sin and cos are swapped"),
    WrongAnswer(cell="ex3_apply_rope", name="rotates x in place",
                code=_rope(body="x1, x2 = x[..., 0::2].clone(), x[..., 1::2].clone()\n"
                                "    x[..., 0::2] = x1 * cos - x2 * sin\n"
                                "    x[..., 1::2] = x1 * sin + x2 * cos\n"
                                "    return x"),
                visible="changed its input x in place", hidden="in place"),
]

# ---------------------------------------------------------------------------------------------- exercise 4: slopes

_SLOPES = '''
def alibi_slopes(n_heads):
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** h for h in range({h_range})]

    def slopes(n):
        if n & (n - 1) == 0:
            return power_of_two(n)
        n0 = 2 ** int(math.floor(math.log2(n)))
        return {combine}

    return torch.tensor(slopes(n_heads), dtype={dtype})
'''
_SLOPES_OK = dict(h_range="1, n + 1", combine="power_of_two(n0) + slopes(2 * n0)[0::2][: n - n0]",
                  dtype="torch.float32")


def _slopes(**changed):
    return _SLOPES.format(**{**_SLOPES_OK, **changed})


WRONG_ANSWERS += [
    WrongAnswer(cell="ex4_alibi_slopes", name="heads numbered from 0",
                code=_slopes(h_range="n"),
                visible="h starts at 1", hidden="h starts at 1"),
    WrongAnswer(cell="ex4_alibi_slopes", name="extra slopes [1::2]",
                code=_slopes(combine="power_of_two(n0) + slopes(2 * n0)[1::2][: n - n0]"),
                visible="not its second ([1::2]", hidden="not its second ([1::2])"),
    WrongAnswer(cell="ex4_alibi_slopes", name="extra slopes first",
                code=_slopes(combine="slopes(2 * n0)[0::2][: n - n0] + power_of_two(n0)"),
                visible="keep the order", hidden="keep the order"),
    WrongAnswer(cell="ex4_alibi_slopes", name="2^(-8h/n) for every n",
                code='''
def alibi_slopes(n_heads):
    return torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)], dtype=torch.float32)
''',
                visible="is the recipe for n a power of two only", hidden="is the recipe for n a power of two only"),
    WrongAnswer(cell="ex4_alibi_slopes", name="first n slopes of the next power of two",
                code='''
def alibi_slopes(n_heads):
    n1 = 1 << (n_heads - 1).bit_length()
    start = 2.0 ** (-8.0 / n1)
    return torch.tensor([start ** h for h in range(1, n_heads + 1)], dtype=torch.float32)
''',
                visible="not the first 6 slopes of the next power of two", hidden="not the first n slopes of the next power of two"),
    WrongAnswer(cell="ex4_alibi_slopes", name="float64 slopes",
                code=_slopes(dtype="torch.float64"),
                visible="float32", hidden="dtype"),
]

# ---------------------------------------------------------------------------------------------- exercise 5: bias

_BIAS = '''
def alibi_bias(n_heads, length, dtype=torch.float32):
    pos = torch.arange(length)
    dist = ({dist}).to({dist_dtype})
    m = {slopes}
    return {result}
'''
_BIAS_OK = dict(dist="(pos[None, :] - pos[:, None]).abs()", dist_dtype="dtype",
                slopes="alibi_slopes(n_heads).to(dtype)[:, None, None]", result="-m * dist")


def _bias(**changed):
    return _BIAS.format(**{**_BIAS_OK, **changed})


WRONG_ANSWERS += [
    WrongAnswer(cell="ex5_alibi_bias", name="signed i - j",
                code=_bias(dist="pos[:, None] - pos[None, :]"),
                visible="not i - j", hidden="not i - j"),
    WrongAnswer(cell="ex5_alibi_bias", name="signed j - i",
                code=_bias(dist="pos[None, :] - pos[:, None]"),
                visible="not j - i", hidden="not j - i"),
    WrongAnswer(cell="ex5_alibi_bias", name="positive bias (sign forgotten)",
                code=_bias(result="m * dist"),
                visible="the sign: the bias is -m_h |i - j|", hidden="the sign: the bias is -m_h |i - j|"),
    WrongAnswer(cell="ex5_alibi_bias", name="slopes 2^(-8h/n) for every head count",
                code=_bias(slopes="torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)], "
                                  "dtype=dtype)[:, None, None]"),
                visible="not from 2**(-8h/n)", hidden="not from 2**(-8h/n)"),
    WrongAnswer(cell="ex5_alibi_bias", name="always float32 (dtype ignored)",
                code=_bias(dist_dtype="torch.float32", slopes="alibi_slopes(n_heads)[:, None, None]"),
                visible="return the requested dtype", hidden="return the requested dtype"),
    WrongAnswer(cell="ex5_alibi_bias", name="slopes along the last axis",
                code=_bias(slopes="alibi_slopes(n_heads).to(dtype)[None, None, :]", result="-m * dist[:, :, None]"),
                visible="slopes[:, None, None] * distance[None]", hidden="along the first axis"),
]

# ---------------------------------------------------------------------------------------------- cheats

WRONG_ANSWERS += [
    WrongAnswer(cell="ex2_t5_bucket", name="calls the library's t5_bucket",
                code='''
def t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128):
    return positions.t5_bucket(rel, bidirectional, num_buckets, max_distance)
''',
                visible=None, hidden="ReferenceBlocked"),
    WrongAnswer(cell="ex2_t5_bucket", name="calls Hugging Face T5's _relative_position_bucket",
                code='''
def t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128):
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
''',
                visible=None, hidden="blocked"),
]

# ---------------------------------------------------------------------------------------------- tried in review (issue 13)

WRONG_ANSWERS += [
    # exercise 2 (the core one)
    WrongAnswer(cell="ex2_t5_bucket", name="offset 0 counted as a future key (rel >= 0)",
                code=_t5(future="(rel >= 0).long() * n_b"),
                visible='offset 0 (the query itself) is in the lower half', hidden='offset 0 (the query itself) is in the lower half'),
    WrongAnswer(cell="ex2_t5_bucket", name="n_e = num_buckets // 4 in both directions",
                code=_t5(n_e="num_buckets // 4"),
                visible='not num_buckets // 4', hidden='not num_buckets // 4'),
    WrongAnswer(cell="ex2_t5_bucket", name="log range spread over n_b - n_e - 1 buckets",
                code=_t5().replace("(log_ratio * (n_b - n_e))", "(log_ratio * (n_b - n_e - 1))"),
                visible='not * (n_b - n_e - 1)', hidden='not * (n_b - n_e - 1)'),
    WrongAnswer(cell="ex2_t5_bucket", name="n_e not added to the log bucket",
                code=_t5().replace("large = n_e + ", "large = "),
                visible='the log buckets come after the exact ones', hidden='the log buckets come after the exact ones'),
    WrongAnswer(cell="ex2_t5_bucket", name="no exact range (the log bucket for every distance)",
                code=_t5(result="ret + large"),
                visible='distances below n_e are their own bucket', hidden='distances below n_e are their own bucket'),
    WrongAnswer(cell="ex2_t5_bucket", name="the bidirectional flag inverted",
                code=_t5().replace("if bidirectional:", "if not bidirectional:"),
                visible='the bidirectional flag is read the wrong way round', hidden='the bidirectional flag is read the wrong way round'),
    WrongAnswer(cell="ex2_t5_bucket", name="log of delta, not of delta / n_e",
                code=_t5(ratio="delta.float()"),
                visible='the log is of the ratio delta / n_e', hidden='the log is of the ratio delta / n_e'),
    WrongAnswer(cell="ex2_t5_bucket", name="rewrites rel in place (rel.abs_())",
                code=_t5(dist_b="rel.abs_()"),
                visible='t5_bucket changed its input rel in place', hidden='changed its input in place'),
    # exercise 1
    WrongAnswer(cell="ex1_sinusoidal", name="positions start at 1",
                code=_SIN.format(body="angle = (p + 1) * base ** (-two_i / d_model)\n"
                                      "    pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)"),
                visible='the first row is position 0 (angles 0), not 1', hidden='the first row is position 0 (angles 0), not 1'),
    WrongAnswer(cell="ex1_sinusoidal", name="divides by omega (exponent's sign flipped)",
                code=_SIN.format(body="angle = p * base ** (two_i / d_model)\n"
                                      "    pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)"),
                visible='the exponent is negative', hidden='the exponent is negative'),
    WrongAnswer(cell="ex1_sinusoidal", name="loops over pe_row_v1 (a teaching cell's function)",
                code='''
def sinusoidal_encoding(length, d_model, base=10000.0):
    return torch.stack([pe_row_v1(p, d_model, base) for p in range(length)]).float()
''',
                visible='pe_row_v1', hidden='define what your function uses in an answer cell'),
    WrongAnswer(cell="ex1_sinusoidal", name="returns the table transposed (d_model, length)",
                code=_SIN.format(body="pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)\n"
                                      "    return pe.T.float()"),
                visible='one row per position: shape (length, d_model)', hidden='expected (1, 2), got (2, 1)'),
    WrongAnswer(cell="ex1_sinusoidal", name="d_model frequencies over d_model/2 (exponent -2c/(d_model/2))",
                code=_SIN.format(body="angle = p * base ** (-two_i / (d_model // 2))\n"
                                      "    pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)"),
                visible="the exponent's denominator is d_model", hidden="the exponent's denominator is d_model"),
    # exercise 3
    WrongAnswer(cell="ex3_apply_rope", name="positions start at offset + 1",
                code=_rope(start="offset + 1").replace("offset + 1 + L", "offset + 1 + L"),
                visible='not offset + 1', hidden='not offset + 1'),
    WrongAnswer(cell="ex3_apply_rope", name="length read from x.shape[0]",
                code=_rope().replace("L, D = x.shape[-2], x.shape[-1]", "L, D = x.shape[0], x.shape[-1]"),
                visible='the sequence length is x.shape[-2]', hidden='the sequence length is x.shape[-2]'),
    WrongAnswer(cell="ex3_apply_rope", name="returns float32 for a float64 x",
                code=_rope(work="torch.float32").replace(".to(x.dtype)", "").replace(
                    "x1, x2 = x[..., 0::2], x[..., 1::2]", "x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()"),
                visible="keep x's dtype", hidden="keep x's dtype"),
    WrongAnswer(cell="ex3_apply_rope", name="negative angle (-p theta): the same as turning clockwise",
                code=_rope().replace("angle = p * theta", "angle = -p * theta"),
                visible="the rotation turns the wrong way", hidden="the rotation turns the wrong way"),
    WrongAnswer(cell="ex3_apply_rope", name="frequencies over d_model, not D (uses 64)",
                code=_rope().replace("/ D)[None, :]", "/ 64)[None, :]"),
                visible='base**(-2c/D)', hidden='base**(-2c/D)'),
    # exercise 4
    WrongAnswer(cell="ex4_alibi_slopes", name="slopes in ascending order",
                code=_slopes(combine="sorted(power_of_two(n0) + slopes(2 * n0)[0::2][: n - n0])").replace(
                    "return power_of_two(n)", "return sorted(power_of_two(n))"),
                visible='the slopes fall from head to head', hidden='the slopes fall from head to head'),
    WrongAnswer(cell="ex4_alibi_slopes", name="power-of-two test n % 2 == 0",
                code=_slopes().replace("if n & (n - 1) == 0:", "if n % 2 == 0 or n == 1:"),
                visible='is the recipe for n a power of two only', hidden='is the recipe for n a power of two only'),
    WrongAnswer(cell="ex4_alibi_slopes", name="returns a Python list",
                code=_slopes().replace("return torch.tensor(slopes(n_heads), dtype=torch.float32)",
                                       "return slopes(n_heads)"),
                visible='expected a tensor', hidden=None),
    WrongAnswer(cell="ex4_alibi_slopes", name="extra slopes taken from n0 heads again (not 2 n0)",
                code=_slopes(combine="power_of_two(n0) + power_of_two(n0)[0::2][: n - n0]"),
                visible='not from the', hidden='not from the'),
    WrongAnswer(cell="ex4_alibi_slopes", name="slope base 2^(-8/n0) for the extra heads too: 2^(-8h/n0) continued",
                code=_slopes(combine="[2.0 ** (-8.0 * h / n0) for h in range(1, n + 1)]"),
                visible="not past the gentlest one", hidden="not past the gentlest one"),
    # exercise 5
    WrongAnswer(cell="ex5_alibi_bias", name="squared distance",
                code=_bias(dist="(pos[None, :] - pos[:, None]) ** 2"),
                visible='not -m_h (i - j)**2', hidden='not -m_h (i - j)**2'),
    WrongAnswer(cell="ex5_alibi_bias", name="a batch axis added (1, H, L, L)",
                code=_bias(result="(-m * dist)[None]"),
                visible='(n_heads, length, length)', hidden='got (1, '),
    WrongAnswer(cell="ex5_alibi_bias", name="causal mask baked in (-inf above the diagonal)",
                code=_bias(result="(-m * dist).masked_fill(pos[None, :] > pos[:, None], float('-inf'))"),
                visible='with no causal mask inside', hidden='with no causal mask inside'),
    WrongAnswer(cell="ex5_alibi_bias", name="slopes 1/2^h for every head count",
                code=_bias(slopes="torch.tensor([2.0 ** -h for h in range(1, n_heads + 1)], dtype=dtype)[:, None, None]"),
                visible='1/2, 1/4, ... is only the 8-head sequence', hidden='1/2, 1/4, ... is only the 8-head sequence'),
    WrongAnswer(cell="ex5_alibi_bias", name="distance to position 0 only (|j|), not |i - j|",
                code=_bias(dist="pos[None, :].expand(length, length)"),
                visible="not the key's position j", hidden="not the key's position j"),
]
