"""Gated linear attention against a token-by-token recurrence (float64), on one
process and sharded over 1, 2 and 4 ranks; the model's linear layers sharded
by hand against the unsharded model."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from loom import comms
from loom.parallel import (ModelConfig, Transformer, enable_sequence_parallel, linear_attention,
                           local_linear_attention, next_token_loss)

from helpers import recurrence, single_process_losses

B, H, D_K, D_V = 2, 2, 4, 3


def _inputs(seq, seed=0, dtype=torch.float64, edges=True):
    """q, k, v, log_decay for the whole sequence, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, seq, H, D_K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, seq, H, D_V, generator=gen, dtype=dtype)
    g = -torch.rand(B, seq, H, D_K, generator=gen, dtype=dtype) * 1.5
    if edges:  # decay exactly 0 (forget everything) and exactly 1 (keep everything)
        g[0, seq // 3, 1, 2] = float("-inf")
        g[1, seq // 2] = 0.0
        g[:, -1, 0, 0] = float("-inf")
    return q, k, v, g


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 25, 40, 64])
def test_local_layer_matches_recurrence_forward_and_backward(chunk):
    # 40 tokens: chunks that divide them and not; chunks over 16 tokens are
    # computed in 16-token blocks; 64 is one chunk of 40
    q, k, v, g = _leaves(*_inputs(40))
    out, state = local_linear_attention(q, k, v, g, chunk_size=chunk, scale=0.6, return_final_state=True)
    rq, rk, rv, rg = _leaves(q, k, v, g)
    ref, ref_states = recurrence(rq, rk, rv, rg, 0.6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, ref_states[:, -1], rtol=0, atol=1e-12)
    w_o, w_s = torch.randn_like(out), torch.randn_like(state)
    ((out * w_o).sum() + (state * w_s).sum()).backward()
    ((ref * w_o).sum() + (ref_states[:, -1] * w_s).sum()).backward()
    for got, want in zip((q, k, v, g), (rq, rk, rv, rg)):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


def test_float32_and_bfloat16_keep_states_in_float32():
    q, k, v, g = _inputs(20, edges=False)
    ref, ref_states = recurrence(q, k, v, g)
    out, state = local_linear_attention(*(t.float() for t in (q, k, v, g)), chunk_size=8,
                                        return_final_state=True)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out, state = local_linear_attention(*(t.bfloat16() for t in (q, k, v, g)), chunk_size=8,
                                        return_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("fn", [local_linear_attention, linear_attention])
def test_bad_input_is_a_clear_value_error(fn):
    q, k, v, g = _inputs(6, edges=False)
    cases = [
        ((q[:, :5], k, v, g), {}, "shapes disagree"),
        ((q, k, v[:1], g), {}, "shapes disagree"),
        ((q, k, v, g[..., :3]), {}, "shapes disagree"),
        ((q[0], k, v, g), {}, r"q \(6, 2, 4\) must be \[batch, seq, heads, dim\]"),
        ((q, k, v, g.abs() + 0.1), {}, "log_decay must be <= 0"),
        ((q, k, v, torch.full_like(g, float("nan"))), {}, r"log_decay must be <= 0 everywhere \(found nan\)"),
        ((q, k, v, g), {"chunk_size": 0}, "chunk_size=0"),
        ((q, k, v, g), {"chunk_size": 2.5}, "chunk_size=2.5"),
    ]
    for args, kw, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn(*args, **kw)  # validation comes before any message, so no process group is needed


SEQ_LOCAL = 18
CHUNKS = (1, 6, 9, 4, 7, 18, 64)  # 1, 6, 9, 18 divide seq_local; 4 and 7 do not; 64 exceeds it


def _sharded_cases():
    rank, world = dist.get_rank(), dist.get_world_size()
    seq = SEQ_LOCAL * world
    q, k, v, g = _inputs(seq, seed=world)
    w_o = torch.randn(B, seq, H, D_V, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w_s = torch.randn(world, B, H, D_K, D_V, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # reference: the whole sequence, the loss over every rank's slice and boundary state
    rq, rk, rv, rg = _leaves(q, k, v, g)
    ref, states = recurrence(rq, rk, rv, rg, 0.5)
    boundary = states[:, SEQ_LOCAL - 1::SEQ_LOCAL].transpose(0, 1)       # [world, b, h, d_k, d_v]
    ((ref * w_o).sum() + (boundary * w_s).sum()).backward()
    worst = 0.0
    for ring in (list(range(world)), list(range(world))[::-1]):
        pos = ring.index(rank)
        sl = slice(pos * SEQ_LOCAL, (pos + 1) * SEQ_LOCAL)
        for method in ("allscan", "serial", "allgather"):
            for chunk in CHUNKS:
                lq, lk, lv, lg = _leaves(q[:, sl], k[:, sl], v[:, sl], g[:, sl])
                out, state = linear_attention(lq, lk, lv, lg, ranks=ring, method=method, chunk_size=chunk,
                                              scale=0.5, return_final_state=True)
                ((out * w_o[:, sl]).sum() + (state * w_s[pos]).sum()).backward()
                # with the reversed ring, position p holds slice p: compare with the same reference
                pairs = [(out, ref[:, sl]), (state, boundary[pos])]
                pairs += [(t.grad, r.grad[:, sl]) for t, r in zip((lq, lk, lv, lg), (rq, rk, rv, rg))]
                for got, want in pairs:
                    err = (got - want).abs().max().item()
                    assert err < 1e-10, (ring, method, chunk, err)
                    worst = max(worst, err)
            # float32 at a realistic tolerance (states stay float32)
            shard = (t[:, sl].float() for t in (q, k, v, g))
            out, state = linear_attention(*shard, ranks=ring, method=method, chunk_size=7, scale=0.5,
                                          return_final_state=True)
            assert out.dtype == state.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref[:, sl].detach(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(state.double(), boundary[pos].detach(), rtol=1e-4, atol=1e-4)
    return worst


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_layer_matches_recurrence(distributed, world):
    assert max(distributed(_sharded_cases, world, timeout=200)) < 1e-10


# ---------------------------------------------------------------- the model

MODEL = dict(vocab=32, dim=16, heads=2)
SEQ = 12


def _gathered_softmax_core(q, k, v, *, causal=True, scale=None):
    """A stand-in sequence-parallel softmax core for the contiguous layout:
    all-gather K and V over the world and attend with the causal offset."""
    rank, world = dist.get_rank(), dist.get_world_size()
    k_all, v_all = (comms.all_gather_with_grad(t.transpose(0, 1).contiguous()).transpose(0, 1)
                    for t in (k, v))
    local = q.shape[1]
    mask = (torch.arange(local)[:, None] + rank * local) >= torch.arange(local * world)[None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _model(layers):
    torch.manual_seed(0)
    return Transformer(ModelConfig(layers=layers, **MODEL)).double()


def _tokens():
    return torch.randint(MODEL["vocab"], (2, SEQ + 1), generator=torch.Generator().manual_seed(5))


def _reference(layers):
    model, tokens = _model(layers), _tokens()
    logits = model(tokens[:, :-1])
    next_token_loss(logits, tokens[:, 1:]).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _sharded_model(layers, method):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tokens = _model(layers), _tokens()
    enable_sequence_parallel(model, list(range(world)), linear_method=method,
                             softmax_core=_gathered_softmax_core)
    local = SEQ // world
    sl = slice(rank * local, (rank + 1) * local)
    logits = model(tokens[:, :-1][:, sl], torch.arange(sl.start, sl.stop))
    # this rank's share of the mean over every token; the shares' gradients add up
    loss = next_token_loss(logits, tokens[:, 1:][:, sl], reduction="sum") / tokens[:, 1:].numel()
    loss.backward()
    grads = {n: comms.all_reduce(p.grad.clone()) for n, p in model.named_parameters()}
    return logits.detach(), grads


def _model_cases():
    results = {}
    for layers, method in (("linear,linear", "allscan"), ("linear,softmax", "serial"),
                           ("softmax,linear", "allgather")):
        results[layers] = _sharded_model(layers, method)
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_model_matches_single_process(distributed, world):
    per_rank = distributed(_model_cases, world, timeout=200)
    local = SEQ // world
    for layers in ("linear,linear", "linear,softmax", "softmax,linear"):
        ref_logits, ref_grads = _reference(layers)
        for rank, results in enumerate(per_rank):
            logits, grads = results[layers]
            mine = ref_logits[:, rank * local:(rank + 1) * local]
            torch.testing.assert_close(logits, mine, rtol=0, atol=1e-10)
            assert grads.keys() == ref_grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-10, msg=name)


def test_model_layer_pattern():
    cfg = ModelConfig(layers="linear, Linear,softmax", **MODEL)
    assert cfg.layers == "linear,linear,softmax"
    assert cfg.layer_kinds == ("linear", "linear", "softmax")
    assert ModelConfig(layers=2).layer_kinds == ("softmax", "softmax")
    assert ModelConfig(layers="3").layers == 3
    kinds = [type(b.attn).__name__ for b in Transformer(cfg).blocks]
    assert kinds == ["LinearAttention", "LinearAttention", "Attention"]
    for bad, needle in ((0, "layers=0 must be >= 1"), ("linear,mamba", "unknown layer kind 'mamba'"),
                        ("", "unknown layer kind ''"), (True, "must be a count or a pattern")):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(layers=bad, **MODEL)
    # a hybrid model cannot be sharded without a sequence-parallel softmax core
    with pytest.raises(ValueError, match="softmax_core"):
        enable_sequence_parallel(Transformer(cfg), ranks=[0, 1])
    with pytest.raises(ValueError, match="linear_method='tree'"):
        enable_sequence_parallel(Transformer(cfg), ranks=[0, 1], linear_method="tree")


@pytest.mark.timeout(120)
def test_linear_model_learns():
    """The synthetic task is learnable by a linear-attention model too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: extra threads only contend on a busy machine
    try:
        losses = single_process_losses(ModelConfig(layers="linear,linear"), steps=40, batch=8)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_layers_option_takes_a_count_or_a_pattern(tmp_path):
    from loom.launch.cli import build_parser
    from loom.launch.config import ConfigError, build_config, load_config, to_toml
    assert build_config(overrides={"layers": "3"}).model.layers == 3
    cfg = build_config(overrides={"layers": "linear,softmax"})
    assert cfg.model.layer_kinds == ("linear", "softmax")
    path = tmp_path / "job.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg
    path.write_text('[model]\nlayers = 4\n')
    assert load_config(str(path)).model.layers == 4
    with pytest.raises(ConfigError, match="unknown layer kind 'lstm'"):
        build_config(overrides={"layers": "linear,lstm"})
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--layers N|PATTERN" in help_text
