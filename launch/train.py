"""The training loop every rank runs (under Ray or torchrun)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from loom import comms
from loom.data import DocumentDraws
from loom.parallel import (ExpertParallelGradientSync, HDPCost, ShardedDataParallel, Transformer,
                           apply_activation_checkpointing, enable_sequence_parallel, hdp_forward_backward,
                           hdp_schedule, mesh_core, moe_aux_loss, next_token_loss, shard_data_parallel)
from loom.parallel.fused_attention import resolve_kernel

from .batches import micro_batches
from .checkpointing import TrainingCheckpoints
from .config import ConfigError, JobConfig, attention_block_dtype, hdp_capacity, sp_inner, sp_layout, \
    varlen_options
from .datasets import open_job_data
from .evaluation import evaluate
from .metrics import StepMetrics
from .precision import MixedPrecision
from .schedule import LRSchedule, lambda_lr


def resolve_device(device: str) -> torch.device:
    import os
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_model(cfg: JobConfig, device: torch.device, moe_group=None) -> torch.nn.Module:
    """The job's model on ``device`` in ``--dtype``: the user's own (``--model
    MODULE:FACTORY``, `loom.launch.user_model`) or loom's reference transformer
    (MoE layers expert-parallel over ``moe_group``)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if cfg.train.model:
        from .user_model import build_user_model
        model = build_user_model(cfg, moe_group)
    else:
        model = Transformer(cfg.model, moe_group)
    return model.to(device=device, dtype=getattr(torch, cfg.train.dtype))


def build_optimizer(cfg: JobConfig, model: torch.nn.Module):
    """AdamW and a `LambdaLR` running ``--lr-schedule`` (`loom.launch.schedule`)."""
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return opt, lambda_lr(opt, LRSchedule.from_config(t))


def train(cfg: JobConfig, reporter=None, step_hook=None, stop_check=None) -> dict:
    """Run ``cfg.train.steps`` steps on the initialised process group.

    Returns a summary (rank 0's reporter also receives every step's metrics).
    ``step_hook(step)`` runs at the start of every step (fault injection).
    ``stop_check()`` (every rank passes one, or none does) is asked after
    each checkpoint's save: when it is true on any rank, every rank stops
    there (one all-reduce decides it) and the summary's ``stopped_at`` is
    the checkpoint's step (the elastic Ray driver grows the job so).
    """
    t_start = time.monotonic()
    world = dist.get_world_size()
    inner = sp_inner(cfg)
    mesh = comms.init_mesh(cfg.parallel.dp, cfg.parallel.sp, cfg.parallel.ep, sp_inner=inner)
    device = resolve_device(cfg.job.device)
    model = build_model(cfg, device, mesh.ep_group)
    layout = sp_layout(cfg)
    if mesh.sp > 1:  # the sp group shares every sequence; attention runs across it
        core = mesh_core(cfg.parallel.sp_attention, mesh, layout=layout, kernel=cfg.parallel.attention_kernel,
                         head_chunks=cfg.parallel.ring_head_chunks)
        enable_sequence_parallel(model, list(mesh.sp_ranks), softmax_core=core)
    amp = MixedPrecision(cfg.train.mixed_precision, device)
    model = apply_training_essentials(cfg, model, amp)
    # dense gradients averaged over all ranks, expert gradients over the edp group
    grads = gradient_sync(cfg, model, mesh)
    opt, sched = build_optimizer(cfg, model)  # over the shards, when sharded
    job_data = open_job_data(cfg, world)
    data = job_data.train
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    hdp_cost = HDPCost.for_model(cfg.model)
    ckpts = TrainingCheckpoints(cfg, model, opt, sched, mesh, reporter, precision=amp, data=data)
    metrics = StepMetrics(model, device, world, cfg.job.peak_tflops)
    heldout = job_data.heldout
    eval_time, last_eval = 0.0, None
    start = ckpts.resume()
    if reporter is not None and mesh.sp > 1 and cfg.parallel.sp_attention == "ulysses-ring":
        reporter.event(f"2-D sequence parallelism: {_two_d_split(cfg, inner)}")
    if reporter is not None and (cfg.parallel.hdp or (mesh.sp > 1 and cfg.parallel.sp_attention == "ring") or (
            cfg.parallel.sp_attention == "ulysses-ring" and mesh.sp // inner > 1)):
        reporter.event(f"ring attention block kernel: {_ring_kernel(cfg, device)}")
    if start >= cfg.train.steps and reporter is not None:
        reporter.event(f"WARNING: resumed at step {start}, which is not below --steps={cfg.train.steps}: "
                       f"nothing to train (raise --steps to continue)")
    losses: list[float] = []
    tokens_done, stopped_at = 0, None
    t_loop = time.monotonic()
    for step in range(start, cfg.train.steps):
        t0 = time.monotonic()
        comms.set_step(step)
        if step_hook is not None:
            step_hook(step)
        opt.zero_grad(set_to_none=True)
        lengths = [cfg.train.seq_len] * cfg.train.batch_size
        if cfg.parallel.hdp:
            loss, lengths = _hdp_forward_backward(cfg, model, data, step, world, hdp_cost, device, amp, grads)
            tokens_per_step = sum(lengths)
        else:
            loss = _forward_backward(model, micro_batches(data, step, mesh, layout, device,
                                                          batch_size=cfg.train.batch_size,
                                                          grad_accum=cfg.train.grad_accum), amp)
        tokens_done += tokens_per_step
        grads.sync()  # once per step, after every micro-batch's backward
        amp.unscale_(opt)  # fp16: true-scale gradients, inf/NaN agreed by every rank
        log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps - 1
        grad_norm = None
        if cfg.train.grad_clip > 0 or log_now:  # the norm before clipping; max_norm=inf only measures it
            grad_norm = grads.clip_grad_norm_(cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        lr = opt.param_groups[0]["lr"]  # this step's
        amp.step(opt)
        sched.step()
        # the mean over every rank's equal share of the global batch
        mean_loss = comms.all_reduce(loss.detach().double().reshape(1), "sum").item() / world
        losses.append(mean_loss)
        if log_now:  # collective (the peak memory over all ranks)
            row = metrics.row(step, loss=mean_loss, lr=lr, grad_norm=grad_norm,
                              step_time_s=time.monotonic() - t0, lengths=lengths)
            if reporter is not None:
                reporter.step(row)
        if cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or step == cfg.train.steps - 1):
            last_eval = evaluate(model, heldout, batches=cfg.train.eval_batches, batch_size=cfg.train.batch_size,
                                 mesh=mesh, device=device, layout=layout)
            bpb = job_data.bits_per_byte(last_eval["eval_loss"])
            if bpb is not None:
                last_eval["eval_bpb"] = bpb
            eval_time += last_eval["eval_time_s"]
            if reporter is not None:
                reporter.step({"step": step, "split": "eval", **last_eval})
        ckpts.after_step(step)
        if stop_check is not None and _stop_here(cfg, step, stop_check, device):
            stopped_at = step + 1
            break
    comms.set_step(None)
    loop_time = time.monotonic() - t_loop - eval_time  # training only
    ckpt_extra = ckpts.finish()  # the last asynchronous checkpoint reaches storage
    nan = float("nan")
    summary = {"steps": cfg.train.steps, "first_loss": losses[0] if losses else nan,
               "final_loss": losses[-1] if losses else nan,
               "tokens_per_s": tokens_done / loop_time,
               "wall_time_s": time.monotonic() - t_start, "losses": losses}
    if cfg.ckpt.resume or cfg.ckpt.ckpt_every:
        summary["extra"] = {"start_step": start, **ckpt_extra}
    if stopped_at is not None:
        summary["stopped_at"] = stopped_at
    if ckpts.reload is not None:  # which tier served the resume (host memory or storage)
        summary["reload"] = ckpts.reload
    if last_eval is not None:
        extra = summary.setdefault("extra", {})
        extra.update(eval_loss=round(last_eval["eval_loss"], 6), eval_ppl=round(last_eval["eval_ppl"], 4))
        if "eval_bpb" in last_eval:  # against what knowing only each byte's frequency would give
            extra.update(eval_bpb=round(last_eval["eval_bpb"], 4),
                         unigram_bpb=round(job_data.val.unigram_entropy(cfg.model.vocab).bits_per_byte, 4))
    return summary


def _two_d_split(cfg: JobConfig, inner: int) -> str:
    """--sp-attention ulysses-ring's split, in words for the log."""
    sp, heads = cfg.parallel.sp, cfg.model.heads
    kv = cfg.model.kv_heads or heads
    chosen = f"--sp-inner {inner}" if cfg.parallel.sp_inner else \
        f"--sp-inner auto: the largest divisor of sp={sp} dividing heads={heads}, at most 8"
    shape = "ring attention only" if inner == 1 else "Ulysses only" if inner == sp else \
        f"Ulysses all-to-all over {inner} consecutive ranks, ring over {sp // inner}"
    copies = f"; {kv} K/V heads repeated to {math.lcm(kv, inner)}" if inner > 1 and kv % inner else ""
    return f"sp={sp} = inner {inner} x outer {sp // inner} ({shape}; {chosen}{copies})"


def _ring_kernel(cfg: JobConfig, device) -> str:
    """What ``--attention-kernel`` means here, in words for the log."""
    dtype = attention_block_dtype(cfg)
    kernel = resolve_kernel(cfg.parallel.attention_kernel, device, dtype, cfg.model.dim // cfg.model.heads)
    detail = "loom's explicit softmax" if kernel == "explicit" else \
        "PyTorch's fused attention (flash / memory-efficient), explicit for masked tiles"
    dtype_name = str(dtype).removeprefix("torch.")
    chunks = cfg.parallel.ring_head_chunks
    per_chunk = f"; each ring runs once per chunk of K/V heads ({chunks} chunks, --ring-head-chunks)" \
        if chunks > 1 else ""
    return (f"{kernel}: {detail} (--attention-kernel {cfg.parallel.attention_kernel}; {dtype_name} on {device})"
            f"{per_chunk}")


def gradient_sync(cfg: JobConfig, model: torch.nn.Module, mesh):
    """How the step's gradients meet: `ExpertParallelGradientSync` (every
    rank holds everything), or, with ``--shard-state grads|params``, the
    model sharded in place by `shard_data_parallel` (FSDP2).  Both have
    ``sync()`` and ``clip_grad_norm_(max_norm)``."""
    bucket_bytes = int(cfg.parallel.bucket_mb * 2**20)
    if cfg.parallel.shard_state == "none":
        return ExpertParallelGradientSync(model, None, ep_group=mesh.ep_group, edp_group=mesh.edp_group,
                                          bucket_bytes=bucket_bytes)
    if dist.get_world_size() == 1:
        logging.getLogger("loom.launch").warning(
            "--shard-state %s on one rank shards nothing (each shard is the whole tensor) and only adds "
            "FSDP2's hooks; it pays off from two ranks on", cfg.parallel.shard_state)
    return shard_data_parallel(model, cfg.parallel.shard_state, ep_group=mesh.ep_group, edp_group=mesh.edp_group,
                               bucket_bytes=bucket_bytes)


def _stop_here(cfg: JobConfig, step: int, stop_check, device) -> bool:
    """After step ``step``: whether every rank stops at the checkpoint just
    saved (any rank's ``stop_check()`` true; agreed by one all-reduce)."""
    every, done = cfg.ckpt.ckpt_every, step + 1
    if not every or done % every or done >= cfg.train.steps:
        return False
    flag = torch.tensor([1.0 if stop_check() else 0.0], dtype=torch.float64, device=device)
    return comms.all_reduce(flag, "max").item() > 0


def apply_training_essentials(cfg: JobConfig, model: torch.nn.Module, amp: MixedPrecision) -> torch.nn.Module:
    """Activation checkpointing, mixed precision and torch.compile, applied
    from outside the model (after its parallel plans), in that order."""
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    amp.apply(model)
    if cfg.train.compile:
        problem = compile_problem(amp.device.type)
        if problem:
            raise ConfigError(problem)
        model.compile()  # in place: parameter names (and checkpoints) stay as they are
    return model


def compile_problem(device_type: str, which=shutil.which) -> str | None:
    """Why --compile cannot work here, or None: on CPU, torch.compile's
    default (inductor) backend builds C++ kernels with ``$CXX`` or ``g++``."""
    if device_type != "cpu":
        return None
    compiler = os.environ.get("CXX") or "g++"
    if which(compiler) is None:
        return (f"--compile on CPU needs a C++ compiler for torch.compile's inductor backend: {compiler!r} "
                f"is not on PATH (install g++, or set CXX to one), or drop --compile")
    return None


def _forward_backward(model, micro_batches, amp: MixedPrecision) -> torch.Tensor:
    """This rank's share of the global batch, forward and backward in
    --grad-accum equal micro-batches (`micro_batches`), their gradients summed in ``.grad``.
    Returns this rank's loss (the mean over its share; detached).

    Every rank's loss is the mean over an equal share of the global batch's
    tokens, so gradients averaged over all ranks (dp and sp: ring attention
    already sent each rank's dK/dV home) are the global mean's; each
    micro-batch's mean is weighted 1/N so that the N sum to it.  The MoE
    load-balancing loss is a statistic of one forward: each micro-batch's is
    weighted 1/N too (their mean, not the whole batch's)."""
    n = len(micro_batches)
    total = None
    for inputs, targets, context in micro_batches:
        loss = next_token_loss(model(inputs, **context), targets) + moe_aux_loss(model)
        if n > 1:
            loss = loss / n
        amp.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _hdp_forward_backward(cfg: JobConfig, model, data, step: int, world: int, cost, device,
                          amp: MixedPrecision, grads=None):
    """One --hdp step's forward and backward: a long-tail batch, scheduled over
    every rank.  Returns (this rank's loss part, the global batch's sequence lengths).
    The loss parts are scaled by the world size because gradients (and the
    reported loss) are averaged over ranks, and the parts sum to the batch's mean.
    With --grad-accum N the batch's sequences go in N equal groups, each
    scheduled and run on its own; a group's loss is the per-token mean over
    its tokens, so it is weighted by its share of the batch's tokens.

    Sharded (``grads`` a `ShardedDataParallel`): ranks run different numbers
    of micro-batches, so the parameters are gathered once for the whole
    step and the gradients reduced once at its end, by a zero-loss forward
    and backward of one token that every rank runs."""
    sharded = isinstance(grads, ShardedDataParallel)
    with grads.gathered() if sharded else contextlib.nullcontext():
        loss_and_lengths = _hdp_micro_batches(cfg, model, data, step, world, cost, device, amp)
    if sharded:
        one = torch.zeros((1, 1), dtype=torch.long, device=device)
        (model(one).float().sum() * 0.0).backward()
    return loss_and_lengths


def _hdp_micro_batches(cfg: JobConfig, model, data, step: int, world: int, cost, device, amp: MixedPrecision):
    """`_hdp_forward_backward`'s micro-batches: (loss part, lengths)."""
    if isinstance(data, DocumentDraws):  # real documents, their own lengths
        sequences = data.documents(step)
        lengths = [len(s) - 1 for s in sequences]
    else:  # the synthetic task's lognormal lengths
        lengths = data.lengths(step, cfg.train.batch_size, **varlen_options(cfg))
        sequences = [data.sample(step, i, n) for i, n in enumerate(lengths)]
    total, per = sum(lengths), len(lengths) // cfg.train.grad_accum
    loss = None
    for k in range(cfg.train.grad_accum):
        part = slice(k * per, (k + 1) * per)
        schedule = hdp_schedule(lengths[part], world, hdp_capacity(cfg), cost=cost)
        share = world * sum(lengths[part]) / total  # world (exactly) without accumulation
        part_loss = hdp_forward_backward(model, sequences[part], schedule, device=device,
                                         loss_scale=share * amp.loss_scale,
                                         kernel=cfg.parallel.attention_kernel,
                                         head_chunks=cfg.parallel.ring_head_chunks) / amp.loss_scale
        loss = part_loss if loss is None else loss + part_loss
    return loss, lengths
