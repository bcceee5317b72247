"""Thin nn.Modules over musefast ops."""
from musefast.nn.vq import VectorQuantizer

__all__ = ["VectorQuantizer"]
