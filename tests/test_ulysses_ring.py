"""2-D sequence parallelism (Ulysses inside, ring across) against single-process attention.

Every rank builds the same global tensors from a seed, attends on its sp
shard (the data loader's layout over all sp positions), and returns its
shards of the output and of the gradients; the test unshards them and
compares with the naive attention on the whole sequence (float64, explicit
ring kernel: 1e-10; float32 with the fused kernel: its tolerance).
"""
import itertools
import re

import pytest
import torch
import torch.distributed as dist

from loom import comms
from loom.comms import mesh_layout
from loom.parallel import default_sp_inner, sequence_parallel_core, shard_sequence, ulysses_ring_attention, \
    unshard_sequence
from loom.parallel.ulysses_ring import split_ranks

from helpers import train_losses, value_error
from test_ring_attention import _cu, _docs_cut, _docs_short, _reference, _tensors

F64 = torch.float64
ATOL = 1e-10


def _shard_run(case, mesh, dtype=F64):
    """This sp rank's (out, dq, dk, dv) shards from the core of ``case``."""
    size, index, layout = mesh.sp, mesh.sp_rank, case["layout"]
    full = _tensors(case, size, dtype)
    q, k, v, dout = (shard_sequence(t, index, size, layout).clone() for t in full[:4])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    inner = case.get("inner", mesh.sp_inner)
    core = sequence_parallel_core("ulysses-ring", ranks=mesh.sp_ranks, group=mesh.sp_group, layout=layout,
                                  kernel=case.get("kernel", "auto"), inner=inner,
                                  inner_group=mesh.sp_inner_group if inner == mesh.sp_inner else None,
                                  head_chunks=case.get("head_chunks", 1))
    out = core(q, k, v, causal=case["causal"], scale=case.get("scale"), cu_seqlens=_cu(case, size))
    grads = torch.autograd.grad((out.double() * dout.double()).sum(), (q, k, v))
    return [out.detach(), *grads]


def _compare(case, size, shards, atol=ATOL, rtol=0.0):
    ref = _reference(case, size)
    for i, name in ((0, "out"), (1, "dq"), (2, "dk"), (3, "dv")):
        got = unshard_sequence([s[i] for s in shards], case["layout"])
        torch.testing.assert_close(got.to(F64), ref[(0, 2, 3, 4)[i]], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} of {case} at sp={size}: {m}")


def _cases():
    cases, seed = [], 300
    for layout, causal, (hq, hkv) in itertools.product(("zigzag", "contiguous"), (True, False),
                                                      ((4, 4), (4, 2), (4, 1), (8, 2))):
        seed += 1
        cases.append(dict(seed=seed, layout=layout, causal=causal, batch=2, seq_local=6, hq=hq, hkv=hkv, d=5,
                          lse_grad=False))
    for layout, docs in itertools.product(("zigzag", "contiguous"), (_docs_cut, _docs_short)):
        seed += 1
        cases.append(dict(seed=seed, layout=layout, causal=True, batch=1, seq_local=6, hq=4, hkv=2, d=3,
                          docs=docs, lse_grad=False))
    cases.append(dict(seed=350, layout="zigzag", causal=True, batch=2, seq_local=4, hq=2, hkv=1, d=4, scale=0.3,
                      lse_grad=False))
    # the degenerate splits: inner = 1 (ring over the sp ranks), inner = sp (Ulysses; zigzag reordered)
    for inner, layout in ((1, "zigzag"), (4, "zigzag"), (4, "contiguous")):
        cases.append(dict(seed=360 + inner, layout=layout, causal=True, batch=2, seq_local=6, hq=4, hkv=2, d=5,
                          lse_grad=False, inner=inner))
    # the outer ring once per K/V head (2 per rank after the all-to-all), plain and with documents
    cases.append(dict(seed=380, layout="zigzag", causal=True, batch=2, seq_local=6, hq=4, hkv=4, d=5,
                      lse_grad=False, head_chunks=2))
    cases.append(dict(seed=381, layout="contiguous", causal=True, batch=1, seq_local=6, hq=8, hkv=4, d=3,
                      docs=_docs_cut, lse_grad=False, head_chunks=2))
    return cases


def _float32_cases():
    return [dict(seed=370 + i, layout=layout, causal=causal, batch=2, seq_local=32, hq=4, hkv=2, d=16,
                 lse_grad=False, kernel=kernel)
            for i, (layout, causal, kernel) in enumerate(itertools.product(("zigzag", "contiguous"), (True, False),
                                                                          ("fused", "explicit")))] + \
        [dict(seed=379, layout="zigzag", causal=True, batch=2, seq_local=32, hq=4, hkv=4, d=16, lse_grad=False,
              kernel="fused", head_chunks=2)]


def _run(cases32):
    out = {}
    mesh = comms.init_mesh(dp=1, sp=4, sp_inner=2)
    meshes = {2: mesh, 1: None, 4: None}
    for case in _cases():
        inner = case.get("inner", 2)
        if meshes[inner] is None:
            meshes[inner] = comms.init_mesh(dp=1, sp=4, sp_inner=inner)
        out.setdefault("f64", []).append(_shard_run(case, meshes[inner]))
    out["f32"] = [_shard_run(case, mesh, torch.float32) for case in cases32]
    out["groups"] = (mesh.sp_inner_ranks, mesh.sp_outer_ranks, dist.get_world_size(mesh.sp_inner_group),
                     dist.get_world_size(mesh.sp_outer_group))
    return out


@pytest.mark.timeout(300)
def test_2d_sequence_parallel_matches_single_process(distributed):
    cases32 = _float32_cases()
    per_rank = distributed(_run, 4, cases32, timeout=240)
    for i, case in enumerate(_cases()):
        _compare(case, 4, [r["f64"][i] for r in per_rank])
    for i, case in enumerate(cases32):
        assert per_rank[0]["f32"][i][0].dtype == torch.float32
        _compare(case, 4, [r["f32"][i] for r in per_rank], atol=2e-5, rtol=1e-4)
    assert [r["groups"] for r in per_rank] == [((0, 1), (0, 2), 2, 2), ((0, 1), (1, 3), 2, 2),
                                               ((2, 3), (0, 2), 2, 2), ((2, 3), (1, 3), 2, 2)]


def _dp_times_sp():
    """dp=2 x sp=4 (2 x 2) on 8 ranks would be slow here: dp=2 x sp=2 (inner 2, outer 1) and
    the layout of dp=2 x sp=4 checked as a pure function below."""
    mesh = comms.init_mesh(dp=2, sp=2, sp_inner=2)
    case = dict(seed=380 + mesh.dp_rank, layout="zigzag", causal=True, batch=1, seq_local=4, hq=2, hkv=1, d=3,
                lse_grad=False)
    return mesh.dp_rank, _shard_run(case, mesh)


@pytest.mark.timeout(120)
def test_2d_sequence_parallel_under_data_parallel(distributed):
    per_rank = distributed(_dp_times_sp, 4, timeout=100)
    for dp_rank in (0, 1):
        case = dict(seed=380 + dp_rank, layout="zigzag", causal=True, batch=1, seq_local=4, hq=2, hkv=1, d=3,
                    lse_grad=False)
        _compare(case, 2, [r[1] for r in per_rank if r[0] == dp_rank])


def test_mesh_layout_of_inner_and_outer_groups():
    lay = mesh_layout(8, dp=2, sp=4, ep=2, sp_inner=2)
    assert lay["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay["sp_inner"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay["sp_outer"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh_layout(4, sp=4)["sp_inner"] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="sp_inner=3 must divide sp=4"):
        mesh_layout(4, sp=4, sp_inner=3)
    assert split_ranks([4, 5, 6, 7, 8, 9], 3, 8) == ([7, 8, 9], [5, 8])
    with pytest.raises(ValueError, match="must be a positive integer dividing the 6 sp ranks"):
        split_ranks(range(6), 4, 0)


def test_default_inner_degree():
    assert default_sp_inner(4, 4) == 4
    assert default_sp_inner(4, 6) == 2
    assert default_sp_inner(32, 16) == 8          # at most a node's 8
    assert default_sp_inner(6, 5) == 1            # nothing divides both: ring
    with pytest.raises(ValueError, match="heads=0"):
        default_sp_inner(4, 0)


def test_core_validation():
    with pytest.raises(ValueError, match="needs inner"):
        sequence_parallel_core("ulysses-ring")
    with pytest.raises(ValueError, match="are for attention='ulysses-ring'"):
        sequence_parallel_core("ring", inner=2)
    with pytest.raises(ValueError, match="must be one of"):
        sequence_parallel_core("ring-ulysses")


def test_single_process_is_plain_attention():
    case = dict(seed=390, layout="zigzag", causal=True, batch=2, seq_local=6, hq=4, hkv=2, d=5, lse_grad=False)
    q, k, v, dout, _ = _tensors(case, 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ulysses_ring_attention(q, k, v, inner=1, causal=True, layout="zigzag")
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref = _reference(case, 1)
    for got, want in zip((out, *grads), (ref[0], *ref[2:])):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _bad_calls():
    mesh = comms.init_mesh(dp=1, sp=4, sp_inner=2)
    q = torch.randn(1, 4, 3, 2, dtype=F64)
    other = comms.init_mesh(dp=2, sp=2)  # a wrong inner group: the sp group of another mesh
    odd = torch.randn(1, 3, 2, 2, dtype=F64)
    return {
        "heads": value_error(lambda: ulysses_ring_attention(q, q, q, inner=2, inner_group=mesh.sp_inner_group,
                                                            ranks=mesh.sp_ranks)),
        "group": value_error(lambda: ulysses_ring_attention(q[:, :, :2], q[:, :, :2], q[:, :, :2], inner=2,
                                                            inner_group=other.dp_group, ranks=mesh.sp_ranks)),
        "odd": value_error(lambda: ulysses_ring_attention(odd, odd, odd, inner=2, inner_group=mesh.sp_inner_group,
                                                          ranks=mesh.sp_ranks, layout="zigzag")),
        "differs": value_error(lambda: ulysses_ring_attention(
            q[:, :, :2], q[:, :, :2], q[:, :, :2], inner=2, inner_group=mesh.sp_inner_group, ranks=mesh.sp_ranks,
            causal=dist.get_rank() == 3, layout="contiguous")),
        # uneven shards: the sequence must divide by sp (2*sp for zigzag); a rank with more tokens is refused
        "chunks": value_error(lambda: ulysses_ring_attention(q[:, :, :2], q[:, :, :2], q[:, :, :2], inner=2,
                                                             inner_group=mesh.sp_inner_group, ranks=mesh.sp_ranks,
                                                             head_chunks=2)),
        "uneven": value_error(lambda: ulysses_ring_attention(
            *[torch.randn(1, 6 if dist.get_rank() == 3 else 4, 2, 2, dtype=F64)] * 3, inner=2,
            inner_group=mesh.sp_inner_group, ranks=mesh.sp_ranks)),
    }


@pytest.mark.timeout(120)
def test_bad_calls_fail_on_every_rank(distributed):
    per_rank = distributed(_bad_calls, 4, timeout=100)
    for r, got in enumerate(per_rank):
        assert "heads_q=3 must divide by the inner (Ulysses) degree 2" in got["heads"]
        assert "inner_group must be the group of ranks" in got["group"], got
        assert "seq_local=3 must be even for layout='zigzag'" in got["odd"]
        assert "causal differs across ranks [0, 1, 2, 3]" in got["differs"], got
        assert "head_chunks=2 must be a positive integer dividing the 1 K/V heads" in got["chunks"], got
        assert "seq_local differs across ranks [0, 1, 2, 3]: rank 0: 4, rank 1: 4, rank 2: 4, rank 3: 6" \
            in got["uneven"], got


# ------------------------------------------------------------- loom train

_TRAIN = dict(data="synthetic", steps=3, batch_size=2, seq_len=16, dim=16, heads=2, kv_heads=1, layers=2, vocab=32,
              dtype="float64", progress=False, warmup_steps=1, monitor=False)
_MOE = dict(moe="standard", num_experts=4, top_k=2, moe_aux_coef=0.0)


def _train_2d(url):
    from loom.launch.config import build_config, validate
    from loom.launch.train import train

    class Events:
        def __init__(self):
            self.events = []

        def event(self, text):
            self.events.append(text)

        def step(self, row):
            pass

    def run(overrides, reporter=None):
        cfg = validate(build_config(overrides={**_TRAIN, **overrides}), world_size=dist.get_world_size())
        return train(cfg, reporter)["losses"]

    reporter = Events() if dist.get_rank() == 0 else None
    two_d = run(dict(dp=1, sp=4, sp_attention="ulysses-ring", ckpt_every=2, ckpt_url=url), reporter)
    resumed = run(dict(dp=2, sp=2, ckpt_url=url, resume=True))  # at another layout: ring, dp x sp
    moe = run(dict(dp=1, sp=4, ep=2, sp_attention="ulysses-ring", sp_inner=2, sp_layout="contiguous", **_MOE))
    sharded = run(dict(dp=2, sp=2, sp_attention="ulysses-ring", shard_state="params"))  # inner 2, outer 1
    return two_d, resumed, moe, sharded, reporter.events if reporter else None


@pytest.mark.timeout(200)
def test_loom_train_2d_sequence_parallel_equals_one_process(distributed, tmp_path):
    (single,) = distributed(train_losses, 1, _TRAIN, [dict(dp=1), dict(dp=1, **_MOE)], timeout=100)
    per_rank = distributed(_train_2d, 4, str(tmp_path / "ck"), timeout=170)
    assert single[0][-1] < single[0][0]
    for two_d, resumed, moe, sharded, _ in per_rank:
        assert len(two_d) == len(moe) == len(sharded) == _TRAIN["steps"]
        assert max(abs(a - b) for a, b in zip(two_d, single[0])) < 1e-10, (two_d, single[0])
        assert len(resumed) == 1 and abs(resumed[0] - single[0][2]) < 1e-10, (resumed, single[0])
        assert max(abs(a - b) for a, b in zip(moe, single[1])) < 1e-10, (moe, single[1])
        assert max(abs(a - b) for a, b in zip(sharded, single[0])) < 1e-10, (sharded, single[0])
    events = per_rank[0][4]
    assert any("2-D sequence parallelism: sp=4 = inner 2 x outer 2 (Ulysses all-to-all over 2 consecutive "
               "ranks, ring over 2; --sp-inner auto" in e for e in events), events


@pytest.mark.parametrize("overrides,needle", [
    (dict(sp_attention="ring-ulysses"), "must be ring, ulysses or ulysses-ring"),
    (dict(sp_attention="ring", sp_inner=2), "--sp-inner=2 is the Ulysses degree of --sp-attention ulysses-ring"),
    (dict(sp_attention="ulysses-ring", sp_inner=3), "--sp-inner=3 must divide --sp=4"),
    (dict(sp_attention="ulysses-ring", sp_inner=4, heads=2), "and --heads=2"),
    (dict(sp_attention="ulysses-ring", sp_inner=-1), "--sp-inner=-1 must be >= 0"),
    (dict(sp_attention="ulysses-ring", sp_inner=4, attention_kernel="explicit"), "no ring runs here"),
])
def test_config_refuses_bad_2d_splits(overrides, needle):
    from loom.launch.config import ConfigError, build_config, validate
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(build_config(overrides={**_TRAIN, "dp": 1, "sp": 4, "heads": 4, "dim": 16, **overrides}),
                 world_size=4)


def test_config_defaults_of_2d():
    from loom.launch.config import build_config, sp_inner, sp_layout, validate
    cfg = validate(build_config(overrides={**_TRAIN, "dp": 1, "sp": 4, "sp_attention": "ulysses-ring"}), world_size=4)
    assert (sp_inner(cfg), sp_layout(cfg)) == (2, "zigzag")
    cfg = validate(build_config(overrides={**_TRAIN, "dp": 1, "sp": 4, "sp_attention": "ulysses-ring",
                                           "sp_inner": 1, "attention_kernel": "explicit"}), world_size=4)
    assert sp_inner(cfg) == 1
