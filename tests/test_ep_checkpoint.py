"""State that differs by rank is never saved as "replicated".

Expert-parallel weights and their optimizer moments are saved as parts of
the global [num_experts, ...] tensors, so a run resumes at any ep degree (or
in one process) with the uninterrupted run's losses; the replica guard
refuses any tensor declared replicated whose replicas differ."""
import pytest
import torch
import torch.distributed as dist

from helpers import EventLog

from loom import checkpoint as ckpt
from loom import comms
from loom.launch.config import build_config, validate

# the load-balancing loss on (its default): its slot fractions are the whole batch's at every ep degree
MOE = {"data": "synthetic",
       "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4, "dtype": "float64",
       "lr": 1e-2, "warmup_steps": 2, "progress": False, "moe": "standard", "num_experts": 4, "top_k": 2,
       "monitor": False}


def _train(overrides):
    from loom.launch.train import train

    world = dist.get_world_size()
    cfg = validate(build_config(overrides={"dp": world, **overrides}), world_size=world)
    events = EventLog()
    summary = train(cfg, events)
    return summary["losses"], summary.get("extra", {}), events.lines


@pytest.mark.timeout(600)
def test_ep_run_resumes_at_any_ep_degree_with_the_uninterrupted_losses(distributed, tmp_path):
    url, url1 = str(tmp_path / "ep2"), str(tmp_path / "one")
    reference = distributed(_train, 2, {**MOE, "ep": 2, "steps": 6}, timeout=300)[0][0]
    first = distributed(_train, 2, {**MOE, "ep": 2, "steps": 3, "ckpt_every": 3, "ckpt_url": url},
                        timeout=300)[0][0]
    assert first == reference[:3]

    # every expert and every Adam moment is in the checkpoint, as parts of the global tensors
    manifest = ckpt.CheckpointStore(url).read_manifest(3)
    w_gate = manifest.tensors["model/blocks.0.ffn.w_gate"]
    assert (w_gate.placement, w_gate.shape[0]) == ("shard", 4)
    assert sorted(f.lo[0] for f in w_gate.fragments) == [0, 2]
    moments = [k for k, e in manifest.tensors.items()
               if k.startswith("optim/state/") and k.endswith(("exp_avg", "exp_avg_sq"))
               and e.placement == "shard"]
    assert len(moments) == 2 * 3 * 2  # 2 layers x (w_gate, w_up, w_down) x 2 moments

    cases = [(2, {"ep": 2}), (2, {"ep": 1}), (1, {"ep": 1}), (4, {"ep": 4}), (4, {"ep": 2}),
             (4, {"ep": 2, "dp": 2, "sp": 2})]  # experts folded over a dp x sp mesh
    for world, layout in cases:
        resumed, extra, events = distributed(
            _train, world, {**MOE, **layout, "steps": 6, "ckpt_url": url, "resume": True}, timeout=300)[0]
        assert extra["start_step"] == 3 and "resumed from" in events[0], (world, layout, events)
        assert resumed == pytest.approx(reference[3:], rel=1e-9, abs=0), (world, layout)

    # resuming with --steps not above the checkpoint's step trains nothing, and says so
    nothing, extra, events = distributed(_train, 2, {**MOE, "ep": 2, "steps": 3, "ckpt_url": url, "resume": True},
                                         timeout=300)[0]
    assert nothing == [] and any("nothing to train" in e for e in events), events

    # LLEP (weights borrowed across ranks), synchronous saves, resumed at dp=4 x ep=2
    llep = {**MOE, "moe": "llep", "llep_lam": 1.0, "llep_min_chunk": 4, "ckpt_mode": "sync"}
    reference_llep = distributed(_train, 2, {**llep, "ep": 2, "steps": 6}, timeout=300)[0][0]
    distributed(_train, 2, {**llep, "ep": 2, "steps": 3, "ckpt_every": 3, "ckpt_url": url + "-llep"}, timeout=300)
    resumed = distributed(_train, 4, {**llep, "ep": 2, "steps": 6, "ckpt_url": url + "-llep", "resume": True},
                          timeout=300)[0][0]
    assert resumed == pytest.approx(reference_llep[3:], rel=1e-9, abs=0)

    # the other way: saved by one process (ep=1), resumed expert-parallel
    distributed(_train, 1, {**MOE, "steps": 3, "ckpt_every": 3, "ckpt_url": url1}, timeout=300)
    resumed = distributed(_train, 2, {**MOE, "ep": 2, "steps": 6, "ckpt_url": url1, "resume": True},
                          timeout=300)[0][0]
    assert resumed == pytest.approx(reference[3:], rel=1e-9, abs=0)


def _own_loop_worker(url, mode):
    """A user's own loop: an EP model, saved with model.state_dict()."""
    from loom.parallel import ExpertParallelGradientSync, ModelConfig, SyntheticData, Transformer, next_token_loss
    mesh = comms.init_mesh(dp=2, ep=2)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab=32, dim=16, layers=1, heads=2, moe="standard", num_experts=4, top_k=2,
                      moe_aux_coef=0.0)
    model = Transformer(cfg, mesh.ep_group).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = SyntheticData(32, 8, seed=0).batch(0, range(mesh.rank * 2, mesh.rank * 2 + 2))
    next_token_loss(model(x), y).backward()
    ExpertParallelGradientSync(model, None, ep_group=mesh.ep_group, edp_group=mesh.edp_group).sync()
    opt.step()
    if mode == "model":
        ckpt.save({"model": model.state_dict()}, url, step=1)
        return {n: p.detach() for n, p in model.named_parameters()}
    if mode == "plain-optim":  # the moments differ by rank: the guard refuses to call them replicas
        try:
            ckpt.save({"optim": opt.state_dict()}, url, step=1)
        except ValueError as exc:
            return str(exc)
        return "saved"
    if mode == "async-plain-optim":
        with ckpt.AsyncCheckpointer(url) as saver:
            try:
                saver.save({"optim": opt.state_dict()}, step=1)
                saver.wait()
            except ckpt.CheckpointSaveError as exc:
                return str(exc)
        return "saved"
    raise AssertionError(mode)


@pytest.mark.timeout(300)
def test_own_loop_model_state_dict_of_an_ep_model_saves_every_expert(distributed, tmp_path):
    from loom.parallel import ModelConfig, Transformer
    url = str(tmp_path / "own")
    parts = distributed(_own_loop_worker, 2, url, "model", timeout=200)
    cfg = ModelConfig(vocab=32, dim=16, layers=1, heads=2, moe="standard", num_experts=4, top_k=2)
    whole = Transformer(cfg).double()  # one process, every expert
    ckpt.load({"model": whole.state_dict()}, url)
    for name, p in whole.named_parameters():
        if name.endswith(("w_gate", "w_up", "w_down")):
            torch.testing.assert_close(p.detach(), torch.cat([parts[0][name], parts[1][name]]), rtol=0, atol=0)
        else:
            torch.testing.assert_close(p.detach(), parts[0][name], rtol=0, atol=0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["plain-optim", "async-plain-optim"])
def test_replica_guard_refuses_differing_replicas_on_every_rank(distributed, tmp_path, mode):
    messages = distributed(_own_loop_worker, 2, str(tmp_path / mode), mode, timeout=200)
    for msg in messages:
        assert "optim/state/" in msg and "exp_avg" in msg and "values differ" in msg, msg
        assert "optimizer_state_dict" in msg
    assert ckpt.CheckpointStore(str(tmp_path / mode)).committed_steps() == []


def _replica_worker(url, index):
    rank = dist.get_rank()
    same = torch.arange(100_000, dtype=torch.float32).reshape(1000, 100)
    base = same.clone()
    base.view(-1)[index] += rank  # element ``index`` in storage order
    differs = base.t()  # not contiguous: sampled by coordinates
    try:
        ckpt.save({"ok": same, "bad": {"w": differs}}, url, step=0)
    except ValueError as exc:
        return str(exc)
    return "saved"


def test_replica_guard_names_the_key(distributed, tmp_path):
    """Replicas one sampled element apart, in a non-contiguous tensor: every
    rank raises naming the key, and nothing is committed."""
    from loom.checkpoint.replicas import SAMPLE
    n = 100_000
    sampled = torch.arange(SAMPLE) * (n - 1) // (SAMPLE - 1)  # the elements the guard reads
    # the transposed view's logical element k sits at storage index (k % 1000) * 100 + k // 1000
    k = int(sampled[1234])
    index = (k % 1000) * 100 + k // 1000
    out = distributed(_replica_worker, 2, str(tmp_path / "r"), index, timeout=120)
    assert all("'bad/w'" in m and "ranks [0, 1]" in m and "values differ" in m for m in out), out
    assert ckpt.CheckpointStore(str(tmp_path / "r")).committed_steps() == []


def _row_apart_worker(url, steps):
    """Replicas of a large tensor one row apart, saved at several steps."""
    rank = dist.get_rank()
    emb = torch.zeros(50_000, 64)
    emb[123] += rank  # one row of 64 elements in 3.2M
    caught = []
    for step in steps:
        try:
            ckpt.save({"emb": emb}, url, step=step)
        except ValueError as exc:
            caught.append((step, "'emb'" in str(exc)))
    return caught


def test_replica_guard_samples_move_with_the_step(distributed, tmp_path):
    """A few elements apart is missed by one save's sample, but the sampled
    positions move with the step: over 60 saves the guard catches it."""
    out = distributed(_row_apart_worker, 2, str(tmp_path / "rows"), list(range(60)), timeout=200)
    assert out[0] == out[1] and out[0] and all(named for _, named in out[0]), out


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_loom_train_ep_resumes_at_another_ep_with_the_monitor_on(distributed, tmp_path):
    """Through the CLI (Ray workers, the fault monitor on, asynchronous saves):
    saved at --ep 2, resumed at --ep 1, the uninterrupted losses."""
    import json
    import subprocess
    import sys
    url = str(tmp_path / "ck")
    opts = {k: v for k, v in MOE.items() if k not in ("progress", "monitor")}
    reference = distributed(_train, 2, {**MOE, "ep": 2, "steps": 6}, timeout=300)[0][0]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()] + ["--no-progress", "--ckpt-url", url]

    def run(name, *extra):
        proc = subprocess.run([sys.executable, "-m", "loom", "train", "--name", name, "--runs-dir", str(tmp_path),
                               *flags, *extra], capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return proc.stdout, [m["loss"] for m in metrics if m.get("split", "train") == "train"]

    out, first = run("first", "--ep", "2", "--steps", "3", "--ckpt-every", "3")
    assert first == pytest.approx(reference[:3], rel=1e-12, abs=0)
    out, resumed = run("second", "--ep", "1", "--steps", "6", "--resume")
    assert "resumed from" in out and "[fault]" not in out
    assert resumed == pytest.approx(reference[3:], rel=1e-9, abs=0)
