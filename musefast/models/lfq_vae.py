"""The image tokenizer of lucidrains' muse-maskgit-pytorch (``VQGanVAE`` with lookup-free
quantization): a residual conv encoder/decoder around a :class:`LookupFreeQuantizer`.

Layout (state-dict keys match the peer's, so its checkpoints load by name)::

    enc_dec.encoders: conv k×k (channels -> dim), then per level i:
        [conv 4×4 stride 2 (dims[i] -> dims[i+1]), LeakyReLU(0.1)] + ResBlock × n_i
    quantizer: LookupFreeQuantizer(dims[-1], codebook_size)
    enc_dec.decoders: per level i, deepest first:
        GLUResBlock × n_i + [conv-transpose 4×4 stride 2 (dims[i+1] -> dims[i]), LeakyReLU(0.1)]
        then conv 1×1 (dim -> channels)

dims = (dim, dim·mult_0, ..., dim·mult_{L-1}); the downsampling factor is 2^L. Pixels are used
as given: muse-maskgit-pytorch trains on images in [0, 1], which is musefast's convention.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musefast.compat._convert import ConversionError, check_keys, load_strict
from musefast.models.serialization import load_component, register_component, save_component
from musefast.nn.lfq import LookupFreeQuantizer


@dataclass(frozen=True)
class LFQVAEConfig:
    channels: int = 3
    dim: int = 128
    layers: int = 4
    layer_mults: tuple[int, ...] | None = None  # default: 2**i
    num_resnet_blocks: tuple[int, ...] | int = 1  # an int: that many at the deepest level only
    resnet_groups: int = 16
    first_conv_kernel_size: int = 5
    codebook_size: int = 65536
    codebook_scale: float = 1.0
    spherical: bool = False
    lfq_projections: bool | None = None  # default: feature width != log2(codebook_size)
    lfq_projection_bias: bool = True

    def __post_init__(self):
        mults = self.layer_mults if self.layer_mults is not None else tuple(2**i for i in range(self.layers))
        blocks = self.num_resnet_blocks
        if isinstance(blocks, int):
            blocks = (0,) * (self.layers - 1) + (blocks,)
        object.__setattr__(self, "layer_mults", tuple(int(m) for m in mults))
        object.__setattr__(self, "num_resnet_blocks", tuple(int(n) for n in blocks))
        if len(self.layer_mults) != self.layers or len(self.num_resnet_blocks) != self.layers:
            raise ValueError(f"layer_mults and num_resnet_blocks need {self.layers} entries (one per layer), "
                             f"got {self.layer_mults} and {self.num_resnet_blocks}")
        for d in self.dims:
            if d % self.resnet_groups:
                raise ValueError(f"resnet_groups={self.resnet_groups} must divide every width, {d} is not divisible")

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.dim, *(self.dim * m for m in self.layer_mults))

    @property
    def downsampling_factor(self) -> int:
        return 2**self.layers


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(groups, ch), _leaky(),
                                 nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(groups, ch), _leaky(),
                                 nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class GLUResBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.GLU(dim=1), nn.GroupNorm(groups, ch),
                                 nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.GLU(dim=1), nn.GroupNorm(groups, ch),
                                 nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class _EncDec(nn.Module):
    def __init__(self, c: LFQVAEConfig):
        super().__init__()
        dims, g = c.dims, c.resnet_groups
        enc: list[nn.Module] = [nn.Conv2d(c.channels, c.dim, c.first_conv_kernel_size,
                                          padding=c.first_conv_kernel_size // 2)]
        for i in range(c.layers):
            enc.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 4, stride=2, padding=1), _leaky()))
            enc.extend(ResBlock(dims[i + 1], g) for _ in range(c.num_resnet_blocks[i]))
        dec: list[nn.Module] = []
        for i in reversed(range(c.layers)):
            dec.extend(GLUResBlock(dims[i + 1], g) for _ in range(c.num_resnet_blocks[i]))
            dec.append(nn.Sequential(nn.ConvTranspose2d(dims[i + 1], dims[i], 4, 2, 1), _leaky()))
        dec.append(nn.Conv2d(c.dim, c.channels, 1))
        self.encoders, self.decoders = nn.ModuleList(enc), nn.ModuleList(dec)


@register_component
class LFQVAE(nn.Module):
    """``encode`` images (B, C, H, W) in [0, 1] to tokens (B, H/f, W/f); ``decode`` tokens to images."""

    config_class = LFQVAEConfig

    def __init__(self, config: LFQVAEConfig | None = None):
        super().__init__()
        self.config = c = config or LFQVAEConfig()
        self.enc_dec = _EncDec(c)
        self.quantizer = LookupFreeQuantizer(c.dims[-1], c.codebook_size, codebook_scale=c.codebook_scale,
                                             spherical=c.spherical, has_projections=c.lfq_projections,
                                             projection_bias=c.lfq_projection_bias)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def device(self) -> torch.device:
        return self.enc_dec.encoders[0].weight.device

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsampling_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {f} in both dimensions")
        return height // f, width // f

    def encode_features(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != self.config.channels or not image.is_floating_point():
            raise ValueError(f"image must be a float tensor (B, {self.config.channels}, H, W), "
                             f"got {image.dtype} {tuple(image.shape)}")
        self.token_shape(image.shape[2], image.shape[3])
        x = image
        for layer in self.enc_dec.encoders:
            x = layer(x)
        return x

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> tokens (B, H/f, W/f) int64."""
        return self.quantizer.encode(self.encode_features(image))

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        x = z_q
        for layer in self.enc_dec.decoders:
            x = layer(x)
        return x

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, C, h·f, w·f) clamped to [0, 1]."""
        return self.decode_features(self.quantizer.lookup(tokens.to(self.device))).clamp_(0, 1)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return save_component(self, folder, self.config)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device=None, dtype=None) -> "LFQVAE":
        return load_component(folder, cls, device=device, dtype=dtype)


_VAE_UNUSED = ("discr.", "_vgg.")  # GAN discriminator / perceptual net: training only


def from_lucidrains_vae(source: Any, **vae_kwargs) -> LFQVAE:
    """muse-maskgit-pytorch ``VQGanVAE`` (lookup-free quantization) or its state dict -> :class:`LFQVAE`.

    The architecture is read from the weights. What the weights do not hold comes from the
    object, or for a state dict from the peer's constructor kwargs: ``encdec_resnet_groups``
    (default 16) and ``lfq_kwargs`` (``codebook_scale``, ``spherical``; default 1.0, False).
    """
    groups, lfq_kwargs = vae_kwargs.get("encdec_resnet_groups", 16), dict(vae_kwargs.get("lfq_kwargs") or {})
    if isinstance(source, nn.Module):
        if not getattr(source, "lookup_free_quantization", True):
            raise ValueError("only lookup-free quantization VQGanVAEs convert (the peer's VQ branch is broken upstream)")
        q = source.quantizer
        for flag in ("orthogonal_rotation",):
            if getattr(q, flag, False):
                raise ValueError(f"LFQ with {flag}=True is not supported")
        if getattr(q, "num_codebooks", 1) != 1:
            raise ValueError("LFQ with num_codebooks > 1 is not supported")
        if isinstance(q.project_in, nn.Module) and not isinstance(q.project_in, (nn.Linear, nn.Identity)):
            raise ValueError(f"LFQ project_in of type {type(q.project_in).__name__} (cosine-sim) is not supported")
        lfq_kwargs = {"codebook_scale": q.codebook_scale, "spherical": bool(getattr(q, "spherical", False))}
        norms = [m for m in source.enc_dec.modules() if isinstance(m, nn.GroupNorm)]
        groups = norms[0].num_groups if norms else groups
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = dict(source)
        if vae_kwargs.get("lookup_free_quantization", True) is False:
            raise ValueError("only lookup-free quantization VQGanVAEs convert")
    else:
        raise TypeError(f"source must be a VQGanVAE or a state dict, got {type(source).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(_VAE_UNUSED)}
    if "enc_dec.encoders.0.weight" not in state:
        raise ConversionError(f"not a muse-maskgit-pytorch VQGanVAE state dict (no enc_dec.encoders.0.weight); "
                              f"keys start {sorted(state)[:5]}")
    first = state["enc_dec.encoders.0.weight"]
    dim, channels, kernel = first.shape[0], first.shape[1], first.shape[2]
    widths, blocks = [], []
    i = 1
    while f"enc_dec.encoders.{i}.0.weight" in state or f"enc_dec.encoders.{i}.net.0.weight" in state:
        if f"enc_dec.encoders.{i}.0.weight" in state:  # a downsampling conv starts a level
            widths.append(state[f"enc_dec.encoders.{i}.0.weight"].shape[0])
            blocks.append(0)
        elif blocks:
            blocks[-1] += 1
        i += 1
    if not widths or any(w % dim for w in widths):
        raise ConversionError(f"cannot read the encoder levels from the weights (widths {widths}, dim {dim})")
    feat = widths[-1]
    proj = state.get("quantizer.project_in.weight")
    codebook_size = 2 ** (proj.shape[0] if proj is not None else feat)
    if "codebook_size" in vae_kwargs and vae_kwargs["codebook_size"] != codebook_size:
        raise ConversionError(f"codebook_size={vae_kwargs['codebook_size']} disagrees with the weights ({codebook_size})")
    unknown_lfq = set(lfq_kwargs) - {"codebook_scale", "spherical", "diversity_gamma", "entropy_loss_weight",
                                     "commitment_loss_weight", "frac_per_sample_entropy"}
    if unknown_lfq:
        raise ValueError(f"unsupported LFQ settings: {sorted(unknown_lfq)}")
    cfg = LFQVAEConfig(
        channels=channels, dim=dim, layers=len(widths), layer_mults=tuple(w // dim for w in widths),
        num_resnet_blocks=tuple(blocks), resnet_groups=groups, first_conv_kernel_size=kernel,
        codebook_size=codebook_size, codebook_scale=float(lfq_kwargs.get("codebook_scale", 1.0)),
        spherical=bool(lfq_kwargs.get("spherical", False)), lfq_projections=proj is not None,
        lfq_projection_bias="quantizer.project_in.bias" in state,
    )
    model = LFQVAE(cfg)
    mask = state.pop("quantizer.mask", None)  # the peer's bit weights: a constant, checked here
    if mask is not None and not torch.equal(mask.long().cpu(), model.quantizer.bit_values.cpu()):
        raise ConversionError(f"quantizer.mask {mask.tolist()} is not the most-significant-first bit order")
    check_keys("muse-maskgit-pytorch VQGanVAE", state, used=set(model.state_dict()))
    return load_strict(model, state, source="muse-maskgit-pytorch VQGanVAE -> LFQVAE").eval()
