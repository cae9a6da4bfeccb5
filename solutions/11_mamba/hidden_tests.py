"""Hidden tests of lecture 11, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's functions that contain it, and PyTorch's cumulative shortcuts)
does not exist. See ``autograder/hidden.py``. The cases vary what the exercises state and the
visible tests check: shapes, dtypes, one step size per channel, odd and long lengths, negative
a, D = None, and the errors for a step size that is not positive, shapes that differ, an empty
sequence and a state size that does not match; gradients through the scan on the short float64
cases; inputs left unchanged.
"""

import math

import torch
from autograder.hidden import Case, HiddenTest

from transformer_lab import ssm as S

# --------------------------------------------------------------------------- ex1: discretize


def zoh_reference(A, B, delta):
    return S.discretize_zoh(A, B, delta)


def zoh_cases(rng):
    A = -torch.rand(3, 5, generator=rng, dtype=torch.float64) * 4 - 0.05
    B = torch.randn(3, 5, generator=rng, dtype=torch.float64)
    yield Case("A (3, 5) negative, B (3, 5), float64, delta 0.25", A, B, 0.25)
    A = -torch.rand(4, 2, generator=rng) * 8 - 0.1
    B = torch.randn(4, 2, generator=rng)
    delta = torch.exp(torch.rand(4, 1, generator=rng) * 6 - 5)  # log-uniform in [e^-5, e]
    yield Case("A (4, 2) float32, one step size per channel (delta (4, 1))", A, B, delta)
    A = -(torch.arange(6, dtype=torch.float64) + 1).expand(2, 6).clone()  # S4D-Real
    B = torch.ones(2, 6, dtype=torch.float64)
    yield Case("S4D-Real A = -(k + 1), B = 1, delta 3.0 (a large step)", A, B, 3.0)
    A = -torch.rand(7, generator=rng, dtype=torch.float64) - 0.5
    yield Case("1-D A (7,), float64, delta 1e-3 (a small step)", A, torch.randn(7, generator=rng, dtype=torch.float64), 1e-3)
    yield Case("delta 0 must raise ValueError", A, A.clone(), 0.0, raises=ValueError)
    yield Case("delta -0.1 must raise ValueError", A, A.clone(), -0.1, raises=ValueError)
    yield Case("a delta tensor with one negative entry must raise ValueError", -torch.rand(3, 2, generator=rng) - 0.1,
               torch.randn(3, 2, generator=rng), torch.tensor([[0.1], [-0.2], [0.3]]), raises=ValueError)


def _zoh_euler(A, B, delta):
    return S.discretize_euler(A, B, delta)


def _zoh_delta_b(A, B, delta):
    return torch.exp(delta * A), delta * B + 0 * A


def _zoh_no_div(A, B, delta):
    A_bar = torch.exp(delta * A)
    return A_bar, (A_bar - 1) * B


def _zoh_sign(A, B, delta):
    A_bar = torch.exp(delta * A)
    return A_bar, (1 - A_bar) / A * B


def _zoh_div_delta_a(A, B, delta):
    A_bar = torch.exp(delta * A)
    return A_bar, (A_bar - 1) / (delta * A) * B


def _zoh_no_delta(A, B, delta):
    A_bar = torch.exp(A)
    return A_bar, (A_bar - 1) / A * B


# --------------------------------------------------------------------------- ex2: blelloch_scan


def drive_scan(fn, a, b):
    """Runs in the learner's process: the scan, and how many tensor operations it made."""
    from torch.overrides import TorchFunctionMode

    class CountOps(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with CountOps() as counter:
        h = fn(a, b)
    out = {"h": h, "ops": counter.n}
    if a.dtype == torch.float64 and 1 < a.shape[1] <= 64:   # gradients must flow through the scan
        a_g, b_g = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        try:
            with torch.enable_grad():
                h_g = fn(a_g, b_g)
            if not (isinstance(h_g, torch.Tensor) and h_g.requires_grad):
                out["grad"] = "h does not require grad: the scan cut the graph"
            else:
                w = torch.linspace(-1, 1, h_g.numel(), dtype=h_g.dtype).reshape(h_g.shape)
                with torch.enable_grad():
                    g_a, g_b = torch.autograd.grad((h_g * w).sum(), (a_g, b_g), allow_unused=True)
                out["grad"] = [torch.zeros_like(a_g) if g_a is None else g_a, torch.zeros_like(b_g) if g_b is None else g_b]
        except RuntimeError as err:
            out["grad"] = f"backward failed: {err}"
    return out


def _op_limit(L):
    return 200 * (math.ceil(math.log2(L)) + 1) if L > 1 else 200


def scan_reference(a, b):
    out = {"h": S.sequential_scan(a, b), "ops": _op_limit(a.shape[1])}
    if a.dtype == torch.float64 and 1 < a.shape[1] <= 64:
        a_g, b_g = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with torch.enable_grad():
            h_g = S.sequential_scan(a_g, b_g)
            w = torch.linspace(-1, 1, h_g.numel(), dtype=h_g.dtype).reshape(h_g.shape)
            out["grad"] = list(torch.autograd.grad((h_g * w).sum(), (a_g, b_g)))
    return out


def scan_cases(rng):
    for shape, dtype, what in (((2, 7, 3), torch.float64, "L = 7 (odd)"),
                               ((1, 1, 4), torch.float64, "L = 1"),
                               ((3, 2), torch.float64, "(B, L) = (3, 2), no trailing dims"),
                               ((2, 37, 2, 3), torch.float32, "L = 37, two trailing dims, float32"),
                               ((1, 1000, 4), torch.float64, "L = 1000 (not a power of two)"),
                               ((2, 1024, 8), torch.float32, "L = 1024, float32"),
                               ((1, 4096, 2), torch.float32, "L = 4096, float32")):
        a = torch.rand(*shape, generator=rng, dtype=dtype) * 2 - 1   # negative a too
        b = torch.randn(*shape, generator=rng, dtype=dtype)
        yield Case(f"random a in [-1, 1), b, shape {shape}: {what}", a, b)
    a = torch.exp(-torch.rand(1, 3000, 4, generator=rng))       # products underflow: shortcuts fail here
    b = torch.randn(1, 3000, 4, generator=rng)
    yield Case("L = 3000, a = exp(-U[0, 1)) (Mamba-like decays), float32", a, b)
    yield Case("a (2, 3, 4) and b (2, 4, 4) must raise ValueError", torch.rand(2, 3, 4, generator=rng),
               torch.rand(2, 4, 4, generator=rng), raises=ValueError)
    yield Case("an empty sequence (L = 0) must raise ValueError", torch.rand(2, 0, 4), torch.rand(2, 0, 4),
               raises=ValueError)


def check_scan(got, expected, case):
    a, b = case.args
    h = got.get("h") if isinstance(got, dict) else None
    if not isinstance(h, torch.Tensor):
        raise AssertionError(f"{case.label}: blelloch_scan returned {type(h).__name__}; expected a tensor h")
    ref = expected["h"]
    if h.shape != ref.shape or h.dtype != ref.dtype:
        raise AssertionError(f"{case.label}: expected h of shape {tuple(ref.shape)} and dtype {ref.dtype}; "
                             f"got {tuple(h.shape)}, {h.dtype}")
    tol = dict(atol=1e-9, rtol=1e-7) if ref.dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    if not torch.allclose(h, ref, **tol):
        hint = "compare with the loop h_t = a_t * h_{t-1} + b_t on a short case"
        excl = torch.cat([torch.zeros_like(b[:, :1]), ref[:, :-1]], 1)
        if not torch.isfinite(h).all():
            hint = "your result has inf or NaN: a cumprod / division shortcut underflows; only multiply and add"
        elif torch.allclose(h, excl, **tol):
            hint = "you returned h_{t-1} (an exclusive scan): h_t includes b_t, so h_0 = b_0"
        elif torch.allclose(h, S.sequential_scan(torch.ones_like(a), b), **tol):
            hint = "you summed the b's without the a's: the operator is (a, b) o (a', b') = (a a', a' b + b')"
        elif h.shape[1] % 2 == 1 and torch.allclose(h[:, :-1], ref[:, :-1], **tol):
            hint = "all but the last position are right: with an odd L the last element has no partner, fill it in the down-sweep"
        elif h.shape[1] > 1 and torch.allclose(h[:, 1::2], ref[:, 1::2], **tol):
            hint = "the odd positions are right, the even ones are not: h_0 = b_0 and h_t = a_t h_{t-1} + b_t at every even t >= 2"
        else:
            wrong = (~torch.isclose(h, ref, **tol)).reshape(h.shape[0], h.shape[1], -1).any(-1).any(0).nonzero()
            if len(wrong):
                t = int(wrong[0])
                hint = (f"h_{t} (odd, from the up-sweep) is the first wrong state: check the operator's order, "
                        "(a, b) o (a', b') = (a a', a' b + b') with (a, b) the EARLIER step (the later a' multiplies b)"
                        + ("" if t == 1 else ", and that the half-length scan also handles an odd length (the last "
                           "element, without a partner, still needs its state)")
                        if t % 2 else
                        f"h_{t} (even, from the down-sweep) is the first wrong state: h_t = a_t h_(t-1) + b_t takes a_t, "
                        "b_t at the even position t and the odd state just before it")
        err = (h - ref).abs().max().item()
        raise AssertionError(f"{case.label}: h differs from the sequential loop (max error {err:.3g})\n  hint: {hint}")
    if got.get("ops", 0) > expected["ops"]:
        raise AssertionError(
            f"{case.label}: blelloch_scan made {got['ops']} tensor operations for L = {a.shape[1]}; a parallel scan "
            f"makes about 20 per level of the tree, at most {expected['ops']} = 200 (ceil(log2 L) + 1) allowed\n"
            "  hint: a loop over t makes 4 or more operations per step; recurse on the pairs instead")
    if "grad" in expected:
        g = got.get("grad")
        if isinstance(g, str) or g is None:
            hint = ("build new tensors (a_l * a_r, torch.empty_like(b)) instead of writing into a or b" if "in-place" in str(g)
                    else "use plain differentiable operations (no .detach(), no .item(), no torch.no_grad())")
            raise AssertionError(f"{case.label}: gradients do not flow through blelloch_scan ({g})\n  hint: {hint}")
        for name, gg, ref_g in (("a", g[0], expected["grad"][0]), ("b", g[1], expected["grad"][1])):
            if not torch.allclose(gg, ref_g, atol=1e-8, rtol=1e-6):
                raise AssertionError(f"{case.label}: the gradient with respect to {name} differs from the loop's "
                                     f"(max error {(gg - ref_g).abs().max().item():.3g})\n"
                                     "  hint: use plain differentiable operations (no .detach(), no .item(), no torch.no_grad())")


# --------------------------------------------------------------------------- ex3: selective_step


def step_reference(u, delta, A, B, C, D, h):
    return S.selective_scan_step(u, delta, A, B, C, D, h)


def step_cases(rng):
    for Bsz, d_inner, d_state, dtype, with_D in ((2, 3, 4, torch.float64, True), (1, 5, 1, torch.float32, True),
                                                 (4, 2, 6, torch.float64, False), (3, 8, 16, torch.float32, True)):
        u = torch.randn(Bsz, d_inner, generator=rng, dtype=dtype)
        delta = torch.nn.functional.softplus(torch.randn(Bsz, d_inner, generator=rng, dtype=dtype) * 2)
        A = -torch.exp(torch.randn(d_inner, d_state, generator=rng, dtype=dtype))
        B = torch.randn(Bsz, d_state, generator=rng, dtype=dtype)
        C = torch.randn(Bsz, d_state, generator=rng, dtype=dtype)
        D = torch.randn(d_inner, generator=rng, dtype=dtype) if with_D else None
        h = torch.randn(Bsz, d_inner, d_state, generator=rng, dtype=dtype)
        yield Case(f"(B, d_inner, d_state) = ({Bsz}, {d_inner}, {d_state}), {dtype}, "
                   f"{'with D' if with_D else 'D = None'}", u, delta, A, B, C, D, h)
    u, delta = torch.randn(2, 3, generator=rng), torch.rand(2, 3, generator=rng) + 0.1
    A, h = -torch.rand(3, 4, generator=rng) - 0.1, torch.randn(2, 3, 4, generator=rng)
    B, C, D = torch.randn(2, 4, generator=rng), torch.randn(2, 4, generator=rng), torch.randn(3, generator=rng)
    yield Case("B with d_state + 1 = 5 numbers must raise ValueError", u, delta, A, torch.randn(2, 5, generator=rng),
               C, D, h, raises=ValueError)
    yield Case("C with d_state - 1 = 3 numbers must raise ValueError", u, delta, A, B, torch.randn(2, 3, generator=rng),
               D, h, raises=ValueError)
    bad = delta.clone()
    bad[1, 2] = 0.0
    yield Case("a step size of 0 must raise ValueError", u, bad, A, B, C, D, h, raises=ValueError)
    yield Case("negative step sizes must raise ValueError", u, -delta, A, B, C, D, h, raises=ValueError)


def _skip(y, D, u):
    return y if D is None else y + D * u


def _step_euler(u, delta, A, B, C, D, h):
    h_new = (1 + delta.unsqueeze(-1) * A) * h + (delta * u).unsqueeze(-1) * B.unsqueeze(1)
    return _skip((h_new * C.unsqueeze(1)).sum(-1), D, u), h_new


def _step_no_delta_b(u, delta, A, B, C, D, h):
    h_new = torch.exp(delta.unsqueeze(-1) * A) * h + u.unsqueeze(-1) * B.unsqueeze(1)
    return _skip((h_new * C.unsqueeze(1)).sum(-1), D, u), h_new


def _step_no_u(u, delta, A, B, C, D, h):
    h_new = torch.exp(delta.unsqueeze(-1) * A) * h + delta.unsqueeze(-1) * B.unsqueeze(1)
    return _skip((h_new * C.unsqueeze(1)).sum(-1), D, u), h_new


def _step_old_state(u, delta, A, B, C, D, h):
    _, h_new = S.selective_scan_step(u, delta, A, B, C, D, h)
    return _skip((h * C.unsqueeze(1)).sum(-1), D, u), h_new


def _step_no_skip(u, delta, A, B, C, D, h):
    y, h_new = S.selective_scan_step(u, delta, A, B, C, None, h)
    return y, h_new


def _step_zoh_b(u, delta, A, B, C, D, h):
    A_bar = torch.exp(delta.unsqueeze(-1) * A)
    h_new = A_bar * h + ((A_bar - 1) / A) * (u.unsqueeze(-1) * B.unsqueeze(1))
    return _skip((h_new * C.unsqueeze(1)).sum(-1), D, u), h_new


TESTS = [
    HiddenTest(
        cell="ex1_discretize_test",
        function="discretize",
        cases=zoh_cases,
        reference=zoh_reference,
        blocked=[S.discretize_zoh, S.discretize_euler, S.selective_scan, S.selective_scan_step,
                 torch.linalg.matrix_exp, torch.matrix_exp],
        mistakes={"that is Euler (1 + delta A, delta B); zero-order hold is Abar = exp(delta A), "
                  "Bbar = (exp(delta A) - 1) / A * B": _zoh_euler,
                  "delta * B is Mamba's simplified input map; the exercise asks for zero-order hold's "
                  "(exp(delta A) - 1) / A * B": _zoh_delta_b,
                  "(exp(delta A) - 1) * B forgets to divide by A": _zoh_no_div,
                  "the sign: (exp(delta A) - 1) / A is positive for A < 0; you flipped the subtraction": _zoh_sign,
                  "(exp(delta A) - 1) / (delta A) * B leaves out a delta: divide by A only": _zoh_div_delta_a,
                  "exp(A) forgets the step size: Abar = exp(delta * A) (delta broadcasts against A)": _zoh_no_delta},
        hint="Abar = exp(delta * A), Bbar = (Abar - 1) / A * B, element by element, delta broadcasting against A; "
             "raise ValueError when any delta <= 0",
        unchanged=True,
    ),
    HiddenTest(
        cell="ex2_blelloch_scan_test",
        function="blelloch_scan",
        cases=scan_cases,
        reference=scan_reference,
        driver=drive_scan,
        check=check_scan,
        blocked=[S.scan_cumprod, S.sequential_scan, S.parallel_scan, S._blelloch, S.scan_logcumsumexp,
                 S.selective_scan, S.ssm_recurrence, S.ssm_convolution,
                 torch.cumprod, torch.cumsum, torch.logcumsumexp, torch.Tensor.cumprod, torch.Tensor.cumsum,
                 torch.Tensor.logcumsumexp, torch.Tensor.cumprod_, torch.Tensor.cumsum_],
        unchanged=True,
        hint="recurse: combine the pairs (t, t+1), t even, with (a, b) o (a', b') = (a a', a' b + b'), scan the "
             "half-length sequence (it gives h_1, h_3, ...), then fill in h_0 = b_0 and h_t = a_t h_{t-1} + b_t for even t >= 2",
    ),
    HiddenTest(
        cell="ex3_selective_step_test",
        function="selective_step",
        cases=step_cases,
        reference=step_reference,
        blocked=[S.selective_scan_step, S.selective_scan, S.MambaBlock, S.discretize_zoh],
        mistakes={"that is Euler's (1 + delta A) h; Mamba decays the state by exp(delta A)": _step_euler,
                  "the input term is delta_t B_t u_t: you left out delta": _step_no_delta_b,
                  "the input term is delta_t B_t u_t: you left out u": _step_no_u,
                  "the output reads the NEW state: y_t = C_t h_t after the update": _step_old_state,
                  "you forgot the skip D u_t (when D is not None)": _step_no_skip,
                  "the exercise asks for Mamba's delta B input map, not ZOH's (exp(delta A) - 1) / A B": _step_zoh_b},
        unchanged=True,
        outputs=("y", "h_new"),
        hint="A_bar = exp(delta[..., None] * A); h_new = A_bar * h + (delta * u)[..., None] * B[:, None, :]; "
             "y = (h_new * C[:, None, :]).sum(-1) + D * u",
    ),
]
