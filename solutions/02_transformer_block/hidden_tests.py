"""Hidden tests of lecture 02, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with
the library's reference here, and runs the learner's function in a sandboxed process
where that reference (and PyTorch's shortcut for it) does not exist. See
``autograder/hidden.py``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import blocks
from transformer_lab.models import ModelConfig, TransformerClassifier

# --------------------------------------------------------------------------- ex1: layer_norm


def layer_norm_reference(x, gamma, beta, eps=1e-5):
    return blocks.layer_norm(x, gamma, beta, eps=eps)


def layer_norm_cases(rng):
    for shape, dtype, eps in [((3, 4, 10), torch.float64, 1e-5), ((2, 3, 5, 7), torch.float32, 1e-5),
                              ((6,), torch.float64, 1e-5), ((2, 5, 4), torch.float64, 0.5)]:
        x = (torch.randn(*shape, generator=rng) * 5 + 3).to(dtype)
        gamma = (torch.rand(shape[-1], generator=rng) + 0.5).to(dtype)
        beta = torch.randn(shape[-1], generator=rng).to(dtype)
        yield Case(f"x {shape}, {dtype}, eps={eps}", x, gamma, beta, eps=eps)
    # A constant vector (variance 0) must give beta, not nan.
    x = torch.full((2, 3), 7.0, dtype=torch.float64)
    gamma = torch.ones(3, dtype=torch.float64)
    beta = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    yield Case("constant rows (variance 0), float64", x, gamma, beta, eps=1e-5)


def _ln_unbiased(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    return gamma * (x - mu) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=True) + eps) + beta


def _ln_eps_outside(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    sd = x.var(dim=-1, keepdim=True, unbiased=False).sqrt()
    return gamma * (x - mu) / (sd + eps) + beta


def _ln_no_eps(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    return gamma * (x - mu) / x.var(dim=-1, keepdim=True, unbiased=False).sqrt() + beta


def _ln_all_axes(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps) + beta


def _ln_no_affine(x, gamma, beta, eps=1e-5):
    return blocks.layer_norm(x, None, None, eps=eps)


def _ln_over(dims):
    def wrong(x, gamma, beta, eps=1e-5):
        d = tuple(range(x.dim() - 1)) if dims == "leading" else dims
        mu = x.mean(dim=d, keepdim=True)
        return gamma * (x - mu) / torch.sqrt(x.var(dim=d, keepdim=True, unbiased=False) + eps) + beta
    return wrong


def _ln_swapped_affine(x, gamma, beta, eps=1e-5):
    return blocks.layer_norm(x, None, None, eps=eps) * beta + gamma


def _ln_std_eps_outside(x, gamma, beta, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    return gamma * (x - mu) / (x.std(dim=-1, keepdim=True) + eps) + beta


# --------------------------------------------------------------------------- ex2: swiglu_ffn


def swiglu_reference(x, w1, w2, w3):
    """The library's FeedForward (SwiGLU, no bias) with the given weights."""
    d_ff, d = w1.shape
    ref = blocks.FeedForward(d, d_ff, activation="swiglu", bias=False).to(x.dtype)
    with torch.no_grad():
        ref.w1.weight.copy_(w1)
        ref.w2.weight.copy_(w2)
        ref.w3.weight.copy_(w3)
        return ref(x)


def swiglu_cases(rng):
    for lead, d, d_ff, dtype in [((2, 3), 5, 5, torch.float64), ((3, 4), 6, 16, torch.float64),
                                 ((2, 2, 3), 8, 21, torch.float32), ((5,), 4, 10, torch.float64)]:
        w1 = torch.randn(d_ff, d, generator=rng, dtype=dtype)
        w2 = torch.randn(d, d_ff, generator=rng, dtype=dtype)
        w3 = torch.randn(d_ff, d, generator=rng, dtype=dtype)
        x = torch.randn(*lead, d, generator=rng, dtype=dtype)
        square = " (square: d_ff = d)" if d == d_ff else ""
        yield Case(f"x {(*lead, d)}, d_ff={d_ff}{square}, {dtype}", x, w1, w2, w3)


def _swiglu_swapped(x, w1, w2, w3):
    return (F.silu(x @ w3.T) * (x @ w1.T)) @ w2.T


def _swiglu_sigmoid(x, w1, w2, w3):
    return (torch.sigmoid(x @ w1.T) * (x @ w3.T)) @ w2.T


def _swiglu_no_t_on_w2(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2


def _swiglu_no_t(x, w1, w2, w3):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _swiglu_no_t_on_w1_w3(x, w1, w2, w3):
    return (F.silu(x @ w1) * (x @ w3)) @ w2.T


def _swiglu_relu(x, w1, w2, w3):
    return (F.relu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _swiglu_no_gate(x, w1, w2, w3):
    return F.silu(x @ w1.T) @ w2.T


def _swiglu_silu_on_product(x, w1, w2, w3):
    return F.silu((x @ w1.T) * (x @ w3.T)) @ w2.T


def _swiglu_silu_on_both(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * F.silu(x @ w3.T)) @ w2.T


# --------------------------------------------------------------------------- ex3: mean_pool


def mean_pool_reference(h, padding_mask):
    """The library's classifier pooling (pooling="mean")."""
    clf = TransformerClassifier(ModelConfig(vocab_size=5, d_model=h.shape[-1], n_heads=1, n_layers=1,
                                            n_classes=2, pooling="mean"))
    return clf.pool(h, padding_mask)


def mean_pool_cases(rng):
    for B, L, d, dtype in [(4, 7, 5, torch.float64), (2, 1, 3, torch.float32), (5, 9, 2, torch.float32)]:
        h = torch.randn(B, L, d, generator=rng, dtype=dtype) * 3
        mask = torch.rand(B, L, generator=rng) < 0.6
        mask[0] = True                                  # one full sequence
        what = "sequence 0 full"
        if B > 2:
            mask[1] = False                             # one sequence with no real token -> zeros
            what += ", sequence 1 all padding"
        yield Case(f"h ({B}, {L}, {d}), {dtype}, {what}", h, mask)


def _pool_weights(h, padding_mask):
    return padding_mask.to(h.dtype).unsqueeze(-1)


def _pool_first_token(h, padding_mask):
    return h[:, 0]


def _pool_padding_averaged(h, padding_mask):
    return h.mean(dim=1)


def _pool_divided_by_L(h, padding_mask):
    return (h * _pool_weights(h, padding_mask)).sum(dim=1) / h.shape[1]


def _pool_no_clamp(h, padding_mask):
    w = _pool_weights(h, padding_mask)
    return (h * w).sum(dim=1) / w.sum(dim=1)


def _pool_sum(h, padding_mask):
    return (h * _pool_weights(h, padding_mask)).sum(dim=1)


def _pool_batch_count(h, padding_mask):
    w = _pool_weights(h, padding_mask)
    return (h * w).sum(dim=1) / w.sum().clamp_min(1.0)


def _pool_inverted(h, padding_mask):
    w = (~padding_mask).to(h.dtype).unsqueeze(-1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


# --------------------------------------------------------------------------- ex4: sublayer_connection


def drive(fn, x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    """Runs in the learner's process: builds the sub-layer and the norm from data, calls
    ``fn(x, sublayer, norm, norm_first)``, and counts the sub-layer's calls.

    With ``ffn = (w1, b1, w2, b2)``: sub-layer Linear -> GELU -> Linear, norm a LayerNorm
    with ``norm_weight``/``norm_bias``. With ``a``: norm(t) = a t - 1, sub-layer 3 sin(t).
    """
    if a is None:
        d, d_ff = x.shape[-1], ffn[0].shape[0]
        norm = nn.LayerNorm(d).to(x.dtype)
        sub = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)).to(x.dtype)
        with torch.no_grad():
            norm.weight.copy_(norm_weight)
            norm.bias.copy_(norm_bias)
            for p, value in zip(sub.parameters(), ffn, strict=True):
                p.copy_(value)
    else:
        def norm(t):
            return a * t - 1.0

        def sub(t):
            return torch.sin(t) * 3

    calls = []

    def counted(t):
        calls.append(1)
        return sub(t)

    with torch.no_grad():
        out = fn(x, counted, norm, norm_first)
    return out, len(calls)


def _build(x, norm_weight, norm_bias, ffn, a):
    """(sub-layer, norm) on the trusted side, as ``drive`` builds them."""
    if a is not None:
        return (lambda t: torch.sin(t) * 3), (lambda t: a * t - 1.0)
    d, d_ff = x.shape[-1], ffn[0].shape[0]
    sub = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)).to(x.dtype)
    norm = nn.LayerNorm(d).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(norm_weight)
        norm.bias.copy_(norm_bias)
        for p, value in zip(sub.parameters(), ffn, strict=True):
            p.copy_(value)
    return sub, norm


def sublayer_reference(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    """(output, number of sub-layer calls): the library's Residual, or the formula for the lambdas."""
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        if a is not None:  # non-LayerNorm callables: the composition order must be exact
            return (x + sub(norm(x)) if norm_first else norm(x + sub(x))), 1
        res = blocks.Residual(x.shape[-1], norm_first=norm_first).to(x.dtype)
        res.norm.load_state_dict(norm.state_dict())
        return res(x, sub), 1


def sublayer_cases(rng):
    for nf in (True, False):
        for dtype in (torch.float32, torch.float64):
            norm_weight = torch.rand(6, generator=rng, dtype=dtype) + 0.5
            norm_bias = torch.randn(6, generator=rng, dtype=dtype)
            ffn = tuple(torch.randn(*shape, generator=rng, dtype=dtype) * 0.5
                        for shape in [(12, 6), (12,), (6, 12), (6,)])
            x = torch.randn(3, 5, 6, generator=rng, dtype=dtype) * 2
            show = {"x": x, "sublayer": "Linear(6, 12) -> GELU -> Linear(12, 6), random weights",
                    "norm": "LayerNorm(6), random weight and bias", "norm_first": nf}
            yield Case(f"x (3, 5, 6), {dtype}, Linear-GELU-Linear sub-layer, LayerNorm, norm_first={nf}",
                       x, nf, norm_weight, norm_bias, ffn, show=show)
    a = round(float(torch.rand(1, generator=rng)) + 1.5, 4)
    x = torch.randn(2, 3, generator=rng, dtype=torch.float64)
    for nf in (True, False):
        show = {"x": x, "sublayer": "lambda t: 3 * sin(t)", "norm": f"lambda t: {a} * t - 1",
                "norm_first": nf}
        yield Case(f"x (2, 3), float64, norm(t) = {a} t - 1, sublayer(t) = 3 sin(t), norm_first={nf}",
                   x, nf, a=a, show=show)


def _sublayer_swapped(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    return sublayer_reference(x, not norm_first, norm_weight, norm_bias, ffn, a)


def _sublayer_residual_from_norm(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        if norm_first:
            h = norm(x)
            return h + sub(h), 1
        return norm(x + sub(x)), 1


def _sublayer_norm_on_branch(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        if norm_first:
            return x + sub(norm(x)), 1
        return x + norm(sub(x)), 1


def _sublayer_no_norm_in_pre(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        return (x + sub(x) if norm_first else norm(x + sub(x))), 1


def _sublayer_norm_then_add(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        return (x + sub(norm(x)) if norm_first else norm(x) + sub(x)), 1


def _sublayer_norm_twice(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        return (norm(x + sub(norm(x))) if norm_first else norm(x + sub(x))), 1


def _sublayer_no_residual(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    sub, norm = _build(x, norm_weight, norm_bias, ffn, a)
    with torch.no_grad():
        return (sub(norm(x)) if norm_first else norm(sub(x))), 1


def _sublayer_called_twice(x, norm_first, norm_weight=None, norm_bias=None, ffn=None, a=None):
    out, _ = sublayer_reference(x, norm_first, norm_weight, norm_bias, ffn, a)
    return out, 2


# --------------------------------------------------------------------------- ex5: MyEncoderBlock

#: The learner's parameter names -> the library EncoderBlock's.
_LIBRARY_NAMES = {"w1.": "ffn.w1.", "w2.": "ffn.w2.", "norm1.": "res_attn.norm.", "norm2.": "res_ffn.norm."}


def drive_block(fn, x, mask, norm_first, dropout, state, sizes):
    """Runs in the learner's process: builds ``fn(d_model, n_heads, d_ff, dropout=..., norm_first=...)``
    (the learner's class), loads ``state`` (plain tensors, the learner's parameter names), and returns
    (its output in eval(), its output in train() with every nn.Dropout child replaced by "multiply
    by 0.5" and the attention's own dropout off). The random generator is seeded before each call,
    so a dropout that stays on in eval() gives a reproducible output."""
    import torch
    from torch import nn

    d_model, n_heads, d_ff = sizes
    block = fn(d_model, n_heads, d_ff, dropout=dropout, norm_first=norm_first).to(x.dtype)
    block.load_state_dict(state)
    block.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        out_eval = block(x, mask=mask)

    class Half(nn.Module):  # stands in for nn.Dropout: where it sits shows in the output
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, t):
            return 0.5 * t if self.training else t

    for name, child in list(block.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(block, name, Half(child.p))
    if hasattr(block, "attn") and hasattr(block.attn, "dropout"):
        block.attn.dropout = 0.0
    block.train()
    with torch.no_grad():
        torch.manual_seed(0)
        out_train = block(x, mask=mask)
    return out_eval, out_train


def _library_block(norm_first, dropout, state, sizes, dtype):
    d_model, n_heads, d_ff = sizes
    ref = blocks.EncoderBlock(d_model, n_heads, d_ff, dropout=dropout, activation="relu",
                              norm_first=norm_first).to(dtype)
    renamed = {}
    for k, v in state.items():
        for mine, lib in _LIBRARY_NAMES.items():
            if k.startswith(mine):
                k = lib + k[len(mine):]
        renamed[k] = v
    ref.load_state_dict(renamed)
    return ref


def _block_by_hand(ref, x, mask, norm_first, c=1.0, wrong=None, drop=None):
    """The block step by step from the library block's parts; ``c`` is dropout's stand-in factor,
    ``drop`` (a function) replaces it when given; ``wrong`` names a known mistake."""
    scale = drop or (lambda t: c * t)

    def attn(h):
        if wrong == "mask inverted":
            return ref.attn(h, mask=None if mask is None else ~mask)
        return ref.attn(h, mask=None if wrong == "mask ignored" else mask)

    def ffn(h):
        a = ref.ffn.w1(h)
        a = a if wrong == "no activation" else (F.gelu(a) if wrong == "gelu" else F.relu(a))
        return ref.ffn.w2(a)

    n1, n2 = ref.res_attn.norm, ref.res_ffn.norm
    parts = [(attn, n1), (ffn, n1 if wrong == "one norm" else n2)]
    if wrong == "norms swapped":
        parts = [(attn, n2), (ffn, n1)]
    pre = norm_first != (wrong == "swapped")
    for f, norm in parts:
        if pre:
            if wrong == "residual after norm":
                h = norm(x)
                x = h + scale(f(h))
            elif wrong == "dropout on skip":
                x = scale(x) + f(norm(x))
            elif wrong == "dropout on sum":
                x = scale(x + f(norm(x)))
            elif wrong == "dropout on input":
                x = x + f(scale(norm(x)))
            else:
                x = x + scale(f(norm(x)))
        else:
            if wrong == "norm on branch":
                x = x + scale(norm(f(x)))
            elif wrong == "dropout on skip":
                x = norm(scale(x) + f(x))
            elif wrong == "dropout on sum":
                x = norm(scale(x + f(x)))
            elif wrong == "dropout after norm":
                x = scale(norm(x + f(x)))
            elif wrong == "norm then add":
                x = norm(x) + scale(f(x))
            elif wrong == "dropout on input":
                x = norm(x + f(scale(x)))
            else:
                x = norm(x + scale(f(x)))
    return x


def _block_outputs(x, mask, norm_first, dropout, state, sizes, wrong=None, train_c=0.5, eval_wrong=None,
                   dropout_always=False):
    ref = _library_block(norm_first, dropout, state, sizes, x.dtype)
    ref.attn.dropout = 0.0
    with torch.no_grad():
        if dropout_always:  # F.dropout(t, p) in forward: on in eval() too (seeded as the driver does)
            torch.manual_seed(0)
            out_eval = _block_by_hand(ref, x, mask, norm_first, drop=lambda t: F.dropout(t, dropout, True))
            torch.manual_seed(0)
            out_train = _block_by_hand(ref, x, mask, norm_first, drop=lambda t: F.dropout(t, dropout, True))
            return out_eval, out_train
        out_eval = _block_by_hand(ref, x, mask, norm_first, wrong=eval_wrong or wrong)
        out_train = _block_by_hand(ref, x, mask, norm_first, c=train_c, wrong=wrong)
    return out_eval, out_train


def block_reference(x, mask, norm_first, dropout, state, sizes):
    """(eval output, train output with dropout as "x 0.5"): the library's EncoderBlock in eval(), and
    the same parts step by step with the stand-in (checked equal to the library's at factor 1)."""
    ref = _library_block(norm_first, dropout, state, sizes, x.dtype).eval()
    with torch.no_grad():
        out_eval = ref(x, mask=mask)
    by_hand_eval, out_train = _block_outputs(x, mask, norm_first, dropout, state, sizes)
    torch.testing.assert_close(by_hand_eval, out_eval)  # the step-by-step version is the library's block
    return out_eval, out_train


def block_cases(rng):
    settings = [((2, 5), (12, 3, 20), torch.float64, False, "padding"),
                ((2, 5), (12, 3, 20), torch.float64, True, "padding"),
                ((3, 4), (8, 2, 16), torch.float32, False, "causal"),
                ((3, 4), (8, 2, 16), torch.float32, True, "causal"),
                ((1, 6), (8, 4, 8), torch.float64, True, "none")]
    for (B, L), sizes, dtype, nf, mask_kind in settings:
        d, _, d_ff = sizes
        state = {
            "attn.qkv.weight": torch.randn(3 * d, d, generator=rng, dtype=dtype) * d ** -0.5,
            "attn.qkv.bias": torch.randn(3 * d, generator=rng, dtype=dtype) * 0.1,
            "attn.out.weight": torch.randn(d, d, generator=rng, dtype=dtype) * d ** -0.5,
            "attn.out.bias": torch.randn(d, generator=rng, dtype=dtype) * 0.1,
            "w1.weight": torch.randn(d_ff, d, generator=rng, dtype=dtype) * d ** -0.5,
            "w1.bias": torch.randn(d_ff, generator=rng, dtype=dtype) * 0.1,
            "w2.weight": torch.randn(d, d_ff, generator=rng, dtype=dtype) * d_ff ** -0.5,
            "w2.bias": torch.randn(d, generator=rng, dtype=dtype) * 0.1,
            "norm1.weight": torch.rand(d, generator=rng, dtype=dtype) + 0.5,
            "norm1.bias": torch.randn(d, generator=rng, dtype=dtype) * 0.5,
            "norm2.weight": torch.rand(d, generator=rng, dtype=dtype) + 0.5,
            "norm2.bias": torch.randn(d, generator=rng, dtype=dtype) * 0.5,
        }
        x = torch.randn(B, L, d, generator=rng, dtype=dtype) * 2 + 1
        if mask_kind == "padding":
            keep = torch.ones(B, L, dtype=torch.bool)
            keep[1, L - 2:] = False
            mask = keep[:, None, None, :]  # (B, 1, 1, L)
        elif mask_kind == "causal":
            mask = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
        else:
            mask = None
        p = round(float(torch.rand(1, generator=rng)) * 0.4 + 0.1, 3)
        label = (f"MyEncoderBlock{sizes + (p,)} with norm_first={nf}, x {(B, L, d)}, {dtype}, "
                 f"{mask_kind} mask")
        show = {"x": x, "mask": mask, "block": f"MyEncoderBlock(d_model={d}, n_heads={sizes[1]}, d_ff={d_ff}, "
                f"dropout={p}, norm_first={nf}), random weights", "train()":
                "self.drop replaced by 'multiply by 0.5', attention dropout off"}
        yield Case(label, x, mask, nf, p, state, sizes, show=show)


def _block_in_place(x, mask, norm_first, dropout, state, sizes):
    """``x += ...`` in pre-norm: the eval() call overwrites the driver's x with its output and returns
    that very tensor; the train() call then starts from it and overwrites it again, so both outputs
    the driver returns are the train() step applied to the eval() output (post-norm's
    ``x = LN(...)`` rebinds and is right)."""
    out_eval, out_train = _block_outputs(x, mask, norm_first, dropout, state, sizes)
    if norm_first:
        _, out_train = _block_outputs(out_eval, mask, norm_first, dropout, state, sizes)
        out_eval = out_train
    return out_eval, out_train


def _block_functional_dropout(x, mask, norm_first, dropout, state, sizes):
    """F.dropout(t, self.drop.p, self.training): right in eval(), but in train() it drops at random
    (the driver's seed) instead of going through self.drop, which the test replaced."""
    out_eval, _ = _block_outputs(x, mask, norm_first, dropout, state, sizes)
    ref = _library_block(norm_first, dropout, state, sizes, x.dtype)
    ref.attn.dropout = 0.0
    with torch.no_grad():
        torch.manual_seed(0)
        out_train = _block_by_hand(ref, x, mask, norm_first, drop=lambda t: F.dropout(t, dropout, True))
    return out_eval, out_train


def _block_mistake(**kw):
    def wrong(x, mask, norm_first, dropout, state, sizes):
        return _block_outputs(x, mask, norm_first, dropout, state, sizes, **kw)
    return wrong


TESTS = [
    HiddenTest(
        cell="ex1_layer_norm_test",
        function="layer_norm",
        cases=layer_norm_cases,
        reference=layer_norm_reference,
        blocked=[blocks.layer_norm, F.layer_norm, torch.layer_norm, nn.LayerNorm,
                 torch.native_layer_norm, F.group_norm, F.instance_norm],
        atol=1e-5, rtol=1e-4,
        mistakes={
            "that is the unbiased variance (divided by d - 1): LayerNorm divides by d "
            "(unbiased=False, or (x - mu).pow(2).mean(-1))":
                _ln_unbiased,
            "eps goes inside the square root: sqrt(var + eps), not sqrt(var) + eps":
                _ln_eps_outside,
            "eps is missing: divide by sqrt(var + eps) (a constant vector has var = 0: without eps, "
            "0/0 = nan)":
                _ln_no_eps,
            "those are statistics over the whole tensor: the mean and variance are over the last "
            "axis only (dim=-1, keepdim=True)":
                _ln_all_axes,
            "gamma and beta are missing: return gamma * x_hat + beta":
                _ln_no_affine,
            "those are statistics over the batch axis (dim 0), BatchNorm's axis: LayerNorm takes them "
            "over the LAST axis (dim=-1), one mean per token":
                _ln_over((0,)),
            "those are BatchNorm's statistics (over every axis but the last, one mean per feature): "
            "LayerNorm takes them over the LAST axis (dim=-1), one mean per token":
                _ln_over("leading"),
            "gamma and beta are swapped: gamma multiplies, beta is added":
                _ln_swapped_affine,
            "x.std(-1) is the unbiased standard deviation (divide by d - 1) and eps is outside the root: "
            "two mistakes (a popular tutorial's LayerNorm); use sqrt(var + eps) with the biased variance":
                _ln_std_eps_outside,
        },
        hint="normalise over the last axis with the biased variance; eps goes inside the square "
             "root: sqrt(var + eps); a constant vector must give beta (no nan)",
    ),
    HiddenTest(
        cell="ex2_swiglu_ffn_test",
        function="swiglu_ffn",
        cases=swiglu_cases,
        reference=swiglu_reference,
        blocked=[blocks.FeedForward, blocks.FeedForward.hidden],
        atol=1e-5, rtol=1e-4,
        mistakes={
            "w1 and w3 are swapped: SiLU goes on W_1 x (the gate), W_3 x is multiplied in "
            "without an activation":
                _swiglu_swapped,
            "that is a GLU with a sigmoid gate: SwiGLU's gate is SiLU(W_1 x) = W_1 x * sigmoid(W_1 x)":
                _swiglu_sigmoid,
            "forgot the .T on w2: weights are in nn.Linear layout (d_model, d_ff), so W_2 h for "
            "a row vector h is h @ w2.T":
                _swiglu_no_t_on_w2,
            "forgot the .T on every weight: they are in nn.Linear's (out, in) layout, so X W is "
            "x @ w.T (for w1, w3 and w2)":
                _swiglu_no_t,
            "forgot the .T on w1 and w3: the weights are in nn.Linear's (out, in) layout, so X W_1 is "
            "x @ w1.T":
                _swiglu_no_t_on_w1_w3,
            "that is a ReLU gate (ReGLU): SwiGLU's gate is SiLU(z) = z * sigmoid(z)":
                _swiglu_relu,
            "the gate is missing: SwiGLU multiplies SiLU(x @ w1.T) by x @ w3.T before w2":
                _swiglu_no_gate,
            "the SiLU went on the product: SwiGLU applies it to x @ w1.T alone, then multiplies by x @ w3.T":
                _swiglu_silu_on_product,
            "the SiLU went on both projections: only the gate x @ w1.T gets it; x @ w3.T is multiplied "
            "in as it is":
                _swiglu_silu_on_both,
        },
        hint="W_2 (SiLU(W_1 x) * W_3 x), weights in nn.Linear layout (out, in): x @ w.T; "
             "any leading axes",
    ),
    HiddenTest(
        cell="ex3_mean_pool_test",
        function="mean_pool",
        cases=mean_pool_cases,
        reference=mean_pool_reference,
        blocked=[TransformerClassifier.pool],
        mistakes={
            "the padding was averaged in: sum h over the real tokens only (h * mask) and divide "
            "by their number":
                _pool_padding_averaged,
            "divided by L: divide by the number of REAL tokens of each sequence, mask.sum(1)":
                _pool_divided_by_L,
            "a sequence with no real token gives 0/0 = nan: clamp the count of real tokens to "
            "at least 1 before dividing (the result is then zeros)":
                _pool_no_clamp,
            "that is the sum over the real tokens: divide it by their number":
                _pool_sum,
            "the mask is inverted: True marks a REAL token (keep it), False marks padding":
                _pool_inverted,
            "that is the first token, h[:, 0] ([CLS] pooling): mean pooling averages all the real tokens":
                _pool_first_token,
            "divided by the number of real tokens in the whole batch: count each sequence's own, "
            "mask.sum(dim=1)":
                _pool_batch_count,
        },
        hint="average over the real tokens only (mask True); a sequence with no real token "
             "gives zeros",
    ),
    HiddenTest(
        cell="ex4_sublayer_connection_test",
        function="sublayer_connection",
        cases=sublayer_cases,
        reference=sublayer_reference,
        driver=drive,
        outputs=("out", "calls"),
        blocked=[blocks.Residual],
        atol=1e-5, rtol=1e-4,
        mistakes={
            "pre-norm and post-norm are swapped: norm_first=True is x + f(norm(x)), "
            "norm_first=False is norm(x + f(x))":
                _sublayer_swapped,
            "the residual adds the ORIGINAL x: pre-norm is x + f(norm(x)), not norm(x) + f(norm(x))":
                _sublayer_residual_from_norm,
            "post-norm normalises the sum: norm(x + f(x)), not x + norm(f(x))":
                _sublayer_norm_on_branch,
            "the sub-layer was called more than once: compute f(...) once and reuse the result":
                _sublayer_called_twice,
            "the sub-layer got x, not norm(x): pre-norm normalises the sub-layer's INPUT, x + f(norm(x))":
                _sublayer_no_norm_in_pre,
            "that is normalised twice, norm(x + f(norm(x))): pre-norm does not normalise the sum, "
            "x + f(norm(x))":
                _sublayer_norm_twice,
            "the residual is missing: add x back, x + f(norm(x)) (pre-norm), norm(x + f(x)) (post-norm)":
                _sublayer_no_residual,
            "the residual was added after the norm, norm(x) + f(x): post-norm normalises the SUM, "
            "norm(x + f(x))":
                _sublayer_norm_then_add,
        },
        hint="pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)); call the sub-layer exactly once",
    ),
    HiddenTest(
        cell="ex5_encoder_block_test",
        function="MyEncoderBlock",
        cases=block_cases,
        reference=block_reference,
        driver=drive_block,
        outputs=("output in eval()", "output in train() (dropout as x 0.5)"),
        blocked=[blocks.EncoderBlock, blocks.DecoderBlock, blocks.Residual, blocks.FeedForward,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder],
        mistakes={
            "pre-norm and post-norm are swapped: norm_first=False is post-norm, LN(x + f(x)); "
            "norm_first=True is pre-norm, x + f(LN(x))":
                _block_mistake(wrong="swapped"),
            "in pre-norm the residual adds the ORIGINAL x: x + f(LN(x)), not LN(x) + f(LN(x))":
                _block_mistake(wrong="residual after norm"),
            "post-norm normalises the SUM: LN(x + f(x)), not x + LN(f(x))":
                _block_mistake(wrong="norm on branch"),
            "post-norm adds after normalising the sum, not before: LN(x + f(x)), not LN(x) + f(x)":
                _block_mistake(wrong="norm then add"),
            "both sub-layers used norm1: the FFN sub-layer has its own LayerNorm, norm2":
                _block_mistake(wrong="one norm"),
            "the FFN has no activation: it is w2(relu(w1(h))), not w2(w1(h))":
                _block_mistake(wrong="no activation"),
            "the FFN uses GELU: this block's FFN is the paper's, w2(relu(w1(h)))":
                _block_mistake(wrong="gelu"),
            "the mask was not used: pass it to the attention, self.attn(h, mask=mask)":
                _block_mistake(wrong="mask ignored"),
            "dropout stays on in eval(): F.dropout(t, p) drops unless you pass training=self.training; "
            "use self.drop, an nn.Dropout, which follows train()/eval()":
                _block_mistake(dropout_always=True),
            "in train() the output is that of a block without dropout on the sub-layers' outputs: apply "
            "self.drop to each sub-layer's output, before the residual add":
                _block_mistake(train_c=1.0),
            "dropout was applied to the residual stream x itself (x -> drop(x)): it goes on the "
            "sub-layer's output only, x + drop(f(...))":
                _block_mistake(wrong="dropout on skip", eval_wrong="none"),
            "dropout was applied to the whole sum, drop(x + f(...)): it goes on the sub-layer's output "
            "only (in post-norm the LayerNorm then undoes it, so it does nothing)":
                _block_mistake(wrong="dropout on sum", eval_wrong="none"),
            "dropout was applied after the LayerNorm, drop(LN(x + f(x))): post-norm is LN(x + drop(f(x)))":
                _block_mistake(wrong="dropout after norm", eval_wrong="none"),
            "norm1 and norm2 are swapped: norm1 goes with the attention sub-layer, norm2 with the FFN":
                _block_mistake(wrong="norms swapped"),
            "the mask is inverted: in this course a boolean mask is True where a query MAY attend "
            "(nn.MultiheadAttention's is the opposite); pass it to self.attn as it is":
                _block_mistake(wrong="mask inverted"),
            "dropout was applied to the sub-layer's INPUT, f(drop(...)): it goes on the sub-layer's "
            "output, x + drop(f(LN(x))) (pre-norm), LN(x + drop(f(x))) (post-norm)":
                _block_mistake(wrong="dropout on input", eval_wrong="none"),
            "dropout was applied twice on a branch (x 0.25 with the x 0.5 stand-in): apply self.drop "
            "once to each sub-layer's output":
                _block_mistake(train_c=0.25),
            "your forward changed its input x in place (x += ...): the second call started from the "
            "first call's output. Write x = x + ... (an in-place edit also breaks autograd's backward)":
                _block_in_place,
            "in train() your block drops at random although self.drop was replaced by a stand-in: it "
            "drops with something other than self.drop (F.dropout, a new nn.Dropout); use self.drop":
                _block_functional_dropout,
        },
        hint="post-norm: x = LN_1(x + drop(MHA(x, mask))), then LN_2(x + drop(FFN(x))); pre-norm: "
             "x = x + drop(MHA(LN_1(x), mask)), then x + drop(FFN(LN_2(x))); FFN = w2(relu(w1(h)))",
    ),
]
