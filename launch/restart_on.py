"""``--restart-on straggler``: when a slow worker is worth a restart.

The fault monitor flags a straggler once it arrived late in
``--straggler-k`` of the last ``--straggler-n`` steps (`loom.faults.detect`).
A restart costs seconds and the steps since the last checkpoint, so a
straggler ends the attempt only when it is *persistent*: flagged, and then
still late in each of ``--restart-straggler-steps`` consecutive steps after
it was flagged (late by the detector's own rule: the others' median wait
minus its wait is at least ``max(--straggler-min-s, --straggler-rel * the
step time)``).  A rank that catches up starts the count again.  The Ray
driver then isolates its worker like a faulty one (`loom.launch.pool`).
"""
from __future__ import annotations

import dataclasses
import statistics

from loom.faults import DetectConfig, Fault


class PersistentStraggler:
    """Feed it the monitor's log lines (`feed`, as `DriverWatch.poll` gets
    them); it returns the straggler `Fault` that should end the attempt once
    one is persistent (see the module), else None.  ``steps`` 0: at once."""

    def __init__(self, steps: int, config: DetectConfig):
        self.steps, self.config = steps, config
        self.flagged: dict[int, Fault] = {}   # rank -> the monitor's straggler fault
        self.since: dict[int, int] = {}       # rank -> its consecutive late steps since then
        self.verdict: Fault | None = None

    def feed(self, lines: dict) -> Fault | None:
        for entry in lines.get("faults", ()):
            if entry.get("kind") == "straggler" and entry.get("ranks"):
                fault = Fault.from_dict(entry)
                self.flagged.setdefault(fault.ranks[0], fault)
                self.since.setdefault(fault.ranks[0], 0)
        for row in lines.get("waits", ()):
            for rank in self.flagged:
                self.since[rank] = self.since[rank] + 1 if self._late(rank, row) else 0
        if self.verdict is None:
            for rank, fault in sorted(self.flagged.items()):
                if self.since[rank] >= self.steps:
                    extra = f"; still late in the {self.since[rank]} steps since" if self.steps else ""
                    self.verdict = dataclasses.replace(fault, evidence=fault.evidence + extra)
                    break
        return self.verdict

    def _late(self, rank: int, row: dict) -> bool:
        waits = {int(r): w for r, w in row.get("wait_s", {}).items()}
        if rank not in waits or len(waits) < 2:
            return False
        others = statistics.median(w for r, w in waits.items() if r != rank)
        lengths = list(row.get("step_s", {}).values())
        typical = statistics.median(lengths) if lengths else 0.0
        return others - waits[rank] >= max(self.config.straggler_min_s, self.config.straggler_rel * typical)
