"""Agree, or all raise: loom.comms.agree and the checked collectives.

One rank's bad input makes every rank raise at once, naming the rank and the
value, instead of hanging until the process-group timeout (or gloo aborting
the process on a size mismatch, or a broadcast "succeeding" with garbage)."""
import time

import pytest
import torch
import torch.distributed as dist

from loom import comms

from helpers import outcome


def _agree_cases():
    rank = dist.get_rank()
    out = {}
    got = comms.agree(None, [rank, 7], payload={"r": rank})
    out["fields"] = got.column(0) == [0, 1, 2] and got.column(1) == [7, 7, 7]
    out["payloads"] = got.payloads == [{"r": 0}, {"r": 1}, {"r": 2}]
    try:
        got.same(["rank", "seven"], "test", show=["rank"])
    except ValueError as exc:
        out["same"] = str(exc)
    # over a rank list (no process group): the table is in rank order, whatever the list's order
    got = comms.agree(None, [rank], ranks=[2, 0, 1])
    out["ring"] = got.column(0) == [0, 1, 2] and got.ranks == (0, 1, 2)
    # one rank fails: every rank raises, the others naming it
    t0 = time.monotonic()
    try:
        comms.agree(KeyError("no such key 'x'") if rank == 1 else None, [rank])
    except KeyError as exc:
        out["error"] = (type(exc).__name__, str(exc))
    out["fast"] = time.monotonic() - t0 < 10
    # an error type that is not rebuilt arrives as RemoteError
    class Odd(Exception):
        pass
    try:
        comms.agree(Odd("odd") if rank == 2 else None, ranks=[0, 1, 2])
    except Odd:
        out["odd"] = "own"
    except comms.RemoteError as exc:
        out["odd"] = str(exc)
    return out


@pytest.mark.timeout(120)
def test_agree_over_groups_and_rings(distributed):
    res = distributed(_agree_cases, 3)
    for rank, r in enumerate(res):
        assert r["fields"] and r["payloads"] and r["ring"] and r["fast"], r
        assert r["same"] == "test: rank differs across ranks [0, 1, 2]: rank 0: 0, rank 1: 1, rank 2: 2"
        if rank == 1:
            assert r["error"] == ("KeyError", "\"no such key 'x'\"")
        else:
            assert r["error"] == ("KeyError", "\"rank 1: KeyError: no such key 'x'\"")
        assert r["odd"] == ("own" if rank == 2 else "rank 2: Odd: odd")


def test_agree_alone_and_limits():
    got = comms.agree(None, [1, 2], payload=[3])  # no process group: a world of one
    assert got.fields[0][:2] == [1, 2] and got.payloads == [[3]] and got.ranks == (0,)
    with pytest.raises(ValueError, match="boom"):
        comms.agree(ValueError("boom"))
    with pytest.raises(ValueError, match="at most 16"):
        comms.agree(None, list(range(17)))


def _mismatch(case):
    rank = dist.get_rank()
    calls = {
        "all_reduce shape": lambda: comms.all_reduce(torch.ones(4 + rank)),        # gloo alone aborts the process
        "broadcast shape": lambda: comms.broadcast(torch.ones(4 + rank), src=0),   # ... "succeeds" with garbage
        "dtype": lambda: comms.all_reduce(torch.ones(4, dtype=torch.float64 if rank else torch.float32)),
        "reduce op": lambda: comms.all_reduce(torch.ones(4), op="sum" if rank else "bogus"),
        "reduce_scatter rows": lambda: comms.reduce_scatter(torch.ones(4 if rank else 3, 2)),
        "splits": lambda: comms.all_to_all_v(torch.ones(3, 2), [1, 2] if rank else [1, -1]),
        "different ops": lambda: comms.barrier() if rank else comms.all_gather(torch.ones(2)),
        "all_gather shape": lambda: comms.all_gather(torch.ones(2, 3 + rank)),
    }
    return outcome(calls[case])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case,expect", [
    ("all_reduce shape", ["all_reduce on group world: shape differs", "rank 0: (4,), rank 1: (5,)"]),
    ("broadcast shape", ["broadcast on group world: shape differs", "rank 0: (4,), rank 1: (5,)"]),
    ("dtype", ["dtype differs", "rank 0: float32, rank 1: float64"]),
    ("reduce op", ["unknown reduce op 'bogus'"]),
    ("reduce_scatter rows", ["reduce_scatter: dim 0 of shape (3, 2) must divide by the group size 2"]),
    ("splits", ["send_splits [1, -1] must be 2 non-negative counts"]),
    ("different ops", ["ranks are in different collectives", "rank 0: all_gather, rank 1: barrier"]),
    ("all_gather shape", ["shape differs", "rank 0: (2, 3), rank 1: (2, 4)"]),
])
def test_checked_collectives_fail_together(distributed, case, expect):
    res = distributed(_mismatch, 2, case, timeout=120)
    for rank, r in enumerate(res):
        assert r != "no error", (case, rank)
        _, message, seconds = r
        assert all(e in message for e in expect), (rank, message)
        assert seconds < 10
    # a rank that did not fail itself names the one that did
    if case in ("reduce op", "splits"):
        assert res[1][1].startswith("rank 0: ValueError:")
    if case == "reduce_scatter rows":
        assert res[1][1].startswith("rank 0: ValueError:")


def _unchecked_records():
    comms.set_collective_checks("off")
    try:
        comms.reset_trace()
        comms.all_reduce(torch.ones(2))
        comms.barrier()
        off = [r.op for r in comms.records()]
    finally:
        comms.set_collective_checks("auto")
    comms.reset_trace()
    comms.all_reduce(torch.ones(2))
    return off, [r.op for r in comms.records()]


def test_checks_can_be_turned_off(distributed):
    for off, auto in distributed(_unchecked_records, 2):
        assert off == ["all_reduce", "barrier"] and auto == ["agree:all_reduce", "all_reduce"]
    with pytest.raises(ValueError, match="must be one of"):
        comms.set_collective_checks("sometimes")


def test_group_none_is_a_world_of_one_without_a_process_group():
    assert not dist.is_initialized()
    t = torch.arange(6.0).reshape(3, 2)
    assert comms.group_ranks() == [0] and comms.world_ranks() == [0]
    assert comms.all_reduce(t.clone()).equal(t)
    assert comms.all_gather(t).equal(t) and comms.all_gather(torch.tensor(5.0)).tolist() == [5.0]
    assert comms.reduce_scatter(t).equal(t)
    assert comms.all_to_all_v(t, [3]).equal(t) and comms.exchange_counts([4]) == [4]
    assert comms.broadcast(t.clone(), src=0).equal(t)
    comms.barrier()
    assert comms.all_reduce_with_grad(t).equal(t)
    with pytest.raises(ValueError, match="unknown reduce op"):
        comms.all_reduce(t, op="bogus")
    with pytest.raises(ValueError, match="send_splits"):
        comms.all_to_all_v(t, [2])
    with pytest.raises(ValueError, match="src=1"):
        comms.broadcast(t, src=1)
    assert comms.records() == []  # nothing was sent


def _more_mismatches(case):
    rank = dist.get_rank()
    calls = {
        "meta": lambda: comms.all_reduce(torch.ones(4, device="meta") if rank else torch.ones(4)),
        "sparse": lambda: comms.all_reduce(torch.ones(2, 2).to_sparse() if rank else torch.ones(2, 2)),
        "not a tensor": lambda: comms.all_reduce([1.0, 2.0] if rank else torch.ones(2)),
        # rank 0 sends 1 row to rank 1, which expects 2
        "recv_splits": lambda: comms.all_to_all_v(torch.ones(2, 3), [1, 1], [1, 1] if rank == 0 else [2, 1]),
        "float splits": lambda: comms.all_to_all_v(torch.ones(2, 3), [1.5, 0.5] if rank else [1, 1]),
        "recv given on one rank": lambda: comms.all_to_all_v(torch.ones(2, 3), [1, 1], [1, 1] if rank else None),
    }
    return outcome(calls[case])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case,expect", [
    ("meta", "all_reduce: the tensor is on the meta device"),
    ("sparse", "all_reduce: the tensor is of layout torch.sparse_coo"),
    ("not a tensor", "all_reduce: needs a torch.Tensor, got list"),
    ("recv_splits", "rank 0 sends 1 rows to rank 1, whose recv_splits expect 2 from it"),
    ("float splits", "send_splits [1.5, 0.5] must be integers"),
    ("recv given on one rank", "recv_splits given differs across ranks [0, 1]: rank 0: False, rank 1: True"),
])
def test_more_bad_collective_inputs_fail_together(distributed, case, expect):
    for rank, r in enumerate(distributed(_more_mismatches, 2, case, timeout=120)):
        assert r != "no error", (case, rank)
        kind, message, seconds = r
        assert expect in message and seconds < 10, (rank, message)


def test_reduce_op_mismatch_names_the_ops(distributed):
    for r in distributed(_mismatch_ops, 2):
        assert "reduce op differs across ranks [0, 1]: rank 0: sum, rank 1: max" in r, r


def _mismatch_ops():
    try:
        comms.all_reduce(torch.ones(2), op="max" if dist.get_rank() else "sum")
    except ValueError as exc:
        return str(exc)
    return "no error"
