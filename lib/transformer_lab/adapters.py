r"""Parameter-efficient fine-tuning: adapters, LoRA, prompt tuning, prefix tuning, cloze patterns.

A pretrained model is frozen; a few new parameters (a few percent of the model or less)
are trained for the new task. Every method here works on the library's own models
(``TransformerLM``, ``TransformerClassifier``; adapters and LoRA on any model made of the
library's blocks) and goes through the library's attention.

Papers
------
* Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751
  (bottleneck adapters, two per block, initialised near the identity).
* Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
  Learning", arXiv:2005.00247 (one adapter per block, after the feed-forward network).
* He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
  arXiv:2110.04366 (parallel adapters; prefix tuning and LoRA in one frame).
* Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
* Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning", arXiv:2104.08691 (soft prompts prepended to the input).
* Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
  arXiv:2101.00190 (learned keys and values in front of every layer's own).
* Schick & Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification and
  Natural Language Inference" (PET), arXiv:2001.07676 (patterns and verbalisers).

Equations (rows are vectors; ``nn.Linear`` stores W as (d_out, d_in) and computes x W^T + b)
------------------------------------------------------------------------------------------
Bottleneck adapter with bottleneck m (Houlsby section 2.1)::

    Adapter(h) = h + f(h W_down^T + b_down) W_up^T + b_up        W_down (m, d), W_up (d, m)

``W_up`` and ``b_up`` start at zero, so ``Adapter(h) = h`` exactly at initialisation and the
adapted model starts as the pretrained one. Placements in a pre-norm block (x + F(LN(x))):

    houlsby   x + Adapter(Attn(LN x))  and  x + Adapter(FFN(LN x))     two per block, serial
    pfeiffer  x + Adapter(FFN(LN x))                                   one per block, serial
    parallel  x + FFN(LN x) + s * delta(LN x)                          beside the FFN (He et al.)

where delta(h) = Adapter(h) - h is the adapter's branch without its residual.

LoRA on a frozen linear layer W (d_out, d_in), rank r (Hu et al. eq. 3)::

    h = x W^T + (alpha / r) (x A^T) B^T,    A (r, d_in) random,  B (d_out, r) = 0 at init
    merged:  W' = W + (alpha / r) B A       (the same outputs, no extra cost at inference)

Prompt tuning (Lester et al.): L_p learned vectors E_p (L_p, d_model) in front of the embedded
input, ``[E_p; E(x)]``; the frozen model runs on L_p + L positions. Prefix tuning (Li & Liang):
in every layer l, learned keys and values in front of the real ones,
``K'_l = [K_p^(l); X_l W^K]``, ``V'_l = [V_p^(l); X_l W^V]`` (see
``attention.prepend_kv_prefix``); every query sees the prefix.

PET (Schick & Schütze): a pattern turns the input x into a cloze text with one blank, a
verbaliser maps each label y to a word v(y); the language model's score of the text with the
blank filled by v(y) is the label's score, and ``softmax`` over the labels gives q(y | x).
With a left-to-right LM the score is the log-probability of the filled-in text.

Parameter counts (d = d_model, N layers, m bottleneck, r rank, L_p prompt/prefix length)::

    one adapter              2 d m + m + d
    one LoRA on Linear(d_in -> d_out)    r (d_in + d_out)
    prompt tuning            L_p d
    prefix tuning            2 N L_p d        (keys and values in each of N layers)

Shapes: between blocks ``(B, L, d_model)``; inside attention ``(B, H, L, D)``.

Glossary (variable -> paper symbol)
-----------------------------------
=====================  ===================================================================
``bottleneck``         m, the adapter's hidden width (Houlsby: m << d)
``down``, ``up``       W_down (d -> m) and W_up (m -> d) of an adapter
``scale``              s, the parallel adapter's scaling (He et al.)
``r``, ``alpha``       LoRA's rank r and alpha; the update is scaled by alpha / r
``A``, ``B``           LoRA's factors: A (r, d_in) random, B (d_out, r) = 0 (see LoRALinear)
``targets``            names of the ``nn.Linear`` modules LoRA adapts (``qkv`` = [W^Q; W^K;
                       W^V], ``out`` = W^O, ``w1``/``w2`` the FFN, ``head``)
``n_prompt``           L_p, the number of soft prompt vectors (Lester: prompt length)
``n_prefix``           L_p (P in shapes), the prefix length (Li & Liang: |P_idx|)
``prefix_k/prefix_v``  K_p^(l), V_p^(l): (N, P, d_model) learned keys and values, one per layer
``pattern``            PET's P(x): a text with ``{x}`` for the input and ``{mask}`` for the blank
``verbalizer``         PET's v: label -> word
=====================  ===================================================================

Every function is device- and dtype-agnostic: new parameters are created on the device and
with the dtype of the layer or model they are added to.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import causal_mask, prepend_kv_prefix, scaled_dot_product_attention
from .models import TransformerClassifier, TransformerLM

__all__ = [
    "PLACEMENTS",
    "ACTIVATIONS",
    "BottleneckAdapter",
    "SerialAdapter",
    "ParallelAdapter",
    "add_adapters",
    "LoRALinear",
    "add_lora",
    "merge_lora",
    "lora_layers",
    "linear_names",
    "PromptTuning",
    "PrefixTuning",
    "prefix_attention",
    "freeze",
    "count_parameters",
    "adapter_parameters",
    "lora_parameters",
    "prompt_parameters",
    "prefix_parameters",
    "sequence_log_prob",
    "fill_pattern",
    "pet_scores",
]

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "tanh")


# ----------------------------------------------------------------------------
# Checks and counts
# ----------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int = 1, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int{what}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{what}; got {name}={value}")


def _check_module(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad = False`` on every parameter of ``model``; returns it."""
    _check_module(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once); only trainable ones if asked."""
    _check_module(model)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def adapter_parameters(d_model: int, bottleneck: int) -> int:
    """One bottleneck adapter: W_down (m, d) + b_down (m) + W_up (d, m) + b_up (d) = 2dm + m + d."""
    _check_int("d_model", d_model)
    _check_int("bottleneck", bottleneck, what=" (the adapter's hidden width m)")
    return 2 * d_model * bottleneck + bottleneck + d_model


def lora_parameters(d_in: int, d_out: int, r: int) -> int:
    """One LoRA on a Linear(d_in -> d_out): A (r, d_in) + B (d_out, r) = r (d_in + d_out)."""
    _check_int("d_in", d_in)
    _check_int("d_out", d_out)
    _check_int("r", r, what=" (the LoRA rank)")
    return r * (d_in + d_out)


def prompt_parameters(n_prompt: int, d_model: int) -> int:
    """Prompt tuning: n soft vectors of width d_model = n d."""
    _check_int("n_prompt", n_prompt, what=" (the number of soft prompt vectors)")
    _check_int("d_model", d_model)
    return n_prompt * d_model


def prefix_parameters(n_prefix: int, d_model: int, n_layers: int) -> int:
    """Prefix tuning: keys and values of length P in each of N layers = 2 N P d."""
    _check_int("n_prefix", n_prefix, what=" (the prefix length P)")
    _check_int("d_model", d_model)
    _check_int("n_layers", n_layers)
    return 2 * n_layers * n_prefix * d_model


def _blocks(model: nn.Module) -> list:
    """The model's blocks (encoder then decoder for an encoder-decoder), each with .attn and .ffn."""
    from .train import find_blocks

    blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        if not (hasattr(b, "attn") and hasattr(b, "ffn")):
            raise ValueError(f"block {i} of {type(model).__name__} ({type(b).__name__}) has no .attn "
                             "and .ffn: adapters go into the library's EncoderBlock/DecoderBlock")
    return blocks


def _param_like(module: nn.Module):
    """(device, dtype) of a module's first floating-point parameter (cpu/float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# ----------------------------------------------------------------------------
# Bottleneck adapters (Houlsby et al. 2019)
# ----------------------------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """``h + f(h W_down^T + b_down) W_up^T + b_up``: down to m, nonlinearity, up to d, residual.

    ``W_up`` and ``b_up`` start at zero, so at initialisation the adapter is exactly the
    identity and a model with adapters inserted computes what the pretrained model computed.
    (Houlsby et al. draw all weights from a near-zero normal; a zero up-projection, as in
    LoRA's B = 0, makes the start exact while the down-projection still gets a gradient
    as soon as W_up moves.)

    Args:
        d_model: width d of what the adapter reads and writes.
        bottleneck: hidden width m >= 1 (Houlsby: m << d; a few percent of the model in all).
        activation: f, one of ``ACTIVATIONS`` ("relu", "gelu", "tanh").

    ``forward(h)``: (..., d) -> (..., d). ``delta(h)`` is the branch alone (no residual),
    what a parallel adapter adds beside its sub-layer.
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu"):
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("bottleneck", bottleneck, what=" (the adapter's hidden width m)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        self.d_model, self.bottleneck, self.activation = d_model, bottleneck, activation
        self.down = nn.Linear(d_model, bottleneck)  # W_down, b_down: d -> m
        self.up = nn.Linear(bottleneck, d_model)  # W_up, b_up: m -> d
        nn.init.zeros_(self.up.weight)  # W_up = 0 and b_up = 0: Adapter(h) = h at the start
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}"

    def delta(self, h: Tensor) -> Tensor:
        """The adapter's branch ``f(h W_down^T + b_down) W_up^T + b_up``: (..., d) -> (..., d)."""
        if not isinstance(h, Tensor) or not h.is_floating_point():
            got = h.dtype if isinstance(h, Tensor) else type(h).__name__
            raise TypeError(f"h must be a floating-point tensor (..., d_model={self.d_model}); got {got}")
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h must have last dim d_model={self.d_model}; got shape {tuple(h.shape)}")
        act = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[self.activation]
        return self.up(act(self.down(h)))  # f(h W_down^T + b_down) W_up^T + b_up

    def forward(self, h: Tensor) -> Tensor:
        return h + self.delta(h)  # the adapter's own residual: identity at init


class SerialAdapter(nn.Module):
    """A sub-layer followed by an adapter: ``Adapter(sublayer(...))`` (Houlsby, Pfeiffer).

    Stands in for the sub-layer (``block.attn`` or ``block.ffn``) and takes the same
    arguments; an attention that returns ``(out, weights)`` keeps its weights.
    """

    def __init__(self, sublayer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.sublayer, self.adapter = sublayer, adapter

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        if isinstance(out, tuple):  # attention with need_weights=True: (out, weights)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


class ParallelAdapter(nn.Module):
    """A sub-layer with an adapter's branch beside it: ``sublayer(h) + scale * delta(h)`` (He et al.).

    The branch reads the sub-layer's input (after the block's LayerNorm in a pre-norm
    block) and its output is added to the sub-layer's output; the block's own residual
    connection is the residual, so the branch has none. With ``W_up = 0`` it adds nothing
    at initialisation.
    """

    def __init__(self, sublayer: nn.Module, adapter: BottleneckAdapter, scale: float = 1.0):
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a number; got {type(scale).__name__}")
        self.sublayer, self.adapter, self.scale = sublayer, adapter, float(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, h: Tensor) -> Tensor:
        return self.sublayer(h) + self.scale * self.adapter.delta(h)  # FFN(h) + s * branch(h)


def add_adapters(model: nn.Module, bottleneck: int, placement: str = "houlsby",
                 activation: str = "relu", scale: float = 1.0, freeze_base: bool = True) -> nn.Module:
    """Insert bottleneck adapters into every block of ``model`` (in place); returns ``model``.

    ``placement``: "houlsby" (after the self-attention and after the FFN of each block),
    "pfeiffer" (after the FFN only) or "parallel" (a branch beside the FFN, scaled by
    ``scale``). With ``freeze_base`` every parameter that was already there is frozen, so
    only the adapters train. The adapted model computes exactly what ``model`` computed
    before, until the adapters are trained.
    """
    _check_module(model)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}; got {placement!r}")
    _check_int("bottleneck", bottleneck, what=" (the adapter's hidden width m)")
    blocks = _blocks(model)
    if freeze_base:
        freeze(model)
    device, dtype = _param_like(model)

    def new(d):
        return BottleneckAdapter(d, bottleneck, activation).to(device=device, dtype=dtype)

    for block in blocks:
        d = block.d_model
        if placement == "houlsby":
            block.attn = SerialAdapter(block.attn, new(d))
            block.ffn = SerialAdapter(block.ffn, new(d))
        elif placement == "pfeiffer":
            block.ffn = SerialAdapter(block.ffn, new(d))
        else:
            block.ffn = ParallelAdapter(block.ffn, new(d), scale)
    return model


# ----------------------------------------------------------------------------
# LoRA (Hu et al. 2021)
# ----------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``x W^T + b + (alpha/r) (x A^T) B^T``.

    Args:
        base: the pretrained ``nn.Linear(d_in, d_out)``; its weight W (d_out, d_in) and bias
            are frozen (``requires_grad = False``).
        r: the rank, ``1 <= r <= min(d_in, d_out)`` (a larger r is no longer low rank).
        alpha: the update is scaled by ``alpha / r`` (default ``alpha = r``: scale 1), so that
            changing r does not change the size of the update's effect at the same learning rate.
        dropout: dropout on the input of the low-rank path (training mode only).

    ``B`` (d_out, r) starts at zero (Hu et al. section 4.1), so the layer starts as ``base``;
    ``A`` (r, d_in) starts random: the paper draws it from a Gaussian, the authors' code
    (loralib) and ``peft`` use ``nn.Linear``'s Kaiming-uniform, and so does this class.
    ``merge()`` folds the update into the weight, ``W <- W + (alpha/r) B A``: the same outputs,
    no extra cost at inference; ``unmerge()`` takes it out again. ``delta_weight()`` is ``(alpha/r) B A`` (d_out, d_in).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps an nn.Linear; got {type(base).__name__}")
        d_in, d_out = base.in_features, base.out_features
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"r must be an int (the LoRA rank); got {type(r).__name__} {r!r}")
        if not 1 <= r <= min(d_in, d_out):
            raise ValueError(
                f"r must be between 1 and min(d_in, d_out) = {min(d_in, d_out)} for a "
                f"Linear({d_in} -> {d_out}); got r={r}")
        alpha = float(r) if alpha is None else alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ValueError(f"alpha must be a positive number; got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        w = base.weight
        self.A = nn.Parameter(torch.empty(r, d_in, device=w.device, dtype=w.dtype))  # A: d_in -> r
        self.B = nn.Parameter(torch.zeros(d_out, r, device=w.device, dtype=w.dtype))  # B: r -> d_out, 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default, as in peft
        self.drop = nn.Dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The frozen base weight W (with the update folded in while merged)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"

    def delta_weight(self) -> Tensor:
        """The update ``(alpha / r) B A``: (d_out, d_in), rank <= r."""
        return self.scaling * (self.B @ self.A)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # x W^T + b: (..., d_out)
        if self.merged:  # the update is already inside W
            return out
        low = F.linear(F.linear(self.drop(x), self.A), self.B)  # (x A^T) B^T: never forms B A
        return out + self.scaling * low

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight: ``W <- W + (alpha / r) B A``."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; call unmerge() first")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the weight again: ``W <- W - (alpha / r) B A``."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False


def linear_names(model: nn.Module) -> list[str]:
    """The distinct attribute names of the ``nn.Linear`` modules in ``model`` (LoRA targets)."""
    _check_module(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name})


def add_lora(model: nn.Module, r: int, alpha: Optional[float] = None,
             targets: Sequence[str] = ("qkv",), dropout: float = 0.0,
             freeze_base: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoRALinear`.

    ``targets`` are names as they appear in the model (see :func:`linear_names`): in the
    library's blocks ``qkv`` ([W^Q; W^K; W^V], fused), ``out`` (W^O), ``q`` and ``kv``
    (cross-attention), ``w1``/``w2``/``w3`` (the FFN), and ``head``. Hu et al. adapt the
    attention projections (W^Q and W^V in their experiments). With ``freeze_base`` the whole
    model is frozen first, so only the LoRA factors train. Returns ``model`` (changed in place).
    """
    _check_module(model)
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one nn.Linear to adapt, e.g. ('qkv',)")
    available = linear_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(f"unknown target module name(s) {unknown}: {type(model).__name__} has "
                         f"nn.Linear modules named {available}")
    if freeze_base:
        freeze(model)
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, in module order."""
    _check_module(model)
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Merge every (unmerged) LoRA layer of ``model`` into its weight; returns how many."""
    layers = [m for m in lora_layers(model) if not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


# ----------------------------------------------------------------------------
# Prompt tuning and prefix tuning (soft prompts)
# ----------------------------------------------------------------------------

def _check_wrappable(model, who: str) -> None:
    if not isinstance(model, (TransformerLM, TransformerClassifier)):
        raise TypeError(f"{who} wraps the library's TransformerLM or TransformerClassifier; "
                        f"got {type(model).__name__}")


class _Frozen(nn.Module):
    """Shared code of the soft-prompt wrappers: the frozen model's own steps, in order."""

    def __init__(self, model, who: str):
        super().__init__()
        _check_wrappable(model, who)
        self.model = freeze(model)
        self.is_lm = isinstance(model, TransformerLM)
        self.d_model = model.config.d_model

    def _embed(self, idx: Tensor, padding_mask: Optional[Tensor]):
        """The frozen model's embedding: (x (B, L', d_model), padding mask (B, L') or None, n_lead).

        ``n_lead`` = 1 when a classifier puts its [CLS] vector first, else 0. Absolute
        positions are added here, to the input alone (a soft prompt carries none).
        """
        from .models import _check_ids, _check_padding_mask

        m = self.model
        _check_ids(idx, m.config.vocab_size)
        if self.is_lm:
            if padding_mask is not None:
                raise ValueError("a TransformerLM takes no padding_mask (it is causal)")
            return m.positions.embed(m.tok(idx)), None, 0
        _check_padding_mask(padding_mask, idx)
        x = m.tok(idx)  # (B, L, d_model)
        lead = 0
        if m.config.pooling == "cls":
            B = idx.shape[0]
            x = torch.cat([m.cls.expand(B, -1, -1).to(x.dtype), x], dim=1)  # [CLS] first
            if padding_mask is not None:
                real = torch.ones(B, 1, dtype=torch.bool, device=idx.device)
                padding_mask = torch.cat([real, padding_mask], dim=1)
            lead = 1
        return m.positions.embed(x), padding_mask, lead

    def _finish(self, h: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """Final norm and head: LM logits (B, L, vocab_size), or pooled classifier logits (B, C)."""
        m = self.model
        h = m.norm(h)
        if self.is_lm:
            return m.head(h)
        return m.head(m.pool(h, padding_mask))


class PromptTuning(_Frozen):
    """Prompt tuning (Lester et al. 2021): ``n_prompt`` learned vectors in front of the input.

    The wrapped model is frozen; the only trainable parameter is ``prompt`` (n, d_model). The
    frozen model runs on ``[prompt; E(x)]`` (for a classifier: ``[CLS; prompt; E(x)]``), and the
    prompt's own outputs are dropped, so ``forward`` returns what the model returns: logits
    (B, L, vocab_size) for a ``TransformerLM``, (B, C) for a ``TransformerClassifier``. Absolute
    position vectors are added to the input tokens before the prompt goes in front, so the input
    keeps the positions it had in pretraining; score-level schemes (RoPE, ALiBi, ...) see
    ``n + L`` positions. Every real token can attend to the prompt (in a causal model the prompt
    comes first, so it is always in the past).

    ``init``: "vocab" (default) starts each prompt vector as the embedding of a random token of
    the vocabulary (Lester et al. found this better than random vectors); "random": N(0, 0.02^2).
    """

    def __init__(self, model, n_prompt: int, init: str = "vocab", generator: Optional[torch.Generator] = None):
        super().__init__(model, "PromptTuning")
        _check_int("n_prompt", n_prompt, what=" (the number of soft prompt vectors)")
        if init not in ("vocab", "random"):
            raise ValueError(f"init must be 'vocab' or 'random'; got {init!r}")
        self.n_prompt = n_prompt
        table = model.tok.weight  # (V, d_model)
        if init == "vocab":
            rows = torch.randint(0, table.shape[0], (n_prompt,), generator=generator)
            start = table.detach()[rows.to(table.device)].clone()
        else:
            start = torch.randn(n_prompt, self.d_model, generator=generator).to(table) * 0.02
        self.prompt = nn.Parameter(start)  # P: (n, d_model)

    def extra_repr(self) -> str:
        return f"n_prompt={self.n_prompt}"

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        m, n = self.model, self.n_prompt
        x, padding_mask, lead = self._embed(idx, padding_mask)  # (B, lead + L, d)
        B = x.shape[0]
        prompt = self.prompt.to(x.dtype).expand(B, n, self.d_model)  # (B, n, d)
        h = torch.cat([x[:, :lead], prompt, x[:, lead:]], dim=1)  # [CLS?; P; E(x)]: (B, n + L', d)
        h = m.drop(h)
        if self.is_lm:
            mask = causal_mask(h.shape[1], device=h.device)  # the prompt is in everyone's past
        elif padding_mask is not None:
            real = torch.ones(B, n, dtype=torch.bool, device=h.device)  # prompt: always visible
            keep = torch.cat([padding_mask[:, :lead], real, padding_mask[:, lead:]], dim=1)
            mask = keep[:, None, None, :]  # (B, 1, 1, n + L')
        else:
            mask = None
        for block in m.blocks:
            h = block(h, mask=mask, positions=m.positions)  # (B, n + L', d)
        h = torch.cat([h[:, :lead], h[:, lead + n:]], dim=1)  # drop the prompt's own outputs
        return self._finish(h, padding_mask)


class PrefixTuning(_Frozen):
    """Prefix tuning (Li & Liang 2021): learned keys and values in front of every layer's own.

    The wrapped model is frozen; the trainable parameters are ``prefix_k`` and ``prefix_v``,
    each (N, P, d_model): for layer l, ``(prefix_k[l], prefix_v[l])`` is passed to that block's
    self-attention as ``kv_prefix`` (see ``attention.MultiHeadAttention``), so every layer's
    keys and values start with P learned vectors that every query can attend to. Unlike a soft
    prompt, a prefix is not computed by the frozen layers from an input vector: it *is* the key
    and value of each layer. ``forward`` returns what the model returns.

    Init: N(0, ``init_std``^2). (Li & Liang reparametrise the prefix by an MLP during training
    for stability; with a model this small the direct parameters train fine.)
    """

    def __init__(self, model, n_prefix: int, init_std: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        super().__init__(model, "PrefixTuning")
        _check_int("n_prefix", n_prefix, what=" (the prefix length P)")
        self.n_prefix = n_prefix
        n_layers = len(model.blocks)
        device, dtype = _param_like(model)
        shape = (n_layers, n_prefix, self.d_model)
        self.prefix_k = nn.Parameter(
            (torch.randn(*shape, generator=generator) * init_std).to(device=device, dtype=dtype))
        self.prefix_v = nn.Parameter(
            (torch.randn(*shape, generator=generator) * init_std).to(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"n_prefix={self.n_prefix}, n_layers={self.prefix_k.shape[0]}"

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        m = self.model
        x, padding_mask, _ = self._embed(idx, padding_mask)  # (B, L', d)
        h = m.drop(x)
        if self.is_lm:
            mask = causal_mask(h.shape[1], device=h.device)  # (L, L); the prefix is added inside
        else:
            mask = None if padding_mask is None else padding_mask[:, None, None, :]
        for l, block in enumerate(m.blocks):
            prefix = (self.prefix_k[l].to(h.dtype), self.prefix_v[l].to(h.dtype))  # (P, d) each
            h = block(h, mask=mask, positions=m.positions, kv_prefix=prefix)
        return self._finish(h, padding_mask)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     mask: Optional[Tensor] = None) -> Tensor:
    """Attention whose keys and values start with a prefix every query may attend to.

    q (B, H, Lq, D); k, v (B, H, Lk, D); prefix_k, prefix_v (H, P, D) (shared by the batch) or
    (B, H, P, D); mask: boolean (True = attend) or additive, broadcastable to (B, H, Lq, Lk),
    for the real keys only. Returns ``softmax(q [K_p; K]^T / sqrt(D) + M') [V_p; V]``:
    (B, H, Lq, D). A query whose real keys are all masked still attends to the prefix.
    """
    k2, v2, mask2, _ = prepend_kv_prefix(k, v, prefix_k, prefix_v, mask)
    return scaled_dot_product_attention(q, k2, v2, mask=mask2)


# ----------------------------------------------------------------------------
# PET: cloze questions for a language model
# ----------------------------------------------------------------------------

def sequence_log_prob(logits: Tensor, ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Log-probability a causal LM gives each sequence: ``sum_t log p(ids[t] | ids[:t])``, t >= 1.

    logits (B, L, vocab_size): the LM's output on ids (B, L); position t's logits predict token t + 1.
    mask (B, L) boolean, True on real tokens (right padding is False); None: all real.
    Returns (B,) in the logits' dtype. The first token is the given context (not scored).
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        raise ValueError("logits must be a floating-point (batch, seq, vocab) tensor; got "
                         + (f"shape {tuple(logits.shape)}, {logits.dtype}" if isinstance(logits, Tensor)
                            else type(logits).__name__))
    if not isinstance(ids, Tensor) or ids.shape != logits.shape[:2] or ids.is_floating_point():
        raise ValueError(f"ids must be an integer tensor of shape {tuple(logits.shape[:2])}; got "
                         + (f"{tuple(ids.shape)}, {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__))
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(ids[t+1] | ids[:t+1]): (B, L-1)
    if mask is not None:
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean of shape {tuple(ids.shape)}; got "
                             f"{tuple(mask.shape)}, {mask.dtype}")
        picked = picked.masked_fill(~mask[:, 1:], 0.0)  # padding contributes nothing
    return picked.sum(dim=-1)  # (B,)


def fill_pattern(pattern: str, x: str, word: str = "") -> str:
    """PET's pattern: ``pattern`` with ``{x}`` replaced by the input and ``{mask}`` by ``word``."""
    if not isinstance(pattern, str) or pattern.count("{x}") != 1 or pattern.count("{mask}") != 1:
        raise ValueError(f"pattern must contain '{{x}}' and '{{mask}}' exactly once each; got {pattern!r}")
    return pattern.replace("{x}", x).replace("{mask}", word)


@torch.no_grad()
def pet_scores(model: nn.Module, tokenizer, inputs: Iterable[str], pattern: str,
               verbalizer: Sequence[str], batch_size: int = 256) -> Tensor:
    """PET with a left-to-right LM: the score of label y for input x is log p(P(x) with v(y) in the blank).

    For each input and each verbaliser word, the pattern is filled in, encoded by ``tokenizer``
    (``encode(str) -> LongTensor``), and scored by :func:`sequence_log_prob` (the first token is
    the context; right padding ignored). Returns (N, C) scores: ``argmax`` is PET's prediction
    and ``softmax`` over the labels its q(y | x). Runs in eval mode and restores the mode.
    """
    _check_module(model)
    inputs = list(inputs)
    verbalizer = list(verbalizer)
    if not inputs or not verbalizer:
        raise ValueError("pet_scores needs at least one input and one verbaliser word")
    device, _ = _param_like(model)
    was_training = model.training
    model.eval()
    try:
        cols = []
        for word in verbalizer:
            texts = [fill_pattern(pattern, x, word) for x in inputs]
            scores = []
            for start in range(0, len(texts), batch_size):
                chunk = [tokenizer.encode(t) for t in texts[start:start + batch_size]]
                L = max(len(c) for c in chunk)
                ids = torch.zeros(len(chunk), L, dtype=torch.long)
                keep = torch.zeros(len(chunk), L, dtype=torch.bool)
                for i, c in enumerate(chunk):
                    ids[i, :len(c)], keep[i, :len(c)] = c, True
                ids, keep = ids.to(device), keep.to(device)
                scores.append(sequence_log_prob(model(ids).float(), ids, keep).cpu())
            cols.append(torch.cat(scores))
    finally:
        model.train(was_training)
    return torch.stack(cols, dim=-1)  # (N, C)
