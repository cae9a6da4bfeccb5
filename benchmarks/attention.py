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
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lib"))  # run from a checkout without installing

import transformer_lab  # noqa: E402
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


def write_outputs(report: dict, out: Path, plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "attention.json", out / "attention.csv"]
    paths[0].write_text(json.dumps(report, indent=2))
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in report["results"]:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    if plot:
        paths.append(plot_results(report, out / "attention.png"))
    return paths


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
                   help="print the tables of an earlier run's attention.json and stop")
    args = p.parse_args(argv)
    if args.show:
        print(summary_table(json.loads(args.show.read_text())))
        return 0
    if args.quick:
        args.lengths, args.repeats, args.warmup = [64, 128], 2, 1
        args.batch, args.heads, args.head_dim = 1, 2, 16
        args.threads = args.threads or 1
        args.sample_ms = 1.0
    out = args.out or (HERE / ("_work" if args.quick else "results"))
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    paths = write_outputs(report, out, plot=not args.no_plot)
    if not args.silent:
        print(summary_table(report))
        print(f"\nmemory: {report['setup']['memory_method']}")
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
