"""Level 2 of the asynchronous engine: who writes the chunks of a snapshot.

`ThreadWriter` calls `write_chunks` on the persist thread of the training
process (zarr's I/O and crc32c release the GIL for the bulk of the work).
`ProcessWriter` hands the same call to a separate writer process that maps
the host buffer pool (a shared-memory file) and writes straight from it, so
none of the write path's Python runs under the training process's GIL.
Only chunk writes move: planning, the exchange and the commit are
collectives and stay in the training process.

The writer process speaks over two pipes: it receives the pool's file, the
plan, and the fragments and chunks as references into the pool (offset,
shape, dtype), and answers ``(True, checksums)`` or ``(False, exception)``.
If it dies, the pending write fails with its exit code and the next write
starts a new one.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection

import numpy as np
import torch

from .collective import Group
from .object_store import storage_env
from .save import write_chunks


class WriterDied(RuntimeError):
    """The writer process exited while writing a snapshot."""


class ThreadWriter:
    """Writes on the calling (persist) thread."""

    def write(self, plan, fragments: dict, parts: dict, pool=None) -> dict:
        return write_chunks(plan, fragments, parts)

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Ref:
    """An array inside the pool: byte offset, shape, dtype name, and whether
    the receiver wants a torch tensor or a numpy array."""
    offset: int
    shape: tuple
    dtype: str
    torch: bool


def _portable_plan(plan):
    """The plan without what cannot cross a process boundary (the process
    group and the store's open handles); the writer needs neither."""
    g = plan.group
    return dataclasses.replace(plan, store=None, tensors={},
                               group=Group(g.rank, g.size, tuple(g.ranks), None, False))


# run through -c rather than -m: the package imports this module first, and
# runpy would then execute a second copy of it as __main__
_CHILD = "import sys; from loom.checkpoint.writers import main; sys.exit(main(sys.argv[1:]))"


class ProcessWriter:
    """Writes in a separate process that maps the pool's shared arena.  The
    process starts at once (its imports take a moment) and is replaced if
    it dies."""

    def __init__(self, url: str):
        self.url = url
        self._proc = None
        self._ready = False
        self._inbox = self._outbox = None
        self._start()

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(storage_env(self.url))  # storage options set in this process (an object store's endpoint)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._outbox = Connection(to_child_w, readable=False)
        self._inbox = Connection(from_child_r, writable=False)
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _receive(self):
        while True:
            if self._inbox.poll(1.0):
                try:
                    return self._inbox.recv()
                except EOFError:
                    break
            elif self._proc.poll() is not None:
                break
        code = self._proc.wait()
        self._drop()
        raise WriterDied(f"the checkpoint writer process died (exit code {code}) while writing")

    def _drop(self) -> None:
        for conn in (self._inbox, self._outbox):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._inbox = self._outbox = None
        self._proc = None

    def _send(self, message) -> None:
        try:
            self._outbox.send(message)
        except OSError:
            pass  # the process is gone: _receive reports its exit code

    def _ref(self, pool, a):
        """A `_Ref` for an array that lives in the pool, else the array itself."""
        base = pool.arena.data_ptr()
        if isinstance(a, torch.Tensor):
            ptr, nbytes, dtype, as_torch = a.data_ptr(), a.numel() * a.element_size(), str(a.dtype), True
            contiguous = a.is_contiguous()
        else:
            a = np.asarray(a)
            ptr, nbytes, dtype, as_torch = a.__array_interface__["data"][0], a.nbytes, a.dtype.str, False
            contiguous = a.flags.c_contiguous
        if contiguous and nbytes and base <= ptr and ptr + nbytes <= base + pool.capacity:
            return _Ref(ptr - base, tuple(a.shape), dtype, as_torch)
        return a  # outside the pool (assembled parts, empty arrays): sent by value

    def write(self, plan, fragments: dict, parts: dict, pool=None) -> dict:
        """Write from ``pool`` (a shared `HostBufferPool`) in the writer process."""
        if pool is None or pool.path is None:
            raise ValueError("the process writer needs a host buffer pool in shared memory")
        if self._proc is not None and self._proc.poll() is not None:
            self._drop()  # it died while idle: nothing was lost, start another
        if self._proc is None:
            self._start()
        if not self._ready:
            self._receive()  # "ready": its imports are done
            self._ready = True
        self._send((self.url, pool.path, pool.capacity, _portable_plan(plan),
                    {k: self._ref(pool, t) for k, t in fragments.items()},
                    {k: self._ref(pool, a) for k, a in parts.items()}))
        ok, value = self._receive()
        if ok:
            return value
        raise value

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._outbox.send(None)
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._drop()


# ------------------------------------------------------------------ child

def _materialize(arena: torch.Tensor, ref):
    if not isinstance(ref, _Ref):
        return ref
    if ref.torch:
        dtype = getattr(torch, ref.dtype.removeprefix("torch."))
        n = int(np.prod(ref.shape, dtype=np.int64)) * dtype.itemsize
        return arena[ref.offset:ref.offset + n].view(dtype).view(ref.shape)
    dtype = np.dtype(ref.dtype)
    n = int(np.prod(ref.shape, dtype=np.int64)) * dtype.itemsize
    return arena[ref.offset:ref.offset + n].numpy().view(dtype).reshape(ref.shape)


def _portable_error(exc: BaseException) -> BaseException:
    import pickle
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def main(argv: list[str]) -> int:
    rfd, wfd = int(argv[0]), int(argv[1])
    torch.set_num_threads(1)
    from .store import CheckpointStore
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    outbox.send(("ready", os.getpid()))
    stores: dict = {}
    arena, mapped = None, None
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return 0
        if message is None:
            return 0
        try:
            url, path, size, plan, fragments, parts = message
            if mapped != path:  # the first, or a grown, pool
                arena = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                mapped = path
            if url not in stores:
                stores[url] = CheckpointStore(url)
            plan.store = stores[url]
            fragments = {k: _materialize(arena, r) for k, r in fragments.items()}
            parts = {k: _materialize(arena, r) for k, r in parts.items()}
            reply = (True, write_chunks(plan, fragments, parts))
        except BaseException as exc:  # noqa: BLE001 - reported to the training process
            reply = (False, _portable_error(exc))
        outbox.send(reply)

