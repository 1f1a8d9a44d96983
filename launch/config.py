"""Job configuration: dataclasses, loadable from TOML, every field a CLI flag.

A TOML file has one table per section (``[model]``, ``[parallel]``, ...).  Field
names are unique across sections, so each is also a flat flag
(``--steps 200 --dp 2``).  `validate` rejects bad combinations before any
worker starts, saying what to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields

from loom.parallel.model import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A job configuration that cannot run; the message says what to change."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class JobSection:
    name: str = _f("", "run name; runs/<name>/ holds config.toml and metrics.jsonl (default: a timestamp)")
    runs_dir: str = _f("runs", "directory that holds run directories")
    address: str = _f("", "Ray cluster address to join (default: start a local Ray instance)")
    device: str = _f("auto", "cpu, cuda, or auto (cuda when every worker can get a GPU)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker actor")
    threads_per_worker: int = _f(1, "torch intra-op threads per worker")
    pg_timeout: float = _f(300.0, "process-group timeout in seconds")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class ParallelSection:
    dp: int = _f(2, "data-parallel degree")
    sp: int = _f(1, "sequence-parallel degree (world = dp * sp)")
    ep: int = _f(1, "expert-parallel degree (divides the world size)")
    bucket_mb: float = _f(25.0, "gradient all-reduce bucket size in MiB")
    sp_attention: str = _f("ring", "sequence-parallel attention when sp > 1: ring or ulysses")
    sp_layout: str = _f("auto", "sequence shards when sp > 1: zigzag (balanced causal ring), contiguous, "
                                "or auto (zigzag for ring, contiguous for ulysses)")
    hdp: bool = _f(False, "hybrid data parallelism (ByteScale): variable-length long-tail batches, each "
                          "sequence on the ranks it needs (ring attention over per-batch rings), short ones "
                          "packed whole; needs --sp 1 (world = --dp)")
    hdp_capacity: int = _f(0, "with --hdp: tokens per rank per microbatch (0: --seq-len)")


@dataclass
class TrainSection:
    steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(16, "global batch size in sequences (divides by dp)")
    seq_len: int = _f(64, "tokens per sequence")
    lr: float = _f(3e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear learning-rate warm-up steps")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    seed: int = _f(0, "seed of the model initialisation and the synthetic data")
    dtype: str = _f("float32", "parameter dtype: float32, float64 or bfloat16")
    log_every: int = _f(1, "report metrics every N steps")
    varlen_median: int = _f(0, "with --hdp: median length of the lognormal long-tail sequence lengths "
                               "(0: seq_len // 4); --batch-size sequences per global batch")
    varlen_sigma: float = _f(1.0, "with --hdp: lognormal sigma of the sequence lengths (larger: longer tail)")
    varlen_max: int = _f(0, "with --hdp: longest sequence (0: world * capacity, what one microbatch holds)")
    grad_accum: int = _f(1, "gradient accumulation: micro-batches per optimizer step, each 1/N of every "
                            "rank's share of --batch-size (the global batch is unchanged), gradients "
                            "synchronised once per step; MoE: the load-balancing loss is taken per "
                            "micro-batch and averaged (not the whole batch's)")
    mixed_precision: str = _f("none", "none, bf16 or fp16: compute in that dtype (torch.autocast) with float32 "
                                      "parameters, gradient reduction and optimizer state; fp16 adds a "
                                      "gradient scaler whose skip-on-inf/NaN is agreed by every rank; needs "
                                      "--dtype float32")
    activation_checkpointing: bool = _f(False, "recompute each transformer block's activations during the "
                                               "backward instead of keeping them (less memory, about one "
                                               "more forward per step)")
    compile: bool = _f(False, "compile the model with torch.compile (inductor) in place; works with dp, sp "
                              "(ring, ulysses, linear), ep and hdp, breaking graphs at loom's collectives "
                              "(LLEP and hdp recompile often); on CPU it needs a C++ compiler (g++ or $CXX)")


@dataclass
class CkptSection:
    ckpt_every: int = _f(0, "save a checkpoint every N steps (0: never)")
    ckpt_url: str = _f("", "where checkpoints go: a path or fsspec URL (file://, memory://, s3://, ...)")
    resume: bool = _f(False, "continue from the latest committed checkpoint at --ckpt-url "
                             "(from step 0 when there is none)")
    keep_last: int = _f(0, "keep only the newest N committed checkpoints (0: keep all)")
    keep_every: int = _f(0, "with --keep-last, also keep checkpoints whose step is a multiple of K")
    ckpt_mode: str = _f("async", "async: copy to host memory while training runs and write in the "
                                 "background (the optimizer waits only for unfinished copies); "
                                 "sync: training waits until the checkpoint is on storage")
    ckpt_durable: bool = _f(False, "fsync every checkpoint file and directory before its commit marker, "
                                   "so the newest checkpoint survives a machine crash or power loss, "
                                   "not only a killed process (slower saves)")
    ckpt_takeover: bool = _f(False, "DANGEROUS: claim --ckpt-url even while another job owns it (one job "
                                    "writes a store at a time); that job keeps writing until its next "
                                    "save fails. Not needed after a crash: a dead owner's claim expires "
                                    "by itself")


@dataclass
class FaultsSection:
    monitor: bool = _f(True, "watch the job's communication for stragglers, hangs, slow links, "
                             "mismatched collectives and lost ranks")
    inject: str = _f("", "inject faults, e.g. 'straggler:rank=1,delay=0.2,from=20'; kinds: straggler, "
                         "hang, kill, slow_link, mismatch; ';' joins several (see loom.faults.inject)")
    stop_on: str = _f("hang,lost_rank", "fault kinds that stop every worker (comma-separated; '' = none)")
    monitor_interval: float = _f(0.1, "seconds between a rank's reports to the fault monitor")
    fault_warmup_steps: int = _f(5, "first steps the straggler and hang detectors ignore")
    straggler_k: int = _f(3, "a straggler is late in at least k ...")
    straggler_n: int = _f(4, "... of the last n steps")
    straggler_rel: float = _f(0.1, "late = behind the others by this fraction of a step ...")
    straggler_min_s: float = _f(0.03, "... and by at least this many seconds")
    hang_floor_s: float = _f(2.0, "a hang is a collective some ranks have waited in this long ...")
    hang_factor: float = _f(10.0, "... or this many times its typical duration, if longer")
    slow_link_factor: float = _f(4.0, "a slow link's time per byte is this many times the others'")
    lost_after_s: float = _f(30.0, "a rank silent this long is lost (one whose process is gone, at once)")


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    ckpt: CkptSection = field(default_factory=CkptSection)
    faults: FaultsSection = field(default_factory=FaultsSection)

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.sp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobConfig":
        return build_config(data)


SECTIONS = {f.name: f.default_factory for f in fields(JobConfig)}


def _section_fields():
    """(section, field) for every option, in declaration order."""
    for section, factory in SECTIONS.items():
        for f in fields(factory):
            yield section, f


_OWNER = {}
for _section, _field in _section_fields():
    assert _field.name not in _OWNER, f"option {_field.name} appears in two sections"
    _OWNER[_field.name] = _section


def _field_type(f) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.replace(" ", "") in ("int|str", "str|int"):
        return str  # a count or a pattern (model layers); the dataclass parses and checks it
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t.startswith(name):
            return typ
    raise TypeError(f"unsupported option type {f.type!r} for {f.name}")


def _coerce(section: str, f, value):
    typ = _field_type(f)
    optional = "None" in str(f.type)
    where = f"[{section}] {f.name}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be empty")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        if typ is int and (isinstance(value, bool) or isinstance(value, float)):
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} must be {typ.__name__}") from None


def _unknown(name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown option {name!r}{hint}")


def build_config(data: dict | None = None, overrides: dict | None = None) -> JobConfig:
    """A JobConfig from nested TOML-like ``data`` plus flat ``overrides``."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for section, table in (data or {}).items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS)
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of options")
        names = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in table.items():
            if key not in names:
                raise _unknown(f"{section}.{key}", [f"{section}.{n}" for n in names])
            values[section][key] = _coerce(section, names[key], value)
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in _OWNER:
            raise _unknown(key, _OWNER)
        section = _OWNER[key]
        f = next(f for f in fields(SECTIONS[section]) if f.name == key)
        values[section][key] = _coerce(section, f, value)
    built = {}
    for section, factory in SECTIONS.items():
        try:
            built[section] = factory(**values[section])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return JobConfig(**built)


def load_config(path: str | None = None, overrides: dict | None = None) -> JobConfig:
    data = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    return build_config(data, overrides)


def validate(cfg: JobConfig, world_size: int | None = None) -> JobConfig:
    """Reject combinations that cannot run; ``world_size`` is the number of
    workers when it is fixed from outside (torchrun)."""
    problems = []
    p, t, j = cfg.parallel, cfg.train, cfg.job
    for name in ("dp", "sp", "ep"):
        if getattr(p, name) < 1:
            problems.append(f"--{name}={getattr(p, name)} must be >= 1")
    if not problems:
        world = p.dp * p.sp
        if world_size is not None and world != world_size:
            problems.append(f"dp*sp={world} != world_size={world_size}: set --dp and --sp so that "
                            f"their product is the number of workers")
        if world % p.ep:
            problems.append(f"--ep={p.ep} must divide the world size dp*sp={world}")
        elif p.ep > 1 and cfg.model.moe == "none":
            problems.append(f"--ep={p.ep} needs MoE layers: add --moe standard or --moe llep")
        elif cfg.model.moe != "none" and cfg.model.num_experts % p.ep:
            problems.append(f"--num-experts={cfg.model.num_experts} must divide by --ep={p.ep}")
        if t.batch_size % p.dp and not p.hdp:
            problems.append(f"--batch-size={t.batch_size} must divide by --dp={p.dp}")
        problems += _accumulation_problems(cfg)
        problems += _sequence_parallel_problems(cfg)
        problems += _hdp_problems(cfg)
    for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1),
                      ("warmup_steps", 0)):
        if getattr(t, name) < low:
            problems.append(f"--{name.replace('_', '-')}={getattr(t, name)} must be >= {low}")
    if t.lr <= 0:
        problems.append(f"--lr={t.lr} must be > 0")
    if t.dtype not in ("float32", "float64", "bfloat16"):
        problems.append(f"--dtype={t.dtype!r} must be float32, float64 or bfloat16")
    if t.mixed_precision not in ("none", "bf16", "fp16"):
        problems.append(f"--mixed-precision={t.mixed_precision!r} must be none, bf16 or fp16")
    elif t.mixed_precision != "none" and t.dtype != "float32":
        problems.append(f"--mixed-precision={t.mixed_precision} keeps float32 master weights: it needs "
                        f"--dtype float32 (got --dtype {t.dtype}; --dtype {t.dtype} alone trains purely in "
                        f"{t.dtype})")
    if j.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device={j.device!r} must be auto, cpu or cuda")
    if j.cpus_per_worker <= 0 or j.threads_per_worker < 1:
        problems.append("--cpus-per-worker must be > 0 and --threads-per-worker >= 1")
    if j.pg_timeout <= 0 or p.bucket_mb <= 0:
        problems.append("--pg-timeout and --bucket-mb must be > 0")
    c = cfg.ckpt
    for name in ("ckpt_every", "keep_last", "keep_every"):
        if getattr(c, name) < 0:
            problems.append(f"--{name.replace('_', '-')}={getattr(c, name)} must be >= 0")
    if c.ckpt_mode not in ("async", "sync"):
        problems.append(f"--ckpt-mode={c.ckpt_mode!r} must be async or sync")
    if (c.ckpt_every > 0 or c.resume) and not c.ckpt_url:
        problems.append("--ckpt-every and --resume need --ckpt-url (a path or fsspec URL)")
    if c.ckpt_takeover and not c.ckpt_every > 0:
        problems.append("--ckpt-takeover claims the store for saving: it needs --ckpt-every")
    workers = world_size or p.dp * p.sp
    if (c.ckpt_every > 0 or c.resume) and c.ckpt_url.startswith("memory://") and workers > 1:
        problems.append(f"--ckpt-url={c.ckpt_url} cannot be shared by {workers} workers: memory:// lives "
                        f"inside one process, so each worker would save to (and resume from) a store of "
                        f"its own; use a path on a filesystem every worker sees, or an object store "
                        f"(s3://, gs://), or run one worker")
    problems += _fault_problems(cfg.faults, world_size or p.dp * p.sp)
    if problems:
        raise ConfigError("invalid job configuration:\n  " + "\n  ".join(problems))
    return cfg


def sp_layout(cfg: JobConfig) -> str:
    """The sequence layout a job uses: "auto" is zigzag for ring attention on an
    all-softmax model, contiguous for Ulysses or a model with linear layers."""
    p = cfg.parallel
    if p.sp_layout != "auto":
        return p.sp_layout
    if p.sp_attention == "ulysses" or "linear" in cfg.model.layer_kinds:
        return "contiguous"
    return "zigzag"


def hdp_capacity(cfg: JobConfig) -> int:
    """Tokens per rank per microbatch under --hdp."""
    return cfg.parallel.hdp_capacity or cfg.train.seq_len


def varlen_options(cfg: JobConfig) -> dict:
    """Keyword arguments of `SyntheticData.lengths` for --hdp batches."""
    t = cfg.train
    return {"median": t.varlen_median or max(1, t.seq_len // 4), "sigma": t.varlen_sigma,
            "max_len": t.varlen_max or cfg.world_size * hdp_capacity(cfg)}


def _accumulation_problems(cfg: JobConfig) -> list[str]:
    """--grad-accum N splits each rank's share of the global batch (under
    --hdp: the global batch's sequences) into N equal micro-batches."""
    p, t = cfg.parallel, cfg.train
    n = t.grad_accum
    if n < 1:
        return [f"--grad-accum={n} must be >= 1"]
    if p.hdp:
        if t.batch_size % n:
            return [f"--batch-size={t.batch_size} must divide by --grad-accum={n} (with --hdp each "
                    f"micro-batch is batch-size/grad-accum sequences of the global batch)"]
        return []
    if t.batch_size % p.dp == 0 and (t.batch_size // p.dp) % n:
        return [f"--batch-size={t.batch_size} / --dp={p.dp} = {t.batch_size // p.dp} sequences per rank "
                f"must divide by --grad-accum={n}: pick a --grad-accum that divides it, or a --batch-size "
                f"that is a multiple of dp*grad-accum={p.dp * n}"]
    return []


def _hdp_problems(cfg: JobConfig) -> list[str]:
    p, t = cfg.parallel, cfg.train
    problems = [f"--{name.replace('_', '-')}={getattr(owner, name)} must be >= 0"
                for owner, name in ((p, "hdp_capacity"), (t, "varlen_median"), (t, "varlen_max"))
                if getattr(owner, name) < 0]
    if not t.varlen_sigma >= 0:
        problems.append(f"--varlen-sigma={t.varlen_sigma} must be >= 0")
    if not p.hdp or problems:
        return problems
    if p.sp > 1:
        problems.append(f"--hdp forms a ring per long sequence itself: use --sp 1 (got --sp={p.sp}); "
                        f"the world is --dp")
    if p.ep > 1 or cfg.model.moe != "none":
        problems.append("--hdp does not support MoE layers (their load-balancing loss is a statistic of "
                        "each forward, not a sum over tokens): use --moe none --ep 1")
    most = cfg.world_size * hdp_capacity(cfg)
    if t.varlen_max > most:
        problems.append(f"--varlen-max={t.varlen_max} exceeds what one microbatch holds: world * "
                        f"capacity = {cfg.world_size} * {hdp_capacity(cfg)} = {most}")
    return problems


def _sequence_parallel_problems(cfg: JobConfig) -> list[str]:
    p, t = cfg.parallel, cfg.train
    if p.sp_attention not in ("ring", "ulysses"):
        return [f"--sp-attention={p.sp_attention!r} must be ring or ulysses"]
    if p.sp_layout not in ("auto", "zigzag", "contiguous"):
        return [f"--sp-layout={p.sp_layout!r} must be auto, zigzag or contiguous"]
    layout, problems = sp_layout(cfg), []
    if p.sp_attention == "ulysses" and layout != "contiguous":
        problems.append("--sp-attention=ulysses needs --sp-layout contiguous (or auto)")
    if "linear" in cfg.model.layer_kinds and layout != "contiguous":
        problems.append("linear-attention layers need --sp-layout contiguous (or auto)")
    if p.sp > 1:
        parts, what = (2 * p.sp, "2*sp") if layout == "zigzag" else (p.sp, "sp")
        if t.seq_len % parts:
            problems.append(f"--seq-len={t.seq_len} must divide by {what}={parts} for {layout} sharding")
        if p.sp_attention == "ulysses" and cfg.model.heads % p.sp:
            problems.append(f"--heads={cfg.model.heads} must divide by --sp={p.sp} for ulysses attention")
    return problems


def _fault_problems(f: FaultsSection, world: int) -> list[str]:
    from loom.faults import KINDS, inject
    from loom.launch.fault_watch import detect_config
    problems = []
    try:
        inject.validate_plan(inject.parse(f.inject), max(world, 1))
    except ValueError as exc:
        problems.append(f"--inject: {exc}")
    unknown = [k for k in f.stop_on.replace(" ", "").split(",") if k and k not in KINDS]
    if unknown:
        problems.append(f"--stop-on: unknown fault kind(s) {unknown}; expected some of {list(KINDS)}")
    if f.monitor_interval <= 0:
        problems.append(f"--monitor-interval={f.monitor_interval} must be > 0")
    try:
        detect_config(f)
    except ValueError as exc:
        problems.append(str(exc).replace("DetectConfig.", "--").replace("DetectConfig: ", ""))
    return problems


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option, grouped by section, defaulting to 'not given'."""
    parser.add_argument("--config", metavar="FILE", help="TOML job file; flags override its values")
    for section, factory in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        for f in fields(factory):
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f.metadata.get("help", "")
            flag = "--" + f.name.replace("_", "-")
            if _field_type(f) is bool:
                group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                   help=f"{help_text} (default: {default})")
            else:
                metavar = f.metadata.get("metavar", _field_type(f).__name__.upper())
                group.add_argument(flag, dest=f.name, default=None, metavar=metavar,
                                   help=f"{help_text} (default: {default})")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides = {name: getattr(args, name) for name in _OWNER if getattr(args, name, None) is not None}
    return load_config(getattr(args, "config", None), overrides)


def to_toml(cfg: JobConfig) -> str:
    """The config as TOML (None values are left out: they mean 'default')."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
