"""Channels-last, packed oneDNN convolutions for the VQ decoders on a CPU (the decoder runs in fp32,
or in bf16 where ``dtype="auto"`` picked bf16, on channels-last activations).

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

On top of the layout, every decoder convolution runs oneDNN's convolution directly
(``torch.ops.mkldnn._convolution_pointwise``) on a weight reordered once into oneDNN's blocked
layout (``_reorder_convolution_weight``, at the first decode, for that call's input size) instead
of torch's ``conv2d``, which re-plans and reorders the weight on every call; and each residual
block adds its skip inside the second convolution's epilogue (oneDNN's binary ``add`` post-op)
rather than in a separate pass over the activation. The values are oneDNN's either way: within
fp32 rounding of the plain path (the kernel oneDNN picks for a known input size may sum in another
order). The packed weights sit beside the plain ones (a decoder's convolution weights twice) and
are repacked when a weight changes (new storage, dtype, or an in-place write); :func:`remove`
drops them. ``cpu.linear.plain()`` runs the reference twin (torch's ``conv2d``) inside an applied
model.

``apply(model, dtype=torch.bfloat16)`` makes the decoder compute in bf16 where oneDNN has bf16
convolutions (native on AVX512-BF16/AMX): activations and convolution weights in bf16, GroupNorm
with its float32 parameters (statistics in float32), the image returned in float32. Its pixel error
against the float32 decode is within the project's rule — at most twice the error of PyTorch
decoding in bf16 (measured, mean pixel error: 0.56× on the demo model's images, 0.95× at aMUSEd's VQ
architecture).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from musefast.cpu import isa, twin

ATTR = "conv_memory_format"
PACKED_ATTR = "_musefast_packed_conv"  # a decoder Conv2d's packed weights, per compute dtype (its __dict__)
DTYPE_ATTR = "_musefast_decode_dtype"  # a VQ decoder's compute dtype when not its weights' (bf16)


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


# -- packed convolutions ---------------------------------------------------------------------------

def _packable() -> bool:
    """oneDNN's convolution ops exist and may use AVX2 or better (else torch's own conv2d runs)."""
    return torch.backends.mkldnn.is_available() and isa.effective()["path"] != "none"


def usable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether this call takes the packed path: a channels-last CPU activation in the weight's
    dtype (fp32; bf16 where oneDNN has bf16 kernels), zero padding, no autograd, not traced."""
    w = conv.weight
    return (not torch.compiler.is_compiling() and not twin.active() and x.device.type == "cpu"
            and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and (x.dtype == torch.float32 and w.dtype == torch.float32
                 or x.dtype == torch.bfloat16 and isa.effective()["bf16_packs"])
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


class _PackCache(dict):
    """dtype -> (key, packed weight, bias) of one convolution. oneDNN's packed tensors cannot be
    copied or pickled: a copied (or unpickled) module starts empty and repacks on first use."""

    def __deepcopy__(self, memo):
        return _PackCache()

    def __reduce__(self):
        return _PackCache, ()


def _packed(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight in oneDNN's layout for inputs like ``x`` (and its bias), in ``x``'s dtype:
    reordered at the first call and again only when the weight changes (the key: storage, in-place
    version, dtype)."""
    w = conv.weight
    key = (w.data_ptr(), w._version, w.dtype)
    cache = conv.__dict__.setdefault(PACKED_ATTR, _PackCache())
    entry = cache.get(x.dtype)
    if entry is None or entry[0] != key:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.detach().to(x.dtype), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            list(x.shape))
        bias = None if conv.bias is None else conv.bias.detach().to(x.dtype)
        entry = cache[x.dtype] = (key, packed, bias)
    return entry[1], entry[2]


def _args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv2d(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (+ ``add``, same shape as the output, added in the kernel's epilogue) through
    oneDNN on the packed weight; the plain ``conv(x) + add`` where the packed path does not apply."""
    if not usable(conv, x) or (add is not None and add.dtype != x.dtype):
        out = type(conv).forward(conv, x)
        return out if add is None else out + add
    weight, bias = _packed(conv, x)
    if add is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *_args(conv), "none", [], "")
    add = add.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, add, weight, bias, *_args(conv), "add",
                                                          None, None, [], None)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), the SiLU in place on the norm's fresh output (one allocation, not two)."""
    h = norm(x)
    return F.silu(h, inplace=h is not x)


def compute_dtype(decoder: nn.Module, z: torch.Tensor) -> torch.dtype:
    """The dtype ``decoder`` computes in for input ``z``: the decode dtype :func:`apply` set on it
    (bf16) where the packed path runs and oneDNN has bf16 convolutions, else ``z``'s own."""
    dtype = decoder.__dict__.get(DTYPE_ATTR)
    if dtype is None or not (usable(decoder.conv_in, z) and isa.effective()["bf16_packs"]):
        return z.dtype
    return dtype


_BLOCKS: dict[type, Callable] = {}


def packed_forward(cls: type) -> Callable:
    """Decorator: the decorated ``forward(module, *args)`` is what :func:`apply` installs on every
    ``cls`` block of a VQ decoder (its residual blocks, the decoder itself). Each model registers its
    own next to its class, so this module imports no model class."""
    def register(forward: Callable) -> Callable:
        _BLOCKS[cls] = forward
        return forward

    return register


def _install(module: nn.Module) -> None:
    """Packed forwards on the decoder's convolutions and registered blocks of one VQ model."""
    for part in (getattr(module, name, None) for name in ("post_quant_conv", "decoder")):
        for m in () if part is None else part.modules():
            forward = conv2d if isinstance(m, nn.Conv2d) else _BLOCKS.get(type(m))
            if forward is not None:
                m.forward = functools.partial(forward, m)


def _uninstall(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m.__dict__.get("forward"), functools.partial):
            del m.__dict__["forward"]
        m.__dict__.pop(PACKED_ATTR, None)
        m.__dict__.pop(DTYPE_ATTR, None)


def apply(model: nn.Module, *, dtype: torch.dtype | None = None) -> int:
    """Run every VQ decoder inside ``model`` channels-last on the CPU, on packed oneDNN
    convolutions where oneDNN can run them; returns how many models. ``dtype=torch.bfloat16``:
    the decoders compute in bf16 (activations and convolution weights; norms in float32) where
    oneDNN has bf16 convolutions, and return images in float32 as before; ``None``: float32."""
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32 or torch.bfloat16 (the VQ decoder's compute dtype), "
                         f"got {dtype!r}")
    targets = _targets(model)
    for module in targets:
        decoder = getattr(module, "decoder", None)
        if decoder is not None and dtype in (None, torch.float32):
            decoder.__dict__.pop(DTYPE_ATTR, None)
        elif decoder is not None:
            decoder.__dict__[DTYPE_ATTR] = dtype
        setattr(module, ATTR, torch.channels_last)
        _weights_to(module, torch.channels_last)
        if _HOOK not in module.__dict__:
            module.__dict__[_HOOK] = module._register_state_dict_hook(_contiguous_state)
        if _packable():
            _install(module)
    return len(targets)


def follow_auto(model: nn.Module, run_dtype: torch.dtype | None) -> None:
    """``dtype="auto"`` for the VQ decoders of ``model``: when "auto" put the transformer in bf16 on
    a CPU (native bf16: see :func:`musefast.cpu.linear.auto_dtype`), the decoders compute in bf16
    too (within the error rule: see the module docstring); otherwise nothing changes. A model off
    the CPU, or one the CPU path was not applied to (``MUSEFAST_CPU_ENGINE=0``), is left alone."""
    first = next(model.parameters(), None)
    if (run_dtype == torch.bfloat16 and first is not None and first.device.type == "cpu" and is_applied(model)
            and isa.effective()["bf16"]):
        apply(model, dtype=torch.bfloat16)


def decode_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s VQ decoder computes in on the CPU path (float32 unless set by
    :func:`apply` / :func:`follow_auto`)."""
    dtypes = [getattr(m, "decoder", m).__dict__.get(DTYPE_ATTR) for m in _targets(model)]
    return next((d for d in dtypes if d is not None), torch.float32)


def remove(model: nn.Module) -> None:
    """Back to the plain NCHW path (ordinary forwards, no packed weights)."""
    for module in _targets(model):
        setattr(module, ATTR, torch.contiguous_format)
        _weights_to(module, torch.contiguous_format)
        _uninstall(module)
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


__all__ = ["apply", "compute_dtype", "conv2d", "decode_dtype", "follow_auto", "is_applied", "norm_silu", "packed_forward",
           "remove", "to_format", "usable"]
