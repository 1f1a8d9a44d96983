import subprocess
import sys
import time

import pytest

from loom.launch.cli import build_parser
from loom.launch.config import ConfigError, build_config, load_config, to_toml, validate


def test_toml_file_and_flag_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[train]\nsteps = 200\nlr = 0.01\n[parallel]\ndp = 4\n[model]\ndim = 32\n")
    cfg = load_config(str(path), {"steps": 7, "dp": "2"})
    assert (cfg.train.steps, cfg.train.lr, cfg.parallel.dp, cfg.model.dim) == (7, 0.01, 2, 32)


def test_round_trip_through_toml(tmp_path):
    cfg = build_config(overrides={"steps": 3, "kv_heads": 2, "name": 'a "quoted" name', "progress": False})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("data,overrides,needle", [
    ({"train": {"stepz": 3}}, None, "unknown option 'train.stepz'; did you mean 'train.steps'"),
    ({"trian": {}}, None, "unknown option 'trian'; did you mean 'train'"),
    (None, {"step": 3}, "did you mean 'steps'"),
    (None, {"steps": "many"}, r"\[train\] steps='many' must be int"),
    (None, {"steps": 2.5}, "must be int"),
    (None, {"progress": "maybe"}, "must be true or false"),
    (None, {"dim": 10, "heads": 4}, "dim=10 must divide by heads=4"),
])
def test_bad_options_are_named(data, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(data, overrides)


@pytest.mark.parametrize("overrides,needle", [
    ({"dp": 3, "sp": 1}, None),
    ({"dp": 2, "ep": 3}, "--ep=3 must divide the world size dp\\*sp=2"),
    ({"dp": 2, "batch_size": 5}, "--batch-size=5 must divide by --dp=2"),
    ({"dp": 1, "sp": 2, "seq_len": 6}, "--seq-len=6 must divide by 2\\*sp=4"),
    ({"lr": 0}, "--lr=0.0 must be > 0"),
    ({"dtype": "float8"}, "--dtype='float8'"),
    ({"device": "tpu"}, "--device='tpu'"),
    ({"steps": 0}, "--steps=0 must be >= 1"),
])
def test_validation(overrides, needle):
    cfg = build_config(overrides={"batch_size": 12, **overrides})
    if needle is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


def test_world_size_mismatch_under_torchrun():
    with pytest.raises(ConfigError, match=r"dp\*sp=2 != world_size=4"):
        validate(build_config(), world_size=4)


def test_every_option_is_a_documented_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--steps", "--dp", "--sp", "--ep", "--lr", "--address", "--config", "--kv-heads",
                 "--no-progress", "--batch-size", "--seed", "--dtype"):
        assert flag in help_text


def test_bad_config_fails_fast_without_starting_workers(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loom", "train", "--dp", "2", "--batch-size", "3",
                           "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--batch-size=3 must divide by --dp=2" in proc.stderr
    assert list(tmp_path.iterdir()) == []          # nothing started, no run directory
    assert time.monotonic() - t0 < 30


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "loom", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout
