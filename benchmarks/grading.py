"""How long the autograder takes: per submission, per lecture, and for a whole class.

    .venv/bin/python benchmarks/grading.py                  # every lecture + a class of 60 (~15 min)
    .venv/bin/python benchmarks/grading.py --quick          # 2 per lecture, a class of 4 (~2 min)
    .venv/bin/python benchmarks/grading.py --class-size 60 --class-lecture 02_transformer_block
    .venv/bin/python benchmarks/grading.py --snapshot       # grade with the committed grader (git HEAD)
    .venv/bin/python benchmarks/grading.py --baseline 160ec5f --skip class breakdown notebooks
                                                            # before/after: another commit's grader, side by side
    .venv/bin/python benchmarks/grading.py --show benchmarks/results/grading.json
    .venv/bin/python benchmarks/grading.py --cluster        # a class of 60: one machine vs a Dask cluster
    .venv/bin/python benchmarks/grading.py --cluster --quick --class-size 12

What it does
------------
1. **A synthetic class.** For each lecture, copies of the instructor notebook
   (``solutions/NN_topic/NN_topic.ipynb``) in the flat layout ``<student>/<NN_topic>.ipynb``,
   with variants in a fixed pattern: ``solution`` (full marks), ``wrong`` (the first
   exercise's solution region replaced by ``return None``: loses that exercise's points) and
   ``blank`` (every solution region replaced by nbgrader's stub ``raise NotImplementedError()``:
   scores 0, as an untouched learner notebook). The expected score of each is computed from
   the notebook's test cells and checked against the grader's CSV (a fast grader that grades
   wrongly is no use).
2. **Per lecture**: ``python -m autograder grade SUBS --lecture NN_topic`` on ``--per-lecture``
   submissions (default 6), with ``--workers`` when the command has that flag (default: its own
   default, one per core). Per submission, the time from the worker's ``started`` stamp to its
   ``result.json`` (kernel, cells, nbgrader's bookkeeping and the feedback HTML, i.e. everything
   the grader does for that notebook), and nbgrader's ``autograde`` time (``seconds`` in the
   result). Median and p90 per lecture, and the command's wall time per submission
   (throughput: includes the class-wide set-up, ``generate_assignment``, CSV and report).
   With ``--baseline REV`` the same class is also graded by the grader, solutions and
   notebooks of commit ``REV`` (``git archive``; the library is the checkout's), alternating
   baseline and checkout lecture by lecture in one run, and the table puts both side by side:
   wall median per submission and CPU seconds per submission (the command and every process
   it waited for: workers, kernels, the hidden-test runner), with their ratio.
3. **A class**: ``--class-size`` (default 60; 4 with ``--quick``) submissions of one lecture
   (``--class-lecture``, default the first), one command, wall time. The target (issue 4):
   a median <= 10 s of grading per submission per lecture on a 2-core machine, a class of 60 in
   < 10 minutes. The figures are recorded, never asserted.
4. **Where the time goes** (each a median of ``--repeats`` fresh processes): Python start,
   ``import torch``, ``import transformer_lab, torch``, the lectures' setup imports, the import
   of nbgrader's API (paid once per worker process); a Jupyter kernel's start to ready, and its
   shutdown after torch is loaded, graceful (nbclient's default) vs immediate; the HTML export
   that ``generate_feedback`` does (nbconvert, warm); and every lecture run top to bottom in
   grading mode (``TRANSFORMER_LAB_GRADING=1``) with per-cell times, so the authors see their
   hot spots.
5. **On a Dask cluster** (``--cluster``, alone): a class of ``--class-size`` (60; 12 with
   ``--quick``) graded on this machine with ``--workers 2``, then on a ``LocalCluster`` of 2
   worker processes of one thread each through ``--scheduler``: wall and CPU of each (the
   cluster's CPU: its workers with every grader and kernel they ran, the scheduler, the
   command), the scores checked and the two CSVs compared; the ratio is the scheduler's
   overhead. From the cluster's CPU seconds per submission, the projected wall time of
   500 learners x 15 lectures on N workers (one core each). Writes ``grading_dask.json``.

Writes ``benchmarks/results/grading.json`` (``--out``; ``--quick`` writes
``benchmarks/_work/grading.json``) and prints the tables the README shows. The machine is
shared: the load average before and after each step is recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRADING_ENV = "TRANSFORMER_LAB_GRADING"
LECTURE_DIR = re.compile(r"^\d{2}_[A-Za-z0-9_]+$")
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
#: One submission in ten is wrong on exercise 1, one in ten blank; the rest are correct.
PATTERN = ("solution", "wrong", "solution", "solution", "solution",
           "blank", "solution", "solution", "solution", "solution")
SETUP_IMPORTS = (
    "import matplotlib.pyplot, torch, transformer_lab; "
    "from transformer_lab import attention, blocks, data, grading, models, positions, train, viz"
)
TARGET_MEDIAN_S = 10.0
TARGET_CLASS_S = 600.0


# --------------------------------------------------------------------------- helpers
def load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def median(xs):
    return round(statistics.median(xs), 2) if xs else None


def p90(xs):
    if not xs:
        return None
    xs = sorted(xs)
    k = 0.9 * (len(xs) - 1)
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 2)


def tool_env(grading: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if grading:
        env[GRADING_ENV] = "1"
    else:
        env.pop(GRADING_ENV, None)
    return env


def find_lectures(solutions: Path) -> list[str]:
    return sorted(
        d.name for d in solutions.iterdir()
        if d.is_dir() and LECTURE_DIR.match(d.name) and (d / f"{d.name}.ipynb").is_file()
    )


def first_line(source: str) -> str:
    for line in source.splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("%"):
            return s[:72]
    return source.strip()[:72]


# --------------------------------------------------------------------------- the class
def _replace_region(source: str, body: str) -> str:
    """Replace every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region by ``body``
    (indented like the BEGIN line)."""
    out, inside = [], False
    for line in source.split("\n"):
        if BEGIN in line:
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + body)
        elif END in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def make_variant(nb: dict, variant: str) -> dict:
    nb = json.loads(json.dumps(nb))
    answered = [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("solution")
                and c["cell_type"] == "code"]
    targets = {"solution": [], "wrong": answered[:1], "blank": answered}[variant]
    body = "return None  # a wrong answer" if variant == "wrong" else "raise NotImplementedError()"
    for cell in targets:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = _replace_region(src, body)
    return nb


def expected_scores(nb: dict) -> dict[str, float]:
    """Expected total per variant: the points of the graded cells, less the first exercise's
    test (the first graded cell after the first answer cell) for ``wrong``, all for ``blank``."""
    total, first, seen_answer = 0.0, None, False
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution") and cell["cell_type"] == "code":
            seen_answer = True
        if meta.get("grade"):
            pts = float(meta.get("points", 0) or 0)
            total += pts
            if seen_answer and first is None:
                first = pts
    return {"solution": total, "wrong": total - (first or 0.0), "blank": 0.0, "max": total}


def build_class(solutions: Path, lecture: str, n: int, dest: Path, prefix: str) -> dict[str, str]:
    """``dest/<student>/<lecture>.ipynb`` for ``n`` students; returns student -> variant."""
    nb = json.loads((solutions / lecture / f"{lecture}.ipynb").read_text())
    variants = {v: make_variant(nb, v) for v in set(PATTERN)}
    who = {}
    for i in range(n):
        student = f"{prefix}{i:03d}"
        variant = PATTERN[i % len(PATTERN)]
        (dest / student).mkdir(parents=True, exist_ok=True)
        (dest / student / f"{lecture}.ipynb").write_text(json.dumps(variants[variant], indent=1))
        who[student] = variant
    return who


# --------------------------------------------------------------------------- grading runs
def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def grader_flags(grader_root: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "autograder", "grade", "--help"],
        cwd=grader_root, env=tool_env(False), capture_output=True, text=True, timeout=120,
    )
    return out.stdout


def grade_class(grader_root: Path, subs: Path, lecture: str, out: Path, workers: int | None,
                help_text: str, timeout: int, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "autograder", "grade", str(subs), "--lecture", lecture,
           "--out", str(out), *extra]
    if "--workers" in help_text and workers:
        cmd += ["--workers", str(workers)]
    if "--no-progress" in help_text:
        cmd += ["--no-progress"]
    if "--force" in help_text:
        cmd += ["--force"]
    before = load()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=grader_root, env=tool_env(False), capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    return {"cmd": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 2),
            # user + sys seconds of the command and every process it waited for (workers,
            # kernels): what the class costs an idle machine, whatever the load was
            "cpu_s": round(_children_cpu() - cpu0, 2),
            "load_before": before, "load_after": load(),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def collect(out: Path, lecture: str, who: dict[str, str], expected: dict[str, float]) -> dict:
    """Per-submission spans and autograde times from the workspace; scores checked."""
    spans, autograde, per = [], [], []
    work = out / "work" / lecture
    for student in sorted(who):
        root = work / student
        rec = {"student": student, "variant": who[student]}
        try:
            started = float((root / "started").read_text().strip())
            result_path = root / "result.json"
            rec["span_s"] = round(result_path.stat().st_mtime - started, 2)
            spans.append(rec["span_s"])
            result = json.loads(result_path.read_text())
            if result.get("seconds") is not None:
                rec["autograde_s"] = round(float(result["seconds"]), 2)
                autograde.append(rec["autograde_s"])
            rec["status"] = result.get("status")
        except (OSError, ValueError) as exc:
            rec["status"] = f"no timing: {type(exc).__name__}"
        per.append(rec)
    # scores from the CSV
    wrong_scores = []
    csv_path = out / "scores.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            rows = {r["student"]: r for r in csv.DictReader(fh) if r.get("lecture") == lecture}
        for rec in per:
            row = rows.get(rec["student"])
            rec["total"] = float(row["total"]) if row and row.get("total") else None
            if rec["total"] != expected[rec["variant"]]:
                wrong_scores.append(f"{rec['student']} ({rec['variant']}): got {rec['total']}, "
                                    f"expected {expected[rec['variant']]}")
    else:
        wrong_scores.append("no scores.csv written")
    return {
        "n": len(who),
        "span_median_s": median(spans), "span_p90_s": p90(spans),
        "span_max_s": round(max(spans), 2) if spans else None,
        "autograde_median_s": median(autograde), "autograde_p90_s": p90(autograde),
        "scores_as_expected": not wrong_scores, "score_problems": wrong_scores,
        "submissions": per,
    }


# --------------------------------------------------------------------------- breakdown
def time_python(code: str, repeats: int, grading: bool = True) -> dict:
    samples, cpu = [], []
    for _ in range(repeats):
        c0 = _children_cpu()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=tool_env(grading), check=True,
                       capture_output=True, cwd=tempfile.gettempdir())
        samples.append(time.perf_counter() - t0)
        cpu.append(_children_cpu() - c0)
    return {"code": code, "median_s": median(samples), "cpu_median_s": median(cpu),
            "samples_s": [round(s, 3) for s in samples]}


def time_kernel(repeats: int) -> dict:
    """Kernel start to ready; shutdown after ``import torch, transformer_lab``, graceful vs immediate."""
    from jupyter_client.manager import KernelManager

    start, graceful, immediate, imports = [], [], [], []
    for _ in range(repeats):
        for now in (False, True):
            km = KernelManager(kernel_name="python3")
            t0 = time.perf_counter()
            km.start_kernel(extra_arguments=["--HistoryManager.hist_file=:memory:"],
                            env=tool_env(True), cwd=tempfile.gettempdir())
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            start.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            kc.execute_interactive(SETUP_IMPORTS, timeout=120)
            imports.append(time.perf_counter() - t1)
            kc.stop_channels()
            t2 = time.perf_counter()
            km.shutdown_kernel(now=now)
            (immediate if now else graceful).append(time.perf_counter() - t2)
    return {
        "start_to_ready_s": median(start),
        "setup_imports_in_kernel_s": median(imports),
        "shutdown_graceful_s": median(graceful),
        "shutdown_immediate_s": median(immediate),
        "what": "jupyter_client KernelManager (python3, as nbclient starts it); shutdown after "
                "the setup imports; nbclient's default is graceful (shutdown_kernel='graceful')",
    }


def profile_notebook(path: Path, timeout: int) -> dict:
    """Run one notebook top to bottom in grading mode; per-cell seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    saved = os.environ.get(GRADING_ENV)
    os.environ[GRADING_ENV] = "1"
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            record_timing=True, resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        wall = time.perf_counter() - t0
        if saved is None:
            os.environ.pop(GRADING_ENV, None)
        else:
            os.environ[GRADING_ENV] = saved
    cells = []
    from datetime import datetime

    def parse(stamp):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        t = cell.metadata.get("execution", {})
        if t.get("iopub.execute_input") and t.get("shell.execute_reply"):
            dt = (parse(t["shell.execute_reply"]) - parse(t["iopub.execute_input"])).total_seconds()
        else:
            dt = None
        meta = cell.metadata.get("nbgrader", {})
        kind = "test" if meta.get("grade") else "answer" if meta.get("solution") else "other"
        cells.append({"index": i, "seconds": round(dt, 3) if dt is not None else None,
                      "kind": kind, "grade_id": meta.get("grade_id"),
                      "first_line": first_line(cell.source),
                      "error": any(o.get("output_type") == "error" for o in cell.get("outputs", []))})
    timed = [c for c in cells if c["seconds"] is not None]
    in_cells = sum(c["seconds"] for c in timed)
    return {
        "wall_s": round(wall, 2),
        "in_cells_s": round(in_cells, 2),
        "kernel_and_overhead_s": round(wall - in_cells, 2),
        "setup_cell_s": timed[0]["seconds"] if timed else None,
        "tests_s": round(sum(c["seconds"] for c in timed if c["kind"] == "test"), 2),
        "cells_raised": [c["index"] for c in cells if c["error"]],
        "hot_cells": sorted(timed, key=lambda c: -c["seconds"])[:6],
        "cells": cells,
    }


def time_feedback_export(notebook: Path, repeats: int) -> dict | None:
    """nbconvert's HTML export of a graded notebook (what generate_feedback spends most on), warm."""
    if not notebook.is_file():
        return None
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    out = {}
    for template in ("lab", "basic"):
        exporter = HTMLExporter(template_name=template)
        samples, size = [], 0
        for _ in range(repeats + 1):  # the first call loads templates: dropped
            t0 = time.perf_counter()
            html, _ = exporter.from_notebook_node(nb)
            samples.append(time.perf_counter() - t0)
            size = len(html)
        out[template] = {"median_s": median(samples[1:]), "html_kib": round(size / 1024)}
    return out


# --------------------------------------------------------------------------- on a Dask cluster
#: The projection: a course of 500 learners, 15 lectures each.
PROJECT_LEARNERS, PROJECT_LECTURES = 500, 15
PROJECT_WORKERS = (2, 8, 16, 32, 64, 128)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of every child it has waited for (its graders, their kernels)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _self_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cluster_compare(grader_root: Path, lecture: str, n: int, scratch: Path, help_text: str,
                    timeout: int, n_workers: int = 2) -> dict:
    """A class of ``n`` graded on this machine (``--workers n_workers``), then on a LocalCluster of
    ``n_workers`` worker processes of one thread each (``--scheduler``): the scheduler's overhead.
    The cluster's CPU is its workers' (with every grader and kernel they ran) plus the command's
    and this process's (scheduler and nannies), measured as deltas."""
    from distributed import Client, LocalCluster

    sols = grader_root / "solutions"
    subs = scratch / "subs_dask"
    who = build_class(sols, lecture, n, subs, "d")
    expected = expected_scores(json.loads((sols / lecture / f"{lecture}.ipynb").read_text()))
    print(f"grading a class of {n} x {lecture} on this machine, --workers {n_workers} ...", flush=True)
    local = grade_class(grader_root, subs, lecture, scratch / "out_dask_local", n_workers, help_text, timeout)
    local_c = collect(scratch / "out_dask_local", lecture, who, expected)
    print(f"  wall {local['wall_s']} s, CPU {local['cpu_s']} s, scores right: {local_c['scores_as_expected']}",
          flush=True)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc, set_as_default=False) as client:
        pids = client.run(os.getpid)
        before = {a: _tree_cpu(pid) for a, pid in pids.items()}
        self0 = _self_cpu()
        print(f"grading it on a LocalCluster of {n_workers} worker processes ({lc.scheduler_address}) ...",
              flush=True)
        dask_run = grade_class(grader_root, subs, lecture, scratch / "out_dask_cluster", None, help_text,
                               timeout, extra=("--scheduler", lc.scheduler_address))
        after = {a: _tree_cpu(pid) for a, pid in client.run(os.getpid).items() if a in before}
        workers_cpu = sum(after[a] - before[a] for a in after)
        self_cpu = _self_cpu() - self0
    dask_c = collect(scratch / "out_dask_cluster", lecture, who, expected)
    dask_run["workers_cpu_s"] = round(workers_cpu, 2)
    dask_run["scheduler_and_nannies_cpu_s"] = round(self_cpu, 2)
    dask_run["cpu_s"] = round(dask_run["cpu_s"] + workers_cpu + self_cpu, 2)
    same_csv = ((scratch / "out_dask_local" / "scores.csv").read_bytes()
                == (scratch / "out_dask_cluster" / "scores.csv").read_bytes())
    print(f"  wall {dask_run['wall_s']} s, CPU {dask_run['cpu_s']} s, scores right: "
          f"{dask_c['scores_as_expected']}, CSV identical to the local one: {same_csv}", flush=True)
    spans = []
    for student in who:
        try:
            d = json.loads((scratch / "out_dask_cluster" / "work" / lecture / student / "result.json")
                           .read_text()).get("dask") or {}
        except (OSError, ValueError):
            continue
        if d.get("received") and d.get("finished"):
            spans.append(d["finished"] - d["received"])
    cpu_local = local["cpu_s"] / n
    cpu_dask = dask_run["cpu_s"] / n
    total = PROJECT_LEARNERS * PROJECT_LECTURES
    projection = {
        "submissions": total,
        "cpu_s_per_submission_local": round(cpu_local, 2),
        "cpu_s_per_submission_cluster": round(cpu_dask, 2),
        "one_core_hours": round(total * cpu_dask / 3600, 1),
        "wall_hours_on_n_workers": {str(w): round(total * cpu_dask / w / 3600, 2) for w in PROJECT_WORKERS},
        "assumes": (f"every lecture costs what {lecture} costs (measured here, per submission, CPU of "
                    "everything: grader, kernel, hidden tests, feedback, the cluster's share); one "
                    "worker process of one thread per core, each core as fast as this machine's; "
                    "the instructor's side (release, CSV, report) and stragglers not counted"),
    }
    return {
        "lecture": lecture, "n": n, "workers": n_workers,
        "local": {"grade": local, "collect": local_c},
        "cluster": {"grade": dask_run, "collect": dask_c,
                    "task_span_median_s": median(spans), "task_span_p90_s": p90(spans)},
        "csv_identical": same_csv,
        "overhead_wall_ratio": round(dask_run["wall_s"] / local["wall_s"], 3),
        "overhead_cpu_ratio": round(cpu_dask / cpu_local, 3) if cpu_local else None,
        "projection": projection,
    }


def cluster_tables(r: dict) -> str:
    loc, dk = r["local"]["grade"], r["cluster"]["grade"]
    n = r["n"]
    lines = [f"A class of {n} x {r['lecture']}: one machine (`--workers {r['workers']}`) versus a "
             f"LocalCluster of {r['workers']} worker processes x 1 thread (`--scheduler`).", "",
             "| run | wall (s) | wall / n (s) | CPU (s) | CPU / n (s) | scores right | load before → after |",
             "|---|---|---|---|---|---|---|"]
    for name, g, c in (("one machine", loc, r["local"]["collect"]), ("Dask cluster", dk, r["cluster"]["collect"])):
        lines.append(f"| {name} | {g['wall_s']} | {round(g['wall_s'] / n, 2)} | {g['cpu_s']} | "
                     f"{round(g['cpu_s'] / n, 2)} | {'yes' if c.get('scores_as_expected') else 'NO'} | "
                     f"{(g.get('load_before') or ['?'])[0]} → {(g.get('load_after') or ['?'])[0]} |")
    lines += ["", f"Overhead of the scheduler: wall x{r['overhead_wall_ratio']}, CPU x{r['overhead_cpu_ratio']}; "
              f"CSV identical: {r['csv_identical']}.", ""]
    pr = r["projection"]
    lines.append(f"Projection, {pr['submissions']} submissions ({PROJECT_LEARNERS} learners x "
                 f"{PROJECT_LECTURES} lectures) at {pr['cpu_s_per_submission_cluster']} CPU s each: "
                 f"{pr['one_core_hours']} h on one core.")
    lines.append("")
    lines.append("| workers | " + " | ".join(pr["wall_hours_on_n_workers"]) + " |")
    lines.append("|---|" + "---|" * len(pr["wall_hours_on_n_workers"]))
    lines.append("| wall (h) | " + " | ".join(str(v) for v in pr["wall_hours_on_n_workers"].values()) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables
def tables(report: dict) -> str:
    if "cluster" in report:  # --cluster: only the comparison with a Dask cluster
        return cluster_tables(report["cluster"])
    lines = []
    s = report["setup"]
    w = s.get("workers") or "default"
    lines.append(f"Per lecture: {s['per_lecture']} submissions each, workers={w}; "
                 f"span = one submission from the worker's start stamp to its result "
                 f"(kernel, cells, nbgrader bookkeeping, feedback HTML).")
    lines.append("")
    lines.append("| lecture | n | span median (s) | span p90 (s) | autograde median (s) | "
                 "command wall / n (s) | CPU / n (s) | scores right | load before → after |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for lec, r in report.get("lectures", {}).items():
        g = r.get("grade", {})
        c = r.get("collect", {})
        per = round(g["wall_s"] / c["n"], 2) if c.get("n") and g.get("wall_s") else None
        cpu = round(g["cpu_s"] / c["n"], 2) if c.get("n") and g.get("cpu_s") else None
        lines.append(f"| {lec} | {c.get('n')} | {c.get('span_median_s')} | {c.get('span_p90_s')} | "
                     f"{c.get('autograde_median_s')} | {per} | {cpu} | "
                     f"{'yes' if c.get('scores_as_expected') else 'NO'} | "
                     f"{g.get('load_before', ['?'])[0]} → {g.get('load_after', ['?'])[0]} |")
    base = report.get("lectures_baseline")
    if base:
        lines.append("")
        lines.append(f"Before/after, in one run: the grader of `{s.get('baseline')}` (baseline) and the "
                     f"checkout (`{s.get('commit')}`), the same synthetic class per lecture, alternating.")
        lines.append("")
        lines.append("| lecture | n | span median before → after (s) | CPU / submission before → after (s) | "
                     "CPU ratio | scores right |")
        lines.append("|---|---|---|---|---|---|")
        for lec, after in report.get("lectures", {}).items():
            before = base.get(lec)
            if not before:
                continue
            n = after["collect"]["n"]
            cb, ca = before["grade"]["cpu_s"] / n, after["grade"]["cpu_s"] / n
            ok = before["collect"]["scores_as_expected"] and after["collect"]["scores_as_expected"]
            lines.append(f"| {lec} | {n} | {before['collect']['span_median_s']} → {after['collect']['span_median_s']} | "
                         f"{cb:.2f} → {ca:.2f} | {ca / cb:.2f}x | {'yes' if ok else 'NO'} |")
    cb, cl = report.get("class_baseline"), report.get("class")
    if cb and cl:
        n = cl["collect"]["n"]
        before, after = cb["grade"]["cpu_s"] / n, cl["grade"]["cpu_s"] / n
        lines.append("")
        lines.append(f"Class of {n} × {cl['lecture']}, before → after: wall {cb['grade']['wall_s']} → "
                     f"{cl['grade']['wall_s']} s, span median {cb['collect']['span_median_s']} → "
                     f"{cl['collect']['span_median_s']} s, CPU per submission {before:.2f} → {after:.2f} s "
                     f"(**{after / before:.2f}x**).")
    if cl:
        g, c = cl["grade"], cl["collect"]
        ok = "meets" if g["wall_s"] < TARGET_CLASS_S else "misses"
        lines.append("")
        lines.append(f"Class of {c['n']} × {cl['lecture']}: **{g['wall_s'] / 60:.1f} min** "
                     f"({g['wall_s'] / c['n']:.1f} s per submission"
                     + (f", {g['cpu_s'] / c['n']:.1f} CPU s each" if g.get("cpu_s") else "")
                     + f"; span median {c['span_median_s']} s, "
                     f"p90 {c['span_p90_s']} s; scores right: {'yes' if c['scores_as_expected'] else 'NO'}; "
                     f"load {g['load_before'][0]} → {g['load_after'][0]}); "
                     f"target < {TARGET_CLASS_S / 60:.0f} min: {ok}.")
    b = report.get("breakdown")
    if b:
        lines.append("")
        lines.append("| component | seconds (wall) | CPU seconds |")
        lines.append("|---|---|---|")
        for key, val in b.get("imports", {}).items():
            lines.append(f"| `{key}` (fresh process) | {val['median_s']} | {val.get('cpu_median_s', '')} |")
        k = b.get("kernel") or {}
        for key in ("start_to_ready_s", "setup_imports_in_kernel_s", "shutdown_graceful_s",
                    "shutdown_immediate_s"):
            if key in k:
                lines.append(f"| kernel {key.replace('_s', '').replace('_', ' ')} | {k[key]} | |")
        fb = b.get("feedback_html")
        if fb:
            for t, v in fb.items():
                lines.append(f"| feedback HTML export, nbconvert `{t}` template ({v['html_kib']} KiB) | "
                             f"{v['median_s']} | |")
    nbs = report.get("notebooks")
    if nbs:
        lines.append("")
        lines.append("| lecture (grading mode) | wall (s) | in cells (s) | setup cell (s) | "
                     "test cells (s) | hottest cells (s) |")
        lines.append("|---|---|---|---|---|---|")
        for lec, r in nbs.items():
            hot = "; ".join(f"{c['seconds']:.2f} `{c['first_line'][:40]}`" for c in r["hot_cells"][:3])
            lines.append(f"| {lec} | {r['wall_s']} | {r['in_cells_s']} | {r['setup_cell_s']} | "
                         f"{r['tests_s']} | {hot} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def snapshot(dest: Path, rev: str = "HEAD") -> Path:
    """The committed tree of ``rev`` (default git HEAD) in ``dest``: grade with what has landed,
    not with colleagues' uncommitted edits (or with an earlier grader, for a before/after)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Autograder speed: per submission, per lecture, a class.")
    p.add_argument("--quick", action="store_true", help="2 per lecture, a class of 4, 1 repeat")
    p.add_argument("--class-size", type=int, default=None, help="class size (default 60; 4 --quick)")
    p.add_argument("--class-lecture", default=None, help="lecture of the class run (default: first)")
    p.add_argument("--per-lecture", type=int, default=None, help="submissions per lecture (default 6)")
    p.add_argument("--lectures", nargs="*", default=None, help="lectures (default: all in solutions/)")
    p.add_argument("--workers", type=int, default=None,
                   help="--workers for the grader (default: the grader's own default)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of each breakdown timing (3)")
    p.add_argument("--snapshot", action="store_true",
                   help="grade with the committed tree (git archive HEAD) instead of the checkout")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also grade every lecture's class with the grader of commit REV, side by side")
    p.add_argument("--skip", nargs="*", default=[], choices=("lectures", "class", "breakdown", "notebooks"))
    p.add_argument("--cluster", action="store_true",
                   help="only this: a class (--class-size, default 60; 12 with --quick) on one machine with "
                   "--workers 2 (or --workers) versus on a LocalCluster of as many worker processes "
                   "(--scheduler), and the projection for 500 x 15 submissions; writes grading_dask.json")
    p.add_argument("--timeout", type=int, default=3600, help="limit for one grading command (s)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--show", type=Path, default=None, help="print the tables of a results file")
    args = p.parse_args(argv)

    if args.show:
        print(tables(json.loads(args.show.read_text())))
        return 0
    class_size = args.class_size or ((12 if args.cluster else 4) if args.quick else 60)
    per_lecture = args.per_lecture or (2 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 3)
    out_file = args.out or (HERE / ("_work" if args.quick else "results")
                            / ("grading_dask.json" if args.cluster else "grading.json"))
    scratch = Path(tempfile.mkdtemp(prefix="tl_grading_bench_"))
    grader_root = snapshot(scratch / "repo") if args.snapshot else ROOT
    baseline_root = snapshot(scratch / "baseline", args.baseline) if args.baseline else None
    solutions = grader_root / "solutions"
    lectures = args.lectures or find_lectures(solutions)
    class_lecture = args.class_lecture or lectures[0]
    help_text = grader_flags(grader_root)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "autograder", "lib", "solutions"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import torch

    report: dict = {
        "setup": {
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_at_start": load(),
            "commit": commit, "grader": "git HEAD snapshot" if args.snapshot else "checkout",
            "uncommitted_changes_in_checkout": dirty.splitlines() if not args.snapshot else [],
            "baseline": args.baseline,
            "workers": args.workers if "--workers" in help_text else None,
            "grader_has_workers_flag": "--workers" in help_text,
            "per_lecture": per_lecture, "class_size": class_size, "class_lecture": class_lecture,
            "pattern": list(PATTERN), "quick": args.quick,
            "targets": {"median_per_submission_s": TARGET_MEDIAN_S, "class_of_60_s": TARGET_CLASS_S},
        },
    }

    def save():
        report["setup"]["load_at_end"] = load()
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=1))

    t_all = time.perf_counter()
    if args.cluster:
        report["setup"]["workers"] = args.workers or 2
        try:
            report["cluster"] = cluster_compare(grader_root, class_lecture, class_size, scratch, help_text,
                                                args.timeout, n_workers=args.workers or 2)
        finally:
            report["setup"]["total_s"] = round(time.perf_counter() - t_all, 1)
            save()
            c = report.get("cluster") or {}
            if c and all(c[k]["collect"]["scores_as_expected"] for k in ("local", "cluster")):
                shutil.rmtree(scratch, ignore_errors=True)
            else:  # a wrong score: keep both workspaces (grading.log, result.json) to look at
                print(f"kept {scratch} (a score was not as expected)", flush=True)
        print()
        print(tables(report))
        print(f"\nwrote {out_file}")
        return 0
    try:
        if "breakdown" not in args.skip:
            print("breakdown: imports ...", flush=True)
            report["breakdown"] = {"imports": {
                "python -c pass": time_python("pass", repeats),
                "import torch": time_python("import torch", repeats),
                "import transformer_lab, torch": time_python("import transformer_lab, torch", repeats),
                "setup imports (matplotlib, every transformer_lab module)":
                    time_python(SETUP_IMPORTS, repeats),
                "import nbgrader API (once per worker)":
                    time_python("from nbgrader.apps.api import NbGraderAPI", repeats, grading=False),
            }}
            print("breakdown: kernel ...", flush=True)
            report["breakdown"]["kernel"] = time_kernel(repeats)
            save()
        if "notebooks" not in args.skip:
            report["notebooks"] = {}
            for lec in lectures:
                print(f"notebook {lec} (grading mode) ...", flush=True)
                report["notebooks"][lec] = profile_notebook(solutions / lec / f"{lec}.ipynb", 600)
                save()
        if "lectures" not in args.skip:
            report["lectures"] = {}
            if baseline_root is not None:
                report["lectures_baseline"] = {}
            for lec in lectures:
                runs = [("baseline", baseline_root)] if baseline_root is not None else []
                runs.append(("checkout", grader_root))
                for which, root in runs:  # alternating, so a change of load hits both alike
                    sols = root / "solutions"
                    subs = scratch / f"subs_{which}_{lec}"
                    who = build_class(sols, lec, per_lecture, subs, "s")
                    expected = expected_scores(json.loads((sols / lec / f"{lec}.ipynb").read_text()))
                    out = scratch / f"out_{which}_{lec}"
                    print(f"grading {per_lecture} × {lec} ({which}) ...", flush=True)
                    g = grade_class(root, subs, lec, out, args.workers,
                                    help_text if root is grader_root else grader_flags(root), args.timeout)
                    c = collect(out, lec, who, expected)
                    key = "lectures" if which == "checkout" else "lectures_baseline"
                    report[key][lec] = {"grade": g, "collect": c, "expected": expected}
                    print(f"  wall {g['wall_s']} s, span median {c['span_median_s']} s, "
                          f"CPU {g['cpu_s']} s, scores right: {c['scores_as_expected']}", flush=True)
                if "breakdown" not in args.skip and "feedback_html" not in report["breakdown"]:
                    graded = out / "work" / lec / "s000" / "autograded" / "s000" / lec / f"{lec}.ipynb"
                    report["breakdown"]["feedback_html"] = time_feedback_export(graded, repeats)
                save()
        if "class" not in args.skip:
            runs = [("baseline", baseline_root)] if baseline_root is not None else []
            runs.append(("checkout", grader_root))
            for which, root in runs:
                sols = root / "solutions"
                subs = scratch / f"subs_class_{which}"
                who = build_class(sols, class_lecture, class_size, subs, "c")
                expected = expected_scores(
                    json.loads((sols / class_lecture / f"{class_lecture}.ipynb").read_text()))
                out = scratch / f"out_class_{which}"
                print(f"grading a class of {class_size} × {class_lecture} ({which}) ...", flush=True)
                g = grade_class(root, subs, class_lecture, out, args.workers,
                                help_text if root is grader_root else grader_flags(root), args.timeout)
                c = collect(out, class_lecture, who, expected)
                report["class" if which == "checkout" else "class_baseline"] = {
                    "lecture": class_lecture, "grade": g, "collect": c}
                print(f"  wall {g['wall_s']} s ({g['wall_s'] / class_size:.1f} s each), "
                      f"CPU {g['cpu_s']} s, scores right: {c['scores_as_expected']}", flush=True)
    finally:
        report["setup"]["total_s"] = round(time.perf_counter() - t_all, 1)
        save()
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(tables(report))
    print(f"\nwrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
