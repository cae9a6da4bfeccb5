"""Inference-time benchmarks of lectures 09 and 10: memory, retrieval and early exit.

    .venv/bin/python benchmarks/inference.py            # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/inference.py --quick    # smoke run (seconds), writes benchmarks/_work/
    .venv/bin/python benchmarks/inference.py --sections knn --device cuda
    .venv/bin/python benchmarks/inference.py --show benchmarks/results/inference.json

Three sections, each timed round-robin (``attention.time_interleaved``: one sample of every
contender, then the next round, so load changes on a shared machine hit all alike), every time
also given as a ratio to the section's baseline measured in the same run:

``xl`` (lecture 09): evaluating a long token sequence with a Transformer-XL language model.
    (model ``memory.XLLM``, relative positions "xl")
    cached     ``memory.eval_with_cache``: segment after segment, each attending to the cached
               hidden states of the previous one (every token is processed once per layer)
    sliding    ``memory.eval_sliding_window``: every token predicted from the ``--xl-context``
               tokens before it, recomputed from scratch (the vanilla model's evaluation): **the
               baseline**
    Reported: tokens per second and their ratio (cached / sliding). The model is untrained (speed
    does not depend on the weights); the JSON also has both evaluations' mean NLL.

``knn`` (lecture 09): nearest-neighbour search in a datastore of ``--knn-keys`` clustered keys
    (kNN-LM's and the Memorizing Transformer's lookup), ``--knn-queries`` queries, top ``--knn-k``.
    torch        ``retrieval.make_index("torch")``: exact, chunked matrix product + top-k: **the baseline**
    faiss_flat   ``make_index("faiss-flat")``: exact, faiss's brute force
    faiss_ivf_P  ``make_index("faiss-ivf", n_lists=..., n_probe=P)``: approximate, P of the lists
    Reported: queries per second, ratio to torch, and recall@k against the exact search.

``exit`` (lecture 10): per-token early exit in a small multi-exit language model trained for a
    few seconds on the offline character corpus (``adaptive``'s early-exit model), with the
    threshold calibrated by Learn-then-Test on held-out text.
    full       every token through every layer: **the baseline**
    early_exit ``adaptive.early_exit_forward`` at the calibrated threshold
    Reported: the fraction of layers used, the agreement of the next-token prediction with the
    full model, and the time ratio (on a CPU, per-token exits save little wall time in a batched
    forward: the saving is counted in layers; said in benchmarks/README.md).

Outputs in ``--out``: ``inference.json`` (set-up, every sample, the verdicts), ``inference.csv``
(one row per section and contender) and ``inference.png``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))

from attention import load_average, run_setup, sync, time_interleaved, write_report  # noqa: E402
from attention import timed_row as shared_timed_row  # noqa: E402

import transformer_lab  # noqa: E402
from transformer_lab import adaptive, memory, retrieval  # noqa: E402
from transformer_lab.models import ModelConfig  # noqa: E402

CSV_FIELDS = ["section", "name", "time_ms", "time_min_ms", "per_second", "ratio", "recall",
              "layers_fraction", "agreement"]


def timed_row(section: str, name: str, samples: list[float], items: int, **extra) -> dict:
    """``attention.timed_row`` and ``items`` (tokens, queries) per second at the median."""
    return shared_timed_row(section, name, samples, per_second=items / statistics.median(samples), **extra)


# --------------------------------------------------------------------------- xl


def run_xl(args, device) -> dict:
    """Cached segment recurrence against sliding-window recomputation, same model, same tokens."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.xl_vocab, d_model=args.xl_d_model, n_heads=args.xl_heads,
                         n_layers=args.xl_layers, positions="xl", max_len=args.xl_seg + args.xl_mem)
    model = memory.XLLM(config, mem_len=args.xl_mem).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(args.xl_vocab, (args.xl_tokens,), generator=g).to(device)
    with torch.inference_mode():
        fns = {
            "sliding": lambda: memory.eval_sliding_window(model, ids, args.xl_context),
            "cached": lambda: memory.eval_with_cache(model, ids, args.xl_seg),
        }
        nll = {name: fn() for name, fn in fns.items()}
        n_tokens = {name: int(v.numel()) for name, v in nll.items()}
        times = time_interleaved(fns, device, args.repeats, 0, sample_s=0.0)
    rows = []
    for name in fns:
        rows.append(timed_row("xl", name, times[name], n_tokens[name], tokens=n_tokens[name],
                              mean_nll=float(nll[name].float().mean())))
    base = rows[0]["per_second"]
    for r in rows:
        r["ratio"] = r["per_second"] / base  # throughput relative to sliding-window evaluation
    setup = {"vocab_size": args.xl_vocab, "d_model": args.xl_d_model, "n_heads": args.xl_heads,
             "n_layers": args.xl_layers, "seg_len": args.xl_seg, "mem_len": args.xl_mem,
             "sliding_context": args.xl_context, "tokens": args.xl_tokens}
    return {"setup": setup, "rows": rows,
            "verdict": {"cached_speedup": rows[1]["ratio"]}}


# --------------------------------------------------------------------------- knn


def clustered_keys(n: int, dim: int, n_clusters: int, g: torch.Generator) -> torch.Tensor:
    """Keys around ``n_clusters`` random centres: a datastore of context vectors is clustered
    (similar contexts), and on uniform random data every index, IVF included, looks bad."""
    centres = torch.randn(n_clusters, dim, generator=g) * 2.0
    which = torch.randint(n_clusters, (n,), generator=g)
    return centres[which] + torch.randn(n, dim, generator=g) * 0.5


def run_knn(args, device) -> dict:
    g = torch.Generator().manual_seed(2)
    n_clusters = max(8, args.knn_keys // 500)
    keys = clustered_keys(args.knn_keys, args.knn_dim, n_clusters, g)
    queries = clustered_keys(args.knn_queries, args.knn_dim, n_clusters, g)
    indexes = {"torch": retrieval.make_index("torch", args.knn_dim)}
    indexes["faiss_flat"] = retrieval.make_index("faiss-flat", args.knn_dim)
    for p in args.knn_probes:
        indexes[f"faiss_ivf_{p}"] = retrieval.make_index("faiss-ivf", args.knn_dim,
                                                          n_lists=args.knn_lists, n_probe=p)
    build = {}
    for name, index in indexes.items():
        t0 = time.perf_counter()
        index.add(keys.to(device) if name == "torch" else keys)
        build[name] = time.perf_counter() - t0
    q_torch = queries.to(device)
    fns = {name: (lambda ix=ix, q=(q_torch if name == "torch" else queries): ix.search(q, args.knn_k))
           for name, ix in indexes.items()}
    found = {name: fn()[1].cpu() for name, fn in fns.items()}
    exact = found["torch"]
    times = time_interleaved(fns, device, args.repeats, 1, sample_s=args.sample_ms / 1e3)
    rows = []
    for name in fns:
        rows.append(timed_row("knn", name, times[name], args.knn_queries,
                              recall=retrieval.recall_at_k(found[name], exact),
                              build_s=round(build[name], 4)))
    base = rows[0]["time_ms"]
    for r in rows:
        r["ratio"] = r["time_ms"] / base  # time relative to the exact torch search
    setup = {"keys": args.knn_keys, "dim": args.knn_dim, "clusters": n_clusters,
             "queries": args.knn_queries, "k": args.knn_k, "n_lists": args.knn_lists,
             "n_probes": args.knn_probes, "metric": "squared L2",
             "faiss_threads": _faiss_threads()}
    ivf = [r for r in rows if r["name"].startswith("faiss_ivf")]
    return {"setup": setup, "rows": rows,
            "verdict": {"flat_recall": rows[1]["recall"],
                        "ivf": {r["name"]: {"recall": r["recall"], "speedup": 1 / r["ratio"]}
                                for r in ivf}}}


def _faiss_threads():
    try:
        import faiss
        return faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover - faiss is a dependency
        return None


# --------------------------------------------------------------------------- exit


def run_exit(args, device) -> dict:
    """Train a small multi-exit LM on the offline corpus, calibrate its exit threshold with
    Learn-then-Test on held-out windows, then sweep thresholds and time the calibrated one."""
    from transformer_lab.data import CharTokenizer, char_corpus, lm_batches

    text = char_corpus(max_chars=120_000, seed=3)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cut = int(len(ids) * 0.8)
    train_ids, held = ids[:cut], ids[cut:]
    L = args.exit_len
    torch.manual_seed(0)
    model = adaptive.EarlyExitLM(tok.vocab_size, d_model=args.exit_d_model, n_heads=4,
                                 n_layers=args.exit_layers, max_len=L).to(device)
    get_batch = lm_batches(train_ids, L, 32, generator=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.exit_steps):
        x, y = get_batch()
        loss = model.exit_loss(x.to(device), y.to(device))  # every exit trained (Elbayad et al.)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()

    def windows(seq, n, seed):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(seq) - L, (n,), generator=g)
        return torch.stack([seq[s:s + L] for s in starts.tolist()]).to(device)

    half = len(held) // 2  # calibration and test windows from disjoint halves of the held-out text
    calib, test = windows(held[:half], args.exit_windows, 1), windows(held[half:], args.exit_windows, 2)
    tolerance, failure = args.exit_tolerance, 0.1
    with torch.no_grad():
        lam = adaptive.calibrate_threshold(model, calib, tolerance, failure,
                                           generator=torch.Generator().manual_seed(3))
        full_pred = model(test)[-1].argmax(-1)
        curve = []
        for t in sorted({round(1 - 0.1 * i, 2) for i in range(11)} | {lam}, reverse=True):
            logits, used = adaptive.early_exit_forward(model, test, t)
            curve.append({"threshold": t, "layers_fraction": float(used.float().mean()) / model.n_layers,
                          "agreement": float((logits.argmax(-1) == full_pred).float().mean())})
        fns = {"full": lambda: model(test)[-1], "early_exit": lambda: adaptive.early_exit_forward(model, test, lam)}
        times = time_interleaved(fns, device, args.repeats, 1, sample_s=args.sample_ms / 1e3)
    at = next(c for c in curve if c["threshold"] == lam)
    rows = []
    for name in fns:
        point = at if name == "early_exit" else {"layers_fraction": 1.0, "agreement": 1.0}
        rows.append(timed_row("exit", name, times[name], test.numel(), **point))
    for r in rows:
        r["ratio"] = r["time_ms"] / rows[0]["time_ms"]  # time relative to the full model
    setup = {"n_layers": args.exit_layers, "d_model": args.exit_d_model, "seq_len": L,
             "train_steps": args.exit_steps, "train_s": round(train_s, 1), "vocab_size": tok.vocab_size,
             "windows": args.exit_windows, "tolerance_xi": tolerance, "failure_prob_upsilon": failure,
             "measure": "softmax margin", "calibration": "Learn-then-Test, binomial, one token per window"}
    return {"setup": setup, "rows": rows, "curve": curve,
            "verdict": {"threshold": lam, "layers_fraction": at["layers_fraction"],
                        "layers_saved": 1 - at["layers_fraction"], "agreement": at["agreement"],
                        "within_tolerance": at["agreement"] >= 1 - tolerance}}


# --------------------------------------------------------------------------- outputs


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("xl", "knn", "exit") if s in report]
    fig, axes = plt.subplots(1, len(sections), figsize=(4.6 * len(sections), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sections, strict=True):
        rows = report[name]["rows"]
        if name == "xl":
            ax.bar([r["name"] for r in rows], [r["per_second"] for r in rows], color=["gray", "tab:blue"])
            ax.set_ylabel("tokens per second")
            ax.set_title(f"Transformer-XL evaluation: cache {rows[1]['ratio']:.1f}x")
        elif name == "knn":
            for r in rows:
                ax.scatter(r["recall"], r["per_second"], s=40)
                ax.annotate(r["name"], (r["recall"], r["per_second"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel("recall@k against exact search")
            ax.set_ylabel("queries per second")
            ax.set_title("kNN search: exact vs faiss")
        else:
            curve = report[name].get("curve", [])
            if curve:
                ax.plot([c["layers_fraction"] for c in curve], [c["agreement"] for c in curve], "o-")
            cal = report[name]["verdict"]
            ax.scatter([cal["layers_fraction"]], [cal["agreement"]], color="red", zorder=3,
                       label="calibrated threshold")
            ax.set_xlabel("fraction of layers used")
            ax.set_ylabel("agreement with the full model")
            ax.set_title("early exit")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(report: dict) -> str:
    lines = []
    for name in ("xl", "knn", "exit"):
        if name not in report:
            continue
        lines.append(f"\n[{name}] " + json.dumps(report[name]["setup"]))
        for r in report[name]["rows"]:
            extra = ""
            if r.get("recall") is not None:
                extra += f"  recall {r['recall']:.3f}"
            if r.get("layers_fraction") is not None:
                extra += f"  layers {r['layers_fraction']:.3f}  agreement {r['agreement']:.3f}"
            lines.append(f"  {r['name']:14s} {r['time_ms']:10.3f} ms  {r['per_second']:12.1f}/s"
                         f"  ratio {r['ratio']:.3f}{extra}")
        lines.append("  verdict: " + json.dumps(report[name]["verdict"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lectures 09-10 at inference: XL cache, kNN search, early exit.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: transformer_lab.device())")
    p.add_argument("--sections", nargs="+", default=["xl", "knn", "exit"], choices=("xl", "knn", "exit"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--xl-vocab", type=int, default=256)
    p.add_argument("--xl-d-model", type=int, default=128)
    p.add_argument("--xl-heads", type=int, default=4)
    p.add_argument("--xl-layers", type=int, default=4)
    p.add_argument("--xl-seg", type=int, default=128)
    p.add_argument("--xl-mem", type=int, default=128)
    p.add_argument("--xl-context", type=int, default=128,
                   help="the sliding window's context (default: the XL memory length)")
    p.add_argument("--xl-tokens", type=int, default=512)
    p.add_argument("--knn-keys", type=int, default=200_000)
    p.add_argument("--knn-dim", type=int, default=64)
    p.add_argument("--knn-queries", type=int, default=1000)
    p.add_argument("--knn-k", type=int, default=8)
    p.add_argument("--knn-lists", type=int, default=1024)
    p.add_argument("--knn-probes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--exit-steps", type=int, default=600)
    p.add_argument("--exit-layers", type=int, default=6)
    p.add_argument("--exit-d-model", type=int, default=64)
    p.add_argument("--exit-len", type=int, default=64)
    p.add_argument("--exit-windows", type=int, default=400)
    p.add_argument("--exit-tolerance", type=float, default=0.05)
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
        args.repeats, args.sample_ms, args.threads = 2, 1.0, args.threads or 1
        args.xl_d_model, args.xl_heads, args.xl_layers, args.xl_seg, args.xl_mem = 32, 2, 2, 16, 16
        args.xl_context, args.xl_tokens, args.xl_vocab = 16, 64, 32
        args.knn_keys, args.knn_dim, args.knn_queries, args.knn_lists = 2000, 16, 50, 16
        args.knn_probes, args.exit_steps = [1, 16], 20
        args.exit_layers, args.exit_d_model, args.exit_len, args.exit_windows = 2, 16, 16, 40
    device = torch.device(args.device) if args.device else transformer_lab.device()
    out = args.out or (HERE / ("_work" if args.quick else "results"))
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {}
    load_before, t0 = load_average(), time.perf_counter()
    try:
        runners = {"xl": run_xl, "knn": run_knn, "exit": run_exit}
        for name in args.sections:
            report[name] = runners[name](args, device)
            sync(device)
            if not args.silent:
                print(summary({name: report[name]}), flush=True)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    report["setup"] = run_setup(device, args, t0, load_before, threads=args.threads or threads_before)
    rows = [r for name in ("xl", "knn", "exit") if name in report for r in report[name]["rows"]]
    paths = write_report(report, out, "inference", CSV_FIELDS, rows,
                         None if args.no_plot else plot,
                         number=lambda v: v if math.isinf(v) else round(v, 4))
    if not args.silent:
        print("\nwrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
