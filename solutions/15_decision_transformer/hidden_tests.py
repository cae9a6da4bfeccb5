"""Hidden tests of lecture 15, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's functions and classes that contain it) does not exist. See
``autograder/hidden.py``. The cases vary what the exercises state and the visible tests check:
dtypes, leading axes, a gate shut or open by its bias, discounts 0 and 1, padded trajectories,
token streams of one step, and, for the evaluation loop, other environments (the slippery
cliff walk and FrozenLake, where the reset seed matters), context lengths 1 to 6, return scales
and targets; each mistake is written as the wrong answer a learner types.

Exercise 4 (``rollout``) goes through a driver (``drive_rollout``, run in the learner's process):
it makes the gymnasium environment and a deterministic policy whose logits depend on everything
it is given (the last and first return-to-go, the last state, the first and last timestep, the
window's length, the earlier actions and the current placeholder), so a wrong window, a wrong
timestep, an unscaled or un-lowered return-to-go or a missing placeholder changes the episode.
"""

import torch
from autograder.hidden import Case, HiddenTest
from torch import nn

from transformer_lab import rl, ssm
from transformer_lab.viz import rl as vz

# --------------------------------------------------------------------------- ex1: gru_gate


def gate_reference(x, y, w, u, gate_bias):
    d = x.shape[-1]
    gate = rl.GRUGate(d, gate_bias).to(x.dtype)
    with torch.no_grad():
        gate.w.weight.copy_(w.reshape(3 * d, d))
        gate.u_rz.weight.copy_(u[:2].reshape(2 * d, d))
        gate.u_h.weight.copy_(u[2])
        return gate(x, y)


def gate_cases(rng):
    def draw(shape, d, dtype, scale=0.8):
        x = torch.randn(*shape, d, generator=rng, dtype=dtype)
        y = torch.relu(torch.randn(*shape, d, generator=rng, dtype=dtype))
        w = torch.randn(3, d, d, generator=rng, dtype=dtype) * scale
        u = torch.randn(3, d, d, generator=rng, dtype=dtype) * scale
        return x, y, w, u

    yield Case("x, y (2, 5, 6) float32, gate_bias 2 (GTrXL's start)", *draw((2, 5), 6, torch.float32), 2.0)
    yield Case("x, y (4, 3) float64 (no batch axis), gate_bias 0.5", *draw((4,), 3, torch.float64), 0.5)
    yield Case("gate_bias 0: the update gate half open", *draw((3, 2), 5, torch.float64, 1.2), 0.0)
    yield Case("gate_bias -3: the gate mostly open, the output mostly the candidate",
               *draw((2, 4), 4, torch.float64), -3.0)
    yield Case("gate_bias 40: the gate shut, the output x", *draw((1, 6), 3, torch.float32), 40.0)
    yield Case("d = 1, x and y (2, 3, 1) float64", *draw((2, 3), 1, torch.float64, 1.5), 1.0)
    yield Case("4-D x, y (2, 2, 3, 7) float32", *draw((2, 2, 3), 7, torch.float32), 1.5)


def _gate_variant(bias_sign=-1, swap=False, reset_after=False, transpose=True, cand=torch.tanh, residual=False,
                  wu_swap=False, rz_swap=False, no_reset=False, xy_swap=False):
    def wrong(x, y, w, u, gate_bias):
        if residual:
            return x + y
        if xy_swap:  # x and y trade places inside the gates; the output still mixes x and c
            r = torch.sigmoid(x @ w[0].T + y @ u[0].T)
            z = torch.sigmoid(x @ w[1].T + y @ u[1].T - gate_bias)
            return (1 - z) * x + z * torch.tanh(x @ w[2].T + (r * y) @ u[2].T)
        if wu_swap:
            w, u = u, w
        if rz_swap:
            w, u = w[[1, 0, 2]], u[[1, 0, 2]]
        mm = (lambda a, m: a @ m.T) if transpose else (lambda a, m: a @ m)
        r = torch.ones_like(x) if no_reset else torch.sigmoid(mm(y, w[0]) + mm(x, u[0]))
        z = torch.sigmoid(mm(y, w[1]) + mm(x, u[1]) + bias_sign * gate_bias)
        c = cand(mm(y, w[2]) + (r * mm(x, u[2]) if reset_after else mm(r * x, u[2])))
        return z * x + (1 - z) * c if swap else (1 - z) * x + z * c
    return wrong


# --------------------------------------------------------------------------- ex2: returns_to_go


def rtg_cases(rng):
    r = -torch.ones(13)
    r[3] = -100.0
    yield Case("one cliff-walk episode (13,) float32 with a fall at step 4, no discounting", r)
    r = torch.randn(4, 9, generator=rng, dtype=torch.float64)
    yield Case("a batch (4, 9) float64, discount 0.99", r, 0.99, show={"rewards": r, "discount": 0.99})
    r = torch.randn(3, 6, generator=rng)
    yield Case("a batch (3, 6) float32, discount 0: the rewards themselves", r, 0.0)
    r = torch.randint(-3, 4, (2, 3, 7), generator=rng).double()
    yield Case("a 3-D batch (2, 3, 7) float64, discount 0.7: time is the last axis", r, 0.7)
    r = torch.zeros(3, 8)
    r[0, :5], r[1, :2], r[2, :8] = -1.0, torch.tensor([-1.0, -100.0]), torch.randn(8, generator=rng)
    yield Case("padded trajectories (3, 8) of lengths 5, 2, 8, discount 1", r, 1.0)
    yield Case("one step (1,) float64, discount 0.5", torch.tensor([-7.0], dtype=torch.float64), 0.5)
    yield Case("discount 1.01 must raise ValueError", torch.randn(5, generator=rng), 1.01, raises=ValueError)
    yield Case("discount -0.5 must raise ValueError", torch.randn(5, generator=rng), -0.5, raises=ValueError)


def _rtg_forward(rewards, discount=1.0):
    return rewards.cumsum(-1)


def _rtg_excludes_now(rewards, discount=1.0):
    return rl.returns_to_go(rewards, discount) - rewards


def _rtg_no_discount(rewards, discount=1.0):
    return rl.returns_to_go(rewards, 1.0)


def _rtg_absolute_powers(rewards, discount=1.0):
    n = rewards.shape[-1]
    powers = discount ** torch.arange(n, dtype=rewards.dtype)
    return torch.stack([(rewards[..., t:] * powers[t:]).sum(-1) for t in range(n)], -1)


def _rtg_discount_now(rewards, discount=1.0):
    return discount * rl.returns_to_go(rewards, discount)


def _rtg_first_axis(rewards, discount=1.0):
    return rl.returns_to_go(rewards.movedim(0, -1), discount).movedim(-1, 0)


# --------------------------------------------------------------------------- ex3: dt_tokens


def tokens_reference(r_emb, s_emb, a_emb, time_emb):
    return rl.interleave(r_emb + time_emb, s_emb + time_emb, a_emb + time_emb), rl.action_positions(s_emb.shape[1])


def tokens_cases(rng):
    for label, (B, n, d), dtype in (("(B, n, d) = (2, 5, 3) float32", (2, 5, 3), torch.float32),
                                    ("one step, (1, 1, 4) float64", (1, 1, 4), torch.float64),
                                    ("(4, 9, 2) float32", (4, 9, 2), torch.float32),
                                    ("(3, 2, 6) float64", (3, 2, 6), torch.float64),
                                    ("(1, 20, 1) float32, n = 20", (1, 20, 1), torch.float32)):
        yield Case(label, *(torch.randn(B, n, d, generator=rng, dtype=dtype) for _ in range(4)))


def _tok(order=(0, 1, 2), time_on=(True, True, True), how="stack", positions="state"):
    def wrong(r_emb, s_emb, a_emb, time_emb):
        B, n, d = s_emb.shape
        src = (r_emb, s_emb, a_emb)
        streams = [src[k] + time_emb if time_on[k] else src[k] for k in range(3)]
        streams = [streams[k] for k in order]
        if how == "cat":
            tokens = torch.cat(streams, dim=1)
        elif how == "features":
            tokens = torch.cat(streams, dim=-1)
        elif how == "last":
            tokens = torch.stack(streams, dim=-1).reshape(B, 3 * n, d)
        else:
            tokens = torch.stack(streams, dim=2).reshape(B, 3 * n, d)
        first = {"state": 1, "action": 2, "return": 0}[positions]
        return tokens, torch.arange(n) * 3 + first
    return wrong


# --------------------------------------------------------------------------- ex4: rollout


def drive_rollout(fn, target, n_ctx, return_scale, seed, t_max, weights, env_id):
    """Runs in the learner's process: a gymnasium env and a deterministic policy, given to fn."""
    import gymnasium as gym

    env = gym.make(env_id, max_episode_steps=t_max)
    calls = []

    def policy(rtg, states, actions, timesteps):
        calls.append(1)
        if len(calls) > t_max:
            raise RuntimeError(f"policy: called more than t_max = {t_max} times in one episode; the episode ends "
                               "when terminated or truncated (the environment's time limit truncates it)")
        for name, t in (("rtg", rtg), ("states", states), ("actions", actions), ("timesteps", timesteps)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != 1:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"policy: {name} must be a (1, n) tensor; got {got}")
        n = states.shape[1]
        if not (rtg.shape[1] == actions.shape[1] == timesteps.shape[1] == n):
            raise ValueError(f"policy: rtg, states, actions, timesteps must all be (1, n); got {tuple(rtg.shape)}, "
                             f"{tuple(states.shape)}, {tuple(actions.shape)}, {tuple(timesteps.shape)}")
        if not 1 <= n <= n_ctx:
            raise ValueError(f"policy: the window must hold 1 to n_ctx = {n_ctx} steps; got {n}")
        if not rtg.is_floating_point() or states.is_floating_point() or actions.is_floating_point() \
                or timesteps.is_floating_point():
            raise TypeError("policy: rtg must be float, states, actions and timesteps integer (long)")
        if rtg.dtype != torch.float32:
            raise TypeError(f"policy: rtg must be float32, as the model's weights are; got {rtg.dtype}")
        feats = torch.tensor([float(rtg[0, -1]), float(rtg[0, 0]), float(states[0, -1]) / 47,
                              float(timesteps[0, -1]) / t_max, float(timesteps[0, 0]) / t_max, n / n_ctx,
                              float(actions[0, :-1].sum()) / (4 * n_ctx), float(actions[0, -1])], dtype=torch.float64)
        out = torch.zeros(1, n, 4, dtype=torch.float64)
        out[0, -1] = torch.cos(weights @ feats)
        return out

    try:
        states, actions, rewards, rtgs = fn(policy, env, target, n_ctx, return_scale, seed)
    finally:
        env.close()
    return (torch.tensor([int(s) for s in states], dtype=torch.long),
            torch.tensor([int(a) for a in actions], dtype=torch.long),
            torch.tensor([float(r) for r in rewards], dtype=torch.float64),
            torch.tensor([float(v) for v in rtgs], dtype=torch.float64))


def _make_rollout(sign=-1, restart_time=False, scale=True, last=True, record_after=False, use_seed=True,
                  placeholder=True):
    def rollout(policy, env, target, n_ctx, return_scale=1.0, seed=0):
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise TypeError(f"target must be a real number; got {type(target).__name__} {target!r}")
        s, _ = env.reset(seed=seed if use_seed else 0)
        states, actions, rewards, rtgs, given = [], [], [], [], []
        rtg, done = float(target), False
        while not done:
            states.append(int(s))
            actions.append(0 if placeholder or not actions else actions[-1])
            given.append(rtg)
            lo = max(0, len(states) - n_ctx)
            r_in = torch.tensor([given[lo:]], dtype=torch.float32) / (return_scale if scale else 1.0)
            t_in = (torch.arange(len(states) - lo) if restart_time else torch.arange(lo, len(states)))[None]
            logits = policy(r_in, torch.tensor([states[lo:]]), torch.tensor([actions[lo:]]), t_in)
            a = int(logits[0, -1 if last else 0].argmax())
            actions[-1] = a
            s, r, terminated, truncated, _ = env.step(a)
            rewards.append(float(r))
            rtg = rtg + sign * float(r)
            rtgs.append(rtg if record_after else given[-1])
            done = terminated or truncated
        return states, actions, rewards, rtgs
    return rollout


_ROLLOUT = _make_rollout()


def rollout_reference(target, n_ctx, return_scale, seed, t_max, weights, env_id):
    return drive_rollout(_ROLLOUT, target, n_ctx, return_scale, seed, t_max, weights, env_id)


def _rollout_mistake(**kw):
    wrong = _make_rollout(**kw)

    def run(target, n_ctx, return_scale, seed, t_max, weights, env_id):
        return drive_rollout(wrong, target, n_ctx, return_scale, seed, t_max, weights, env_id)
    return run


def rollout_cases(rng):
    def w():
        return torch.randn(4, 8, generator=rng, dtype=torch.float64) * 3

    def seed():
        return int(torch.randint(1000, (1,), generator=rng))

    yield Case("CliffWalking-v1, t_max 12, target -13.0, n_ctx 4, return_scale 10",
               -13.0, 4, 10.0, seed(), 12, w(), "CliffWalking-v1")
    yield Case("CliffWalking-v1, t_max 20, target -50.5, n_ctx 1 (a Markov policy), return_scale 1",
               -50.5, 1, 1.0, seed(), 20, w(), "CliffWalking-v1")
    yield Case("CliffWalkingSlippery-v1 (the reset seed matters), t_max 25, int target -200, n_ctx 6, return_scale 100",
               -200, 6, 100.0, seed(), 25, w(), "CliffWalkingSlippery-v1")
    yield Case("FrozenLake-v1 (slippery; reward 1 at the goal), t_max 15, target 1.0, n_ctx 3",
               1.0, 3, 1.0, seed(), 15, w(), "FrozenLake-v1")
    yield Case("FrozenLake-v1, t_max 30, target 0.5, n_ctx 5, return_scale 0.5",
               0.5, 5, 0.5, seed(), 30, w(), "FrozenLake-v1")
    for bad in ("high", None, True):
        yield Case(f"target {bad!r} must raise TypeError (a target return is a number)",
                   bad, 3, 1.0, 0, 5, w(), "CliffWalking-v1", raises=TypeError)


TESTS = [
    HiddenTest(
        cell="ex1_gru_gate_test",
        function="gru_gate",
        cases=gate_cases,
        reference=gate_reference,
        blocked=[rl.GRUGate, rl.GatedBlock, rl.gate_identity_gap, rl.memory_influence, rl.DecisionTransformer,
                 nn.GRUCell, nn.GRU, torch.gru_cell],
        unchanged=True,
        mistakes={
            "the gate bias is missing: g^upd = sigmoid(y W_z^T + x U_z^T - gate_bias)": _gate_variant(bias_sign=0),
            "the gate bias was added: subtract it, so the update gate starts closed": _gate_variant(bias_sign=1),
            "the roles of x and c are swapped: (1 - g^upd) multiplies x, g^upd multiplies the candidate":
                _gate_variant(swap=True),
            "the reset gate multiplies x U_h^T: it must multiply x before U_h, (g^reset * x) @ U_h^T":
                _gate_variant(reset_after=True),
            "the matrices were not transposed: y W^T is y @ w[k].T, as nn.Linear computes": _gate_variant(transpose=False),
            "the candidate uses sigmoid: it is tanh": _gate_variant(cand=torch.sigmoid),
            "that is the residual sum x + y; the gate replaces it": _gate_variant(residual=True),
            "W and U were swapped: the W's multiply the branch's output y, the U's the stream x":
                _gate_variant(wu_swap=True),
            "x and y were swapped inside the gates: the W's multiply the branch's output y, the U's the stream x, "
            "and the reset gate multiplies x": _gate_variant(xy_swap=True),
            "the reset and update gates' matrices were swapped: w[0], u[0] make g^reset, w[1], u[1] g^upd":
                _gate_variant(rz_swap=True),
            "the reset gate is missing: the candidate is tanh(y W_h^T + (g^reset * x) U_h^T)": _gate_variant(no_reset=True),
        },
        hint="g^reset = sigmoid(y W_r^T + x U_r^T), g^upd = sigmoid(y W_z^T + x U_z^T - gate_bias), "
             "c = tanh(y W_h^T + (g^reset x) U_h^T), out = (1 - g^upd) x + g^upd c, in x's dtype",
    ),
    HiddenTest(
        cell="ex2_returns_to_go_test",
        function="returns_to_go",
        cases=rtg_cases,
        reference=rl.returns_to_go,
        blocked=[rl.returns_to_go, rl.OfflineData, rl.window_batches, rl.return_conditioning,
                 ssm.sequential_scan, ssm.parallel_scan, ssm.scan_cumprod, ssm.scan_logcumsumexp],
        unchanged=True,
        mistakes={
            "computed forward: that is the return so far; the return-to-go sums from t to the END": _rtg_forward,
            "R_t leaves out r_t itself: the sum starts at t' = t, R_t = r_t + gamma R_{t+1}": _rtg_excludes_now,
            "the discount is ignored: with gamma < 1 weigh r_t' by gamma^(t' - t)": _rtg_no_discount,
            "the powers of gamma count from the episode's start (gamma^t'); they count from t (gamma^(t' - t))":
                _rtg_absolute_powers,
            "summed along the first axis: time is the LAST axis, each row its own trajectory": _rtg_first_axis,
            "the discount multiplies r_t too: R_t = r_t + gamma R_{t+1}, only the FUTURE is discounted": _rtg_discount_now,
        },
        hint="R_t = r_t + discount * R_{t+1} from the last step backwards, along the last axis, in the rewards' dtype",
    ),
    HiddenTest(
        cell="ex3_dt_tokens_test",
        function="dt_tokens",
        cases=tokens_cases,
        reference=tokens_reference,
        outputs=("tokens", "positions"),
        blocked=[rl.interleave, rl.action_positions, rl.DecisionTransformer],
        unchanged=True,
        mistakes={
            "the streams were concatenated one after the other ([R..., s..., a...]); interleave them step by step":
                _tok(how="cat"),
            "the order is (s, R, a): each step is return-to-go, then state, then action": _tok(order=(1, 0, 2)),
            "the timestep embedding is missing: add time_emb to each of the three tokens":
                _tok(time_on=(False, False, False)),
            "the timestep embedding was added to the state token only: add it to all three":
                _tok(time_on=(False, True, False)),
            "stacked along the feature axis: stack on a new axis 2 and reshape to (B, 3n, d)": _tok(how="features"),
            "stacked on the LAST axis: (B, n, d, 3) reshaped mixes the features of the three tokens; stack on axis 2, "
            "(B, n, 3, d)": _tok(how="last"),
            "positions are the action tokens (3 t + 2): the action is predicted from the STATE token, or it sees "
            "itself": _tok(positions="action"),
            "positions are the return-to-go tokens (3 t): the state token comes one later, 3 t + 1":
                _tok(positions="return"),
        },
        hint="tokens = stack([r + te, s + te, a + te], dim=2).reshape(B, 3n, d); positions = arange(n) * 3 + 1 (long)",
    ),
    HiddenTest(
        cell="ex4_rollout_test",
        function="rollout",
        cases=rollout_cases,
        reference=rollout_reference,
        driver=drive_rollout,
        outputs=("states", "actions", "rewards", "rtgs"),
        blocked=[rl.evaluate, rl.return_conditioning, vz.rollout_state, vz.target_explorer],
        mistakes={
            "the return-to-go never changes: lower it by each reward, R_{t+1} = R_t - r_t": _rollout_mistake(sign=0),
            "the sign: R_{t+1} = R_t - r_t, so a negative reward raises the return-to-go": _rollout_mistake(sign=1),
            "the timesteps restart in every window: they are the episode's steps, arange(lo, t + 1)":
                _rollout_mistake(restart_time=True),
            "the returns-to-go were not divided by return_scale before the policy": _rollout_mistake(scale=False),
            "the action came from the first step's logits: take the LAST step's, logits[0, -1]":
                _rollout_mistake(last=False),
            "rtgs records the return-to-go after the step: record the one the policy was given":
                _rollout_mistake(record_after=True),
            "the episode was not reset with the seed it was given: env.reset(seed=seed)": _rollout_mistake(use_seed=False),
            "the current action's slot held the previous action: it is a placeholder 0 until the policy chose":
                _rollout_mistake(placeholder=False),
        },
        hint="reset with the seed; each step append s, a placeholder 0 and R; call the policy on the last n_ctx steps "
             "(R / return_scale float32, the episode's timesteps); argmax of the last logits; R -= r",
    ),
]
