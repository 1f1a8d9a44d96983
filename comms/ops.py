"""Traced wrappers around torch.distributed: the only door to it in loom.

Every call records a `CommRecord` (see trace.py).  Ranks are always *global*
ranks; ``group=None`` means the default (world) group, or a world of one when
torch.distributed is not initialised (collectives then return at once).  On
gloo, collectives first agree on their inputs (see "checked collectives"
below), so a mismatch raises on every rank instead of hanging or aborting.
The ``*_with_grad`` variants are autograd-aware for parallel code.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading

import torch
import torch.distributed as dist

from . import trace

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}
_REDUCE_CODES = {name: i for i, name in enumerate(_REDUCE_OPS, start=1)}

# ProcessGroup -> (name, ranks, own global rank).  Filled lazily; names come
# from `register_group` (the mesh names its groups) or from the member ranks.
_group_info: dict = {}
# Names of groups that carry background work (checkpoint persistence, ...):
# the fault detectors judge them apart from the training groups.
_background: set = set()


def register_group(group, name: str) -> None:
    """Give a process group a name that is the same on every member rank."""
    _group_info[group] = (name, tuple(dist.get_process_group_ranks(group)), dist.get_rank())


def new_group(ranks=None, name: str | None = None, timeout: float | None = None, *,
              background: bool = False):
    """A new process group over the global ``ranks`` (default: every rank),
    e.g. a dedicated group for background work so that its collectives
    never interleave with the training group's.

    Over the whole world every rank calls it (as torch.distributed requires);
    over a proper subset only the members do (local synchronisation), in the
    same order on each.  ``name`` labels the group in the trace; ``timeout``
    (seconds) bounds each of its collectives (default: the world's).
    ``background=True`` marks a group whose work runs beside training (a
    checkpoint's persist stage): a slow operation there is not the job
    hanging, so the fault detectors judge it apart (`is_background`)."""
    import datetime
    world = dist.get_world_size()
    members = sorted(range(world) if ranks is None else {int(r) for r in ranks})
    if not members or members[0] < 0 or members[-1] >= world:
        raise ValueError(f"new_group: ranks {ranks!r} must be global ranks in [0, {world})")
    kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=float(timeout))}
    if len(members) == world:
        group = dist.new_group(members, **kw)
    else:
        group = dist.new_group(members, use_local_synchronization=True, **kw)
    if dist.get_rank() in members:
        label = f"{name or 'group'}[{','.join(map(str, members))}]"
        register_group(group, label)
        if background:
            _background.add(label)
    return group


def is_background(group_name: str) -> bool:
    """Whether the group with this trace name was made with ``background=True``."""
    return group_name in _background


def background_groups() -> set[str]:
    """The trace names of this process's background groups."""
    return set(_background)


def destroy_group(group) -> None:
    """Tear down a group made by `new_group` (not the default group)."""
    info = _group_info.pop(group, None)
    if info is not None:
        _background.discard(info[0])
    dist.destroy_process_group(group)


def forget_groups() -> None:
    """Drop cached group names (after the process group is destroyed)."""
    _group_info.clear()
    _background.clear()


def group_ranks(group=None) -> list[int]:
    """The global ranks of ``group`` in group order (``[0]`` for ``group=None``
    when torch.distributed is not initialised: a world of one)."""
    if group is None and not dist.is_initialized():
        return [0]
    return list(_info(group)[1][1])


def _info(group):
    pg = dist.group.WORLD if group is None else group
    info = _group_info.get(pg)
    if info is None:
        if pg is None:
            raise RuntimeError("loom.comms: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        ranks = tuple(dist.get_process_group_ranks(pg))
        name = "world" if pg is dist.group.WORLD else "g[" + ",".join(map(str, ranks)) + "]"
        info = _group_info[pg] = (name, ranks, dist.get_rank())
    return pg, info


def _open(op, group, t, peer=None, channel=None, nbytes=None):
    pg, (name, ranks, rank) = _info(group)
    if nbytes is None:
        nbytes = t.numel() * t.element_size()
    return pg, trace.open_record(rank, name, ranks, op, nbytes, t.dtype, t.shape, peer, channel)


def _reduce_op(op: str):
    try:
        return _REDUCE_OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(_REDUCE_OPS)}") from None


def _dim0_chunks(t: torch.Tensor, parts: int, what: str) -> int:
    if t.dim() == 0 or t.shape[0] % parts:
        raise ValueError(f"{what}: dim 0 of shape {tuple(t.shape)} must divide by the group size {parts}")
    return t.shape[0] // parts


# ------------------------------------------------------- checked collectives
#
# A collective whose ranks disagree (a shape, a dtype, one rank's invalid
# input) does not fail cleanly on gloo: peers wait until the timeout, gloo
# aborts the process on a size mismatch, and a broadcast of mismatched sizes
# "succeeds" with garbage.  Checked collectives first agree (loom.comms.agree)
# on what each rank is about to do, so a mismatch or a local validation error
# raises the same ValueError on every rank, naming the ranks and values.  The
# check is one tiny extra exchange; on NCCL it would also make the host wait
# for the device, so "auto" checks gloo groups only.

CHECK_MODES = ("auto", "on", "off")
_checks = {"mode": os.environ.get("LOOM_CHECK_COLLECTIVES", "auto")}
_OPCODES = {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 3, "all_to_all_v": 4, "all_to_all_counts": 5,
            "broadcast": 6, "barrier": 7}
_DIMS = 9  # dims described one by one; more go into one checksum field


def set_collective_checks(mode: str) -> None:
    """Whether collectives agree on their inputs first: ``"auto"`` (the
    default; gloo groups only), ``"on"`` or ``"off"``.  Also from the
    environment: ``LOOM_CHECK_COLLECTIVES``.  Raises ValueError for another mode."""
    if mode not in CHECK_MODES:
        raise ValueError(f"collective checks mode {mode!r} must be one of {CHECK_MODES}")
    _checks["mode"] = mode


_local = threading.local()


@contextlib.contextmanager
def agreed():
    """Collectives issued by this thread inside the block skip the per-op
    check: the caller has already agreed with its peers on what follows (a
    layer's entry agreement covers the fixed sequence of collectives it then
    issues; `GradientSync` agrees on its buckets once).  The autograd-aware
    ops carry it into their backward."""
    depth = getattr(_local, "agreed", 0)
    _local.agreed = depth + 1
    try:
        yield
    finally:
        _local.agreed = depth


def in_agreed() -> bool:
    """Whether this thread is inside `agreed()`."""
    return bool(getattr(_local, "agreed", 0))


def _checked(pg) -> bool:
    if len(_group_info[pg][1]) == 1 or in_agreed():
        return False  # nobody to disagree with, or the caller agreed already
    mode = _checks["mode"]
    if mode == "auto":
        return "gloo" in str(dist.get_backend(pg))
    return mode == "on"


def _check_tensor(name: str, t) -> None:
    """What any collective needs of its tensor: plain, dense, with data."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: needs a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested or t.is_quantized or t.device.type == "meta":
        kind = "on the meta device" if t.device.type == "meta" else \
            "quantized" if t.is_quantized else f"of layout {t.layout}{' (nested)' if t.is_nested else ''}"
        raise TypeError(f"{name}: the tensor is {kind}; collectives move plain dense tensors")


def _prepare(name: str, group, t, arg: int = 0, validate=None, rows_may_differ=False, splits=None):
    """Validate this rank's call; in checked mode agree with the group first
    (raising on every rank).  Returns (pg, validate's result).  ``splits``
    (all_to_all_v with given recv_splits): a function of validate's result
    returning (send_splits, recv_splits), checked against the peers'."""
    pg = _info(group)[0]
    result, error = None, None
    try:
        _check_tensor(name, t)
        result = validate() if validate is not None else None
    except (TypeError, ValueError) as exc:
        error = exc
    if _checked(pg):
        _agree_call(name, group, t, arg, error, rows_may_differ, None if error or splits is None
                    else splits(result))
    elif error is not None:
        raise error
    return pg, result


def _edge_weight(src: int, dst: int) -> int:
    """A fixed pseudo-random weight per (source, destination) position pair."""
    from .agree import checksum_ints
    return checksum_ints((src, dst, 0x5EED)) % _PRIME


_PRIME = (1 << 61) - 1


def _agree_call(name, group, t, arg, error, rows_may_differ, splits) -> None:
    from .agree import agree, checksum_ints, dtype_code, dtype_name
    fields = []
    if error is None:
        shape = list(t.shape)
        described = shape[1:] if rows_may_differ else shape
        fields = [_OPCODES[name], dtype_code(t.dtype), int(arg), len(described), *described[:_DIMS],
                  checksum_ints(described[_DIMS:]) if len(described) > _DIMS else 0]
        fields += [0] * (4 + _DIMS + 1 - len(fields))
        if splits is not None:
            # rank r's send_splits[j] must be rank j's recv_splits[r]: compare one random
            # linear combination of each side, summed over ranks (a mismatch shows whp)
            me, (send, recv) = _info(group)[1][1].index(_info(group)[1][2]), splits
            fields += [sum(n * _edge_weight(me, j) for j, n in enumerate(send)) % _PRIME,
                       sum(n * _edge_weight(j, me) for j, n in enumerate(recv)) % _PRIME]
    device = t.device if isinstance(t, torch.Tensor) and t.device.type == "cuda" else None
    table = agree(error, fields, group=group, device=device, what=name)
    ranks, rows = table.ranks, table.fields
    where = f"{name} on group {_info(group)[1][0]}"
    if len({row[0] for row in rows}) > 1:
        ops = {v: k for k, v in _OPCODES.items()}
        raise ValueError(f"{where}: ranks are in different collectives: "
                         + ", ".join(f"rank {r}: {ops.get(row[0], row[0])}" for r, row in zip(ranks, rows)))
    reduce_names = {v: k for k, v in _REDUCE_CODES.items()}
    labels = {1: ("dtype", dtype_name),
              2: {"broadcast": ("src", str), "all_reduce": ("reduce op", reduce_names.get),
                  "reduce_scatter": ("reduce op", reduce_names.get),
                  "all_to_all_v": ("recv_splits given", bool)}.get(name)}
    for col, label in labels.items():
        if label and len({row[col] for row in rows}) > 1:
            what, show = label
            raise ValueError(f"{where}: {what} differs across ranks {list(ranks)}: "
                             + ", ".join(f"rank {r}: {show(row[col])}" for r, row in zip(ranks, rows)))
    end = 4 + _DIMS + 1
    if len({tuple(row[3:end]) for row in rows}) > 1:
        shapes = [tuple(row[4:4 + min(row[3], _DIMS)]) + (("...",) if row[3] > _DIMS else ()) for row in rows]
        what = "shape without dim 0" if rows_may_differ else "shape"
        raise ValueError(f"{where}: {what} differs across ranks {list(ranks)}: "
                         + ", ".join(f"rank {r}: {s}" for r, s in zip(ranks, shapes)))
    if splits is not None and sum(r[end] for r in rows) % _PRIME != sum(r[end + 1] for r in rows) % _PRIME:
        _name_split_mismatch(where, group, splits)


def _name_split_mismatch(where: str, group, splits) -> None:
    """The splits disagree: exchange them whole (only now) and say where."""
    from .agree import agree
    table = agree(None, payload=[list(splits[0]), list(splits[1])], group=group, what="all_to_all_v splits")
    ranks = table.ranks
    for i, (send, _) in enumerate(table.payloads):
        for j, n in enumerate(send):
            expected = table.payloads[j][1][i]
            if n != expected:
                raise ValueError(f"{where}: rank {ranks[i]} sends {n} rows to rank {ranks[j]}, whose "
                                 f"recv_splits expect {expected} from it")
    raise ValueError(f"{where}: send_splits and recv_splits do not match across ranks")  # pragma: no cover


def _alone(group) -> bool:
    """No process group at all: ``group=None`` is a world of one."""
    return group is None and not dist.is_initialized()


# ---------------------------------------------------------------- collectives
#
# ``group=None`` means the default group, or - when torch.distributed is not
# initialised - a world of one: every collective then returns what it would
# return on one rank, without communicating (and records nothing).

def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce; returns ``t``."""
    if _alone(group):
        _check_tensor("all_reduce", t)
        _reduce_op(op)
        return t
    pg, rop = _prepare("all_reduce", group, t, _REDUCE_CODES.get(op, -1), lambda: _reduce_op(op))
    _, rec = _open("all_reduce", group, t)
    dist.all_reduce(t, op=rop, group=pg)
    trace.close_record(rec)
    return t


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape((-1,) + tuple(t.shape[1:])) if t.dim() else t.reshape(1)


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere), concatenated on dim 0 in group order."""
    if _alone(group):
        _check_tensor("all_gather", t)
        return _as_rows(t).clone()
    pg, _ = _prepare("all_gather", group, t)
    _, rec = _open("all_gather", group, t)
    size = len(_group_info[pg][1])
    src = _as_rows(t)
    out = src.new_empty((size * src.shape[0],) + tuple(src.shape[1:]))
    dist.all_gather_single(out, src, group=pg)
    trace.close_record(rec)
    return out


def reduce_scatter(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``t`` over the group and return this rank's dim-0 slice of the result."""
    if _alone(group):
        _check_tensor("reduce_scatter", t)
        _reduce_op(op)
        _dim0_chunks(t, 1, "reduce_scatter")
        return t.clone()
    size = len(_info(group)[1][1])

    def validate():
        return _reduce_op(op), _dim0_chunks(t, size, "reduce_scatter")
    pg, (rop, rows) = _prepare("reduce_scatter", group, t, _REDUCE_CODES.get(op, -1), validate)
    _, rec = _open("reduce_scatter", group, t)
    out = t.new_empty((rows,) + tuple(t.shape[1:]))
    dist.reduce_scatter_single(out, t.contiguous(), op=rop, group=pg)
    trace.close_record(rec)
    return out


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere) gathered into the given
    ``out`` (``group size * t.numel()`` elements, contiguous), in group order;
    returns ``out``.  For callers that own the buffer (FSDP2's custom
    all-gather, `loom.parallel.sharded`).  ValueError when ``out`` has the
    wrong size or dtype."""
    size = len(group_ranks(group))

    def validate():
        if out.numel() != size * t.numel() or out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError(f"all_gather_into: out has {out.numel()} elements of {out.dtype} "
                             f"(contiguous={out.is_contiguous()}), need {size} x {t.numel()} of {t.dtype}, contiguous")
    if _alone(group):
        _check_tensor("all_gather_into", t)
        validate()
        return out.copy_(t.reshape(out.shape))
    pg, _ = _prepare("all_gather", group, t, validate=validate)
    _, rec = _open("all_gather", group, t)
    dist.all_gather_single(out, t.contiguous(), group=pg)
    trace.close_record(rec)
    return out


def reduce_scatter_into(out: torch.Tensor, t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce the contiguous ``t`` (``group size * out.numel()`` elements)
    over the group and write this rank's equal part of the result (in group
    order) into ``out``; returns ``out``.  For callers that own the buffer
    (FSDP2's custom reduce-scatter).  ValueError for a wrong size or dtype."""
    size = len(group_ranks(group))

    def validate():
        rop = _reduce_op(op)
        if t.numel() != size * out.numel() or out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError(f"reduce_scatter_into: input has {t.numel()} elements of {t.dtype}, out has "
                             f"{out.numel()} of {out.dtype} (contiguous={out.is_contiguous()}); need "
                             f"input = {size} x out, one dtype, out contiguous")
        return rop
    if _alone(group):
        _check_tensor("reduce_scatter_into", t)
        validate()
        return out.copy_(t.reshape(out.shape))
    pg, rop = _prepare("reduce_scatter", group, t, _REDUCE_CODES.get(op, -1), validate)
    _, rec = _open("reduce_scatter", group, t)
    dist.reduce_scatter_single(out, t.contiguous(), op=rop, group=pg)
    trace.close_record(rec)
    return out


def _check_splits(name: str, splits, size: int) -> list[int]:
    """``size`` non-negative integers (never truncated floats)."""
    try:
        values = list(splits)
    except TypeError:
        raise ValueError(f"all_to_all_v: {name}={splits!r} must be a sequence of {size} counts") from None
    out = []
    for n in values:
        if isinstance(n, torch.Tensor) and n.numel() == 1 and not (n.is_floating_point() or n.is_complex()):
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"all_to_all_v: {name} {values!r} must be integers; {n!r} is not")
        out.append(int(n))
    if len(out) != size or (out and min(out) < 0):
        raise ValueError(f"all_to_all_v: {name} {out} must be {size} non-negative counts")
    return out


def all_to_all_v(x: torch.Tensor, send_splits, recv_splits=None, group=None) -> torch.Tensor:
    """Exchange uneven dim-0 slices: ``send_splits[i]`` rows of ``x`` go to the
    i-th rank of the group.  When ``recv_splits`` is None the counts are
    exchanged first (one extra small all-to-all); when given, checked
    collectives also verify that they match what the peers send."""
    size = 1 if _alone(group) else len(_info(group)[1][1])
    given = recv_splits is not None

    def validate():
        sends = _check_splits("send_splits", send_splits, size)
        rows = x.shape[0] if x.dim() else 1
        if sum(sends) != rows:
            raise ValueError(f"all_to_all_v: send_splits sum to {sum(sends)} but x has {rows} rows")
        return sends, _check_splits("recv_splits", recv_splits, size) if given else None
    if _alone(group):
        _check_tensor("all_to_all_v", x)
        sends, recvs = validate()
        if given and recvs != sends:
            raise ValueError(f"all_to_all_v: recv_splits {recvs} must equal send_splits {sends} on one rank")
        return x.clone()
    pg, (sends, recvs) = _prepare("all_to_all_v", group, x, int(given), validate, rows_may_differ=True,
                                  splits=(lambda checked: checked) if given else None)
    if recvs is None:
        recvs = _exchange_counts(sends, group)
    _, rec = _open("all_to_all_v", group, x)
    out = x.new_empty((sum(recvs), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recvs, sends, group=pg)
    trace.close_record(rec)
    return out


def exchange_counts(send_counts, group=None) -> list[int]:
    """All-to-all of one integer per peer: returns what each peer will send here."""
    if _alone(group):
        return _check_splits("send_counts", send_counts, 1)
    size = len(_info(group)[1][1])
    wire = torch.empty(size, dtype=torch.int64)  # what every rank sends: one count per peer
    _, counts = _prepare("all_to_all_counts", group, wire, 0, lambda: _check_splits("send_counts", send_counts, size))
    return _exchange_counts(counts, group)


def _exchange_counts(send_counts: list[int], group) -> list[int]:
    """The counts all-to-all itself (callers have checked and agreed)."""
    counts = torch.tensor(send_counts, dtype=torch.int64)
    pg, rec = _open("all_to_all_counts", group, counts)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=pg)
    trace.close_record(rec)
    return out.tolist()


def broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``t``."""
    members = [0] if _alone(group) else _info(group)[1][1]

    def validate():
        if src not in members:
            raise ValueError(f"broadcast: src={src!r} is not a global rank of the group {list(members)}")
    if _alone(group):
        _check_tensor("broadcast", t)
        validate()
        return t
    pg, _ = _prepare("broadcast", group, t, src if isinstance(src, int) else -1, validate)
    _, rec = _open("broadcast", group, t, peer=src)
    dist.broadcast(t, src=src, group=pg)
    trace.close_record(rec)
    return t


def barrier(group=None) -> None:
    if _alone(group):
        return
    _prepare("barrier", group, _EMPTY)
    pg, rec = _open("barrier", group, _EMPTY, nbytes=0)
    dist.barrier(group=pg)
    trace.close_record(rec)


_EMPTY = torch.empty(0)


# ------------------------------------------------------------ point to point

def _edge(src: int, dst: int) -> str:
    return f"p2p:{src}->{dst}"


# Fault injection (loom.faults.inject) can slow a link by delaying sends after
# their record opens.  None unless armed: the send path pays one global lookup.
_send_hook = None


def set_send_hook(hook) -> None:
    """Call ``hook(src, dst, tensor)`` inside every send, after its record
    opens and before the message leaves (``None`` removes it)."""
    global _send_hook
    _send_hook = hook


class Pending:
    """An in-flight point-to-point message; ``wait()`` completes its record."""

    __slots__ = ("work", "record", "tensor")

    def __init__(self, work, record, tensor):
        self.work, self.record, self.tensor = work, record, tensor

    def wait(self) -> torch.Tensor:
        if self.record[trace._T_EXIT] is None:
            self.work.wait()
            trace.close_record(self.record)
        return self.tensor


def isend(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> Pending:
    me = _info(group)[1][2]
    t = t.contiguous()  # kept alive by Pending until the send completes
    pg, rec = _open("send", group, t, peer=dst, channel=_edge(me, dst))
    if _send_hook is not None:
        _send_hook(me, dst, t)
    return Pending(dist.isend(t, dst=dst, group=pg, tag=tag), rec, t)


def irecv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> Pending:
    if not t.is_contiguous():
        raise ValueError("irecv: the receive buffer must be contiguous")
    me = _info(group)[1][2]
    pg, rec = _open("recv", group, t, peer=src, channel=_edge(src, me))
    return Pending(dist.irecv(t, src=src, group=pg, tag=tag), rec, t)


def send(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> torch.Tensor:
    return irecv(t, src, group, tag).wait()


def wait_all(pending) -> None:
    for p in pending:
        p.wait()


# ------------------------------------------------------- autograd-aware ops

def _as_agreed(ctx):
    """Re-enter `agreed()` in backward when the forward ran inside it."""
    return agreed() if ctx.agreed else contextlib.nullcontext()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.agreed = group, in_agreed()
        return all_reduce(t.clone(), "sum", group)

    @staticmethod
    def backward(ctx, g):
        with _as_agreed(ctx):
            return all_reduce(g.clone(), "sum", ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.shape, ctx.agreed = group, t.shape, in_agreed()
        return all_gather(t, group)

    @staticmethod
    def backward(ctx, g):
        with _as_agreed(ctx):
            return reduce_scatter(g.contiguous(), "sum", ctx.group).reshape(ctx.shape), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.agreed = group, in_agreed()
        return reduce_scatter(t, "sum", group)

    @staticmethod
    def backward(ctx, g):
        with _as_agreed(ctx):
            return all_gather(g.contiguous(), ctx.group), None


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group, ctx.agreed = (send_splits, recv_splits), group, in_agreed()
        return all_to_all_v(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, g):
        send_splits, recv_splits = ctx.splits
        with _as_agreed(ctx):
            return all_to_all_v(g.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def all_reduce_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """Out-of-place sum over the group; the gradient is summed the same way."""
    return _AllReduceSum.apply(t, group)


def all_gather_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """`all_gather` whose backward reduce-scatters the gradient to its owners."""
    return _AllGather.apply(t, group)


def reduce_scatter_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `reduce_scatter` whose backward all-gathers the gradient."""
    return _ReduceScatter.apply(t, group)


def all_to_all_v_with_grad(x: torch.Tensor, send_splits, recv_splits=None, group=None) -> torch.Tensor:
    """`all_to_all_v` whose backward sends gradients back along the same routes."""
    send_splits = [int(s) for s in send_splits]
    if recv_splits is None:
        recv_splits = exchange_counts(send_splits, group)
    return _AllToAllV.apply(x, send_splits, [int(s) for s in recv_splits], group)
