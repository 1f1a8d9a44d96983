"""What `loom ckpt ls|inspect|verify|gc` print (the parser lives in loom.launch.cli).

A damaged or hostile store never gets a traceback out of these: `ls` and
`verify` report each damaged step on its line (and say so in their ``ok``),
`inspect` raises InvalidCheckpointError, which the CLI prints as one line.
Keys and values from a store are printed escaped (no control characters
reach the terminal)."""
from __future__ import annotations

import time

from .levels import LocalLevel
from .load import verify
from .manifest import InvalidCheckpointError
from .retention import gc
from .store import CheckpointStore


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
    except (OverflowError, OSError, ValueError):  # a time no calendar holds (a hostile manifest)
        return "?"


def one_line(text) -> str:
    """``text`` on one line, with anything unprintable escaped."""
    text = " ".join(str(text).split())
    return text if text.isprintable() else repr(text)[1:-1]


def ls(url: str, local: str | None = None) -> tuple[bool, str]:
    """Every step under ``url`` as a table: committed or not, world size,
    arrays, bytes, when, which one `latest()` picks; with ``local`` (this
    node's directory of the node-local level) a ``levels`` column too
    (local, remote or both) and the steps committed only locally.  Returns
    (ok, text): ok is False when a step's marker or manifest is damaged
    (its row says why)."""
    store = CheckpointStore(url)
    steps = store.steps()
    if local is not None:
        return _ls_levels(store, steps, LocalLevel(local))
    if not steps:
        return True, f"no checkpoints at {url}"
    latest = store.latest()
    rows, ok = [], True
    for step in steps:
        try:
            if store.read_marker(step) is None:
                rows.append([step, "no (torn or in progress)", "-", "-", "-", "-", ""])
                continue
            m = store.read_manifest(step)
        except InvalidCheckpointError as exc:
            ok = False
            rows.append([step, f"damaged: {one_line(exc)}", "-", "-", "-", "-", ""])
            continue
        nbytes = sum(e.nbytes for e in m.tensors.values())
        rows.append([step, "yes", m.world_size, len(m.tensors), human_bytes(nbytes),
                     _when(m.created), "<- latest" if step == latest else ""])
    return ok, table(["step", "committed", "world", "tensors", "bytes", "saved", ""], rows)


def _ls_levels(store: CheckpointStore, steps: list[int], level: LocalLevel) -> tuple[bool, str]:
    local = level.committed()
    if not steps and not local:
        return True, f"no checkpoints at {store.url} nor at the local level {level.path}"
    ok, text = ls(store.url) if steps else (True, "")
    remote = set(store.committed_steps()) if steps else set()
    rows = []
    for step in sorted(set(steps) | set(local)):
        where = [name for name, held in (("local", step in local), ("remote", step in remote)) if held]
        rows.append([step, " + ".join(where) or "none (not committed)"])
    return ok, (text + "\n\n" if text else "") + f"levels (local: {level.path} on {one_line(level.node)})\n" + \
        table(["step", "levels"], rows)


def _resolve_step(store: CheckpointStore, step) -> int:
    if step is None:
        step = store.latest()
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint at {store.url}")
    return step


def inspect(url: str, step: int | None = None) -> str:
    """The arrays and values of ``step`` (default: latest) as tables.
    Raises FileNotFoundError when there is no such committed step and
    InvalidCheckpointError when its marker or manifest is damaged."""
    store = CheckpointStore(url)
    step = _resolve_step(store, step)
    m = store.read_manifest(step)
    mesh = ", ".join(f"{k}={v}" for k, v in m.mesh.items()) if m.mesh else "-"
    total = sum(e.nbytes for e in m.tensors.values())
    lines = [f"step {m.step} at {store.location(step)}",
             f"saved {_when(m.created)} by {m.world_size} ranks (mesh: {mesh}), "
             f"{len(m.tensors)} arrays, {human_bytes(total)}", ""]
    rows = []
    for key, e in m.tensors.items():
        pieces = len({f.box for f in e.fragments})
        rows.append([one_line(key), "x".join(map(str, e.shape)) or "()", e.dtype, e.placement,
                     f"{pieces} from {len(e.fragments)} ranks",
                     "x".join(map(str, e.chunks)) or "()", len(e.checksums),
                     human_bytes(e.nbytes)])
    lines.append(table(["array", "shape", "dtype", "placement", "fragments", "chunk", "chunks", "bytes"], rows))
    if m.values:
        lines.append("")
        vrows = []
        for key, v in m.values.items():
            if v.is_per_rank:  # Python's repr: any value a checkpoint holds (tuple keys too)
                text = f"per rank: {[v.decoded(r) for r in range(len(v.per_rank))]!r}"
            else:
                text = repr(v.decoded())
            text = one_line(text)
            vrows.append([one_line(key), text if len(text) <= 70 else text[:67] + "..."])
        lines.append(table(["value", "contents"], vrows))
    return "\n".join(lines)


def verify_report(url: str, step: int | None = None, every: bool = False) -> tuple[bool, str]:
    """Check one step (default: latest) or ``every`` step with a marker:
    chunk objects and checksums (`verify`).  Returns (ok, text), one line
    per step and one per problem; a step whose marker or manifest is
    damaged is one line.  By default the steps whose damaged marker may be
    newer than the latest sound commit (`CheckpointStore.damaged_newer`)
    are reported first; ``every`` includes every step with a damaged
    marker.  Raises ValueError for ``step`` with ``every``."""
    if every and step is not None:
        raise ValueError(f"step={step} and every=True (--step and --all) exclude each other")
    store = CheckpointStore(url)
    lines, ok = [], True
    if every:
        steps = sorted({*store.committed_steps(), *store.damaged_markers()})
    elif step is None:
        step = store.latest()
        for s, exc in store.damaged_newer(step):
            ok = False
            lines.append(f"step {s}: damaged: {one_line(exc)}")
        steps = [] if step is None else [step]
    else:
        steps = [step]
    if not steps and not lines:
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    for s in steps:
        try:
            problems = verify(url, s)
        except InvalidCheckpointError as exc:
            ok = False
            lines.append(f"step {s}: damaged: {one_line(exc)}")
            continue
        ok &= not problems
        lines.append(f"step {s}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        lines += [f"  {one_line(p)}" for p in problems]
    return ok, "\n".join(lines)


def gc_report(url: str, keep_last=None, keep_every=None, include_newer=False, dry_run=False,
              verify=False) -> str:
    """`gc` in words: what was (would be) removed and kept, then one line
    per damaged step found (not counted toward ``keep_last``, left in place)."""
    result = gc(url, keep_last=keep_last, keep_every=keep_every, include_newer=include_newer,
                dry_run=dry_run, verify=verify)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} uncommitted steps {result['uncommitted'] or 'none'}; "
             f"{verb} committed steps {result['committed'] or 'none'}; kept {result['kept'] or 'none'}"]
    lines += [f"damaged (left in place, not counted toward keep-last): step {s}: {one_line(why)}"
              for s, why in result["damaged"].items()]
    return "\n".join(lines)
