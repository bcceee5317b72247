"""A fully convolutional VQGAN image tokenizer (Muse §2.2; no non-local/attention blocks).

Layout (the taming-transformers / diffusers VQModel topology, so converting their conv-only
checkpoints is a key rename)::

    encoder: conv_in -> levels[i]: ResBlock x num_res_blocks (+ Downsample except the last)
             -> mid: ResBlock x num_mid_blocks -> norm_out, SiLU -> conv_out (z_channels)
    quant_conv (1x1, z_channels -> embed_dim) -> quantize (VectorQuantizer)
    post_quant_conv (1x1, embed_dim -> z_channels)
    decoder: conv_in -> mid: ResBlock x num_mid_blocks
             -> levels[i] (deepest first): ResBlock x (num_res_blocks + 1) (+ Upsample except the last)
             -> norm_out, SiLU -> conv_out (in_channels)

The downsampling factor is ``2 ** (len(channel_mult) - 1)``: 5 levels give 16 (Muse base,
aMUSEd), 4 levels give 8 (Muse super-res). Images are (B, C, H, W) in [0, 1]; tokens are
(B, H / f, W / f) int64.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from musefast.cpu import conv as cpu_conv
from musefast.cpu.conv import to_format
from musefast.models.serialization import load_component, register_component, save_component
from musefast.nn import VectorQuantizer

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of a :class:`VQGAN`.

    Attributes:
        in_channels: image channels (3 for RGB); the decoder outputs as many.
        channels: base width; level i has ``channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level,
            as in taming-transformers and diffusers).
        num_mid_blocks: residual blocks at the lowest resolution, in encoder and decoder.
        z_channels: channels of the encoder output / decoder input.
        embed_dim: codebook vector size (the quant_conv maps z_channels to it).
        codebook_size: number of codebook entries K.
        norm_groups: GroupNorm groups (must divide every level's width).
        patch_size: pixels are first folded into channels in ``patch_size`` x ``patch_size`` patches
            (space-to-depth; the decoder unfolds them at the end), so every level runs at
            1/patch_size resolution and ``downsampling_factor`` is ``patch_size * 2 ** (levels - 1)``.
            1 (default) is the taming/diffusers VQGAN; ``patch_size=f`` with one level gives a
            tokenizer whose convolutions all run on the token grid (the demo model's: flat-colour
            shapes need exact edges inside a patch, which the unfolded channels can draw, and
            64x fewer positions make it cheap to train on a CPU).
        norm: ``"group"`` (GroupNorm, as taming / diffusers / MaskGIT) or ``"none"`` (no
            normalisation layers). Per-image GroupNorm over few channels per group subtracts each
            image's mean feature, which at small widths erases the absolute background and shape
            colours of flat-colour images (the demo model's tokenizer uses ``"none"``).
        downsample: ``"conv"`` (3x3 stride-2 conv after right/bottom zero padding, as taming and
            diffusers) or ``"avgpool"`` (2x2 average pooling with no weights, as MaskGIT).
        dropout: dropout inside the residual blocks (training only).
        signed_pixels: the network works on pixels in [-1, 1] (taming, MaskGIT); False: it works
            on [0, 1] directly (aMUSEd's VQ). Users always pass and get images in [0, 1].
        force_upcast: run the encoder and decoder in float32 even when the module is float16 or
            bfloat16 (half-precision VQ decoders overflow to inf/NaN); outputs are cast back.
        vq_metric: ``"l2"`` or ``"cosine"`` nearest-code search.
        commitment_beta: weight of the commitment loss when training.
        shortcut: where a residual block's 1x1 skip conv (when the width changes) reads:
            ``"input"`` (the block input: taming, diffusers) or ``"output"`` (the block's own
            output, added to itself: google maskgit and open-muse's MaskGitVQGAN).
        decoder_res_blocks: residual blocks per decoder level (None = ``num_res_blocks + 1``,
            taming/diffusers; MaskGIT uses ``num_res_blocks``).
    """

    in_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    num_mid_blocks: int = 2
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 8192
    norm_groups: int = 32
    norm: str = "group"
    patch_size: int = 1
    downsample: str = "conv"
    dropout: float = 0.0
    signed_pixels: bool = True
    force_upcast: bool = True
    vq_metric: str = "l2"
    commitment_beta: float = 0.25
    shortcut: str = "input"
    decoder_res_blocks: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        for name in ("in_channels", "channels", "z_channels", "embed_dim", "codebook_size", "norm_groups", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VQGANConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"VQGANConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if self.num_res_blocks < 0 or self.num_mid_blocks < 0:
            raise ValueError("VQGANConfig.num_res_blocks and num_mid_blocks must be >= 0")
        for width in sorted({self.channels * m for m in self.channel_mult}):
            if width % self.norm_groups:
                raise ValueError(f"VQGANConfig.norm_groups={self.norm_groups} must divide every level width; "
                                 f"{width} is not divisible")
        if self.norm not in ("group", "none"):
            raise ValueError(f"VQGANConfig.norm must be 'group' or 'none', got {self.norm!r}")
        if self.downsample not in ("conv", "avgpool"):
            raise ValueError(f"VQGANConfig.downsample must be 'conv' or 'avgpool', got {self.downsample!r}")
        if self.shortcut not in ("input", "output"):
            raise ValueError(f"VQGANConfig.shortcut must be 'input' or 'output', got {self.shortcut!r}")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 1:
            raise ValueError(f"VQGANConfig.decoder_res_blocks must be >= 1 or None, got {self.decoder_res_blocks}")
        if self.vq_metric not in ("l2", "cosine"):
            raise ValueError(f"VQGANConfig.vq_metric must be 'l2' or 'cosine', got {self.vq_metric!r}")

    @property
    def downsampling_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


def _norm(groups: int, channels: int) -> nn.Module:
    """GroupNorm with ``groups`` groups, or no normalisation when ``groups`` is 0."""
    return nn.GroupNorm(groups, channels, eps=1e-6) if groups else nn.Identity()


def _groups(c: VQGANConfig) -> int:
    return c.norm_groups if c.norm == "group" else 0


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a skip
    (1x1 conv ``shortcut`` when the width changes; ``shortcut_on_output``: the skip conv reads
    the block's output instead of its input, as in google maskgit)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0, *,
                 shortcut_on_output: bool = False):
        super().__init__()
        self.norm1 = _norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut_on_output = shortcut_on_output and in_ch != out_ch
        skip_in = out_ch if shortcut_on_output else in_ch
        self.shortcut = nn.Conv2d(skip_in, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(h if self.shortcut_on_output else x) + h


@cpu_conv.packed_forward(ResBlock)
def _resblock_cpu_forward(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    """ResBlock on the CPU path: packed convolutions, the skip added in the epilogue of the
    convolution that produces the block's output."""
    if block.training or not cpu_conv.usable(block.conv1, x):
        return type(block).forward(block, x)
    h = cpu_conv.conv2d(block.conv1, cpu_conv.norm_silu(block.norm1, x))
    h = cpu_conv.norm_silu(block.norm2, h)
    if block.shortcut_on_output:  # google maskgit: the 1x1 skip reads the block's own output
        h = cpu_conv.conv2d(block.conv2, h)
        return cpu_conv.conv2d(block.shortcut, h, add=h)
    skip = x if isinstance(block.shortcut, nn.Identity) else cpu_conv.conv2d(block.shortcut, x)
    return cpu_conv.conv2d(block.conv2, h, add=skip)


class Downsample(nn.Module):
    """Halve H and W: strided conv (``conv``) or parameter-free 2x2 average pooling (``avgpool``)."""

    def __init__(self, ch: int, mode: str):
        super().__init__()
        self.mode = mode
        # Padding only right/bottom before a 3x3 stride-2 conv keeps outputs aligned with the
        # taming/diffusers checkpoints (symmetric padding would shift the sampling grid).
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if mode == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``blocks`` then an optional ``resample`` (Down/Upsample)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        self.fold = nn.PixelUnshuffle(c.patch_size) if c.patch_size > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(c.in_channels * c.patch_size ** 2, widths[0], 3, padding=1)
        levels, ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, width, _groups(c), c.dropout, shortcut_on_output=c.shortcut == "output"))
                ch = width
            last = i == len(widths) - 1
            levels.append(Level(blocks, None if last else Downsample(ch, c.downsample)))
        self.levels = nn.ModuleList(levels)
        self.mid = nn.Sequential(*[ResBlock(ch, ch, _groups(c), c.dropout) for _ in range(c.num_mid_blocks)])
        self.norm_out = _norm(_groups(c), ch)
        self.conv_out = nn.Conv2d(ch, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(self.fold(x))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, in_channels, h*f, w*f) in the model's pixel range."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.channels * m for m in reversed(c.channel_mult)]  # deepest level first
        ch = widths[0]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(ch, ch, _groups(c), c.dropout) for _ in range(c.num_mid_blocks)])
        levels = []
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(c.num_res_blocks + 1 if c.decoder_res_blocks is None else c.decoder_res_blocks):
                blocks.append(ResBlock(ch, width, _groups(c), c.dropout, shortcut_on_output=c.shortcut == "output"))
                ch = width
            last = i == len(widths) - 1
            levels.append(Level(blocks, None if last else Upsample(ch)))
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(_groups(c), ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels * c.patch_size ** 2, 3, padding=1)
        self.unfold = nn.PixelShuffle(c.patch_size) if c.patch_size > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.unfold(self.conv_out(F.silu(self.norm_out(x))))


@cpu_conv.packed_forward(Decoder)
def _decoder_cpu_forward(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder on the CPU path, in its decode dtype (bf16 when set by ``cpu.conv.apply``): the
    input converted once on the way in, the image back to ``z``'s dtype on the way out; the norms
    keep their float32 parameters and compute their statistics in float32."""
    dtype = cpu_conv.compute_dtype(decoder, z)
    if dtype == z.dtype:
        return type(decoder).forward(decoder, z)
    return type(decoder).forward(decoder, z.to(dtype)).to(z.dtype)


@register_component
class VQGAN(nn.Module):
    """VQGAN tokenizer: ``encode`` images to tokens, ``decode`` tokens to images.

    Submodules: ``encoder``, ``quant_conv``, ``quantize`` (:class:`musefast.nn.VectorQuantizer`,
    state ``quantize.embedding.weight``), ``post_quant_conv``, ``decoder``.
    """

    config_class = VQGANConfig
    conv_memory_format = torch.contiguous_format  # of the decoder's CPU activations (cpu/conv)

    def __init__(self, config: VQGANConfig | None = None, *, vq_backend: str | None = None):
        super().__init__()
        self.config = config = config or VQGANConfig()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim, metric=config.vq_metric,
                                        beta=config.commitment_beta, backend=vq_backend)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an image of size (height, width); ValueError if not divisible."""
        f = self.downsampling_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of the VQ "
                             f"downsampling factor {f} in both height and width")
        return height // f, width // f

    # -- precision ---------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.force_upcast and self.dtype in _HALF_DTYPES else self.dtype

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` in the compute dtype: with force_upcast a half module runs on float32
        copies of its weights (the module itself is not modified)."""
        dtype = self._compute_dtype()
        if dtype == self.dtype:
            return module(x.to(dtype))
        params = {k: v.to(dtype) for k, v in module.state_dict(keep_vars=True).items()}
        return functional_call(module, params, (x.to(dtype),))

    # -- checks ------------------------------------------------------------------------------

    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor (B, C, H, W) in [0, 1], got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"image must be a floating-point tensor in [0, 1], got {image.dtype} "
                            "(convert uint8 images with image.float() / 255)")
        if image.dim() != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"image must have shape (B, {self.config.in_channels}, H, W), got {tuple(image.shape)}")
        self.token_shape(image.shape[2], image.shape[3])

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("tokens must be an int64 or int32 tensor (B, h, w)")
        if tokens.dim() != 3:
            raise ValueError(f"tokens must have shape (B, h, w), got {tuple(tokens.shape)}")
        k = self.config.codebook_size
        if not torch.compiler.is_compiling() and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"tokens must lie in [0, {k}) (codebook_size), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]; a [MASK] id cannot be decoded")

    # -- public API --------------------------------------------------------------------------

    def encode_features(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> pre-quantization features (B, embed_dim, H/f, W/f),
        in the compute dtype (float32 under force_upcast)."""
        self._check_image(image)
        x = image * 2 - 1 if self.config.signed_pixels else image
        z = self._run(self.encoder, x)
        return self._run(self.quant_conv, z)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1], H and W multiples of the factor -> tokens (B, H/f, W/f) int64."""
        self._check_image(image)
        if not torch.compiler.is_compiling():  # reads values back: a sync, data-dependent when traced
            lo, hi = float(image.min()), float(image.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        return self.quantize.encode(self.encode_features(image))

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, embed_dim, h, w) -> unclamped images (B, C, h*f, w*f) in
        [0, 1] nominal range, in the module dtype (computed in float32 under force_upcast)."""
        # Only the decoder runs channels-last (musefast.cpu.conv): encode's outputs are
        # tokens, and a rounding-level change of the features flips argmin near-ties, which the
        # compat samplers' promise of the peer's tokens (img2img, inpainting) cannot allow.
        z_q = to_format(z_q, self.conv_memory_format)
        x = self._run(self.decoder, self._run(self.post_quant_conv, z_q))
        if self.config.signed_pixels:
            x = (x + 1) / 2
        return x.to(self.dtype).contiguous()  # NCHW whatever layout the decoder ran in

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, C, h*f, w*f) in [0, 1], in the module dtype."""
        self._check_tokens(tokens)
        z_q = self.quantize.lookup(tokens.to(self.device, torch.int64))
        return self.decode_features(z_q).clamp_(0, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: images in [0, 1] -> (reconstruction, unclamped, same shape; indices
        (B, h, w); codebook + commitment loss). Gradients reach the encoder straight-through."""
        z_q, indices, vq_loss = self.quantize(self.encode_features(image))
        return self.decode_features(z_q), indices, vq_loss

    # -- musefast format -----------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``folder``."""
        return save_component(self, folder, self.config)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "VQGAN":
        """Load a folder written by :meth:`save_pretrained` (strict: every key and shape must match)."""
        return load_component(folder, cls, device=device, dtype=dtype)
