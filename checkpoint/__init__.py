"""loom.checkpoint: training state in and out of Zarr stores."""
