"""Softmax attention inside packed documents, the kernel chosen per device.

Documents packed into the rows of a batch are given by ``cu_seqlens`` over
the batch flattened row-major (`check_cu_seqlens`): the flash-attn varlen
convention.  On a CUDA device (compute capability 8.0 or newer) in float16
or bfloat16, with a head dim flash attention takes, the rows are flattened
and PyTorch's varlen flash attention (`torch.nn.attention.varlen`, where
this PyTorch has it) attends within each document: no mask, no work across
documents.  Anywhere else (CPU, float32/float64, inside torch.compile's
graph, older GPUs or PyTorch) PyTorch's SDPA runs with a boolean
``[batch, 1, seq, seq]`` mask (same document, and causal when asked).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .attention_blocks import copy_to_device, document_mask

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _varlen():
    """``(varlen_attn, its parameter names)``, or None where PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    names = set(inspect.signature(varlen_attn).parameters)
    return (varlen_attn, names) if names & {"window_size", "is_causal"} else None


def kernel_for(q: torch.Tensor, scale: float | None = None, bounds=None) -> str:
    """``"flash-varlen"`` or ``"sdpa-mask"``: what `document_attention` runs for q."""
    found = _varlen()
    d = q.shape[-1]
    if (bounds is None or found is None or not q.is_cuda or q.dtype not in _HALF or d % 8 or d > 256
            or torch.cuda.get_device_capability(q.device) < (8, 0)
            or (scale is not None and "scale" not in found[1] and scale != d ** -0.5)):
        return "sdpa-mask"
    return "flash-varlen"


def document_attention(q, k, v, cu_seqlens, bounds=None, *, causal: bool, scale: float | None = None):
    """Attention of q ``[b, s, hq, d]`` over k, v ``[b, s, hkv, d]`` (hq
    divides by hkv) within the documents of ``cu_seqlens`` (int64, checked
    by the caller; ``bounds``: the same as a list of ints, None inside
    torch.compile's graph, where reading them back would break it).
    Returns the output like q."""
    if kernel_for(q, scale, bounds) == "flash-varlen":
        return _flash_varlen(q, k, v, bounds, causal=causal, scale=scale)
    b, s = q.shape[:2]
    mask = document_mask(cu_seqlens, b, s, causal=causal, device=q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _flash_varlen(q, k, v, bounds, *, causal: bool, scale: float | None):
    varlen_attn, names = _varlen()
    b, s, hq, d = q.shape
    starts = sorted(set(bounds))  # empty documents dropped
    longest = max(b2 - b1 for b1, b2 in zip(starts, starts[1:]))
    cu = copy_to_device(torch.tensor(starts, dtype=torch.int32), q.device)
    if k.shape[2] != hq and "enable_gqa" not in names:
        k, v = (t.repeat_interleave(hq // k.shape[2], dim=2) for t in (k, v))
    kw = {}
    if "window_size" in names:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if "enable_gqa" in names:
        kw["enable_gqa"] = k.shape[2] != hq
    if scale is not None and "scale" in names:
        kw["scale"] = scale
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    return varlen_attn(*flat, cu, cu, longest, longest, **kw).view(b, s, hq, d)
