"""transformers' sparse MoE blocks (Mixtral, Qwen2-MoE) as loom `MoE` layers.

`replace_sparse_blocks` swaps every ``MixtralSparseMoeBlock`` /
``Qwen2MoeSparseMoeBlock`` of a model for a `SparseMoE`: loom's dropless
`MoE` (standard EP or LLEP over an ``ep_group``) holding the block's own
weights in loom's layout, each rank its ep slice of the experts:

    transformers                               loom (`MoE`)
    gate.weight        [E, dim]                router.weight [E, dim]
    experts.gate_up_proj [E, 2*I, dim]         w_gate [E, dim, I] (rows :I, transposed),
                                               w_up   [E, dim, I] (rows I:, transposed)
    experts.down_proj  [E, dim, I]             w_down [E, I, dim] (transposed)

What is kept of the router: the top-k (``num_experts_per_tok``) of the
softmax over all experts, computed in float32 as transformers does,
renormalised to sum 1 (Mixtral always; Qwen2-MoE when ``norm_topk_prob``);
Qwen2-MoE's shared expert and its sigmoid gate stay dense (replicated).
In float32 and float64 the block's output equals the original's to rounding.
What is not: the router logits (``output_router_logits=True`` is refused:
transformers records them from its router modules, which are gone) and so
transformers' load-balancing loss, which the model adds only with them
(loom's `MoE.aux_loss` is computed with coefficient 0); training-time router
jitter (``router_jitter_noise > 0`` is refused).

`restore_sparse_blocks` turns the blocks back into transformers' (for
``save_pretrained``; the experts must all be on this process).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llep import LLEPConfig
from .moe import DISPATCHERS, MoE

# the sparse blocks loom can replace: class name -> whether the router renormalises
# its top-k gates (None: as the config's norm_topk_prob says)
_BLOCKS = {"MixtralSparseMoeBlock": True, "Qwen2MoeSparseMoeBlock": None}


def experts_from_hf(gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
    """transformers' stacked expert weights ``gate_up_proj [E, 2*I, dim]``,
    ``down_proj [E, dim, I]`` -> loom's ``(w_gate, w_up, w_down)``, ``[E,
    dim, I]``, ``[E, dim, I]``, ``[E, I, dim]`` (copies, contiguous)."""
    inner = gate_up_proj.shape[1] // 2 if gate_up_proj.dim() == 3 else -1
    if inner < 1 or gate_up_proj.shape[1] != 2 * inner or \
            tuple(down_proj.shape) != (gate_up_proj.shape[0], gate_up_proj.shape[2], inner):
        raise ValueError(f"expert weights gate_up_proj {tuple(gate_up_proj.shape)} and down_proj "
                         f"{tuple(down_proj.shape)} are not [E, 2*I, dim] and [E, dim, I]")
    return (gate_up_proj[:, :inner].transpose(1, 2).contiguous(),
            gate_up_proj[:, inner:].transpose(1, 2).contiguous(), down_proj.transpose(1, 2).contiguous())


def experts_to_hf(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """loom's ``(w_gate, w_up, w_down)`` -> transformers' ``(gate_up_proj,
    down_proj)``: the inverse of `experts_from_hf` (any slice of experts)."""
    return torch.cat([w_gate, w_up], dim=2).transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()


def _norm_topk(block, config) -> bool:
    fixed = _BLOCKS[type(block).__name__]
    return bool(getattr(config, "norm_topk_prob", False)) if fixed is None else fixed


class SparseMoE(nn.Module):
    """A transformers sparse MoE block run by loom's `MoE` (module docstring):
    ``forward(hidden_states [..., dim]) -> [..., dim]`` in the input's dtype.
    ``moe`` holds the router and this rank's experts; ``shared_expert`` and
    ``shared_expert_gate`` (Qwen2-MoE) are the block's own modules.  Raises
    ValueError for a block it cannot run exactly (router jitter, an
    activation other than SiLU, recorded router logits)."""

    def __init__(self, block: nn.Module, config, *, ep_group=None, dispatcher: str = "standard",
                 llep: LLEPConfig | None = None):
        super().__init__()
        kind = type(block).__name__
        if kind not in _BLOCKS:
            raise ValueError(f"{kind}: loom replaces only {sorted(_BLOCKS)}")
        if getattr(config, "router_jitter_noise", 0.0):
            raise ValueError(f"router_jitter_noise={config.router_jitter_noise}: loom's MoE has no router "
                             f"jitter; set it to 0")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: loom's experts are SwiGLU (silu)")
        if getattr(config, "output_router_logits", False):
            raise ValueError("output_router_logits=True: loom's MoE does not return router logits (nor "
                             "transformers' load-balancing loss made of them); set it to False")
        gate, experts = block.gate, block.experts
        num_experts, dim = gate.weight.shape
        hidden = experts.down_proj.shape[-1]
        moe = MoE(dim, hidden, num_experts, gate.top_k, ep_group=ep_group, dispatcher=dispatcher, llep=llep,
                  aux_loss_coef=0.0, gating="softmax_topk", norm_topk=_norm_topk(block, config),
                  router_dtype=torch.float32)
        self.moe = moe.to(device=gate.weight.device, dtype=gate.weight.dtype)
        mine = slice(moe.ep_rank * moe.experts_per_rank, (moe.ep_rank + 1) * moe.experts_per_rank)
        with torch.no_grad():
            self.moe.router.weight.copy_(gate.weight)
            for loom_w, hf_w in zip(moe.expert_parameters(), experts_from_hf(experts.gate_up_proj[mine],
                                                                            experts.down_proj[mine])):
                loom_w.copy_(hf_w)
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self._hf_block = (type(block), config)  # a tuple: no submodule, no state

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.moe(hidden_states)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return out

    def to_hf(self) -> nn.Module:
        """The transformers block with these weights (every expert must live
        here: ``ep_group`` None, or one rank).  Raises ValueError otherwise."""
        if self.moe.world != 1:
            raise ValueError(f"to_hf needs every expert on this process; this block holds "
                             f"{self.moe.experts_per_rank} of {self.moe.num_experts} (ep={self.moe.world})")
        cls, config = self._hf_block
        w = self.moe.router.weight
        block = cls(config).to(device=w.device, dtype=w.dtype)
        gate_up, down = experts_to_hf(*self.moe.expert_parameters())
        with torch.no_grad():
            block.gate.weight.copy_(w)
            block.experts.gate_up_proj.copy_(gate_up)
            block.experts.down_proj.copy_(down)
        if self.shared_expert is not None:
            block.shared_expert, block.shared_expert_gate = self.shared_expert, self.shared_expert_gate
        return block


def _children(model: nn.Module, kind):
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if kind(child)]


def replace_sparse_blocks(model: nn.Module, *, ep_group=None, dispatcher: str = "standard",
                          llep: LLEPConfig | None = None) -> list[SparseMoE]:
    """Replace (in place) every Mixtral / Qwen2-MoE sparse block of ``model``
    by a `SparseMoE` expert-parallel over ``ep_group`` (None: no expert
    parallelism) with ``dispatcher`` ("standard" or "llep").  Every rank must
    hold the same weights (the same seed or checkpoint): each keeps its ep
    slice.  Returns the new blocks (already replaced ones included).  Raises
    ValueError for a model without any, or one `SparseMoE` refuses."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"moe={dispatcher!r} must be one of {DISPATCHERS}")
    config = model.config
    for parent, name, block in _children(model, lambda m: type(m).__name__ in _BLOCKS):
        setattr(parent, name, SparseMoE(block, config, ep_group=ep_group, dispatcher=dispatcher, llep=llep))
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block loom can run "
                         f"({', '.join(sorted(_BLOCKS))})")
    return blocks


def restore_sparse_blocks(model: nn.Module) -> int:
    """Turn every `SparseMoE` of ``model`` back into its transformers block
    (`SparseMoE.to_hf`), in place; returns how many."""
    found = _children(model, lambda m: isinstance(m, SparseMoE))
    for parent, name, block in found:
        setattr(parent, name, block.to_hf())
    return len(found)


def has_sparse_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a sparse MoE block loom can replace (or has replaced)."""
    return any(type(m).__name__ in _BLOCKS or isinstance(m, SparseMoE) for m in model.modules())
