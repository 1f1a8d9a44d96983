"""Hugging Face ``transformers`` causal LMs under loom's sequence parallelism.

`parallelize(model, mesh)` makes a ``*ForCausalLM`` model (Llama, Qwen2,
Mistral, ... : any model whose attention layers call transformers' attention
interface) attend across the sequence shards of ``mesh.sp_ranks``:

- loom registers an attention function (``"loom_sp"``) in transformers'
  ``AttentionInterface`` and sets the model's ``_attn_implementation`` to it;
  each attention layer gets the core of its own process group (ring attention
  or Ulysses, `loom.parallel.sequence_parallel_core`), so two models on two
  meshes live side by side.  transformers builds no mask for a registered
  implementation it does not know: causality is the core's.
- `ParallelCausalLM.shard` gives each rank its tokens (zigzag or contiguous
  shards), their *global* ``position_ids`` (rotary embeddings need them) and
  its shard of the labels shifted over the whole sequence (``labels=`` inside
  the model would shift within a shard: the loss is computed outside,
  `ParallelCausalLM.loss`).
- `ParallelCausalLM.sync` averages gradients over the world (dp × sp ranks
  hold replicas), bucketed all-reduces through `loom.comms` (the fault monitor
  sees them); expert weights over the ranks that hold the same experts.
- MoE models (Mixtral, Qwen2-MoE): ``moe="standard"|"llep"`` runs their
  sparse blocks as loom `MoE` layers, expert-parallel over ``mesh.ep_group``
  (`loom.parallel.hf_moe`: weights mapped, router kept).

transformers is an optional dependency (``pip install -e ".[hf]"``): it is
imported when `parallelize` runs, never when loom is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom import comms

from .expert_sync import ExpertParallelGradientSync
from .hf_moe import replace_sparse_blocks
from .llep import LLEPConfig
from .model import local_attention
from .sequence import shard_batch
from .sequence_parallel import mesh_core

ATTENTION_NAME = "loom_sp"
IGNORE_INDEX = -100  # transformers' label for "no loss here"


def import_transformers():
    """The transformers module; ImportError naming the ``hf`` extra without it."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("loom.parallel.hf needs transformers: pip install -e \".[hf]\"") from exc
    return transformers


# the keywords transformers' layers pass that loom's attention honours (sliding_window: see below) or that do
# not change what attention computes
_UNDERSTOOD = frozenset({"position_ids", "loom_cu_seqlens", "sliding_window", "use_cache", "cache_position",
                         "output_attentions", "output_hidden_states", "output_router_logits", "return_dict"})


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)[:40]


def _loom_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function contract: query ``[b, heads_q, s_local,
    d]``, key/value ``[b, heads_kv, s_local, d]`` -> ``(out [b, s_local,
    heads_q, d], None)`` (no attention weights), computed by the layer's loom
    ``core`` (`loom.parallel.core_kind`'s protocol; packed documents arrive as
    the ``loom_cu_seqlens`` keyword of the model's forward)."""
    core = getattr(module, "core", None)
    if core is None:
        raise RuntimeError(f"{type(module).__name__} runs loom's attention but was not prepared by "
                           f"loom.parallel.hf (prepare or parallelize)")
    if dropout:
        raise ValueError(f"loom's sequence-parallel attention has no attention dropout (got {dropout}); "
                         f"set the config's attention_dropout to 0")
    window = kwargs.get("sliding_window")
    if window:  # a window no longer than the positions attended changes nothing (distances stay < window)
        positions = kwargs.get("position_ids")
        last = None if positions is None else int(positions.max())
        if last is None or last >= window:
            raise ValueError(f"sliding-window attention (window {window}) over positions up to {last} is not "
                             f"supported by loom's attention: use sequences of at most {window} tokens or "
                             f"disable the window in the config")
    if attention_mask is not None:
        raise ValueError("loom's sequence-parallel attention takes no attention mask (causality is its own)")
    unknown = {key: value for key, value in kwargs.items()
               if key not in _UNDERSTOOD and value is not None and value is not False}
    if unknown:  # e.g. Gemma 2's logit softcap, gpt-oss' attention sinks (s_aux): ignoring them changes the model
        shown = ", ".join(f"{key}={_short(value)}" for key, value in unknown.items())
        raise ValueError(f"{type(module).__name__} asks the attention for {shown}, which loom's attention does "
                         f"not implement: this model cannot run under loom's attention")
    documents = kwargs.get("loom_cu_seqlens")
    extra = {} if documents is None else {"cu_seqlens": documents}
    query, key, value = _common_dtype(query, key, value)
    out = core(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
               causal=bool(getattr(module, "is_causal", True)), scale=scaling, **extra)
    return out, None


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in one dtype, as SDPA would take them: autocast's when it
    is on for their device (transformers' rotary embedding leaves q and k in
    float32 under autocast while v is in half precision), else the promoted
    dtype of them all."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _attention_layers(model) -> list[torch.nn.Module]:
    """The modules that call transformers' attention interface (they carry
    ``config``, ``layer_idx`` and ``scaling``)."""
    return [m for m in model.modules()
            if hasattr(m, "scaling") and hasattr(m, "layer_idx") and hasattr(m, "config")]


def sliding_windows(model) -> list[int]:
    """The sliding windows (tokens) of ``model``'s attention layers that
    have one, as transformers passes them to the attention function (the
    layer's ``sliding_window``, else the config's).  loom's attention honours
    a window only where it changes nothing: sequences of at most that many
    tokens."""
    windows = []
    for layer in _attention_layers(model):
        window = getattr(layer, "sliding_window", getattr(layer.config, "sliding_window", None))
        if window:
            windows.append(int(window))
    return windows


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``
    for Llama, Qwen2, Mistral, Mixtral; found by structure, not by name): the
    one `torch.nn.ModuleList` whose every entry holds exactly one of the
    model's attention layers, and which holds all of them.  These are the
    blocks loom shards one at a time (`loom.parallel.shard_data_parallel`'s
    ``blocks=``) and checkpoints (`loom.parallel.apply_activation_checkpointing`).
    Raises ValueError when no module list fits."""
    attention = {id(m) for m in _attention_layers(model)}
    for name, candidate in model.named_modules():
        if not isinstance(candidate, torch.nn.ModuleList) or len(candidate) != len(attention) or not attention:
            continue
        held = [[id(m) for m in layer.modules() if id(m) in attention] for layer in candidate]
        if all(len(ids) == 1 for ids in held) and {i for ids in held for i in ids} == attention:
            return candidate
    raise ValueError(f"{type(model).__name__}: no module list of decoder layers (one attention layer each, "
                     f"{len(attention)} in all) was found; pass the blocks yourself")


def _refuse_padding(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError("a padding attention_mask cannot be honoured under sequence parallelism: pack documents "
                         "without padding (labels=-100 where no loss is wanted)")


def prepare(model) -> list[torch.nn.Module]:
    """Route ``model``'s attention through loom: register loom's attention
    function with transformers, select it, and give every attention layer a
    swappable ``core`` (`loom.parallel.local_attention`, ``core_kind =
    "softmax"``), as loom's own layers have.  Idempotent.  Returns the
    attention layers.  Raises ValueError for a model with none or attention
    dropout in the config; a sliding window (`sliding_windows`) shorter than
    the positions attended is refused when the model runs."""
    transformers = import_transformers()
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no attention layer that calls transformers' attention "
                         f"interface (modules with config, layer_idx and scaling)")
    config = model.config
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={config.attention_dropout}: loom's sequence-parallel attention has "
                         f"no dropout; set it to 0")
    transformers.AttentionInterface.register(ATTENTION_NAME, _loom_attention)
    for layer in layers:
        if getattr(layer, "core", None) is None:
            layer.core, layer.core_kind = local_attention, "softmax"
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION_NAME)
        else:  # pragma: no cover - older transformers
            config._attn_implementation = ATTENTION_NAME
        model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
    return layers


class ParallelCausalLM:
    """A transformers causal LM prepared by `parallelize`: ``model`` (the
    same module, changed in place), ``shard``, ``loss`` and ``sync``."""

    def __init__(self, model, mesh, layout: str, group_size: int):
        self.model, self.mesh, self.layout = model, mesh, layout
        self._world_size = group_size
        self._grads = ExpertParallelGradientSync(model, None, ep_group=mesh.ep_group, edp_group=mesh.edp_group)

    def shard(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """This rank's share of a ``[batch, seq]`` int64 batch (the same on
        every rank of the sp group): ``{"input_ids", "position_ids",
        "labels"}``, each ``[batch, seq / sp]``.  ``labels`` default to the
        inputs (next-token prediction); they are shifted over the whole
        sequence before sharding (the last position gets -100).  Raises
        ValueError when seq does not split into the layout's chunks."""
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ")
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        index, size = self.mesh.sp_ranks.index(self.mesh.rank), self.mesh.sp
        ids, targets, positions = shard_batch(input_ids, shifted, index, size, self.layout)
        return {"input_ids": ids, "position_ids": positions.expand(ids.shape[0], -1), "labels": targets}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of this rank's ``logits [batch, seq_local, vocab]``
        against its shifted ``labels`` (from `shard`), scaled so that
        averaging the gradients over the world (`sync`) gives the gradient of
        the mean over every labelled token of the global batch; the value
        returned, averaged over the world, is that mean."""
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum().to(torch.float64).reshape(1)
        comms.all_reduce(count)
        if count.item() == 0:
            raise ValueError("no labelled token in the global batch (every label is -100)")
        return total * (self._world_size / count.item())

    def sync(self) -> None:
        """Average the gradients over every rank (call after backward);
        expert gradients are summed over the ranks that hold those experts
        and divided by the world size (`ExpertParallelGradientSync`)."""
        self._grads.sync()


def parallelize(model, mesh, *, sp_attention: str = "ring", layout: str | None = None,
                kernel: str = "auto", moe: str | None = None, llep: LLEPConfig | None = None) -> ParallelCausalLM:
    """Prepare a transformers causal LM for ``mesh`` (`loom.comms.mesh.Mesh`;
    every rank holds the whole model): its attention layers attend across
    ``mesh.sp_ranks`` by ``sp_attention`` ("ring", "ulysses", or
    "ulysses-ring" over the mesh's ``sp_inner`` groups), sequence shards laid
    out as ``layout`` (default zigzag for ring and ulysses-ring, contiguous
    for Ulysses); ``kernel``: the ring's block kernel (`ring_attention`).

    Returns a `ParallelCausalLM`.  Raises ImportError without transformers,
    ValueError for a model with no attention layer loom can drive, an unknown
    attention or layout or attention dropout in the config (and, when it
    runs, a sliding window shorter than the positions attended), ``moe`` for
    a model without sparse MoE blocks or that they cannot honour."""
    if moe is None and mesh.ep > 1:
        moe = "standard"
    if moe is not None:
        replace_sparse_blocks(model, ep_group=mesh.ep_group if mesh.ep > 1 else None, dispatcher=moe, llep=llep)
    layout = layout or ("contiguous" if sp_attention == "ulysses" else "zigzag")
    core = mesh_core(sp_attention, mesh, layout=layout, kernel=kernel)
    for layer in prepare(model):
        layer.core = core
    return ParallelCausalLM(model, mesh, layout, mesh.world_size)
