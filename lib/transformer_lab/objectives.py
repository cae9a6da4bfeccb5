r"""Pre-training objectives, sentence embeddings, Backpack language models, scaling laws.

Papers
------
* Devlin, Chang, Lee, Toutanova 2018, "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", arXiv:1810.04805: sec. 3.1 (masked LM with the 80/10/10 rule, next
  sentence prediction), the [CLS] token.
* Liu, Ott, Goyal, Du, Joshi, Chen, Levy, Lewis, Zettlemoyer, Stoyanov 2019, "RoBERTa: A Robustly
  Optimized BERT Pretraining Approach", arXiv:1907.11692: sec. 4.2 (dropping NSP), dynamic masking;
  Lan et al. 2019, "ALBERT: A Lite BERT for Self-supervised Learning of Language Representations",
  arXiv:1909.11942 (why NSP is mostly topic prediction).
* Wettig, Gao, Zhong, Chen 2022, "Should You Mask 15% in Masked Language Modeling?",
  arXiv:2202.08005 (higher masking rates; this module pre-trains its tiny encoder at 0.4).
* Radford, Narasimhan, Salimans, Sutskever 2018, "Improving Language Understanding by Generative
  Pre-Training" (OpenAI report, no arXiv id): the causal LM objective then fine-tuning.
* Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu 2019, "Exploring the Limits of
  Transfer Learning with a Unified Text-to-Text Transformer", arXiv:1910.10683: sec. 3.1.4 and
  3.3 (span corruption with sentinel tokens, 15% noise, mean span length 3).
* Clark, Luong, Le, Manning 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather
  Than Generators", arXiv:2003.10555: sec. 2 (replaced-token detection, eq. 1-2, lambda = 50).
* Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531
  (soft targets at a temperature, the T^2 factor); Sanh, Debut, Chaumond, Wolf 2019, "DistilBERT,
  a distilled version of BERT: smaller, faster, cheaper and lighter", arXiv:1910.01108 (the triple
  loss: soft targets, masked LM, cosine between hidden states).
* Reimers, Gurevych 2019, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
  arXiv:1908.10084 (mean pooling beats [CLS] for sentence embeddings of an encoder not trained
  for them).
* Hewitt, Thickstun, Manning, Liang 2023, "Backpack Language Models", arXiv:2305.16765 (ACL 2023):
  sense vectors, contextualization weights, interventions. (A widely shared reading list links it
  as arXiv:2302.07730: that id is another paper.)
* Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv:2203.15556
  (Chinchilla: how to split compute between parameters and tokens).
* Kaplan, McCandlish, Henighan, Brown, Chess, Child, Gray, Radford, Wu, Amodei 2020, "Scaling Laws
  for Neural Language Models", arXiv:2001.08361: eq. 1.1, L(N) = (N_c / N)^alpha_N.

Notation (proposed for the lecture's page)
------------------------------------------
$p_\text{mask}$ the masking rate (0.15) and $\mathcal M$ the selected positions; $x^{(N)}$ an
encoder's final states (lecture 10's $x^{(l)}$ at $l = N$); $\text{lg}^\text{s}, \text{lg}^\text{t}$ a
student's and a teacher's logits, $p^{(T)}_\text{s}, p^{(T)}_\text{t}$ their softmax at temperature $T$; $\varpi$ the weight
of one loss term: $\varpi_\text{soft}, \varpi_\text{hard}, \varpi_\text{cos}$ (DistilBERT's
$\alpha_{ce}, \alpha_{mlm}, \alpha_{cos}$; $\alpha$ is LoRA's scale), $\varpi_\text{disc}$ (ELECTRA's
$\lambda$ = 50; $\lambda$ is kNN-LM's); $T$ the softmax temperature of distillation (the course's
$T$); $p_\text{noise}$ and $\bar L_\text{span}$, T5's noise density and mean span length; $\mathbf s$
a sentence embedding ($\mathbf s_\text{CLS}$, $\mathbf s_\text{mean}$); the Backpack's $n_s$ senses per
word (the paper's $k$), sense vectors $\mathcal C(x)_a \in \mathbb R^{d_\text{model}}$, $a = 1..n_s$
(the paper's $C(x)_\ell$; $C$ is lecture 07's chunk and $\ell$ lecture 08's running sum),
contextualization weights $\mathcal W_{a,ij} \ge 0$ (the paper's $\alpha_{\ell ij}$; $\mathcal A$ is lecture 13's acceptance rate), output $o_i$, an edit $\mathbf d_\text{edit}$ added to one sense vector,
and tied embedding table $E_\text{tok}$ (the paper's $E$; lecture 07's $E$ is Linformer's projection); scaling: $\mathcal L$ the loss, $n_\text{p}$ the non-embedding parameter
count (Kaplan's $N$; $N$ is our number of layers), $n_\star$ (Kaplan's $N_c$), $\vartheta$ (Kaplan's
$\alpha_N$) and $\mathcal L_\infty$ an irreducible loss.

Masked LM (BERT)
----------------
Each real (non-special) position is selected with probability $p_\text{mask}$ = 0.15; the loss is
the cross-entropy of the original token at the selected positions only (``labels = -100``
elsewhere). A selected position's input becomes ``[MASK]`` with probability 0.8, a random
token with probability 0.1 and stays itself with probability 0.1 (:func:`mask_tokens`), so the
model cannot learn that only ``[MASK]`` positions matter (there is no ``[MASK]`` at fine-tuning):

.. math::

    \mathcal L_\text{MLM} = -\frac{1}{|\mathcal M|} \sum_{i \in \mathcal M} \log p(y_i \mid \tilde y).

Selection here is a Bernoulli draw per position (as Hugging Face's collator and RoBERTa's
dynamic masking; BERT's preprocessing picked exactly round(0.15 L) positions per sequence).

Causal LM (GPT)
---------------
:math:`\mathcal L_\text{LM} = -\frac1{L-1}\sum_t \log p(y_{t+1} \mid y_{\le t})`: inputs ``x[:-1]``,
targets ``x[1:]`` (:func:`causal_lm_targets`), every position scored, nothing hidden but the future.

Span corruption (T5)
--------------------
$\mathrm{round}(p_\text{noise} L)$ tokens in $\mathrm{round}(p_\text{noise} L / \bar L_\text{span})$
spans (:func:`random_spans_noise_mask`, T5's ``random_spans_noise_mask``: the sequence starts with a
kept span, kept and noise spans alternate, their lengths a random segmentation). Each noise span is
replaced in the input by one sentinel; the target lists each sentinel followed by the span it hid,
and a last sentinel (:func:`span_corrupt`); :func:`span_uncorrupt` puts them back together::

    text     Thank you for inviting me to your party last week .
    input    Thank you <X0> me to your party <X1> week .
    target   <X0> for inviting <X1> last <X2>

(the paper's Figure 2). T5's code draws masks that always end in a noise span and closes the
target with EOS; here a last sentinel closes it, as in the figure, whatever the mask.

Replaced-token detection (ELECTRA)
----------------------------------
A small generator (an MLM) fills the masked positions with samples
$\hat y_i \sim p_\text{gen}(\cdot \mid \tilde y)$; the discriminator reads the corrupted text and predicts for
every position whether its token was replaced: label 1 iff $\hat y_i \ne y_i$ (a sample equal to
the original counts as original). Loss (:func:`electra_loss`):
$\mathcal L_\text{MLM}(\text{generator}) + \varpi_\text{disc}\,\mathcal L_\text{Disc}$, $\mathcal L_\text{Disc}$ the binary
cross-entropy over all real positions; the sampling step is not back-propagated through.

Next-sentence prediction (BERT) and why RoBERTa dropped it
----------------------------------------------------------
Pairs ``[CLS] A [SEP] B [SEP]`` with segment ids 0 for A and 1 for B; B is A's successor in
the same document half of the time (IsNext) and a random sentence of another document otherwise
(NotNext) (:func:`nsp_pairs`). RoBERTa (sec. 4.2, Table 2) found that removing NSP and packing
full sentences from one document matched or slightly improved downstream results, and that
pairs of single sentences hurt. Why NSP teaches little was argued by Lan et al. 2019, "ALBERT: A
Lite BERT for Self-supervised Learning of Language Representations", arXiv:1909.11942: a random
sentence from another document is usually off-topic, so NSP is mostly topic prediction, which
the MLM already learns (ALBERT replaced it with sentence-order prediction).
:func:`nsp_topic_shortcut` measures the shortcut: on topical documents (4 topics)
answering "IsNext iff same topic" is right 0.880 / 0.892 / 0.877 of the time (seeds 0-2, 2000
pairs each; 0.875 expected from a perfect topic detector), with no idea of order or coherence.

Knowledge distillation (Hinton et al.; DistilBERT)
--------------------------------------------------
With teacher and student logits $\text{lg}^\text{t}$, $\text{lg}^\text{s}$, final states $x^{(N)}_\text{t}$, $x^{(N)}_\text{s}$ (lecture 10's $x^{(l)}$ after the last layer) and $p^{(T)} = \operatorname{softmax}(\text{lg} / T)$
(:func:`distillation_loss`):

.. math::

    \mathcal L_\text{soft} = T^2\,\mathrm{KL}\bigl(p^{(T)}_\text{t} \,\|\, p^{(T)}_\text{s}\bigr), \quad
    \mathcal L_\text{hard} = \mathrm{CE}(\text{lg}^\text{s}, y), \quad
    \mathcal L_\text{cos} = 1 - \cos(x^{(N)}_\text{s}, x^{(N)}_\text{t}),

    \mathcal L = \varpi_\text{soft} \mathcal L_\text{soft} + \varpi_\text{hard} \mathcal L_\text{hard}
               + \varpi_\text{cos} \mathcal L_\text{cos}.

The gradient of $\mathcal L_\text{soft}$ with respect to $\text{lg}^\text{s}$ is $T\,(p^{(T)}_\text{s} - p^{(T)}_\text{t})$ per row
(divided by the batch). Without the $T^2$ it would be $(p^{(T)}_\text{s} - p^{(T)}_\text{t}) / T$, which
shrinks like $1/T^2$ for large $T$ (Hinton et al. sec. 2): the factor keeps the soft term's weight
comparable across temperatures. KL (not the cross-entropy with the soft targets,
which adds the teacher's entropy) makes $\mathcal L_\text{soft} = \mathcal L_\text{cos} = 0$ when
student equals teacher; $\mathcal L_\text{hard}$ is the ordinary loss and is 0 only for a perfect
one-hot prediction. DistilBERT used $\varpi = (5, 2, 1)$ for (soft, MLM, cos).

Sentence embeddings
-------------------
From an encoder's final states $x^{(N)}$ (B, L, d_model) and a padding mask (True on real tokens)
(:func:`pool`): $\mathbf s_\text{CLS} = x^{(N)}_0$ (the state of the ``[CLS]`` token) or
$\mathbf s_\text{mean}$, the mean of $x^{(N)}_i$ over the real tokens $i$ only (padding left out).
:func:`pca_2d` projects embeddings on their two main directions for a plot. Similarity is the cosine $\mathbf s \mathbf s'^\top / (\|\mathbf s\| \|\mathbf s'\|)$; retrieval
(:func:`retrieve`) is a maximum-inner-product search over L2-normalised embeddings through
``retrieval.make_index`` (the course's one search). A *linear probe* trains only a linear head on
frozen embeddings (computed once); *fine-tuning* trains the encoder and the head
(:func:`linear_probe`, :func:`fine_tune`, both return accuracy, trainable parameters and seconds).

Backpack language models (Hewitt et al. 2023)
---------------------------------------------
Each vocabulary word $x$ has $n_s$ sense vectors $\mathcal C(x)_a = \mathrm{FF}(x E_\text{tok})_a$ ($x$ the word's one-hot row), independent of
context. A small causal Transformer reads the sequence (final states $x^{(N)}$) and gives non-negative weights (a softmax
over $j \le i$ per sense, each sense its own query and key projection):

.. math::

    \mathcal W_{a,ij} = \operatorname{softmax}_j\!\Bigl(\frac{(x^{(N)}_i W^Q_a)(x^{(N)}_j W^K_a)^\top}{\sqrt{d_\text{model}}}\Bigr), \qquad
    o_i = \sum_{j \le i} \sum_{a=1}^{n_s} \mathcal W_{a,ij}\, \mathcal C(x_j)_a, \qquad
    \text{logits}_i = o_i E_\text{tok}^\top.

The output is linear in the sense vectors and the weights do not depend on them, so an edit
$\mathcal C(w)_a \leftarrow \mathcal C(w)_a + \mathbf d_\text{edit}$ changes the logits at position $i$ by exactly
$\bigl(\sum_{j \le i:\, x_j = w} \mathcal W_{a,ij}\bigr)\, \mathbf d_\text{edit} E_\text{tok}^\top$ (:class:`BackpackLM`,
:meth:`BackpackLM.intervene`, :func:`predicted_logit_change`). A sense's meaning is read as
$\mathcal C(w)_a E_\text{tok}^\top$: the words it pushes up (:meth:`BackpackLM.sense_top_words`).

Scaling laws in miniature (Kaplan et al. 2020)
----------------------------------------------
For models limited by their size (trained long enough on enough data)
$\mathcal L(n_\text{p}) = (n_\star / n_\text{p})^{\vartheta}$, a straight line of slope $-\vartheta$ on a
log-log plot ($\vartheta \approx 0.076$ for Kaplan's models, $n_\text{p}$ without embeddings). A
finite corpus and a short run add a floor: $\mathcal L = (n_\star/n_\text{p})^\vartheta + \mathcal L_\infty$
(:func:`fit_power_law`). The miniature (:func:`scaling_sweep`) trains a handful of tiny LMs for the
same tokens; it is faithful only in shape: its models are far from convergence and its compute
is tiny, so the exponent it measures is not Kaplan's.

Shapes
------
Token ids ``(B, L)`` (long); between blocks ``(B, L, d_model)``; inside attention
``(B, H, L, D)``; logits ``(B, L, vocab_size)``; Backpack senses ``(B, L, n_s, d_model)`` and
weights ``(B, n_s, L, L)``; a sentence embedding ``(B, d_model)``.

Claims and calibrated settings
------------------------------
Measured 2026-11-30 on the shared 2-core CPU (load average 7-10 from other jobs, so wall times
are 3-4x the CPU times; ``torch.set_num_threads(1)``), at the module's defaults, seeds 0-2 (0-4
for the first two claims):

1. *Embeddings of a tiny pre-trained encoder separate the classes before any fine-tuning*
   (:func:`pretrain_encoder` then :func:`probe_vs_finetune`; :func:`topic_corpus` with 4 classes
   of 16 topic words, 8 common words, half the words topical, 8-16 words; a :class:`TinyEncoder`
   d_model 32, 2 layers, 2 heads, MLM with ``p_mask`` 0.4, 200 steps of 128 sentences, lr 1e-2;
   a linear probe on 16 labelled sentences, tested on 512). Mean-pooled probe accuracy
   0.973 / 0.990 / 0.994 / 0.994 / 0.986 (seeds 0-4; chance 0.25), against 0.766 / 0.631 /
   0.490 / 0.627 / 0.609 for the same probe on a randomly initialised encoder of the same shape
   (a bag of random word vectors already carries some class signal; pre-training adds 0.21-0.50).
   ``[CLS]`` probe 0.949 / 0.984 / 0.994 / 1.000 / 0.990: with MLM at 0.4 the [CLS] state, never
   trained for anything, still mixes the sentence's words; with 1 layer and 150 steps it lagged
   mean pooling (0.36-0.45 vs 0.59-0.93 on seeds 0-1), as Sentence-BERT reports for BERT. Assert
   ``probe > 0.85`` (margin >= 0.12 over 5 seeds) and ``probe > random-init probe + 0.1``
   (smallest gap 0.21). Pre-training: 3.4-4.7 s of CPU (12-16 s wall under that load).
   Cosine retrieval (:func:`retrieval_precision`, k = 5, the 512 test sentences, seeds 0-2):
   pre-trained mean pooling 0.969 / 0.989 / 0.989, [CLS] 0.919 / 0.988 / 0.995; a randomly
   initialised encoder 0.68-0.77 (mean) and 0.58-0.71 ([CLS]); chance about 0.25.
2. *A linear probe reaches a stated fraction of fine-tuning's accuracy at a fraction of its cost*
   (the same call; fine-tuning: every parameter, 100 AdamW steps of 16, lr 1e-3). Fine-tuned
   accuracy 0.969 / 0.982 / 0.984 / 0.947 / 0.984; probe / fine-tune = 1.004 / 1.008 / 1.010 /
   1.049 / 1.002 (assert >= 0.9); trainable parameters 132 vs 31,088 (0.4%, assert < 1%);
   seconds 0.33-0.70 vs 1.3-4.7 (ratio 0.12-0.26: print it, never assert a time). Probe and
   fine-tuning together 0.7-0.8 s of CPU.
3. *An intervention on one sense vector changes the output predictably* (:func:`train_backpack`,
   200 steps of 64 sentences, d_model 32, 4 senses, lr 1e-2, 2.4-2.6 s CPU; then
   :func:`backpack_topic_edit`). The topic sense of class 0's first topic word has class-0 topic
   words as its 5 top words on every seed. Adding 4 x (mean E of class-1 topic words - mean E of
   class-0's) to it moves the next-word mass on class-0 / class-1 topic words, at the positions
   from that word on in class-0 sentences, from 0.538 / 0.001, 0.499 / 0.002, 0.519 / 0.003 to
   0.176 / 0.047, 0.074 / 0.078, 0.200 / 0.168 (assert: class-1 mass x10 or more, measured
   x38-x49; class-0 mass halved or more, measured x0.15-x0.39); the measured logit change equals
   :func:`predicted_logit_change` to 6.1e-6. Zeroing the sense instead barely moves them
   (0.515 / 0.002): the other words' senses carry the topic too.
4. *Scaling laws in miniature* (:func:`scaling_sweep`: 2-layer ``models.TransformerLM`` of width
   4, 8, 16, 32 = 496 to 25,472 non-embedding parameters, 100 steps of 16 x 64 characters of the
   standard-library corpus, lr 1e-2, held-out loss; 3.1-3.7 s CPU). Held-out loss falls with
   size on every seed (3.35 / 2.42 / 2.09 / 1.92 on seed 0); the plain log-log fit gives
   exponent 0.137 / 0.115 / 0.090 (R^2 0.907 / 0.984 / 0.982) (assert a falling loss, an
   exponent in (0.03, 0.3) and R^2 > 0.85). With a floor, 4 points fit 3 parameters almost
   exactly (seed 0: floor 1.82, exponent 0.68, R^2 0.999; seeds 1-2 choose no floor): show it as
   a warning, not a result. Kaplan's 0.076 comes from models of 768 to 1.5e9 parameters trained
   near convergence with tuned learning rates; here two decades of size, 100 steps (the large
   models are the most under-trained) and one learning rate for all: the slope is not Kaplan's,
   and the shape is all the miniature shows. Hoffmann et al. 2022, "Training Compute-Optimal
   Large Language Models", arXiv:2203.15556 (Chinchilla), later revised how compute should be
   split between parameters and tokens.

Together the four claims take about 11 s of CPU per seed (within the lecture's ~25 s). The
issue lists no benchmark for this lecture: there is no benchmark hook.

Glossary (code -> symbol)
-------------------------
==========================  =============================================================
``p_mask``                  p_mask, the masking rate (BERT's 15%)
``labels``                  the MLM targets: the original token at selected positions, -100 elsewhere
``noise_density``           p_noise (T5's 0.15); ``mean_span_length`` L_span-bar (3)
``sentinel_ids``            the sentinel tokens <X0>, <X1>, ... (T5's <extra_id_k>)
``disc_weight``             varpi_disc (ELECTRA's lambda)
``temperature``             T
``w_soft, w_hard, w_cos``   varpi_soft, varpi_hard, varpi_cos (DistilBERT's alpha_ce, alpha_mlm, alpha_cos)
``n_senses``                n_s (the Backpack paper's k)
``senses``                  C(x)_a, (B, L, n_s, d_model)
``weights`` (Backpack)      W_{a,ij} (script W), (B, n_s, L, L)
``delta``                   d_edit, an edit added to one sense vector, (d_model,)
``n_params``                n_p, non-embedding parameters (Kaplan's N)
``exponent``, ``n_star``    vartheta, n_star (Kaplan's alpha_N, N_c); ``floor`` L_inf
==========================  =============================================================
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    # objectives
    "IGNORE",
    "MaskedBatch",
    "mask_tokens",
    "causal_lm_targets",
    "random_spans_noise_mask",
    "t5_sentinels",
    "span_corrupt",
    "span_uncorrupt",
    "electra_corrupt",
    "electra_loss",
    "nsp_pairs",
    "nsp_topic_shortcut",
    "distillation_loss",
    # embeddings
    "pool",
    "cosine_similarity_matrix",
    "pca_2d",
    "retrieve",
    "retrieval_precision",
    "Vocab",
    "topic_corpus",
    "TinyEncoder",
    "pretrain_encoder",
    "embed",
    "linear_probe",
    "fine_tune",
    "probe_vs_finetune",
    # Backpack
    "BackpackLM",
    "predicted_logit_change",
    "train_backpack",
    "backpack_topic_edit",
    # scaling
    "non_embedding_parameters",
    "fit_power_law",
    "scaling_sweep",
    # the table
    "MODEL_TABLE",
]

#: Target value the cross-entropy ignores (``ignore_index=-100``), as in ``data.IGNORE``.
IGNORE = -100


# ----------------------------------------------------------------------------
# Input checks: each one says what was expected and what came.
# ----------------------------------------------------------------------------

def _generator(generator) -> Optional[torch.Generator]:
    """None -> the global RNG; int -> a fresh CPU generator seeded with it; Generator -> as is."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be None, an int seed or a torch.Generator; got {type(generator).__name__}")


def _rand(shape, generator, device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to ``device``."""
    g = generator
    dev = g.device if g is not None else device
    return torch.rand(shape, generator=g, device=dev).to(device)


def _check_ids(name: str, ids, dims=(1, 2)) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids; got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer (long) tensor of token ids; got {ids.dtype}")
    if ids.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions; got shape {tuple(ids.shape)}")
    return ids


def _check_rate(name: str, value, what: str = "a probability") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in (0, 1) ({what}); got {type(value).__name__}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie in (0, 1) ({what}); got {name}={value}")
    return float(value)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {name}={value}")
    return value


def _check_float_tensor(name: str, t, dims: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions; got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------
# Masked LM (BERT) and causal LM (GPT)
# ----------------------------------------------------------------------------

class MaskedBatch(NamedTuple):
    """What :func:`mask_tokens` returns; all ``(B, L)`` (or ``(L,)``) like the ids."""

    inputs: Tensor  #: the corrupted ids the model reads
    labels: Tensor  #: original id at selected positions, IGNORE (-100) elsewhere
    selected: Tensor  #: bool, the positions M scored by the loss
    masked: Tensor  #: bool, selected and replaced by [MASK] (80%)
    randomised: Tensor  #: bool, selected and replaced by a random token (10%)


def mask_tokens(ids: Tensor, mask_id: int, vocab_size: int, p_mask: float = 0.15,
                special_ids: Sequence[int] = (), mask_prob: float = 0.8, random_prob: float = 0.1,
                generator=None) -> MaskedBatch:
    """BERT's masking: select each real position with probability ``p_mask``, then 80/10/10.

    ``ids`` (B, L) or (L,) long. Positions holding one of ``special_ids`` (``[PAD]``, ``[CLS]``,
    ``[SEP]``, ...) and ``mask_id`` itself are never selected. A selected position becomes
    ``mask_id`` with probability ``mask_prob`` (0.8), a token drawn uniformly from the ids in
    ``[0, vocab_size)`` that are neither special nor ``mask_id`` with probability ``random_prob``
    (0.1; it may draw the original token), and is left unchanged otherwise (0.1). Returns a
    :class:`MaskedBatch`. Device follows ``ids``; ``generator`` None / int / torch.Generator.
    """
    ids = _check_ids("ids", ids)
    p_mask = _check_rate("p_mask", p_mask, "the masking rate, BERT's 0.15")
    for name, value in (("mask_prob", mask_prob), ("random_prob", random_prob)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")
    if mask_prob + random_prob > 1.0 + 1e-12:
        raise ValueError(f"mask_prob + random_prob must be <= 1; got {mask_prob} + {random_prob}")
    vocab_size = _check_int("vocab_size", vocab_size, 2)
    if not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must be an int in [0, vocab_size={vocab_size}); got {mask_id!r}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size={vocab_size}); got min {int(ids.min())}, "
                         f"max {int(ids.max())}")
    g = _generator(generator)
    device = ids.device
    special = torch.tensor(sorted(set(int(s) for s in special_ids) | {mask_id}), device=device)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1)  # ids a random replacement may take
    if candidates.numel() == 0:
        raise ValueError("every id is special: no token is left to draw random replacements from")
    real = ~torch.isin(ids, special)  # positions that may be selected
    selected = (_rand(ids.shape, g, device) < p_mask) & real  # M: Bernoulli(p_mask) per real position
    u = _rand(ids.shape, g, device)  # one uniform per position decides the action
    masked = selected & (u < mask_prob)  # 80%: [MASK]
    randomised = selected & (u >= mask_prob) & (u < mask_prob + random_prob)  # 10%: random token
    pick = (_rand(ids.shape, g, device) * candidates.numel()).long().clamp_max(candidates.numel() - 1)
    inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(randomised, candidates[pick], inputs)  # the other 10% keep their token
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return MaskedBatch(inputs, labels, selected, masked, randomised)


def causal_lm_targets(ids: Tensor, pad_id: Optional[int] = None):
    """GPT's objective: ``(x, y) = (ids[..., :-1], ids[..., 1:])``, ``y = -100`` where it is padding.

    ``ids`` (B, L) or (L,) with L >= 2 -> two tensors of shape (B, L - 1).
    """
    ids = _check_ids("ids", ids)
    if ids.shape[-1] < 2:
        raise ValueError(f"ids must have at least 2 tokens to predict a next one; got length {ids.shape[-1]}")
    x, y = ids[..., :-1], ids[..., 1:].clone()  # y_t = x_{t+1}
    if pad_id is not None:
        y[y == pad_id] = IGNORE
    return x, y


# ----------------------------------------------------------------------------
# Span corruption (T5)
# ----------------------------------------------------------------------------

def _random_segmentation(n_items: int, n_segments: int, g) -> Tensor:
    """Split ``n_items`` into ``n_segments`` non-empty parts at random; returns the lengths."""
    cut = torch.zeros(n_items - 1, dtype=torch.bool)
    cut[: n_segments - 1] = True
    cut = cut[torch.randperm(n_items - 1, generator=g)]  # where a new segment starts
    first = torch.cat([torch.zeros(1, dtype=torch.long), cut.long()])
    segment_id = torch.cumsum(first, 0)
    return torch.bincount(segment_id, minlength=n_segments)  # (n_segments,)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator=None) -> Tensor:
    """T5's noise mask: bool ``(length,)``, True on ``round(density * length)`` tokens in spans.

    As T5's ``random_spans_noise_mask``: ``n_noise = round(length * density)`` clipped to
    ``[1, length - 1]``, ``n_spans = max(1, round(n_noise / mean_span_length))`` (and at most the
    number of kept tokens); the noise and the kept tokens are each cut into ``n_spans`` non-empty
    parts, interleaved kept-first, so position 0 is never noise.
    """
    length = _check_int("length", length, 2)
    noise_density = _check_rate("noise_density", noise_density, "T5's fraction of corrupted tokens, 0.15")
    if not isinstance(mean_span_length, (int, float)) or mean_span_length < 1:
        raise ValueError(f"mean_span_length must be a number >= 1; got {mean_span_length!r}")
    g = _generator(generator)
    if g is not None and g.device.type != "cpu":
        raise ValueError("random_spans_noise_mask draws on the CPU: pass a CPU generator or an int seed")
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(1, int(round(n_noise / mean_span_length)))
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise_lengths = _random_segmentation(n_noise, n_spans, g)
    kept_lengths = _random_segmentation(length - n_noise, n_spans, g)
    interleaved = torch.stack([kept_lengths, noise_lengths], 1).reshape(-1)  # kept, noise, kept, ...
    starts = torch.cumsum(interleaved, 0)[:-1]
    indicator = torch.zeros(length, dtype=torch.long)
    indicator[starts] = 1
    return torch.cumsum(indicator, 0) % 2 == 1  # odd-numbered spans are noise


def t5_sentinels(vocab_size: int, n: int) -> List[int]:
    """T5's sentinel ids: ``<extra_id_0> = vocab_size - 1``, ``<extra_id_1> = vocab_size - 2``, ..."""
    vocab_size, n = _check_int("vocab_size", vocab_size, 1), _check_int("n", n, 1)
    if n > vocab_size:
        raise ValueError(f"cannot take n={n} sentinels from a vocabulary of {vocab_size}")
    return [vocab_size - 1 - k for k in range(n)]


def _check_sentinels(sentinel_ids) -> List[int]:
    if isinstance(sentinel_ids, Tensor):
        sentinel_ids = sentinel_ids.tolist()
    sentinel_ids = [int(s) for s in sentinel_ids]
    if len(set(sentinel_ids)) != len(sentinel_ids):
        raise ValueError(f"sentinel_ids must be distinct; got {sentinel_ids}")
    return sentinel_ids


def span_corrupt(ids: Tensor, sentinel_ids: Sequence[int], noise_mask: Optional[Tensor] = None,
                 noise_density: float = 0.15, mean_span_length: float = 3.0, generator=None):
    """T5's span corruption of one sequence ``ids`` (L,) -> ``(inputs, targets)``, 1-D each.

    Each noise span (``noise_mask`` (L,) bool, default :func:`random_spans_noise_mask`) becomes one
    sentinel in ``inputs``; ``targets`` = ``<X0> span0 <X1> span1 ... <Xn>`` (the last sentinel
    closes the list). Needs ``n_spans + 1`` sentinels, and the text must not contain them.
    Lengths: ``L - n_noise + n_spans`` and ``n_noise + n_spans + 1``.
    """
    ids = _check_ids("ids", ids, dims=(1,))
    sentinels = _check_sentinels(sentinel_ids)
    L = ids.shape[0]
    if noise_mask is None:
        noise_mask = random_spans_noise_mask(L, noise_density, mean_span_length, generator).to(ids.device)
    if not isinstance(noise_mask, Tensor) or noise_mask.dtype != torch.bool or noise_mask.shape != ids.shape:
        got = (f"{noise_mask.dtype} {tuple(noise_mask.shape)}" if isinstance(noise_mask, Tensor)
               else type(noise_mask).__name__)
        raise ValueError(f"noise_mask must be a bool tensor of shape {tuple(ids.shape)}; got {got}")
    if torch.isin(ids, torch.tensor(sentinels, device=ids.device)).any():
        raise ValueError("ids contain a sentinel id: the corrupted text could not be read back")
    noise = noise_mask.to(ids.device)
    starts = noise & ~torch.cat([noise.new_zeros(1), noise[:-1]])  # first token of each noise span
    n_spans = int(starts.sum())
    if n_spans + 1 > len(sentinels):
        raise ValueError(f"{n_spans} noise spans need {n_spans + 1} sentinel ids; got {len(sentinels)}")
    span_index = torch.cumsum(starts.long(), 0) - 1  # which span each noise token is in
    sent = torch.tensor(sentinels, device=ids.device, dtype=ids.dtype)
    inputs = torch.where(starts, sent[span_index.clamp_min(0)], ids)[~noise | starts]  # span -> sentinel
    pieces = []
    for k in range(n_spans):
        pieces += [sent[k:k + 1], ids[noise & (span_index == k)]]  # <Xk> span_k
    pieces.append(sent[n_spans:n_spans + 1])  # closing sentinel
    return inputs, torch.cat(pieces)


def span_uncorrupt(inputs: Tensor, targets: Tensor, sentinel_ids: Sequence[int]) -> Tensor:
    """The inverse of :func:`span_corrupt`: put each span of ``targets`` back at its sentinel."""
    inputs = _check_ids("inputs", inputs, dims=(1,))
    targets = _check_ids("targets", targets, dims=(1,))
    sentinels = _check_sentinels(sentinel_ids)
    where = {s: k for k, s in enumerate(sentinels)}
    spans: Dict[int, List[int]] = {}
    current = None
    for t in targets.tolist():
        if t in where:
            current = where[t]
            spans[current] = []
        elif current is None:
            raise ValueError("targets must start with a sentinel id; got a plain token first")
        else:
            spans[current].append(t)
    out: List[int] = []
    for t in inputs.tolist():
        if t in where:
            if where[t] not in spans:
                raise ValueError(f"sentinel {t} appears in inputs but not in targets")
            out += spans[where[t]]
        else:
            out.append(t)
    return torch.tensor(out, dtype=inputs.dtype, device=inputs.device)


# ----------------------------------------------------------------------------
# Replaced-token detection (ELECTRA)
# ----------------------------------------------------------------------------

def electra_corrupt(ids: Tensor, selected: Tensor, generator_logits: Tensor, generator=None):
    """Fill the selected positions with samples of the generator: ``(corrupted, replaced)``.

    ``ids`` (B, L); ``selected`` (B, L) bool (the MLM's masked positions); ``generator_logits``
    (B, L, vocab_size). ``corrupted`` takes a sample of ``softmax(generator_logits)`` at each
    selected position (no gradient flows through the sampling) and the original elsewhere;
    ``replaced`` (B, L) bool, the discriminator's label, is True where the token changed (a
    sample equal to the original is labelled original, as in ELECTRA).
    """
    ids = _check_ids("ids", ids, dims=(2,))
    if not isinstance(selected, Tensor) or selected.dtype != torch.bool or selected.shape != ids.shape:
        raise ValueError(f"selected must be a bool tensor of shape {tuple(ids.shape)}; got "
                         f"{getattr(selected, 'dtype', type(selected).__name__)} "
                         f"{tuple(getattr(selected, 'shape', ()))}")
    logits = _check_float_tensor("generator_logits", generator_logits, 3)
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"generator_logits must be (B, L, vocab_size) with (B, L) = {tuple(ids.shape)}; "
                         f"got {tuple(logits.shape)}")
    g = _generator(generator)
    probs = torch.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1])  # (B*L, V)
    if g is not None and g.device != probs.device:
        sample = torch.multinomial(probs.cpu(), 1, generator=g).to(ids.device)
    else:
        sample = torch.multinomial(probs, 1, generator=g)
    sample = sample.reshape(ids.shape)  # x-hat ~ p_gen
    corrupted = torch.where(selected, sample, ids)
    return corrupted, corrupted != ids


def electra_loss(generator_logits: Tensor, mlm_labels: Tensor, disc_logits: Tensor, replaced: Tensor,
                 padding_mask: Optional[Tensor] = None, disc_weight: float = 50.0) -> Dict[str, Tensor]:
    """ELECTRA's loss: ``{"mlm", "disc", "total"}`` with total = mlm + disc_weight * disc.

    ``generator_logits`` (B, L, V) and ``mlm_labels`` (B, L) (-100 where not selected);
    ``disc_logits`` (B, L) (one logit per token: replaced or not) and ``replaced`` (B, L) bool;
    the binary cross-entropy is averaged over the real positions (``padding_mask`` True).
    """
    _check_float_tensor("disc_logits", disc_logits, 2)
    if replaced.shape != disc_logits.shape:
        raise ValueError(f"replaced must have the shape of disc_logits {tuple(disc_logits.shape)}; "
                         f"got {tuple(replaced.shape)}")
    mlm = F.cross_entropy(generator_logits.reshape(-1, generator_logits.shape[-1]).float(),
                          mlm_labels.reshape(-1), ignore_index=IGNORE)
    bce = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced.float(), reduction="none")
    if padding_mask is not None:
        w = padding_mask.float()
        disc = (bce * w).sum() / w.sum().clamp_min(1.0)
    else:
        disc = bce.mean()
    return {"mlm": mlm, "disc": disc, "total": mlm + disc_weight * disc}  # L_MLM + varpi_disc L_Disc


# ----------------------------------------------------------------------------
# Next-sentence prediction (BERT)
# ----------------------------------------------------------------------------

def nsp_pairs(documents: Sequence[Sequence[Sequence[int]]], n_pairs: int, cls_id: int, sep_id: int,
              generator=None) -> Dict[str, object]:
    """``n_pairs`` BERT next-sentence pairs ``[CLS] A [SEP] B [SEP]`` from ``documents``.

    ``documents``: a list of documents, each a list of sentences (lists of ids); at least two
    documents, one of them with two sentences. For each pair, A is a random sentence that has a
    successor in its document; with probability 1/2, B is that successor (``label`` 1, IsNext),
    else a random sentence of another document (``label`` 0, NotNext). Returns ``{"ids": list of
    LongTensors, "segments": list of LongTensors (0 on [CLS] A [SEP], 1 on B [SEP]), "labels":
    LongTensor (n_pairs,), "source": list of ((doc, sent), (doc, sent))}``.
    """
    n_pairs = _check_int("n_pairs", n_pairs, 1)
    if not isinstance(documents, (list, tuple)) or len(documents) < 2:
        raise ValueError(f"documents must be a list of at least 2 documents (lists of sentences); "
                         f"got {type(documents).__name__} of length {len(documents) if hasattr(documents, '__len__') else '?'}")
    firsts = [(d, s) for d, doc in enumerate(documents) for s in range(len(doc) - 1)]
    if not firsts:
        raise ValueError("no document has two sentences: IsNext pairs need a sentence and its successor")
    g = _generator(generator)
    ids, segments, labels, source = [], [], [], []
    for _ in range(n_pairs):
        d, s = firsts[int(torch.randint(len(firsts), (1,), generator=g))]
        if float(torch.rand((), generator=g)) < 0.5:
            bd, bs, label = d, s + 1, 1  # IsNext
        else:
            others = [o for o in range(len(documents)) if o != d and len(documents[o]) > 0]
            bd = others[int(torch.randint(len(others), (1,), generator=g))]
            bs, label = int(torch.randint(len(documents[bd]), (1,), generator=g)), 0  # NotNext
        a, b = list(documents[d][s]), list(documents[bd][bs])
        ids.append(torch.tensor([cls_id] + a + [sep_id] + b + [sep_id], dtype=torch.long))
        segments.append(torch.tensor([0] * (len(a) + 2) + [1] * (len(b) + 1), dtype=torch.long))
        labels.append(label)
        source.append(((d, s), (bd, bs)))
    return {"ids": ids, "segments": segments, "labels": torch.tensor(labels), "source": source}


def nsp_topic_shortcut(n_docs: int = 40, sentences_per_doc: int = 6, n_pairs: int = 2000, seed: int = 0,
                       corpus_kwargs: Optional[dict] = None) -> Dict[str, float]:
    """Why RoBERTa could drop NSP: on topical documents a topic match alone answers most pairs.

    Builds ``n_docs`` documents of ``sentences_per_doc`` :func:`topic_corpus` sentences, each
    document of one class (its topic), draws :func:`nsp_pairs`, and answers IsNext iff A's and B's
    majority topic (the class with most topic words) agree, without looking at order or
    coherence. Returns ``{"accuracy", "expected"}`` with ``expected = 1/2 + 1/2 (1 - 1/n_classes)``,
    the accuracy of a perfect topic detector (a NotNext sentence shares the topic 1/n_classes of
    the time).
    """
    kw = dict(corpus_kwargs or {})
    n_docs, sentences_per_doc = _check_int("n_docs", n_docs, 2), _check_int("sentences_per_doc", sentences_per_doc, 2)
    pool_ = topic_corpus(n_docs * sentences_per_doc * kw.get("n_classes", 4) * 2, generator=seed, **kw)
    v = pool_["vocab"]
    docs: List[List[List[int]]] = []
    for d in range(n_docs):
        rows = (pool_["labels"] == d % v.n_classes).nonzero().squeeze(1)[
            (d // v.n_classes) * sentences_per_doc:(d // v.n_classes + 1) * sentences_per_doc]
        docs.append([pool_["ids"][r][pool_["padding_mask"][r]][1:].tolist() for r in rows])  # words only
    pairs = nsp_pairs(docs, n_pairs, v.CLS, v.SEP, generator=seed + 1)
    firsts = torch.tensor([v.n_special + v.n_common + c * v.n_topic for c in range(v.n_classes)])

    def topic(words: List[int]) -> int:
        w = torch.tensor(words)
        w = w[w >= v.n_special + v.n_common]
        counts = torch.bincount((w - firsts[0]) // v.n_topic, minlength=v.n_classes)
        return int(counts.argmax())

    correct = 0
    for (a, b), label in zip(pairs["source"], pairs["labels"].tolist(), strict=True):
        same = topic(docs[a[0]][a[1]]) == topic(docs[b[0]][b[1]])
        correct += int(same == bool(label))
    return {"accuracy": correct / n_pairs, "expected": 0.5 + 0.5 * (1 - 1 / v.n_classes)}


# ----------------------------------------------------------------------------
# Knowledge distillation (Hinton et al. 2015; DistilBERT)
# ----------------------------------------------------------------------------

def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                      temperature: float = 2.0, student_hidden: Optional[Tensor] = None,
                      teacher_hidden: Optional[Tensor] = None, w_soft: float = 1.0, w_hard: float = 1.0,
                      w_cos: float = 1.0) -> Dict[str, Tensor]:
    """DistilBERT's triple loss: ``{"soft", "hard", "cos", "total"}`` (scalars).

    ``student_logits``, ``teacher_logits`` (..., V) (rows flattened; with ``labels`` (...,) rows
    labelled -100 are left out of all three terms). ``soft = T^2 KL(p_t^(T) || p_s^(T))``
    averaged over rows (``nn.KLDivLoss(reduction="batchmean")`` on the rows, as DistilBERT);
    ``hard = CE(student_logits, labels)`` (0 without labels); ``cos = mean(1 - cos(h_s, h_t))``
    over rows of the hidden states (..., d_model) (0 without them; DistilBERT's
    ``CosineEmbeddingLoss`` with target 1). The teacher gets no gradient.
    ``total = w_soft soft + w_hard hard + w_cos cos``.
    """
    s = _check_float_tensor("student_logits", student_logits)
    t = _check_float_tensor("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape; got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (the softmax temperature T); got {temperature!r}")
    T = float(temperature)
    s2, t2 = s.reshape(-1, s.shape[-1]).float(), t.detach().reshape(-1, t.shape[-1]).float()  # (rows, V)
    keep = torch.ones(s2.shape[0], dtype=torch.bool, device=s.device)
    if labels is not None:
        if labels.shape != s.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(s.shape[:-1])} (the logits without the last dim); "
                             f"got {tuple(labels.shape)}")
        keep = labels.reshape(-1) != IGNORE
    s2, t2 = s2[keep], t2[keep]
    log_ps = F.log_softmax(s2 / T, -1)  # log p_s^(T)
    log_pt = F.log_softmax(t2 / T, -1)  # log p_t^(T)
    soft = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * T ** 2  # T^2 KL(p_t^(T) || p_s^(T))
    zero = s2.new_zeros(())
    hard = F.cross_entropy(s2, labels.reshape(-1)[keep]) if labels is not None else zero
    cos = zero
    if student_hidden is not None or teacher_hidden is not None:
        if student_hidden is None or teacher_hidden is None or student_hidden.shape != teacher_hidden.shape:
            raise ValueError("student_hidden and teacher_hidden must both be given, with the same shape")
        hs = student_hidden.reshape(-1, student_hidden.shape[-1]).float()
        ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).float()
        if hs.shape[0] == keep.numel():
            hs, ht = hs[keep], ht[keep]
        cos = (1 - F.cosine_similarity(hs, ht, dim=-1)).mean()  # 1 - cos(h_s, h_t)
    total = w_soft * soft + w_hard * hard + w_cos * cos
    return {"soft": soft, "hard": hard, "cos": cos, "total": total}


# ----------------------------------------------------------------------------
# Sentence embeddings: pooling, similarity, retrieval
# ----------------------------------------------------------------------------

def pool(h: Tensor, padding_mask: Optional[Tensor] = None, how: str = "mean", cls_index: int = 0) -> Tensor:
    """A sentence embedding from final states ``h`` (B, L, d_model) -> (B, d_model).

    ``how="cls"``: the state at ``cls_index`` (BERT's [CLS], position 0). ``how="mean"``: the mean
    over the real tokens (``padding_mask`` (B, L) True on real tokens; padding never enters; to
    leave [CLS] out of the mean, pass a mask that is False there, as :func:`embed` does).
    """
    h = _check_float_tensor("h", h, 3)
    if how not in ("cls", "mean"):
        raise ValueError(f"how must be 'cls' or 'mean'; got {how!r}")
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool or padding_mask.shape != h.shape[:2]:
            raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(h.shape[:2])} (True on real "
                             f"tokens); got {getattr(padding_mask, 'dtype', type(padding_mask).__name__)}")
    if how == "cls":
        return h[:, cls_index]  # s_CLS = h_0
    if padding_mask is None:
        return h.mean(1)
    m = padding_mask.to(h.dtype)[..., None]  # (B, L, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # s_mean = sum_i m_i h_i / sum_i m_i


def pca_2d(x: Tensor) -> Tensor:
    """Project the rows of ``x`` (n, d) on their first two principal components -> (n, 2).

    Centred, then ``x V[:, :2]`` with ``V`` the right singular vectors (signs fixed so that each
    component's largest-magnitude coordinate is positive, for plots that do not flip between runs).
    """
    x = _check_float_tensor("x", x, 2)
    if x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"x must have at least 2 rows and 2 columns; got {tuple(x.shape)}")
    xc = x - x.mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:2].T  # (d, 2)
    y = xc @ v  # (n, 2)
    sign = torch.sign(y.gather(0, y.abs().argmax(0, keepdim=True)))  # (1, 2)
    return y * torch.where(sign == 0, torch.ones_like(sign), sign)


def cosine_similarity_matrix(a: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """Cosine similarities of the rows of ``a`` (n, d) and ``b`` (m, d; default ``a``) -> (n, m)."""
    a = _check_float_tensor("a", a, 2)
    b = a if b is None else _check_float_tensor("b", b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same width; got {a.shape[1]} and {b.shape[1]}")
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # s s'^T / (|s| |s'|)


def retrieve(queries: Tensor, keys: Tensor, k: int = 5, kind: str = "torch"):
    """The ``k`` keys most cosine-similar to each query: ``(similarities, indices)``, (M, k) each.

    Maximum inner product over L2-normalised vectors, through ``retrieval.make_index(kind, d,
    metric="ip")`` (``"torch"``, ``"faiss-flat"``, ``"faiss-ivf"``), most similar first.
    """
    from .retrieval import make_index

    queries = _check_float_tensor("queries", queries, 2)
    keys = _check_float_tensor("keys", keys, 2)
    index = make_index(kind, keys.shape[1], metric="ip")
    index.add(F.normalize(keys, dim=-1))
    return index.search(F.normalize(queries, dim=-1), k)


def retrieval_precision(embeddings: Tensor, labels: Tensor, k: int = 5, kind: str = "torch") -> float:
    """Precision at ``k`` of cosine retrieval: each row queries all the others (not itself).

    The mean, over queries, of the fraction of its ``k`` most cosine-similar other rows that share
    its label (:func:`retrieve`). Chance is about the share of the query's class in the data.
    """
    embeddings = _check_float_tensor("embeddings", embeddings, 2)
    n = embeddings.shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must be a tensor of shape ({n},); got {getattr(labels, 'shape', type(labels).__name__)}")
    _check_int("k", k)
    if k > n - 1:
        raise ValueError(f"k must be at most n - 1 = {n - 1} (a query does not retrieve itself); got k={k}")
    _, idx = retrieve(embeddings, embeddings, k + 1, kind)  # (n, k + 1), itself among them
    hits = 0.0
    for q in range(n):
        others = idx[q][idx[q] != q][:k]  # drop the query itself
        hits += float((labels[others] == labels[q]).float().mean())
    return hits / n


# ----------------------------------------------------------------------------
# A synthetic corpus, a tiny encoder pre-trained with MLM, probe versus fine-tuning
# ----------------------------------------------------------------------------

class Vocab(NamedTuple):
    """The word-level vocabulary of :func:`topic_corpus`: specials, common words, topic words."""

    n_classes: int
    n_topic: int
    n_common: int
    PAD: int = 0
    CLS: int = 1
    SEP: int = 2
    MASK: int = 3

    @property
    def n_special(self) -> int:
        return 4

    @property
    def size(self) -> int:
        return self.n_special + self.n_common + self.n_classes * self.n_topic

    def topic_words(self, c: int) -> range:
        """The ids of class ``c``'s topic words."""
        start = self.n_special + self.n_common + c * self.n_topic
        return range(start, start + self.n_topic)


def topic_corpus(n: int, n_classes: int = 4, n_topic: int = 16, n_common: int = 8, min_len: int = 8,
                 max_len: int = 16, p_topic: float = 0.5, generator=None) -> Dict[str, object]:
    """``n`` sentences of ``n_classes`` topics: ``[CLS] w_1 .. w_l [PAD] ..``, ``l`` in [min_len, max_len].

    Each word is, with probability ``p_topic``, a topic word of the sentence's class (uniform over
    its ``n_topic`` words), otherwise a common word shared by all classes (Zipf-like: weight
    ``1 / (rank + 1)``). The class is the label. Topic words co-occur only with their own class's,
    so a masked LM learns to predict them from each other: the classes become directions of the
    encoder's representation before any label is seen.

    Returns ``{"ids": (n, 1 + max_len) long, "padding_mask": (n, 1 + max_len) bool (True on [CLS]
    and words), "labels": (n,) long, "vocab": Vocab}``. CPU tensors.
    """
    n = _check_int("n", n, 1)
    n_classes = _check_int("n_classes", n_classes, 2)
    n_topic, n_common = _check_int("n_topic", n_topic), _check_int("n_common", n_common)
    min_len, max_len = _check_int("min_len", min_len), _check_int("max_len", max_len)
    if min_len > max_len:
        raise ValueError(f"min_len must be <= max_len; got {min_len} > {max_len}")
    p_topic = _check_rate("p_topic", p_topic, "the fraction of topic words")
    g = _generator(generator)
    vocab = Vocab(n_classes, n_topic, n_common)
    labels = torch.randint(n_classes, (n,), generator=g)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    zipf = 1.0 / torch.arange(1, n_common + 1, dtype=torch.float)
    common = torch.multinomial(zipf, n * max_len, replacement=True, generator=g).reshape(n, max_len)
    common = common + vocab.n_special
    topic = torch.randint(n_topic, (n, max_len), generator=g) + vocab.n_special + n_common + labels[:, None] * n_topic
    is_topic = torch.rand(n, max_len, generator=g) < p_topic
    words = torch.where(is_topic, topic, common)  # (n, max_len)
    real = torch.arange(max_len)[None, :] < lengths[:, None]  # (n, max_len)
    words = torch.where(real, words, torch.full_like(words, vocab.PAD))
    ids = torch.cat([torch.full((n, 1), vocab.CLS), words], 1)  # (n, 1 + max_len)
    padding_mask = torch.cat([torch.ones(n, 1, dtype=torch.bool), real], 1)
    return {"ids": ids, "padding_mask": padding_mask, "labels": labels, "vocab": vocab}


class TinyEncoder(nn.Module):
    """A BERT in miniature: embeddings + learned positions, pre-norm encoder blocks, MLM head.

    ``forward(ids (B, L), padding_mask (B, L) bool = None) -> logits (B, L, vocab_size)``;
    :meth:`encode` gives the final states (B, L, d_model). ``[CLS]`` is an ordinary token id at
    position 0 (BERT), so its state is whatever the pre-training made of it.
    """

    def __init__(self, vocab_size: int, d_model: int = 32, n_heads: int = 2, n_layers: int = 2,
                 max_len: int = 64, d_ff: Optional[int] = None):
        super().__init__()
        from .blocks import EncoderBlock

        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.n_heads, self.n_layers, self.d_ff = n_heads, n_layers, d_ff
        self.tok = nn.Embedding(vocab_size, d_model)  # E
        self.pos = nn.Embedding(max_len, d_model)  # learned positions (BERT)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)  # the MLM head

    def encode(self, ids: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        _check_ids("ids", ids, dims=(2,))
        if ids.shape[1] > self.max_len:
            raise ValueError(f"ids have length {ids.shape[1]} > max_len={self.max_len}")
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, L, d_model)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, L): hide padding keys
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)  # (B, L, d_model)

    def forward(self, ids: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        return self.head(self.encode(ids, padding_mask))  # (B, L, vocab_size)


def pretrain_encoder(seed: int = 0, steps: int = 200, d_model: int = 32, n_layers: int = 2, n_heads: int = 2,
                     batch_size: int = 128, lr: float = 1e-2, p_mask: float = 0.4,
                     corpus_kwargs: Optional[dict] = None, progress: bool = False):
    """Pre-train a :class:`TinyEncoder` with BERT's masked LM on fresh :func:`topic_corpus` batches.

    No labels are used. Returns ``(model, history)`` (``train.train``'s history). The model is
    built after ``seed_everything(seed)``; batches and masks come from ``train``'s seeded generator.

    Why ``p_mask = 0.4`` and not BERT's 0.15: at 0.15 this tiny model learns only the word
    frequencies in the budget (measured: 300 steps, seed 0, the probability it gives a masked
    topic word's own class is 0.25, chance for 4 classes, and the linear probe stays near the
    randomly initialised encoder's), while at 0.4 it learns to read the context within 200
    steps (that probability 0.89 at d_model 32, 0.92 at 64). More masking means more predictions
    per sentence and less of each word visible; Wettig, Gao, Zhong, Chen 2022, "Should You Mask
    15% in Masked Language Modeling?", arXiv:2202.08005, found 40% better than 15% for BERT-large
    too. Learning to use the context is a sudden transition: at 120-150 steps some seeds have
    made it and others have not (probe accuracy 0.59-0.94), so do not cut the steps below 200.
    """
    from .device import seed_everything
    from .train import train

    kw = dict(corpus_kwargs or {})
    probe = topic_corpus(1, **kw)
    vocab = probe["vocab"]
    seed_everything(seed)
    model = TinyEncoder(vocab.size, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                        max_len=probe["ids"].shape[1])

    def get_batch(generator):
        b = topic_corpus(batch_size, generator=generator, **kw)
        m = mask_tokens(b["ids"], vocab.MASK, vocab.size, p_mask,
                        special_ids=(vocab.PAD, vocab.CLS, vocab.SEP), generator=generator)
        return (m.inputs, b["padding_mask"]), m.labels

    history = train(model, get_batch, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                    schedule="cosine", progress=progress, desc="MLM pre-training")
    return model, history


@torch.no_grad()
def embed(model: TinyEncoder, ids: Tensor, padding_mask: Tensor, how: str = "mean") -> Tensor:
    """Sentence embeddings (B, d_model) of a :class:`TinyEncoder`: ``[CLS]``'s state or the mean of
    the real words' states ([CLS] and padding left out). Eval mode, no gradient."""
    was = model.training
    model.eval()
    try:
        h = model.encode(ids, padding_mask)  # (B, L, d_model)
    finally:
        model.train(was)
    if how == "mean":
        words = padding_mask.clone()
        words[:, 0] = False  # leave [CLS] out of the mean
        return pool(h, words, "mean")
    return pool(h, padding_mask, how)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, n_classes: int,
                 steps: int = 200, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> Dict[str, float]:
    """Logistic regression on frozen features: ``{"accuracy", "train_accuracy", "n_trainable", "seconds"}``.

    ``train_x`` (n, d) float, ``train_y`` (n,) long. Features are standardised with the training
    set's mean and std; full-batch Adam for ``steps`` steps. ``n_trainable = d * n_classes +
    n_classes``; ``seconds`` is the head's training time only (add the embedding pass yourself).
    """
    _check_float_tensor("train_x", train_x, 2)
    _check_float_tensor("test_x", test_x, 2)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mu) / sd, (test_x - mu) / sd
    head = nn.Linear(train_x.shape[1], n_classes).to(train_x.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(xs), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc, train_acc = _accuracy(head(xt), test_y), _accuracy(head(xs), train_y)
    return {"accuracy": acc, "train_accuracy": train_acc,
            "n_trainable": sum(p.numel() for p in head.parameters()), "seconds": time.perf_counter() - start}


class _Classifier(nn.Module):
    def __init__(self, encoder: TinyEncoder, n_classes: int, how: str):
        super().__init__()
        self.encoder, self.how = encoder, how
        self.head = nn.Linear(encoder.d_model, n_classes)

    def forward(self, ids, padding_mask):
        h = self.encoder.encode(ids, padding_mask)  # (B, L, d_model)
        if self.how == "mean":
            words = padding_mask.clone()
            words[:, 0] = False
            return self.head(pool(h, words, "mean"))
        return self.head(pool(h, padding_mask, "cls"))


def fine_tune(encoder: TinyEncoder, train_data: dict, test_data: dict, how: str = "mean", steps: int = 100,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> Dict[str, object]:
    """Fine-tune a copy of ``encoder`` and a new linear head on the labelled ``train_data``.

    ``train_data`` / ``test_data``: dicts with ``"ids"``, ``"padding_mask"``, ``"labels"`` (as
    :func:`topic_corpus`). Every parameter trains (AdamW through ``train.train``). Returns
    ``{"accuracy", "n_trainable", "seconds", "model"}``; ``encoder`` itself is left unchanged.
    """
    import copy

    from .train import train

    n_classes = int(max(int(train_data["labels"].max()), int(test_data["labels"].max()))) + 1
    torch.manual_seed(seed)
    model = _Classifier(copy.deepcopy(encoder), n_classes, how)
    ids, mask, y = train_data["ids"], train_data["padding_mask"], train_data["labels"]
    n = ids.shape[0]

    def get_batch(generator):
        i = torch.randint(n, (min(batch_size, n),), generator=generator)
        return (ids[i], mask[i]), y[i]

    start = time.perf_counter()
    train(model, get_batch, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed, progress=False,
          desc="fine-tune")
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = _accuracy(model(test_data["ids"], test_data["padding_mask"]), test_data["labels"])
    return {"accuracy": acc, "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "seconds": seconds, "model": model}


def probe_vs_finetune(seed: int = 0, pretrain_steps: int = 200, n_train: int = 16, n_test: int = 512,
                      finetune_steps: int = 100, how: str = "mean", corpus_kwargs: Optional[dict] = None,
                      d_model: int = 32, n_layers: int = 2, encoder: Optional[TinyEncoder] = None) -> Dict[str, object]:
    """The lecture's claims in one call: pre-train (or take ``encoder``), then compare on labels.

    Draws a labelled set of ``n_train`` sentences and a test set of ``n_test`` (seeds distinct from
    pre-training's), and returns ``{"probe": linear_probe's dict with the embedding pass added to
    "seconds", "probe_random": the same probe on a randomly initialised encoder of the same shape,
    "finetune": fine_tune's dict, "chance": 1 / n_classes, "encoder": the pre-trained encoder,
    "test_embeddings": (n_test, d_model), "test_labels"}``.
    """
    kw = dict(corpus_kwargs or {})
    if encoder is None:
        encoder, _ = pretrain_encoder(seed, pretrain_steps, d_model=d_model, n_layers=n_layers, corpus_kwargs=kw)
    train_data = topic_corpus(n_train, generator=10_000 + seed, **kw)
    test_data = topic_corpus(n_test, generator=20_000 + seed, **kw)
    n_classes = train_data["vocab"].n_classes

    def probe(model):
        start = time.perf_counter()
        xs = embed(model, train_data["ids"], train_data["padding_mask"], how)
        xt = embed(model, test_data["ids"], test_data["padding_mask"], how)
        out = linear_probe(xs, train_data["labels"], xt, test_data["labels"], n_classes, seed=seed)
        out["seconds"] = time.perf_counter() - start
        return out, xt

    probe_out, xt = probe(encoder)
    torch.manual_seed(seed + 1)
    random_encoder = TinyEncoder(encoder.vocab_size, encoder.d_model, encoder.n_heads, encoder.n_layers,
                                 encoder.max_len, encoder.d_ff)
    random_out, _ = probe(random_encoder)
    ft = fine_tune(encoder, train_data, test_data, how=how, steps=finetune_steps, seed=seed)
    return {"probe": probe_out, "probe_random": random_out, "finetune": ft, "chance": 1.0 / n_classes,
            "encoder": encoder, "test_embeddings": xt, "test_labels": test_data["labels"]}


# ----------------------------------------------------------------------------
# Backpack language models (Hewitt et al. 2023), in miniature
# ----------------------------------------------------------------------------

class BackpackLM(nn.Module):
    """A Backpack LM: ``logits_i = (sum_j sum_a W_{a,ij} C(x_j)_a) E^T``.

    ``forward(ids (B, L)) -> logits (B, L, vocab_size)``. Parts:

    * senses ``C(x) = FF(E x)`` reshaped to ``(n_s, d_model)`` per word: context-free
      (:meth:`senses`), plus any edits made with :meth:`intervene`;
    * weights ``A`` (B, n_s, L, L) (:meth:`weights`): a small causal Transformer (``n_layers``
      GPT blocks over ``E x`` + learned positions) gives states ``h``; sense ``a`` has its own
      query and key projections, ``A_a = softmax_j(h W^Q_a (h W^K_a)^T / sqrt(d_model))`` over
      ``j <= i``: non-negative, each row summing to 1;
    * output ``o_i = sum_j sum_a W_{a,ij} C(x_j)_a`` and logits ``o_i E^T`` with the embedding
      ``E`` tied. No normalisation after the sum, so the logits are exactly linear in the sense
      vectors (the property the paper's interventions use).
    """

    def __init__(self, vocab_size: int, d_model: int = 32, n_senses: int = 4, n_heads: int = 2,
                 n_layers: int = 1, max_len: int = 64):
        super().__init__()
        from .blocks import DecoderBlock

        _check_int("vocab_size", vocab_size, 2)
        _check_int("d_model", d_model)
        _check_int("n_senses", n_senses)
        self.vocab_size, self.d_model, self.n_senses, self.max_len = vocab_size, d_model, n_senses, max_len
        self.tok = nn.Embedding(vocab_size, d_model)  # E, tied with the output
        self.sense_ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                      nn.Linear(4 * d_model, n_senses * d_model))  # C(x) = FF(E x)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, cross_attention=False) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.wq = nn.Linear(d_model, n_senses * d_model)  # W^Q_a for every sense a
        self.wk = nn.Linear(d_model, n_senses * d_model)  # W^K_a
        self.edits: Dict[tuple, Tensor] = {}  # (word, sense) -> delta added to C(word)_sense

    def _check(self, ids):
        _check_ids("ids", ids, dims=(2,))
        if ids.shape[1] > self.max_len:
            raise ValueError(f"ids have length {ids.shape[1]} > max_len={self.max_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size})")

    def senses(self, ids: Tensor) -> Tensor:
        """Sense vectors ``C(x_j)_a``: (B, L, n_s, d_model), edits included."""
        self._check(ids)
        B, L = ids.shape
        c = self.sense_ff(self.tok(ids)).reshape(B, L, self.n_senses, self.d_model)  # (B, L, n_s, d)
        for (word, sense), delta in self.edits.items():
            hit = (ids == word)[..., None].to(c.dtype)  # (B, L, 1)
            c = c.clone()
            c[:, :, sense] = c[:, :, sense] + hit * delta.to(device=c.device, dtype=c.dtype)  # + d_edit
        return c

    def weights(self, ids: Tensor) -> Tensor:
        """Contextualization weights ``W_{a,ij}``: (B, n_s, L, L), >= 0, rows sum to 1 over j <= i."""
        from .attention import causal_mask

        self._check(ids)
        B, L = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))  # (B, L, d_model)
        mask = causal_mask(L, L, device=ids.device)  # (L, L)
        for block in self.blocks:
            x = block(x, mask=mask)
        h = self.norm(x)
        q = self.wq(h).reshape(B, L, self.n_senses, self.d_model).transpose(1, 2)  # (B, n_s, L, d)
        k = self.wk(h).reshape(B, L, self.n_senses, self.d_model).transpose(1, 2)  # (B, n_s, L, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_model)  # (B, n_s, L, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1)  # W_{a,ij}

    def forward(self, ids: Tensor) -> Tensor:
        c = self.senses(ids)  # (B, L, n_s, d)
        A = self.weights(ids)  # (B, n_s, L, L)
        o = torch.einsum("baij,bjad->bid", A, c)  # o_i = sum_j sum_a W_{a,ij} C(x_j)_a, (B, L, d)
        return o @ self.tok.weight.T  # logits_i = o_i E^T, (B, L, vocab_size)

    def intervene(self, word: int, sense: int, delta: Tensor) -> None:
        """Add ``delta`` (d_model,) to sense ``sense`` of ``word`` (every occurrence). Edits add up;
        :meth:`clear_interventions` removes them."""
        if not isinstance(word, int) or not 0 <= word < self.vocab_size:
            raise ValueError(f"word must be a token id in [0, {self.vocab_size}); got {word!r}")
        if not isinstance(sense, int) or not 0 <= sense < self.n_senses:
            raise ValueError(f"sense must be an int in [0, n_senses={self.n_senses}); got {sense!r}")
        delta = _check_float_tensor("delta", delta, 1)
        if delta.shape[0] != self.d_model:
            raise ValueError(f"delta must have d_model={self.d_model} numbers; got {tuple(delta.shape)}")
        key = (word, sense)
        self.edits[key] = self.edits.get(key, 0) + delta.detach()

    def clear_interventions(self) -> None:
        self.edits = {}

    @torch.no_grad()
    def sense_vectors(self, word: int) -> Tensor:
        """``C(word)``: (n_s, d_model), edits included."""
        return self.senses(torch.tensor([[word]], device=self.tok.weight.device))[0, 0]

    @torch.no_grad()
    def sense_top_words(self, word: int, k: int = 5) -> Tensor:
        """For each sense of ``word``, the ``k`` ids with the largest ``C(word)_a E^T``: (n_s, k)."""
        return (self.sense_vectors(word) @ self.tok.weight.T).topk(k, -1).indices


@torch.no_grad()
def predicted_logit_change(model: BackpackLM, ids: Tensor, word: int, sense: int, delta: Tensor) -> Tensor:
    """What adding ``delta`` to ``C(word)_sense`` does to the logits, without running the edit.

    ``(sum_{j <= i: x_j = word} A_{sense,ij}) * (delta E^T)``: (B, L, vocab_size). Exact, because the
    logits are linear in the sense vectors and the weights do not depend on them.
    """
    A = model.weights(ids)[:, sense]  # (B, L, L)
    hit = (ids == word).to(A.dtype)  # (B, L): where the word sits
    weight = (A * hit[:, None, :]).sum(-1)  # (B, L): sum_j W_{a,ij} 1[x_j = word]
    return weight[..., None] * (delta.to(device=A.device, dtype=A.dtype) @ model.tok.weight.T)  # (B, L, V)


def train_backpack(seed: int = 0, steps: int = 200, d_model: int = 32, n_senses: int = 4, batch_size: int = 64,
                   lr: float = 1e-2, corpus_kwargs: Optional[dict] = None, progress: bool = False):
    """Train a :class:`BackpackLM` as a next-word model on :func:`topic_corpus` sentences.

    Returns ``(model, history)``. Targets are the next word; padding is not scored.
    """
    from .device import seed_everything
    from .train import train

    kw = dict(corpus_kwargs or {})
    probe = topic_corpus(1, **kw)
    vocab = probe["vocab"]
    seed_everything(seed)
    model = BackpackLM(vocab.size, d_model=d_model, n_senses=n_senses, max_len=probe["ids"].shape[1])

    def get_batch(generator):
        b = topic_corpus(batch_size, generator=generator, **kw)
        x, y = causal_lm_targets(b["ids"], pad_id=vocab.PAD)
        return x, y

    history = train(model, get_batch, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
                    schedule="cosine", progress=progress, desc="Backpack LM")
    return model, history


@torch.no_grad()
def backpack_topic_edit(model: BackpackLM, source: int = 0, target: int = 1, scale: float = 4.0, n: int = 512,
                        seed: int = 0, corpus_kwargs: Optional[dict] = None) -> Dict[str, object]:
    """The lecture's intervention on a Backpack trained by :func:`train_backpack`.

    Takes the first topic word ``w`` of class ``source``, finds its *topic sense* (the sense ``a``
    whose ``C(w)_a E^T`` favours the source class's topic words most over the average word) and
    adds ``delta = scale * (mean E of target's topic words - mean E of source's)`` to it. Measured on
    ``n`` fresh sentences of class ``source`` that contain ``w``, at the positions from ``w`` on:
    the next-word probability mass on each class's topic words before the edit, after it, and
    with the sense zeroed (ablated). Returns ``{"word", "sense", "top_words" (n_s, 5), "before",
    "after", "ablated" (each (mass on source words, mass on target words)), "max_error"}``, where
    ``max_error`` is the largest difference between the measured logit change and
    :func:`predicted_logit_change`. The model's edits are cleared on return.
    """
    kw = dict(corpus_kwargs or {})
    d = topic_corpus(n, generator=30_000 + seed, **kw)
    v = d["vocab"]
    if not (0 <= source < v.n_classes and 0 <= target < v.n_classes) or source == target:
        raise ValueError(f"source and target must be two different classes in [0, {v.n_classes}); "
                         f"got {source} and {target}")
    word = v.topic_words(source)[0]
    src, tgt = list(v.topic_words(source)), list(v.topic_words(target))
    rows = (d["ids"] == word).any(1) & (d["labels"] == source)
    ids, mask = d["ids"][rows], d["padding_mask"][rows]
    if ids.shape[0] == 0:
        raise ValueError("no sentence of the source class contains its first topic word; raise n")
    after_word = (torch.cumsum((ids == word).long(), 1) > 0) & mask  # positions from w on
    E = model.tok.weight.detach()
    score = model.sense_vectors(word) @ E.T  # (n_s, V): C(w)_a E^T
    sense = int((score[:, src].mean(1) - score.mean(1)).argmax())  # the topic sense
    model.clear_interventions()

    def masses():
        p = model(ids).softmax(-1)  # (b, L, V)
        return float(p[..., src].sum(-1)[after_word].mean()), float(p[..., tgt].sum(-1)[after_word].mean())

    before, logits = masses(), model(ids)
    delta = scale * (E[tgt].mean(0) - E[src].mean(0))
    predicted = predicted_logit_change(model, ids, word, sense, delta)
    model.intervene(word, sense, delta)
    after = masses()
    max_error = float((model(ids) - logits - predicted).abs().max())
    model.clear_interventions()
    model.intervene(word, sense, -model.sense_vectors(word)[sense])  # zero the sense
    ablated = masses()
    model.clear_interventions()
    return {"word": word, "sense": sense, "top_words": score.topk(5, -1).indices, "before": before,
            "after": after, "ablated": ablated, "max_error": max_error}


# ----------------------------------------------------------------------------
# Scaling laws in miniature (Kaplan et al. 2020)
# ----------------------------------------------------------------------------

def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside token / position embeddings and the output head (Kaplan's N).

    Leaves out every ``nn.Embedding``, ``model.head`` (the projection to the vocabulary) and
    ``model.positions`` / ``model.pos`` (position tables), counting each shared tensor once.
    """
    skip = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            skip |= {id(p) for p in m.parameters()}
    for name in ("head", "positions", "pos"):  # the output projection, position tables
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            skip |= {id(p) for p in part.parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def fit_power_law(n_params, losses, floor: bool = False, n_grid: int = 400) -> Dict[str, float]:
    """Fit ``L(n) = (n_star / n)^exponent`` (+ ``floor`` if asked) on a log-log scale.

    Without a floor: least squares of ``log L = exponent log n_star - exponent log n`` (a line of
    slope ``-exponent``). With ``floor=True``: the floor ``L_inf`` in ``[0, min L)`` is chosen on
    a grid of ``n_grid`` values to maximise the R^2 of the line fitted to ``log(L - L_inf)``.
    Returns ``{"exponent", "n_star", "floor", "r2"}``.
    """
    n = torch.as_tensor(n_params, dtype=torch.float64)
    loss = torch.as_tensor(losses, dtype=torch.float64)
    if n.dim() != 1 or n.shape != loss.shape or n.numel() < 2 + int(floor):
        raise ValueError(f"n_params and losses must be 1-D of the same length >= {2 + int(floor)}; got "
                         f"{tuple(n.shape)} and {tuple(loss.shape)}")
    if (n <= 0).any() or (loss <= 0).any() or not torch.isfinite(loss).all():
        raise ValueError("n_params and losses must be positive and finite (they are fitted on a log scale)")

    def line(floor_value: float):
        x, y = n.log(), (loss - floor_value).log()
        xm, ym = x.mean(), y.mean()
        slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()  # least squares
        intercept = ym - slope * xm
        ss_res = ((y - (intercept + slope * x)) ** 2).sum()
        ss_tot = ((y - ym) ** 2).sum().clamp_min(1e-300)
        return float(slope), float(intercept), float(1 - ss_res / ss_tot)

    best_floor = 0.0
    if floor:
        grid = torch.linspace(0, float(loss.min()) * 0.999, n_grid, dtype=torch.float64)
        best_floor = max((float(f) for f in grid), key=lambda f: line(f)[2])
    slope, intercept, r2 = line(best_floor)
    exponent = -slope  # log L = exponent log n_star - exponent log n
    n_star = math.exp(intercept / exponent) if exponent != 0 else float("nan")
    return {"exponent": exponent, "n_star": n_star, "floor": best_floor, "r2": r2}


def scaling_sweep(seed: int = 0, widths: Sequence[int] = (4, 8, 16, 32), n_layers: int = 2, steps: int = 100,
                  batch_size: int = 16, block_size: int = 64, lr: float = 1e-2, max_chars: int = 200_000,
                  progress: bool = False) -> Dict[str, object]:
    """Train one tiny ``models.TransformerLM`` per width for the same tokens; fit the power law.

    Each model (``d_model`` = width, ``n_heads`` = max(1, width // 16), ``n_layers``) reads
    ``steps * batch_size * block_size`` characters of the first 90% of ``data.char_corpus(max_chars)``
    with the same seed (same batches) and is evaluated on the last 10% (``train.evaluate``, 10
    batches). Returns ``{"n_params": [...], "losses": [...], "seconds": [...], "fit": fit_power_law
    without floor, "fit_floor": with floor}``.
    """
    from . import data
    from .device import seed_everything
    from .models import ModelConfig, TransformerLM
    from .train import evaluate, train

    text = data.char_corpus(max_chars)
    tok = data.CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cut = int(0.9 * ids.numel())
    train_batches = data.lm_batches(ids[:cut], block_size, batch_size)
    eval_batches = data.lm_batches(ids[cut:], block_size, batch_size)
    n_params, losses, seconds = [], [], []
    for width in widths:
        _check_int("width", width)
        seed_everything(seed)
        model = TransformerLM(ModelConfig(vocab_size=tok.vocab_size, d_model=width, n_heads=max(1, width // 16),
                                          n_layers=n_layers, max_len=block_size, positions="learned"))
        start = time.perf_counter()
        train(model, train_batches, steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed,
              schedule="cosine", progress=progress, desc=f"d_model={width}")
        seconds.append(time.perf_counter() - start)
        n_params.append(non_embedding_parameters(model))
        losses.append(evaluate(model, eval_batches))
    return {"n_params": n_params, "losses": losses, "seconds": seconds,
            "fit": fit_power_law(n_params, losses), "fit_floor": fit_power_law(n_params, losses, floor=True)}


# ----------------------------------------------------------------------------
# The table: model -> objective -> what the representation is good for
# ----------------------------------------------------------------------------

#: One dict per model: ``model``, ``paper`` (title), ``arxiv`` (id, or None for a report without
#: one), ``architecture``, ``objective``, ``good_for`` (what its representation is used for),
#: ``published`` and ``not_published`` (what its authors did and did not make public).
MODEL_TABLE: List[Dict[str, object]] = [
    {"model": "BERT (2018)",
     "paper": "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
     "arxiv": "1810.04805", "architecture": "encoder only; Base 110M, Large 340M parameters",
     "objective": "masked LM (15%, 80/10/10) + next-sentence prediction",
     "good_for": "bidirectional token and sentence representations, fine-tuned for classification, "
                 "tagging, extractive QA; not for generating text",
     "published": "architecture, hyper-parameters, data sources (BooksCorpus, English Wikipedia), code, weights",
     "not_published": "little: BooksCorpus itself is no longer distributed by its authors"},
    {"model": "RoBERTa (2019)",
     "paper": "RoBERTa: A Robustly Optimized BERT Pretraining Approach", "arxiv": "1907.11692",
     "architecture": "BERT's encoder (Base, Large), byte-level BPE vocabulary of 50k",
     "objective": "masked LM only, dynamic masking (no NSP), larger batches, 160 GB of text, longer training",
     "good_for": "the same uses as BERT, better after fine-tuning; the basis of many sentence-embedding models",
     "published": "architecture, training recipe and ablations (NSP removed), data sources, code and weights (fairseq)",
     "not_published": "its 160 GB corpus is described by source, not distributed as one dataset"},
    {"model": "DistilBERT (2019)",
     "paper": "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter",
     "arxiv": "1910.01108",
     "architecture": "BERT with 6 layers instead of 12 (initialised from every other teacher layer), no "
                     "token-type embeddings, no pooler; 66M parameters",
     "objective": "distillation from BERT: soft targets at a temperature + masked LM + cosine between hidden states",
     "good_for": "BERT's uses, 40% smaller and 60% faster, keeping 97% of its language-understanding "
                 "score (GLUE) as reported",
     "published": "architecture, the triple loss, training data (BERT's), code and weights (Hugging Face)",
     "not_published": "-"},
    {"model": "Transformer-XL (2019)",
     "paper": "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", "arxiv": "1901.02860",
     "architecture": "decoder only, segment-level recurrence (cached states of the previous segment), "
                     "relative position encodings",
     "objective": "causal LM over long text (WikiText-103, enwik8, text8, One Billion Word, Penn Treebank)",
     "good_for": "long-context language modelling; its recurrence and relative positions reused by XLNet",
     "published": "architecture, code and weights of the benchmark models",
     "not_published": "-"},
    {"model": "T5 (2019)",
     "paper": "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
     "arxiv": "1910.10683",
     "architecture": "encoder-decoder, 60M to 11B parameters, relative position buckets",
     "objective": "span corruption (15% of tokens, mean span 3, sentinels), then multi-task text-to-text",
     "good_for": "any task written as text to text (translation, summarisation, QA, classification "
                 "as a word); its encoder gives sentence embeddings (Sentence-T5)",
     "published": "architecture, systematic study of objectives, the C4 dataset's construction (a script), "
                  "code and weights",
     "not_published": "-"},
    {"model": "GPT-1 (2018)",
     "paper": "Improving Language Understanding by Generative Pre-Training (OpenAI report)", "arxiv": None,
     "architecture": "decoder only, 12 layers, 117M parameters",
     "objective": "causal LM on BooksCorpus, then supervised fine-tuning (with the LM loss as an auxiliary)",
     "good_for": "showing that generative pre-training transfers to understanding tasks",
     "published": "architecture, data, code and weights",
     "not_published": "-"},
    {"model": "GPT-2 (2019)",
     "paper": "Language Models are Unsupervised Multitask Learners (OpenAI report)", "arxiv": None,
     "architecture": "decoder only, pre-norm, up to 1.5B parameters",
     "objective": "causal LM on WebText (40 GB of pages linked from Reddit)",
     "good_for": "text generation; zero-shot tasks by prompting",
     "published": "architecture, weights (released in stages up to 1.5B in 2019), code for inference",
     "not_published": "the WebText dataset (OpenWebText is an independent re-creation); the training code"},
    {"model": "GPT-3 (2020)",
     "paper": "Language Models are Few-Shot Learners", "arxiv": "2005.14165",
     "architecture": "decoder only, 175B parameters, alternating dense and locally banded sparse attention",
     "objective": "causal LM on 300B tokens (filtered Common Crawl, WebText2, Books1, Books2, Wikipedia)",
     "good_for": "few-shot learning in context, generation",
     "published": "architecture and sizes, data mixture and token counts, evaluations",
     "not_published": "weights (API access only), the datasets, the training code"},
    {"model": "GPT-4 (2023)",
     "paper": "GPT-4 Technical Report", "arxiv": "2303.08774",
     "architecture": "not published (the report says only: Transformer-style, takes images and text)",
     "objective": "next-token prediction on public and licensed data, then fine-tuning with RLHF",
     "good_for": "general assistant: dialogue, reasoning benchmarks, code, image inputs",
     "published": "evaluations, predictable-scaling results, safety analysis (system card)",
     "not_published": "architecture, model size, hardware, training compute, dataset construction, "
                      "training method details, weights"},
    {"model": "LLaMA (2023)",
     "paper": "LLaMA: Open and Efficient Foundation Language Models", "arxiv": "2302.13971",
     "architecture": "decoder only, 7B to 65B, pre-norm RMSNorm, SwiGLU, RoPE",
     "objective": "causal LM on 1.0-1.4T tokens of publicly available data only",
     "good_for": "a base model to fine-tune (instruction tuning, LoRA), strong for its size",
     "published": "architecture, data mixture and sources, training details; weights to researchers "
                  "on request under a non-commercial licence",
     "not_published": "the assembled training corpus; the training code"},
    {"model": "PaLM (2022)",
     "paper": "PaLM: Scaling Language Modeling with Pathways", "arxiv": "2204.02311",
     "architecture": "decoder only, 540B, SwiGLU, parallel attention and FFN, multi-query attention, "
                     "RoPE, shared input-output embeddings",
     "objective": "causal LM on 780B tokens (web pages, books, Wikipedia, news, code, social media conversations)",
     "good_for": "few-shot reasoning (with chain-of-thought prompting), code, multilingual tasks",
     "published": "architecture, data mixture proportions, training on Pathways (TPU v4), evaluations",
     "not_published": "weights, the dataset"},
    {"model": "Bard (2023)",
     "paper": "no paper: a Google product, first on LaMDA (LaMDA: Language Models for Dialog "
              "Applications, arXiv:2201.08239), then PaLM 2 (PaLM 2 Technical Report, "
              "arXiv:2305.10403), then Gemini; renamed Gemini in 2024", "arxiv": None,
     "architecture": "that of the model behind it at the time (LaMDA, PaLM 2, Gemini)",
     "objective": "the underlying models' pre-training, then dialogue fine-tuning",
     "good_for": "a chat assistant (a product, not a research model)",
     "published": "the papers of the underlying models (with varying detail)",
     "not_published": "the product's own model, data, fine-tuning and weights"},
    {"model": "ELECTRA (2020)",
     "paper": "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators",
     "arxiv": "2003.10555",
     "architecture": "encoder (discriminator) plus a small MLM generator used only in pre-training",
     "objective": "replaced-token detection on every token (+ the generator's MLM)",
     "good_for": "BERT-like fine-tuning at a fraction of the pre-training compute",
     "published": "architecture, code and weights",
     "not_published": "-"},
    {"model": "Backpack (2023)",
     "paper": "Backpack Language Models", "arxiv": "2305.16765",
     "architecture": "per-word sense vectors combined by non-negative weights from a Transformer",
     "objective": "causal LM (OpenWebText)",
     "good_for": "interpretable, editable word senses; interventions on one sense",
     "published": "architecture, code and weights (170M)",
     "not_published": "-"},
]
