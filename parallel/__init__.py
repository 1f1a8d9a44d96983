"""loom.parallel: how the model's work is split across ranks."""
from .data import SyntheticData
from .data_parallel import GradientSync
from .linear_attention import linear_attention, local_linear_attention
from .model import (LinearAttention, ModelConfig, Transformer, enable_sequence_parallel, local_attention,
                    next_token_loss)
from .ring_attention import ring_attention
from .sequence import shard_batch, shard_positions, shard_sequence, unshard_sequence
from .sequence_parallel import sequence_parallel_core
from .ulysses import ulysses_attention

__all__ = ["GradientSync", "LinearAttention", "ModelConfig", "SyntheticData", "Transformer",
           "enable_sequence_parallel", "linear_attention", "local_attention", "local_linear_attention",
           "next_token_loss", "ring_attention", "sequence_parallel_core", "shard_batch", "shard_positions",
           "shard_sequence", "ulysses_attention", "unshard_sequence"]
