"""The public ops as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

Backend selection reads the environment, a context variable (``use_backend``) and the
self-check verdicts: Python that dynamo cannot (and should not) trace. Under compilation the
public ops call these custom ops instead; dynamo records one opaque node per call, and the node's
eager body runs the ordinary registry dispatch when the compiled graph executes, so a compiled
model picks exactly the backends the eager one would (and a CUDA graph captures the kernels).
Outside compilation the public ops never come here: a custom op costs ~10 µs per call. Each body
finds its op in the registry by name, so the op modules (which call these) import this one and
not the other way round.

Custom ops may not return views of their inputs and must match their fake's strides, so each
body returns fresh, contiguous tensors.
"""
from __future__ import annotations

import torch

from musefast.ops.registry import op

_NAMESPACE = "musefast_dispatch"  # not "musefast": that namespace belongs to the C++ TORCH_LIBRARY


def _fresh(out: torch.Tensor, *inputs) -> torch.Tensor:
    out = out.contiguous()
    for t in inputs:
        if isinstance(t, torch.Tensor) and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return out.clone()
    return out


@torch.library.custom_op(f"{_NAMESPACE}::vq_nearest", mutates_args=())
def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    indices, distances = op("vq_nearest")(z, codebook, backend=backend, device_type=z.device.type)
    return _fresh(indices, z, codebook), _fresh(distances, z, codebook)


@vq_nearest.register_fake
def _(z, codebook, backend):
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
              scale: float | None, backend: str | None) -> torch.Tensor:
    out = op("attention")(q, k, v, key_padding_mask, scale, backend=backend, device_type=q.device.type)
    return _fresh(out, q, k, v)


@attention.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op(f"{_NAMESPACE}::cfg_sample_remask", mutates_args=())
def cfg_sample_remask(logits: torch.Tensor, uncond: torch.Tensor | None, tokens: torch.Tensor, masked: torch.Tensor,
                      num_to_mask: torch.Tensor, guidance_scale: float, temperature: float, choice_temperature: float,
                      top_k: int, confidence: str, seed_hi: int, seed_lo: int, step: int,
                      backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    # The seed travels as two 32-bit halves: a schema int is int64 and seeds go up to 2**64.
    seed = (seed_hi << 32) | seed_lo
    out_tokens, out_masked = op("cfg_sample_remask")(
        logits, uncond, tokens, masked, num_to_mask, guidance_scale, temperature, choice_temperature, top_k,
        confidence, seed, step, backend=backend, device_type=logits.device.type)
    return _fresh(out_tokens, tokens, masked), _fresh(out_masked, tokens, masked)


@cfg_sample_remask.register_fake
def _(logits, uncond, tokens, masked, num_to_mask, guidance_scale, temperature, choice_temperature, top_k,
      confidence, seed_hi, seed_lo, step, backend):
    return tokens.new_empty(tokens.shape), masked.new_empty(masked.shape)


@torch.library.custom_op(f"{_NAMESPACE}::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: list[torch.Tensor], q_weight: list[torch.Tensor], k_weight: list[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float, backend: str | None) -> torch.Tensor:
    out = op("qk_norm_rope")(qkv, q_weight, k_weight, cos, sin, heads, eps, backend=backend, device_type=cos.device.type)
    return _fresh(out, *qkv)


@qk_norm_rope.register_fake
def _(qkv, q_weight, k_weight, cos, sin, heads, eps, backend):
    B, _, width = qkv[0].shape
    return qkv[0].new_empty(3, B, heads, sum(x.shape[1] for x in qkv), width // (3 * heads))
