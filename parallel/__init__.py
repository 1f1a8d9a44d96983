"""loom.parallel: how the model's work is split across ranks."""
from .data import SyntheticData
from .data_parallel import GradientSync
from .expert_sync import ExpertParallelGradientSync, expert_parameters, moe_aux_loss
from .llep import LLEPConfig, LLEPPlan, llep_plan
from .model import ModelConfig, Transformer, local_attention, next_token_loss
from .moe import MoE

__all__ = ["ExpertParallelGradientSync", "GradientSync", "LLEPConfig", "LLEPPlan", "MoE", "ModelConfig",
           "SyntheticData", "Transformer", "expert_parameters", "llep_plan", "local_attention",
           "moe_aux_loss", "next_token_loss"]
