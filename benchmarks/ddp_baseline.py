"""The peer of `train_throughput.py`: a plain PyTorch DistributedDataParallel
script on loom's reference model and synthetic data, as a user would write it.

    torchrun --standalone --nproc-per-node 2 benchmarks/ddp_baseline.py --steps 30 --out times.json

Same model (`loom.parallel.Transformer`, the same seed), same global batch
(the same `SyntheticData` samples, split over the ranks), AdamW with the same
learning rate, warm-up and gradient clipping, one intra-op thread per rank.
Rank 0 writes each step's wall time (seconds), the losses and the largest
peak resident set size over the ranks (bytes) to ``--out``.

With ``--hf-config PATH`` (a local transformers ``config.json`` or its
directory) the model is ``AutoModelForCausalLM.from_config`` of it with
transformers' own SDPA attention (``attn_implementation="sdpa"``), seeded
alike, its vocabulary the config's: the peer of ``loom train --hf-config``
(`benchmarks/hf_models.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from loom.launch.metrics import peak_memory
from loom.parallel import ModelConfig, SyntheticData, Transformer, next_token_loss


class _HFLogits(torch.nn.Module):
    """A transformers causal LM as ``tokens [b, s] -> logits [b, s, vocab]``."""

    def __init__(self, path: str):
        super().__init__()
        import transformers
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        self.lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                                dtype=torch.float32)

    def forward(self, tokens):
        return self.lm(input_ids=tokens, use_cache=False).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hf-config", default="", help="train this transformers config (SDPA attention) instead")
    ap.add_argument("--out", required=True, help="JSON file for rank 0's step times")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if args.hf_config:
        net = _HFLogits(args.hf_config)
        args.vocab = net.lm.config.vocab_size
    else:
        net = Transformer(ModelConfig(vocab=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads))
    model = DistributedDataParallel(net)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, args.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    data = SyntheticData(args.vocab, args.seq_len, seed=0)
    local = args.batch_size // world
    times, losses = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs, targets = data.batch(step, range(rank * local, (rank + 1) * local))
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    peak = torch.tensor([peak_memory(torch.device("cpu"))[1]], dtype=torch.float64)
    dist.all_reduce(peak, dist.ReduceOp.MAX)
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump({"step_time_s": times, "loss": losses, "world": world, "peak_rss_bytes": int(peak.item()),
                       "tokens_per_step": args.batch_size * args.seq_len}, fh)
    dist.barrier()  # both ranks leave together: a rank tearing down while its peer still writes can hang
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
