"""Hybrid data parallelism: the scheduler's properties, and an HDP step on 4
ranks equal to one process on the whole batch (float64)."""
import math
import random

import pytest
import torch
import torch.distributed as dist

from loom.parallel import (GradientSync, HDPCost, ModelConfig, Piece, SyntheticData, Transformer,
                           check_schedule, hdp_forward_backward, hdp_schedule, next_token_loss,
                           shard_positions)
from loom.parallel.hdp import ZigzagRelayout
from loom.parallel.hdp_schedule import imbalance, schedule_costs, split_sequence

from helpers import train_losses, train_rows


# ------------------------------------------------------------- properties

def _assert_valid(schedule, lengths, world, capacity):
    """The issue's properties, checked independently of check_schedule."""
    owner = {}
    for m, mb in enumerate(schedule):
        assert len(mb) == world
        multi = {}
        for rank, pieces in enumerate(mb):
            assert sum(p.end - p.start for p in pieces) <= capacity, (m, rank)      # capacity
            assert len({p.ring for p in pieces if len(p.ring) > 1}) <= 1, (m, rank)  # one ring per rank
            for p in pieces:
                assert isinstance(p, Piece) and rank in p.ring
                for t in range(p.start, p.end):                                   # exactly once
                    assert (p.seq, t) not in owner, (p, owner.get((p.seq, t)))
                    owner[p.seq, t] = (m, rank, p.ring)
                multi.setdefault(p.seq, []).append((p.start, rank, p.ring))
        for seq, parts in multi.items():                                          # ring consistency
            parts.sort()
            rings = {ring for _, _, ring in parts}
            assert len(rings) == 1, (seq, parts)
            assert tuple(rank for _, rank, _ in parts) == parts[0][2], (seq, parts)
    assert set(owner) == {(i, t) for i, n in enumerate(lengths) for t in range(n)}
    for i, n in enumerate(lengths):                                               # one microbatch
        assert len({owner[i, t][0] for t in range(n)}) == 1
        ring = owner[i, 0][2]
        if n > capacity:
            assert len(ring) >= math.ceil(n / capacity), (i, n, ring)
    check_schedule(schedule, lengths, world, capacity)  # and the executor accepts it


def _long_tail(seed, count, median, sigma, max_len):
    return SyntheticData(64, 64, seed=seed).lengths(0, count, median=median, sigma=sigma, max_len=max_len)


def test_schedule_properties_on_random_long_tail_batches():
    rng = random.Random(0)
    for trial in range(60):
        world = rng.choice([1, 2, 3, 4, 5, 8])
        capacity = rng.choice([1, 2, 7, 16, 64, 100])
        max_len = world * capacity
        lengths = _long_tail(trial, rng.randint(1, 40), median=max(1, capacity // 2),
                             sigma=rng.choice([0.5, 1.0, 1.5]), max_len=max_len)
        cost = rng.choice([None, HDPCost(1, 0), HDPCost(1, 1 / 8), HDPCost(0, 1)])
        schedule = hdp_schedule(lengths, world, capacity, cost=cost)
        _assert_valid(schedule, lengths, world, capacity)
        # deterministic: the same inputs give the same schedule (lists or tuples alike)
        assert hdp_schedule(tuple(lengths), world, capacity, cost=cost) == schedule


def test_long_sequences_are_split_and_short_ones_packed_whole():
    lengths = [60, 40, 25] + [3, 5, 7, 9, 11, 12, 4, 6, 8, 10, 2, 3, 5, 7]
    schedule = hdp_schedule(lengths, 4, 16, cost=HDPCost(1, 0))
    _assert_valid(schedule, lengths, 4, 16)
    rings = {p.seq: p.ring for mb in schedule for pieces in mb for p in pieces}
    assert [len(rings[i]) for i in range(3)] == [4, 3, 2]          # ceil(len / capacity) ranks
    assert all(len(rings[i]) == 1 for i in range(3, len(lengths)))
    pieces = sorted((p for mb in schedule for ps in mb for p in ps if p.seq == 1), key=lambda p: p.start)
    assert [p.end - p.start for p in pieces] == [14, 13, 13]       # as even as possible


def test_costly_sequences_get_more_ranks_when_balance_needs_it():
    # every sequence fits one rank, and by tokens the 32-token one is within a
    # rank's fair share (40), but not once attention dominates
    lengths = [32] + [8] * 16
    flat = hdp_schedule(lengths, 4, 64, cost=HDPCost(1, 0))
    heavy = hdp_schedule(lengths, 4, 64, cost=HDPCost(1, 1))
    ring_of = lambda s: next(p.ring for mb in s for ps in mb for p in ps if p.seq == 0)  # noqa: E731
    assert len(ring_of(flat)) == 1 and len(ring_of(heavy)) > 1
    assert imbalance(heavy, HDPCost(1, 1)) < imbalance(flat, HDPCost(1, 1))


def test_balance_on_long_tail_batches():
    """max/mean of the estimated cost per rank stays <= 1.15 on long-tail batches
    with a few sequences 8-16x the median (the benchmark's target)."""
    for seed in range(8):
        lengths = _long_tail(seed, 48, median=128, sigma=0.7, max_len=2048)
        lengths[:3] = [16 * 128, 12 * 128, 8 * 128]
        for cost in (HDPCost(1, 0), HDPCost(1, 1 / 256), HDPCost(1, 1 / 16)):
            schedule = hdp_schedule(lengths, 4, 1024, cost=cost)
            _assert_valid(schedule, lengths, 4, 1024)
            assert imbalance(schedule, cost) <= 1.15, (seed, cost, schedule_costs(schedule, cost))


def test_cost_model():
    cost = HDPCost(linear=2.0, attention=0.5)
    assert cost(10, (3,)) == 2 * 10 + 0.5 * 10 * 11 / 2                # causal pairs on one rank
    # a sequence split over a ring shares its causal pairs equally (zigzag)
    assert cost(10, (0, 1, 2, 3)) == pytest.approx(2 * 10 + 0.5 * 10 * 41 / 2)
    model = HDPCost.for_model(ModelConfig(dim=64, heads=4, layers=2, vocab=256))
    assert model.attention == 2 * 2 * 64 and model.linear > 100 * model.attention
    linear_only = HDPCost.for_model(ModelConfig(dim=64, heads=4, layers="linear,linear"))
    assert linear_only.attention == 0
    with pytest.raises(ValueError, match="attention=-1"):
        HDPCost(1, -1)
    with pytest.raises(ValueError, match="cost must be a finite number"):
        hdp_schedule([5, 6], 2, 8, cost=lambda tokens, ring: float("nan"))
    seen = []
    hdp_schedule([20, 3], 2, 10, cost=lambda tokens, ring: seen.append((tokens, len(ring))) or tokens)
    assert (10, 2) in seen and (3, 1) in seen


@pytest.mark.parametrize("args,needle", [
    (([4, 5], 2, 0), "capacity=0 must be >= 1"),
    (([4, 5], 2, -3), "capacity=-3 must be >= 1"),
    (([4, 5], 2, 2.5), "capacity=2.5 must be an integer"),
    (([], 2, 8), "the batch is empty"),
    (([4, 0, 5], 2, 8), r"lengths\[1\]=0 must be a positive integer"),
    (([4, -2], 2, 8), r"lengths\[1\]=-2 must be a positive integer"),
    (([4, 2.5], 2, 8), r"lengths\[1\]=2.5 must be a positive integer"),
    (([4, 5], 0, 8), "world=0 must be >= 1"),
    (([4, 17], 2, 8), "sequence 1 has 17 tokens, more than world \\* capacity = 2 \\* 8 = 16"),
    (("abc", 2, 8), "lengths='abc' must be a sequence"),
])
def test_bad_input_raises_value_error(args, needle):
    with pytest.raises(ValueError, match=needle):
        hdp_schedule(*args)
    with pytest.raises(TypeError, match="cost=3 must be callable"):
        hdp_schedule([4], 1, 8, cost=3)


def test_check_schedule_rejects_broken_schedules():
    lengths = [10, 4]
    good = [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1)), Piece(1, 0, 4, (1,))]]]
    check_schedule(good, lengths, 2)
    bad = {
        "do not cover": [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 6, 10, (0, 1)), Piece(1, 0, 4, (1,))]]],
        "in token order": [[[Piece(0, 0, 5, (1, 0))], [Piece(0, 5, 10, (1, 0)), Piece(1, 0, 4, (1,))]]],
        "in no microbatch": [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1))]]],
        "in one microbatch": [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1))]],
                              [[Piece(1, 0, 4, (0,))], []], [[Piece(0, 0, 5, (0,))], []]],
        "capacity 9": [[[Piece(0, 0, 10, (0,))], [Piece(1, 0, 4, (1,))]]],
        "at most one per rank and microbatch": [[[Piece(0, 0, 5, (0, 1)), Piece(1, 0, 2, (0, 1))],
                                  [Piece(0, 5, 10, (0, 1)), Piece(1, 2, 4, (0, 1))]]],
        "each of the 2 ranks": [[[Piece(0, 0, 5, (0,)), Piece(1, 0, 4, (0,))]]],
        "contains rank 1": [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1)), Piece(1, 0, 4, (0,))]]],
    }
    for needle, schedule in bad.items():
        with pytest.raises(ValueError, match=needle):
            check_schedule(schedule, lengths, 2, capacity=9)


def test_zigzag_relayout_moves_every_token_to_its_zigzag_row():
    for length, bounds in [(10, [(0, 5), (5, 10)]), (23, [(0, 8), (8, 16), (16, 23)]),
                           (17, [(0, 1), (1, 9), (9, 16), (16, 17)]), (64, [(0, 16)] * 0 + [(0, 64)])]:
        size = len(bounds)
        relayout = ZigzagRelayout(tuple(range(size)), tuple(bounds), length)
        padded = 2 * size * relayout.chunk
        zig = {}
        for mv in relayout.moves():
            for i in range(mv.rows):
                token = bounds[mv.src][0] + mv.src_row + i
                assert (mv.dst, mv.dst_row + i) not in zig
                zig[mv.dst, mv.dst_row + i] = token
        assert sorted(zig.values()) == list(range(length))
        for p in range(size):  # rows hold what shard_positions says, padding rows nothing
            expect = shard_positions(padded, p, size, "zigzag").tolist()
            for row, token in enumerate(expect):
                assert zig.get((p, row), token if token >= length else None) == token
        assert relayout.cu_seqlens().tolist() == ([0, length] + ([padded] if padded > length else []))


def test_split_sequence():
    assert [len(r) for r in split_sequence(10, 3)] == [4, 3, 3]
    assert split_sequence(5, 5) == [range(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError):
        split_sequence(3, 4)


# ---------------------------------------------- equal to one process (float64)

_VOCAB = 32


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab=_VOCAB, dim=16, heads=2, layers=2), **kw})).double()


def _sequences(lengths, seed=5):
    data = SyntheticData(_VOCAB, 16, seed=seed)
    return [data.sample(0, i, n) for i, n in enumerate(lengths)]


def _reference(model_kw, lengths):
    """One process, the whole batch: the per-token mean loss and its gradients."""
    model = _model(**model_kw)
    total = sum(lengths)
    loss = sum(next_token_loss(model(s[None, :-1]), s[None, 1:], reduction="sum")
               for s in _sequences(lengths)) / total
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _hdp_step(cases):
    out = []
    for model_kw, lengths, schedule in cases:
        model = _model(**model_kw)
        loss = hdp_forward_backward(model, _sequences(lengths), schedule)
        GradientSync(model.parameters(), average=False).sync()       # summed over ranks
        out.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    return out


_SPLIT = [60, 40, 25] + [3, 5, 7, 9, 11, 12, 4, 6, 8, 10, 2, 3, 5, 7]


def _hand_made():
    """Disjoint rings (3, 1) and (0, 2) at once; then a ring (2, 0, 3) with rank 1
    idle; then local sequences only, rank 3 idle."""
    lengths = [11, 9, 13, 4, 6, 5, 3]
    sched = [
        [[Piece(1, 0, 5, (0, 2)), Piece(3, 0, 4, (0,))], [Piece(0, 6, 11, (3, 1))],
         [Piece(1, 5, 9, (0, 2))], [Piece(0, 0, 6, (3, 1)), Piece(6, 0, 3, (3,))]],
        [[Piece(2, 5, 9, (2, 0, 3))], [], [Piece(2, 0, 5, (2, 0, 3))], [Piece(2, 9, 13, (2, 0, 3))]],
        [[Piece(4, 0, 6, (0,))], [Piece(5, 0, 5, (1,))], [], []],
    ]
    return lengths, sched


@pytest.mark.timeout(300)
def test_hdp_step_on_4_ranks_equals_one_process_float64(distributed):
    schedule = hdp_schedule(_SPLIT, 4, 16, cost=HDPCost(1, 0))
    sizes = {len(p.ring) for mb in schedule for ps in mb for p in ps}
    assert sizes == {1, 2, 3, 4}  # sequences split over 2, 3 and 4 ranks, short ones packed
    hand_lengths, hand = _hand_made()
    gqa = dict(heads=4, kv_heads=2)
    balanced = hdp_schedule(_SPLIT, 4, 16, cost=HDPCost(1, 1 / 4))
    cases = [({}, _SPLIT, schedule), ({}, hand_lengths, hand), (gqa, _SPLIT, balanced),
             (dict(layers="linear,softmax"), _SPLIT, schedule)]
    results = distributed(_hdp_step, 4, cases, timeout=240)
    for i, (model_kw, lengths, _) in enumerate(cases):
        ref_loss, ref_grads = _reference(model_kw, lengths)
        assert abs(sum(r[i][0] for r in results) - ref_loss) < 1e-10, i
        for rank_results in results:
            loss, grads = rank_results[i]
            for name, g in ref_grads.items():
                assert torch.allclose(grads[name], g, rtol=0, atol=1e-10), (i, name)


def _naive(q, k, v, causal):
    """Softmax attention of one sequence, GQA by repetition, float64."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _qkv(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, n, h, 6, generator=g, dtype=torch.float64) for h in (4, 2, 2))
            for n in lengths]


def _attention_parts(lengths, schedule, causal, kernel):
    """Each rank runs HDPAttention.softmax on its packed rows of every
    microbatch; returns its output rows and input gradients, per piece."""
    from loom.parallel import pack_microbatch
    rank, out = dist.get_rank(), []
    qkv = _qkv(lengths)
    tokens = [torch.zeros(n + 1, dtype=torch.long) for n in lengths]
    for mb in schedule:
        shard = pack_microbatch(mb, rank, tokens, local_kernel=kernel)
        if shard is None:
            continue
        pieces = sorted(mb[rank], key=lambda p: (len(p.ring) == 1, p.seq))
        q, k, v = (torch.cat([qkv[p.seq][i][:, p.start:p.end] for p in pieces], 1).requires_grad_()
                   for i in range(3))
        o = shard.attention.softmax(q, k, v, causal=causal)
        (o * o).sum().backward()   # d(sum o^2)/do = 2o: the reference does the same per sequence
        at = 0
        for p in pieces:
            rows = slice(at, at + p.tokens)
            out.append((p, o[:, rows].detach(), q.grad[:, rows], k.grad[:, rows], v.grad[:, rows]))
            at += p.tokens
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("causal,kernel", [(True, "sdpa"), (False, "sdpa"), (True, "blocks")])
def test_hdp_attention_equals_per_sequence_attention(distributed, causal, kernel):
    """The per-microbatch attention context alone (GQA 4:2, head_dim 6):
    rings re-laid zigzag with end padding, disjoint rings at once, idle ranks;
    local documents on PyTorch's SDPA or on loom's block kernel."""
    lengths, schedule = _hand_made()
    qkv = _qkv(lengths)
    refs = []
    for q, k, v in qkv:
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        o = _naive(q, k, v, causal)
        (o * o).sum().backward()
        refs.append((o.detach(), q.grad, k.grad, v.grad))
    results = distributed(_attention_parts, 4, lengths, schedule, causal, kernel, timeout=200)
    covered = 0
    for parts in results:
        for p, *got in parts:
            for mine, ref in zip(got, refs[p.seq]):
                assert torch.allclose(mine, ref[:, p.start:p.end], rtol=0, atol=1e-10), p
            covered += p.tokens
    # k/v gradients of a shared sequence include every ring member's queries:
    # matching the per-sequence reference piece by piece checks they came home
    assert covered == sum(lengths)


# ------------------------------------------------------- the training loop

_TRAIN = dict(data="synthetic",
              steps=3, batch_size=12, seq_len=16, dim=16, heads=2, layers=2, vocab=32, dtype="float64",
              progress=False, warmup_steps=1, hdp=True, varlen_median=10, varlen_sigma=1.0, varlen_max=64)


def _train_hdp(runs):
    return train_losses(_TRAIN, runs)


@pytest.mark.timeout(300)
def test_hdp_training_equals_one_process_float64(distributed):
    """`loom train --hdp` on 4 ranks (16 tokens per rank and microbatch: long
    sequences ring over 2, 3 and 4 ranks) follows one process's loss curve,
    for a softmax and a hybrid linear/softmax model."""
    data = SyntheticData(_TRAIN["vocab"], _TRAIN["seq_len"], seed=0)
    cost = HDPCost.for_model(ModelConfig(vocab=32, dim=16, heads=2, layers=2))
    rings = {len(p.ring) for step in range(_TRAIN["steps"])
             for mb in hdp_schedule(data.lengths(step, 12, median=10, sigma=1.0, max_len=64), 4, 16, cost=cost)
             for pieces in mb for p in pieces}
    assert rings == {1, 2, 3, 4}
    runs = [dict(), dict(layers="linear,softmax")]
    (single,) = distributed(_train_hdp, 1, [dict(dp=1, hdp_capacity=64, **r) for r in runs], timeout=150)
    four = distributed(_train_hdp, 4, [dict(dp=4, hdp_capacity=16, **r) for r in runs], timeout=240)
    assert single[0][-1] < single[0][0]
    for rank_runs in four:
        for losses, ref in zip(rank_runs, single):
            assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-10, (losses, ref)


@pytest.mark.parametrize("overrides,needle", [
    (dict(hdp=True, dp=1, sp=2), "--hdp forms a ring per long sequence itself: use --sp 1"),
    (dict(hdp=True, moe="standard"), "--hdp does not support MoE layers"),
    (dict(hdp=True, moe="llep", ep=2), "--hdp does not support MoE layers"),
    (dict(hdp=True, dp=2, hdp_capacity=8, varlen_max=17), r"--varlen-max=17 exceeds what one microbatch "
                                                          r"holds: world \* capacity = 2 \* 8 = 16"),
    (dict(hdp=True, hdp_capacity=-1), "--hdp-capacity=-1 must be >= 0"),
    (dict(hdp=True, varlen_sigma=-0.5), "--varlen-sigma=-0.5 must be >= 0"),
])
def test_hdp_options_are_validated(overrides, needle):
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match=needle):
        validate(build_config(overrides=overrides))


def test_hdp_batch_size_need_not_divide_by_dp():
    from loom.launch.config import build_config, hdp_capacity, validate, varlen_options
    cfg = validate(build_config(overrides=dict(hdp=True, dp=4, batch_size=7, seq_len=32)))
    assert hdp_capacity(cfg) == 32
    assert varlen_options(cfg) == {"median": 8, "sigma": 1.0, "max_len": 128}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_hdp_end_to_end(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run(
        [sys.executable, "-m", "loom", "train", "--hdp", "--steps", "3", "--seq-len", "32", "--batch-size", "8",
         "--name", "hdp", "--runs-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = train_rows(tmp_path / "hdp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    assert "hdp = true" in (tmp_path / "hdp" / "config.toml").read_text()


def _mismatched(lengths, schedules):
    """Each rank passes its own schedule; returns the error each one raised."""
    try:
        hdp_forward_backward(_model(), _sequences(lengths), schedules[dist.get_rank()])
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(120)
def test_ranks_with_different_or_invalid_schedules_all_raise(distributed):
    lengths = [10, 4]
    good = [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1)), Piece(1, 0, 4, (1,))]]]
    other = [[[Piece(0, 0, 10, (0,))], [Piece(1, 0, 4, (1,))]]]
    broken = [[[Piece(0, 0, 5, (0, 1))], [Piece(0, 5, 10, (0, 1))]]]
    errors = distributed(_mismatched, 2, lengths, [good, other], timeout=60)
    assert all("ranks disagree on the batch or its schedule" in e and "schedule fingerprint differs" in e
               for e in errors), errors
    errors = distributed(_mismatched, 2, lengths, [good, broken], timeout=60)
    assert errors[0].startswith("rank 1: ValueError:") and all("in no microbatch" in e for e in errors), errors
