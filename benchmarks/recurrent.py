"""Benchmarks of lectures 11 and 12: the scan, recurrent generation, ternary layers.

    .venv/bin/python benchmarks/recurrent.py            # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/recurrent.py --quick    # smoke run (seconds), writes benchmarks/_work/
    .venv/bin/python benchmarks/recurrent.py --sections scan --device cuda
    .venv/bin/python benchmarks/recurrent.py --show benchmarks/results/recurrent.json

Every section times its contenders round-robin (``attention.time_interleaved``: one sample of
each, then the next round, so a change of load on a shared machine hits all alike) and gives
every time as a ratio to the section's baseline, measured in the same run.

``scan`` (lecture 11): ``h_t = a_t h_{t-1} + b_t`` over ``--scan-lengths`` steps for ``--scan-widths``
    independent recurrences (a Mamba layer scans ``d_inner d_state`` of them: 512 x 16 = 8192 in
    a small model), a in [0.5, 1], b ~ N(0, 1), float32, batch 1.
    sequential  ``ssm.sequential_scan``: the Python loop over t: **the baseline**
    parallel    ``ssm.parallel_scan``: Blelloch's up-sweep / down-sweep (2 log2 L levels)
    Each pair is timed at ``--scan-threads`` intra-op threads (default 1 and PyTorch's default).
    Reported: time, speed-up (sequential / parallel), max |difference|; and, at the same L, the
    unstable shortcuts' errors (``scan_cumprod``: non-finite outputs; ``scan_logcumsumexp``: max
    relative error), the failures lecture 11 shows. On CUDA, when the ``mamba_ssm`` package is
    installed, also its fused ``selective_scan_fn`` against ``ssm.selective_scan`` (d_inner 512,
    d_state 16; it never writes the (B, L, d_inner, d_state) states to memory).
    The verdict: the issue's target, the parallel scan at least 5x the loop at L = 4096 with
    agreement to 1e-4, checked at every width and thread count.

``generate`` (lecture 11): the cost of the next token after a context of t tokens.
    mamba_step       ``MambaLM.step`` from the recurrent state (constant size)
    mamba_recompute  ``MambaLM`` forward over all t + 1 tokens (no state kept)
    transformer      ``models.TransformerLM`` (same d_model and layers) forward over all t + 1
                     tokens: what ``TransformerLM.generate`` does (lecture 13 adds a KV cache)
    Baseline: mamba_recompute. Also the bytes each model carries to continue, counted on
    tensors: the Mamba state (``ssm.memory_per_token``) against the KV cache a transformer of the
    same size would hold after t tokens (``ssm.kv_cache_bytes``).

``ternary`` (lecture 12): one ``--ternary-d`` x ``--ternary-d`` layer on ``--ternary-tokens`` tokens.
    linear      ``F.linear`` with the float32 weight: **the baseline**
    bitlinear   ``ternary.BitLinear`` forward (quantise, matmul by the ternary weight, rescale)
    additions   ``ternary.bitlinear_inference``: the same layer, additions and subtractions only
                (index lists built once, outside the timing)
    Reported: time ratios (PyTorch has no ternary kernel on the CPU: gathers and sums are slower
    than a tuned matmul; the saving is in multiplications and bytes, and in hardware built for
    it), the counted multiplications of each path (``ternary.count_multiplications``) and the
    weight's bytes in fp32, bf16, int8 and packed at 2 bits (``ternary.weight_bytes``, checked
    against ``pack_ternary``'s output).

Outputs in ``--out``: ``recurrent.json`` (set-up, every sample, the verdicts), ``recurrent.csv``
(one row per section, setting and contender) and ``recurrent.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))

from attention import load_average, run_setup, sync, time_interleaved, timed_row, write_report  # noqa: E402

import transformer_lab  # noqa: E402
from transformer_lab import ssm, ternary  # noqa: E402
from transformer_lab.models import ModelConfig, TransformerLM  # noqa: E402

CSV_FIELDS = ["section", "name", "L", "width", "threads", "time_ms", "time_min_ms", "ratio",
              "max_error", "bytes", "multiplications"]
SCAN_TARGET = {"L": 4096, "speedup": 5.0, "error": 1e-4}


# --------------------------------------------------------------------------- scan


def scan_inputs(L: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(L * 7919 + width)
    a = (0.5 + 0.5 * torch.rand(1, L, width, generator=g)).to(device)  # decays in [0.5, 1]
    b = torch.randn(1, L, width, generator=g).to(device)
    return a, b


def run_scan(args, device) -> dict:
    rows = []
    threads_before = torch.get_num_threads()
    thread_counts = [t for t in args.scan_threads if t >= 0] or [threads_before]
    try:
        for L in args.scan_lengths:
            for width in args.scan_widths:
                a, b = scan_inputs(L, width, device)
                with torch.inference_mode():
                    exact = ssm.sequential_scan(a.double(), b.double())
                    par = ssm.parallel_scan(a, b)
                    seq = ssm.sequential_scan(a, b)
                    errors = {"parallel": float((par.double() - exact).abs().max()),
                              "sequential": float((seq.double() - exact).abs().max())}
                    cum = ssm.scan_cumprod(a, b)
                    lcs = ssm.scan_logcumsumexp(a, b)
                    unstable = {"cumprod_nonfinite": float((~torch.isfinite(cum)).float().mean()),
                                "logcumsumexp_rel_error": float(((lcs.double() - exact).abs()
                                                                 / exact.abs().clamp(min=1e-3)).max())}
                    del exact, par, seq, cum, lcs
                    for threads in thread_counts:
                        if device.type == "cpu":
                            torch.set_num_threads(threads or threads_before)
                        fns = {"sequential": lambda a=a, b=b: ssm.sequential_scan(a, b),
                               "parallel": lambda a=a, b=b: ssm.parallel_scan(a, b)}
                        times = time_interleaved(fns, device, args.repeats, 1, sample_s=0.0)
                        t_threads = torch.get_num_threads() if device.type == "cpu" else None
                        base = statistics.median(times["sequential"])
                        for name in fns:
                            r = timed_row("scan", name, times[name], L=L, width=width, threads=t_threads,
                                          max_error=errors[name])
                            r["ratio"] = r["time_ms"] / (base * 1e3)
                            rows.append(r)
                        if not args.silent:
                            print(f"scan L={L:5d} width={width:5d} threads={t_threads}: sequential "
                                  f"{base * 1e3:9.2f} ms, parallel {rows[-1]['time_ms']:9.2f} ms "
                                  f"({1 / rows[-1]['ratio']:.1f}x), err {errors['parallel']:.1e}; "
                                  f"cumprod non-finite {unstable['cumprod_nonfinite']:.0%}, "
                                  f"logcumsumexp rel err {unstable['logcumsumexp_rel_error']:.1e}", flush=True)
                        rows[-1].update(unstable)
    finally:
        torch.set_num_threads(threads_before)
    report = {"setup": {"lengths": args.scan_lengths, "widths": args.scan_widths, "batch": 1,
                        "threads": thread_counts, "dtype": "float32", "a": "uniform [0.5, 1]",
                        "b": "N(0, 1)", "error": "max |h - h_float64 sequential|"},
              "rows": rows, "verdict": scan_verdict(rows)}
    if device.type == "cuda":
        report["mamba_ssm"] = run_mamba_ssm(args, device)
    return report


def scan_verdict(rows: list[dict]) -> dict:
    """The issue's target at every width and thread count: speed-up >= 5 at L = 4096, error <= 1e-4."""
    out = []
    for r in rows:
        if r["name"] != "parallel" or r["L"] != SCAN_TARGET["L"]:
            continue
        speedup = 1 / r["ratio"]
        out.append({"width": r["width"], "threads": r["threads"], "speedup": round(speedup, 2),
                    "max_error": r["max_error"],
                    "met": speedup >= SCAN_TARGET["speedup"] and r["max_error"] <= SCAN_TARGET["error"]})
    return {"target": SCAN_TARGET, "settings": out}


def run_mamba_ssm(args, device) -> dict:
    """mamba_ssm's fused CUDA selective scan against ssm.selective_scan (parallel), if installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001 - optional: not installed, or built for another CUDA
        return {"skipped": f"mamba_ssm not importable: {type(exc).__name__}: {exc}"}
    rows = []
    d_inner, d_state = 512, 16
    for L in args.scan_lengths:
        g = torch.Generator().manual_seed(L)
        u = torch.randn(1, L, d_inner, generator=g).to(device)
        delta = F.softplus(torch.randn(1, L, d_inner, generator=g) - 4).to(device)
        A = ssm.s4d_init(d_inner, d_state, device=device)
        Bm = torch.randn(1, L, d_state, generator=g).to(device)
        Cm = torch.randn(1, L, d_state, generator=g).to(device)
        ours = lambda u=u, delta=delta, A=A, Bm=Bm, Cm=Cm: ssm.selective_scan(  # noqa: E731
            u, delta, A, Bm, Cm, method="parallel")
        # mamba_ssm's layout: u, delta (B, d_inner, L); B, C (B, d_state, L)
        ut, dt, Bt, Ct = (t.transpose(1, 2).contiguous() for t in (u, delta, Bm, Cm))
        fused = lambda ut=ut, dt=dt, A=A, Bt=Bt, Ct=Ct: selective_scan_fn(ut, dt, A, Bt, Ct)  # noqa: E731
        with torch.inference_mode():
            err = float((fused().transpose(1, 2) - ours()).abs().max())
            times = time_interleaved({"ours": ours, "mamba_ssm": fused}, device, args.repeats, 1, sample_s=0.0)
        for name in times:
            rows.append(timed_row("scan_cuda", name, times[name], L=L, width=d_inner * d_state, max_error=err))
    return {"rows": rows}


# --------------------------------------------------------------------------- generate


def run_generate(args, device) -> dict:
    d, n_layers, vocab = args.gen_d_model, args.gen_layers, 256
    torch.manual_seed(0)
    mamba = ssm.MambaLM(vocab, d_model=d, n_layers=n_layers).to(device).eval()
    config = ModelConfig(vocab_size=vocab, d_model=d, n_heads=max(1, d // 32), n_layers=n_layers,
                         max_len=max(args.gen_contexts) + 1)
    transformer = TransformerLM(config).to(device).eval()
    rows = []
    with torch.inference_mode():
        for t in args.gen_contexts:
            idx = torch.randint(vocab, (1, t + 1), generator=torch.Generator().manual_seed(t)).to(device)
            _, states = mamba_prefix(mamba, idx[:, :t])
            logits_full = mamba(idx)[:, -1]
            logits_step, _ = mamba.step(idx[:, t], states)
            err = float((logits_full - logits_step).abs().max())
            fns = {"mamba_recompute": lambda idx=idx: mamba(idx)[:, -1],
                   "mamba_step": lambda idx=idx, states=states, t=t: mamba.step(idx[:, t], states)[0],
                   "transformer": lambda idx=idx: transformer(idx)[:, -1]}
            times = time_interleaved(fns, device, args.repeats, 1, sample_s=args.sample_ms / 1e3)
            mem = ssm.memory_per_token(mamba, t)
            base = statistics.median(times["mamba_recompute"])
            for name in fns:
                r = timed_row("generate", name, times[name], L=t, width=d)
                r["ratio"] = r["time_ms"] / (base * 1e3)
                r["bytes"] = {"mamba_step": mem["mamba"], "mamba_recompute": 0,
                              "transformer": mem["kv_cache"]}[name]
                r["max_error"] = err if name == "mamba_step" else None
                rows.append(r)
            if not args.silent:
                print(f"generate t={t:5d}: step {rows[-2]['time_ms']:.3f} ms, recompute "
                      f"{rows[-3]['time_ms']:.3f} ms, transformer {rows[-1]['time_ms']:.3f} ms; "
                      f"state {mem['mamba']} B vs KV cache {mem['kv_cache']} B; step vs full {err:.1e}",
                      flush=True)
    steps = [r for r in rows if r["name"] == "mamba_step"]
    return {"setup": {"d_model": d, "n_layers": n_layers, "vocab_size": vocab, "contexts": args.gen_contexts,
                      "mamba": "d_state 16, d_conv 4, expand 2", "transformer_heads": config.n_heads},
            "rows": rows,
            "verdict": {"step_time_growth": steps[-1]["time_ms"] / steps[0]["time_ms"],
                        "context_growth": args.gen_contexts[-1] / args.gen_contexts[0],
                        "kv_over_state_at_longest": rows[-1]["bytes"] / steps[-1]["bytes"]}}


def mamba_prefix(model: ssm.MambaLM, idx: torch.Tensor):
    """The states after a prefix, by stepping through it (what a generating model holds)."""
    states = None
    logits = None
    for i in range(idx.shape[1]):
        logits, states = model.step(idx[:, i], states)
    return logits, states


# --------------------------------------------------------------------------- ternary


def run_ternary(args, device) -> dict:
    d, n = args.ternary_d, args.ternary_tokens
    torch.manual_seed(0)
    layer = ternary.BitLinear(d, d).to(device).eval()
    x = torch.randn(n, d, device=device)
    w = layer.weight.detach()
    with torch.inference_mode():
        w_t, w_scale = layer.quantized_weight()
        idx = ternary.ternary_indices(w_t)
        weights = (w_t, w_scale)
        fns = {"linear": lambda: F.linear(x, w),
               "bitlinear": lambda: layer(x),
               "additions": lambda: ternary.bitlinear_inference(layer, x, idx, weights)}
        err = float((fns["additions"]() - fns["bitlinear"]()).abs().max())
        mults = {name: ternary.count_multiplications(fn)["total"] for name, fn in fns.items()}
        times = time_interleaved(fns, device, args.repeats, 1, sample_s=args.sample_ms / 1e3)
        packed = ternary.pack_ternary(w_t.cpu())
    sizes = ternary.weight_bytes(d, d)
    assert packed.numel() + 4 == sizes["packed_2bit"], "weight_bytes disagrees with pack_ternary"
    base = statistics.median(times["linear"])
    rows = []
    for name in fns:
        r = timed_row("ternary", name, times[name], L=n, width=d, multiplications=mults[name],
                      bytes={"linear": sizes["fp32"], "bitlinear": sizes["fp32"],
                             "additions": sizes["packed_2bit"]}[name],
                      max_error=err if name == "additions" else None)
        r["ratio"] = r["time_ms"] / (base * 1e3)
        rows.append(r)
    return {"setup": {"d_in": d, "d_out": d, "tokens": n, "activations": "8-bit absmax, RMSNorm first"},
            "rows": rows, "weight_bytes": sizes,
            "verdict": {"multiplications_removed": 1 - mults["additions"] / mults["linear"],
                        "bytes_vs_fp32": sizes["packed_2bit"] / sizes["fp32"],
                        "bytes_vs_bf16": sizes["packed_2bit"] / sizes["bf16"],
                        "additions_time_ratio": rows[2]["ratio"], "additions_vs_bitlinear_error": err}}


# --------------------------------------------------------------------------- report


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("scan", "generate", "ternary") if s in report]
    fig, axes = plt.subplots(1, len(sections), figsize=(4.8 * len(sections), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sections, strict=True):
        rows = report[name]["rows"]
        if name == "scan":
            for threads in sorted({r["threads"] for r in rows}, key=str):
                for L in sorted({r["L"] for r in rows}):
                    pts = sorted((r["width"], 1 / r["ratio"]) for r in rows
                                 if r["name"] == "parallel" and r["threads"] == threads and r["L"] == L)
                    ax.plot(*zip(*pts, strict=True), "o-", label=f"L={L}, {threads} thread(s)")
            ax.axhline(SCAN_TARGET["speedup"], color="gray", ls=":", label="5x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("recurrences scanned side by side")
            ax.set_ylabel("speed-up over the loop")
            ax.set_title("parallel scan vs the loop")
            ax.legend(fontsize=7)
        elif name == "generate":
            for contender, style in (("mamba_step", "o-"), ("mamba_recompute", "s--"), ("transformer", "^-")):
                pts = [(r["L"], r["time_ms"]) for r in rows if r["name"] == contender]
                ax.plot(*zip(*pts, strict=True), style, label=contender)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens of context")
            ax.set_ylabel("ms for the next token")
            ax.set_title("one more token")
            ax.legend(fontsize=8)
        else:
            ax.bar([r["name"] for r in rows], [r["multiplications"] for r in rows], color="tab:blue")
            ax.set_yscale("log")
            ax.set_ylabel("multiplications (counted)")
            v = report[name]["verdict"]
            ax.set_title(f"ternary layer: {v['multiplications_removed']:.1%} fewer, "
                         f"{v['bytes_vs_fp32']:.3f}x bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(report: dict) -> str:
    lines = []
    for name in ("scan", "generate", "ternary"):
        if name not in report:
            continue
        lines.append(f"\n[{name}] " + json.dumps(report[name]["setup"]))
        for r in report[name]["rows"]:
            extra = "" if r.get("max_error") is None else f"  err {r['max_error']:.1e}"
            if r.get("bytes") is not None:
                extra += f"  bytes {r['bytes']}"
            if r.get("multiplications") is not None:
                extra += f"  mults {r['multiplications']}"
            lines.append(f"  {r['name']:16s} L={r.get('L')} width={r.get('width')} threads={r.get('threads')} "
                         f"{r['time_ms']:10.3f} ms  ratio {r['ratio']:.3f}{extra}")
        lines.append("  verdict: " + json.dumps(report[name]["verdict"]))
        if "mamba_ssm" in report[name]:
            lines.append("  mamba_ssm: " + json.dumps(report[name]["mamba_ssm"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lectures 11-12: parallel scan, recurrent generation, ternary layers.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: transformer_lab.device())")
    p.add_argument("--sections", nargs="+", default=["scan", "generate", "ternary"],
                   choices=("scan", "generate", "ternary"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--scan-lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--scan-widths", type=int, nargs="+", default=[16, 256, 1024, 8192])
    p.add_argument("--scan-threads", type=int, nargs="+", default=[1, 0],
                   help="intra-op threads for the scan section (0: PyTorch's default)")
    p.add_argument("--gen-d-model", type=int, default=128)
    p.add_argument("--gen-layers", type=int, default=2)
    p.add_argument("--gen-contexts", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--ternary-d", type=int, default=1024)
    p.add_argument("--ternary-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, seconds")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--silent", action="store_true")
    p.add_argument("--show", type=Path, default=None, metavar="JSON")
    args = p.parse_args(argv)
    if args.show:
        print(summary(json.loads(args.show.read_text())))
        return 0
    if args.quick:
        args.repeats, args.sample_ms = 2, 1.0
        args.scan_lengths, args.scan_widths, args.scan_threads = [64, 128], [4, 32], [1]
        args.gen_d_model, args.gen_layers, args.gen_contexts = 32, 1, [8, 32]
        args.ternary_d, args.ternary_tokens = 32, 4
    device = torch.device(args.device) if args.device else transformer_lab.device()
    out = args.out or (HERE / ("_work" if args.quick else "results"))
    report = {}
    load_before, t0 = load_average(), time.perf_counter()
    runners = {"scan": run_scan, "generate": run_generate, "ternary": run_ternary}
    for name in args.sections:
        report[name] = runners[name](args, device)
        sync(device)
        if not args.silent:
            print(summary({name: report[name]}), flush=True)
    report["setup"] = run_setup(device, args, t0, load_before, threads_default=torch.get_num_threads())
    rows = [r for name in ("scan", "generate", "ternary") if name in report for r in report[name]["rows"]]
    paths = write_report(report, out, "recurrent", CSV_FIELDS, rows, None if args.no_plot else plot,
                         number=lambda v: v if math.isinf(v) else float(f"{v:.4g}"))
    if not args.silent:
        print("\nwrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
