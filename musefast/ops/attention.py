"""``attention``: bidirectional self-/cross-attention with a key padding mask (SDPA layout).

Backends, in priority order on CUDA tensors: ``flash_attn`` (the flash-attn package, when
installed), ``sdpa`` (torch's scaled_dot_product_attention), ``triton``
(musefast.kernels.attention; ahead of the libraries only once a committed GPU benchmark shows
it faster — none does yet; on CPU only when asked for under ``TRITON_INTERPRET=1``),
``reference`` (musefast.reference.attention). On CPU tensors: ``bmm`` (batched matrix products
around a softmax, below: faster than SDPA's CPU kernel at aMUSEd's sizes), sdpa, then reference.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from musefast.ops import _availability as avail
from musefast.ops import traceable
from musefast.ops.registry import op
from musefast.reference import attention as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the widest head the Triton kernel keeps in registers (and flash-attn's limit)


def _check_inputs(q, k, v, key_padding_mask, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D) (SDPA layout), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H, Lk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q and k must have the same batch and head sizes (B, H), got {tuple(q.shape[:2])} and {tuple(k.shape[:2])}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q's head dim (D={q.shape[3]}) must equal k's and v's (D={k.shape[3]})")
    if q.shape[3] == 0:
        raise ValueError("head dim D must be at least 1, got 0")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (Lk >= 1), got Lk = 0")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        expected = (k.shape[0], k.shape[2])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = {expected}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}: use one device")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")


# -- backends: each takes (q, k, v, key_padding_mask, scale), inputs already checked -------

def _reference(q, k, v, key_padding_mask, scale):
    return ref.attention(q, k, v, key_padding_mask, scale)


def _triton(q, k, v, key_padding_mask, scale):
    from musefast.kernels.attention import attention_triton

    return attention_triton(q, k, v, key_padding_mask, scale)


def _triton_reasons(q, k, v, key_padding_mask, scale):
    reasons = avail.triton_reasons(q, k, v)
    if q.shape[3] > _MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[3]} > {_MAX_HEAD_DIM}")
    if not reasons:
        from musefast.kernels.attention import grid_reasons

        reasons += grid_reasons(q)
    return reasons


def _sdpa(q, k, v, key_padding_mask, scale):
    if key_padding_mask is None:
        # no attn_mask: SDPA may pick its flash backend
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :], scale=scale)
    # Some SDPA backends return NaN for a query with every key masked; the definition is 0.
    return torch.where(key_padding_mask.any(dim=-1)[:, None, None, None], out, 0)


# ``bmm``: CPU attention as two batched matrix products around a softmax. Cross-attention to the
# text (256 image tokens attending to 77 text tokens, 12 or 16 heads × 64) is small: a head's score
# matrix is 256 × 77, so a blockwise (flash) kernel saves no memory traffic worth its cost, while
# batched products over all B·H heads run at full width. Measured on the 2-core AVX512-BF16
# machine (shared, so CPU time at 1 thread, min of 7 rounds): bf16 cross-attention of B=2, 16
# heads to 77 keys 2.5 ms vs SDPA's 3.4 ms. Self-attention over 256 keys is faster in SDPA (see
# BMM_MAX_KEYS), and so is everything in float32, where the products go through MKL rather than
# oneDNN: the backend declines those (its reasons) and SDPA runs.

BMM_MAX_KEYS = 160
"""Key count up to which ``bmm`` beats SDPA (bf16, B=2, 16 heads × 64, 256 queries; CPU time at 1
thread, min of 7 rounds): 77 keys 2.5 vs 3.4 ms, 128 keys 3.3 vs 4.1, 160 keys 4.0 vs 4.8, 256 keys
13.5 vs 7.2 (likely: the float32 score matrices outgrow the cache)."""


def _bmm_reasons(q, k, v, key_padding_mask, scale):
    """CPU tensors in bfloat16 with at most :data:`BMM_MAX_KEYS` keys. In float32 the products go
    through MKL, and a whole aMUSEd-256 forward ran 4 % slower than with SDPA's kernel (CPU time,
    1 thread); float16 products are emulated."""
    out = []
    if q.device.type != "cpu":
        out.append(f"bmm runs on CPU tensors, got {q.device.type}")
    if q.dtype != torch.bfloat16:
        out.append(f"bmm takes bfloat16 only (in {q.dtype} SDPA's CPU kernel is as fast or faster)")
    if k.shape[2] > BMM_MAX_KEYS:
        out.append(f"bmm runs up to {BMM_MAX_KEYS} keys, got {k.shape[2]}: beyond, SDPA's blockwise kernel is faster")
    return out


def _bmm(q, k, v, key_padding_mask, scale):
    """softmax(q kᵀ · scale) v over (B, H, L, D) heads -> (B, H, Lq, D), contiguous.

    Precision: the scores are formed in float32 from the bf16 inputs, the softmax runs in float32,
    and the probabilities are rounded to bf16 for the product with V."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = ref.default_scale(D) if scale is None else scale
    # q and k in float32, made contiguous by that one conversion (the heads of a packed projection
    # come as strided views): rounded to bf16, the scores would be off by up to 2^-9 of their
    # size, which the softmax turns into errors beyond the agreement rule's bound
    # (tests/test_attention_bmm.py shows it).
    q3, k3 = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (q, k))
    q3, k3, v3 = q3.view(B * H, Lq, D), k3.view(B * H, Lk, D), v.reshape(B * H, Lk, D)
    scores = torch.baddbmm(q3.new_zeros(()).expand(B * H, Lq, Lk), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    if key_padding_mask is not None:
        scores.view(B, H, Lq, Lk).masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v3.dtype)
    out = torch.bmm(probs, v3).view(B, H, Lq, D)
    if key_padding_mask is not None:  # every key masked: softmax gave NaN, the definition is 0
        out = out.masked_fill(~key_padding_mask.any(dim=-1)[:, None, None, None], 0)
    return out


def flash_attn_forward(flash_attn, q, k, v, key_padding_mask, scale):
    """Attention through the flash-attn package (module passed in, so tests can fake it).

    Padded keys: the keys (only) are packed by the key mask and run through the varlen
    kernel; every query of every batch element is kept. Unpadding the queries with the key
    mask would drop image tokens (a bug seen elsewhere: it silently dropped the conditioning).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # flash-attn's layout is (B, L, H, D): a transpose of SDPA's, no copy for contiguous inputs
    q_bl, k_bl, v_bl = (t.transpose(1, 2) for t in (q, k, v))
    if key_padding_mask is None:
        out = flash_attn.flash_attn_func(q_bl, k_bl, v_bl, softmax_scale=scale, causal=False)
        return out.transpose(1, 2)
    seqlens_k = key_padding_mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens_k = F.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
    keys = key_padding_mask.reshape(B * Lk).nonzero().squeeze(1)
    k_packed = k_bl.reshape(B * Lk, H, D).index_select(0, keys)
    v_packed = v_bl.reshape(B * Lk, H, D).index_select(0, keys)
    cu_seqlens_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(
        q_bl.reshape(B * Lq, H, D), k_packed, v_packed,
        cu_seqlens_q, cu_seqlens_k, Lq, Lk,  # Lk bounds max_seqlen_k without a device sync
        softmax_scale=scale, causal=False,
    )
    out = out.reshape(B, Lq, H, D).transpose(1, 2)
    return torch.where((seqlens_k > 0)[:, None, None, None], out, 0)


def _flash_attn(q, k, v, key_padding_mask, scale):
    import flash_attn

    return flash_attn_forward(flash_attn, q, k, v, key_padding_mask, scale)


def _flash_attn_reasons(q, k, v, key_padding_mask, scale):
    if importlib.util.find_spec("flash_attn") is None:
        return ["flash-attn is not installed"]
    reasons = avail.device_reasons("cuda", q)
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash-attn needs float16 or bfloat16, got {q.dtype}")
    D = q.shape[3]
    if D % 8 or D > _MAX_HEAD_DIM:
        reasons.append(f"flash-attn needs a head dim that is a multiple of 8 and <= {_MAX_HEAD_DIM}, got {D}")
    if not reasons and torch.cuda.get_device_capability(q.device)[0] < 8:
        reasons.append("flash-attn 2 needs an Ampere or newer GPU (sm80+)")
    return reasons


ATTENTION = op("attention")
# Auto-selection order is a claim of speed: our Triton kernel goes ahead of the
# libraries (flash-attn, SDPA) only for the head dims / dtypes where a committed GPU benchmark
# (benchmarks/results/) shows it faster. None exists yet, so on CUDA tensors the libraries come
# first and Triton runs when asked for (backend="triton") or where they cannot.
ATTENTION.register("flash_attn", _flash_attn, _flash_attn_reasons, auto_devices=("cuda",))
ATTENTION.register("bmm", _bmm, _bmm_reasons, auto_devices=("cpu",))  # ahead of SDPA on CPU: see _bmm
ATTENTION.register("sdpa", _sdpa, lambda *args: [])
ATTENTION.register("triton", _triton, _triton_reasons, auto_devices=("cuda",), compiled=True)
ATTENTION.register("reference", _reference, lambda *args: [])


def _probe(device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    return (q, kv, kv, None, None), {}


ATTENTION.probe = _probe


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Bidirectional attention softmax(q kᵀ · scale) v over the attended keys.

    Args:
        q: (B, H, Lq, D) float32/float16/bfloat16.
        k, v: (B, H, Lk, D), q's dtype and device; Lk may differ from Lq (cross-attention).
        key_padding_mask: (B, Lk) bool, True = attend. A query whose keys are all masked
            gets zeros.
        scale: softmax scale; default 1/sqrt(D).
        backend: force a backend (``triton``, ``flash_attn``, ``bmm``, ``sdpa``, ``reference``);
            None = the best that can run these inputs.

    Returns:
        (B, H, Lq, D) in q's dtype (not necessarily contiguous).
    """
    _check_inputs(q, k, v, key_padding_mask, scale)
    if torch.compiler.is_compiling():
        return traceable.attention(q, k, v, key_padding_mask, None if scale is None else float(scale), backend)
    return ATTENTION(q, k, v, key_padding_mask, scale, backend=backend, device_type=q.device.type)
