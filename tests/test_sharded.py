"""Sharded data parallelism (`--shard-state grads|params`, FSDP2): the same
float64 losses as the unsharded run in every parallel mode, state really
split across ranks, collectives recorded by loom.comms, and checkpoints that
move between sharded and unsharded layouts and world sizes."""
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import EventLog, train_losses
from loom.launch.config import ConfigError, build_config, validate

TINY = dict(data="synthetic", vocab=32, dim=16, layers=2, heads=2, seq_len=8, batch_size=8, dtype="float64",
            lr=1e-2, warmup_steps=1, steps=5, progress=False)
HDP = dict(hdp=True, varlen_median=6, varlen_max=16)
# on 2 ranks; MoE: experts sharded over the edp group (ep=1) or left whole (ep=2: no other rank holds them)
MODES = [("dense", {}), ("moe, experts over edp", dict(moe="standard")),
         ("moe llep ep=2", dict(moe="llep", ep=2, moe_aux_coef=0.0)), ("sp ring", dict(dp=1, sp=2)),
         ("sp linear", dict(dp=1, sp=2, layers="linear,softmax")), ("hdp", HDP),
         ("accumulation + activation checkpointing", dict(grad_accum=2, activation_checkpointing=True))]


def _close(a, b, tol=1e-10):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def _levels(base, modes):
    return train_losses(base, [dict(m, shard_state=s) for m in modes for s in ("none", "params", "grads")])


@pytest.mark.timeout(300)
def test_sharded_runs_equal_the_unsharded_run_in_every_mode_float64(distributed):
    losses = distributed(_levels, 2, TINY, [m for _, m in MODES], timeout=280)[0]
    for i, (name, _) in enumerate(MODES):
        none, params, grads = losses[3 * i:3 * i + 3]
        assert none[-1] < none[0], name  # it trains
        assert _close(none, params) and _close(none, grads), (name, none, params, grads)


@pytest.mark.timeout(200)
def test_sharded_mixed_precision_equals_unsharded(distributed):
    """bf16/fp16 autocast over float32 master weights: FSDP2 gathers the
    float32 parameters and autocast casts them as it does unsharded, so only
    the order of the float32 gradient sums differs."""
    base = dict(TINY, dtype="float32")
    modes = [dict(mixed_precision="bf16"), dict(mixed_precision="fp16", moe="standard")]
    losses = distributed(_levels, 2, base, modes, timeout=180)[0]
    for i, mode in enumerate(modes):
        none, params, grads = losses[3 * i:3 * i + 3]
        assert none[-1] < none[0], mode
        assert _close(none, params, 1e-4) and _close(none, grads, 1e-4), (mode, none, params, grads)


@pytest.mark.timeout(300)
def test_sharded_moe_with_sp_and_ep_on_four_ranks_float64(distributed):
    """dp=2 x sp=2 with EP over 2 of the 4 ranks: experts shard over their
    edp pair, dense weights over all 4 ranks (the sp ranks hold replicas)."""
    modes = [dict(dp=2, sp=2, moe="standard", ep=2), dict(dp=4, moe="llep", ep=2, moe_aux_coef=0.0)]
    losses = distributed(_levels, 4, TINY, modes, timeout=280)[0]
    for i in range(len(modes)):
        none, params, grads = losses[3 * i:3 * i + 3]
        assert _close(none, params) and _close(none, grads), (modes[i], none, params, grads)


def _sharded_layout():
    """Each parameter's local rows and mesh ranks, and the AdamW moments'
    local sizes, after one sharded step of the reference model with MoE."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from loom import comms
    from loom.parallel import ModelConfig, Transformer, next_token_loss, shard_data_parallel
    mesh = comms.init_mesh(dp=dist.get_world_size())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab=32, dim=16, layers=2, heads=2, moe="standard", num_experts=4),
                        mesh.ep_group).double()
    full = {n: p.numel() for n, p in model.named_parameters()}
    sharded = shard_data_parallel(model, "params", ep_group=mesh.ep_group, edp_group=mesh.edp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, (2, 8))
    next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    sharded.sync()
    sharded.clip_grad_norm_(1.0)
    opt.step()
    out = {}
    for n, p in model.named_parameters():
        assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
        moments = opt.state[p]
        out[n] = (full[n], p.to_local().numel(), p.grad.to_local().numel(), moments["exp_avg"].to_local().numel(),
                  sorted(p.device_mesh.mesh.flatten().tolist()))
    return out


@pytest.mark.timeout(120)
def test_params_grads_and_optimizer_state_are_split_across_ranks(distributed):
    per_rank = distributed(_sharded_layout, 2, timeout=100)
    for name in per_rank[0]:
        full = per_rank[0][name][0]
        local = [r[name][1] for r in per_rank]
        assert sum(local) == full and max(local) <= -(-full // 2), (name, local, full)  # 1/2 each (rows)
        for r in per_rank:
            assert r[name][1] == r[name][2] == r[name][3], (name, r[name])  # grads and moments follow
            assert r[name][4] == [0, 1], name  # dense and (ep=1) experts over both ranks


def _traced_ops(level):
    from loom import comms
    comms.trace.reset_trace()
    train_losses(TINY, [dict(shard_state=level, steps=3)])  # step 1: no evaluation (after the last step)
    step = [r for r in comms.trace.records() if r.step == 1]
    return {op: (sum(1 for r in step if r.op == op), sum(r.nbytes for r in step if r.op == op))
            for op in ("all_gather", "reduce_scatter", "all_reduce")}


@pytest.mark.timeout(120)
def test_fsdp_collectives_are_recorded_for_the_fault_monitor(distributed):
    """FSDP2's all-gathers and reduce-scatters go through loom.comms: the
    trace the fault monitor reads holds them, with the step they belong to."""
    none, params, grads = (distributed(_traced_ops, 2, level)[0] for level in ("none", "params", "grads"))
    assert none["all_gather"][0] == 0 and none["reduce_scatter"][0] == 0
    # params: every unit gathers in the forward, the embedding and the blocks again in the backward (the head
    # and the root stay gathered in between); one reduce-scatter per unit
    units = 1 + 2 + 1 + 1  # the embedding, two blocks, the head and the root (the final norm)
    assert params["all_gather"][0] == units + 3 and params["reduce_scatter"][0] == units, params
    assert grads["all_gather"][0] == units and grads["reduce_scatter"][0] == units, grads
    # gradients are no longer all-reduced (only the reported loss and the gradient norm)
    assert params["all_reduce"][1] < none["all_reduce"][1] and params["reduce_scatter"][1] > 0


@pytest.mark.parametrize("overrides, needle", [
    (dict(shard_state="optim"), "--shard-state optim (ZeRO-1) is not offered"),
    (dict(shard_state="zero3"), "--shard-state='zero3' must be one of none, grads, params"),
    (dict(shard_state="params", compile=True), "--compile with --shard-state params is not supported"),
])
def test_shard_state_is_validated(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        validate(build_config(overrides={**TINY, **overrides}), world_size=2)
    assert needle in str(err.value)


def test_shard_data_parallel_refuses_an_unknown_level():
    from loom.parallel import shard_data_parallel
    with pytest.raises(ValueError, match="level 'none' must be one of"):
        shard_data_parallel(torch.nn.Linear(2, 2), "none")


# ------------------------------------------------------------- checkpoints

def _train(overrides):
    from loom.launch.train import train
    events = EventLog()
    summary = train(validate(build_config(overrides=overrides)), events)
    return summary["losses"], summary.get("extra", {}), events.lines


@pytest.mark.timeout(400)
@pytest.mark.parametrize("model", [{}, dict(moe="standard")], ids=["dense", "moe"])
def test_a_sharded_checkpoint_resumes_unsharded_at_dp1_and_sharded_at_dp4(distributed, tmp_path, model):
    base = {**TINY, **model, "batch_size": 8}
    reference = distributed(_train, 2, {**base, "steps": 6}, timeout=240)[0][0]
    url = str(tmp_path / "ck")
    first, extra, _ = distributed(_train, 2, {**base, "steps": 4, "shard_state": "params", "ckpt_every": 2,
                                              "ckpt_url": url}, timeout=240)[0]
    assert _close(first, reference[:4]) and extra["checkpoints"] == 2
    # sharded at dp=2 -> unsharded at dp=1, and -> sharded (params) at dp=4
    single, extra, events = distributed(_train, 1, {**base, "steps": 6, "dp": 1, "ckpt_url": url,
                                                    "resume": True}, timeout=240)[0]
    assert extra["start_step"] == 4 and "saved by 2 ranks" in " ".join(events)
    assert _close(single, reference[4:], 1e-9), (single, reference[4:])
    four, extra, _ = distributed(_train, 4, {**base, "steps": 6, "dp": 4, "shard_state": "params",
                                             "ckpt_url": url, "resume": True}, timeout=240)[0]
    assert extra["start_step"] == 4 and _close(four, reference[4:], 1e-9), (four, reference[4:])


# ------------------------------------------------------------- fault monitor

@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_hang_inside_a_sharded_step_is_named_by_the_monitor(tmp_path):
    """Rank 1 hangs at step 6 of a ``--shard-state params`` job: rank 0 waits
    in FSDP2's first all-gather of the step, which loom.comms recorded, so
    the monitor names rank 1 and that all-gather, and every worker stops."""
    proc = subprocess.run([sys.executable, "-m", "loom", "train", "--steps", "200", "--name", "hang", "--runs-dir",
                           str(tmp_path), "--no-progress", "--shard-state", "params", "--pg-timeout", "300",
                           "--inject", "hang:rank=1,step=6"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"stopped all 2 workers after a hang: rank 1 never entered all_gather #\d+ of group "
                     r"world \(step 6\)", proc.stderr), proc.stderr[-3000:]
    faults = [json.loads(x) for x in (tmp_path / "hang" / "faults.jsonl").read_text().splitlines()]
    assert [(f["kind"], f["ranks"], f["step"]) for f in faults] == [("hang", [1], 6)]


def _expert_placements():
    """dp=4, ep=2: each rank's expert slice (ep) is split again by FSDP2 over
    its edp pair; the new parameters and their AdamW moments keep the slice's
    placement, so a checkpoint stores the right rows of the global tensor."""
    from loom import checkpoint, comms
    from loom.parallel import ModelConfig, Transformer, next_token_loss, shard_data_parallel
    mesh = comms.init_mesh(dp=4, ep=2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab=32, dim=16, layers=1, heads=2, moe="standard", num_experts=4),
                        mesh.ep_group).double()
    shard_data_parallel(model, "params", ep_group=mesh.ep_group, edp_group=mesh.edp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, (2, 8))
    next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    opt.step()
    moe = model.blocks[0].ffn
    moment = checkpoint.optimizer_state_dict(opt)["state"]
    index = next(i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is moe.w_up)
    return (comms.placement_of(moe.w_up), comms.placement_of(moment[index]["exp_avg"]),
            sorted(moe.w_up.device_mesh.mesh.flatten().tolist()))


@pytest.mark.timeout(120)
def test_expert_slices_keep_their_placement_when_sharded_over_edp(distributed):
    for rank, (param, moment, mesh) in enumerate(distributed(_expert_placements, 4, timeout=100)):
        # ep groups are [0, 1] and [2, 3] (ep rank = rank % 2); edp pairs [0, 2] and [1, 3]
        assert param is not None and (param.dim, param.parts, param.index) == (0, 2, rank % 2), (rank, param)
        assert moment == param, rank
        assert mesh == ([0, 2] if rank % 2 == 0 else [1, 3]), (rank, mesh)


@pytest.mark.timeout(400)
def test_expert_shards_saved_at_dp4_ep2_resume_unsharded_at_dp2(distributed, tmp_path):
    """Expert slices (ep=2) split again over their edp pair by FSDP2, saved,
    and resumed whole on 2 ranks: no expert weight or moment is lost."""
    base = {**TINY, "moe": "standard", "num_experts": 4, "batch_size": 8}
    reference = distributed(_train, 4, {**base, "steps": 6, "dp": 4, "ep": 2}, timeout=240)[0][0]
    url = str(tmp_path / "ck")
    first, _, _ = distributed(_train, 4, {**base, "steps": 4, "dp": 4, "ep": 2, "shard_state": "params",
                                          "ckpt_every": 2, "ckpt_url": url}, timeout=240)[0]
    assert _close(first, reference[:4])
    resumed, extra, _ = distributed(_train, 2, {**base, "steps": 6, "dp": 2, "ep": 2, "ckpt_url": url,
                                                "resume": True}, timeout=240)[0]
    assert extra["start_step"] == 4 and _close(resumed, reference[4:], 1e-9), (resumed, reference[4:])
