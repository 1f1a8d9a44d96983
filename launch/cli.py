"""The `loom` command."""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, add_config_arguments, config_from_args, to_toml, validate


def _train(args) -> int:
    from .ray_driver import LaunchError, launch_ray
    from .report import RunRecorder, make_run_dir
    cfg = validate(config_from_args(args))
    run_dir = make_run_dir(cfg.job.runs_dir, cfg.job.name)
    with open(os.path.join(run_dir, "config.toml"), "w") as fh:
        fh.write(to_toml(cfg))
    print(f"loom train: {cfg.world_size} workers (dp={cfg.parallel.dp} sp={cfg.parallel.sp} "
          f"ep={cfg.parallel.ep}), {cfg.train.steps} steps -> {run_dir}", flush=True)
    recorder = RunRecorder(run_dir, cfg.train.steps, cfg.job.progress)
    try:
        summary = launch_ray(cfg, recorder)
    except LaunchError as exc:
        print(f"loom train: {exc}", file=sys.stderr)
        return 1
    recorder.finish({k: v for k, v in summary.items() if k != "losses"})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom", description="loom: distributed training infrastructure for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train", help="run a training job on Ray workers (local Ray by default)",
        description="Run a training job: one Ray actor per rank (a local Ray instance unless "
                    "--address names a cluster). Options come from --config FILE and flags; "
                    "flags win. Writes runs/<name>/config.toml and metrics.jsonl.")
    add_config_arguments(train)
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"loom {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loom {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
