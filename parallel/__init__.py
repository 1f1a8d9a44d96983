"""loom.parallel: how the model's work is split across ranks."""
from .activation_checkpointing import apply_activation_checkpointing
from .attention_blocks import check_cu_seqlens, document_ids
from .data import SyntheticData
from .data_parallel import GradientSync
from .hdp import HDPAttention, attention_cores, hdp_forward_backward, pack_microbatch
from .hdp_schedule import HDPCost, Piece, check_schedule, hdp_schedule
from .expert_sync import ExpertParallelGradientSync, expert_parameters, moe_aux_loss
from .linear_attention import linear_attention, local_linear_attention
from .llep import LLEPConfig, LLEPPlan, llep_plan
from .model import (LinearAttention, ModelConfig, Transformer, core_kind, enable_sequence_parallel, local_attention,
                    next_token_loss, sequence_parallel_gaps)
from .moe import MoE
from .placement import declare_placements
from .ring_attention import ring_attention
from .sharded import LEVELS as SHARD_LEVELS, ShardedDataParallel, shard_data_parallel
from .sequence import shard_batch, shard_positions, shard_sequence, unshard_sequence
from .sequence_parallel import mesh_core, sequence_parallel_core
from .ulysses import ulysses_attention
from .ulysses_ring import default_sp_inner, ulysses_ring_attention

__all__ = ["apply_activation_checkpointing", "check_cu_seqlens", "document_ids",
           "ExpertParallelGradientSync", "GradientSync", "HDPAttention",
           "HDPCost", "Piece", "attention_cores",
           "check_schedule", "declare_placements", "hdp_forward_backward", "hdp_schedule", "pack_microbatch",
           "LLEPConfig", "LLEPPlan", "LinearAttention", "MoE",
           "ModelConfig", "SyntheticData", "Transformer", "enable_sequence_parallel", "expert_parameters",
           "linear_attention", "llep_plan", "local_attention", "local_linear_attention", "moe_aux_loss",
           "next_token_loss", "ring_attention", "mesh_core",
           "core_kind", "sequence_parallel_gaps", "sequence_parallel_core", "shard_batch", "shard_positions",
           "shard_sequence", "ulysses_attention", "ulysses_ring_attention", "default_sp_inner", "unshard_sequence",
           "SHARD_LEVELS", "ShardedDataParallel", "shard_data_parallel"]
