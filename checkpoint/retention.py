"""`gc`: retention applied by hand (`loom ckpt gc`), as a writer of the store.

Deleting steps is writing, so `gc` claims the store like a save does
(`claim_store`, this process alone): it fails at once, naming the owner,
when another job owns the store, and shares the claim when its own process
holds it (a training loop's retention).  It never deletes a step that the
process is still writing under that claim (`StoreOwnership.in_flight`),
committed or not.

Which committed steps go is `CheckpointStore.retention`: counted in commit
order, only sound steps counting toward ``keep_last`` (`vet`, or with
``verify=True`` every chunk's checksum), never the step `latest()` picks.
"""
from __future__ import annotations

from .collective import Group
from .load import verify as verify_step
from .manifest import InvalidCheckpointError
from .owner import check_writable, claim_store, held_claim
from .store import CheckpointStore, retained


def gc(url: str, *, keep_last: int | None = None, keep_every: int | None = None,
       include_newer: bool = False, dry_run: bool = False, verify: bool = False) -> dict:
    """Delete torn steps and the committed ones retention drops.

    Committed steps: `CheckpointStore.retention` (in commit order; damaged
    steps do not count toward ``keep_last`` and are left in place while
    they are newer than a sound step that is kept; never the step `latest()`
    picks).  ``verify``: soundness is every chunk's checksum (`verify`: reads
    every byte) instead of the manifest and one listing of the chunk objects.
    Uncommitted steps (no marker) below the step `latest()` picks are torn
    saves; above it they may be saves in progress and are kept unless
    ``include_newer``.  Steps whose marker exists but is damaged are left in
    place (they cannot be placed in commit order) and reported.  Never a
    step this process is writing.

    Claims the store for this process (sharing a claim it holds); a
    ``dry_run`` writes nothing and only checks that no other job owns it.
    Returns what was (or, with ``dry_run``, would be) removed and kept:
    ``{"uncommitted", "committed", "kept", "damaged"}``, the first three
    ascending step lists, ``damaged`` {step: why} of the steps found
    damaged.  Raises `CheckpointOwnershipError` naming the owner when
    another job owns the store, ValueError for a bad policy."""
    retained([], keep_last, keep_every)  # checks the policy before anything is claimed
    store = CheckpointStore(url)
    if dry_run:
        check_writable(url)
        claim = held_claim(url)
    else:
        claim = claim_store(url, group=Group.alone(), reuse=True)
    try:
        busy = claim.in_flight() if claim is not None else set()
        damaged: dict = {}
        check = _checksums(url) if verify else None
        order, keep = store.retention(keep_last, keep_every, check=check, damaged=damaged)
        bad_markers = store.damaged_markers()
        newest = store.latest()
        committed = set(order)
        torn = [s for s in store.steps() if s not in committed and s not in bad_markers and s not in busy
                and (include_newer or newest is not None and s < newest)]
        dropped = [s for s in order if s not in keep and s not in busy]
        if not dry_run:
            for step in torn + dropped:
                store.delete_step(step)
    finally:
        if claim is not None:
            claim.release()  # a shared claim stays with its holder
    damaged.update(bad_markers)
    return {"uncommitted": torn, "committed": sorted(dropped), "kept": sorted(committed - set(dropped)),
            "damaged": {s: str(damaged[s]) for s in sorted(damaged)}}


def _checksums(url: str):
    """A `CheckpointStore.retention` check that reads every chunk (`verify`)."""
    def check(step: int) -> None:
        problems = verify_step(url, step)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise InvalidCheckpointError(f"{problems[0]}{more}", file=CheckpointStore(url).location(step),
                                         field=None)
    return check
