"""Agree, or all raise: how every distributed entry point fails together.

A rank whose input is bad must not simply raise: its peers would wait in the
next message until the process-group timeout (gloo may even abort the process
on a size mismatch).  So before any data moves, every rank of the group takes
part in one small exchange, `agree`: whether its input is valid, a few
integers describing its call, and optionally a JSON payload.  If any rank
failed, every rank raises - the failing rank its own exception, the others one
of the same type (for common types) naming the failing rank and its message.
The callers then compare the descriptions with `Agreement.same`, which raises
the same error on every rank too, because every rank holds the same table.

Over a process group (``group``; None: the default group) the exchange is an
all-gather; over a list of global ranks (``ranks``; rings formed per batch,
no process group) it is point to point on the default group, every member
sending straight to every other (so members that list the ranks in
different orders still meet, then see that they differ).  With no process
group at all (one process) nothing is sent.

Wire: round 1 is a fixed int64 row per rank ``[ok, payload bytes, WIDTH
description integers]``; round 2, only when some rank failed or sent a
payload, carries each rank's JSON (its error or its payload).  The common
case costs one tiny exchange.  Nothing received is unpickled.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import ops, trace
from .ring import Ring

WIDTH = 16                  # description integers per rank (fewer are zero-padded)
_NO_PAYLOAD = object()


class RemoteError(RuntimeError):
    """A peer failed with an error of a type that is not rebuilt; the message
    names the rank, the type and the message."""


# The exception types rebuilt on the other ranks (a peer's error of another
# type arrives as RemoteError).  No class named by a peer is ever looked up.
_TYPES = {cls.__name__: cls for cls in (ValueError, TypeError, KeyError, IndexError, FileNotFoundError,
                                        RuntimeError, NotImplementedError, TimeoutError)}


@dataclass
class Agreement:
    """What every rank said, in group order (for a rank list: ascending
    global ranks): ``fields[i]`` the description integers of position i,
    ``payloads[i]`` its payload (None when it sent none), ``ranks[i]`` its
    global rank."""
    fields: list
    payloads: list
    ranks: tuple

    def column(self, i: int) -> list[int]:
        return [row[i] for row in self.fields]

    def same(self, names: Sequence[str], what: str, *, show: Sequence[str] = (),
             formats: dict | None = None) -> None:
        """Raise ValueError (on every rank alike) when a described field
        differs across ranks.  ``names[i]`` names description integer i (None
        or "" to skip it); the values of the fields in ``show`` are printed
        as they are, those in ``formats`` through their function (say
        `dtype_name`), the others (checksums) only said to differ."""
        formats = {**{n: str for n in show}, **(formats or {})}
        for i, name in enumerate(names):
            if not name:
                continue
            values = self.column(i)
            if len(set(values)) > 1:
                shown = formats.get(name)
                detail = (", ".join(f"rank {r}: {shown(v)}" for r, v in zip(self.ranks, values)) if shown
                          else "(differs)")
                raise ValueError(f"{what}: {name} differs across ranks {list(self.ranks)}: {detail}")


def agree(error: BaseException | None = None, fields: Sequence[int] = (), payload=_NO_PAYLOAD, *,
          group=None, ranks=None, tag: int = 0, device=None, types: dict | None = None,
          what: str = "") -> Agreement:
    """Exchange (valid?, description, payload) with every rank of ``group``
    (default: the world) or of the ring ``ranks``; raise on every rank if any
    rank passed an ``error``.

    ``fields``: at most `WIDTH` integers describing this rank's call (ignored
    when ``error`` is given).  ``payload``: any JSON value (dicts, lists,
    strings, numbers), sent only when given.  ``tag`` separates concurrent
    rings that share an edge (as `Ring`'s tag).  ``device``: where the wire
    tensors live (default: CUDA for an NCCL group, else CPU).  ``types``:
    extra exception classes, by name, to rebuild peers' errors as.
    ``what`` names the call being agreed on in the trace (a group's
    exchange is recorded as op ``"agree:<what>"``, so a rank that never
    arrives shows up as never entering it).

    The local error is re-raised as itself; a peer's arrives as its type
    when that is a common one (ValueError, TypeError, KeyError, ...) or in
    ``types``, else as `RemoteError`, with the message ``"rank R: Type:
    message"`` (R a global rank).  Returns the `Agreement`."""
    data = b""
    if error is None:  # a description that cannot be sent fails this rank, not the exchange
        try:
            fields = [int(f) for f in fields]
            if len(fields) > WIDTH:
                raise ValueError(f"agree: {len(fields)} description fields; at most {WIDTH}")
            if any(not -2**63 <= f < 2**63 for f in fields):
                raise OverflowError(f"agree: description fields {fields} must fit in int64")
            if payload is not _NO_PAYLOAD:
                data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, OverflowError) as exc:
            error = exc
    if error is not None:
        fields, data = [], json.dumps(error_record(error)).encode()
    try:
        wire = _Wire.build(group, ranks, tag, device, f"agree:{what}" if what else "agree")
    except (TypeError, ValueError) as exc:  # the rank list itself is wrong here: nobody to tell
        raise (error if error is not None else exc) from None
    row = torch.tensor([int(error is None), len(data), *fields, *[0] * (WIDTH - len(fields))], dtype=torch.int64)
    table = wire.gather(row).tolist()
    failed = [i for i, r in enumerate(table) if not r[0]]
    texts: list = [None] * len(table)
    if failed or any(r[1] for r in table):
        texts = wire.gather_bytes(data, [r[1] for r in table])
    if failed:
        if error is not None:
            raise error
        raise _rebuild(wire.ranks, failed, texts, {**_TYPES, **(types or {})})
    payloads = [json.loads(t) if t else None for t in texts]
    return Agreement([r[2:] for r in table], payloads, wire.ranks)


def error_record(exc: BaseException) -> dict:
    """The JSON form of an error (type name and message; no traceback, no pickle)."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"type": type(exc).__name__, "message": message}


def _rebuild(ranks, failed: list[int], texts: list, types: dict) -> BaseException:
    first = failed[0]
    try:
        record = json.loads(texts[first])
        kind, message = str(record["type"]), str(record["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "RemoteError", "(its error could not be read)"
    others = [ranks[i] for i in failed[1:]]
    tail = f" (ranks {others} failed too)" if others else ""
    return types.get(kind, RemoteError)(f"rank {ranks[first]}: {kind}: {message}{tail}")


_DTYPE_CODES = {d: i for i, d in enumerate(
    (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64,
     torch.float8_e4m3fn, torch.float8_e5m2), start=1)}
_DTYPE_NAMES = {i: str(d).removeprefix("torch.") for d, i in _DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    """A dtype as a description field (`dtype_name` reads it back)."""
    return _DTYPE_CODES.get(dtype, 0)


def dtype_name(code: int) -> str:
    return _DTYPE_NAMES.get(code, f"dtype #{code}")


def float_bits(x: float) -> int:
    """A float as the int64 of its bits, for a description field."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(bits: int) -> float:
    """The float whose bits `float_bits` gave."""
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def hash_text(text: str) -> int:
    """A 62-bit fingerprint of a string, for a description field."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def checksum_ints(values) -> int:
    """A 62-bit fingerprint of a sequence of ints, for a description field."""
    import hashlib
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


# ------------------------------------------------------------------ wire

_TAG_BASE = 1 << 20  # point-to-point tags of agreements over rank lists (+ the caller's tag)


class _Wire:
    """The exchange: an all-gather on a group, or over a list of global
    ranks every member sending its row straight to every other (so members
    that list the ranks in different orders still meet, and then see that
    they differ); a world of one when there is nobody to talk to."""

    def __init__(self, ranks: tuple, pg=None, device=None, label: str = "agree", tag: int | None = None):
        self.ranks, self.pg, self.device, self.label, self.tag = ranks, pg, device, label, tag

    @classmethod
    def build(cls, group, ranks, tag: int, device, label: str = "agree"):
        if ranks is not None:
            # validates the list and that this rank is in it; the table is in rank order, so
            # members that list the ranks in different orders still see (and say) the same
            members = tuple(sorted(Ring(list(ranks), tag=tag).ranks))
            world = dist.get_world_size() if dist.is_initialized() else 1
            if max(members) >= world:
                raise ValueError(f"agree: ranks {list(members)} are not all in [0, {world})")
            if len(members) == 1:
                return cls(members)
            return cls(members, None, device or _default_device(None), label, _TAG_BASE + tag)
        if group is None and not dist.is_initialized():
            return cls((0,))
        members = tuple(ops.group_ranks(group))
        if len(members) == 1:
            return cls(members)
        pg = dist.group.WORLD if group is None else group
        return cls(members, pg, device or _default_device(pg), label)

    def gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every position's ``row`` stacked in order (row: 1-D)."""
        if len(self.ranks) == 1:
            return row.unsqueeze(0)
        row = row.to(self.device)
        out = row.new_empty((len(self.ranks), row.numel()))
        if self.tag is not None:  # point to point, every member to every other
            me = dist.get_rank()
            out[self.ranks.index(me)] = row
            pending = [ops.isend(row, r, tag=self.tag) for r in self.ranks if r != me]
            pending += [ops.irecv(out[i], r, tag=self.tag) for i, r in enumerate(self.ranks) if r != me]
            ops.wait_all(pending)
            return out.cpu()
        pg, rec = ops._open(self.label, self.pg, row)
        dist.all_gather_single(out.view(-1), row, group=pg)
        trace.close_record(rec)
        return out.cpu()

    def gather_bytes(self, data: bytes, lengths: list[int]) -> list[str]:
        """Every position's bytes (of the announced ``lengths``), decoded."""
        width = max(lengths)
        buf = torch.zeros(width, dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        rows = self.gather(buf)
        return [bytes(rows[i, :n].numpy()).decode("utf-8", "replace") for i, n in enumerate(lengths)]


def _default_device(pg) -> torch.device:
    backend = dist.get_backend(pg)
    if "nccl" in str(backend) and "gloo" not in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
