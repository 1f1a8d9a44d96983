"""The few collectives a checkpoint needs, through loom.comms.

Everything also works with no process group at all (one process in a
notebook): the group is then a world of one and nothing is sent.  Metadata
and errors travel as JSON through `loom.comms.agree`, so a failure on one
rank raises on every rank instead of leaving peers in a collective.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def barrier(g: Group) -> None:
    if g.distributed and g.size > 1:
        comms.barrier(g.handle)


def agree(g: Group, error: BaseException | None, payload=None, *, custom: dict | None = None) -> list:
    """Exchange (error, payload) and raise on every rank if any rank failed
    (`loom.comms.agree` over the group's process group); returns every
    rank's payload in group order.

    The local error is re-raised as itself; a peer's is rebuilt with its
    type when it is a common one (or one in ``custom``), naming the rank."""
    if not g.distributed or g.size == 1:
        if error is not None:
            raise error
        return [payload]
    kwargs = {} if payload is None else {"payload": payload}
    return comms.agree(error, group=g.handle, types=custom, what="checkpoint", **kwargs).payloads
