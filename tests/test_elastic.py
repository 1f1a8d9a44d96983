"""Elastic layouts (`loom.launch.elastic`) and the recovery flags: pure
functions of the job config, no Ray."""
import pytest

from loom.launch.cluster import LaunchError
from loom.launch.config import ConfigError, build_config, validate
from loom.launch.elastic import Layout, apply_layout, choose_layout, configured_layout, grow_layout

BASE = {"data": "synthetic", "dim": 16, "layers": 1, "seq_len": 16, "dtype": "float64", "steps": 20,
        "eval_every": 0}


def _cfg(**kw):
    return validate(build_config(overrides={**BASE, **kw}))


def test_the_configured_layout_when_it_fits_and_dp_shrinks_with_grad_accum_growing():
    cfg = _cfg(dp=4, batch_size=4)
    assert choose_layout(cfg, 4, 2) == configured_layout(cfg) == Layout(4, 1, 1, 1)
    assert choose_layout(cfg, 9, 2) == Layout(4, 1, 1, 1)  # never above the configured world
    # 3 healthy: dp=3 cannot divide the batch of 4; dp=2 with twice the micro-batches
    assert choose_layout(cfg, 3, 2) == Layout(2, 1, 1, 2)
    assert choose_layout(cfg, 3, 1, max_workers=1) == Layout(1, 1, 1, 4)
    with pytest.raises(LaunchError, match=r"only 1 healthy worker of the configured 4 .* no valid layout with at "
                                          r"least --min-workers=2"):
        choose_layout(cfg, 1, 2)
    with pytest.raises(LaunchError, match=r"no valid layout at dp=3"):
        choose_layout(cfg, 3, 3)


def test_a_batch_that_does_not_split_evenly_keeps_the_micro_batch_no_larger():
    cfg = _cfg(dp=4, batch_size=12, grad_accum=1)  # 3 sequences per micro-batch
    assert choose_layout(cfg, 3, 1) == Layout(3, 1, 1, 2)  # 4 per rank: 2 micro-batches of 2
    assert choose_layout(cfg, 2, 1) == Layout(2, 1, 1, 2)  # 6 per rank: 2 of 3
    cfg = _cfg(dp=4, batch_size=8, grad_accum=2)  # micro-batches of 1
    assert choose_layout(cfg, 2, 1) == Layout(2, 1, 1, 4)


def test_sequence_and_expert_parallel_degrees_are_kept():
    cfg = _cfg(dp=2, sp=2, batch_size=4)
    assert choose_layout(cfg, 3, 2) == Layout(1, 2, 1, 2)  # world 2: one dp group of sp=2
    with pytest.raises(LaunchError, match="at least --min-workers=3"):
        choose_layout(cfg, 3, 3)
    cfg = _cfg(dp=4, ep=4, moe="standard", num_experts=4, batch_size=8)
    with pytest.raises(LaunchError, match=r"no valid layout at dp=3, dp=2, dp=1"):  # ep=4 divides no smaller world
        choose_layout(cfg, 3, 1)
    cfg = _cfg(dp=4, ep=2, moe="standard", num_experts=4, batch_size=8)
    assert choose_layout(cfg, 3, 1) == Layout(2, 1, 2, 2)


def test_hdp_keeps_its_data_and_fits_the_longest_sequence():
    cfg = _cfg(dp=4, hdp=True, batch_size=8)
    layout = choose_layout(cfg, 3, 1)
    # 4 ranks held 4*16 tokens per micro-batch; 2 ranks take two groups, each 32 tokens per rank
    assert layout == Layout(2, 1, 1, 2, hdp_capacity=32, varlen_max=64)
    shrunk = apply_layout(cfg, layout)
    assert (shrunk.parallel.dp, shrunk.train.grad_accum, shrunk.parallel.hdp_capacity, shrunk.train.varlen_max) \
        == (2, 2, 32, 64)
    validate(shrunk, world_size=2)


def test_apply_layout_drops_injections_of_ranks_outside_the_new_world():
    cfg = _cfg(dp=4, batch_size=4, inject="kill:rank=3,step=12;straggler:rank=1,delay=0.1")
    small = apply_layout(cfg, Layout(2, 1, 1, 2))
    assert small.faults.inject == "straggler:rank=1,delay=0.1,from=0"
    assert cfg.faults.inject.startswith("kill:rank=3")  # the original is left alone
    assert small.world_size == 2 and small.train.batch_size == 4


def test_grow_back_only_to_a_larger_valid_layout_within_max_workers():
    cfg = _cfg(dp=4, batch_size=4)
    small = Layout(2, 1, 1, 2)
    assert grow_layout(cfg, small, 4, 2) == Layout(4, 1, 1, 1)
    assert grow_layout(cfg, small, 3, 2) is None  # dp=3 does not divide the batch
    assert grow_layout(cfg, small, 4, 1, max_workers=2) is None
    assert grow_layout(cfg, Layout(1, 1, 1, 4), 3, 1, max_workers=3) == small


@pytest.mark.parametrize("flags, needle", [
    ({"spare_workers": -1}, "--spare-workers=-1 must be >= 0"),
    ({"min_workers": 5, "ckpt_every": 5, "ckpt_url": "x"}, "--min-workers=5 exceeds the configured world dp*sp=4"),
    ({"max_workers": 3, "ckpt_every": 5, "ckpt_url": "x"}, "--max-workers=3 bounds how far a shrunk job grows "
                                                           "back: it needs --min-workers"),
    ({"min_workers": 2, "max_workers": 6, "ckpt_every": 5, "ckpt_url": "x"},
     "--max-workers=6 must be between --min-workers=2 and the configured world dp*sp=4"),
    ({"min_workers": 3, "max_workers": 2, "ckpt_every": 5, "ckpt_url": "x"}, "--max-workers=2 must be between"),
    ({"restart_on": "hang"}, "--restart-on='hang': unknown kind(s) ['hang']; expected straggler"),
    ({"replace_wait": -1.0}, "--replace-wait=-1.0 must be >= 0"),
    ({"spare_workers": 1}, "--spare-workers act when the job restarts: they need --max-restarts > 0"),
    ({"min_workers": 2, "restart_on": "straggler", "max_restarts": 0},
     "--min-workers and --restart-on act when the job restarts"),
])
def test_the_recovery_flags_are_validated(flags, needle):
    with pytest.raises(ConfigError) as err:
        validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, **flags}))
    assert needle in str(err.value)


def test_valid_recovery_flags_pass():
    cfg = validate(build_config(overrides={**BASE, "dp": 4, "batch_size": 4, "ckpt_every": 5, "ckpt_url": "x",
                                           "spare_workers": 1, "min_workers": 2, "max_workers": 4,
                                           "restart_on": "straggler"}))
    assert (cfg.recovery.spare_workers, cfg.recovery.min_workers, cfg.recovery.max_workers) == (1, 2, 4)
