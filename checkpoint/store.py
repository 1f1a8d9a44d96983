"""Where checkpoints live: any fsspec URL, one Zarr group per step.

    <url>/step-00000010/state/          Zarr v3 group, one array per tensor
    <url>/step-00000010/manifest.json   written after every chunk
    <url>/step-00000010/COMMITTED       written last: {"step", "manifest_sha256"}
    <url>/latest                        {"step": N}, updated after the marker

A step exists for `load` only when its marker is present, parses, and names
the sha256 of the manifest, so a save that dies anywhere before the marker
leaves nothing visible.  This holds on stores without atomic rename
(``memory://``, object stores, where a PUT is all-or-nothing): it relies on
the order of writes, not on renames.  On local disks small files are also
written to a temporary name and renamed, so no reader ever sees half a file;
a torn ``latest`` is only a hint anyway (it is checked against the markers).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

import fsspec

from .manifest import MANIFEST, MARKER, ChecksumError, check_manifest
from .state import digest

LATEST = "latest"
STATE_GROUP = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
        """Write a whole small file; readers see the old or the new content."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
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

    def get(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(rel))
        except (FileNotFoundError, KeyError):
            return None

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

    def marker(self, step: int) -> dict | None:
        """The parsed commit marker of ``step``, or None if it is not committed."""
        raw = self.get(f"{step_name(step)}/{MARKER}")
        if raw is None:
            return None
        try:
            marker = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(marker, dict) or marker.get("step") != step or "manifest_sha256" not in marker:
            return None
        return marker

    def committed_steps(self) -> list[int]:
        return [s for s in self.steps() if self.marker(s) is not None]

    def latest(self) -> int | None:
        """The newest committed step: ``latest`` when it is valid, else a listing."""
        raw = self.get(LATEST)
        hint = None
        if raw is not None:
            try:
                hint = int(json.loads(raw)["step"])
            except (ValueError, KeyError, TypeError):
                hint = None
        if hint is not None and self.marker(hint) is not None:
            newer = [s for s in self.steps() if s > hint and self.marker(s) is not None]
            return max(newer, default=hint)
        committed = self.committed_steps()
        return committed[-1] if committed else None

    def read_manifest(self, step: int) -> dict:
        marker = self.marker(step)
        if marker is None:
            if step in self.steps():
                raise FileNotFoundError(
                    f"step {step} at {self.url} is not committed (no valid {MARKER} marker): "
                    f"its save was interrupted or is still running")
            raise FileNotFoundError(f"no step {step} at {self.url} (committed steps: "
                                    f"{self.committed_steps()})")
        raw = self.get(f"{step_name(step)}/{MANIFEST}")
        if raw is None or digest(raw) != marker["manifest_sha256"]:
            raise ChecksumError(f"{self.location(step)}/{MANIFEST} is missing or does not match "
                                f"the sha256 recorded in its {MARKER} marker")
        return check_manifest(json.loads(raw), f"{self.location(step)}/{MANIFEST}")

    # ------------------------------------------------------------ commit
    def begin(self, step: int) -> None:
        """Make room for a new save of ``step``: an old marker goes first, so
        a replaced step is never visible half-written."""
        if step in self.steps():
            self.remove(f"{step_name(step)}/{MARKER}")
            self.remove(step_name(step), recursive=True)

    def commit(self, step: int, manifest: bytes, *, durable: bool = False) -> None:
        """Manifest, then marker, then ``latest``: the marker makes the step
        exist.  ``durable``: each is fsynced (with its directories) before the
        next is written, so the marker never outlives what it seals."""
        name = step_name(step)
        self.put(f"{name}/{MANIFEST}", manifest)
        if durable:
            self.sync([f"{name}/{MANIFEST}"])
        marker = {"step": step, "manifest_sha256": digest(manifest), "committed_at": time.time()}
        self.put(f"{name}/{MARKER}", json.dumps(marker).encode())
        if durable:
            self.sync([f"{name}/{MARKER}"])
        current = self.latest()
        if current is None or step >= current:
            self.put(LATEST, json.dumps({"step": step}).encode())
            if durable:
                self.sync([LATEST])

    def delete_step(self, step: int) -> None:
        """Remove a step; its marker goes first so a half-deleted step is invisible."""
        self.remove(f"{step_name(step)}/{MARKER}")
        self.remove(step_name(step), recursive=True)
        raw = self.get(LATEST)
        if raw is not None:
            try:
                pointed = int(json.loads(raw)["step"])
            except (ValueError, KeyError, TypeError):
                pointed = None
            if pointed == step:
                newest = self.latest()
                if newest is None:
                    self.remove(LATEST)
                else:
                    self.put(LATEST, json.dumps({"step": newest}).encode())


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------- retention and gc

def retained(steps: list[int], keep_last: int | None, keep_every: int | None) -> set[int]:
    """Committed steps a retention policy keeps: the newest ``keep_last``
    (all when None or 0), plus multiples of ``keep_every``; the newest always."""
    for name, v in (("keep_last", keep_last), ("keep_every", keep_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name}={v!r} must be a non-negative int")
    steps = sorted(steps)
    if not keep_last:
        return set(steps)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def gc(url: str, *, keep_last: int | None = None, keep_every: int | None = None,
       include_newer: bool = False, dry_run: bool = False) -> dict:
    """Delete uncommitted steps and the committed ones retention drops.

    Uncommitted steps newer than the newest committed one may be saves in
    progress; they are kept unless ``include_newer``.  Returns what was
    (or, with ``dry_run``, would be) removed."""
    store = CheckpointStore(url)
    committed = store.committed_steps()
    newest = committed[-1] if committed else -1
    torn = [s for s in store.steps() if s not in committed and (include_newer or s < newest)]
    dropped = sorted(set(committed) - retained(committed, keep_last, keep_every))
    if not dry_run:
        for step in torn + dropped:
            store.delete_step(step)
    return {"uncommitted": torn, "committed": dropped,
            "kept": sorted(set(committed) - set(dropped))}
