"""Transformer Lab: the shared library of the course.

One module per concept, mirroring the lectures::

    attention   scaled dot-product and multi-head attention        (lecture 01)
    blocks      LayerNorm, FFN, residual scaling, encoder/decoder  (lecture 02)
    positions   sinusoidal, learned, Shaw, XL, T5, RoPE, ALiBi     (lecture 03)
    adapters    adapters, LoRA, prompt/prefix tuning, PET cloze     (lecture 04)
    sparse      sparse patterns as FlexAttention mask_mods, BFS    (lecture 05)
    lsh         LSH and routing attention, reversible layers       (lecture 06)
    lowrank     Linformer, Performer, linear attention as an RNN   (lecture 07)
    flash       tiled attention, online softmax, recomputed backward (lecture 08)
    memory      Transformer-XL recurrence, compressive and kNN memory (lecture 09)
    retrieval   nearest neighbours (torch, faiss), kNN-LM             (lecture 09)
    adaptive    Universal Transformer, ACT, adaptive span, early exit (lecture 10)
    ssm         state spaces, S4D, selective scan, the Mamba block    (lecture 11)
    ternary     BitNet b1.58, addition-only layers, MatMul-free LM    (lecture 12)
    decoding    greedy, beam, top-k/top-p sampling, KV cache, speculative decoding (lecture 13)
    objectives  MLM, span corruption, ELECTRA, NSP, distillation, Backpack, scaling (lecture 14)
    rl          offline RL data (gymnasium), returns-to-go, Decision Transformer, GTrXL gate (lecture 15)
    models      small configurable LM / classifier / seq2seq
    data        synthetic tasks and an offline character corpus
    train       a seeded training loop with a progress bar
    viz         attention heatmaps and widgets
    grading     checks with teaching messages (used by the exercises)
    device      device(), seed_everything(), grading_mode(), budget()

``import transformer_lab`` is cheap: the submodules are imported the first time
they are used (``transformer_lab.viz`` pulls in matplotlib and ipywidgets).
"""

from __future__ import annotations

import importlib

from .device import budget, device, grading_mode, seed_everything

__version__ = "0.1.0"

SUBMODULES = ("attention", "blocks", "positions", "adapters", "sparse", "lsh", "lowrank", "flash", "memory",
              "retrieval", "adaptive", "ssm", "ternary", "decoding", "objectives", "rl", "models", "data", "train",
              "viz", "grading")

__all__ = ["device", "seed_everything", "grading_mode", "budget", "__version__", *SUBMODULES]


def __getattr__(name: str):
    """Import a submodule on first access: ``transformer_lab.attention`` just works."""
    if name in SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
