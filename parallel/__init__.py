"""loom.parallel: how the model's work is split across ranks."""
from .data import SyntheticData
from .data_parallel import GradientSync
from .model import ModelConfig, Transformer, local_attention, next_token_loss

__all__ = ["GradientSync", "ModelConfig", "SyntheticData", "Transformer", "local_attention",
           "next_token_loss"]
