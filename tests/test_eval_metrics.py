"""Evaluation on held-out data and the per-step metrics of `loom train`:
the held-out stream, the eval loss in every parallel layout against one
process (float64, 1e-10), the FLOPs estimate, gradient norm, memory, MFU."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import EventLog

from loom.launch.config import build_config, validate
from loom.launch.metrics import FlopsCounts, batch_flops, count_model, flops_per_token, peak_memory
from loom.parallel import ModelConfig, SyntheticData, Transformer

TINY = {"data": "synthetic",
        "vocab": 32, "dim": 16, "layers": 2, "heads": 2, "seq_len": 8, "batch_size": 4, "dtype": "float64",
        "lr": 1e-2, "warmup_steps": 2, "progress": False, "steps": 2, "eval_every": 2, "eval_batches": 2}


# ------------------------------------------------------------ held-out data

def test_heldout_stream_is_its_own_pure_function():
    train, val = SyntheticData(32, 8, seed=3), SyntheticData(32, 8, seed=3, split="val")
    assert torch.equal(val.sample(0, 1), SyntheticData(32, 8, seed=3, split="val").sample(0, 1))
    assert torch.equal(train.heldout().batch(2, range(4))[0], val.batch(2, range(4))[0])
    # the held-out draws are not the training draws of the same (step, index)
    same = sum(torch.equal(train.sample(s, i), val.sample(s, i)) for s in range(8) for i in range(8))
    assert same < 8  # a few may coincide: the task has only vocab * strides sequences
    assert train.split == "train" and val.split == "val"
    with pytest.raises(ValueError, match="split='test' must be one of"):
        SyntheticData(32, 8, split="test")


# ------------------------------------------------------------ FLOPs estimate

def test_flops_formula():
    counts = FlopsCounts(active_params=100, attn_layers=2, attn_width=8)
    assert flops_per_token(counts, 16) == 6 * 100 + 12 * 2 * 8 * 16
    assert batch_flops(counts, [16, 4]) == 16 * (600 + 12 * 2 * 8 * 16) + 4 * (600 + 12 * 2 * 8 * 4)
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
        flops_per_token(counts, 0)


def test_count_model_dense_moe_tied_and_foreign():
    d, v, hidden = 16, 32, 64
    block = 2 * d + 4 * d * d + 2 * d * hidden  # two norms, q/k/v/o, the feed-forward
    counts = count_model(Transformer(ModelConfig(vocab=v, dim=d, layers=2, heads=2)))
    assert counts == FlopsCounts(2 * block + d + d * v, 2, d)  # no embedding table; the head counts
    moe = count_model(Transformer(ModelConfig(vocab=v, dim=d, layers=1, heads=2, moe="standard",
                                              num_experts=4, top_k=2)))
    expert = 3 * d * hidden  # SwiGLU: gate, up, down
    assert moe.active_params == 2 * d + 4 * d * d + d * 4 + 2 * expert + d + d * v  # router + top_k experts

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(v, d), torch.nn.Linear(d, v, bias=False)
            self.head.weight = self.embed.weight
            self.config = type("Config", (), {"num_hidden_layers": 3, "hidden_size": d})()

    assert count_model(Tied()) == FlopsCounts(v * d, 3, d)  # tied: the output projection is a matmul
    assert count_model(torch.nn.Linear(4, 5)) == FlopsCounts(25)


def test_peak_memory_on_cpu_is_the_peak_rss():
    name, value = peak_memory(torch.device("cpu"))
    assert name == "peak_rss_bytes" and value > 10 * 2**20


# ------------------------------------------------------------ evaluation

def _eval_rows(overrides):
    from loom.launch.train import train

    log = EventLog()
    rows = log.rows
    summary = train(validate(build_config(overrides={**TINY, **overrides})), log)
    return [r for r in rows if r.get("split") == "eval"], [r for r in rows if "split" not in r], summary


def _evaluate_fresh_model():
    """One process: `evaluate` on a fresh model against a direct computation."""
    from loom import comms
    from loom.launch.evaluation import evaluate
    cfg = validate(build_config(overrides={**TINY, "dp": 1}))
    torch.manual_seed(0)
    model = Transformer(cfg.model).double()
    mesh = comms.init_mesh(1, 1, 1)
    data = SyntheticData(cfg.model.vocab, cfg.train.seq_len, cfg.train.seed).heldout()
    got = evaluate(model, data, batches=3, batch_size=5, mesh=mesh, device=torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(3):
            inputs, targets = data.batch(b, range(5))
            logits = model(inputs)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="sum"))
            count += targets.numel()
    return got, total / count, count, model.training


@pytest.mark.timeout(120)
def test_evaluate_is_the_mean_over_every_heldout_token(distributed):
    (got, want, count, training), = distributed(_evaluate_fresh_model, 1, timeout=100)
    assert got["eval_tokens"] == count == 3 * 5 * 8
    assert got["eval_loss"] == pytest.approx(want, rel=1e-12)
    assert got["eval_ppl"] == pytest.approx(math.exp(want), rel=1e-12)
    assert training  # back in training mode


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, reference", [
    ({"dp": 2}, {"dp": 1}),
    ({"dp": 1, "sp": 2}, {"dp": 1}),
    ({"dp": 1, "sp": 2, "sp_attention": "ulysses"}, {"dp": 1}),
    ({"dp": 2, "ep": 2, "moe": "standard", "num_experts": 4}, {"dp": 1, "moe": "standard", "num_experts": 4}),
    ({"dp": 2, "hdp": True, "batch_size": 5, "varlen_max": 8},
     {"dp": 1, "hdp": True, "batch_size": 5, "varlen_max": 8}),
], ids=["dp", "sp-ring", "sp-ulysses", "ep", "hdp"])
def test_eval_loss_in_every_layout_equals_one_process(distributed, layout, reference):
    (want, train_want, _), = distributed(_eval_rows, 1, reference, timeout=200)
    got, train_got, summary = distributed(_eval_rows, 2, layout, timeout=200)[0]
    assert [r["step"] for r in got] == [1] and got[0]["eval_tokens"] == 2 * TINY["seq_len"] * (
        layout.get("batch_size", TINY["batch_size"]))
    assert got[0]["eval_loss"] == pytest.approx(want[0]["eval_loss"], rel=1e-10)
    assert got[0]["eval_ppl"] == pytest.approx(math.exp(want[0]["eval_loss"]), rel=1e-10)
    assert [r["loss"] for r in train_got] == pytest.approx([r["loss"] for r in train_want], rel=1e-10)
    assert summary["extra"]["eval_loss"] == round(got[0]["eval_loss"], 6)


@pytest.mark.timeout(200)
def test_eval_every_and_the_last_step(distributed):
    rows, _, _ = distributed(_eval_rows, 1, {"dp": 1, "steps": 13, "eval_every": 4, "batch_size": 8},
                            timeout=150)[0]
    assert [r["step"] for r in rows] == [3, 7, 11, 12]
    losses = [r["eval_loss"] for r in rows]
    assert losses[0] > losses[1] > losses[2]  # it learns, and the held-out loss shows it


# ------------------------------------------------------------ step metrics

def _first_grad_norm(clip):
    """Step 0's reported grad_norm, and the norm of the same gradient computed directly."""
    from loom.launch.train import train
    from loom.parallel import next_token_loss

    log = EventLog()
    rows = log.rows
    cfg = validate(build_config(overrides={**TINY, "dp": 1, "grad_clip": clip, "peak_tflops": 2.0}))
    train(cfg, log)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).double()
    inputs, targets = SyntheticData(cfg.model.vocab, cfg.train.seq_len, cfg.train.seed).batch(0, range(4))
    next_token_loss(model(inputs), targets).backward()
    direct = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    return list(rows), direct, count_model(model)


@pytest.mark.timeout(200)
def test_step_metrics(distributed):
    (rows, direct, counts), = distributed(_first_grad_norm, 1, 0.0, timeout=150)
    (clipped, _, _), = distributed(_first_grad_norm, 1, 1e-3, timeout=150)
    train_rows = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train_rows] == [0, 1]
    first = train_rows[0]
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "model_tflops_per_device", "mfu",
                "peak_rss_bytes"):
        assert key in first, key
    assert first["grad_norm"] == pytest.approx(direct, rel=1e-10)  # clipping off: still measured
    assert clipped[0]["grad_norm"] == pytest.approx(direct, rel=1e-10)  # before clipping
    assert first["lr"] == TINY["lr"] / 2  # step 0's lr (warm-up), not the next step's
    assert first["tokens_per_s"] == pytest.approx(4 * 8 / first["step_time_s"], rel=1e-12)
    flops = batch_flops(counts, [8] * 4) / first["step_time_s"]
    assert first["model_tflops_per_device"] == pytest.approx(flops / 1e12, rel=1e-12)
    assert first["mfu"] == pytest.approx(flops / 2e12, rel=1e-12)


def test_evaluate_runs_the_forward_in_the_given_autocast():
    """Without a process group (a world of one); mixed precision passes its autocast."""
    from types import SimpleNamespace

    from loom.launch.evaluation import evaluate
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab=32, dim=16, layers=1, heads=2))
    data = SyntheticData(32, 8).heldout()
    mesh = SimpleNamespace(dp=1, dp_rank=0, sp=1)
    kw = dict(batches=2, batch_size=4, mesh=mesh, device=torch.device("cpu"))
    plain = evaluate(model, data, **kw)["eval_loss"]
    low = evaluate(model, data, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), **kw)["eval_loss"]
    assert low != plain and low == pytest.approx(plain, rel=2e-2)
