"""Per-step training metrics: model FLOPs, utilisation (MFU), peak memory.

Model FLOPs follow the estimate of PaLM (Chowdhery et al. 2022, appendix B)
and nanoGPT: a token costs ``6 * N`` FLOPs in the forward and backward
passes through the weights a token passes (N: ``active_params``), plus
``12 * layers * width * T`` for softmax attention over a sequence of
``T`` tokens (the ``QK^T`` and ``AV`` products: ``2 * 2 * width * T``
forward, twice that backward; causal masking is not discounted, as in
PaLM).  ``N`` counts every parameter except input-embedding tables (a lookup,
no matmul; a table tied to an output projection counts), and the experts of
an MoE layer at ``top_k`` of ``num_experts``: the weights a token passes.
Linear-attention layers count only their projections (their state update is
``O(width * head_dim)`` per token, small beside ``6 N``).  Activation
recomputation is not counted (model FLOPs, not hardware FLOPs).

MFU = achieved model FLOP/s / (``peak_tflops`` * 1e12 * world size).
"""
from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass

import torch

from loom import comms


@dataclass(frozen=True)
class FlopsCounts:
    """What the FLOPs estimate needs of a model: ``active_params`` (weights a
    token passes through, experts at top_k), ``attn_layers`` softmax
    attention layers of ``attn_width`` (heads * head_dim) each."""
    active_params: int
    attn_layers: int = 0
    attn_width: int = 0


def flops_per_token(counts: FlopsCounts, seq_len: int) -> float:
    """Model FLOPs (forward + backward) of one token in a sequence of
    ``seq_len`` tokens: ``6 * active_params + 12 * attn_layers * attn_width *
    seq_len``.  Raises ValueError for a negative count or ``seq_len < 1``."""
    if seq_len < 1 or min(counts.active_params, counts.attn_layers, counts.attn_width) < 0:
        raise ValueError(f"flops_per_token: seq_len={seq_len} must be >= 1 and the counts {counts} >= 0")
    return 6.0 * counts.active_params + 12.0 * counts.attn_layers * counts.attn_width * seq_len


def batch_flops(counts: FlopsCounts, lengths) -> float:
    """Model FLOPs (forward + backward) of a batch of sequences of ``lengths``
    tokens each (every sequence attends within itself)."""
    return float(sum(n * flops_per_token(counts, n) for n in lengths))


def count_model(model: torch.nn.Module) -> FlopsCounts:
    """`FlopsCounts` of ``model``: loom's reference model (softmax `Attention`
    layers, `MoE` layers expert-parallel or not) or any module (then
    attention comes from a Hugging Face style ``model.config`` with
    ``num_hidden_layers`` and ``hidden_size``, or is not counted).  Under
    expert parallelism each rank holds some experts; a token's active
    expert weights are ``top_k`` experts' whatever the rank holds."""
    from loom.parallel import MoE
    from loom.parallel.model import Attention
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    lookups -= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}  # tied heads count
    experts, active = set(), 0
    for m in model.modules():
        if isinstance(m, MoE):
            mine = m.expert_parameters()
            experts.update(id(p) for p in mine)
            per_expert = sum(p.numel() for p in mine) // m.experts_per_rank
            active += per_expert * m.top_k
    seen = set()
    for p in model.parameters():
        if id(p) not in seen and id(p) not in lookups and id(p) not in experts:
            active += p.numel()
        seen.add(id(p))
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    if attn:
        return FlopsCounts(active, len(attn), attn[0].heads * attn[0].head_dim)
    config = getattr(model, "config", None)
    layers, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if isinstance(layers, int) and isinstance(width, int):
        return FlopsCounts(active, layers, width)
    return FlopsCounts(active)


def peak_memory(device: torch.device) -> tuple[str, int]:
    """(metric name, bytes) of this process's peak memory: on CUDA
    ``peak_cuda_mem_bytes`` (`torch.cuda.max_memory_allocated`: tensors the
    caching allocator handed out), elsewhere ``peak_rss_bytes`` (the
    process's peak resident set size, `resource.getrusage`)."""
    if device.type == "cuda":
        return "peak_cuda_mem_bytes", int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak_rss_bytes", int(rss if sys.platform == "darwin" else rss * 1024)  # KiB on Linux


class StepMetrics:
    """The metrics row of a training step: loss, lr, grad_norm, step time,
    tokens/s, model TFLOP/s per device, mfu (with ``peak_tflops``) and peak
    memory (the largest over all ranks).  `row` is collective (one
    all-reduce of the peak memory): every rank calls it on the same steps."""

    def __init__(self, model: torch.nn.Module, device: torch.device, world: int, peak_tflops: float = 0.0):
        self.counts = count_model(model)
        self.device, self.world, self.peak_tflops = device, world, peak_tflops

    def row(self, step: int, *, loss: float, lr: float, grad_norm: float | None, step_time_s: float,
            lengths) -> dict:
        """``lengths``: the token count of every sequence of the global batch."""
        tokens = sum(lengths)
        flops_s = batch_flops(self.counts, lengths) / step_time_s if step_time_s > 0 else math.nan
        name, peak = peak_memory(self.device)
        peak_t = torch.tensor([peak], dtype=torch.float64, device=self.device)
        peak = int(comms.all_reduce(peak_t, "max").item())
        row = {"step": step, "loss": loss, "lr": lr}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        row.update(step_time_s=step_time_s, tokens_per_s=tokens / step_time_s if step_time_s > 0 else math.nan,
                   model_tflops_per_device=flops_s / self.world / 1e12)
        if self.peak_tflops > 0:
            row["mfu"] = flops_s / (self.peak_tflops * 1e12 * self.world)
        row[name] = peak
        return row
