"""Drop-in for google-research/maskgit: load its JAX/flax checkpoints — the class-conditional
ImageNet ``Transformer`` and its VQGAN tokenizer (``VQVAE``) — into musefast models.

Neither JAX, flax nor msgpack is needed (or imported). Accepted checkpoint sources:

* a **flax msgpack file**: the released ``maskgit_imagenet{256,512}_checkpoint`` and
  ``tokenizer_imagenet{256,512}_checkpoint`` (what maskgit's ``restore_from_path`` reads), or any
  ``flax.serialization.to_bytes`` output; read by musefast's own decoder
  (:mod:`musefast.compat._msgpack`), which builds plain numpy arrays and executes nothing;
* a **folder** written by ``flax.training.checkpoints.save_checkpoint`` in its msgpack format
  (files ``checkpoint_<step>``): the file of the highest step is read;
* an **.npz** of the flattened parameters, keys joined with ``/`` (e.g.
  ``params/Embed_0/word_embeddings/embedding``), read with ``allow_pickle=False``;
* an already-loaded **tree**: a nested dict of arrays (numpy, JAX or torch; e.g. what
  ``restore_from_path`` returns), or a flat dict with ``/``-joined keys.

In every form the parameters are found under ``params`` (flax variables, ``TrainState``) or
``target`` (legacy ``flax.optim`` optimizers), nested wrappers included; everything beside them
(optimizer state, step counters) is ignored. Inside the parameters the check is strict:
missing keys, unknown keys and shape mismatches raise one
:class:`~musefast.compat._convert.ConversionError` that lists them (flax names).

Architectures are read off the weight shapes (layers, widths, heads, MLP width, vocabulary,
positions; tokenizer levels, widths, blocks per level, codebook); ``config`` — maskgit's own
config names, flat or in its ``transformer`` / ``vqvae`` sections (``get_config().to_dict()``
works) — overrides them, and what the weights cannot tell comes from the released ImageNet
configs: the transformer's codebook size, 1024, which splits its vocabulary (codebook ids,
``num_class`` class ids, then [MASK]: 1024 + 1000 + 1 = 2025 rows). The released models are
24 layers x 768 wide, 16 heads, MLP 3072, 16x16 tokens (256) or 32x32 (512, the same tokenizer
architecture): filters 128, channel multipliers (1, 1, 2, 2, 4), 2 residual blocks per level,
256-dim codebook of 1024 entries, GroupNorm (32 groups), swish, average-pool downsampling.

What maps to what:

==============================================  ==============================================
maskgit ``Transformer`` (flax names)            musefast :class:`MuseTransformer` (``num_classes``)
==============================================  ==============================================
Embed_0/word_embeddings rows 0..K-1, row V-1    token_embed (codebook rows + [MASK] = id K)
  ([MASK]: ``mask_token_id=-1`` = row V-1)
class token K + c at position 0                 class_embed[c] = word row K + c + position 0;
                                                  null class (id C) = [MASK] row + position 0
Embed_0/position_embeddings rows 1..N           pos_embed
Embed_0/embeddings_ln                           embed_norm (``embed_norm=True``)
TransformerLayer_i/Attention_0/self_attention   blocks.i.attn: to_qkv = [query; key; value],
  query/key/value (D, H, hd), out (H, hd, D)      to_out (kernels transposed)
Attention_0/attention_output_ln                 blocks.i.norm1 (``norm_position="post"``: BERT)
Mlp_0/intermediate_output, layer_output         blocks.i.mlp.proj_in, proj_out (tanh GELU)
Mlp_0/layer_output_ln                           blocks.i.norm3
MlmLayer_0/mlm_dense → GELU → mlm_ln            head_mlp (``final_norm=False``)
logits = · word_embeddingsᵀ + mlm_bias          head: weight = word rows 0..K-1, bias = mlm_bias[:K]
==============================================  ==============================================

All LayerNorms use maskgit's eps 1e-12. The logits are maskgit's ``logits[..., :K]`` (what its
``generate_samples`` samples from) at the image positions (the class token's row dropped).

Tokenizer ``VQVAE`` -> :class:`~musefast.models.vqgan.VQGAN` with ``downsample="avgpool"``,
``shortcut="output"`` (the 1x1 skip conv ``Conv_2`` reads the block's output),
``decoder_res_blocks = num_mid_blocks = num_res_blocks`` and pixels in [0, 1]
(``signed_pixels=False``), as maskgit feeds them: ``encoder/ResBlock_j`` is level ``j // n``
(then the mid blocks), ``decoder/ResBlock_j`` the mid blocks then the levels deepest first,
``decoder/Conv_1..`` the upsampling convs; bias-free convs get zero biases, the 1x1 encoder
``Conv_1`` becomes the centre of a 3x3 kernel, ``quant_conv`` / ``post_quant_conv`` are
identities; flax kernels (kh, kw, in, out) become (out, in, kh, kw). Images are NCHW here,
NHWC in maskgit.

Sampling: :data:`PRESET` (``"maskgit"``) is maskgit's ``parallel_decode.decode`` (τ = 1,
choice temperature 4.5 (1 − r), cosine schedule, its mask counts); its ``generate_samples``
runs 16 iterations by default, so pass ``num_steps=16``. musefast draws its own Philox random
numbers: the same seed does not give maskgit's JAX samples. maskgit has no classifier-free
guidance; the converted model's null class (id ``num_classes``, the [MASK] embedding in the
class slot) allows it, but the released model was not trained with it.

Not supported (raise): tokenizers with ``conv_downsample=True``, a norm other than GroupNorm
(``norm_type`` "BN"/"LN"), ``activation_fn="relu"``, ``channel_multipliers[0] != 1``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musefast.compat import _msgpack
from musefast.compat._convert import ConversionError, _listing, check_shapes, load_strict
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig
from musefast.models.vqgan import VQGAN, VQGANConfig

__all__ = ["load_transformer", "load_vqgan", "read_params", "transformer_config", "transformer_state",
           "vqgan_config", "vqgan_state", "to_musefast_inputs", "PRESET"]

PRESET = "maskgit"
RELEASED_CODEBOOK_SIZE = 1024  # vqvae.codebook_size of the released ImageNet models
_LN_EPS = 1e-12  # maskgit_transformer.LAYERNORM_EPSILON (BERT's)
_WRAPPERS = ("params", "target")
Source = str | os.PathLike | Mapping[str, Any]  # a checkpoint file or folder, or a loaded tree
Config = Mapping[str, Any] | None  # maskgit config names (flat, or its nested get_config().to_dict())


# -- reading checkpoints -----------------------------------------------------------------------

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint tree keys must be strings, got {key!r} under {prefix or 'the root'!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _newest_checkpoint(folder: Path) -> Path:
    steps = {}
    for path in folder.iterdir():
        m = re.fullmatch(r"checkpoint_(\d+)", path.name)
        if m and path.is_file():
            steps[int(m[1])] = path
    if not steps:
        raise FileNotFoundError(f"{folder}: no flax msgpack checkpoint file (checkpoint_<step>) in this folder "
                                "(orbax checkpoint folders are not read: restore with flax and pass the tree)")
    return steps[max(steps)]


def _read_tree(source: Source) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return _flatten(source)
    path = Path(source)
    if path.is_dir():
        path = _newest_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    try:
        tree = _msgpack.load(path)
    except _msgpack.MsgpackError as e:
        raise _msgpack.MsgpackError(f"{path}: not a flax msgpack checkpoint ({e})") from e
    if not isinstance(tree, Mapping):
        raise _msgpack.MsgpackError(f"{path}: a flax checkpoint holds a map, not {type(tree).__name__}")
    return _flatten(tree)


def _to_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ConversionError(f"parameter {name!r} is not a numeric array (got {type(value).__name__} "
                              f"of dtype {array.dtype})")
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def read_params(source: Source) -> dict[str, torch.Tensor]:
    """The parameters of a maskgit checkpoint (any accepted source, see the module doc) as a
    flat dict: ``/``-joined flax names (without the ``params`` / ``target`` wrappers) -> tensors."""
    flat = _read_tree(source)
    unwrapped = True
    while unwrapped:  # {"params": ...}, {"target": ...}, {"target": {"params": ...}}, ...
        unwrapped = False
        for wrapper in _WRAPPERS:
            inner = {k[len(wrapper) + 1:]: v for k, v in flat.items() if k.startswith(wrapper + "/")}
            if inner:
                flat, unwrapped = inner, True
                break
    return {name: _to_tensor(name, value) for name, value in flat.items()}


def _check_tree(params: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], source: str) -> None:
    """One ConversionError for every missing, unknown and wrongly shaped parameter."""
    check_shapes(source, {k: v.shape for k, v in params.items()}, expected, extra_label="unknown keys",
                 expected_label="expected")


def _settings(config: Config, sections: tuple[str, ...]) -> dict[str, Any]:
    """maskgit config names -> values: top-level entries plus those of ``sections``."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # an ml_collections.ConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of maskgit config names, got {type(config).__name__}")
    out = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    for section in sections:
        out.update(config.get(section) or {})
    return out


def _layer_count(params: Mapping[str, Any], pattern: str) -> int:
    """Number of consecutive indices i (from 0) with some key matching ``pattern.format(i)``."""
    found = {int(m[1]) for k in params if (m := re.match(pattern, k))}
    n = 0
    while n in found:
        n += 1
    return n


def _missing_for_inference(params, keys, source):
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConversionError(f"{source}: cannot read the architecture off the weights: " + _listing("missing keys", missing)
                              + " (not a maskgit checkpoint of this kind?)")


# -- transformer -------------------------------------------------------------------------------

_T_SOURCE = "google maskgit Transformer"


def _transformer_shapes(*, vocab: int, positions: int, dim: int, depth: int, heads: int, head_dim: int,
                        mlp: int) -> dict[str, tuple]:
    """Every parameter of maskgit's ``Transformer`` with its shape."""
    shapes = {"Embed_0/word_embeddings/embedding": (vocab, dim),
              "Embed_0/position_embeddings/embedding": (positions, dim),
              "MlmLayer_0/mlm_dense/kernel": (dim, dim), "MlmLayer_0/mlm_dense/bias": (dim,),
              "MlmLayer_0/mlm_bias/bias": (vocab,)}
    norms = ["Embed_0/embeddings_ln", "MlmLayer_0/mlm_ln"]
    for i in range(depth):
        layer = f"TransformerLayer_{i}"
        a = f"{layer}/Attention_0/self_attention"
        for name in ("query", "key", "value"):
            shapes[f"{a}/{name}/kernel"] = (dim, heads, head_dim)
            shapes[f"{a}/{name}/bias"] = (heads, head_dim)
        shapes[f"{a}/out/kernel"] = (heads, head_dim, dim)
        shapes[f"{a}/out/bias"] = (dim,)
        shapes[f"{layer}/Mlp_0/intermediate_output/kernel"] = (dim, mlp)
        shapes[f"{layer}/Mlp_0/intermediate_output/bias"] = (mlp,)
        shapes[f"{layer}/Mlp_0/layer_output/kernel"] = (mlp, dim)
        shapes[f"{layer}/Mlp_0/layer_output/bias"] = (dim,)
        norms += [f"{layer}/Attention_0/attention_output_ln", f"{layer}/Mlp_0/layer_output_ln"]
    for norm in norms:
        shapes[f"{norm}/scale"] = shapes[f"{norm}/bias"] = (dim,)
    return shapes


def transformer_config(params: Mapping[str, torch.Tensor], config: Config = None, *,
                       backend: str | None = None) -> MuseTransformerConfig:
    """The :class:`MuseTransformerConfig` of a maskgit ``Transformer`` (flat params, as
    :func:`read_params` gives), read off its shapes; ``config`` (maskgit names: ``codebook_size``,
    ``num_class``, ``num_layers``, ``num_embeds``, ``num_heads``, ``intermediate_size``,
    ``image_size`` with ``patch_size``) overrides them. The parameters are checked strictly."""
    s = _settings(config, ("vqvae", "transformer"))
    word, pos = "Embed_0/word_embeddings/embedding", "Embed_0/position_embeddings/embedding"
    query = "TransformerLayer_0/Attention_0/self_attention/query/kernel"
    mlp = "TransformerLayer_0/Mlp_0/intermediate_output/kernel"
    _missing_for_inference(params, (word, pos, query, mlp), _T_SOURCE)
    vocab, dim = params[word].shape[0], s.get("num_embeds", params[word].shape[1])
    heads = s.get("num_heads", params[query].shape[1])
    if dim % heads:
        raise ValueError(f"num_embeds={dim} is not divisible by num_heads={heads}")
    if "image_size" in s:
        grid = s["image_size"] // s.get("patch_size", 16)
    else:
        grid = math.isqrt(params[pos].shape[0] - 1)
        if grid * grid + 1 != params[pos].shape[0]:
            raise ConversionError(f"{_T_SOURCE}: {params[pos].shape[0]} position embeddings are not a square "
                                  "grid of tokens plus the class token")
    K = s.get("codebook_size", RELEASED_CODEBOOK_SIZE)
    classes = s.get("num_class", vocab - K - 1)
    if classes < 1 or K < 1:
        raise ValueError(f"a vocabulary of {vocab} rows cannot hold codebook_size={K} image ids, class ids and "
                         "[MASK]: pass config={'codebook_size': <the tokenizer's codebook size>}")
    mask_id = s.get("mask_token_id", -1)
    if mask_id not in (-1, K + classes):
        raise ValueError(f"mask_token_id={mask_id} is not supported: maskgit's [MASK] is -1 (the last row, "
                         f"{K + classes})")
    depth = s.get("num_layers", _layer_count(params, r"TransformerLayer_(\d+)/"))
    hidden = s.get("intermediate_size", params[mlp].shape[1])
    expected = _transformer_shapes(vocab=K + classes + 1, positions=grid * grid + 1, dim=dim, depth=depth,
                                   heads=heads, head_dim=dim // heads, mlp=hidden)
    _check_tree(params, expected, _T_SOURCE)
    return MuseTransformerConfig(
        codebook_size=K, grid_size=grid, dim=dim, depth=depth, num_heads=heads, text_dim=None,
        num_classes=classes, mlp="gelu", mlp_hidden_dim=hidden, norm="layernorm", norm_eps=_LN_EPS, bias=True,
        final_norm=False, head_mlp=True, head_mlp_norm=True, norm_position="post", embed_norm=True,
        gelu_approximate="tanh", backend=backend)


def transformer_state(params: Mapping[str, torch.Tensor], mcfg: MuseTransformerConfig) -> dict[str, torch.Tensor]:
    """maskgit ``Transformer`` params (checked by :func:`transformer_config`) -> a
    :class:`MuseTransformer` state dict."""
    K, C = mcfg.codebook_size, mcfg.num_classes
    word, pos = params["Embed_0/word_embeddings/embedding"], params["Embed_0/position_embeddings/embedding"]
    mask_row = word[K + C:]  # maskgit's mask_token_id = -1: the last row

    def dense(src, dst):  # flax Dense kernel (in, out) -> Linear weight (out, in)
        out[f"{dst}.weight"] = params[f"{src}/kernel"].T
        out[f"{dst}.bias"] = params[f"{src}/bias"]

    def norm(src, dst):
        out[f"{dst}.weight"] = params[f"{src}/scale"]
        out[f"{dst}.bias"] = params[f"{src}/bias"]

    out = {"token_embed.weight": torch.cat([word[:K], mask_row]),
           "class_embed.weight": torch.cat([word[K: K + C], mask_row]) + pos[0],  # the class token sits at position 0
           "pos_embed": pos[None, 1:],
           "head.weight": word[:K],  # maskgit ties the output projection to the word embeddings
           "head.bias": params["MlmLayer_0/mlm_bias/bias"][:K]}
    norm("Embed_0/embeddings_ln", "embed_norm")
    for i in range(mcfg.depth):
        src, dst = f"TransformerLayer_{i}", f"blocks.{i}"
        a = f"{src}/Attention_0/self_attention"
        # DenseGeneral kernels keep the heads apart: (D, H, hd) in, (H, hd, D) out; H-major like musefast
        qkv = [params[f"{a}/{n}/kernel"].flatten(1).T for n in ("query", "key", "value")]
        out[f"{dst}.attn.to_qkv.weight"] = torch.cat(qkv)
        out[f"{dst}.attn.to_qkv.bias"] = torch.cat([params[f"{a}/{n}/bias"].flatten() for n in ("query", "key", "value")])
        out[f"{dst}.attn.to_out.weight"] = params[f"{a}/out/kernel"].flatten(0, 1).T
        out[f"{dst}.attn.to_out.bias"] = params[f"{a}/out/bias"]
        norm(f"{src}/Attention_0/attention_output_ln", f"{dst}.norm1")
        dense(f"{src}/Mlp_0/intermediate_output", f"{dst}.mlp.proj_in")
        dense(f"{src}/Mlp_0/layer_output", f"{dst}.mlp.proj_out")
        norm(f"{src}/Mlp_0/layer_output_ln", f"{dst}.norm3")
    dense("MlmLayer_0/mlm_dense", "head_mlp.0")
    norm("MlmLayer_0/mlm_ln", "head_mlp.2")
    return out


def load_transformer(source: Source, config: Config = None, *, backend: str | None = None) -> MuseTransformer:
    """A maskgit class-conditional ``Transformer`` checkpoint (any source of the module doc) ->
    a musefast :class:`MuseTransformer` with the same logits over the codebook. ``config``:
    maskgit config names overriding what the shapes tell (see :func:`transformer_config`); the
    codebook size defaults to the released 1024. ``backend``: the attention backend."""
    params = read_params(source)
    mcfg = transformer_config(params, config, backend=backend)
    model = MuseTransformer(mcfg)
    load_strict(model, transformer_state(params, mcfg), source=f"{_T_SOURCE} -> MuseTransformer")
    return model.eval()


def to_musefast_inputs(input_tokens: torch.Tensor, model: MuseTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    """maskgit's transformer input (B, 1 + N): the class token (codebook_size + label) then image
    ids with [MASK] = -1 (or the last vocabulary row) -> (musefast tokens (B, N) with [MASK] =
    ``model.mask_token_id``, class_labels (B,))."""
    K, C = model.config.codebook_size, model.config.num_classes
    ids = input_tokens if isinstance(input_tokens, torch.Tensor) else torch.from_numpy(np.array(input_tokens))
    ids = ids.long()
    if ids.dim() != 2 or ids.shape[1] != model.config.seq_len + 1:
        raise ValueError(f"input_tokens must be (B, 1 + {model.config.seq_len}) (class token first), "
                         f"got {tuple(ids.shape)}")
    labels, image = ids[:, 0] - K, ids[:, 1:]
    if ((labels < 0) | (labels >= C)).any():
        raise ValueError(f"the first token must be a class token codebook_size + label in [{K}, {K + C}), "
                         f"got {ids[:, 0].tolist()}")
    is_mask = (image == -1) | (image == K + C)
    if ((image < 0) | (image >= K))[~is_mask].any():
        raise ValueError(f"image ids must lie in [0, {K}) or be the [MASK] id -1 / {K + C}")
    return torch.where(is_mask, model.mask_token_id, image), labels


# -- tokenizer ---------------------------------------------------------------------------------

_V_SOURCE = "google maskgit VQVAE tokenizer"
_NORM_GROUPS = 32  # flax GroupNorm's default num_groups, which maskgit keeps


def _res_block_shapes(prefix: str, cin: int, width: int) -> dict[str, tuple]:
    shapes = {f"{prefix}/GroupNorm_0/scale": (cin,), f"{prefix}/GroupNorm_0/bias": (cin,),
              f"{prefix}/Conv_0/kernel": (3, 3, cin, width),
              f"{prefix}/GroupNorm_1/scale": (width,), f"{prefix}/GroupNorm_1/bias": (width,),
              f"{prefix}/Conv_1/kernel": (3, 3, width, width)}
    if cin != width:  # the skip conv, on the block's output
        shapes[f"{prefix}/Conv_2/kernel"] = (1, 1, width, width)
    return shapes


def _vqgan_layout(filters: int, mult, n: int) -> tuple[list, list]:
    """(encoder blocks, decoder blocks) as (flax index, musefast prefix, in width, width)."""
    widths = [filters * m for m in mult]
    enc, ch = [], filters
    for level, width in enumerate(widths):
        for b in range(n):
            enc.append((len(enc), f"encoder.levels.{level}.blocks.{b}", ch, width))
            ch = width
    enc += [(len(enc) + b, f"encoder.mid.{b}", ch, ch) for b in range(n)]
    dec = [(b, f"decoder.mid.{b}", ch, ch) for b in range(n)]
    for level, width in enumerate(reversed(widths)):  # deepest level first, in flax and musefast
        for b in range(n):
            dec.append((len(dec), f"decoder.levels.{level}.blocks.{b}", ch, width))
            ch = width
    return enc, dec


def _vqgan_shapes(filters: int, mult, n: int, embed_dim: int, codebook_size: int) -> dict[str, tuple]:
    """Every parameter of maskgit's ``VQVAE`` (vq quantizer) with its shape."""
    widths = [filters * m for m in mult]
    enc, dec = _vqgan_layout(filters, mult, n)
    shapes = {"encoder/Conv_0/kernel": (3, 3, 3, filters),
              "encoder/GroupNorm_0/scale": (widths[-1],), "encoder/GroupNorm_0/bias": (widths[-1],),
              "encoder/Conv_1/kernel": (1, 1, widths[-1], embed_dim), "encoder/Conv_1/bias": (embed_dim,),
              "quantizer/codebook": (codebook_size, embed_dim),
              "decoder/Conv_0/kernel": (3, 3, embed_dim, widths[-1]), "decoder/Conv_0/bias": (widths[-1],),
              "decoder/GroupNorm_0/scale": (widths[0],), "decoder/GroupNorm_0/bias": (widths[0],)}
    for part, blocks in (("encoder", enc), ("decoder", dec)):
        for j, _, cin, width in blocks:
            shapes.update(_res_block_shapes(f"{part}/ResBlock_{j}", cin, width))
    levels = len(widths)
    for i in range(1, levels):  # after decoder level i - 1 (deepest first): upsample + conv at its width
        width = widths[levels - i]
        shapes[f"decoder/Conv_{i}/kernel"] = (3, 3, width, width)
        shapes[f"decoder/Conv_{i}/bias"] = (width,)
    shapes[f"decoder/Conv_{levels}/kernel"] = (3, 3, widths[0], 3)
    shapes[f"decoder/Conv_{levels}/bias"] = (3,)
    return shapes


def vqgan_config(params: Mapping[str, torch.Tensor], config: Config = None) -> VQGANConfig:
    """The :class:`VQGANConfig` of a maskgit ``VQVAE`` tokenizer (flat params), read off its
    shapes; ``config`` (maskgit's ``vqvae`` names: ``filters``, ``num_res_blocks``,
    ``channel_multipliers``, ``embedding_dim``, ``codebook_size``, and ``norm_type``,
    ``activation_fn``, ``conv_downsample``, ``commitment_cost``) overrides them. The parameters
    are checked strictly."""
    s = _settings(config, ("vqvae",))
    problems = []
    if s.get("norm_type", "GN") != "GN":
        problems.append(f"norm_type={s['norm_type']!r} (only 'GN')")
    if s.get("activation_fn", "swish") != "swish":
        problems.append(f"activation_fn={s['activation_fn']!r} (only 'swish')")
    if s.get("conv_downsample", False):
        problems.append("conv_downsample=True (only average-pool downsampling)")
    if problems:
        raise ValueError("unsupported maskgit tokenizer config: " + "; ".join(problems))
    _missing_for_inference(params, ("encoder/Conv_0/kernel", "quantizer/codebook", "encoder/ResBlock_0/Conv_0/kernel"),
                           _V_SOURCE)
    filters = s.get("filters", params["encoder/Conv_0/kernel"].shape[-1])
    embed_dim = s.get("embedding_dim", params["quantizer/codebook"].shape[1])
    codebook_size = s.get("codebook_size", params["quantizer/codebook"].shape[0])
    mult = tuple(s["channel_multipliers"]) if "channel_multipliers" in s else None
    # decoder convs: conv_in, one upsampling conv between two levels, conv_out
    levels = len(mult) if mult else _layer_count(params, r"decoder/Conv_(\d+)/") - 1
    if levels < 1:
        raise ConversionError(f"{_V_SOURCE}: cannot count the levels (decoder/Conv_<i> kernels missing)")
    # the encoder has num_res_blocks per level plus as many mid blocks
    n = s.get("num_res_blocks", _layer_count(params, r"encoder/ResBlock_(\d+)/") // (levels + 1))
    if mult is None:  # a level's width is its first block's
        firsts = [f"encoder/ResBlock_{i * n}/Conv_0/kernel" for i in range(levels)]
        _missing_for_inference(params, firsts, _V_SOURCE)
        mult = tuple(params[k].shape[-1] // filters for k in firsts)
    if mult[0] != 1:
        raise ValueError(f"maskgit tokenizers with channel_multipliers[0] != 1 are not supported, got {mult}")
    _check_tree(params, _vqgan_shapes(filters, mult, n, embed_dim, codebook_size), _V_SOURCE)
    return VQGANConfig(in_channels=3, channels=filters, channel_mult=mult, num_res_blocks=n, num_mid_blocks=n,
                       z_channels=embed_dim, embed_dim=embed_dim, codebook_size=codebook_size,
                       norm_groups=_NORM_GROUPS, downsample="avgpool", signed_pixels=False, shortcut="output",
                       decoder_res_blocks=n, commitment_beta=s.get("commitment_cost", 0.25))


def _conv(kernel: torch.Tensor) -> torch.Tensor:
    """flax conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw) (both cross-correlate)."""
    return kernel.permute(3, 2, 0, 1)


def vqgan_state(params: Mapping[str, torch.Tensor], vcfg: VQGANConfig) -> dict[str, torch.Tensor]:
    """maskgit ``VQVAE`` params (checked by :func:`vqgan_config`) -> a :class:`VQGAN` state dict."""
    out: dict[str, torch.Tensor] = {}

    def conv(src, dst, *, bias=True):
        out[f"{dst}.weight"] = _conv(params[f"{src}/kernel"])
        out[f"{dst}.bias"] = params[f"{src}/bias"] if bias else torch.zeros(out[f"{dst}.weight"].shape[0])

    def norm(src, dst):
        out[f"{dst}.weight"] = params[f"{src}/scale"]
        out[f"{dst}.bias"] = params[f"{src}/bias"]

    enc, dec = _vqgan_layout(vcfg.channels, vcfg.channel_mult, vcfg.num_res_blocks)
    for part, blocks in (("encoder", enc), ("decoder", dec)):
        for j, dst, cin, width in blocks:
            src = f"{part}/ResBlock_{j}"
            norm(f"{src}/GroupNorm_0", f"{dst}.norm1")
            conv(f"{src}/Conv_0", f"{dst}.conv1", bias=False)
            norm(f"{src}/GroupNorm_1", f"{dst}.norm2")
            conv(f"{src}/Conv_1", f"{dst}.conv2", bias=False)
            if cin != width:
                conv(f"{src}/Conv_2", f"{dst}.shortcut", bias=False)
    conv("encoder/Conv_0", "encoder.conv_in", bias=False)
    norm("encoder/GroupNorm_0", "encoder.norm_out")
    conv("encoder/Conv_1", "encoder.conv_out")
    out["encoder.conv_out.weight"] = F.pad(out["encoder.conv_out.weight"], (1, 1, 1, 1))  # 1x1 = centre of a 3x3
    out["quantize.embedding.weight"] = params["quantizer/codebook"]
    eye = torch.eye(vcfg.embed_dim)[:, :, None, None]  # maskgit has no quant_conv / post_quant_conv
    for name in ("quant_conv", "post_quant_conv"):
        out[f"{name}.weight"], out[f"{name}.bias"] = eye, torch.zeros(vcfg.embed_dim)
    levels = len(vcfg.channel_mult)
    conv("decoder/Conv_0", "decoder.conv_in")
    for i in range(1, levels):
        conv(f"decoder/Conv_{i}", f"decoder.levels.{i - 1}.resample.conv")
    norm("decoder/GroupNorm_0", "decoder.norm_out")
    conv(f"decoder/Conv_{levels}", "decoder.conv_out")
    return out


def load_vqgan(source: Source, config: Config = None, *, vq_backend: str | None = None) -> VQGAN:
    """A maskgit ``VQVAE`` tokenizer checkpoint (any source of the module doc) -> a musefast
    :class:`VQGAN` with the same tokens and reconstructions (images in [0, 1], NCHW). ``config``:
    maskgit ``vqvae`` names overriding what the shapes tell (see :func:`vqgan_config`)."""
    params = read_params(source)
    vcfg = vqgan_config(params, config)
    model = VQGAN(vcfg, vq_backend=vq_backend)
    load_strict(model, vqgan_state(params, vcfg), source=f"{_V_SOURCE} -> VQGAN")
    return model.eval()
