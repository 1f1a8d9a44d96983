"""Job configuration: dataclasses, loadable from TOML, every field a CLI flag.

A TOML file has one table per section (``[model]``, ``[parallel]``, ...).  Option
names are unique across sections, so each is also a flat flag
(``--steps 200 --dp 2``).  `validate` rejects bad combinations before any
worker starts, saying what to change.

Every setting is written once, in the dataclass of the component that owns it
(its default and its help text, in the field's metadata); the flags are made
from those fields.  A section may embed an owner's dataclass: a field whose
``default_factory`` is a dataclass contributes that dataclass's fields as
options of the section, named with the field's metadata ``prefix`` and
``rename`` (``[faults]`` embeds `loom.faults.DetectConfig`, ``warmup_steps``
renamed ``fault_warmup_steps``; `ModelConfig` embeds `LLEPConfig` with the
prefix ``llep_``).  An embedded owner takes a ``names`` argument (field ->
flag), so its own validation names the flag that set a bad value.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field, fields

import torch

from loom.data.config import DataConfig
from loom.faults.detect import DetectConfig
from loom.parallel.fused_attention import KERNELS as ATTENTION_KERNELS
from loom.parallel.fused_attention import resolve_kernel
from loom.parallel.model import ModelConfig

from .precision import MODES as PRECISION_MODES
from .schedule import LRSchedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A job configuration that cannot run; the message says what to change."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _owned(owner: type, name: str):
    """An option that is one field of ``owner`` under another name: the
    owner's default and help text, written once, there."""
    f = next(f for f in fields(owner) if f.name == name)
    return field(default=f.default, metadata=dict(f.metadata))


@dataclass
class JobSection:
    name: str = _f("", "run name; runs/<name>/ holds config.toml and metrics.jsonl (default: a timestamp)")
    runs_dir: str = _f("runs", "directory that holds run directories")
    address: str = _f("", "Ray cluster to join: host:port (its GCS, as `ray start --head` prints), "
                          "ray://host:10001 (Ray Client: needs loom-train[cluster]) or auto (RAY_ADDRESS, else "
                          "the cluster last started on this machine); default: start a local Ray instance of "
                          "the job's own (RAY_ADDRESS is ignored)")
    device: str = _f("auto", "cpu, cuda, or auto (cuda when every worker can get a GPU)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker actor")
    threads_per_worker: int = _f(1, "torch intra-op threads per worker")
    pg_timeout: float = _f(300.0, "process-group timeout in seconds")
    progress: bool = _f(True, "show a progress bar")
    env: str = _f("", "environment variables for every worker, comma-separated: KEY (copied from this "
                      "environment, e.g. AWS_SECRET_ACCESS_KEY: its value is not written to the run "
                      "directory) or KEY=VALUE")
    working_dir: str = _f("", "with --address: a directory shipped to every worker (Ray runtime_env "
                              "working_dir; the workers run in it and import from it); loom itself is "
                              "always shipped to a cluster")
    placement: str = _f("pack", "where Ray puts the workers: pack (as few nodes as possible, each sp and ep group "
                                "of consecutive ranks kept within a node where the nodes' sizes allow, dp "
                                "across nodes; the rank map is reported at start) or spread (one worker per "
                                "node in turn, rank i in bundle i)")
    start_timeout: float = _f(120.0, "seconds to wait for a cluster's busy resources before giving up (a "
                                     "cluster too small for the job fails at once)")
    tensorboard: bool | None = _f(None, "write TensorBoard event files to <run dir>/tensorboard (default: on when "
                                        "the tensorboard package is installed: pip install 'loom-train[tensorboard]')")
    wandb: str = _f("", "log metrics to this Weights & Biases project (needs pip install 'loom-train[wandb]')",
                    metavar="PROJECT")
    wandb_mode: str = _f("auto", "with --wandb: online, offline (no network; `wandb sync` later) or auto "
                                 "(WANDB_MODE from the environment, else online)")
    peak_tflops: float = _f(0.0, "peak dense TFLOP/s of one device in the training precision, for model FLOPs "
                                 "utilisation (mfu) in the metrics (0: mfu not reported)")


@dataclass
class ParallelSection:
    dp: int = _f(2, "data-parallel degree")
    sp: int = _f(1, "sequence-parallel degree (world = dp * sp)")
    ep: int = _f(1, "expert-parallel degree (divides the world size)")
    bucket_mb: float = _f(25.0, "gradient all-reduce bucket size in MiB")
    sp_attention: str = _f("ring", "sequence-parallel attention when sp > 1: ring, ulysses, or ulysses-ring "
                                   "(2-D: Ulysses all-to-all over --sp-inner consecutive ranks, ring over the "
                                   "rest; sp can exceed the heads and the all-to-all stays within a node)")
    sp_inner: int = _f(0, "with --sp-attention ulysses-ring: the Ulysses (inner) degree, dividing --sp and "
                          "--heads (sp = inner x outer); 0: the largest such divisor, at most 8")
    sp_layout: str = _f("auto", "sequence shards when sp > 1: zigzag (balanced causal ring), contiguous, "
                                "or auto (zigzag for ring and ulysses-ring, contiguous for ulysses)")
    attention_kernel: str = _f("auto", "ring attention's block kernel (sp ring and --hdp's rings): auto (PyTorch's "
                                       "fused flash attention where the device has one, explicit for float64), "
                                       "fused, or explicit (loom's own softmax: the exact reference)")
    ring_head_chunks: int = _f(1, "split the K/V heads into this many chunks and run each ring (sp ring, "
                                  "ulysses-ring's outer ring, --hdp's rings) once per chunk: the ring's buffers "
                                  "in flight (K/V blocks, dK/dV accumulators, kernel temporaries) shrink by this "
                                  "factor, for as many more (smaller) messages; it must divide the K/V heads each "
                                  "ring sees")
    hdp: bool = _f(False, "hybrid data parallelism (ByteScale): variable-length long-tail batches, each "
                          "sequence on the ranks it needs (ring attention over per-batch rings), short ones "
                          "packed whole; needs --sp 1 (world = --dp)")
    hdp_capacity: int = _f(0, "with --hdp: tokens per rank per microbatch (0: --seq-len)")
    shard_state: str = _f("none", "sharded data parallelism (FSDP2) over every rank: none (each rank holds the "
                                  "whole model, gradients and optimizer state: DDP), grads (ZeRO-2 / FSDP "
                                  "SHARD_GRAD_OP: gradients and optimizer state sharded, parameters gathered once "
                                  "per step), params (ZeRO-3 / FSDP FULL_SHARD: parameters too, gathered one "
                                  "block at a time); expert weights shard over their expert-data-parallel ranks")


@dataclass
class TrainSection:
    model: str = _f("", "your own model: MODULE:FACTORY or path/to/file.py:FACTORY, where FACTORY(config) returns "
                        "a torch.nn.Module mapping token ids [batch, seq] to logits [batch, seq, vocab] (config: "
                        "this job's JobConfig; see loom.launch.user_model). Default: loom's reference "
                        "transformer, shaped by [model]", metavar="MODULE:FACTORY")
    hf_config: str = _f("", "a Hugging Face transformers causal LM as the model: a local config.json or a directory "
                            "holding one (Llama, Qwen2, Mistral, ...; built with AutoModelForCausalLM.from_config, "
                            "nothing downloaded); the [model] shape options come from it (loom.launch.hf_model)",
                        metavar="PATH")
    init_from_hf: str = _f("", "start from the weights of a local transformers checkpoint directory "
                               "(model.safetensors or a sharded index; safetensors only); implies --hf-config DIR "
                               "when that is not given", metavar="DIR")
    model_args: dict = field(default_factory=dict, metadata={
        "help": "your model's own settings, given to FACTORY as config.train.model_args: KEY=VALUE ... "
                "(VALUE read as TOML: 3, 0.5, true, \"text\"; else a string), or a [train.model_args] table"})
    steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(16, "global batch size in sequences (divides by dp)")
    seq_len: int = _f(64, "tokens per sequence")
    lr: float = _f(3e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear learning-rate warm-up steps")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    seed: int = _f(0, "seed of the model initialisation and of the data's sampling order")
    dtype: str = _f("float32", "parameter dtype: float32, float64 or bfloat16")
    log_every: int = _f(1, "report metrics every N steps")
    varlen_median: int = _f(0, "with --hdp: median length of the lognormal long-tail sequence lengths "
                               "(0: seq_len // 4); --batch-size sequences per global batch")
    varlen_sigma: float = _f(1.0, "with --hdp: lognormal sigma of the sequence lengths (larger: longer tail)")
    varlen_max: int = _f(0, "with --hdp: longest sequence (0: world * capacity, what one microbatch holds)")
    # the schedule's own settings: default and help from the owner, loom.launch.schedule.LRSchedule
    lr_schedule: str = _owned(LRSchedule, "kind")
    min_lr: float = _owned(LRSchedule, "min_lr")
    wsd_decay_frac: float = _owned(LRSchedule, "wsd_decay_frac")
    allow_lr_schedule_change: bool = _f(False, "with --resume: continue with this run's schedule when the "
                                               "checkpoint's differs (--lr-schedule, --lr, --warmup-steps, "
                                               "--min-lr, --steps, --wsd-decay-frac), instead of refusing")
    eval_every: int = _f(50, "evaluate on held-out data every N steps and after the last (0: never)")
    eval_batches: int = _f(4, "global batches (of --batch-size sequences) per evaluation")
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
    ckpt_storage_options: dict = field(default_factory=dict, metadata={
        "help": "fsspec storage options of --ckpt-url's filesystem, in every process of the job: KEY=VALUE ... "
                "or a [ckpt.ckpt_storage_options] table, e.g. endpoint_url=http://127.0.0.1:9000 for s3fs; "
                "credentials belong in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), not here: the "
                "job's config is copied to its run directory"})
    resume: bool = _f(False, "continue from the newest committed checkpoint at --ckpt-url, or start at "
                             "step 0 when there is none; --resume, --resume auto and --resume true are the "
                             "same (auto: what a job restarted by torchrun --max-restarts wants), "
                             "--no-resume or --resume false start at step 0", words={"auto": True})
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
    ckpt_local: str = _f("", "a node-local directory (local NVMe, /dev/shm) where each checkpoint commits "
                             "first, on every node for its own ranks (--ckpt-mode async: in the background, "
                             "from a host-memory copy); it is then copied to --ckpt-url in the background, "
                             "and --resume loads from this level when it holds the newest step (needs "
                             "--ckpt-url and --ckpt-every)")
    keep_last_local: int = _f(2, "with --ckpt-local: keep the newest N checkpoints there (a step not yet "
                                 "copied to --ckpt-url is kept unless the disk is short of space)")
    ckpt_pending_copies: int = _f(1, "with --ckpt-local: checkpoints that may wait for their copy to "
                                     "--ckpt-url before training waits (backpressure)")
    memory_snapshots: bool = _f(True, "under Ray, keep each rank's newest committed checkpoint in host memory "
                                      "on its node and on a peer node, so that a restart reloads from memory "
                                      "and reads storage only for what memory cannot serve (torchrun: "
                                      "storage only); --no-memory-snapshots reloads from storage")


@dataclass
class RecoverySection:
    max_restarts: int = _f(-1, "restart the job this many times after a worker dies, a Ray actor is lost, the "
                               "fault monitor stops it (hang, lost rank) or a rank raises: new workers resume "
                               "from the newest committed checkpoint (from step 0 without one); a fault that "
                               "repeats at the same step stops early. -1: 3 with --ckpt-every, else 0 "
                               "(0: stop at the first fault)")
    spare_workers: int = _f(0, "Ray: place and warm up this many extra workers at start; after a fault the "
                               "worker it names is isolated (its bundle never used again) and a spare takes "
                               "its place, without waiting for Ray to start a process")
    min_workers: int = _f(0, "Ray: when fewer healthy workers than the configured world can be had, continue "
                             "at the largest valid layout of at least this many (dp shrinks, sp and ep stay; "
                             "--grad-accum grows so the global batch and the losses stay the same; resumes "
                             "from the newest checkpoint). 0: never shrink")
    max_workers: int = _f(0, "with --min-workers: a shrunk job grows back, at a checkpoint, up to this many "
                             "workers when Ray can place them again (0: the configured world)")
    replace_wait: float = _f(10.0, "with --min-workers: seconds to wait for Ray to place a lost node's workers "
                                   "again before shrinking")
    restart_on: str = _f("", "also restart (and isolate the rank, as after a fault) on these fault-monitor "
                             "kinds: straggler (a persistent one: flagged by the monitor, then still late in "
                             "--restart-straggler-steps consecutive steps) (default: '', none)")
    restart_straggler_steps: int = _f(5, "with --restart-on straggler: consecutive late steps after the "
                                         "monitor flags a straggler before it restarts the job (0: at once)")


@dataclass
class FaultsSection:
    monitor: bool = _f(True, "watch the job's communication for stragglers, hangs, slow links, "
                             "mismatched collectives and lost ranks")
    inject: str = _f("", "inject faults, e.g. 'straggler:rank=1,delay=0.2,from=20'; kinds: straggler, "
                         "hang, kill, slow_link, mismatch; ';' joins several (see loom.faults.inject)")
    stop_on: str = _f("hang,lost_rank", "fault kinds that stop every worker (comma-separated; '' = none)")
    monitor_interval: float = _f(0.1, "seconds between a rank's reports to the fault monitor")
    detect: DetectConfig = field(default_factory=DetectConfig, metadata={
        "help": "the detectors' thresholds (loom.faults.DetectConfig)",
        "rename": {"warmup_steps": "fault_warmup_steps"}})


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataConfig = field(default_factory=DataConfig)
    ckpt: CkptSection = field(default_factory=CkptSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.sp

    def to_dict(self) -> dict:
        """``{section: {option: value}}``, the shape of a TOML job file."""
        return {section: {opt.key: opt.get(getattr(self, section)) for opt in OPTIONS.values()
                          if opt.section == section}
                for section in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict) -> "JobConfig":
        return build_config(data)


SECTIONS = {f.name: f.default_factory for f in fields(JobConfig)}


@dataclass(frozen=True)
class Option:
    """One setting as a job file and the command line see it: ``[section] key``
    and the flag ``--key`` (dashes for underscores).  ``field`` is the owner's
    dataclass field (type, default, help); ``path`` the attribute names from
    the section's object down to it (``("detect", "warmup_steps")``)."""

    section: str
    key: str
    field: dataclasses.Field
    path: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def default(self):
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    def get(self, section_object):
        value = section_object
        for name in self.path:
            value = getattr(value, name)
        return value


def _embedded(f: dataclasses.Field) -> type | None:
    """The owner dataclass a field embeds (its ``default_factory``), else None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _options_of(section: str, cls: type, prefix: str = "", rename=None, path=()):
    for f in fields(cls):
        owner = _embedded(f)
        if owner is not None:
            yield from _options_of(section, owner, prefix + f.metadata.get("prefix", ""),
                                   f.metadata.get("rename", {}), path + (f.name,))
        else:
            yield Option(section, prefix + (rename or {}).get(f.name, f.name), f, path + (f.name,))


OPTIONS: dict[str, Option] = {}
for _section, _factory in SECTIONS.items():
    for _opt in _options_of(_section, _factory):
        assert _opt.key not in OPTIONS, f"option {_opt.key} appears twice"
        OPTIONS[_opt.key] = _opt
_BY_PATH = {(opt.section, opt.path): opt for opt in OPTIONS.values()}


def _field_type(f) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.replace(" ", "") in ("int|str", "str|int"):
        return str  # a count or a pattern (model layers); the dataclass parses and checks it
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str), ("dict", dict)):
        if t.startswith(name):
            return typ
    raise TypeError(f"unsupported option type {f.type!r} for {f.name}")


def _coerce(opt: Option, value):
    f, typ = opt.field, _field_type(opt.field)
    optional = "None" in str(f.type)
    where = f"[{opt.section}] {opt.key}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be empty")
    if typ is dict:
        return _coerce_table(where, value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        words = f.metadata.get("words", {})  # extra spellings a bool option takes ("auto")
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}={value!r} must be true or false" + "".join(f" or {w}" for w in words))
    if typ is str and isinstance(value, (list, tuple)) and f.metadata.get("joins"):
        value = f.metadata["joins"].join(str(v) for v in value)  # a TOML list of paths
    elif typ is str and isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}={value!r} must be a string")
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        if typ is int and (isinstance(value, bool) or isinstance(value, float)):
            raise ValueError
        value = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} must be {typ.__name__}") from None
    if typ is float and value != value:  # NaN passes every `x <= 0` check downstream
        raise ConfigError(f"{where}=nan must be a number")
    return value


def _coerce_table(where: str, value) -> dict:
    """A table option: a TOML table, or ``KEY=VALUE`` strings from the command
    line (each VALUE read as a TOML value -- 3, 0.5, true, [1, 2] -- else kept
    as a string)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}={value!r} must be a table ({{key = value, ...}}) or KEY=VALUE strings")
    table = {}
    for item in value:
        key, eq, text = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{where}: {item!r} must be KEY=VALUE")
        try:
            table[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = text
    return table


def _unknown(name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown option {name!r}{hint}")


def build_config(data: dict | None = None, overrides: dict | None = None) -> JobConfig:
    """A JobConfig from nested TOML-like ``data`` plus flat ``overrides``
    (option names, ``-`` or ``_``).  Raises ConfigError naming the option."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for section, table in (data or {}).items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS)
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of options")
        for key, value in table.items():
            opt = OPTIONS.get(key)
            if opt is None or opt.section != section:
                raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k, o in OPTIONS.items()
                                                    if o.section == section])
            values[section][key] = _coerce(opt, value)
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in OPTIONS:
            raise _unknown(key, OPTIONS)
        opt = OPTIONS[key]
        value = _coerce(opt, value)
        if isinstance(value, dict):  # a table from flags adds to (or replaces keys of) the file's
            value = {**values[opt.section].get(key, {}), **value}
        values[opt.section][key] = value
    try:
        cfg = JobConfig(**{section: _construct(section, factory, values[section])
                           for section, factory in SECTIONS.items()})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from .hf_model import apply_hf_config  # --hf-config shapes [model] and names the model's factory
    try:
        return apply_hf_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _construct(section: str, cls: type, values: dict, path: tuple = (), names: dict | None = None):
    """``cls`` from the given options (``values``: key -> value) of ``section``;
    the others keep their defaults.  An embedded owner is told its fields'
    flags (``names``), so its own validation names the flag of a bad value."""
    kwargs = {}
    for f in fields(cls):
        sub = path + (f.name,)
        owner = _embedded(f)
        if owner is not None:
            flags = {o.path[-1]: o.flag for o in OPTIONS.values() if o.section == section and o.path[:-1] == sub}
            kwargs[f.name] = _construct(section, owner, values, sub, flags)
        elif _BY_PATH[section, sub].key in values:
            kwargs[f.name] = values[_BY_PATH[section, sub].key]
    return cls(**kwargs) if names is None else cls(**kwargs, names=names)


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
        problems += _shard_state_problems(cfg)
    for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1),
                      ("warmup_steps", 0)):
        if getattr(t, name) < low:
            problems.append(f"--{name.replace('_', '-')}={getattr(t, name)} must be >= {low}")
    if not 0 < t.lr < math.inf:
        problems.append(f"--lr={t.lr} must be > 0 and finite")
    if not 0 <= t.weight_decay < math.inf:
        problems.append(f"--weight-decay={t.weight_decay} must be >= 0 and finite")
    if t.grad_clip < 0:
        problems.append(f"--grad-clip={t.grad_clip} must be >= 0 (0: no clipping)")
    if t.dtype not in ("float32", "float64", "bfloat16"):
        problems.append(f"--dtype={t.dtype!r} must be float32, float64 or bfloat16")
    if t.mixed_precision not in PRECISION_MODES:
        modes = list(PRECISION_MODES)
        problems.append(f"--mixed-precision={t.mixed_precision!r} must be {', '.join(modes[:-1])} or {modes[-1]}")
    elif t.mixed_precision != "none" and t.dtype != "float32":
        problems.append(f"--mixed-precision={t.mixed_precision} keeps float32 master weights: it needs "
                        f"--dtype float32 (got --dtype {t.dtype}; --dtype {t.dtype} alone trains purely in "
                        f"{t.dtype})")
    problems += _job_problems(j)
    if p.bucket_mb <= 0:
        problems.append("--bucket-mb must be > 0")
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
    problems += _recovery_problems(cfg)
    if t.model:  # the user's own model (--model MODULE:FACTORY)
        from .user_model import user_model_problems
        problems += user_model_problems(cfg)
    elif t.model_args:
        problems.append(f"--model-args {' '.join(f'{k}={v}' for k, v in t.model_args.items())} is for the "
                        f"factory of --model MODULE:FACTORY, but no --model is given (loom's reference "
                        f"model is shaped by the [model] options: --dim, --layers, ...)")
    problems += _train_extras_problems(cfg)
    from .storage import local_level_problems, store_problems, storage_option_problems
    problems += storage_option_problems(c)
    problems += local_level_problems(c)
    if not problems:  # opening the data costs time: only for a job that can otherwise run
        from .datasets import data_problems
        problems += data_problems(cfg, workers)
    if not problems:  # so does reaching a remote checkpoint store
        problems += store_problems(c)
    if problems:
        raise ConfigError("invalid job configuration:\n  " + "\n  ".join(problems))
    return cfg


def _job_problems(j: JobSection) -> list[str]:
    from .cluster import address_problem
    problems = []
    if j.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device={j.device!r} must be auto, cpu or cuda")
    if j.cpus_per_worker <= 0 or j.threads_per_worker < 1:
        problems.append("--cpus-per-worker must be > 0 and --threads-per-worker >= 1")
    if j.pg_timeout <= 0 or j.start_timeout <= 0:
        problems.append("--pg-timeout and --start-timeout must be > 0")
    if j.placement not in ("pack", "spread"):
        problems.append(f"--placement={j.placement!r} must be pack or spread")
    try:
        parse_env(j.env, resolve=False)
    except ConfigError as exc:
        problems.append(str(exc))
    if address_problem(j.address):
        problems.append(address_problem(j.address))
    return problems


def validate_launch(cfg: JobConfig, world_size: int) -> JobConfig:
    """Check only what launching needs (``[job]`` and ``[faults]``), for a
    job that runs the user's own loop on ``world_size`` workers."""
    problems = _job_problems(cfg.job) + _fault_problems(cfg.faults, world_size) + _recovery_problems(cfg)
    if problems:
        raise ConfigError("invalid job configuration:\n  " + "\n  ".join(problems))
    return cfg


def _recovery_problems(cfg: JobConfig) -> list[str]:
    r = cfg.recovery
    n = r.max_restarts
    if n < -1:
        return [f"--max-restarts={n} must be >= 0 (or -1: 3 with --ckpt-every, else 0)"]
    problems, world = [], cfg.world_size
    for name in ("spare_workers", "min_workers", "max_workers", "restart_straggler_steps"):
        if getattr(r, name) < 0:
            problems.append(f"--{name.replace('_', '-')}={getattr(r, name)} must be >= 0")
    if not 0 <= r.replace_wait < math.inf:
        problems.append(f"--replace-wait={r.replace_wait} must be >= 0 and finite (seconds)")
    unknown = [k for k in r.restart_on.replace(" ", "").split(",") if k and k != "straggler"]
    if unknown:
        problems.append(f"--restart-on={r.restart_on!r}: unknown kind(s) {unknown}; expected straggler (or '')")
    if problems:
        return problems
    if r.min_workers > world:
        problems.append(f"--min-workers={r.min_workers} exceeds the configured world dp*sp={world}")
    if r.max_workers and not r.min_workers:
        problems.append(f"--max-workers={r.max_workers} bounds how far a shrunk job grows back: it needs "
                        f"--min-workers (the job never shrinks without it)")
    elif r.max_workers and not max(r.min_workers, 1) <= r.max_workers <= world:
        problems.append(f"--max-workers={r.max_workers} must be between --min-workers={r.min_workers} and the "
                        f"configured world dp*sp={world} (spares replace faulty workers; they do not "
                        f"enlarge the job)")
    wants = [f"--{k.replace('_', '-')}" for k in ("spare_workers", "min_workers", "restart_on") if getattr(r, k)]
    if wants and max_restarts(cfg) == 0:
        problems.append(f"{' and '.join(wants)} act when the job restarts: they need --max-restarts > 0 "
                        f"(or --ckpt-every, which makes it 3)")
    return problems


def max_restarts(cfg: JobConfig) -> int:
    """The job's restart budget: ``--max-restarts``, its default -1 resolved
    to 3 when checkpoints are on (``--ckpt-every > 0``), else 0."""
    n = cfg.recovery.max_restarts
    if n == -1:
        return 3 if cfg.ckpt.ckpt_every > 0 else 0
    return n


def parse_env(spec: str, resolve: bool = True, environ=None) -> dict[str, str]:
    """``--env`` as a dict: comma-separated ``KEY`` (its value from
    ``environ``, default ``os.environ``) or ``KEY=VALUE`` entries.  Raises
    ConfigError for a malformed entry, or (``resolve``) a KEY that is not set."""
    import os
    import re
    environ = os.environ if environ is None else environ
    out = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env: {item!r} must be KEY or KEY=VALUE with KEY a variable name")
        if not eq and resolve:
            if key not in environ:
                raise ConfigError(f"--env: {key} is not set in this environment; set it, or give "
                                  f"{key}=VALUE")
            value = environ[key]
        out[key] = value
    return out


def sp_layout(cfg: JobConfig) -> str:
    """The sequence layout a job uses: "auto" is zigzag for ring attention on an
    all-softmax model, contiguous for Ulysses or a model with linear layers."""
    p = cfg.parallel
    if p.sp_layout != "auto":
        return p.sp_layout
    if p.sp_attention == "ulysses" or "linear" in cfg.model.layer_kinds:
        return "contiguous"
    return "zigzag"


def sp_inner(cfg: JobConfig) -> int:
    """The Ulysses (inner) degree of 2-D sequence parallelism: --sp-inner, or
    by default the largest divisor of sp that divides the heads, at most 8;
    1 unless --sp-attention ulysses-ring."""
    from loom.parallel import default_sp_inner
    p = cfg.parallel
    if p.sp_attention != "ulysses-ring" or p.sp < 1 or cfg.model.heads < 1:  # (bad degrees are reported)
        return 1
    return p.sp_inner or default_sp_inner(p.sp, cfg.model.heads)


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


def _shard_state_problems(cfg: JobConfig) -> list[str]:
    from loom.parallel import SHARD_LEVELS
    p = cfg.parallel
    if p.shard_state == "optim":
        return ["--shard-state optim (ZeRO-1) is not offered: FSDP2 shards gradients with the optimizer state at "
                "no extra communication (a reduce-scatter and an all-gather cost what the all-reduce did), so "
                "use --shard-state grads for the same parameters and less memory"]
    if p.shard_state not in SHARD_LEVELS:
        return [f"--shard-state={p.shard_state!r} must be one of {', '.join(SHARD_LEVELS)}"]
    if p.shard_state != "none" and cfg.train.compile:
        return [f"--compile with --shard-state {p.shard_state} is not supported yet (torch.compile would trace "
                f"FSDP2's hooks); drop one of them"]
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


def attention_block_dtype(cfg: JobConfig) -> torch.dtype:
    """The dtype attention blocks compute in: the model's, or the autocast
    dtype of ``--mixed-precision``."""
    t = cfg.train
    if t.dtype == "float64":
        return torch.float64
    if t.dtype == "bfloat16" or t.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float16 if t.mixed_precision == "fp16" else torch.float32


def _sequence_parallel_problems(cfg: JobConfig) -> list[str]:
    p, t = cfg.parallel, cfg.train
    if p.sp_attention not in ("ring", "ulysses", "ulysses-ring"):
        return [f"--sp-attention={p.sp_attention!r} must be ring, ulysses or ulysses-ring"]
    if p.sp_inner < 0:
        return [f"--sp-inner={p.sp_inner} must be >= 0 (0: the default)"]
    if p.sp_inner and p.sp_attention != "ulysses-ring":
        return [f"--sp-inner={p.sp_inner} is the Ulysses degree of --sp-attention ulysses-ring, not of "
                f"{p.sp_attention}: drop it or use ulysses-ring"]
    if p.sp_inner and (p.sp % p.sp_inner or cfg.model.heads % p.sp_inner):
        return [f"--sp-inner={p.sp_inner} must divide --sp={p.sp} (sp = inner x outer) and --heads="
                f"{cfg.model.heads} (the all-to-all splits the heads)"]
    if p.sp_layout not in ("auto", "zigzag", "contiguous"):
        return [f"--sp-layout={p.sp_layout!r} must be auto, zigzag or contiguous"]
    if p.attention_kernel not in ATTENTION_KERNELS:
        return [f"--attention-kernel={p.attention_kernel!r} must be one of {', '.join(ATTENTION_KERNELS)}"]
    rings = p.hdp or (p.sp > 1 and p.sp_attention == "ring") or (
        p.sp_attention == "ulysses-ring" and p.sp // sp_inner(cfg) > 1)
    if p.attention_kernel != "auto" and not rings:
        return [f"--attention-kernel {p.attention_kernel} picks ring attention's block kernel, and no ring runs "
                f"here (it needs --sp > 1 with --sp-attention ring, ulysses-ring with sp > --sp-inner, or --hdp; "
                f"Ulysses uses PyTorch's SDPA): drop it"]
    if isinstance(p.ring_head_chunks, bool) or not isinstance(p.ring_head_chunks, int) or p.ring_head_chunks < 1:
        return [f"--ring-head-chunks={p.ring_head_chunks!r} must be a positive integer"]
    if p.ring_head_chunks > 1:
        if not rings:
            return [f"--ring-head-chunks {p.ring_head_chunks} splits ring attention's heads, and no ring runs here "
                    f"(it needs --sp > 1 with --sp-attention ring, ulysses-ring with sp > --sp-inner, or --hdp)"]
        from loom.parallel.ulysses import kv_heads_after
        inner, kv = sp_inner(cfg), cfg.model.kv_heads or cfg.model.heads
        ring_kv = kv_heads_after(kv, inner) // inner  # after ulysses-ring's all-to-all (inner 1: all of them)
        if not cfg.train.model and ring_kv % p.ring_head_chunks:  # a user's model: checked per call
            return [f"--ring-head-chunks={p.ring_head_chunks} must divide the {ring_kv} K/V heads each ring sees "
                    f"(--kv-heads={kv}" + (f" over --sp-inner {inner})" if inner > 1 else ")")]
    if p.attention_kernel == "fused" and cfg.job.device == "cuda":
        try:
            resolve_kernel("fused", "cuda", attention_block_dtype(cfg), cfg.model.dim // max(cfg.model.heads, 1))
        except ValueError as exc:
            return [f"--attention-kernel fused: {exc}"]
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


def _train_extras_problems(cfg: JobConfig) -> list[str]:
    """Schedules, evaluation and metrics options."""
    t, j, problems = cfg.train, cfg.job, []
    if t.steps >= 1 and 0 < t.lr < math.inf and t.warmup_steps >= 0:  # reported above otherwise
        try:
            LRSchedule.from_config(t)
        except ValueError as exc:
            problems.append(str(exc))
    if t.eval_every < 0:
        problems.append(f"--eval-every={t.eval_every} must be >= 0 (0: no evaluation)")
    if t.eval_batches < 1:
        problems.append(f"--eval-batches={t.eval_batches} must be >= 1")
    if j.wandb_mode not in ("auto", "online", "offline", "disabled"):
        problems.append(f"--wandb-mode={j.wandb_mode!r} must be auto, online, offline or disabled")
    if not 0 <= j.peak_tflops < math.inf:
        problems.append(f"--peak-tflops={j.peak_tflops} must be >= 0 and finite (0: no mfu)")
    return problems


def _fault_problems(f: FaultsSection, world: int) -> list[str]:
    from loom.faults import KINDS, inject
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
    return problems  # the detectors' thresholds were checked by DetectConfig itself, when built


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option, grouped by section, defaulting to 'not given'.
    The help text and default are the owning dataclass field's."""
    parser.add_argument("--config", metavar="FILE", help="TOML job file; flags override its values")
    groups = {section: parser.add_argument_group(f"[{section}]") for section in SECTIONS}
    for key, opt in OPTIONS.items():
        group, typ = groups[opt.section], _field_type(opt.field)
        help_text = opt.help if "default:" in opt.help else f"{opt.help} (default: {opt.default})"
        if typ is bool and opt.field.metadata.get("words"):  # --resume [auto|true|false], --no-resume
            words = "|".join([*opt.field.metadata["words"], "true", "false"])
            group.add_argument(opt.flag, dest=key, default=None, nargs="?", const=True, metavar=words,
                               help=help_text)
            group.add_argument("--no-" + opt.flag[2:], dest=key, action="store_false", help=argparse.SUPPRESS)
        elif typ is bool:
            group.add_argument(opt.flag, dest=key, default=None, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif typ is dict:
            group.add_argument(opt.flag, dest=key, default=None, nargs="+", action="extend",
                               metavar="KEY=VALUE", help=help_text)
        else:
            metavar = opt.field.metadata.get("metavar", typ.__name__.upper())
            group.add_argument(opt.flag, dest=key, default=None, metavar=metavar, help=help_text)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
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
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")
