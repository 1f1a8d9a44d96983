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
(vocab, dim, heads, kv_heads, layers) are taken from the config file, so the
data and the checks before the workers start see the model's vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .config import ConfigError, JobConfig

HF_FACTORY = "loom.launch.hf_model:build_hf_model"
_CONFIG_LIMIT = 4 * 2**20  # a config.json is a few KiB; refuse to read megabytes of something else


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
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--hf-config: {file} is not a JSON model config: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"--hf-config: {file} has no \"model_type\": not a transformers config.json")
    if "auto_map" in data:
        raise ConfigError(f"--hf-config: {file} names custom model code (auto_map): loom runs no code from a "
                          f"model directory; use a model transformers ships")
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--hf-config: {file}: {key}={value!r} must be a positive integer")
    return data


def apply_hf_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with ``--hf-config`` (or ``--init-from-hf`` alone) resolved:
    ``train.model`` set to `HF_FACTORY`, ``[model]``'s shape read from the
    config file.  Idempotent; unchanged without either option.  Raises
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
    try:
        cfg.model = dataclasses.replace(cfg.model, vocab=data["vocab_size"], dim=data["hidden_size"],
                                        heads=data["num_attention_heads"], layers=data["num_hidden_layers"],
                                        kv_heads=data.get("num_key_value_heads") or None)
    except ValueError as exc:
        raise ConfigError(f"--hf-config={t.hf_config}: loom cannot shape its job by it: {exc}") from None
    return cfg


class CausalLMAdapter(torch.nn.Module):
    """A transformers ``*ForCausalLM`` as a loom model: ``forward(tokens
    [b, s] int64, positions [s] or [b, s] int64 (global indices of a sequence
    shard; default 0..s-1), cu_seqlens (packed document boundaries, see
    `loom.parallel.local_attention`)) -> logits [b, s, vocab]``.  ``lm`` is
    the wrapped model (its state dict keys start with ``lm.``)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        from loom.parallel.hf import prepare
        prepare(lm)
        self.lm = lm

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cu_seqlens=None):
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        extra = {} if cu_seqlens is None else {"loom_cu_seqlens": cu_seqlens}
        return self.lm(input_ids=tokens, position_ids=positions, use_cache=False, **extra).logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("--hf-config needs transformers: pip install -e \".[hf]\"") from None
    return transformers


def build_hf_model(cfg: JobConfig) -> CausalLMAdapter:
    """The `CausalLMAdapter` of ``cfg.train.hf_config`` (weights from
    ``--init-from-hf`` when given, except on the meta device, where loom only
    checks the model's shape).  Raises ConfigError for a config transformers
    cannot build a causal LM from, or a weights directory without safetensors."""
    transformers = _transformers()
    t = cfg.train
    file = config_path(t.hf_config)
    try:
        config = transformers.AutoConfig.from_pretrained(file, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf-config={t.hf_config}: transformers cannot read it: {exc}") from None
    on_meta = torch.empty(0).device.type == "meta"
    try:
        if t.init_from_hf and not on_meta:
            lm = transformers.AutoModelForCausalLM.from_pretrained(
                t.init_from_hf, config=config, use_safetensors=True, local_files_only=True,
                trust_remote_code=False, dtype=torch.float32)
        else:
            lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        which = f"--init-from-hf={t.init_from_hf}" if t.init_from_hf else f"--hf-config={t.hf_config}"
        raise ConfigError(f"{which}: {exc}") from None
    return CausalLMAdapter(lm)
