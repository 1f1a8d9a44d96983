"""Data parallelism equals one process on the same global batch (float64)."""
import pytest
import torch
import torch.distributed as dist

from loom.parallel.data_parallel import bucket_parameters
from loom.parallel import GradientSync, ModelConfig, SyntheticData, Transformer, next_token_loss

CFG = ModelConfig(vocab=32, dim=16, layers=2, heads=2)


def _model():
    torch.manual_seed(0)
    return Transformer(CFG).double()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _dp_grads(global_batch, bucket_bytes):
    rank, world = dist.get_rank(), dist.get_world_size()
    data = SyntheticData(CFG.vocab, 12, seed=3)
    local = global_batch // world
    inputs, targets = data.batch(0, range(rank * local, (rank + 1) * local))
    model = _model()
    next_token_loss(model(inputs), targets).backward()
    GradientSync(model.parameters(), bucket_bytes=bucket_bytes).sync()
    return _grads(model)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,bucket_bytes", [(2, 25 * 2**20), (4, 512)])
def test_dp_gradients_equal_single_process(distributed, world, bucket_bytes):
    data = SyntheticData(CFG.vocab, 12, seed=3)
    inputs, targets = data.batch(0, range(8))
    model = _model()
    next_token_loss(model(inputs), targets).backward()
    ref = _grads(model)
    for rank_grads in distributed(_dp_grads, world, 8, bucket_bytes):
        for name, g in ref.items():
            torch.testing.assert_close(rank_grads[name], g, rtol=0, atol=1e-12, msg=name)


def test_small_buckets_split_parameters():
    params = list(_model().parameters())
    buckets = bucket_parameters(params, 1024)
    assert [p for b in buckets for p in b] == params
    assert len(buckets) > 1
    for b in buckets:
        assert len(b) == 1 or sum(p.numel() * 8 for p in b) <= 1024


def _train_losses(overrides):
    from loom.launch.config import build_config
    from loom.launch.train import train
    return train(build_config(overrides=overrides))["losses"]


@pytest.mark.timeout(180)
def test_training_loop_dp2_equals_dp1_float64(distributed):
    common = dict(data="synthetic", steps=4, batch_size=4, seq_len=16, dim=16, heads=2, layers=1, vocab=32,
                  dtype="float64", progress=False)
    (one,) = distributed(_train_losses, 1, dict(common, dp=1))
    two = distributed(_train_losses, 2, dict(common, dp=2))
    assert two[0] == two[1]
    for a, b in zip(one, two[0]):
        assert abs(a - b) < 1e-10, (one, two[0])
