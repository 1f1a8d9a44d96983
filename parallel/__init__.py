"""loom.parallel: how the model's work is split across ranks."""
from .data import SyntheticData
from .data_parallel import GradientSync
from .llep import LLEPConfig, LLEPPlan, llep_plan
from .model import ModelConfig, Transformer, local_attention, next_token_loss
from .moe import MoE

__all__ = ["GradientSync", "LLEPConfig", "LLEPPlan", "MoE", "ModelConfig", "SyntheticData",
           "Transformer", "llep_plan", "local_attention", "next_token_loss"]
