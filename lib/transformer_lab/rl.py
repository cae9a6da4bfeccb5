r"""Transformers for reinforcement learning: the Decision Transformer and GTrXL's gating layer.

Papers
------
* Chen, Lu, Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas, Mordatch 2021, "Decision
  Transformer: Reinforcement Learning via Sequence Modeling", arXiv:2106.01345: sec. 3
  (returns-to-go, the (return, state, action) tokens, timestep embeddings, a causal GPT
  predicting actions, conditioning on a target return at evaluation), Algorithm 1.
* Parisotto, Song, Rae, Pascanu, Gulcehre, Jayakumar, Jaderberg, Kaufman, Clark, Noury,
  Botvinick, Heess, Hadsell 2020, "Stabilizing Transformers for Reinforcement Learning",
  arXiv:1910.06764: sec. 3 (identity map reordering, GRU-type gating in place of the
  residual connection, the gate bias that starts every block at the identity).
* Watkins and Dayan 1992, "Q-learning" (the tabular learner that makes the medium data);
  Sutton and Barto 2018, "Reinforcement Learning: An Introduction", ch. 4 (value iteration,
  which makes the optimal data) and ch. 6.5 (Q-learning on the cliff walk, Example 6.6).

Offline RL is sequence modelling
--------------------------------
An *offline* (batch) RL method learns from a fixed set of trajectories that other policies
collected; it never acts in the environment while it learns. (A widely shared note calls the
Decision Transformer "off-policy RL": off-policy methods such as Q-learning still collect
their own data with a behaviour policy; the Decision Transformer collects none, which is
*offline* RL.) A trajectory of an episode of ``t_max`` steps at most is

.. math::

    \tau = (\mathbf s_1, \mathbf a_1, \mathbf r_1, \mathbf s_2, \mathbf a_2, \mathbf r_2,
    \dots, \mathbf s_{n}, \mathbf a_{n}, \mathbf r_{n}),

states, actions and rewards, with its return :math:`\sum_t \mathbf r_t`. The Decision
Transformer does not learn a value function and does not maximise anything: it is trained
by plain supervised learning (cross-entropy on the actions) to predict the action the data
took, *given the return that followed it*. The return that follows step ``t`` is the
**return-to-go** (:func:`returns_to_go`)

.. math::

    \hat{\mathbf R}_t = \sum_{t' = t}^{n} \boldsymbol\gamma^{\,t' - t}\, \mathbf r_{t'},
    \qquad \hat{\mathbf R}_t = \mathbf r_t + \boldsymbol\gamma\, \hat{\mathbf R}_{t+1},
    \quad \hat{\mathbf R}_{n+1} = 0,

with :math:`\boldsymbol\gamma = 1` (no discounting) in the paper and here by default: the
model is then told, at every step, how much reward is still to be collected. At evaluation
the first return-to-go is the *target* return the user asks for, and after each reward it
is lowered by what was received, :math:`\hat{\mathbf R}_{t+1} = \hat{\mathbf R}_t - \mathbf r_t`
(:func:`evaluate`, Algorithm 1 of the paper).

Tokens, timesteps and the causal mask
-------------------------------------
Each timestep gives three tokens, interleaved as (return-to-go, state, action)
(:func:`interleave`):

.. math::

    (\hat{\mathbf R}_1, \mathbf s_1, \mathbf a_1, \hat{\mathbf R}_2, \mathbf s_2, \mathbf a_2,
    \dots, \hat{\mathbf R}_{n_\text{ctx}}, \mathbf s_{n_\text{ctx}}, \mathbf a_{n_\text{ctx}}),
    \qquad L = 3 n_\text{ctx},

over the last :math:`n_\text{ctx}` timesteps (the paper's :math:`K`). Each kind has its own
embedding: a linear map of the scaled return :math:`\hat{\mathbf R}_t / \kappa` (``return_scale``), a
table of states, a table of actions (the toy-text environments have discrete states and
actions). The *timestep* embedding :math:`E_\text{time}[t]`, a learned table indexed by
the episode's step ``t`` (not by the token's position), is added to all three tokens of step
``t``; the transformer has no other position encoding (as in the paper's code). A LayerNorm
follows, then :math:`N` causal decoder blocks (the library's :class:`~transformer_lab.blocks.
DecoderBlock` without cross-attention, the boolean :func:`~transformer_lab.attention.causal_mask`
over the :math:`L` tokens). The action :math:`\mathbf a_t` is predicted from the output at the
state token :math:`\mathbf s_t`, position :math:`3(t-1)+1` (0-based), which by the causal mask
sees :math:`\hat{\mathbf R}_{\le t}, \mathbf s_{\le t}, \mathbf a_{< t}`: the return still
wanted, where the agent is, and what it did, but never :math:`\mathbf a_t` itself nor
anything later (:func:`action_positions`; the test perturbs every later token and checks the
earlier logits do not move).

Behaviour cloning (BC), the baseline, is the same network without the return tokens:
(state, action) pairs, :math:`L = 2 n_\text{ctx}` (``DecisionTransformer(...,
condition_on_return=False)``). It imitates the *average* behaviour of the data, so its
return is that of a mixture of the data's policies; the Decision Transformer, asked for a
high return, imitates the trajectories that achieved it. Filtered BC (``top_fraction`` of
:func:`train_policy`: BC on the best trajectories only, the paper's "%BC") is the fair
comparison when the best data is known to be best.

The environment and the data (gymnasium toy-text)
-------------------------------------------------
The environments are gymnasium's own (``CliffWalking-v1``, ``FrozenLake-v1``,
``CliffWalkingSlippery-v1``, ``FrozenLake8x8-v1``; nothing is downloaded), wrapped by
gymnasium's ``TimeLimit`` at ``t_max`` steps (:func:`make_env`). CliffWalking is a 4 x 12 grid:
-1 per step, -100 for stepping into the cliff (which sends the agent back to the start), the
episode ends at the goal; the best return is -13 (13 steps along the cliff edge), a random
walk collects hundreds of -1s and several -100s: a wide return range. FrozenLake's return is
0 or 1 (the goal reached or not), too narrow to show a trend, and noisy on the slippery lake.
Measured there (``FrozenLake-v1``, slippery, ``t_max = 50``, the default mix, ``return_scale =
1``, 30 episodes per target, seeds 0-2): the Q-learner's 300 episodes learn almost nothing from
the sparse reward (its data succeeds 0-1% of the time, the optimal policy's 50-75%); the DT's
success rate at targets 0 / 0.5 / 1 was 0.00 / 0.30 / 0.33, 0.03 / 0.13 / 0.50, 0.03 / 0.13 /
0.17, against BC's 0.03, 0.13, 0.07 (5-6 CPU s per seed): the same direction, a much weaker
picture. CliffWalking is the lecture's environment.

The offline data (:func:`collect_offline_data`) mixes three kinds of policy, each listed as
``(kind, n_episodes, p_rand)``:

* ``"random"``: uniform actions;
* ``"q-learner"``: :math:`p_\text{rand}`-greedy (epsilon-greedy's epsilon; the symbol is lecture 07's) from a
  tabular Q-learner (:func:`q_learning`) trained for a few hundred episodes,
  :math:`\mathbf Q(\mathbf s, \mathbf a) \leftarrow \mathbf Q + \eta\,(\mathbf r +
  \boldsymbol\gamma \max_{\mathbf a'} \mathbf Q(\mathbf s', \mathbf a') - \mathbf Q)`;
* ``"optimal"``: greedy from the optimal :math:`\mathbf Q^\ast` of value iteration on the
  environment's own transition table ``env.unwrapped.P`` (:func:`value_iteration`).

Trajectories are stored as padded tensors ``(n_traj, t_max)`` with their lengths
(:class:`OfflineData`); ``data.returns`` is the return distribution the lecture plots.

Gated Transformer-XL's gating layer (Parisotto et al. 2020)
----------------------------------------------------------
Transformers trained by RL (not by supervised learning, as above) were unstable; GTrXL made
two changes to Transformer-XL. (1) *Identity map reordering*: the LayerNorm moves inside the
branch (pre-norm, lecture 02) and a ReLU follows the sub-layer ``f`` (attention or the FFN).
(2) The residual sum :math:`x + \tilde f` becomes a GRU-type *gate* (:class:`GRUGate`), with
:math:`\tilde f = \operatorname{ReLU}(f(\operatorname{LN}(x)))` the branch's output (the paper's
:math:`y`):

.. math::

    g^\text{reset} &= \operatorname{sigmoid}(\tilde f W_\text{r}^\top + x U_\text{r}^\top) \\
    g^\text{upd}   &= \operatorname{sigmoid}(\tilde f W_\text{z}^\top + x U_\text{z}^\top - \beta_g) \\
    \mathbf c      &= \tanh\!\big(\tilde f W_\text{h}^\top + (g^\text{reset} \odot x) U_\text{h}^\top\big) \\
    \operatorname{gate}(x, \tilde f) &= (1 - g^\text{upd}) \odot x + g^\text{upd} \odot \mathbf c .

With the gate bias :math:`\beta_g > 0` (the paper's :math:`b_g`; 2 here, as in DI-engine's
``GRUGatingUnit``), :math:`g^\text{upd} \approx \operatorname{sigmoid}(-\beta_g)` at
initialisation, so :math:`\operatorname{gate}(x, \tilde f) \approx x`: every block starts near the
identity and the whole stack passes the current observation's embedding through, a
*Markovian* policy that ignores the memory until the gates learn to open. Then
:math:`|\operatorname{gate}(x, \tilde f) - x| = g^\text{upd} |\mathbf c - x| \le g^\text{upd}(1 + |x|)`
element-wise (:func:`gate_identity_gap`; the test checks it). A GRU-type gate per sub-layer,
two per block (:class:`GatedBlock`); ``DecisionTransformer(..., block="gtrxl")`` builds the
Decision Transformer on gated blocks. Transformer-XL's memory and relative positions
(lecture 09) are left out: this is the gating, not the whole GTrXL. Measured at initialisation
(:func:`memory_influence`: how much the last position's output moves when every earlier
position is replaced; 4 blocks, d_model 32, 4 heads, L = 16, seeds 0-2): gated blocks with
beta_g = 2 move 0.023-0.025 of the output's size, the same gates with beta_g = 0 0.17-0.40, the
library's pre-norm residual blocks 0.26: the gated stack starts (almost) Markovian.

The claim: asking for more gives more, up to the data's best (measured)
------------------------------------------------------------------------
:func:`return_conditioning` runs it from a seed. Settings: ``CliffWalking-v1``, ``t_max = 30``;
the data of :func:`default_mixture` (320 trajectories: 100 random, 100 and 100 from the
Q-learner at p_rand 0.5 and 0.2, 20 optimal; returns from about -1300 to -13, mean about -200,
best -13, :func:`collect_offline_data` ~0.3 CPU s); a Decision Transformer and its BC twin from
:func:`train_policy`'s defaults (``n_ctx = 5``, d_model 32, 2 heads, 1 layer, batch 64, 300
AdamW steps, lr 1e-2 with 30 warm-up steps and cosine decay, ``return_scale = 100``, no
discounting); evaluation at :data:`CLAIM_TARGETS` (-400 ... -5), 10 sampled episodes per
target (seeds ``seed .. seed + 9``), BC over the same 10 episodes. Seeds 0-4 (2-core CPU, one
thread, shared with other jobs):

======  =====================================================  ======  ==========================  ======
seed    DT achieved at -400 -200 -100 -60 -40 -30 -20 -13 -5    BC      bands low / mid / high      Spearman
======  =====================================================  ======  ==========================  ======
0       -356 -218 -123 -64 -34 -49 -30 -27 -42                  -136    -287 / -94 / -36            0.98
1       -376 -218  -73 -71 -48 -31 -17 -17 -37                  -174    -297 / -73 / -29            0.98
2       -375 -188  -65 -33 -28 -22 -25 -32 -23                  -177    -282 / -50 / -27            0.83
3       -396 -186 -116 -54 -46 -22 -22 -21 -50                  -215    -291 / -85 / -28            0.98
4       -396 -207 -126 -62 -30 -21 -28 -28 -37                  -174    -302 / -95 / -27            0.90
======  =====================================================  ======  ==========================  ======

(bands: the mean achieved return over the targets <= -200, in (-200, -60] and in [-40, -13];
Spearman: the rank correlation of target and achieved over the 8 targets <= the data's best.)
Margins over the five seeds: mid - low >= 187, high - mid >= 23, high - BC >= 101 (BC gets
-136 to -215, at or above the data's mean: it imitates the mixture), Spearman >= 0.83; the best
achieved (over the targets) is -17 to -27 (-17 to -32 at target -13), below the data's best
-13 (sampled actions next to the cliff sometimes fall), and asking for -5, above anything in the data, gives no more than asking for
-13. Asked for -100 or -200 the model walks into the cliff on purpose (what the data did with
that much still to come). With greedy actions instead (``greedy=True``; measured at 400 steps,
lr 3e-3, seeds 0-2) every target from -100 or -60 up gave exactly -13, and so did BC: the argmax
of the mixture is the optimal action here, so the comparison with BC is made with sampled
actions, the policies the models learned.
Filtered BC, the paper's "%BC" (``train_policy(data, False, top_fraction=...)``, same settings,
seeds 0-2), beats the DT's top here: trained on the best 10% (all with return -13) it achieves
-13.0 on every seed, on the best 25% -13.4 to -17.2 (1.7-3.5 CPU s each). The paper found %BC
competitive too (on D4RL); what the Decision Transformer adds is one model for every target,
trained on all the data, without knowing in advance which trajectories are good. The lecture
should say so rather than claim the DT beats every imitation baseline.
Suggested assertions: ``spearman >= 0.75``, ``low + 100 < mid < high - 10``,
``high > bc_return + 50``. Cost per seed: 5.6-6.7 CPU s (one run's split: data 0.24, DT 3.4,
BC 1.7, evaluation 0.35; ``cpu_seconds`` in the result), 41-49 s of wall time under a load
average of 8 on the 2 cores, which other jobs shared (about 11 s when the load dropped). Fewer steps or a smaller learning rate blur the top: at 200 steps with lr 3e-3
the targets -40 to -13 gave -24 to -163. A wider model (d_model 64) gives a slightly better top
(-15 to -38) at 7.3-8.2 CPU s. On GTrXL's gated blocks (``block="gtrxl"``, both models, seeds
0-2) the claim holds as well: bands -306 / -82 / -36, -302 / -63 / -39, -287 / -65 / -31,
Spearman 0.98, 0.88, 0.83, high - BC 102-155, at 6.0-8.1 CPU s (supervised training is stable
either way; GTrXL's gain is for training by RL, which this lecture does not do).
Grading mode: ``steps=80, episodes=4`` costs 1.5-3.0 CPU s per seed and keeps only a rough
trend (seeds 0-2: bands -276 / -177 / -82, -301 / -138 / -80, -251 / -115 / -95; Spearman 0.93,
0.88, 0.33; high - BC 69, 94, 207): shrink with ``budget(300, 80)`` and ``budget(10, 4)`` and
keep the assertions under ``if not grading_mode():``.
Benchmark hook (``benchmarks/``): none is asked for lecture 15; :func:`return_conditioning`
reports its own wall and CPU seconds per stage.

A common mistake: reading the action at its own token
-----------------------------------------------------
The action :math:`\mathbf a_t` must be predicted from the *state* token :math:`\mathbf s_t`. Read
at the action token (``read_at="action"``), the prediction sees :math:`\mathbf a_t` itself: the
causal mask lets a token see itself. The model then copies its input; the training loss looks
perfect and the policy is useless, because at evaluation the action token holds a placeholder
(action 0). Measured with the claim's settings (seeds 0-2): training loss 0.0002-0.0003 over the
last 30 steps (against 0.98-1.02 read at the state token), and every target from -400 to -5
achieves -30: the model repeats the placeholder "up" against the top wall until the time runs
out. The test perturbs only :math:`\mathbf a_t` and sees :math:`\mathbf a_t`'s logits move.

Shapes
------
Per timestep inputs ``(B, n_ctx)``: returns-to-go float, states, actions and timesteps long;
tokens ``(B, L, d_model)`` with ``L = 3 n_ctx`` (``2 n_ctx`` for BC); inside attention
``(B, H, L, D)``; action logits ``(B, n_ctx, n_actions)``. Offline data: ``(n_traj, t_max)``.

Notation (lecture 15's RL symbols are set in bold where the plain letter is taken)
---------------------------------------------------------------------------------
=======================  =================================================================
``states``, ``s``        bold s_t, the state at step t (the papers' s_t; s_ij is lecture 06's score)
``actions``, ``a``       bold a_t, the action (the papers' a_t; a is DeepNorm's constant)
``rewards``, ``r``       bold r_t, the reward (the papers' r_t; r is LoRA's rank)
``returns_to_go``        bold R-hat_t, the return-to-go (the paper's R-hat_t; R is lecture 06's rotation)
``discount``             bold gamma, the discount (the papers' gamma; gamma is lecture 09's rate)
``t``                    the episode's step, 1-based in the text, 0-based in the code
``t_max``                the step limit of an episode (the papers' horizon H; H is heads)
``n_ctx``                timesteps in the model's context (the paper's K; K is keys); L = 3 n_ctx
``return_scale``         kappa, returns-to-go are divided by it before the embedding (a scale factor, as lecture 07's)
``timestep_embed``       E_time, the timestep embedding table (t_max, d_model) (an embedding table, as E)
``q``, ``v``             bold Q(s, a), bold V(s): action values and state values (not queries, values)
``p_rand``               the probability of a random action (epsilon of epsilon-greedy)
``lr`` (Q-learning)      eta, the learning rate (lecture 02's eta)
``gate_bias``            beta_g, GTrXL's gate bias (the paper's b_g; a gate bias like lecture 09's beta_h)
``reset``, ``update``    g^reset, g^upd, the GRU-type gates (the paper's r, z)
``candidate``            bold c, the candidate (the paper's h-hat; bold c as lecture 12's MLGRU candidate)
``x``, ``y`` (gate)      x the stream, f~ = ReLU(f(LN(x))) the branch's output (the paper's x, y; f is
                         lecture 02's sub-layer)
=======================  =================================================================
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from .attention import causal_mask
from .blocks import DecoderBlock, FeedForward

__all__ = [
    # environments and tabular policies
    "ENVIRONMENTS",
    "make_env",
    "value_iteration",
    "q_learning",
    "run_episode",
    # offline data
    "OfflineData",
    "collect_offline_data",
    "default_mixture",
    "returns_to_go",
    "window_batches",
    # the Decision Transformer
    "interleave",
    "action_positions",
    "DecisionTransformer",
    "top_trajectories",
    "train_policy",
    "evaluate",
    # GTrXL's gate
    "GRUGate",
    "GatedBlock",
    "gate_identity_gap",
    "memory_influence",
    # the lecture's claim
    "CLAIM_TARGETS",
    "return_conditioning",
]

#: The gymnasium toy-text environments this module knows (discrete states and actions).
ENVIRONMENTS = ("CliffWalking-v1", "CliffWalkingSlippery-v1", "FrozenLake-v1", "FrozenLake8x8-v1")
POLICY_KINDS = ("random", "q-learner", "optimal")
READ_AT = ("state", "action")  # where the action logits are read; "action" is the common mistake
#: The target returns of the lecture's claim on CliffWalking (the data's best is -13; -5 lies above it).
CLAIM_TARGETS = (-400.0, -200.0, -100.0, -60.0, -40.0, -30.0, -20.0, -13.0, -5.0)
IGNORE = -100  # lm_loss's ignore_index: padded steps are not scored


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

_check_int = check_int  # the shared check (_checks.py)


def _check_number(name: str, value, lo: float = -math.inf, hi: float = math.inf,
                  lo_open: bool = False) -> float:
    """A finite real number (a Python or NumPy number, or a one-element tensor) in [lo, hi]."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}]; got {value}")
    return value


def _check_targets(targets) -> List[float]:
    """Target returns: one number or a sequence of numbers, each finite."""
    if isinstance(targets, (str, bytes)):
        raise TypeError(f"a target return must be a number (e.g. -13.0) or a list of numbers; got str {targets!r}")
    if isinstance(targets, Tensor):
        targets = targets.flatten().tolist()
    if isinstance(targets, numbers.Number) or not hasattr(targets, "__iter__"):
        targets = [targets]
    out = []
    for i, value in enumerate(targets):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"a target return must be a number (e.g. -13.0); target {i} is "
                            f"{type(value).__name__} {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"a target return must be a finite number; target {i} is {value}")
        out.append(float(value))
    if not out:
        raise ValueError("targets must hold at least one target return; got an empty sequence")
    return out


def _check_env_id(env_id) -> str:
    if env_id not in ENVIRONMENTS:
        raise ValueError(f"env_id must be one of {ENVIRONMENTS} (gymnasium toy-text, discrete states "
                         f"and actions); got {env_id!r}")
    return env_id


def _check_long(name: str, x, dims: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer (long) tensor; got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D (B, n_ctx); got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------
# Environments and tabular policies
# ----------------------------------------------------------------------------

def make_env(env_id: str = "CliffWalking-v1", t_max: int = 30):
    """``gymnasium.make(env_id, max_episode_steps=t_max)`` for one of :data:`ENVIRONMENTS`.

    FrozenLake's default is slippery; ``"FrozenLake-v1"`` here is gymnasium's default
    (``is_slippery=True``). The returned env is gymnasium's own, wrapped in its ``TimeLimit``:
    ``step`` reports ``truncated=True`` after ``t_max`` steps.
    """
    import gymnasium as gym

    _check_env_id(env_id)
    t_max = _check_int("t_max", t_max)
    return gym.make(env_id, max_episode_steps=t_max)


def _transitions(env) -> Tuple[int, int, dict]:
    base = env.unwrapped
    return int(base.observation_space.n), int(base.action_space.n), base.P


def value_iteration(env, discount: float = 1.0, tol: float = 1e-9, max_iter: int = 10_000) -> np.ndarray:
    """Optimal action values bold Q*(s, a) by value iteration on ``env.unwrapped.P``.

    ``Q(s, a) = sum_{s'} P(s' | s, a) (r + discount * V(s') [not terminal])``, ``V(s) = max_a Q(s, a)``,
    iterated until the largest change is below ``tol``. Returns a float64 array (n_states,
    n_actions). With ``discount = 1`` it converges on the toy-text environments because every
    policy that never reaches the goal collects ever more -1s (CliffWalking) or, on FrozenLake,
    values stay in [0, 1]; pass ``discount < 1`` for anything else.
    """
    discount = _check_number("discount", discount, 0.0, 1.0)
    n_states, n_actions, P = _transitions(env)
    reward = np.zeros((n_states, n_actions))  # expected reward E[r | s, a]
    going_on = np.zeros((n_states, n_actions, n_states))  # P(s', not terminal | s, a)
    for s in range(n_states):
        for a in range(n_actions):
            for p, s2, r, done in P[s][a]:
                reward[s, a] += p * r
                if not done:
                    going_on[s, a, s2] += p
    q = np.zeros((n_states, n_actions))
    for _ in range(max_iter):
        v = q.max(axis=1)  # V(s) = max_a Q(s, a)
        new = reward + discount * going_on @ v  # Q(s, a) = E[r] + gamma sum_s' P(s', not done) V(s')
        change = np.abs(new - q).max()
        q = new
        if change < tol:
            break
    return q


def _act(q: Optional[np.ndarray], s: int, p_rand: float, n_actions: int, rng: np.random.Generator) -> int:
    """p_rand-greedy: a uniform action with probability p_rand, else argmax_a Q(s, a) (first on ties)."""
    if q is None or rng.random() < p_rand:
        return int(rng.integers(n_actions))
    return int(np.argmax(q[s]))


def q_learning(env, episodes: int = 300, lr: float = 0.5, discount: float = 1.0, p_rand: float = 0.1,
               seed: int = 0) -> np.ndarray:
    """Tabular Q-learning (Watkins 1989): ``episodes`` p_rand-greedy episodes on ``env``.

    ``Q(s, a) <- Q(s, a) + lr (r + discount max_a' Q(s', a') [not terminated] - Q(s, a))``;
    truncation by the time limit does not cut the bootstrap (the state is not terminal).
    Seeded: actions from ``numpy.random.default_rng(seed)``, the env reset with ``seed + i``.
    Returns Q (n_states, n_actions), float64. On CliffWalking 300 episodes take ~0.3 s.
    """
    episodes = _check_int("episodes", episodes)
    lr = _check_number("lr", lr, 0.0, 1.0, lo_open=True)
    discount = _check_number("discount", discount, 0.0, 1.0)
    p_rand = _check_number("p_rand", p_rand, 0.0, 1.0)
    n_states, n_actions, _ = _transitions(env)
    q = np.zeros((n_states, n_actions))
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        s, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            a = _act(q, s, p_rand, n_actions, rng)
            s2, r, terminated, truncated, _ = env.step(a)
            target = r + discount * q[s2].max() * (not terminated)
            q[s, a] += lr * (target - q[s, a])  # the temporal-difference update
            s, done = s2, terminated or truncated
    return q


def run_episode(env, q: Optional[np.ndarray], p_rand: float, rng: np.random.Generator,
                seed: Optional[int] = None) -> Tuple[List[int], List[int], List[float]]:
    """One episode with the p_rand-greedy policy of ``q`` (``q=None``: uniform random actions).

    Returns (states, actions, rewards), each a list of the episode's length: the state in
    which each action was taken, the action, the reward it earned.
    """
    n_actions = int(env.unwrapped.action_space.n)
    s, _ = env.reset(seed=seed)
    states, actions, rewards = [], [], []
    done = False
    while not done:
        a = _act(q, s, p_rand, n_actions, rng)
        s2, r, terminated, truncated, _ = env.step(a)
        states.append(int(s))
        actions.append(a)
        rewards.append(float(r))
        s, done = s2, terminated or truncated
    return states, actions, rewards


# ----------------------------------------------------------------------------
# Offline data
# ----------------------------------------------------------------------------

@dataclass
class OfflineData:
    """Offline trajectories as padded tensors.

    ``states``, ``actions`` (n_traj, t_max) long and ``rewards`` (n_traj, t_max) float32, zero
    after each trajectory's end; ``lengths`` (n_traj,) long; ``sources`` one label per
    trajectory (``"random"``, ``"q-learner p=0.3"``, ``"optimal"``); plus what made them.
    """

    states: Tensor
    actions: Tensor
    rewards: Tensor
    lengths: Tensor
    sources: List[str]
    env_id: str
    t_max: int
    n_states: int
    n_actions: int
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def n_traj(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def returns(self) -> Tensor:
        """The return of each trajectory, sum_t r_t: (n_traj,) float32 (the return distribution)."""
        return self.rewards.sum(dim=1)

    def valid(self) -> Tensor:
        """(n_traj, t_max) bool, True on the steps a trajectory really has."""
        return torch.arange(self.t_max)[None, :] < self.lengths[:, None]

    def returns_to_go(self, discount: float = 1.0) -> Tensor:
        """(n_traj, t_max) float32 returns-to-go (0 after each trajectory's end)."""
        return returns_to_go(self.rewards, discount)

    def subset(self, keep: Tensor) -> "OfflineData":
        """The trajectories where ``keep`` (n_traj,) bool is True (or at the given indices)."""
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
        return OfflineData(self.states[idx], self.actions[idx], self.rewards[idx], self.lengths[idx],
                           [self.sources[i] for i in idx.tolist()], self.env_id, self.t_max,
                           self.n_states, self.n_actions, dict(self.info))

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Per source: number of trajectories, mean, min and max return."""
        out = {}
        ret = self.returns
        for name in dict.fromkeys(self.sources):
            sel = torch.tensor([s == name for s in self.sources])
            r = ret[sel]
            out[name] = {"n": int(sel.sum()), "mean": float(r.mean()), "min": float(r.min()),
                         "max": float(r.max())}
        return out


def default_mixture() -> List[Tuple[str, int, float]]:
    """The calibrated data mix of the lecture's claim: ``(kind, n_episodes, p_rand)`` triples."""
    return [("random", 100, 1.0), ("q-learner", 100, 0.5), ("q-learner", 100, 0.2), ("optimal", 20, 0.0)]


def _check_mixture(policies) -> List[Tuple[str, int, float]]:
    if isinstance(policies, (str, bytes)) or not hasattr(policies, "__iter__"):
        raise TypeError(f"policies must be a list of (kind, n_episodes, p_rand) triples; got {policies!r}")
    out = []
    for spec in policies:
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise ValueError(f"each policy must be a (kind, n_episodes, p_rand) triple; got {spec!r}")
        kind, n, p = spec
        if kind not in POLICY_KINDS:
            raise ValueError(f"a policy kind must be one of {POLICY_KINDS}; got {kind!r}")
        out.append((kind, _check_int("n_episodes", n), _check_number("p_rand", p, 0.0, 1.0)))
    if not out:
        raise ValueError("policies must list at least one (kind, n_episodes, p_rand) triple; got none")
    return out


def collect_offline_data(env_id: str = "CliffWalking-v1", policies=None, t_max: int = 30, seed: int = 0,
                         q_episodes: int = 300, discount: float = 1.0) -> OfflineData:
    """Collect offline trajectories from a mix of policies in a gymnasium toy-text environment.

    ``policies``: ``(kind, n_episodes, p_rand)`` triples (default :func:`default_mixture`):
    ``"random"`` (uniform actions; p_rand is ignored), ``"q-learner"`` (p_rand-greedy from
    :func:`q_learning` trained for ``q_episodes`` episodes with p_rand 0.1), ``"optimal"``
    (p_rand-greedy from :func:`value_iteration`). Each episode ends at the goal or after
    ``t_max`` steps. Seeded: the same ``seed`` gives the same data (episode ``i`` resets the env
    with ``seed * 100_003 + i``). The ``info`` dict keeps the Q tables and the wall time.
    """
    policies = _check_mixture(default_mixture() if policies is None else policies)
    t_max = _check_int("t_max", t_max)
    start = time.perf_counter()
    env = make_env(env_id, t_max)
    n_states, n_actions, _ = _transitions(env)
    q_opt = value_iteration(env, discount) if any(k == "optimal" for k, _, _ in policies) else None
    q_learned = None
    if any(k == "q-learner" for k, _, _ in policies):
        q_learned = q_learning(env, q_episodes, discount=discount, seed=seed)
    rng = np.random.default_rng(seed)
    n_total = sum(n for _, n, _ in policies)
    states = torch.zeros(n_total, t_max, dtype=torch.long)
    actions = torch.zeros(n_total, t_max, dtype=torch.long)
    rewards = torch.zeros(n_total, t_max)
    lengths = torch.zeros(n_total, dtype=torch.long)
    sources = []
    i = 0
    for kind, n, p_rand in policies:
        q = {"random": None, "q-learner": q_learned, "optimal": q_opt}[kind]
        label = kind if kind == "random" else f"{kind} p={p_rand:g}"
        for _ in range(n):
            s, a, r = run_episode(env, q, 1.0 if q is None else p_rand, rng, seed=seed * 100_003 + i)
            k = len(s)
            states[i, :k], actions[i, :k], rewards[i, :k] = torch.tensor(s), torch.tensor(a), torch.tensor(r)
            lengths[i] = k
            sources.append(label)
            i += 1
    env.close()
    info = {"q_optimal": q_opt, "q_learned": q_learned, "policies": policies, "seed": seed,
            "seconds": time.perf_counter() - start}
    return OfflineData(states, actions, rewards, lengths, sources, env_id, t_max, n_states, n_actions, info)


def returns_to_go(rewards, discount: float = 1.0) -> Tensor:
    r"""Returns-to-go :math:`\hat R_t = \sum_{t' \ge t} \gamma^{t'-t} r_{t'}` along the last dim.

    ``rewards``: (..., n) float (a trajectory, or padded trajectories with zeros after their
    end: the zeros add nothing); ``discount`` in [0, 1] (1: no discounting, the paper's choice).
    Computed backwards, ``R_t = r_t + discount * R_{t+1}`` with ``R_{n+1} = 0``. Returns the
    same shape and dtype.
    """
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor (..., n); got {rewards.dtype}")
    if rewards.dim() < 1:
        raise ValueError(f"rewards must have at least one dimension (..., n); got shape {tuple(rewards.shape)}")
    discount = _check_number("discount", discount, 0.0, 1.0)
    if discount == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1)  # sum_{t' >= t} r_t'
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + discount * running  # R_t = r_t + gamma R_{t+1}
        out[..., t] = running
    return out


def window_batches(data: OfflineData, n_ctx: int, batch_size: int = 64, discount: float = 1.0,
                   return_scale: float = 1.0, trajectories: Optional[Tensor] = None):
    """A ``get_batch(generator) -> ((rtg, states, actions, timesteps), targets)`` for ``train``.

    Each row is a window of ``n_ctx`` consecutive steps of one trajectory: a trajectory is drawn
    with probability proportional to its length and a start uniformly among its steps (so every
    step is equally likely to start a window, as in the paper's code). Windows running past a
    trajectory's end are padded at the right (state, action and timestep 0, return-to-go 0) and
    their targets are -100 (not scored): causal attention means padding on the right never
    changes the real steps' predictions. ``rtg`` is divided by ``return_scale``. Shapes (B, n_ctx).
    ``trajectories``: indices to draw from (default all).
    """
    n_ctx = _check_int("n_ctx", n_ctx)
    batch_size = _check_int("batch_size", batch_size)
    return_scale = _check_number("return_scale", return_scale, 0.0, lo_open=True)
    rtg_all = data.returns_to_go(discount) / return_scale  # (n_traj, t_max)
    pad = n_ctx  # room for windows that run past t_max
    rtg_all = F.pad(rtg_all, (0, pad))
    states, actions = F.pad(data.states, (0, pad)), F.pad(data.actions, (0, pad))
    idx = torch.arange(data.n_traj) if trajectories is None else torch.as_tensor(trajectories)
    lengths = data.lengths[idx]
    cum = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # step offsets
    total = int(cum[-1])
    offs = torch.arange(n_ctx)

    def get_batch(generator: torch.Generator):
        flat = torch.randint(total, (batch_size,), generator=generator)  # a step, uniform over all
        which = torch.searchsorted(cum, flat, right=True) - 1  # its trajectory (in idx)
        start = flat - cum[which]  # its position there
        traj = idx[which]
        t = start[:, None] + offs[None, :]  # (B, n_ctx) timesteps
        valid = t < lengths[which][:, None]
        rows = traj[:, None]
        r = torch.where(valid, rtg_all[rows, t], 0.0)
        s = torch.where(valid, states[rows, t], 0)
        a = torch.where(valid, actions[rows, t], 0)
        ts = torch.where(valid, t, 0)
        y = torch.where(valid, actions[rows, t], IGNORE)
        return (r, s, a, ts), y

    return get_batch


# ----------------------------------------------------------------------------
# GTrXL's gating layer
# ----------------------------------------------------------------------------

class GRUGate(nn.Module):
    """GTrXL's GRU-type gate (Parisotto et al. 2020, sec. 3.2) in place of ``x + y``.

    ``forward(x, y)``: x the stream (..., d_model), y the sub-layer's output (same shape) ->
    ``(1 - g_upd) * x + g_upd * c``, with g_upd = sigmoid(y W_z^T + x U_z^T - gate_bias),
    c = tanh(y W_h^T + (g_reset * x) U_h^T), g_reset = sigmoid(y W_r^T + x U_r^T).
    ``gate_bias`` (beta_g, the paper's b_g) > 0 starts the gate near the identity.
    ``forward(x, y, return_gates=True)`` also returns ``{"reset", "update", "candidate"}``.
    """

    def __init__(self, d_model: int, gate_bias: float = 2.0):
        super().__init__()
        self.d_model = _check_int("d_model", d_model)
        self.gate_bias = _check_number("gate_bias", gate_bias)
        self.w = nn.Linear(d_model, 3 * d_model, bias=False)  # [W_r; W_z; W_h], applied to y
        self.u_rz = nn.Linear(d_model, 2 * d_model, bias=False)  # [U_r; U_z], applied to x
        self.u_h = nn.Linear(d_model, d_model, bias=False)  # U_h, applied to g_reset * x

    def forward(self, x: Tensor, y: Tensor, return_gates: bool = False):
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a floating-point tensor (..., d_model); got {got}")
            if t.shape[-1:] != (self.d_model,):
                raise ValueError(f"{name} must have last dimension d_model = {self.d_model}; got shape {tuple(t.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
        wr, wz, wh = self.w(y).chunk(3, dim=-1)  # y W_r^T, y W_z^T, y W_h^T
        ur, uz = self.u_rz(x).chunk(2, dim=-1)  # x U_r^T, x U_z^T
        reset = torch.sigmoid(wr + ur)  # g^reset
        update = torch.sigmoid(wz + uz - self.gate_bias)  # g^upd = sigmoid(... - beta_g)
        candidate = torch.tanh(wh + self.u_h(reset * x))  # c = tanh(y W_h^T + (g^reset x) U_h^T)
        out = (1 - update) * x + update * candidate  # (1 - g^upd) x + g^upd c
        if return_gates:
            return out, {"reset": reset, "update": update, "candidate": candidate}
        return out


def gate_identity_gap(gate: GRUGate, x: Tensor, y: Tensor) -> Dict[str, float]:
    """How far ``gate(x, y)`` is from ``x``: max and mean of |gate(x, y) - x|, max |x|, the mean
    update gate, and the bound g_upd (1 + |x|) that no element can exceed (|c| <= 1)."""
    with torch.no_grad():
        out, gates = gate(x, y, return_gates=True)
        gap = (out - x).abs()
        bound = gates["update"] * (1 + x.abs())  # |g_upd (c - x)| <= g_upd (1 + |x|)
        return {"max_gap": float(gap.max()), "mean_gap": float(gap.mean()), "max_x": float(x.abs().max()),
                "max_bound": float(bound.max()), "within_bound": bool((gap <= bound + 1e-6).all()),
                "mean_update": float(gates["update"].mean())}


class GatedBlock(nn.Module):
    """A GTrXL block without the XL memory: each sub-layer f (causal self-attention, then the
    FFN) as ``x <- gate(x, ReLU(f(LN(x))))`` (identity map reordering + GRU-type gating).

    ``forward(x, mask=None)``: x (B, L, d_model), mask broadcastable to (B, H, L, L), True =
    attend. Same signature as the library's blocks for ``mask``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: Optional[int] = None, dropout: float = 0.0,
                 gate_bias: float = 2.0):
        super().__init__()
        from .attention import MultiHeadAttention

        self.d_model = d_model
        self.norm_attn, self.norm_ffn = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ffn = FeedForward(d_model, d_ff, "relu", dropout)
        self.gate_attn, self.gate_ffn = GRUGate(d_model, gate_bias), GRUGate(d_model, gate_bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, positions=None) -> Tensor:
        y = F.relu(self.attn(self.norm_attn(x), mask=mask, positions=positions))  # ReLU(MHA(LN(x)))
        x = self.gate_attn(x, y)  # gate instead of x + y
        y = F.relu(self.ffn(self.norm_ffn(x)))  # ReLU(FFN(LN(x)))
        return self.gate_ffn(x, y)


def memory_influence(blocks: Sequence[nn.Module], x: Tensor, generator: Optional[torch.Generator] = None) -> float:
    """How much a causal stack's output at the last position depends on the earlier positions.

    ``blocks``: modules called as ``block(x, mask=causal)``; x (B, L, d_model). The earlier
    L - 1 positions are replaced by fresh N(0, 1) rows (drawn with ``generator``) and the
    change of the last position's output is divided by the size of that output:
    ``mean |out'_L - out_L| / mean |out_L|``. 0 means the stack is Markovian: it reads only the
    current observation. GTrXL's gated blocks start near 0 (the gate bias closes the gates);
    pre-norm residual blocks do not (their attention mixes the past in from the first step).
    """
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point (B, L, d_model) tensor; got {got}")
    L = x.shape[1]
    mask = causal_mask(L, L, device=x.device)
    other = x.clone()
    noise = torch.randn(x[:, :-1].shape, generator=generator, dtype=x.dtype)
    other[:, :-1] = noise.to(x.device)  # a different past, the same present

    def run(h):
        for block in blocks:
            h = block(h, mask=mask)
        return h[:, -1]  # (B, d_model)

    with torch.no_grad():
        out, out2 = run(x), run(other)
    return float((out2 - out).abs().mean() / out.abs().mean())


# ----------------------------------------------------------------------------
# The Decision Transformer
# ----------------------------------------------------------------------------

def interleave(*streams: Tensor) -> Tensor:
    """Interleave per-timestep token streams: ``interleave(R, S, A)`` with each (B, n, d) ->
    (B, k n, d) ordered R_1, S_1, A_1, R_2, S_2, A_2, ... (k = number of streams)."""
    if not streams:
        raise ValueError("interleave needs at least one (B, n, d) stream")
    shape = streams[0].shape
    for i, s in enumerate(streams):
        if not isinstance(s, Tensor) or s.dim() != 3 or s.shape != shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"every stream must be a (B, n, d) tensor of shape {tuple(shape)}; stream {i} is {got}")
    B, n, d = shape
    return torch.stack(streams, dim=2).reshape(B, len(streams) * n, d)  # (B, k n, d)


def action_positions(n_ctx: int, condition_on_return: bool = True, read_at: str = "state") -> Tensor:
    """0-based token positions whose outputs predict the actions: the state tokens,
    ``3 t + 1`` for the Decision Transformer (R, s, a), ``2 t`` for BC (s, a); (n_ctx,) long.
    ``read_at="action"``: the action tokens ``3 t + 2`` (``2 t + 1``), the common mistake."""
    if read_at not in READ_AT:
        raise ValueError(f"read_at must be one of {READ_AT}; got {read_at!r}")
    k = 3 if condition_on_return else 2
    first = k - 2 if read_at == "state" else k - 1  # s_1 (or a_1) in the first step's tokens
    return torch.arange(_check_int("n_ctx", n_ctx)) * k + first


class DecisionTransformer(nn.Module):
    """The Decision Transformer (Chen et al. 2021) for discrete states and actions.

    ``forward(returns_to_go, states, actions, timesteps) -> logits``: returns_to_go (B, n)
    float (already divided by ``return_scale``), states, actions, timesteps (B, n) long with
    n <= n_ctx -> (B, n, n_actions), the logits of a_t read at the state token s_t. The action
    at the last step may be anything (it cannot be seen). ``condition_on_return=False``: the
    behaviour-cloning twin, tokens (s, a) only (``returns_to_go`` is ignored and may be None).
    ``block="gtrxl"``: :class:`GatedBlock` instead of the library's pre-norm ``DecoderBlock``.
    ``read_at="action"``: the common mistake, the logits of a_t read at a_t's own token.
    """

    def __init__(self, n_states: int, n_actions: int, t_max: int, n_ctx: int = 10, d_model: int = 64,
                 n_heads: int = 4, n_layers: int = 2, d_ff: Optional[int] = None, dropout: float = 0.0,
                 return_scale: float = 1.0, condition_on_return: bool = True, block: str = "pre-norm",
                 gate_bias: float = 2.0, read_at: str = "state"):
        super().__init__()
        self.n_states, self.n_actions = _check_int("n_states", n_states), _check_int("n_actions", n_actions)
        self.t_max, self.n_ctx = _check_int("t_max", t_max), _check_int("n_ctx", n_ctx)
        self.d_model, self.n_layers = _check_int("d_model", d_model), _check_int("n_layers", n_layers)
        self.return_scale = _check_number("return_scale", return_scale, 0.0, lo_open=True)
        self.condition_on_return = bool(condition_on_return)
        if block not in ("pre-norm", "gtrxl"):
            raise ValueError(f"block must be 'pre-norm' or 'gtrxl'; got {block!r}")
        self.block = block
        action_positions(1, True, read_at)  # checks read_at
        self.read_at = read_at
        self.return_embed = nn.Linear(1, d_model)  # R-hat_t / kappa -> d_model
        self.state_embed = nn.Embedding(n_states, d_model)
        self.action_embed = nn.Embedding(n_actions, d_model)
        self.timestep_embed = nn.Embedding(t_max, d_model)  # E_time[t]
        self.embed_norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        if block == "gtrxl":
            self.blocks = nn.ModuleList(GatedBlock(d_model, n_heads, d_ff, dropout, gate_bias)
                                        for _ in range(n_layers))
        else:
            self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, dropout, cross_attention=False)
                                        for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_actions)

    def tokens(self, returns_to_go: Optional[Tensor], states: Tensor, actions: Tensor,
               timesteps: Tensor) -> Tensor:
        """The interleaved, embedded token sequence (B, 3 n, d_model) (BC: (B, 2 n, d_model))."""
        _check_long("states", states)
        _check_long("actions", actions)
        _check_long("timesteps", timesteps)
        B, n = states.shape
        if actions.shape != (B, n) or timesteps.shape != (B, n):
            raise ValueError(f"states, actions and timesteps must all be (B, n); got {tuple(states.shape)}, "
                             f"{tuple(actions.shape)}, {tuple(timesteps.shape)}")
        if n > self.n_ctx:
            raise ValueError(f"at most n_ctx = {self.n_ctx} timesteps fit the context; got {n}")
        for name, x, hi in (("states", states, self.n_states), ("actions", actions, self.n_actions),
                            ("timesteps", timesteps, self.t_max)):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= hi):
                raise ValueError(f"{name} must lie in [0, {hi}); got min {int(x.min())}, max {int(x.max())}")
        time_emb = self.timestep_embed(timesteps)  # (B, n, d_model), added to each token of step t
        s = self.state_embed(states) + time_emb
        a = self.action_embed(actions) + time_emb
        if not self.condition_on_return:
            return interleave(s, a)  # (B, 2 n, d_model): s_1, a_1, s_2, a_2, ...
        if not isinstance(returns_to_go, Tensor) or not returns_to_go.is_floating_point():
            got = returns_to_go.dtype if isinstance(returns_to_go, Tensor) else type(returns_to_go).__name__
            raise TypeError(f"returns_to_go must be a floating-point tensor (B, n); got {got}")
        if returns_to_go.shape != (B, n):
            raise ValueError(f"returns_to_go must be (B, n) = {(B, n)}; got {tuple(returns_to_go.shape)}")
        r = self.return_embed(returns_to_go[..., None].to(s.dtype)) + time_emb  # (B, n, d_model)
        return interleave(r, s, a)  # (B, 3 n, d_model): R_1, s_1, a_1, R_2, ...

    def forward(self, returns_to_go: Optional[Tensor], states: Tensor, actions: Tensor,
                timesteps: Tensor) -> Tensor:
        x = self.drop(self.embed_norm(self.tokens(returns_to_go, states, actions, timesteps)))  # (B, L, d)
        L = x.shape[1]
        mask = causal_mask(L, L, device=x.device)  # (L, L): token j visible to token i iff j <= i
        for block in self.blocks:
            x = block(x, mask=mask)  # (B, L, d_model)
        pos = action_positions(states.shape[1], self.condition_on_return, self.read_at).to(x.device)  # s_t
        return self.head(self.norm(x[:, pos]))  # (B, n, n_actions)


def top_trajectories(data: OfflineData, fraction: float) -> Tensor:
    """Indices of the best ``ceil(fraction * n_traj)`` trajectories by return (at least one), best
    first, ties in data order (what filtered BC trains on)."""
    fraction = _check_number("fraction", fraction, 0.0, 1.0, lo_open=True)
    k = max(1, math.ceil(fraction * data.n_traj))
    return torch.argsort(data.returns, descending=True, stable=True)[:k]


def train_policy(data: OfflineData, condition_on_return: bool = True, steps: int = 300, seed: int = 0,
                 n_ctx: int = 5, d_model: int = 32, n_heads: int = 2, n_layers: int = 1,
                 batch_size: int = 64, lr: float = 1e-2, return_scale: float = 100.0, discount: float = 1.0,
                 top_fraction: float = 1.0, block: str = "pre-norm", read_at: str = "state",
                 progress: bool = False):
    """Train a Decision Transformer (``condition_on_return=True``) or its BC twin on ``data``.

    Builds the model after ``seed_everything(seed)`` and trains it with
    :func:`transformer_lab.train.train` (AdamW, ``steps // 10`` warm-up, cosine decay,
    cross-entropy on the actions of :func:`window_batches`). ``top_fraction < 1`` trains on the
    best ``top_fraction`` of the trajectories by return only (filtered BC, the paper's %BC).
    Returns ``(model, history)``; the model is in eval mode.
    """
    from .device import seed_everything
    from .train import train

    steps = _check_int("steps", steps)
    top_fraction = _check_number("top_fraction", top_fraction, 0.0, 1.0, lo_open=True)
    keep = None if top_fraction == 1.0 else top_trajectories(data, top_fraction)
    seed_everything(seed)
    model = DecisionTransformer(data.n_states, data.n_actions, data.t_max, n_ctx, d_model, n_heads, n_layers,
                                return_scale=return_scale, condition_on_return=condition_on_return, block=block,
                                read_at=read_at)
    model.env_id = data.env_id  # evaluate() rolls it out in the environment it was trained on
    get_batch = window_batches(data, n_ctx, batch_size, discount, return_scale, keep)
    hist = train(model, get_batch, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                 schedule="cosine", progress=progress, desc="DT" if condition_on_return else "BC")
    return model.eval(), hist


@torch.no_grad()
def evaluate(model: DecisionTransformer, targets=None, episodes: int = 1, seed: int = 0,
             env_id: Optional[str] = None, greedy: bool = False,
             generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Roll the model out in the environment, conditioned on each target return (Algorithm 1).

    For every target and episode an environment (:func:`make_env` with the model's ``t_max``;
    ``env_id`` defaults to ``model.env_id``, which :func:`train_policy` sets, else CliffWalking)
    is reset with ``seed + episode`` (the same seeds for every target); all of them step in
    lock-step as one batch. At step t the model sees the last ``n_ctx`` (R-hat, s, a) steps; after the
    reward ``R-hat_{t+1} = R-hat_t - r_t``. The action is sampled from the softmax of the
    logits (the model is a stochastic policy, as the data's were; the paper samples on Atari)
    with ``generator``, by default ``torch.Generator().manual_seed(seed)``; ``greedy=True``
    takes the argmax. BC models ignore the targets (pass ``None``). Deterministic: the same
    model, targets and seed give the same trajectories.

    Returns ``{"targets": (n_targets,), "returns": (n_targets, episodes), "achieved": mean over
    episodes (n_targets,), "lengths", "trajectories": list of (states, actions, rewards),
    "returns_to_go": (n_targets * episodes, t_max) the R-hat_t the model was given (in return
    units; rows target-major), "final_states": the state each episode ended in}``.
    """
    if not isinstance(model, DecisionTransformer):
        raise TypeError(f"model must be a DecisionTransformer; got {type(model).__name__}")
    if model.condition_on_return:
        if targets is None:
            raise ValueError("a Decision Transformer needs target returns (a number or a list of numbers); got None")
        targets = _check_targets(targets)
    else:
        targets = [0.0] if targets is None else _check_targets(targets)
    episodes = _check_int("episodes", episodes)
    if not greedy and generator is None:
        generator = torch.Generator().manual_seed(seed)
    env_id = _check_env_id(env_id if env_id is not None else getattr(model, "env_id", "CliffWalking-v1"))
    t_max, n_ctx = model.t_max, model.n_ctx
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nb = len(targets) * episodes
    envs = [make_env(env_id, t_max) for _ in range(nb)]
    rtg = torch.zeros(nb, t_max, device=device)
    states = torch.zeros(nb, t_max, dtype=torch.long, device=device)
    actions = torch.zeros(nb, t_max, dtype=torch.long, device=device)
    rewards = torch.zeros(nb, t_max)
    done = torch.zeros(nb, dtype=torch.bool)
    lengths = torch.full((nb,), t_max, dtype=torch.long)
    final = [0] * nb  # the state each episode ended in (the goal, or where the time ran out)
    for b, env in enumerate(envs):
        s, _ = env.reset(seed=seed + b % episodes)
        states[b, 0] = int(s)
        rtg[b, 0] = targets[b // episodes] / model.return_scale  # R-hat_1 = the target
    try:
        for t in range(t_max):
            lo = max(0, t + 1 - n_ctx)
            ts = torch.arange(lo, t + 1, device=device).expand(nb, -1)  # (nb, n)
            logits = model(rtg[:, lo:t + 1], states[:, lo:t + 1], actions[:, lo:t + 1], ts)[:, -1]  # (nb, A)
            if greedy:
                act = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                act = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            actions[:, t] = act
            for b, env in enumerate(envs):
                if done[b]:
                    continue
                s2, r, terminated, truncated, _ = env.step(int(act[b]))
                rewards[b, t] = float(r)
                if terminated or truncated:
                    done[b] = True
                    lengths[b] = t + 1
                    final[b] = int(s2)
                elif t + 1 < t_max:
                    states[b, t + 1] = int(s2)
                    rtg[b, t + 1] = rtg[b, t] - float(r) / model.return_scale  # R-hat_{t+1} = R-hat_t - r_t
            if bool(done.all()):
                break
    finally:
        for env in envs:
            env.close()
        model.train(was_training)
    returns = rewards.sum(dim=1).reshape(len(targets), episodes)
    trajs = []
    for b in range(nb):
        k = int(lengths[b])
        trajs.append((states[b, :k].tolist(), actions[b, :k].tolist(), rewards[b, :k].tolist()))
    return {"targets": torch.tensor(targets), "returns": returns, "achieved": returns.mean(dim=1),
            "lengths": lengths.reshape(len(targets), episodes), "trajectories": trajs,
            "returns_to_go": (rtg * model.return_scale).cpu(), "final_states": final}


# ----------------------------------------------------------------------------
# The lecture's claim
# ----------------------------------------------------------------------------

def return_conditioning(seed: int = 0, targets: Optional[Sequence[float]] = None, env_id: str = "CliffWalking-v1",
                        policies=None, t_max: int = 30, steps: int = 300, episodes: int = 10,
                        **train_kwargs) -> Dict[str, object]:
    """The lecture's claim in one call: collect the data (:func:`collect_offline_data`, default
    mix), train a Decision Transformer and its BC twin on it (:func:`train_policy`, same seed,
    same steps), evaluate the DT at each target and BC once (:func:`evaluate`, ``episodes``
    sampled episodes each, seeds ``seed .. seed + episodes - 1``).

    ``targets`` default :data:`CLAIM_TARGETS`. ``train_kwargs`` go to :func:`train_policy`.
    Returns ``{"data", "dt", "bc", "targets" (n,), "achieved" (n,) the DT's mean return per
    target, "dt_eval", "bc_return", "bc_eval", "data_best", "bands": {"low", "mid", "high"}
    (mean achieved over the targets <= -200, in (-200, -60], in [-40, data best]),
    "spearman" (rank correlation of target and achieved over the targets <= data best),
    "seconds" and "cpu_seconds": {"data", "dt", "bc", "eval"}}``.
    """
    seconds, cpu = {}, {}

    def clock(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        seconds[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        return value

    targets = _check_targets(CLAIM_TARGETS if targets is None else targets)
    data = clock("data", lambda: collect_offline_data(env_id, policies, t_max, seed))
    dt = clock("dt", lambda: train_policy(data, True, steps, seed, **train_kwargs)[0])
    bc = clock("bc", lambda: train_policy(data, False, steps, seed, **train_kwargs)[0])
    ev = clock("eval", lambda: evaluate(dt, targets, episodes, seed, env_id))
    ev_bc = evaluate(bc, None, episodes, seed, env_id)
    tg, ach, best = ev["targets"], ev["achieved"], float(data.returns.max())

    def band(sel):
        return float(ach[sel].mean()) if bool(sel.any()) else float("nan")

    inside = tg <= best
    ranks = torch.stack([tg[inside].argsort().argsort(), ach[inside].argsort().argsort()]).float()
    spearman = float(torch.corrcoef(ranks)[0, 1]) if int(inside.sum()) > 1 else float("nan")
    return {"data": data, "dt": dt, "bc": bc, "targets": tg, "achieved": ach, "dt_eval": ev,
            "bc_return": float(ev_bc["achieved"][0]), "bc_eval": ev_bc, "data_best": best,
            "bands": {"low": band(tg <= -200), "mid": band((tg > -200) & (tg <= -60)),
                      "high": band((tg >= -40) & (tg <= best))},
            "spearman": spearman, "seconds": seconds, "cpu_seconds": cpu}
