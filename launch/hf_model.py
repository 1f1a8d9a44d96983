"""A Hugging Face ``transformers`` causal LM as the job's model:
``loom train --hf-config PATH [--init-from-hf DIR]``.

``PATH`` is a local ``config.json`` or a directory holding one (no hub
access: nothing is downloaded, no remote code runs); the model is
``AutoModelForCausalLM.from_config`` of it, seeded by ``--seed`` on every
rank, or with ``--init-from-hf DIR`` the weights of a local safetensors
checkpoint (``model.safetensors`` or a sharded index;
``from_pretrained(DIR, use_safetensors=True, local_files_only=True)``: no
pickle is read).  ``--init-from-hf DIR`` alone implies ``--hf-config DIR``.

The model joins the job as a user model (`loom.launch.user_model`) built by
`build_hf_model`: `CausalLMAdapter` maps ``(tokens, positions, cu_seqlens)``
to logits, and its attention layers carry swappable loom cores
(`loom.parallel.hf.prepare`), so ``--sp`` (ring, Ulysses), packed documents,
data parallelism, mixed precision, checkpoints, recovery and the fault
monitor apply as to any loom model.  The job's ``[model]`` shape options
(vocab, dim, heads, kv_heads, layers; num_experts and top_k of an MoE model)
are taken from the config file, so the data and the checks before the
workers start see the model's vocabulary.

MoE models (Mixtral, Qwen2-MoE): their sparse blocks run as loom `MoE`
layers (``--moe standard``, the default there, or ``--moe llep``),
expert-parallel over the mesh's ep group with ``--ep N`` (`loom.parallel.hf_moe`); checkpoints hold the experts in
loom's layout with their ep placement (resumable at another ep or world),
and `export_hf` maps them back to transformers' layout.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .config import ConfigError, JobConfig

HF_FACTORY = "loom.launch.hf_model:build_hf_model"
_CONFIG_LIMIT = 4 * 2**20  # a config.json is a few KiB; refuse to read megabytes of something else
_MAX_LAYERS = 4096  # published causal LMs have at most a few hundred; more is a hostile or broken file
_MAX_PARAMETERS = 10**13  # ten trillion: beyond any model one replica per rank can hold
_SIZES = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
                   "sliding_window")


def config_path(path: str) -> str:
    """The ``config.json`` that ``--hf-config PATH`` names (the file, or the
    one inside the directory).  Raises ConfigError when there is none."""
    if not path or "://" in path:
        raise ConfigError(f"--hf-config={path!r} must be a local config.json or a directory holding one "
                          f"(no hub or remote access at run time)")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"--hf-config={path}: no file {file!r}")
    return file


def read_hf_config(path: str) -> dict:
    """The JSON of ``--hf-config PATH`` as a dict, checked to describe a
    causal LM loom can shape its job by.  Raises ConfigError naming the file
    and the field."""
    file = config_path(path)
    size = os.path.getsize(file)
    if size > _CONFIG_LIMIT:
        raise ConfigError(f"--hf-config: {file} is {size} bytes, not a model config (at most {_CONFIG_LIMIT})")
    try:
        with open(file, "rb") as fh:
            # at most one byte past the limit: a file that grows, or reports no size (/proc), is refused too
            return parse_hf_config(fh.read(_CONFIG_LIMIT + 1), f"--hf-config: {file}")
    except OSError as exc:
        raise ConfigError(f"--hf-config: cannot read {file}: {exc}") from None


def parse_hf_config(text: bytes | str, where: str) -> dict:
    """A transformers config's JSON text as a dict, checked as
    `read_hf_config` says (``where`` starts the errors)."""
    if len(text) > _CONFIG_LIMIT:
        raise ConfigError(f"{where}: {len(text)} bytes, not a model config (at most {_CONFIG_LIMIT})")
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} is not a JSON model config: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests JSON too deeply to be a model config") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"{where} has no \"model_type\": not a transformers config.json")
    if "auto_map" in data:
        raise ConfigError(f"{where} names custom model code (auto_map): loom runs no code from a "
                          f"model directory; use a model transformers ships")
    for key in ("attn_implementation", "_attn_implementation"):
        if data.get(key) not in (None, "eager", "sdpa"):
            raise ConfigError(f"{where}: {key}={data[key]!r}: loom attends with its own attention and loads no "
                              f"attention kernels (from the hub or a package) for a config; drop the key")
    if data.get("quantization_config") is not None:
        raise ConfigError(f"{where} has a quantization_config: loom trains unquantized weights; drop it")
    for key in _SIZES + _OPTIONAL_SIZES:
        value = data.get(key)
        if key in _OPTIONAL_SIZES and value is None or key == "sliding_window" and value == 0:  # 0: no window
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key}={value!r} must be a positive integer"
                              + (" (or absent)" if key in _OPTIONAL_SIZES else ""))
    layers, dim = data["num_hidden_layers"], data["hidden_size"]
    if layers > _MAX_LAYERS:
        raise ConfigError(f"{where}: num_hidden_layers={layers} is more than loom builds (at most {_MAX_LAYERS})")
    least = data["vocab_size"] * dim + layers * 2 * dim * dim  # embeddings + q and o projections, at least
    if least > _MAX_PARAMETERS:
        raise ConfigError(f"{where}: vocab_size={data['vocab_size']}, hidden_size={dim}, num_hidden_layers={layers} "
                          f"make at least {least:.3g} parameters, more than any replica holds (at most "
                          f"{_MAX_PARAMETERS:.0e})")
    return data


def hf_experts(data: dict) -> tuple[int, int] | None:
    """(experts per MoE layer, experts per token) of a transformers config's
    JSON (Mixtral's ``num_local_experts``, Qwen2-MoE's ``num_experts``), or
    None for a dense model."""
    experts = data.get("num_local_experts", data.get("num_experts"))
    top_k = data.get("num_experts_per_tok")
    if isinstance(experts, int) and not isinstance(experts, bool) and experts > 0 and isinstance(top_k, int):
        return experts, top_k
    return None


def apply_hf_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with ``--hf-config`` (or ``--init-from-hf`` alone) resolved:
    ``train.model`` set to `HF_FACTORY`, ``[model]``'s shape read from the
    config file (``dim`` is the attention width, heads × head_dim: the
    config's hidden_size unless its head_dim says otherwise; an MoE model's
    experts too; its sparse blocks always run loom's MoE, ``--moe none``
    meaning ``--moe standard``, so that its checkpoints resume at any
    ``--ep``).  Idempotent; unchanged without either option.  Raises
    ConfigError for another ``--model`` next to it or a bad config file."""
    t = cfg.train
    if not t.hf_config and t.init_from_hf:
        t.hf_config = t.init_from_hf
    if not t.hf_config:
        return cfg
    if t.model and t.model != HF_FACTORY:
        raise ConfigError(f"--hf-config and --model={t.model} both name the model: give one")
    if t.model_args:
        raise ConfigError("--model-args is for --model's factory; a --hf-config model is shaped by its config.json")
    data = read_hf_config(t.hf_config)
    t.model = HF_FACTORY
    heads = data["num_attention_heads"]
    # loom derives the attention head dim as dim // heads: a config whose head_dim is not hidden_size / heads
    # (Qwen3, Gemma) shapes the job by its attention width instead
    head_dim = data.get("head_dim")
    dim = heads * head_dim if head_dim is not None else data["hidden_size"]
    moe = {}
    if hf_experts(data) is not None:
        moe = dict(zip(("num_experts", "top_k"), hf_experts(data)))
        if cfg.model.moe == "none":  # always loom's layout: checkpoints resume at any ep
            moe["moe"] = "standard"
    shape = dict(vocab=data["vocab_size"], dim=dim, heads=heads, layers=data["num_hidden_layers"],
                 kv_heads=data.get("num_key_value_heads"), **moe)
    defaults = type(cfg.model)()
    for name, value in shape.items():  # a shape option set to something else would be overridden silently
        given = getattr(cfg.model, name)
        if name != "moe" and given != getattr(defaults, name) and given != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}={given} conflicts with --hf-config={t.hf_config}, whose config.json gives "
                              f"{value}: the model's shape comes from its config; drop {flag}")
    try:
        cfg.model = dataclasses.replace(cfg.model, **shape)
    except ValueError as exc:
        raise ConfigError(f"--hf-config={t.hf_config}: loom cannot shape its job by it: {exc}") from None
    return cfg


class CausalLMAdapter(torch.nn.Module):
    """A transformers ``*ForCausalLM`` as a loom model: ``forward(tokens
    [b, s] int64, positions [s] or [b, s] int64 (global indices of a sequence
    shard; default 0..s-1), cu_seqlens (packed document boundaries, see
    `loom.parallel.local_attention`)) -> logits [b, s, vocab]``.  ``lm`` is
    the wrapped model (its state dict keys start with ``lm.``).

    ``blocks``, ``embed`` and ``head`` name the wrapped model's decoder layers
    (`loom.parallel.hf.decoder_layers`), input embedding and output head, as
    loom's reference `Transformer` has them: ``--shard-state`` shards each
    block, the embedding and the head as units of their own (a tied
    embedding and head share their weight: both stay in the root unit, one
    tensor sharded once), ``--activation-checkpointing`` recomputes each
    block.  They are properties, not submodules: the state dict keeps one
    name per tensor."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        from loom.parallel.hf import prepare
        prepare(lm)
        self.lm = lm

    @property
    def blocks(self) -> torch.nn.ModuleList:
        from loom.parallel.hf import decoder_layers
        return decoder_layers(self.lm)

    @property
    def embed(self) -> torch.nn.Module:
        return self.lm.get_input_embeddings()

    @property
    def head(self) -> torch.nn.Module | None:
        return self.lm.get_output_embeddings()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cu_seqlens=None):
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        extra = {} if cu_seqlens is None else {"loom_cu_seqlens": cu_seqlens}
        return self.lm(input_ids=tokens, position_ids=positions, use_cache=False, **extra).logits


def _transformers():
    from loom.parallel.hf import import_transformers
    try:
        return import_transformers()
    except ImportError:
        raise ConfigError("--hf-config needs transformers: pip install -e \".[hf]\"") from None


def transformers_config(data: dict, where: str):
    """The transformers config of ``data`` (checked by `parse_hf_config`):
    built from the checked dict, so the file is not read again.  Raises
    ConfigError when transformers refuses it (``where`` starts the error)."""
    transformers = _transformers()
    try:
        return transformers.AutoConfig.for_model(**data)
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types (strict dataclasses)
        raise ConfigError(f"{where}: transformers cannot read it: {type(exc).__name__}: {exc}") from None


def build_hf_model(cfg: JobConfig, moe_group=None) -> CausalLMAdapter:
    """The `CausalLMAdapter` of ``cfg.train.hf_config`` (weights from
    ``--init-from-hf`` when given, except on the meta device, where loom only
    checks the model's shape); with ``--moe standard|llep`` its sparse MoE
    blocks run loom's MoE, expert-parallel over ``moe_group`` (the mesh's ep
    group; None: every expert here).  Raises ConfigError for a config
    transformers cannot build a causal LM from, weights that do not fit it
    (missing, mis-shaped, not safetensors, shards outside the directory), a
    sliding window shorter than --seq-len, or ``--moe`` for a model without
    sparse blocks loom runs."""
    transformers, t = _transformers(), cfg.train
    config = transformers_config(read_hf_config(t.hf_config), f"--hf-config={t.hf_config}")
    on_meta = torch.empty(0).device.type == "meta"
    which = f"--init-from-hf={t.init_from_hf}" if t.init_from_hf else f"--hf-config={t.hf_config}"
    try:
        if t.init_from_hf and not on_meta:
            lm = _load_weights(transformers, t.init_from_hf, config)
        else:
            if t.init_from_hf:  # on the meta device (the driver's check): the files are there, the index sane
                _check_weight_files(t.init_from_hf)
            lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:  # ImportError: a package the model needs
        raise ConfigError(f"{which}: {exc}") from None
    if cfg.model.moe != "none":
        from loom.parallel.hf_moe import replace_sparse_blocks
        try:
            replace_sparse_blocks(lm, ep_group=moe_group, dispatcher=cfg.model.moe, llep=cfg.model.llep)
        except ValueError as exc:
            raise ConfigError(f"--hf-config={t.hf_config} with --moe {cfg.model.moe}: {exc}") from None
    try:
        model = CausalLMAdapter(lm)
    except ValueError as exc:
        raise ConfigError(f"{which}: {exc}") from None
    check_windows(model, t.seq_len, which)
    return model


def check_windows(model: torch.nn.Module, seq_len: int, which: str) -> None:
    """Raise ConfigError when a sliding window of ``model``'s attention is
    shorter than ``seq_len`` tokens (loom's attention has no window; a window
    at least that long changes nothing)."""
    from loom.parallel.hf import sliding_windows
    short = min(sliding_windows(model), default=None)
    if short is not None and short < seq_len:
        raise ConfigError(f"{which}: sliding-window attention (window {short}) over --seq-len {seq_len} is not "
                          f"supported by loom's attention: use --seq-len {short} or less, or disable the window "
                          f"in the config (sliding_window: null / use_sliding_window: false)")


INDEX_FILE = "model.safetensors.index.json"


def _check_weight_files(directory: str) -> None:
    """Raise ValueError unless ``directory`` holds ``model.safetensors`` or
    a sane sharded index (`_check_index`)."""
    if not os.path.isfile(os.path.join(directory, "model.safetensors")) and \
            not os.path.isfile(os.path.join(directory, INDEX_FILE)):
        raise ValueError(f"no model.safetensors or {INDEX_FILE} in {directory} (loom reads safetensors only, "
                         f"never a pickle such as pytorch_model.bin)")
    _check_index(directory)


def _check_index(directory: str) -> None:
    """Raise ValueError when the sharded index of ``directory`` (if any) is
    not JSON with a ``weight_map`` of tensor names to shard files *of that
    directory* (plain file names ending .safetensors: nothing outside it is
    read)."""
    file = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(file):
        return
    limit = 64 * _CONFIG_LIMIT
    with open(file, "rb") as fh:
        text = fh.read(limit + 1)
    if len(text) > limit:
        raise ValueError(f"{INDEX_FILE} is over {limit} bytes: not a weights index")
    try:
        index = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{INDEX_FILE} is not a JSON weights index: {exc}") from None
    shards = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(shards, dict) or not shards:
        raise ValueError(f"{INDEX_FILE} has no weight_map (tensor name -> shard file)")
    for name, shard in shards.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", "..") \
                or not shard.endswith(".safetensors"):
            raise ValueError(f"{INDEX_FILE}: {name!r} is in {shard!r}, not a .safetensors file of {directory} "
                             f"(shards are plain file names in the checkpoint's directory)")


def _load_weights(transformers, directory: str, config) -> torch.nn.Module:
    """The model of ``config`` with every weight read from the safetensors
    of ``directory``.  Raises ValueError naming the weights the files lack
    (transformers would initialise them at random and carry on)."""
    _check_weight_files(directory)
    try:
        lm, info = transformers.AutoModelForCausalLM.from_pretrained(
            directory, config=config, use_safetensors=True, local_files_only=True, trust_remote_code=False,
            dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)  # listed below
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a damaged file is not exported
        if isinstance(exc, (OSError, ValueError, RuntimeError)):
            raise
        raise ValueError(f"cannot read its weights: {type(exc).__name__}: {exc}") from None
    missing = sorted(info.get("missing_keys") or ())
    mismatched = [m[0] if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        listed = ", ".join((missing + mismatched)[:5]) + (" ..." if len(missing) + len(mismatched) > 5 else "")
        raise ValueError(f"its safetensors lack {len(missing)} and mis-shape {len(mismatched)} of the model's "
                         f"weights ({listed}): they are not this config's checkpoint")
    return lm


def hf_config_text(model: torch.nn.Module) -> str | None:
    """The transformers config (JSON text) of the `CausalLMAdapter` inside
    ``model`` (wrappers included), or None when there is none: checkpoints
    keep it (``hf/config``) so that `export_hf` needs nothing but the store."""
    for module in model.modules():
        if isinstance(module, CausalLMAdapter):
            data = module.lm.config.to_dict()
            data.pop("_name_or_path", None)  # where the config was read: not the model's
            return json.dumps(data, sort_keys=True)
    return None


def export_hf(url: str, out: str, step: int | None = None) -> str:
    """Write a ``save_pretrained`` directory (``config.json`` +
    ``model.safetensors``) at ``out`` from step ``step`` (default: the newest
    committed) of the loom checkpoint at ``url`` of a ``--hf-config`` job,
    saved at any world size and layout (loaded here into one process).
    Returns a one-line summary.  Raises FileNotFoundError (no such step),
    ValueError (not a --hf-config checkpoint, a bad config), FileExistsError
    (``out`` exists and is not an empty directory)."""
    from loom import checkpoint
    transformers = _transformers()
    store = checkpoint.CheckpointStore(url)
    step = store.latest() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    manifest = store.read_manifest(step)
    entry = manifest.values.get("hf")
    saved = entry.decoded() if entry is not None and not entry.is_per_rank else None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), str):
        raise ValueError(f"step {step} at {url} holds no transformers config (hf/config): it was not saved by a "
                         f"--hf-config job")
    where = f"the hf/config of step {step} at {url}"
    config = transformers_config(parse_hf_config(saved["config"], where), where)
    lm = transformers.AutoModelForCausalLM.from_config(config)
    experts = any(".moe.w_gate" in key for key in manifest.tensors)
    if experts:  # saved in loom's expert layout (any ep): load every expert here, then map back
        from loom.parallel.hf_moe import replace_sparse_blocks
        replace_sparse_blocks(lm)
    model = CausalLMAdapter(lm)
    dtypes = {e.dtype for key, e in manifest.tensors.items() if key.startswith("model/")}
    if len(dtypes) == 1:
        model.to(getattr(torch, dtypes.pop()))
    target = {"model": model.state_dict()}
    checkpoint.load(target, url, step=step)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty directory: give a new one")
    if experts:
        from loom.parallel.hf_moe import restore_sparse_blocks
        restore_sparse_blocks(lm)
    lm.save_pretrained(out, safe_serialization=True)
    count = sum(p.numel() for p in lm.parameters())
    return f"step {step} of {url}: {type(lm).__name__}, {count} parameters -> {out}"
