"""What a run's fault monitor saw: a timeline of faults and per-rank waits.

Reads ``faults.jsonl`` and ``waits.jsonl`` from a run directory (written by
the aggregator) and prints a timeline; `save_wait_png` draws each rank's
time in communication per step, with the faults marked.
"""
from __future__ import annotations

import json
import math
import os

from .monitor import FAULTS_LOG, WAITS_LOG

_BARS = "▁▂▃▄▅▆▇█"


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n} is not JSON: {exc}") from None
    return out


def load_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(fault entries, per-step wait rows) of a run directory."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} does not exist")
    faults = _read_jsonl(os.path.join(run_dir, FAULTS_LOG))
    waits = _read_jsonl(os.path.join(run_dir, WAITS_LOG))
    if not faults and not waits and not os.path.exists(os.path.join(run_dir, WAITS_LOG)):
        raise ValueError(f"{run_dir!r} has no {FAULTS_LOG} or {WAITS_LOG} (was the fault monitor on?)")
    return faults, waits


def wait_series(waits: list[dict]) -> tuple[list[int], dict[int, list[float]]]:
    """Steps and, per rank, its wait per step (NaN where unknown)."""
    steps = [row["step"] for row in waits]
    ranks = sorted({int(r) for row in waits for r in row["wait_s"]})
    series = {r: [float(row["wait_s"].get(str(r), row["wait_s"].get(r, math.nan))) for row in waits]
              for r in ranks}
    return steps, series


def _culprit(entry: dict) -> str:
    if entry.get("link"):
        return f"link {entry['link'][0]}->{entry['link'][1]}"
    ranks = entry.get("ranks") or []
    return ("rank " + ",".join(map(str, ranks))) if ranks else "-"


def timeline(run_dir: str, width: int = 60) -> str:
    """The report `loom faults report` prints."""
    faults, waits = load_run(run_dir)
    steps, series = wait_series(waits)
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "no complete steps"
    lines = [f"fault report for {run_dir}: {len(series)} ranks, {span}, "
             f"{len(faults)} fault{'s' if len(faults) != 1 else ''}", ""]
    if faults:
        width = max(10, *(len(str(e["kind"])) for e in faults))
        lines.append(f"{'time':>9}  {'step':>5}  {'fault':<{width}} {'culprit':<12} evidence")
        for e in sorted(faults, key=lambda e: e.get("t", 0.0)):
            step = e.get("step")
            lines.append(f"{e.get('t', 0.0):>+8.2f}s  {'-' if step is None else step:>5}  {e['kind']:<{width}} "
                         f"{_culprit(e):<12} {e['evidence']}")
    else:
        lines.append("no faults detected")
    if steps:
        lines += ["", f"time each rank waited in communication per step "
                      f"({_BARS[0]} = 0 ... {_BARS[-1]} = most; {min(width, len(steps))} columns):"]
        cols = _columns(len(steps), width)
        top = _robust_max([v for vs in series.values() for v in vs if v == v])
        for rank, values in series.items():
            bars = "".join(_bar(_mean(values[a:b]), top) for a, b in cols)
            known = [v for v in values if v == v]
            mean = sum(known) / len(known) if known else math.nan
            lines.append(f"  rank {rank:>3}  {bars}  mean {mean * 1e3:7.1f} ms  max {max(known) * 1e3:7.1f} ms")
        marks = [" "] * len(cols)
        for e in faults:
            if e.get("step") is not None and steps[0] <= e["step"] <= steps[-1]:
                i = next(k for k, (a, b) in enumerate(cols) if steps[a] <= e["step"] <= steps[b - 1])
                marks[i] = "^"
        if faults:
            lines.append(f"  faults    {''.join(marks)}")
        first, last = str(steps[0]), str(steps[-1])
        lines.append(f"  steps     {first:<{max(len(first) + 1, len(cols) - len(last))}}{last}")
    return "\n".join(lines)


def _robust_max(xs: list[float]) -> float:
    """The 98th percentile, so one slow start-up step does not flatten the rest."""
    if not xs:
        return 1.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.98 * len(xs)))] or xs[-1] or 1.0


def _columns(n: int, width: int) -> list[tuple[int, int]]:
    k = min(n, width)
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _mean(xs: list[float]) -> float:
    known = [x for x in xs if x == x]
    return sum(known) / len(known) if known else math.nan


def _bar(x: float, top: float) -> str:
    if x != x:
        return " "
    return _BARS[min(len(_BARS) - 1, int(x / top * (len(_BARS) - 1) + 0.5))]


def save_wait_png(run_dir: str, path: str) -> str:
    """Draw per-rank wait per step with the faults marked; returns ``path``."""
    from .plot import wait_chart
    faults, waits = load_run(run_dir)
    steps, series = wait_series(waits)
    marks = [(e.get("step"), f"{e['kind']} {_culprit(e)}", e["kind"]) for e in faults]
    wait_chart(path, steps, series, marks, title=f"wait per step by rank (ms) - {os.path.basename(run_dir)}")
    return path
