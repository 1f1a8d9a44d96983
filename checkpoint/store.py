"""Where checkpoints live: any fsspec URL, one Zarr group per step.

    <url>/step-00000010/state/          Zarr v3 group, one array per tensor
    <url>/step-00000010/manifest.json   written after every chunk
    <url>/step-00000010/COMMITTED       written last: {"step", "manifest_sha256", "committed_at"}
    <url>/latest                        {"step": N}: removed before the marker, rewritten after

A step exists for `load` only when its marker is present, parses, and names
the sha256 of the manifest, so a save that dies anywhere before the marker
leaves nothing visible.  This holds on stores without atomic rename
(``memory://``, object stores, where a PUT is all-or-nothing): it relies on
the order of writes, not on renames.  On local disks small files are also
written to a temporary name and renamed, so no reader ever sees half a file;
a torn ``latest`` is only a hint anyway (it is checked against the markers).

``latest`` names the newest commit in *time*, which after a rollback (load
step 50 of 50 and 100, save 60) is not the highest step: every commit points
it at the step it commits.  `latest()` trusts a ``latest`` that names a
committed step and otherwise picks the newest commit by the markers'
``committed_at``; a commit removes ``latest`` before writing its marker, so
a save that dies (or finds the disk full) between its marker and the new
``latest`` still ends up as the step `latest()` picks.

What a store holds is read as hostile: markers and ``latest`` are read
within a size limit, every JSON document within a depth limit, and damage
raises `InvalidCheckpointError` naming the file and the field.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
import uuid

import fsspec

from .manifest import (MANIFEST, MARKER, MAX_MANIFEST, MAX_SMALL_JSON, ChecksumError, InvalidCheckpointError,
                       check_manifest, invalid, parse_json)
from .state import digest

log = logging.getLogger("loom.checkpoint")

LATEST = "latest"
STATE_GROUP = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def data_prefix(step: int) -> str:
    """Where a step's Zarr group lives, relative to the checkpoint root."""
    return f"{step_name(step)}/{STATE_GROUP}"


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative int")
    return step


class CheckpointStore:
    """One checkpoint root: its filesystem, steps, markers and Zarr store."""

    def __init__(self, url: str):
        if not isinstance(url, (str, os.PathLike)) or not str(url):
            raise ValueError(f"checkpoint url {url!r} must be a non-empty path or fsspec URL")
        url = str(url)
        self.url = url.rstrip("/") or url
        self.fs, path = fsspec.core.url_to_fs(url)
        self.root = path.rstrip("/") or path
        protocol = self.fs.protocol
        self.local = "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))
        self._zarr = None

    # ------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def location(self, step: int) -> str:
        return f"{self.url}/{step_name(step)}"

    def url_of(self, rel: str) -> str:
        """The URL of a file of the store (what errors name)."""
        return f"{self.url}/{rel}"

    @property
    def zarr_store(self):
        """The Zarr store rooted at the checkpoint URL (LocalStore on local
        disks: atomic chunk writes; FsspecStore elsewhere)."""
        if self._zarr is None:
            if self.local:
                from zarr.storage import LocalStore
                self._zarr = LocalStore(self.root)
            else:
                from zarr.storage import FsspecStore
                self._zarr = FsspecStore.from_url(self.url)
        return self._zarr

    # ------------------------------------------------------- small files
    def put(self, rel: str, data: bytes) -> None:
        """Write a whole small file; readers see the old or the new content.
        On a local disk through a temporary file, which is removed again if
        the write fails (a full disk); raises what the write raised."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
                raise
        else:
            self.fs.pipe_file(path, data)

    def sync(self, rels, *, files: bool = True, dirs: bool = True) -> None:
        """Make files durable: fsync each of ``rels`` (``files``) and then
        (``dirs``) every directory from theirs up to the root, so that their
        names survive a machine crash too.  A no-op off local disks (an
        object store's PUT is durable when it returns)."""
        if not self.local:
            return
        folders = set()
        for rel in rels:
            if files:
                _fsync(self.path(rel), os.O_RDONLY)
            parts = rel.split("/")[:-1]
            folders.update("/".join(parts[:i]) for i in range(len(parts) + 1))
        if dirs:
            paths = [self.path(f) if f else self.root for f in sorted(folders, key=len, reverse=True)]
            for path in paths + [os.path.dirname(self.root) or "."]:  # the root's own name too
                _fsync(path, os.O_RDONLY | os.O_DIRECTORY)

    def get(self, rel: str, limit: int | None = None) -> bytes | None:
        """The bytes of a small file, or None when there is none.  With
        ``limit``, at most ``limit + 1`` bytes are read and a larger file
        raises InvalidCheckpointError; on a local disk the file must then be
        a regular file, not a link (a FIFO would block the read forever)."""
        path = self.path(rel)
        try:
            if limit is None:
                return self.fs.cat_file(path)
            if self.local:
                data = _read_regular(path, limit + 1)
            else:
                data = self.fs.cat_file(path, start=0, end=limit + 1)
        except (FileNotFoundError, NotADirectoryError, KeyError):
            return None
        except IsADirectoryError:
            raise invalid(self.url_of(rel), None, "is a folder, not a file") from None
        except _NotRegular as exc:
            raise invalid(self.url_of(rel), None, f"is {exc}, not a regular file") from None
        if len(data) > limit:
            raise invalid(self.url_of(rel), None, f"holds more than {limit} bytes")
        return data

    def remove(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------- steps
    def steps(self) -> list[int]:
        """Every step directory, committed or not, ascending."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = set()
        for entry in entries:
            m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    def read_marker(self, step: int) -> dict | None:
        """The commit marker of ``step``: None when there is none (the step
        is not committed); InvalidCheckpointError when it is damaged (does
        not parse, or its step, manifest_sha256 or committed_at is wrong)."""
        rel = f"{step_name(step)}/{MARKER}"
        raw = self.get(rel, MAX_SMALL_JSON)
        if raw is None:
            return None
        file = self.url_of(rel)
        marker = parse_json(raw, file)
        if not isinstance(marker, dict) or not {"step", "manifest_sha256"} <= set(marker) <= _MARKER_FIELDS:
            raise invalid(file, None, f"a marker has the fields {sorted(_MARKER_FIELDS)}")
        if marker["step"] != step or isinstance(marker["step"], bool):
            raise invalid(file, "step", f"{marker['step']!r:.40} is not the step of its folder ({step})")
        if not isinstance(marker["manifest_sha256"], str) or not _SHA256.match(marker["manifest_sha256"]):
            raise invalid(file, "manifest_sha256", "must be 64 lowercase hex digits")
        at = marker.get("committed_at", 0.0)
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
            raise invalid(file, "committed_at", f"{at!r:.40} must be a time in seconds")
        return marker

    def marker(self, step: int) -> dict | None:
        """The parsed commit marker of ``step``, or None if it is not
        committed (no marker, or a damaged one: see `read_marker`)."""
        try:
            return self.read_marker(step)
        except InvalidCheckpointError:
            return None

    def _commits(self) -> list[tuple[float, int]]:
        """(committed_at, step) of every committed step, oldest commit first
        (markers without a time, from hand-made stores, first by step)."""
        found = []
        for step in self.steps():
            marker = self.marker(step)
            if marker is not None:
                found.append((float(marker.get("committed_at", 0.0)), step))
        return sorted(found)

    def committed_steps(self) -> list[int]:
        """Every committed step, ascending."""
        return sorted(s for _, s in self._commits())

    def commit_order(self) -> list[int]:
        """Every committed step, oldest commit first (by ``committed_at``)."""
        return [s for _, s in self._commits()]

    def pointer(self) -> int | None:
        """The step ``latest`` names, or None when it is absent or damaged
        (a warning: it is only a hint)."""
        try:
            raw = self.get(LATEST, MAX_SMALL_JSON)
            if raw is None:
                return None
            doc = parse_json(raw, self.url_of(LATEST))
            if not isinstance(doc, dict) or set(doc) != {"step"} or isinstance(doc["step"], bool) \
                    or not isinstance(doc["step"], int) or doc["step"] < 0:
                raise invalid(self.url_of(LATEST), "step", "must be {\"step\": <non-negative int>}")
        except InvalidCheckpointError as exc:
            log.warning("ignoring %s (the newest commit in time is used instead)", exc)
            return None
        return doc["step"]

    def latest(self) -> int | None:
        """The step to resume from: the one ``latest`` names when it names a
        committed step, otherwise the newest commit in time (None when
        nothing is committed).  After a rollback this is the step saved
        last, not the highest step."""
        pointed = self.pointer()
        if pointed is not None and self.marker(pointed) is not None:
            return pointed
        order = self.commit_order()
        return order[-1] if order else None

    def read_sealed(self, step: int) -> tuple[dict, str]:
        """The checked manifest of a committed step and its sha256 (from the
        marker).  FileNotFoundError when ``step`` is not committed;
        ChecksumError when the manifest is missing or not what the marker
        sealed; InvalidCheckpointError for a damaged marker or manifest (see
        `check_manifest`)."""
        marker = self.read_marker(step)
        if marker is None:
            if step in self.steps():
                raise FileNotFoundError(
                    f"step {step} at {self.url} is not committed (no {MARKER} marker): "
                    f"its save was interrupted or is still running")
            raise FileNotFoundError(f"no step {step} at {self.url} (committed steps: "
                                    f"{self.committed_steps()})")
        file = self.url_of(f"{step_name(step)}/{MANIFEST}")
        raw = self.get(f"{step_name(step)}/{MANIFEST}", MAX_MANIFEST)
        if raw is None or digest(raw) != marker["manifest_sha256"]:
            raise ChecksumError(f"{file} is missing or does not match the sha256 recorded in its "
                                f"{MARKER} marker", file=file, field="manifest_sha256")
        return check_manifest(parse_json(raw, file), file, step), marker["manifest_sha256"]

    def read_manifest(self, step: int, expect_sha256: str | None = None) -> dict:
        """The checked manifest of a committed step (errors: `read_sealed`).
        ``expect_sha256``: the manifest another rank checked; a step replaced
        since then raises InvalidCheckpointError."""
        manifest, sha = self.read_sealed(step)
        if expect_sha256 is not None and sha != expect_sha256:
            raise invalid(self.url_of(f"{step_name(step)}/{MARKER}"), "manifest_sha256",
                          "the step was replaced while it was being loaded")
        return manifest

    # ------------------------------------------------------------ commit
    def begin(self, step: int) -> None:
        """Make room for a new save of ``step``: an old marker goes first, so
        a replaced step is never visible half-written."""
        if step in self.steps():
            self.remove(f"{step_name(step)}/{MARKER}")
            self.remove(step_name(step), recursive=True)

    def commit(self, step: int, manifest: bytes, *, durable: bool = False) -> None:
        """Manifest, then marker, then ``latest`` (always pointed at ``step``:
        the newest commit in time).  The marker makes the step exist, so a
        failure to write ``latest`` after it is a warning, not a failed
        commit; ``latest`` is removed before the marker, so readers then
        pick this step by its commit time.  ``durable``: each is fsynced
        (with its directories) before the next is written, so the marker
        never outlives what it seals."""
        name = step_name(step)
        self.put(f"{name}/{MANIFEST}", manifest)
        if durable:
            self.sync([f"{name}/{MANIFEST}"])
        self.remove(LATEST)
        if durable:
            self.sync([LATEST], files=False)
        marker = {"step": step, "manifest_sha256": digest(manifest), "committed_at": time.time()}
        self.put(f"{name}/{MARKER}", json.dumps(marker).encode())
        if durable:
            self.sync([f"{name}/{MARKER}"])
        try:
            self.put(LATEST, json.dumps({"step": step}).encode())
            if durable:
                self.sync([LATEST])
        except Exception as exc:  # noqa: BLE001 - committed already; readers fall back to commit time
            log.warning("step %d at %s is committed, but %s could not be written (%s: %s); readers "
                        "pick the newest commit in time instead", step, self.url, LATEST,
                        type(exc).__name__, exc)

    def delete_step(self, step: int) -> None:
        """Remove a step; its marker goes first so a half-deleted step is
        invisible.  A ``latest`` naming it is pointed at the newest remaining
        commit in time (removed when none remains)."""
        pointed = self.pointer() == step
        if pointed:
            self.remove(LATEST)
        self.remove(f"{step_name(step)}/{MARKER}")
        self.remove(step_name(step), recursive=True)
        if pointed:
            newest = self.latest()
            if newest is not None:
                self.put(LATEST, json.dumps({"step": newest}).encode())

    def retention(self, keep_last: int | None, keep_every: int | None) -> tuple[list[int], set[int]]:
        """(every committed step, oldest commit first; the steps a retention
        policy keeps): `retained` over the commit order, plus the step
        `latest()` picks, which is never dropped."""
        order = self.commit_order()
        keep = retained(order, keep_last, keep_every)
        newest = self.latest()
        if newest is not None:
            keep.add(newest)
        return order, keep


_MARKER_FIELDS = {"step", "manifest_sha256", "committed_at"}


class _NotRegular(OSError):
    """A store object that is a link, FIFO, device or socket."""


def _read_regular(path: str, n: int) -> bytes:
    """At most ``n`` bytes of a regular local file, not following a link and
    never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        if os.path.islink(path):
            raise _NotRegular("a link") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(path)
            raise _NotRegular("a FIFO, device or socket")
        chunks, left = [], n
        while left > 0:
            piece = os.read(fd, min(left, 1 << 20))
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------- retention and gc

def retained(steps: list[int], keep_last: int | None, keep_every: int | None) -> set[int]:
    """Committed steps a retention policy keeps.  ``steps``: committed steps
    in commit order, oldest first (`CheckpointStore.commit_order`; after a
    rollback the newest commit is not the highest step).  Keeps the newest
    ``keep_last`` commits (all when None or 0), plus multiples of
    ``keep_every``; the newest commit always.  Raises ValueError for a
    negative or non-int ``keep_last``/``keep_every``."""
    for name, v in (("keep_last", keep_last), ("keep_every", keep_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name}={v!r} must be a non-negative int")
    steps = list(steps)
    if not keep_last:
        return set(steps)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def gc(url: str, *, keep_last: int | None = None, keep_every: int | None = None,
       include_newer: bool = False, dry_run: bool = False) -> dict:
    """Delete uncommitted steps and the committed ones retention drops
    (`CheckpointStore.retention`: counted in commit order, never the step
    `latest()` picks).

    Uncommitted steps above the step `latest()` picks may be saves in
    progress; they are kept unless ``include_newer``.  Returns what was
    (or, with ``dry_run``, would be) removed: ``{"uncommitted", "committed",
    "kept"}``, each ascending.  Raises ValueError for a bad policy."""
    store = CheckpointStore(url)
    order, keep = store.retention(keep_last, keep_every)
    committed = set(order)
    newest = store.latest()
    torn = [s for s in store.steps() if s not in committed and (include_newer or s < (-1 if newest is None else newest))]
    dropped = [s for s in order if s not in keep]
    if not dry_run:
        for step in torn + dropped:
            store.delete_step(step)
    return {"uncommitted": torn, "committed": sorted(dropped), "kept": sorted(committed - set(dropped))}
