"""Shared helpers for benchmarks: JSON output and the RESULTS.md sections.

Each benchmark owns one section of RESULTS.md, delimited by HTML comments, and
rewrites only that section, so benchmarks can be rerun independently.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def machine() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_json(name: str, payload: dict) -> str:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"machine": machine(), **payload}, fh, indent=2)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_results(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section of RESULTS.md that belongs to ``name``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = (f"{start}\n## {title}\n\nCommand: `{command}`  \n"
               f"Measured {machine()['date']} on {os.cpu_count()} CPUs, torch {torch.__version__}.\n\n"
               f"{body.strip()}\n{end}")
    text = open(RESULTS_MD).read() if os.path.exists(RESULTS_MD) else \
        "# Benchmark results\n\nEach section is rewritten by its benchmark script.\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(RESULTS_MD, "w") as fh:
        fh.write(text)


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def command_line(script: str, argv=None) -> str:
    """How to re-run a benchmark: ``python benchmarks/<script> <its arguments>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{os.path.basename(script)}", *args])
