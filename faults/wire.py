"""The fault monitor's wire: authenticated frames carrying JSON reports.

Nothing read from the network is unpickled or executed.  A rank's report is
a JSON object (`encode_report`); the aggregator checks every field's type and
range (`parse_report`) and drops a report that fails, naming the field.

Every message is *sealed* under the job's secret: ``HMAC-SHA256(secret,
tag + body) + body``, where the tag says which way it travels (a report, or
the aggregator's reply), so one cannot be replayed as the other.  On a byte
stream (`StoreTransport` <-> `StoreAggregator`) each sealed message is a
*frame*: a 4-byte big-endian length, then the sealed bytes; frames longer
than ``max_frame`` are refused before they are read.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import socket
import struct

MAC_BYTES = 32                    # HMAC-SHA256
MIN_SECRET_BYTES = 16
MAX_FRAME = 4 << 20               # bytes of a sealed message (MAC + body)
HEADER = struct.Struct(">I")      # the frame's length prefix
REPORT = b"loom.faults/report/1"  # tags: which way a sealed message travels
REPLY = b"loom.faults/reply/1"

MAX_NAME = 1 << 16                # characters of a group name (a 10k-rank group's name is ~60k)
MAX_TEXT = 256                    # characters of a host or op name, a dtype
MAX_DIMS = 32                     # dimensions of a shape
MAX_GROUPS = 1024                 # groups one rank may declare
_I64 = 1 << 63


def new_secret() -> bytes:
    """A fresh random per-job secret (32 bytes)."""
    return secrets.token_bytes(32)


def check_secret(secret) -> bytes:
    """``secret`` as bytes; raises TypeError unless bytes-like, ValueError if
    shorter than 16 bytes."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"the job's fault-monitor secret must be bytes, not {type(secret).__name__}")
    secret = bytes(secret)
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the job's fault-monitor secret has {len(secret)} bytes; it needs at least "
                         f"{MIN_SECRET_BYTES}")
    return secret


def mac(secret: bytes, tag: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of ``tag + body`` under ``secret`` (32 bytes)."""
    return hmac.new(secret, tag + body, hashlib.sha256).digest()


def seal(secret: bytes, tag: bytes, body: bytes) -> bytes:
    """``mac + body``: ``body`` authenticated under ``secret`` for direction ``tag``."""
    return mac(secret, tag, body) + body


def unseal(secret: bytes, tag: bytes, sealed) -> bytes | None:
    """The body of a sealed message, or None when its MAC is missing or wrong
    (or it is not bytes at all)."""
    if not isinstance(sealed, (bytes, bytearray)) or len(sealed) < MAC_BYTES:
        return None
    sealed = bytes(sealed)
    body = sealed[MAC_BYTES:]
    return body if hmac.compare_digest(sealed[:MAC_BYTES], mac(secret, tag, body)) else None


def frame(sealed: bytes) -> bytes:
    """A length-prefixed frame around ``sealed``."""
    return HEADER.pack(len(sealed)) + sealed


def read_frame(sock: socket.socket, max_frame: int = MAX_FRAME) -> bytes:
    """One frame's contents from a blocking socket.  Raises ConnectionError if
    the peer closes, ValueError if the frame is longer than ``max_frame``."""
    (n,) = HEADER.unpack(_read_exact(sock, HEADER.size))
    if n > max_frame:
        raise ValueError(f"frame of {n} bytes is over the limit of {max_frame}")
    return _read_exact(sock, n)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def dumps(obj) -> bytes:
    """Compact JSON bytes (no NaN or infinity)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def loads(data) -> object:
    """JSON from bytes or str; raises ValueError on anything else, on NaN or
    infinity, and on nesting too deep to parse."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8")  # UnicodeDecodeError is a ValueError
    if not isinstance(data, str):
        raise ValueError(f"expected JSON bytes, got {type(data).__name__}")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


# ------------------------------------------------------------------ reports

def encode_report(report: dict) -> bytes:
    """A report (see `parse_report`) as JSON bytes."""
    return dumps(report)


def parse_report(data, world_size: int) -> dict:
    """A rank's report, checked field by field.

    ``data`` is JSON bytes or an already-decoded dict.  Fields: ``rank`` (int
    in ``[0, world_size)``), ``pid`` (int >= 0), ``host`` (str), ``t`` (finite
    number: the rank's clock), ``recs`` (list of ``[group, seq, op, nbytes,
    peer, signature, t_enter, t_exit, step]``), and optionally ``groups``
    ({name: [member ranks]}), ``background`` ([names of background groups]),
    ``dropped`` (int >= 0), ``bye`` (bool); unknown fields are ignored.
    Returns a dict with the same keys, records as tuples (signature
    ``(dtype, shape)`` or ``()``).  Raises ValueError naming the first bad
    field (a record's group must be declared in ``groups`` here or earlier:
    the caller checks that)."""
    msg = data if isinstance(data, dict) else loads(data)
    if not isinstance(msg, dict):
        raise ValueError(f"a report must be a JSON object, not {type(msg).__name__}")
    rank = _int(msg.get("rank"), "rank", 0, world_size)
    out = {"rank": rank,
           "pid": _int(msg.get("pid"), "pid", 0, 1 << 32),
           "host": _text(msg.get("host"), "host", MAX_TEXT),
           "t": _number(msg.get("t"), "t"),
           "dropped": _int(msg.get("dropped", 0), "dropped", 0, _I64),
           "bye": msg.get("bye", False)}
    if not isinstance(out["bye"], bool):
        raise ValueError(f"bye={out['bye']!r} must be true or false")
    groups = msg.get("groups", {})
    if not isinstance(groups, dict) or len(groups) > MAX_GROUPS:
        raise ValueError(f"groups must be an object of at most {MAX_GROUPS} groups")
    out["groups"] = {}
    for name, members in groups.items():
        _text(name, "group name", MAX_NAME)
        if not isinstance(members, (list, tuple)) or len(members) > world_size:
            raise ValueError(f"group {name[:80]!r}: members must be a list of at most {world_size} ranks")
        ranks = tuple(_int(r, f"group {name[:80]!r} member", 0, world_size) for r in members)
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"group {name[:80]!r}: members {list(ranks)[:16]} repeat a rank")
        out["groups"][name] = ranks
    background = msg.get("background", [])
    if not isinstance(background, (list, tuple)) or len(background) > MAX_GROUPS:
        raise ValueError(f"background must be a list of at most {MAX_GROUPS} group names")
    out["background"] = [_text(name, "background group name", MAX_NAME) for name in background]
    recs = msg.get("recs")
    if not isinstance(recs, (list, tuple)):
        raise ValueError(f"recs must be a list of records, not {type(recs).__name__}")
    out["recs"] = [_record(rec, i, world_size) for i, rec in enumerate(recs)]
    return out


def _record(rec, i: int, world_size: int) -> tuple:
    if not isinstance(rec, (list, tuple)) or len(rec) != 9:
        raise ValueError(f"recs[{i}] must be a list of 9 fields "
                         f"[group, seq, op, nbytes, peer, signature, t_enter, t_exit, step]")
    group, seq, op, nbytes, peer, sig, t_enter, t_exit, step = rec
    where = f"recs[{i}]"
    _text(group, f"{where}.group", MAX_NAME)
    _int(seq, f"{where}.seq", 0, _I64)
    _text(op, f"{where}.op", MAX_TEXT)
    _int(nbytes, f"{where}.nbytes", 0, _I64)
    if peer is not None:
        _int(peer, f"{where}.peer", 0, world_size)
    if not isinstance(sig, (list, tuple)) or len(sig) not in (0, 2):
        raise ValueError(f"{where}.signature must be [] or [dtype, shape]")
    if sig:
        dtype, shape = sig
        _text(dtype, f"{where}.dtype", MAX_TEXT)
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
            raise ValueError(f"{where}.shape must be a list of at most {MAX_DIMS} sizes")
        sig = (dtype, tuple(_int(d, f"{where}.shape", 0, _I64) for d in shape))
    else:
        sig = ()
    _number(t_enter, f"{where}.t_enter")
    if t_exit is not None and _number(t_exit, f"{where}.t_exit") < t_enter:
        raise ValueError(f"{where}: t_exit={t_exit} is before t_enter={t_enter}")
    if step is not None:
        _int(step, f"{where}.step", -_I64, _I64)
    return (group, seq, op, nbytes, peer, sig, t_enter, t_exit, step)


def _int(v, name: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise ValueError(f"{name}={_show(v)} must be an integer in [{lo}, {hi})")
    return v


def _number(v, name: str) -> float:
    if not (type(v) is float and math.isfinite(v) or type(v) is int and -_I64 <= v < _I64):
        raise ValueError(f"{name}={_show(v)} must be a finite number")
    return v


def _text(v, name: str, limit: int) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(f"{name}={_show(v)} must be a string of at most {limit} characters")
    return v


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
