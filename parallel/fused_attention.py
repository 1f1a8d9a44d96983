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

Kernels are chosen per device (`cuda_backend`): CPU runs
``_scaled_dot_product_flash_attention_for_cpu`` (float32/bfloat16/float16,
and float64 when asked); CUDA runs FlashAttention-2
(``_scaled_dot_product_flash_attention``: float16/bfloat16, head dim a
multiple of 8 up to 256, sm80+) or else the memory-efficient kernel
(``_scaled_dot_product_efficient_attention``, xFormers' CUTLASS kernel:
float32/float16/bfloat16, head dim a multiple of 4 / 8), whose LSE comes
padded to a multiple of 32 query rows (sliced on the way out, padded again
for its backward).  No CUDA kernel takes float64: the explicit one runs.
The CUDA calls are exercised here on meta tensors (shapes and signatures,
tests/test_fused_attention.py); their numerics are PyTorch's.
"""
from __future__ import annotations

import torch

from .attention_blocks import accumulation_dtype

KERNELS = ("auto", "fused", "explicit")
"""Block kernels: ``auto`` (fused where it exists for the device and dtype,
explicit for float64, which stays exact), ``fused`` (refused where none
exists), ``explicit`` (loom's own softmax in float32/float64)."""

_FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                 "cuda": (torch.float32, torch.bfloat16, torch.float16),
                 "meta": (torch.float32, torch.bfloat16, torch.float16)}  # meta: the CUDA calls, for tests
_HALF = (torch.float16, torch.bfloat16)
_LSE_ROWS = 32  # the memory-efficient kernel pads its LSE to a multiple of this many query rows


def check_kernel(kernel: str) -> str:
    """``kernel`` when it is one of `KERNELS`; ValueError otherwise."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} must be one of {', '.join(KERNELS)}")
    return kernel


def cuda_backend(dtype: torch.dtype, head_dim: int | None, capability: tuple[int, int] | None) -> str | None:
    """Which CUDA kernel takes a block: ``"flash"`` (FlashAttention-2: half
    dtypes, head dim % 8 == 0 and <= 256, compute capability >= 8.0),
    ``"efficient"`` (memory-efficient: float32 with head dim % 4 == 0, half
    dtypes with % 8 == 0), or None (the explicit kernel).  ``head_dim`` None:
    not known yet (validation), assumed to fit; ``capability`` None: assumed
    to lack flash."""
    if dtype not in _FUSED_DTYPES["cuda"]:
        return None
    fits = head_dim is None or head_dim % 8 == 0
    if dtype in _HALF and fits and (head_dim or 0) <= 256 and capability is not None and capability >= (8, 0):
        return "flash"
    if head_dim is None or head_dim % (8 if dtype in _HALF else 4) == 0:
        return "efficient"
    return None


def _backend(device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    kind = torch.device(device).type
    if dtype not in _FUSED_DTYPES.get(kind, ()):
        return None
    if kind == "cpu":
        return "cpu"
    capability = None
    if kind == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(torch.device(device))
    return cuda_backend(dtype, head_dim, capability)


def fused_exists(device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """Whether a fused block kernel returning the LSE exists for ``dtype``
    (and ``head_dim``, when given) on ``device``."""
    return _backend(device, dtype, head_dim) is not None


def resolve_kernel(kernel: str, device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """``"fused"`` or ``"explicit"``: what ``kernel`` means for a block of
    ``dtype`` (head dim ``head_dim``, when known) on ``device``.  Raises
    ValueError for an unknown kernel, or ``"fused"`` where no fused kernel
    exists."""
    check_kernel(kernel)
    kind = torch.device(device).type
    available = fused_exists(device, dtype, head_dim)
    if kernel == "fused" and not available:
        shape = "" if head_dim is None else f" and head dim {head_dim}"
        raise ValueError(f"attention kernel 'fused': no fused kernel returning the LSE for {dtype}{shape} on "
                         f"{kind} (cpu: float32/bfloat16/float16/float64; cuda: float32/bfloat16/float16 with "
                         f"head dim a multiple of 8, or of 4 for float32); use 'auto' or 'explicit'")
    if kernel == "auto":
        return "fused" if available and dtype != torch.float64 else "explicit"
    return kernel


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` -> ``[b, h, s, d]``, a view unless the head dim is
    strided: the fused kernels read rows of d contiguous elements (a strided
    last dim gave wrong results, silently, on CPU)."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v ``[b, s, hkv, d]`` -> ``[b, heads, s, d]`` (query head h reads
    K/V head ``h // (heads / hkv)``, as the explicit kernel groups them)."""
    rep = heads // x.shape[2]
    x = _kernel_layout(x)
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def fused_block_forward(q, k, v, scale: float, causal: bool):
    """Attention of q ``[b, sq, hq, d]`` over k, v ``[b, sk, hkv, d]``
    (``causal``: sq == sk, lower triangle) by the fused kernel.  Returns
    ``(out [b, sq, hq, d], lse [b, hq, sq])`` in the accumulation dtype, as
    `block_forward` does."""
    acc = accumulation_dtype(q.dtype)
    hq, sq = q.shape[2], q.shape[1]
    qh, kh, vh = _kernel_layout(q), _expand(k, hq), _expand(v, hq)
    backend = _backend(q.device, q.dtype, q.shape[-1])
    if backend == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    elif backend == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
    elif backend == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
        lse = lse[..., :sq]
    else:
        raise ValueError(f"no fused attention kernel for {q.dtype}, head dim {q.shape[-1]} on {q.device}")
    return out.transpose(1, 2).to(acc), lse.to(acc)


def _padded_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse [b, h, sq]`` padded (zeros) to the memory-efficient kernel's
    multiple of `_LSE_ROWS` query rows, as its forward returned it."""
    pad = -lse.shape[-1] % _LSE_ROWS
    return torch.nn.functional.pad(lse, (0, pad)) if pad else lse.contiguous()


def fused_block_backward(q, k, v, dout, out, lse, scale: float, causal: bool, dk_acc, dv_acc):
    """Gradients of one block pair by the fused kernel, from the final
    (merged) ``out [b, sq, hq, d]`` and ``lse [b, hq, sq]`` of the query
    rows; as `block_backward`: adds dK, dV into the heads-first
    ``[b, hkv, sk, d]`` accumulators and returns dq ``[b, sq, hq, d]``."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kernel_lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    args = (_kernel_layout(dout.to(q.dtype)), _kernel_layout(q), _expand(k, hq), _expand(v, hq),
            _kernel_layout(out.to(q.dtype)))
    backend = _backend(q.device, q.dtype, q.shape[-1])
    if backend == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, kernel_lse, 0.0, causal, scale=scale)
    elif backend in ("flash", "efficient"):
        # no dropout: the RNG state the kernels take is never read
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
        if backend == "flash":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                *args, kernel_lse.contiguous(), None, None, sq, sk, 0.0, causal, seed, offset, scale=scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                *args[:4], None, args[4], _padded_lse(kernel_lse), seed, offset, 0.0, [True, True, True, False],
                causal, scale=scale)[:3]
    else:
        raise ValueError(f"no fused attention kernel for {q.dtype}, head dim {q.shape[-1]} on {q.device}")
    for acc, g in ((dk_acc, dk), (dv_acc, dv)):  # GQA: the query heads sharing a K/V head add up
        acc += g if hq == hkv else g.view(b, hkv, hq // hkv, *g.shape[2:]).sum(2)
    return dq.transpose(1, 2)
