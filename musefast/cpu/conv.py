"""Channels-last convolutions for the VQ decoders on a CPU (the decoder runs in fp32, on
channels-last activations).

torch runs a CPU convolution through oneDNN either way; with an NCHW activation it reorders the
input into oneDNN's channels-inner layout and the output back on every call, with an NHWC
(``torch.channels_last``) activation it does neither, and GroupNorm, SiLU, the residual adds and
nearest upsampling all keep that layout. So the whole decoder runs channels-last if its
*input* is: this path converts the activation once on the way in and once on the way out, and
stores the decoder's convolution weights channels-last too (in place, no second copy): with an
NCHW weight under an NHWC activation, torch reorders the weight on every call (measured at aMUSEd's
VQ architecture, 16×16 tokens, 2 threads: 1546 → 1395 ms per decode, bit-identical output).
``state_dict`` hands out NCHW-contiguous copies (safetensors saves contiguous tensors only), and
``load_state_dict`` / ``.to()`` keep working on the channels-last parameters.

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


_HOOK = "_musefast_contiguous_state"  # the state-dict hook handle of an applied model


def _decoder_convs(module: nn.Module) -> list[nn.Conv2d]:
    parts = [getattr(module, name, None) for name in ("post_quant_conv", "decoder")]
    return [m for part in parts if part is not None for m in part.modules() if isinstance(m, nn.Conv2d)]


def _weights_to(module: nn.Module, memory_format: torch.memory_format) -> None:
    for conv in _decoder_convs(module):
        if conv.weight.device.type == "cpu":
            conv.weight.data = conv.weight.data.contiguous(memory_format=memory_format)


def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: the channels-last weights leave as ordinary NCHW-contiguous tensors."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def apply(model: nn.Module) -> int:
    """Run every VQ decoder inside ``model`` channels-last on the CPU; returns how many models."""
    targets = _targets(model)
    for module in targets:
        setattr(module, ATTR, torch.channels_last)
        _weights_to(module, torch.channels_last)
        if _HOOK not in module.__dict__:
            module.__dict__[_HOOK] = module._register_state_dict_hook(_contiguous_state)
    return len(targets)


def remove(model: nn.Module) -> None:
    """Back to the plain NCHW path."""
    for module in _targets(model):
        setattr(module, ATTR, torch.contiguous_format)
        _weights_to(module, torch.contiguous_format)
        handle = module.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()


def is_applied(model: nn.Module) -> bool:
    return any(getattr(m, ATTR) == torch.channels_last for m in _targets(model))


def to_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` (B, C, H, W) in ``memory_format`` when it is a CPU tensor, else unchanged."""
    if x.device.type != "cpu" or x.dim() != 4:
        return x
    return x.contiguous(memory_format=memory_format)


__all__ = ["apply", "is_applied", "remove", "to_format"]
