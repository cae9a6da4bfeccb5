"""Wrong answers learners write in lecture 02, each with the hint it must get (CONTRIBUTING §6)."""
from autograder.mistakes import WrongAnswer

# --------------------------------------------------------------------------- ex1: layer_norm


def _ln(body):
    return "def layer_norm(x, gamma, beta, eps=1e-5):\n" + body


EX1 = [
    WrongAnswer(
        cell="ex1_layer_norm", name="unbiased variance (x.var divides by d - 1)",
        code=_ln('''    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta
'''),
        visible="unbiased variance", hidden="unbiased variance"),
    WrongAnswer(
        cell="ex1_layer_norm", name="eps outside the square root",
        code=_ln('''    mu = x.mean(dim=-1, keepdim=True)
    sd = x.var(dim=-1, keepdim=True, unbiased=False).sqrt()
    return gamma * (x - mu) / (sd + eps) + beta
'''),
        visible="eps is outside the square root", hidden="eps goes inside the square root"),
    WrongAnswer(
        cell="ex1_layer_norm", name="no eps at all",
        code=_ln('''    mu = x.mean(dim=-1, keepdim=True)
    return gamma * (x - mu) / x.var(dim=-1, keepdim=True, unbiased=False).sqrt() + beta
'''),
        visible="eps is missing", hidden="eps is missing"),
    WrongAnswer(
        cell="ex1_layer_norm", name="BatchNorm's axis: statistics over the batch dim 0",
        code=_ln('''    mu = x.mean(dim=0, keepdim=True)
    var = x.var(dim=0, keepdim=True, unbiased=False)
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta
'''),
        visible="batch axis (dim 0)", hidden="batch axis (dim 0)"),
    WrongAnswer(
        cell="ex1_layer_norm", name="BatchNorm's statistics: over every axis but the features",
        code=_ln('''    dims = tuple(range(x.dim() - 1))
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta
'''),
        visible="BatchNorm's statistics", hidden="BatchNorm's statistics"),
    WrongAnswer(
        cell="ex1_layer_norm", name="statistics over the whole tensor",
        code=_ln('''    return gamma * (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps) + beta
'''),
        visible="whole tensor", hidden="whole tensor"),
    WrongAnswer(
        cell="ex1_layer_norm", name="no gamma and beta",
        code=_ln('''    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + eps)
'''),
        visible="gamma and beta are missing", hidden="gamma and beta are missing"),
    WrongAnswer(
        cell="ex1_layer_norm", name="gamma and beta swapped",
        code=_ln('''    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return beta * (x - mu) / torch.sqrt(var + eps) + gamma
'''),
        visible="gamma and beta are swapped", hidden="gamma and beta are swapped"),
    WrongAnswer(
        cell="ex1_layer_norm", name="a popular tutorial's LayerNorm: x.std(-1) + eps",
        code=_ln('''    mu = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return gamma * (x - mu) / (std + eps) + beta
'''),
        visible="unbiased variance", hidden="x.std(-1) is the unbiased standard deviation"),
]

# --------------------------------------------------------------------------- ex2: swiglu_ffn


def _sw(body):
    return "def swiglu_ffn(x, w1, w2, w3):\n" + body


EX2 = [
    WrongAnswer(cell="ex2_swiglu_ffn", name="w1 and w3 swapped",
                code=_sw("    return (F.silu(x @ w3.T) * (x @ w1.T)) @ w2.T\n"),
                visible="w1 and w3 are swapped", hidden="w1 and w3 are swapped"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="sigmoid gate (GLU)",
                code=_sw("    return (torch.sigmoid(x @ w1.T) * (x @ w3.T)) @ w2.T\n"),
                visible="sigmoid gate", hidden="sigmoid gate"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="ReLU gate (ReGLU)",
                code=_sw("    return (F.relu(x @ w1.T) * (x @ w3.T)) @ w2.T\n"),
                visible="ReLU gate", hidden="ReLU gate"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="no gate: a plain SiLU FFN",
                code=_sw("    return F.silu(x @ w1.T) @ w2.T\n"),
                visible="the gate is missing", hidden="the gate is missing"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="missing .T on w2",
                code=_sw("    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2\n"),
                visible="forgot the .T on w2", hidden="forgot the .T on w2"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="missing .T on w1 and w3",
                code=_sw("    return (F.silu(x @ w1) * (x @ w3)) @ w2.T\n"),
                visible="forgot the .T on w1 and w3", hidden="forgot the .T on w1 and w3"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="missing .T everywhere",
                code=_sw("    return (F.silu(x @ w1) * (x @ w3)) @ w2\n"),
                visible="forgot the .T on every weight", hidden="forgot the .T on every weight"),
]

# --------------------------------------------------------------------------- ex3: mean_pool


def _mp(body):
    return "def mean_pool(h, padding_mask):\n" + body


EX3 = [
    WrongAnswer(cell="ex3_mean_pool", name="padding averaged in (h.mean(1))",
                code=_mp("    return h.mean(dim=1)\n"),
                visible="the padding was averaged in", hidden="the padding was averaged in"),
    WrongAnswer(cell="ex3_mean_pool", name="divided by L",
                code=_mp("    w = padding_mask.to(h.dtype).unsqueeze(-1)\n    return (h * w).sum(dim=1) / h.shape[1]\n"),
                visible="divided by L", hidden="divided by L"),
    WrongAnswer(cell="ex3_mean_pool", name="0/0 for an all-padding row (no clamp)",
                code=_mp("    w = padding_mask.to(h.dtype).unsqueeze(-1)\n    return (h * w).sum(dim=1) / w.sum(dim=1)\n"),
                visible="0 / 0", hidden="0/0 = nan"),
    WrongAnswer(cell="ex3_mean_pool", name="the sum, not the mean",
                code=_mp("    w = padding_mask.to(h.dtype).unsqueeze(-1)\n    return (h * w).sum(dim=1)\n"),
                visible="that is the sum over the real tokens", hidden="that is the sum over the real tokens"),
    WrongAnswer(cell="ex3_mean_pool", name="mask inverted (True read as padding)",
                code=_mp("    w = (~padding_mask).to(h.dtype).unsqueeze(-1)\n"
                         "    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)\n"),
                visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(cell="ex3_mean_pool", name="divided by the batch's count of real tokens",
                code=_mp("    w = padding_mask.to(h.dtype).unsqueeze(-1)\n"
                         "    return (h * w).sum(dim=1) / w.sum().clamp_min(1.0)\n"),
                visible="in the whole batch", hidden="in the whole batch"),
]

# --------------------------------------------------------------------------- ex4: sublayer_connection


def _sc(body):
    return "def sublayer_connection(x, sublayer, norm, norm_first):\n" + body


EX4 = [
    WrongAnswer(cell="ex4_sublayer_connection", name="pre and post swapped",
                code=_sc("    if norm_first:\n        return norm(x + sublayer(x))\n    return x + sublayer(norm(x))\n"),
                visible="pre and post swapped", hidden="pre-norm and post-norm are swapped"),
    WrongAnswer(cell="ex4_sublayer_connection", name="pre-norm adds norm(x) instead of x",
                code=_sc("    if norm_first:\n        h = norm(x)\n        return h + sublayer(h)\n"
                         "    return norm(x + sublayer(x))\n"),
                visible="the residual adds norm(x), not x", hidden="the residual adds the ORIGINAL x"),
    WrongAnswer(cell="ex4_sublayer_connection", name="pre-norm without the norm",
                code=_sc("    if norm_first:\n        return x + sublayer(x)\n    return norm(x + sublayer(x))\n"),
                visible="the sub-layer got x, not norm(x)", hidden="the sub-layer got x, not norm(x)"),
    WrongAnswer(cell="ex4_sublayer_connection", name="post-norm with the norm on the branch",
                code=_sc("    if norm_first:\n        return x + sublayer(norm(x))\n    return x + norm(sublayer(x))\n"),
                visible="the norm went on the branch", hidden="post-norm normalises the sum"),
    WrongAnswer(cell="ex4_sublayer_connection", name="post-norm adds after the norm",
                code=_sc("    if norm_first:\n        return x + sublayer(norm(x))\n    return norm(x) + sublayer(x)\n"),
                visible="the residual was added after the norm", hidden="the residual was added after the norm"),
    WrongAnswer(cell="ex4_sublayer_connection", name="sub-layer called twice",
                code=_sc("    if norm_first:\n        out = x + sublayer(norm(x))\n    else:\n"
                         "        out = norm(x + sublayer(x))\n    sublayer(x)  # e.g. to print its shape\n"
                         "    return out\n"),
                visible="called the sub-layer 2 times", hidden="called more than once"),
]

# --------------------------------------------------------------------------- ex5: MyEncoderBlock

_INIT = '''class MyEncoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        attn = lambda h: self.attn(h, mask=mask)
        ffn = lambda h: self.w2(F.relu(self.w1(h)))
'''

_RIGHT_PRE = '''        if self.norm_first:
            x = x + self.drop(attn(self.norm1(x)))
            return x + self.drop(ffn(self.norm2(x)))
'''
_RIGHT_POST = '''        x = self.norm1(x + self.drop(attn(x)))
        return self.norm2(x + self.drop(ffn(x)))
'''


def _blk(pre=_RIGHT_PRE, post=_RIGHT_POST, head=""):
    return _INIT + head + pre + post


EX5 = [
    WrongAnswer(cell="ex5_encoder_block", name="pre- and post-norm swapped (flag read backwards)",
                code=_blk(pre=_RIGHT_PRE.replace("if self.norm_first:", "if not self.norm_first:")),
                visible="pre-norm and post-norm are swapped", hidden="pre-norm and post-norm are swapped"),
    WrongAnswer(cell="ex5_encoder_block", name="pre-norm: the residual added after the norm (norm(x) + f(norm(x)))",
                code=_blk(pre='''        if self.norm_first:
            x = self.norm1(x)
            x = x + self.drop(attn(x))
            h = self.norm2(x)
            return h + self.drop(ffn(h))
'''),
                visible="adds the ORIGINAL x", hidden="adds the ORIGINAL x"),
    WrongAnswer(cell="ex5_encoder_block", name="post-norm: the norm on the branch",
                code=_blk(post='''        x = x + self.drop(self.norm1(attn(x)))
        return x + self.drop(self.norm2(ffn(x)))
'''),
                visible="normalises the SUM", hidden="LN(x + f(x)), not x + LN(f(x))"),
    WrongAnswer(cell="ex5_encoder_block", name="post-norm: norm(x) + f(x)",
                code=_blk(post='''        x = self.norm1(x) + self.drop(attn(x))
        return self.norm2(x) + self.drop(ffn(x))
'''),
                visible="adds after normalising the sum", hidden="adds after normalising the sum"),
    WrongAnswer(cell="ex5_encoder_block", name="one LayerNorm shared by both sub-layers",
                code=_blk(pre=_RIGHT_PRE.replace("self.norm2", "self.norm1"),
                          post=_RIGHT_POST.replace("self.norm2", "self.norm1")),
                visible="both sub-layers used norm1", hidden="both sub-layers used norm1"),
    WrongAnswer(cell="ex5_encoder_block", name="FFN without activation",
                code=_blk(head="        ffn = lambda h: self.w2(self.w1(h))\n"),
                visible="the FFN has no activation", hidden="the FFN has no activation"),
    WrongAnswer(cell="ex5_encoder_block", name="GELU instead of the paper's ReLU",
                code=_blk(head="        ffn = lambda h: self.w2(F.gelu(self.w1(h)))\n"),
                visible="the FFN uses GELU", hidden="the FFN uses GELU"),
    WrongAnswer(cell="ex5_encoder_block", name="mask ignored",
                code=_blk(head="        attn = lambda h: self.attn(h)\n"),
                visible="the mask was not used", hidden="the mask was not used"),
    WrongAnswer(cell="ex5_encoder_block", name="dropout on in eval (F.dropout without training=)",
                code=_blk(pre=_RIGHT_PRE.replace("self.drop(", "F.dropout(").replace(")))", "), self.drop.p))"),
                          post=_RIGHT_POST.replace("self.drop(", "F.dropout(").replace(")))", "), self.drop.p))")),
                visible="dropout is still on", hidden="dropout stays on in eval()"),
    WrongAnswer(cell="ex5_encoder_block", name="no dropout at all",
                code=_blk(pre=_RIGHT_PRE.replace("self.drop", ""), post=_RIGHT_POST.replace("self.drop", "")),
                visible="without dropout on the sub-layers' outputs", hidden="without dropout on the sub-layers' outputs"),
    WrongAnswer(cell="ex5_encoder_block", name="dropout on the residual stream itself (drop(x) + f)",
                code=_blk(pre='''        if self.norm_first:
            x = self.drop(x) + attn(self.norm1(x))
            return self.drop(x) + ffn(self.norm2(x))
''', post='''        x = self.norm1(self.drop(x) + attn(x))
        return self.norm2(self.drop(x) + ffn(x))
'''),
                visible="residual stream x itself", hidden="residual stream x itself"),
    WrongAnswer(cell="ex5_encoder_block", name="dropout on the whole sum (drop(x + f))",
                code=_blk(pre='''        if self.norm_first:
            x = self.drop(x + attn(self.norm1(x)))
            return self.drop(x + ffn(self.norm2(x)))
''', post='''        x = self.norm1(self.drop(x + attn(x)))
        return self.norm2(self.drop(x + ffn(x)))
'''),
                visible="on the whole sum", hidden="whole sum"),
    WrongAnswer(cell="ex5_encoder_block", name="post-norm: dropout after the LayerNorm",
                code=_blk(post='''        x = self.drop(self.norm1(x + attn(x)))
        return self.drop(self.norm2(x + ffn(x)))
'''),
                visible="after the LayerNorm", hidden="after the LayerNorm"),
]

WRONG_ANSWERS = EX1 + EX2 + EX3 + EX4 + EX5

# Wrong answers tried in the second review of exercise 5 (each must get its own hint).
EX5_REVIEW = [
    WrongAnswer(cell="ex5_encoder_block", name="in-place residual add (x += ...) edits the caller's tensor",
                code=_blk(pre='''        if self.norm_first:
            x += self.drop(attn(self.norm1(x)))
            x += self.drop(ffn(self.norm2(x)))
            return x
'''),
                visible="changed its input x in place", hidden="changed its input x in place"),
    WrongAnswer(cell="ex5_encoder_block", name="dropout on the sub-layer's input (f(drop(LN(x))))",
                code=_blk(pre='''        if self.norm_first:
            x = x + attn(self.drop(self.norm1(x)))
            return x + ffn(self.drop(self.norm2(x)))
''', post='''        x = self.norm1(x + attn(self.drop(x)))
        return self.norm2(x + ffn(self.drop(x)))
'''),
                visible="sub-layer's INPUT", hidden="sub-layer's INPUT"),
    WrongAnswer(cell="ex5_encoder_block", name="norm1 and norm2 swapped",
                code=_blk(pre=_RIGHT_PRE.replace("norm1", "NORMX").replace("norm2", "norm1").replace("NORMX", "norm2"),
                          post=_RIGHT_POST.replace("norm1", "NORMX").replace("norm2", "norm1").replace("NORMX", "norm2")),
                visible="norm1 and norm2 are swapped", hidden="norm1 and norm2 are swapped"),
    WrongAnswer(cell="ex5_encoder_block", name="mask inverted (~mask)",
                code=_blk(head="        attn = lambda h: self.attn(h, mask=None if mask is None else ~mask)\n"),
                visible="the mask is inverted", hidden="the mask is inverted"),
    WrongAnswer(cell="ex5_encoder_block", name="the library's EncoderBlock under another name",
                code=_INIT + '''        import transformer_lab.blocks as bk
        lib = getattr(bk, "Encoder" + "Block")(self.w1.in_features, self.attn.n_heads, self.w1.out_features,
                  dropout=self.drop.p, activation="relu", norm_first=self.norm_first)
        lib.load_state_dict({k.replace("norm1", "res_attn.norm").replace("norm2", "res_ffn.norm")
                             .replace("w1", "ffn.w1").replace("w2", "ffn.w2"): v for k, v in self.state_dict().items()})
        lib.res_attn.drop = lib.res_ffn.drop = self.drop
        lib.ffn.drop = nn.Identity()
        lib.train(self.training)
        return lib(x, mask=mask)
''',
                visible="something other than self.drop", hidden="EncoderBlock (its forward) is blocked"),
    WrongAnswer(cell="ex5_encoder_block", name="dropout applied twice on each branch",
                code=_blk(pre=_RIGHT_PRE.replace("self.drop(", "self.drop(self.drop("). replace(")))\n", "))))\n"),
                          post=_RIGHT_POST.replace("self.drop(", "self.drop(self.drop(").replace(")))\n", "))))\n")),
                visible="dropout was applied twice", hidden="dropout was applied twice"),
    WrongAnswer(cell="ex5_encoder_block", name="F.dropout(t, self.drop.p, self.training) instead of self.drop",
                code=_blk(pre=_RIGHT_PRE.replace("self.drop(", "F.dropout(").replace(")))\n", "), self.drop.p, self.training))\n"),
                          post=_RIGHT_POST.replace("self.drop(", "F.dropout(").replace(")))\n", "), self.drop.p, self.training))\n")),
                visible="something other than self.drop", hidden="something other than self.drop"),
]
WRONG_ANSWERS = WRONG_ANSWERS + EX5_REVIEW

# Wrong answers tried in the second review of exercises 1-4.
EX1_4_REVIEW = [
    WrongAnswer(cell="ex1_layer_norm", name="PyTorch's LayerNorm under another name (torch.native_layer_norm)",
                code=_ln("    return torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)[0]\n"),
                visible=None, hidden="torch.native_layer_norm is blocked"),
    WrongAnswer(cell="ex1_layer_norm", name="GroupNorm with one group on the flattened tokens",
                code=_ln("    return F.group_norm(x.reshape(-1, x.shape[-1]), 1, gamma, beta, eps).reshape(x.shape)\n"),
                visible="layer_norm of a constant vector", hidden="group_norm is blocked"),
    WrongAnswer(cell="ex1_layer_norm", name="in-place x -= mean edits the caller's tensor",
                code=_ln('''    x -= x.mean(dim=-1, keepdim=True)
    var = x.pow(2).mean(dim=-1, keepdim=True)
    return gamma * x / torch.sqrt(var + eps) + beta
'''),
                visible="changed its input x in place", hidden=None),
    WrongAnswer(cell="ex2_swiglu_ffn", name="SiLU after the product (silu(W1 x * W3 x))",
                code=_sw("    return F.silu((x @ w1.T) * (x @ w3.T)) @ w2.T\n"),
                visible="the SiLU went on the product", hidden="the SiLU went on the product"),
    WrongAnswer(cell="ex2_swiglu_ffn", name="SiLU on both branches",
                code=_sw("    return (F.silu(x @ w1.T) * F.silu(x @ w3.T)) @ w2.T\n"),
                visible="the SiLU went on both projections", hidden="the SiLU went on both projections"),
    WrongAnswer(cell="ex3_mean_pool", name="boolean indexing h[mask].mean(0): one vector for the batch",
                code=_mp("    return h[padding_mask].mean(dim=0)\n"),
                visible="wrong shape", hidden="wrong shape: expected (4, 5), got (5,)"),
    WrongAnswer(cell="ex3_mean_pool", name="the first token ([CLS]) instead of the mean",
                code=_mp("    return h[:, 0]\n"),
                visible="that is the first token", hidden="that is the first token"),
    WrongAnswer(cell="ex4_sublayer_connection", name="pre-norm normalised twice (norm(x + f(norm(x))))",
                code=_sc("    if norm_first:\n        return norm(x + sublayer(norm(x)))\n    return norm(x + sublayer(x))\n"),
                visible="that is normalised twice", hidden="that is normalised twice"),
    WrongAnswer(cell="ex4_sublayer_connection", name="no residual (f(norm(x)) / norm(f(x)))",
                code=_sc("    if norm_first:\n        return sublayer(norm(x))\n    return norm(sublayer(x))\n"),
                visible="the residual is missing", hidden="the residual is missing"),
]
WRONG_ANSWERS = WRONG_ANSWERS + EX1_4_REVIEW

# Cutting the gradient: the output is right, so only the visible gradient check can see it
# (the hidden driver runs the block under torch.no_grad()); section 12 could not train such a block.
EX5_GRAD = [
    WrongAnswer(cell="ex5_encoder_block", name="forward under torch.no_grad()",
                code=_INIT + "        with torch.no_grad():\n" + "\n".join(
                    "    " + line if line else line for line in (_RIGHT_PRE + _RIGHT_POST).split("\n")),
                visible="the output carries no gradient", hidden=None),
    WrongAnswer(cell="ex5_encoder_block", name="residual detached (x.detach() + ...)",
                code=_blk(pre='''        if self.norm_first:
            x = x.detach() + self.drop(attn(self.norm1(x)))
            return x.detach() + self.drop(ffn(self.norm2(x)))
'''),
                visible="the gradient with respect to x", hidden=None),
]
WRONG_ANSWERS = WRONG_ANSWERS + EX5_GRAD
