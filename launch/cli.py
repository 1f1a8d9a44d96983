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


def _faults_report(args) -> int:
    from loom.faults.report import save_wait_png, timeline
    try:
        print(timeline(args.run_dir))
        if args.png:
            print(f"wrote {save_wait_png(args.run_dir, args.png)}")
    except ValueError as exc:
        print(f"loom faults report: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_faults_command(sub) -> None:
    faults = sub.add_parser("faults", help="inspect what the fault monitor saw in a run",
                            description="Inspect the faults a run's monitor detected.")
    fsub = faults.add_subparsers(dest="faults_command", metavar="COMMAND", required=True)
    report = fsub.add_parser("report", help="print a run's fault timeline and per-rank waits",
                             description="Print the faults of RUN_DIR (runs/<name>) in time order and "
                                         "each rank's wait in communication per step; --png also "
                                         "draws the waits with the faults marked.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--png", metavar="FILE", help="save a chart of per-rank wait per step")
    report.set_defaults(func=_faults_report)


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
    _add_faults_command(sub)
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
