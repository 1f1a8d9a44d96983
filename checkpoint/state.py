"""What a checkpoint holds: leaf types, flattening nested state, JSON values.

``state`` is a nested dict (lists and tuples allowed inside).  Its leaves are
tensors (replicated over the group), `Shard` / `Flat` fragments of a global
tensor, `PerRank` values, and plain Python values.  A container with no
tensor anywhere inside is itself one plain value (so ``param_groups`` of an
optimizer is one JSON value, not hundreds of leaves).  A PyTorch DTensor
(FSDP2's sharded parameters and optimizer state) is a `Shard` of its global
tensor: this rank's local tensor (an alias: a load fills the DTensor in
place) at the box its mesh coordinate and placements give
(`loom.checkpoint.dtensor`).

Plain values are stored as JSON only — no pickle — so opening an untrusted
checkpoint never runs code.  Tuples, dicts with non-string keys and
non-finite floats are tagged so that they come back as they went in.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import torch

from loom.comms import placement_of

from .dtensor import check_default_order, dtensor_box, is_dtensor

Path = tuple  # components: str (dict keys) or int (dict keys / list indices)


def _shape(value, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in value)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of ints, got {value!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{what}={shape} has a negative entry")
    return shape


def _check_tensor(tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} needs a torch.Tensor, got {type(tensor).__name__}")


def _storable(dtype: torch.dtype) -> bool:
    from .manifest import storage_dtype  # manifest imports this module
    try:
        storage_dtype(dtype)
    except TypeError:
        return False
    return True


def check_tensor_kind(t: torch.Tensor, key: str) -> None:
    """Refuse, naming ``key``, the tensors a checkpoint cannot hold exactly:
    only plain dense tensors with data are stored (bits and all)."""
    if t.is_quantized:
        why = (f"is quantized ({t.dtype}): its scale and zero point would be lost; save "
               f"t.int_repr() with t.q_scale()/t.q_zero_point() (or t.dequantize())")
    elif t.layout != torch.strided or t.is_nested:
        why = f"has layout {t.layout}{' (nested)' if t.is_nested else ''}; save t.to_dense() (or its parts)"
    elif t.device.type == "meta":
        why = "is on the meta device and holds no data"
    elif t.is_conj() or t.is_neg():
        why = "is a lazy conjugate/negative view; save t.resolve_conj().resolve_neg()"
    elif not _storable(t.dtype):
        why = f"has dtype {t.dtype}, which a checkpoint cannot store"
    elif type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        why = (f"is a {type(t).__name__}, a tensor subclass a checkpoint does not know how to lay out; "
               f"save its local data as a plain tensor (wrapped in Shard or Flat if it is a part)")
    else:
        return
    raise TypeError(f"the tensor at key {key!r} {why}")


@dataclass
class Shard:
    """This rank holds the box ``offsets .. offsets + tensor.shape`` of a global tensor.

    The same box may be held by several ranks (replicas); distinct boxes must
    not overlap and together must cover the global tensor."""
    tensor: torch.Tensor
    global_shape: tuple
    offsets: tuple

    def __post_init__(self):
        _check_tensor(self.tensor, "Shard")
        self.global_shape = _shape(self.global_shape, "Shard global_shape")
        self.offsets = _shape(self.offsets, "Shard offsets")
        local = tuple(self.tensor.shape)
        if not (len(self.global_shape) == len(self.offsets) == len(local)):
            raise ValueError(f"Shard: tensor shape {local}, global_shape {self.global_shape} and "
                             f"offsets {self.offsets} must have the same number of dims")
        for d, (o, n, g) in enumerate(zip(self.offsets, local, self.global_shape)):
            if o + n > g:
                raise ValueError(f"Shard: dim {d} covers [{o}, {o + n}) beyond global size {g} "
                                 f"(offsets {self.offsets}, tensor shape {local}, "
                                 f"global_shape {self.global_shape})")


@dataclass
class Flat:
    """This rank holds the range ``[start, start + numel)`` of the flattened
    global tensor (ZeRO-style optimizer fragments; empty ranges allowed)."""
    tensor: torch.Tensor
    global_shape: tuple
    start: int

    def __post_init__(self):
        _check_tensor(self.tensor, "Flat")
        self.global_shape = _shape(self.global_shape, "Flat global_shape")
        if self.tensor.dim() != 1:
            raise ValueError(f"Flat: the tensor must be 1-D, got shape {tuple(self.tensor.shape)}")
        if isinstance(self.start, bool) or not isinstance(self.start, numbers.Integral) or self.start < 0:
            raise ValueError(f"Flat: start={self.start!r} must be a non-negative int")
        self.start = int(self.start)
        total = math.prod(self.global_shape)
        if self.start + self.tensor.numel() > total:
            raise ValueError(f"Flat: range [{self.start}, {self.start + self.tensor.numel()}) is beyond "
                             f"the {total} elements of global_shape {self.global_shape}")


@dataclass
class PerRank:
    """A value that differs by rank (RNG state, data position).

    Restored by rank when the world size at load equals the one at save;
    otherwise ``resolver(saved_values, rank, world_size)`` picks this rank's
    value from the list of every saved rank's value (an error without one)."""
    value: Any
    resolver: Callable[[list, int, int], Any] | None = None


TENSOR_LEAVES = (torch.Tensor, Shard, Flat)


@dataclass
class Leaf:
    """One leaf of a flattened state.  ``kind`` is one of
    replicated | shard | flat | per_rank (tensors), value | per_rank_value."""
    path: Path
    key: str
    kind: str
    obj: Any  # the tensor, Shard, Flat, or plain value
    containers: str = ""  # per path component, its parent: d(ict) l(ist) t(uple)

    @property
    def tensor(self) -> torch.Tensor | None:
        if isinstance(self.obj, (Shard, Flat)):
            return self.obj.tensor
        return self.obj if isinstance(self.obj, torch.Tensor) else None


# ------------------------------------------------------------------ keys

def key_of(path: Path) -> str:
    """The display key of a path: components joined by '/', with '/' and '%'
    inside a component escaped."""
    return "/".join(quote(str(c), safe="") if ("/" in str(c) or "%" in str(c)) else str(c)
                    for c in path)


def _contains_tensors(value) -> bool:
    if isinstance(value, (*TENSOR_LEAVES, PerRank)):
        return True
    if isinstance(value, dict):
        return any(_contains_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_tensors(v) for v in value)
    return False


# What a loader accepts of a state path (manifest.MAX_PATH, manifest._INDEX_LIMIT):
# a key the loader would refuse is refused at save instead.
MAX_KEY_DEPTH = 256
KEY_INT_LIMIT = 1 << 62


def _check_component(c, path) -> None:
    where = key_of(path) or "<root>"
    if isinstance(c, bool) or not isinstance(c, (str, int)):
        raise TypeError(f"state key {c!r} under {where!r} must be a str or an "
                        f"int (dicts that hold tensors are flattened into keys)")
    if isinstance(c, int) and not -KEY_INT_LIMIT <= c <= KEY_INT_LIMIT:
        raise TypeError(f"state key {c} under {where!r} is outside the int keys a checkpoint holds "
                        f"(|key| <= 2**62)")
    if isinstance(c, str):
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(f"state key {c!r} under {where!r} is not valid unicode (a lone surrogate?)") from None
    if len(path) >= MAX_KEY_DEPTH:
        raise TypeError(f"state key {c!r} under {where!r} is nested more than {MAX_KEY_DEPTH} levels deep")


def flatten(state: dict) -> list[Leaf]:
    """Every leaf of ``state`` in a deterministic (insertion) order."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    leaves: list[Leaf] = []
    _walk(state, (), "", False, leaves)
    seen: dict[str, Path] = {}
    for leaf in leaves:
        if leaf.key in seen:
            raise ValueError(f"state keys {seen[leaf.key]!r} and {leaf.path!r} both flatten to "
                             f"{leaf.key!r}; rename one")
        seen[leaf.key] = leaf.path
    return leaves


def _walk(value, path: Path, containers: str, per_rank: bool, out: list[Leaf]) -> None:
    key = key_of(path)
    plain = "per_rank_value" if per_rank else "value"
    if isinstance(value, PerRank):
        if per_rank:
            raise TypeError(f"PerRank at key {key!r} is nested inside another PerRank")
        _walk(value.value, path, containers, True, out)
    elif isinstance(value, (Shard, Flat)):
        if per_rank:
            raise TypeError(f"{type(value).__name__} at key {key!r} is inside a PerRank; per-rank "
                            f"tensors are stored whole, one per rank")
        check_tensor_kind(value.tensor, key)
        out.append(Leaf(path, key, "shard" if isinstance(value, Shard) else "flat", value, containers))
    elif is_dtensor(value):
        if per_rank:
            raise TypeError(f"the DTensor at key {key!r} is inside a PerRank; per-rank tensors are stored "
                            f"whole, one per rank (save dt.to_local() there, or the DTensor itself outside)")
        shard = dtensor_shard(value, key)
        if shard is not None:  # a rank outside the DTensor's mesh holds nothing of it
            out.append(Leaf(path, key, "shard", shard, containers))
    elif isinstance(value, torch.Tensor):
        check_tensor_kind(value, key)
        placement = None if per_rank else placement_of(value)
        if placement is not None:  # split across ranks by the layer that made it
            shape = tuple(value.shape)
            out.append(Leaf(path, key, "shard", Shard(value, placement.global_shape(shape),
                                                      placement.offsets(shape)), containers))
        else:
            out.append(Leaf(path, key, "per_rank" if per_rank else "replicated", value, containers))
    elif isinstance(value, (dict, list, tuple)) and path and not _contains_tensors(value):
        out.append(Leaf(path, key, plain, value, containers))
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_component(k, path)
            _walk(v, path + (k,), containers + "d", per_rank, out)
    elif isinstance(value, (list, tuple)):
        tag = "t" if isinstance(value, tuple) else "l"
        for i, v in enumerate(value):
            _walk(v, path + (i,), containers + tag, per_rank, out)
    else:
        out.append(Leaf(path, key, plain, value, containers))


def dtensor_shard(dt, key: str = "") -> Shard | None:
    """The `Shard` a DTensor ``dt`` is on this rank: its local tensor (an
    alias of ``dt``'s storage, detached) at the box `dtensor_box` computes;
    None on a rank outside ``dt``'s mesh.  When ``dt`` also carries a loom
    placement (`loom.comms.Sharded`: ``dt`` is slice ``index`` of a larger
    tensor, e.g. an expert-parallel weight that FSDP2 shards further), the box
    is placed inside that slice: global shape ``placement.global_shape(dt.shape)``,
    offsets ``placement.offsets(dt.shape)`` plus the DTensor's.

    Raises TypeError naming ``key`` for placements a checkpoint cannot lay
    out (see `dtensor_box`) and for a local tensor it cannot hold
    (`check_tensor_kind`); ValueError when the local tensor's shape is not
    the box's."""
    shape = tuple(dt.shape)
    box = dtensor_box(shape, dt.device_mesh, dt.placements, key)
    check_default_order(dt, key)
    if box is None:
        return None
    offsets, sizes = box
    with torch.no_grad():
        local = dt.to_local().detach()  # a view of dt's local tensor: same storage
    check_tensor_kind(local, key)
    if tuple(local.shape) != sizes:
        raise ValueError(f"the DTensor at key {key!r} (global shape {shape}, placements {tuple(dt.placements)}) "
                         f"holds a local tensor of shape {tuple(local.shape)} where its mesh coordinate "
                         f"{tuple(dt.device_mesh.get_coordinate())} gives the box {sizes} at {offsets}: an "
                         f"uneven split other than torch.chunk's, which a checkpoint cannot lay out")
    placement = placement_of(dt)
    if placement is not None:
        base = placement.offsets(shape)
        offsets = tuple(b + o for b, o in zip(base, offsets))
        shape = placement.global_shape(shape)
    return Shard(local, shape, offsets)


def per_rank_nodes(state, path: Path = ()) -> list[tuple[Path, PerRank]]:
    """Every PerRank in ``state`` with its path."""
    if isinstance(state, PerRank):
        return [(path, state)]
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [n for k, v in items for n in per_rank_nodes(v, path + (k,))]


def build_tree(items: list[tuple[Path, str, Any]]) -> Any:
    """Rebuild a nested value from (relative path, containers, leaf) items;
    an item with an empty path is the whole value."""
    for rel, _, leaf in items:
        if not rel:
            return leaf
    kind = items[0][1][0]
    groups: dict = {}
    for rel, containers, leaf in items:
        groups.setdefault(rel[0], []).append((rel[1:], containers[1:], leaf))
    children = {k: build_tree(v) for k, v in groups.items()}
    if kind == "d":
        return children
    seq = [children[i] for i in sorted(children)]
    return tuple(seq) if kind == "t" else seq


def set_path(container, path: Path, value):
    """Put ``value`` at ``path`` inside ``container``; tuples on the way are
    rebuilt.  Returns the (possibly new) container."""
    head = path[0]
    child = set_path(container[head], path[1:], value) if len(path) > 1 else value
    if isinstance(container, tuple):
        items = list(container)
        items[head] = child
        return tuple(items)
    container[head] = child
    return container


# --------------------------------------------------------- JSON values

_TAG = "__loom__"


# Values nested deeper than this are refused at save: loom reads JSON with a
# depth limit (manifest.MAX_JSON_DEPTH = 512); a tagged tuple or dict takes up to
# three JSON levels per level of the value.
MAX_VALUE_DEPTH = 100


def encode_value(value, key: str = "", _depth: int = 0) -> Any:
    """A JSON-able form of a plain value; TypeError naming ``key`` otherwise
    (also for values nested more than `MAX_VALUE_DEPTH` levels deep)."""
    if _depth > MAX_VALUE_DEPTH:
        raise TypeError(f"the value at key {key!r} is nested more than {MAX_VALUE_DEPTH} levels deep "
                        f"(a cycle?); a checkpoint stores plain JSON values of bounded depth")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else {_TAG: "float", "value": repr(f)}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode_value(v, key, _depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, key, _depth + 1) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: encode_value(v, f"{key}/{k}", _depth + 1) for k, v in value.items()}
        return {_TAG: "dict", "items": [[encode_value(k, key, _depth + 1), encode_value(v, f"{key}/{k}", _depth + 1)]
                                         for k, v in value.items()]}
    raise TypeError(f"the value at key {key!r} has type {type(value).__name__}, which a checkpoint "
                    f"cannot store: tensors go to Zarr arrays and everything else must be JSON "
                    f"(None, bool, int, float, str, list, tuple, dict); no pickle")


def decode_value(data) -> Any:
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if isinstance(data, dict):
        tag = data.get(_TAG)
        if tag is None:
            return {k: decode_value(v) for k, v in data.items()}
        if tag == "tuple":
            return tuple(decode_value(v) for v in data["items"])
        if tag == "dict":
            return {_hashable(decode_value(k)): decode_value(v) for k, v in data["items"]}
        if tag == "float":
            return float(data["value"])
        raise ValueError(f"unknown value tag {tag!r} in checkpoint")
    return data


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def dumps(data) -> str:
    """Canonical JSON (no NaN: non-finite floats are tagged by encode_value)."""
    return json.dumps(data, sort_keys=False, separators=(",", ":"), allow_nan=False)


def digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()
