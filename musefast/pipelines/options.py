"""Call conventions shared by the pipelines: seeds, devices, ``to()`` arguments, image sizes.

musefast's names (``seed``, ``num_steps``, ``dtype``) and diffusers' (``generator``,
``num_inference_steps``, ``torch_dtype``) are both accepted; these functions reduce them to one.
"""
from __future__ import annotations

import numbers

import torch


def resolve_seed(seed, generator=None) -> int | list[int]:
    """The Philox seed of a call: ``seed`` (any non-negative integer, numpy's included), else one
    drawn from ``generator``, else from torch's global RNG (so ``torch.manual_seed`` governs it).
    A list gives one seed per image (batch generation): each image's tokens then depend on its own
    seed only, not on the other images of the call; so does a list of generators (diffusers'
    per-image generators), one seed drawn from each."""
    if isinstance(generator, (list, tuple)):
        if seed is not None:
            raise ValueError("pass seed or generator, not both")
        if not generator:
            raise ValueError("generator is an empty list: pass one generator per image, or one generator")
        return [resolve_seed(None, g) for g in generator]
    if isinstance(seed, (list, tuple)):
        if not seed:
            raise ValueError("seed is an empty list: pass one seed per image, or one int")
        if generator is not None:
            raise ValueError("pass seed or generator, not both")
        return [resolve_seed(s) for s in seed]
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
    if generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def diffusers_dtype(dtype, torch_dtype):
    """``dtype`` (default ``"auto"``) or diffusers' ``torch_dtype``; naming both differently is an error."""
    if torch_dtype is None:
        return dtype
    if dtype not in (None, "auto") and dtype != torch_dtype:
        raise ValueError("pass dtype or torch_dtype, not both")
    return torch_dtype


def pick(name: str, value, diffusers_name: str, diffusers_value):
    """One of two spellings of an argument (musefast's, diffusers'), or an error for both."""
    if diffusers_value is None:
        return value
    if value is not None and value != diffusers_value:
        raise ValueError(f"pass {name} or {diffusers_name}, not both")
    return diffusers_value


def device_problem(device) -> str | None:
    """Why ``device`` cannot be used here, with the fix (None if it can); the API and the CLI each
    prefix it with how the user named the device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return "not a device; use cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"CUDA is not available ({why}); use cpu"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})"
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            return "MPS is not available here; use cpu"
    elif dev.type != "cpu":
        return "musefast runs on cpu, cuda or mps"
    return None


def check_device(device) -> torch.device | None:
    """A device that exists here, or ValueError naming what is missing and the fix."""
    if device is None:
        return None
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(f"device {str(device)!r}: {problem}")
    return torch.device(device)


def to_arguments(args: tuple, device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    """``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)`` and the
    keyword forms -> (device, dtype), both checked."""
    for arg in args:
        if isinstance(arg, torch.dtype):
            if dtype is not None:
                raise TypeError("to() got two dtypes")
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            if device is not None:
                raise TypeError("to() got two devices")
            device = arg
        else:
            raise TypeError(f"to() takes a device and/or a torch.dtype, got {arg!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float16, torch.bfloat16, torch.float32), got {dtype!r}")
    return check_device(device), dtype


def size_error(what: str, height: int, width: int, model_size: int) -> ValueError:
    """The one message for an image of the wrong size: width×height, as image tools print it."""
    return ValueError(f"{what} is {width}×{height} (width×height) but this model works at {model_size}×{model_size}: "
                      f"pass resize=True (CLI: --resize) or resize it to {model_size}×{model_size}")


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, height, width), antialiased."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.clamp(0, 1)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """bool (B, H, W) -> bool (B, height, width): a pixel is repainted if any source pixel under it is."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    # area average > 0 keeps "any pixel repainted" when shrinking; nearest when growing
    area = torch.nn.functional.interpolate(mask[:, None].float(), size=(height, width), mode="area")
    return area[:, 0] > 0


class ProgressBarConfig:
    """diffusers' ``set_progress_bar_config``: ``disable=True`` hides the decoding bar of every
    later call, whatever its ``progress=`` says (other tqdm options are accepted and ignored)."""

    _progress_bar_config: dict | None = None

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    def _progress(self, progress: bool) -> bool:
        return bool(progress) and not (self._progress_bar_config or {}).get("disable", False)
