"""DeepSpeed ZeRO stage 1/2 checkpoint -> loom checkpoint.

A ZeRO-1/2 checkpoint keeps, per data-parallel rank, a flat fp32 partition of
every parameter group (the master weights) and the optimizer's state of that
partition (``zero_pp_rank_R_mp_rank_00_optim_states.pt``): flat tensors of
the partition's size (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
``momentum_buffer``, ...) and scalars (``step``).  Its
``param_slice_mappings`` say which range of the partition belongs to which
parameter.  A parameter's flat values are its ranks' ranges in rank order
(padding sits only at the end of the last partition).  The result is saved in
the layout of a plain PyTorch model + optimizer:

    {"model": {name: fp32 master weight, buffers...},
     "optim": {"state": {i: {state name: tensor, ...}}, "param_groups": [...]},
     "deepspeed": {"param_names": [...], "global_steps", "zero_stage", "dp_world_size", ...}}

so the same optimizer class over the same model (``torch.optim.AdamW``,
``torch.optim.SGD``, ...) can ``load_state_dict`` it, at any world size.

DeepSpeed's ``*.pt`` files are pickles.  They are read with
``torch.load(weights_only=True)``, which builds only tensors, plain
containers and the few DeepSpeed classes such files hold
(``deepspeed_engine.DEEPSPEED_CLASSES``); a file naming anything else is
refused before it is unpickled.  A directory written through loom's own
DeepSpeed engine (``install_deepspeed_engine``: its files are JSON pointers
into a loom store) is read through the pointers, which must name the store
``<save_dir>/loom`` (or ``loom_url``).  Damaged or unexpected input raises
`InvalidCheckpointError` (a ValueError) naming the file and field; the loom
checkpoint written holds no pickle.
"""
from __future__ import annotations

import math
import numbers
import os
import pickle
import re
import zipfile

import torch

from .manifest import InvalidCheckpointError
from .save import save
from .state import encode_value

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_FILE = "mp_rank_00_model_states.pt"


def _deepspeed_engine():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing deepspeed probes for an accelerator
    from . import deepspeed_engine
    return deepspeed_engine


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _torch_load(path: str) -> dict:
    """A DeepSpeed ``*.pt`` file, unpickled with ``weights_only=True`` and
    only DeepSpeed's known classes allowed (InvalidCheckpointError naming a
    class it refers to otherwise; nothing of it is run)."""
    engine = _deepspeed_engine()
    allowed = {engine.class_name(c): c for c in engine.DEEPSPEED_CLASSES}
    try:
        # scans the pickle's opcodes without running them
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidCheckpointError(f"{path} is not a torch checkpoint file: {_one_line(exc)}",
                                     file=path) from None
    refused = sorted(set(unsafe) - set(allowed))
    if refused:
        raise InvalidCheckpointError(
            f"{path} refers to {', '.join(refused)}, which loom does not load (a DeepSpeed ZeRO-1/2 file "
            f"holds only tensors, plain containers and {', '.join(sorted(allowed))})",
            file=path, field=refused[0])
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile file is a damaged file
        raise InvalidCheckpointError(f"{path} could not be read as a DeepSpeed checkpoint file: "
                                     f"{type(exc).__name__}: {_one_line(exc)}", file=path) from None
    if not isinstance(state, dict):
        raise InvalidCheckpointError(f"{path} holds a {type(state).__name__}, not a state dict", file=path)
    return state


def _is_pointer(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(1) == b"{"  # torch files are zip archives ("PK") or pickles (b"\x80")


def _read_file(path: str, loom_url: str) -> dict:
    """One DeepSpeed checkpoint file: a loom pointer is read through the loom
    store ``loom_url``; anything else as a DeepSpeed torch file."""
    if _is_pointer(path):
        return _deepspeed_engine().load_pointer(path, loom_url)
    return _torch_load(path)


def tag_directory(ds_dir: str, tag: str | None = None) -> str:
    """The directory holding one DeepSpeed checkpoint (``ds_dir/<tag>``,
    ``ds_dir/<latest tag>``, or ``ds_dir`` itself if it holds the files).
    Raises FileNotFoundError if there is none, InvalidCheckpointError for a
    tag that leaves ``ds_dir``."""
    ds_dir = os.fspath(ds_dir)
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {ds_dir} does not exist")
    if tag is None and any(_OPTIM.match(f) for f in os.listdir(ds_dir)):
        return ds_dir
    where = "--tag"
    if tag is None:
        latest = os.path.join(ds_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{ds_dir} holds no DeepSpeed checkpoint (no 'latest' file and no "
                                    f"*_optim_states.pt); pass --tag")
        with open(latest, "rb") as fh:
            raw = fh.read(4097)
        try:
            tag = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            tag = None
        where = latest
        if not tag or len(raw) > 4096:
            raise InvalidCheckpointError(f"{latest} does not hold a tag name", file=latest)
    tag = str(tag)
    if tag in ("", ".", "..") or "/" in tag or os.sep in tag or "\0" in tag:
        raise InvalidCheckpointError(f"tag {tag!r} (from {where}) is not a directory name inside {ds_dir}",
                                     file=where, field="tag")
    path = os.path.join(ds_dir, tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {path} does not exist")
    return path


def _optimizer_files(path: str) -> list[str]:
    found = {}
    for name in os.listdir(path):
        m = _OPTIM.match(name)
        if not m:
            continue
        if m.group(1):
            raise ValueError(f"{name}: DeepSpeed's bf16 optimizer layout is not supported; only the "
                             f"ZeRO stage 1/2 optimizer (zero_pp_rank_*_optim_states.pt)")
        if int(m.group(3)) != 0:
            raise ValueError(f"{name}: model-parallel checkpoints (mp_rank > 0) are not supported; "
                             f"only data-parallel ZeRO stage 1/2")
        found[int(m.group(2))] = os.path.join(path, name)
    if not found:
        raise FileNotFoundError(f"no zero_pp_rank_*_optim_states.pt in {path}")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"optimizer files in {path} are for ranks {sorted(found)}; some are missing")
    return [found[r] for r in range(len(found))]


# ------------------------------------------------------------ checked access

def _get(container, key, kind, file: str, where: str):
    """``container[key]``, which must be a ``kind``; InvalidCheckpointError
    naming ``file`` and the field otherwise."""
    field = f"{where}/{key}" if where else str(key)
    try:
        value = container[key]
    except (KeyError, IndexError, TypeError):
        raise InvalidCheckpointError(f"{file}: no {field!r} in the DeepSpeed checkpoint", file=file,
                                     field=field) from None
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidCheckpointError(f"{file}: {field!r} is a {type(value).__name__}, expected {names}",
                                     file=file, field=field)
    return value


def _count(value, file: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidCheckpointError(f"{file}: {field!r} = {value!r} is not a non-negative int", file=file,
                                     field=field)
    return int(value)


def _json_group(group: dict, file: str, where: str) -> dict:
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        v = v.item() if torch.is_tensor(v) and v.numel() == 1 else v
        try:
            encode_value(v, f"{where}/{k}")
        except TypeError as exc:
            raise InvalidCheckpointError(f"{file}: {exc}", file=file, field=f"{where}/{k}") from None
        out[k] = v
    return out


# --------------------------------------------------------------- conversion

def _group_states(ranks: list[dict], files: list[str], g: int) -> tuple[list[str], set, dict]:
    """Sort group ``g``'s optimizer states: every name in DeepSpeed's order,
    the flat ones (a tensor of the partition's size on each rank) and the
    scalar ones (equal on every rank) with their value.  Refuses anything
    else, naming it."""
    per_rank = []
    for osd, file in zip(ranks, files):
        states = osd["base_optimizer_state"]["state"].get(g) or {}
        if not isinstance(states, dict):
            where = f"optimizer_state_dict/base_optimizer_state/state/{g}"
            raise InvalidCheckpointError(f"{file}: {where!r} is a {type(states).__name__}, not a dict",
                                         file=file, field=where)
        per_rank.append(states)
    names = list(per_rank[0])
    for r, states in enumerate(per_rank):
        if set(states) != set(names):
            raise ValueError(f"group {g}: rank 0 holds optimizer states {sorted(names)} but rank {r} "
                             f"holds {sorted(states)} ({files[r]})")
    flat, scalars = set(), {}
    for name in names:
        kinds = set()
        for r, states in enumerate(per_rank):
            value = states[name]
            part = ranks[r]["single_partition_of_fp32_groups"][g].numel()  # without the end padding
            sizes = {part, part + _padding(ranks[r], files[r], g)}
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() in sizes:
                kinds.add("flat")
            elif (torch.is_tensor(value) and value.dim() == 0) or \
                    (isinstance(value, (int, float)) and not isinstance(value, bool)):
                kinds.add("scalar")
            else:
                what = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) \
                    else f"a {type(value).__name__}"
                raise ValueError(f"group {g}: optimizer state {name!r} on rank {r} is {what}, neither a "
                                 f"flat tensor of the partition's size ({' or '.join(map(str, sorted(sizes)))}) "
                                 f"nor a scalar; loom cannot convert it ({files[r]})")
        if kinds == {"flat"}:
            flat.add(name)
            continue
        if kinds != {"scalar"}:
            raise ValueError(f"group {g}: optimizer state {name!r} is a flat tensor on some ranks and a "
                             f"scalar on others")
        values = [float(states[name]) for states in per_rank]
        if len(set(values)) > 1:
            raise ValueError(f"group {g}: the ranks disagree on the optimizer state {name!r} ({values})")
        scalars[name] = per_rank[0][name]
    return names, flat, scalars


def _padding(osd: dict, file: str, g: int) -> int:
    """The zeros DeepSpeed appends to group ``g``'s partition (kept in the
    optimizer's flat states, cut from the saved fp32 partition)."""
    paddings = osd.get("group_paddings")
    if paddings is None:
        return 0
    return _count(_get(paddings, g, None, file, "optimizer_state_dict/group_paddings"), file,
                  f"optimizer_state_dict/group_paddings/{g}")


def _scalar(name: str, value):
    """A scalar state as PyTorch's optimizers keep it per parameter: a 0-d
    tensor stays one (its own copy); ``step`` as a number becomes the
    float32 tensor torch.optim uses; other numbers stay numbers."""
    if torch.is_tensor(value):
        return value.detach().clone()
    return torch.tensor(float(value), dtype=torch.float32) if name == "step" else value


def _check_rank_file(sd: dict, file: str, dp: int) -> dict:
    osd = _get(sd, "optimizer_state_dict", dict, file, "")
    if isinstance(osd.get("base_optimizer_state"), list):
        raise ValueError(f"{file} is an elastic ZeRO checkpoint (per-group optimizer states without "
                         f"param_groups), which loom does not convert")
    for key, kind in (("single_partition_of_fp32_groups", list), ("partition_count", list),
                      ("param_slice_mappings", list), ("base_optimizer_state", dict)):
        _get(osd, key, kind, file, "optimizer_state_dict")
    _get(osd["base_optimizer_state"], "state", dict, file, "optimizer_state_dict/base_optimizer_state")
    stage = osd.get("zero_stage")
    if isinstance(stage, bool) or not isinstance(stage, int) or int(stage) not in (1, 2):
        raise ValueError(f"{file} is not a ZeRO stage 1/2 checkpoint (zero_stage={stage!r})")
    for g, flat in enumerate(osd["single_partition_of_fp32_groups"]):
        where = f"optimizer_state_dict/single_partition_of_fp32_groups/{g}"
        if not torch.is_tensor(flat) or flat.dim() != 1 or not flat.is_floating_point():
            raise InvalidCheckpointError(f"{file}: {where!r} is not a 1-D floating-point tensor", file=file,
                                         field=where)
        count = _count(_get(osd["partition_count"], g, None, file, "optimizer_state_dict/partition_count"),
                       file, f"optimizer_state_dict/partition_count/{g}")
        if count != dp:
            raise ValueError(f"group {g} is partitioned {count} ways but there are {dp} optimizer files")
        _get(osd["param_slice_mappings"], g, dict, file, "optimizer_state_dict/param_slice_mappings")
    return osd


def _fragments(ranks, files, g: int, name: str, numel: int) -> list[tuple[int, int, int]]:
    """(rank, start, numel) of each rank's piece of parameter ``name``."""
    pieces, total = [], 0
    for r, (osd, file) in enumerate(zip(ranks, files)):
        frag = osd["param_slice_mappings"][g].get(name)
        if frag is None:
            continue
        where = f"optimizer_state_dict/param_slice_mappings/{g}/{name}"
        start = _count(getattr(frag, "start", None), file, f"{where}.start")
        count = _count(getattr(frag, "numel", None), file, f"{where}.numel")
        part = osd["single_partition_of_fp32_groups"][g].numel()
        if start + count > part:
            raise InvalidCheckpointError(f"{file}: {where} covers [{start}, {start + count}) beyond the "
                                         f"partition's {part} elements", file=file, field=where)
        if count:
            pieces.append((r, start, count))
            total += count
    if pieces and total != numel:
        raise InvalidCheckpointError(f"{files[0]}: the ranks' fragments of {name!r} hold {total} of its "
                                     f"{numel} elements", file=files[0], field=name)
    return pieces


def read_deepspeed(ds_dir: str, tag: str | None = None, *, loom_url: str | None = None) -> tuple[dict, int]:
    """The converted state (see module doc) and DeepSpeed's global step.

    ``ds_dir``: a DeepSpeed ``save_dir`` (with ``latest``) or one tag
    directory; ``tag`` picks one under ``ds_dir``.  ``loom_url``: the store
    of a directory saved through ``install_deepspeed_engine`` with a url of
    its own (default ``<save_dir>/loom``).  Raises FileNotFoundError for
    missing files and ValueError (InvalidCheckpointError for damaged or
    hostile files) for what it cannot convert, each with a one-line message."""
    path = tag_directory(ds_dir, tag)
    if loom_url is None:
        loom_url = os.path.join(os.path.dirname(os.path.abspath(path)), "loom")
    optim_files = _optimizer_files(path)
    names_here = os.listdir(path)
    if len([f for f in names_here if re.match(r"^mp_rank_\d+_model_states\.pt$", f)]) > 1:
        raise ValueError(f"{path} is a model-parallel checkpoint; only data-parallel ZeRO 1/2 is supported")
    if any(f.startswith("layer_") and "expert" in f for f in names_here):
        raise ValueError(f"{path} holds MoE expert files, which are not supported")
    model_file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{model_file} is missing")
    model_sd = _read_file(model_file, loom_url)
    dp = len(optim_files)
    ranks = [_check_rank_file(_read_file(f, loom_url), f, dp) for f in optim_files]
    first = ranks[0]
    param_shapes = _get(model_sd, "param_shapes", list, model_file, "")
    module = _get(model_sd, "module", dict, model_file, "") if model_sd.get("module") is not None else {}
    for r, osd in enumerate(ranks):
        if len(osd["single_partition_of_fp32_groups"]) != len(param_shapes):
            raise InvalidCheckpointError(f"{optim_files[r]}: {len(osd['single_partition_of_fp32_groups'])} "
                                         f"parameter groups, expected {len(param_shapes)}",
                                         file=optim_files[r], field="single_partition_of_fp32_groups")
    groups_sd = _get(first["base_optimizer_state"], "param_groups", list, optim_files[0],
                     "optimizer_state_dict/base_optimizer_state")
    weights, opt_state, groups, names = {}, {}, [], []
    for g, shapes in enumerate(param_shapes):
        if not isinstance(shapes, dict):
            raise InvalidCheckpointError(f"{model_file}: 'param_shapes/{g}' is not a dict", file=model_file,
                                         field=f"param_shapes/{g}")
        state_names, flat_names, scalars = _group_states(ranks, optim_files, g)
        indices = []
        for name, shape in shapes.items():
            where = f"param_shapes/{g}/{name}"
            if not isinstance(name, str) or not isinstance(shape, (tuple, list, torch.Size)):
                raise InvalidCheckpointError(f"{model_file}: {where!r} is not a name and a shape",
                                             file=model_file, field=where)
            shape = tuple(_count(d, model_file, where) for d in shape)
            index = len(names)
            names.append(name)
            indices.append(index)
            pieces = _fragments(ranks, optim_files, g, name, math.prod(shape))
            if not pieces:  # never got a gradient: no optimizer fragment (as DeepSpeed does)
                weights[name] = _get(module, name, torch.Tensor, model_file, "module").detach().float().clone()
                continue

            def gather(source):
                return torch.cat([source(r).detach().narrow(0, start, count) for r, start, count in pieces]) \
                    .reshape(shape).clone()
            weights[name] = gather(lambda r: ranks[r]["single_partition_of_fp32_groups"][g])
            if state_names:  # none before the first optimizer step, as in PyTorch
                opt_state[index] = {
                    key: gather(lambda r: ranks[r]["base_optimizer_state"]["state"][g][key]) if key in flat_names
                    else _scalar(key, scalars[key]) for key in state_names}
        group = _get(groups_sd, g, dict, optim_files[0], "optimizer_state_dict/base_optimizer_state/param_groups")
        groups.append({**_json_group(group, optim_files[0], f"param_groups/{g}"), "params": indices})
    # buffers and frozen parameters as the module saved them, in the module's order
    model = {}
    for k, v in module.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise InvalidCheckpointError(f"{model_file}: module entry {k!r} is not a tensor under a name",
                                         file=model_file, field=f"module/{k}")
        model[k] = weights.pop(k) if k in weights else v.detach().clone()
    model.update(weights)
    meta = {"param_names": names,
            "global_steps": _count(model_sd.get("global_steps", 0), model_file, "global_steps"),
            "zero_stage": int(first["zero_stage"]), "dp_world_size": dp,
            "ds_version": str(model_sd.get("ds_version", "")), "source": os.path.abspath(path)}
    return {"model": model, "optim": {"state": opt_state, "param_groups": groups}, "deepspeed": meta}, \
        meta["global_steps"]


def from_deepspeed(ds_dir: str, url: str, *, tag: str | None = None, step: int | None = None,
                   loom_url: str | None = None) -> str:
    """Convert a DeepSpeed ZeRO stage 1/2 checkpoint (see `read_deepspeed`
    for ``ds_dir``, ``tag``, ``loom_url`` and what it raises) into a loom
    checkpoint at ``url`` as ``step`` (default: DeepSpeed's global step);
    returns the committed location."""
    state, global_steps = read_deepspeed(ds_dir, tag, loom_url=loom_url)
    return save(state, url, step=global_steps if step is None else step)
