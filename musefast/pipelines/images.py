"""Image and mask conversions at the pipeline boundary.

Pixels inside musefast are float tensors (B, 3, H, W) in [0, 1] (as diffusers' aMUSEd).
Users may pass PIL images, numpy arrays (H, W, C) / (B, H, W, C) in [0, 1] or uint8, or
tensors (C, H, W) / (B, C, H, W) in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")


@dataclass
class PipelineOutput:
    """diffusers' ``ImagePipelineOutput``: ``images`` (list of PIL, numpy, tensor or tokens)."""

    images: object


class ImageList(list):
    """A list of PIL images that also answers ``.images`` (diffusers' ``pipe(...).images``)."""

    @property
    def images(self) -> "ImageList":
        return self


def to_tensor(image, *, name: str = "image") -> torch.Tensor:
    """PIL / numpy / tensor (single or batch, or a list of them) -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name} is an empty list")
        parts = [to_tensor(im, name=name) for im in image]
        if len({p.shape[-2:] for p in parts}) != 1:
            raise ValueError(f"all images in {name} must have the same size, got {[tuple(p.shape[-2:]) for p in parts]}")
        return torch.cat(parts)
    if isinstance(image, Image.Image):
        return to_tensor(np.asarray(image.convert("RGB")), name=name)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"{name} as a numpy array must be (H, W, C) or (B, H, W, C) with C in (1, 3), got {image.shape}")
        return to_tensor(torch.from_numpy(arr).permute(0, 3, 1, 2), name=name)
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{name} as a tensor must be (C, H, W) or (B, C, H, W) with C in (1, 3), got {tuple(image.shape)}")
        if not t.is_floating_point():
            t = t.float() / 255.0
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        return t.float().clamp(0, 1)
    raise TypeError(f"{name} must be a PIL image, numpy array or torch tensor, got {type(image).__name__}")


def to_mask(mask, *, name: str = "mask") -> torch.Tensor:
    """Any image-like mask -> bool (B, H, W): True (white / nonzero) = repaint.

    PIL images (any mode), numpy (H, W) or (H, W, C), tensors (H, W), (B, H, W) or
    (B, C, H, W), of any dtype (0/1, 0/255 or floats); a pixel is repainted if any of its
    channels is nonzero.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        arr = mask.max(axis=-1) if mask.ndim == 3 else mask
        mask = torch.from_numpy(np.array(arr))  # a copy: PIL arrays are read-only
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a PIL image, numpy array or torch tensor, got {type(mask).__name__}")
    m = mask[None] if mask.dim() == 2 else mask.amax(dim=1) if mask.dim() == 4 else mask
    if m.dim() != 3:
        raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, C, H, W), got {tuple(mask.shape)}")
    return m != 0


def token_mask(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """bool (B, H, W) pixels -> bool (B, H/f, W/f) tokens: a token is repainted if any pixel of its patch is."""
    B, H, W = pixel_mask.shape
    if H % factor or W % factor:
        raise ValueError(f"mask size {H}x{W} is not divisible by the VQ factor {factor}")
    return pixel_mask.reshape(B, H // factor, factor, W // factor, factor).any(dim=4).any(dim=2)


def format_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) float in [0, 1] -> list of PIL | numpy (B, H, W, 3) | the tensor."""
    if output_type == "pt":
        return images
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


class AnyPixelMask:
    """A pixel mask under musefast's inpainting rule — a token is repainted if any pixel of its
    patch is white (nonzero) — as opposed to diffusers' (the mask resized to the token grid and
    thresholded at 0.5)."""

    def __init__(self, mask):
        self.mask = mask
