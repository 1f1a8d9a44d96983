"""The `loom` command."""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, add_config_arguments, config_from_args, to_toml, validate


def _train(args) -> int:
    from .ray_driver import LaunchError, launch_ray
    from .recorder import open_run
    cfg = validate(config_from_args(args))
    # a missing tensorboard/wandb package: ConfigError before anything starts
    recorder = open_run(cfg, cfg.train.steps, cfg.job.progress, {"config.toml": to_toml(cfg)})
    print(f"loom train: {cfg.world_size} workers (dp={cfg.parallel.dp} sp={cfg.parallel.sp} "
          f"ep={cfg.parallel.ep}), {cfg.train.steps} steps -> {recorder.run_dir}", flush=True)
    try:
        summary = launch_ray(cfg, recorder)[0]  # rank 0's summary
    except LaunchError as exc:
        recorder.close_sinks()
        if exc.remote_traceback:  # the failing rank's own traceback
            print(exc.remote_traceback, file=sys.stderr)
        print(f"loom train: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        recorder.close_sinks()
        raise
    recorder.finish({k: v for k, v in summary.items() if k != "losses"})
    return 0


def _ckpt(args) -> int:
    """`loom ckpt ...`: exit 0 when all is well, 1 with one line on stderr
    for any error (a damaged or hostile store included), never a traceback."""
    from loom.checkpoint import cli as ck
    try:
        if args.ckpt_command == "ls":
            ok, text = ck.ls(args.url, args.local)
            print(text)
            return 0 if ok else 1
        elif args.ckpt_command == "inspect":
            print(ck.inspect(args.url, args.step))
        elif args.ckpt_command == "verify":
            ok, text = ck.verify_report(args.url, args.step, args.all)
            print(text)
            return 0 if ok else 1
        elif args.ckpt_command == "gc":
            print(ck.gc_report(args.url, args.keep_last, args.keep_every, args.include_newer, args.dry_run,
                               args.verify))
        elif args.ckpt_command == "from-deepspeed":
            from loom.checkpoint.deepspeed_convert import from_deepspeed
            location = from_deepspeed(args.ds_dir, args.url, tag=args.tag, step=args.step,
                                      loom_url=args.loom_url)
            print(f"wrote {location}")
        elif args.ckpt_command == "export-hf":
            from .hf_model import export_hf
            print(export_hf(args.url, args.out, args.step))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        return _error(f"loom ckpt {args.ckpt_command}", exc)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, not a traceback
        return _error(f"loom ckpt {args.ckpt_command}", exc, kind=True)
    return 0


def _error(command: str, exc: BaseException, kind: bool = False) -> int:
    """One line on stderr for a failed command (``kind``: with the
    exception's type, for errors that are not the user's input); exit status 1."""
    from loom.checkpoint.cli import one_line
    print(f"{command}: error: {type(exc).__name__ + ': ' if kind else ''}{one_line(exc)}", file=sys.stderr)
    return 1


def _add_ckpt_parser(sub) -> None:
    ckpt = sub.add_parser("ckpt", help="list, inspect, verify, clean and convert checkpoints",
                          description="Checkpoints under a URL (a path, file://, memory://, s3://, ...).")
    ck = ckpt.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND", required=True)
    p = ck.add_parser("ls", help="every step: committed or not, world size, size, time")
    p.add_argument("url")
    p.add_argument("--local", metavar="DIR", default=None,
                   help="also this node's --ckpt-local directory: which levels (local, remote) hold each step")
    p = ck.add_parser("inspect", help="the arrays of a step: shapes, dtypes, placements, bytes")
    p.add_argument("url")
    p.add_argument("--step", type=int, default=None, help="default: the latest committed step")
    p = ck.add_parser("verify", help="read every chunk and check its checksum (exit 1 on damage)")
    p.add_argument("url")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None,
                       help="default: the latest committed step (and any newer step with a damaged marker)")
    which.add_argument("--all", action="store_true", help="verify every step with a marker")
    p = ck.add_parser("gc", help="delete uncommitted steps and what retention drops",
                      description="Delete torn steps and the committed steps retention drops. Claims the "
                                  "store: fails naming the owner while another job writes it. Damaged steps "
                                  "do not count toward --keep-last and are left in place (reported).")
    p.add_argument("url")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep the newest commits back to the N-th sound one")
    p.add_argument("--keep-every", type=int, default=None,
                   help="with --keep-last, also keep steps that are multiples of K")
    p.add_argument("--include-newer", action="store_true",
                   help="also delete uncommitted steps newer than the newest commit (saves in progress!)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.add_argument("--verify", action="store_true",
                   help="count a step as sound only if every chunk matches its checksum (reads every byte; "
                        "default: its manifest and the sizes of its chunk objects)")
    p = ck.add_parser("from-deepspeed", help="convert a DeepSpeed ZeRO-1/2 checkpoint",
                      description="Convert a DeepSpeed ZeRO stage 1/2 checkpoint (fp32 master weights and "
                                  "every per-parameter optimizer state: Adam exp_avg / exp_avg_sq, SGD "
                                  "momentum_buffer, step, ...) into a loom checkpoint. A directory saved "
                                  "through loom's DeepSpeed engine is read through its pointers.")
    p.add_argument("ds_dir", help="the DeepSpeed save_dir (with 'latest') or one tag directory")
    p.add_argument("url")
    p.add_argument("--tag", default=None, help="tag under DS_DIR (default: DS_DIR/latest)")
    p.add_argument("--step", type=int, default=None, help="loom step (default: DeepSpeed's global step)")
    p.add_argument("--loom-url", default=None,
                   help="for a directory saved through loom's DeepSpeed engine: its loom store "
                        "(default: DS_DIR/loom)")
    p = ck.add_parser("export-hf", help="write a transformers save_pretrained directory from a --hf-config job",
                      description="Write config.json + model.safetensors (transformers' save_pretrained layout) "
                                  "from a checkpoint of a `loom train --hf-config` job, saved at any world size "
                                  "and layout; `AutoModelForCausalLM.from_pretrained(OUT)` loads it.")
    p.add_argument("url")
    p.add_argument("out", help="a new (or empty) directory")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the newest committed)")
    ckpt.set_defaults(func=_ckpt)


def _data(args) -> int:
    """`loom data prepare|inspect`: exit 0, or 1 with one line on stderr."""
    from loom.data.prepare import format_inspect, inspect, output_base, prepare
    try:
        if args.data_command == "prepare":
            bar = None
            if sys.stderr.isatty():
                from tqdm import tqdm
                bar = tqdm(total=None, unit="file", desc="loom data prepare", file=sys.stderr)

                def progress(done, total, tokens):
                    bar.total = total
                    bar.set_postfix_str(f"{tokens:,} tokens")
                    bar.update(done - bar.n)
            try:
                meta = prepare(args.inputs, args.output, tokenizer=args.tokenizer, text_field=args.text_field,
                               workers=args.workers, progress=progress if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            base = output_base(args.output)
            print(f"wrote {base}.bin ({meta['dtype']}), {base}.docs.npy, {base}.json: {meta['tokens']:,} tokens "
                  f"in {meta['documents']:,} documents from {meta['bytes']:,} bytes of text "
                  f"(tokenizer {meta['tokenizer']['name']}, vocab {meta['vocab_size']:,})")
        else:
            from loom.data.config import BUILTIN
            paths = args.paths
            if paths == [BUILTIN] and not os.path.exists(BUILTIN):  # loom train's default corpus
                from loom.data.builtin import pydoc_corpus
                paths = pydoc_corpus()
            print(format_inspect(inspect(paths, tokenizer=args.tokenizer, text_field=args.text_field,
                                         eod_token=args.eod_token, token_dtype=args.token_dtype)))
    except (OSError, ValueError) as exc:  # a missing or unreadable file, bad content
        return _error(f"loom data {args.data_command}", exc)
    except Exception as exc:  # noqa: BLE001 - anything else (a tokenizer's own errors): one line, no traceback
        return _error(f"loom data {args.data_command}", exc, kind=True)
    return 0


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare (tokenise) and inspect training data",
                          description="Training data: token files (.bin/.npy) and text (.txt/.jsonl/.parquet), "
                                      "local paths, globs or fsspec URLs.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser("prepare", help="tokenise text once into OUTPUT.bin + OUTPUT.docs.npy + OUTPUT.json",
                        description="Tokenise text files (in parallel over files) into a memory-mappable token "
                                    "file, its document index and metadata; training then reads OUTPUT.bin.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl/.parquet files or globs")
    p.add_argument("output", metavar="OUTPUT", help="output stem (OUTPUT.bin, OUTPUT.docs.npy, OUTPUT.json)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a Hugging Face tokenizer.json (local); default: UTF-8 bytes")
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSON field / parquet column (text)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: min(cpus, files))")
    p = dsub.add_parser("inspect", help="documents, tokens, vocabulary and a histogram of document lengths")
    p.add_argument("paths", nargs="+", metavar="PATH", help="token files or text, paths, globs or URLs")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="for text: a tokenizer.json (default bytes)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSON field / parquet column (text)")
    p.add_argument("--eod-token", type=int, default=None, metavar="ID", help="this id ends every document")
    p.add_argument("--token-dtype", default=None, metavar="DTYPE",
                   help=".bin files without metadata: uint16 (default), uint32, ...")
    data.set_defaults(func=_data)


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
        description="Run a training job: one Ray actor per rank (a local Ray instance of the job's own "
                    "unless --address names a cluster; RAY_ADDRESS is used only with --address auto). "
                    "Options come from --config FILE and flags; flags win. Writes runs/<name>/config.toml "
                    "and metrics.jsonl.")
    add_config_arguments(train)
    train.set_defaults(func=_train)
    _add_ckpt_parser(sub)
    _add_data_parser(sub)
    _add_faults_command(sub)
    return parser


def main(argv=None) -> int:
    from .recorder import configure_logging
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()  # library code logs through logging.getLogger("loom..."); show it here
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
