"""The few collectives a checkpoint needs, through loom.comms.

Everything also works with no process group at all (one process in a
notebook): the group is then a world of one and nothing is sent.  Metadata
travels as JSON in uint8 tensors; errors travel the same way, so a failure
on one rank raises on every rank instead of leaving peers in a collective.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loom import comms


@dataclass(frozen=True)
class Group:
    """Who takes part: ``rank`` is the position in the group, ``ranks`` the
    global ranks (for point-to-point), ``handle`` the process group (None
    for the default group; unused without torch.distributed)."""
    rank: int
    size: int
    ranks: tuple
    handle: object
    distributed: bool

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    @classmethod
    def alone(cls) -> "Group":
        """This process by itself, with no communication (even when
        torch.distributed is initialised): for per-process reads."""
        return cls(0, 1, (0,), None, False)


def resolve(group=None) -> Group:
    if isinstance(group, Group):
        return group
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return Group(0, 1, (0,), None, False)
    ranks = tuple(comms.group_ranks(group))
    me = dist.get_rank()
    if me not in ranks:
        raise ValueError(f"rank {me} is not a member of the group {list(ranks)}")
    return Group(ranks.index(me), len(ranks), ranks, group, True)


def exchange(obj, g: Group) -> list:
    """All-gather one JSON-able object per rank, in group order."""
    if not g.distributed or g.size == 1:
        return [obj]
    data = json.dumps(obj, separators=(",", ":")).encode()
    length = torch.tensor([len(data)], dtype=torch.int64)
    lengths = comms.all_gather(length, g.handle).tolist()
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = comms.all_gather(buf.reshape(1, -1), g.handle)
    return [json.loads(bytes(rows[r, :n].numpy())) for r, n in enumerate(lengths)]


def barrier(g: Group) -> None:
    if g.distributed and g.size > 1:
        comms.barrier(g.handle)


class RemoteError(RuntimeError):
    """A peer failed; the message names the rank and its error."""


_TYPES = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
          "FileNotFoundError": FileNotFoundError}


def error_record(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc.args[0]) if isinstance(exc, KeyError)
            and exc.args else str(exc)}


def agree(g: Group, error: BaseException | None, payload=None, *, custom: dict | None = None) -> list:
    """Exchange (error, payload) and raise on every rank if any rank failed.

    The local exception is re-raised as itself; a peer's is rebuilt with its
    type when it is a common one (or one in ``custom``), naming the rank."""
    mine = {"error": error_record(error) if error is not None else None, "payload": payload}
    everyone = exchange(mine, g)
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        if error is not None:
            raise error
        rank, rec = failed[0]
        types = {**_TYPES, **(custom or {})}
        cls = types.get(rec["type"], RemoteError)
        raise cls(f"rank {rank}: {rec['type']}: {rec['message']}")
    return [e["payload"] for e in everyone]
