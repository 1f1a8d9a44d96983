"""loom.launch: starting, watching and restarting workers; the `loom` CLI.

`run` runs your own per-rank training function on loom's workers (`report`
and `device` work inside it); see `loom.launch.api`.
"""
from .api import Result, device, report, run

__all__ = ["LaunchError", "Result", "device", "report", "run"]


def __getattr__(name):
    if name == "LaunchError":  # lives beside Ray, imported when asked for
        from .cluster import LaunchError
        return LaunchError
    raise AttributeError(f"module 'loom.launch' has no attribute {name!r}")
