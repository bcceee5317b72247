"""The optional transformer details that the ports need (muse-maskgit-pytorch's l2-normed q/k
with learned scales, null key/value, fixed softmax scale, MLP inner norm, un-normed low-res
memory; google maskgit's BERT post-norm, embedding norm and tanh GELU), checked against a direct
computation, without the peer installed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from musefast.models.transformer import Context, MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer
from musefast.nn.attention import Attention, CrossAttention
from musefast.nn.feedforward import FeedForward


def _naive(q, k, v, scale, mask=None):
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)


def test_l2_qk_norm_and_null_kv_self_attention():
    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm="l2", null_kv=True, scale=8.0, backend="reference")
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q, k, v = attn.to_qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    k = torch.cat([attn.null_kv[0].expand(2, -1, -1, -1), k], 2)
    v = torch.cat([attn.null_kv[1].expand(2, -1, -1, -1), v], 2)
    q = F.normalize(q, dim=-1) * attn.q_norm.weight
    k = F.normalize(k, dim=-1) * attn.k_norm.weight
    want = _naive(q, k, v, 8.0, F.pad(mask, (1, 0), value=True))
    want = attn.to_out(want.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, key_padding_mask=mask), want, rtol=1e-5, atol=1e-5)


def test_null_kv_cross_attention_with_all_text_masked_attends_only_the_null_slot():
    torch.manual_seed(1)
    attn = CrossAttention(16, 2, context_dim=12, null_kv=True, backend="reference")
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 3, 12)
    out = attn(x, ctx, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    null_v = attn.null_kv[1].expand(2, -1, 4, -1)  # softmax over one key = that key's value
    want = attn.to_out(null_v.transpose(1, 2).reshape(2, 4, 16))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    kv = attn.precompute_kv(ctx)
    assert kv.k.shape[2] == 4  # null slot first
    torch.testing.assert_close(attn(x, kv=kv), attn(x, ctx))


def _cfg(**kw):
    base = dict(codebook_size=10, grid_size=2, dim=16, depth=2, num_heads=2, text_dim=12, mlp="geglu",
                mlp_hidden_dim=11, mlp_inner_norm=True, norm_eps=1e-5, qk_norm="l2", bias=False,
                attn_scale=8.0, null_kv=True, backend="reference")
    base.update(kw)
    return MuseTransformerConfig(**base)


def test_transformer_options_shapes_and_context_cat_with_null_kv():
    torch.manual_seed(2)
    model = MuseTransformer(_cfg()).eval()
    assert model.blocks[0].mlp.proj_in.weight.shape == (22, 16)
    assert model.blocks[0].mlp.inner_norm.weight.shape == (11,)
    tok = torch.randint(0, 11, (2, 4))
    text = torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        cond = model.prepare_context(text, None)
        uncond = model.prepare_context(text, torch.zeros(2, 3, dtype=torch.bool))
        both = Context.cat([cond, uncond])  # a None mask next to a real one: K holds the null slot too
        assert both.mask.shape == (4, 3)
        out = model(torch.cat([tok, tok]), context=both)
        torch.testing.assert_close(out[:2], model(tok, text), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[2:], model(tok, text, torch.zeros(2, 3, dtype=torch.bool)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(tok, text, mask), model(tok, text))


def test_superres_without_low_norm():
    cfg = SuperResConfig(high=_cfg(), low_codebook_size=10, low_grid_size=1, encoder_depth=0, low_norm=False)
    model = SuperResTransformer(cfg).eval()
    assert isinstance(model.low_norm, torch.nn.Identity)
    low = torch.tensor([[3], [4]])
    with torch.no_grad():
        ctx = model.prepare_context(low, torch.randn(2, 3, 12))
    assert ctx.kvs[0].k.shape[2] == 1 + 1 + 3  # null slot, low-res token, text


def _ln(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_bert_post_norm_embedding_norm_and_tanh_gelu():
    """google maskgit's layout: x = LN(x + f(x)) residuals, a LayerNorm over the embeddings (class
    token included), tanh GELU in the MLPs and the MLM head."""
    torch.manual_seed(3)
    cfg = MuseTransformerConfig(codebook_size=10, grid_size=2, dim=16, depth=2, num_heads=2, text_dim=None,
                                num_classes=3, mlp_hidden_dim=24, norm_eps=1e-12, final_norm=False, head_mlp=True,
                                norm_position="post", embed_norm=True, gelu_approximate="tanh", backend="reference")
    model = MuseTransformer(cfg).eval()
    with torch.no_grad():  # norms away from 1/0, so a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("head_mlp.2"):
                p.add_(torch.randn_like(p) * 0.3)
    tok, labels = torch.randint(0, 11, (2, 4)), torch.tensor([0, 3])
    with torch.no_grad():
        x = torch.cat([model.class_embed(labels)[:, None], model.token_embed(tok) + model.pos_embed], 1)
        x = _ln(model.embed_norm, x)
        for blk in model.blocks:
            q, k, v = blk.attn.to_qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
            x = _ln(blk.norm1, x + blk.attn.to_out(_naive(q, k, v, 8 ** -0.5).transpose(1, 2).reshape(2, 5, 16)))
            x = _ln(blk.norm3, x + blk.mlp.proj_out(F.gelu(blk.mlp.proj_in(x), approximate="tanh")))
        h = F.gelu(model.head_mlp[0](x[:, 1:]), approximate="tanh")
        want = model.head(_ln(model.head_mlp[2], h))
        got = model(tok, class_labels=labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        exact = MuseTransformer(dataclasses.replace(cfg, gelu_approximate="none")).eval()
        exact.load_state_dict(model.state_dict())
        assert not torch.allclose(exact(tok, class_labels=labels), got, rtol=0, atol=1e-7)


def test_post_norm_text_model_and_defaults_unchanged():
    model = MuseTransformer(_cfg(norm_position="post", embed_norm=True, qk_norm=False, null_kv=False)).eval()
    tok, text = torch.randint(0, 11, (2, 4)), torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(tok, context=model.prepare_context(text)), model(tok, text))
    assert "embed_norm.weight" in model.state_dict()
    default = MuseTransformerConfig(text_dim=12)
    assert (default.norm_position, default.embed_norm, default.gelu_approximate) == ("pre", False, "none")
    assert not any(k.startswith("embed_norm") for k in MuseTransformer(_cfg()).state_dict())
    with pytest.raises(ValueError, match="norm_position"):
        _cfg(norm_position="middle")
    with pytest.raises(ValueError, match="NormFormer"):
        _cfg(norm_position="post", post_norm=True)
    with pytest.raises(ValueError, match="gelu_approximate"):
        FeedForward(4, 8, gelu_approximate="sigmoid")
