"""Your own model: ``loom train --model MODULE:FACTORY``.

``MODULE`` is an importable module (``my_models.lm``; the current directory
is searched too) or a file (``path/to/lm.py``); ``FACTORY(config)`` returns a
``torch.nn.Module`` that maps token ids ``[batch, seq]`` (int64) to logits
``[batch, seq, vocab]``.  ``config`` is the job's `JobConfig`:
``config.model.vocab`` is the data's vocabulary (tokens are below it),
``config.train.seq_len`` / ``config.train.dtype`` say what the model will see
(loom casts it to the dtype afterwards), and ``config.train.model_args`` holds
the model's own settings (``[train.model_args]`` in TOML, ``--model-args
depth=3 act=gelu`` on the command line).  Every rank calls the factory after
seeding torch with ``--seed``, so all ranks start from the same weights.

Data parallelism works with any such model.  Sequence parallelism (``--sp >
1``) swaps the model's attention cores from outside, as for loom's reference
transformer, so the model must expose them (`loom.parallel.core_kind`: each
attention module calls ``self.core(q, k, v, causal=True)`` with ``self.core =
loom.parallel.local_attention``) and take the global ``positions`` of its
shard's tokens in ``forward(tokens, positions)``.  ``--ep``, ``--moe`` and
``--hdp`` apply only to the reference model (``--ep``/``--moe`` also to a
``--hf-config`` MoE model: `loom.launch.hf_model`).

A model whose forward takes no ``positions`` is called as ``model(tokens)``:
`build_user_model` drops the training loop's ``positions=None`` for it.

Real data packs documents into windows and keeps attention inside each
document: the forward then gets ``cu_seqlens`` (int64 document boundaries
over the batch flattened row-major, the flash-attn varlen convention; loom's
attention cores take it as a keyword).  A model whose forward takes no
``cu_seqlens`` is refused before the workers start unless the job passes
``--cross-document-attention`` (or ``--data synthetic``).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys

import torch

from loom.parallel import core_kind, sequence_parallel_gaps

from .config import ConfigError, JobConfig, sp_layout
from .datasets import forward_takes_documents
from .hf_model import HF_FACTORY, hf_experts, read_hf_config


def split_spec(spec: str) -> tuple[str, str]:
    """``"MODULE:FACTORY"`` -> ``(MODULE, FACTORY)``; ConfigError if malformed."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module.strip() or not name.strip().isidentifier():
        raise ConfigError(f"--model={spec!r} must be MODULE:FACTORY (e.g. my_models.lm:make_model or "
                          f"path/to/lm.py:make_model)")
    return module.strip(), name.strip()


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _find_file(module: str, spec: str) -> str:
    """A model file: as given (relative to the current directory), else under
    an entry of sys.path (Ray workers have the driver's directory there)."""
    candidates = [module] if os.path.isabs(module) else [module] + [
        os.path.join(entry, module) for entry in sys.path if entry]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ConfigError(f"--model={spec}: no file {module!r} (from {os.getcwd()})")


def _import(module: str, spec: str):
    try:
        if _is_path(module):
            path = _find_file(module, spec)
            name = "loom_user_model_" + hashlib.sha1(path.encode()).hexdigest()[:12]
            if name not in sys.modules:
                file_spec = importlib.util.spec_from_file_location(name, path)
                loaded = importlib.util.module_from_spec(file_spec)
                sys.modules[name] = loaded  # before it runs: dataclasses and pickling look it up
                try:
                    file_spec.loader.exec_module(loaded)
                except BaseException:
                    del sys.modules[name]
                    raise
            return sys.modules[name]
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # `loom` (a console script) does not search it by itself
        return importlib.import_module(module)
    except ConfigError:
        raise
    except (Exception, SystemExit) as exc:  # the user's module failed to import (or exit()ed): say so
        raise ConfigError(f"--model={spec}: cannot import {module!r}: {type(exc).__name__}: {exc}") from exc


def load_factory(spec: str):
    """The callable ``FACTORY`` of ``--model MODULE:FACTORY``.  Raises
    ConfigError naming the spec when the module does not import, has no such
    attribute, or it is not callable."""
    module_name, name = split_spec(spec)
    module = _import(module_name, spec)
    if not hasattr(module, name):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; it has {public}" if public else "")
        raise ConfigError(f"--model={spec}: {module_name!r} has no {name!r}{hint}")
    factory = getattr(module, name)
    if not callable(factory):
        raise ConfigError(f"--model={spec}: {name!r} is a {type(factory).__name__}, not a callable "
                          f"FACTORY(config) -> torch.nn.Module")
    return factory


def build_user_model(cfg: JobConfig, moe_group=None) -> torch.nn.Module:
    """``FACTORY(cfg)`` of ``cfg.train.model``, checked to be a torch.nn.Module
    with trainable parameters (TypeError otherwise).  Seed torch first for identical weights on every rank.
    A ``--hf-config`` model also gets ``moe_group`` (the mesh's ep group: its MoE blocks' experts)."""
    factory = load_factory(cfg.train.model)
    model = factory(cfg, moe_group) if cfg.train.model == HF_FACTORY else factory(cfg)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model={cfg.train.model}: the factory returned a {type(model).__name__}, not a "
                        f"torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise TypeError(f"--model={cfg.train.model}: the factory's {type(model).__name__} has no trainable "
                        f"parameters (none, or all with requires_grad=False): nothing to train")
    if not _takes_positions(model):
        model.register_forward_pre_hook(_drop_no_positions, with_kwargs=True)
    model.register_forward_hook(_LogitsCheck(cfg.train.model, cfg.model.vocab), with_kwargs=True)
    return model


class _LogitsCheck:
    """A forward hook: the model's output must be floating-point logits
    ``[*tokens.shape, vocab]`` for its input tokens (shapes only: cheap, and
    the same on every rank, so every rank stops at the same step).  Raises
    TypeError naming the spec and both shapes (instead of an error from deep
    inside the loss)."""

    def __init__(self, spec: str, vocab: int):
        self.spec, self.vocab = spec, vocab

    def __call__(self, module, args, kwargs, output):
        tokens = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(tokens, torch.Tensor):
            return None
        want = [*tokens.shape, self.vocab]
        if isinstance(output, torch.Tensor) and list(output.shape) == want and output.is_floating_point():
            return None
        got = (f"a {output.dtype} tensor of shape {list(output.shape)}" if isinstance(output, torch.Tensor)
               else f"a {type(output).__name__}")
        raise TypeError(f"--model={self.spec}: the model returned {got} for token ids of shape "
                        f"{list(tokens.shape)}; it must return floating-point logits [batch, seq, vocab] = "
                        f"{want} (vocab: config.model.vocab = {self.vocab})")


def _takes_positions(model: torch.nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "positions" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _drop_no_positions(module, args, kwargs):
    """``model(tokens, None)`` -> ``model(tokens)`` for a model without positions."""
    if kwargs.get("positions", "absent") is None:
        kwargs = {k: v for k, v in kwargs.items() if k != "positions"}
    if len(args) == 2 and args[1] is None:
        args = args[:1]
    return args, kwargs


def user_model_problems(cfg: JobConfig) -> list[str]:
    """What stops ``cfg``'s own model from running, found before any worker
    starts: the factory does not load; ``--ep``/``--moe``/``--hdp`` (reference
    model only); ``--sp > 1`` for a model without swappable attention cores
    or ``positions``; ``--activation-checkpointing`` for a model without a
    ``blocks`` list (checked on an instance built on the meta device, which
    allocates no memory; a factory that cannot build there is checked by the
    workers instead); a ConfigError the factory raises there (a
    ``--hf-config`` model is always built there)."""
    spec, p = cfg.train.model, cfg.parallel
    try:
        factory = load_factory(spec)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    if spec == HF_FACTORY and (p.ep > 1 or cfg.model.moe != "none"):
        if hf_experts(read_hf_config(cfg.train.hf_config)) is None:
            problems.append(f"--ep/--moe need an MoE model (Mixtral, Qwen2-MoE); --hf-config={cfg.train.hf_config} "
                            f"has no experts: use --ep 1 --moe none")
    elif p.ep > 1 or cfg.model.moe != "none":
        problems.append(f"--ep/--moe apply only to loom's reference model, not --model={spec}: use "
                        f"--ep 1 --moe none (or put MoE layers in your model)")
    if p.hdp:
        problems.append(f"--hdp applies only to loom's reference model, not --model={spec}")
    model = None
    documents = not cfg.data.synthetic and not cfg.data.cross_document_attention
    if p.sp > 1 or cfg.train.activation_checkpointing or documents or cfg.train.hf_config:
        try:
            with torch.device("meta"):
                model = factory(cfg)
        except ConfigError as exc:  # the factory's own verdict on the job's options (e.g. --hf-config's)
            return problems + [str(exc)]
        except Exception:  # noqa: BLE001 - e.g. it loads weights; the workers' check will say
            model = None
    if cfg.train.activation_checkpointing and isinstance(model, torch.nn.Module) and not isinstance(
            getattr(model, "blocks", None), (torch.nn.ModuleList, list, tuple)):
        problems.append(f"--activation-checkpointing checkpoints each module of the model's 'blocks' list, "
                        f"but the model of --model={spec} ({type(model).__name__}) has no 'blocks' "
                        f"(a torch.nn.ModuleList of its layers): add one, or drop --activation-checkpointing")
    if documents and isinstance(model, torch.nn.Module) and not forward_takes_documents(model):
        problems.append(f"--data {cfg.data.data} packs documents into windows and keeps attention inside each "
                        f"document, but the forward of --model={spec} ({type(model).__name__}) takes no "
                        f"`cu_seqlens` (document boundaries, int64, flash-attn varlen convention; loom's "
                        f"attention cores take it): accept cu_seqlens, or pass --cross-document-attention")
    if p.sp > 1:
        if isinstance(model, torch.nn.Module):
            gaps = sequence_parallel_gaps(model)
            if gaps is not None:
                problems.append(f"--sp={p.sp} needs the model to expose its attention, but the model of "
                                f"--model={spec}: {gaps}; or train it with --sp 1 (data parallelism works "
                                f"with any model)")
            elif _has_linear_cores(model) and sp_layout(cfg) != "contiguous":
                problems.append(f"--model={spec} has linear-attention layers: they need --sp-layout "
                                f"contiguous")
    return problems


def _has_linear_cores(model: torch.nn.Module) -> bool:
    return any(core_kind(m) == "linear" for m in model.modules())
