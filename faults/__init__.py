"""loom.faults: what went wrong, and where.

`detect` finds stragglers, hangs, slow links, mismatched collectives and
lost ranks in the `CommRecord`s of all ranks (a pure function); `Monitor`
ships each rank's records to an out-of-band `Aggregator` that runs it online
(JSON reports, authenticated with the job's secret: `wire`); `inject` makes
those faults happen on purpose, for tests and demos.
"""
from . import inject, wire
from .detect import FATAL_KINDS, KINDS, DetectConfig, Fault, StepTable, analyse, detect, step_waits
from .inject import Injection, Injector
from .monitor import Aggregator, LogWriter, Monitor, StoreAggregator, StoreTransport

__all__ = ["Aggregator", "DetectConfig", "FATAL_KINDS", "Fault", "Injection", "Injector", "KINDS", "LogWriter",
           "Monitor", "StepTable", "StoreAggregator", "StoreTransport", "analyse", "detect", "inject", "step_waits",
           "wire"]
