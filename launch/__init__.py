"""loom.launch: starting, watching and restarting workers; the `loom` CLI."""
