"""Argument and file functions every pipeline family shares (one copy, not one per pipeline)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

# a hub id as the hub spells it: owner/name
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def as_list(value, name: str) -> list[str]:
    """A prompt argument (one string or a non-empty list of strings) as a list, or TypeError."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def negatives_for(negative_prompt, n: int) -> list[str]:
    """The negative prompts of ``n`` prompts: the empty prompt for each (None), one for all, or
    one each."""
    negatives = [""] * n if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts")
    return negatives


def file_dtype(folder: Path, variant: str | None) -> tuple[torch.dtype, int | None]:
    """(floating dtype, parameter count) of a diffusers component folder's weights, read from
    the safetensors headers; (float32, None) when the folder holds another format."""
    from musefast.compat.amused_weights import stored_dtype_and_count

    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    files = [folder / name] if (folder / name).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        return torch.float32, None
    return stored_dtype_and_count(files)
