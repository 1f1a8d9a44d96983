"""loom.faults: what went wrong, and where."""
