"""``vq_nearest``: codebook nearest-neighbour quantization, and ``vq_lookup``.

Backends, in priority order: ``cuda`` (csrc/cuda), ``triton`` (musefast.kernels.vq),
``cpu`` (C++ in musefast._C), ``reference`` (musefast.reference.vq).
"""
from __future__ import annotations

import torch

from musefast.ops import _availability as avail
from musefast.ops import traceable
from musefast.ops.registry import op
from musefast.reference import vq as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METRICS = ("l2", "cosine")


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if codebook.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"codebook must be float32, float16 or bfloat16, got {codebook.dtype}")
    if z.dim() < 1:
        raise ValueError("z must have shape (..., D) with at least one dimension, got a scalar")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0): there is no nearest entry")
    if codebook.shape[1] != z.shape[-1]:
        raise ValueError(
            f"z's last dim (D={z.shape[-1]}) must equal codebook's dim (D={codebook.shape[1]})"
        )
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}: use one device")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


# -- backends: each takes 2-D (N, D) z and (K, D) codebook of one dtype ------------------

def _reference(z, codebook):
    return ref.vq_nearest_l2(z, codebook)


def _compiled(z, codebook):
    return torch.ops.musefast.vq_nearest(z.contiguous(), codebook.contiguous())


def _triton(z, codebook):
    from musefast.kernels.vq import vq_nearest_triton

    return vq_nearest_triton(z, codebook)


def _cpu_reasons(z, codebook):
    return avail.device_reasons("cpu", z) or avail.extension_reasons("vq_nearest", "cpu")


def _cuda_reasons(z, codebook):
    return avail.device_reasons("cuda", z) or avail.extension_reasons("vq_nearest", "cuda")


def _triton_reasons(z, codebook):
    return avail.triton_reasons(z, codebook)


VQ_NEAREST = op("vq_nearest")
VQ_NEAREST.register("cuda", _compiled, _cuda_reasons, auto_devices=("cuda",), compiled=True)
VQ_NEAREST.register("triton", _triton, _triton_reasons, auto_devices=("cuda",), compiled=True)
VQ_NEAREST.register("cpu", _compiled, _cpu_reasons, auto_devices=("cpu",), compiled=True)
VQ_NEAREST.register("reference", _reference, lambda z, codebook: [])
VQ_NEAREST.probe = lambda device: ((torch.randn(4, 8, device=device), torch.randn(16, 8, device=device)), {})


def vq_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    return_distance: bool = False,
    backend: str | None = None,
):
    """Index of the nearest codebook entry for every vector of ``z``.

    Args:
        z: (..., D) float32/float16/bfloat16, any strides.
        codebook: (K, D) float, same device as ``z``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (both sides unit-normalised first).
        return_distance: also return the float32 squared distance to the chosen entry.
        backend: force a backend (``cuda``, ``triton``, ``cpu``, ``reference``); None = best.

    Returns:
        indices (...) int64 [, distances (...) float32]. Ties go to the lowest index (up to
        floating-point near-ties on the fast backends).
    """
    _check_inputs(z, codebook, metric)
    lead = z.shape[:-1]
    z2 = z.reshape(-1, z.shape[-1])
    if metric == "cosine":
        z2, codebook = ref.normalize_for_cosine(z2), ref.normalize_for_cosine(codebook)
    elif codebook.dtype != z2.dtype:
        # One compute dtype for both sides: the wider of the two.
        common = torch.promote_types(z2.dtype, codebook.dtype)
        z2, codebook = z2.to(common), codebook.to(common)
    if torch.compiler.is_compiling():
        indices, distances = traceable.vq_nearest(z2, codebook, backend)
    else:
        indices, distances = VQ_NEAREST(z2, codebook, backend=backend, device_type=z.device.type)
    indices = indices.reshape(lead)
    return (indices, distances.reshape(lead)) if return_distance else indices


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codebook lookup for decoding: indices (...) int -> vectors (..., D) in codebook's dtype."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("indices must be an int64 or int32 tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if indices.device != codebook.device:
        raise ValueError(f"indices are on {indices.device} but codebook is on {codebook.device}")
    # The range check reads the indices back (a device sync; data-dependent under torch.compile).
    if not torch.compiler.is_compiling() and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook.shape[0]):
        raise ValueError(f"indices must lie in [0, {codebook.shape[0]}), got [{int(indices.min())}, {int(indices.max())}]")
    return ref.vq_lookup(indices, codebook)
