"""Your own training loop on loom's workers (README: "Your own training loop").

    python examples/user_loop.py

`train_fn` runs on every rank with torch.distributed initialised (gloo on CPU,
NCCL on GPU): a float64 linear regression, data parallel over the ranks, with
gradients averaged through loom (so the fault monitor watches them) and one
`loom.launch.report` per step.
"""
import os

import torch

import loom.launch
from loom import comms
from loom.parallel import GradientSync


def make_data(n: int = 64, dim: int = 8, seed: int = 0):
    """Inputs [n, dim] and targets [n, 1] (float64) of a noisy linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def train_fn(config):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    x, y = make_data(seed=config["seed"])
    mine = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's share of the batch
    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    model = torch.nn.Linear(x.shape[1], 1, dtype=torch.float64).to(loom.launch.device())
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    grads = GradientSync(model.parameters())  # averages gradients over the ranks
    for _ in range(config["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        grads.sync()
        opt.step()
        mean_loss = comms.all_reduce(loss.detach().reshape(1), op="sum").item() / world
        loom.launch.report({"loss": mean_loss})  # rank 0's rows reach the driver
    return model.weight.detach().cpu()


if __name__ == "__main__":  # the workers import this file: start the job only when run as a script
    result = loom.launch.run(train_fn, config={"lr": 0.1, "steps": 30, "seed": 0}, workers=2,
                             steps=30, name="user-loop")
    print(f"final loss {result.metrics['loss']:.6f}; rank 0 returned weights of shape "
          f"{tuple(result.value.shape)}; run directory {result.run_dir}")
