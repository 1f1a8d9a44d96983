import dataclasses
import subprocess
import sys
import time

import pytest

from loom.launch.cli import build_parser
from loom.launch.config import (OPTIONS, ConfigError, build_config, config_from_args, load_config, to_toml,
                                validate)


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
    (None, {"lr": "nan"}, r"\[train\] lr=nan must be a number"),  # NaN slips past `x <= 0` checks
    ({"job": {"peak_tflops": float("nan")}}, None, r"\[job\] peak_tflops=nan must be a number"),
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
    ({"lr": "inf"}, "--lr=inf must be > 0 and finite"),
    ({"weight_decay": -1}, "--weight-decay=-1.0 must be >= 0"),
    ({"grad_clip": -1}, "--grad-clip=-1.0 must be >= 0"),
    ({"peak_tflops": "inf"}, "--peak-tflops=inf must be >= 0 and finite"),
    ({"model_args": ["depth=3"]}, "--model-args depth=3 is for the factory of --model"),
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


# ------------------------------------------------- settings owned by components

def _owned():
    """(owner dataclass, its section, field name -> option key) of every embedded owner."""
    from loom.faults import DetectConfig
    from loom.parallel import LLEPConfig
    detect = {f.name: f.name for f in dataclasses.fields(DetectConfig)}
    detect["warmup_steps"] = "fault_warmup_steps"
    llep = {f.name: "llep_" + f.name for f in dataclasses.fields(LLEPConfig)}
    return [(DetectConfig, "faults", detect, lambda cfg: cfg.faults.detect),
            (LLEPConfig, "model", llep, lambda cfg: cfg.model.llep)]


def _train_actions():
    parser = build_parser()._subparsers._group_actions[0].choices["train"]
    return {opt: action for action in parser._actions for opt in action.option_strings}


def test_every_owned_setting_is_a_flag_with_the_owners_default_and_help():
    actions = _train_actions()
    for owner, section, keys, _ in _owned():
        for f in dataclasses.fields(owner):
            flag = "--" + keys[f.name].replace("_", "-")
            help_text = f.metadata.get("help")
            assert help_text, f"{owner.__name__}.{f.name} has no help text"
            assert flag in actions, f"{owner.__name__}.{f.name} has no flag {flag}"
            assert actions[flag].help.startswith(help_text)
            assert f"default: {f.default}" in actions[flag].help or "default:" in help_text
            assert OPTIONS[keys[f.name]].section == section and OPTIONS[keys[f.name]].default == f.default
    # the flags that existed before they were generated keep their names
    for flag in ("--fault-warmup-steps", "--straggler-k", "--straggler-n", "--straggler-rel",
                 "--straggler-min-s", "--hang-floor-s", "--hang-factor", "--slow-link-factor",
                 "--lost-after-s", "--llep-lam", "--llep-min-chunk"):
        assert flag in actions


def _changed(f):
    """A valid value other than the default, of the field's type."""
    if f.name == "max_borrowed_experts":
        return 3
    if "int" in str(f.type):
        return f.default + 1 if not f.name.endswith("_k") else f.default - 1
    return f.default * 2 + 0.5


def test_owned_settings_come_from_toml_and_from_flags(tmp_path):
    from loom.launch.cli import build_parser as parser
    for owner, section, keys, get in _owned():
        want = {f.name: _changed(f) for f in dataclasses.fields(owner)}
        path = tmp_path / f"{section}.toml"
        path.write_text(f"[{section}]\n" + "".join(f"{keys[n]} = {v!r}\n" for n, v in want.items()))
        from_file = get(load_config(str(path)))
        argv = ["train"] + [a for n, v in want.items() for a in ("--" + keys[n].replace("_", "-"), str(v))]
        from_flags = get(config_from_args(parser().parse_args(argv)))
        assert dataclasses.asdict(from_file) == dataclasses.asdict(from_flags) == want
        assert type(from_flags) is owner


@pytest.mark.parametrize("overrides,needle", [
    ({"hang_warmup_s": -1}, r"^--hang-warmup-s=-1.0 must be >= 0$"),
    ({"slow_link_k": 6}, r"^need 1 <= --slow-link-k=6 <= --slow-link-n=5$"),
    ({"fault_warmup_steps": -2}, r"^--fault-warmup-steps=-2 must be >= 0$"),
    ({"slow_link_factor": 1}, r"^--slow-link-factor=1.0 must be > 1$"),
    ({"llep_lam": 0.5}, r"^--llep-lam=0.5 must be >= 1$"),
    ({"llep_alpha": 0}, r"^--llep-alpha=0.0 must be > 0$"),
    ({"llep_max_borrowed_experts": -1}, r"^--llep-max-borrowed-experts=-1 must be an integer >= 0$"),
])
def test_a_bad_owned_value_is_named_by_its_flag(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(overrides=overrides)


def test_a_bad_owned_value_from_the_command_line(capsys, tmp_path):
    from loom.launch.cli import main
    assert main(["train", "--slow-link-min-s", "-0.5", "--runs-dir", str(tmp_path)]) == 2
    assert "error: --slow-link-min-s=-0.5 must be >= 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_owners_used_directly_name_their_fields():
    from loom.faults import DetectConfig
    from loom.parallel import LLEPConfig
    with pytest.raises(ValueError, match=r"^DetectConfig: hang_warmup_s=-1 must be >= 0$"):
        DetectConfig(hang_warmup_s=-1)
    with pytest.raises(ValueError, match=r"^LLEPConfig: alpha=0 must be > 0$"):
        LLEPConfig(alpha=0)


def test_a_bad_owned_value_in_a_job_file_is_named_by_its_flag(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[model]\nllep_min_chunk = 0\n")
    with pytest.raises(ConfigError, match=r"^--llep-min-chunk=0 must be an integer >= 1$"):
        load_config(str(path))


def test_a_run_directory_that_cannot_be_made_is_a_clear_error(tmp_path, capsys):
    from loom.launch.cli import main
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", "--steps", "1", "--no-progress", "--runs-dir", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the run directory" in err and "--runs-dir" in err and "Traceback" not in err


def test_model_args_that_is_not_a_table_is_named():
    with pytest.raises(ConfigError, match=r"\[train\] model_args=3 must be a table"):
        build_config({"train": {"model_args": 3}})


def test_a_job_file_may_list_data_files_but_no_other_string_option_takes_a_list():
    from loom.launch.config import ConfigError, build_config
    cfg = build_config({"data": {"data": ["a.bin", "shards/*.npy"], "val_data": ["v.bin"]}})
    assert cfg.data.paths == ["a.bin", "shards/*.npy"] and cfg.data.val_paths == ["v.bin"]
    with pytest.raises(ConfigError, match=r"\[job\] name=\['x'\] must be a string"):
        build_config({"job": {"name": ["x"]}})
