"""Every traced op against plain torch.distributed, and the trace it leaves."""
import pytest
import torch
import torch.distributed as dist

from loom import comms


def _splits(rank, world):
    # uneven, with zero-size entries: rank r sends (r + j) % 3 rows to rank j
    return [(rank + j) % 3 for j in range(world)]


def _ops_vs_torch():
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    out = {}

    a = x.clone()
    comms.all_reduce(a)
    b = x.clone()
    dist.all_reduce(b)
    out["all_reduce"] = torch.equal(a, b)
    a = x.clone()
    comms.all_reduce(a, "max")
    b = x.clone()
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    out["all_reduce_max"] = torch.equal(a, b)

    gathered = comms.all_gather(x)
    ref = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(ref, x)
    out["all_gather"] = torch.equal(gathered, torch.cat(ref))
    out["all_gather_0d"] = comms.all_gather(torch.tensor(float(rank))).tolist() == list(map(float, range(world)))

    big = torch.randn(world * 2, 3, generator=g, dtype=torch.float64)
    rs = comms.reduce_scatter(big)
    full = big.clone()
    dist.all_reduce(full)
    out["reduce_scatter"] = torch.allclose(rs, full[rank * 2:(rank + 1) * 2], rtol=0, atol=1e-12)

    send = _splits(rank, world)
    rows = torch.arange(sum(send) * 2, dtype=torch.float64).reshape(-1, 2) + 100 * rank
    recv = [(j + rank) % 3 for j in range(world)]  # what rank j sends here
    got = comms.all_to_all_v(rows, send)            # counts exchanged internally
    got2 = comms.all_to_all_v(rows, send, recv)
    ref = torch.empty(sum(recv), 2, dtype=torch.float64)
    dist.all_to_all_single(ref, rows, recv, send)
    out["all_to_all_v"] = torch.equal(got, ref) and torch.equal(got2, ref)

    empty = comms.all_to_all_v(torch.empty(0, 5), [0] * world, [0] * world)
    out["all_to_all_v_empty"] = tuple(empty.shape) == (0, 5)

    t = torch.full((3,), float(rank))
    comms.broadcast(t, src=world - 1)
    out["broadcast"] = t.tolist() == [float(world - 1)] * 3
    comms.barrier()

    # a ring of point-to-point messages, blocking and non-blocking
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    buf = torch.empty(2)
    if world > 1:
        if rank % 2 == 0:
            comms.send(torch.full((2,), float(rank)), nxt)
            comms.recv(buf, prv)
        else:
            comms.recv(buf, prv)
            comms.send(torch.full((2,), float(rank)), nxt)
        out["send_recv"] = buf.tolist() == [float(prv)] * 2
        pend = [comms.isend(torch.full((2,), 10.0 + rank), nxt), comms.irecv(buf, prv)]
        comms.wait_all(pend)
        out["isend_irecv"] = buf.tolist() == [10.0 + prv] * 2
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ops_match_torch_distributed(distributed, world):
    for rank, res in enumerate(distributed(_ops_vs_torch, world)):
        assert all(res.values()), f"rank {rank}: {res}"


def _trace_fields():
    rank, world = dist.get_rank(), dist.get_world_size()
    comms.reset_trace()
    comms.set_step(7)
    comms.all_reduce(torch.ones(5, dtype=torch.float32))
    comms.all_to_all_v(torch.ones(world, 2), [1] * world)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    comms.wait_all([comms.isend(torch.ones(3), nxt), comms.irecv(torch.empty(3), prv)])
    comms.wait_all([comms.isend(torch.ones(3), nxt), comms.irecv(torch.empty(3), prv)])
    comms.barrier()
    return comms.records()


@pytest.mark.timeout(60)
def test_records_have_fields_and_consistent_sequence_numbers(distributed):
    checked = distributed(_trace_fields, 3)
    for rs in checked:  # on gloo every collective first agrees on its inputs
        assert [r.op for r in rs if r.peer is None or r.op == "barrier"] == \
            ["agree:all_reduce", "all_reduce", "agree:all_to_all_v", "all_to_all_counts", "all_to_all_v",
             "agree:barrier", "barrier"]
    recs = [[r for r in rs if not r.op.startswith("agree")] for rs in checked]
    for rank, rs in enumerate(recs):
        ops = [r.op for r in rs]
        assert ops == ["all_reduce", "all_to_all_counts", "all_to_all_v", "send", "recv", "send",
                       "recv", "barrier"]
        ar = rs[0]
        assert (ar.rank, ar.group, ar.group_ranks, ar.nbytes, ar.signature, ar.step) == \
            (rank, "world", (0, 1, 2), 20, ("torch.float32", (5,)), 7)
        assert all(r.t_exit is not None and r.t_exit >= r.t_enter for r in rs)
        assert [r.seq for r in rs if r.peer is None or r.op == "barrier"] == [1, 3, 4, 6]
        sends = [r for r in rs if r.op == "send"]
        assert [s.peer for s in sends] == [(rank + 1) % 3] * 2 and [s.seq for s in sends] == [0, 1]
    # the n-th send on an edge has the same seq as the n-th receive on it
    for rank, rs in enumerate(recs):
        nxt = (rank + 1) % 3
        s = [(r.seq, r.nbytes) for r in rs if r.op == "send"]
        r_ = [(r.seq, r.nbytes) for r in recs[nxt] if r.op == "recv"]
        assert s == r_
    # collectives agree across ranks on (group, seq, op)
    keys = [[(r.group, r.seq, r.op) for r in rs if r.peer is None] for rs in recs]
    assert keys[0] == keys[1] == keys[2]


def _inflight_record_is_open():
    rank = dist.get_rank()
    comms.reset_trace()
    if rank == 0:
        pend = comms.irecv(torch.empty(1), 1)
        before = comms.records()[-1].t_exit
        comms.barrier()  # rank 1 sends only after this
        pend.wait()
        return before, comms.records()[0].t_exit is not None
    comms.barrier()
    comms.send(torch.ones(1), 0)
    return None, True


@pytest.mark.timeout(60)
def test_in_flight_op_has_no_exit_time(distributed):
    (before, closed), _ = distributed(_inflight_record_is_open, 2)
    assert before is None and closed


def test_ring_buffer_is_bounded():
    from loom.comms import trace
    trace.reset_trace(capacity=10)
    try:
        for i in range(25):
            trace.close_record(trace.open_record(0, "world", (0,), "all_reduce", 4))
        recs = comms.records(clear=True)
        assert len(recs) == 10 and recs[-1].seq == 24
        assert comms.records() == []
    finally:
        trace.reset_trace(capacity=trace.DEFAULT_CAPACITY)


def test_record_is_picklable():
    import pickle
    from loom.comms import CommRecord
    r = CommRecord(1, "dp[0,1]", (0, 1), 3, "all_reduce", 16, None, ("torch.float32", (4,)), 1.0, 2.0, 5)
    assert pickle.loads(pickle.dumps(r)) == r


def _autograd_ops():
    """Gradients of the autograd-aware ops against a single-process reference:
    every rank's inputs are regenerated locally, so the global function is known."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def inputs(r):
        g = torch.Generator().manual_seed(100 + r)
        return torch.randn(2 * world, 3, generator=g, dtype=torch.float64)

    def weights(r):
        g = torch.Generator().manual_seed(200 + r)
        return torch.randn(2 * world, 3, generator=g, dtype=torch.float64)

    xs, ws = [inputs(r) for r in range(world)], [weights(r) for r in range(world)]
    res = {}
    # loss = sum_r <w_r, op(x)_r>, summed over ranks
    x = xs[rank].clone().requires_grad_()
    (comms.all_reduce_with_grad(x) * ws[rank]).sum().backward()
    res["all_reduce"] = torch.allclose(x.grad, sum(ws), atol=1e-12)

    x = xs[rank].clone().requires_grad_()
    out = comms.all_gather_with_grad(x)           # [world * 2w, 3]
    wide = [torch.randn(out.shape, generator=torch.Generator().manual_seed(300 + r), dtype=torch.float64)
            for r in range(world)]
    (out * wide[rank]).sum().backward()
    n = xs[rank].shape[0]
    res["all_gather"] = torch.allclose(x.grad, sum(w[rank * n:(rank + 1) * n] for w in wide), atol=1e-12)

    x = xs[rank].clone().requires_grad_()
    out = comms.reduce_scatter_with_grad(x)       # [2, 3]
    (out * ws[rank][:2]).sum().backward()
    res["reduce_scatter"] = torch.allclose(x.grad, torch.cat([w[:2] for w in ws]), atol=1e-12)

    send = [(rank + j) % 3 for j in range(world)]
    x = torch.randn(sum(send), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_()
    out = comms.all_to_all_v_with_grad(x, send)
    out.backward(torch.ones_like(out) * (rank + 1))
    # row i of x went to rank j, whose upstream gradient is (j + 1)
    expect = torch.cat([torch.full((c, 3), float(j + 1), dtype=torch.float64) for j, c in enumerate(send)])
    res["all_to_all_v"] = torch.equal(x.grad, expect)
    return res


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_autograd_ops(distributed, world):
    for rank, res in enumerate(distributed(_autograd_ops, world)):
        assert all(res.values()), f"rank {rank}: {res}"


def _bad_splits():
    comms.all_to_all_v(torch.ones(3, 2), [1, 1])


@pytest.mark.timeout(60)
def test_all_to_all_v_checks_splits(distributed):
    with pytest.raises(ValueError, match="send_splits sum to 2 but x has 3 rows"):
        distributed(_bad_splits, 2)


def _into_ops():
    """all_gather_into / reduce_scatter_into (the buffers FSDP2 hands over)
    against the allocating versions; a wrong-sized buffer raises on every rank."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.arange(6, dtype=torch.float64) + 10 * rank
    gathered = comms.all_gather_into(torch.empty(6 * world, dtype=torch.float64), t)
    big = torch.arange(4 * world, dtype=torch.float64) * (rank + 1)
    part = comms.reduce_scatter_into(torch.empty(4, dtype=torch.float64), big)
    errors = []
    for call in (lambda: comms.all_gather_into(torch.empty(5, dtype=torch.float64), t),
                 lambda: comms.reduce_scatter_into(torch.empty(3, dtype=torch.float64), big)):
        try:
            call()
        except ValueError as exc:
            errors.append(str(exc))
    return (torch.equal(gathered, comms.all_gather(t)), torch.equal(part, comms.reduce_scatter(big.reshape(world, 4))
                                                                     .reshape(4)), errors)


@pytest.mark.timeout(60)
def test_collectives_into_given_buffers(distributed):
    for same_gather, same_scatter, errors in distributed(_into_ops, 2):
        assert same_gather and same_scatter
        assert len(errors) == 2 and "all_gather_into: out has 5 elements" in errors[0] \
            and "reduce_scatter_into: input has 8 elements" in errors[1], errors
