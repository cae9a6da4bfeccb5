"""Wrong answers learners write in lecture 01, each with the hint it must get (CONTRIBUTING §6).

``python -m autograder.mistakes 01_attention`` prints what each one is told by the visible test
cell and by the hidden tests; ``autograder/tests/test_known_mistakes.py`` checks each message
holds the piece below.
"""
from autograder.mistakes import WrongAnswer

# The right answer of exercise 4 written with slots, so each wrong answer below is the solution
# with one thing changed, as a learner's would be.
_MHA = """
def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
    B, L, d_model = x.shape
<CHECK>
    D = d_model // n_heads
    q, k, v = <PROJ>.split(d_model, dim=-1)
    q, k, v = (<SPLIT> for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(<SCALE>)
    if mask is not None:
        scores = scores.masked_fill(<MASK>, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
<EMPTY>
    concat = <MERGE>
    return <OUT>
"""
_MHA_RIGHT = {
    "CHECK": "    if d_model % n_heads != 0:\n"
             "        raise ValueError(f'd_model={d_model} must be divisible by n_heads={n_heads}')",
    "PROJ": "F.linear(x, w_qkv, b_qkv)",
    "SPLIT": "t.reshape(B, L, n_heads, D).transpose(1, 2)",
    "SCALE": "D",
    "MASK": "~mask",
    "EMPTY": "    if mask is not None:\n"
             "        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)",
    "MERGE": "(weights @ v).transpose(1, 2).reshape(B, L, d_model)",
    "OUT": "F.linear(concat, w_out, b_out)",
}


def _mha(**changes):
    """The solution of exercise 4 with ``changes`` (slots of _MHA_RIGHT) made; an empty slot is dropped."""
    code = _MHA
    for slot, text in {**_MHA_RIGHT, **changes}.items():
        code = code.replace(f"<{slot}>\n", "") if text == "" else code.replace(f"<{slot}>", text)
    return code


WRONG_ANSWERS = [
    # ------------------------------------------------------------------ exercise 1: attention_scores
    WrongAnswer(
        cell="ex1_attention_scores", name="forgot the scale",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(-2, -1)
''',
        visible="forgot the scale", hidden="forgot the scale"),
    WrongAnswer(
        cell="ex1_attention_scores", name="divided by D instead of sqrt(D)",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(-2, -1) / q.shape[-1]
''',
        visible="divided by D", hidden="divided by D"),
    WrongAnswer(
        cell="ex1_attention_scores", name="k.T on a 4-D tensor",
        code='''
def attention_scores(q, k):
    return q @ k.T / math.sqrt(q.shape[-1])
''',
        visible="k.T reverses all", hidden="k.T reverses all"),
    WrongAnswer(
        cell="ex1_attention_scores", name="scaled by the number of keys",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(k.shape[-2])
''',
        visible="number of keys", hidden="number of keys"),
    WrongAnswer(
        cell="ex1_attention_scores", name="multiplied by sqrt(D)",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(-2, -1) * math.sqrt(q.shape[-1])
''',
        visible="multiplied by sqrt(D)", hidden="multiplied by sqrt(D)"),
    WrongAnswer(
        cell="ex1_attention_scores", name="keys as rows: k @ q^T",
        code='''
def attention_scores(q, k):
    return k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1])
''',
        visible="rows are queries", hidden="rows are queries"),
    WrongAnswer(
        cell="ex1_attention_scores", name=".float() drops float64",
        code='''
def attention_scores(q, k):
    return (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
''',
        visible="not float64", hidden="float64 came back as float32"),
    WrongAnswer(
        cell="ex1_attention_scores", name="transposed axes 1 and 2 (heads and keys)",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
''',
        visible="transpose only the last two axes", hidden="transpose only the last two axes"),

    # ------------------------------------------------------------------ exercise 2: masked_softmax
    WrongAnswer(
        cell="ex2_masked_softmax", name="naive exp softmax (overflows at 1e4)",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = torch.exp(scores)
    w = e / e.sum(dim=-1, keepdim=True)
    if mask is not None:
        w = w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return w
''',
        visible="exp(1e4) overflows", hidden="subtract each row's maximum"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="-1e9 instead of -inf (fully masked rows uniform)",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores.masked_fill(~mask, -1e9)
    return torch.softmax(scores, dim=-1)
''',
        visible="large negative number instead of -inf", hidden="large negative number instead of -inf"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="NaN for fully masked rows",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)
''',
        visible="returned NaN for a row whose keys are all masked", hidden="NaN in a row whose keys are all masked"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="inverted mask (hid where True)",
        code='''
def masked_softmax(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(mask, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return w.masked_fill((~mask).any(dim=-1, keepdim=True).logical_not(), 0.0)
''',
        visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="inverted mask, only the fill flipped",
        code='''
def masked_softmax(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    w = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
''',
        visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="softmax over the wrong axis (dim=-2)",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, dim=-2)
    return torch.nan_to_num(w, nan=0.0)
''',
        visible="wrong axis", hidden="wrong axis"),
    WrongAnswer(
        cell="ex2_masked_softmax", name=".float() drops float64",
        code='''
def masked_softmax(scores, mask=None):
    scores = scores.float()
    if mask is None:
        return torch.softmax(scores, dim=-1)
    w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
''',
        visible="keep the dtype of scores", hidden="float64 came back as float32"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="mask applied after the softmax",
        code='''
def masked_softmax(scores, mask=None):
    w = torch.softmax(scores, dim=-1)
    if mask is not None:
        w = w * mask
    return w
''',
        visible="after the softmax", hidden="after the softmax"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="boolean mask added to the scores as numbers",
        code='''
def masked_softmax(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores + mask, dim=-1)
''',
        visible="added the boolean mask", hidden="added the boolean mask"),
    WrongAnswer(
        cell="ex2_masked_softmax", name="wrote -inf into the scores in place",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(w, nan=0.0)
''',
        visible="in place", hidden="in place"),

    # ------------------------------------------------------------------ exercise 3: attention
    WrongAnswer(
        cell="ex3_attention", name="scaled by sqrt(Dv)",
        code='''
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])
    return masked_softmax(scores, mask) @ v, masked_softmax(scores, mask)
''',
        visible="v's width Dv", hidden="scaled by sqrt of v's last dim"),
    WrongAnswer(
        cell="ex3_attention", name="forgot the scale",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(q @ k.transpose(-2, -1), mask)
    return w @ v, w
''',
        visible="forgot the 1/sqrt(D) scale", hidden="forgot the 1/sqrt(D) scale"),
    WrongAnswer(
        cell="ex3_attention", name="divided by D",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(q @ k.transpose(-2, -1) / q.shape[-1], mask)
    return w @ v, w
''',
        visible="divided by D", hidden="divided by D"),
    WrongAnswer(
        cell="ex3_attention", name="NaN for a query that sees no key",
        code='''
def attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, dim=-1)
    return w @ v, w
''',
        visible="returned NaN for a query whose keys are all masked", hidden="NaN for a query that sees no key"),
    WrongAnswer(
        cell="ex3_attention", name="-1e9 fill: a query that sees no key averages all values",
        code='''
def attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = torch.softmax(s, dim=-1)
    return w @ v, w
''',
        visible="a large negative fill", hidden="a large negative fill"),
    WrongAnswer(
        cell="ex3_attention", name="returned (weights, out)",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(attention_scores(q, k), mask)
    return w, w @ v
''',
        visible="(out, weights)", hidden="(out, weights)"),
    WrongAnswer(
        cell="ex3_attention", name="softmax over the queries (dim=-2)",
        code='''
def attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, dim=-2), nan=0.0)
    return w @ v, w
''',
        visible="over the keys", hidden="over the queries"),
    WrongAnswer(
        cell="ex3_attention", name="inverted mask",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(attention_scores(q, k), None if mask is None else ~mask)
    return w @ v, w
''',
        visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(
        cell="ex3_attention", name="returned out only",
        code='''
def attention(q, k, v, mask=None):
    return masked_softmax(attention_scores(q, k), mask) @ v
''',
        visible="must return a pair", hidden=None),

    # ------------------------------------------------------------------ exercise 4: multi_head_attention
    WrongAnswer(cell="ex4_multi_head_attention", name="scaled by sqrt(d_model)",
                code=_mha(SCALE="d_model"), visible="sqrt(d_model)", hidden="sqrt(d_model)"),
    WrongAnswer(cell="ex4_multi_head_attention", name="head split with reshape(B, H, L, D)",
                code=_mha(SPLIT="t.reshape(B, n_heads, L, D)"),
                visible="reshape(B, H, L, D)", hidden="reshape(B, H, L, D)"),
    WrongAnswer(cell="ex4_multi_head_attention", name="no ValueError when n_heads does not divide d_model",
                code=_mha(CHECK=""), visible="ValueError", hidden="ValueError"),
    WrongAnswer(cell="ex4_multi_head_attention", name="forgot the output projection",
                code=_mha(OUT="concat"), visible="output projection", hidden="output projection"),
    WrongAnswer(cell="ex4_multi_head_attention", name="forgot the biases",
                code=_mha(PROJ="F.linear(x, w_qkv)", OUT="F.linear(concat, w_out)"),
                visible="forgot the biases b_qkv", hidden="forgot the biases b_qkv"),
    WrongAnswer(cell="ex4_multi_head_attention", name="forgot the output bias",
                code=_mha(OUT="F.linear(concat, w_out)"), visible="forgot the output bias", hidden="forgot the output bias"),
    WrongAnswer(cell="ex4_multi_head_attention", name="heads concatenated without transpose(1, 2)",
                code=_mha(MERGE="(weights @ v).reshape(B, L, d_model)"),
                visible="transpose(1, 2) before", hidden="transpose(1, 2) before"),
    WrongAnswer(cell="ex4_multi_head_attention", name="PyTorch's mask convention (True = hide)",
                code=_mha(MASK="mask"), visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(cell="ex4_multi_head_attention", name="inverted mask, its empty rows zeroed too",
                code=_mha(MASK="mask", EMPTY="    if mask is not None:\n"
                          "        weights = weights.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)"),
                visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(cell="ex4_multi_head_attention", name="NaN for an empty sequence",
                code=_mha(EMPTY=""), visible="NaN for an empty sequence", hidden="NaN for the empty sequence"),
    WrongAnswer(cell="ex4_multi_head_attention", name="w_out not transposed (x @ w_out)",
                code=_mha(OUT="concat @ w_out + b_out"), visible="w_out is stored (out, in)", hidden="w_out is stored (out, in)"),
    WrongAnswer(cell="ex4_multi_head_attention", name="q, k, v interleaved per head",
                code=_mha(SPLIT="t", PROJ="F.linear(x, w_qkv, b_qkv).reshape(B, L, n_heads, 3 * D).transpose(1, 2)",
                          ).replace(".split(d_model, dim=-1)", ".split(D, dim=-1)"),
                visible="not [q_h | k_h | v_h]", hidden="not [q_h | k_h | v_h]"),
    WrongAnswer(cell="ex4_multi_head_attention", name="x @ w_qkv without the transpose",
                code=_mha(PROJ="(x @ w_qkv + b_qkv)"), visible="w_qkv is stored (out, in)", hidden=None),  # raises on every input: the visible test stops it, the hidden ones never run
    # ------------------------------------------------------------------ tried in the second review (learner's cheats)
    WrongAnswer(
        cell="ex1_attention_scores", name="the library's function imported under another name",
        code='''
from transformer_lab.attention import attention_scores as _lib_scores

def attention_scores(q, k):
    return _lib_scores(q, k)
''',
        visible=None, hidden='transformer_lab.attention.attention_scores is blocked'),
    WrongAnswer(
        cell="ex1_attention_scores", name="divided by sqrt(Lq), the number of queries",
        code='''
def attention_scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-2])
''',
        visible='number of queries', hidden='number of queries'),
    WrongAnswer(
        cell="ex1_attention_scores", name="scores detached from the graph",
        code='''
def attention_scores(q, k):
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).detach()
''',
        visible='without a gradient', hidden=None),
    WrongAnswer(
        cell="ex1_attention_scores", name="q scaled in place",
        code='''
def attention_scores(q, k):
    q /= math.sqrt(q.shape[-1])
    return q @ k.transpose(-2, -1)
''',
        visible='in place', hidden='in place'),
    WrongAnswer(
        cell="ex1_attention_scores", name="the visible hand case special-cased, no scale otherwise",
        code='''
def attention_scores(q, k):
    if q.shape == (1, 1, 1, 4):
        return (q @ k.transpose(-2, -1)) / 2
    return q @ k.transpose(-2, -1)
''',
        visible='forgot the scale', hidden='forgot the scale'),
    WrongAnswer(
        cell="ex2_masked_softmax", name="scores multiplied by the mask",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores * mask
    return torch.softmax(scores, dim=-1)
''',
        visible='multiplied the scores by the mask', hidden='multiplied the scores by the mask'),
    WrongAnswer(
        cell="ex2_masked_softmax", name="mask ignored",
        code='''
def masked_softmax(scores, mask=None):
    return torch.softmax(scores, dim=-1)
''',
        visible='the mask was ignored', hidden='the mask was ignored'),
    WrongAnswer(
        cell="ex2_masked_softmax", name="log_softmax instead of softmax",
        code='''
def masked_softmax(scores, mask=None):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(scores, dim=-1).nan_to_num(0.0, neginf=0.0)
''',
        visible='log_softmax', hidden='log_softmax'),
    WrongAnswer(
        cell="ex2_masked_softmax", name="weights detached",
        code='''
def masked_softmax(scores, mask=None):
    s = scores.detach()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)
''',
        visible='without a gradient', hidden=None),
    WrongAnswer(
        cell="ex3_attention", name="SDPA through torch._C._nn",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(attention_scores(q, k), mask)
    return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask), w
''',
        visible=None, hidden='scaled_dot_product_attention is blocked'),
    WrongAnswer(
        cell="ex3_attention", name="scaled the weights instead of the scores",
        code='''
def attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1)
    w = masked_softmax(s, mask) / math.sqrt(q.shape[-1])
    return w @ v, w
''',
        visible='divided the weights by sqrt(D)', hidden='divided the weights by sqrt(D)'),
    WrongAnswer(
        cell="ex3_attention", name="weights detached",
        code='''
def attention(q, k, v, mask=None):
    w = masked_softmax(attention_scores(q, k), mask).detach()
    return w @ v, w
''',
        visible='no gradient reached q', hidden=None),
    WrongAnswer(
        cell="ex4_multi_head_attention", name="MultiheadAttention's functional form through another module",
        code='''
def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
    import torch.nn.functional as FF
    if x.shape[-1] % n_heads:
        raise ValueError("n_heads must divide d_model")
    xt = x.transpose(0, 1)
    f = getattr(FF, "multi_head_attention_" + "forward")
    B, L, d = x.shape
    m = None if mask is None else ~mask.expand(B, n_heads, L, L).reshape(B * n_heads, L, L)
    y, _ = f(xt, xt, xt, d, n_heads, w_qkv, b_qkv, None, None, False, 0.0, w_out, b_out,
             need_weights=False, attn_mask=m)
    return y.transpose(0, 1)
''',
        visible=None, hidden='multi_head_attention_forward is blocked'),
    WrongAnswer(cell="ex4_multi_head_attention", name="scaled by sqrt(H), the number of heads",
                code=_mha(SCALE="n_heads"), visible='sqrt(n_heads)', hidden='sqrt(n_heads)'),
    WrongAnswer(cell="ex4_multi_head_attention", name="softmax over the queries (dim=-2)",
                code=_mha().replace("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2).nan_to_num(0.0)"),
                visible='over the queries', hidden='over the queries'),
    WrongAnswer(cell="ex4_multi_head_attention", name="every input cast to float32 with .float()",
                code=_mha(CHECK=_MHA_RIGHT["CHECK"] + "\n    x, w_qkv, w_out = x.float(), w_qkv.float(), w_out.float()\n"
                          "    b_qkv, b_out = (None if b is None else b.float() for b in (b_qkv, b_out))"),
                visible='keep the dtype of x', hidden='keep the dtype of x'),
    WrongAnswer(cell="ex4_multi_head_attention", name="the library's MHA class under another module path",
                code='''
def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
    import importlib
    mod = importlib.import_module("transformer_lab.attention")
    d = x.shape[-1]
    if d % n_heads:
        raise ValueError("n_heads must divide d_model")
    m = mod.MultiHeadAttention(d, n_heads, fast=False).to(x.dtype)
    with torch.no_grad():
        m.qkv.weight.copy_(w_qkv); m.out.weight.copy_(w_out)
        m.qkv.bias.copy_(b_qkv if b_qkv is not None else torch.zeros(3 * d))
        m.out.bias.copy_(b_out if b_out is not None else torch.zeros(d))
    return m(x, mask=mask)
''', visible=None, hidden='MultiHeadAttention (its forward) is blocked'),
]
