"""A small decoder-only transformer in plain PyTorch.

Parallelism is not baked in: the attention core is a replaceable callable on
each `Attention` module (``attn.core(q, k, v, causal=...)``), so sequence
parallelism is applied from outside by swapping it.  Positions are explicit
(global token indices), so a sequence shard computes exactly what the whole
sequence would.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llep import LLEPConfig
from .moe import MoE


@dataclass
class ModelConfig:
    vocab: int = field(default=256, metadata={"help": "vocabulary size"})
    dim: int = field(default=64, metadata={"help": "model width"})
    layers: int = field(default=2, metadata={"help": "transformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (GQA; default: heads)"})
    ffn_hidden: int | None = field(default=None, metadata={"help": "feed-forward width (default: 4 * dim)"})
    rope_base: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    moe: str = field(default="none", metadata={
        "help": "feed-forward layers: none (dense), or mixture of experts with the standard or llep dispatcher"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer (divides by --ep)"})
    top_k: int = field(default=2, metadata={"help": "experts per token in MoE layers"})
    moe_aux_coef: float = field(default=0.01, metadata={"help": "weight of the MoE load-balancing loss"})
    llep_lam: float = field(default=1.3, metadata={
        "help": "LLEP switches on when the busiest rank has this many times the mean load"})
    llep_min_chunk: int = field(default=1024, metadata={
        "help": "LLEP: fewest token slots worth moving an expert's weights for"})

    def __post_init__(self):
        for name in ("vocab", "dim", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name}={getattr(self, name)} must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"model dim={self.dim} must divide by heads={self.heads}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"heads={self.heads} must divide by kv_heads={self.kv_heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.heads} must be even for rotary embeddings")
        if self.moe not in ("none", "standard", "llep"):
            raise ValueError(f"moe={self.moe!r} must be none, standard or llep")
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k={self.top_k} <= num_experts={self.num_experts}")
        LLEPConfig(lam=self.llep_lam, min_chunk=self.llep_min_chunk)  # validates them

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def local_attention(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Attention on one process.  q [b, s, hq, d]; k, v [b, s, hkv, d]."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding; x [b, s, h, d], positions [b, s] or [s]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = positions.to(torch.float64)[..., None] * inv_freq          # [(b,) s, d/2]
    if angles.dim() == 2:
        angles = angles[None]
    cos, sin = angles.cos()[:, :, None, :].to(x.dtype), angles.sin()[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads or cfg.heads
        self.head_dim, self.rope_base = cfg.head_dim, cfg.rope_base
        self.wq = nn.Linear(cfg.dim, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.dim, bias=False)
        self.core = local_attention  # swapped by sequence-parallel plans

    def forward(self, x, positions):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        return self.wo(self.core(q, k, v, causal=True).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_hidden or 4 * cfg.dim
        self.w_in = nn.Linear(cfg.dim, hidden, bias=False)
        self.w_out = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x)))


def feed_forward(cfg: ModelConfig, moe_group=None) -> nn.Module:
    """A dense feed-forward, or an MoE layer expert-parallel over ``moe_group``."""
    if cfg.moe == "none":
        return FeedForward(cfg)
    return MoE(cfg.dim, cfg.ffn_hidden or 4 * cfg.dim, cfg.num_experts, cfg.top_k, group=moe_group,
               dispatcher=cfg.moe, llep=LLEPConfig(lam=cfg.llep_lam, min_chunk=cfg.llep_min_chunk),
               aux_loss_coef=cfg.moe_aux_coef)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_group=None):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn, self.ffn = Attention(cfg), feed_forward(cfg, moe_group)

    def forward(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_group=None):
        """``moe_group``: the EP group of MoE feed-forwards (None: every expert here)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, moe_group) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]; positions default to 0..s-1."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(self.norm(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every position (half-precision logits are upcast)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction=reduction)
