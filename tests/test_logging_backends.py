"""Logging backends (`loom.launch.logging_backends`) behind the RunRecorder:
TensorBoard event files read back with TensorBoard's EventAccumulator, a
Weights & Biases offline run read back from its .wandb file, the errors for
missing packages, and library logging shown by the CLI."""
import glob
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys

import pytest

from loom.launch import logging_backends as lb
from loom.launch.config import ConfigError, build_config, validate
from loom.launch.recorder import RunRecorder, configure_logging

TRAIN_ROW = {"step": 0, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "step_time_s": 0.5, "tokens_per_s": 64.0,
             "model_tflops_per_device": 1e-6, "mfu": 0.25, "peak_rss_bytes": 2**30}
EVAL_ROW = {"step": 1, "split": "eval", "eval_loss": 2.0, "eval_ppl": 7.389, "eval_tokens": 64,
            "eval_time_s": 0.1}


def test_scalars_names():
    assert lb.scalars(TRAIN_ROW) == {f"train/{k}": float(v) for k, v in TRAIN_ROW.items() if k != "step"}
    assert lb.scalars(EVAL_ROW) == {"eval/loss": 2.0, "eval/ppl": 7.389, "eval/tokens": 64.0, "eval/time_s": 0.1}
    assert lb.scalars({"step": 3, "note": "text", "flag": True, "x": 1}) == {"train/x": 1.0}


def tensorboard_scalars(log_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_metric(tmp_path):
    sink = lb.TensorBoardSink(str(tmp_path / "tensorboard"))
    recorder = RunRecorder(str(tmp_path), 2, progress=False, stream=io.StringIO(), sinks=[sink])
    recorder.step(TRAIN_ROW)
    recorder.step({**TRAIN_ROW, "step": 1, "loss": 2.25})
    recorder.step(EVAL_ROW)
    recorder.finish({"steps": 2, "first_loss": 2.5, "final_loss": 2.25, "tokens_per_s": 64.0,
                     "wall_time_s": 1.0})
    got = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert got["train/loss"] == [(0, 2.5), (1, 2.25)]
    assert got["eval/loss"] == [(1, 2.0)] and got["eval/ppl"] == [(1, pytest.approx(7.389, rel=1e-6))]
    for key in ("lr", "grad_norm", "step_time_s", "tokens_per_s", "model_tflops_per_device", "mfu",
                "peak_rss_bytes"):
        assert got[f"train/{key}"][0] == (0, pytest.approx(TRAIN_ROW[key], rel=1e-6)), key
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [TRAIN_ROW, {**TRAIN_ROW, "step": 1, "loss": 2.25}, EVAL_ROW]  # with the eval marker


def test_missing_packages_are_config_errors(monkeypatch):
    job = build_config(overrides={"wandb": "proj", "tensorboard": True}).job
    monkeypatch.setattr(lb, "_installed", lambda name: False)
    with pytest.raises(ConfigError) as info:
        lb.check_backends(job)
    assert "--tensorboard needs the tensorboard package: pip install 'loom-train[tensorboard]'" in str(info.value)
    assert "--wandb needs the wandb package: pip install 'loom-train[wandb]'" in str(info.value)
    # by default TensorBoard is on only when installed: no error, no sink
    default = build_config().job
    lb.check_backends(default)
    assert lb.wanted(default) == {"tensorboard": False, "wandb": False}
    monkeypatch.setattr(lb, "_installed", lambda name: True)
    assert lb.wanted(default) == {"tensorboard": True, "wandb": False}
    assert lb.wanted(build_config(overrides={"tensorboard": False}).job)["tensorboard"] is False


def test_cli_names_the_install_before_starting(monkeypatch, tmp_path, capsys):
    from loom.launch import cli
    monkeypatch.setattr(lb, "_installed", lambda name: name != "wandb")
    code = cli.main(["train", "--wandb", "proj", "--runs-dir", str(tmp_path), "--name", "x"])
    assert code == 2
    assert "--wandb needs the wandb package: pip install 'loom-train[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing started
    with pytest.raises(ConfigError, match="--wandb-mode='cloud' must be auto, online, offline or disabled"):
        validate(build_config(overrides={"wandb_mode": "cloud"}))


class Broken:
    def __init__(self):
        self.closed = False

    def log(self, step, metrics):
        raise OSError("disk full")

    def close(self):
        self.closed = True


def test_a_failing_backend_is_dropped_not_fatal(tmp_path, caplog):
    broken = Broken()
    recorder = RunRecorder(str(tmp_path), 2, progress=False, stream=io.StringIO(), sinks=[broken])
    with caplog.at_level(logging.WARNING, logger="loom.launch"):
        recorder.step(TRAIN_ROW)
        recorder.step({**TRAIN_ROW, "step": 1})
    assert recorder.sinks == [] and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "logging backend Broken failed and is dropped: OSError: disk full"]


def test_progress_line_and_eval_line(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    recorder = RunRecorder(str(tmp_path), 1, stream=out)
    recorder.bar.stream = err
    recorder.step(TRAIN_ROW)
    recorder.step(EVAL_ROW)
    assert "loss 2.5000 lr 1.00e-03 gnorm 0.75 tok/s 64.0 mfu 25.0% mem 1.00G" in err.getvalue()
    assert out.getvalue() == "eval after step 2: loss 2 ppl 7.389\n"


def test_configure_logging_shows_library_records(capsys):
    configure_logging()
    configure_logging()  # idempotent: one handler
    logging.getLogger("loom.launch").warning("from the library")
    assert capsys.readouterr().err.count("from the library") == 1


# ------------------------------------------------ end to end (torchrun contract)

def wandb_records(path: str):
    """The records of a .wandb file (LevelDB log format: 32 KiB blocks of
    [crc32c:4][length:2][type:1][payload]; types 1 full, 2 first, 3 middle,
    4 last) as wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_worker_logs_train_and_eval_metrics_to_tensorboard_and_wandb_offline(tmp_path):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    flags = ["--dp", "1",
             "--data", "synthetic", "--vocab", "32", "--dim", "16", "--layers", "2", "--heads", "2", "--seq-len", "8",
             "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--lr-schedule", "cosine",
             "--min-lr", "1e-4", "--eval-every", "2", "--eval-batches", "2", "--no-progress", "--no-monitor",
             "--peak-tflops", "1", "--runs-dir", str(tmp_path), "--name", "run", "--wandb", "loom-test"]
    proc = subprocess.run([sys.executable, "-m", "loom.launch.worker", *flags], env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in train] == [0, 1, 2, 3] and [r["step"] for r in evals] == [1, 3]
    tb = tensorboard_scalars(str(run / "tensorboard"))
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert [(s, v) for s, v in tb["eval/loss"]] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6))
                                                    for r in evals]
    assert {"train/grad_norm", "train/mfu", "train/peak_rss_bytes", "eval/ppl"} <= set(tb)
    # the W&B offline run (WANDB_MODE=offline with the default --wandb-mode auto): project, config, history
    path, = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, project, config = {}, None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            project = record.run.project
            config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.run.config.update}
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    assert project == "loom-test" and config["train"]["lr_schedule"] == "cosine"
    assert sorted(history) == [0, 1, 2, 3]
    for r in train:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert history[r["step"]]["train/grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-12)
    for r in evals:
        assert history[r["step"]]["eval/loss"] == pytest.approx(r["eval_loss"], rel=1e-12)
