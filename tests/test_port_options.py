"""The optional transformer details that the ports need (muse-maskgit-pytorch's l2-normed q/k
with learned scales, null key/value, fixed softmax scale, MLP inner norm, un-normed low-res
memory), checked against a direct computation, without the peer installed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from musefast.models.transformer import Context, MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer
from musefast.nn.attention import Attention, CrossAttention


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
