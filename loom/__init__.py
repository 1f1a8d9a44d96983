"""loom: distributed training infrastructure for PyTorch."""
__version__ = "0.1.0"
