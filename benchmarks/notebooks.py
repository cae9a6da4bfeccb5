"""Wall time of every lecture notebook, executed top to bottom with nbclient.

    .venv/bin/python benchmarks/notebooks.py                    # solutions/ and course/, both modes
    .venv/bin/python benchmarks/notebooks.py --which solutions --mode grading
    .venv/bin/python benchmarks/notebooks.py --notebooks path/to/a.ipynb ...

For each notebook in ``solutions/NN_topic/`` (instructor version) and ``course/NN_topic/``
(learner version), in normal mode and in grading mode (``TRANSFORMER_LAB_GRADING=1``, which the
autograder sets: claim checks, sweeps and widgets shrink), the notebook runs in a fresh kernel
from its own folder, and the benchmark records the wall time from kernel start to the last cell
(``seconds``), the time inside cells (``cell_seconds``), the slowest cells, and the cells that
raised. Learner notebooks are run with errors allowed: their exercise stubs raise
``NotImplementedError`` and the test cells after them fail, by design; those cells are counted
(``errors``) and the run goes on. An instructor notebook that raises is reported as failed.

Writes ``benchmarks/results/notebooks.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the autograder package, from a checkout without installing
from autograder import kernel_wakeup  # noqa: E402

kernel_wakeup.install()  # nbclient's wait for a cell's reply cannot stall (see the module)
GRADING_ENV = "TRANSFORMER_LAB_GRADING"
LECTURE_DIR = re.compile(r"^\d{2}_[A-Za-z0-9_]+$")


def find_notebooks(folder: Path) -> list[Path]:
    """``folder/NN_topic/NN_topic.ipynb`` for every lecture folder, sorted."""
    if not folder.is_dir():
        return []
    return [
        d / f"{d.name}.ipynb"
        for d in sorted(folder.iterdir())
        if d.is_dir() and LECTURE_DIR.match(d.name) and (d / f"{d.name}.ipynb").is_file()
    ]


def _parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()[:70]
    return source.strip()[:70]


def run_notebook(path: Path, grading: bool, allow_errors: bool, timeout: int) -> dict:
    """Execute one notebook in a fresh kernel; return its timings."""
    nb = nbformat.read(path, as_version=4)
    saved = os.environ.get(GRADING_ENV)
    if grading:
        os.environ[GRADING_ENV] = "1"
    else:
        os.environ.pop(GRADING_ENV, None)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=allow_errors,
        record_timing=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    failed = None
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else "error"
    except Exception as exc:  # a timeout or a dead kernel: report it, go on with the next
        failed = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        seconds = time.perf_counter() - t0
        if saved is None:
            os.environ.pop(GRADING_ENV, None)
        else:
            os.environ[GRADING_ENV] = saved

    cells = []
    errors = 0
    unexpected = []  # cells that raised but are neither an exercise nor its test
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        timing = cell.metadata.get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        dt = None
        if start and end:
            dt = (_parse_time(end) - _parse_time(start)).total_seconds()
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            errors += 1
            nbgrader = cell.metadata.get("nbgrader", {})
            if not (nbgrader.get("grade") or nbgrader.get("solution")):
                unexpected.append(i)
        cells.append({"index": i, "seconds": dt, "first_line": first_line(cell.source)})
    timed = [c for c in cells if c["seconds"] is not None]
    return {
        "seconds": round(seconds, 2),
        "cell_seconds": round(sum(c["seconds"] for c in timed), 2),
        "code_cells": len(cells),
        "errors": errors,
        "errors_outside_exercises": unexpected,
        "failed": failed,
        "slowest_cells": [
            {**c, "seconds": round(c["seconds"], 2)}
            for c in sorted(timed, key=lambda c: -c["seconds"])[:3]
        ],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| notebook | mode | wall (s) | in cells (s) | cells | errors | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = "ok" if not r["failed"] else f"FAILED: {r['failed'][:60]}"
        if r["errors_outside_exercises"]:
            status += f"; cells {r['errors_outside_exercises']} raised outside the exercises"
        lines.append(
            f"| {r['notebook']} | {r['mode']} | {r['seconds']:.1f} | {r['cell_seconds']:.1f} | "
            f"{r['code_cells']} | {r['errors']} | {status} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Wall time of each lecture notebook (nbclient).")
    p.add_argument("--which", choices=("solutions", "course", "both"), default="both")
    p.add_argument("--mode", choices=("normal", "grading", "both"), default="both")
    p.add_argument("--notebooks", type=Path, nargs="*", default=None,
                   help="run these notebooks instead (treated as learner notebooks: errors allowed)")
    p.add_argument("--solutions", type=Path, default=ROOT / "solutions", help="instructor notebooks")
    p.add_argument("--course", type=Path, default=ROOT / "course",
                   help="learner notebooks (default course/; e.g. a fresh `autograder --course DIR release`)")
    p.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    p.add_argument("--out", type=Path, default=HERE / "results" / "notebooks.json")
    args = p.parse_args(argv)

    jobs: list[tuple[str, Path, bool]] = []  # (kind, path, allow_errors)
    if args.notebooks:
        jobs = [("given", nb.resolve(), True) for nb in args.notebooks]
    else:
        if args.which in ("solutions", "both"):
            jobs += [("solutions", nb, False) for nb in find_notebooks(args.solutions)]
        if args.which in ("course", "both"):
            jobs += [("course", nb, True) for nb in find_notebooks(args.course)]
    if not jobs:
        print("no notebooks found (solutions/NN_topic/NN_topic.ipynb, course/...)", file=sys.stderr)
        return 2
    modes = ["normal", "grading"] if args.mode == "both" else [args.mode]

    rows = []
    t0 = time.perf_counter()
    for kind, path, allow_errors in jobs:
        for mode in modes:
            name = f"{kind}/{path.stem}" if kind != "given" else str(path)
            print(f"running {name} ({mode}) ...", flush=True)
            result = run_notebook(path, mode == "grading", allow_errors, args.timeout)
            rows.append({"notebook": name, "kind": kind, "mode": mode, "path": str(path), **result})
            print(f"  {result['seconds']:.1f} s, {result['errors']} error cell(s)"
                  + (f", FAILED: {result['failed']}" if result["failed"] else ""), flush=True)

    report = {
        "setup": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "timeout_per_cell_s": args.timeout,
            "solutions": str(args.solutions.resolve()),
            "course": str(args.course.resolve()),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "what": "wall time of one top-to-bottom run in a fresh kernel (includes kernel start), "
                    "normal mode and grading mode (TRANSFORMER_LAB_GRADING=1)",
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(rows))
    print(f"\nwrote {args.out}")
    failed = [r["notebook"] for r in rows
              if (r["failed"] and r["kind"] == "solutions") or r["errors_outside_exercises"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
