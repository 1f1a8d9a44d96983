"""Mixed precision for the training loop (``--mixed-precision none|bf16|fp16``).

The parameters stay float32 (the master weights); the model's forward runs
under `torch.autocast` in bf16 or fp16, so matmuls compute in the low dtype
while the gradients that reach the parameters, their reduction across ranks
and the optimizer state are float32.  loom's own kernels keep their softmax
statistics (LSE) and scan states in float32 under autocast as they do for
low-precision inputs.

fp16 needs a gradient scaler (`torch.amp.GradScaler`): the loss is scaled
before the backward, the gradients are unscaled after their reduction and
before clipping, and a step whose gradients hold inf/NaN is skipped (and the
scale lowered).  Expert gradients differ by rank, so one rank can see an inf
that another does not: `AgreedGradScaler` all-reduces the found-inf flag
(through `loom.comms`), so every rank skips or steps together and every
rank's scale stays the same.
"""
from __future__ import annotations

import functools

import torch

from loom import comms

MODES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AgreedGradScaler(torch.amp.GradScaler):
    """A `torch.amp.GradScaler` whose inf/NaN decision is the same on every
    rank of ``group`` (default: the default group): `unscale_` takes the
    maximum of the ranks' found-inf flags, so `step` skips on every rank when
    any rank saw a non-finite gradient.  Collective: every rank calls
    `unscale_` (or `step`, which calls it) once per step."""

    def __init__(self, device: str = "cpu", group=None, **kwargs):
        super().__init__(device, **kwargs)
        self.group = group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self.is_enabled():
            return
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found:
            raise RuntimeError("AgreedGradScaler: the optimizer has no gradients to check for inf/NaN")
        flags = list(found.values())
        flag = torch.stack([f.reshape(()).to(flags[0].device) for f in flags]).amax().reshape(1)
        comms.all_reduce(flag, "max", self.group)  # one rank's inf is every rank's
        for f in flags:
            f.copy_(flag.reshape(f.shape).to(f.device))


class MixedPrecision:
    """The training loop's precision policy: ``mode`` is ``"none"``, ``"bf16"``
    or ``"fp16"``; ``device`` is where the model runs.  Use:

    ``mp.apply(model)`` once (its forward then runs under autocast), then per
    step ``mp.scale(loss).backward()`` for each micro-batch, the gradient
    reduction, ``mp.unscale_(opt)``, clipping, ``mp.step(opt)``.  With
    ``"none"`` every call is the plain float32 path.  ValueError for an
    unknown mode."""

    def __init__(self, mode: str = "none", device: torch.device | str = "cpu", group=None):
        if mode not in MODES:
            raise ValueError(f"mixed precision mode {mode!r} must be one of {list(MODES)}")
        self.mode, self.dtype = mode, MODES[mode]
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.scaler = AgreedGradScaler(self.device_type, group=group) if mode == "fp16" else None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Run ``model``'s forward under autocast (in place; its parameters,
        state_dict and module tree do not change).  Returns ``model``."""
        if self.dtype is None:
            return model
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):
            with torch.autocast(self.device_type, dtype=self.dtype):
                return forward(*args, **kwargs)

        model.forward = autocast_forward
        return model

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on (times the fp16 loss scale)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    @property
    def loss_scale(self) -> float:
        """The factor `scale` multiplies by (1.0 without a scaler), for a
        backward that scales its loss itself (`hdp_forward_backward`)."""
        if self.scaler is None:
            return 1.0
        return float(self.scaler.scale(torch.ones((), device=self.device)))  # (creates the scale once)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true scale (fp16), agreed inf/NaN check.
        Call after the gradient reduction and before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; False when fp16 skipped it (inf/NaN on some rank)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale only drops on a skipped step

    def state_dict(self) -> dict:
        """The scaler's state (empty without one): part of the checkpoint."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
