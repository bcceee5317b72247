"""diffusers adapters: run diffusers models on musefast kernels without changing them.

``MusefastAttnProcessor`` is an attention processor for diffusers' ``Attention`` (set with
``attn.set_processor(...)`` or ``model.set_attn_processor(...)``): it does what diffusers'
SDPA processor does — spatial/group norm, 4-D inputs, cross-attention norm, q/k norms,
output projection, residual, rescale — but computes attention with
:func:`musefast.ops.attention`. diffusers itself is never imported here: the processor only
calls the ``Attention`` module it is given, so diffusers stays a test extra.

Masks: diffusers hands processors either a boolean mask or an additive bias (e.g. 0 for kept
keys and −10000 for padding). When it is a key padding mask — the same for every head and
query, 0 or ≤ −1e4 (exp underflows to exactly 0 in float32) — it runs through musefast; any
other bias, or a batch element whose keys are all masked by a finite bias (diffusers then
averages *all* values, where musefast defines zeros), falls back to torch SDPA with the
mask, exactly as diffusers computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from musefast.ops.attention import attention

_MASKED_BIAS = -1e4  # an additive bias at or below this takes no softmax mass in float32


def _as_key_padding_mask(mask: torch.Tensor, num_keys: int) -> torch.Tensor | None:
    """SDPA-style mask (B, heads, Lq or 1, Lk) -> (B, Lk) bool (True = attend), or None
    when it is not a key padding mask musefast reproduces exactly."""
    if mask.shape[-1] != num_keys:
        return None
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= _MASKED_BIAS)).all()):
            return None  # a real bias, not a padding mask
    key_mask = keep[:, 0, 0, :]
    if not bool((keep == key_mask[:, None, None, :]).all()):
        return None  # differs across heads or queries
    if mask.dtype != torch.bool and not bool(key_mask.any(dim=1).all()):
        return None  # all keys masked by a finite bias: diffusers' output is not zeros
    return key_mask


class MusefastAttnProcessor:
    """diffusers attention processor computing attention with ``musefast.ops.attention``.

    Args:
        backend: passed to ``ops.attention`` (None = the best available).

    The softmax scale is ``attn.scale`` (diffusers' ``dim_head ** -0.5``, or 1 with
    ``scale_qk=False``); diffusers' SDPA processor always uses 1/sqrt(head_dim), which is
    the same number unless ``scale_qk=False``.
    """

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) feature map -> (B, H·W, C) tokens
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        batch, num_keys = encoder_hidden_states.shape[:2]
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)

        scale = getattr(attn, "scale", None)
        key_padding_mask, sdpa_mask = None, None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, num_keys, batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
            key_padding_mask = _as_key_padding_mask(mask, num_keys)
            if key_padding_mask is None:
                sdpa_mask = mask
        if sdpa_mask is None:
            out = attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=self.backend)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
