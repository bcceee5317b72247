"""Thin nn.Modules over musefast ops."""
from musefast.nn.attention import Attention, CrossAttention, CrossAttentionKV
from musefast.nn.vq import VectorQuantizer

__all__ = ["VectorQuantizer", "Attention", "CrossAttention", "CrossAttentionKV"]
