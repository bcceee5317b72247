"""Channels-last convolutions for the VQ decoders on a CPU (DESIGN §10: "Decode: VQ decoder in
fp32, channels-last convolutions").

torch runs a CPU convolution through oneDNN either way; with an NCHW activation it reorders the
input into oneDNN's channels-inner layout and the output back on every call, with an NHWC
(``torch.channels_last``) activation it does neither, and GroupNorm, SiLU, the residual adds and
nearest upsampling all keep that layout. So the whole decoder runs channels-last if its
*input* is: this path converts the activation once on the way in and once on the way out, and
leaves the weights as they are (oneDNN reorders a weight per call, which at the VQ's large
resolutions costs little next to the convolution, and keeps ``state_dict``, ``.to()`` and saving
ordinary with no second copy of the weights in memory).

A model opts in by having a ``conv_memory_format`` attribute (``VQGAN`` does); :func:`apply` sets
it to ``torch.channels_last``, :func:`remove` back to ``torch.contiguous_format`` (the plain path,
the reference twin). The model applies it to CPU tensors only: off the CPU nothing changes, and its
outputs stay NCHW contiguous. ``cpu.apply_default`` calls :func:`apply` at load.

The encoder stays NCHW: its output is tokens, and a rounding-level change of its features flips
argmin near-ties, which would break the compat samplers' promise of the peer's tokens for
image-to-image and inpainting (a Meissonic img2img fixture did flip).
"""
from __future__ import annotations

import torch
from torch import nn

ATTR = "conv_memory_format"


def _targets(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, ATTR)]


def apply(model: nn.Module) -> int:
    """Run every VQ decoder inside ``model`` channels-last on the CPU; returns how many models."""
    targets = _targets(model)
    for module in targets:
        setattr(module, ATTR, torch.channels_last)
    return len(targets)


def remove(model: nn.Module) -> None:
    """Back to the plain NCHW path."""
    for module in _targets(model):
        setattr(module, ATTR, torch.contiguous_format)


def is_applied(model: nn.Module) -> bool:
    return any(getattr(m, ATTR) == torch.channels_last for m in _targets(model))


def to_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` (B, C, H, W) in ``memory_format`` when it is a CPU tensor, else unchanged."""
    if x.device.type != "cpu" or x.dim() != 4:
        return x
    return x.contiguous(memory_format=memory_format)


__all__ = ["apply", "is_applied", "remove", "to_format"]
