"""``qk_norm_rope``: q/k RMSNorm + rotary embedding + head split of fused QKV projections, one pass.

FLUX-style attention (Meissonic) projects q, k, v in one matmul, RMS-normalises q and k per head
(each with its own weight), rotates them by the rotary tables and attends over the joint
[text; image] sequence. Done with PyTorch ops that is a head-split view, two norms, a float32
round trip for the rotation and a concatenation of the streams: several passes and copies. Here
each row of each stream is read once and q, k, v are written once, straight into the (B, H, L, D)
layout ``ops.attention`` reads, each stream at its row offset of the joint sequence.

Semantics: :func:`musefast.reference.rope.qk_norm_rope` per stream (the definition), streams
joined along L. Math in float32, one rounding to the input dtype at the end.

Backends, in priority order: ``cuda`` (csrc/cuda/rope.cu), ``triton`` (musefast.kernels.rope; CUDA,
or CPU under TRITON_INTERPRET=1), ``cpu`` (csrc/rope.cpp), ``reference``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from musefast.ops import _availability as avail
from musefast.ops import traceable
from musefast.ops.registry import op
from musefast.reference import rope as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_list(x, name: str, n: int | None = None) -> list:
    items = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, Sequence) else None
    if items is None or not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors, got {type(x).__name__}")
    if n is not None and len(items) != n:
        raise ValueError(f"{name} must give one tensor per qkv stream ({n}), got {len(items)}")
    return items


def _check_inputs(qkv: list, q_weight: list, k_weight: list, cos, sin, heads, eps) -> None:
    if not isinstance(heads, numbers.Integral) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    first = qkv[0]
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {first.dtype}")
    if first.dim() != 3 or first.shape[2] % (3 * heads) or (first.shape[2] // (3 * heads)) % 2:
        raise ValueError(f"qkv must be (B, L, 3·heads·D) with heads={heads} and D even, got {tuple(first.shape)}")
    B, _, width = first.shape
    D = width // (3 * heads)
    for i, t in enumerate(qkv):
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != width:
            raise ValueError(f"qkv[{i}] must be (B={B}, L, {width}) like qkv[0], got {tuple(t.shape)}")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"qkv[{i}] is {t.dtype} on {t.device}, qkv[0] {first.dtype} on {first.device}")
    for name, weights in (("q_weight", q_weight), ("k_weight", k_weight)):
        for w in weights:
            if w.shape != (D,) or not w.dtype.is_floating_point or w.device != first.device:
                raise ValueError(f"{name} must be ({D},) floating on {first.device}, got {tuple(w.shape)} "
                                 f"{w.dtype} on {w.device}")
    L = sum(t.shape[1] for t in qkv)
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
        if table.shape != (L, D // 2) or table.dtype != torch.float32 or table.device != first.device:
            raise ValueError(f"{name} must be float32 ({L}, {D // 2}) (positions x channel pairs) on "
                             f"{first.device}, got {table.dtype} {tuple(table.shape)} on {table.device}")


# -- backends: each takes validated arguments (lists of streams, tables, heads, eps) and returns
# the stacked (3, B, H, L, D) output.

def _reference(qkv, q_weight, k_weight, cos, sin, heads, eps):
    parts, start = [], 0
    for x, wq, wk in zip(qkv, q_weight, k_weight):
        rows = slice(start, start + x.shape[1])
        full = (t[rows].repeat_interleave(2, dim=1) for t in (cos, sin))
        parts.append(ref.qk_norm_rope(x, wq, wk, *full, heads, eps))
        start = rows.stop
    return torch.cat(parts, dim=3)


def _compiled(qkv, q_weight, k_weight, cos, sin, heads, eps):
    return torch.ops.musefast.qk_norm_rope(qkv, q_weight, k_weight, cos.contiguous(), sin.contiguous(), heads, eps)


def _triton(qkv, q_weight, k_weight, cos, sin, heads, eps):
    from musefast.kernels.rope import qk_norm_rope_triton

    return qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, heads, eps)


def _cpu_reasons(qkv, *args):
    return avail.device_reasons("cpu", qkv[0]) or avail.extension_reasons("qk_norm_rope", "cpu")


def _cuda_reasons(qkv, *args):
    return avail.device_reasons("cuda", qkv[0]) or avail.extension_reasons("qk_norm_rope", "cuda")


def _triton_reasons(qkv, *args):
    return avail.triton_reasons(qkv[0])


QK_NORM_ROPE = op("qk_norm_rope")
QK_NORM_ROPE.register("cuda", _compiled, _cuda_reasons, auto_devices=("cuda",), compiled=True)
QK_NORM_ROPE.register("triton", _triton, _triton_reasons, auto_devices=("cuda",), compiled=True)
QK_NORM_ROPE.register("cpu", _compiled, _cpu_reasons, auto_devices=("cpu",), compiled=True)
QK_NORM_ROPE.register("reference", _reference, lambda *args: [])


def _probe(device):
    B, L, H, D = 1, 3, 2, 8
    w = torch.ones(D, device=device)
    tables = torch.ones(L, D // 2, device=device), torch.zeros(L, D // 2, device=device)
    return ([torch.randn(B, L, 3 * H * D, device=device)], [w], [w], *tables, H, 1e-6), {}


QK_NORM_ROPE.probe = _probe


def qk_norm_rope(qkv: torch.Tensor | Sequence[torch.Tensor], q_weight: torch.Tensor | Sequence[torch.Tensor],
                 k_weight: torch.Tensor | Sequence[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, *,
                 heads: int, eps: float = 1e-6,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for attention from fused QKV projections: per-head RMSNorm of q and k, rotary embedding.

    Args:
        qkv: (B, L, 3·H·D) float32/float16/bfloat16, the output of a fused q/k/v projection
            (q, k, v each H heads of D channels, D even; any strides), or a sequence of such
            streams (e.g. [text, image]) with the same B and width, joined along L in order.
        q_weight, k_weight: (D,) RMSNorm weights of q and k, or one per stream.
        cos, sin: (L_total, D/2) float32 tables of the joint sequence, one angle per channel pair
            (:class:`musefast.nn.rope.RopeTables`); pair (2i, 2i+1) turns to
            (y₀·cos − y₁·sin, y₁·cos + y₀·sin). A zero angle (cos 1, sin 0) is an exact identity.
        heads: H.
        eps: added to the mean square before the reciprocal square root.

    Returns:
        (q, k, v), each (B, H, L_total, D) in qkv's dtype: views of one contiguous buffer.
    """
    qkv = _as_list(qkv, "qkv")
    q_weight, k_weight = _as_list(q_weight, "q_weight", len(qkv)), _as_list(k_weight, "k_weight", len(qkv))
    _check_inputs(qkv, q_weight, k_weight, cos, sin, heads, eps)
    args = (qkv, q_weight, k_weight, cos, sin, int(heads), float(eps))
    if torch.compiler.is_compiling():
        out = traceable.qk_norm_rope(*args, backend)
    else:
        out = QK_NORM_ROPE(*args, backend=backend, device_type=qkv[0].device.type)
    return out.unbind(0)
