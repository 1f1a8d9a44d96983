"""Traced wrappers around torch.distributed: the only door to it in loom.

Every call records a `CommRecord` (see trace.py).  Ranks are always *global*
ranks; ``group=None`` means the default (world) group.  The ``*_with_grad``
variants are autograd-aware for parallel code.
"""
from __future__ import annotations

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
    """The global ranks of ``group`` in group order."""
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


# ---------------------------------------------------------------- collectives

def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce; returns ``t``."""
    rop = _reduce_op(op)
    pg, rec = _open("all_reduce", group, t)
    dist.all_reduce(t, op=rop, group=pg)
    trace.close_record(rec)
    return t


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere), concatenated on dim 0 in group order."""
    pg, rec = _open("all_gather", group, t)
    size = len(_group_info[pg][1])
    src = t.contiguous().reshape((-1,) + tuple(t.shape[1:])) if t.dim() else t.reshape(1)
    out = src.new_empty((size * src.shape[0],) + tuple(src.shape[1:]))
    dist.all_gather_single(out, src, group=pg)
    trace.close_record(rec)
    return out


def reduce_scatter(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``t`` over the group and return this rank's dim-0 slice of the result."""
    rop = _reduce_op(op)
    pg, rec = _open("reduce_scatter", group, t)
    rows = _dim0_chunks(t, len(_group_info[pg][1]), "reduce_scatter")
    out = t.new_empty((rows,) + tuple(t.shape[1:]))
    dist.reduce_scatter_single(out, t.contiguous(), op=rop, group=pg)
    trace.close_record(rec)
    return out


def _check_splits(name: str, splits, size: int) -> list[int]:
    splits = list(map(int, splits))
    if len(splits) != size or (splits and min(splits) < 0):
        raise ValueError(f"all_to_all_v: {name} {splits} must be {size} non-negative counts")
    return splits


def all_to_all_v(x: torch.Tensor, send_splits, recv_splits=None, group=None) -> torch.Tensor:
    """Exchange uneven dim-0 slices: ``send_splits[i]`` rows of ``x`` go to the
    i-th rank of the group.  When ``recv_splits`` is None the counts are
    exchanged first (one extra small all-to-all)."""
    size = len(_info(group)[1][1])
    send_splits = _check_splits("send_splits", send_splits, size)
    rows = x.shape[0] if x.dim() else 1
    if sum(send_splits) != rows:
        raise ValueError(f"all_to_all_v: send_splits sum to {sum(send_splits)} but x has {rows} rows")
    if recv_splits is None:
        recv_splits = exchange_counts(send_splits, group)
    recv_splits = _check_splits("recv_splits", recv_splits, size)
    pg, rec = _open("all_to_all_v", group, x)
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=pg)
    trace.close_record(rec)
    return out


def exchange_counts(send_counts, group=None) -> list[int]:
    """All-to-all of one integer per peer: returns what each peer will send here."""
    counts = torch.tensor([int(c) for c in send_counts], dtype=torch.int64)
    pg, rec = _open("all_to_all_counts", group, counts)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=pg)
    trace.close_record(rec)
    return out.tolist()


def broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``t``."""
    pg, rec = _open("broadcast", group, t, peer=src)
    dist.broadcast(t, src=src, group=pg)
    trace.close_record(rec)
    return t


def barrier(group=None) -> None:
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

class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_reduce(t.clone(), "sum", group)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.clone(), "sum", ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.shape = group, t.shape
        return all_gather(t, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g.contiguous(), "sum", ctx.group).reshape(ctx.shape), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return reduce_scatter(t, "sum", group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g.contiguous(), ctx.group), None


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return all_to_all_v(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, g):
        send_splits, recv_splits = ctx.splits
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
