"""The training loop every rank runs (under Ray or torchrun)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from loom import comms
from loom.parallel import GradientSync, SyntheticData, Transformer, next_token_loss

from .config import JobConfig


def resolve_device(device: str) -> torch.device:
    import os
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_model(cfg: JobConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return Transformer(cfg.model).to(device=device, dtype=getattr(torch, cfg.train.dtype))


def build_optimizer(cfg: JobConfig, model: torch.nn.Module):
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    warm = max(1, t.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return opt, sched


def train(cfg: JobConfig, reporter=None, step_hook=None) -> dict:
    """Run ``cfg.train.steps`` steps on the initialised process group.

    Returns a summary (rank 0's reporter also receives every step's metrics).
    ``step_hook(step)`` runs at the start of every step (fault injection).
    """
    t_start = time.monotonic()
    world = dist.get_world_size()
    mesh = comms.init_mesh(cfg.parallel.dp, cfg.parallel.sp, cfg.parallel.ep)
    device = resolve_device(cfg.job.device)
    model = build_model(cfg, device)
    opt, sched = build_optimizer(cfg, model)
    grads = GradientSync(model.parameters(), None, bucket_bytes=int(cfg.parallel.bucket_mb * 2**20))
    data = SyntheticData(cfg.model.vocab, cfg.train.seq_len, cfg.train.seed)
    local_batch = cfg.train.batch_size // cfg.parallel.dp
    first = mesh.dp_rank * local_batch
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    losses: list[float] = []
    t_loop = time.monotonic()
    for step in range(cfg.train.steps):
        t0 = time.monotonic()
        comms.set_step(step)
        if step_hook is not None:
            step_hook(step)
        inputs, targets = data.batch(step, range(first, first + local_batch))
        loss = next_token_loss(model(inputs.to(device)), targets.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.sync()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        # the mean over every rank's equal share of the global batch
        mean_loss = comms.all_reduce(loss.detach().double().reshape(1), "sum").item() / world
        losses.append(mean_loss)
        if reporter is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
            dt = time.monotonic() - t0
            reporter.step({"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                           "step_time_s": dt, "tokens_per_s": tokens_per_step / dt})
    comms.set_step(None)
    loop_time = time.monotonic() - t_loop
    return {"steps": cfg.train.steps, "first_loss": losses[0], "final_loss": losses[-1],
            "tokens_per_s": tokens_per_step * cfg.train.steps / loop_time,
            "wall_time_s": time.monotonic() - t_start, "losses": losses}
