"""A small decoder-only transformer in plain PyTorch.

Parallelism is not baked in: the attention core is a replaceable callable on
each `Attention` module (``attn.core(q, k, v, causal=...)``) and on each
`LinearAttention` module (``attn.core(q, k, v, log_decay, scale=...)``), so
sequence parallelism is applied from outside by swapping it
(`enable_sequence_parallel`).  Positions are explicit (global token indices),
so a sequence shard computes exactly what the whole sequence would.
``ModelConfig.layers`` is a block count (all softmax) or a pattern such as
``"linear,linear,softmax"`` for a hybrid model.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom import comms
from loom.comms.scan import METHODS as SCAN_METHODS

from .attention_blocks import check_cu_seqlens
from .linear_attention import linear_attention, local_linear_attention
from .llep import LLEPConfig
from .moe import MoE
from .varlen import document_attention

LAYER_KINDS = ("softmax", "linear")


@dataclass
class ModelConfig:
    vocab: int = field(default=256, metadata={"help": "vocabulary size"})
    dim: int = field(default=64, metadata={"help": "model width"})
    layers: int | str = field(default=2, metadata={
        "help": "transformer blocks: a count (all softmax attention) or a comma-separated pattern of "
                "softmax/linear, e.g. linear,linear,softmax", "metavar": "N|PATTERN"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (GQA; default: heads)"})
    ffn_hidden: int | None = field(default=None, metadata={"help": "feed-forward width (default: 4 * dim)"})
    rope_base: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    moe: str = field(default="none", metadata={
        "help": "feed-forward layers: none (dense), or mixture of experts with the standard or llep dispatcher"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer (divides by --ep)"})
    top_k: int = field(default=2, metadata={"help": "experts per token in MoE layers"})
    moe_aux_coef: float = field(default=0.01, metadata={"help": "weight of the MoE load-balancing loss"})
    llep: LLEPConfig = field(default_factory=LLEPConfig, metadata={
        "help": "the llep dispatcher's settings (loom train: each an llep_ option, e.g. --llep-lam)",
        "prefix": "llep_"})

    def __post_init__(self):
        self.layers = _normalise_layers(self.layers)
        for name in ("vocab", "dim", "heads"):
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
        if not isinstance(self.llep, LLEPConfig):
            raise TypeError(f"model llep={self.llep!r} must be an LLEPConfig")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The attention kind of each block, in order."""
        if isinstance(self.layers, int):
            return ("softmax",) * self.layers
        return tuple(self.layers.split(","))


def _normalise_layers(layers) -> int | str:
    """A count stays an int (a string of digits becomes one); a pattern becomes
    ``"kind,kind,..."`` with every kind checked."""
    if isinstance(layers, str) and layers.strip().isdigit():
        layers = int(layers.strip())
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"model layers={layers} must be >= 1")
        return layers
    if not isinstance(layers, str):
        raise ValueError(f"model layers={layers!r} must be a count or a pattern like 'linear,softmax'")
    kinds = [kind.strip().lower() for kind in layers.split(",")]
    bad = [kind for kind in kinds if kind not in LAYER_KINDS]
    if bad:
        raise ValueError(f"model layers={layers!r}: unknown layer kind {bad[0]!r}; expected a count "
                         f"or a comma-separated pattern of {' / '.join(LAYER_KINDS)}")
    return ",".join(kinds)


def local_attention(q, k, v, *, causal: bool = False, scale: float | None = None, cu_seqlens=None):
    """Attention on one process.  q [b, s, hq, d]; k, v [b, s, hkv, d] (hq
    divides by hkv).  ``cu_seqlens``: document boundaries of packed documents
    over the batch flattened row-major (``[0, ..., b * s]``, every row
    boundary ``r * s`` included; see `check_cu_seqlens`, which raises
    ValueError on bad ones -- checked eagerly, not inside torch.compile's
    graph): tokens attend only inside their document (`document_attention`:
    varlen flash attention on CUDA in half precision, else a bool mask
    through PyTorch's SDPA).  Returns the output like q."""
    if cu_seqlens is not None:
        b, s = q.shape[:2]
        bounds = None
        if not torch.compiler.is_compiling():  # reading the boundaries back would break the graph
            bounds = check_cu_seqlens(cu_seqlens, b, s, "local_attention")
        return document_attention(q, k, v, cu_seqlens, bounds, causal=causal, scale=scale)
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

    def forward(self, x, positions, cu_seqlens=None):
        """x [b, s, dim]; ``cu_seqlens`` (document boundaries, see
        `Transformer.forward`) reaches the core only when given, so cores
        without that keyword work on batches without documents."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        if cu_seqlens is None:
            out = self.core(q, k, v, causal=True)
        else:
            out = self.core(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        return self.wo(out.reshape(b, s, -1))


class LinearAttention(nn.Module):
    """Gated linear attention (GLA-style) with the same heads and head_dim as
    `Attention` (kv_heads does not apply).  The per-key-dim log decay comes
    from a low-rank gate through logsigmoid, divided by a temperature so that
    decays start near 1; positions are not needed (the decay orders tokens)."""

    def __init__(self, cfg: ModelConfig, gate_rank: int = 16, gate_temperature: float = 16.0):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        width = self.heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, width, bias=False)
        self.wk = nn.Linear(cfg.dim, width, bias=False)
        self.wv = nn.Linear(cfg.dim, width, bias=False)
        self.gate_down = nn.Linear(cfg.dim, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, width, bias=True)
        self.gate_temperature = gate_temperature
        self.out_norm = nn.RMSNorm(self.head_dim)   # per head: linear attention has no softmax normaliser
        self.wo = nn.Linear(width, cfg.dim, bias=False)
        self.core = local_linear_attention  # swapped by sequence-parallel plans

    def forward(self, x, positions=None, cu_seqlens=None):
        """x [b, s, dim].  ``cu_seqlens`` (document boundaries, see
        `Transformer.forward`): the state restarts at each document's first
        token; it reaches the core only when given, so cores without that
        keyword work on batches without documents."""
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q, k, v = self.wq(x).view(shape), self.wk(x).view(shape), self.wv(x).view(shape)
        log_decay = F.logsigmoid(self.gate_up(self.gate_down(x))).view(shape) / self.gate_temperature
        if cu_seqlens is None:
            out = self.core(q, k, v, log_decay, scale=self.head_dim ** -0.5)
        else:
            out = self.core(q, k, v, log_decay, scale=self.head_dim ** -0.5, cu_seqlens=cu_seqlens)
        return self.wo(self.out_norm(out).reshape(b, s, -1))


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
    return MoE(cfg.dim, cfg.ffn_hidden or 4 * cfg.dim, cfg.num_experts, cfg.top_k, ep_group=moe_group,
               dispatcher=cfg.moe, llep=cfg.llep,
               aux_loss_coef=cfg.moe_aux_coef)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str = "softmax", moe_group=None):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = LinearAttention(cfg) if kind == "linear" else Attention(cfg)
        self.ffn = feed_forward(cfg, moe_group)

    def forward(self, x, positions, cu_seqlens=None):
        h = self.attn_norm(x)
        x = x + (self.attn(h, positions) if cu_seqlens is None else self.attn(h, positions, cu_seqlens=cu_seqlens))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_group=None):
        """``moe_group``: the EP group of MoE feed-forwards (None: every expert here)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, kind, moe_group) for kind in cfg.layer_kinds)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]; positions default to 0..s-1.

        ``cu_seqlens``: boundaries of the documents packed in the batch, a 1-D
        int64 tensor over the rows flattened row-major (``[0, ..., b *
        S_total]``, every row boundary ``r * S_total`` included; see
        `check_cu_seqlens`): attention stays inside each document.  Under
        sequence parallelism ``tokens`` is this rank's shard and ``cu_seqlens``
        the GLOBAL boundaries (S_total = the whole sequence), the same on every
        rank.  Linear-attention layers restart their state at each document."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions) if cu_seqlens is None else block(x, positions, cu_seqlens=cu_seqlens)
        return self.head(self.norm(x))


def core_kind(module: nn.Module) -> str | None:
    """``"softmax"`` or ``"linear"`` when ``module`` is an attention layer
    whose core sequence parallelism can swap, else None.

    loom's `Attention` and `LinearAttention` are; so is any module with a
    ``core`` attribute that calls it as loom's do -- ``core(q, k, v,
    causal=...)`` for softmax, ``core(q, k, v, log_decay, scale=...)`` for
    linear attention, q/k/v ``[batch, seq, heads, head_dim]``, both with
    ``cu_seqlens=`` added on batches of packed documents -- and says
    which: its ``core`` is `local_attention` / `local_linear_attention`, or
    its ``core_kind`` attribute is ``"softmax"`` / ``"linear"``."""
    if isinstance(module, LinearAttention):
        return "linear"
    if isinstance(module, Attention):
        return "softmax"
    if not callable(getattr(module, "core", None)):
        return None
    kind = getattr(module, "core_kind", None)
    if kind in LAYER_KINDS:
        return kind
    return {local_attention: "softmax", local_linear_attention: "linear"}.get(module.core)


def sequence_parallel_gaps(model: nn.Module) -> str | None:
    """What ``model`` lacks for sequence parallelism (None: nothing): attention
    layers with swappable cores (`core_kind`) and a ``positions`` argument of
    its forward (global token indices of its shard)."""
    name = type(model).__name__
    if not any(core_kind(m) for m in model.modules()):
        return (f"{name} has no swappable attention cores: sequence parallelism replaces the `core` of each "
                f"attention module, so each needs a `core` attribute that it calls as core(q, k, v, causal=True) "
                f"(q, k, v [batch, seq, heads, head_dim]), set to loom.parallel.local_attention (or with "
                f"core_kind = 'softmax'; linear attention: local_linear_attention)")
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: trust the model
        return None
    if "positions" not in parameters:
        return (f"{name}.forward takes no `positions` argument: a sequence shard needs the global index of "
                f"each of its tokens (forward(tokens, positions), positions [seq] or [batch, seq])")
    return None


def enable_sequence_parallel(model: nn.Module, ranks=None, *, group=None, linear_method: str = "allscan",
                             softmax_core=None) -> nn.Module:
    """Make ``model`` run on a contiguous sequence shard (rank position p of
    ``ranks`` -- global ranks in sequence order, default the ranks of ``group``
    -- holds the p-th slice; pass global ``positions`` to the forward).

    Linear-attention layers scan their states over the ranks with
    ``linear_method``; softmax layers need a sequence-parallel ``softmax_core``
    (e.g. ring attention over the same ranks in the contiguous layout), which
    is required when the model has any.  Any model whose attention layers
    follow `core_kind`'s protocol works, loom's `Transformer` or a user's own.
    Swaps cores in place; returns ``model``.  Raises ValueError when the model
    lacks what sequence parallelism needs (`sequence_parallel_gaps`)."""
    if linear_method not in SCAN_METHODS:
        raise ValueError(f"enable_sequence_parallel: linear_method={linear_method!r} must be one of "
                         f"{SCAN_METHODS}")
    gaps = sequence_parallel_gaps(model)
    if gaps is not None:
        raise ValueError(f"enable_sequence_parallel: {gaps}")
    count = len(ranks) if ranks is not None else len(comms.group_ranks(group))
    layers = [(m, core_kind(m)) for m in model.modules()]
    has_softmax = any(kind == "softmax" for _, kind in layers)
    if has_softmax and softmax_core is None and count > 1:
        raise ValueError("enable_sequence_parallel: the model has softmax attention layers; pass a "
                         "sequence-parallel softmax_core (ring attention in the contiguous layout)")
    linear_core = functools.partial(linear_attention, group=group, ranks=ranks, method=linear_method)
    for m, kind in layers:
        if kind == "linear":
            m.core = linear_core
        elif kind == "softmax" and softmax_core is not None:
            m.core = softmax_core
    return model


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every position (half-precision logits are upcast)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction=reduction)
