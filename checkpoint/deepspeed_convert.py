"""DeepSpeed ZeRO stage 1/2 checkpoint -> loom checkpoint.

A ZeRO-1/2 checkpoint keeps, per data-parallel rank, a flat fp32 partition of
every parameter group (the master weights) and the Adam moments of that
partition (``zero_pp_rank_R_mp_rank_00_optim_states.pt``); its
``param_slice_mappings`` say which range of the partition belongs to which
parameter.  A parameter's flat values are its ranks' ranges in rank order
(padding sits only at the end of the last partition).  The result is saved in
the layout of a plain PyTorch model + optimizer:

    {"model": {name: fp32 master weight, buffers...},
     "optim": {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]},
     "deepspeed": {"param_names": [...], "global_steps", "zero_stage", "dp_world_size", ...}}

so ``torch.optim.AdamW(model.parameters())`` over the same model can
``load_state_dict`` it, at any world size.  DeepSpeed's files are pickles:
only convert checkpoints you trust.  The loom checkpoint written holds no
pickle.
"""
from __future__ import annotations

import math
import os
import re

import torch

from .save import save
from .state import encode_value

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _torch_load(path: str):
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's classes are in the pickle
    return torch.load(path, map_location="cpu", weights_only=False)


def tag_directory(ds_dir: str, tag: str | None = None) -> str:
    """The directory holding one DeepSpeed checkpoint (``ds_dir/<latest tag>``)."""
    ds_dir = os.fspath(ds_dir)
    if tag is not None:
        path = os.path.join(ds_dir, str(tag))
    elif any(_OPTIM.match(f) for f in os.listdir(ds_dir)):
        path = ds_dir
    elif os.path.isfile(os.path.join(ds_dir, "latest")):
        with open(os.path.join(ds_dir, "latest")) as fh:
            path = os.path.join(ds_dir, fh.read().strip())
    else:
        raise FileNotFoundError(f"{ds_dir} holds no DeepSpeed checkpoint (no 'latest' file and no "
                                f"*_optim_states.pt); pass --tag")
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


def _step_tensor(value) -> torch.Tensor:
    return torch.tensor(float(value.item() if torch.is_tensor(value) else value), dtype=torch.float32)


def _json_group(group: dict, where: str) -> dict:
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        v = v.item() if torch.is_tensor(v) and v.numel() == 1 else v
        encode_value(v, f"{where}/{k}")  # raises a TypeError naming a value JSON cannot hold
        out[k] = v
    return out


def read_deepspeed(ds_dir: str, tag: str | None = None) -> tuple[dict, int]:
    """The converted state (see module doc) and DeepSpeed's global step."""
    path = tag_directory(ds_dir, tag)
    optim_files = _optimizer_files(path)
    model_file = os.path.join(path, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{model_file} is missing")
    model_sd = _torch_load(model_file)
    if len([f for f in os.listdir(path) if re.match(r"^mp_rank_\d+_model_states\.pt$", f)]) > 1:
        raise ValueError(f"{path} is a model-parallel checkpoint; only data-parallel ZeRO 1/2 is supported")
    if any(f.startswith("layer_") and "expert" in f for f in os.listdir(path)):
        raise ValueError(f"{path} holds MoE expert files, which are not supported")
    ranks = [_torch_load(f)["optimizer_state_dict"] for f in optim_files]
    first = ranks[0]
    if "single_partition_of_fp32_groups" not in first or int(first.get("zero_stage", 0)) not in (1, 2):
        raise ValueError(f"{path} is not a ZeRO stage 1/2 checkpoint "
                         f"(zero_stage={first.get('zero_stage')!r})")
    dp = len(ranks)
    param_shapes = model_sd["param_shapes"]
    module = model_sd.get("module") or {}
    weights, opt_state, groups, names = {}, {}, [], []
    for g, shapes in enumerate(param_shapes):
        if int(first["partition_count"][g]) != dp:
            raise ValueError(f"group {g} is partitioned {first['partition_count'][g]} ways but there "
                             f"are {dp} optimizer files")
        steps = {float(_step_tensor(r["base_optimizer_state"]["state"][g]["step"])) for r in ranks
                 if "step" in r["base_optimizer_state"]["state"][g]}
        if len(steps) > 1:
            raise ValueError(f"group {g}: the ranks disagree on the optimizer step ({sorted(steps)})")
        group_step = steps.pop() if steps else 0.0
        indices = []
        for name, shape in shapes.items():
            numel = math.prod(shape)
            parts = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
            for r in ranks:
                frag = r["param_slice_mappings"][g].get(name)
                if frag is None or frag.numel == 0:
                    continue
                state = r["base_optimizer_state"]["state"][g]
                sources = {"fp32": r["single_partition_of_fp32_groups"][g],
                           "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
                for k, flat in sources.items():
                    parts[k].append(flat.detach().narrow(0, frag.start, frag.numel))
            index = len(names)
            names.append(name)
            indices.append(index)
            if not parts["fp32"]:  # never got a gradient: no optimizer fragment (as DeepSpeed does)
                weights[name] = module[name].detach().float().clone()
                continue
            full = {k: torch.cat(v).reshape(tuple(shape)).clone() for k, v in parts.items()}
            if full["fp32"].numel() != numel:  # pragma: no cover - reshape above would fail first
                raise ValueError(f"{name}: fragments hold {full['fp32'].numel()} of {numel} elements")
            weights[name] = full["fp32"]
            opt_state[index] = {"step": _step_tensor(group_step),
                                "exp_avg": full["exp_avg"], "exp_avg_sq": full["exp_avg_sq"]}
        group = _json_group(first["base_optimizer_state"]["param_groups"][g], f"param_groups/{g}")
        groups.append({**group, "params": indices})
    # buffers and frozen parameters as the module saved them, in the module's order
    model = {k: weights.pop(k) if k in weights else v.detach().clone() for k, v in module.items()}
    model.update(weights)
    meta = {"param_names": names, "global_steps": int(model_sd.get("global_steps", 0)),
            "zero_stage": int(first["zero_stage"]), "dp_world_size": dp,
            "ds_version": str(model_sd.get("ds_version", "")), "source": os.path.abspath(path)}
    return {"model": model, "optim": {"state": opt_state, "param_groups": groups}, "deepspeed": meta}, \
        meta["global_steps"]


def from_deepspeed(ds_dir: str, url: str, *, tag: str | None = None, step: int | None = None) -> str:
    """Convert a DeepSpeed ZeRO stage 1/2 checkpoint; returns the committed location."""
    state, global_steps = read_deepspeed(ds_dir, tag)
    return save(state, url, step=global_steps if step is None else step)
