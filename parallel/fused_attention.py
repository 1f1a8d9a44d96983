"""Fused block kernels for ring attention: PyTorch's flash attention with its LSE.

Ring attention merges the partial results of (query block, key block) pairs
by their log-sum-exp, so a block kernel must return it.  PyTorch's fused
flash attention does: on CPU ``aten._scaled_dot_product_flash_attention_for_cpu``
returns ``(out, logsumexp)``, and its backward op takes the *final* output
and LSE, which is exactly what a ring's backward has for each block pair
(``P = exp(S - lse_final)``, ``delta = rowsum(dO * O_final)``; Liu et al.,
Ring Attention, 2023; Dao, FlashAttention-2, 2023).

A fused kernel computes the unmasked tiles and a shard's own causal block
(the lower triangle of a square: global positions rise in local order under
both layouts); every other mask (partial pairs, packed documents) and an LSE that receives
a gradient run loom's explicit kernel (`loom.parallel.attention_blocks`),
which stays the reference.  Grouped-query attention expands K/V to the query
heads for the kernel and sums their gradients back.

Kernels are chosen per device: CPU has the fused kernel here; on CUDA the
flash / memory-efficient ops return an LSE padded per device, not wired yet,
so ``"auto"`` picks the explicit kernel there and ``"fused"`` is refused.
"""
from __future__ import annotations

import torch

from .attention_blocks import accumulation_dtype

KERNELS = ("auto", "fused", "explicit")
"""Block kernels: ``auto`` (fused where it exists for the device and dtype,
explicit for float64, which stays exact), ``fused`` (refused where none
exists), ``explicit`` (loom's own softmax in float32/float64)."""

_FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def check_kernel(kernel: str) -> str:
    """``kernel`` when it is one of `KERNELS`; ValueError otherwise."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} must be one of {', '.join(KERNELS)}")
    return kernel


def fused_exists(device, dtype: torch.dtype) -> bool:
    """Whether a fused block kernel returning the LSE exists for ``dtype`` on ``device``."""
    return dtype in _FUSED_DTYPES.get(torch.device(device).type, ())


def resolve_kernel(kernel: str, device, dtype: torch.dtype) -> str:
    """``"fused"`` or ``"explicit"``: what ``kernel`` means for a block of
    ``dtype`` on ``device``.  Raises ValueError for an unknown kernel, or
    ``"fused"`` where no fused kernel exists."""
    check_kernel(kernel)
    kind = torch.device(device).type
    available = fused_exists(device, dtype)
    if kernel == "fused" and not available:
        raise ValueError(f"attention kernel 'fused': no fused kernel returning the LSE for {dtype} on {kind} "
                         f"(fused: {', '.join(sorted(_FUSED_DTYPES))} only); use 'auto' or 'explicit'")
    if kernel == "auto":
        return "fused" if available and dtype != torch.float64 else "explicit"
    return kernel


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v ``[b, s, hkv, d]`` -> ``[b, heads, s, d]`` (query head h reads
    K/V head ``h // (heads / hkv)``, as the explicit kernel groups them)."""
    rep = heads // x.shape[2]
    x = x.transpose(1, 2)
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def fused_block_forward(q, k, v, scale: float, causal: bool):
    """Attention of q ``[b, sq, hq, d]`` over k, v ``[b, sk, hkv, d]``
    (``causal``: sq == sk, lower triangle) by the fused kernel.  Returns
    ``(out [b, sq, hq, d], lse [b, hq, sq])`` in the accumulation dtype, as
    `block_forward` does."""
    acc = accumulation_dtype(q.dtype)
    hq = q.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _expand(k, hq), _expand(v, hq), 0.0, causal, scale=scale)
    return out.transpose(1, 2).to(acc), lse.to(acc)


def fused_block_backward(q, k, v, dout, out, lse, scale: float, causal: bool, dk_acc, dv_acc):
    """Gradients of one block pair by the fused kernel, from the final
    (merged) ``out [b, sq, hq, d]`` and ``lse [b, hq, sq]`` of the query
    rows; as `block_backward`: adds dK, dV into the heads-first
    ``[b, hkv, sk, d]`` accumulators and returns dq ``[b, sq, hq, d]``."""
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    kernel_lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype).transpose(1, 2), q.transpose(1, 2), _expand(k, hq), _expand(v, hq),
        out.to(q.dtype).transpose(1, 2), kernel_lse, 0.0, causal, scale=scale)
    for acc, g in ((dk_acc, dk), (dv_acc, dv)):
        acc += g.view(b, hkv, hq // hkv, *g.shape[2:]).sum(2)
    return dq.transpose(1, 2)
