"""Benchmarks of lecture 13: the KV cache against recomputation, speculative decoding's calls.

    .venv/bin/python benchmarks/decoding.py            # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/decoding.py --quick    # smoke run (seconds), writes benchmarks/_work/
    .venv/bin/python benchmarks/decoding.py --sections kvcache --device cuda
    .venv/bin/python benchmarks/decoding.py --show benchmarks/results/decoding.json

Timings are taken round-robin (``attention.time_interleaved``: one sample of each contender,
then the next round, so a change of load on a shared machine hits all alike) and reported as
ratios to the section's baseline, measured in the same run. Ratios and tokens per second use each
contender's fastest sample (the least disturbed by other jobs on a shared machine: a generation of
several seconds is often hit by one); medians and every sample are in the JSON.

``kvcache``: a ``models.TransformerLM`` (``--kv-d-model``, ``--kv-layers``; untrained: the cost of a
    token does not depend on the weights), batch 1, greedy decoding.
    step       the next token after a context of t tokens, two ways:
               recompute  the model's forward over all t + 1 tokens, its last logits: **the baseline**
               cached     ``decoding.cached_forward`` of the one new token against a KV cache
                          holding the t earlier tokens (cropped back after each call)
               Reported: tokens per second (1 / time), the speed-up, the cache's bytes (counted on
               its tensors, checked against ``decoding.kv_cache_bytes``) and the max |difference|
               of the two logits.
    generate   ``decoding.greedy_decode(model, prompt, n_new, use_cache)`` for n_new tokens from a
               16-token prompt: tokens per second of the whole generation, both ways, and whether
               the two produced the same tokens.

``speculative``: a target and a draft LM trained for the purpose (``decoding.train_lm_pair``: a
    106k-parameter target and a 19k-parameter draft on the offline character corpus, seeded),
    then ``decoding.calls_per_token_sweep`` over ``--n-drafts``: target calls per generated token
    (counted), the measured acceptance rate cA, and Leviathan et al.'s prediction
    1 / ((1 - cA^(k+1)) / (1 - cA)); and the wall time per token of speculative sampling against
    plain sampling from the target (``sample_decode``, no cache, as the speculative loop
    recomputes too). At these sizes a target call costs about as much as a draft call (Python
    overhead dominates), so fewer target calls is not a speed-up here: the times say so.

Outputs in ``--out``: ``decoding.json`` (set-up, every sample, the verdicts), ``decoding.csv``
(one row per section, setting and contender) and ``decoding.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))

from attention import load_average, run_setup, sync, time_interleaved, timed_row, write_report  # noqa: E402

import transformer_lab  # noqa: E402
from transformer_lab import decoding  # noqa: E402
from transformer_lab.models import ModelConfig, TransformerLM  # noqa: E402

CSV_FIELDS = ["section", "name", "L", "n_draft", "time_ms", "time_min_ms", "tokens_per_s", "ratio",
              "max_error", "bytes", "calls_per_token", "predicted", "alpha"]
PROMPT = 16


# --------------------------------------------------------------------------- kvcache


def kv_model(args, device) -> TransformerLM:
    torch.manual_seed(0)
    longest = max(max(args.kv_contexts) + 1, PROMPT + max(args.kv_generate))
    config = ModelConfig(vocab_size=args.vocab, d_model=args.kv_d_model, n_heads=args.kv_heads,
                         n_layers=args.kv_layers, max_len=longest)
    return TransformerLM(config).to(device).eval()


def run_kvcache(args, device) -> dict:
    model = kv_model(args, device)
    n_layers = args.kv_layers
    rows = []
    with torch.inference_mode():
        for t in args.kv_contexts:
            idx = torch.randint(args.vocab, (1, t + 1), generator=torch.Generator().manual_seed(t)).to(device)
            cache = decoding.KVCache(n_layers)
            decoding.cached_forward(model, idx[:, :t], cache)  # the prefix, once
            counted = cache.nbytes()
            formula = decoding.kv_cache_bytes(n_layers, args.kv_d_model, t)
            assert counted == formula, f"KVCache holds {counted} bytes, kv_cache_bytes says {formula}"
            new = idx[:, t:]

            def cached(new=new, cache=cache, t=t):
                out = decoding.cached_forward(model, new, cache)[:, -1]
                cache.crop(t)  # forget the new token: every sample continues the same context
                return out

            def recompute(idx=idx):
                return model(idx)[:, -1]

            err = float((cached() - recompute()).abs().max())
            times = time_interleaved({"recompute": recompute, "cached": cached}, device, args.repeats, 1,
                                     sample_s=args.sample_ms / 1e3)
            base = min(times["recompute"])
            for name in ("recompute", "cached"):
                r = timed_row("step", name, times[name], L=t, bytes=counted if name == "cached" else 0,
                              max_error=err if name == "cached" else None)
                r["ratio"] = r["time_min_ms"] / (base * 1e3)
                r["tokens_per_s"] = 1e3 / r["time_min_ms"]
                rows.append(r)
            if not args.silent:
                print(f"step t={t:5d}: recompute {rows[-2]['tokens_per_s']:8.1f} tok/s, cached "
                      f"{rows[-1]['tokens_per_s']:8.1f} tok/s ({1 / rows[-1]['ratio']:.1f}x); "
                      f"cache {counted / 2**20:.2f} MiB; max |diff| {err:.1e}", flush=True)
        gen_rows = []
        for n_new in args.kv_generate:
            prompt = torch.randint(args.vocab, (1, PROMPT), generator=torch.Generator().manual_seed(n_new)).to(device)
            outs: dict = {}

            def generate(use_cache, n=n_new, p=prompt, outs=outs):
                outs[use_cache] = decoding.greedy_decode(model, p, n, use_cache=use_cache)

            fns = {"recompute": lambda g=generate: g(False), "cached": lambda g=generate: g(True)}
            times = time_interleaved(fns, device, args.gen_repeats, 1, sample_s=0.0)
            same = bool(torch.equal(outs[False], outs[True]))
            base = min(times["recompute"])
            for name in fns:
                r = timed_row("generate", name, times[name], L=PROMPT + n_new)
                r["ratio"] = r["time_min_ms"] / (base * 1e3)
                r["tokens_per_s"] = n_new * 1e3 / r["time_min_ms"]
                r["same_tokens"] = same
                gen_rows.append(r)
            if not args.silent:
                print(f"generate {n_new:5d} tokens: recompute {gen_rows[-2]['tokens_per_s']:8.1f} tok/s, "
                      f"cached {gen_rows[-1]['tokens_per_s']:8.1f} tok/s ({1 / gen_rows[-1]['ratio']:.1f}x); "
                      f"same tokens: {same}", flush=True)
    rows += gen_rows
    steps = [r for r in rows if r["section"] == "step" and r["name"] == "cached"]
    gens = [r for r in gen_rows if r["name"] == "cached"]
    return {"setup": {"d_model": args.kv_d_model, "n_layers": n_layers, "n_heads": args.kv_heads,
                      "vocab_size": args.vocab, "contexts": args.kv_contexts, "generate": args.kv_generate,
                      "prompt": PROMPT, "batch": 1, "dtype": "float32"},
            "rows": rows,
            "verdict": {"step_speedup_by_context": {r["L"]: round(1 / r["ratio"], 2) for r in steps},
                        "generate_speedup_by_length": {r["L"]: round(1 / r["ratio"], 2) for r in gens},
                        "max_logit_difference": max(r["max_error"] for r in steps),
                        "same_tokens": all(r["same_tokens"] for r in gen_rows),
                        "cache_bytes_per_token_per_layer": 2 * args.kv_d_model * 4}}


# --------------------------------------------------------------------------- speculative


def run_speculative(args, device) -> dict:
    t0 = time.perf_counter()
    if args.quick:
        pair = decoding.train_lm_pair(args.seed, 10, 10, target_kwargs={"d_model": 32, "n_layers": 1, "n_heads": 2},
                                      draft_kwargs={"d_model": 16})
    else:
        pair = decoding.train_lm_pair(args.seed)
    train_s = time.perf_counter() - t0
    target, draft, tok = (pair["target"]["model"].to(device), pair["draft"]["model"].to(device),
                          pair["tokenizer"])
    text = pair["target"]["text"]
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(text) - PROMPT, (args.spec_prompts,), generator=g).tolist()
    prompts = torch.stack([tok.encode(text[s:s + PROMPT]) for s in starts]).to(device)
    with torch.inference_mode():
        sweep = decoding.calls_per_token_sweep(target, draft, prompts, n_new=args.spec_new,
                                               n_drafts=args.n_drafts, seed=args.seed)
    rows = []
    for s in sweep:
        rows.append({"section": "speculative", "name": "calls", "n_draft": s["n_draft"],
                     "calls_per_token": s["calls_per_token"], "predicted": s["predicted"],
                     "alpha": s["alpha"], "draft_calls_per_token": s["draft_calls_per_token"]})
        if not args.silent:
            print(f"speculative n_draft={s['n_draft']}: {s['calls_per_token']:.3f} target calls per token "
                  f"(predicted {s['predicted']:.3f} at cA = {s['alpha']:.2f}), "
                  f"{s['draft_calls_per_token']:.2f} draft calls per token", flush=True)

    # Wall time per token: plain sampling from the target against speculative sampling at each k.
    def plain():
        gen = torch.Generator().manual_seed(args.seed)
        decoding.sample_decode(target, prompts, args.spec_new, generator=gen, use_cache=False)

    fns = {"target_only": plain}
    for k in args.n_drafts:
        def spec(k=k):
            gen = torch.Generator().manual_seed(args.seed)
            decoding.speculative_generate(target, draft, prompts, args.spec_new, k, generator=gen)
        fns[f"speculative_{k}"] = spec
    with torch.inference_mode():
        times = time_interleaved(fns, device, args.gen_repeats, 1, sample_s=0.0)
    base = min(times["target_only"])
    n_tokens = args.spec_new * len(starts)
    for name in fns:
        r = timed_row("speculative", name, times[name], n_draft=None if name == "target_only" else int(name.split("_")[1]))
        r["ratio"] = r["time_min_ms"] / (base * 1e3)
        r["tokens_per_s"] = n_tokens * 1e3 / r["time_min_ms"]
        rows.append(r)
    calls = {r["n_draft"]: r for r in rows if r["name"] == "calls"}
    return {"setup": {"seed": args.seed, "train_seconds": round(train_s, 1), "prompts": len(starts),
                      "prompt": PROMPT, "n_new": args.spec_new, "n_drafts": args.n_drafts,
                      "target_params": sum(p.numel() for p in target.parameters()),
                      "draft_params": sum(p.numel() for p in draft.parameters()),
                      "sampling": "T = 1, no top-k or top-p", "vocab_size": tok.vocab_size},
            "rows": rows,
            "verdict": {"calls_per_token": {k: round(r["calls_per_token"], 3) for k, r in calls.items()},
                        "max_over_prediction": max(r["calls_per_token"] / r["predicted"] for r in calls.values()),
                        "time_ratio_vs_target_only": {r["n_draft"]: round(r["ratio"], 2) for r in rows
                                                      if r["name"].startswith("speculative_")}}}


# --------------------------------------------------------------------------- report


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["step", "generate"] if "kvcache" in report else []) + (["speculative"] if "speculative" in report else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name in ("step", "generate"):
            rows = [r for r in report["kvcache"]["rows"] if r["section"] == name]
            for contender, style in (("recompute", "s--"), ("cached", "o-")):
                pts = [(r["L"], r["tokens_per_s"]) for r in rows if r["name"] == contender]
                ax.plot(*zip(*pts, strict=True), style, label=contender)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens of context" if name == "step" else "tokens in the sequence at the end")
            ax.set_ylabel("tokens per second")
            ax.set_title("the next token" if name == "step" else "a whole greedy generation")
            ax.legend(fontsize=8)
        else:
            rows = [r for r in report["speculative"]["rows"] if r["name"] == "calls"]
            ks = [r["n_draft"] for r in rows]
            ax.plot(ks, [r["calls_per_token"] for r in rows], "o-", label="measured")
            ax.plot(ks, [r["predicted"] for r in rows], "k:", label="Leviathan et al. eq. 1 at measured $\\mathcal{A}$")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("draft length $n_\\mathrm{draft}$")
            ax.set_ylabel("target calls per token")
            ax.set_ylim(0, 1.1)
            ax.set_title("speculative sampling")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(report: dict) -> str:
    lines = []
    for name in ("kvcache", "speculative"):
        if name not in report:
            continue
        lines.append(f"\n[{name}] " + json.dumps(report[name]["setup"]))
        for r in report[name]["rows"]:
            if r["name"] == "calls":
                lines.append(f"  calls n_draft={r['n_draft']}: {r['calls_per_token']:.3f} per token "
                             f"(predicted {r['predicted']:.3f}, cA {r['alpha']:.3f})")
                continue
            extra = "" if r.get("max_error") is None else f"  err {r['max_error']:.1e}"
            if r.get("bytes"):
                extra += f"  bytes {r['bytes']}"
            lines.append(f"  {r['section']:11s} {r['name']:16s} L={r.get('L')} {r['time_ms']:10.3f} ms  "
                         f"{r['tokens_per_s']:9.1f} tok/s  ratio {r['ratio']:.3f}{extra}")
        lines.append("  verdict: " + json.dumps(report[name]["verdict"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lecture 13: KV cache against recomputation, speculative decoding.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: transformer_lab.device())")
    p.add_argument("--sections", nargs="+", default=["kvcache", "speculative"], choices=("kvcache", "speculative"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gen-repeats", type=int, default=3, help="repeats of the whole-generation timings")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--vocab", type=int, default=96)
    p.add_argument("--kv-d-model", type=int, default=256)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--kv-layers", type=int, default=4)
    p.add_argument("--kv-contexts", type=int, nargs="+", default=[64, 256, 1024, 2048])
    p.add_argument("--kv-generate", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-prompts", type=int, default=8)
    p.add_argument("--spec-new", type=int, default=64)
    p.add_argument("--n-drafts", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
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
        args.repeats, args.gen_repeats, args.sample_ms = 2, 1, 1.0
        args.kv_d_model, args.kv_heads, args.kv_layers = 32, 2, 2
        args.kv_contexts, args.kv_generate = [8, 32], [8, 16]
        args.spec_prompts, args.spec_new, args.n_drafts = 2, 8, [1, 3]
    device = torch.device(args.device) if args.device else transformer_lab.device()
    out = args.out or (HERE / ("_work" if args.quick else "results"))
    report = {}
    load_before, t0 = load_average(), time.perf_counter()
    runners = {"kvcache": run_kvcache, "speculative": run_speculative}
    for name in args.sections:
        report[name] = runners[name](args, device)
        sync(device)
        if not args.silent:
            print(summary({name: report[name]}), flush=True)
    report["setup"] = run_setup(device, args, t0, load_before, threads=torch.get_num_threads())
    rows = [r for name in ("kvcache", "speculative") if name in report for r in report[name]["rows"]]
    paths = write_report(report, out, "decoding", CSV_FIELDS, rows, None if args.no_plot else plot,
                         number=lambda v: v if math.isinf(v) else float(f"{v:.4g}"))
    if not args.silent:
        print("\nwrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
