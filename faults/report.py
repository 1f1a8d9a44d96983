"""What a run's fault monitor saw: a timeline of faults and per-rank waits.

Reads ``faults.jsonl`` and ``waits.jsonl`` from a run directory (written by
the aggregator) and prints a timeline; `save_wait_png` draws each rank's
time in communication per step, with the faults marked.

The files are read as untrusted input: a line that is not a well-formed
entry (not JSON, nested too deeply, longer than `MAX_LINE`, a field missing
or of the wrong type) is skipped and counted (`RunLog.skipped`), and every
string taken from them is printed with its control characters escaped
(`printable`), so a log cannot drive the terminal.  Whatever goes wrong
reading the directory is a ValueError with a one-line message.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import stat
from dataclasses import dataclass, field

from .detect import KINDS
from .monitor import FAULTS_LOG, WAITS_LOG

_BARS = "▁▂▃▄▅▆▇█"
MAX_LINE = 8 << 20  # bytes of one log line (a wait row of 100k ranks is ~3 MB)


def printable(text) -> str:
    """``text`` (made a string) with control and format characters - ESC,
    newlines, C1 codes, bidirectional overrides, ... - written as Python
    escapes (``\\x1b``, ``\\n``, ``\\u202e``), so it prints as one inert line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@dataclass
class RunLog:
    """A run directory's fault log: ``faults`` (entries, by time), ``waits``
    (per-step rows, by step) and ``skipped`` (``"file:line: why"`` for each
    line that was left out)."""

    faults: list[dict]
    waits: list[dict]
    skipped: list[str] = field(default_factory=list)


def _read_jsonl(path: str, check, skipped: list[str]) -> list[dict]:
    """The entries of a JSON-lines file that ``check`` accepts (it returns
    the entry, or raises ValueError saying why not); the others are noted in
    ``skipped``.  A missing file has none; one that cannot be read raises
    ValueError."""
    name = os.path.basename(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ValueError(f"cannot read {printable(path)}: {printable(exc.strerror or exc)}") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a directory cannot be read
        raise ValueError(f"cannot read {printable(path)}: not a regular file")
    out = []
    try:
        with open(path, "rb") as fh:
            n = 0
            while True:
                line = fh.readline(MAX_LINE + 1)
                if not line:
                    break
                n += 1
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # the rest of the long line
                        line = fh.readline(MAX_LINE)
                    skipped.append(f"{name}:{n}: longer than {MAX_LINE} bytes")
                    continue
                if not line.strip():
                    continue
                try:
                    out.append(check(_loads(line)))
                except ValueError as exc:
                    skipped.append(f"{name}:{n}: {exc}")
    except OSError as exc:
        raise ValueError(f"cannot read {printable(path)}: {printable(exc.strerror or exc)}") from None
    return out


def _loads(line: bytes):
    try:
        return json.loads(line.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from None


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _rank(v) -> bool:
    return type(v) is int and 0 <= v < 1 << 31


def _fault_entry(e) -> dict:
    """A fault line as the aggregator writes it (`Fault.to_dict` plus ``t``)."""
    if not isinstance(e, dict):
        raise ValueError(f"a {type(e).__name__}, not an object")
    if e.get("kind") not in KINDS:
        raise ValueError(f"kind {printable(repr(e.get('kind')))[:80]} is not one of {', '.join(KINDS)}")
    if not isinstance(e.get("evidence"), str):
        raise ValueError("no 'evidence' text")
    ranks, link, step, t = e.get("ranks", []), e.get("link"), e.get("step"), e.get("t", 0.0)
    if not (isinstance(ranks, list) and all(_rank(r) for r in ranks)):
        raise ValueError("'ranks' is not a list of ranks")
    if link is not None and not (isinstance(link, list) and len(link) == 2 and all(_rank(r) for r in link)):
        raise ValueError("'link' is not a pair of ranks")
    if step is not None and type(step) is not int:
        raise ValueError("'step' is not an integer")
    if not _number(t):
        raise ValueError("'t' is not a finite number")
    return {"kind": e["kind"], "evidence": e["evidence"], "ranks": ranks, "link": link, "step": step, "t": t}


def _wait_row(row) -> dict:
    """A per-step line: ``{"step": int, "wait_s": {rank: seconds}, ...}``."""
    if not isinstance(row, dict):
        raise ValueError(f"a {type(row).__name__}, not an object")
    waits = row.get("wait_s")
    if type(row.get("step")) is not int:
        raise ValueError("no integer 'step'")
    if not isinstance(waits, dict):
        raise ValueError("no 'wait_s' object")
    out = {}
    for r, w in waits.items():
        if not (r.isdecimal() and r.isascii() and len(r) <= 10 and _rank(int(r))) or not _number(w) or w < 0:
            raise ValueError(f"wait_s entry {printable(repr(r))[:40]}: {printable(repr(w))[:40]} is not "
                             f"rank: seconds (>= 0)")
        out[int(r)] = float(w)
    return {"step": row["step"], "wait_s": out}


def read_run(run_dir: str) -> RunLog:
    """The fault log of a run directory; raises ValueError (one line) if it
    is missing or unreadable, or holds neither file."""
    try:
        if not os.path.exists(run_dir):
            raise ValueError(f"run directory {printable(repr(run_dir))} does not exist")
        if not os.path.isdir(run_dir):
            raise ValueError(f"{printable(repr(run_dir))} is not a directory")
        names = os.listdir(run_dir)
    except OSError as exc:
        raise ValueError(f"cannot read {printable(run_dir)}: {printable(exc.strerror or exc)}") from None
    if FAULTS_LOG not in names and WAITS_LOG not in names:
        raise ValueError(f"{printable(repr(run_dir))} has no {FAULTS_LOG} or {WAITS_LOG} (was the fault monitor "
                         f"on?)")
    skipped: list[str] = []
    faults = _read_jsonl(os.path.join(run_dir, FAULTS_LOG), _fault_entry, skipped)
    rows = _read_jsonl(os.path.join(run_dir, WAITS_LOG), _wait_row, skipped)
    by_step: dict[int, dict] = {}
    for row in rows:
        if row["step"] in by_step:
            skipped.append(f"{WAITS_LOG}: step {row['step']} repeated (the last line kept)")
        by_step[row["step"]] = row
    return RunLog(sorted(faults, key=lambda e: e["t"]), [by_step[u] for u in sorted(by_step)], skipped)


def load_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(fault entries, per-step wait rows) of a run directory (`read_run`)."""
    log = read_run(run_dir)
    return log.faults, log.waits


def wait_series(waits: list[dict]) -> tuple[list[int], dict[int, list[float]]]:
    """Steps and, per rank, its wait per step (NaN where unknown)."""
    steps = [row["step"] for row in waits]
    ranks = sorted({int(r) for row in waits for r in row["wait_s"]})
    series = {r: [float(row["wait_s"].get(r, row["wait_s"].get(str(r), math.nan))) for row in waits]
              for r in ranks}
    return steps, series


def _culprit(entry: dict) -> str:
    if entry.get("link"):
        return f"link {entry['link'][0]}->{entry['link'][1]}"
    ranks = entry.get("ranks") or []
    return ("rank " + ",".join(map(str, ranks))) if ranks else "-"


def timeline(run_dir: str, width: int = 60) -> str:
    """The report `loom faults report` prints (every string from the files
    escaped, see `printable`)."""
    log = read_run(run_dir)
    faults = log.faults
    steps, series = wait_series(log.waits)
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "no complete steps"
    lines = [f"fault report for {printable(run_dir)}: {len(series)} ranks, {span}, "
             f"{len(faults)} fault{'s' if len(faults) != 1 else ''}"]
    if log.skipped:
        n = len(log.skipped)
        shown = "; ".join(printable(x) for x in log.skipped[:3])
        lines.append(f"skipped {n} malformed line{'s' if n != 1 else ''}: {shown}{'; ...' if n > 3 else ''}")
    lines.append("")
    if faults:
        kind_width = max(10, *(len(e["kind"]) for e in faults))
        lines.append(f"{'time':>9}  {'step':>5}  {'fault':<{kind_width}} {'culprit':<12} evidence")
        for e in faults:
            step = e["step"]
            lines.append(f"{e['t']:>+8.2f}s  {'-' if step is None else step:>5}  {e['kind']:<{kind_width}} "
                         f"{_culprit(e):<12} {printable(e['evidence'])}")
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
        starts = [steps[a] for a, _ in cols]
        for e in faults:
            if e["step"] is not None and steps[0] <= e["step"] <= steps[-1]:
                marks[bisect.bisect_right(starts, e["step"]) - 1] = "^"  # the column the step falls in
        if faults:
            lines.append(f"  faults    {''.join(marks)}")
        first, last = str(steps[0]), str(steps[-1])
        lines.append(f"  steps     {first:<{max(len(first) + 1, len(cols) - len(last))}}{last}" if len(steps) > 1
                     else f"  steps     {first}")
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
    marks = [(e["step"], f"{e['kind']} {_culprit(e)}", e["kind"]) for e in faults]
    try:
        wait_chart(path, steps, series, marks, title=f"wait per step by rank (ms) - {os.path.basename(run_dir)}")
    except OSError as exc:
        raise ValueError(f"cannot write {printable(path)}: {printable(exc.strerror or exc)}") from None
    return path
