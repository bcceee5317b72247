"""``cfg_sample_remask``: one fused MaskGIT decoding step (CFG + sampling + confidence + re-mask).

Semantics: musefast/reference/remask.py (the definition). RNG: Philox4x32-10
keyed by ``seed``, counter from (step, b, n, k) (musefast/reference/philox.py), identical in
every backend, so a fixed ``(seed, step)`` gives the same tokens and mask everywhere except at
floating-point near-ties.

Backends, in priority order: ``cuda`` (csrc/cuda/remask.cu), ``triton``
(musefast.kernels.remask), ``cpu`` (csrc/remask.cpp), ``reference``.
"""
from __future__ import annotations

import math
import numbers

import torch

from musefast.ops import _availability as avail
from musefast.ops import traceable
from musefast.ops.registry import op
from musefast.reference import philox
from musefast.reference import remask as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIDENCES = ref.CONFIDENCES


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_inputs(logits, uncond_logits, tokens, masked, num_to_mask, guidance_scale, temperature,
                  choice_temperature, top_k, confidence, seed, step) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, N, K), got {tuple(logits.shape)}")
    B, N, K = logits.shape
    if K == 0:
        raise ValueError("logits has K = 0 classes: there is nothing to sample")
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor):
            raise TypeError(f"uncond_logits must be a torch.Tensor or None, got {type(uncond_logits).__name__}")
        if uncond_logits.shape != logits.shape:
            raise ValueError(
                f"uncond_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(uncond_logits.shape)}"
            )
        if uncond_logits.dtype != logits.dtype:
            raise TypeError(f"uncond_logits must have logits' dtype {logits.dtype}, got {uncond_logits.dtype}")
        if uncond_logits.device != logits.device:
            raise ValueError(f"uncond_logits is on {uncond_logits.device} but logits is on {logits.device}")
    for name, t, dtype in (("tokens", tokens, torch.int64), ("masked", masked, torch.bool)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.shape != (B, N):
            raise ValueError(f"{name} must have shape (B, N) = {(B, N)}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if isinstance(num_to_mask, torch.Tensor):
        if num_to_mask.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"num_to_mask must be an int or an integer tensor, got {num_to_mask.dtype}")
        if num_to_mask.shape not in ((B,), ()):
            raise ValueError(f"num_to_mask must be an int or have shape (B,) = ({B},), got {tuple(num_to_mask.shape)}")
        if num_to_mask.device.type not in ("cpu", logits.device.type):
            raise ValueError(f"num_to_mask is on {num_to_mask.device} but logits is on {logits.device}")
        # Range check only where it costs no device sync; device tensors are clamped in-kernel.
        if num_to_mask.device.type == "cpu" and not torch.compiler.is_compiling() and num_to_mask.numel() and (
            int(num_to_mask.min()) < 0 or int(num_to_mask.max()) > N
        ):
            raise ValueError(
                f"num_to_mask must lie in [0, N={N}], got [{int(num_to_mask.min())}, {int(num_to_mask.max())}]"
            )
    elif _is_int(num_to_mask):
        if not 0 <= num_to_mask <= N:
            raise ValueError(f"num_to_mask must lie in [0, N={N}], got {num_to_mask}")
    else:
        raise TypeError(f"num_to_mask must be an int or a (B,) integer tensor, got {type(num_to_mask).__name__}")
    if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = argmax), got {temperature!r}")
    if not _is_real(choice_temperature) or not math.isfinite(choice_temperature) or choice_temperature < 0:
        raise ValueError(f"choice_temperature must be a finite number >= 0, got {choice_temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if not _is_int(seed) or not 0 <= seed < philox.SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not _is_int(step) or not 0 <= step < philox.STEP_LIMIT:
        raise ValueError(f"step must be an int in [0, 2**30), got {step!r}")


# -- backends: each takes validated, normalised arguments -----------------------------------
# (logits, uncond or None, tokens, masked, num_to_mask (B,) int64, guidance_scale, temperature,
#  choice_temperature, top_k (0 = none), confidence, seed, step)

def _reference(logits, uncond, tokens, masked, num_to_mask, g, tau, ct, top_k, confidence, seed, step):
    return ref.cfg_sample_remask(
        logits, uncond, tokens=tokens, masked=masked, num_to_mask=num_to_mask.cpu(), guidance_scale=g,
        temperature=tau, choice_temperature=ct, top_k=top_k or None, confidence=confidence, seed=seed, step=step,
    )


def _compiled(logits, uncond, tokens, masked, num_to_mask, g, tau, ct, top_k, confidence, seed, step):
    k0, k1 = philox.split_seed(seed)
    return torch.ops.musefast.cfg_sample_remask(
        logits, uncond, tokens, masked, num_to_mask.to(logits.device), g, tau, ct, top_k,
        confidence == "prob", k0, k1, step,
    )


def _triton(logits, uncond, tokens, masked, num_to_mask, g, tau, ct, top_k, confidence, seed, step):
    from musefast.kernels.remask import cfg_sample_remask_triton

    return cfg_sample_remask_triton(
        logits, uncond, tokens, masked, num_to_mask.to(logits.device), guidance_scale=g, temperature=tau,
        choice_temperature=ct, top_k=top_k, confidence=confidence, seed=seed, step=step,
    )


def _cpu_reasons(logits, *args):
    return avail.device_reasons("cpu", logits) or avail.extension_reasons("cfg_sample_remask", "cpu")


def _cuda_reasons(logits, *args):
    return avail.device_reasons("cuda", logits) or avail.extension_reasons("cfg_sample_remask", "cuda")


def _triton_reasons(logits, *args):
    return avail.triton_reasons(logits)


CFG_SAMPLE_REMASK = op("cfg_sample_remask")
CFG_SAMPLE_REMASK.register("cuda", _compiled, _cuda_reasons, auto_devices=("cuda",), compiled=True)
CFG_SAMPLE_REMASK.register("triton", _triton, _triton_reasons, auto_devices=("cuda",), compiled=True)
CFG_SAMPLE_REMASK.register("cpu", _compiled, _cpu_reasons, auto_devices=("cpu",), compiled=True)
CFG_SAMPLE_REMASK.register("reference", _reference, lambda *args: [])


def _probe(device):
    B, N, K = 1, 4, 16
    args = (
        torch.randn(B, N, K, device=device), None, torch.zeros(B, N, dtype=torch.long, device=device),
        torch.ones(B, N, dtype=torch.bool, device=device), torch.ones(B, dtype=torch.long, device=device),
        1.0, 1.0, 0.0, 0, "logprob", 0, 0,
    )
    return args, {}


CFG_SAMPLE_REMASK.probe = _probe


def cfg_sample_remask(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    *,
    tokens: torch.Tensor,
    masked: torch.Tensor,
    num_to_mask,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    choice_temperature: float = 0.0,
    top_k: int | None = None,
    confidence: str = "logprob",
    seed: int,
    step: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaskGIT decoding step, fused: guidance, sampling, confidence and re-masking.

    Args:
        logits: (B, N, K) float32/float16/bfloat16 conditional logits (any strides).
        uncond_logits: (B, N, K) unconditional logits (same dtype/device) or None. Guided
            logits are ``uncond + guidance_scale * (logits - uncond)``; no guidance when None or
            ``guidance_scale == 1``.
        tokens: (B, N) int64 current tokens; entries at masked positions are ignored.
        masked: (B, N) bool, True = still to be generated. Known tokens never change.
        num_to_mask: int or (B,) integer tensor in [0, N]: how many of each image's masked
            positions stay masked (clamped to the image's number of masked positions). A
            tensor on the GPU is clamped in-kernel, not range-checked (that would sync).
        guidance_scale: g of the classifier-free guidance.
        temperature: tau of the token sampling from softmax(l / tau); 0 = argmax.
        choice_temperature: scale of the Gumbel noise added to the confidence.
        top_k: sample only among the top_k largest guided logits (ties at the k-th kept).
        confidence: ``"logprob"`` (log softmax(l)[x], MaskGIT/aMUSEd) or ``"prob"``
            (softmax(l)[x], lucidrains' 1 - p ranking).
        seed: int in [0, 2**64), the Philox key. step: int in [0, 2**30), part of the counter.
        backend: ``cuda``, ``triton``, ``cpu`` or ``reference``; None = the best available.

    Returns:
        (tokens, masked): tokens (B, N) int64 with the sampled token at every position that was
        masked on input (the step's full prediction) and the input token elsewhere; masked
        (B, N) bool, the positions that stay masked (the lowest confidences). NaN logits count
        as -inf (never sampled); a position with no usable logit gets token 0 and is the first
        to stay masked.
    """
    _check_inputs(logits, uncond_logits, tokens, masked, num_to_mask, guidance_scale, temperature,
                  choice_temperature, top_k, confidence, seed, step)
    B, N, K = logits.shape
    if isinstance(num_to_mask, torch.Tensor):
        num_to_mask = num_to_mask.to(torch.int64).expand(B).contiguous()
    else:
        num_to_mask = torch.full((B,), int(num_to_mask), dtype=torch.int64)
    if uncond_logits is not None and float(guidance_scale) == 1.0:
        uncond_logits = None  # no guidance: never read the unconditional logits
    top_k = 0 if top_k is None or top_k >= K else int(top_k)
    if torch.compiler.is_compiling():
        seed = int(seed)
        return traceable.cfg_sample_remask(
            logits, uncond_logits, tokens, masked, num_to_mask, float(guidance_scale), float(temperature),
            float(choice_temperature), top_k, confidence, seed >> 32, seed & 0xFFFFFFFF, int(step), backend)
    return CFG_SAMPLE_REMASK(
        logits, uncond_logits, tokens, masked, num_to_mask, float(guidance_scale), float(temperature),
        float(choice_temperature), top_k, confidence, int(seed), int(step),
        backend=backend, device_type=logits.device.type,
    )
