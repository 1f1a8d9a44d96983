"""loom.parallel: how the model's work is split across ranks."""
from .data import SyntheticData
from .data_parallel import GradientSync
from .model import ModelConfig, Transformer, local_attention, next_token_loss
from .ring_attention import ring_attention
from .sequence import shard_batch, shard_positions, shard_sequence, unshard_sequence
from .sequence_parallel import apply_sequence_parallel
from .ulysses import ulysses_attention

__all__ = ["GradientSync", "ModelConfig", "SyntheticData", "Transformer", "apply_sequence_parallel",
           "local_attention", "next_token_loss", "ring_attention", "shard_batch", "shard_positions",
           "shard_sequence", "ulysses_attention", "unshard_sequence"]
