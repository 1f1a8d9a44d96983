"""Where checkpoints live: any fsspec URL, one Zarr group per step.

    <url>/step-00000010/state/          Zarr v3 group, one array per tensor
    <url>/step-00000010/manifest.json   written after every chunk
    <url>/step-00000010/COMMITTED       written last: {"step", "manifest_sha256", "committed_at", "seq"}
    <url>/latest                        {"step": N}: removed before the marker, rewritten after

A step exists for `load` only when its marker is present, parses, and names
the sha256 of the manifest, so a save that dies anywhere before the marker
leaves nothing visible.  This holds on stores without atomic rename
(``memory://``, object stores, where a PUT is all-or-nothing): it relies on
the order of writes, not on renames.  On local disks small files are also
written to a temporary name and renamed, so no reader ever sees half a file;
a torn ``latest`` is only a hint anyway (it is checked against the markers).

``latest`` names the newest commit, which after a rollback (load step 50 of
50 and 100, save 60) is not the highest step: every commit points it at the
step it commits.  Commits are ordered by the marker's ``seq``, a commit
sequence number the committing rank 0 assigns (one more than the largest in
the store), so the order does not depend on any host's clock; markers
without one (older stores) come first, by their ``committed_at``.
`latest()` trusts a ``latest`` that names a committed step and otherwise
picks the newest commit; a commit removes ``latest`` before writing its
marker, so a save that dies (or finds the disk full) between its marker and
the new ``latest`` still ends up as the step `latest()` picks.

A marker is written whole (a temporary file and a rename on local disks,
one PUT on object stores), so a marker that exists but does not check out
is damage, not a save in progress: `damaged_markers` lists such steps and
`damaged_newer` the ones that may be newer than the step `latest()` picks.

What a store holds is read as hostile: markers and ``latest`` are read
within a size limit, every JSON document within a depth limit, and damage
raises `InvalidCheckpointError` naming the file and the field.  `vet` is
the cheap soundness check of a committed step (its manifest, and one
listing showing every chunk object at its full size), which `load` and
retention use.
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

from . import layout, zarr_io
from .manifest import (MANIFEST, MARKER, MAX_MANIFEST, MAX_SMALL_JSON, ChecksumError, InvalidCheckpointError,
                       Manifest, invalid, parse_json)
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
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except ImportError:  # s3:// without s3fs, ...: name the package and loom's extra
            from .object_store import require_backend
            require_backend(url)
            raise
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
        """Every step directory, committed or not, ascending.  Listed afresh
        (other processes write steps: s3fs and its kind cache listings)."""
        try:
            self.fs.invalidate_cache(self.root)
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
        seq = marker.get("seq", 1)
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= _MAX_SEQ:
            raise invalid(file, "seq", f"{seq!r:.40} must be a commit number from 1 to {_MAX_SEQ}")
        return marker

    def marker(self, step: int) -> dict | None:
        """The parsed commit marker of ``step``, or None if it is not
        committed (no marker, or a damaged one: see `read_marker`)."""
        try:
            return self.read_marker(step)
        except InvalidCheckpointError:
            return None

    def _scan(self) -> tuple[list[int], dict[int, InvalidCheckpointError], int]:
        """One read of every marker: (the committed steps, oldest commit
        first; {step: the error} of markers that exist but are damaged; the
        largest ``seq``, 0 when none).  Commits are ordered by ``seq``;
        markers without one (older stores, hand-made) come first, by
        ``committed_at``, then by step."""
        found, damaged, top = [], {}, 0
        for step in self.steps():
            try:
                marker = self.read_marker(step)
            except InvalidCheckpointError as exc:
                damaged[step] = exc
                continue
            if marker is None:
                continue
            seq = marker.get("seq")
            top = max(top, seq or 0)
            found.append(((0, float(marker.get("committed_at", 0.0))) if seq is None else (1, seq), step))
        return [s for _, s in sorted(found)], damaged, top

    def committed_steps(self) -> list[int]:
        """Every committed step, ascending."""
        return sorted(self._scan()[0])

    def commit_order(self) -> list[int]:
        """Every committed step, oldest commit first (by the markers' ``seq``;
        see `_scan`)."""
        return self._scan()[0]

    def damaged_markers(self) -> dict[int, InvalidCheckpointError]:
        """{step: InvalidCheckpointError} of the steps whose marker exists but
        is damaged (not a save in progress: markers are written whole)."""
        return self._scan()[1]

    def damaged_newer(self, step: int | None) -> list[tuple[int, InvalidCheckpointError]]:
        """The steps with a damaged marker that may be newer commits than
        ``step`` (the one `latest()` picks; None: nothing is committed),
        newest first: none when ``latest`` names a sound commit (every
        commit rewrites it, so nothing was committed after it); otherwise
        the one ``latest`` names and every one above ``step``."""
        damaged = self.damaged_markers()
        if not damaged:
            return []
        pointed = self.pointer()
        if pointed is not None and pointed not in damaged and self.marker(pointed) is not None:
            return []
        newer = sorted((s for s in damaged if step is None or s > step or s == pointed),
                       key=lambda s: (s == pointed, s), reverse=True)  # what `latest` names first
        return [(s, damaged[s]) for s in newer]

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
        committed step, otherwise the newest commit (`commit_order`; None
        when nothing is committed).  After a rollback this is the step saved
        last, not the highest step."""
        pointed = self.pointer()
        if pointed is not None and self.marker(pointed) is not None:
            return pointed
        order = self.commit_order()
        return order[-1] if order else None

    def read_sealed(self, step: int) -> tuple[Manifest, str]:
        """The checked manifest of a committed step and its sha256 (from the
        marker).  FileNotFoundError when ``step`` is not committed;
        ChecksumError when the manifest is missing or not what the marker
        sealed; InvalidCheckpointError for a damaged marker or manifest (see
        `Manifest.from_json`)."""
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
        return Manifest.from_json(raw, file, step), marker["manifest_sha256"]

    def read_manifest(self, step: int, expect_sha256: str | None = None) -> Manifest:
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
        the newest commit).  The marker records the commit's ``seq`` (one
        more than any in the store: the store has one writer).  The marker
        makes the step exist, so a failure to write ``latest`` after it is a
        warning, not a failed commit; ``latest`` is removed before the
        marker, so readers then pick this step by its ``seq``.  ``durable``:
        each is fsynced (with its directories) before the next is written,
        so the marker never outlives what it seals."""
        name = step_name(step)
        self.put(f"{name}/{MANIFEST}", manifest)
        if durable:
            self.sync([f"{name}/{MANIFEST}"])
        self.remove(LATEST)
        if durable:
            self.sync([LATEST], files=False)
        seq = self._scan()[2] + 1
        if seq > _MAX_SEQ:
            raise invalid(self.url, "seq", f"the store's commit numbers are exhausted ({_MAX_SEQ})")
        marker = {"step": step, "manifest_sha256": digest(manifest), "committed_at": time.time(), "seq": seq}
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

    def retention(self, keep_last: int | None, keep_every: int | None, *, check=None,
                  damaged: dict | None = None) -> tuple[list[int], set[int]]:
        """(every committed step, oldest commit first; the steps a retention
        policy keeps): `retained` over the commit order, counting only sound
        steps toward ``keep_last``, plus the step `latest()` picks, which is
        never dropped.

        ``check(step)`` decides soundness by raising InvalidCheckpointError
        (default: `vet`, the manifest and one listing of the chunk objects;
        `gc` can pass a full checksum check); it is asked newest commit
        first, only until ``keep_last`` sound steps are found.  A damaged
        step among them is kept, not counted (so retention never leaves
        fewer sound steps than it keeps), logged, and put in ``damaged``
        ({step: error}) when given."""
        order = self.commit_order()
        check = check or (lambda step: vet(self, step))

        def sound(step: int) -> bool:
            try:
                check(step)
                return True
            except (InvalidCheckpointError, FileNotFoundError) as exc:
                log.warning("checkpoint retention at %s: step %d is damaged and does not count toward "
                            "keep_last (%s)", self.url, step, exc)
                if damaged is not None:
                    damaged[step] = exc
                return False

        keep = retained(order, keep_last, keep_every, sound)
        newest = self.latest()
        if newest is not None:
            keep.add(newest)
        return order, keep


_MARKER_FIELDS = {"step", "manifest_sha256", "committed_at", "seq"}
_MAX_SEQ = 2**53  # commit numbers stay exact in every JSON reader


# ------------------------------------------------------ vetting a step

def check_objects(store: CheckpointStore, manifest: Manifest) -> dict:
    """Are the chunk objects of a (checked) manifest really stored?  One
    listing of the step's folder (not one request per chunk): each chunk
    must be a plain file of exactly its full-chunk size (the ``bytes`` codec
    stores whole chunks, edges padded), so a missing, shorter or longer
    object is damage, and so is a link anywhere in the step (it may lead
    out of the store).  Returns ``{(key, chunk index) or (None, path):
    InvalidCheckpointError}``, empty when every object is right."""
    step = manifest.step
    sizes, links = _listing(store, store.path(step_name(step)))
    links = {path: InvalidCheckpointError(
        f"{store.url_of(rel)}: a link inside a step (loom writes none; it may lead out of the store)",
        file=store.url_of(rel), field=None) for path, rel in links.items()}
    problems = {}
    prefix = data_prefix(step)
    for key in sorted(manifest.tensors):
        entry = manifest.tensors[key]
        want = math.prod(entry.chunks) * entry.tensor_dtype.itemsize
        for index in layout.chunk_indices(entry.storage_shape, entry.chunks):
            rel = zarr_io.chunk_key(f"{prefix}/{entry.array}", index)
            path = store.path(rel)
            got = sizes.get(path)
            if path in links:
                problems[(key, index)] = links.pop(path)
            elif got != want:
                what = "missing (or not a plain file)" if got is None else f"{got} bytes"
                problems[(key, index)] = InvalidCheckpointError(
                    f"{store.url_of(rel)}: chunk {layout.chunk_name(index)} of array {key!r} is {what}, "
                    f"not a full chunk of {want} bytes ({list(entry.chunks)} of {entry.dtype})",
                    file=store.url_of(rel), field=f"tensors[{key!r}].chunks")
    problems.update({(None, path): exc for path, exc in links.items()})
    return problems


def _listing(store: CheckpointStore, top: str) -> tuple[dict, dict]:
    """Every object under ``top``: ({path: size} of plain files, {path:
    path relative to the root} of links), in one listing (os.scandir on a
    local disk, which needs no stat per folder; fsspec's find elsewhere)."""
    sizes, links = {}, {}
    if store.local:
        folders = [top]
        while folders:
            folder = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.is_symlink():
                    links[entry.path] = entry.path
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    sizes[entry.path] = entry.stat(follow_symlinks=False).st_size
        if os.path.islink(top):
            links[top] = top
    else:
        try:
            listing = store.fs.find(top, detail=True, withdirs=True)
        except (FileNotFoundError, NotADirectoryError):
            listing = {}
        for path, info in listing.items():
            if info.get("islink"):
                links[path] = path
            elif info.get("type") == "file":
                sizes[path] = info.get("size")
    root = store.root + "/"
    return sizes, {path: path[len(root):] if path.startswith(root) else path for path in links}


def vet(store: CheckpointStore, step: int) -> tuple[Manifest, str]:
    """A committed step's checked manifest and its sha256, after
    `check_objects` found every chunk object right.  Raises
    InvalidCheckpointError (the first problem, with how many there are),
    ChecksumError for a manifest the marker did not seal, FileNotFoundError
    for a step that is not committed."""
    manifest, sha = store.read_sealed(step)
    problems = check_objects(store, manifest)
    if problems:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more damaged objects)" if len(problems) > 1 else ""
        raise InvalidCheckpointError(f"{first}{more}", file=first.file, field=first.field)
    return manifest, sha


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

def retained(steps: list[int], keep_last: int | None, keep_every: int | None, sound=None) -> set[int]:
    """Committed steps a retention policy keeps.  ``steps``: committed steps
    in commit order, oldest first (`CheckpointStore.commit_order`; after a
    rollback the newest commit is not the highest step).  Keeps the newest
    commits back to the ``keep_last``-th one that ``sound(step)`` accepts
    (all when None or 0, or when fewer are sound; ``sound`` is asked newest
    first, and None accepts every step), plus multiples of ``keep_every``;
    the newest commit always.  Raises ValueError for a negative or non-int
    ``keep_last``/``keep_every``."""
    for name, v in (("keep_last", keep_last), ("keep_every", keep_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name}={v!r} must be a non-negative int")
    steps = list(steps)
    if not keep_last:
        return set(steps)
    keep, counted = set(), 0
    for step in reversed(steps):
        keep.add(step)
        counted += sound is None or sound(step)
        if counted == keep_last:
            break
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep
