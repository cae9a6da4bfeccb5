"""Attention benchmark: the library's readable and fast attention against PyTorch's own kernels.

    .venv/bin/python benchmarks/attention.py            # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/attention.py --quick    # smoke run (seconds), writes benchmarks/_work/
    .venv/bin/python benchmarks/attention.py --device cuda --lengths 1024 4096 16384

What is timed (forward pass, ``torch.inference_mode()``, modules in ``eval()``), at batch B,
heads H, head_dim D (default 1, 8, 64; d_model = H * D), for each sequence length L, without
and with a causal mask:

  function level, inputs q, k, v of shape (B, H, L, D)
    sdpa          ``F.scaled_dot_product_attention`` (``is_causal=True`` when causal): the baseline
    fast          ``transformer_lab.attention.fast_attention`` (the library's fast path)
    readable      ``transformer_lab.attention.scaled_dot_product_attention`` (the teaching path:
                  scores, masked softmax, weights @ v; causal via a boolean ``causal_mask``)
  module level, input x of shape (B, L, d_model), self-attention with projections
    torch_mha     ``nn.MultiheadAttention(batch_first=True)`` (causal: ``attn_mask`` + ``is_causal``)
    mha_fast      ``transformer_lab.attention.MultiHeadAttention(fast=True)``  (mask = causal_mask)
    mha_readable  ``MultiHeadAttention(fast=False)``

Time is the median of ``--repeats`` samples after a warm-up call (3x as many at L <= 512, half
but at least 3 at L >= 2048; the minimum is kept too). Every result is also given as a
ratio to ``sdpa`` at the same L and masking, measured in the same run (and, for modules, to
``torch_mha``). The readable paths store (B, H, L, L) scores, so they stop at ``--naive-max``.

Peak memory, honestly:
  * CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated before
    (PyTorch's allocator; includes the output).
  * CPU (Linux): the growth of the process's resident set during the call. Before each measured
    call the benchmark returns freed heap memory to the OS (``malloc_trim``), resets the kernel's
    high-water mark (writing 5 to ``/proc/self/clear_refs``) and then reads ``VmHWM`` from
    ``/proc/self/status`` after the call: peak RSS minus RSS before. It counts every page the call
    touched (PyTorch's tensors, the output, kernel workspaces), at page granularity; a few MiB of
    noise from the allocator are possible at small L. ``tracemalloc`` is not used: it does not
    see PyTorch's allocations.
  * Elsewhere (macOS, MPS): not measured (null).
For reference each row also carries ``scores_mib``, the size of one (B, H, L, L) float matrix.

Outputs: ``attention.json`` (all measurements and the set-up), ``attention.csv`` and
``attention.png`` (time and memory versus L, log-log) in ``--out``.

FlexAttention section (``--sections flex``; lecture 05), a causal sliding window of
``--flex-window`` (``sparse.sliding_window(256, causal=True)``: each query sees the 256 previous
tokens and itself) at ``--flex-lengths`` (default 1024 ... 8192), same B, H, D, float32:

    flex_b128     ``sparse.sparse_attention(..., compiled=True)``: compiled FlexAttention, tiles of
                  128 (PyTorch's default); one column per ``--flex-block-sizes`` entry (flex_b64, ...)
    flex_eager    ``sparse.sparse_attention(...)`` eager: materialises the scores (the teaching path;
                  up to ``--flex-eager-max``, 2048)
    sdpa_mask     ``F.scaled_dot_product_attention`` with the same (L, L) boolean mask: **the baseline**
    sdpa_causal   ``F.scaled_dot_product_attention(is_causal=True)``: dense causal, for context

timed round-robin as above, with ratios to ``sdpa_mask`` from the same run; the BlockMask and the
boolean mask are built once per L, outside the timing (their build times are reported). Before
timing, every output is compared with ``sdpa_mask``'s (the run stops above 1e-4). Compile time:
a fresh Python process compiles flex_b128 at the longest length with an empty
``TORCHINDUCTOR_CACHE_DIR`` (cold), then a second process with the same folder (warm); each
reports its first call (compile + one run) and a steady call. The verdict compares flex_b128 with
sdpa_mask at L = 4096 against the lecture's claim (at least 8x faster). Outputs:
``attention_flex.json``, ``attention_flex.csv``, ``attention_flex.png``.

Attention-family section (``--sections family``; lectures 05-08, read by lectures 07 and 08): every
attention variant of the course on the same q, k, v of shape (B, H, L, D) (q and k clustered like
trained attention's, ``family_inputs``; v ~ N(0, 1)), at
``--family-lengths`` (default 256 ... 8192), without a mask and causal:

    sdpa           ``F.scaled_dot_product_attention``: **the baseline** of every ratio
    readable       lecture 01's teaching path (stores the scores; up to ``--naive-max``)
    flash          ``flash.flash_attention`` (lecture 08): tiled, online softmax
    flex_window    compiled FlexAttention, causal window ``--flex-window`` (lecture 05; causal only)
    lsh_1/2/4      ``lsh.lsh_attention`` with 1, 2, 4 hash rounds, chunks of ``--lsh-chunk`` and
                   2 L / chunk buckets (lecture 06; shared QK: hashes q, ignores k; no mask only)
    linformer      ``lowrank.linformer_attention``, k = min(``--linformer-k``, L/2), a random E = F
                   (untrained: the error is an untrained projection's; lecture 07; no mask only)
    performer      ``lowrank.performer_attention``, ``--performer-features`` orthogonal positive
                   features drawn once per L (lecture 07; no mask only)
    linear_causal  ``lowrank.linear_attention(causal=True)``, elu+1 (lecture 07; causal only)
    mamba_scan     ``ssm.selective_scan``, the parallel scan over d_inner = H D channels with d_state 16:
                   Mamba's token mixer in attention's place (lecture 11; causal only; not attention,
                   so its error is against its own sequential loop)
    mamba_block    ``ssm.MambaBlock`` with d_inner = H D, with its projections and convolution
                   (lecture 11; causal only; against the same block with the sequential scan)

``--family-variants`` times a subset (sdpa always, as the baseline) and ``--family-stem`` names
the outputs: lectures 07 and 08 read the full run ``attention_family.json`` (re-recording it changes
the numbers their text quotes); lecture 11's rows were recorded as ``attention_family_recurrent``
(``--family-variants flash linear_causal mamba_scan mamba_block``).

Time and memory as above (round-robin, RSS growth on the CPU), each as a ratio to ``sdpa`` at the
same L and masking, from the same run; masks, projections and features are built outside the
timing. Every variant's output is compared with an exact reference: exact variants with the same
function computed densely (their error is rounding), approximations with softmax attention
(LSH with full shared-QK attention, its own exact form): ``max_error`` (max |difference|) and
``rel_error`` (Frobenius norm of the difference over the reference's). The verdict reports the
issue's targets: flash at L = 8192 within 1.3x SDPA's time and 2x its memory, exact to 1e-5;
causal elu+1 linear attention faster than causal SDPA from L <= 512 on. Outputs:
``attention_family.json``, ``attention_family.csv``, ``attention_family.png``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lib"))  # run from a checkout without installing

import transformer_lab  # noqa: E402
from transformer_lab import sparse  # noqa: E402
from transformer_lab.attention import (  # noqa: E402
    MultiHeadAttention,
    causal_mask,
    fast_attention,
    scaled_dot_product_attention,
)

FUNCTION_IMPLS = ("sdpa", "fast", "readable")
MODULE_IMPLS = ("torch_mha", "mha_fast", "mha_readable")
NAIVE = {"readable", "mha_readable"}
MIB = 2**20


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak extra memory of one call on a device; see the module docstring for the method."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated minus allocated before the call"
        elif device.type == "cpu" and sys.platform.startswith("linux") and self._clear_refs_works():
            self.method = ("resident-set growth: malloc_trim, reset VmHWM via /proc/self/clear_refs, "
                           "then VmHWM after the call minus VmRSS before")
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None
        else:
            self.method = None

    @staticmethod
    def _status() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, rest = line.split(":", 1)
                    values[key] = int(rest.split()[0]) * 1024  # kB -> bytes
        return values

    @staticmethod
    def _clear_refs_works() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def measure(self, fn) -> float | None:
        """MiB allocated at the peak of ``fn()`` beyond what was there before."""
        if self.method is None:
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
            del out
            return peak / MIB
        if self.libc is not None:
            self.libc.malloc_trim(0)
        before = self._status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        out = fn()
        peak = self._status()["VmHWM"] - before
        del out
        return max(peak, 0) / MIB


# --------------------------------------------------------------------------- cases


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_case(impl: str, L: int, causal: bool, args, device, dtype, modules):
    """A zero-argument callable running one forward pass of ``impl`` at length L."""
    B, H, D = args.batch, args.heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(L)
    if impl in FUNCTION_IMPLS:
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(3))
        mask = causal_mask(L, device=device) if causal else None  # bool (L, L), True = attend
        if impl == "sdpa":
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if impl == "fast":
            return lambda: fast_attention(q, k, v, is_causal=causal)
        return lambda: scaled_dot_product_attention(q, k, v, mask=mask)
    x = torch.randn(B, L, H * D, generator=g).to(device, dtype)
    module = modules[impl]
    if impl == "torch_mha":
        # nn.MultiheadAttention's boolean attn_mask is True where attention is NOT allowed
        hide = ~causal_mask(L, device=device) if causal else None
        return lambda: module(x, x, x, attn_mask=hide, need_weights=False, is_causal=causal)[0]
    mask = causal_mask(L, device=device) if causal else None
    return lambda: module(x, mask=mask)


def build_modules(args, device, dtype) -> dict[str, nn.Module]:
    d_model = args.heads * args.head_dim
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(d_model, args.heads, batch_first=True)
    mha_fast = MultiHeadAttention(d_model, args.heads, fast=True)
    mha_readable = MultiHeadAttention(d_model, args.heads, fast=False)
    # same weights everywhere (the library's fused qkv has nn.MultiheadAttention's layout)
    with torch.no_grad():
        for m in (mha_fast, mha_readable):
            m.qkv.weight.copy_(torch_mha.in_proj_weight)
            m.qkv.bias.copy_(torch_mha.in_proj_bias)
            m.out.weight.copy_(torch_mha.out_proj.weight)
            m.out.bias.copy_(torch_mha.out_proj.bias)
    mods = {"torch_mha": torch_mha, "mha_fast": mha_fast, "mha_readable": mha_readable}
    return {k: m.to(device, dtype).eval() for k, m in mods.items()}


def time_interleaved(fns: dict, device, repeats: int, warmup: int,
                     sample_s: float = 0.005) -> dict[str, list[float]]:
    """Seconds per call for each fn, measured round-robin (one sample of each, then the next
    round), so a load change on a shared machine hits every implementation alike. A sample of a
    fast call loops it enough times to last about ``sample_s`` and divides."""
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        number[name] = max(1, min(1000, int(sample_s / max(time.perf_counter() - t0, 1e-7))))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / number[name])
    return times


def check_agreement(args, device, dtype, modules) -> dict[str, float]:
    """Max |difference| to the baseline at a small L, so the timings compare like with like."""
    L = 64
    diffs = {}
    with torch.inference_mode():
        for causal in (False, True):
            ref = make_case("sdpa", L, causal, args, device, dtype, modules)()
            for impl in ("fast", "readable"):
                out = make_case(impl, L, causal, args, device, dtype, modules)()
                diffs[f"{impl}{'_causal' if causal else ''}"] = float((out - ref).abs().max())
            ref = make_case("torch_mha", L, causal, args, device, dtype, modules)()
            for impl in ("mha_fast", "mha_readable"):
                out = make_case(impl, L, causal, args, device, dtype, modules)()
                diffs[f"{impl}{'_causal' if causal else ''}"] = float((out - ref).abs().max())
    return diffs


# --------------------------------------------------------------------------- run


def run(args) -> dict:
    device = torch.device(args.device) if args.device else transformer_lab.device()
    dtype = getattr(torch, args.dtype)
    modules = build_modules(args, device, dtype)
    meter = PeakMemory(device)
    agreement = check_agreement(args, device, dtype, modules)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    off = {k: v for k, v in agreement.items() if not v <= tol}
    if off:
        raise SystemExit(f"error: implementations disagree with the baseline (max |diff|): {off}")

    rows = []
    impls = [*FUNCTION_IMPLS, *MODULE_IMPLS]
    load_before = load_average()
    t_start = time.perf_counter()
    for L in args.lengths:
        # short calls are cheap and the noisiest: more samples there, fewer at long L
        repeats = args.repeats * 3 if L <= 512 else args.repeats if L < 2048 else max(3, args.repeats // 2)
        for causal in (False, True):
            todo = [i for i in impls if not (i in NAIVE and L > args.naive_max)]
            with torch.inference_mode():
                fns = {impl: make_case(impl, L, causal, args, device, dtype, modules) for impl in todo}
                times = time_interleaved(fns, device, repeats, args.warmup, args.sample_ms / 1e3)
                gc.collect()  # once per group: a full collection costs ~0.1 s with torch loaded
                peaks = {impl: meter.measure(fn) for impl, fn in fns.items()}
            del fns
            for impl in todo:
                row = {
                    "impl": impl,
                    "level": "function" if impl in FUNCTION_IMPLS else "module",
                    "L": L,
                    "causal": causal,
                    "time_ms": statistics.median(times[impl]) * 1e3,
                    "time_min_ms": min(times[impl]) * 1e3,
                    "times_ms": [round(t * 1e3, 4) for t in times[impl]],
                    "peak_mib": peaks[impl],
                    "scores_mib": args.batch * args.heads * L * L * torch.finfo(dtype).bits / 8 / MIB,
                }
                rows.append(row)
                if not args.silent:
                    mem = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:8.1f} MiB"
                    print(f"L={L:6d} {'causal' if causal else 'full  '} {impl:13s} "
                          f"{row['time_ms']:10.3f} ms  {mem}", flush=True)
    add_ratios(rows)
    return {
        "setup": {
            "device": str(device),
            "device_name": device_name(device),
            "dtype": args.dtype,
            "batch": args.batch,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "d_model": args.heads * args.head_dim,
            "lengths": args.lengths,
            "naive_max": args.naive_max,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_method": meter.method,
            "timing": "forward, inference_mode, after warm-up; median of --repeats samples "
                      "(3x as many at L <= 512, half but at least 3 at L >= 2048); "
                      "implementations interleaved round-robin; "
                      f"a sample loops a fast call to ~{args.sample_ms:g} ms and divides",
            "quick": args.quick,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t_start, 1),
            "load_average_before_after": [load_before, load_average()],
        },
        "agreement_max_abs_diff": agreement,
        "results": rows,
    }


def add_ratios(rows: list[dict]) -> None:
    """time/memory as ratios to sdpa (and, for modules, to torch_mha) at the same L and mask."""
    index = {(r["impl"], r["L"], r["causal"]): r for r in rows}
    for r in rows:
        for base, suffix in (("sdpa", "vs_sdpa"), ("torch_mha", "vs_torch_mha")):
            if base == "torch_mha" and r["level"] != "module":
                continue
            b = index.get((base, r["L"], r["causal"]))
            if b is None:
                continue
            r[f"time_{suffix}"] = r["time_ms"] / b["time_ms"]
            if r["peak_mib"] is not None and b["peak_mib"]:
                r[f"mem_{suffix}"] = r["peak_mib"] / b["peak_mib"]
            else:
                r[f"mem_{suffix}"] = None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared machine slows everything down."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return device.type


# --------------------------------------------------------------------------- outputs


CSV_FIELDS = ["impl", "level", "L", "causal", "time_ms", "time_min_ms", "peak_mib", "scores_mib",
              "time_vs_sdpa", "mem_vs_sdpa", "time_vs_torch_mha", "mem_vs_torch_mha"]


def timed_row(section: str, name: str, samples: list[float], **extra) -> dict:
    """One row of a benchmark's report: the median and minimum of the timing samples (seconds) in
    ms, and every sample."""
    return {"section": section, "name": name, "time_ms": statistics.median(samples) * 1e3,
            "time_min_ms": min(samples) * 1e3, "times_ms": [round(x * 1e3, 3) for x in samples], **extra}


def run_setup(device, args, t0: float, load_before, **extra) -> dict:
    """The "setup" block every benchmark script writes: machine, versions, date, duration, load."""
    return {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        **extra, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(), "quick": args.quick,
        "repeats": args.repeats, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_before_after": [load_before, load_average()],
    }


def write_report(report: dict, out: Path, stem: str, fields: list[str], rows: list[dict],
                 plot=None, number=lambda v: round(v, 4)) -> list[Path]:
    """``stem``.json (everything), ``stem``.csv (``fields`` of ``rows``) and, given ``plot``
    (a function of report and path), ``stem``.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv"]
    paths[0].write_text(json.dumps(report, indent=2))
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (number(v) if isinstance(v, float) else v) for k, v in r.items()})
    if plot is not None:
        paths.append(plot(report, out / f"{stem}.png"))
    return paths


def write_outputs(report: dict, out: Path, plot: bool = True) -> list[Path]:
    return write_report(report, out, "attention", CSV_FIELDS, report["results"],
                        plot_results if plot else None)


STYLE = {
    "sdpa": ("black", "-", "o"), "fast": ("tab:blue", "--", "s"), "readable": ("tab:red", "-", "^"),
    "torch_mha": ("tab:gray", "-", "o"), "mha_fast": ("tab:cyan", "--", "s"),
    "mha_readable": ("tab:orange", "-", "^"),
}


def plot_results(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    s = report["setup"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    for col, causal in enumerate((False, True)):
        for row_i, (key, label) in enumerate((("time_ms", "time per forward (ms)"),
                                               ("peak_mib", "peak extra memory (MiB)"))):
            ax = axes[row_i, col]
            for impl, (color, ls, marker) in STYLE.items():
                pts = [(r["L"], r[key]) for r in rows
                       if r["impl"] == impl and r["causal"] == causal and r[key] is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, [max(y, 1e-3) for y in ys], color=color, ls=ls, marker=marker,
                            label=impl, ms=4)
            if key == "peak_mib":
                pts = sorted({(r["L"], r["scores_mib"]) for r in rows})
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, color="lightgray", ls=":", label="one (B,H,L,L) matrix")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel(label)
            ax.set_title(f"{'causal' if causal else 'no mask'}: {label.split(' (')[0]}")
            if row_i == 1:
                ax.set_xlabel("sequence length L")
    axes[0, 0].legend(fontsize=8, ncol=2)
    axes[1, 0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        f"Attention forward on {s['device_name']} ({s['device']}, {s['torch_threads']} threads, "
        f"torch {s['torch']}), B={s['batch']} H={s['heads']} D={s['head_dim']} {s['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def summary_table(report: dict) -> str:
    """Markdown table: time (ms) and memory (MiB) per implementation, with ratios to sdpa."""
    rows = report["results"]
    impls = [*FUNCTION_IMPLS, *MODULE_IMPLS]
    lines = []
    for causal in (False, True):
        lines.append(f"\n{'Causal' if causal else 'No mask'}: time in ms (x sdpa), peak memory in MiB (x sdpa)\n")
        lines.append("| L | " + " | ".join(impls) + " |")
        lines.append("|---" * (len(impls) + 1) + "|")
        for L in sorted({r["L"] for r in rows}):
            cells = []
            for impl in impls:
                r = next((r for r in rows if r["impl"] == impl and r["L"] == L and r["causal"] == causal), None)
                if r is None:
                    cells.append("-")
                    continue
                t = f"{_num(r['time_ms'])} ({_ratio(r['time_vs_sdpa'])})"
                m = "n/a" if r["peak_mib"] is None else _num(r["peak_mib"])
                if r.get("mem_vs_sdpa") is not None:
                    m += f" ({_ratio(r['mem_vs_sdpa'])})"
                cells.append(f"{t}; {m}")
            lines.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- FlexAttention


FLEX_TARGET = {"L": 4096, "speedup": 8.0}  # the lecture's claim: >= 8x faster than sdpa_mask


def flex_impls(args) -> list[str]:
    compiled = [] if args.no_compile else [f"flex_b{bs}" for bs in args.flex_block_sizes]
    return [*compiled, "flex_eager", "sdpa_mask", "sdpa_causal"]


def flex_inputs(L: int, args, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(L)
    return tuple(torch.randn(args.batch, args.heads, L, args.head_dim, generator=g).to(device, dtype)
                 for _ in range(3))


def make_flex_cases(L: int, args, device, dtype) -> tuple[dict, dict]:
    """Zero-argument callables for every FlexAttention-section implementation at length L, and
    what it cost to build the masks (seconds, tiles) outside the timing."""
    q, k, v = flex_inputs(L, args, device, dtype)
    mod = sparse.sliding_window(args.flex_window, causal=True)  # 0 <= i - j <= window
    t0 = time.perf_counter()
    mask = sparse.dense_mask(mod, L, device=device)  # (L, L) bool, True = attend
    built = {"dense_mask_s": time.perf_counter() - t0}
    masks = {}
    for bs in sorted({*args.flex_block_sizes, 128}):
        t0 = time.perf_counter()
        masks[bs] = sparse.block_mask(mod, L, block_size=bs, device=device)
        built[f"block_mask_b{bs}_s"] = time.perf_counter() - t0
        built[f"tiles_b{bs}"] = sparse.block_counts(masks[bs])
    fns = {}
    for impl in flex_impls(args):
        if impl.startswith("flex_b"):
            bm = masks[int(impl[len("flex_b"):])]
            fns[impl] = lambda bm=bm: sparse.sparse_attention(q, k, v, block_mask=bm, compiled=True)
        elif impl == "flex_eager":
            if L <= args.flex_eager_max:
                fns[impl] = lambda: sparse.sparse_attention(q, k, v, block_mask=masks[128])
        elif impl == "sdpa_mask":
            fns[impl] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            fns[impl] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fns, built


def compile_probe(args) -> dict:
    """In a fresh process: the first compiled call (compile + run) and a steady call, seconds."""
    device = torch.device(args.device) if args.device else transformer_lab.device()
    dtype = getattr(torch, args.dtype)
    L, bs = args.compile_probe
    q, k, v = flex_inputs(L, args, device, dtype)
    bm = sparse.block_mask(sparse.sliding_window(args.flex_window, causal=True), L, block_size=bs,
                           device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        sparse.sparse_attention(q, k, v, block_mask=bm, compiled=True)
        sync(device)
        first = time.perf_counter() - t0
        steady = []
        for _ in range(3):
            t0 = time.perf_counter()
            sparse.sparse_attention(q, k, v, block_mask=bm, compiled=True)
            sync(device)
            steady.append(time.perf_counter() - t0)
    return {"L": L, "block_size": bs, "first_call_s": first, "steady_call_s": statistics.median(steady),
            "compile_s": first - statistics.median(steady),
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def measure_compile_times(args, L: int, bs: int) -> dict:
    """Cold and warm compile of flex_b{bs} at L, each in a fresh Python process."""
    cache = tempfile.mkdtemp(prefix="transformer_lab_inductor_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-probe", str(L), str(bs),
           "--flex-window", str(args.flex_window), "--batch", str(args.batch), "--heads",
           str(args.heads), "--head-dim", str(args.head_dim), "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    result = {"method": "a fresh process per measurement; first call (compile + one run) minus "
                        "the median of 3 steady calls; cold: empty TORCHINDUCTOR_CACHE_DIR, "
                        "warm: the same folder again"}
    for kind in ("cold", "warm"):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"error: the {kind} compile probe failed:\n{proc.stderr[-3000:]}")
        result[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        result[kind]["process_wall_s"] = time.perf_counter() - t0
    return result


def run_flex(args) -> dict:
    """The FlexAttention section; dynamo may recompile once per length and tile size."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(64, limit)
    try:
        return _run_flex(args)
    finally:
        torch._dynamo.config.recompile_limit = limit  # main() may run inside another program


def _run_flex(args) -> dict:
    device = torch.device(args.device) if args.device else transformer_lab.device()
    dtype = getattr(torch, args.dtype)
    meter = PeakMemory(device)
    impls = flex_impls(args)
    compile_times = None
    if not args.no_compile and not args.no_compile_probe:
        compile_times = measure_compile_times(args, max(args.flex_lengths), 128)
    rows, built_all, agreement = [], {}, {}
    load_before = load_average()
    t_start = time.perf_counter()
    for L in args.flex_lengths:
        with torch.inference_mode():
            fns, built = make_flex_cases(L, args, device, dtype)
            built_all[L] = built
            first, outs = {}, {}
            for impl, fn in fns.items():  # first call: compiles (or recompiles) the kernel
                t0 = time.perf_counter()
                outs[impl] = fn()
                sync(device)
                first[impl] = time.perf_counter() - t0
            for impl, out in outs.items():
                agreement[f"{impl}@{L}"] = float((out - outs["sdpa_mask"]).abs().max()) \
                    if impl != "sdpa_causal" else None
            del outs
            times = time_interleaved(fns, device, args.flex_repeats, args.flex_warmup,
                                     args.sample_ms / 1e3)
            gc.collect()
            peaks = {impl: meter.measure(fn) for impl, fn in fns.items()}
        del fns
        for impl in impls:
            if impl not in times:
                continue
            row = {"impl": impl, "L": L, "window": args.flex_window,
                   "time_ms": statistics.median(times[impl]) * 1e3,
                   "time_min_ms": min(times[impl]) * 1e3,
                   "times_ms": [round(t * 1e3, 4) for t in times[impl]],
                   "first_call_s": first[impl], "peak_mib": peaks[impl]}
            rows.append(row)
            if not args.silent:
                mem = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:8.1f} MiB"
                print(f"L={L:6d} window={args.flex_window} {impl:12s} {row['time_ms']:10.3f} ms  {mem}"
                      f"  (first call {first[impl]:.2f} s)", flush=True)
    off = {k: v for k, v in agreement.items() if v is not None and not v <= 1e-4}
    if off:
        raise SystemExit(f"error: FlexAttention disagrees with SDPA and the same mask: {off}")
    base = {r["L"]: r for r in rows if r["impl"] == "sdpa_mask"}
    for r in rows:
        b = base[r["L"]]
        r["time_vs_sdpa_mask"] = r["time_ms"] / b["time_ms"]
        r["speedup_vs_sdpa_mask"] = b["time_ms"] / r["time_ms"]
        r["mem_vs_sdpa_mask"] = (r["peak_mib"] / b["peak_mib"]
                                 if r["peak_mib"] is not None and b["peak_mib"] else None)
    return {
        "setup": {
            "device": str(device), "device_name": device_name(device), "dtype": args.dtype,
            "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
            "pattern": sparse.describe(sparse.sliding_window(args.flex_window, causal=True)),
            "lengths": args.flex_lengths, "block_sizes": args.flex_block_sizes,
            "eager_max": args.flex_eager_max, "repeats": args.flex_repeats,
            "warmup": args.flex_warmup,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "memory_method": meter.method,
            "timing": "forward, inference_mode; the first call (compile) is separate; then "
                      "--flex-warmup calls and the median of --flex-repeats samples, "
                      "implementations interleaved round-robin",
            "quick": args.quick,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t_start, 1),
            "load_average_before_after": [load_before, load_average()],
        },
        "compile_time": compile_times,
        "masks_built": {str(L): v for L, v in built_all.items()},
        "agreement_max_abs_diff": agreement,
        "results": rows,
        "verdict": flex_verdict(rows),
    }


def flex_verdict(rows: list[dict]) -> dict | None:
    """The lecture's claim: compiled FlexAttention (tiles of 128) >= 8x faster than sdpa_mask."""
    at = [r for r in rows if r["L"] == FLEX_TARGET["L"] and r["impl"].startswith("flex_b")]
    if not at:
        return None
    default = next((r for r in at if r["impl"] == "flex_b128"), at[0])
    best = max(at, key=lambda r: r["speedup_vs_sdpa_mask"])
    target = FLEX_TARGET["speedup"]
    return {"L": FLEX_TARGET["L"], "target_speedup": target,
            "impl": default["impl"], "speedup": default["speedup_vs_sdpa_mask"],
            "met": default["speedup_vs_sdpa_mask"] >= target,
            "best_impl": best["impl"], "best_speedup": best["speedup_vs_sdpa_mask"],
            "best_met": best["speedup_vs_sdpa_mask"] >= target}


FLEX_CSV_FIELDS = ["impl", "L", "window", "time_ms", "time_min_ms", "first_call_s", "peak_mib",
                   "time_vs_sdpa_mask", "speedup_vs_sdpa_mask", "mem_vs_sdpa_mask"]
FLEX_STYLE = {"sdpa_mask": ("black", "-", "o"), "sdpa_causal": ("tab:gray", "--", "o"),
              "flex_eager": ("tab:red", "-", "^")}
FLEX_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:orange"]


def write_flex_outputs(report: dict, out: Path, plot: bool = True) -> list[Path]:
    return write_report(report, out, "attention_flex", FLEX_CSV_FIELDS, report["results"],
                        plot_flex if plot else None)


def _flex_style(impl: str, i: int):
    return FLEX_STYLE.get(impl, (FLEX_COLORS[i % len(FLEX_COLORS)], "-", "s"))


def plot_flex(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = report["results"], report["setup"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for i, impl in enumerate(impls):
        color, ls, marker = _flex_style(impl, i)
        pts = [r for r in rows if r["impl"] == impl]
        xs = [r["L"] for r in pts]
        axes[0].plot(xs, [r["time_ms"] for r in pts], color=color, ls=ls, marker=marker, label=impl)
        mem = [(r["L"], r["peak_mib"]) for r in pts if r["peak_mib"] is not None]
        if mem:
            axes[2].plot(*zip(*mem, strict=True), color=color, ls=ls, marker=marker, label=impl)
        if impl != "sdpa_mask":
            axes[1].plot(xs, [r["speedup_vs_sdpa_mask"] for r in pts], color=color, ls=ls,
                         marker=marker, label=impl)
    axes[1].axhline(FLEX_TARGET["speedup"], color="crimson", ls=":", lw=1,
                    label=f"claim: {FLEX_TARGET['speedup']:g}x at L={FLEX_TARGET['L']}")
    axes[1].axhline(1.0, color="black", lw=0.8)
    titles = ("time per forward (ms)", "speed-up over sdpa_mask (x)", "peak extra memory (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
        ax.set_xlabel("sequence length L")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{s['pattern']}: FlexAttention vs SDPA with the same boolean mask on {s['device_name']} "
        f"({s['device']}, {s['torch_threads']} threads, torch {s['torch']}), "
        f"B={s['batch']} H={s['heads']} D={s['head_dim']} {s['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flex_summary(report: dict) -> str:
    rows = report["results"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"\n{report['setup']['pattern']}: time in ms (x faster than sdpa_mask), "
             "peak memory in MiB (x sdpa_mask)\n",
             "| L | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for L in sorted({r["L"] for r in rows}):
        cells = []
        for impl in impls:
            r = next((r for r in rows if r["impl"] == impl and r["L"] == L), None)
            if r is None:
                cells.append("-")
                continue
            m = "n/a" if r["peak_mib"] is None else _num(r["peak_mib"])
            if r.get("mem_vs_sdpa_mask") is not None:
                m += f" ({_ratio(r['mem_vs_sdpa_mask'])})"
            x = r["speedup_vs_sdpa_mask"]
            cells.append(f"{_num(r['time_ms'])} ({_ratio(x) if x >= 0.1 else f'{x:.2g}x'}); {m}")
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    ct = report.get("compile_time")
    if ct:
        for kind in ("cold", "warm"):
            c = ct[kind]
            lines.append(f"\ncompile {kind}: first call {c['first_call_s']:.2f} s, steady "
                         f"{c['steady_call_s'] * 1e3:.1f} ms -> compile {c['compile_s']:.2f} s "
                         f"(L={c['L']}, tiles of {c['block_size']})")
    v = report.get("verdict")
    if v:
        lines.append(f"\nverdict at L={v['L']}: {v['impl']} is {v['speedup']:.2f}x faster than "
                     f"sdpa_mask (target {v['target_speedup']:g}x): {'MET' if v['met'] else 'NOT MET'}; "
                     f"best {v['best_impl']} {v['best_speedup']:.2f}x: "
                     f"{'MET' if v['best_met'] else 'NOT MET'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- attention family


# Every attention variant of lectures 01 and 05-08, on the same (B, H, L, D) inputs. Each entry:
# (label, causal, kind). kind "exact": computes the same function as a dense reference (its
# error is rounding); "approx": approximates softmax attention (its error is the method's).
FAMILY = {
    "sdpa": ("F.scaled_dot_product_attention (the baseline)", None, "exact"),
    "readable": ("attention.scaled_dot_product_attention (lecture 01, stores the L x L scores)", None, "exact"),
    "flash": ("flash.flash_attention (lecture 08, tiled, online softmax)", None, "exact"),
    "flex_window": ("sparse.sparse_attention, compiled FlexAttention, causal window 256 (lecture 05)", True, "exact"),
    "lsh_1": ("lsh.lsh_attention, 1 round (lecture 06)", False, "approx"),
    "lsh_2": ("lsh.lsh_attention, 2 rounds (lecture 06)", False, "approx"),
    "lsh_4": ("lsh.lsh_attention, 4 rounds (lecture 06)", False, "approx"),
    "linformer": ("lowrank.linformer_attention, k = min(256, L/2), random E = F (lecture 07)", False, "approx"),
    "performer": ("lowrank.performer_attention, 256 orthogonal positive features (lecture 07)", False, "approx"),
    "linear_causal": ("lowrank.linear_attention, elu+1, causal (lecture 07)", True, "exact"),
    "mamba_scan": ("ssm.selective_scan, parallel scan, d_inner = H D, d_state 16 (lecture 11; the token "
                   "mixer alone, no attention)", True, "recurrent"),
    "mamba_block": ("ssm.MambaBlock, d_model = H D / 2 (d_inner = H D), d_state 16, with its projections "
                    "and convolution (lecture 11)", True, "recurrent"),
}
FAMILY_REFERENCE = {
    "sdpa": "itself",
    "readable": "SDPA, same mask",
    "flash": "SDPA, same mask",
    "flex_window": "SDPA with the window's (L, L) boolean mask",
    "lsh_1": "full shared-QK attention (keys q/|q|, no attention to oneself), via SDPA",
    "linformer": "exact softmax attention (SDPA)",
    "performer": "exact softmax attention (SDPA)",
    "linear_causal": "the same elu+1 attention computed densely in float64 (phi(Q) phi(K)^T, causal)",
    "mamba_scan": "the same selective scan, run as the sequential loop h_t = a_t h_(t-1) + b_t",
    "mamba_block": "the same block (same weights) with scan='sequential'",
}
FAMILY_REFERENCE["lsh_2"] = FAMILY_REFERENCE["lsh_4"] = FAMILY_REFERENCE["lsh_1"]
# Shared QK scores q_i . q_j / (|q_j| sqrt(D)): keys have unit length, so attention is as sharp as
# |q| is large; a trained Reformer learns large |q|. LSH hashes 8 q (the same buckets: h(c x) = h(x)).
LSH_QK_SCALE = 8.0
NOISE = 0.3  # a cluster member is 0.9 c + NOISE * noise: two members at about 20 degrees
FAMILY_TARGETS = {"flash_time_L": 8192, "flash_time_ratio": 1.3, "flash_mem_ratio": 2.0,
                  "flash_error": 1e-5, "linear_crossover_L": 512}


def family_variants(causal: bool, L: int, args) -> list[str]:
    names = [n for n, (_, c, _) in FAMILY.items() if (c is None or c == causal)
             and (not args.family_variants or n in args.family_variants or n == "sdpa")]
    if L > args.naive_max and "readable" in names:
        names.remove("readable")
    if args.no_compile and "flex_window" in names:
        names.remove("flex_window")
    return names


def family_inputs(L: int, args, device, dtype):
    """q, k, v of shape (B, H, L, D) with the structure trained attention has: positions fall into
    clusters of about 64 (a topic, a repeated phrase), a query and a key of one cluster are close
    (about 20 degrees apart; their scaled score is about 6 above an unrelated pair's), so each query attends to its
    cluster's keys. On q, k ~ N(0, 1) every weight is near 1/L, the exact output is almost 0 and
    every approximation's relative error says nothing. Timing does not depend on the values."""
    g = torch.Generator(device="cpu").manual_seed(1000 + L)
    B, H, D = args.batch, args.heads, args.head_dim
    n_clusters = max(2, L // 64)
    centers = torch.randn(B, H, n_clusters, D, generator=g)
    z = torch.randint(n_clusters, (B, H, L, 1), generator=g).expand(B, H, L, D)
    base = 0.9 * centers.gather(2, z)  # two members score about 0.81 D / sqrt(D) ~ 6.5 (D = 64)
    q = base + NOISE * torch.randn(B, H, L, D, generator=g)
    k = base + NOISE * torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def make_family_cases(L: int, causal: bool, args, device, dtype) -> dict:
    """Zero-argument callables for every variant at (L, causal); masks, projections and feature
    draws are made here, outside the timing (a trained model holds them as parameters)."""
    from transformer_lab import attention as att
    from transformer_lab import flash, lowrank, lsh, ssm

    q, k, v = family_inputs(L, args, device, dtype)
    fns = {}
    for name in family_variants(causal, L, args):
        if name == "sdpa":
            fns[name] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        elif name == "readable":
            mask = causal_mask(L, device=device) if causal else None
            fns[name] = lambda mask=mask: att.scaled_dot_product_attention(q, k, v, mask=mask)
        elif name == "flash":
            fns[name] = lambda: flash.flash_attention(q, k, v, causal=causal)
        elif name == "flex_window":
            bm = sparse.block_mask(sparse.sliding_window(args.flex_window, causal=True), L,
                                   block_size=128, device=device)
            fns[name] = lambda bm=bm: sparse.sparse_attention(q, k, v, block_mask=bm, compiled=True)
        elif name.startswith("lsh_"):
            rounds = int(name[4:])
            n_buckets = max(2, (2 * L // args.lsh_chunk) // 2 * 2)  # even; chunk_len = 2 L / n_buckets
            qk = LSH_QK_SCALE * q
            fns[name] = lambda r=rounds, nb=n_buckets, qk=qk: lsh.lsh_attention(
                qk, v, nb, n_rounds=r, chunk_len=min(args.lsh_chunk, L), generator=L)
        elif name == "linformer":
            kp = min(args.linformer_k, L // 2)
            E = torch.randn(kp, L, generator=torch.Generator().manual_seed(L)).to(device, dtype) / math.sqrt(kp)
            fns[name] = lambda E=E: lowrank.linformer_attention(q, k, v, E)
        elif name == "performer":
            W = lowrank.gaussian_features(args.performer_features, args.head_dim,
                                          generator=torch.Generator().manual_seed(L),
                                          orthogonal=True).to(device, dtype)
            fns[name] = lambda W=W: lowrank.performer_attention(q, k, v, features=W)
        elif name == "linear_causal":
            fns[name] = lambda: lowrank.linear_attention(q, k, v, causal=True)
        elif name == "mamba_scan":
            args_ = mamba_scan_inputs(q, k, v)
            fns[name] = lambda a=args_: ssm.selective_scan(*a, method="parallel")
        elif name == "mamba_block":
            block, x = mamba_block_inputs(v, device, dtype)
            fns[name] = lambda block=block, x=x: block(x)
    return fns


MAMBA_STATE = 16


def mamba_scan_inputs(q: Tensor, k: Tensor, v: Tensor):
    """A selective scan of the family's size from its q, k, v: u = v as (B, L, H D), delta_t =
    softplus(k - 4) (0.005 ... 0.3, Mamba's range), B_t and C_t from q's and k's first head; A
    S4D-Real. Only the shapes matter for time and memory; the values keep the scan stable."""
    from transformer_lab import ssm

    B_, H, L, D = v.shape
    flat = lambda t: t.transpose(1, 2).reshape(B_, L, H * D)  # noqa: E731
    A = ssm.s4d_init(H * D, MAMBA_STATE, "real", dtype=v.dtype, device=v.device)
    return (flat(v), F.softplus(flat(k) - 4.0), A, q[:, 0, :, :MAMBA_STATE].contiguous(),
            k[:, 0, :, :MAMBA_STATE].contiguous(), torch.ones(H * D, dtype=v.dtype, device=v.device))


def mamba_block_inputs(v: Tensor, device, dtype, scan: str = "parallel"):
    """A MambaBlock with d_inner = H D (d_model = H D / 2, expand 2), seeded, in eval mode, and its
    input x: the first d_model channels of v as (B, L, H D)."""
    from transformer_lab import ssm

    B_, H, L, D = v.shape
    torch.manual_seed(11)
    block = ssm.MambaBlock(H * D // 2, d_state=MAMBA_STATE, scan=scan).to(device, dtype).eval()
    x = v.transpose(1, 2).reshape(B_, L, H * D)[..., : H * D // 2].contiguous()
    return block, x


def family_reference(name: str, L: int, causal: bool, args, device, dtype) -> Tensor:
    """The exact output each variant is compared with (FAMILY_REFERENCE)."""
    q, k, v = family_inputs(L, args, device, dtype)
    if name.startswith("lsh_"):
        qk = LSH_QK_SCALE * q
        keys = qk / qk.norm(dim=-1, keepdim=True)
        not_self = ~torch.eye(L, dtype=torch.bool, device=device)  # every row has another key
        return F.scaled_dot_product_attention(qk, keys, v, attn_mask=not_self)
    if name == "flex_window":
        mask = sparse.dense_mask(sparse.sliding_window(args.flex_window, causal=True), L, device=device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "mamba_scan":
        from transformer_lab import ssm

        return ssm.selective_scan(*mamba_scan_inputs(q, k, v), method="sequential")
    if name == "mamba_block":
        block, x = mamba_block_inputs(v, device, dtype, scan="sequential")
        return block(x)
    if name == "linear_causal":
        out = torch.empty(args.batch, args.heads, L, args.head_dim, dtype=torch.float64, device=device)
        keep = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        for b in range(args.batch):
            for h in range(args.heads):  # one head at a time: an (L, L) float64 matrix
                fq = F.elu(q[b, h].double()) + 1
                fk = F.elu(k[b, h].double()) + 1
                w = (fq @ fk.T).masked_fill_(~keep, 0.0)
                out[b, h] = (w @ v[b, h].double()) / (w.sum(-1, keepdim=True) + 1e-6)
        return out
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def run_family(args) -> dict:
    device = torch.device(args.device) if args.device else transformer_lab.device()
    dtype = getattr(torch, args.dtype)
    meter = PeakMemory(device)
    rows = []
    load_before = load_average()
    t_start = time.perf_counter()
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(64, limit)  # one FlexAttention compile per L
    try:
        for L in args.family_lengths:
            repeats = args.repeats * 2 if L <= 512 else args.repeats if L < 4096 else max(3, args.repeats // 2)
            for causal in (False, True):
                with torch.inference_mode():
                    fns = make_family_cases(L, causal, args, device, dtype)
                    errors, rel = {}, {}
                    for name, fn in fns.items():  # the first call compiles flex_window
                        out = fn()
                        ref = family_reference(name, L, causal, args, device, dtype)
                        diff = out.to(ref.dtype) - ref
                        errors[name] = float(diff.abs().max())
                        rel[name] = float(diff.norm() / ref.norm())
                        del out, ref, diff
                    times = time_interleaved(fns, device, repeats, args.warmup, args.sample_ms / 1e3)
                    gc.collect()
                    peaks = {name: meter.measure(fn) for name, fn in fns.items()}
                del fns
                for name in times:
                    row = {"variant": name, "L": L, "causal": causal, "kind": FAMILY[name][2],
                           "time_ms": statistics.median(times[name]) * 1e3,
                           "time_min_ms": min(times[name]) * 1e3,
                           "times_ms": [round(t * 1e3, 4) for t in times[name]],
                           "peak_mib": peaks[name], "max_error": errors[name], "rel_error": rel[name],
                           "scores_mib": args.batch * args.heads * L * L * torch.finfo(dtype).bits / 8 / MIB}
                    rows.append(row)
                    if not args.silent:
                        mem = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:8.1f} MiB"
                        print(f"L={L:6d} {'causal' if causal else 'full  '} {name:13s} "
                              f"{row['time_ms']:10.3f} ms  {mem}  max|err| {row['max_error']:.2e}", flush=True)
    finally:
        torch._dynamo.config.recompile_limit = limit
    base = {(r["L"], r["causal"]): r for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        b = base[(r["L"], r["causal"])]
        r["time_ratio"] = r["time_ms"] / b["time_ms"]
        r["mem_ratio"] = (r["peak_mib"] / b["peak_mib"]
                          if r["peak_mib"] is not None and b["peak_mib"] else None)
    return {
        "setup": {
            "device": str(device), "device_name": device_name(device), "dtype": args.dtype,
            "B": args.batch, "H": args.heads, "D": args.head_dim, "lengths": args.family_lengths,
            "naive_max": args.naive_max, "repeats": args.repeats, "warmup": args.warmup,
            "lsh_chunk_len": args.lsh_chunk, "lsh_n_buckets": "2 L / chunk_len (even)",
            "linformer_k": f"min({args.linformer_k}, L/2)", "performer_features": args.performer_features,
            "flex_window": args.flex_window,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "memory_method": meter.method,
            "timing": "forward, inference_mode, after warm-up; median of samples (2x --repeats at "
                      "L <= 512, half but at least 3 at L >= 4096); variants interleaved round-robin",
            "inputs": "clustered q and k (clusters of about 64 positions, family_inputs), v ~ N(0, 1), "
                      f"seeded per L; LSH's shared QK is {LSH_QK_SCALE:g} q (unit keys need a large |q| "
                      "to be sharp) and ignores k",
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t_start, 1),
            "load_average_before_after": [load_before, load_average()],
        },
        "variants": {n: {"label": lab, "kind": kind, "error_against": FAMILY_REFERENCE[n]}
                     for n, (lab, _, kind) in FAMILY.items()},
        "rows": rows,
        "verdict": family_verdict(rows),
    }


def family_verdict(rows: list[dict]) -> dict:
    """The issue's targets, checked on this run (reported, never asserted in tests)."""
    def row(name, L, causal):
        return next((r for r in rows if r["variant"] == name and r["L"] == L and r["causal"] == causal), None)

    out = {}
    L = FAMILY_TARGETS["flash_time_L"]
    f = row("flash", L, False)
    if f is not None:
        out["flash"] = {"L": L, "time_ratio": f["time_ratio"], "mem_ratio": f["mem_ratio"],
                        "max_error": f["max_error"],
                        "met": f["time_ratio"] <= FAMILY_TARGETS["flash_time_ratio"]
                        and (f["mem_ratio"] is None or f["mem_ratio"] <= FAMILY_TARGETS["flash_mem_ratio"])
                        and f["max_error"] <= FAMILY_TARGETS["flash_error"]}
    lin = sorted((r["L"], r["time_ratio"]) for r in rows if r["variant"] == "linear_causal")
    if lin:
        faster = [L for L, ratio in lin if ratio < 1.0]
        # the crossover: the shortest L from which on linear attention stays faster
        cross = next((L for i, (L, _) in enumerate(lin) if all(r < 1.0 for _, r in lin[i:])), None)
        out["linear_causal"] = {"crossover_L": cross, "faster_at": faster,
                                "target_L": FAMILY_TARGETS["linear_crossover_L"],
                                "met": cross is not None and cross <= FAMILY_TARGETS["linear_crossover_L"]}
    return out


FAMILY_STYLE = {
    "sdpa": ("black", "-", "o"), "readable": ("tab:red", "-", "^"), "flash": ("tab:blue", "--", "s"),
    "flex_window": ("tab:green", "-", "D"), "lsh_1": ("tab:purple", ":", "v"),
    "lsh_2": ("tab:purple", "-.", "v"), "lsh_4": ("tab:purple", "-", "v"),
    "linformer": ("tab:orange", "-", "P"), "performer": ("tab:brown", "-", "X"),
    "linear_causal": ("tab:cyan", "-", "*"),
    "mamba_scan": ("tab:olive", "--", "h"), "mamba_block": ("tab:olive", "-", "h"),
}
FAMILY_CSV_FIELDS = ["variant", "L", "causal", "kind", "time_ms", "time_min_ms", "peak_mib",
                     "time_ratio", "mem_ratio", "max_error", "rel_error", "scores_mib"]


def write_family_outputs(report: dict, out: Path, plot: bool = True, stem: str = "attention_family") -> list[Path]:
    return write_report(report, out, stem, FAMILY_CSV_FIELDS, report["rows"],
                        plot_family if plot else None, number=lambda v: float(f"{v:.4g}"))


def plot_family(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = report["rows"], report["setup"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True)
    for i, causal in enumerate((False, True)):
        for j, (key, title) in enumerate((("time_ms", "time per forward (ms)"),
                                          ("peak_mib", "peak extra memory (MiB)"),
                                          ("rel_error", "relative error |out - exact| / |exact|"))):
            ax = axes[i, j]
            for name, (color, ls, marker) in FAMILY_STYLE.items():
                pts = [(r["L"], r[key]) for r in rows if r["variant"] == name and r["causal"] == causal
                       and r[key] is not None and not (key == "rel_error" and name == "sdpa")]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, [max(y, 1e-9) for y in ys], color=color, ls=ls, marker=marker, ms=4,
                            label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{'causal' if causal else 'no mask'}: {title}", fontsize=10)
            if i == 1:
                ax.set_xlabel("sequence length L")
        axes[i, 0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Every attention variant of the course on {s['device_name']} ({s['device']}, "
                 f"{s['threads']} threads, torch {s['torch']}), B={s['B']} H={s['H']} D={s['D']} "
                 f"{s['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def family_summary(report: dict) -> str:
    rows = report["rows"]
    lines = []
    for causal in (False, True):
        names = [n for n in FAMILY if any(r["variant"] == n and r["causal"] == causal for r in rows)]
        lines += [f"\n{'Causal' if causal else 'No mask'}: time in ms (x sdpa); peak MiB (x sdpa); "
                  "max |error| against the exact reference\n",
                  "| L | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for L in sorted({r["L"] for r in rows}):
            cells = []
            for n in names:
                r = next((r for r in rows if r["variant"] == n and r["L"] == L and r["causal"] == causal), None)
                if r is None:
                    cells.append("-")
                    continue
                m = "n/a" if r["peak_mib"] is None else _num(r["peak_mib"])
                if r["mem_ratio"] is not None:
                    m += f" ({_ratio(r['mem_ratio'])})"
                cells.append(f"{_num(r['time_ms'])} ({_ratio(r['time_ratio'])}); {m}; {r['max_error']:.0e}")
            lines.append(f"| {L} | " + " | ".join(cells) + " |")
    v = report.get("verdict") or {}
    if "flash" in v:
        f = v["flash"]
        mem = "n/a" if f["mem_ratio"] is None else f"{f['mem_ratio']:.2f}x"
        lines.append(f"\nflash at L={f['L']}: {f['time_ratio']:.2f}x SDPA's time, {mem} its memory, "
                     f"max |error| {f['max_error']:.1e} (targets <= {FAMILY_TARGETS['flash_time_ratio']}x, "
                     f"<= {FAMILY_TARGETS['flash_mem_ratio']}x, <= {FAMILY_TARGETS['flash_error']:g}): "
                     f"{'MET' if f['met'] else 'NOT MET'}")
    if "linear_causal" in v:
        c = v["linear_causal"]
        lines.append(f"causal elu+1 linear attention faster than causal SDPA from L={c['crossover_L']} on "
                     f"(faster at {c['faster_at']}; target <= {c['target_L']}): {'MET' if c['met'] else 'NOT MET'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Attention: library vs PyTorch, time and memory vs L.")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: transformer_lab.device())")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--naive-max", type=int, default=4096, help="longest L for the readable paths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-ms", type=float, default=5.0,
                   help="a timing sample loops a fast call until it lasts about this long")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: PyTorch's choice; --quick uses 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results, or benchmarks/_work with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny lengths, 2 repeats, seconds")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--silent", action="store_true")
    p.add_argument("--show", type=Path, default=None, metavar="JSON",
                   help="print the tables of an earlier run's attention.json "
                        "(or attention_flex.json) and stop")
    p.add_argument("--sections", nargs="+", default=["dense", "flex", "family"],
                   choices=("dense", "flex", "family"),
                   help="dense: the table above; flex: FlexAttention with a causal window (lecture 05); "
                        "family: every attention variant of lectures 01 and 05-08")
    p.add_argument("--family-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--family-variants", nargs="+", default=None, choices=tuple(FAMILY),
                   help="time only these variants (and sdpa, the baseline); default: all")
    p.add_argument("--family-stem", default="attention_family",
                   help="output file names of the family section (lectures 07-08 read attention_family.json; "
                        "lecture 11's recurrent rows are recorded as attention_family_recurrent)")
    p.add_argument("--lsh-chunk", type=int, default=64, help="LSH chunk length m (n_buckets = 2 L / m)")
    p.add_argument("--linformer-k", type=int, default=256, help="Linformer's projected length (at most L/2)")
    p.add_argument("--performer-features", type=int, default=256, help="Performer's random features m")
    p.add_argument("--flex-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--flex-window", type=int, default=256)
    p.add_argument("--flex-block-sizes", type=int, nargs="+", default=[128, 64],
                   help="FlexAttention tile sizes to time, one column each (128 is PyTorch's default)")
    p.add_argument("--flex-eager-max", type=int, default=2048,
                   help="longest L for eager FlexAttention (it materialises the scores: 1.7 GiB "
                        "and seconds per call at 4096)")
    p.add_argument("--flex-repeats", type=int, default=7,
                   help="timing samples per implementation and L in the flex section")
    p.add_argument("--flex-warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true",
                   help="flex section without torch.compile (--quick sets it)")
    p.add_argument("--no-compile-probe", action="store_true",
                   help="skip the cold/warm compile-time processes")
    p.add_argument("--compile-probe", type=int, nargs=2, default=None, metavar=("L", "BLOCK"),
                   help=argparse.SUPPRESS)  # internal: one compile, timed, in a fresh process
    args = p.parse_args(argv)
    if args.show:
        report = json.loads(args.show.read_text())
        print(family_summary(report) if "variants" in report
              else flex_summary(report) if "verdict" in report else summary_table(report))
        return 0
    if args.compile_probe:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(compile_probe(args)))
        return 0
    if args.quick:
        args.lengths, args.repeats, args.warmup = [64, 128], 2, 1
        args.batch, args.heads, args.head_dim = 1, 2, 16
        args.threads = args.threads or 1
        args.sample_ms = 1.0
        args.flex_lengths, args.flex_window, args.no_compile = [64, 128], 16, True
        args.flex_repeats, args.flex_warmup = 2, 1
        args.family_lengths, args.performer_features, args.lsh_chunk = [64, 128], 32, 16
    out = args.out or (HERE / ("_work" if args.quick else "results"))
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = flex_report = family_report = None
    try:
        if "dense" in args.sections:
            report = run(args)
        if "flex" in args.sections:
            flex_report = run_flex(args)
        if "family" in args.sections:
            family_report = run_family(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    paths = []
    if report is not None:
        paths += write_outputs(report, out, plot=not args.no_plot)
    if flex_report is not None:
        paths += write_flex_outputs(flex_report, out, plot=not args.no_plot)
    if family_report is not None:
        paths += write_family_outputs(family_report, out, plot=not args.no_plot, stem=args.family_stem)
    if not args.silent:
        if report is not None:
            print(summary_table(report))
            print(f"\nmemory: {report['setup']['memory_method']}")
        if flex_report is not None:
            print(flex_summary(flex_report))
        if family_report is not None:
            print(family_summary(family_report))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
