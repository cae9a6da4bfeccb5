r"""Small configurable Transformers: a decoder-only LM, an encoder classifier, an encoder-decoder.

Papers
------
* Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762 (the encoder-decoder).
* Radford et al. 2018/2019, "Improving Language Understanding by Generative Pre-Training" /
  "Language Models are Unsupervised Multitask Learners" (GPT: the decoder-only LM).
* Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding", arXiv:1810.04805 (the [CLS] token for classification).

Equations
---------
Language model (factorised left to right, trained with cross-entropy on the next token)::

    p(x_1 .. x_L) = prod_t p(x_t | x_<t),   logits_t = W_head h_t,   h = Blocks(E[x] (+ P))

The causal mask makes h_t depend on x_1 .. x_t only. A classifier reads one vector per
sequence: the final state of a learned [CLS] vector prepended at position 0 (BERT), or the
mean of the final states of the real (non-padding) tokens.

Every model's parts are chosen by name through :class:`ModelConfig`: ``positions`` (any of
``positions.POSITION_SCHEMES``), ``norm_first`` (pre- or post-norm), ``residual`` ("none",
"layerscale", "rezero", "deepnorm"), ``activation`` ("relu", "gelu", "swiglu").

Shapes: token ids ``(B, L)`` (long); between blocks ``(B, L, d_model)``; logits
``(B, L, vocab_size)`` or ``(B, n_classes)``.

Glossary (variable -> symbol)
-----------------------------
==============  ===============================================
``idx``         token ids x, (B, L)
``tok``         the token embedding table E, (vocab_size, d_model)
``positions``   the position scheme P (embed / rotate / score_bias / value_term)
``blocks``      the stack of N blocks
``norm``        the final LayerNorm (pre-norm models only)
``head``        W_head, d_model -> vocab_size (or n_classes)
``cls``         the learned [CLS] vector
==============  ===============================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import positions as _positions
from .attention import causal_mask
from .blocks import ACTIVATIONS, RESIDUALS, DecoderBlock, EncoderBlock

__all__ = [
    "ModelConfig",
    "TransformerLM",
    "TransformerClassifier",
    "EncoderDecoder",
    "build_model",
    "MODEL_KINDS",
    "config_dict",
]

POOLINGS = ("cls", "mean")
MODEL_KINDS = ("lm", "classifier", "seq2seq")


@dataclass
class ModelConfig:
    """Everything that defines a model; parts are chosen by name."""

    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: Optional[int] = None
    max_len: int = 256
    positions: str = "sinusoidal"
    norm_first: bool = True
    residual: str = "none"
    activation: str = "gelu"
    dropout: float = 0.0
    n_classes: Optional[int] = None
    pooling: str = "cls"
    fast: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.positions not in _positions.POSITION_SCHEMES:
            raise ValueError(
                f"positions must be one of {_positions.POSITION_SCHEMES}; got {self.positions!r}"
            )
        choices = (("residual", RESIDUALS), ("activation", ACTIVATIONS), ("pooling", POOLINGS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    def block_kwargs(self) -> dict:
        """The arguments every block of this model gets."""
        return dict(d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                    dropout=self.dropout, activation=self.activation,
                    norm_first=self.norm_first, residual=self.residual,
                    n_layers=self.n_layers, fast=self.fast)


def _check_ids(idx, vocab_size: int, name: str = "idx") -> None:
    """Token ids must be a (B, L) integer tensor with values in [0, vocab_size)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids; got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer (long) tensor of token ids; got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (batch, seq); got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ValueError(
            f"{name} token ids must lie in [0, vocab_size={vocab_size}); "
            f"got min {int(idx.min())}, max {int(idx.max())}"
        )


def _check_padding_mask(padding_mask, idx: Tensor, name: str = "padding_mask") -> None:
    if padding_mask is None:
        return
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
        raise TypeError(f"{name} must be a boolean tensor (True = real token); got {got}")
    if padding_mask.shape != idx.shape:
        raise ValueError(
            f"{name} must have the shape of the token ids {tuple(idx.shape)}; "
            f"got {tuple(padding_mask.shape)}"
        )


def _final_norm(config: ModelConfig) -> nn.Module:
    """Pre-norm stacks end with a LayerNorm (their residual stream is never normalised)."""
    pre_norm = config.norm_first and config.residual not in ("deepnorm", "rezero")
    return nn.LayerNorm(config.d_model) if pre_norm else nn.Identity()


def _make_positions(config: ModelConfig, causal: bool, max_len: Optional[int] = None):
    """The model's position scheme; a causal stack gets T5's one-directional buckets (as in T5's decoder)."""
    kw = {"bidirectional": False} if causal and config.positions == "t5" else {}
    max_len = config.max_len if max_len is None else max_len
    return _positions.make_positions(config.positions, config.d_model, config.n_heads, max_len, **kw)


def _key_mask(padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, L) True-on-real-tokens -> (B, 1, 1, L) attention mask (hides padded keys)."""
    return None if padding_mask is None else padding_mask[:, None, None, :]


class TransformerLM(nn.Module):
    """Decoder-only causal language model (GPT): ``forward(idx (B, L)) -> logits (B, L, V)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)  # E
        self.positions = _make_positions(c, causal=True)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(**c.block_kwargs(), cross_attention=False) for _ in range(c.n_layers)
        )
        self.norm = _final_norm(c)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # W_head

    def forward(self, idx: Tensor) -> Tensor:
        _check_ids(idx, self.config.vocab_size)
        L = idx.shape[1]
        x = self.drop(self.positions.embed(self.tok(idx)))  # (B, L, d_model)
        mask = causal_mask(L, L, device=idx.device)  # (L, L): key j <= query i
        for block in self.blocks:
            x = block(x, mask=mask, positions=self.positions)  # (B, L, d_model)
        return self.head(self.norm(x))  # (B, L, V)

    @torch.no_grad()
    def generate(self, idx: Tensor, n_new: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Append ``n_new`` sampled tokens to ``idx`` (B, L); returns (B, L + n_new).

        Each step feeds the last ``max_len`` tokens, samples from
        ``softmax(logits / temperature)``; ``temperature=0`` is greedy (argmax).
        Runs in eval mode (no dropout) and restores the previous mode.
        """
        _check_ids(idx, self.config.vocab_size)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(n_new):
                logits = self(idx[:, -self.config.max_len:])[:, -1, :]  # (B, V) at the last step
                idx = torch.cat([idx, _sample(logits, temperature, generator)], dim=1)
        finally:
            self.train(was_training)
        return idx


def _sample(logits: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
    """One token per row from (B, V) logits -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


class TransformerClassifier(nn.Module):
    """Encoder + pooling + linear head: ``forward(idx (B, L), padding_mask=None) -> (B, n_classes)``.

    ``padding_mask`` (B, L) is True on real tokens; padded tokens are hidden as keys
    and left out of the mean, so they cannot change the output.
    Pooling "cls" prepends a learned [CLS] vector at position 0 and reads its final
    state (BERT); "mean" averages the final states of the real tokens.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.n_classes is None or config.n_classes < 1:
            raise ValueError(f"a classifier needs n_classes >= 1; got {config.n_classes}")
        self.config = c = config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        if c.pooling == "cls":
            self.cls = nn.Parameter(torch.randn(1, 1, c.d_model) * 0.02)  # [CLS]
        max_len = c.max_len + (c.pooling == "cls")
        self.positions = _make_positions(c, causal=False, max_len=max_len)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(**c.block_kwargs()) for _ in range(c.n_layers))
        self.norm = _final_norm(c)
        self.head = nn.Linear(c.d_model, c.n_classes)

    def encode(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Final states (B, L', d_model), L' = L + 1 with [CLS] first; and the matching mask."""
        _check_ids(idx, self.config.vocab_size)
        _check_padding_mask(padding_mask, idx)
        x = self.tok(idx)  # (B, L, d_model)
        if self.config.pooling == "cls":
            B = idx.shape[0]
            x = torch.cat([self.cls.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + L, d)
            if padding_mask is not None:
                real = torch.ones(B, 1, dtype=torch.bool, device=idx.device)  # [CLS] is real
                padding_mask = torch.cat([real, padding_mask], dim=1)  # (B, 1 + L)
        x = self.drop(self.positions.embed(x))
        mask = _key_mask(padding_mask)  # (B, 1, 1, L') or None
        for block in self.blocks:
            x = block(x, mask=mask, positions=self.positions)
        return self.norm(x), padding_mask

    def pool(self, h: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """(B, L', d_model) -> (B, d_model): the [CLS] state or the mean over real tokens."""
        if self.config.pooling == "cls":
            return h[:, 0]  # the [CLS] position
        if padding_mask is None:
            return h.mean(dim=1)
        w = padding_mask.to(h.dtype)[..., None]  # (B, L, 1): 1 on real tokens
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # mean over real tokens

    def forward(self, idx: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        h, padding_mask = self.encode(idx, padding_mask)
        return self.head(self.pool(h, padding_mask))  # (B, n_classes)


class EncoderDecoder(nn.Module):
    """The original seq2seq Transformer: ``forward(src (B, Ls), tgt (B, Lt)) -> logits (B, Lt, V)``.

    As in Vaswani et al. section 3.4, source and target share one vocabulary and one embedding
    table E, the output projection is E itself (``tie_embeddings``: logits = h E^T) and the
    embeddings are multiplied by sqrt(d_model) (``scale_embeddings``; E is then initialised
    with standard deviation d_model^-1/2, so the scaled embeddings have unit scale, like the
    positional encodings they are added to). ``src_padding_mask`` / ``tgt_padding_mask``
    (B, L) are True on real tokens. ``tgt`` is the decoder's input: the target shifted right
    behind a start token (see :meth:`greedy_decode`).
    """

    def __init__(self, config: ModelConfig, tie_embeddings: bool = True, scale_embeddings: bool = True):
        super().__init__()
        self.config = c = config
        self.tie_embeddings, self.scale_embeddings = tie_embeddings, scale_embeddings
        self.tok = nn.Embedding(c.vocab_size, c.d_model)  # E, shared by source and target
        if scale_embeddings:
            nn.init.normal_(self.tok.weight, std=c.d_model ** -0.5)
        self.enc_positions = _make_positions(c, causal=False)
        self.dec_positions = _make_positions(c, causal=True)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(**c.block_kwargs()) for _ in range(c.n_layers))
        self.decoder = nn.ModuleList(DecoderBlock(**c.block_kwargs()) for _ in range(c.n_layers))
        self.enc_norm, self.dec_norm = _final_norm(c), _final_norm(c)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.tok.weight  # logits = h E^T: one matrix, three uses

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (B, L) -> E[ids] * sqrt(d_model) (or unscaled): (B, L, d_model)."""
        x = self.tok(ids)  # (B, L, d_model)
        return x * self.config.d_model ** 0.5 if self.scale_embeddings else x

    def encode(self, src: Tensor, src_padding_mask: Optional[Tensor] = None,
               need_weights: bool = False):
        """src (B, Ls) -> memory X_enc (B, Ls, d_model); with ``need_weights`` also the list of
        every encoder layer's self-attention weights (B, H, Ls, Ls)."""
        _check_ids(src, self.config.vocab_size, "src")
        _check_padding_mask(src_padding_mask, src, "src_padding_mask")
        x = self.drop(self.enc_positions.embed(self.embed(src)))
        mask = _key_mask(src_padding_mask)  # (B, 1, 1, Ls)
        weights = []
        for block in self.encoder:
            x = block(x, mask=mask, positions=self.enc_positions, need_weights=need_weights)
            if need_weights:
                x, w = x
                weights.append(w)
        return (self.enc_norm(x), weights) if need_weights else self.enc_norm(x)

    def decode(self, tgt: Tensor, memory: Tensor, src_padding_mask: Optional[Tensor] = None,
               tgt_padding_mask: Optional[Tensor] = None, need_weights: bool = False):
        """tgt (B, Lt), memory (B, Ls, d_model) -> logits (B, Lt, V); with ``need_weights``
        also the lists of every decoder layer's self- and cross-attention weights."""
        _check_ids(tgt, self.config.vocab_size, "tgt")
        _check_padding_mask(tgt_padding_mask, tgt, "tgt_padding_mask")
        Lt = tgt.shape[1]
        mask = causal_mask(Lt, Lt, device=tgt.device)  # (Lt, Lt)
        if tgt_padding_mask is not None:
            mask = mask & _key_mask(tgt_padding_mask)  # (B, 1, Lt, Lt)
        memory_mask = _key_mask(src_padding_mask)  # (B, 1, 1, Ls)
        x = self.drop(self.dec_positions.embed(self.embed(tgt)))
        self_w, cross_w = [], []
        for block in self.decoder:
            x = block(x, memory, mask=mask, memory_mask=memory_mask, positions=self.dec_positions,
                      need_cross_weights=need_weights)
            if need_weights:
                x, ws, wc = x
                self_w.append(ws)
                cross_w.append(wc)
        logits = self.head(self.dec_norm(x))  # (B, Lt, V)
        return (logits, self_w, cross_w) if need_weights else logits

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Optional[Tensor] = None,
                tgt_padding_mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(tgt, Tensor) and tgt.dim() >= 1 and isinstance(src, Tensor) and src.dim() >= 1 \
                and tgt.shape[0] != src.shape[0]:
            raise ValueError(
                f"src and tgt must have the same batch size; got {src.shape[0]} and {tgt.shape[0]}"
            )
        memory = self.encode(src, src_padding_mask)  # (B, Ls, d_model)
        return self.decode(tgt, memory, src_padding_mask, tgt_padding_mask)

    @torch.no_grad()
    def attention_maps(self, src: Tensor, tgt: Tensor) -> dict:
        """Every layer's attention weights for one forward pass (eval mode, restored after):
        ``{"encoder": [(B, H, Ls, Ls)], "decoder": [(B, H, Lt, Lt)], "cross": [(B, H, Lt, Ls)]}``,
        one tensor per layer, layer 1 first."""
        was_training = self.training
        self.eval()
        try:
            memory, enc_w = self.encode(src, need_weights=True)
            _, dec_w, cross_w = self.decode(tgt, memory, need_weights=True)
        finally:
            self.train(was_training)
        return {"encoder": enc_w, "decoder": dec_w, "cross": cross_w}

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, n_steps: int, bos: int,
                      src_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy decoding: encode ``src`` (B, Ls) once, start the target with ``bos``, and
        append the most likely token ``n_steps`` times. Returns the (B, n_steps) generated ids
        (without ``bos``). Runs in eval mode (no dropout) and restores the previous mode."""
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int; got {n_steps!r}")
        if not 0 <= bos < self.config.vocab_size:
            raise ValueError(f"bos must be a token id in [0, vocab_size={self.config.vocab_size}); got {bos}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src, src_padding_mask)  # (B, Ls, d_model), once
            out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
            for _ in range(n_steps):
                logits = self.decode(out, memory, src_padding_mask)[:, -1]  # (B, V) at the last step
                out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
        finally:
            self.train(was_training)
        return out[:, 1:]


_KINDS = {"lm": TransformerLM, "classifier": TransformerClassifier, "seq2seq": EncoderDecoder}


def build_model(kind: str = "lm", **config_kwargs) -> nn.Module:
    """``build_model("lm", vocab_size=65, positions="rope")``: a ModelConfig, then the model."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}; got {kind!r}")
    return _KINDS[kind](ModelConfig(**config_kwargs))


def config_dict(model: nn.Module) -> dict:
    """The model's configuration as a plain dict (for logging and saving)."""
    return asdict(model.config)
