"""ssm.py: ZOH against the exact solution and Euler's instability, the time-invariant SSM's
recurrence against its convolution (diagonal real, complex S4D-Lin, full A; FFT and direct),
the parallel scan against the sequential loop (float32 1e-4, float64 1e-10, L up to 4096) and
through gradcheck, the selective scan against mambapy's parallel scan, the Mamba block's
step-by-step inference against its full forward, the unstable shortcuts failing where the
lecture says, state bytes against the KV cache, selective copying, and errors for bad input.

No test times anything: the scans' speed is measured by the benchmarks.
"""

from __future__ import annotations

import math

import pytest
import torch
from mambapy.pscan import pscan  # a test dependency (pyproject.toml): an independent implementation

from transformer_lab import ssm as S
from transformer_lab.data import IGNORE

F64 = torch.float64


def _ab(shape, dtype=F64, seed=0, lo=-1.0):
    """a in (e^lo, 1] (a stable decay, log a uniform in [lo, 0]), b ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(lo * torch.rand(*shape, generator=g, dtype=F64)).to(dtype)
    b = torch.randn(*shape, generator=g, dtype=F64).to(dtype)
    return a, b


def _selective_inputs(Bsz=2, L=37, d_inner=6, d_state=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, L, d_inner, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(Bsz, L, d_inner, generator=g, dtype=dtype) - 1)
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g, dtype=dtype))
    B = torch.randn(Bsz, L, d_state, generator=g, dtype=dtype)
    C = torch.randn(Bsz, L, d_state, generator=g, dtype=dtype)
    D = torch.randn(d_inner, generator=g, dtype=dtype)
    return u, delta, A, B, C, D


# ---------------------------------------------------------------------------------------
# 1. Discretisation
# ---------------------------------------------------------------------------------------

def test_zoh_is_exact_for_a_constant_input_and_euler_is_not():
    # h' = A h + B u with u = 1, h(0) = 0 has h(t) = (e^{A t} - 1) / A B
    A = torch.tensor([[-0.5, -2.0, -7.0]], dtype=F64)
    B = torch.tensor([[1.0, 0.5, 2.0]], dtype=F64)
    delta, steps = 0.1, 20
    exact = (torch.exp(A * delta * steps) - 1) / A * B
    for disc, tol in ((S.discretize_zoh, 1e-12), (S.discretize_euler, None)):
        A_bar, B_bar = disc(A, B, delta)
        h = torch.zeros_like(A)
        for _ in range(steps):
            h = A_bar * h + B_bar
        if tol is None:
            assert (h - exact).abs().max() > 1e-2  # Euler: a first-order error
        else:
            torch.testing.assert_close(h, exact, rtol=tol, atol=tol)


def test_euler_is_unstable_past_delta_two_over_abs_a_zoh_never():
    A = -torch.tensor([1.0, 10.0, 100.0], dtype=F64)
    B = torch.ones(3, dtype=F64)
    for delta in (0.001, 0.05, 0.3, 3.0):
        zoh, _ = S.discretize_zoh(A, B, delta)
        euler, _ = S.discretize_euler(A, B, delta)
        assert (zoh.abs() < 1).all()  # the discrete system decays as the continuous one does
        assert torch.equal(euler.abs() > 1, delta > 2 / A.abs())  # Euler explodes beyond 2 / |A|


def test_full_matrix_zoh_equals_the_diagonal_formula():
    A = -torch.tensor([0.5, 2.0, 3.0], dtype=F64)
    B = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    Ad, Bd = S.discretize_zoh(A, B, 0.2)
    Af, Bf = S.discretize_zoh(torch.diag(A), B, 0.2)
    torch.testing.assert_close(Af, torch.diag(Ad))
    torch.testing.assert_close(Bf, Bd)
    # a non-diagonal A: the same as in its eigenbasis
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 3, generator=g, dtype=F64) + 3 * torch.eye(3, dtype=F64)
    M = P @ torch.diag(A) @ torch.linalg.inv(P)
    Am, Bm = S.discretize_zoh(M, P @ B, 0.2)
    torch.testing.assert_close(Am, P @ torch.diag(Ad) @ torch.linalg.inv(P))
    torch.testing.assert_close(Bm, P @ Bd)


# ---------------------------------------------------------------------------------------
# 2. Convolution equals recurrence (time-invariant)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["real", "lin", "full"])
@pytest.mark.parametrize("method", ["fft", "direct"])
def test_convolution_equals_recurrence(kind, method):
    g = torch.Generator().manual_seed(1)
    d_inner, d_state, L = 3, 4, 50
    u = torch.randn(2, L, d_inner, generator=g, dtype=F64)
    if kind == "full":
        A = -2 * torch.eye(d_state, dtype=F64) + 0.3 * torch.randn(d_state, d_state, generator=g, dtype=F64)
        A_bar, b = S.discretize_zoh(A, torch.randn(d_state, generator=g, dtype=F64), 0.1)
        A_bar, B_bar = A_bar.expand(d_inner, d_state, d_state), b.expand(d_inner, d_state)
        C = torch.randn(d_inner, d_state, generator=g, dtype=F64)
    else:
        A = S.s4d_init(d_inner, d_state, kind, dtype=F64)
        delta = S.init_delta(d_inner, generator=g, dtype=F64).unsqueeze(-1) * 10
        A_bar, B_bar = S.discretize_zoh(A, torch.ones_like(A), delta)
        C = torch.randn(d_inner, d_state, generator=g, dtype=F64).to(A.dtype)
    y_rec, h = S.ssm_recurrence(u, A_bar, B_bar, C)
    K = S.ssm_kernel(A_bar, B_bar, C, L)
    assert K.shape == (d_inner, L) and not K.is_complex()
    y_conv = S.ssm_convolution(u, K, method)
    torch.testing.assert_close(y_conv, y_rec, rtol=1e-10, atol=1e-10)
    assert h.shape == (2, d_inner, d_state)
    # K_j is the impulse response: feed u = (1, 0, 0, ...)
    imp = torch.zeros(1, L, d_inner, dtype=F64)
    imp[:, 0] = 1
    torch.testing.assert_close(S.ssm_recurrence(imp, A_bar, B_bar, C)[0][0].T, K)


def test_kernel_longer_than_the_input_and_float32():
    A_bar, B_bar = S.discretize_zoh(S.s4d_init(2, 3), torch.ones(2, 3), 0.1)
    C = torch.randn(2, 3)
    u = torch.randn(1, 10, 2)
    K = S.ssm_kernel(A_bar, B_bar, C, 25)
    torch.testing.assert_close(S.ssm_convolution(u, K), S.ssm_recurrence(u, A_bar, B_bar, C)[0],
                               rtol=1e-5, atol=1e-5)


def test_s4d_init_and_delta():
    A = S.s4d_init(2, 4, "lin")
    torch.testing.assert_close(A[1], torch.tensor([complex(-0.5, math.pi * n) for n in range(4)]))
    torch.testing.assert_close(S.s4d_init(2, 4, "real")[0], -torch.arange(1.0, 5.0))
    delta = S.init_delta(1000, 1e-3, 0.1, generator=0)
    assert delta.min() >= 1e-3 and delta.max() <= 0.1
    assert abs(float(delta.log().mean()) - math.log(1e-2)) < 0.2  # log-uniform: mean of logs in the middle


# ---------------------------------------------------------------------------------------
# 4. Scans
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 3, 7, 64, 1000, 4096])
def test_parallel_scan_equals_sequential(L):
    a, b = _ab((2, L, 3), F64, seed=L)
    ref = S.sequential_scan(a, b)
    torch.testing.assert_close(S.parallel_scan(a, b), ref, rtol=0, atol=1e-10)
    a32, b32 = a.float(), b.float()
    torch.testing.assert_close(S.parallel_scan(a32, b32), S.sequential_scan(a32, b32), rtol=0, atol=1e-4)
    assert (S.parallel_scan(a32, b32).double() - ref).abs().max() < 1e-4


def test_scans_with_initial_state_extra_dims_and_negative_a():
    a, b = _ab((2, 33, 3, 4), seed=3)
    a = a * torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(1)) < 0.3, -1, 1)
    h0 = torch.randn(2, 3, 4, dtype=F64)
    ref = S.sequential_scan(a, b, h0)
    assert ref.shape == a.shape
    torch.testing.assert_close(ref[:, 0], a[:, 0] * h0 + b[:, 0])
    torch.testing.assert_close(S.parallel_scan(a, b, h0), ref, rtol=0, atol=1e-12)
    # broadcast (expanded) and non-contiguous inputs
    a1 = a[:1].expand_as(a)
    bt = b.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(S.parallel_scan(a1, bt), S.sequential_scan(a1, b), rtol=0, atol=1e-12)


def test_gradcheck_through_the_parallel_scan():
    a, b = _ab((2, 11, 3), seed=5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(S.parallel_scan, (a, b, h0))
    # and the gradients equal the loop's
    w = torch.randn(2, 11, 3, dtype=F64)
    g_par = torch.autograd.grad((S.parallel_scan(a, b, h0) * w).sum(), (a, b, h0))
    g_seq = torch.autograd.grad((S.sequential_scan(a, b, h0) * w).sum(), (a, b, h0))
    for x, y in zip(g_par, g_seq, strict=True):
        torch.testing.assert_close(x, y)


def test_cumprod_shortcut_overflows_at_L_1024_in_float32():
    a = torch.full((1, 1024, 4), 0.9)
    b = torch.randn(1, 1024, 4, generator=torch.Generator().manual_seed(0))
    ref = S.sequential_scan(a.double(), b.double())
    short = S.scan_cumprod(a[:, :256], b[:, :256])  # 0.9^256 = 2e-12: still representable
    torch.testing.assert_close(short.double(), ref[:, :256], rtol=0, atol=1e-4)
    h = S.scan_cumprod(a, b)  # 0.9^850 < 1e-38: P underflows, 1 / P overflows
    assert not torch.isfinite(h[:, 900:]).any()
    assert torch.isfinite(S.parallel_scan(a, b)).all()


def test_logcumsumexp_shortcut_loses_accuracy_with_length():
    errors = {}
    for L in (64, 1024, 4096):
        a, b = _ab((1, L, 64), seed=7)  # |log a| ~ U[0, 1], Mamba-like decays
        ref = S.sequential_scan(a, b)
        a32, b32 = a.float(), b.float()
        errors[L] = float((S.scan_logcumsumexp(a32, b32).double() - ref).abs().max())
        assert float((S.parallel_scan(a32, b32).double() - ref).abs().max()) < 5e-6
    assert errors[64] < 1e-5  # short sequences: fine
    assert errors[1024] > 1e-5  # past L ~ 1000: many times the stable scan's 1e-6
    assert errors[4096] > 1e-4  # beyond the 1e-4 the parallel scan meets
    # in float64 the same formula is accurate: the loss is rounding, not a wrong formula
    a, b = _ab((1, 1024, 8), seed=7)
    torch.testing.assert_close(S.scan_logcumsumexp(a, b), S.sequential_scan(a, b), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------
# The selective scan
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 16, 37])
def test_selective_scan_equals_mambapy(L):
    u, delta, A, B, C, D = _selective_inputs(L=L, dtype=torch.float32, seed=L)
    # mambapy's layout: pscan(A, X) over (B, L, ED, N); y = hs @ C + D x
    deltaA = torch.exp(delta.unsqueeze(-1) * A)
    BX = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    y_ref = (pscan(deltaA, BX) @ C.unsqueeze(-1)).squeeze(3) + D * u
    torch.testing.assert_close(S.selective_scan(u, delta, A, B, C, D), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.selective_scan(u, delta, A, B, C, D, method="sequential"), y_ref,
                               rtol=1e-5, atol=1e-5)


def test_selective_scan_methods_state_and_steps():
    u, delta, A, B, C, D = _selective_inputs()
    y_par, h_par = S.selective_scan(u, delta, A, B, C, D, return_state=True)
    y_seq, h_seq = S.selective_scan(u, delta, A, B, C, D, method="sequential", return_state=True)
    torch.testing.assert_close(y_par, y_seq, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_par, h_seq, rtol=0, atol=1e-12)
    h = torch.zeros(2, *A.shape, dtype=F64)
    for t in range(u.shape[1]):
        y_t, h = S.selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], D, h)
        torch.testing.assert_close(y_t, y_par[:, t])
    torch.testing.assert_close(h, h_par)
    # splitting the sequence and passing the state on gives the same
    y1, h1 = S.selective_scan(u[:, :20], delta[:, :20], A, B[:, :20], C[:, :20], D, return_state=True)
    y2 = S.selective_scan(u[:, 20:], delta[:, 20:], A, B[:, 20:], C[:, 20:], D, h0=h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_par)
    # without D: no skip
    torch.testing.assert_close(S.selective_scan(u, delta, A, B, C), y_par - D * u)


def test_selection_is_what_a_kernel_cannot_do():
    """A constant delta, B, C gives the time-invariant SSM (its convolution); varying them does not."""
    u, delta, A, B, C, _ = _selective_inputs(Bsz=1, L=20)
    delta = delta[0, 0]  # (d_inner,)
    const = S.selective_scan(u, delta.expand_as(u), A, B[:, :1].expand_as(B), C[:, :1].expand_as(C))
    A_bar = torch.exp(delta.unsqueeze(-1) * A)
    B_bar = delta.unsqueeze(-1) * B[0, 0]
    Cc = C[0, 0].expand_as(A)
    torch.testing.assert_close(const, S.ssm_convolution(u, S.ssm_kernel(A_bar, B_bar, Cc, 20)))


# ---------------------------------------------------------------------------------------
# 5. The Mamba block
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("d_conv", [1, 4])
def test_step_by_step_equals_full_forward(selective, d_conv):
    torch.manual_seed(0)
    blk = S.MambaBlock(8, d_state=4, d_conv=d_conv, selective=selective).double()
    x = torch.randn(2, 13, 8, dtype=F64)
    out, state = blk(x, return_state=True)
    assert out.shape == x.shape
    s, ys = None, []
    for t in range(13):
        y, s = blk.step(x[:, t], s)
        ys.append(y)
        assert s.conv.shape == (2, 16, d_conv - 1) and s.h.shape == (2, 16, 4)  # constant size
    torch.testing.assert_close(torch.stack(ys, 1), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.h, state.h)
    torch.testing.assert_close(s.conv, state.conv)
    # continue from the forward's state: the same as the forward on the longer sequence
    x_next = torch.randn(2, 8, dtype=F64)
    y_next, _ = blk.step(x_next, state)
    torch.testing.assert_close(y_next, blk(torch.cat([x, x_next[:, None]], 1))[:, -1])


def test_short_sequence_state_and_sequential_scan_block():
    torch.manual_seed(1)
    blk = S.MambaBlock(4, d_state=3, d_conv=4, scan="sequential").double()
    x = torch.randn(1, 2, 4, dtype=F64)  # shorter than the convolution's window
    out, state = blk(x, return_state=True)
    s = None
    for t in range(2):
        _, s = blk.step(x[:, t], s)
    torch.testing.assert_close(s.conv, state.conv)
    blk.scan = "parallel"
    torch.testing.assert_close(blk(x), out)


def test_lm_step_equals_forward_and_learns_something():
    torch.manual_seed(0)
    m = S.MambaLM(10, d_model=16, n_layers=2, d_state=4).double()
    x, _ = S.selective_copying(3, length=8, n_memorize=2, generator=0)
    logits = m(x)
    assert logits.shape == (3, 10, 10)
    states, steps = None, []
    for t in range(x.shape[1]):
        lt, states = m.step(x[:, t], states)
        steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-10, atol=1e-10)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_state_bytes_constant_kv_cache_linear():
    m = S.MambaLM(10, d_model=32, n_layers=3, d_state=16, d_conv=4)
    mem = S.memory_per_token(m, 1000)
    assert mem["mamba"] == S.state_bytes(3, 32, 16, 4) == 3 * 64 * (3 + 16) * 4
    assert mem["kv_cache"] == S.kv_cache_bytes(3, 32, 1000) == 2 * 3 * 1000 * 32 * 4
    assert S.memory_per_token(m, 2000)["mamba"] == mem["mamba"]  # does not grow
    assert S.memory_per_token(m, 2000)["kv_cache"] == 2 * mem["kv_cache"]
    assert S.state_bytes(3, 32, dtype=torch.bfloat16) * 2 == S.state_bytes(3, 32)


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------

def test_selective_copying():
    x, y = S.selective_copying(50, length=20, n_memorize=4, vocab_size=8, generator=3)
    assert x.shape == y.shape == (50, 24)
    assert (x[:, 20:] == S.CUE).all() and (y[:, :20] == IGNORE).all()
    ctx = x[:, :20]
    assert ((ctx != S.NOISE).sum(1) == 4).all()  # 4 data tokens among the noise
    for i in range(50):
        assert torch.equal(ctx[i][ctx[i] != S.NOISE], y[i, 20:])  # in order
    assert y[:, 20:].min() >= 2 and y[:, 20:].max() < 8
    x2, _ = S.selective_copying(50, length=20, n_memorize=4, vocab_size=8, generator=3)
    assert torch.equal(x, x2)  # seeded


# ---------------------------------------------------------------------------------------
# Bad input: each error names what was expected and what came
# ---------------------------------------------------------------------------------------

def test_bad_state_size():
    u, delta, A, B, C, D = _selective_inputs(d_state=4)
    with pytest.raises(ValueError, match=r"B must have d_state = 4 .*got 5"):
        S.selective_scan(u, delta, A, torch.randn(2, 37, 5, dtype=F64), C, D)
    with pytest.raises(ValueError, match=r"A must have d_inner = 6 rows .*got shape \(5, 4\)"):
        S.selective_scan(u, delta, A[:5], B, C, D)
    blk = S.MambaBlock(8, d_state=4)
    bad = S.MambaState(torch.zeros(2, 16, 3), torch.zeros(2, 16, 5))
    with pytest.raises(ValueError, match=r"state must be MambaState\(conv \(2, 16, 3\), h \(2, 16, 4\)\).*"
                                         r"got conv \(2, 16, 3\), h \(2, 16, 5\)"):
        blk.step(torch.zeros(2, 8), bad)
    with pytest.raises(ValueError, match=r"C must have d_state = 3"):
        S.ssm_recurrence(torch.zeros(1, 4, 2), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"B must have d_state = 3"):
        S.discretize_zoh(-torch.ones(3), torch.ones(2), 0.1)


def test_bad_initial_state():
    u, delta, A, B, C, D = _selective_inputs(d_state=4)
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, d_inner, d_state\) = \(2, 6, 4\); got \(2, 6, 3\)"):
        S.selective_scan(u, delta, A, B, C, D, h0=torch.zeros(2, 6, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"h0 must have shape .* = \(1, 2, 3\); got \(1, 3\)"):
        S.ssm_recurrence(torch.zeros(1, 4, 2), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                         h0=torch.zeros(1, 3))


def test_half_precision_selective_scan_runs_in_float32():
    u, delta, A, B, C, D = _selective_inputs(dtype=torch.float32)
    y = S.selective_scan(*(t.bfloat16() for t in (u, delta, A, B, C, D)))
    assert y.dtype == torch.bfloat16
    ref = S.selective_scan(*(t.bfloat16().float() for t in (u, delta, A, B, C, D)))
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_bad_delta():
    u, delta, A, B, C, D = _selective_inputs()
    with pytest.raises(ValueError, match=r"delta \(the step size delta\) must be positive.*got min -1"):
        S.selective_scan(u, delta.index_put((torch.tensor(0),) * 3, torch.tensor(-1.0, dtype=F64)),
                         A, B, C, D)
    with pytest.raises(ValueError, match=r"delta .*positive.*got min 0"):
        S.selective_scan(u, torch.zeros_like(delta), A, B, C, D)
    with pytest.raises(ValueError, match=r"delta .*must be positive; got -0.1"):
        S.discretize_zoh(-torch.ones(3), torch.ones(3), -0.1)
    with pytest.raises(ValueError, match=r"delta must have u's shape"):
        S.selective_scan(u, delta[:, :3], A, B, C, D)


def test_bad_empty_sequence():
    for scan in (S.sequential_scan, S.parallel_scan, S.scan_cumprod, S.scan_logcumsumexp):
        with pytest.raises(ValueError, match=r"cannot scan an empty sequence: expected L >= 1 .*\(2, 0, 3\)"):
            scan(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))
    u, delta, A, B, C, D = _selective_inputs(L=0)
    with pytest.raises(ValueError, match=r"cannot scan an empty sequence: expected L >= 1"):
        S.selective_scan(u, delta, A, B, C, D)
    with pytest.raises(ValueError, match=r"a and b must have one shape .*got a \(2, 3, 1\), b \(2, 3\)"):
        S.parallel_scan(torch.zeros(2, 3, 1), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"a must be a floating-point tensor .*got Tensor torch.int64"):
        S.parallel_scan(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_bad_convolution_width():
    with pytest.raises(ValueError, match=r"d_conv must be >= 1 \(the convolution width\); got 0"):
        S.MambaBlock(8, d_conv=0)
    with pytest.raises(TypeError, match=r"d_conv must be an int .*got float 2.0"):
        S.MambaBlock(8, d_conv=2.0)
    with pytest.raises(ValueError, match=r"K must have at least 1 tap .*got shape \(2, 0\)"):
        S.ssm_convolution(torch.zeros(1, 5, 2), torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"d_conv must be >= 1"):
        S.state_bytes(2, 8, d_conv=0)


def test_bad_other_inputs():
    with pytest.raises(ValueError, match=r"method must be 'parallel' or 'sequential'; got 'fast'"):
        S.selective_scan(*_selective_inputs(), method="fast")
    with pytest.raises(ValueError, match=r"method must be 'fft' or 'direct'; got 'x'"):
        S.ssm_convolution(torch.zeros(1, 5, 2), torch.zeros(2, 3), "x")
    with pytest.raises(ValueError, match=r"kind must be 'lin' \(S4D-Lin\) or 'real'"):
        S.s4d_init(2, 2, "complex")
    blk = S.MambaBlock(8)
    with pytest.raises(ValueError, match=r"x must have d_model = 8 on its last dim; got shape \(1, 3, 7\)"):
        blk(torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match=r"x must have 2 dims \(B, d_model\); got shape \(1, 3, 8\)"):
        blk.step(torch.zeros(1, 3, 8))
    m = S.MambaLM(10, 8, 1)
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 10\); got min 0, max 10"):
        m(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match=r"n_memorize must be <= length .*got n_memorize=5, length=4"):
        S.selective_copying(2, length=4, n_memorize=5)
    with pytest.raises(ValueError, match=r"vocab_size must be >= 3 \(NOISE, CUE and at least one data token\)"):
        S.selective_copying(2, vocab_size=2)


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_scans_and_block_match_cpu():
    a, b = _ab((2, 1000, 8), torch.float32, seed=2)
    ref = S.sequential_scan(a, b)
    got = S.parallel_scan(a.cuda(), b.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-4)
    u, delta, A, B, C, D = _selective_inputs(dtype=torch.float32)
    y = S.selective_scan(u, delta, A, B, C, D)
    y_cuda = S.selective_scan(*(t.cuda() for t in (u, delta, A, B, C, D)))
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    blk = S.MambaBlock(8, d_state=4).cuda()
    x = torch.randn(2, 9, 8, device="cuda")
    out = blk(x)
    s, ys = None, []
    for t in range(9):
        yt, s = blk.step(x[:, t], s)
        ys.append(yt)
    assert s.h.device.type == "cuda"
    torch.testing.assert_close(torch.stack(ys, 1), out, rtol=1e-4, atol=1e-4)
