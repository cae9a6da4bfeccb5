"""The class report: which concept did the class miss?

Written by ``python -m autograder grade`` into ``OUT/report/`` from the whole
workspace (every grade so far, the same rows as ``scores.csv``):

* ``report.md``: per lecture, how many notebooks were graded / could not be graded /
  are missing, mean and median score; the pass rate of every test cell (a cell
  passes when it earns all its points); the test cells that failed most, with the
  part that failed (hidden or visible tests) and the error kind
  (``AssertionError``: a wrong value; ``ReferenceBlocked``: the answer called the
  reference; ``NotImplementedError``: not attempted; ``CellTimeoutError``: too slow);
  and the submissions that could not be graded, with why.
* ``score_distribution.png``: histogram of total scores (percent of the maximum), one panel per lecture.
* ``pass_rates.png``: pass rate per test cell.
* ``summary.json``: the numbers behind the tables (for scripts and tests).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path


def summarise(report) -> dict:
    """The report's numbers from a :class:`autograder.grade.Report`."""
    lectures = {}
    for lec, exercises in report.exercises.items():
        rows = [r for r in report.rows if r.lecture == lec]
        graded = [r for r in rows if r.status == "graded"]
        percents = [100.0 * r.total / r.max if r.max else 0.0 for r in graded]
        cells = []
        for ex in exercises:
            passed = sum(1 for r in graded if r.scores.get(ex.grade_id, 0.0) >= ex.points > 0)
            cells.append(
                {
                    "cell": ex.grade_id,
                    "points": ex.points,
                    "passed": passed,
                    "graded": len(graded),
                    "pass_rate": passed / len(graded) if graded else 0.0,
                }
            )
        fails = Counter()
        example = {}
        for r in graded:
            seen = set()
            for f in r.failures:
                key = (f["cell"], f.get("part", "?"), f["ename"])
                if key not in seen:
                    seen.add(key)
                    fails[key] += 1
                    example.setdefault(key, f.get("evalue", ""))
        most = [
            {"cell": c, "part": p, "error": e, "students": n, "example": example[(c, p, e)]}
            for (c, p, e), n in sorted(fails.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        lectures[lec] = {
            "students": len(rows),
            "graded": len(graded),
            "error": sum(r.status == "error" for r in rows),
            "missing": sum(r.status == "missing" for r in rows),
            "max": sum(e.points for e in exercises),
            "mean_percent": statistics.fmean(percents) if percents else 0.0,
            "median_percent": statistics.median(percents) if percents else 0.0,
            "percents": percents,
            "cells": cells,
            "failed_most": most,
            "not_graded": [
                {"student": r.student, "notes": r.notes} for r in rows if r.status == "error"
            ],
        }
    return {"lectures": lectures}


def _plots(summary: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    lectures = [lec for lec, s in summary["lectures"].items() if s["graded"]]
    if not lectures:
        return []
    names = []
    fig, axes = plt.subplots(1, len(lectures), figsize=(4.5 * len(lectures), 3.2), squeeze=False)
    for ax, lec in zip(axes[0], lectures, strict=True):
        sns.histplot(summary["lectures"][lec]["percents"], bins=list(range(0, 101, 10)), ax=ax)
        ax.set(title=lec, xlabel="score (% of maximum)", ylabel="students", xlim=(0, 100))
    fig.tight_layout()
    fig.savefig(folder / "score_distribution.png", dpi=100)
    plt.close(fig)
    names.append("score_distribution.png")

    cells = [(lec, c) for lec in lectures for c in summary["lectures"][lec]["cells"]]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(cells) + 1.2))
    sns.barplot(
        x=[100 * c["pass_rate"] for _, c in cells],
        y=[f"{lec}: {c['cell']}" for lec, c in cells],
        hue=[lec for lec, _ in cells],
        dodge=False,
        ax=ax,
        legend=False,
    )
    ax.set(xlabel="students passing (%)", ylabel="", xlim=(0, 100), title="pass rate per test cell")
    fig.tight_layout()
    fig.savefig(folder / "pass_rates.png", dpi=100)
    plt.close(fig)
    names.append("pass_rates.png")
    return names


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(report, folder: Path) -> Path:
    """Write ``report.md``, the PNGs and ``summary.json`` into ``folder``; return report.md's path."""
    from .grade import _atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(report)
    images = _plots(summary, folder)
    lines = ["# Class report", ""]
    lines.append(f"{len({r.student for r in report.rows})} student(s); scores in `../scores.csv`.")
    lines.append("")
    for img in images:
        lines += [f"![{img[:-4].replace('_', ' ')}]({img})", ""]
    for lec, s in summary["lectures"].items():
        lines += [
            f"## {lec}",
            "",
            f"graded {s['graded']}, could not be graded {s['error']}, missing {s['missing']}; "
            f"mean {s['mean_percent']:.0f}%, median {s['median_percent']:.0f}% of {s['max']:g} points.",
            "",
            "| test cell | points | passed | pass rate |",
            "|---|---:|---:|---:|",
        ]
        for c in s["cells"]:
            lines.append(
                f"| {c['cell']} | {c['points']:g} | {c['passed']}/{c['graded']} | {100 * c['pass_rate']:.0f}% |"
            )
        lines += ["", "### Tests that failed most", ""]
        if s["failed_most"]:
            lines += ["| test cell | part | error | students | example message |", "|---|---|---|---:|---|"]
            for f in s["failed_most"]:
                lines.append(
                    f"| {f['cell']} | {f['part']} | {f['error']} | {f['students']} | {_md_escape(f['example'])} |"
                )
        else:
            lines.append("No test failed.")
        if s["not_graded"]:
            lines += ["", "### Could not be graded", ""]
            lines += [f"- {e['student']}: {_md_escape(e['notes'])}" for e in s["not_graded"]]
        lines.append("")
    path = folder / "report.md"
    _atomic_write(folder / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(path, "\n".join(lines))
    return path
