"""A small, seeded training loop with a progress bar, and a loss evaluator.

Every lecture's claim check trains a tiny model for seconds; this loop is the one
they share, so it is kept short enough to read in one go::

    from transformer_lab.data import task_batches
    history = train(model, task_batches("copy", 32, 8, 16), steps=300, lr=3e-3, warmup=30)
    plt.plot(history["step"], history["loss"])

The ``get_batch`` contract
--------------------------
``get_batch(generator) -> (x, y)``. ``train`` calls it once per step with a CPU
``torch.Generator`` that it seeded from ``seed``; draw your random batch from it
(``torch.randint(..., generator=generator)``) and the whole run is reproducible.
A ``get_batch`` may ignore the generator (e.g. return a fixed batch). ``x`` is what
the model takes: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
(``model(**x)``); ``y`` is what ``loss_fn(output, y)`` takes. Tensors are moved to the
model's device by the loop. :func:`transformer_lab.data.task_batches` and
:func:`transformer_lab.data.lm_batches` follow this contract.

Optimiser and schedule
----------------------
AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
arXiv:1711.05101). Weight decay applies to matrices (``p.dim() >= 2``) only, not to
biases, gains or embeddings' 1-D parameters. Learning rate at step ``t`` (0-based):

    warm-up (Vaswani et al. 2017, arXiv:1706.03762 §5.3, here linear):
        lr_t = lr * (t + 1) / warmup                              for t < warmup
    then ``schedule="constant"`` (default):  lr_t = lr
    or ``schedule="cosine"``:  lr_t = lr * 0.5 * (1 + cos(pi * (t - warmup) / (steps - warmup)))

Gradients are clipped to a global norm of ``grad_clip`` (``None`` or ``0``: no
clipping); ``history["grad_norm"]`` is the norm *before* clipping. A step whose loss
is not finite is recorded (as ``nan``/``inf``) but not applied, so a diverging run
shows up in the history instead of corrupting the weights.

Seeding: ``train`` calls ``seed_everything(seed)`` first (dropout and anything else
drawing from the global RNG), so the same model (built after the same seed) trained
by the same call gives the same history. Build the model *after* seeding, e.g.
``seed_everything(0); model = TransformerLM(cfg); train(model, ..., seed=0)``.

Glossary: ``lr`` = eta (peak learning rate); ``warmup`` = number of warm-up steps;
``grad_norm`` = ||g||_2 over all parameters.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import grading_mode, seed_everything

__all__ = ["train", "evaluate", "lm_loss", "lr_at", "per_layer_grad_norms", "find_blocks"]

IGNORE = -100


def lm_loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ``ignore_index=-100``.

    ``output``: logits ``(B, T, V)`` (language model) or ``(B, C)`` (classifier);
    ``y``: ``(B, T)`` or ``(B,)`` class ids, ``-100`` where not scored.
    """
    if output.dim() > 2:
        output = output.reshape(-1, output.shape[-1])  # (B*T, V)
        y = y.reshape(-1)  # (B*T,)
    return F.cross_entropy(output.float(), y, ignore_index=IGNORE)


def lr_at(step: int, lr: float, warmup: int = 0, steps: int | None = None,
          schedule: str = "constant") -> float:
    """Learning rate at 0-based ``step``: linear warm-up, then constant or cosine decay."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup  # linear warm-up
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        if steps is None:
            raise ValueError("schedule='cosine' needs steps")
        span = max(1, steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine decay to 0
    raise ValueError(f"schedule must be 'constant' or 'cosine'; got {schedule!r}")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _forward(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch(get_batch: Callable, generator: torch.Generator):
    batch = get_batch(generator)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "get_batch(generator) must return a pair (x, y); got "
            + (f"a {type(batch).__name__} of length {len(batch)}"
               if isinstance(batch, (tuple, list)) else type(batch).__name__)
        )
    return batch


def _param_groups(model: nn.Module, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: nn.Module,
    get_batch: Callable,
    steps: int,
    lr: float = 3e-4,
    warmup: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device=None,
    loss_fn: Callable | None = None,
    progress: bool = True,
    desc: str = "train",
    eval_fn: Callable | None = None,
    eval_every: int | None = None,
    schedule: str = "constant",
) -> dict[str, list]:
    """Train ``model`` for ``steps`` AdamW steps; return the history.

    Args:
        model: any ``nn.Module``; called as described in the module docstring.
        get_batch: ``get_batch(generator) -> (x, y)`` (see the module docstring).
        steps: number of optimiser steps (>= 1).
        lr, warmup, schedule: peak learning rate, linear warm-up steps, then
            ``"constant"`` or ``"cosine"`` (decay to 0 at the last step).
        weight_decay: AdamW decoupled weight decay on matrices.
        grad_clip: max global gradient norm (``None``/``0``: no clipping).
        seed: seeds everything (``seed_everything``) and the batch generator.
        device: where to train (the model is moved there); default: the model's device.
        loss_fn: ``loss_fn(output, y) -> scalar``; default :func:`lm_loss`.
        progress: show a ``tqdm.auto`` bar (notebook widget or terminal); off in grading mode.
        desc: the bar's label.
        eval_fn: ``eval_fn(model) -> float``, called every ``eval_every`` steps and after
            the last step (the model is in eval mode and under ``no_grad`` during the call).
        eval_every: steps between evaluations (``None``: only at the end).

    Returns:
        dict of lists: ``"step"`` (1-based step number), ``"loss"`` (training loss of the
        batch, before the update), ``"grad_norm"`` (before clipping), ``"lr"``; with
        ``eval_fn`` also ``"eval"`` and ``"eval_step"`` (the step after which it ran).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(get_batch):
        raise TypeError(f"get_batch must be callable; got {type(get_batch).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0; got {warmup!r}")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive int or None; got {eval_every!r}")
    lr_at(0, lr, 0, steps, schedule)  # validates the schedule name
    loss_fn = lm_loss if loss_fn is None else loss_fn

    generator = seed_everything(seed)  # global RNGs (dropout) and the batch generator
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    was_training = model.training
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = float(grad_clip) if grad_clip else float("inf")

    history: dict[str, list] = {"step": [], "loss": [], "grad_norm": [], "lr": []}
    if eval_fn is not None:
        history["eval"], history["eval_step"] = [], []

    def run_eval(step):
        model.eval()
        with torch.no_grad():
            value = float(eval_fn(model))
        model.train()
        history["eval"].append(value)
        history["eval_step"].append(step)
        return value

    show = progress and not grading_mode()
    if show:  # tqdm (and, in a notebook, its widget) is imported only when a bar is shown
        from tqdm.auto import tqdm

        bar = tqdm(range(steps), desc=desc, leave=True, dynamic_ncols=True)
    else:
        bar = _NoBar(steps)
    postfix_every = max(1, steps // 50)
    model.train()
    try:
        for t in bar:
            lr_t = lr_at(t, lr, warmup, steps, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            x, y = _to(_batch(get_batch, generator), device)
            loss = loss_fn(_forward(model, x), y)  # scalar
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # ||g||_2 before clipping; clip_grad_norm_ rescales g so that ||g|| <= max_norm
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss_value, norm_value = float(loss.detach()), float(norm)
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                optimizer.step()
            history["step"].append(t + 1)
            history["loss"].append(loss_value)
            history["grad_norm"].append(norm_value)
            history["lr"].append(lr_t)
            if eval_fn is not None and eval_every is not None and (t + 1) % eval_every == 0:
                run_eval(t + 1)
            if show and (t % postfix_every == 0 or t == steps - 1):
                post = {"loss": f"{loss_value:.3f}"}
                if eval_fn is not None and history["eval"]:
                    post["eval"] = f"{history['eval'][-1]:.3f}"
                bar.set_postfix(post, refresh=False)
        if eval_fn is not None and (not history["eval_step"] or history["eval_step"][-1] != steps):
            run_eval(steps)
    finally:
        bar.close()
        model.train(was_training)
    return history


class _NoBar:
    """What ``train`` iterates over when no progress bar is shown: ``range(steps)``, and a
    ``close()`` that does nothing."""

    def __init__(self, steps: int):
        self._range = range(steps)

    def __iter__(self):
        return iter(self._range)

    def close(self) -> None:
        pass


@torch.no_grad()
def evaluate(
    model: nn.Module,
    get_batch: Callable,
    n_batches: int = 10,
    loss_fn: Callable | None = None,
    seed: int = 1234,
    device=None,
) -> float:
    """Mean loss of ``model`` over ``n_batches`` batches from ``get_batch(generator)``.

    The batches come from a generator seeded with ``seed`` (different from the
    training default, so evaluation draws batches training did not see in order), so
    the same call gives the same number. Runs in eval mode under ``no_grad`` and
    restores the model's mode. Batches whose loss is ``nan`` (e.g. nothing scored)
    are an error rather than silently averaged.
    """
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int; got {n_batches!r}")
    loss_fn = lm_loss if loss_fn is None else loss_fn
    device = torch.device(device) if device is not None else _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for _ in range(n_batches):
            x, y = _to(_batch(get_batch, generator), device)
            total += float(loss_fn(_forward(model, x), y))
    finally:
        model.train(was_training)
    return total / n_batches


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's stack of layers, in order (input side first).

    ``nn.ModuleList``/``nn.Sequential`` itself; else the first of the attributes
    ``blocks``, ``layers``, ``h`` that is one; else, for an encoder-decoder with
    ``encoder`` and ``decoder`` stacks (the library's ``EncoderDecoder``), the encoder's
    blocks followed by the decoder's; else the first ``ModuleList`` found in
    ``model.named_modules()``.
    """
    stacks = (nn.ModuleList, nn.Sequential)
    if isinstance(model, stacks):
        return list(model)
    for name in ("blocks", "layers", "h"):
        sub = getattr(model, name, None)
        if isinstance(sub, stacks):
            return list(sub)
    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if isinstance(enc, stacks) and isinstance(dec, stacks):
        return list(enc) + list(dec)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(
        f"could not find a stack of blocks in {type(model).__name__}: expected an "
        "nn.ModuleList attribute such as .blocks or .layers; pass blocks=... explicitly"
    )


def per_layer_grad_norms(model: nn.Module, blocks=None) -> list[float]:
    """Gradient norm of each block's parameters, in layer order (call after ``backward``).

    For block ``l``: ``||g_l||_2 = sqrt(sum over the block's parameters p of ||dL/dp||^2)``.
    Parameters without a gradient count as zero. ``blocks`` defaults to
    :func:`find_blocks` (``model.blocks`` for the library's models). Used by lecture 02
    to compare pre- and post-norm stacks at initialisation (Xiong et al. 2020, "On
    Layer Normalization in the Transformer Architecture", arXiv:2002.04745: with
    post-norm the gradient of the last layers is large and grows with depth, with
    pre-norm it stays roughly flat across layers).
    """
    blocks = find_blocks(model) if blocks is None else list(blocks)
    norms = []
    for block in blocks:
        sq = 0.0
        for p in block.parameters():
            if p.grad is not None:
                sq += float(p.grad.detach().float().pow(2).sum())  # ||dL/dp||^2
        norms.append(math.sqrt(sq))
    return norms
